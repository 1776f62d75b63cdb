//! Transient failures are retried through delay queues and delivered once the server
//! recovers; past the last attempt they are dead-lettered; permanent ones never loop.

use std::time::Duration;

use mailpipe_contract::naming::dead_letter_queue;
use mailpipe_contract::topology::{QueueType, RabbitSettings};
use mailpipe_contract::RetryPolicy;
use mailpipe_tests::amqp::{self, Names, SHARED_URL};
use mailpipe_tests::jobs;
use mailpipe_tests::quiet::Quiet;
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

    let quiet = Quiet {
        url: SHARED_URL,
        plan: names.plan(&retry(10)),
        workers: vec![&worker],
    };
    let tally = smtp
        .settled_tally(&run, N, Duration::from_secs(30), &quiet)
        .await;
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

/// The users' defaults (5 attempts, 5-10-20-40 s apart) used to dead-letter what was
/// consumed during any outage longer than about 75 s. An unavailable server is not the
/// job's fault: consuming pauses, no attempt is spent, everything goes out afterwards.
#[tokio::test]
async fn a_three_minute_smtp_outage_with_default_settings_dead_letters_nothing() {
    const N: usize = 1000;
    const OUTAGE_TENS: usize = 18;
    let mut smtp = SmtpServer::start(SmtpOptions {
        delay_ms: 5,
        ..SmtpOptions::default()
    })
    .await;
    let names = Names::new("smtpoutage");
    let worker = WorkerSpec::with_defaults(SHARED_URL, &names, smtp.port).spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..N).await;
    smtp.wait_for_count(100, Duration::from_secs(60)).await;

    smtp.stop().await;
    eprintln!("SMTP server stopped after {} messages", smtp.count().await);
    worker.wait_unready(Duration::from_secs(15)).await;
    // A delivery the worker took just before it saw the server down is counted when its
    // task first runs, which may be just after /readyz turned: counted from 2 s on, the
    // outage's three minutes must take nothing new.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let consumed_at_stop = worker.metric("mailpipe_jobs_consumed_total").await;
    let dlq = dead_letter_queue(&names.queue);
    for _ in 0..OUTAGE_TENS {
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(
            amqp::ready(SHARED_URL, &dlq).await,
            0,
            "nothing dead-lettered during the outage"
        );
        assert!(
            !worker.is_ready().await,
            "not ready while the server is down"
        );
    }
    let consumed_in_outage = worker.metric("mailpipe_jobs_consumed_total").await - consumed_at_stop;
    assert_eq!(
        consumed_in_outage, 0.0,
        "consuming paused during the outage"
    );
    assert!(
        amqp::ready(SHARED_URL, &names.queue).await > 0,
        "the backlog waited in the queue"
    );

    smtp.restart().await;
    eprintln!("SMTP server back; consumed {consumed_at_stop} before the outage");
    worker.wait_ready(Duration::from_secs(60)).await;
    eprintln!("worker ready again");
    let quiet = Quiet {
        url: SHARED_URL,
        plan: names.plan(&RetryPolicy::default()),
        workers: vec![&worker],
    };
    let tally = smtp
        .settled_tally(&run, N, Duration::from_secs(120), &quiet)
        .await;
    assert_eq!(
        (tally.lost, tally.foreign),
        (0, 0),
        "nothing lost: {tally:?}"
    );
    assert_eq!(amqp::ready(SHARED_URL, &dlq).await, 0);
    let metrics = worker.metrics().await;
    // The only attempts spent are those of messages being handed over at the instant the
    // server died: their outcome is unknown (the server may have stored them), so they go
    // through the retry queue once. Every other job waited without spending one.
    let failed: Vec<(&String, &f64)> = metrics
        .iter()
        .filter(|(k, v)| k.starts_with("mailpipe_jobs_failed_total") && **v > 0.0)
        .collect();
    let unknown = metrics
        .get("mailpipe_jobs_failed_total{reason=\"smtp_outcome_unknown\"}")
        .copied()
        .unwrap_or(0.0);
    assert!(
        failed
            .iter()
            .all(|(k, _)| k.contains("smtp_outcome_unknown")),
        "no attempt spent on the outage itself: {failed:?}"
    );
    assert!(
        unknown <= 16.0,
        "at most the 16 jobs in flight at the crash had an unknown outcome: {unknown}"
    );
    // A message the server stored just before it died, whose 250 never came, is the one
    // kind of repeat: its outcome was unknown, so it was retried.
    assert!(
        tally.duplicated as f64 <= unknown,
        "only jobs whose outcome the crash made unknown repeat: {tally:?}, {unknown} unknown"
    );
    let consumed = metrics["mailpipe_jobs_consumed_total"];
    assert_eq!(
        consumed,
        N as f64 + unknown,
        "each job consumed once, plus one retry for an unknown outcome"
    );
    assert!(
        metrics
            .iter()
            .any(|(k, v)| k.starts_with("mailpipe_smtp_unavailable_total") && *v > 0.0),
        "the outage is counted apart: {metrics:?}"
    );
    assert_eq!(metrics["mailpipe_jobs_sent_total"], N as f64);
    amqp::delete_plan(SHARED_URL, &names.plan(&RetryPolicy::default())).await;
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

