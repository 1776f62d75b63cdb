//! Redis and RabbitMQ going away mid-run. Each test cuts a server of its own (a private
//! redis-server, a private RabbitMQ node), never the shared ones.

use std::time::Duration;

use mailpipe_contract::RetryPolicy;
use mailpipe_tests::amqp::{self, Names, SHARED_URL};
use mailpipe_tests::jobs::Tally;
use mailpipe_tests::quiet::Quiet;
use mailpipe_tests::rabbit_node::RabbitNode;
use mailpipe_tests::redis_server::{RedisServer, SHARED_URL as SHARED_REDIS};
use mailpipe_tests::smtp::{SmtpOptions, SmtpServer};
use mailpipe_tests::worker::{WorkerSpec, TEST_RETRY};
use mailpipe_tests::{eventually, unique};

#[tokio::test]
async fn redis_outage_pauses_sending_with_readiness_false_and_loses_nothing() {
    const N: usize = 200;
    const CONCURRENCY: usize = 4;
    let mut redis = RedisServer::start().await;
    let smtp = SmtpServer::start(SmtpOptions {
        delay_ms: 20,
        ..SmtpOptions::default()
    })
    .await;
    let names = Names::new("redisdown");
    let worker = WorkerSpec::new(SHARED_URL, &names, smtp.port)
        .env("MAILPIPE_REDIS_URL", &redis.url())
        .args(&["--concurrency", &CONCURRENCY.to_string()])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..N).await;
    smtp.wait_for_count(30, Duration::from_secs(30)).await;

    redis.stop();
    worker.wait_unready(Duration::from_secs(15)).await;
    // Sends that had passed their check may finish; after that, nothing more is sent.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let paused_at = smtp.count().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        smtp.count().await,
        paused_at,
        "no send while the store is down"
    );
    assert!(!worker.is_ready().await);
    assert!(paused_at < N, "the outage began mid-run");

    redis.restart().await;
    worker.wait_ready(Duration::from_secs(30)).await;
    let quiet = Quiet {
        url: SHARED_URL,
        plan: names.plan(&TEST_RETRY),
        workers: vec![&worker],
    };
    assert_eq!(
        smtp.settled_tally(&run, N, Duration::from_secs(60), &quiet)
            .await,
        Tally::EXACT
    );
    assert!(
        worker
            .metric("mailpipe_idempotency_errors_total{operation=\"check\"}")
            .await
            > 0.0
    );
    amqp::delete_plan(SHARED_URL, &names.plan(&TEST_RETRY)).await;
}

/// A run on a private RabbitMQ node: a worker with Redis deduplication, `n` numbered jobs
/// published, each send taking `delay_ms`.
struct PrivateRun {
    node: RabbitNode,
    url: String,
    smtp: SmtpServer,
    names: Names,
    worker: mailpipe_tests::worker::Worker,
    run: String,
}

async fn private_run(label: &str, delay_ms: u32, n: usize) -> PrivateRun {
    let node = tokio::task::spawn_blocking(|| RabbitNode::start(None))
        .await
        .unwrap();
    let url = node.url();
    let smtp = SmtpServer::start(SmtpOptions {
        delay_ms,
        ..SmtpOptions::default()
    })
    .await;
    let names = Names::new(label);
    let worker = WorkerSpec::new(&url, &names, smtp.port)
        .env("MAILPIPE_REDIS_URL", SHARED_REDIS)
        .args(&["--idempotency-prefix", &unique("mailpipe-test")])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish_numbered(&url, &names.exchange, &run, 0..n).await;
    PrivateRun {
        node,
        url,
        smtp,
        names,
        worker,
        run,
    }
}

/// A private node restarted mid-run with `delay_ms` per send: every job arrives once.
async fn broker_restart_mid_run(delay_ms: u32) {
    const N: usize = 300;
    let PrivateRun {
        node,
        url,
        smtp,
        names,
        worker,
        run,
    } = private_run("brokerrestart", delay_ms, N).await;
    smtp.wait_for_count(50, Duration::from_secs(60)).await;

    let node = tokio::task::spawn_blocking(move || {
        node.stop_app();
        node
    })
    .await
    .unwrap();
    worker.wait_unready(Duration::from_secs(15)).await;
    let node = tokio::task::spawn_blocking(move || {
        node.start_app();
        node
    })
    .await
    .unwrap();
    worker.wait_ready(Duration::from_secs(60)).await;
    let quiet = Quiet {
        url: &url,
        plan: names.plan(&TEST_RETRY),
        workers: vec![&worker],
    };
    let result = smtp
        .settled_tally(&run, N, Duration::from_secs(120), &quiet)
        .await;
    println!(
        "broker restart ({delay_ms} ms sends): lost {}, duplicated {}",
        result.lost, result.duplicated
    );
    assert_eq!(result, Tally::EXACT);
    assert!(worker.metric("mailpipe_broker_reconnects_total").await >= 1.0);
    let output = worker.output();
    assert!(
        !output
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("lapin")),
        "lapin's own ERROR lines are off; the worker logs each failure once:\n{output}"
    );
    drop(node);
}

