#!/usr/bin/env bash
# Decoding throughput of source.video_file against GStreamer's own gst-launch-1.0, in one run, on
# the same 1080p H.264 file.
#
#   benches/video_decode.sh [frames] [runs]
#
# 1. Writes a 1920x1080 H.264 MP4 (High profile, 8-bit 4:2:0) of `frames` frames (x264enc,
#    veryfast, 8 Mbit/s).
# 2. Times `gst-launch-1.0 filesrc ! decodebin ! videoconvert ! fakesink` over it.
# 3. Times `inspectflow run` of source.video_file -> sink.null over it (frames in I420, the
#    decoder's own format, so neither side converts colours), then again with `format: rgb`
#    (a full-size conversion to RGB per frame, for reference).
# Each is timed as a whole process, `runs` times; the best run counts. Prints frame rates and the
# ratio to gst-launch.
set -euo pipefail
cd "$(dirname "$0")/.."
frames=${1:-600}
runs=${2:-3}
scripts/setup.sh
cargo build --release --locked --quiet
bin=$PWD/target/release/inspectflow
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
video=$work/bench1080.mp4

# 8-bit 4:2:0 High profile, like every camera and recorder: without the format, x264enc picks
# 10-bit 4:4:4 from videotestsrc, which source.video_file would have to convert and gst-launch not.
gst-launch-1.0 -q videotestsrc num-buffers="$frames" pattern=smpte \
  ! video/x-raw,format=I420,width=1920,height=1080,framerate=30/1 \
  ! x264enc speed-preset=veryfast bitrate=8000 ! video/x-h264,profile=high \
  ! h264parse ! mp4mux ! filesink location="$video"

best_seconds() {
  local best=""
  for _ in $(seq "$runs"); do
    local start end
    start=$(date +%s.%N)
    "$@" > /dev/null
    end=$(date +%s.%N)
    best=$(python3 -c "import sys; t=float(sys.argv[2])-float(sys.argv[1]); b=sys.argv[3]; print(t if not b or t<float(b) else b)" "$start" "$end" "$best")
  done
  echo "$best"
}

graph() {
  cat > "$work/$1.yaml" <<YAML
name: decode-$1
nodes:
  - {id: video, op: source.video_file, params: {path: "$video", format: $1}}
  - {id: sink, op: sink.null}
edges:
  - {from: video, to: sink}
YAML
  echo "$work/$1.yaml"
}

reference=$(best_seconds gst-launch-1.0 -q filesrc location="$video" ! decodebin ! videoconvert ! fakesink)
i420=$(best_seconds "$bin" run "$(graph i420)")
rgb=$(best_seconds "$bin" run "$(graph rgb)")
python3 - "$frames" "$reference" "$i420" "$rgb" "$(nproc)" <<'PY'
import sys
frames, reference, i420, rgb, cores = int(sys.argv[1]), *map(float, sys.argv[2:5]), sys.argv[5]
fps = lambda seconds: frames / seconds
print(f"1080p H.264, {frames} frames, {cores} cores, best of runs")
print(f"gst-launch-1.0 filesrc ! decodebin ! videoconvert ! fakesink: {fps(reference):.1f} FPS")
print(f"inspectflow source.video_file (i420) -> sink.null: {fps(i420):.1f} FPS, ratio {reference / i420:.2f}x")
print(f"inspectflow source.video_file (rgb) -> sink.null: {fps(rgb):.1f} FPS, ratio {reference / rgb:.2f}x")
PY
