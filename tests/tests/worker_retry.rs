//! Transient failures are retried through delay queues and delivered once the server
//! recovers; past the last attempt they are dead-lettered; permanent ones never loop.

use std::time::Duration;

use mailpipe_contract::naming::dead_letter_queue;
use mailpipe_contract::topology::{QueueType, RabbitSettings};
use mailpipe_contract::RetryPolicy;
use mailpipe_tests::amqp::{self, Names, SHARED_URL};
use mailpipe_tests::jobs;
use mailpipe_tests::smtp::{SmtpOptions, SmtpServer};
use mailpipe_tests::worker::WorkerSpec;
use mailpipe_tests::{eventually, unique};

fn retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial: Duration::from_millis(200),
        multiplier: 2.0,
        max: Duration::from_secs(2),
    }
}

#[tokio::test]
async fn smtp_4xx_for_a_while_delays_delivery_but_dead_letters_nothing() {
    const N: usize = 20;
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    smtp.set_fault(451, "4.3.0 try again later").await;
    let names = Names::new("fourxx");
    let worker = WorkerSpec::new(SHARED_URL, &names, smtp.port)
        .args(&["--max-attempts", "10"])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..N).await;

    eventually(
        Duration::from_secs(20),
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

    let tally = smtp.settled_tally(&run, N, Duration::from_secs(30)).await;
    assert_eq!(tally, jobs::Tally::EXACT);
    assert_eq!(
        amqp::ready(SHARED_URL, &dead_letter_queue(&names.queue)).await,
        0
    );
    let retried = worker
        .metric("mailpipe_jobs_retried_total{reason=\"smtp_4xx\"}")
        .await;
    assert!(retried >= 2.0 * N as f64, "retried {retried}");
    assert_eq!(worker.metric("mailpipe_jobs_sent_total").await, N as f64);
    amqp::delete_plan(SHARED_URL, &names.plan(&retry(10))).await;
}

#[tokio::test]
async fn past_max_attempts_transient_failures_are_dead_lettered_with_the_attempt_count() {
    const N: usize = 5;
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    smtp.set_fault(421, "4.7.0 too busy").await;
    let names = Names::new("maxattempts");
    let worker = WorkerSpec::new(SHARED_URL, &names, smtp.port)
        .args(&["--max-attempts", "3"])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..N).await;

    let dlq = dead_letter_queue(&names.queue);
    eventually(
        Duration::from_secs(30),
        "all jobs dead-lettered",
        || async { (amqp::ready(SHARED_URL, &dlq).await >= N as u32).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let metrics = worker.metrics().await;
    assert_eq!(
        metrics["mailpipe_jobs_consumed_total"],
        3.0 * N as f64,
        "3 attempts each, no more"
    );
    assert_eq!(
        metrics["mailpipe_jobs_dead_lettered_total{reason=\"max_attempts\"}"],
        N as f64
    );
    let dead = amqp::take_all(SHARED_URL, &dlq).await;
    assert_eq!(dead.len(), N);
    for got in dead {
        assert_eq!(got.headers["x-mailpipe-reason"], "max_attempts");
        assert_eq!(got.headers["x-mailpipe-attempt"], "3");
        assert!(
            got.headers["x-mailpipe-detail"].contains("421"),
            "{:?}",
            got.headers
        );
        assert_eq!(got.headers["x-mailpipe-original-exchange"], names.exchange);
    }
    assert_eq!(smtp.count().await, 0);
    amqp::delete_plan(SHARED_URL, &names.plan(&retry(3))).await;
}

#[tokio::test]
async fn smtp_server_down_then_back_delivers_everything_and_readiness_follows() {
    const N: usize = 10;
    let mut smtp = SmtpServer::start(SmtpOptions::default()).await;
    let names = Names::new("smtpdown");
    let worker = WorkerSpec::new(SHARED_URL, &names, smtp.port)
        .args(&["--max-attempts", "20"])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    smtp.stop().await;

    let run = unique("run");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..N).await;
    worker.wait_unready(Duration::from_secs(15)).await;
    eventually(Duration::from_secs(15), "connection failures", || async {
        let failed = worker
            .metric("mailpipe_jobs_failed_total{reason=\"smtp_connection\"}")
            .await;
        (failed >= N as f64).then_some(())
    })
    .await;

    smtp.restart().await;
    worker.wait_ready(Duration::from_secs(30)).await;
    let tally = smtp.settled_tally(&run, N, Duration::from_secs(30)).await;
    assert_eq!(tally, jobs::Tally::EXACT);
    assert_eq!(
        amqp::ready(SHARED_URL, &dead_letter_queue(&names.queue)).await,
        0
    );
    amqp::delete_plan(SHARED_URL, &names.plan(&retry(20))).await;
}

