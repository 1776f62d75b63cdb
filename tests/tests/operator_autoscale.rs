//! The scaler end to end with workers that really send: the Kubernetes API test server and
//! its runner, a real RabbitMQ (with its management API), real worker processes and an SMTP
//! server that takes a fixed time per message.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;

use mailpipe_tests::amqp::{self, Names, SHARED_URL};
use mailpipe_tests::cluster::Cluster;
use mailpipe_tests::jobs::Tally;
use mailpipe_tests::pipelines::{
    delete_topology, manifest, status_field, wait_condition, with_operator, worker_replicas,
};
use mailpipe_tests::smtp::SmtpOptions;
use mailpipe_tests::{eventually, unique};

/// The management API Secret the drain objective needs (the shared node's administrator).
const ADMIN_SECRET: &str = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: amqp-admin\nstringData:\n  url: http://guest:guest@127.0.0.1:15672\n";

/// A pipeline from the example with real workers of `concurrency` jobs, a pool that never
/// limits them, the management Secret, and `scaling` in place of the example's bounds.
fn sending_pipeline(name: &str, names: &Names, smtp_port: u16, scaling: &str) -> String {
    let mut text = manifest(name, names, smtp_port, "Retain");
    for (from, to) in [
        (
            format!("      queue: {}\n", names.queue),
            format!(
                "      queue: {}\n      managementSecret:\n        name: amqp-admin\n        key: url\n",
                names.queue
            ),
        ),
        (
            "    tls: none\n".to_string(),
            "    tls: none\n    poolSize: 64\n".to_string(),
        ),
        (
            "  worker:\n".to_string(),
            "  worker:\n    concurrency: 4\n".to_string(),
        ),
        (
            "    minReplicas: 1\n    maxReplicas: 5\n".to_string(),
            scaling.to_string(),
        ),
    ] {
        assert!(text.contains(&from), "the manifest has {from:?}");
        text = text.replacen(&from, &to, 1);
    }
    text
}

