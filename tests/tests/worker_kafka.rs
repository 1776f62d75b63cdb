//! The worker's Kafka source against a real Kafka-compatible broker (Tansu, one per test)
//! and the real test SMTP server: every job sent, offsets committed only past what is done,
//! retries through the retry topics, poison jobs in the dead-letter topic with their reasons.

use std::time::Duration;

use mailpipe_contract::naming::{dead_letter_topic, headers};
use mailpipe_contract::topics::KafkaSettings;
use mailpipe_tests::jobs::{self, Tally};
use mailpipe_tests::kafka::KafkaBroker;
use mailpipe_tests::redis_server::SHARED_URL as SHARED_REDIS;
use mailpipe_tests::smtp::{SmtpOptions, SmtpServer};
use mailpipe_tests::worker::{Worker, WorkerSpec, TEST_RETRY};
use mailpipe_tests::{eventually, unique};
use serde_json::json;

const PARTITIONS: i32 = 3;

/// The topics a test worker consumes (work and retry topics) with their partitions.
fn consumed(topic: &str) -> Vec<(String, i32)> {
    settings(topic)
        .plan(&TEST_RETRY)
        .consumed()
        .map(|t| (t.name.clone(), t.partitions))
        .collect()
}

fn settings(topic: &str) -> KafkaSettings {
    KafkaSettings {
        topic: topic.to_string(),
        partitions: PARTITIONS,
        replication: 1,
        dead_letter: true,
        config: Default::default(),
    }
}

#[tokio::test]
async fn a_thousand_jobs_over_three_partitions_are_sent_exactly_once_and_committed() {
    const N: usize = 1000;
    let broker = KafkaBroker::start().await;
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let (topic, group, run) = (unique("jobs"), unique("group"), unique("run"));
    broker.create_topic(&topic, PARTITIONS).await;
    broker
        .produce(&topic, PARTITIONS, (0..N).map(|n| jobs::numbered(&run, n)))
        .await;

    let worker = WorkerSpec::kafka(&broker.bootstrap(), &topic, &group, smtp.port).spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    wait_delivered_and_committed(
        &broker,
        &smtp,
        (&group, &topic),
        N,
        &[&worker],
        (Duration::from_secs(120), Duration::from_secs(60)),
    )
    .await;

    assert_eq!(
        smtp.tally(&run, N).await,
        Tally::EXACT,
        "{}",
        worker.output()
    );
    let highs = broker.high_watermarks(&topic, PARTITIONS);
    assert_eq!(highs.iter().sum::<i64>(), N as i64);
    assert_eq!(
        broker.committed(&group, &topic, PARTITIONS),
        highs.into_iter().map(Some).collect::<Vec<_>>(),
        "the group committed every partition to its end"
    );
    assert_eq!(worker.metric("mailpipe_jobs_sent_total").await, N as f64);
    assert_eq!(broker.lag(&group, &topic, PARTITIONS), 0);
    // The worker's own lag gauges (librdkafka's statistics, every 5 s) come down to 0 for
    // each partition of the work topic.
    eventually(Duration::from_secs(20), "the lag gauges at 0", || async {
        let metrics = worker.metrics().await;
        let lags: Vec<f64> = metrics
            .iter()
            .filter(|(name, _)| {
                name.starts_with("mailpipe_kafka_consumer_lag{")
                    && name.contains(&format!("topic=\"{topic}\""))
            })
            .map(|(_, value)| *value)
            .collect();
        (lags.len() == PARTITIONS as usize && lags.iter().all(|v| *v == 0.0)).then_some(())
    })
    .await;
    // The worker created the retry and dead-letter topics beside the work topic.
    for (name, _) in consumed(&topic).iter().skip(1) {
        assert_eq!(
            broker.high_watermarks(name, PARTITIONS),
            vec![0; 3],
            "{name}"
        );
    }
    assert_eq!(
        broker.high_watermarks(&dead_letter_topic(&topic), PARTITIONS),
        vec![0; 3]
    );
}

