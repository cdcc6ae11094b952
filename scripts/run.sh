#!/usr/bin/env bash
# The main job: set up, build (release), run the demo pipeline and then the inspection pipeline
# (training its demo model first when out/models/demo is missing), printing each per-operator
# summary. Metrics also land in out/*-metrics.json and out/demo-metrics.prom; the inspection's
# overlay images and verdicts in out/inspection.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked
mkdir -p out
./target/release/inspectflow run graphs/demo.yaml \
  --metrics-json out/demo-metrics.json \
  --metrics-prometheus out/demo-metrics.prom
if [ ! -f out/models/demo/manifest.json ]; then
  ./target/release/inspectflow run graphs/normal_images.yaml > /dev/null
  ./target/release/inspectflow train --normal out/normal-images --out out/models/demo
fi
./target/release/inspectflow run graphs/inspection.yaml --metrics-json out/inspection-metrics.json
echo "overlays and verdicts: out/inspection (results.jsonl)"