/// `drainWithin: 30s` against an SMTP server that takes 250 ms a message: once the
/// pipeline has shown its per-replica rate, a backlog one replica would need three minutes
/// for is cleared in 30 s +- 20% by as many replicas as that rate calls for, the status
/// showing the time-to-drain estimate on the way, and every job delivered once.
#[tokio::test]
async fn drain_within_clears_a_backlog_of_minutes_in_about_that_time() {
    let (cluster, smtp, operator) = with_operator(SmtpOptions {
        delay_ms: 250,
        ..SmtpOptions::default()
    })
    .await;
    assert!(cluster.apply(ADMIN_SECRET).await.status.success());
    let names = Names::new("e2edrain");
    // The target alone would keep one replica: the drain objective decides. About 6
    // replicas drain it in time; the maximum leaves room to catch up on a busy machine
    // (workers slow to start, slower together than one alone).
    let pipeline = sending_pipeline(
        "drain",
        &names,
        smtp.port,
        "    minReplicas: 1\n    maxReplicas: 12\n    targetBacklogPerReplica: 1000000\n    drainWithin: 30s\n    pollInterval: 1s\n    scaleDownStabilization: 5s\n",
    );
    assert!(cluster.apply(&pipeline).await.status.success());
    wait_condition(&cluster, "drain", "TopologyReady", "True", "Declared").await;

    // Warm-up: one replica shows what it sends a second (4 slots of 250 ms: about 16).
    let run = unique("drain");
    const WARM: usize = 400;
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..WARM).await;
    let rate: f64 = eventually(
        Duration::from_secs(40),
        "a measured rate in the status",
        || async {
            status_field(&cluster, "drain", "sendRatePerReplica")
                .await
                .parse()
                .ok()
        },
    )
    .await;
    println!("measured per-replica rate: {rate}/s");
    assert!((10.0..=17.0).contains(&rate), "about 16 a second: {rate}");

    // Three minutes of work for one replica.
    let backlog = (rate * 180.0) as usize;
    let published = Instant::now();
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, WARM..WARM + backlog).await;
    let mut replicas_seen = Vec::new();
    let mut estimates = Vec::new();
    // (s since publish, the Scaling condition's reason and message) at every change.
    let mut decisions: Vec<(u64, String)> = Vec::new();
    let total = WARM + backlog;
    let done = std::sync::atomic::AtomicBool::new(false);
    // The drain ends with the last delivery, watched closely (a look at the status takes
    // several kubectl calls: seconds on a busy machine).
    let delivered = async {
        loop {
            if smtp.count().await >= total {
                done.store(true, std::sync::atomic::Ordering::Relaxed);
                return published.elapsed();
            }
            assert!(
                published.elapsed() < Duration::from_secs(120),
                "not drained after two minutes: {} of {total} sent",
                smtp.count().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let watched = async {
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            let shown = cluster
                .kubectl_ok(&[
                    "get",
                    "emp",
                    "drain",
                    "-o",
                    "jsonpath={.status.timeToDrainSeconds}|{.status.conditions[?(@.type==\"Scaling\")].reason}: {.status.conditions[?(@.type==\"Scaling\")].message}",
                ])
                .await;
            let (eta, decision) = shown.split_once('|').unwrap_or(("", &shown));
            let since = published.elapsed().as_secs();
            if decisions.last().map(|(_, d)| d.as_str()) != Some(decision) {
                decisions.push((since, decision.to_string()));
            }
            if let Ok(eta) = eta.parse::<u64>() {
                estimates.push((since, eta));
            }
            let replicas = worker_replicas(&cluster, "drain").await;
            if replicas_seen.last() != Some(&replicas) {
                replicas_seen.push(replicas);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let (drained, ()) = tokio::join!(delivered, watched);
    println!(
        "{backlog} jobs drained in {drained:?}; replicas {replicas_seen:?}; estimates (s since publish, eta) {estimates:?}"
    );
    assert!(
        drained >= Duration::from_secs(24) && drained <= Duration::from_secs(36),
        "drained within 30 s +- 20%: {drained:?} (replicas {replicas_seen:?}); decisions {decisions:#?}"
    );
    assert!(
        estimates.iter().any(|(_, eta)| *eta > 0 && *eta <= 40),
        "the status showed the time to drain on the way: {estimates:?}"
    );
    let after: f64 = status_field(&cluster, "drain", "sendRatePerReplica")
        .await
        .parse()
        .expect("a rate");
    println!("per-replica rate after the drain: {after}/s");
    // A rate taken across the scale-up would show one replica's acks over six or more
    // replicas (2-3 a second); replicas sharing a busy machine may honestly send less.
    assert!(
        (8.0..=17.0).contains(&after),
        "a scale-up does not corrupt the measured rate: {after}"
    );
    let peak = replicas_seen.iter().flatten().max().copied().unwrap_or(0);
    assert!(
        peak >= 5,
        "the backlog called for about 6 replicas: {replicas_seen:?}"
    );

    smtp.wait_for_count(total, Duration::from_secs(30)).await;
    assert_eq!(smtp.tally(&run, total).await, Tally::EXACT);
    // The objective beside the estimate, for the time-to-drain alert.
    let metrics = operator.metrics().await;
    let objective =
        "mailpipe_operator_drain_objective_seconds{namespace=\"default\",pipeline=\"drain\"} 30";
    assert!(metrics.contains(objective), "{objective} in\n{metrics}");
    assert!(cluster.check_operator_rbac() > 0);
    cluster.kubectl_ok(&["delete", "emp", "drain"]).await;
    delete_topology(&names).await;
}

/// A new pipeline's worker Deployment is created at the count the scaler would hold it at,
/// not the API server's default of one: paused at 0, or at `minReplicas: 0` with nothing
/// queued, no worker process ever starts, not at creation and not after a spec change
/// (an apply that leaves `spec.replicas` out); at `minReplicas: 2` it is created at 2.
#[tokio::test]
async fn a_new_pipeline_starts_at_the_scalers_count_and_a_paused_one_starts_no_worker() {
    let (cluster, smtp, _operator) = with_operator(SmtpOptions::default()).await;
    assert!(cluster.apply(ADMIN_SECRET).await.status.success());
    let bounds =
        |min: u32| format!("    minReplicas: {min}\n    maxReplicas: 3\n    pollInterval: 1s\n");
    let all = [("held", 1, true), ("idle", 0, false), ("pair", 2, false)];
    let mut topologies = Vec::new();
    for (name, min, paused) in all {
        let names = Names::new(&format!("start{name}"));
        let mut pipeline = sending_pipeline(name, &names, smtp.port, &bounds(min));
        if paused {
            pipeline = pipeline.replacen(
                &format!("  name: {name}\n"),
                &format!(
                    "  name: {name}\n  annotations:\n    mailpipe.dev/paused-replicas: \"0\"\n"
                ),
                1,
            );
        }
        assert!(cluster.apply(&pipeline).await.status.success());
        topologies.push(names);
    }
    let deployments: kube::Api<Deployment> = kube::Api::default_namespaced(cluster.client.clone());
    let generation_and_replicas = |name: &str| {
        let deployments = deployments.clone();
        let name = format!("{name}-worker");
        async move {
            let d = deployments.get(&name).await.expect("the worker Deployment");
            (
                d.metadata.generation.unwrap_or(0),
                d.spec.and_then(|s| s.replicas),
            )
        }
    };
    for name in ["held", "idle"] {
        wait_condition(&cluster, name, "WorkerReady", "True", "ScaledToZero").await;
    }
    eventually(Cluster::SETTLE, "pair runs 2 workers", || async {
        (cluster.runner.pods("default", "pair-worker").len() == 2).then_some(())
    })
    .await;
    // Created at 2: a later /scale write would have been a second generation.
    assert_eq!(generation_and_replicas("pair").await, (1, Some(2)));
    // A spec change: the operator applies again without spec.replicas.
    for name in ["held", "idle"] {
        cluster
            .kubectl_ok(&[
                "patch",
                "emp",
                name,
                "--type",
                "merge",
                "-p",
                r#"{"spec":{"worker":{"concurrency":5}}}"#,
            ])
            .await;
    }
    for name in ["held", "idle"] {
        eventually(
            Cluster::SETTLE,
            "the changed template is applied",
            || async { (generation_and_replicas(name).await.0 >= 2).then_some(()) },
        )
        .await;
    }
    // Longer than the runner takes to start a pod and the scaler to see it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for name in ["held", "idle"] {
        let deployment = format!("{name}-worker");
        assert_eq!(generation_and_replicas(name).await.1, Some(0), "{name}");
        assert!(
            cluster.runner.pods("default", &deployment).is_empty(),
            "{name}"
        );
        let ran: Vec<_> = cluster
            .runner
            .finished()
            .into_iter()
            .filter(|f| f.deployment == deployment)
            .collect();
        assert!(ran.is_empty(), "{name} never started a worker: {ran:?}");
    }
    assert!(cluster.check_operator_rbac() > 0);
    for (name, _, _) in all {
        cluster.kubectl_ok(&["delete", "emp", name]).await;
    }
    for names in &topologies {
        delete_topology(names).await;
    }
}

/// The issue's run: 5,000 jobs into a pipeline with min 0 and max 5 and an SMTP server that
/// answers slowly. The jobs wait while the pause annotation holds the workers at 0 (the
/// status still shows the backlog); once it is removed the workers go from 0 to 5 in one
/// step within two 1 s polls; as the backlog falls they are removed one by one while jobs
/// remain (each removal a SIGTERM to a worker holding a prefetch of jobs); every job is
/// delivered exactly once with deduplication off, the broker counts no redelivery, and the
/// pipeline is back at 0 after the scale-down window.
#[tokio::test]
async fn five_thousand_jobs_scale_up_in_one_step_and_down_without_a_redelivery() {
    const N: usize = 5_000;
    let (cluster, smtp, _operator) = with_operator(SmtpOptions {
        delay_ms: 100,
        ..SmtpOptions::default()
    })
    .await;
    assert!(cluster.apply(ADMIN_SECRET).await.status.success());
    let names = Names::new("e2e5000");
    let pipeline = sending_pipeline(
        "burst",
        &names,
        smtp.port,
        "    minReplicas: 0\n    maxReplicas: 5\n    targetBacklogPerReplica: 1000\n    activationBacklog: 10\n    pollInterval: 1s\n    scaleDownStabilization: 3s\n",
    )
    .replacen(
        "  name: burst\n",
        "  name: burst\n  annotations:\n    mailpipe.dev/paused-replicas: \"0\"\n",
        1,
    );
    assert!(cluster.apply(&pipeline).await.status.success());
    wait_condition(&cluster, "burst", "TopologyReady", "True", "Declared").await;
    let replicas = || worker_replicas(&cluster, "burst");
    // The Deployment is created paused: no worker ever starts to consume while paused.
    eventually(Cluster::SETTLE, "paused at no workers", || async {
        (replicas().await == Some(0)).then_some(())
    })
    .await;
    assert!(cluster.runner.pods("default", "burst-worker").is_empty());
    assert!(cluster.runner.finished().is_empty(), "no worker started");
    let run = unique("burst");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..N).await;
    let waited = Instant::now();
    loop {
        let shown = status_field(&cluster, "burst", "backlog").await;
        if shown == N.to_string() {
            break;
        }
        assert!(
            waited.elapsed() < Cluster::SETTLE,
            "the status shows the backlog while paused: status {shown:?}, queue {}, sent {}",
            amqp::ready(SHARED_URL, &names.queue).await,
            smtp.count().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_condition(&cluster, "burst", "Scaling", "True", "Paused").await;
    assert_eq!(replicas().await, Some(0), "the pause held");

    cluster
        .kubectl_ok(&["annotate", "emp", "burst", "mailpipe.dev/paused-replicas-"])
        .await;
    let started = Instant::now();
    // (seconds since the pause ended, replicas, jobs ready) at every change of the count.
    let mut seen: Vec<(f64, Option<i32>, u32)> = vec![(0.0, Some(0), N as u32)];
    let mut five: Option<Duration> = None;
    let drained = loop {
        let now = replicas().await;
        let ready = amqp::ready(SHARED_URL, &names.queue).await;
        if now == Some(5) && five.is_none() {
            five = Some(started.elapsed());
        }
        if seen.last().map(|s| s.1) != Some(now) {
            seen.push((started.elapsed().as_secs_f64(), now, ready));
        }
        if ready == 0 && smtp.count().await >= N {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "not drained in 4 minutes: {ready} ready, {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(if five.is_none() { 50 } else { 250 })).await;
    };
    println!(
        "{N} jobs drained in {drained:?}; 5 replicas {five:?} after the pause ended; (s, replicas, ready) {seen:?}"
    );
    assert_eq!(
        seen.iter().take(2).map(|s| s.1).collect::<Vec<_>>(),
        vec![Some(0), Some(5)],
        "0 -> 5 in one step: {seen:?}"
    );
    let five = five.expect("5 replicas ran");
    assert!(
        five <= Duration::from_secs(2),
        "within two 1 s polls of the pause ending: {five:?}"
    );
    let removed_with_work = seen
        .windows(2)
        .filter(|w| w[1].1 < w[0].1 && w[1].2 > 0)
        .count();
    assert!(
        removed_with_work >= 2,
        "replicas were removed while jobs remained: {seen:?}"
    );
    eventually(Duration::from_secs(30), "back to zero", || async {
        (replicas().await == Some(0)).then_some(())
    })
    .await;
    assert_eq!(smtp.tally(&run, N).await, Tally::EXACT);
    // The management API's figures trail by up to 5 s.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let redelivered = amqp::redelivered(&names.queue).await;
    println!("redelivered during the run: {redelivered}");
    assert_eq!(redelivered, 0, "no job was given back by a removed worker");
    assert!(cluster.check_operator_rbac() > 0);
    cluster.kubectl_ok(&["delete", "emp", "burst"]).await;
    delete_topology(&names).await;
}