/// A worker with one attempt per job, one job at a time and one pooled SMTP connection,
/// which job 0 of the returned run has just opened.
async fn one_pooled_connection_after_a_first_job(
    label: &str,
) -> (SmtpServer, Names, mailpipe_tests::worker::Worker, String) {
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let names = Names::new(label);
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
    (smtp, names, worker, run)
}

#[tokio::test]
async fn an_smtp_restart_between_sends_costs_no_attempt() {
    // One attempt only: a send lost to a connection the server closed while it sat in the
    // pool would dead-letter the job.
    let (mut smtp, names, worker, run) = one_pooled_connection_after_a_first_job("stalepool").await;

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

#[tokio::test]
async fn a_connection_lost_after_the_final_dot_is_never_resent_at_once() {
    // One attempt only: before, a reused connection cut after the dot was resent at once on a
    // new one (two copies, no failure counted).
    let (smtp, names, worker, run) = one_pooled_connection_after_a_first_job("afterdot").await;

    // The pooled connection is reused for job 1; the server stores it and cuts the line.
    smtp.set_drop_after_data().await;
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 1..2).await;
    let dlq = dead_letter_queue(&names.queue);
    eventually(Duration::from_secs(15), "job 1 dead-lettered", || async {
        (amqp::ready(SHARED_URL, &dlq).await == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tally = smtp.tally(&run, 2).await;
    assert_eq!(
        tally,
        jobs::Tally::EXACT,
        "stored once, never resent at once"
    );
    let metrics = worker.metrics().await;
    assert_eq!(metrics["mailpipe_smtp_outcome_unknown_total"], 1.0);
    assert_eq!(
        metrics["mailpipe_jobs_failed_total{reason=\"smtp_outcome_unknown\"}"],
        1.0
    );
    assert_eq!(metrics["mailpipe_jobs_sent_total"], 1.0);
    let dead = amqp::take_all(SHARED_URL, &dlq).await;
    assert_eq!(dead[0].headers["x-mailpipe-reason"], "max_attempts");
    assert!(
        dead[0].headers["x-mailpipe-detail"].contains("smtp_outcome_unknown"),
        "{:?}",
        dead[0].headers
    );
    amqp::delete_plan(SHARED_URL, &names.plan(&retry(1))).await;
}

#[tokio::test]
async fn a_slow_reply_to_the_final_dot_is_waited_for_not_resent() {
    // The command timeout is 1 s; the server takes 3 s to accept each message, which RFC
    // 5321 allows (10 minutes). Each job arrives once and is sent on its first attempt.
    const N: usize = 4;
    let smtp = SmtpServer::start(SmtpOptions {
        delay_ms: 3000,
        ..SmtpOptions::default()
    })
    .await;
    let names = Names::new("slowdot");
    let worker = WorkerSpec::new(SHARED_URL, &names, smtp.port)
        .args(&["--smtp-timeout", "1s", "--concurrency", "4"])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..N).await;
    let quiet = Quiet {
        url: SHARED_URL,
        plan: names.plan(&test_policy()),
        workers: vec![&worker],
    };
    let tally = smtp
        .settled_tally(&run, N, Duration::from_secs(30), &quiet)
        .await;
    assert_eq!(tally, jobs::Tally::EXACT);
    let metrics = worker.metrics().await;
    assert_eq!(
        metrics["mailpipe_jobs_consumed_total"], N as f64,
        "one attempt each"
    );
    amqp::delete_plan(SHARED_URL, &names.plan(&test_policy())).await;
}

/// The retry policy `WorkerSpec::new` sets (200 ms doubling up to 2 s, 5 attempts).
fn test_policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 5,
        ..retry(5)
    }
}

