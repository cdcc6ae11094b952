#!/usr/bin/env bash
# End-to-end inference throughput against OpenVINO's own benchmark_app, in one run, on the same IR
# with the same thread count.
#
#   benches/openvino_pipeline.sh [frames] [threads]
#
# Exports MobileNetV2 at 256x256 as IR, runs benchmark_app on it (threads, 2 streams, 4 requests),
# then runs the pipeline source.synthetic (640x480) -> preprocess (256x256) -> infer.openvino ->
# sink.null with the same threads, streams and requests, and prints both frame rates and their ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
frames=${1:-3000}
threads=${2:-$(nproc)}
scripts/setup.sh
cargo build --release --locked --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
./target/release/inspectflow backbones export mobilenet_v2 --size 256 --out "$work/mobilenet_v2.xml" >/dev/null

# benchmark_app only takes explicit threads and streams without a hint; the pipeline gets the same,
# and both compute in f32 (the precision models are calibrated in).
streams=2
requests=4
reference=$(.local/venv/bin/benchmark_app -m "$work/mobilenet_v2.xml" -d CPU -hint none \
  -nthreads "$threads" -nstreams "$streams" -nireq "$requests" -infer_precision f32 -t 15 2>&1 | awk '/Throughput:/ {print $(NF-1)}')

cat > "$work/pipeline.yaml" <<YAML
name: openvino-pipeline-bench
nodes:
  - {id: camera, op: source.synthetic, params: {width: 640, height: 480, frames: $frames}}
  - {id: preprocess, op: preprocess, params: {width: 256, height: 256}}
  - id: infer
    op: infer.openvino
    params: {model: "$work/mobilenet_v2.xml", device: CPU, hint: throughput, requests: $requests, threads: $threads, streams: $streams, precision: f32}
  - {id: sink, op: sink.null}
edges:
  - {from: camera, to: preprocess}
  - {from: preprocess, to: infer}
  - {from: infer, to: sink}
YAML
./target/release/inspectflow run "$work/pipeline.yaml" --metrics-json "$work/metrics.json"
pipeline=$(python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(round([n for n in m['nodes'] if n['id']=='sink'][0]['fps'],1))" "$work/metrics.json")
python3 - "$reference" "$pipeline" "$threads" <<'PY'
import sys
reference, pipeline, threads = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
print(f"benchmark_app (MobileNetV2 256x256, CPU, {threads} threads, 2 streams, 4 requests): {reference:.1f} FPS")
print(f"inspectflow pipeline (synthetic 640x480 -> preprocess -> infer.openvino -> sink.null): {pipeline:.1f} FPS")
print(f"ratio: {pipeline / reference:.2f}x")
PY
