//! local: `mailpipe local`, the operator's engine on one machine, without Kubernetes.
//!
//! The same pipeline files a cluster takes are validated by the operator's `validate`; the
//! topology is ensured through the same `BrokerTopology` (`RabbitTopology`, with the SMTP
//! connection budget); each pipeline's workers are a set of the process pool, the second
//! `Actuator`, scaled by the same engine and policy as in a cluster (`scale`). Only two
//! things differ from a cluster: the actuator, and where Secrets come from (`secrets`).
//!
//! Flow: load and validate -> find every Secret key -> ensure the topology -> start the
//! scaling loops, the tally of the workers' counters and the view -> publish the burst, if
//! asked -> run until Ctrl-C (or, with `--exit-when-drained`, until every pipeline is
//! drained and at its minimum) -> drain the workers -> print the summary.

pub mod board;
pub mod burst;
pub mod scale;
pub mod tally;
pub mod view;
pub mod workers;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use mailpipe_operator::crd::SecretKeyRef;
use mailpipe_operator::dereference::secret_keys;
use mailpipe_operator::scaling::actuator::Workload;
use mailpipe_operator::scaling::observe::Brokers;
use mailpipe_operator::scaling::process_pool::ProcessPool;
use mailpipe_operator::topology::kafka::KafkaTopology;
use mailpipe_operator::topology::rabbitmq::{Connections, RabbitTopology};
use mailpipe_operator::topology::BrokerTopology;
use mailpipe_operator::validate::{KafkaTarget, ValidatedSource};
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::pipelines::{self, Loaded};
use crate::secrets::LocalSecrets;
use board::{Board, Row};
use scale::Reach;

/// What `mailpipe local` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub files: Vec<PathBuf>,
    pub secrets_dir: Option<PathBuf>,
    pub config_maps_dir: Option<PathBuf>,
    /// The worker binary (default: `mailpipe-worker` beside this program, else on PATH).
    pub worker: Option<PathBuf>,
    /// Where runs keep their logs and private files.
    pub state_dir: PathBuf,
    /// Jobs to publish at the start.
    pub burst: u64,
    /// Jobs the `b` key publishes.
    pub burst_key: u64,
    /// The pipeline bursts go to (default: the first).
    pub burst_into: Option<String>,
    pub exit_when_drained: bool,
    /// Plain lines even on a terminal.
    pub plain: bool,
    /// Where the delivered mail can be seen, to print at the end.
    pub inbox: Option<String>,
    /// How often plain lines are printed.
    pub every: Duration,
}

/// How long the topology may stay unreachable at start-up before the run gives up.
const ENSURE_WITHIN: Duration = Duration::from_secs(60);

/// How long to wait between two tries of the topology at start-up.
const ENSURE_RETRY: Duration = Duration::from_secs(2);

/// How long a burst may take to finish its batch when the run stops.
const BURST_STOP: Duration = Duration::from_secs(10);

/// The view's refresh.
const FRAME: Duration = Duration::from_millis(250);

/// Runs the pipelines of `options.files` until told to stop.
pub async fn run(options: Options) -> anyhow::Result<ExitCode> {
    let loaded = match pipelines::load(&options.files) {
        Ok(loaded) => loaded,
        Err(errors) => {
            for error in errors {
                eprintln!("mailpipe local: {error}");
            }
            return Ok(ExitCode::from(2));
        }
    };
    let secrets = LocalSecrets::new(options.secrets_dir.clone());
    let mut missing = Vec::new();
    for pipeline in &loaded {
        for key in secret_keys(&pipeline.spec) {
            if let Err(error) = secrets.find(&key) {
                missing.push(format!("{}: {error}", pipeline.origin));
            }
        }
    }
    if !missing.is_empty() {
        missing.dedup();
        for line in missing {
            eprintln!("mailpipe local: {line}");
        }
        return Ok(ExitCode::from(2));
    }
    let worker = worker_binary(options.worker.as_deref())?;
    let burst_into = match &options.burst_into {
        None => 0,
        Some(name) => loaded
            .iter()
            .position(|p| {
                &p.valid.name == name || format!("{}/{}", p.valid.namespace, p.valid.name) == *name
            })
            .with_context(|| format!("--burst-into {name}: no pipeline of that name"))?,
    };

    let started = Instant::now();
    let run_id = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    );
    let run_dir = options.state_dir.join("runs").join(&run_id);
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let tui = !options.plain && std::io::stdout().is_terminal();
    logging(tui, &run_dir);
    let places = Run {
        options: &options,
        loaded: &loaded,
        secrets: &secrets,
        worker: &worker,
        run_dir: &run_dir,
        run_id: &run_id,
        tui,
        started,
        burst_into,
    };
    let result = run_in(places).await;
    // The secret files of the run (CA bundles given as variables) go with it.
    let _ = std::fs::remove_dir_all(run_dir.join("secrets"));
    result
}

