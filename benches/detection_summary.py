#!/usr/bin/env python3
"""Prints the tables of the detection report from the results benches/detection_report.sh
wrote into DIR (standard library only).

    benches/detection_summary.py DIR
"""
import json
import pathlib
import sys


def best_f1(rows):
    """The best image F1 over every threshold on the same raw scores."""
    scored = sorted(((r["raw_score"], r["label"] == "anomalous") for r in rows), reverse=True)
    positives = sum(label for _, label in scored)
    best = tp = fp = 0
    for index, (score, label) in enumerate(scored):
        tp += label
        fp += not label
        # Only cut between different scores.
        if index + 1 < len(scored) and scored[index + 1][0] == score:
            continue
        best = max(best, 2 * tp / (tp + fp + positives) if positives else 0)
    return best


def number(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def read(path):
    return path.read_text().strip() if path.exists() else None


class Run:
    """One trained package's results: `results/NAME.*` and `models/NAME/manifest.json`."""

    def __init__(self, work, name):
        stem = work / "results" / name
        self.file = lambda suffix: stem.with_name(stem.name + suffix)
        self.found = self.file(".eval.json").exists()
        if not self.found:
            return
        self.evaluation = json.loads(self.file(".eval.json").read_text())
        self.summary = self.evaluation["summary"]
        self.manifest = json.loads((work / "models" / name / "manifest.json").read_text())
        self.best = best_f1(self.evaluation["images"])
        self.fps = read(self.file(".fps"))
        train_ms = read(self.file(".train_ms"))
        self.train_seconds = int(train_ms) / 1000 if train_ms else None


def main():
    work = pathlib.Path(sys.argv[1])
    results = work / "results"
    datasets = ["deeppcb-boards", "deeppcb-boards-png", "deeppcb-pairs", "brick", "grass", "gravel", "carpet"]
    print(
        "| dataset | model | input | bank rows | image AUROC | pixel AUROC | PRO "
        "| F1 at calibrated threshold | best F1 | ratio | expected FPR | training (s) | FPS | FPS / backbone |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    comparisons = []
    for dataset in datasets:
        for model in ["padim", "patchcore", "stfpm", "reverse_distillation", "efficient_ad"]:
            run = Run(work, f"{dataset}-{model}")
            if not run.found:
                continue
            summary, manifest = run.summary, run.manifest
            size = manifest["input_size"]
            bank = manifest["metrics"].get("memory_bank", {}).get("rows")
            calibration = manifest["metrics"].get("calibration", {})
            best, f1, fps = run.best, summary["image_f1"], run.fps
            backbone = read(results / f"backbone-{size}.fps")
            ratio = None if fps is None or backbone is None else float(fps) / float(backbone)
            print(
                f"| {dataset} | {model} | {size} | {bank or '-'} | {number(summary['image_auroc'])} "
                f"| {number(summary['pixel_auroc'])} | {number(summary['pro'])} | {number(f1)} | {number(best)} "
                f"| {number(f1 / best if best else None, 2)} "
                f"| {number(calibration.get('expected_false_positive_rate'), 3)} "
                f"| {number(run.train_seconds, 1)} | {fps or '-'} | {number(ratio, 2)} |"
            )
            reference_path = run.file(".reference.json")
            if reference_path.exists():
                reference = json.loads(reference_path.read_text())
                comparisons.append((dataset, size, reference))
    print()
    print("| dataset | model | epochs run of | best epoch | seconds per epoch | device |")
    print("|---|---|---|---|---|---|")
    for dataset in datasets:
        for model in ["stfpm", "reverse_distillation", "efficient_ad"]:
            run = Run(work, f"{dataset}-{model}")
            if not run.found:
                continue
            training = run.manifest["metrics"].get("training", {})
            print(
                f"| {dataset} | {model} | {training.get('epochs_run', '-')} of {training.get('epochs', '-')} "
                f"| {training.get('best_epoch', '-')} | {number(training.get('seconds_per_epoch'), 2)} "
                f"| {training.get('device', '-')} |"
            )
    print()
    print("| dataset | input | bank rows | inspectflow AUROC | reference AUROC | difference | rank correlation of image scores |")
    print("|---|---|---|---|---|---|---|")
    for dataset, size, reference in comparisons:
        comparison = reference["comparison"]
        print(
            f"| {dataset} | {size} | {reference['bank_rows']} | {number(comparison['product_auroc'])} "
            f"| {number(reference['auroc'])} | {number(comparison['product_auroc'] - reference['auroc'])} "
            f"| {number(comparison['rank_correlation'])} |"
        )
    print()
    print("| PatchCore on deeppcb-boards | bank rows | image AUROC | F1 at calibrated threshold | best F1 | training (s) | FPS |")
    print("|---|---|---|---|---|---|---|")
    for variant in ["256", "512", "640-tile256"]:
        run = Run(work, f"size-{variant}")
        if not run.found:
            continue
        manifest = run.manifest
        tiling = manifest["metrics"].get("tiling")
        label = f"{manifest['input_size']}" + (f", {tiling['tiles']} tiles of {tiling['tile']}" if tiling else "")
        print(
            f"| {label} | {manifest['metrics']['memory_bank']['rows']} | {number(run.summary['image_auroc'])} "
            f"| {number(run.summary['image_f1'])} | {number(run.best)} "
            f"| {number(run.train_seconds, 1)} | {run.fps or '-'} |"
        )
    timing = read(results / "timing.train_ms")
    if timing:
        manifest = json.loads((work / "models" / "timing-patchcore" / "manifest.json").read_text())
        print()
        print(
            f"PatchCore on 700 generated 256x256 images ({manifest['provenance']['training_images']} fitted, "
            f"bank {manifest['metrics']['memory_bank']['rows']} rows): {int(timing) / 1000:.1f} s from snapshot to "
            f"package, calibration included."
        )


if __name__ == "__main__":
    main()