#[tokio::test]
async fn poison_jobs_are_dead_lettered_with_reasons_and_4xx_answers_are_retried_past() {
    const N: usize = 20;
    let broker = KafkaBroker::start().await;
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    smtp.set_fault(451, "4.3.0 try again later").await;
    let (topic, group, run) = (unique("jobs"), unique("group"), unique("run"));
    broker.create_topic(&topic, PARTITIONS).await;
    let poison = [
        b"{not json".to_vec(),
        serde_json::to_vec(&json!({"id": "no-recipient", "to": [], "subject": "s", "text": "t"}))
            .unwrap(),
        serde_json::to_vec(&json!({"id": "no-body", "to": ["a@example.com"], "subject": "s"}))
            .unwrap(),
    ];
    let mut payloads: Vec<Vec<u8>> = (0..N).map(|n| jobs::numbered(&run, n)).collect();
    payloads.splice(5..5, poison.iter().cloned());
    broker.produce(&topic, PARTITIONS, payloads).await;

    let worker = WorkerSpec::kafka(&broker.bootstrap(), &topic, &group, smtp.port)
        .args(&["--max-attempts", "10"])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    eventually(
        Duration::from_secs(30),
        "every job to fail at least twice",
        || async {
            let failed = worker
                .metric("mailpipe_jobs_failed_total{reason=\"smtp_4xx\"}")
                .await;
            (failed >= 2.0 * N as f64).then_some(())
        },
    )
    .await;
    assert_eq!(smtp.count().await, 0);
    smtp.clear_fault().await;

    wait_delivered_and_committed(
        &broker,
        &smtp,
        (&group, &topic),
        N,
        &[&worker],
        (Duration::from_secs(60), Duration::from_secs(60)),
    )
    .await;
    assert_eq!(
        smtp.tally(&run, N).await,
        Tally::EXACT,
        "{}",
        worker.output()
    );

    let dead = broker.records(&dead_letter_topic(&topic), PARTITIONS);
    let mut reasons: Vec<&str> = dead
        .iter()
        .map(|r| r.header(headers::REASON).expect("a reason header"))
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["malformed_json", "no_body", "no_recipient"]);
    for record in &dead {
        assert!(poison.contains(&record.payload), "the job as produced");
        assert_eq!(record.header(headers::ORIGINAL_TOPIC), Some(topic.as_str()));
        assert_eq!(record.header(headers::ATTEMPT), Some("1"));
        assert!(record
            .header(headers::DETAIL)
            .is_some_and(|d| !d.is_empty()));
        assert!(record.header(headers::DEAD_LETTERED_AT).is_some());
    }
    let retried = worker
        .metric("mailpipe_jobs_retried_total{reason=\"smtp_4xx\"}")
        .await;
    assert!(retried >= 2.0 * N as f64, "retried {retried}");
    // Retry copies went through the retry topics and the group moved past them too.
    let retry_records: i64 = consumed(&topic)
        .iter()
        .skip(1)
        .map(|(name, p)| broker.high_watermarks(name, *p).iter().sum::<i64>())
        .sum();
    assert_eq!(retry_records as f64, retried);
}

/// Waits until the SMTP server has `n` messages (within `times.0`) and `group` has committed
/// every partition of `topic`'s work and retry topics to its end (within `times.1`); on
/// timeout, fails with the workers' logs.
async fn wait_delivered_and_committed(
    broker: &KafkaBroker,
    smtp: &SmtpServer,
    (group, topic): (&str, &str),
    n: usize,
    workers: &[&Worker],
    times: (Duration, Duration),
) {
    wait_for_mail(smtp, n, times.0, workers).await;
    broker
        .wait_consumed(group, &consumed(topic), workers, times.1)
        .await;
}

