#!/usr/bin/env bash
# The main job: set up, build (release) and run the demo pipeline, printing its per-operator
# summary. Metrics also land in out/demo-metrics.json and out/demo-metrics.prom.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked
mkdir -p out
./target/release/inspectflow run graphs/demo.yaml \
  --metrics-json out/demo-metrics.json \
  --metrics-prometheus out/demo-metrics.prom
