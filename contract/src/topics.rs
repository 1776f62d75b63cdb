//! The Kafka topics of one pipeline, as plain data.
//!
//! [`KafkaSettings::plan`] turns the topic users name (e.g. `email-events`), its partitions
//! and replication, and the retry policy into every topic the pipeline needs. The worker
//! creates (or only checks) this plan; the operator creates the same plan from an
//! `EmailPipeline`, so both agree on names and sizes.
//!
//! Shape: producers write to `topic`; a job that failed transiently is copied to
//! `topic-retry-<ms>ms` (one topic per distinct delay of the policy, so each one's records
//! fall due in the order they were written) and consumed again once due; a job that can never
//! be sent is copied to `topic-dlq`. Every topic has the work topic's partition count, so the
//! consumers that share the work share the retries too.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::naming;
use crate::retry::RetryPolicy;
use crate::topology::InvalidTopology;

/// Longest topic name Kafka accepts.
const MAX_TOPIC_NAME: usize = 249;

/// What a user configures about a Kafka pipeline's topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSettings {
    /// The topic producers write jobs to.
    pub topic: String,
    /// Partitions of the topics created.
    pub partitions: i32,
    /// Replication factor of the topics created.
    pub replication: i16,
    /// Whether jobs that can never be sent are kept in the dead-letter topic.
    pub dead_letter: bool,
    /// Topic configuration (`retention.ms`, say) for every topic created.
    pub config: BTreeMap<String, String>,
}

/// What one topic of the plan is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicRole {
    /// The topic producers write to.
    Work,
    /// Jobs waiting this long before their next attempt.
    Retry(Duration),
    /// Jobs kept for a person to look at.
    DeadLetter,
}

/// One topic to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicDecl {
    /// Its name.
    pub name: String,
    /// Partitions.
    pub partitions: i32,
    /// Replication factor.
    pub replication: i16,
    /// What it holds.
    pub role: TopicRole,
    /// Configuration set at creation.
    pub config: BTreeMap<String, String>,
}

/// Every topic of a pipeline: the work topic first, then the retry topics shortest delay
/// first, then the dead-letter topic (when dead-lettering is on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPlan {
    /// The topics.
    pub topics: Vec<TopicDecl>,
}

impl TopicPlan {
    /// The topics the worker consumes: the work topic and the retry topics.
    pub fn consumed(&self) -> impl Iterator<Item = &TopicDecl> {
        self.topics
            .iter()
            .filter(|t| !matches!(t.role, TopicRole::DeadLetter))
    }

    /// The work topic's name.
    pub fn work(&self) -> &str {
        &self.topics[0].name
    }
}

/// Whether `name` is a topic name Kafka accepts (ASCII letters, digits, `.`, `_`, `-`;
/// 1 to 249 bytes; not `.` or `..`).
fn legal_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TOPIC_NAME
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl KafkaSettings {
    /// Refuses what Kafka would refuse, with a message that says what to change.
    pub fn validate(&self, retry: &RetryPolicy) -> Result<(), InvalidTopology> {
        let bad = |m: String| Err(InvalidTopology(m));
        if !legal_topic(&self.topic) {
            return bad(format!(
                "topic {:?} is not a Kafka topic name: 1 to {MAX_TOPIC_NAME} of A-Z a-z 0-9 . _ -",
                self.topic
            ));
        }
        if !(1..=10_000).contains(&self.partitions) {
            return bad("partitions must be between 1 and 10000".into());
        }
        if !(1..=16).contains(&self.replication) {
            return bad("replication factor must be between 1 and 16".into());
        }
        if let Some(long) = self
            .plan(retry)
            .topics
            .into_iter()
            .find(|t| t.name.len() > MAX_TOPIC_NAME)
        {
            return bad(format!(
                "topic name too long: its retry or dead-letter topic {} would exceed {MAX_TOPIC_NAME} bytes",
                long.name
            ));
        }
        Ok(())
    }

    /// Every topic for these settings and retry policy.
    pub fn plan(&self, retry: &RetryPolicy) -> TopicPlan {
        let topic = |name: String, role| TopicDecl {
            name,
            partitions: self.partitions,
            replication: self.replication,
            role,
            config: self.config.clone(),
        };
        let mut topics = vec![topic(self.topic.clone(), TopicRole::Work)];
        for delay in retry.distinct_delays() {
            topics.push(topic(
                naming::retry_topic(&self.topic, delay),
                TopicRole::Retry(delay),
            ));
        }
        if self.dead_letter {
            topics.push(topic(
                naming::dead_letter_topic(&self.topic),
                TopicRole::DeadLetter,
            ));
        }
        TopicPlan { topics }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(topic: &str) -> KafkaSettings {
        KafkaSettings {
            topic: topic.into(),
            partitions: 3,
            replication: 1,
            dead_letter: true,
            config: BTreeMap::new(),
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial: Duration::from_secs(5),
            multiplier: 2.0,
            max: Duration::from_secs(15),
        }
    }

    #[test]
    fn the_plan_has_the_work_topic_one_retry_topic_per_delay_and_the_dead_letter_topic() {
        let plan = settings("email-events").plan(&policy());
        let names: Vec<&str> = plan.topics.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "email-events",
                "email-events-retry-5000ms",
                "email-events-retry-10000ms",
                "email-events-retry-15000ms",
                "email-events-dlq"
            ]
        );
        assert!(plan.topics.iter().all(|t| t.partitions == 3));
        assert_eq!(plan.work(), "email-events");
        assert_eq!(
            plan.consumed().count(),
            4,
            "the dead-letter topic is not consumed"
        );
    }

    #[test]
    fn without_dead_lettering_there_is_no_dead_letter_topic() {
        let mut s = settings("jobs");
        s.dead_letter = false;
        assert!(s
            .plan(&policy())
            .topics
            .iter()
            .all(|t| t.role != TopicRole::DeadLetter));
    }

    #[test]
    fn names_kafka_refuses_are_refused_with_the_reason() {
        for bad in ["", "a b", "..", "emails/x", &"x".repeat(250)] {
            assert!(settings(bad).validate(&policy()).is_err(), "{bad:?}");
        }
        let long = settings(&"x".repeat(240)).validate(&policy()).unwrap_err();
        assert!(long.to_string().contains("retry"), "{long}");
        assert!(settings("email-events.v1_x").validate(&policy()).is_ok());
        let mut none = settings("jobs");
        none.partitions = 0;
        assert!(none.validate(&policy()).is_err());
    }
}
