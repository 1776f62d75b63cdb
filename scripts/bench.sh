#!/usr/bin/env bash
# Benchmarks (not tests): builds in release mode and prints figures.
# Usage: scripts/bench.sh [JOBS_PER_RUN]   (default 20000)
#        scripts/bench.sh kafka [JOBS]     (the worker against Kafka, beside the raw consume rate)
#        scripts/bench.sh latency          (the single-job latency alone)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mailpipe/target}"
bash scripts/test-servers.sh
cargo build --release --locked -q -p mailpipe-worker -p mailpipe-bench
exec "$CARGO_TARGET_DIR/release/worker-throughput" "$@"
