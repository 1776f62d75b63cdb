#!/usr/bin/env bash
# The main command: mailpipe's local mode from a bare machine. Installs and starts what is
# missing (RabbitMQ, maildev as the SMTP server with a web inbox), builds mailpipe and the
# worker, and runs the example pipeline with `mailpipe local`: a burst of jobs, the workers
# scaled up from zero and back down, every message in maildev's inbox.
# Usage: scripts/demo.sh [mailpipe local flags]   (a burst of 3000 unless --burst is given)
#   e.g. scripts/demo.sh --exit-when-drained, scripts/demo.sh --burst 5000
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mailpipe/target}"
TOOLS="${MAILPIPE_TOOLS:-$HOME/.cache/mailpipe/tools}"
log() { printf '[demo] %s\n' "$*" >&2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

bash scripts/test-servers.sh demo

# maildev: SMTP on 1025, its web inbox on 1080 (kept running after the demo).
if ! port_open 1025; then
  log "starting maildev (SMTP 127.0.0.1:1025, inbox http://127.0.0.1:1080)"
  mkdir -p .mailpipe
  nohup "$TOOLS/node_modules/.bin/maildev" --smtp 1025 --web 1080 --ip 127.0.0.1 --web-ip 127.0.0.1 \
    >.mailpipe/maildev.log 2>&1 &
  for _ in $(seq 1 60); do port_open 1025 && port_open 1080 && break; sleep 0.5; done
  port_open 1025 || { log "maildev did not start; see .mailpipe/maildev.log"; exit 1; }
fi

log "building mailpipe and mailpipe-worker (the first build takes a few minutes)"
cargo build --locked -q -p mailpipe -p mailpipe-worker

# The Secret the pipeline names, the local way (never in the pipeline file).
export MAILPIPE_SECRET_AMQP_URL="${MAILPIPE_SECRET_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
# A burst of 3,000 jobs unless the flags ask for another.
burst=(--burst 3000)
for arg in "$@"; do
  case "$arg" in --burst|--burst=*) burst=() ;; esac
done
exec "$CARGO_TARGET_DIR/debug/mailpipe" local deploy/examples/local/pipeline.yaml \
  --inbox http://127.0.0.1:1080 "${burst[@]}" "$@"
