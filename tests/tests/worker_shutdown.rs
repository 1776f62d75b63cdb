//! Stopping the worker never loses a job: SIGTERM drains in-flight sends and acks them;
//! SIGKILL leaves unacked jobs to the broker, and with deduplication on, the only
//! duplicates are jobs that were in flight at the instant of a kill.

use std::collections::BTreeSet;
use std::time::Duration;

use mailpipe_contract::naming::headers;
use mailpipe_contract::RetryPolicy;
use mailpipe_tests::amqp::{self, Names, SHARED_URL};
use mailpipe_tests::jobs::{self, Tally};
use mailpipe_tests::proxy::{Mode, Proxy};
use mailpipe_tests::quiet::Quiet;
use mailpipe_tests::redis_server::SHARED_URL as REDIS;
use mailpipe_tests::smtp::{SmtpOptions, SmtpServer};
use mailpipe_tests::worker::{Worker, WorkerSpec, TEST_RETRY};
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
    let quiet = Quiet {
        url: SHARED_URL,
        plan: names.plan(&TEST_RETRY),
        workers: vec![&second],
    };
    let result = smtp
        .settled_tally(&run, N, Duration::from_secs(60), &quiet)
        .await;
    println!(
        "SIGTERM run: lost {}, duplicated {}",
        result.lost, result.duplicated
    );
    assert_eq!(result, Tally::EXACT);
    assert_eq!(amqp::ready(SHARED_URL, &names.queue).await, 0);
    amqp::delete_plan(SHARED_URL, &names.plan(&TEST_RETRY)).await;
}

/// What a run with kills came to.
struct Killed {
    tally: Tally,
    /// Per kill, what the broker counted as delivered and not settled, read while the worker
    /// was frozen with SIGSTOP just before the SIGKILL: the jobs whose fate was undecided.
    in_flight: Vec<u64>,
    /// With deduplication: the job numbers the SMTP server had accepted but the store had
    /// not recorded at a kill (the 250-to-record window), the only jobs that may repeat,
    /// with the number of kills that found each in that window.
    unrecorded: std::collections::BTreeMap<usize, usize>,
    /// How often each job arrived.
    counts: Vec<usize>,
}

