//! The pipeline's SMTP connection budget (`spec.smtp.poolSize`) shared among its workers
//! through the operator's token queue: one worker alone uses all of it, several never open
//! more connections together than the budget, and a worker that dies leaves its share to
//! the others.

use std::time::Duration;

use mailpipe_contract::naming::smtp_budget_queue;
use mailpipe_contract::topology::RabbitSettings;
use mailpipe_operator::topology::rabbitmq::RabbitTopology;
use mailpipe_operator::topology::BrokerTopology;
use mailpipe_tests::amqp::{self, Names, SHARED_URL};
use mailpipe_tests::jobs::Tally;
use mailpipe_tests::quiet::Quiet;
use mailpipe_tests::smtp::{SmtpOptions, SmtpServer};
use mailpipe_tests::worker::{Worker, WorkerSpec, TEST_RETRY};
use mailpipe_tests::{eventually, unique};

const BUDGET: u32 = 6;
const MAX: &str = "mailpipe_smtp_pool_connections{state=\"max\"}";

/// The topology and its budget of `BUDGET` tokens, as the operator declares them.
async fn pipeline(names: &Names) -> RabbitTopology {
    let settings = RabbitSettings {
        exchange: names.exchange.clone(),
        queue: names.queue.clone(),
        ..RabbitSettings::default()
    };
    let topology = RabbitTopology::new(
        SHARED_URL.to_string(),
        None,
        settings,
        names.plan(&TEST_RETRY),
    )
    .with_smtp_budget(BUDGET);
    topology
        .ensure()
        .await
        .expect("topology and budget declared");
    topology
}

async fn slots(workers: &[&Worker]) -> Vec<u32> {
    let mut slots = Vec::new();
    for worker in workers {
        slots.push(worker.metric(MAX).await as u32);
    }
    slots
}

#[tokio::test]
async fn workers_share_the_connection_budget_and_one_alone_uses_all_of_it() {
    const N: usize = 600;
    // 100 ms a message: 16 concurrent jobs per worker would want 16 connections each.
    let smtp = SmtpServer::start(SmtpOptions {
        delay_ms: 100,
        ..SmtpOptions::default()
    })
    .await;
    let names = Names::new("budget");
    let topology = pipeline(&names).await;
    let spec = WorkerSpec::new(SHARED_URL, &names, smtp.port).args(&[
        "--concurrency",
        "16",
        "--smtp-pool-size",
        &BUDGET.to_string(),
        "--smtp-budget-queue",
        &smtp_budget_queue(&names.queue),
    ]);
    let first = spec.spawn();
    first.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..N).await;

    // Alone, the worker holds every token and opens that many connections, no more.
    smtp.wait_for_count(60, Duration::from_secs(30)).await;
    assert_eq!(slots(&[&first]).await, vec![BUDGET]);
    assert_eq!(
        smtp.connections().await.peak,
        BUDGET,
        "the whole budget, used"
    );

    // Two more join: the budget is split, never exceeded.
    let second = spec.spawn();
    let third = spec.spawn();
    second.wait_ready(Duration::from_secs(30)).await;
    third.wait_ready(Duration::from_secs(30)).await;
    let shared = eventually(
        Duration::from_secs(10),
        "the budget split three ways",
        || {
            let workers = [&first, &second, &third];
            async move {
                let now = slots(&workers).await;
                now.iter().all(|s| *s == BUDGET / 3).then_some(now)
            }
        },
    )
    .await;
    println!("three workers hold {shared:?} of {BUDGET} connections");
    let sent_before = smtp.count().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let connections = smtp.connections().await;
    assert!(
        connections.peak <= BUDGET,
        "{connections:?} with a budget of {BUDGET}"
    );
    for worker in [&second, &third] {
        assert!(
            worker.metric("mailpipe_jobs_sent_total").await > 0.0,
            "every worker sends with its share: {}",
            worker.output()
        );
    }
    assert!(smtp.count().await > sent_before);

    // One stops; the two left take its tokens.
    let mut first = first;
    first.signal(nix::sys::signal::Signal::SIGTERM);
    first.wait_exit(Duration::from_secs(30));
    eventually(
        Duration::from_secs(10),
        "the others take the freed tokens",
        || {
            let workers = [&second, &third];
            async move { (slots(&workers).await == vec![BUDGET / 2, BUDGET / 2]).then_some(()) }
        },
    )
    .await;
    smtp.reset_peak().await;
    let quiet = Quiet {
        url: SHARED_URL,
        plan: names.plan(&TEST_RETRY),
        workers: vec![&second, &third],
    };
    let tally = smtp
        .settled_tally(&run, N, Duration::from_secs(60), &quiet)
        .await;
    assert_eq!(
        tally,
        Tally::EXACT,
        "no deduplication: a redelivery would show"
    );
    let connections = smtp.connections().await;
    assert!(connections.peak <= BUDGET, "{connections:?}");
    let _ = topology;
}

#[tokio::test]
async fn a_killed_worker_s_tokens_go_to_the_others() {
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let names = Names::new("budgetkill");
    let _topology = pipeline(&names).await;
    let spec = WorkerSpec::new(SHARED_URL, &names, smtp.port).args(&[
        "--smtp-pool-size",
        &BUDGET.to_string(),
        "--smtp-budget-queue",
        &smtp_budget_queue(&names.queue),
    ]);
    let mut first = spec.spawn();
    let second = spec.spawn();
    first.wait_ready(Duration::from_secs(30)).await;
    second.wait_ready(Duration::from_secs(30)).await;
    eventually(Duration::from_secs(10), "an even split", || {
        let workers = [&first, &second];
        async move { (slots(&workers).await == vec![BUDGET / 2, BUDGET / 2]).then_some(()) }
    })
    .await;
    first.kill();
    eventually(
        Duration::from_secs(10),
        "the survivor holds the budget",
        || {
            let second = &second;
            async move { (slots(&[second]).await == vec![BUDGET]).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        amqp::ready(SHARED_URL, &smtp_budget_queue(&names.queue)).await,
        0,
        "every token held by the survivor"
    );
}
