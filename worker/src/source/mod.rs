//! The source seam: where jobs come from and how each one is settled.
//!
//! A [`MessageSource`] yields [`Delivery`]s; each delivery carries a [`Settle`] handle that
//! the pipeline calls exactly once with a [`Settlement`]. RabbitMQ ([`rabbitmq`]) acks,
//! publishes to delay or dead-letter queues and nacks; Kafka ([`kafka`]) produces to retry or
//! dead-letter topics and stores offsets, behind the same two traits. The source owns
//! reconnecting. [`Source::from_config`] is the one place that picks one.

mod acks;
pub mod kafka;
pub mod rabbitmq;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SourceConfig};
use crate::health::Health;
use crate::metrics::Metrics;

/// How a delivery ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Done: sent, skipped as a duplicate, or nothing more to do.
    Ack,
    /// Deliver again as attempt `next_attempt` after `after`.
    Retry {
        /// The attempt number of the next delivery.
        next_attempt: u32,
        /// The delay before it.
        after: Duration,
        /// Only to these envelope recipients (the others were served).
        recipients: Option<Vec<String>>,
    },
    /// Never deliver again; keep it in the dead-letter queue with the reason.
    DeadLetter {
        /// Bounded reason label.
        reason: &'static str,
        /// Short explanation without recipients or content.
        detail: String,
        /// Attempts made.
        attempts: u32,
        /// The (given or derived) job id.
        job_id: String,
        /// The envelope recipients not served (the others were).
        recipients: Option<Vec<String>>,
    },
    /// Not processed (shutting down before the send started): give it back as it was.
    Requeue,
}

/// The settlement could not reach the broker; the broker will redeliver the message.
#[derive(Debug, thiserror::Error)]
#[error("settling the delivery failed: {0}")]
pub struct SettleError(pub String);

/// Settles one delivery; called once.
pub trait Settle: Send {
    /// Applies `settlement` and waits until the broker has it: a retry or dead-letter copy
    /// is confirmed before the original is acknowledged; acknowledgements may go out
    /// together with other jobs' (one `multiple` ack).
    fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), SettleError>>;
}

/// One job as delivered.
pub struct Delivery {
    /// The raw job.
    pub body: Arc<[u8]>,
    /// Which attempt this is, counting from 1.
    pub attempt: u32,
    /// When set, send only to these of the job's envelope recipients (a copy made after
    /// the others were served).
    pub recipients: Option<Vec<String>>,
    /// The way to settle it.
    pub settle: Box<dyn Settle>,
}

/// Yields deliveries, reconnecting as needed.
pub trait MessageSource: Send {
    /// The next delivery, or `None` once `stop` is cancelled.
    fn next(&mut self, stop: &CancellationToken) -> impl Future<Output = Option<Delivery>> + Send;

    /// Stops the broker from handing over more deliveries (shutdown). What it had already
    /// handed over and `next` never returned stays held: see `held` and `give_back`.
    fn stop_consuming(&mut self) -> impl Future<Output = ()> + Send;

    /// After `stop_consuming`: the next delivery the broker handed over before the stop, or
    /// `None` when no more is held.
    fn held(&mut self) -> impl Future<Output = Option<Delivery>> + Send;

    /// After `stop_consuming`: gives every delivery still held back to the broker unsent (a
    /// redelivery for another consumer); returns how many.
    fn give_back(&mut self) -> impl Future<Output = usize> + Send;

    /// Closes the connection after every in-flight delivery was settled; what was fetched
    /// but never handed out goes back to the queue.
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// The source cannot be set up (before any connection was tried).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// RabbitMQ: the CA file.
    #[error(transparent)]
    Rabbit(#[from] rabbitmq::SetupError),
    /// Kafka: a setting librdkafka refuses.
    #[error(transparent)]
    Kafka(#[from] kafka::SetupError),
}

/// The configured source.
pub enum Source {
    /// A RabbitMQ queue.
    Rabbit(Box<rabbitmq::RabbitSource>),
    /// A Kafka topic.
    Kafka(Box<kafka::KafkaSource>),
}

impl Source {
    /// The source `config` names, with its topology plan.
    pub fn from_config(
        config: &Config,
        health: Arc<Health>,
        metrics: Metrics,
    ) -> Result<Source, SetupError> {
        Ok(match &config.source {
            SourceConfig::Rabbit(amqp) => {
                let plan = amqp.settings.plan(&config.retry);
                Source::Rabbit(Box::new(rabbitmq::RabbitSource::new(
                    amqp.clone(),
                    plan,
                    health,
                    metrics,
                )?))
            }
            SourceConfig::Kafka(kafka) => {
                let plan = kafka.settings.plan(&config.retry);
                Source::Kafka(Box::new(kafka::KafkaSource::new(
                    kafka.clone(),
                    plan,
                    health,
                    metrics,
                )?))
            }
        })
    }
}

impl MessageSource for Source {
    async fn next(&mut self, stop: &CancellationToken) -> Option<Delivery> {
        match self {
            Source::Rabbit(source) => source.next(stop).await,
            Source::Kafka(source) => source.next(stop).await,
        }
    }

    async fn stop_consuming(&mut self) {
        match self {
            Source::Rabbit(source) => source.stop_consuming().await,
            Source::Kafka(source) => source.stop_consuming().await,
        }
    }

    async fn held(&mut self) -> Option<Delivery> {
        match self {
            Source::Rabbit(source) => source.held().await,
            Source::Kafka(source) => source.held().await,
        }
    }

    async fn give_back(&mut self) -> usize {
        match self {
            Source::Rabbit(source) => source.give_back().await,
            Source::Kafka(source) => source.give_back().await,
        }
    }

    async fn close(self) {
        match self {
            Source::Rabbit(source) => (*source).close().await,
            Source::Kafka(source) => (*source).close().await,
        }
    }
}

/// `text` cut to at most `max` bytes on a character boundary (a header value).
pub(crate) fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}