/// A run, once its pipelines and Secrets were checked.
struct Run<'a> {
    options: &'a Options,
    loaded: &'a [Loaded],
    secrets: &'a LocalSecrets,
    worker: &'a Path,
    run_dir: &'a Path,
    run_id: &'a str,
    /// Whether the live view owns the terminal.
    tui: bool,
    started: Instant,
    /// The pipeline bursts go to.
    burst_into: usize,
}

/// Everything after the checks: the run itself.
async fn run_in(run: Run<'_>) -> anyhow::Result<ExitCode> {
    let Run {
        options,
        loaded,
        secrets,
        worker,
        run_dir,
        run_id,
        tui,
        started,
        burst_into,
    } = run;
    let connections = Arc::new(Connections::named("mailpipe-local"));
    let pool = Arc::new(ProcessPool::default());
    let brokers = Arc::new(Brokers::named("mailpipe-local-scaler"));
    let mut rows = Vec::new();
    let mut reaches = Vec::new();
    let mut workloads = Vec::new();
    for pipeline in loaded {
        let valid = &pipeline.valid;
        let (reach, row) = match &valid.source {
            ValidatedSource::Rabbit {
                settings,
                plan,
                connection,
            } => {
                let (url, ca) = (
                    secrets.read(&connection.connection_secret)?,
                    connection
                        .ca_secret
                        .as_ref()
                        .map(|key| secrets.read(key))
                        .transpose()?,
                );
                let mut topology =
                    RabbitTopology::new(url.clone(), ca.clone(), settings.clone(), plan.clone())
                        .with_smtp_budget(valid.smtp_pool_size)
                        .sharing(connections.clone());
                let management = pipeline
                    .spec
                    .source
                    .rabbitmq
                    .as_ref()
                    .and_then(|r| r.management_secret.as_ref());
                if let Some(key) = management {
                    topology = topology.with_management(&secrets.read(key)?)?;
                }
                ensure(&topology, &pipeline.origin).await?;
                (
                    Reach::Rabbit { url, ca },
                    (
                        format!("exchange {}", settings.exchange),
                        format!("queue {}", settings.queue),
                    ),
                )
            }
            ValidatedSource::Kafka(kafka) => {
                let connection = kafka_connection(kafka, secrets)?;
                let topology =
                    KafkaTopology::new(connection.clone(), kafka.plan.clone(), kafka.group.clone());
                ensure(&topology, &pipeline.origin).await?;
                (
                    Reach::Kafka(connection),
                    (
                        format!("kafka {}", kafka.bootstrap),
                        format!("topic {}", kafka.settings.topic),
                    ),
                )
            }
        };
        let workload = Workload {
            namespace: valid.namespace.clone(),
            name: format!("{}-worker", valid.name),
        };
        let logs = run_dir
            .join("logs")
            .join(format!("{}-{}", valid.namespace, valid.name));
        std::fs::create_dir_all(&logs)
            .with_context(|| format!("cannot create {}", logs.display()))?;
        let places = workers::Places {
            secrets,
            config_maps: options.config_maps_dir.as_deref(),
            run_dir,
            logs,
        };
        let command =
            workers::command(pipeline, worker, &places).with_context(|| pipeline.origin.clone())?;
        pool.add(workload.clone(), command);
        rows.push(Row {
            name: format!("{}/{}", valid.namespace, valid.name),
            exchange: row.0,
            queue: row.1,
            min_replicas: valid.scaling.min_replicas,
            ..Row::default()
        });
        reaches.push(reach);
        workloads.push(workload);
    }
    let board = Board::new(rows);
    let stop_scaling = CancellationToken::new();
    let stop_tally = CancellationToken::new();
    for (index, (pipeline, reach)) in loaded.iter().zip(reaches.iter()).enumerate() {
        tokio::spawn(scale::run(
            Arc::new(pipeline.valid.clone()),
            reach.clone(),
            brokers.clone(),
            pool.clone(),
            workloads[index].clone(),
            board.clone(),
            index,
            started,
            stop_scaling.clone(),
        ));
    }
    tokio::spawn(tally::run(
        pool.clone(),
        workloads.clone(),
        board.clone(),
        stop_tally.clone(),
    ));
    if !tui {
        println!(
            "== mailpipe local: {} pipeline(s); worker logs in {}",
            loaded.len(),
            run_dir.join("logs").display()
        );
        for (row, pipeline) in board.rows().iter().zip(loaded) {
            println!(
                "   {}: {} -> {}, {}..{} replicas, topology ready",
                row.name,
                row.exchange,
                row.queue,
                pipeline.valid.scaling.min_replicas,
                pipeline.valid.scaling.max_replicas
            );
        }
    }

    let mut bursts = Bursts {
        connections: connections.clone(),
        reach: &reaches[0..],
        loaded,
        board: board.clone(),
        run_id,
        next: 0,
        started,
        into: burst_into,
        running: Vec::new(),
        stop: CancellationToken::new(),
    };
    if options.burst > 0 {
        if !tui {
            println!(
                "== publishing {} jobs into {}",
                options.burst,
                board.rows()[bursts.into].name
            );
        }
        bursts.start(options.burst);
    }

    let mut view = if tui { Some(view::Tui::start()?) } else { None };
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut printed: Vec<u64> = vec![0; workloads.len()];
    let mut last_lines = Instant::now();
    let mut failed_burst = None;
    // Running: until a stop, or drained when asked to exit then.
    let mut stopped_by_user = false;
    loop {
        tokio::select! {
            _ = interrupt.recv() => { stopped_by_user = true; }
            _ = terminate.recv() => { stopped_by_user = true; }
            _ = tokio::time::sleep(FRAME) => {}
        }
        if let Some(error) = bursts.failure() {
            failed_burst = Some(error);
            break;
        }
        if stopped_by_user {
            break;
        }
        let rows = board.rows();
        let at = started.elapsed();
        if let Some(tui) = &mut view {
            for key in tui.keys() {
                match key {
                    view::Key::Burst => bursts.start(options.burst_key),
                    view::Key::Stop => stopped_by_user = true,
                }
            }
            let footer = format!(
                " b: publish {} jobs into {}   q or Ctrl-C: drain the workers and stop   logs: {}",
                options.burst_key,
                rows[bursts.into].name,
                run_dir.join("logs").display()
            );
            tui.draw(&rows, at, &footer)?;
            if stopped_by_user {
                break;
            }
        } else {
            print_decisions(&rows, &mut printed);
            if last_lines.elapsed() >= options.every {
                last_lines = Instant::now();
                for row in &rows {
                    println!("{}", view::line(row, at));
                }
            }
        }
        if options.exit_when_drained && bursts.idle() && rows.iter().all(Row::drained) {
            break;
        }
    }

    // Draining: the scaling stops, every worker is told to stop and finishes what it holds.
    stop_scaling.cancel();
    bursts.stop().await;
    let drain = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.shutdown().await })
    };
    if !tui {
        println!("== draining the workers (each finishes its jobs; Ctrl-C again kills them)");
    }
    let mut killed = false;
    while !drain.is_finished() {
        tokio::select! {
            _ = interrupt.recv() => { pool.kill_all(); killed = true; }
            _ = terminate.recv() => { pool.kill_all(); killed = true; }
            _ = tokio::time::sleep(FRAME) => {}
        }
        let rows = board.rows();
        if let Some(tui) = &mut view {
            if tui.keys().contains(&view::Key::Stop) {
                pool.kill_all();
                killed = true;
            }
            let footer = if killed {
                " killing the workers"
            } else {
                " draining the workers: each finishes the jobs it holds   q or Ctrl-C: kill them"
            };
            tui.draw(&rows, started.elapsed(), footer)?;
        } else {
            print_decisions(&rows, &mut printed);
        }
    }
    // The last counts of the workers that just stopped.
    tokio::time::sleep(tally::EVERY).await;
    stop_tally.cancel();
    drop(view);
    let rows = board.rows();
    if !tui {
        print_decisions(&rows, &mut printed);
        for row in &rows {
            println!("{}", view::line(row, started.elapsed()));
        }
    }
    print!(
        "{}",
        view::summary(&rows, started.elapsed(), options.inbox.as_deref())
    );
    println!("   logs: {}", run_dir.join("logs").display());
    if let Some(error) = failed_burst {
        eprintln!("mailpipe local: the burst failed: {error:#}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the scale decisions not printed yet.
fn print_decisions(rows: &[Row], printed: &mut [u64]) {
    for (row, done) in rows.iter().zip(printed.iter_mut()) {
        let new = row.decided.saturating_sub(*done) as usize;
        let shown = row.decisions.len();
        for scaled in &row.decisions[shown.saturating_sub(new)..] {
            println!("{}", view::decision(row, scaled));
        }
        *done = row.decided;
    }
}

/// The bursts of a run, each published by a task of its own.
struct Bursts<'a> {
    connections: Arc<Connections>,
    reach: &'a [Reach],
    loaded: &'a [Loaded],
    board: Board,
    run_id: &'a str,
    /// The next job number.
    next: u64,
    started: Instant,
    /// The pipeline bursts go to.
    into: usize,
    running: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// Ends the bursts between two batches.
    stop: CancellationToken,
}

impl Bursts<'_> {
    fn start(&mut self, count: u64) {
        let (first, index) = (self.next, self.into);
        self.next += count;
        let connections = self.connections.clone();
        let reach = self.reach[index].clone();
        let valid = self.loaded[index].valid.clone();
        let board = self.board.clone();
        let run_id = self.run_id.to_string();
        let started = self.started;
        let stop = self.stop.clone();
        self.running.push(tokio::spawn(async move {
            burst::publish(
                connections,
                &reach,
                &valid,
                &board,
                index,
                &run_id,
                first,
                count,
                started,
                stop,
            )
            .await
        }));
    }

    /// Whether every burst was published.
    fn idle(&self) -> bool {
        self.running.iter().all(|task| task.is_finished())
    }

    /// A burst that failed, once (its task is forgotten).
    fn failure(&mut self) -> Option<anyhow::Error> {
        let index = self.running.iter().position(|t| t.is_finished())?;
        let task = self.running.remove(index);
        match futures::FutureExt::now_or_never(task)? {
            Ok(Ok(())) => self.failure(),
            Ok(Err(error)) => Some(error),
            Err(joined) => Some(anyhow::anyhow!("the burst's task ended: {joined}")),
        }
    }

    /// Stops publishing after the batch under way, once the broker confirmed it.
    async fn stop(&mut self) {
        self.stop.cancel();
        for task in self.running.drain(..) {
            let _ = tokio::time::timeout(BURST_STOP, task).await;
        }
    }
}