/// Job numbers of `run` whose send the store recorded under `prefix`.
fn recorded(prefix: &str, run: &str) -> BTreeSet<usize> {
    let out = std::process::Command::new("redis-cli")
        .args(["--scan", "--pattern", &format!("{prefix}:sent:{run}-*")])
        .output()
        .expect("redis-cli runs (apt-get install -y redis-server)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|key| key.rsplit_once('-')?.1.parse().ok())
        .collect()
}

/// Kills the worker `kills` times with SIGKILL mid-run, restarting it each time.
async fn run_with_kills(label: &str, dedup: bool, kills: usize) -> Killed {
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
    let prefix = unique("mailpipe-test");
    if dedup {
        spec = spec
            .env("MAILPIPE_REDIS_URL", REDIS)
            .args(&["--idempotency-prefix", &prefix]);
    }
    let mut worker: Worker = spec.spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..N).await;

    let mut in_flight_at_kills = Vec::new();
    let mut unrecorded = std::collections::BTreeMap::new();
    for kill in 0..kills {
        let target = (kill + 1) * N / (kills + 2);
        smtp.wait_for_count(target, Duration::from_secs(60)).await;
        worker.signal(Signal::SIGSTOP);
        let unacked = amqp::unacked(None, &names.queue);
        if dedup {
            // Let the server finish what the frozen worker had already handed over.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let stored = recorded(&prefix, &run);
            let received: BTreeSet<usize> = smtp
                .messages()
                .await
                .iter()
                .filter_map(|m| jobs::number_in_message(&m.data, &run))
                .collect();
            for job in received.difference(&stored) {
                *unrecorded.entry(*job).or_insert(0) += 1;
            }
        }
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
    let quiet = Quiet {
        url: SHARED_URL,
        plan: names.plan(&TEST_RETRY),
        workers: vec![&worker],
    };
    quiet.wait(Duration::from_secs(60)).await;
    let tally = smtp.tally(&run, N).await;
    let mut counts = vec![0; N];
    for message in smtp.messages().await {
        if let Some(n) = jobs::number_in_message(&message.data, &run) {
            counts[n] += 1;
        }
    }
    amqp::delete_plan(SHARED_URL, &names.plan(&TEST_RETRY)).await;
    Killed {
        tally,
        in_flight: in_flight_at_kills,
        unrecorded,
        counts,
    }
}

#[tokio::test]
async fn kill_9_with_deduplication_repeats_only_jobs_accepted_but_not_yet_recorded() {
    let killed = run_with_kills("kill9dedup", true, 3).await;
    let repeated: BTreeSet<usize> = (0..killed.counts.len())
        .filter(|n| killed.counts[*n] > 1)
        .collect();
    println!(
        "kill -9 x{} with deduplication: lost {}, duplicated {} (jobs {repeated:?}); accepted but unrecorded at the kills: {:?}; in flight at each kill {:?}",
        killed.in_flight.len(),
        killed.tally.lost,
        killed.tally.duplicated,
        killed.unrecorded,
        killed.in_flight
    );
    assert_eq!(killed.tally.lost, 0, "nothing lost");
    assert_eq!(killed.tally.foreign, 0);
    // A job repeats only as often as kills caught it between the server's 250 and the
    // record (a redelivered copy can be caught again by the next kill).
    for (job, count) in killed.counts.iter().enumerate() {
        let windows = killed.unrecorded.get(&job).copied().unwrap_or(0);
        assert!(
            *count <= 1 + windows,
            "job {job} arrived {count} times but was in the 250-to-record window at {windows} kills; deduplication must stop every other repeat (windows {:?})",
            killed.unrecorded
        );
    }
}

#[tokio::test]
async fn kill_9_without_deduplication_still_loses_nothing() {
    let killed = run_with_kills("kill9plain", false, 2).await;
    println!(
        "kill -9 x{} without deduplication: lost {}, duplicated {}, in flight at each kill {:?}",
        killed.in_flight.len(),
        killed.tally.lost,
        killed.tally.duplicated,
        killed.in_flight
    );
    assert_eq!(killed.tally.lost, 0, "nothing lost");
    assert!(killed.tally.duplicated as u64 <= killed.in_flight.iter().sum::<u64>());
}

/// The drain deadline holds however the SMTP server hangs: before its greeting for new
/// connections (the dependency watcher's probe among them) and mid-transaction for the
/// connections that were open. Scale-down and rollouts count on it.
#[tokio::test]
async fn the_drain_deadline_holds_against_a_server_that_hangs() {
    const N: usize = 300;
    let smtp = SmtpServer::start(SmtpOptions {
        delay_ms: 50,
        ..SmtpOptions::default()
    })
    .await;
    let proxy = Proxy::start(smtp.port).await;
    let names = Names::new("hang");
    let spec = WorkerSpec::with_defaults(SHARED_URL, &names, proxy.port).args(&[
        "--shutdown-timeout",
        "5s",
        "--concurrency",
        "4",
    ]);
    let mut worker = spec.spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..N).await;
    smtp.wait_for_count(20, Duration::from_secs(30)).await;

    // Cut everything: the worker marks the server down and its watcher starts probing.
    proxy.set(Mode::Reset);
    worker.wait_unready(Duration::from_secs(15)).await;
    // Now every new connection hangs before the greeting: the next probe hangs (up to
    // twice the 30 s command timeout).
    proxy.set(Mode::Hang);
    tokio::time::sleep(Duration::from_secs(4)).await;
    // A message whose final dot went out just before the cut may have been stored by the
    // server without the worker hearing the 250: it is retried (its outcome is unknown,
    // counted), and it is the one kind of repeat this run may show.
    let unknown = worker.metric("mailpipe_smtp_outcome_unknown_total").await as usize;
    let stopped = std::time::Instant::now();
    worker.signal(Signal::SIGTERM);
    let status = worker.wait_exit(Duration::from_secs(60));
    let took = stopped.elapsed();
    assert!(status.success(), "{status:?}\n{}", worker.output());
    assert!(
        took < Duration::from_secs(8),
        "the 5 s drain deadline was not kept: exited after {took:?}\n{}",
        worker.output()
    );

    proxy.set(Mode::Pass);
    let second = spec.spawn();
    second.wait_ready(Duration::from_secs(30)).await;
    let quiet = Quiet {
        url: SHARED_URL,
        plan: names.plan(&RetryPolicy::default()),
        workers: vec![&second],
    };
    let result = smtp
        .settled_tally(&run, N, Duration::from_secs(60), &quiet)
        .await;
    assert_eq!(
        (result.lost, result.foreign),
        (0, 0),
        "nothing lost: {result:?}"
    );
    assert!(
        result.duplicated <= unknown,
        "only messages whose outcome the cut made unknown repeat: {result:?}, {unknown} unknown"
    );
    amqp::delete_plan(SHARED_URL, &names.plan(&RetryPolicy::default())).await;
}

