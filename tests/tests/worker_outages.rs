//! Redis and RabbitMQ going away mid-run. Each test cuts a server of its own (a private
//! redis-server, a private RabbitMQ node), never the shared ones.

use std::time::Duration;

use mailpipe_contract::RetryPolicy;
use mailpipe_tests::amqp::{self, Names, SHARED_URL};
use mailpipe_tests::jobs::Tally;
use mailpipe_tests::rabbit_node::RabbitNode;
use mailpipe_tests::redis_server::{RedisServer, SHARED_URL as SHARED_REDIS};
use mailpipe_tests::smtp::{SmtpOptions, SmtpServer};
use mailpipe_tests::unique;
use mailpipe_tests::worker::WorkerSpec;

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
    assert_eq!(
        smtp.settled_tally(&run, N, Duration::from_secs(60)).await,
        Tally::EXACT
    );
    assert!(
        worker
            .metric("mailpipe_idempotency_errors_total{operation=\"check\"}")
            .await
            > 0.0
    );
    amqp::delete_plan(SHARED_URL, &names.plan(&RetryPolicy::default())).await;
}

#[tokio::test]
async fn private_broker_restart_mid_run_worker_reconnects_and_completes() {
    const N: usize = 300;
    let node = tokio::task::spawn_blocking(|| RabbitNode::start(None))
        .await
        .unwrap();
    let url = node.url();
    let smtp = SmtpServer::start(SmtpOptions {
        delay_ms: 10,
        ..SmtpOptions::default()
    })
    .await;
    let names = Names::new("brokerrestart");
    let worker = WorkerSpec::new(&url, &names, smtp.port)
        .env("MAILPIPE_REDIS_URL", SHARED_REDIS)
        .args(&["--idempotency-prefix", &unique("mailpipe-test")])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish_numbered(&url, &names.exchange, &run, 0..N).await;
    smtp.wait_for_count(50, Duration::from_secs(30)).await;

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
    let result = smtp.settled_tally(&run, N, Duration::from_secs(90)).await;
    println!(
        "broker restart: lost {}, duplicated {}",
        result.lost, result.duplicated
    );
    assert_eq!(result, Tally::EXACT);
    assert!(worker.metric("mailpipe_broker_reconnects_total").await >= 1.0);
    drop(node);
}
