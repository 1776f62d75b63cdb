//! The worker against Postfix, the MTA providers' front doors behave like: with PIPELINING
//! the worker sends each envelope in one write, and without it a command at a time. Either
//! way every job arrives once, a recipient Postfix refuses is dead-lettered alone, and
//! Postfix never saw a command where no client may send one.

use std::time::Duration;

use mailpipe_tests::amqp::{self, Names, SHARED_URL};
use mailpipe_tests::jobs::Tally;
use mailpipe_tests::postfix::Postfix;
use mailpipe_tests::quiet::Quiet;
use mailpipe_tests::smtp::{SmtpOptions, SmtpServer};
use mailpipe_tests::worker::{WorkerSpec, TEST_RETRY};
use mailpipe_tests::{eventually, unique};

async fn through_postfix(pipelining: bool) {
    const N: usize = 300;
    // Postfix relays what it accepts to this server, which stores it.
    let store = SmtpServer::start(SmtpOptions::default()).await;
    let postfix = Postfix::start(store.port, pipelining).await;
    let names = Names::new(if pipelining { "postfix" } else { "postfixnp" });
    let worker = WorkerSpec::new(SHARED_URL, &names, postfix.port).spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..N).await;
    let mixed = serde_json::json!({"id": unique("mixed"), "to": ["kept@example.com"],
        "cc": ["reject5xx@example.com"], "subject": "mixed", "text": "t"});
    amqp::publish(
        SHARED_URL,
        &names.exchange,
        [mixed.to_string().into_bytes()],
    )
    .await;

    store.wait_for_count(N + 1, Duration::from_secs(60)).await;
    let quiet = Quiet {
        url: SHARED_URL,
        plan: names.plan(&TEST_RETRY),
        workers: vec![&worker],
    };
    let tally = store
        .settled_tally(&run, N, Duration::from_secs(60), &quiet)
        .await;
    assert_eq!(tally, Tally::EXACT, "Postfix's log:\n{}", postfix.log());
    let kept: Vec<_> = store
        .messages()
        .await
        .into_iter()
        .filter(|m| m.rcpt_tos.iter().any(|r| r == "kept@example.com"))
        .map(|m| m.rcpt_tos)
        .collect();
    assert_eq!(kept, vec![vec!["kept@example.com".to_string()]]);
    let dlq = mailpipe_contract::naming::dead_letter_queue(&names.queue);
    eventually(
        Duration::from_secs(20),
        "the refused recipient dead-lettered",
        || async { (amqp::ready(SHARED_URL, &dlq).await == 1).then_some(()) },
    )
    .await;
    let dead = amqp::take_all(SHARED_URL, &dlq).await;
    assert_eq!(dead[0].headers["x-mailpipe-reason"], "recipient_refused");
    assert_eq!(
        dead[0].headers["x-mailpipe-recipients"],
        r#"["reject5xx@example.com"]"#
    );
    let log = postfix.log();
    assert!(
        !log.contains("improper command pipelining"),
        "Postfix saw commands sent before their turn:\n{log}"
    );
    assert_eq!(
        worker.metric("mailpipe_jobs_sent_total").await,
        (N + 1) as f64
    );
    amqp::delete_plan(SHARED_URL, &names.plan(&TEST_RETRY)).await;
}

#[tokio::test]
async fn postfix_with_pipelining_takes_every_job_once() {
    through_postfix(true).await;
}

#[tokio::test]
async fn postfix_without_pipelining_takes_every_job_once() {
    through_postfix(false).await;
}