/// Ensures `topology`, waiting for a broker that is still starting; a refusal (bad
/// credentials, a queue declared with other arguments) ends the run at once.
/// How local mode reaches a Kafka pipeline's brokers: its CA and SASL login from the local
/// Secrets.
fn kafka_connection(
    kafka: &KafkaTarget,
    secrets: &LocalSecrets,
) -> anyhow::Result<mailpipe_contract::kafka::Connection> {
    let ca_pem = kafka
        .ca_secret
        .as_ref()
        .map(|key| secrets.read(key))
        .transpose()?;
    let sasl = match &kafka.sasl {
        Some(sasl) => {
            let key = |key: &str| SecretKeyRef {
                name: sasl.secret.clone(),
                key: key.to_string(),
            };
            Some(mailpipe_contract::kafka::SaslLogin {
                mechanism: sasl.mechanism,
                username: secrets.read(&key("username"))?,
                password: secrets.read(&key("password"))?,
            })
        }
        None => None,
    };
    Ok(mailpipe_contract::kafka::Connection {
        bootstrap: kafka.bootstrap.clone(),
        ca_file: None,
        tls: ca_pem.is_some(),
        ca_pem,
        sasl,
    })
}

async fn ensure(topology: &impl BrokerTopology, origin: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + ENSURE_WITHIN;
    let mut told = false;
    loop {
        match topology.ensure().await {
            Ok(()) => return Ok(()),
            Err(error) if error.is_transient() && Instant::now() < deadline => {
                // Said once on the terminal (the live view has not started yet).
                if !told {
                    eprintln!(
                        "mailpipe local: {origin}: {error}; trying again for up to {}s",
                        ENSURE_WITHIN.as_secs()
                    );
                    told = true;
                }
                tracing::debug!("{origin}: {error}; trying again");
                tokio::time::sleep(ENSURE_RETRY).await;
            }
            Err(error) => bail!("{origin}: cannot ensure the topology: {error}"),
        }
    }
}

