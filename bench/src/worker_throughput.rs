//! Benchmark: jobs per second of one worker process against a fast local SMTP sink over
//! 16 connections (it offers PIPELINING), beside three honest ceilings measured in the same
//! run on the same machine: the raw AMQP consume+ack rate (lapin, no work, prefetch 128 and
//! `multiple` acks every 32 deliveries: the fastest way a client drains a queue), the raw
//! SMTP rate over 16 reused connections (a plain pipelining SMTP client on TCP, no lettre
//! and none of the worker's code, pre-built messages), and the two joined end to end (each
//! delivery's pre-built message sent, then `multiple` acks over contiguous done tags: the
//! most broker, sink and a client with no work of its own reach together on these cores).
//! Also the worker's CPU microseconds per job (user+sys
//! over jobs), its peak RSS, and the broker's and the sink's CPU per job over the worker's
//! run (from /proc), so the report shows where the machine's time went; for reference, the
//! worker's own mailer alone and lettre's pool. Each figure is the median of `RUNS` runs,
//! the parts of a run interleaved.
//!
//! Run: `scripts/bench.sh [JOBS]` (release build; RabbitMQ on 127.0.0.1:5672);
//! `scripts/bench.sh latency` measures the single-job latency alone; `scripts/bench.sh
//! kafka [JOBS]` the worker against Kafka (`kafka_bench`).
//! `MAILPIPE_BENCH_PERF=FILE`: a `perf record` (cpu-clock, call graphs) of the worker in the
//! last run, for `perf report -i FILE`.
#![forbid(unsafe_code)]

mod kafka_bench;
mod sink;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use mailpipe_contract::RetryPolicy;
use mailpipe_tests::amqp::{self, Names, SHARED_URL};
use mailpipe_tests::worker::WorkerSpec;
use nix::sys::signal::Signal;

const RUNS: usize = 3;
const CONNECTIONS: usize = 16;

