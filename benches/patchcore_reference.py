#!/usr/bin/env python3
"""PatchCore as the paper describes it, in plain numpy: the oracle inspectflow's PatchCore is
measured against (benches/detection_report.sh runs it beside the product).

Roth et al., "Towards Total Recall in Industrial Anomaly Detection" (CVPR 2022):
- locally aware patch features: the backbone's stride-8 and stride-16 feature maps, each averaged
  over its 3x3 neighbourhood (zero padding counted, as torch's AvgPool2d(3, 1, 1)), the stride-16
  map resized bilinearly onto the stride-8 grid (half-pixel centres), concatenated per position;
- greedy k-center coreset selection from a seeded random patch, on a Gaussian random projection to
  128 dims when the patches have more (inspectflow's seeded generator, so that both pick the same
  patches for the same seed);
- a test patch's score: Euclidean distance to its nearest bank patch;
- the image score: the largest patch score, times 1 - softmax(distances of that patch to the
  nearest bank patch's b = 9 nearest bank patches)[0] (equation 7, as anomalib computes it).

The backbone is inspectflow's own IR (`inspectflow backbones export NAME --out X.xml`, outputs
`features_s8` and `features_s16`, input RGB in [0, 1]), run with OpenVINO's Python API in f32,
so both sides see the same features; images are resized to the input size with OpenCV's bilinear
resize. Prints image AUROC and writes per-image scores as JSON (--out) for an image-by-image
comparison with `inspectflow eval --json`.
"""

import argparse
import json
import pathlib
import sys