/// Waits until the SMTP server has `n` messages; on timeout, fails with the workers' logs.
async fn wait_for_mail(smtp: &SmtpServer, n: usize, timeout: Duration, workers: &[&Worker]) {
    let deadline = tokio::time::Instant::now() + timeout;
    while smtp.count().await < n {
        if tokio::time::Instant::now() > deadline {
            let logs: Vec<String> = workers.iter().map(|w| w.output()).collect();
            panic!(
                "{} of {n} messages within {timeout:?}; worker logs:\n{}",
                smtp.count().await,
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How many jobs a worker sent so far.
async fn sent(worker: &Worker) -> f64 {
    worker.metric("mailpipe_jobs_sent_total").await
}

/// A slow SMTP server (`delay_ms` a message), so a run of a few hundred jobs lasts long
/// enough for something to happen in the middle of it.
async fn slow_smtp(delay_ms: u32) -> SmtpServer {
    SmtpServer::start(SmtpOptions {
        delay_ms,
        ..SmtpOptions::default()
    })
    .await
}

/// A run of a consumer group: a 3-partition topic on a broker of its own, a slow SMTP
/// server (`delay_ms` a message) and the spec of the group's workers (`concurrency` jobs
/// each, idempotency on, as users run it).
struct GroupRun {
    broker: KafkaBroker,
    smtp: SmtpServer,
    topic: String,
    group: String,
    run: String,
    spec: WorkerSpec,
}

async fn group_run(delay_ms: u32, concurrency: &str) -> GroupRun {
    let broker = KafkaBroker::start().await;
    let smtp = slow_smtp(delay_ms).await;
    let (topic, group, run) = (unique("jobs"), unique("group"), unique("run"));
    broker.create_topic(&topic, PARTITIONS).await;
    let spec = WorkerSpec::kafka(&broker.bootstrap(), &topic, &group, smtp.port)
        .args(&[
            "--concurrency",
            concurrency,
            "--idempotency-prefix",
            &unique("kafka-group"),
        ])
        .env("MAILPIPE_REDIS_URL", SHARED_REDIS);
    GroupRun {
        broker,
        smtp,
        topic,
        group,
        run,
        spec,
    }
}

#[tokio::test]
async fn two_workers_split_the_partitions_and_a_sigkill_loses_nothing() {
    const N: usize = 600;
    let GroupRun {
        broker,
        smtp,
        topic,
        group,
        run,
        spec,
    } = group_run(50, "4").await;
    // The survivor joins first and leads the group (Tansu keeps the first member as the
    // leader), then the doomed worker joins.
    let survivor = spec.spawn();
    survivor.wait_ready(Duration::from_secs(30)).await;
    eventually(
        Duration::from_secs(30),
        "the first member assigned",
        || async {
            survivor
                .output()
                .contains("partitions assigned")
                .then_some(())
        },
    )
    .await;
    let mut doomed = spec.spawn();
    doomed.wait_ready(Duration::from_secs(30)).await;
    broker
        .produce(&topic, PARTITIONS, (0..N).map(|n| jobs::numbered(&run, n)))
        .await;

    eventually(Duration::from_secs(60), "both workers sending", || async {
        (sent(&doomed).await > 20.0 && sent(&survivor).await > 20.0).then_some(())
    })
    .await;
    let in_flight = doomed.metric("mailpipe_jobs_in_flight").await;
    doomed.kill();
    println!("killed a worker with {in_flight} jobs in flight");
    // The group drops the dead member once its session (librdkafka's default, 45 s) times
    // out; its Deployment (or local mode's process pool) starts a replacement, which joins,
    // and the dead member's partitions are handed out again from the last committed
    // offsets. (Tansu 0.6 hands out a dead member's partitions only at a join after its
    // session ended, so the replacement joins then; a Kafka broker reassigns them at the
    // session's end alone. See the README's test notes.)
    tokio::time::sleep(Duration::from_secs(50)).await;
    let replacement = spec.spawn();
    replacement.wait_ready(Duration::from_secs(30)).await;

    wait_delivered_and_committed(
        &broker,
        &smtp,
        (&group, &topic),
        N,
        &[&survivor, &replacement],
        (Duration::from_secs(150), Duration::from_secs(120)),
    )
    .await;
    let tally = smtp.tally(&run, N).await;
    let skipped = survivor
        .metric("mailpipe_jobs_duplicates_skipped_total")
        .await
        + replacement
            .metric("mailpipe_jobs_duplicates_skipped_total")
            .await;
    println!(
        "after the kill: {} duplicates sent (jobs in flight at the kill), {skipped} repeats skipped by idempotency",
        tally.duplicated
    );
    assert_eq!(tally.lost, 0, "nothing lost: {tally:?}");
    assert_eq!(tally.foreign, 0);
    assert!(
        tally.duplicated as f64 <= in_flight.max(4.0),
        "only jobs in flight at the kill may repeat: {tally:?}, {in_flight} in flight"
    );
}

#[tokio::test]
async fn a_third_worker_joining_and_one_leaving_mid_run_lose_nothing_and_send_nothing_twice() {
    const N: usize = 900;
    // Two workers at 2 jobs of 100 ms at once: about 20 s for the run, time for a third to
    // join and one to leave in the middle of it.
    let GroupRun {
        broker,
        smtp,
        topic,
        group,
        run,
        spec,
    } = group_run(100, "2").await;
    let first = spec.spawn();
    let mut leaving = spec.spawn();
    first.wait_ready(Duration::from_secs(30)).await;
    leaving.wait_ready(Duration::from_secs(30)).await;
    broker
        .produce(&topic, PARTITIONS, (0..N).map(|n| jobs::numbered(&run, n)))
        .await;
    eventually(Duration::from_secs(60), "both workers sending", || async {
        (sent(&first).await > 10.0 && sent(&leaving).await > 10.0).then_some(())
    })
    .await;

    let joining = spec.spawn();
    eventually(
        Duration::from_secs(90),
        "the third worker sending",
        || async { (sent(&joining).await > 5.0).then_some(()) },
    )
    .await;
    let before = smtp.count().await;
    assert!(before < N, "the run was still going when the third joined");
    leaving.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(leaving.wait_exit(Duration::from_secs(60)).success());

    wait_delivered_and_committed(
        &broker,
        &smtp,
        (&group, &topic),
        N,
        &[&first, &joining],
        (Duration::from_secs(180), Duration::from_secs(120)),
    )
    .await;
    // Each revocation waited for its partitions' jobs in flight and committed them before
    // the partitions moved. On Tansu 0.6 a member may still read a partition for a moment
    // after the rebalance gave it to another (the broker completes a rebalance before every
    // member rejoined; a Kafka broker waits for them): idempotency, on as users run it,
    // keeps those repeats from being sent.
    let skipped: f64 = [&first, &joining]
        .iter()
        .map(|w| async move { w.metric("mailpipe_jobs_duplicates_skipped_total").await })
        .collect::<futures::future::JoinAll<_>>()
        .await
        .into_iter()
        .sum();
    println!("rebalances: {skipped} repeats skipped by idempotency");
    assert_eq!(smtp.tally(&run, N).await, Tally::EXACT);
}

#[tokio::test]
async fn a_broker_restart_during_a_run_loses_nothing() {
    const N: usize = 400;
    let mut broker = KafkaBroker::start().await;
    let smtp = slow_smtp(50).await;
    let (topic, group, run) = (unique("jobs"), unique("group"), unique("run"));
    broker.create_topic(&topic, PARTITIONS).await;
    let worker = WorkerSpec::kafka(&broker.bootstrap(), &topic, &group, smtp.port)
        .args(&["--concurrency", "4"])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    broker
        .produce(&topic, PARTITIONS, (0..N).map(|n| jobs::numbered(&run, n)))
        .await;
    eventually(Duration::from_secs(60), "a quarter sent", || async {
        (sent(&worker).await >= (N / 4) as f64).then_some(())
    })
    .await;

    broker.stop();
    tokio::time::sleep(Duration::from_secs(10)).await;
    broker.restart().await;

    wait_delivered_and_committed(
        &broker,
        &smtp,
        (&group, &topic),
        N,
        &[&worker],
        (Duration::from_secs(180), Duration::from_secs(120)),
    )
    .await;
    let tally = smtp.tally(&run, N).await;
    println!(
        "broker restart: {} jobs repeated (settled while the broker was away, so not committed)",
        tally.duplicated
    );
    assert_eq!(
        tally.lost,
        0,
        "nothing lost: {tally:?}\n{}",
        worker.output()
    );
    assert_eq!(tally.foreign, 0);
}

#[tokio::test]
async fn a_worker_logs_in_with_scram_and_a_wrong_password_is_refused_without_leaking_it() {
    const N: usize = 20;
    let broker = KafkaBroker::start_with_user("mailer", "s3cret-pw").await;
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let (topic, group, run) = (unique("jobs"), unique("group"), unique("run"));
    broker.create_topic(&topic, PARTITIONS).await;
    broker
        .produce(&topic, PARTITIONS, (0..N).map(|n| jobs::numbered(&run, n)))
        .await;
    let spec = WorkerSpec::kafka(&broker.bootstrap(), &topic, &group, smtp.port).args(&[
        "--kafka-sasl-username",
        "mailer",
        "--kafka-sasl-mechanism",
        "SCRAM-SHA-256",
    ]);

    // A wrong password: never ready, nothing consumed, and the password in no log line.
    let wrong = spec
        .clone()
        .env("MAILPIPE_KAFKA_SASL_PASSWORD", "not-the-pw")
        .spawn();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(!wrong.is_ready().await, "{}", wrong.output());
    assert_eq!(smtp.count().await, 0);
    assert!(!wrong.output().contains("not-the-pw"));
    drop(wrong);

    // The right one, from a file as a mounted Secret gives it.
    let dir = tempfile::tempdir().expect("a directory");
    let file = dir.path().join("password");
    std::fs::write(&file, "s3cret-pw\n").expect("written");
    let worker = spec
        .env(
            "MAILPIPE_KAFKA_SASL_PASSWORD_FILE",
            file.to_str().expect("UTF-8 path"),
        )
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    wait_delivered_and_committed(
        &broker,
        &smtp,
        (&group, &topic),
        N,
        &[&worker],
        (Duration::from_secs(60), Duration::from_secs(60)),
    )
    .await;
    assert_eq!(smtp.tally(&run, N).await, Tally::EXACT);
    assert!(!worker.output().contains("s3cret-pw"));
}

#[tokio::test]
async fn a_worker_reaches_the_brokers_over_verified_tls_and_refuses_an_unknown_ca() {
    const N: usize = 20;
    let broker = KafkaBroker::start_behind_tls().await;
    let (ca, other_ca) = broker.ca().expect("a TLS front");
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let (topic, group, run) = (unique("jobs"), unique("group"), unique("run"));
    broker.create_topic(&topic, PARTITIONS).await;
    broker
        .produce(&topic, PARTITIONS, (0..N).map(|n| jobs::numbered(&run, n)))
        .await;
    let spec = WorkerSpec::kafka(&broker.bootstrap(), &topic, &group, smtp.port);

    // A CA that did not sign the brokers' certificate: never ready, nothing consumed.
    let untrusting = spec
        .clone()
        .args(&["--kafka-ca-file", other_ca.to_str().expect("UTF-8 path")])
        .spawn();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(!untrusting.is_ready().await, "{}", untrusting.output());
    assert_eq!(smtp.count().await, 0);
    drop(untrusting);

    let worker = spec
        .args(&["--kafka-ca-file", ca.to_str().expect("UTF-8 path")])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    wait_delivered_and_committed(
        &broker,
        &smtp,
        (&group, &topic),
        N,
        &[&worker],
        (Duration::from_secs(60), Duration::from_secs(60)),
    )
    .await;
    assert_eq!(smtp.tally(&run, N).await, Tally::EXACT);
}
