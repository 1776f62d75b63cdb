//! Scaler benchmark (not a test; it prints figures): how fast the operator's scaler reacts
//! to a backlog, and what it costs with many pipelines.
//!
//! Runs the release operator against the Kubernetes API test server and the shared
//! RabbitMQ, with pipelines whose workers never run (the backlog stays as published):
//! 1. **Reaction**: one pipeline (min 1, max 10, one replica per 100 jobs, 1 s poll, no
//!    scale-down window). Each burst publishes 1,000 jobs (calling for 10 replicas) at a
//!    different phase of the poll; the clock starts when the first job is published and
//!    stops when the Deployment's `spec.replicas` changes (polled every 10 ms), and again
//!    when it reaches 10. The queue is then purged and the count returns to 1.
//! 2. **Scale**: `PIPELINES` pipelines (min 0, 1 s poll) applied at once: the time until
//!    all are Ready, then over 30 s the operator's CPU and RSS (from /proc), the scaler's
//!    looks per second (its decision histogram) and its broker connections.
//!
//! KEDA's figures are its documented defaults (the issue's), computed, not measured here.
//!
//! Usage: `scripts/bench-scaler.sh [BURSTS] [PIPELINES]`

use std::time::{Duration, Instant};

use mailpipe_tests::amqp::{self, Names, SHARED_URL};
use mailpipe_tests::cluster::Cluster;
use mailpipe_tests::pipelines::{
    delete_topology, manifest, wait_condition, worker_replicas, IDLE, SECRET,
};
use mailpipe_tests::{eventually, unique};