/// The `given_back=N` figure of the worker's drain log line.
fn given_back(output: &str) -> usize {
    output
        .lines()
        .find(|l| l.contains("finishing the jobs that fit the drain deadline"))
        .and_then(|l| l.split("given_back=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no drain line in the output:\n{output}"))
}

/// A scale-down repeats nothing: SIGTERM cancels the consumer, and every job the worker
/// already holds (in flight and prefetched) is sent and acked by it, none given back to be
/// redelivered elsewhere.
#[tokio::test]
async fn sigterm_sends_every_held_job_and_gives_none_back() {
    const N: usize = 300;
    const PREFETCH: u64 = 40;
    let smtp = SmtpServer::start(SmtpOptions {
        delay_ms: 100,
        ..SmtpOptions::default()
    })
    .await;
    let names = Names::new("heldsent");
    let spec = WorkerSpec::new(SHARED_URL, &names, smtp.port).args(&[
        "--concurrency",
        "8",
        "--prefetch",
        "40",
    ]);
    let mut worker = spec.spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..N).await;
    smtp.wait_for_count(40, Duration::from_secs(30)).await;
    assert_eq!(
        amqp::unacked(None, &names.queue),
        PREFETCH,
        "the broker pushed a full prefetch"
    );
    worker.signal(Signal::SIGTERM);
    let status = worker.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", worker.output());
    let output = worker.output();
    assert_eq!(given_back(&output), 0, "{output}");
    assert!(output.contains("abandoned=0"), "{output}");
    let by_first = smtp.count().await;
    assert_eq!(
        amqp::ready(SHARED_URL, &names.queue).await as usize,
        N - by_first,
        "what the first worker did not send is still in the queue, none of it in flight"
    );

    let second = spec.spawn();
    second.wait_ready(Duration::from_secs(30)).await;
    let quiet = Quiet {
        url: SHARED_URL,
        plan: names.plan(&TEST_RETRY),
        workers: vec![&second],
    };
    let result = smtp
        .settled_tally(&run, N, Duration::from_secs(60), &quiet)
        .await;
    assert_eq!(result, Tally::EXACT);
    assert_eq!(
        second.metric("mailpipe_jobs_redelivered_total").await,
        0.0,
        "no job came back as a redelivery"
    );
    amqp::delete_plan(SHARED_URL, &names.plan(&TEST_RETRY)).await;
}

