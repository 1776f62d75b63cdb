//! `mailpipe local`, run as a user runs it, non-interactively, against the shared RabbitMQ
//! and an SMTP server of the test's own: a burst scales the workers up and back to zero and
//! every job arrives once; a worker killed with SIGKILL is restarted and nothing is lost; a
//! pipeline file with an error is refused with the field named, before anything starts; a
//! Kafka pipeline (on a Tansu broker of the test's own) runs, scales and drains the same way.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use mailpipe_contract::naming;
use mailpipe_contract::RetryPolicy;
use mailpipe_tests::amqp::{self, Names, SHARED_URL};
use mailpipe_tests::jobs::{self, Tally};
use mailpipe_tests::smtp::{Received, SmtpOptions, SmtpServer};
use mailpipe_tests::{built_binary, eventually};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

fn mailpipe() -> std::path::PathBuf {
    built_binary("mailpipe", "MAILPIPE_CLI_BIN")
}

/// A pipeline of min 0 and max 4 workers on `names`, sending to `smtp_port`: each worker
/// takes 4 jobs at once and the pipeline sends 200 a second at most, so a burst of
/// thousands takes several seconds even with every worker.
fn pipeline(names: &Names, smtp_port: u16) -> String {
    burst_pipeline(
        &format!(
            "    rabbitmq:
      connectionSecret: {{name: amqp, key: url}}
      exchange: {exchange}
      queue: {queue}
",
            exchange = names.exchange,
            queue = names.queue
        ),
        smtp_port,
    )
}

/// The pipeline `local-burst` reading from `source` (the YAML under `spec.source`).
fn burst_pipeline(source: &str, smtp_port: u16) -> String {
    format!(
        "apiVersion: mailpipe.dev/v1alpha1
kind: EmailPipeline
metadata:
  name: local-burst
spec:
  source:
{source}  smtp:
    host: 127.0.0.1
    port: {smtp_port}
    tls: none
    from: {{address: noreply@example.com}}
    poolSize: 16
    rateLimit: 200
  worker:
    concurrency: 4
  scaling:
    minReplicas: 0
    maxReplicas: 4
    pollInterval: 1s
    scaleDownStabilization: 10s
"
    )
}

/// Starts `mailpipe local` on `file` with `args`; the AMQP URL comes from the environment.
fn local(file: &Path, state: &Path, args: &[&str]) -> Child {
    Command::new(mailpipe())
        .arg("local")
        .arg(file)
        .args(["--state-dir", state.to_str().expect("UTF-8 path")])
        .args(args)
        .env("MAILPIPE_SECRET_AMQP_URL", SHARED_URL)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mailpipe starts")
}

/// Waits for `child` (at most `within`) and returns its code, stdout and stderr.
async fn finish(mut child: Child, within: Duration) -> (Option<i32>, String, String) {
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let read_out = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text).await;
        text
    });
    let read_err = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    let status = match tokio::time::timeout(within, child.wait()).await {
        Ok(status) => status.expect("waited"),
        Err(_) => {
            let _ = child.kill().await;
            let out = read_out.await.unwrap_or_default();
            let err = read_err.await.unwrap_or_default();
            panic!("mailpipe local did not finish within {within:?}\n--- stdout\n{out}\n--- stderr\n{err}");
        }
    };
    (
        status.code(),
        read_out.await.unwrap_or_default(),
        read_err.await.unwrap_or_default(),
    )
}

/// The run name of the burst's jobs, from the first message (`Job <n> of <run>`).
fn run_of(messages: &[Received]) -> String {
    messages
        .iter()
        .find_map(|m| {
            let subject = m.data.lines().find_map(|l| l.strip_prefix("Subject: "))?;
            Some(subject.trim().split_once(" of ")?.1.to_string())
        })
        .expect("a burst job arrived")
}

async fn tally(smtp: &SmtpServer, n: usize) -> Tally {
    let messages = smtp.messages().await;
    let run = run_of(&messages);
    jobs::tally(
        messages
            .iter()
            .filter_map(|m| jobs::number_in_message(&m.data, &run)),
        n,
    )
}