/// The example with `scaling` replacing its bounds, and 160 SMTP connections so that 10
/// replicas of 16 concurrent jobs are worth running.
fn scaled(text: &str, scaling: &str) -> String {
    text.replace(IDLE.0, IDLE.1)
        .replacen("    tls: none\n", "    tls: none\n    poolSize: 160\n", 1)
        .replacen("    minReplicas: 1\n    maxReplicas: 5\n", scaling, 1)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// A sample's value in a Prometheus text exposition (the first line starting with `series`).
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let bursts: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(20);
    let pipelines: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(200);

    let cluster = Cluster::start().await;
    let operator = cluster.operator("bench");
    anyhow::ensure!(
        cluster
            .apply(&SECRET.replace("URL", SHARED_URL))
            .await
            .status
            .success(),
        "the broker Secret"
    );

    // 1. Reaction.
    let names = Names::new("benchreact");
    let pipeline = scaled(
        &manifest("react", &names, 2525, "Retain"),
        "    minReplicas: 1\n    maxReplicas: 10\n    targetBacklogPerReplica: 100\n    pollInterval: 1s\n    scaleDownStabilization: 0s\n",
    );
    anyhow::ensure!(cluster.apply(&pipeline).await.status.success(), "apply");
    wait_condition(&cluster, "react", "TopologyReady", "True", "Declared").await;
    let replicas = || worker_replicas(&cluster, "react");
    eventually(Duration::from_secs(60), "one replica", || async {
        (replicas().await == Some(1)).then_some(())
    })
    .await;
    let mut reactions = Vec::new();
    let mut to_max = Vec::new();
    let mut one_step = 0;
    for burst in 0..bursts {
        // Spread the bursts over the poll's phase.
        tokio::time::sleep(Duration::from_millis(300 + (burst as u64 * 370) % 1000)).await;
        let run = unique("burst");
        let started = Instant::now();
        amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..1000).await;
        let published = started.elapsed();
        let (first, first_count) = loop {
            let now = replicas().await;
            if now != Some(1) {
                break (started.elapsed(), now);
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "no reaction in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let max = loop {
            if replicas().await == Some(10) {
                break started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        if first_count == Some(10) {
            one_step += 1;
        }
        println!(
            "burst {:2}: published in {published:?}, first change after {first:?} (to {first_count:?}), 10 replicas after {max:?}",
            burst + 1
        );
        reactions.push(first);
        to_max.push(max);
        amqp::purge(SHARED_URL, &names.queue).await;
        eventually(Duration::from_secs(30), "back to one", || async {
            (replicas().await == Some(1)).then_some(())
        })
        .await;
    }
    reactions.sort();
    to_max.sort();
    cluster.kubectl_ok(&["delete", "emp", "react"]).await;

    // 2. Scale.
    let many: Vec<Names> = (0..pipelines)
        .map(|i| Names::new(&format!("bench{i}")))
        .collect();
    let documents: Vec<String> = many
        .iter()
        .enumerate()
        .map(|(i, names)| {
            scaled(
                &manifest(&format!("p{i}"), names, 2525, "Retain"),
                "    minReplicas: 0\n    maxReplicas: 5\n    pollInterval: 1s\n",
            )
        })
        .collect();
    let before = mailpipe_bench::procfs::usage(operator.proc.pid())?;
    let applied = Instant::now();
    anyhow::ensure!(
        cluster
            .apply(&documents.join("\n---\n"))
            .await
            .status
            .success(),
        "apply {pipelines} pipelines"
    );
    let all_ready = eventually(
        Duration::from_secs(300),
        "every pipeline Ready",
        || async {
            let out = cluster
                .kubectl_ok(&[
                    "get",
                    "emp",
                    "-o",
                    "jsonpath={range .items[*]}{.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
                ])
                .await;
            let ready = out.lines().filter(|l| *l == "True").count();
            (ready == pipelines).then(|| applied.elapsed())
        },
    )
    .await;
    let ready = mailpipe_bench::procfs::usage(operator.proc.pid())?;
    // Steady state: every pipeline polled every second.
    let looks_before = sample(
        &operator.metrics().await,
        "mailpipe_operator_scale_decision_duration_seconds_count",
    );
    let window = Duration::from_secs(30);
    let start_usage = mailpipe_bench::procfs::usage(operator.proc.pid())?;
    let start = Instant::now();
    // MAILPIPE_BENCH_PERF=FILE: a `perf record` of the operator over the window (call
    // graphs; `perf report -i FILE` shows where its CPU goes).
    let profile = std::env::var_os("MAILPIPE_BENCH_PERF").map(|file| {
        std::process::Command::new("perf")
            .args(["record", "-F", "499", "-g", "-p"])
            .arg(operator.proc.pid().to_string())
            .arg("-o")
            .arg(file)
            .args(["--", "sleep"])
            .arg(window.as_secs().to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
    });
    tokio::time::sleep(window).await;
    if let Some(profile) = profile {
        profile?.wait()?;
    }
    let end = mailpipe_bench::procfs::usage(operator.proc.pid())?;
    let elapsed = start.elapsed().as_secs_f64();
    let looks = (sample(
        &operator.metrics().await,
        "mailpipe_operator_scale_decision_duration_seconds_count",
    ) - looks_before)
        / elapsed;
    let connections = amqp::connections_named("mailpipe-operator-scaler");

    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    println!();
    println!("== scaler reaction ({bursts} bursts of 1,000 jobs, target 100, 1 s poll)");
    println!(
        "first job published -> Deployment replicas changed: median {}, p95 {}, max {}",
        ms(percentile(&reactions, 0.5)),
        ms(percentile(&reactions, 0.95)),
        ms(*reactions.last().expect("bursts"))
    );
    println!(
        "1 -> 10 replicas: median {}, p95 {}; in one step in {one_step} of {bursts} bursts",
        ms(percentile(&to_max, 0.5)),
        ms(percentile(&to_max, 0.95))
    );
    println!("KEDA 2.20 documented defaults (computed, not measured): 30 s poll + 15 s HPA sync before the first step (up to 45 s); then at most max(4 pods, 100%) per 15 s: 1 -> 5 -> 10, +15 s");
    println!();
    println!("== {pipelines} pipelines (min 0, 1 s poll) on one broker");
    println!(
        "all Ready {:.1} s after one kubectl apply (operator CPU meanwhile {:.1} s; RSS before {:.1} MiB)",
        all_ready.as_secs_f64(),
        ready.cpu_seconds - before.cpu_seconds,
        before.rss_kib as f64 / 1024.0
    );
    println!(
        "steady state over {elapsed:.0} s: operator CPU {:.3} cores, scaler looks {looks:.0}/s, RSS {:.1} MiB (peak {:.1} MiB), scaler broker connections {connections}",
        (end.cpu_seconds - start_usage.cpu_seconds) / elapsed,
        end.rss_kib as f64 / 1024.0,
        end.peak_rss_kib as f64 / 1024.0
    );

    cluster
        .kubectl_ok(&["delete", "emp", "--all", "--wait=false"])
        .await;
    for names in many.iter().chain(std::iter::once(&names)) {
        delete_topology(names).await;
    }
    Ok(())
}
