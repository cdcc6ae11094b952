#!/usr/bin/env bash
# The main job: set up, build (release), run the demo pipeline and then the inspection pipeline
# (training its demo model first when out/models/demo is missing), printing each per-operator
# summary. Metrics also land in out/*-metrics.json and out/demo-metrics.prom; the inspection's
# overlay images and verdicts in out/inspection.
# Then it starts the API server (data in out/server, on INSPECTFLOW_BIND, default
# 127.0.0.1:8000) and sets up its demo through the API (scripts/demo_api.py): a project, a
# model trained by a job, and a pipeline running on a looping video into out/server-results.
# It serves until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The workspace: inspectflow and inspectflow-torch (the libtorch helper that trains STFPM).
cargo build --release --locked --workspace
mkdir -p out
./target/release/inspectflow run graphs/demo.yaml \
  --metrics-json out/demo-metrics.json \
  --metrics-prometheus out/demo-metrics.prom
if [ ! -d out/normal-images ]; then
  ./target/release/inspectflow run graphs/normal_images.yaml > /dev/null
fi
if [ ! -f out/models/demo/manifest.json ]; then
  ./target/release/inspectflow train --model padim --normal out/normal-images --out out/models/demo
fi
./target/release/inspectflow run graphs/inspection.yaml --metrics-json out/inspection-metrics.json
echo "overlays and verdicts: out/inspection (results.jsonl)"

# The server demo.
if [ ! -f out/demo.mp4 ]; then
  ./target/release/inspectflow run graphs/demo_video.yaml > /dev/null
fi
bind="${INSPECTFLOW_BIND:-127.0.0.1:8000}"
./target/release/inspectflow serve --bind "$bind" --data-dir out/server --path-root out &
server=$!
trap 'kill -INT "$server" 2>/dev/null; wait "$server"' EXIT INT TERM
python3 - "$bind" <<'WAIT'
import sys, time, urllib.request
for _ in range(100):
    try:
        urllib.request.urlopen(f"http://{sys.argv[1]}/health", timeout=1)
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(f"the server did not answer on {sys.argv[1]}")
WAIT
python3 scripts/demo_api.py "http://$bind" out/normal-images "$PWD/out/demo.mp4" "$PWD/out/server-results"
wait "$server"
