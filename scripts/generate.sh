#!/usr/bin/env bash
# Regenerates committed artifacts from the Rust types: the email job JSON Schema and the
# EmailPipeline CRD. With --check, fails when a committed artifact differs from what the
# code generates.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mailpipe/target}"

check=0
[ "${1:-}" = "--check" ] && check=1

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cargo run -q --locked -p mailpipe-contract --features schema --bin mailpipe-contract-schema > "$dir/job"
cargo run -q --locked -p mailpipe-operator -- crd > "$dir/crd"

stale=0
for pair in "job:contract/schema/email-job.v1.json" "crd:crds/emailpipelines.mailpipe.dev.yaml"; do
  generated="$dir/${pair%%:*}"
  target="${pair#*:}"
  if [ "$check" = 1 ]; then
    if ! diff -u "$target" "$generated"; then
      echo "$target is stale: run scripts/generate.sh and commit the result" >&2
      stale=1
    fi
  else
    mkdir -p "$(dirname "$target")"
    cp "$generated" "$target"
    echo "wrote $target" >&2
  fi
done
[ "$stale" = 0 ] || exit 1
[ "$check" = 1 ] && echo "generated artifacts are up to date" >&2
exit 0