/// With sends too slow for everything held to finish before the drain deadline, SIGTERM
/// keeps what fits at the send time the worker has shown and gives the rest back at once,
/// for the other replicas, instead of holding it until the deadline.
#[tokio::test]
async fn sigterm_gives_back_at_once_the_held_jobs_the_deadline_cannot_fit() {
    const N: usize = 60;
    let smtp = SmtpServer::start(SmtpOptions {
        delay_ms: 4000,
        ..SmtpOptions::default()
    })
    .await;
    let names = Names::new("cancel");
    // The default drain deadline (25 s): 24 s of sends at 4 s each is 6 rounds of 2 slots.
    let mut worker = WorkerSpec::with_defaults(SHARED_URL, &names, smtp.port)
        .args(&["--concurrency", "2", "--prefetch", "50"])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let run = unique("run");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..N).await;
    // Two sends done (the pace is known), the next two under way.
    smtp.wait_for_count(2, Duration::from_secs(20)).await;
    eventually(Duration::from_secs(10), "2 more jobs sending", || async {
        (worker.metric("mailpipe_jobs_in_flight").await == 2.0).then_some(())
    })
    .await;
    assert_eq!(amqp::unacked(None, &names.queue), 50, "a full prefetch");
    let stopped = std::time::Instant::now();
    worker.signal(Signal::SIGTERM);
    // 24 s / 4.0x s = 5 whole rounds of 2 slots: the 2 in flight and 8 more are kept, the
    // rest given back at once (within a few seconds on a busy machine, not after the 24).
    let mut kept = 0;
    let gave_back = std::time::Instant::now();
    while gave_back.elapsed() < Duration::from_secs(5) {
        kept = amqp::unacked(None, &names.queue);
        if kept <= 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        kept,
        10,
        "the jobs that fit are kept, the rest given back\n{}",
        worker.output()
    );
    assert!(worker.is_running(), "still draining");
    assert_eq!(
        amqp::ready(SHARED_URL, &names.queue).await,
        (N - 2 - 10) as u32
    );
    let status = worker.wait_exit(Duration::from_secs(40));
    let took = stopped.elapsed();
    assert!(status.success(), "{status:?}\n{}", worker.output());
    assert!(
        took < Duration::from_secs(25),
        "exited within the drain deadline: {took:?}"
    );
    assert_eq!(given_back(&worker.output()), 40, "{}", worker.output());
    smtp.wait_for_count(12, Duration::from_secs(10)).await;
    assert_eq!(
        smtp.count().await,
        12,
        "2 before the stop, 10 held and sent"
    );
    assert_eq!(amqp::ready(SHARED_URL, &names.queue).await, (N - 12) as u32);
    amqp::delete_plan(SHARED_URL, &names.plan(&RetryPolicy::default())).await;
}

/// During an SMTP outage nothing held could be sent: SIGTERM gives it all back at once
/// (attempts unspent) and the worker exits without waiting out its deadline.
#[tokio::test]
async fn sigterm_during_an_smtp_outage_gives_held_jobs_back_at_once() {
    const N: usize = 30;
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let proxy = Proxy::start(smtp.port).await;
    let names = Names::new("outstop");
    let mut worker = WorkerSpec::new(SHARED_URL, &names, proxy.port)
        .args(&["--concurrency", "4", "--prefetch", "20"])
        .spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    proxy.set(Mode::Reset);
    let run = unique("run");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..N).await;
    // The first jobs find the server down and wait for it, holding their deliveries.
    worker.wait_unready(Duration::from_secs(15)).await;
    eventually(Duration::from_secs(10), "jobs held", || async {
        (amqp::unacked(None, &names.queue) > 0).then_some(())
    })
    .await;
    let stopped = std::time::Instant::now();
    worker.signal(Signal::SIGTERM);
    let status = worker.wait_exit(Duration::from_secs(30));
    let took = stopped.elapsed();
    assert!(status.success(), "{status:?}\n{}", worker.output());
    assert!(
        took < Duration::from_secs(5),
        "no wait for a server that is down: {took:?}\n{}",
        worker.output()
    );
    assert_eq!(smtp.count().await, 0);
    assert_eq!(amqp::ready(SHARED_URL, &names.queue).await, N as u32);
    let got = amqp::take_all(SHARED_URL, &names.queue).await;
    assert!(
        got.iter()
            .all(|m| m.headers.get(headers::ATTEMPT).is_none_or(|a| a == "1")),
        "no attempt spent"
    );
    amqp::delete_plan(SHARED_URL, &names.plan(&TEST_RETRY)).await;
}