import cv2
import numpy as np
import openvino as ov

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def image_files(folder):
    return sorted(p for p in pathlib.Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def read_rgb(path, size):
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        sys.exit(f"reference: cannot read {path}")
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(image.transpose(2, 0, 1)[None].astype(np.float32) / 255.0)


def average_pool_3x3(maps):
    """[C, H, W] averaged over 3x3 neighbourhoods, zero padding counted (divides by 9)."""
    padded = np.pad(maps, ((0, 0), (1, 1), (1, 1)))
    _, h, w = maps.shape
    total = np.zeros_like(maps)
    for dy in range(3):
        for dx in range(3):
            total += padded[:, dy : dy + h, dx : dx + w]
    return total / 9.0


def resize_bilinear(maps, h, w):
    """[C, h0, w0] to [C, h, w], half-pixel centres (align_corners=False)."""
    _, h0, w0 = maps.shape

    def axis(out, size):
        source = (np.arange(out) + 0.5) * size / out - 0.5
        source = np.clip(source, 0, size - 1)
        low = np.floor(source).astype(int)
        high = np.minimum(low + 1, size - 1)
        return low, high, (source - low).astype(np.float32)

    y0, y1, fy = axis(h, h0)
    x0, x1, fx = axis(w, w0)
    rows = maps[:, y0, :] * (1 - fy)[None, :, None] + maps[:, y1, :] * fy[None, :, None]
    return rows[:, :, x0] * (1 - fx)[None, None, :] + rows[:, :, x1] * fx[None, None, :]


class Embedder:
    def __init__(self, backbone_xml, size):
        core = ov.Core()
        model = core.read_model(backbone_xml)
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        self.size = size

    def __call__(self, path):
        """[positions, dim] locally aware patch features of one image, and the grid (h, w)."""
        outputs = self.compiled(read_rgb(path, self.size))
        s8 = outputs[self.compiled.output("features_s8")][0]
        s16 = outputs[self.compiled.output("features_s16")][0]
        s8 = average_pool_3x3(s8)
        s16 = resize_bilinear(average_pool_3x3(s16), s8.shape[1], s8.shape[2])
        embedded = np.concatenate([s8, s16], axis=0)
        dim, h, w = embedded.shape
        return embedded.reshape(dim, h * w).T.copy(), (h, w)


class Rng:
    """inspectflow's seeded generator (SplitMix64, src/synth/noise.rs), so that the reference
    starts its coreset from the same patch and projects with the same matrix as the product:
    the two then agree pick by pick, and their results image by image."""

    MASK = (1 << 64) - 1

    def __init__(self, seed):
        self.state = (seed ^ 0x5DEECE66D1CE4E5B) & self.MASK

    def next_u64(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & self.MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self.MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self.MASK
        return z ^ (z >> 31)

    def unit(self):
        return np.float32((self.next_u64() >> 40) / float(1 << 24))

    def below(self, bound):
        return self.next_u64() % bound if bound else 0


PROJECTION_DIM = 128
MAX_CANDIDATES = 300_000


def sample_candidates(patches, seed):
    """The patches the coreset picks from: all of them, or, beyond MAX_CANDIDATES, each kept
    with probability MAX_CANDIDATES / all, drawn in order from the product's generator (its
    PatchSampler), so that large datasets still compare pick by pick."""
    keep = MAX_CANDIDATES / max(len(patches), 1)
    if keep >= 1.0:
        return patches
    rng = Rng(seed ^ 0xC04E5E7)
    kept = [i for i in range(len(patches)) if float(rng.unit()) < keep]
    return patches[kept]


def greedy_coreset(patches, count, seed):
    """Indices of `count` rows picked by greedy k-center: start from a seeded random row, then
    repeatedly take the row farthest from all picked so far. Rows of more than PROJECTION_DIM
    dimensions are compared through a Gaussian random projection to PROJECTION_DIM (the paper's
    d* = 128)."""
    rng = Rng(seed)
    dim = patches.shape[1]
    if dim > PROJECTION_DIM:
        normals = np.empty(dim * PROJECTION_DIM, dtype=np.float32)
        for i in range(len(normals)):
            u = max(rng.unit(), np.finfo(np.float32).tiny)
            v = rng.unit()
            normals[i] = np.sqrt(-2.0 * np.log(u)) * np.cos(2 * np.pi * v)
        projection = normals.reshape(dim, PROJECTION_DIM) / np.sqrt(PROJECTION_DIM)
        space = patches @ projection
    else:
        space = patches
    count = min(count, len(patches))
    picked = [int(rng.below(len(patches)))]
    nearest = np.full(len(patches), np.inf, dtype=np.float32)
    for _ in range(count - 1):
        delta = space - space[picked[-1]]
        nearest = np.minimum(nearest, np.einsum("ij,ij->i", delta, delta))
        picked.append(int(np.argmax(nearest)))
    return np.array(picked)


def squared_distances(a, b):
    """[len(a), len(b)] squared Euclidean distances, in float64 to avoid cancellation."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    d = (a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None, :]
    return np.maximum(d, 0.0)


def image_score(patches, bank, neighbours=9):
    distances = squared_distances(patches, bank)
    nearest = distances.argmin(1)
    scores = np.sqrt(distances[np.arange(len(patches)), nearest])
    worst = int(scores.argmax())
    entry = bank[nearest[worst]]
    support = np.argsort(squared_distances(entry[None], bank)[0], kind="stable")[:neighbours]
    to_support = np.sqrt(squared_distances(patches[worst][None], bank[support])[0])
    weights = np.exp(to_support - to_support.max())
    weight = 1.0 - weights[0] / weights.sum()
    return float(weight * scores[worst]), scores


def auroc(normal, anomalous):
    """Probability that an anomalous score exceeds a normal one (ties count half)."""
    normal = np.asarray(normal)[:, None]
    anomalous = np.asarray(anomalous)[None, :]
    return float(((anomalous > normal).sum() + 0.5 * (anomalous == normal).sum()) / normal.size / anomalous.size)


def package_training(package):
    """The training images (in the product's order), bank rows and seed of a PatchCore package."""
    import pyarrow.parquet as pq  # only for --package

    manifest = json.loads((pathlib.Path(package) / "manifest.json").read_text())
    table = pq.read_table(pathlib.Path(package) / "dataset.parquet").to_pydict()
    training = [pathlib.Path(p) for p, split in zip(table["path"], table["split"]) if split == "train"]
    rows = manifest["metrics"]["memory_bank"]["rows"]
    return training, rows, manifest["provenance"]["seed"], manifest["input_size"]


def compare(reference, product_json):
    """Image-by-image agreement with `inspectflow eval --json` output on the same test images."""
    product = json.loads(pathlib.Path(product_json).read_text())
    pairs = [
        (reference[row["label"]][row["filename"]], row["raw_score"])
        for row in product["images"]
        if row["filename"] in reference.get(row["label"], {})
    ]
    ours, theirs = np.array(pairs).T
    ranks = lambda v: np.argsort(np.argsort(v))
    return {
        "images": len(pairs),
        "product_auroc": product["summary"]["image_auroc"],
        "largest_relative_difference": float(np.max(np.abs(ours - theirs) / np.maximum(np.abs(ours), 1e-9))),
        "rank_correlation": float(np.corrcoef(ranks(ours), ranks(theirs))[0, 1]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", required=True, help="backbone IR (.xml)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--train", help="folder of normal training images")
    source.add_argument(
        "--package",
        help="an inspectflow PatchCore package: train on its training split, with its bank rows and seed",
    )
    parser.add_argument("--normal", required=True, help="folder of normal test images")
    parser.add_argument("--anomalous", required=True, help="folder of anomalous test images")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=0.01, help="coreset fraction of all patches")
    parser.add_argument("--rows", type=int, help="memory bank rows (instead of --ratio)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--product", help="`inspectflow eval --json` output to compare with, image by image")
    parser.add_argument("--out", help="write per-image scores and the AUROC here (JSON)")
    args = parser.parse_args()

    if args.package:
        training, args.rows, args.seed, args.size = package_training(args.package)
    else:
        training = image_files(args.train)
    embed = Embedder(args.backbone, args.size)
    patches = np.concatenate([embed(p)[0] for p in training])
    rows = args.rows if args.rows else max(1, int(round(args.ratio * len(patches))))
    candidates = sample_candidates(patches, args.seed)
    bank = candidates[greedy_coreset(candidates, rows, args.seed)]
    results = {"normal": {}, "anomalous": {}}
    for label in results:
        for path in image_files(getattr(args, label)):
            results[label][path.name] = image_score(embed(path)[0], bank)[0]
    value = auroc(list(results["normal"].values()), list(results["anomalous"].values()))
    document = {"auroc": value, "bank_rows": len(bank), "dim": int(bank.shape[1]), "seed": args.seed}
    line = (
        f"reference PatchCore: {len(training)} training images, {len(patches)} patches, "
        f"bank {len(bank)} x {bank.shape[1]}, seed {args.seed}: image AUROC {value:.4f}"
    )
    if args.product:
        document["comparison"] = compare(results, args.product)
        c = document["comparison"]
        line += (
            f"; product {c['product_auroc']:.4f}, rank correlation {c['rank_correlation']:.3f}, "
            f"largest relative score difference {c['largest_relative_difference']:.4f} ({c['images']} images)"
        )
    print(line)
    if args.out:
        document["scores"] = results
        pathlib.Path(args.out).write_text(json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
