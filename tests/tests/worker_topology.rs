//! Topology options: any vhost, verify-only mode, priority queues, and the send-rate limit.

use std::time::{Duration, Instant};

use lapin::BasicProperties;
use mailpipe_contract::topology::RabbitSettings;
use mailpipe_contract::{Priority, RetryPolicy};
use mailpipe_tests::amqp::{self, Names, SHARED_URL};
use mailpipe_tests::smtp::{SmtpOptions, SmtpServer};
use mailpipe_tests::worker::WorkerSpec;
use mailpipe_tests::{eventually, jobs, unique};
use nix::sys::signal::Signal;

fn rabbitmqctl(args: &[&str]) {
    amqp::rabbitmqctl(None, args).unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn a_worker_consumes_from_its_own_vhost() {
    let vhost = unique("mailpipe_vhost");
    rabbitmqctl(&["add_vhost", &vhost]);
    rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    let url = format!("amqp://guest:guest@127.0.0.1:5672/{vhost}");
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let names = Names::new("vhost");
    let worker = WorkerSpec::new(&url, &names, smtp.port).spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish_numbered(&url, &names.exchange, &run, 0..3).await;
    eventually(Duration::from_secs(20), "3 jobs from the vhost", || async {
        (smtp.count().await == 3).then_some(())
    })
    .await;
    drop(worker);
    rabbitmqctl(&["delete_vhost", &vhost]);
}

#[tokio::test]
async fn a_topic_exchange_routes_only_matching_jobs_to_the_worker() {
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let names = Names::new("topic");
    let worker = WorkerSpec::new(SHARED_URL, &names, smtp.port)
        .args(&["--exchange-type", "topic", "--routing-key", "mail.*"])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    let props = BasicProperties::default;
    amqp::publish_routed(
        SHARED_URL,
        &names.exchange,
        "sms.otp",
        [(jobs::numbered(&run, 0), props())],
    )
    .await;
    amqp::publish_routed(
        SHARED_URL,
        &names.exchange,
        "mail.welcome",
        [(jobs::numbered(&run, 1), props())],
    )
    .await;
    smtp.wait_for_count(1, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tally = smtp.tally(&run, 2).await;
    assert_eq!(
        (tally.lost, tally.duplicated),
        (1, 0),
        "only the mail.* job arrives"
    );
    assert_eq!(smtp.messages().await[0].rcpt_tos, ["user1@example.com"]);
    let settings = RabbitSettings {
        exchange: names.exchange.clone(),
        exchange_kind: mailpipe_contract::topology::ExchangeKind::Topic,
        queue: names.queue.clone(),
        routing_key: "mail.*".into(),
        ..RabbitSettings::default()
    };
    amqp::delete_plan(SHARED_URL, &settings.plan(&RetryPolicy::default())).await;
}

#[tokio::test]
async fn verify_mode_waits_for_the_topology_instead_of_creating_it() {
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let names = Names::new("verify");
    let verifier = WorkerSpec::new(SHARED_URL, &names, smtp.port)
        .args(&["--topology", "verify"])
        .spawn();
    eventually(
        Duration::from_secs(20),
        "a NOT_FOUND from the passive declare",
        || async {
            verifier
                .output()
                .contains("cannot connect to the broker")
                .then_some(())
        },
    )
    .await;
    assert!(!verifier.is_ready().await);
    // Someone else (the operator, later) declares the topology; the verifier then starts.
    let mut declarer = WorkerSpec::new(SHARED_URL, &names, smtp.port).spawn();
    declarer.wait_ready(Duration::from_secs(30)).await;
    declarer.signal(Signal::SIGTERM);
    declarer.wait_exit(Duration::from_secs(30));
    verifier.wait_ready(Duration::from_secs(60)).await;
    amqp::delete_plan(SHARED_URL, &names.plan(&RetryPolicy::default())).await;
}

#[tokio::test]
async fn a_priority_queue_delivers_high_priority_jobs_first() {
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let names = Names::new("priority");
    let spec = WorkerSpec::new(SHARED_URL, &names, smtp.port).args(&[
        "--max-priority",
        "10",
        "--concurrency",
        "1",
    ]);
    // Declare, stop, queue low jobs then one high job, start again.
    let mut first = spec.spawn();
    first.wait_ready(Duration::from_secs(30)).await;
    first.signal(Signal::SIGTERM);
    first.wait_exit(Duration::from_secs(30));
    let run = unique("run");
    let low = (0..5).map(|n| {
        (
            jobs::numbered(&run, n),
            BasicProperties::default().with_priority(Priority::Low.amqp_priority()),
        )
    });
    amqp::publish_with(SHARED_URL, &names.exchange, low).await;
    let high = (
        jobs::numbered(&run, 5),
        BasicProperties::default().with_priority(Priority::High.amqp_priority()),
    );
    amqp::publish_with(SHARED_URL, &names.exchange, [high]).await;
    let _worker = spec.spawn();
    eventually(Duration::from_secs(30), "6 jobs delivered", || async {
        (smtp.count().await == 6).then_some(())
    })
    .await;
    let order: Vec<usize> = smtp
        .messages()
        .await
        .iter()
        .filter_map(|m| jobs::number_in_message(&m.data, &run))
        .collect();
    assert_eq!(order[0], 5, "the high-priority job goes first: {order:?}");
    let settings = RabbitSettings {
        exchange: names.exchange.clone(),
        queue: names.queue.clone(),
        max_priority: Some(10),
        ..RabbitSettings::default()
    };
    amqp::delete_plan(SHARED_URL, &settings.plan(&RetryPolicy::default())).await;
}

#[tokio::test]
async fn the_send_rate_limit_holds_and_logs_can_be_json() {
    const N: usize = 30;
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let names = Names::new("ratelimit");
    let worker = WorkerSpec::new(SHARED_URL, &names, smtp.port)
        .args(&["--smtp-rate-limit", "10", "--log-format", "json"])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    let started = Instant::now();
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..N).await;
    eventually(Duration::from_secs(30), "all jobs delivered", || async {
        (smtp.count().await == N).then_some(())
    })
    .await;
    // 10 per second with a burst of 10: 30 jobs need at least 2 seconds.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900),
        "30 jobs at 10/s took only {took:?}"
    );
    let output = worker.output();
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() > N, "one line per job at least");
    for line in lines {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(value.get("level").is_some(), "{line}");
    }
    amqp::delete_plan(SHARED_URL, &names.plan(&RetryPolicy::default())).await;
}
