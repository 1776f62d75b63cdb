#!/usr/bin/env bash
# The scaler benchmark (not a test): builds the operator and the benchmark in release mode
# and prints reaction times and the cost of many pipelines.
# Usage: scripts/bench-scaler.sh [BURSTS] [PIPELINES]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mailpipe/target}"
bash scripts/test-servers.sh
cargo build --release --locked -q -p mailpipe-operator -p mailpipe-worker -p mailpipe-bench
exec "$CARGO_TARGET_DIR/release/scaler-reaction" "$@"
