//! The Grafana dashboards (`deploy/grafana/`): their JSON is what a dashboard of the schema
//! version they declare holds, and in a run the test makes (sends, 4xx retries, 5xx dead
//! letters, duplicates, a scale-up, a pipeline whose Secret is missing) a real Prometheus
//! scraping the operator and the workers, with the labels their ServiceMonitors give, has a
//! non-zero value for every query of every panel.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mailpipe_tests::amqp::{self, Names, SHARED_URL};
use mailpipe_tests::pipelines::{delete_topology, manifest, wait_condition, with_operator};
use mailpipe_tests::prometheus::Prometheus;
use mailpipe_tests::smtp::SmtpOptions;
use mailpipe_tests::{jobs, repo_root, unique};
use serde_json::Value;

const BOARDS: [&str; 2] = ["mailpipe-pipeline", "mailpipe-operator"];

/// The panel types these dashboards use, all of Grafana's core.
const PANEL_TYPES: [&str; 2] = ["timeseries", "stat"];

fn board(name: &str) -> Value {
    let path = repo_root().join(format!("deploy/grafana/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("the dashboard")).expect("JSON")
}

/// Every (panel title, expr) of a dashboard.
fn queries(board: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in board["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            out.push((
                panel["title"].as_str().expect("a title").to_string(),
                target["expr"].as_str().expect("an expr").to_string(),
            ));
        }
    }
    out
}

#[test]
fn every_panel_is_well_formed_for_the_schema_version_it_declares() {
    for name in BOARDS {
        let board = board(name);
        // Schema 39 (Grafana 10.x): panels at the top level with gridPos, templating.list,
        // datasource references as {type, uid}.
        assert_eq!(board["schemaVersion"], 39, "{name}");
        assert_eq!(board["uid"], name);
        assert!(board["title"].as_str().is_some_and(|t| !t.is_empty()));
        let variables: BTreeSet<String> = board["templating"]["list"]
            .as_array()
            .expect("templating.list")
            .iter()
            .map(|v| {
                assert!(v["type"] == "query" || v["type"] == "datasource", "{v}");
                v["name"].as_str().expect("a name").to_string()
            })
            .collect();
        assert!(variables.contains("datasource"), "{name}");
        if name == "mailpipe-pipeline" {
            for v in ["namespace", "pipeline"] {
                assert!(variables.contains(v), "{name}: ${v}");
            }
        }
        let mut ids = BTreeSet::new();
        let mut cells: BTreeSet<(i64, i64)> = BTreeSet::new();
        for panel in board["panels"].as_array().expect("panels") {
            let title = panel["title"].as_str().expect("a title");
            assert!(
                ids.insert(panel["id"].as_i64().expect("an id")),
                "{title}: a unique id"
            );
            assert!(
                PANEL_TYPES.contains(&panel["type"].as_str().expect("a type")),
                "{title}"
            );
            let grid = &panel["gridPos"];
            let [h, w, x, y] = ["h", "w", "x", "y"].map(|k| grid[k].as_i64().expect("gridPos"));
            assert!(
                h > 0 && w > 0 && x >= 0 && y >= 0 && x + w <= 24,
                "{title}: {grid}"
            );
            for row in y..y + h {
                for column in x..x + w {
                    assert!(
                        cells.insert((row, column)),
                        "{title} overlaps another panel"
                    );
                }
            }
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
            let targets = panel["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{title}");
            let refs: BTreeSet<&str> = targets
                .iter()
                .map(|t| t["refId"].as_str().expect("refId"))
                .collect();
            assert_eq!(refs.len(), targets.len(), "{title}: unique refIds");
            for target in targets {
                let expr = target["expr"].as_str().expect("expr");
                for word in expr.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$')) {
                    if let Some(var) = word.strip_prefix('$') {
                        assert!(
                            var == "__rate_interval" || variables.contains(var),
                            "{title}: ${var} is not defined"
                        );
                    }
                }
            }
        }
    }
}

/// Prometheus's time now, in seconds.
fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("time")
        .as_secs_f64()
}

/// The management and Redis Secrets the pipeline names.
const SECRETS: &str = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: amqp-admin\nstringData:\n  url: http://guest:guest@127.0.0.1:15672\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: redis\nstringData:\n  url: redis://127.0.0.1:6379/0\n";

