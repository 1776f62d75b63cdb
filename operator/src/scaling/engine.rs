//! engine (actuator required): one look at one pipeline, the part of the scaling loop the
//! cluster's scaler and the local mode share. A reading of the broker comes in (`observe`),
//! feeds the rate meter, becomes an `Observation`; the pure `policy` decides; the
//! `Actuator` (the Deployment's `/scale`, or the local process pool) carries the count out.
//! What each caller does around it (status, events and metrics in a cluster; the terminal
//! view in local mode) stays with the caller.

use std::time::Duration;

use tokio::time::Instant;

use super::actuator::{Actuator, ActuatorError, Replicas, Workload};
use super::observe::{Brokers, QueueBacklog, Reading, TopicLag};
use super::policy::{Decision, History, Observation, Policy};
use super::rate::RateMeter;
use crate::topology::TopologyError;
use mailpipe_contract::topology::{RabbitSettings, TopologyPlan};

/// How often the delay and dead-letter queues are read (the work queue: every look).
pub const DETAIL_EVERY: Duration = Duration::from_secs(5);

/// A pipeline's backlog as one look read it.
pub struct Read {
    pub backlog: Result<QueueBacklog, TopologyError>,
    /// Whether every queue was read (else the work queue, with the last full reading's
    /// other figures).
    pub full: bool,
}

/// Reads a RabbitMQ pipeline's work queue on the broker at `url`, and its other queues
/// when `detail` (their last reading) is not fresh.
pub async fn read_backlog(
    brokers: &Brokers,
    url: &str,
    ca: Option<&str>,
    settings: &RabbitSettings,
    plan: &TopologyPlan,
    detail: Option<QueueBacklog>,
) -> Read {
    match detail {
        Some(detail) => Read {
            backlog: brokers
                .read_work_queue(url, ca, settings, plan)
                .await
                .map(|work| QueueBacklog {
                    delayed: detail.delayed,
                    dead_letter: detail.dead_letter,
                    ..work
                }),
            full: false,
        },
        None => Read {
            backlog: brokers.read_queues(url, ca, settings, plan).await,
            full: true,
        },
    }
}

/// What the engine remembers of one pipeline between looks.
pub struct PipelineState {
    pub history: History,
    /// The per-replica send rate measured so far.
    pub meter: RateMeter,
    /// The last reading of every queue (delay and dead-letter queues included), and when.
    detail: Option<(Instant, QueueBacklog)>,
}

/// One look's outcome.
#[derive(Debug, Clone)]
pub struct Step {
    /// The counts before the decision.
    pub current: Replicas,
    pub observation: Observation,
    pub decision: Decision,
    /// Whether the actuator was asked for a new count.
    pub scaled: bool,
}

impl PipelineState {
    /// A pipeline first seen; `rate` is a per-replica rate measured before (as a status
    /// kept it), if any.
    pub fn new(rate: Option<f64>) -> PipelineState {
        PipelineState {
            history: History::default(),
            meter: RateMeter::starting_at(rate),
            detail: None,
        }
    }

    /// The other queues' last reading while it is fresh (a look then reads the work queue
    /// alone).
    pub fn fresh_detail(&self) -> Option<QueueBacklog> {
        self.detail
            .filter(|(read, _)| read.elapsed() < DETAIL_EVERY)
            .map(|(_, backlog)| backlog)
    }

    /// Takes a reading in: a full one is remembered, a good one feeds the rate meter.
    pub fn take_in(&mut self, read: Read, at: Duration) -> Result<Reading, TopologyError> {
        let backlog = read.backlog?;
        if read.full {
            self.detail = Some((Instant::now(), backlog));
        }
        self.meter.observe(at, backlog.consumers, backlog.ready);
        Ok(Reading::Queue(backlog))
    }

    /// Takes a Kafka group's lag in (`consumers`: the workers running, since a group's
    /// members cannot be counted on every broker); a good one feeds the rate meter.
    pub fn take_lag(
        &mut self,
        lag: Result<TopicLag, TopologyError>,
        consumers: u32,
        at: Duration,
    ) -> Result<Reading, TopologyError> {
        let lag = lag?;
        self.meter
            .observe(at, consumers, lag.per_partition.iter().sum());
        Ok(Reading::Lag(lag))
    }

    /// Decides on `reading` (`None`: unreadable) and asks `actuator` for the count when it
    /// changes. `in_flight` is what the workers hold, where the caller knows it.
    #[allow(clippy::too_many_arguments)]
    pub async fn decide<A: Actuator>(
        &mut self,
        actuator: &A,
        workload: &Workload,
        policy: &Policy,
        current: Replicas,
        reading: Option<&Reading>,
        in_flight: Option<u64>,
        paused: Option<u32>,
        at: Duration,
    ) -> Result<Step, ActuatorError> {
        let observation = Observation {
            at,
            work: reading.map(|r| {
                let mut work = r.work();
                work.in_flight = work.in_flight.max(in_flight.unwrap_or(0));
                work
            }),
            current: current.desired,
            rate_per_replica: self.meter.rate(),
            paused,
            partitions: reading.and_then(Reading::partitions),
        };
        let decision = policy.decide(&observation, &mut self.history);
        let scaled = decision.replicas != current.desired;
        if scaled {
            actuator.scale(workload, decision.replicas).await?;
        }
        Ok(Step {
            current,
            observation,
            decision,
            scaled,
        })
    }
}
