//! topology (broker client required): the `BrokerTopology` seam. The reconciler ensures a
//! pipeline's exchanges, queues and bindings (or topics) exist, reads the backlog the scaler
//! and the status need, and deletes the topology when the pipeline goes with
//! `deletionPolicy: Delete`, only when nothing is left in it.
//! Implementations: `rabbitmq` (here); Kafka comes with the Kafka issue.

pub mod management;
pub mod rabbitmq;

use std::future::Future;

/// What a pipeline's broker holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// Jobs waiting in the work queue (or the consumer group's lag).
    pub ready: u64,
    /// Consumers attached now.
    pub consumers: u32,
    /// Jobs in the dead-letter queue, when there is one.
    pub dead_letter: Option<u64>,
}

/// The outcome of a deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// Everything is gone.
    Removed,
    /// `queue` still holds `messages` jobs: nothing was deleted.
    Waiting { queue: String, messages: u64 },
}

/// Why the broker did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    /// The broker cannot be reached (or dropped the connection): try again later.
    #[error("the broker is unreachable: {0}")]
    Unreachable(String),
    /// The broker refused the credentials or the virtual host.
    #[error("the broker refused the connection: {0}")]
    Refused(String),
    /// Something exists with other arguments than the pipeline asks for (RabbitMQ 406).
    #[error("the broker refused the declaration: {0}")]
    Conflict(String),
    /// A queue or exchange the operation needs is missing (RabbitMQ 404).
    #[error("missing on the broker: {0}")]
    Missing(String),
}

impl TopologyError {
    /// A bounded label for metrics and the reason of conditions and events.
    pub fn category(&self) -> &'static str {
        match self {
            TopologyError::Unreachable(_) => "BrokerUnreachable",
            TopologyError::Refused(_) => "BrokerRefused",
            TopologyError::Conflict(_) => "TopologyConflict",
            TopologyError::Missing(_) => "TopologyMissing",
        }
    }

    /// Whether waiting can fix it (else the spec, a Secret or the broker must change).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            TopologyError::Unreachable(_) | TopologyError::Missing(_)
        )
    }
}

/// A pipeline's broker topology.
pub trait BrokerTopology {
    /// Declares what is missing; what exists with the same arguments is left alone.
    fn ensure(&self) -> impl Future<Output = Result<(), TopologyError>> + Send;
    /// The backlog now.
    fn backlog(&self) -> impl Future<Output = Result<Backlog, TopologyError>> + Send;
    /// Deletes the topology if every queue or topic of it is empty.
    fn delete(&self) -> impl Future<Output = Result<Removal, TopologyError>> + Send;
}
