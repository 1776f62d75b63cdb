#!/usr/bin/env bash
# The whole test suite, from a bare machine: installs and starts the servers the tests need,
# checks formatting, lints, checks generated artifacts for drift, builds the workspace once,
# builds the container images (static binaries, buildah) and runs every test (unit and
# end-to-end) in parallel with nextest.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mailpipe/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
step() { printf '\n== %s\n' "$*" >&2; }

step "servers"
bash scripts/test-servers.sh

if ! cargo nextest --version >/dev/null 2>&1; then
  step "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "generated artifacts are up to date"
bash scripts/generate.sh --check

step "build"
cargo build --workspace --bins --locked

step "images (scripts/images.sh)"
bash scripts/images.sh

step "tests"
cargo nextest run --workspace --locked --profile ci "$@"
