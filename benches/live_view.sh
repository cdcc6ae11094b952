#!/usr/bin/env bash
# The live view's cost to a pipeline and its delay from capture to the browser (issue 11).
#
#   benches/live_view.sh [--rounds N] [--seconds S]
#
# Starts `inspectflow serve` on 127.0.0.1, runs benches/live_view/bench.mjs against it in
# Debian's headless chromium (playwright-core from tests/browser, installed by scripts/setup.sh),
# and stops the server. The pipeline: source.synthetic 640x360 (a gradient with the capture time
# drawn into its top rows) -> preprocess -> infer.openvino -> anomaly -> heatmap -> encode.jpeg ->
# sink.null, with sink.preview taps for the overlay and the raw frame. The model: the PatchCore
# package of benches/e2e_vs_python.sh (MobileNetV2, 2000-row bank, 256x256), trained here once
# when the cache lacks it.
#
# Settings (environment): LIVE_CACHE (default out/bench-live), INSPECTFLOW_BIN (default
# target/release/inspectflow, built when missing). The browser runs on the same 2 cores as the
# server, so viewers cost the pipeline their decoding too: the figures are an upper bound of what
# a viewer on another machine costs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

rounds=3
seconds=10
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) rounds=${2:-}; shift ;;
    --seconds) seconds=${2:-}; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "live_view: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done
for value in "$rounds" "$seconds"; do
  if ! [[ $value =~ ^[0-9]+$ ]] || [ "$value" -lt 1 ] || [ "$value" -gt 600 ]; then
    echo "live_view: --rounds and --seconds take 1 to 600" >&2
    exit 2
  fi
done
if [ ! -f tests/browser/node_modules/playwright-core/package.json ] || [ ! -x /usr/bin/chromium ]; then
  echo "live_view: run scripts/setup.sh first (chromium and playwright-core)" >&2
  exit 1
fi

bin=${INSPECTFLOW_BIN:-$root/target/release/inspectflow}
if [ -z "${INSPECTFLOW_BIN:-}" ]; then
  cargo build --release --locked --quiet
fi
cache=${LIVE_CACHE:-$root/out/bench-live}
mkdir -p "$cache"
model=$cache/model-patchcore-2000
if [ ! -f "$model/manifest.json" ]; then
  rm -rf "$cache/synth" "$model"
  "$bin" synth --out "$cache/synth" > /dev/null
  echo "live_view: training $model"
  "$bin" train --normal "$cache/synth/train/normal" --model patchcore --memory-bank 2000 \
    --input-size 256 --snapshots "$cache/snapshots" --out "$model" > /dev/null
fi

work=$(mktemp -d)
server_log=$cache/server.log
"$bin" serve --bind 127.0.0.1:0 --data-dir "$work/data" --path-root "$cache" \
  > "$work/address" 2> "$server_log" &
server=$!
trap 'kill "$server" 2> /dev/null; wait "$server" 2> /dev/null; rm -rf "$work"' EXIT
base=
for _ in $(seq 1 100); do
  base=$(grep -o 'http://[0-9.:]*' "$work/address" | head -n 1 || true)
  [ -n "$base" ] && break
  sleep 0.1
done
if [ -z "$base" ]; then
  echo "live_view: the server did not start; the end of $server_log:" >&2
  tail -n 20 "$server_log" >&2
  exit 1
fi
echo "live_view: $(nproc) cores, $rounds round(s) of $seconds s, server $base, model $model"
node benches/live_view/bench.mjs "$base" "$model" --rounds "$rounds" --seconds "$seconds"