#[tokio::test]
async fn every_panel_shows_what_a_run_did_in_a_real_prometheus() {
    let prometheus =
        Prometheus::start(&[("mailpipe-operator", true), ("mailpipe-worker", false)]).await;
    let (cluster, smtp, operator) = with_operator(SmtpOptions {
        delay_ms: 300,
        ..SmtpOptions::default()
    })
    .await;
    let started = now();
    // The operator as the chart's ServiceMonitor scrapes it (honor_labels: its series name
    // the pipeline they are about).
    prometheus.set_targets(
        "mailpipe-operator",
        &[(
            operator.port,
            BTreeMap::from([
                ("namespace".to_string(), "mailpipe-system".to_string()),
                ("pod".to_string(), "mailpipe-operator-0".to_string()),
            ]),
        )],
    );
    // Scraped before anything happens: a counter's first increase is then seen as one.
    prometheus.wait_scraped("mailpipe-operator", 1).await;
    assert!(cluster.apply(SECRETS).await.status.success());
    let names = Names::new("boards");
    let mut pipeline = manifest("board", &names, smtp.port, "Retain");
    for (from, to) in [
        (
            format!("      queue: {}\n", names.queue),
            format!("      queue: {}\n      managementSecret:\n        name: amqp-admin\n        key: url\n", names.queue),
        ),
        (
            "  delivery:\n".to_string(),
            "  delivery:\n    idempotency:\n      redisSecret:\n        name: redis\n        key: url\n".to_string(),
        ),
        ("  worker:\n".to_string(), "  worker:\n    concurrency: 2\n".to_string()),
        (
            "    minReplicas: 1\n    maxReplicas: 5\n".to_string(),
            "    minReplicas: 1\n    maxReplicas: 2\n    targetBacklogPerReplica: 50\n    pollInterval: 1s\n    scaleDownStabilization: 5s\n    drainWithin: 60s\n".to_string(),
        ),
    ] {
        assert!(pipeline.contains(&from), "the manifest has {from:?}");
        pipeline = pipeline.replacen(&from, &to, 1);
    }
    assert!(cluster.apply(&pipeline).await.status.success());
    // A pipeline whose Secret is missing: reconcile failures.
    let broken = manifest("broken", &Names::new("boardsbroken"), smtp.port, "Retain").replacen(
        "name: amqp\n",
        "name: no-such-secret\n",
        1,
    );
    assert!(cluster.apply(&broken).await.status.success());
    wait_condition(&cluster, "board", "WorkerReady", "True", "Ready").await;

    // The workers as the operator's ServiceMonitor scrapes them: namespace, pod, and the
    // pod's app.kubernetes.io/instance as `pipeline`. Listed again as pods come and go.
    let publish_targets = || {
        let targets: Vec<_> = cluster
            .runner
            .pods("default", "board-worker")
            .iter()
            .map(|pod| {
                (
                    pod.port,
                    BTreeMap::from([
                        ("namespace".to_string(), "default".to_string()),
                        ("pod".to_string(), pod.name.clone()),
                        ("pipeline".to_string(), "board".to_string()),
                    ]),
                )
            })
            .collect();
        prometheus.set_targets("mailpipe-worker", &targets);
    };
    let wait = |seconds: u64| async move {
        for _ in 0..seconds * 2 {
            publish_targets();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let run = unique("boards");
    let sent = || async {
        smtp.messages()
            .await
            .iter()
            .filter_map(|m| jobs::number_in_message(&m.data, &run))
            .collect::<BTreeSet<usize>>()
    };
    let phase = |what: &str| println!("{:.1}s: {what}", now() - started);

    publish_targets();
    prometheus.wait_scraped("mailpipe-worker", 1).await;

    // Deferred (451) attempts, retried; then refused (550) jobs, dead-lettered.
    smtp.set_fault(451, "4.7.1 try again later").await;
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..20).await;
    wait(4).await;
    phase("451s");
    smtp.set_fault(550, "5.1.1 no such user").await;
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 20..40).await;
    wait(4).await;
    phase("550s");
    smtp.clear_fault().await;
    // A backlog of most of a minute for two replicas: a scale-up, a measured rate (it needs
    // the consumers busy and steady for 10 s, then a management API sample) and a time to
    // drain. On a machine so loaded that the rate could not be measured, another backlog.
    let seen = |expr: &'static str| {
        let prometheus = &prometheus;
        async move {
            prometheus
                .query_range(expr, started, Duration::from_secs(1))
                .await
                .iter()
                .any(|(_, values)| values.iter().any(|v| *v > 0.0))
        }
    };
    let mut next = 100;
    for size in [600, 300, 300] {
        amqp::publish_numbered(SHARED_URL, &names.exchange, &run, next..next + size).await;
        next += size;
        for _ in 0..240 {
            let done = sent().await;
            if (100..next).all(|n| done.contains(&n))
                && amqp::ready(SHARED_URL, &names.queue).await == 0
            {
                break;
            }
            wait(1).await;
        }
        phase("backlog drained");
        if seen("mailpipe_operator_time_to_drain_seconds").await
            && seen("mailpipe_operator_send_rate_per_replica").await
        {
            break;
        }
    }
    // Ten of them again: duplicates the workers skip (Redis holds their sends).
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 100..110).await;
    for _ in 0..60 {
        let skipped = prometheus
            .query_range(
                "sum(mailpipe_jobs_duplicates_skipped_total{pipeline=\"board\"})",
                now() - 1.0,
                Duration::from_secs(1),
            )
            .await;
        if skipped
            .iter()
            .any(|(_, values)| values.iter().any(|v| *v >= 10.0))
        {
            break;
        }
        wait(1).await;
    }
    phase("duplicates skipped");
    // The last scrapes of what the run did.
    wait(3).await;

    let mut empty = Vec::new();
    for name in BOARDS {
        for (title, expr) in queries(&board(name)) {
            let expr = expr
                .replace("$__rate_interval", "30s")
                .replace("$namespace", "default")
                .replace("$pipeline", "board");
            let series = prometheus
                .query_range(&expr, started, Duration::from_secs(1))
                .await;
            let peak = series
                .iter()
                .flat_map(|(_, values)| values.iter().copied())
                .filter(|v| v.is_finite())
                .fold(0.0_f64, f64::max);
            println!(
                "{name} / {title}: {expr} -> {} series, peak {peak}",
                series.len()
            );
            if peak <= 0.0 {
                empty.push(format!("{name} / {title}: {expr}"));
            }
        }
    }
    assert!(
        empty.is_empty(),
        "queries with no non-zero value:\n{}",
        empty.join("\n")
    );
    assert!(cluster.check_operator_rbac() > 0);
    for pipeline in ["board", "broken"] {
        cluster.kubectl_ok(&["delete", "emp", pipeline]).await;
    }
    delete_topology(&names).await;
}