/// A job of about 1.5 KB: about 1 KiB of HTML body plus text and metadata.
fn job(n: usize) -> Vec<u8> {
    let paragraph =
        "<p>Thank you for your order. Your parcel is on its way and will arrive soon.</p>\n";
    let html = format!(
        "<html><body><h1>Order {n}</h1>\n{}</body></html>",
        paragraph.repeat(12)
    );
    serde_json::to_vec(&serde_json::json!({
        "id": format!("bench-{n}"),
        "to": [format!("Customer {n} <customer{n}@example.com>")],
        "subject": format!("Your order {n} has shipped"),
        "text": "Your order has shipped. Thank you for shopping with us. Track it any time from your account page; reply to this message if anything is wrong with the delivery address or the items.",
        "html": html,
        "headers": {"X-Campaign": "bench"},
    }))
    .expect("serializable")
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// Deliveries acknowledged by one `multiple` ack in the raw consume+ack ceiling.
const ACK_EVERY: usize = 32;

/// A queue (bound to a fanout exchange) prefilled with `n` jobs.
struct Prefilled {
    names: Names,
    connection: lapin::Connection,
    channel: lapin::Channel,
}

impl Prefilled {
    async fn new(n: usize) -> anyhow::Result<Prefilled> {
        let names = Names::new("bench_raw_amqp");
        let connection = amqp::connect(SHARED_URL).await;
        let channel = connection.create_channel().await?;
        channel
            .queue_declare(
                names.queue.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                names.exchange.as_str().into(),
                lapin::ExchangeKind::Fanout,
                Default::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                names.queue.as_str().into(),
                names.exchange.as_str().into(),
                "".into(),
                Default::default(),
                FieldTable::default(),
            )
            .await?;
        amqp::publish(SHARED_URL, &names.exchange, (0..n).map(job)).await;
        Ok(Prefilled {
            names,
            connection,
            channel,
        })
    }

    /// A consumer with a prefetch of 128.
    async fn consume(&self) -> anyhow::Result<lapin::Consumer> {
        self.channel
            .basic_qos(128, BasicQosOptions::default())
            .await?;
        Ok(self
            .channel
            .basic_consume(
                self.names.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?)
    }

    async fn delete(self) {
        let _ = self
            .channel
            .queue_delete(self.names.queue.as_str().into(), Default::default())
            .await;
        let _ = self
            .channel
            .exchange_delete(self.names.exchange.as_str().into(), Default::default())
            .await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// Raw consume+ack: prefill a queue with `n` jobs, then consume and ack them as fast as
/// lapin can (prefetch 128, a `multiple` ack every `ACK_EVERY` deliveries), no processing.
async fn raw_amqp(n: usize) -> anyhow::Result<f64> {
    let queue = Prefilled::new(n).await?;
    let mut consumer = queue.consume().await?;
    let started = Instant::now();
    for i in 1..=n {
        let delivery = consumer.next().await.expect("a delivery")?;
        if i % ACK_EVERY == 0 || i == n {
            delivery
                .acker
                .ack(BasicAckOptions { multiple: true })
                .await?;
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    queue.delete().await;
    Ok(rate)
}

/// Raw end to end: a consumer that carries jobs from the broker to the SMTP server with no
/// work of its own: prefetch 128, each delivery handed to one of 16 SMTP connections that
/// send a pre-built message with PIPELINING, and acks with `multiple` up to the highest tag
/// whose send and every earlier one's are done. No parsing, no MIME, no metrics, none of the
/// worker's guarantees beyond ack-after-250: the most the two servers and one client allow
/// together on this machine.
async fn raw_end_to_end(port: u16, stats: &sink::SinkStats, n: usize) -> anyhow::Result<f64> {
    use std::collections::BTreeMap;
    stats.reset();
    let queue = Prefilled::new(n).await?;
    let data = Arc::new(wire_message()?);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, lapin::Acker)>();
    let mut senders = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<lapin::message::Delivery>(16);
        senders.push(tx);
        let (data, done) = (data.clone(), done_tx.clone());
        tasks.push(tokio::spawn(async move {
            let mut smtp = RawSmtp::connect(port).await?;
            while let Some(delivery) = rx.recv().await {
                smtp.send(&data).await?;
                let _ = done.send((delivery.delivery_tag, delivery.acker));
            }
            anyhow::Ok(())
        }));
    }
    drop(done_tx);
    let mut consumer = queue.consume().await?;
    let started = Instant::now();
    let acks = tokio::spawn(async move {
        let (mut next, mut acked) = (1u64, 0usize);
        let mut done = BTreeMap::new();
        while acked < n {
            let Some((tag, acker)) = done_rx.recv().await else {
                break;
            };
            done.insert(tag, acker);
            while let Ok((tag, acker)) = done_rx.try_recv() {
                done.insert(tag, acker);
            }
            let mut last = None;
            while let Some(acker) = done.remove(&next) {
                last = Some(acker);
                next += 1;
                acked += 1;
            }
            if let Some(acker) = last {
                acker.ack(BasicAckOptions { multiple: true }).await?;
            }
        }
        anyhow::Ok(())
    });
    for i in 0..n {
        let delivery = consumer.next().await.expect("a delivery")?;
        senders[i % CONNECTIONS]
            .send(delivery)
            .await
            .map_err(|_| anyhow::anyhow!("an SMTP connection ended"))?;
    }
    acks.await??;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    drop(senders);
    for task in tasks {
        task.await??;
    }
    queue.delete().await;
    Ok(rate)
}

/// A plain SMTP client session on one connection, no library: EHLO once, then messages
/// with PIPELINING (MAIL, RCPT and DATA in one write, their three replies read, then the
/// message and its final dot in one write and its reply read).
struct RawSmtp {
    read: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    write: tokio::net::tcp::OwnedWriteHalf,
    line: String,
}

impl RawSmtp {
    async fn connect(port: u16) -> anyhow::Result<RawSmtp> {
        use tokio::io::AsyncWriteExt;
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        let mut session = RawSmtp {
            read: tokio::io::BufReader::new(read),
            write,
            line: String::new(),
        };
        session.reply().await?;
        session.write.write_all(b"EHLO bench\r\n").await?;
        session.reply().await?;
        Ok(session)
    }

    /// One reply (its last line: `250 ...`, not `250-...`).
    async fn reply(&mut self) -> anyhow::Result<()> {
        use tokio::io::AsyncBufReadExt;
        loop {
            self.line.clear();
            if self.read.read_line(&mut self.line).await? == 0 {
                anyhow::bail!("the sink closed the connection");
            }
            if self.line.as_bytes().get(3) != Some(&b'-') {
                return Ok(());
            }
        }
    }

    async fn quit(mut self) -> anyhow::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.write.write_all(b"QUIT\r\n").await?;
        self.reply().await
    }

    /// Sends `data` (the message as DATA content, with its final dot).
    async fn send(&mut self, data: &[u8]) -> anyhow::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.write
            .write_all(
                b"MAIL FROM:<bench@example.com>\r\nRCPT TO:<customer@example.com>\r\nDATA\r\n",
            )
            .await?;
        for _ in 0..3 {
            self.reply().await?;
        }
        self.write.write_all(data).await?;
        self.reply().await?;
        anyhow::ensure!(
            self.line.starts_with("250"),
            "the sink answered {:?}",
            self.line
        );
        Ok(())
    }
}

/// The pre-built message as DATA content, with its final dot (it has no line starting with
/// a dot to stuff).
fn wire_message() -> anyhow::Result<Vec<u8>> {
    let (_, mut data) = prebuilt()?;
    if !data.ends_with(b"\r\n") {
        data.extend_from_slice(b"\r\n");
    }
    data.extend_from_slice(b".\r\n");
    Ok(data)
}

/// A pre-built message like the worker builds from `job(0)`.
fn prebuilt() -> anyhow::Result<(lettre::address::Envelope, Vec<u8>)> {
    let message = lettre::Message::builder()
        .from("bench@example.com".parse()?)
        .to("customer@example.com".parse()?)
        .subject("Your order has shipped")
        .multipart(lettre::message::MultiPart::alternative_plain_html(
            "Your order has shipped.".to_string(),
            String::from_utf8(job(0))?,
        ))?;
    Ok((message.envelope().clone(), message.formatted()))
}

/// Sends `n` messages from 16 tasks through `send`, returning messages per second.
async fn over_16<F, Fut>(n: usize, send: F) -> anyhow::Result<f64>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let started = Instant::now();
    let per_task = n / CONNECTIONS;
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let send = send.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_task {
                send().await;
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    Ok((per_task * CONNECTIONS) as f64 / started.elapsed().as_secs_f64())
}

/// Raw SMTP: 16 plain TCP connections, each sending pre-built messages one after the other
/// with PIPELINING (MAIL, RCPT and DATA in one write, their three replies read, then the
/// message and its final dot in one write and its reply read), no library and none of the
/// worker's code: the ceiling of SMTP over 16 reused connections.
async fn raw_smtp(port: u16, stats: &sink::SinkStats, n: usize) -> anyhow::Result<f64> {
    stats.reset();
    let data = Arc::new(wire_message()?);
    let started = Instant::now();
    let per_task = n / CONNECTIONS;
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            let mut smtp = RawSmtp::connect(port).await?;
            for _ in 0..per_task {
                smtp.send(&data).await?;
            }
            smtp.quit().await
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok((per_task * CONNECTIONS) as f64 / started.elapsed().as_secs_f64())
}

/// SMTP through the worker's own mailer (its pool of 16 connections), no AMQP, no parsing
/// or rendering: what the worker's SMTP path costs over the raw ceiling.
async fn worker_mailer(port: u16, stats: &sink::SinkStats, n: usize) -> anyhow::Result<f64> {
    use mailpipe_worker::config::{SmtpConfig, TlsMode};
    use mailpipe_worker::mailer::{smtp::SmtpMailer, Mailer, Outgoing};
    stats.reset();
    let config = SmtpConfig {
        host: "127.0.0.1".into(),
        port,
        tls: TlsMode::None,
        ca_file: None,
        insecure_skip_verify: false,
        credentials: None,
        pool_size: CONNECTIONS as u32,
        budget_queue: None,
        rate_limit: None,
        timeout: Duration::from_secs(30),
        data_timeout: Duration::from_secs(600),
    };
    let mailer = Arc::new(SmtpMailer::new(
        &config,
        mailpipe_worker::metrics::Metrics::new(),
    )?);
    let (envelope, bytes) = prebuilt()?;
    let outgoing = Arc::new(Outgoing { envelope, bytes });
    over_16(n, move || {
        let (mailer, outgoing) = (mailer.clone(), outgoing.clone());
        async move {
            mailer.send(&outgoing).await.expect("the sink accepts");
        }
    })
    .await
}

/// The same through lettre's own pooled transport, for reference: its sockets have Nagle's
/// algorithm on, so each message waits for the server's delayed ACK.
async fn lettre_pool(port: u16, stats: &sink::SinkStats, n: usize) -> anyhow::Result<f64> {
    stats.reset();
    let transport: AsyncSmtpTransport<Tokio1Executor> =
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(port)
            .pool_config(PoolConfig::new().max_size(CONNECTIONS as u32))
            .build();
    let transport = Arc::new(transport);
    let (envelope, bytes) = prebuilt()?;
    let message = Arc::new((envelope, bytes));
    over_16(n, move || {
        let (transport, message) = (transport.clone(), message.clone());
        async move {
            transport
                .send_raw(&message.0, &message.1)
                .await
                .expect("the sink accepts");
        }
    })
    .await
}

struct WorkerRun {
    jobs_per_second: f64,
    cpu_us_per_job: f64,
    peak_rss_mib: f64,
    /// The broker's (every beam.smp) CPU per job over the worker's run.
    broker_us_per_job: f64,
    /// The sink's (this process's) CPU per job over the worker's run.
    sink_us_per_job: f64,
}

/// CPU seconds of every RabbitMQ node process on the machine (beam.smp).
fn broker_cpu_seconds() -> f64 {
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let is_beam = std::fs::read_to_string(entry.path().join("comm"))
            .is_ok_and(|comm| comm.trim() == "beam.smp");
        if is_beam {
            if let Ok(usage) = mailpipe_bench::procfs::usage(pid) {
                total += usage.cpu_seconds;
            }
        }
    }
    total
}

/// The worker: prefill the queue with `n` jobs, start one worker process (16 concurrent
/// jobs, 16 SMTP connections), and time from the first to the last message at the sink.
async fn worker(
    port: u16,
    stats: &sink::SinkStats,
    n: usize,
    profile: Option<&std::ffi::OsStr>,
) -> anyhow::Result<WorkerRun> {
    stats.reset();
    let names = Names::new("bench_worker");
    let spec = WorkerSpec::new(SHARED_URL, &names, port).args(&[
        "--concurrency",
        "16",
        "--smtp-pool-size",
        "16",
        "--log",
        "warn",
    ]);
    // Declare the topology with a short-lived worker, then prefill.
    {
        let mut first = spec.spawn();
        first.wait_ready(Duration::from_secs(30)).await;
        first.signal(Signal::SIGTERM);
        first.wait_exit(Duration::from_secs(30));
    }
    amqp::publish(SHARED_URL, &names.exchange, (0..n).map(job)).await;
    let me = std::process::id();
    let (broker_before, sink_before) = (
        broker_cpu_seconds(),
        mailpipe_bench::procfs::usage(me)?.cpu_seconds,
    );
    let mut worker = spec.spawn();
    let recording = match profile {
        Some(file) => Some(
            std::process::Command::new("perf")
                .args(["record", "-e", "cpu-clock", "-F", "999", "-g", "-p"])
                .arg(worker.pid().to_string())
                .arg("-o")
                .arg(file)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?,
        ),
        None => None,
    };
    while (stats.messages.load(Ordering::SeqCst) as usize) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (broker_after, sink_after) = (
        broker_cpu_seconds(),
        mailpipe_bench::procfs::usage(me)?.cpu_seconds,
    );
    if let Some(recording) = recording {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(recording.id() as i32),
            Signal::SIGINT,
        )?;
        let _ = recording.wait_with_output();
    }
    let (first, last) = stats
        .window
        .lock()
        .expect("lock")
        .expect("messages arrived");
    let mailpipe_bench::procfs::Usage {
        cpu_seconds,
        peak_rss_kib,
        ..
    } = mailpipe_bench::procfs::usage(worker.pid())?;
    worker.signal(Signal::SIGTERM);
    worker.wait_exit(Duration::from_secs(30));
    amqp::delete_plan(SHARED_URL, &names.plan(&RetryPolicy::default())).await;
    Ok(WorkerRun {
        jobs_per_second: (n - 1) as f64 / (last - first).as_secs_f64(),
        cpu_us_per_job: cpu_seconds * 1e6 / n as f64,
        peak_rss_mib: peak_rss_kib as f64 / 1024.0,
        broker_us_per_job: (broker_after - broker_before) * 1e6 / n as f64,
        sink_us_per_job: (sink_after - sink_before) * 1e6 / n as f64,
    })
}

