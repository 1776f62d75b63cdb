//! board: what a local run shows, one row per pipeline, written by the scaling loops (the
//! backlog, the decisions), the tally (the workers' counters) and the burst publisher, and
//! read by the view and the summary.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailpipe_operator::scaling::observe::QueueBacklog;
use mailpipe_operator::scaling::process_pool::PoolStatus;

/// One scale decision, as shown.
#[derive(Debug, Clone, PartialEq)]
pub struct Scaled {
    /// Time since the run started.
    pub at: Duration,
    pub from: u32,
    pub to: u32,
    pub reason: &'static str,
    /// Jobs waiting or in flight when it was taken.
    pub work: u64,
}

/// What the workers of one pipeline counted, summed over every worker of the run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub consumed: u64,
    pub sent: u64,
    pub retried: u64,
    /// Failed attempts by reason.
    pub failed: BTreeMap<String, u64>,
    /// Dead-lettered jobs by reason.
    pub dead_lettered: BTreeMap<String, u64>,
    /// Jobs the running workers hold now.
    pub in_flight: u64,
}

impl Totals {
    pub fn dead_lettered_total(&self) -> u64 {
        self.dead_lettered.values().sum()
    }
}

/// One pipeline's row.
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// `namespace/name`.
    pub name: String,
    /// Where jobs enter (`exchange X` or `kafka host:port`).
    pub exchange: String,
    /// What the workers consume (`queue Y` or `topic Z`).
    pub queue: String,
    pub min_replicas: u32,
    /// The last reading of its queues; `None` until one succeeds.
    pub backlog: Option<QueueBacklog>,
    /// Why the last reading failed, when it did.
    pub unreadable: Option<String>,
    pub pool: PoolStatus,
    pub peak_replicas: u32,
    /// The decisions that changed the count, oldest first (the last few).
    pub decisions: Vec<Scaled>,
    /// How many decisions changed the count in all.
    pub decided: u64,
    /// When the queues were last read (time since the run started).
    pub read_at: Option<Duration>,
    /// The last decision's reason (changed or not).
    pub reason: &'static str,
    pub totals: Totals,
    /// Jobs sent a second, over the last few seconds.
    pub sent_rate: f64,
    /// Jobs this run published into the pipeline.
    pub published: u64,
    /// Whether a burst is being published now.
    pub publishing: bool,
    /// When the last burst was confirmed whole (time since the run started).
    pub published_at: Option<Duration>,
}

impl Row {
    /// No job waits, none is held, and the workers are at their floor, none stopping.
    pub fn drained(&self) -> bool {
        let idle = self.backlog.is_some_and(|b| b.ready == 0 && b.delayed == 0);
        // A reading from before the last burst was confirmed says nothing of it.
        let fresh = match (self.read_at, self.published_at) {
            (Some(read), Some(published)) => read > published,
            (read, None) => read.is_some(),
            (None, Some(_)) => false,
        };
        idle && fresh
            && !self.publishing
            && self.totals.in_flight == 0
            && self.pool.desired == self.min_replicas
            && self.pool.running == self.min_replicas
            && self.pool.stopping == 0
    }
}

/// Most decisions a row keeps.
const DECISIONS_KEPT: usize = 8;

/// The rows, shared.
#[derive(Clone, Default)]
pub struct Board(Arc<Mutex<Vec<Row>>>);

impl Board {
    pub fn new(rows: Vec<Row>) -> Board {
        Board(Arc::new(Mutex::new(rows)))
    }

    /// A copy of every row.
    pub fn rows(&self) -> Vec<Row> {
        self.0.lock().expect("board lock").clone()
    }

    /// The jobs row `index`'s workers hold, as last counted.
    pub fn in_flight(&self, index: usize) -> Option<u64> {
        let rows = self.0.lock().expect("board lock");
        rows.get(index).map(|row| row.totals.in_flight)
    }

    /// Changes row `index`.
    pub fn update(&self, index: usize, change: impl FnOnce(&mut Row)) {
        if let Some(row) = self.0.lock().expect("board lock").get_mut(index) {
            change(row);
            row.peak_replicas = row.peak_replicas.max(row.pool.running);
            if row.decisions.len() > DECISIONS_KEPT {
                let extra = row.decisions.len() - DECISIONS_KEPT;
                row.decisions.drain(..extra);
            }
        }
    }
}
