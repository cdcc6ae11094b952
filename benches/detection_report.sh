#!/usr/bin/env bash
# The detection report of BENCHMARKS.md (issue 09): every model family with default settings on
# every dataset we can ship or install, beside the numpy PatchCore of the paper.
#
#   benches/detection_report.sh [DATA_DIR]        (default: ../shared/data)
#
# Datasets (DATA_DIR is ../shared/data; nothing from it is committed):
# - deeppcb-boards: DeepPCB across boards. Train on the 68 templates (`*_temp.jpg`) of groups
#   12100 and 44000; test on the 34 templates of group 92000 (normal) and its 34 test images
#   (anomalous). 640x640 grey PCB photos with defects of a few pixels.
# - deeppcb-boards-png: the same as lossless PNGs at 512x512, so that the product and the
#   reference read identical pixels.
# - deeppcb-pairs: DeepPCB template/test pairs alternating between training and test, defect
#   boxes as masks (benches/prepare_deeppcb.py).
# - brick, grass, gravel: random crops of the CC0 texture photos with generated defects and
#   masks (`inspectflow synth --photo`); carpet: a generated texture (`inspectflow synth`).
# For each dataset and family (padim, patchcore, stfpm, reverse_distillation, efficient_ad), `inspectflow train` with default settings
# (seed 42; calibration on held-out normal images only) and `inspectflow eval --json` on the
# test images; for PatchCore, benches/patchcore_reference.py on the package's own training
# split, bank size and seed (the reference reads images with OpenCV, the product with its own
# decoder and resize: equal on identical pixels, see the report); serving throughput of each
# package and of the bare backbone at the same size with benchmark_app (f32, throughput hint);
# PatchCore on DeepPCB across boards at 256, 512 and 640 in 256-pixel tiles; fitting time of
# PatchCore's default bank on 700 generated 256x256 images.
# Results land in $REPORT_DIR (default out/detection-report); benches/detection_summary.py
# prints the tables. MODELS="stfpm efficient_ad" runs only those families; EXTRAS=0 leaves out
# the input-size, tiling and fitting-time runs (a family's rows alone, on a busy machine).
set -euo pipefail
cd "$(dirname "$0")/.."
data=$(realpath "${1:-../shared/data}")
work=$(realpath -m "${REPORT_DIR:-out/detection-report}")
scripts/setup.sh
# The workspace: inspectflow-torch trains the gradient-trained families.
cargo build --release --locked --quiet --workspace
bin=$PWD/target/release/inspectflow
py=$PWD/.local/venv/bin/python
# The reference reads images with OpenCV and package splits with pyarrow (bench only).
"$py" -m pip install --quiet opencv-python-headless==4.14.0.94 pyarrow==26.0.1

rm -rf "$work"
mkdir -p "$work/data" "$work/models" "$work/results"
cache=$work/snapshots