/// Single jobs on an idle worker: each published (persistent, on an open channel) once the
/// previous one arrived; the time from the publish to the sink's 250. Returns the median
/// and the largest of `samples`.
async fn single_job_latency(
    port: u16,
    stats: &sink::SinkStats,
    samples: usize,
) -> anyhow::Result<(Duration, Duration)> {
    stats.reset();
    let names = Names::new("bench_latency");
    let spec = WorkerSpec::new(SHARED_URL, &names, port).args(&["--log", "warn"]);
    let mut worker = spec.spawn();
    worker.wait_ready(Duration::from_secs(30)).await;
    let connection = amqp::connect(SHARED_URL).await;
    let channel = connection.create_channel().await?;
    let properties = lapin::BasicProperties::default().with_delivery_mode(2);
    let mut latencies = Vec::with_capacity(samples);
    for n in 0..samples {
        let before = stats.messages.load(Ordering::SeqCst);
        let published = Instant::now();
        channel
            .basic_publish(
                names.exchange.as_str().into(),
                "".into(),
                Default::default(),
                &job(n),
                properties.clone(),
            )
            .await?;
        while stats.messages.load(Ordering::SeqCst) == before {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let (_, arrived) = stats.window.lock().expect("lock").expect("arrived");
        latencies.push(arrived.duration_since(published));
        // Idle between jobs, as a quiet pipeline is.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = connection.close(200, "done".into()).await;
    worker.signal(Signal::SIGTERM);
    worker.wait_exit(Duration::from_secs(30));
    amqp::delete_plan(SHARED_URL, &names.plan(&RetryPolicy::default())).await;
    latencies.sort();
    Ok((
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (port, stats) = sink::start().await?;
    // `kafka [JOBS]`: the worker against Kafka, beside the same broker's raw consume rate.
    if std::env::args().nth(1).as_deref() == Some("kafka") {
        let n: usize = std::env::args()
            .nth(2)
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(20_000);
        return kafka_bench::run(port, &stats, n).await;
    }
    // `latency`: the single-job latency alone (to compare worker binaries quickly).
    if std::env::args().nth(1).as_deref() == Some("latency") {
        let (median_latency, most) = single_job_latency(port, &stats, 101).await?;
        println!(
            "single job, idle worker, publish to 250: median {:.2} ms, max {:.2} ms (101 jobs)",
            median_latency.as_secs_f64() * 1e3,
            most.as_secs_f64() * 1e3
        );
        return Ok(());
    }
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20_000);
    println!(
        "worker throughput: {n} jobs of {} bytes per run, {RUNS} runs, medians",
        job(0).len()
    );
    let profile = std::env::var_os("MAILPIPE_BENCH_PERF");
    let (mut amqp_rates, mut smtp_rates, mut worker_rates, mut cpu, mut rss) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut mailer_rates, mut lettre_rates, mut broker, mut sink, mut end_to_end_rates) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 1..=RUNS {
        let a = raw_amqp(n).await?;
        let s = raw_smtp(port, &stats, n).await?;
        let e = raw_end_to_end(port, &stats, n).await?;
        let m = worker_mailer(port, &stats, n).await?;
        // lettre's pool is about 360/s here: a tenth of the jobs is plenty to measure it.
        let l = lettre_pool(port, &stats, (n / 10).max(CONNECTIONS)).await?;
        let last = run == RUNS;
        let w = worker(port, &stats, n, profile.as_deref().filter(|_| last)).await?;
        println!(
            "run {run}: raw AMQP consume+ack {a:.0}/s, raw SMTP x{CONNECTIONS} {s:.0}/s, raw end to end {e:.0}/s (the worker's mailer {m:.0}/s, lettre's pool {l:.0}/s), worker {:.0} jobs/s, {:.0} us CPU/job (broker {:.0}, sink {:.0}), peak RSS {:.1} MiB",
            w.jobs_per_second, w.cpu_us_per_job, w.broker_us_per_job, w.sink_us_per_job, w.peak_rss_mib
        );
        amqp_rates.push(a);
        smtp_rates.push(s);
        end_to_end_rates.push(e);
        mailer_rates.push(m);
        lettre_rates.push(l);
        worker_rates.push(w.jobs_per_second);
        cpu.push(w.cpu_us_per_job);
        rss.push(w.peak_rss_mib);
        broker.push(w.broker_us_per_job);
        sink.push(w.sink_us_per_job);
    }
    let (a, s, w) = (median(amqp_rates), median(smtp_rates), median(worker_rates));
    let ceiling = a.min(s);
    let end_to_end = median(end_to_end_rates);
    println!("median raw AMQP consume+ack:        {a:>8.0} msgs/s (prefetch 128, multiple acks)");
    println!("median raw SMTP, {CONNECTIONS} connections:     {s:>8.0} msgs/s (plain TCP client)");
    println!(
        "median raw end to end:              {end_to_end:>8.0} jobs/s (consume -> SMTP -> multiple ack, no work)"
    );
    println!(
        "median the worker's mailer alone:   {:>8.0} msgs/s (reference)",
        median(mailer_rates)
    );
    println!(
        "median lettre's own pool, 16 conns: {:>8.0} msgs/s (reference)",
        median(lettre_rates)
    );
    println!(
        "median worker (16 conc, 16 conns): {w:>8.0} jobs/s ({:.0}% of min(raw AMQP, raw SMTP), {:.0}% of raw end to end)",
        100.0 * w / ceiling,
        100.0 * w / end_to_end
    );
    println!(
        "median worker CPU per job:          {:>8.0} us (user+sys)",
        median(cpu)
    );
    println!(
        "median broker CPU per job:          {:>8.0} us (beam.smp, over the worker's run)",
        median(broker)
    );
    println!(
        "median sink CPU per job:            {:>8.0} us (over the worker's run)",
        median(sink)
    );
    println!(
        "worker peak RSS (max of runs):      {:>8.1} MiB",
        rss.iter().cloned().fold(0.0, f64::max)
    );
    let (median_latency, most) = single_job_latency(port, &stats, 101).await?;
    println!(
        "single job, idle worker, publish to 250: median {:.2} ms, max {:.2} ms (101 jobs)",
        median_latency.as_secs_f64() * 1e3,
        most.as_secs_f64() * 1e3
    );
    Ok(())
}
