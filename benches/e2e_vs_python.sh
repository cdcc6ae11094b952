#!/usr/bin/env bash
# The whole inspection job, end to end, against a best-effort Python/OpenCV peer and OpenVINO's
# benchmark_app, on the same anomaly IR and the same clips, in interleaved rounds.
#
#   benches/e2e_vs_python.sh [--rounds N]          throughput: every frame, as fast as possible
#   benches/e2e_vs_python.sh --live [--rounds N]   live: clips played at their own frame rate
#   benches/e2e_vs_python.sh --prepare             set-up only; prints bin=, clip_1080=,
#                                                  clip_360= and model= lines (for other benches)
#
# The job: decode the clip, resize to the model's 256x256 input, run the model, normalise the
# anomaly map with the package's statistics, blend it as a jet heatmap (alpha 0.4) over the frame
# at the frame's size, encode JPEG at quality 95, write one file per frame into a folder.
#
# - The model: a PatchCore package (MobileNetV2 backbone, nearest-neighbour head over a 2000-row
#   memory bank, 256x256 input, one IR with outputs `anomaly_map` and `pred_score`), trained once
#   with `inspectflow synth` + `inspectflow train`.
# - The clips: 1080p made here with gst-launch-1.0 (videotestsrc SMPTE bars scrolling 4 px a
#   frame, x264 High profile, 8-bit 4:2:0, 8 Mbit/s, 300 frames at 30 FPS), and the 360p clip
#   of ../shared/data/video (the first one whose height is 360; transcoded to 640x360 when none is
#   or when E2E_FRAMES_360 asks for fewer frames).
# - inspectflow: `inspectflow run` of source.video_file -> preprocess -> infer.openvino -> anomaly
#   -> heatmap (outline and label off: the peer draws neither) -> encode.jpeg -> sink.folder.
#   Frames and seconds come from --metrics-json (frames into the sink, elapsed_s: operators built
#   and the model compiled before it starts); live latency is the sink's end_to_end_ms
#   (capture to file in place; histogram buckets round up by at most 6%).
# - python: benches/e2e_vs_python/peer.py (cv2.VideoCapture, cv2.resize, AsyncInferQueue with
#   the THROUGHPUT hint and as many jobs as inspectflow's requests, two post-processing threads:
#   applyColorMap, resize, addWeighted, imencode, one file per frame); seconds from the first
#   frame read (model compiled) to the last file written; --realtime for the live mode.
# - benchmark_app: THROUGHPUT hint on the same IR (inference alone, pre-filled inputs, no
#   decoding or post-processing: the ceiling); in live mode the LATENCY hint, run twice (median,
#   then 99th percentile).
# All three run f32 (INFERENCE_PRECISION_HINT), inspectflow's default: this CPU plugin's own
# default is bf16 on CPUs that have it. inspectflow and the peer use the same request count.
# Peak RSS of each process comes from wait4. Each round runs every tool on every clip, the order
# of inspectflow and python alternating between rounds; the report gives each round's FPS and
# ratios (inspectflow/python, inspectflow/benchmark_app) and the medians.
#
# Settings (environment): E2E_CACHE (inputs, model and results; default out/bench-e2e),
# E2E_FRAMES_1080 (300), E2E_FRAMES_360 (0: the whole shared clip), E2E_BA_SECONDS (15),
# E2E_PRECISION (f32), E2E_REQUESTS (default: inspectflow's own default, twice the compiled model's
# OPTIMAL_NUMBER_OF_INFER_REQUESTS, given to the peer too), E2E_HINT
# (throughput; `latency` puts inspectflow and the peer on the latency hint), E2E_RUN_TIMEOUT
# (900 s a run), INSPECTFLOW_BIN (use this binary instead of building target/release/inspectflow).
# Everything is local: no network at run time (set-up may install the pinned OpenCV wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

