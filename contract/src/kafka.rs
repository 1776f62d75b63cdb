//! Kafka over rdkafka (feature `kafka`): the client settings every mailpipe client of a
//! pipeline's brokers uses (bootstrap servers, TLS, SASL), and the topic plan compared with
//! what the brokers hold and created where missing. The worker (declare or verify) and the
//! operator go through this one implementation, so both create the same topics.
//!
//! Reading the brokers' metadata blocks (librdkafka has no async metadata call): callers on an
//! async runtime run [`existing_partitions`] on a blocking thread.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{Client, ClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};

use crate::choices::SaslMechanism;
use crate::topics::{TopicDecl, TopicPlan};

/// A SASL login. The password is a secret: the type's `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct SaslLogin {
    /// The mechanism.
    pub mechanism: SaslMechanism,
    /// The user name.
    pub username: String,
    /// The password.
    pub password: String,
}

impl std::fmt::Debug for SaslLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaslLogin")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("password", &"***")
            .finish()
    }
}

/// Where a pipeline's Kafka brokers are and how to reach them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// `host:port` of the bootstrap brokers, comma-separated.
    pub bootstrap: String,
    /// TLS: verify the brokers with the PEM CA bundle in this file (`None` with `tls` and
    /// no `ca_pem`: the system roots).
    pub ca_file: Option<PathBuf>,
    /// TLS: verify the brokers with this PEM CA bundle (the operator, which reads it from
    /// a Secret and keeps it in memory).
    pub ca_pem: Option<String>,
    /// Whether the connection uses TLS (always, when a CA file is given).
    pub tls: bool,
    /// SASL login, if the brokers ask for one.
    pub sasl: Option<SaslLogin>,
}

impl Connection {
    /// The librdkafka settings for these brokers. TLS verifies the brokers' certificates and
    /// host names (librdkafka's defaults, set here explicitly so no default change can turn
    /// them off).
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap);
        let tls = self.tls || self.ca_file.is_some() || self.ca_pem.is_some();
        let protocol = match (tls, self.sasl.is_some()) {
            (false, false) => "plaintext",
            (true, false) => "ssl",
            (false, true) => "sasl_plaintext",
            (true, true) => "sasl_ssl",
        };
        config.set("security.protocol", protocol);
        if tls {
            config
                .set("enable.ssl.certificate.verification", "true")
                .set("ssl.endpoint.identification.algorithm", "https");
            if let Some(ca) = &self.ca_file {
                config.set("ssl.ca.location", ca.display().to_string());
            }
            if let Some(pem) = &self.ca_pem {
                config.set("ssl.ca.pem", pem);
            }
        }
        if let Some(sasl) = &self.sasl {
            config
                .set("sasl.mechanism", sasl.mechanism.as_str())
                .set("sasl.username", &sasl.username)
                .set("sasl.password", &sasl.password);
        }
        config
    }
}

/// A topic that exists with another partition count than the plan's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    /// The topic.
    pub topic: String,
    /// Partitions it has.
    pub has: i32,
    /// Partitions the plan asks for.
    pub wants: i32,
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "topic {} has {} partitions, the pipeline asks for {}",
            self.topic, self.has, self.wants
        )
    }
}

/// The plan against what the brokers hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Comparison {
    /// Topics of the plan that do not exist.
    pub missing: Vec<TopicDecl>,
    /// Topics that exist with another partition count (partitions are never removed).
    pub drift: Vec<Drift>,
}

/// Compares `plan` with the partition counts of the topics that exist.
pub fn compare(plan: &TopicPlan, existing: &BTreeMap<String, i32>) -> Comparison {
    let mut comparison = Comparison::default();
    for topic in &plan.topics {
        match existing.get(&topic.name) {
            None => comparison.missing.push(topic.clone()),
            Some(&has) if has != topic.partitions => comparison.drift.push(Drift {
                topic: topic.name.clone(),
                has,
                wants: topic.partitions,
            }),
            Some(_) => {}
        }
    }
    comparison
}

/// The partition count of every topic the brokers list. Blocks up to `timeout`.
pub fn existing_partitions<C: ClientContext>(
    client: &Client<C>,
    timeout: Duration,
) -> Result<BTreeMap<String, i32>, KafkaError> {
    let metadata = client.fetch_metadata(None, timeout)?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name().to_string(), t.partitions().len() as i32))
        .collect())
}

/// Creates `topics`; one that another client created meanwhile counts as created.
pub async fn create<C: ClientContext + 'static>(
    admin: &AdminClient<C>,
    topics: &[TopicDecl],
    timeout: Duration,
) -> Result<(), KafkaError> {
    if topics.is_empty() {
        return Ok(());
    }
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            t.config.iter().fold(
                NewTopic::new(
                    &t.name,
                    t.partitions,
                    TopicReplication::Fixed(t.replication.into()),
                ),
                |topic, (key, value)| topic.set(key, value),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(timeout));
    for result in admin.create_topics(&new, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(())
}

/// One partition of a topic as a consumer group stands on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLag {
    /// The partition.
    pub partition: i32,
    /// The offset the group committed, `None` when it never did.
    pub committed: Option<i64>,
    /// The first offset still held.
    pub low: i64,
    /// The offset after the last written.
    pub high: i64,
}

