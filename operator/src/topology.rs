//! topology (broker client required): the `BrokerTopology` seam. The reconciler ensures a
//! pipeline's exchanges, queues and bindings (or topics) exist, and deletes the topology
//! when the pipeline goes with `deletionPolicy: Delete`, only when a census found nothing
//! left in it. The scaler reads backlogs itself (`scaling::observe`).
//! Implementations: `rabbitmq` and `kafka`, picked for a pipeline as a
//! [`PipelineTopology`].

pub mod kafka;
pub mod management;
pub mod rabbitmq;

use std::future::Future;

/// Every queue of a topology with what it holds, for a deletion to decide on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Census {
    /// Each existing queue (work, retry delay queues, dead-letter queue) and its ready jobs.
    pub queues: Vec<(String, u64)>,
    /// Consumers attached to the work queue.
    pub consumers: u32,
    /// The dead-letter queue's name, when there is one.
    pub dead_letter: Option<String>,
}

impl Census {
    /// The dead-letter queue, when it holds jobs (a person must redrive or purge them).
    pub fn dead_letters(&self) -> Option<(&str, u64)> {
        let name = self.dead_letter.as_deref()?;
        self.queues
            .iter()
            .find(|(q, n)| q == name && *n > 0)
            .map(|(q, n)| (q.as_str(), *n))
    }

    /// The first queue that still holds jobs.
    pub fn first_non_empty(&self) -> Option<(&str, u64)> {
        self.queues
            .iter()
            .find(|(_, n)| *n > 0)
            .map(|(q, n)| (q.as_str(), *n))
    }
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
///
/// Deleting one is a protocol the reconciler drives (see `cleanup`): stop the
/// intake, let the workers drain, stop them, and remove only what a census found empty with
/// no consumer left, so no job is dropped, in flight or waiting for a retry.
pub trait BrokerTopology {
    /// Declares what is missing; what exists with the same arguments is left alone.
    fn ensure(&self) -> impl Future<Output = Result<(), TopologyError>> + Send;
    /// Every queue with its ready jobs, and the work queue's consumers.
    fn census(&self) -> impl Future<Output = Result<Census, TopologyError>> + Send;
    /// Removes a binding of the work queue the spec no longer asks for (its exchange or
    /// routing key changed); one already gone is fine.
    fn retire_binding(
        &self,
        exchange: &str,
        routing_key: &str,
    ) -> impl Future<Output = Result<(), TopologyError>> + Send;
    /// Stops new jobs reaching the work queue (unbinds it from the producers' exchange).
    fn stop_intake(&self) -> impl Future<Output = Result<(), TopologyError>> + Send;
    /// Deletes the queues, then the exchanges nothing else uses. Only after a census found
    /// every queue empty, no consumer, and the intake stopped.
    fn remove(&self) -> impl Future<Output = Result<(), TopologyError>> + Send;
}

/// The topology of one pipeline, on the broker its source names.
#[derive(Debug)]
pub enum PipelineTopology {
    /// Exchanges and queues on RabbitMQ.
    Rabbit(Box<rabbitmq::RabbitTopology>),
    /// Topics on Kafka.
    Kafka(kafka::KafkaTopology),
}

impl BrokerTopology for PipelineTopology {
    async fn ensure(&self) -> Result<(), TopologyError> {
        match self {
            PipelineTopology::Rabbit(t) => t.ensure().await,
            PipelineTopology::Kafka(t) => t.ensure().await,
        }
    }

    async fn census(&self) -> Result<Census, TopologyError> {
        match self {
            PipelineTopology::Rabbit(t) => t.census().await,
            PipelineTopology::Kafka(t) => t.census().await,
        }
    }

    async fn retire_binding(&self, exchange: &str, routing_key: &str) -> Result<(), TopologyError> {
        match self {
            PipelineTopology::Rabbit(t) => t.retire_binding(exchange, routing_key).await,
            PipelineTopology::Kafka(t) => t.retire_binding(exchange, routing_key).await,
        }
    }

    async fn stop_intake(&self) -> Result<(), TopologyError> {
        match self {
            PipelineTopology::Rabbit(t) => t.stop_intake().await,
            PipelineTopology::Kafka(t) => t.stop_intake().await,
        }
    }

    async fn remove(&self) -> Result<(), TopologyError> {
        match self {
            PipelineTopology::Rabbit(t) => t.remove().await,
            PipelineTopology::Kafka(t) => t.remove().await,
        }
    }
}
