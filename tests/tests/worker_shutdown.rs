//! Stopping the worker never loses a job: SIGTERM drains in-flight sends and acks them;
//! SIGKILL leaves unacked jobs to the broker, and with deduplication on, the only
//! duplicates are jobs that were in flight at the instant of a kill.

use std::time::Duration;

use mailpipe_contract::RetryPolicy;
use mailpipe_tests::amqp::{self, Names, SHARED_URL};
use mailpipe_tests::jobs::Tally;
use mailpipe_tests::redis_server::SHARED_URL as REDIS;
use mailpipe_tests::smtp::{SmtpOptions, SmtpServer};
use mailpipe_tests::worker::{Worker, WorkerSpec};
use mailpipe_tests::{eventually, unique};
use nix::sys::signal::Signal;

#[tokio::test]
async fn sigterm_mid_run_loses_nothing_and_sends_nothing_twice() {
    const N: usize = 200;
    let smtp = SmtpServer::start(SmtpOptions {
        delay_ms: 100,
        ..SmtpOptions::default()
    })
    .await;
    let names = Names::new("sigterm");
    // No deduplication: a clean drain alone must prevent duplicates.
    let spec = WorkerSpec::new(SHARED_URL, &names, smtp.port).args(&["--concurrency", "8"]);
    let mut worker = spec.spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..N).await;

    smtp.wait_for_count(40, Duration::from_secs(30)).await;
    let in_flight = worker.metric("mailpipe_jobs_in_flight").await;
    worker.signal(Signal::SIGTERM);
    let status = worker.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "clean exit after SIGTERM: {status:?}\n{}",
        worker.output()
    );
    assert!(
        worker.output().contains("abandoned=0"),
        "{}",
        worker.output()
    );
    let at_stop = smtp.count().await;
    println!("in flight at SIGTERM: {in_flight}; delivered by the first worker: {at_stop}");

    let second = spec.spawn();
    second.wait_ready(Duration::from_secs(30)).await;
    let result = smtp.settled_tally(&run, N, Duration::from_secs(60)).await;
    println!(
        "SIGTERM run: lost {}, duplicated {}",
        result.lost, result.duplicated
    );
    assert_eq!(result, Tally::EXACT);
    assert_eq!(amqp::ready(SHARED_URL, &names.queue).await, 0);
    amqp::delete_plan(SHARED_URL, &names.plan(&RetryPolicy::default())).await;
}

/// Kills the worker `kills` times with SIGKILL mid-run, restarting it each time, and
/// returns (tally, in-flight counts at each kill). "In flight at a kill" is what the broker
/// counts as delivered to the worker and not yet settled, read while the worker is frozen
/// with SIGSTOP just before the SIGKILL: the jobs whose fate was undecided at that instant.
async fn run_with_kills(label: &str, dedup: bool, kills: usize) -> (Tally, Vec<u64>) {
    const N: usize = 300;
    let smtp = SmtpServer::start(SmtpOptions {
        delay_ms: 30,
        ..SmtpOptions::default()
    })
    .await;
    let names = Names::new(label);
    let mut spec = WorkerSpec::new(SHARED_URL, &names, smtp.port).args(&[
        "--concurrency",
        "8",
        "--prefetch",
        "8",
    ]);
    if dedup {
        spec = spec
            .env("MAILPIPE_REDIS_URL", REDIS)
            .args(&["--idempotency-prefix", &unique("mailpipe-test")]);
    }
    let mut worker: Worker = spec.spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..N).await;

    let mut in_flight_at_kills = Vec::new();
    for kill in 0..kills {
        let target = (kill + 1) * N / (kills + 2);
        smtp.wait_for_count(target, Duration::from_secs(60)).await;
        worker.signal(Signal::SIGSTOP);
        let unacked = amqp::unacked(None, &names.queue);
        worker.kill();
        in_flight_at_kills.push(unacked);
        worker = spec.spawn();
        worker.wait_ready(Duration::from_secs(30)).await;
    }
    smtp.wait_for_count(N, Duration::from_secs(90)).await;
    eventually(
        Duration::from_secs(30),
        "the work queue to drain",
        || async {
            let idle = worker.metric("mailpipe_jobs_in_flight").await == 0.0;
            (idle && amqp::ready(SHARED_URL, &names.queue).await == 0).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let result = smtp.tally(&run, N).await;
    amqp::delete_plan(SHARED_URL, &names.plan(&RetryPolicy::default())).await;
    (result, in_flight_at_kills)
}

#[tokio::test]
async fn kill_9_with_deduplication_loses_nothing_and_duplicates_only_jobs_in_flight_at_a_kill() {
    let (result, in_flight) = run_with_kills("kill9dedup", true, 3).await;
    let bound: u64 = in_flight.iter().sum();
    println!(
        "kill -9 x{} with deduplication: lost {}, duplicated {}, in flight at each kill {:?} (sum {bound})",
        in_flight.len(),
        result.lost,
        result.duplicated,
        in_flight
    );
    assert_eq!(result.lost, 0, "nothing lost");
    assert_eq!(result.foreign, 0);
    assert!(
        result.duplicated as u64 <= bound,
        "duplicates ({}) must be among the jobs in flight at a kill ({bound})",
        result.duplicated
    );
}

#[tokio::test]
async fn kill_9_without_deduplication_still_loses_nothing() {
    let (result, in_flight) = run_with_kills("kill9plain", false, 2).await;
    println!(
        "kill -9 x{} without deduplication: lost {}, duplicated {}, in flight at each kill {:?}",
        in_flight.len(),
        result.lost,
        result.duplicated,
        in_flight
    );
    assert_eq!(result.lost, 0, "nothing lost");
    assert!(result.duplicated as u64 <= in_flight.iter().sum::<u64>());
}
