"""Writes the Grafana dashboards (deploy/grafana/*.json) from the panel lists below.

scripts/generate.sh runs it (and checks the committed files for drift); the chart ships
copies as ConfigMaps for Grafana's dashboard sidecar. tests/tests/dashboards.rs checks the
JSON against the schema version it declares and runs every query against a real
Prometheus that scraped a run the test made.

Usage: python3 dashboards.py OUT_DIR
"""
import json
import os
import sys

SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PIPELINE = 'namespace="$namespace", pipeline="$pipeline"'


def target(expr, legend, ref):
    return {"refId": ref, "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}


def panel(title, unit, *queries, kind="timeseries", description=""):
    """A panel of (expr, legend) queries."""
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}}
        if kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
        "targets": [target(e, l, chr(ord("A") + i)) for i, (e, l) in enumerate(queries)],
    }


def quantiles(metric, selector, by=""):
    group = f"le{', ' + by if by else ''}"
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{selector}}}[$__rate_interval])))",
            f"p{round(q * 100)}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


def laid_out(panels, width=12, height=8):
    """Two panels a row, ids in order."""
    for i, p in enumerate(panels):
        p["id"] = i + 1
        p["gridPos"] = {"h": height, "w": width, "x": (i % 2) * width, "y": (i // 2) * height}
    return panels


def variable(name, label, query):
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-values"},
        "refresh": 2,
        "sort": 1,
        "includeAll": False,
        "multi": False,
        "current": {},
        "options": [],
        "hide": 0,
    }


def dashboard(uid, title, description, variables, panels):
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["mailpipe"],
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-3h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                }
            ]
            + variables
        },
        "panels": laid_out(panels),
    }


def pipeline_dashboard():
    p = PIPELINE
    return dashboard(
        "mailpipe-pipeline",
        "mailpipe / pipeline",
        "One EmailPipeline: its backlog, workers, sends, failures and scaling.",
        [
            variable("namespace", "Namespace", "label_values(mailpipe_operator_backlog, namespace)"),
            variable(
                "pipeline",
                "Pipeline",
                'label_values(mailpipe_operator_backlog{namespace="$namespace"}, pipeline)',
            ),
        ],
        [
            panel(
                "Backlog and dead letters",
                "short",
                (f"max(mailpipe_operator_backlog{{{p}}})", "waiting"),
                (f"max(mailpipe_operator_dead_letter_depth{{{p}}})", "dead letters"),
                description="Jobs waiting in the work queue (or the group's lag) and in the dead-letter queue, as the scaler reads them.",
            ),
            panel(
                "Replicas",
                "short",
                (f"max by (kind) (mailpipe_operator_replicas{{{p}}})", "{{kind}}"),
                description="Desired (the scaler's), current and ready workers.",
            ),
            panel(
                "Sent",
                "ops",
                (f"sum(rate(mailpipe_jobs_sent_total{{{p}}}[$__rate_interval]))", "sent/s"),
            ),
            panel(
                "Failed attempts by reason",
                "ops",
                (f"sum by (reason) (rate(mailpipe_jobs_failed_total{{{p}}}[$__rate_interval]))", "{{reason}}"),
            ),
            panel(
                "Retries by reason",
                "ops",
                (f"sum by (reason) (rate(mailpipe_jobs_retried_total{{{p}}}[$__rate_interval]))", "{{reason}}"),
                description="Jobs put into a delay queue (or retry topic) for another attempt.",
            ),
            panel(
                "Dead-lettered by reason",
                "ops",
                (f"sum by (reason) (rate(mailpipe_jobs_dead_lettered_total{{{p}}}[$__rate_interval]))", "{{reason}}"),
            ),
            panel(
                "SMTP send latency",
                "s",
                *quantiles("mailpipe_smtp_send_duration_seconds", p),
                description="One SMTP transaction, from the workers' histogram.",
            ),
            panel(
                "Duplicates skipped",
                "ops",
                (f"sum(rate(mailpipe_jobs_duplicates_skipped_total{{{p}}}[$__rate_interval]))", "skipped/s"),
                description="Jobs not sent again because their send was recorded (idempotency).",
            ),
            panel(
                "SMTP connections",
                "short",
                (f"sum by (state) (mailpipe_smtp_pool_connections{{{p}}})", "{{state}}"),
                description="Connections the workers may hold (max), carry a send (busy), wait in the pool (idle).",
            ),
            panel(
                "Scale decisions",
                "short",
                (
                    f"sum by (direction, reason) (mailpipe_operator_scale_events_total{{{p}}})",
                    "{{direction}} ({{reason}})",
                ),
                description="Replica count changes since the operator started, by direction and the scaler's reason: each step is a decision (a series starts with its first one).",
            ),
            panel(
                "Time to drain",
                "s",
                (f"max(mailpipe_operator_time_to_drain_seconds{{{p}}})", "estimate"),
                (f"max(mailpipe_operator_drain_objective_seconds{{{p}}})", "drainWithin"),
                description="The work now waiting at the desired replicas and the measured rate, against the objective.",
            ),
            panel(
                "Send rate per replica",
                "ops",
                (f"max(mailpipe_operator_send_rate_per_replica{{{p}}})", "jobs/s per busy replica"),
                description="Measured from the broker's acks while the queue had work.",
            ),
        ],
    )


def operator_dashboard():
    return dashboard(
        "mailpipe-operator",
        "mailpipe / operator",
        "The mailpipe operator: reconciles, failures, leadership and the scaler.",
        [],
        [
            panel(
                "Reconciles by result",
                "ops",
                ("sum by (result) (rate(mailpipe_operator_reconciles_total[$__rate_interval]))", "{{result}}"),
            ),
            panel(
                "Reconcile failures by category",
                "short",
                ("sum by (category) (increase(mailpipe_operator_reconcile_failures_total[5m]))", "{{category}}"),
                description="In the last 5 minutes; the pipelines' conditions and Warning events say which and why.",
            ),
            panel(
                "Reconcile latency",
                "s",
                *quantiles("mailpipe_operator_reconcile_duration_seconds", ""),
            ),
            panel(
                "Leader",
                "short",
                ("max by (pod) (mailpipe_operator_leader)", "{{pod}}"),
                description="1 for the replica holding the Lease, 0 for standbys.",
            ),
            panel(
                "Scale decisions",
                "short",
                (
                    "sum by (namespace, pipeline, direction, reason) (mailpipe_operator_scale_events_total)",
                    "{{namespace}}/{{pipeline}} {{direction}} ({{reason}})",
                ),
                description="Replica count changes since the operator started: each step is a decision.",
            ),
            panel(
                "Scale decision latency",
                "s",
                *quantiles("mailpipe_operator_scale_decision_duration_seconds", ""),
                description="From the start of a scaler pass to one pipeline's count decided and set.",
            ),
            panel(
                "Pipelines with their topology in place",
                "short",
                ("sum(mailpipe_operator_topology_ready)", "ready"),
                kind="stat",
            ),
            panel(
                "Backlog by pipeline",
                "short",
                ("sum by (namespace, pipeline) (mailpipe_operator_backlog)", "{{namespace}}/{{pipeline}}"),
            ),
        ],
    )


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for name, board in (("mailpipe-pipeline", pipeline_dashboard()), ("mailpipe-operator", operator_dashboard())):
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(board, f, indent=2, sort_keys=True)
            f.write("\n")


main()