mode=throughput
rounds=3
while [ $# -gt 0 ]; do
  case $1 in
    --live) mode=live ;;
    --prepare) mode=prepare ;;
    --rounds) rounds=${2:-}; shift ;;
    --rounds=*) rounds=${1#*=} ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "e2e: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done
if ! [[ $rounds =~ ^[0-9]+$ ]] || [ "$rounds" -lt 1 ] || [ "$rounds" -gt 50 ]; then
  echo "e2e: --rounds must be between 1 and 50" >&2
  exit 2
fi

cache=${E2E_CACHE:-$root/out/bench-e2e}
frames_1080=${E2E_FRAMES_1080:-300}
frames_360=${E2E_FRAMES_360:-0}
ba_seconds=${E2E_BA_SECONDS:-15}
precision=${E2E_PRECISION:-f32}
hint=${E2E_HINT:-throughput}
run_timeout=${E2E_RUN_TIMEOUT:-900}
video_dir=$root/../shared/data/video
venv=$root/.local/venv
py=$venv/bin/python
harness=$root/benches/e2e_vs_python/harness.py
peer=$root/benches/e2e_vs_python/peer.py
opencv_pin=opencv-python-headless==4.14.0.94
memory_bank=2000

# ---- set-up (idempotent) ------------------------------------------------------------------------
scripts/setup.sh
if [ "$("$py" -c 'import importlib.metadata as m; print(m.version("opencv-python-headless"))' \
  2>/dev/null || true)" != "${opencv_pin#*==}" ]; then
  echo "e2e: installing $opencv_pin into .local/venv"
  "$py" -m pip install --quiet --disable-pip-version-check "$opencv_pin"
fi
if [ -n "${INSPECTFLOW_BIN:-}" ]; then
  bin=$INSPECTFLOW_BIN
else
  cargo build --release --locked --quiet
  bin=$root/target/release/inspectflow
fi
[ -x "$bin" ] || { echo "e2e: $bin is not an executable" >&2; exit 1; }
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)

# ---- inputs, made once ----------------------------------------------------------------------------
# WIDTHxHEIGHT of a file's first video stream.
video_size() {
  if command -v gst-discoverer-1.0 > /dev/null; then
    timeout 60 gst-discoverer-1.0 "$1" 2>/dev/null \
      | awk '/Width:/ && !w {w=$2} /Height:/ && !h {h=$2} END {if (w) print w "x" h}'
  else
    timeout 60 gst-launch-1.0 -v filesrc location="$1" ! decodebin ! fakesink num-buffers=1 \
      2>/dev/null | grep -o 'video/x-raw.*' | head -n 1 \
      | sed -nE 's/.*width=\(int\)([0-9]+), height=\(int\)([0-9]+).*/\1x\2/p' || true
  fi
}

x264='x264enc speed-preset=veryfast key-int-max=60'

clip_1080=$cache/clip-1080p-${frames_1080}f.mp4
if [ ! -s "$clip_1080" ]; then
  echo "e2e: writing $clip_1080"
  # format=I420 before x264enc: without it videotestsrc and x264 settle on 10-bit 4:4:4.
  gst-launch-1.0 -q videotestsrc num-buffers="$frames_1080" pattern=smpte horizontal-speed=4 \
    ! video/x-raw,format=I420,width=1920,height=1080,framerate=30/1 \
    ! $x264 bitrate=8000 ! video/x-h264,profile=high \
    ! h264parse ! mp4mux ! filesink location="$clip_1080.partial"
  mv "$clip_1080.partial" "$clip_1080"
fi

