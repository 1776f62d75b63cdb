#!/usr/bin/env bash
# The local demo, from a bare machine: installs and starts RabbitMQ, Redis and maildev when
# missing, builds the workspace, and runs the worker end to end (jobs in, mail out).
# Usage: scripts/demo.sh [NUMBER_OF_JOBS]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mailpipe/target}"
bash scripts/test-servers.sh
cargo build --workspace --bins --locked -q
exec "$CARGO_TARGET_DIR/debug/mailpipe-demo" "$@"