impl PartitionLag {
    /// Records the group has not consumed: from its committed offset (or, never committed,
    /// from the first record still held, where `auto.offset.reset=earliest` starts) to the
    /// end.
    pub fn lag(&self) -> i64 {
        let from = self.committed.unwrap_or(self.low).max(self.low);
        (self.high - from).max(0)
    }
}

/// How far the consumer group of `consumer` (created with its `group.id`, never subscribed)
/// is behind on `topic`'s `partitions`: the committed offsets (OffsetFetch) against each
/// partition's watermarks (ListOffsets). Blocks up to `timeout` per call.
pub fn group_lag<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> Result<Vec<PartitionLag>, KafkaError> {
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition(topic, partition);
    }
    let committed = consumer.committed_offsets(list, timeout)?;
    (0..partitions)
        .map(|partition| {
            let (low, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
            let committed = match committed
                .find_partition(topic, partition)
                .map(|e| e.offset())
            {
                Some(Offset::Offset(offset)) => Some(offset),
                _ => None,
            };
            Ok(PartitionLag {
                partition,
                committed,
                low,
                high,
            })
        })
        .collect()
}

/// Deletes `topics`; one already gone counts as deleted.
pub async fn delete<C: ClientContext + 'static>(
    admin: &AdminClient<C>,
    topics: &[&str],
    timeout: Duration,
) -> Result<(), KafkaError> {
    if topics.is_empty() {
        return Ok(());
    }
    let options = AdminOptions::new().operation_timeout(Some(timeout));
    for result in admin.delete_topics(topics, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topics::TopicRole;

    fn plan() -> TopicPlan {
        let topic = |name: &str, role| TopicDecl {
            name: name.into(),
            partitions: 3,
            replication: 1,
            role,
            config: BTreeMap::new(),
        };
        TopicPlan {
            topics: vec![
                topic("jobs", TopicRole::Work),
                topic(
                    "jobs-retry-5000ms",
                    TopicRole::Retry(Duration::from_secs(5)),
                ),
                topic("jobs-dlq", TopicRole::DeadLetter),
            ],
        }
    }

    #[test]
    fn missing_topics_and_other_partition_counts_are_told_apart() {
        let existing = BTreeMap::from([("jobs".to_string(), 6), ("jobs-dlq".to_string(), 3)]);
        let comparison = compare(&plan(), &existing);
        assert_eq!(
            comparison
                .missing
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>(),
            ["jobs-retry-5000ms"]
        );
        assert_eq!(
            comparison.drift,
            [Drift {
                topic: "jobs".into(),
                has: 6,
                wants: 3
            }]
        );
    }

    #[test]
    fn lag_counts_from_the_committed_offset_or_the_first_record_held() {
        let at = |committed, low, high| PartitionLag {
            partition: 0,
            committed,
            low,
            high,
        };
        assert_eq!(at(Some(40), 0, 100).lag(), 60);
        assert_eq!(at(None, 0, 100).lag(), 100, "never committed: all of it");
        assert_eq!(
            at(None, 30, 100).lag(),
            70,
            "from the first record still held"
        );
        assert_eq!(
            at(Some(10), 30, 100).lag(),
            70,
            "records deleted past the commit are not lag"
        );
        assert_eq!(at(Some(100), 0, 100).lag(), 0);
    }

    #[test]
    fn the_client_settings_follow_tls_and_sasl_and_never_show_the_password() {
        let mut connection = Connection {
            bootstrap: "k1:9092,k2:9092".into(),
            ca_file: None,
            ca_pem: None,
            tls: false,
            sasl: None,
        };
        let plain = connection.client_config();
        assert_eq!(plain.get("security.protocol"), Some("plaintext"));
        assert_eq!(plain.get("bootstrap.servers"), Some("k1:9092,k2:9092"));
        connection.ca_file = Some("/etc/kafka/ca.pem".into());
        connection.sasl = Some(SaslLogin {
            mechanism: SaslMechanism::ScramSha512,
            username: "mailer".into(),
            password: "s3cret".into(),
        });
        let secure = connection.client_config();
        assert_eq!(secure.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(secure.get("ssl.ca.location"), Some("/etc/kafka/ca.pem"));
        assert_eq!(
            secure.get("enable.ssl.certificate.verification"),
            Some("true")
        );
        assert_eq!(secure.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert!(!format!("{connection:?}").contains("s3cret"));
    }
}
