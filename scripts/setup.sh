#!/usr/bin/env bash
# Installs what inspectflow needs on a Debian 12 machine, idempotently: each step checks first and
# does nothing when its part is already there. Called by scripts/run.sh and scripts/test.sh.
set -euo pipefail

# Debian packages: a C toolchain and pkg-config for the crates that build or find C libraries.
DEBIAN_PACKAGES=(build-essential pkg-config)

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

# The Rust toolchain comes from rustup; Debian's cargo is too old for this project.
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found. Install Rust 1.95 or newer with rustup (https://rustup.rs), then re-run." >&2
  exit 1
fi