/// The worker program: the one asked for, else `mailpipe-worker` beside this program,
/// else on PATH.
fn worker_binary(asked: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = asked {
        if path.is_file() {
            return Ok(path.to_path_buf());
        }
        bail!("--worker {}: no such file", path.display());
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("mailpipe-worker")))
        .filter(|path| path.is_file());
    if let Some(path) = beside {
        return Ok(path);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("mailpipe-worker"))
            .find(|path| path.is_file())
    });
    on_path.context(
        "mailpipe-worker is neither beside mailpipe nor on PATH: build it (cargo build -p mailpipe-worker) or give --worker PATH",
    )
}

/// This program's own log: a file of the run under the live view (which owns the
/// terminal), standard error otherwise. `MAILPIPE_LOG` sets the filter.
fn logging(tui: bool, run_dir: &Path) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("MAILPIPE_LOG").unwrap_or_else(|_| {
        if tui {
            "info,lapin=off".into()
        } else {
            "warn,lapin=off".into()
        }
    });
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let file = tui
        .then(|| std::fs::File::create(run_dir.join("mailpipe.log")).ok())
        .flatten();
    match file {
        Some(file) => {
            let _ = builder
                .with_ansi(false)
                .with_writer(Arc::new(file))
                .try_init();
        }
        None => {
            let _ = builder
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .try_init();
        }
    }
}
