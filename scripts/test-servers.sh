#!/usr/bin/env bash
# Installs and starts what the tests and the demo need, when missing:
# RabbitMQ (shared node on 127.0.0.1:5672, management API on 15672), Redis (127.0.0.1:6379), python3-aiosmtpd
# (the test SMTP server), Postfix (tests run private instances of it), promtool (Debian's
# prometheus package; no service is started), openssl, socat (the Kafka TLS test's front), maildev (npm, into $MAILPIPE_TOOLS, outside the clone), and the
# Kafka-compatible broker Tansu (cargo install into ~/.cargo/bin, once per machine: a cold
# build takes 15-20 minutes; the Kafka tests start a broker of their own each), and
# helm-python-sdk (Helm's engine, for the chart tests) in ~/.cache/mailpipe/helm-venv.
# Safe to run again: it only acts on what is missing.
# With `demo` as its argument (scripts/demo.sh), only what the demo needs: no Postfix,
# promtool or Tansu.
set -euo pipefail

tests=1
[ "${1:-}" = "demo" ] && tests=0

TOOLS="${MAILPIPE_TOOLS:-$HOME/.cache/mailpipe/tools}"
mkdir -p "$TOOLS"

log() { printf '[test-servers] %s\n' "$*" >&2; }

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    apt_updated=1
  fi
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 what=$2
  for _ in $(seq 1 120); do
    port_open "$port" && return 0
    sleep 0.5
  done
  log "$what did not start listening on $port"
  return 1
}

missing=()
command -v rabbitmq-server >/dev/null || missing+=(rabbitmq-server)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v openssl >/dev/null || missing+=(openssl)
/usr/bin/python3 -c 'import aiosmtpd' 2>/dev/null || missing+=(python3-aiosmtpd)
command -v npm >/dev/null || missing+=(npm)
if [ "$tests" = 1 ]; then
  command -v promtool >/dev/null || missing+=(prometheus)
  # The TLS front of the Kafka TLS test (Tansu 0.6 does not serve TLS itself).
  command -v socat >/dev/null || missing+=(socat)
fi
if [ "$tests" = 1 ] && [ ! -x /usr/sbin/postfix ]; then
  # Postfix for the tests' private instances only: no system configuration, no service.
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  missing+=(postfix)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  apt_install "${missing[@]}"
fi

if ! port_open 5672; then
  log "starting RabbitMQ"
  rabbitmq-server -detached
  wait_port 5672 RabbitMQ
  rabbitmqctl await_startup >/dev/null
fi

# The operator creates virtual hosts through the management API (tests: guest on 15672).
if ! port_open 15672; then
  log "enabling the RabbitMQ management plugin"
  rabbitmq-plugins enable rabbitmq_management >/dev/null
  wait_port 15672 "RabbitMQ management"
fi

if ! port_open 6379; then
  log "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
  wait_port 6379 Redis
fi

if [ ! -x "$TOOLS/node_modules/.bin/maildev" ]; then
  log "npm install maildev@3 into $TOOLS"
  (cd "$TOOLS" && npm install --no-audit --no-fund --loglevel=error maildev@3 >/dev/null)
fi

# Tansu 0.6 with its SQLite engine (the default features store nothing), built with a
# target directory outside the clone so that a rebuild reuses it.
TANSU_VERSION=0.6.0
if [ "$tests" = 1 ] && ! "${MAILPIPE_TANSU_BIN:-$HOME/.cargo/bin/tansu}" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
  log "cargo install tansu $TANSU_VERSION (once per machine; 15-20 minutes cold)"
  CARGO_TARGET_DIR="$HOME/.cache/mailpipe/tansu-target" \
    cargo install tansu --version "$TANSU_VERSION" --locked --features libsql,dynostore --quiet
fi

# Helm's engine as a library (helm-python-sdk, a 75 MB wheel) in a virtual environment
# outside the clone: the chart tests render and lint the chart with it.
HELM_SDK_VERSION=0.2.2
HELM_VENV="$HOME/.cache/mailpipe/helm-venv"
if [ "$tests" = 1 ] && ! "$HELM_VENV/bin/python" -c "import helm_python" 2>/dev/null; then
  log "pip install helm-python-sdk $HELM_SDK_VERSION into $HELM_VENV"
  python3 -m venv "$HELM_VENV"
  "$HELM_VENV/bin/pip" install -q "helm-python-sdk==$HELM_SDK_VERSION"
fi

if [ "$tests" = 1 ]; then
  log "ready: RabbitMQ 5672 (management 15672), Redis 6379, aiosmtpd, postfix, promtool, maildev ($TOOLS), tansu $TANSU_VERSION, helm-python-sdk ($HELM_VENV)"
else
  log "ready: RabbitMQ 5672 (management 15672), Redis 6379, aiosmtpd, maildev ($TOOLS)"
fi
