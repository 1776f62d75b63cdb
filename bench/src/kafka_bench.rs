//! The worker against Kafka (`scripts/bench.sh kafka [JOBS]`): one worker process consuming a
//! prefilled 3-partition topic on a Tansu broker of the benchmark's own, sending to the same
//! fast SMTP sink as the RabbitMQ benchmark, beside the raw consume rate of the same broker
//! measured in the same run: a plain rdkafka consumer in a group of its own, librdkafka's
//! default prefetch (64 MiB), each record's offset stored as the worker stores them, no other
//! work. Rates run from the first record (or message) to the last, so the group's join is
//! not counted. Also the worker's CPU per job and peak RSS, and the broker's CPU per job over
//! the worker's run. Medians of `RUNS` runs.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mailpipe_tests::kafka::KafkaBroker;
use mailpipe_tests::unique;
use mailpipe_tests::worker::WorkerSpec;
use nix::sys::signal::Signal;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::sink::SinkStats;
use crate::{job, median, RUNS};

const PARTITIONS: i32 = 3;

/// A topic of its own on `broker`, holding `n` jobs.
async fn prefilled(broker: &KafkaBroker, prefix: &str, n: usize) -> String {
    let topic = unique(prefix);
    broker.create_topic(&topic, PARTITIONS).await;
    broker.produce(&topic, PARTITIONS, (0..n).map(job)).await;
    topic
}

/// Raw consume: a group of its own reads the `n` records of `topic`, storing each offset.
fn raw_consume(bootstrap: &str, topic: &str, n: usize) -> anyhow::Result<f64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("bench-raw-group"))
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut started = None;
    let mut read = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    while read < n {
        anyhow::ensure!(Instant::now() < deadline, "only {read} of {n} records read");
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        started.get_or_insert_with(Instant::now);
        let mut next = TopicPartitionList::new();
        next.add_partition_offset(
            message.topic(),
            message.partition(),
            Offset::Offset(message.offset() + 1),
        )?;
        consumer.store_offsets(&next)?;
        read += 1;
    }
    let started = started.expect("records were read");
    Ok((n - 1) as f64 / started.elapsed().as_secs_f64())
}

struct WorkerRun {
    jobs_per_second: f64,
    cpu_us_per_job: f64,
    peak_rss_mib: f64,
    broker_us_per_job: f64,
}

/// One worker (16 concurrent jobs, 16 SMTP connections) on a prefilled topic.
async fn worker(
    broker: &KafkaBroker,
    port: u16,
    stats: &SinkStats,
    n: usize,
) -> anyhow::Result<WorkerRun> {
    let topic = prefilled(broker, "bench-worker", n).await;
    stats.reset();
    let broker_pid = broker.pid().expect("the broker runs");
    let broker_before = mailpipe_bench::procfs::usage(broker_pid)?.cpu_seconds;
    let mut worker = WorkerSpec::kafka(&broker.bootstrap(), &topic, &unique("bench-group"), port)
        .args(&[
            "--concurrency",
            "16",
            "--smtp-pool-size",
            "16",
            "--log",
            "warn",
        ])
        .spawn();
    let deadline = Instant::now() + Duration::from_secs(600);
    while (stats.messages.load(Ordering::SeqCst) as usize) < n {
        anyhow::ensure!(Instant::now() < deadline, "the worker did not finish");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let broker_after = mailpipe_bench::procfs::usage(broker_pid)?.cpu_seconds;
    let (first, last) = stats
        .window
        .lock()
        .expect("lock")
        .expect("messages arrived");
    let usage = mailpipe_bench::procfs::usage(worker.pid())?;
    worker.signal(Signal::SIGTERM);
    worker.wait_exit(Duration::from_secs(30));
    Ok(WorkerRun {
        jobs_per_second: (n - 1) as f64 / (last - first).as_secs_f64(),
        cpu_us_per_job: usage.cpu_seconds * 1e6 / n as f64,
        peak_rss_mib: usage.peak_rss_kib as f64 / 1024.0,
        broker_us_per_job: (broker_after - broker_before) * 1e6 / n as f64,
    })
}

/// The Kafka benchmark; prints its figures.
pub async fn run(port: u16, stats: &SinkStats, n: usize) -> anyhow::Result<()> {
    let broker = KafkaBroker::start().await;
    println!(
        "worker throughput on Kafka (Tansu 0.6, SQLite engine, {PARTITIONS} partitions): {n} jobs of {} bytes per run, {RUNS} runs, medians",
        job(0).len()
    );
    let (mut raw, mut rates, mut cpu, mut rss, mut broker_cpu) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 1..=RUNS {
        let topic = prefilled(&broker, "bench-raw", n).await;
        let bootstrap = broker.bootstrap();
        let r = tokio::task::spawn_blocking(move || raw_consume(&bootstrap, &topic, n)).await??;
        let w = worker(&broker, port, stats, n).await?;
        println!(
            "run {run}: raw consume {r:.0}/s, worker {:.0} jobs/s, {:.0} us CPU/job (broker {:.0}), peak RSS {:.1} MiB",
            w.jobs_per_second, w.cpu_us_per_job, w.broker_us_per_job, w.peak_rss_mib
        );
        raw.push(r);
        rates.push(w.jobs_per_second);
        cpu.push(w.cpu_us_per_job);
        rss.push(w.peak_rss_mib);
        broker_cpu.push(w.broker_us_per_job);
    }
    let (r, w) = (median(raw), median(rates));
    println!(
        "median raw Kafka consume:           {r:>8.0} records/s (rdkafka, offsets stored, no work)"
    );
    println!(
        "median worker (16 conc, 16 conns): {w:>8.0} jobs/s ({:.0}% of the raw consume rate)",
        100.0 * w / r
    );
    println!(
        "median worker CPU per job:          {:>8.0} us (user+sys)",
        median(cpu)
    );
    println!(
        "median broker CPU per job:          {:>8.0} us (tansu, over the worker's run)",
        median(broker_cpu)
    );
    println!(
        "worker peak RSS (max of runs):      {:>8.1} MiB",
        rss.iter().cloned().fold(0.0, f64::max)
    );
    Ok(())
}
