//! The Kafka `BrokerTopology`: a pipeline's topics (work, retry, dead-letter) created with
//! rdkafka's admin client from the plan the worker checks; partitions never removed; the
//! census counts what the consumer group has not consumed, per topic.
//!
//! Kafka has no intake to stop (producers write to the topic itself) and nothing to unbind,
//! so those steps of the deletion protocol are no-ops: the topics are deleted once the group
//! consumed everything, the dead-letter topic is empty, and the workers are gone. librdkafka's
//! metadata and offset calls block, so they run on blocking threads.

use std::sync::Arc;
use std::time::Duration;

use mailpipe_contract::kafka::{self, Comparison, Connection};
use mailpipe_contract::topics::{TopicPlan, TopicRole};
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::{BrokerTopology, Census, TopologyError};

/// How long one call to the brokers may take.
const CALL: Duration = Duration::from_secs(10);

/// A Kafka pipeline's topics and consumer group.
#[derive(Clone)]
pub struct KafkaTopology {
    connection: Connection,
    plan: TopicPlan,
    group: String,
}

impl std::fmt::Debug for KafkaTopology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTopology")
            .field("bootstrap", &self.connection.bootstrap)
            .field("topic", &self.plan.work())
            .field("group", &self.group)
            .finish()
    }
}

/// Maps a client error to what the reconciler does about it.
pub fn classify(error: KafkaError) -> TopologyError {
    let code = error.rdkafka_error_code();
    let text = error.to_string();
    match code {
        Some(
            RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed,
        ) => TopologyError::Refused(text),
        Some(
            RDKafkaErrorCode::InvalidReplicationFactor
            | RDKafkaErrorCode::InvalidPartitions
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::InvalidConfig
            | RDKafkaErrorCode::PolicyViolation,
        ) => TopologyError::Conflict(text),
        _ => TopologyError::Unreachable(text),
    }
}

/// Runs a blocking client call on a blocking thread.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, TopologyError> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| TopologyError::Unreachable(e.to_string()))?
        .map_err(classify)
}

impl KafkaTopology {
    /// The topology of `plan` on the brokers of `connection`, consumed by `group`.
    pub fn new(connection: Connection, plan: TopicPlan, group: String) -> KafkaTopology {
        KafkaTopology {
            connection,
            plan,
            group,
        }
    }

    fn admin(&self) -> Result<Arc<AdminClient<DefaultClientContext>>, TopologyError> {
        self.connection
            .client_config()
            .create()
            .map(Arc::new)
            .map_err(|e| TopologyError::Refused(e.to_string()))
    }

    /// The partition count of every topic the brokers hold.
    async fn existing(
        &self,
        admin: &Arc<AdminClient<DefaultClientContext>>,
    ) -> Result<std::collections::BTreeMap<String, i32>, TopologyError> {
        let admin = admin.clone();
        blocking(move || kafka::existing_partitions(admin.inner(), CALL)).await
    }

    /// Records of each topic the group has not consumed (consumed topics), or holds (the
    /// dead-letter topic), per partition, for the topics that exist.
    pub async fn backlog_by_partition(&self) -> Result<Vec<(String, Vec<u64>)>, TopologyError> {
        let admin = self.admin()?;
        let existing = self.existing(&admin).await?;
        let mut config = self.connection.client_config();
        config
            .set("group.id", &self.group)
            .set("enable.auto.commit", "false");
        let consumer: BaseConsumer = config
            .create()
            .map_err(|e| TopologyError::Refused(e.to_string()))?;
        let consumer = Arc::new(consumer);
        let mut out = Vec::new();
        for topic in &self.plan.topics {
            let Some(&partitions) = existing.get(&topic.name) else {
                continue;
            };
            let consumer = consumer.clone();
            let name = topic.name.clone();
            let lags =
                blocking(move || kafka::group_lag(&consumer, &name, partitions, CALL)).await?;
            let records = lags
                .iter()
                .map(|p| match topic.role {
                    TopicRole::DeadLetter => (p.high - p.low).max(0) as u64,
                    _ => p.lag() as u64,
                })
                .collect();
            out.push((topic.name.clone(), records));
        }
        Ok(out)
    }
}

impl BrokerTopology for KafkaTopology {
    async fn ensure(&self) -> Result<(), TopologyError> {
        let admin = self.admin()?;
        let existing = self.existing(&admin).await?;
        let Comparison { missing, drift } = kafka::compare(&self.plan, &existing);
        // Partitions are never removed (that would drop records); more than asked is the
        // brokers' admins' call and works. Fewer cannot carry the asked parallelism.
        if let Some(fewer) = drift.iter().find(|d| d.has < d.wants) {
            return Err(TopologyError::Conflict(format!(
                "{fewer}; the operator never changes an existing topic's partitions: add them with the brokers' tools, or lower spec.source.kafka.partitions"
            )));
        }
        for more in drift.iter().filter(|d| d.has > d.wants) {
            tracing::info!(%more, "topic has more partitions than the pipeline asks for; kept");
        }
        kafka::create(&admin, &missing, CALL)
            .await
            .map_err(classify)
    }

    async fn census(&self) -> Result<Census, TopologyError> {
        let backlog = self.backlog_by_partition().await?;
        Ok(Census {
            queues: backlog
                .into_iter()
                .map(|(topic, records)| (topic, records.iter().sum()))
                .collect(),
            // The group's members cannot be counted on every broker (DescribeGroups); the
            // deletion protocol waits out the workers' grace period instead.
            consumers: 0,
            dead_letter: self
                .plan
                .topics
                .iter()
                .find(|t| t.role == TopicRole::DeadLetter)
                .map(|t| t.name.clone()),
        })
    }

    async fn retire_binding(&self, _: &str, _: &str) -> Result<(), TopologyError> {
        Ok(())
    }

    async fn stop_intake(&self) -> Result<(), TopologyError> {
        Ok(())
    }

    async fn remove(&self) -> Result<(), TopologyError> {
        let admin = self.admin()?;
        let names: Vec<&str> = self.plan.topics.iter().map(|t| t.name.as_str()).collect();
        kafka::delete(&admin, &names, CALL).await.map_err(classify)
    }
}
