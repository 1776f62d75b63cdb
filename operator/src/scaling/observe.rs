//! observe (broker required): the backlog the scaler decides on, read over one long-lived
//! connection per broker, shared by every pipeline on it and re-established with backoff.
//!
//! Counts come from passive declares (instant; the management API's figures refresh only
//! every 5 s by default). The work queue's ready jobs are work a new replica could take
//! now; jobs waiting out a retry delay and dead letters are counted apart, since another
//! replica could do nothing with them yet (or ever). Kafka's lag joins through the same
//! [`Reading`] when its source lands.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use lapin::{Channel, Connection};
use mailpipe_contract::amqp;
use mailpipe_contract::naming;
use mailpipe_contract::topology::{RabbitSettings, TopologyPlan};

use super::policy::Work;
use crate::topology::rabbitmq::{classify, BrokerKey, Connections};
use crate::topology::TopologyError;

/// A RabbitMQ pipeline's queues as the scaler sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueBacklog {
    /// Jobs ready in the work queue.
    pub ready: u64,
    /// Consumers of the work queue.
    pub consumers: u32,
    /// Jobs waiting out a retry delay (in any delay queue of the plan).
    pub delayed: u64,
    /// Jobs in the dead-letter queue, when the pipeline has one.
    pub dead_letter: Option<u64>,
}

/// A Kafka pipeline's consumer-group lag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicLag {
    /// The work topic's committed offset to high watermark, per partition (a partition
    /// never committed counts from its low watermark).
    pub per_partition: Vec<u64>,
    /// Records of the retry topics not consumed yet (jobs waiting out a delay).
    pub delayed: u64,
    /// Records in the dead-letter topic, when the pipeline has one.
    pub dead_letter: Option<u64>,
}

/// Reads a Kafka pipeline's lag: OffsetFetch and ListOffsets for each of its topics (a
/// client of its own per reading; librdkafka's calls block, so on a blocking thread).
pub async fn read_lag(
    connection: mailpipe_contract::kafka::Connection,
    kafka: &crate::validate::KafkaTarget,
) -> Result<TopicLag, TopologyError> {
    let topology = crate::topology::kafka::KafkaTopology::new(
        connection,
        kafka.plan.clone(),
        kafka.group.clone(),
    );
    let work = kafka.plan.work().to_string();
    let dead_letter = naming::dead_letter_topic(&work);
    let topics = topology.backlog_by_partition().await?;
    let mut lag = TopicLag {
        per_partition: Vec::new(),
        delayed: 0,
        dead_letter: None,
    };
    for (topic, per_partition) in topics {
        if topic == work {
            lag.per_partition = per_partition;
        } else if topic == dead_letter {
            lag.dead_letter = Some(per_partition.iter().sum());
        } else {
            lag.delayed += per_partition.iter().sum::<u64>();
        }
    }
    Ok(lag)
}

/// One reading of a pipeline's backlog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reading {
    Queue(QueueBacklog),
    Lag(TopicLag),
}

impl Reading {
    /// The work a new replica could take now. Unacknowledged jobs cannot be told over AMQP;
    /// the workers' own in-flight counts fill that in where the scaler has them.
    pub fn work(&self) -> Work {
        match self {
            Reading::Queue(q) => Work {
                ready: q.ready,
                in_flight: 0,
            },
            Reading::Lag(lag) => Work {
                ready: lag.per_partition.iter().sum(),
                in_flight: 0,
            },
        }
    }

    /// Partitions, for the policy's cap (Kafka only).
    pub fn partitions(&self) -> Option<u32> {
        match self {
            Reading::Queue(_) => None,
            Reading::Lag(lag) => Some(lag.per_partition.len() as u32),
        }
    }
}

/// The most channels kept idle per broker (readings beyond them open and close their own).
const IDLE_CHANNELS: usize = 32;

/// The scaler's broker connections, one per broker, and per broker the channels idle
/// between readings: readings run at once, each on a channel of its own (a channel answers
/// one declare at a time).
pub struct Brokers {
    connections: Connections,
    idle: Mutex<HashMap<BrokerKey, Vec<Channel>>>,
}

impl Default for Brokers {
    fn default() -> Self {
        Brokers::named("mailpipe-operator-scaler")
    }
}

impl Brokers {
    /// Connections the broker lists under `name`.
    pub fn named(name: &str) -> Brokers {
        Brokers {
            connections: Connections::named(name).backing_off(),
            idle: Mutex::default(),
        }
    }

    /// How many connections were opened so far (one per broker, plus one per reconnect).
    pub fn opened(&self) -> u64 {
        self.connections.opened()
    }

