#!/usr/bin/env bash
# Regenerates committed artifacts: from the Rust types, the email job JSON Schema and the
# EmailPipeline CRD (with its copies in the chart and in deploy/); the chart's copy of the
# alert rules (deploy/prometheus/alerts.yaml); the Grafana dashboards (scripts/dashboards.py)
# and the chart's copies of them; and from the chart, deploy/operator.yaml
# (with helm-python-sdk from ~/.cache/mailpipe/helm-venv, which scripts/test-servers.sh
# installs). With --check, fails when a committed artifact differs from what is generated.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mailpipe/target}"

check=0
[ "${1:-}" = "--check" ] && check=1

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cargo run -q --locked -p mailpipe-contract --features schema --bin mailpipe-contract-schema > "$dir/job"
cargo run -q --locked -p mailpipe-operator -- crd > "$dir/crd"
cp "$dir/crd" "$dir/chart-crd"
cp deploy/prometheus/alerts.yaml "$dir/chart-alerts"
"${MAILPIPE_HELM_PYTHON:-$HOME/.cache/mailpipe/helm-venv/bin/python}" scripts/plain-manifests.py \
  charts/mailpipe "$dir/operator"
python3 scripts/dashboards.py "$dir/dashboards"
for board in mailpipe-pipeline mailpipe-operator; do
  cp "$dir/dashboards/$board.json" "$dir/$board"
  cp "$dir/dashboards/$board.json" "$dir/chart-$board"
done

stale=0
for pair in "job:contract/schema/email-job.v1.json" "crd:crds/emailpipelines.mailpipe.dev.yaml" \
  "chart-crd:charts/mailpipe/crds/emailpipelines.mailpipe.dev.yaml" \
  "chart-alerts:charts/mailpipe/files/alerts.yaml" "crd:deploy/crd/emailpipelines.mailpipe.dev.yaml" \
  "operator:deploy/operator.yaml" \
  "mailpipe-pipeline:deploy/grafana/mailpipe-pipeline.json" \
  "mailpipe-operator:deploy/grafana/mailpipe-operator.json" \
  "chart-mailpipe-pipeline:charts/mailpipe/files/dashboards/mailpipe-pipeline.json" \
  "chart-mailpipe-operator:charts/mailpipe/files/dashboards/mailpipe-operator.json"; do
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
