#!/usr/bin/env bash
# Several camera-paced streams on one shared compiled model (issue 08), against one stream.
#
#   benches/multi_stream.sh [--streams N] [--rounds R] [--seconds S]
#
# The 360p clip of benches/e2e_vs_python.sh (which prepares the clip and the PatchCore package)
# is played in a loop at its own 30 FPS by N cameras in one pipeline, each with its own chain
# (preprocess -> infer.openvino -> anomaly -> heatmap -> encode.jpeg -> sink.folder), every
# infer.openvino naming the same model with the same settings, so one compiled model serves all
# of them. The same graph with one camera is the baseline; rounds alternate the two. Each run
# lasts S seconds (then SIGINT: the pipeline drains and writes its metrics). Reported per run: frames read and written per
# stream, frames dropped anywhere, capture-to-file latency (each sink's end_to_end_ms: the
# median of the streams' p50 and the worst stream's p99), peak RSS, and the N-stream / 1-stream
# RSS ratio. Queues block (the default), so a frame the pipeline cannot keep up with shows as
# a late frame, not a lost one; `dropped` counts what the realtime camera itself skipped.
#
# Settings (environment): MULTI_PRECISION (f32), MULTI_HINT (unset: infer.openvino's default,
# the latency hint for one camera and the throughput hint for several), INSPECTFLOW_BIN,
# E2E_CACHE (see e2e_vs_python.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

streams=4
rounds=2
seconds=30
while [ $# -gt 0 ]; do
  case $1 in
    --streams) streams=${2:-}; shift ;;
    --rounds) rounds=${2:-}; shift ;;
    --seconds) seconds=${2:-}; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "multi-stream: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done
for value in "$streams" "$rounds" "$seconds"; do
  if ! [[ $value =~ ^[0-9]+$ ]] || [ "$value" -lt 1 ] || [ "$value" -gt 600 ]; then
    echo "multi-stream: --streams, --rounds and --seconds take 1 to 600" >&2
    exit 2
  fi
done

prepared=$(benches/e2e_vs_python.sh --prepare)
setting() { printf '%s\n' "$prepared" | sed -n "s/^$1=//p" | tail -n 1; }
bin=$(setting bin)
clip=$(setting clip_360)
model=$(setting model)
py=$root/.local/venv/bin/python
harness=$root/benches/e2e_vs_python/harness.py
precision=${MULTI_PRECISION:-f32}
hint=""
if [ -n "${MULTI_HINT:-}" ]; then hint=", hint: $MULTI_HINT"; fi

work=${E2E_CACHE:-$root/out/bench-e2e}/run-multi-$(date +%Y%m%d-%H%M%S)
mkdir -p "$work"
trap 'rm -rf "$work/frames"' EXIT
echo "multi-stream: $streams streams against 1, $rounds round(s) of ${seconds}s, $(nproc) cores," \
  "$precision; results in $work"

write_graph() { # file streams
  {
    echo "name: multi-stream-$2"
    echo "nodes:"
    for i in $(seq "$2"); do
      cat <<YAML
  - {id: camera$i, op: source.video_file, params: {path: "$clip", realtime: true, loop: true}}
  - {id: preprocess$i, op: preprocess, params: {width: 256, height: 256}}
  - {id: infer$i, op: infer.openvino, params: {model: "$model/model.xml", precision: $precision$hint}}
  - {id: verdict$i, op: anomaly, params: {model: "$model"}}
  - {id: heatmap$i, op: heatmap, params: {alpha: 0.4, outline: false, label: false}}
  - {id: jpeg$i, op: encode.jpeg, params: {quality: 95}}
  - {id: results$i, op: sink.folder, params: {path: "$work/frames/$2-$i", create: true}}
YAML
    done
    echo "edges:"
    for i in $(seq "$2"); do
      cat <<YAML
  - {from: camera$i, to: preprocess$i}
  - {from: preprocess$i, to: infer$i}
  - {from: infer$i, to: verdict$i}
  - {from: verdict$i, to: heatmap$i}
  - {from: heatmap$i, to: jpeg$i}
  - {from: jpeg$i, to: results$i}
YAML
    done
  } > "$1"
}

run() { # round streams
  local tag=streams$2-r$1
  rm -rf "$work/frames"
  write_graph "$work/$tag.yaml" "$2"
  "$py" "$harness" measure --timeout $((seconds + 120)) --log "$work/$tag.log" \
    --json "$work/$tag.measure.json" -- \
    timeout --preserve-status -s INT "$seconds" \
    "$bin" run "$work/$tag.yaml" --metrics-json "$work/$tag.metrics.json" \
    || { echo "multi-stream: $tag failed; the end of its log:" >&2; tail -n 20 "$work/$tag.log" >&2; exit 1; }
  "$py" - "$work/$tag.metrics.json" "$work/$tag.measure.json" "$1" "$2" >> "$work/results.jsonl" <<'PY'
import json, statistics, sys
metrics_path, measure_path, round_, streams = sys.argv[1:]
metrics = json.load(open(metrics_path))
measured = json.load(open(measure_path))
nodes = {n["id"]: n for n in metrics["nodes"]}
sinks = [n for n in metrics["nodes"] if n["id"].startswith("results")]
cameras = [n for n in metrics["nodes"] if n["id"].startswith("camera")]
latency = [s["end_to_end_ms"] for s in sinks if s.get("end_to_end_ms")]
print(json.dumps({
    "round": int(round_), "streams": int(streams), "seconds": metrics["elapsed_s"],
    "read": [c["packets_out"] for c in cameras], "written": [s["packets_in"] for s in sinks],
    "dropped": sum(e["dropped"] for e in metrics["edges"]),
    "errors": sum(n["errors"] for n in metrics["nodes"]),
    "p50_ms": statistics.median(l["p50"] for l in latency) if latency else None,
    "p99_ms": max(l["p99"] for l in latency) if latency else None,
    "peak_rss_mb": measured["peak_rss_mb"],
}))
PY
}

for round in $(seq "$rounds"); do
  if [ $((round % 2)) -eq 1 ]; then run "$round" 1; run "$round" "$streams"
  else run "$round" "$streams"; run "$round" 1; fi
done

"$py" - "$work/results.jsonl" <<'PY' | tee "$work/report.txt"
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("| round | streams | FPS per stream (written / s) | frames written, each stream | dropped | errors | p50 | worst p99 | peak RSS |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    fps = statistics.mean(w / r["seconds"] for w in r["written"])
    print(f"| {r['round']} | {r['streams']} | {fps:.1f} | {', '.join(map(str, r['written']))} "
          f"(read {sum(r['read'])}) | {r['dropped']} | {r['errors']} | {r['p50_ms']:.1f} ms "
          f"| {r['p99_ms']:.1f} ms | {r['peak_rss_mb']:.0f} MB |")
by_round = {}
for r in rows:
    by_round.setdefault(r["round"], {})[r["streams"]] = r
ratios = [max(v.values(), key=lambda r: r["streams"])["peak_rss_mb"] /
          min(v.values(), key=lambda r: r["streams"])["peak_rss_mb"]
          for v in by_round.values() if len(v) == 2]
if ratios:
    print(f"\nRSS of the multi-stream run / one stream, per round: "
          f"{', '.join(f'{x:.2f}x' for x in ratios)}; median {statistics.median(ratios):.2f}x")
PY
