#!/usr/bin/env bash
# The whole test suite: set up, then formatting, lints (warnings are errors) and every test of
# the workspace. Benchmarks are compiled by clippy (--all-targets) but not run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all --check
# The workspace includes torch/ (inspectflow-torch, the libtorch helper that trains STFPM), so
# the gradient-trained families are linted and tested too.
cargo clippy --workspace --all-targets --locked -- -D warnings
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
