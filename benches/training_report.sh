#!/usr/bin/env bash
# The training report of BENCHMARKS.md: for PaDiM and PatchCore on MobileNetV2 and
# EfficientNet-Lite0 (256x256 input, default settings, seed 42):
#   1. accuracy: image AUROC, pixel AUROC and PRO on DeepPCB (templates normal, tests anomalous,
#      defect boxes as masks; pairs split between training and test, see prepare_deeppcb.py) and
#      on the three CC0 texture photos (random 256x256 crops; test defects generated);
#   2. training time for 200 images (generated carpet, 256x256), from snapshot to package;
#   3. inference throughput (benchmark_app, f32, throughput hint, 10 s) of the exported package
#      against the bare backbone.
#
#   [MEMORY_BANK=256] benches/training_report.sh [DATA_DIR]     (default: ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
data=$(realpath "${1:-../shared/data}")
scripts/setup.sh
cargo build --release --locked --quiet
bin=$PWD/target/release/inspectflow
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cache=$work/snapshots
bank=${MEMORY_BANK:-256}

python3 benches/prepare_deeppcb.py "$data/deeppcb" "$work/deeppcb" >&2
for texture in brick grass gravel; do
  "$bin" synth --out "$work/$texture" --photo "$data/textures_cc0/$texture.png" \
    --train 40 --test-normal 20 --test-anomalous 20 --seed 3 >&2
done
"$bin" synth --out "$work/timing" --train 200 --test-normal 1 --test-anomalous 1 >&2

summary() {
  python3 -c 'import json,sys
s=json.load(open(sys.argv[1]))["summary"]
f=lambda v: "-" if v is None else "%.3f" % v
print(" | ".join(f(s[k]) for k in ("image_auroc","pixel_auroc","pro","image_f1")))' "$1"
}

echo "| backbone | model | dataset | image AUROC | pixel AUROC | PRO | image F1 |"
echo "|---|---|---|---|---|---|---|"
for backbone in mobilenet_v2 efficientnet_lite0; do
  for model in padim patchcore; do
    for set in deeppcb brick grass gravel; do
      package=$work/models/$set-$model-$backbone
      "$bin" train --normal "$work/$set/train/normal" --model "$model" --backbone "$backbone" --memory-bank "$bank" \
        --snapshots "$cache" --out "$package" > /dev/null 2>&1
      "$bin" eval --model "$package" --normal "$work/$set/test/normal" \
        --anomalous "$work/$set/test/anomalous" --masks "$work/$set/masks" --json \
        > "$work/eval.json" 2> /dev/null
      echo "| $backbone | $model | $set | $(summary "$work/eval.json") |"
    done
  done
done

echo
echo "| backbone | model | training, 200 images (s) | package FPS | bare backbone FPS | package / backbone |"
echo "|---|---|---|---|---|---|"
fps() {
  .local/venv/bin/benchmark_app -m "$1" -d CPU -hint throughput -infer_precision f32 -t 10 2>&1 \
    | awk '/Throughput:/ {print $(NF-1)}'
}
for backbone in mobilenet_v2 efficientnet_lite0; do
  "$bin" backbones export "$backbone" --size 256 --out "$work/$backbone.xml" > /dev/null
  bare=$(fps "$work/$backbone.xml")
  for model in padim patchcore; do
    package=$work/models/timing-$model-$backbone
    start=$(date +%s%N)
    "$bin" train --normal "$work/timing/train/normal" --model "$model" --backbone "$backbone" --memory-bank "$bank" \
      --snapshots "$cache" --out "$package" > /dev/null 2>&1
    seconds=$(python3 -c "print(($(date +%s%N) - $start) / 1e9)")
    packaged=$(fps "$package/model.xml")
    ratio=$(python3 -c "print('%.2f' % ($packaged / $bare))")
    printf '| %s | %s | %.1f | %s | %s | %s |\n' "$backbone" "$model" "$seconds" "$packaged" "$bare" "$ratio"
  done
done
