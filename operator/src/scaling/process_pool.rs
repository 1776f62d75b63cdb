//! process_pool (no client required): the local mode's actuator, the second implementation
//! of [`Actuator`]. Each workload is a supervised set of worker processes on this machine:
//! a scale-up starts the missing ones at once; a scale-down sends the newest ones SIGTERM
//! (the worker then drains within its deadline, like a pod told to stop) and kills one only
//! when it outlives `stop_within`; a worker that exits without being told to is restarted
//! after a backoff that grows with consecutive crashes (1 s, doubling, at most 30 s) and is
//! forgotten once a worker of the set has been ready. Readiness is each worker's `/readyz`,
//! on a loopback port of its own. Workers run in a process group of their own, so a Ctrl-C
//! at the terminal reaches the pool's owner, which drains them in order, and not each
//! worker at once; their output goes to a log file each when the command names a directory.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::actuator::{Actuator, ActuatorError, Replicas, Workload};

/// How a workload's workers are started.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    /// The worker binary.
    pub program: PathBuf,
    /// Its flags (the pool adds `--http-addr` with a port of each process's own).
    pub args: Vec<String>,
    /// Its environment (`MAILPIPE_*`; secrets come from files or the caller's environment).
    pub env: Vec<(String, String)>,
    /// How long a worker told to stop may take before it is killed: its drain deadline and a
    /// margin, as the operator keeps a pod's grace period above it.
    pub stop_within: Duration,
    /// Where each worker's output goes, as `worker-<n>.log` (`n` counts the set's starts);
    /// `None`: the pool's own output.
    pub logs: Option<PathBuf>,
}

/// What a workload's workers are doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStatus {
    pub desired: u32,
    /// Processes running and not told to stop.
    pub running: u32,
    /// Of those, how many answer `/readyz` with 200.
    pub ready: u32,
    /// Processes told to stop and still draining.
    pub stopping: u32,
    /// Workers restarted after exiting on their own.
    pub restarts: u64,
}

/// One worker process as the pool sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerProcess {
    pub pid: u32,
    /// Its loopback HTTP port (`/metrics`, `/readyz`).
    pub port: u16,
    pub ready: bool,
    /// Told to stop and draining.
    pub stopping: bool,
}

/// The local mode's workers: one supervised set per workload.
pub struct ProcessPool {
    sets: Mutex<HashMap<Workload, Arc<Set>>>,
    stop: CancellationToken,
    http: reqwest::Client,
}

struct Set {
    command: WorkerCommand,
    state: Mutex<SetState>,
}

#[derive(Default)]
struct SetState {
    desired: u32,
    workers: Vec<Worker>,
    /// Consecutive exits nobody asked for, and when the next start may happen.
    crashes: u32,
    next_start: Option<Instant>,
    restarts: u64,
    /// Workers started so far (names their log files).
    started: u64,
}

struct Worker {
    process: Child,
    port: u16,
    started: Instant,
    ready: bool,
    /// When it was told to stop.
    stopping: Option<Instant>,
}

/// How often a set is looked after.
const TICK: Duration = Duration::from_millis(200);
const FIRST_RESTART: Duration = Duration::from_secs(1);
const LAST_RESTART: Duration = Duration::from_secs(30);

impl Default for ProcessPool {
    fn default() -> Self {
        ProcessPool {
            sets: Mutex::default(),
            stop: CancellationToken::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(1))
                .build()
                .expect("an HTTP client"),
        }
    }
}

impl ProcessPool {
    /// Supervises `workload`'s workers, started with `command` (none until it is scaled).
    /// Needs a Tokio runtime: each set is looked after by a task of its own.
    pub fn add(self: &Arc<Self>, workload: Workload, command: WorkerCommand) {
        let set = Arc::new(Set {
            command,
            state: Mutex::default(),
        });
        self.sets
            .lock()
            .expect("sets lock")
            .insert(workload, set.clone());
        let pool = self.clone();
        tokio::spawn(async move {
            loop {
                pool.look_after(&set).await;
                tokio::select! {
                    _ = pool.stop.cancelled() => {}
                    _ = tokio::time::sleep(TICK) => continue,
                }
                // Stopping: every worker is told to stop; the set ends when all are gone.
                set.state.lock().expect("set lock").desired = 0;
                while !set.state.lock().expect("set lock").workers.is_empty() {
                    pool.look_after(&set).await;
                    tokio::time::sleep(TICK).await;
                }
                return;
            }
        });
    }

    /// What `workload`'s workers are doing, if the pool supervises it.
    pub fn status(&self, workload: &Workload) -> Option<PoolStatus> {
        let set = self.set(workload)?;
        let state = set.state.lock().expect("set lock");
        let active = state.workers.iter().filter(|w| w.stopping.is_none());
        Some(PoolStatus {
            desired: state.desired,
            running: active.clone().count() as u32,
            ready: active.filter(|w| w.ready).count() as u32,
            stopping: state
                .workers
                .iter()
                .filter(|w| w.stopping.is_some())
                .count() as u32,
            restarts: state.restarts,
        })
    }

    /// The process ids of `workload`'s workers (those told to stop included).
    pub fn pids(&self, workload: &Workload) -> Vec<u32> {
        self.workers(workload).into_iter().map(|w| w.pid).collect()
    }

    /// `workload`'s worker processes (those told to stop included).
    pub fn workers(&self, workload: &Workload) -> Vec<WorkerProcess> {
        self.set(workload).map_or_else(Vec::new, |set| {
            let state = set.state.lock().expect("set lock");
            state
                .workers
                .iter()
                .filter_map(|w| {
                    Some(WorkerProcess {
                        pid: w.process.id()?,
                        port: w.port,
                        ready: w.ready,
                        stopping: w.stopping.is_some(),
                    })
                })
                .collect()
        })
    }

