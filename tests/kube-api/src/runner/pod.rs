//! A replica: its process, its state (waiting, running, terminating), SIGTERM and the
//! grace period, restarts with a capped backoff, and what tests see of it.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::Child;

use super::PodView;

pub(super) type Key = (String, String);

pub(super) enum State {
    Waiting {
        reason: String,
        retry_at: Instant,
    },
    Running(Child),
    Terminating {
        child: Option<Child>,
        kill_at: Instant,
    },
}

pub(super) struct Pod {
    pub(super) name: String,
    pub(super) hash: String,
    pub(super) dir: PathBuf,
    pub(super) port: u16,
    pub(super) grace: Duration,
    pub(super) probe: Option<String>,
    pub(super) state: State,
    pub(super) ready: bool,
    pub(super) restarts: u32,
    pub(super) killed: bool,
    pub(super) exit: Option<ExitStatus>,
}

impl Pod {
    pub(super) fn terminating(&self) -> bool {
        matches!(self.state, State::Terminating { .. })
    }

    pub(super) fn pid(&self) -> Option<u32> {
        match &self.state {
            State::Running(child) => child.id(),
            State::Terminating {
                child: Some(child), ..
            } => child.id(),
            _ => None,
        }
    }

    /// Asks the process to stop (SIGTERM) and gives it the grace period.
    pub(super) fn terminate(&mut self) {
        self.ready = false;
        let state = std::mem::replace(
            &mut self.state,
            State::Waiting {
                reason: String::new(),
                retry_at: Instant::now(),
            },
        );
        self.state = match state {
            State::Running(child) => {
                if let Some(pid) = child.id() {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
                }
                State::Terminating {
                    child: Some(child),
                    kill_at: Instant::now() + self.grace,
                }
            }
            State::Waiting { .. } => State::Terminating {
                child: None,
                kill_at: Instant::now(),
            },
            terminating => terminating,
        };
    }

    /// Notices exits: a running process that exited waits for its restart; a terminating
    /// one is done (true). Kills a terminating process whose grace period is over.
    pub(super) fn observe(&mut self) -> bool {
        let now = Instant::now();
        match &mut self.state {
            State::Running(child) => {
                if let Ok(Some(status)) = child.try_wait() {
                    self.restarts += 1;
                    self.ready = false;
                    self.exit = Some(status);
                    let backoff = Duration::from_secs(1 << (self.restarts - 1).min(4));
                    self.state = State::Waiting {
                        reason: format!("exited ({status}); restarting"),
                        retry_at: now + backoff,
                    };
                }
                false
            }
            State::Waiting { .. } => false,
            State::Terminating { child: None, .. } => true,
            State::Terminating {
                child: Some(child),
                kill_at,
            } => match child.try_wait() {
                Ok(Some(status)) => {
                    self.exit = Some(status);
                    true
                }
                Ok(None) if now >= *kill_at => {
                    let _ = child.start_kill();
                    self.killed = true;
                    false
                }
                _ => false,
            },
        }
    }

    pub(super) fn view(&self, key: &Key, log: PathBuf) -> PodView {
        let phase = match &self.state {
            State::Waiting { reason, .. } => format!("Waiting: {reason}"),
            State::Running(_) => "Running".to_string(),
            State::Terminating { .. } => "Terminating".to_string(),
        };
        PodView {
            namespace: key.0.clone(),
            deployment: key.1.clone(),
            name: self.name.clone(),
            template_hash: self.hash.clone(),
            phase,
            pid: self.pid(),
            port: self.port,
            ready: self.ready,
            restarts: self.restarts,
            log,
        }
    }
}
