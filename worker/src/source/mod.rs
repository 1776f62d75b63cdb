//! The source seam: where jobs come from and how each one is settled.
//!
//! A [`MessageSource`] yields [`Delivery`]s; each delivery carries a [`Settle`] handle that
//! the pipeline calls exactly once with a [`Settlement`]. RabbitMQ ([`rabbitmq`]) acks,
//! publishes to delay or dead-letter queues and nacks; a Kafka source will store offsets and
//! produce to retry topics behind the same two traits. The source owns reconnecting.

mod acks;
pub mod offsets;
pub mod rabbitmq;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

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