source_360=""
first_video=""
for file in "$video_dir"/*.mp4 "$video_dir"/*.mkv "$video_dir"/*.avi "$video_dir"/*.mov; do
  [ -f "$file" ] || continue
  [ -n "$first_video" ] || first_video=$file
  if [[ $(video_size "$file") == *x360 ]]; then
    source_360=$file
    break
  fi
done
if [ -n "$source_360" ] && [ "$frames_360" -eq 0 ]; then
  clip_360=$(cd "$(dirname "$source_360")" && pwd)/$(basename "$source_360")
else
  from=${source_360:-$first_video}
  [ -n "$from" ] || { echo "e2e: no video in $video_dir" >&2; exit 1; }
  limit=""
  if [ "$frames_360" -gt 0 ]; then limit="identity eos-after=$frames_360 !"; fi
  clip_360=$cache/clip-360p-$(basename "${from%.*}")-${frames_360}f.mp4
  if [ ! -s "$clip_360" ]; then
    echo "e2e: transcoding $from to 640x360 ($clip_360)"
    gst-launch-1.0 -q filesrc location="$from" ! decodebin ! videoconvert ! videoscale \
      ! video/x-raw,format=I420,width=640,height=360 ! $limit $x264 bitrate=1500 \
      ! video/x-h264,profile=high ! h264parse ! mp4mux ! filesink location="$clip_360.partial"
    mv "$clip_360.partial" "$clip_360"
  fi
fi

model=$cache/model-patchcore-$memory_bank
if [ ! -f "$model/manifest.json" ]; then
  if [ ! -f "$cache/synth/dataset.json" ]; then
    rm -rf "$cache/synth" "$cache/synth.partial"
    "$bin" synth --out "$cache/synth.partial" > /dev/null
    mv "$cache/synth.partial" "$cache/synth"
  fi
  rm -rf "$model"
  echo "e2e: training $model"
  "$bin" train --normal "$cache/synth/train/normal" --model patchcore \
    --memory-bank "$memory_bank" --input-size 256 --snapshots "$cache/snapshots" --out "$model"
fi

if [ "$mode" = prepare ]; then
  printf 'bin=%s\nclip_1080=%s\nclip_360=%s\nmodel=%s\n' "$bin" "$clip_1080" "$clip_360" "$model"
  exit 0
fi

requests=${E2E_REQUESTS:-$("$py" - "$model/model.xml" "$hint" "$precision" <<'PY'
import sys
import openvino as ov
model, hint, precision = sys.argv[1:]
compiled = ov.Core().compile_model(model, "CPU", {"PERFORMANCE_HINT": hint.upper(),
                                                  "INFERENCE_PRECISION_HINT": precision})
print(min(max(2 * int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")), 2), 32))
PY
)}

# ---- the runs ---------------------------------------------------------------------------------------
work=$cache/run-$mode-$(date +%Y%m%d-%H%M%S)
mkdir -p "$work"
results=$work/results.jsonl
frames_dir=$work/frames
trap 'rm -rf "$frames_dir"' EXIT
realtime=false
if [ "$mode" = live ]; then realtime=true; fi
echo "e2e: $mode, $rounds round(s), $(nproc) cores, requests $requests, hint $hint, $precision;" \
  "clips $clip_1080 and $clip_360; results in $work"

write_graph() { # name clip out
  cat > "$work/$1.yaml" <<YAML
name: e2e-$1
nodes:
  - {id: video, op: source.video_file, params: {path: "$2", realtime: $realtime}}
  - {id: preprocess, op: preprocess, params: {width: 256, height: 256}}
  - id: infer
    op: infer.openvino
    params: {model: "$model/model.xml", device: CPU, hint: $hint, requests: $requests, precision: $precision}
  - {id: verdict, op: anomaly, params: {model: "$model"}}
  - {id: heatmap, op: heatmap, params: {alpha: 0.4, outline: false, label: false}}
  - {id: jpeg, op: encode.jpeg, params: {quality: 95}}
  - {id: results, op: sink.folder, params: {path: "$3", create: true}}
edges:
  - {from: video, to: preprocess}
  - {from: preprocess, to: infer}
  - {from: infer, to: verdict}
  - {from: verdict, to: heatmap}
  - {from: heatmap, to: jpeg}
  - {from: jpeg, to: results}
YAML
}

fail() { # what log
  echo "e2e: $1 failed; the end of $2:" >&2
  tail -n 20 "$2" >&2
  exit 1
}

run_inspectflow() { # round clip-name clip
  local tag=inspectflow-$2-r$1 out=$frames_dir/inspectflow-$2
  rm -rf "$out"
  write_graph "$tag" "$3" "$out"
  "$py" "$harness" measure --timeout "$run_timeout" --log "$work/$tag.log" \
    --json "$work/$tag.measure.json" -- \
    "$bin" run "$work/$tag.yaml" --metrics-json "$work/$tag.metrics.json" \
    || fail "inspectflow ($2, round $1)" "$work/$tag.log"
  "$py" "$harness" inspectflow --metrics "$work/$tag.metrics.json" \
    --measure "$work/$tag.measure.json" --out "$out" \
    mode="$mode" round="$1" clip="$2" >> "$results"
  rm -rf "$out"
}

run_peer() { # round clip-name clip
  local tag=python-$2-r$1 out=$frames_dir/python-$2
  local live=()
  if [ "$mode" = live ]; then live=(--realtime); fi
  rm -rf "$out"
  "$py" "$harness" measure --timeout "$run_timeout" --log "$work/$tag.log" \
    --json "$work/$tag.measure.json" -- \
    "$py" "$peer" --model "$model/model.xml" --video "$3" --out "$out" --requests "$requests" \
    --hint "$hint" --precision "$precision" "${live[@]}" \
    || fail "the python peer ($2, round $1)" "$work/$tag.log"
  "$py" "$harness" peer --result "$work/$tag.log" --measure "$work/$tag.measure.json" \
    --out "$out" mode="$mode" round="$1" clip="$2" >> "$results"
  rm -rf "$out"
}

run_benchmark_app() { # round
  local tag=benchmark_app-r$1 logs=()
  if [ "$mode" = throughput ]; then
    "$py" "$harness" measure --timeout "$run_timeout" --log "$work/$tag.log" \
      --json "$work/$tag.measure.json" -- \
      "$venv/bin/benchmark_app" -m "$model/model.xml" -d CPU -hint throughput \
      -t "$ba_seconds" -infer_precision "$precision" \
      || fail "benchmark_app (round $1)" "$work/$tag.log"
    logs=(--log "$work/$tag.log")
  else
    for percentile in 50 99; do
      "$py" "$harness" measure --timeout "$run_timeout" --log "$work/$tag-p$percentile.log" \
        --json "$work/$tag-p$percentile.measure.json" -- \
        "$venv/bin/benchmark_app" -m "$model/model.xml" -d CPU -hint latency \
        -t "$ba_seconds" -infer_precision "$precision" -latency_percentile "$percentile" \
        || fail "benchmark_app (round $1)" "$work/$tag-p$percentile.log"
      logs+=(--log "$work/$tag-p$percentile.log")
    done
  fi
  "$py" "$harness" benchmark-app "${logs[@]}" mode="$mode" round="$1" >> "$results"
}

clip_names=(1080p 360p)
clip_paths=("$clip_1080" "$clip_360")
for round in $(seq "$rounds"); do
  echo "e2e: round $round of $rounds"
  if [ $((round % 2)) -eq 0 ]; then run_benchmark_app "$round"; fi
  for i in "${!clip_names[@]}"; do
    if [ $((round % 2)) -eq 1 ]; then
      run_inspectflow "$round" "${clip_names[$i]}" "${clip_paths[$i]}"
      run_peer "$round" "${clip_names[$i]}" "${clip_paths[$i]}"
    else
      run_peer "$round" "${clip_names[$i]}" "${clip_paths[$i]}"
      run_inspectflow "$round" "${clip_names[$i]}" "${clip_paths[$i]}"
    fi
  done
  if [ $((round % 2)) -eq 1 ]; then run_benchmark_app "$round"; fi
done

echo
"$py" "$harness" report "$results" | tee "$work/report.txt"