async fn cleanup(names: &Names) {
    amqp::delete_plan(SHARED_URL, &names.plan(&RetryPolicy::default())).await;
    amqp::delete_plan(
        SHARED_URL,
        &mailpipe_contract::topology::TopologyPlan {
            exchanges: Vec::new(),
            queues: vec![mailpipe_contract::topology::QueueDecl {
                name: naming::smtp_budget_queue(&names.queue),
                args: Default::default(),
            }],
            bindings: Vec::new(),
        },
    )
    .await;
}

/// A run of `mailpipe local` on a fresh pipeline (`label`) with `args`, against an SMTP
/// server of its own.
struct Run {
    smtp: SmtpServer,
    names: Names,
    dir: tempfile::TempDir,
    child: Child,
}

async fn start(label: &str, args: &[&str]) -> Run {
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let names = Names::new(label);
    let dir = tempfile::tempdir().expect("a directory");
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(&file, pipeline(&names, smtp.port)).expect("written");
    let child = local(&file, dir.path(), args);
    Run {
        smtp,
        names,
        dir,
        child,
    }
}

/// A run that publishes `n` jobs and exits once drained (lines every 5 s).
async fn burst_until_drained(label: &str, n: usize) -> Run {
    let burst = n.to_string();
    start(
        label,
        &["--burst", &burst, "--exit-when-drained", "--every", "5s"],
    )
    .await
}

#[tokio::test]
async fn a_burst_scales_up_and_back_to_zero_and_every_job_arrives_once() {
    const N: usize = 3000;
    let Run {
        smtp,
        names,
        child,
        dir: _dir,
    } = burst_until_drained("localburst", N).await;
    let (code, out, err) = finish(child, Duration::from_secs(240)).await;
    println!("--- stdout\n{out}\n--- stderr\n{err}");
    assert_eq!(code, Some(0), "exits 0 once drained");
    // Up from zero to the most allowed, then back to zero after the window.
    let decisions: Vec<&str> = out.lines().filter(|l| l.contains(": scaled ")).collect();
    assert!(
        decisions
            .first()
            .is_some_and(|l| l.contains("scaled 0 -> ")),
        "{decisions:?}"
    );
    assert!(
        decisions.iter().any(|l| l.contains("-> 4 ")),
        "reaches 4 replicas: {decisions:?}"
    );
    assert!(
        decisions.last().is_some_and(|l| l.contains("-> 0 ")),
        "ends at 0: {decisions:?}"
    );
    assert!(
        out.contains(&format!(
            "published {N}, sent {N}, dead-lettered 0 (-), failed attempts 0, retried 0; peak replicas 4, worker restarts 0"
        )),
        "the summary: {out}"
    );
    assert_eq!(tally(&smtp, N).await, Tally::EXACT);
    // No worker is left behind.
    assert_eq!(amqp::consumers(SHARED_URL, &names.queue).await, 0);
    cleanup(&names).await;
}

/// The worker processes `parent` started.
fn children(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: the command may hold spaces, the fields after it not.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            found.push(pid);
        }
    }
    found
}

#[tokio::test]
async fn a_worker_killed_mid_run_is_restarted_and_nothing_is_lost() {
    const N: usize = 2000;
    let Run {
        smtp,
        names,
        child,
        dir: _dir,
    } = burst_until_drained("localkill", N).await;
    let parent = child.id().expect("running");
    // Mid-run: the workers are up and a part of the burst has arrived.
    let victim = eventually(Duration::from_secs(60), "workers sending", || async {
        let workers = children(parent);
        (smtp.count().await >= 300 && !workers.is_empty()).then(|| workers[0])
    })
    .await;
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).expect("killed");
    let (code, out, err) = finish(child, Duration::from_secs(240)).await;
    println!("--- stdout\n{out}\n--- stderr\n{err}");
    assert_eq!(code, Some(0));
    assert!(out.contains("worker restarts 1"), "the summary: {out}");
    let tally = tally(&smtp, N).await;
    // A job the killed worker was sending (4 at once), or had sent while its ack was still
    // being written (at most as many again), may arrive twice; none may be lost.
    assert_eq!((tally.lost, tally.foreign), (0, 0), "{tally:?}");
    assert!(
        tally.duplicated <= 8,
        "at most the killed worker's jobs: {tally:?}"
    );
    cleanup(&names).await;
}