#[tokio::test]
async fn private_broker_restart_mid_run_worker_reconnects_and_completes() {
    broker_restart_mid_run(10).await;
}

/// Slow sends: the redelivered copies arrive while the first deliveries are still sending.
#[tokio::test]
async fn private_broker_restart_while_sends_are_slow_sends_nothing_twice() {
    broker_restart_mid_run(300).await;
}

/// The broker drops the worker's connection while 16 slow sends are under way: it
/// redelivers them at once on the new connection, while the first deliveries still send.
#[tokio::test]
async fn private_broker_connection_drop_during_a_busy_run_sends_nothing_twice() {
    const N: usize = 200;
    let PrivateRun {
        node,
        url,
        smtp,
        names,
        worker,
        run,
    } = private_run("conndrop", 300, N).await;
    for target in [40, 100] {
        smtp.wait_for_count(target, Duration::from_secs(60)).await;
        // rabbitmqctl blocks this thread for a second; the worker is another process.
        node.ctl(&["close_all_connections", "test: a dropped connection"]);
    }
    let quiet = Quiet {
        url: &url,
        plan: names.plan(&TEST_RETRY),
        workers: vec![&worker],
    };
    let result = smtp
        .settled_tally(&run, N, Duration::from_secs(120), &quiet)
        .await;
    assert_eq!(result, Tally::EXACT);
    assert!(worker.metric("mailpipe_broker_reconnects_total").await >= 2.0);
    assert!(
        worker
            .metric("mailpipe_jobs_duplicates_skipped_total")
            .await
            > 0.0,
        "redelivered copies were recognised"
    );
}

/// Producers that publish a job twice: the copies sit next to each other in the queue and
/// are processed at the same moment. With Redis, each job id is sent once.
#[tokio::test]
async fn the_same_job_published_twice_back_to_back_is_sent_once() {
    const N: usize = 200;
    let smtp = SmtpServer::start(SmtpOptions {
        delay_ms: 20,
        ..SmtpOptions::default()
    })
    .await;
    let names = Names::new("twice");
    let worker = WorkerSpec::with_defaults(SHARED_URL, &names, smtp.port)
        .env("MAILPIPE_REDIS_URL", SHARED_REDIS)
        .args(&["--idempotency-prefix", &unique("mailpipe-test")])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    let bodies = (0..N).flat_map(|n| {
        let job = mailpipe_tests::jobs::numbered(&run, n);
        [job.clone(), job]
    });
    amqp::publish(SHARED_URL, &names.exchange, bodies).await;
    let quiet = Quiet {
        url: SHARED_URL,
        plan: names.plan(&RetryPolicy::default()),
        workers: vec![&worker],
    };
    let result = smtp
        .settled_tally(&run, N, Duration::from_secs(60), &quiet)
        .await;
    assert_eq!(result, Tally::EXACT);
    let metrics = worker.metrics().await;
    assert_eq!(metrics["mailpipe_jobs_sent_total"], N as f64);
    assert_eq!(metrics["mailpipe_jobs_duplicates_skipped_total"], N as f64);
    amqp::delete_plan(SHARED_URL, &names.plan(&RetryPolicy::default())).await;
}

/// An unreachable Redis at start-up is logged, once, with what to check (it used to show
/// only in readiness and a counter).
#[tokio::test]
async fn an_unreachable_redis_is_logged_once_with_what_to_check() {
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let names = Names::new("redislog");
    let port = mailpipe_tests::free_port();
    let worker = WorkerSpec::new(SHARED_URL, &names, smtp.port)
        .env("MAILPIPE_REDIS_URL", &format!("redis://127.0.0.1:{port}/0"))
        .spawn();
    eventually(
        Duration::from_secs(20),
        "the store outage logged",
        || async {
            worker
                .output()
                .contains("deduplication store unreachable")
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let output = worker.output();
    assert!(output.contains("Redis is unreachable"), "{output}");
    assert_eq!(
        output.matches("deduplication store unreachable").count(),
        1,
        "once per outage: {output}"
    );
    assert!(!worker.is_ready().await);
    amqp::delete_plan(SHARED_URL, &names.plan(&TEST_RETRY)).await;
}
