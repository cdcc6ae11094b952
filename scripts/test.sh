#!/usr/bin/env bash
# The whole test suite: set up, then formatting, lints (warnings are errors) and every test of
# the workspace. Benchmarks are compiled by clippy (--all-targets) but not run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all --check
# One feature set for lints and tests (one build of the dependency tree): with `torch`, the
# gradient-trained families' libtorch side is built and tested too.
FEATURES=(--features inspectflow/torch)
cargo clippy --workspace --all-targets --locked "${FEATURES[@]}" -- -D warnings
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast "${FEATURES[@]}"
else
  cargo test --workspace --locked --no-fail-fast "${FEATURES[@]}"
fi