#[tokio::test]
async fn quorum_queues_retry_and_dead_letter_at_least_once() {
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let names = Names::new("quorum");
    let worker = WorkerSpec::new(SHARED_URL, &names, smtp.port)
        .args(&["--queue-type", "quorum", "--max-attempts", "2"])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    smtp.set_fault(450, "4.2.0 mailbox busy").await;
    let run = unique("run");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..3).await;
    let dlq = dead_letter_queue(&names.queue);
    eventually(
        Duration::from_secs(30),
        "3 jobs dead-lettered after 2 attempts",
        || async { (amqp::ready(SHARED_URL, &dlq).await == 3).then_some(()) },
    )
    .await;
    smtp.clear_fault().await;
    amqp::publish(SHARED_URL, &names.exchange, [jobs::numbered(&run, 3)]).await;
    eventually(Duration::from_secs(20), "a later job delivered", || async {
        (smtp.count().await == 1).then_some(())
    })
    .await;
    let listing = amqp::rabbitmqctl(
        None,
        &[
            "-q",
            "list_queues",
            "name",
            "type",
            "arguments",
            "--no-table-headers",
        ],
    )
    .expect("rabbitmqctl lists queues");
    let work = listing
        .lines()
        .find(|l| l.split_whitespace().next() == Some(names.queue.as_str()))
        .expect("work queue listed");
    assert!(work.contains("quorum"), "{work}");
    assert!(work.contains("at-least-once"), "{work}");
    let settings = RabbitSettings {
        exchange: names.exchange.clone(),
        queue: names.queue.clone(),
        queue_type: QueueType::Quorum,
        ..RabbitSettings::default()
    };
    amqp::delete_plan(SHARED_URL, &settings.plan(&retry(2))).await;
}

#[tokio::test]
async fn an_smtp_restart_between_sends_costs_no_attempt() {
    // One attempt only: a send lost to a connection the server closed while it sat in the
    // pool would dead-letter the job.
    let mut smtp = SmtpServer::start(SmtpOptions::default()).await;
    let names = Names::new("stalepool");
    let worker = WorkerSpec::new(SHARED_URL, &names, smtp.port)
        .args(&[
            "--max-attempts",
            "1",
            "--concurrency",
            "1",
            "--smtp-pool-size",
            "1",
        ])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..1).await;
    smtp.wait_for_count(1, Duration::from_secs(15)).await;

    // The pooled connection is now dead, and too fresh to be checked with NOOP.
    smtp.stop().await;
    smtp.restart().await;
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 1..2).await;
    smtp.wait_for_count(2, Duration::from_secs(15)).await;
    let tally = smtp.tally(&run, 2).await;
    assert_eq!((tally.lost, tally.duplicated), (0, 0), "{tally:?}");
    assert_eq!(
        amqp::ready(SHARED_URL, &dead_letter_queue(&names.queue)).await,
        0,
        "nothing dead-lettered"
    );
    assert_eq!(
        worker
            .metric("mailpipe_jobs_failed_total{reason=\"smtp_connection\"}")
            .await,
        0.0,
        "no attempt was spent on the stale connection"
    );
    amqp::delete_plan(SHARED_URL, &names.plan(&retry(1))).await;
}
