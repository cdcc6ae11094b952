#!/usr/bin/env bash
# End-to-end inference throughput against OpenVINO's own benchmark_app, in one run, on the same IR
# with the same threads, streams, requests and precision (f32).
#
#   benches/openvino_pipeline.sh [frames] [threads]
#
# 1. The bare backbone: MobileNetV2 at 256x256 exported as IR; benchmark_app on it, then
#    source.synthetic (640x480) -> preprocess -> infer.openvino -> sink.null.
# 2. The whole inspection chain: a PaDiM model package (MobileNetV2 backbone, 256x256) trained on
#    24 synthetic images; benchmark_app on its IR, then source.synthetic (640x480) -> preprocess ->
#    infer.openvino -> anomaly -> heatmap -> encode.jpeg -> sink.null.
# Prints each pair of frame rates and their ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
frames=${1:-3000}
threads=${2:-$(nproc)}
streams=2
requests=4
scripts/setup.sh
cargo build --release --locked --quiet
bin=$PWD/target/release/inspectflow
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

reference_fps() {
  # benchmark_app only takes explicit threads and streams without a hint.
  .local/venv/bin/benchmark_app -m "$1" -d CPU -hint none -nthreads "$threads" -nstreams "$streams" \
    -nireq "$requests" -infer_precision f32 -t 15 2>&1 | awk '/Throughput:/ {print $(NF-1)}'
}

pipeline_fps() {
  local name=$1 model=$2 tail_nodes=$3 tail_edges=$4
  cat > "$work/$name.yaml" <<YAML
name: $name
nodes:
  - {id: camera, op: source.synthetic, params: {width: 640, height: 480, frames: $frames, pattern: checkerboard}}
  - {id: preprocess, op: preprocess, params: {width: 256, height: 256}}
  - id: infer
    op: infer.openvino
    params: {model: "$model", device: CPU, hint: throughput, requests: $requests, threads: $threads, streams: $streams, precision: f32}
$tail_nodes
  - {id: sink, op: sink.null}
edges:
  - {from: camera, to: preprocess}
  - {from: preprocess, to: infer}
$tail_edges
YAML
  "$bin" run "$work/$name.yaml" --metrics-json "$work/$name.json" >&2
  python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(round([n for n in m['nodes'] if n['id']=='sink'][0]['fps'],1))" "$work/$name.json"
}

report() {
  python3 - "$1" "$2" "$3" "$threads" <<'PY'
import sys
label, reference, pipeline, threads = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
print(f"{label}: benchmark_app {reference:.1f} FPS, inspectflow pipeline {pipeline:.1f} FPS, "
      f"ratio {pipeline / reference:.2f}x ({threads} threads, 2 streams, 4 requests, f32)")
PY
}

"$bin" backbones export mobilenet_v2 --size 256 --out "$work/mobilenet_v2.xml" > /dev/null
backbone_reference=$(reference_fps "$work/mobilenet_v2.xml")
backbone_pipeline=$(pipeline_fps backbone "$work/mobilenet_v2.xml" "" "  - {from: infer, to: sink}")

(cd "$work" && "$bin" run "$OLDPWD/graphs/normal_images.yaml" > /dev/null && \
  "$bin" train --normal out/normal-images --out out/models/bench > /dev/null)
package=$work/out/models/bench
chain_reference=$(reference_fps "$package/model.xml")
chain_pipeline=$(pipeline_fps chain "$package/model.xml" \
"  - {id: verdict, op: anomaly, params: {model: \"$package\"}}
  - {id: heatmap, op: heatmap}
  - {id: jpeg, op: encode.jpeg}" \
"  - {from: infer, to: verdict}
  - {from: verdict, to: heatmap}
  - {from: heatmap, to: jpeg}
  - {from: jpeg, to: sink}")

report "MobileNetV2 backbone (infer only)" "$backbone_reference" "$backbone_pipeline"
report "PaDiM package, full chain (infer, anomaly, heatmap, encode.jpeg)" "$chain_reference" "$chain_pipeline"