/// A broker that refuses the retry copy (here a policy caps the delay queues at zero
/// messages with `reject-publish`, as a full queue would): the job is not acked and not
/// lost; it goes back to the work queue unchanged, counted, and goes out once the broker
/// takes copies again.
#[tokio::test]
async fn a_refused_retry_copy_leaves_the_job_in_the_queue_counted() {
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    smtp.set_fault(451, "4.3.0 try again later").await;
    let names = Names::new("nackcopy");
    let policy = unique("nackpolicy");
    amqp::rabbitmqctl(
        None,
        &[
            "set_policy",
            &policy,
            &format!("^{}\\.retry\\.", names.queue),
            r#"{"max-length":0,"overflow":"reject-publish"}"#,
            "--apply-to",
            "queues",
        ],
    )
    .expect("a policy can be set");
    let worker = WorkerSpec::new(SHARED_URL, &names, smtp.port).spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..1).await;
    eventually(Duration::from_secs(20), "two refused copies", || async {
        (worker.metric("mailpipe_broker_nacks_total").await >= 2.0).then_some(())
    })
    .await;
    let attempts_so_far = worker.metric("mailpipe_jobs_consumed_total").await;
    assert!(
        attempts_so_far >= 2.0,
        "the job came back: {attempts_so_far}"
    );
    let dlq = dead_letter_queue(&names.queue);
    assert_eq!(
        amqp::ready(SHARED_URL, &dlq).await,
        0,
        "never dead-lettered"
    );

    amqp::rabbitmqctl(None, &["clear_policy", &policy]).expect("the policy goes");
    smtp.clear_fault().await;
    let quiet = Quiet {
        url: SHARED_URL,
        plan: names.plan(&test_policy()),
        workers: vec![&worker],
    };
    let tally = smtp
        .settled_tally(&run, 1, Duration::from_secs(30), &quiet)
        .await;
    assert_eq!(tally, jobs::Tally::EXACT);
    amqp::delete_plan(SHARED_URL, &names.plan(&test_policy())).await;
}

/// A producer's per-message TTL must not make a job vanish from the dead-letter queue.
#[tokio::test]
async fn dead_letter_copies_drop_the_producers_expiration() {
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    smtp.set_fault(550, "5.7.1 refused").await;
    let names = Names::new("expiration");
    let worker = WorkerSpec::new(SHARED_URL, &names, smtp.port).spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish_with(
        SHARED_URL,
        &names.exchange,
        [(
            jobs::numbered(&run, 0),
            lapin::BasicProperties::default().with_expiration("600000".into()),
        )],
    )
    .await;
    let dlq = dead_letter_queue(&names.queue);
    eventually(Duration::from_secs(20), "the job dead-lettered", || async {
        (amqp::ready(SHARED_URL, &dlq).await == 1).then_some(())
    })
    .await;
    let dead = amqp::take_all(SHARED_URL, &dlq).await;
    assert_eq!(dead[0].headers["x-mailpipe-reason"], "smtp_5xx");
    assert_eq!(
        dead[0].expiration, None,
        "no expiration on the dead-letter copy"
    );
    drop(worker);
    amqp::delete_plan(SHARED_URL, &names.plan(&test_policy())).await;
}