    /// The queues of a RabbitMQ pipeline (`settings`, `plan`) on the broker at `url`.
    pub async fn read_queues(
        &self,
        url: &str,
        ca: Option<&str>,
        settings: &RabbitSettings,
        plan: &TopologyPlan,
    ) -> Result<QueueBacklog, TopologyError> {
        self.read(url, ca, settings, plan, Reach::AllQueues).await
    }

    /// The work queue alone (one passive declare): `delayed` and `dead_letter` are left 0
    /// and unknown. The scaler decides on this and refreshes the rest less often.
    pub async fn read_work_queue(
        &self,
        url: &str,
        ca: Option<&str>,
        settings: &RabbitSettings,
        plan: &TopologyPlan,
    ) -> Result<QueueBacklog, TopologyError> {
        self.read(url, ca, settings, plan, Reach::WorkQueue).await
    }

    async fn read(
        &self,
        url: &str,
        ca: Option<&str>,
        settings: &RabbitSettings,
        plan: &TopologyPlan,
        reach: Reach,
    ) -> Result<QueueBacklog, TopologyError> {
        let key: BrokerKey = (url.to_string(), ca.map(str::to_string));
        let connection = self.connections.get(url, ca).await?;
        // A channel of a connection since replaced is no longer connected: dropped on use.
        let mut channel = self
            .idle
            .lock()
            .expect("idle channels lock")
            .get_mut(&key)
            .and_then(Vec::pop);
        let read = tokio::time::timeout(
            READ_TIMEOUT,
            count(&connection, &mut channel, settings, plan, reach),
        )
        .await;
        let read = match read {
            Ok(read) => read,
            Err(_) => Err(TopologyError::Unreachable(format!(
                "no answer within {READ_TIMEOUT:?}"
            ))),
        };
        match read {
            Ok(backlog) => {
                if let Some(channel) = channel.filter(|c| c.status().connected()) {
                    let mut idle = self.idle.lock().expect("idle channels lock");
                    let idle = idle.entry(key).or_default();
                    if idle.len() < IDLE_CHANNELS {
                        idle.push(channel);
                    } else {
                        tokio::spawn(async move {
                            let _ = channel.close(200, "enough idle channels".into()).await;
                        });
                    }
                }
                Ok(backlog)
            }
            Err(TopologyError::Unreachable(why)) => {
                // The connection is suspect: the next reading opens a new one.
                self.connections.lost(url, ca, &connection).await;
                self.idle.lock().expect("idle channels lock").remove(&key);
                Err(TopologyError::Unreachable(why))
            }
            Err(other) => Err(other),
        }
    }
}

/// How long one reading may take before its connection counts as lost.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Which queues a reading covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    AllQueues,
    WorkQueue,
}

/// Reads the queues `reach` covers over `channel` (opened on `connection` when there is
/// none or a failed declare closed it; left `None` when the last declare failed).
async fn count(
    connection: &Connection,
    channel: &mut Option<Channel>,
    settings: &RabbitSettings,
    plan: &TopologyPlan,
    reach: Reach,
) -> Result<QueueBacklog, TopologyError> {
    let dead_letter = settings
        .dead_letter
        .then(|| naming::dead_letter_queue(&settings.queue));
    let mut backlog = QueueBacklog {
        ready: 0,
        consumers: 0,
        delayed: 0,
        dead_letter: None,
    };
    let queues = plan
        .queues
        .iter()
        .filter(|q| reach == Reach::AllQueues || q.name == settings.queue);
    for queue in queues {
        let open = match channel.take().filter(|c| c.status().connected()) {
            Some(open) => open,
            None => connection.create_channel().await.map_err(classify)?,
        };
        let depth = amqp::depth(&open, &queue.name).await.map_err(classify);
        if depth.is_ok() {
            // A failed passive declare closes the channel: only a good one is kept.
            *channel = Some(open);
        }
        let (messages, consumers) = match depth {
            Ok(depth) => depth,
            // A delay queue of an earlier backoff setting may be gone: nothing in it.
            Err(TopologyError::Missing(_)) if queue.name != settings.queue => continue,
            Err(other) => return Err(other),
        };
        let messages = u64::from(messages);
        if queue.name == settings.queue {
            backlog.ready = messages;
            backlog.consumers = consumers;
        } else if Some(&queue.name) == dead_letter.as_ref() {
            backlog.dead_letter = Some(messages);
        } else {
            backlog.delayed += messages;
        }
    }
    Ok(backlog)
}