/// The processes whose environment names `queue` as their work queue.
fn workers_of(queue: &str) -> Vec<u32> {
    let wanted = format!("MAILPIPE_QUEUE={queue}");
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            environ
                .split(|b| *b == 0)
                .any(|var| var == wanted.as_bytes())
                .then_some(pid)
        })
        .collect()
}

#[tokio::test]
async fn a_killed_mailpipe_leaves_no_worker_behind_and_the_next_run_finishes_the_work() {
    const N: usize = 1500;
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let names = Names::new("localorphan");
    let dir = tempfile::tempdir().expect("a directory");
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(&file, pipeline(&names, smtp.port)).expect("written");
    // The jobs wait in the pipeline's queue (declared as the operator plans it) first.
    let connection = amqp::connect(SHARED_URL).await;
    let channel = connection.create_channel().await.expect("a channel");
    mailpipe_contract::amqp::declare(&channel, &names.plan(&RetryPolicy::default()), false)
        .await
        .expect("declared");
    let _ = connection.close(200, "declared".into()).await;
    let run = mailpipe_tests::unique("orphan");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..N).await;
    let mut first = local(&file, dir.path(), &[]);
    eventually(Duration::from_secs(60), "workers sending", || async {
        (smtp.count().await >= 200).then_some(())
    })
    .await;
    assert!(!workers_of(&names.queue).is_empty());
    first.kill().await.expect("mailpipe killed");
    // Each worker sees its parent gone, drains what it holds and exits.
    eventually(Duration::from_secs(30), "the workers to stop", || async {
        workers_of(&names.queue).is_empty().then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "no consumer left", || async {
        (amqp::consumers(SHARED_URL, &names.queue).await == 0).then_some(())
    })
    .await;
    assert!(
        smtp.count().await < N,
        "work was left for the next run (else the test proves nothing)"
    );
    // The next run takes the rest.
    let second = local(&file, dir.path(), &["--exit-when-drained"]);
    let (code, out, err) = finish(second, Duration::from_secs(240)).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let tally = smtp.tally(&run, N).await;
    assert_eq!((tally.lost, tally.foreign), (0, 0), "{tally:?}");
    cleanup(&names).await;
}

#[tokio::test]
async fn ctrl_c_drains_the_workers_and_leaves_the_rest_queued() {
    let Run {
        smtp,
        names,
        child,
        dir: _dir,
    } = start("localint", &["--burst", "2000"]).await;
    eventually(Duration::from_secs(60), "workers sending", || async {
        (smtp.count().await >= 200).then_some(())
    })
    .await;
    let parent = child.id().expect("running");
    kill(Pid::from_raw(parent as i32), Signal::SIGINT).expect("interrupted");
    let (code, out, err) = finish(child, Duration::from_secs(120)).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("== draining the workers"), "{out}");
    assert!(out.contains("== summary"), "{out}");
    assert!(workers_of(&names.queue).is_empty(), "no worker left");
    assert_eq!(amqp::consumers(SHARED_URL, &names.queue).await, 0);
    // What was not sent waits in the queue: every job published (the burst stops with the
    // run) is in one place or the other.
    let published: usize = out
        .split("published ")
        .last()
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .expect("the summary counts the jobs published");
    let sent = smtp.count().await;
    let queued = amqp::ready(SHARED_URL, &names.queue).await as usize;
    assert!(queued > 0, "the drain stopped the work before its end");
    assert_eq!(
        sent + queued,
        published,
        "sent {sent}, queued {queued}, published {published}"
    );
    cleanup(&names).await;
}

