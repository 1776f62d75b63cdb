#!/usr/bin/env bash
# Regenerates committed artifacts from the Rust types (the email job JSON Schema).
# With --check, fails when a committed artifact differs from what the code generates.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mailpipe/target}"

check=0
[ "${1:-}" = "--check" ] && check=1

generated=$(mktemp)
trap 'rm -f "$generated"' EXIT
cargo run -q --locked -p mailpipe-contract --features schema --bin mailpipe-contract-schema > "$generated"
target=contract/schema/email-job.v1.json
if [ "$check" = 1 ]; then
  if ! diff -u "$target" "$generated"; then
    echo "$target is stale: run scripts/generate.sh and commit the result" >&2
    exit 1
  fi
  echo "generated artifacts are up to date" >&2
else
  cp "$generated" "$target"
  echo "wrote $target" >&2
fi
