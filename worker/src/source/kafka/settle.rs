//! How a Kafka record is settled: a retry copy to the retry topic of its delay, or a
//! dead-letter copy to the dead-letter topic, produced and acknowledged by the brokers
//! (`acks=all`) before the record counts as done; then its offset is marked done.
//!
//! A copy the brokers do not take is produced again, with backoff, for as long as this
//! worker still owns the record's partition: the record stays not done meanwhile, so nothing
//! past it is committed. Once the partition went to another member, the settlement gives up;
//! the new owner reads the record again.

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use mailpipe_contract::naming::{self, headers};
use mailpipe_contract::topics::{TopicPlan, TopicRole};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::poller::KafkaConsumer;
use super::{Fetched, Shared};
use crate::backoff::Backoff;
use crate::source::{truncate, Settle, SettleError, Settlement};

/// How long a produced copy may wait in the producer's queue for room.
const ENQUEUE: Duration = Duration::from_secs(5);

/// The headers a copy replaces rather than carries over.
const REPLACED: [&str; 9] = [
    headers::ATTEMPT,
    headers::NOT_BEFORE,
    headers::RECIPIENTS,
    headers::REASON,
    headers::DETAIL,
    headers::JOB_ID,
    headers::DEAD_LETTERED_AT,
    headers::ORIGINAL_TOPIC,
    headers::ORIGINAL_POSITION,
];

/// What every record of one consumer settles through.
pub(super) struct Settling {
    /// Weak: the poll thread holds the consumer and closes it by dropping it; a record
    /// settled after that stores nothing (it is read again).
    consumer: Weak<KafkaConsumer>,
    producer: FutureProducer,
    shared: Arc<Shared>,
    /// The retry topics, shortest delay first.
    retry_topics: Vec<(Duration, String)>,
    /// The dead-letter topic, when dead-lettering is on.
    dead_letter: Option<String>,
}

impl Settling {
    pub(super) fn new(
        consumer: Arc<KafkaConsumer>,
        producer: FutureProducer,
        shared: Arc<Shared>,
        plan: &TopicPlan,
        dead_letter: bool,
    ) -> Settling {
        let retry_topics = plan
            .topics
            .iter()
            .filter_map(|t| match t.role {
                TopicRole::Retry(delay) => Some((delay, t.name.clone())),
                _ => None,
            })
            .collect();
        Settling {
            consumer: Arc::downgrade(&consumer),
            producer,
            shared,
            retry_topics,
            dead_letter: dead_letter.then(|| naming::dead_letter_topic(plan.work())),
        }
    }

    /// The retry topic for a wait of `after`: the shortest planned delay not below it (the
    /// policy only asks for planned delays; any other rounds up, or to the longest).
    fn retry_topic(&self, after: Duration) -> Option<&str> {
        self.retry_topics
            .iter()
            .find(|(delay, _)| *delay >= after)
            .or(self.retry_topics.last())
            .map(|(_, name)| name.as_str())
    }
}

/// Settles one record.
pub(super) struct KafkaSettle {
    record: Fetched,
    settling: Arc<Settling>,
}

impl KafkaSettle {
    pub(super) fn new(record: Fetched, settling: Arc<Settling>) -> KafkaSettle {
        KafkaSettle { record, settling }
    }

    fn done(&self) {
        if let Some(consumer) = self.settling.consumer.upgrade() {
            self.settling.shared.done(
                &consumer,
                &self.record.partition,
                self.record.offset,
                self.record.generation,
            );
        }
    }

    /// The record's headers without those the copy sets, plus `extra`; where the job was
    /// first written is kept from an earlier copy, else taken from this record.
    fn copy_headers(&self, extra: Vec<(&'static str, String)>) -> OwnedHeaders {
        let record = &self.record;
        let mut out = OwnedHeaders::new_with_capacity(record.headers.len() + extra.len() + 2);
        for (key, value) in &record.headers {
            if !REPLACED.contains(&key.as_str()) {
                out = out.insert(Header {
                    key,
                    value: Some(value),
                });
            }
        }
        let topic = record
            .header(headers::ORIGINAL_TOPIC)
            .map_or_else(|| record.partition.0.clone(), str::to_string);
        let position = record.header(headers::ORIGINAL_POSITION).map_or_else(
            || format!("{}:{}", record.partition.1, record.offset),
            str::to_string,
        );
        for (key, value) in extra.into_iter().chain([
            (headers::ORIGINAL_TOPIC, topic),
            (headers::ORIGINAL_POSITION, position),
        ]) {
            out = out.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        out
    }

    /// Produces a copy to `topic` until the brokers acknowledge it, for as long as the
    /// record's partition is still this worker's.
    async fn produce(&self, topic: &str, headers: OwnedHeaders) -> Result<(), SettleError> {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            let mut copy = FutureRecord::to(topic)
                .payload(&self.record.payload[..])
                .headers(headers.clone());
            if let Some(key) = &self.record.key {
                copy = copy.key(&key[..]);
            }
            match self.settling.producer.send(copy, ENQUEUE).await {
                Ok(_) => return Ok(()),
                Err((error, _)) => {
                    self.settling.shared.metrics.broker_nacks.inc();
                    if !self
                        .settling
                        .shared
                        .owns(&self.record.partition, self.record.generation)
                    {
                        return Err(SettleError(format!(
                            "producing to {topic} failed ({error}) and the partition went to another member, which reads the record again"
                        )));
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(%topic, %error, retry_in = ?delay, "the brokers did not take the copy; the record stays not done");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn apply(self, settlement: Settlement) -> Result<(), SettleError> {
        match settlement {
            Settlement::Ack => {}
            // Not done: nothing past it is committed, so the group reads it again.
            Settlement::Requeue => return Ok(()),
            Settlement::Retry {
                next_attempt,
                after,
                recipients,
            } => {
                let Some(topic) = self.settling.retry_topic(after) else {
                    return Err(SettleError("no retry topic is configured".into()));
                };
                let due = SystemTime::now() + after;
                let due_millis = due
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis();
                let mut extra = vec![
                    (headers::ATTEMPT, next_attempt.to_string()),
                    (headers::NOT_BEFORE, due_millis.to_string()),
                ];
                extra.extend(recipients_header(recipients));
                let headers = self.copy_headers(extra);
                let topic = topic.to_string();
                self.produce(&topic, headers).await?;
            }
            Settlement::DeadLetter {
                reason,
                detail,
                attempts,
                job_id,
                recipients,
            } => {
                if let Some(topic) = self.settling.dead_letter.clone() {
                    let mut extra = vec![
                        (headers::REASON, reason.to_string()),
                        (headers::DETAIL, truncate(&detail, 500)),
                        (headers::ATTEMPT, attempts.to_string()),
                        (headers::JOB_ID, job_id),
                        (headers::DEAD_LETTERED_AT, chrono::Utc::now().to_rfc3339()),
                    ];
                    extra.extend(recipients_header(recipients));
                    let headers = self.copy_headers(extra);
                    self.produce(&topic, headers).await?;
                }
            }
        }
        self.done();
        Ok(())
    }
}

fn recipients_header(recipients: Option<Vec<String>>) -> Option<(&'static str, String)> {
    recipients.map(|list| {
        (
            headers::RECIPIENTS,
            serde_json::to_string(&list).expect("a list of strings serializes"),
        )
    })
}

impl Settle for KafkaSettle {
    fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), SettleError>> {
        Box::pin(self.apply(settlement))
    }
}