# ---- datasets -----------------------------------------------------------------------------------
boards=$work/data/deeppcb-boards
mkdir -p "$boards/train/normal" "$boards/test/normal" "$boards/test/anomalous"
for group in group12100 group44000; do
  ln -s "$data"/deeppcb/$group/*/*_temp.jpg "$boards/train/normal/"
done
ln -s "$data"/deeppcb/group92000/*/*_temp.jpg "$boards/test/normal/"
ln -s "$data"/deeppcb/group92000/*/*_test.jpg "$boards/test/anomalous/"
python3 benches/prepare_deeppcb.py "$data/deeppcb" "$work/data/deeppcb-pairs" >&2
# The same split as lossless PNGs at the model's size (OpenCV's area resize), so that the product
# and the reference read identical pixels: their JPEG decoders and resizers differ by a level
# here and there, and a coreset is sensitive to that.
"$py" - "$boards" "$work/data/deeppcb-boards-png" 512 <<'PY'
import pathlib, sys, cv2
source, target, size = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])
for image in sorted(source.glob("*/*/*.jpg")):
    out = target / image.parent.relative_to(source) / (image.stem + ".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    pixels = cv2.imread(str(image), cv2.IMREAD_COLOR)
    cv2.imwrite(str(out), cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA))
PY
for texture in brick grass gravel; do
  "$bin" synth --out "$work/data/$texture" --photo "$data/textures_cc0/$texture.png" \
    --train 40 --test-normal 20 --test-anomalous 20 --seed 3 >&2
done
"$bin" synth --out "$work/data/carpet" --train 40 --test-normal 20 --test-anomalous 20 --seed 3 >&2
"$bin" synth --out "$work/data/timing" --train 700 --test-normal 1 --test-anomalous 1 --seed 5 >&2

fps() {
  "$PWD/.local/venv/bin/benchmark_app" -m "$1" -d CPU -hint throughput -infer_precision f32 -t 10 2>&1 \
    | awk '/Throughput:/ {print $(NF-1)}'
}

# ---- train, evaluate, compare -------------------------------------------------------------------
for set in deeppcb-boards deeppcb-boards-png deeppcb-pairs brick grass gravel carpet; do
  dir=$work/data/$set
  masks=()
  [ -d "$dir/masks" ] && masks=(--masks "$dir/masks")
  for model in ${MODELS:-padim patchcore stfpm reverse_distillation efficient_ad}; do
    package=$work/models/$set-$model
    result=$work/results/$set-$model
    start=$(date +%s%N)
    "$bin" train --normal "$dir/train/normal" --model "$model" --snapshots "$cache" --out "$package" \
      > "$result.train.txt" 2>&1
    echo "$(( ($(date +%s%N) - start) / 1000000 ))" > "$result.train_ms"
    "$bin" eval --model "$package" --normal "$dir/test/normal" --anomalous "$dir/test/anomalous" \
      "${masks[@]}" --json > "$result.eval.json" 2> /dev/null
    fps "$package/model.xml" > "$result.fps"
    if [ "$model" = patchcore ]; then
      size=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["input_size"])' "$package/manifest.json")
      [ -f "$work/models/backbone-$size.xml" ] \
        || "$bin" backbones export mobilenet_v2 --size "$size" --out "$work/models/backbone-$size.xml" > /dev/null
      "$py" benches/patchcore_reference.py --backbone "$work/models/backbone-$size.xml" --package "$package" \
        --normal "$dir/test/normal" --anomalous "$dir/test/anomalous" --product "$result.eval.json" \
        --out "$result.reference.json" >&2
    fi
    echo "$set $model done" >&2
  done
done
for size in 256 512; do
  [ -f "$work/models/backbone-$size.xml" ] \
    || "$bin" backbones export mobilenet_v2 --size "$size" --out "$work/models/backbone-$size.xml" > /dev/null
  fps "$work/models/backbone-$size.xml" > "$work/results/backbone-$size.fps"
done

if [ "${EXTRAS:-1}" = 0 ]; then
  "$py" benches/detection_summary.py "$work"
  exit 0
fi

# ---- input size and tiling: PatchCore on DeepPCB across boards ----------------------------------
for variant in 256 512 640-tile256; do
  size=${variant%%-*}
  tile=()
  [[ $variant == *tile* ]] && tile=(--tile "${variant##*tile}")
  package=$work/models/size-$variant
  result=$work/results/size-$variant
  start=$(date +%s%N)
  "$bin" train --normal "$boards/train/normal" --model patchcore --input-size "$size" "${tile[@]}" \
    --snapshots "$cache" --out "$package" > "$result.train.txt" 2>&1
  echo "$(( ($(date +%s%N) - start) / 1000000 ))" > "$result.train_ms"
  "$bin" eval --model "$package" --normal "$boards/test/normal" --anomalous "$boards/test/anomalous" \
    --json > "$result.eval.json" 2> /dev/null
  fps "$package/model.xml" > "$result.fps"
  echo "size $variant done" >&2
done

# ---- fitting time: PatchCore's default bank on 700 images ----------------------------------------
start=$(date +%s%N)
"$bin" train --normal "$work/data/timing/train/normal" --model patchcore --snapshots "$cache" \
  --out "$work/models/timing-patchcore" > "$work/results/timing.train.txt" 2>&1
echo "$(( ($(date +%s%N) - start) / 1000000 ))" > "$work/results/timing.train_ms"

"$py" benches/detection_summary.py "$work"