    /// Tells every worker to stop and waits until all have exited (each drains within its
    /// deadline; one that outlives `stop_within` is killed).
    pub async fn shutdown(&self) {
        self.stop.cancel();
        loop {
            let left = self
                .sets
                .lock()
                .expect("sets lock")
                .values()
                .any(|set| !set.state.lock().expect("set lock").workers.is_empty());
            if !left {
                return;
            }
            tokio::time::sleep(TICK).await;
        }
    }

    /// Kills every worker now, without a drain (the broker gives the jobs they held to
    /// another consumer: a job being sent may be sent twice).
    pub fn kill_all(&self) {
        let sets: Vec<Arc<Set>> = self
            .sets
            .lock()
            .expect("sets lock")
            .values()
            .cloned()
            .collect();
        for set in sets {
            let mut state = set.state.lock().expect("set lock");
            state.desired = 0;
            for worker in &mut state.workers {
                worker.stopping.get_or_insert_with(Instant::now);
                let _ = worker.process.start_kill();
            }
        }
    }

    fn set(&self, workload: &Workload) -> Option<Arc<Set>> {
        self.sets.lock().expect("sets lock").get(workload).cloned()
    }

    /// One look at a set: reap, restart, start, stop, kill the overdue, read readiness.
    async fn look_after(&self, set: &Set) {
        let ports: Vec<(usize, u16)> = {
            let mut state = set.state.lock().expect("set lock");
            let now = Instant::now();
            let state = &mut *state;
            // Reap: a worker told to stop is gone; one that exited on its own is a crash.
            let mut crashed = 0;
            state.workers.retain_mut(|worker| match worker.process.try_wait() {
                Ok(None) => true,
                Ok(Some(status)) => {
                    if worker.stopping.is_none() {
                        tracing::warn!(port = worker.port, %status, "a worker exited on its own; restarting it");
                        crashed += 1;
                    }
                    false
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot tell whether a worker runs");
                    true
                }
            });
            if crashed > 0 {
                state.crashes += crashed;
                state.restarts += u64::from(crashed);
                let wait = FIRST_RESTART
                    .saturating_mul(1 << (state.crashes - 1).min(5))
                    .min(LAST_RESTART);
                state.next_start = Some(now + wait);
            }
            // Kill what outlived its stop.
            for worker in &mut state.workers {
                if worker
                    .stopping
                    .is_some_and(|since| since.elapsed() > set.command.stop_within)
                {
                    tracing::warn!(
                        port = worker.port,
                        "a worker did not stop within its deadline; killing it"
                    );
                    let _ = worker.process.start_kill();
                }
            }
            let active = state
                .workers
                .iter()
                .filter(|w| w.stopping.is_none())
                .count() as u32;
            // Stop the newest beyond the count.
            if active > state.desired {
                let mut newest: Vec<&mut Worker> = state
                    .workers
                    .iter_mut()
                    .filter(|w| w.stopping.is_none())
                    .collect();
                newest.sort_by_key(|w| std::cmp::Reverse(w.started));
                for worker in newest.into_iter().take((active - state.desired) as usize) {
                    worker.stopping = Some(now);
                    if let Some(pid) = worker.process.id() {
                        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
                    }
                }
            }
            // Start the missing ones, once any restart backoff has passed.
            let due = state.next_start.is_none_or(|at| at <= now);
            if active < state.desired && due {
                for _ in active..state.desired {
                    state.started += 1;
                    match start(&set.command, state.started) {
                        Ok(worker) => state.workers.push(worker),
                        Err(error) => {
                            tracing::warn!(program = %set.command.program.display(), %error, "cannot start a worker");
                            state.crashes += 1;
                            state.next_start = Some(now + LAST_RESTART.min(FIRST_RESTART * 5));
                            break;
                        }
                    }
                }
            }
            state
                .workers
                .iter()
                .enumerate()
                .filter(|(_, w)| w.stopping.is_none())
                .map(|(i, w)| (i, w.port))
                .collect()
        };
        // Readiness, outside the lock.
        let mut answers = Vec::with_capacity(ports.len());
        for (index, port) in ports {
            let url = format!("http://127.0.0.1:{port}/readyz");
            let ready = self
                .http
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            answers.push((index, port, ready));
        }
        let mut state = set.state.lock().expect("set lock");
        for (index, port, ready) in answers {
            if let Some(worker) = state.workers.get_mut(index).filter(|w| w.port == port) {
                worker.ready = ready;
            }
        }
        if state.workers.iter().any(|w| w.ready) {
            state.crashes = 0;
        }
    }
}

/// Starts the set's `n`th worker on a loopback port of its own.
fn start(command: &WorkerCommand, n: u64) -> std::io::Result<Worker> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut process = Command::new(&command.program);
    process
        .args(&command.args)
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .envs(command.env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &command.logs {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("worker-{n}.log")))?;
        process.stdout(log.try_clone()?).stderr(log);
    }
    let process = process.spawn()?;
    Ok(Worker {
        process,
        port,
        started: Instant::now(),
        ready: false,
        stopping: None,
    })
}

impl Actuator for Arc<ProcessPool> {
    async fn replicas(&self, workload: &Workload) -> Result<Option<Replicas>, ActuatorError> {
        Ok(self.status(workload).map(|status| Replicas {
            desired: status.desired,
            running: status.running,
        }))
    }

    async fn scale(&self, workload: &Workload, replicas: u32) -> Result<(), ActuatorError> {
        if let Some(set) = self.set(workload) {
            set.state.lock().expect("set lock").desired = replicas;
        }
        Ok(())
    }
}
