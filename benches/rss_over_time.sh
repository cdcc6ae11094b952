#!/usr/bin/env bash
# Resident memory of a camera-paced 1080p pipeline over a long run (issue 08: under 250 MB and
# flat).
#
#   benches/rss_over_time.sh [--minutes M] [--every S]
#
# The 1080p clip of benches/e2e_vs_python.sh (which prepares it and the PatchCore package) is
# played in a loop at its own 30 FPS through preprocess -> infer.openvino (its default for a
# live source: latency hint) -> anomaly -> heatmap -> encode.jpeg -> sink.null, for M minutes
# (10), then SIGINT (the pipeline drains and writes its metrics). VmRSS and VmHWM of the process
# are read from /proc every S seconds (10). Reported: the samples, the peak, the first and last
# minute's means and their difference, the frames written and dropped.
#
# Settings (environment): INSPECTFLOW_BIN, E2E_CACHE (see e2e_vs_python.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

minutes=10
every=10
while [ $# -gt 0 ]; do
  case $1 in
    --minutes) minutes=${2:-}; shift ;;
    --every) every=${2:-}; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "rss-over-time: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done
for value in "$minutes" "$every"; do
  if ! [[ $value =~ ^[0-9]+$ ]] || [ "$value" -lt 1 ] || [ "$value" -gt 600 ]; then
    echo "rss-over-time: --minutes and --every take 1 to 600" >&2
    exit 2
  fi
done

prepared=$(benches/e2e_vs_python.sh --prepare)
setting() { printf '%s\n' "$prepared" | sed -n "s/^$1=//p" | tail -n 1; }
bin=$(setting bin)
clip=$(setting clip_1080)
model=$(setting model)
py=$root/.local/venv/bin/python

work=${E2E_CACHE:-$root/out/bench-e2e}/run-rss-$(date +%Y%m%d-%H%M%S)
mkdir -p "$work"
cat > "$work/graph.yaml" <<YAML
name: rss-over-time
nodes:
  - {id: camera, op: source.video_file, params: {path: "$clip", realtime: true, loop: true}}
  - {id: preprocess, op: preprocess, params: {width: 256, height: 256}}
  - {id: infer, op: infer.openvino, params: {model: "$model/model.xml"}}
  - {id: verdict, op: anomaly, params: {model: "$model"}}
  - {id: heatmap, op: heatmap, params: {alpha: 0.4}}
  - {id: jpeg, op: encode.jpeg, params: {quality: 95}}
  - {id: results, op: sink.null}
edges:
  - {from: camera, to: preprocess}
  - {from: preprocess, to: infer}
  - {from: infer, to: verdict}
  - {from: verdict, to: heatmap}
  - {from: heatmap, to: jpeg}
  - {from: jpeg, to: results}
YAML
echo "rss-over-time: $minutes min of $clip at 30 FPS, a sample every ${every}s; results in $work"

"$bin" run "$work/graph.yaml" --metrics-json "$work/metrics.json" > "$work/run.log" 2>&1 &
pid=$!
trap 'kill -INT "$pid" 2>/dev/null || true' EXIT
end=$((SECONDS + minutes * 60))
: > "$work/samples.tsv"
while [ "$SECONDS" -lt "$end" ] && kill -0 "$pid" 2>/dev/null; do
  sleep "$every"
  awk -v t="$SECONDS" '/^VmRSS:/ {rss=$2} /^VmHWM:/ {hwm=$2} END {print t "\t" rss "\t" hwm}' \
    "/proc/$pid/status" >> "$work/samples.tsv" 2>/dev/null || break
done
kill -INT "$pid" 2>/dev/null || true
wait "$pid" || { echo "rss-over-time: the run failed; the end of its log:" >&2; tail -n 20 "$work/run.log" >&2; exit 1; }
trap - EXIT

"$py" - "$work/samples.tsv" "$work/metrics.json" <<'PY' | tee "$work/report.txt"
import json, sys
samples = [tuple(int(v) for v in line.split()) for line in open(sys.argv[1]) if line.strip()]
metrics = json.load(open(sys.argv[2]))
sink = next(n for n in metrics["nodes"] if n["id"] == "results")
camera = next(n for n in metrics["nodes"] if n["id"] == "camera")
mb = lambda kib: kib / 1024
print("| second | RSS | peak so far |")
print("|---|---|---|")
for t, rss, hwm in samples:
    print(f"| {t} | {mb(rss):.1f} MB | {mb(hwm):.1f} MB |")
last_t = samples[-1][0]
first = [rss for t, rss, _ in samples if t <= 60]
last = [rss for t, rss, _ in samples if t > last_t - 60]
first_mean, last_mean = mb(sum(first) / len(first)), mb(sum(last) / len(last))
print(f"\npeak RSS {mb(max(h for _, _, h in samples)):.1f} MB; first minute mean "
      f"{first_mean:.1f} MB, last minute mean {last_mean:.1f} MB ({last_mean - first_mean:+.1f} MB); "
      f"frames read {camera['packets_out']}, written {sink['packets_in']}, "
      f"dropped {sum(e['dropped'] for e in metrics['edges'])}")
PY
