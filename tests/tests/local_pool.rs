//! The local mode's actuator: real worker processes supervised by the process pool, against
//! the shared RabbitMQ and an SMTP server of the test's own. Scaling up starts workers that
//! become ready and consume; scaling down SIGTERMs the newest, which drain and exit; a worker
//! killed with SIGKILL is restarted and nothing it held is lost.

use std::sync::Arc;
use std::time::Duration;

use mailpipe_operator::scaling::actuator::{Actuator, Workload};
use mailpipe_operator::scaling::process_pool::{PoolStatus, ProcessPool, WorkerCommand};
use mailpipe_tests::amqp::{self, Names, SHARED_URL};
use mailpipe_tests::eventually;
use mailpipe_tests::smtp::{SmtpOptions, SmtpServer};
use mailpipe_tests::worker::WorkerSpec;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[tokio::test]
async fn the_pool_starts_stops_and_restarts_real_workers_and_loses_nothing() {
    const N: usize = 300;
    let smtp = SmtpServer::start(SmtpOptions {
        delay_ms: 50,
        ..SmtpOptions::default()
    })
    .await;
    let names = Names::new("localpool");
    let (args, env) = WorkerSpec::with_defaults(SHARED_URL, &names, smtp.port)
        .args(&["--concurrency", "4"])
        .into_parts();
    let command = WorkerCommand {
        program: mailpipe_tests::worker::binary(),
        args,
        env,
        stop_within: Duration::from_secs(30),
        logs: None,
    };
    let workload = Workload {
        namespace: "local".into(),
        name: names.queue.clone(),
    };
    let pool = Arc::new(ProcessPool::default());
    assert_eq!(
        pool.replicas(&workload).await.unwrap(),
        None,
        "not supervised yet"
    );
    pool.add(workload.clone(), command);
    let status = || pool.status(&workload).expect("supervised");
    assert_eq!(status(), PoolStatus::default());

    // Up: two workers, ready, each a consumer of the queue.
    pool.scale(&workload, 2).await.unwrap();
    eventually(Duration::from_secs(60), "two ready workers", || async {
        let now = status();
        (now.running == 2 && now.ready == 2).then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "two consumers", || async {
        (amqp::consumers(SHARED_URL, &names.queue).await == 2).then_some(())
    })
    .await;

    // Work, and one worker killed in the middle of it: restarted, nothing lost.
    let run = mailpipe_tests::unique("localpool");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..N).await;
    smtp.wait_for_count(20, Duration::from_secs(30)).await;
    let pids = pool.pids(&workload);
    assert_eq!(pids.len(), 2);
    kill(Pid::from_raw(pids[0] as i32), Signal::SIGKILL).expect("killed");
    eventually(Duration::from_secs(30), "a restarted worker", || async {
        let now = status();
        let restarted = pool.pids(&workload).iter().any(|p| !pids.contains(p));
        (now.restarts == 1 && now.ready == 2 && restarted).then_some(())
    })
    .await;
    smtp.wait_for_count(N, Duration::from_secs(60)).await;
    // Without deduplication a SIGKILL may repeat a job the worker sent but had not acked;
    // it never loses one.
    let tally = smtp.tally(&run, N).await;
    assert_eq!(
        (tally.lost, tally.foreign),
        (0, 0),
        "nothing lost: {tally:?}"
    );

    // Down: the newest is told to stop, drains and exits; the other stays.
    let before = pool.pids(&workload);
    pool.scale(&workload, 1).await.unwrap();
    assert_eq!(status().desired, 1);
    eventually(Duration::from_secs(30), "one worker left", || async {
        let now = status();
        (now.running == 1 && now.stopping == 0 && pool.pids(&workload).len() == 1).then_some(())
    })
    .await;
    let left = pool.pids(&workload);
    assert!(before.contains(&left[0]), "the older one stays");

    // The pool's shutdown stops the last one.
    pool.shutdown().await;
    assert!(pool.pids(&workload).is_empty());
    eventually(Duration::from_secs(10), "no consumer", || async {
        (amqp::consumers(SHARED_URL, &names.queue).await == 0).then_some(())
    })
    .await;
    amqp::delete_plan(
        SHARED_URL,
        &names.plan(&mailpipe_contract::RetryPolicy::default()),
    )
    .await;
}
