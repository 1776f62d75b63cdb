//! scale: local mode's scaling loop, one per pipeline: the operator's engine (`engine`:
//! the same reading, rate meter, policy and decision as in a cluster) with the process
//! pool as its actuator. Every `scaling.pollInterval` it reads the pipeline's queues over
//! the run's shared broker connection, decides, and scales; what the workers hold comes
//! from their own counters (the tally) rather than the management API.

use std::sync::Arc;

use mailpipe_operator::scaling::actuator::{Actuator, Workload};
use mailpipe_operator::scaling::engine::{read_backlog, PipelineState};
use mailpipe_operator::scaling::observe::{read_lag, Brokers, QueueBacklog, Reading};
use mailpipe_operator::scaling::process_pool::ProcessPool;
use mailpipe_operator::scaling::scaler::policy_of;
use mailpipe_operator::validate::{ValidatedPipeline, ValidatedSource};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::board::{Board, Scaled};

/// How to reach a pipeline's broker (the URL and the SASL login carry credentials: never
/// logged).
#[derive(Clone)]
pub enum Reach {
    /// RabbitMQ: the AMQP URL and CA bundle.
    Rabbit { url: String, ca: Option<String> },
    /// Kafka: the brokers and how to reach them.
    Kafka(mailpipe_contract::kafka::Connection),
}

/// Scales `valid`'s workers (`workload` in `pool`, row `index` of `board`) until `stop`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    valid: Arc<ValidatedPipeline>,
    reach: Reach,
    brokers: Arc<Brokers>,
    pool: Arc<ProcessPool>,
    workload: Workload,
    board: Board,
    index: usize,
    started: Instant,
    stop: CancellationToken,
) {
    let policy = policy_of(&valid);
    let mut state = PipelineState::new(None);
    let mut next = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        // On a fixed schedule, never owing looks after a stall.
        next = (next + valid.poll_interval).max(Instant::now());
        let at = started.elapsed();
        let current = match pool.replicas(&workload).await {
            Ok(Some(current)) => current,
            _ => return,
        };
        let reading = match (&valid.source, &reach) {
            (ValidatedSource::Rabbit { settings, plan, .. }, Reach::Rabbit { url, ca }) => {
                let detail = state.fresh_detail();
                let read = read_backlog(&brokers, url, ca.as_deref(), settings, plan, detail).await;
                state.take_in(read, at)
            }
            (ValidatedSource::Kafka(kafka), Reach::Kafka(connection)) => {
                let lag = read_lag(connection.clone(), kafka).await;
                state.take_lag(lag, current.running, at)
            }
            _ => unreachable!("a pipeline's reach is made from its source"),
        };
        let in_flight = board.in_flight(index);
        let step = state
            .decide(
                &pool,
                &workload,
                &policy,
                current,
                reading.as_ref().ok(),
                in_flight,
                None,
                at,
            )
            .await;
        let step = match step {
            Ok(step) => step,
            Err(error) => {
                tracing::warn!(pipeline = %valid.name, "cannot scale the workers: {error}");
                continue;
            }
        };
        if step.scaled {
            let work = step.observation.work.map_or(0, |w| w.ready + w.in_flight);
            tracing::info!(
                pipeline = %valid.name,
                "scaled the workers from {} to {} ({}; {work} jobs waiting)",
                step.current.desired,
                step.decision.replicas,
                step.decision.reason.as_str()
            );
        }
        board.update(index, |row| {
            match &reading {
                Ok(Reading::Queue(backlog)) => {
                    row.backlog = Some(*backlog);
                    row.unreadable = None;
                    row.read_at = Some(at);
                }
                Ok(Reading::Lag(lag)) => {
                    row.backlog = Some(QueueBacklog {
                        ready: lag.per_partition.iter().sum(),
                        consumers: 0,
                        delayed: lag.delayed,
                        dead_letter: lag.dead_letter,
                    });
                    row.unreadable = None;
                    row.read_at = Some(at);
                }
                Err(error) => row.unreadable = Some(error.to_string()),
            }
            row.reason = step.decision.reason.as_str();
            if step.scaled {
                row.decided += 1;
                row.decisions.push(Scaled {
                    at,
                    from: step.current.desired,
                    to: step.decision.replicas,
                    reason: step.decision.reason.as_str(),
                    work: step.observation.work.map_or(0, |w| w.ready + w.in_flight),
                });
            }
        });
    }
}