#[tokio::test]
async fn a_pipeline_file_with_an_error_is_refused_naming_the_field() {
    let names = Names::new("localbad");
    let dir = tempfile::tempdir().expect("a directory");
    let file = dir.path().join("pipeline.yaml");
    let good = pipeline(&names, 2525);
    std::fs::write(&file, good.replace("maxReplicas: 4", "maxReplicas: four")).expect("written");
    let (code, out, err) = finish(local(&file, dir.path(), &[]), Duration::from_secs(30)).await;
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        err.contains("document 1")
            && err.contains("spec.scaling.maxReplicas: Invalid value: \"string\"")
            && err.contains("must be of type integer"),
        "{err}"
    );
    // The CRD's bounds and rules, as the API server would apply them.
    std::fs::write(&file, good.replace("minReplicas: 0", "minReplicas: 5")).expect("written");
    let (code, _, err) = finish(local(&file, dir.path(), &[]), Duration::from_secs(30)).await;
    assert_eq!(code, Some(2));
    assert!(
        err.contains("spec.scaling: Invalid value: spec.scaling.minReplicas must be <= spec.scaling.maxReplicas"),
        "{err}"
    );
    // The operator's own checks, with its words.
    std::fs::write(&file, good.replace("rateLimit: 200", "rateLimit: 2")).expect("written");
    let (code, _, err) = finish(local(&file, dir.path(), &[]), Duration::from_secs(30)).await;
    assert_eq!(code, Some(2));
    assert!(err.contains("spec.smtp.rateLimit"), "{err}");
    // A Secret nowhere to be found is named with both places it may be.
    std::fs::write(&file, &good).expect("written");
    let (code, _, err) = finish(
        Command::new(mailpipe())
            .args(["local", file.to_str().unwrap(), "--secrets-dir"])
            .arg(dir.path())
            .env_remove("MAILPIPE_SECRET_AMQP_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mailpipe starts"),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(code, Some(2));
    assert!(
        err.contains("MAILPIPE_SECRET_AMQP_URL") && err.contains("amqp/url"),
        "{err}"
    );
    // Nothing was declared.
    assert!(!amqp::queue_exists(SHARED_URL, &names.queue).await);
    // `mailpipe validate` says the same of the same file.
    std::fs::write(&file, good.replace("maxReplicas: 4", "maxReplica: 4")).expect("written");
    let output = std::process::Command::new(mailpipe())
        .args(["validate", file.to_str().unwrap()])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(2));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("spec.scaling.maxReplica: unknown field"),
        "{err}"
    );
}

#[tokio::test]
async fn a_kafka_pipeline_runs_locally_scales_on_lag_within_its_partitions_and_drains() {
    const N: usize = 1500;
    let broker = mailpipe_tests::kafka::KafkaBroker::start().await;
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let topic = mailpipe_tests::unique("local-events");
    let dir = tempfile::tempdir().expect("a directory");
    let file = dir.path().join("pipeline.yaml");
    // The pipeline of the other tests, on a 3-partition topic instead of a queue.
    let text = burst_pipeline(
        &format!(
            "    kafka:
      bootstrapServers: [\"{bootstrap}\"]
      topic: {topic}
      partitions: 3
      replicationFactor: 1
",
            bootstrap = broker.bootstrap()
        ),
        smtp.port,
    );
    std::fs::write(&file, text).expect("written");
    let child = local(
        &file,
        dir.path(),
        &[
            "--burst",
            &N.to_string(),
            "--exit-when-drained",
            "--every",
            "5s",
        ],
    );
    let (code, out, err) = finish(child, Duration::from_secs(240)).await;
    println!("--- stdout\n{out}\n--- stderr\n{err}");
    assert_eq!(code, Some(0), "exits 0 once drained");
    assert!(out.contains(&format!("topic {topic}")), "{out}");
    let decisions: Vec<&str> = out.lines().filter(|l| l.contains(": scaled ")).collect();
    assert!(
        decisions.iter().any(|l| l.contains("-> 3 ")),
        "scaled on the lag up to the partitions: {decisions:?}"
    );
    assert!(
        decisions.iter().all(|l| !l.contains("-> 4 ")),
        "never more workers than partitions (maxReplicas is 4): {decisions:?}"
    );
    assert!(
        decisions.last().is_some_and(|l| l.contains("-> 0 ")),
        "ends at 0: {decisions:?}"
    );
    assert!(
        out.contains(&format!("published {N}, sent {N}, dead-lettered 0")),
        "the summary: {out}"
    );
    assert_eq!(tally(&smtp, N).await, Tally::EXACT);
    assert_eq!(broker.lag("default.local-burst", &topic, 3), 0);
}
