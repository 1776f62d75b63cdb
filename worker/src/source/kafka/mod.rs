//! Kafka source (rdkafka): one consumer group over the work topic and its retry topics;
//! retry and dead-letter copies produced before a record counts as done; offsets committed
//! only up to the first record of each partition not done yet.
//!
//! Flow: the poll thread ([`poller`]) fetches records and hands them out through a bounded
//! channel; [`KafkaSource::next`] wraps each as a [`Delivery`]; its settlement ([`settle`])
//! produces a copy when one is needed, then marks the record done in [`offsets`], which says
//! when a partition's committable offset moved; that offset is stored
//! (`enable.auto.offset.store=false`) and librdkafka commits what was stored every second, at
//! each revocation and at shutdown. A crash commits nothing past a record not done: the
//! records after the committed offset are read again (a repeat, never a loss; with
//! idempotency on, a repeat of a recorded send is skipped).
//!
//! At shutdown the poll thread stops handing out records; those already in the channel are
//! held ([`MessageSource::held`]) and sent while the drain deadline allows; the rest are
//! simply not committed, so another member reads them.

mod offsets;
mod poller;
mod settle;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use mailpipe_contract::kafka::{self as topics_io, Comparison};
use mailpipe_contract::naming::headers;
use mailpipe_contract::topics::TopicPlan;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::Consumer;
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::offsets::{Offsets, Partition};
use self::poller::{Context, KafkaConsumer};
use self::settle::{KafkaSettle, Settling};
use super::{Delivery, MessageSource};
use crate::backoff::Backoff;
use crate::config::{KafkaConfig, TopologyMode};
use crate::health::{Component, Health};
use crate::metrics::Metrics;

/// How long one call to the brokers' admin API may take.
const ADMIN_CALL: Duration = Duration::from_secs(10);

/// How long closing (committing, leaving the group) may take at shutdown.
const CLOSE_WITHIN: Duration = Duration::from_secs(10);

/// One fetched record, as the poll thread hands it to the runtime.
pub(super) struct Fetched {
    partition: Partition,
    offset: i64,
    /// The assignment of the partition it was fetched under.
    generation: u64,
    key: Option<Vec<u8>>,
    payload: Arc<[u8]>,
    headers: Vec<(String, Vec<u8>)>,
}

impl Fetched {
    /// A header's value as text.
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .and_then(|(_, value)| std::str::from_utf8(value).ok())
    }
}

/// An assigned partition.
struct Assigned {
    /// Bumped at each assignment, so a record or a settlement from an earlier one is told
    /// apart.
    generation: u64,
    /// Being revoked: nothing more is handed out; settlements still count.
    revoking: bool,
}

#[derive(Default)]
struct State {
    offsets: Offsets,
    assigned: HashMap<Partition, Assigned>,
    generations: u64,
}

/// What the poll thread, the source and the settlements share.
pub(super) struct Shared {
    state: Mutex<State>,
    /// Notified at each settlement (a revocation waits on it).
    settled: Condvar,
    /// The source is closing: the poll thread commits and leaves the group.
    closing: AtomicBool,
    /// Shutdown began: no more records are handed out.
    stopped: AtomicBool,
    /// Records the poll thread still held when it closed.
    held_at_close: AtomicUsize,
    /// Revocations so far (the poll thread drops what it holds of revoked partitions when
    /// this moved).
    revocations: AtomicUsize,
    health: Arc<Health>,
    metrics: Metrics,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn assign(&self, partitions: &[Partition]) {
        let mut state = self.lock();
        for partition in partitions {
            state.generations += 1;
            let generation = state.generations;
            state.offsets.forget(partition);
            state.assigned.insert(
                partition.clone(),
                Assigned {
                    generation,
                    revoking: false,
                },
            );
        }
    }

    fn revoking(&self, partitions: &[Partition]) {
        let mut state = self.lock();
        for partition in partitions {
            if let Some(assigned) = state.assigned.get_mut(partition) {
                assigned.revoking = true;
            }
        }
    }

    /// Waits up to `wait` until no job of `partitions` is in flight; returns how many are.
    fn wait_settled(&self, partitions: &[Partition], wait: Duration) -> usize {
        let deadline = Instant::now() + wait;
        let mut state = self.lock();
        loop {
            let open: usize = partitions.iter().map(|p| state.offsets.open(p)).sum();
            let left = deadline.saturating_duration_since(Instant::now());
            if open == 0 || left.is_zero() {
                return open;
            }
            state = self
                .settled
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn forget(&self, partitions: &[Partition]) {
        let mut state = self.lock();
        for partition in partitions {
            state.assigned.remove(partition);
            state.offsets.forget(partition);
        }
        self.revocations.fetch_add(1, Ordering::SeqCst);
    }

    /// The generation records of this partition are handed out under, unless it is not
    /// assigned or being revoked.
    fn generation(&self, topic: &str, partition: i32) -> Option<u64> {
        let state = self.lock();
        state
            .assigned
            .get(&(topic.to_string(), partition))
            .filter(|a| !a.revoking)
            .map(|a| a.generation)
    }

    /// Records `record` as handed out; false when its partition was revoked since it was
    /// fetched (it is dropped: the next owner reads it).
    fn hand_out(&self, record: &Fetched) -> bool {
        let mut state = self.lock();
        let current = state
            .assigned
            .get(&record.partition)
            .is_some_and(|a| a.generation == record.generation && !a.revoking);
        if current {
            state.offsets.delivered(&record.partition, record.offset);
        }
        current
    }

    /// Whether `partition` is still assigned as it was at `generation`.
    fn owns(&self, partition: &Partition, generation: u64) -> bool {
        self.lock()
            .assigned
            .get(partition)
            .is_some_and(|a| a.generation == generation)
    }

    /// `offset` of `partition` is done: stores the partition's committable offset when it
    /// moved, and wakes a revocation waiting for it.
    fn done(&self, consumer: &KafkaConsumer, partition: &Partition, offset: i64, generation: u64) {
        let mut state = self.lock();
        if state
            .assigned
            .get(partition)
            .is_none_or(|a| a.generation != generation)
        {
            return;
        }
        if let Some(next) = state.offsets.done(partition, offset) {
            let mut list = TopicPartitionList::new();
            let stored = list
                .add_partition_offset(&partition.0, partition.1, Offset::Offset(next))
                .and_then(|()| consumer.store_offsets(&list));
            if let Err(error) = stored {
                tracing::warn!(%error, topic = %partition.0, partition = partition.1, "storing an offset");
            }
        }
        drop(state);
        self.settled.notify_all();
    }

    /// Whether `partition` is assigned (and not being revoked).
    fn assigned(&self, partition: &Partition) -> bool {
        self.lock()
            .assigned
            .get(partition)
            .is_some_and(|a| !a.revoking)
    }
}

/// Consumes one pipeline's topics.
pub struct KafkaSource {
    config: KafkaConfig,
    plan: TopicPlan,
    shared: Arc<Shared>,
    /// The clients, until the source joins the group.
    clients: Option<(Arc<KafkaConsumer>, FutureProducer)>,
    live: Option<Live>,
}

struct Live {
    records: mpsc::Receiver<Fetched>,
    settling: Arc<Settling>,
    thread: std::thread::JoinHandle<()>,
}

/// The Kafka clients could not be created (a setting librdkafka refuses).
#[derive(Debug, thiserror::Error)]
#[error("cannot create the Kafka client: {0}")]
pub struct SetupError(String);

impl KafkaSource {
    /// Creates the Kafka clients (librdkafka checks their settings here); the source checks
    /// the topics and joins the group on the first `next`.
    pub fn new(
        config: KafkaConfig,
        plan: TopicPlan,
        health: Arc<Health>,
        metrics: Metrics,
    ) -> Result<KafkaSource, SetupError> {
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            settled: Condvar::new(),
            closing: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            held_at_close: AtomicUsize::new(0),
            revocations: AtomicUsize::new(0),
            health,
            metrics,
        });
        let setup = |e: rdkafka::error::KafkaError| SetupError(e.to_string());
        let mut consumer_config = config.connection.client_config();
        consumer_config
            .set("client.id", "mailpipe-worker")
            .set("group.id", &config.group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set(
                "queued.max.messages.kbytes",
                config.fetch_kbytes.to_string(),
            )
            .set("queued.min.messages", "1000")
            // Past those thresholds librdkafka waits this long before it fetches the
            // partition again (1 s by default): with a small fetch-ahead that wait, not the
            // brokers, would set the pace.
            .set("fetch.queue.backoff.ms", "10")
            .set("statistics.interval.ms", "5000")
            .set(
                "fetch.max.bytes",
                (u64::from(config.fetch_kbytes) * 1024)
                    .min(50 * 1024 * 1024)
                    .to_string(),
            );
        let consumer: KafkaConsumer = consumer_config
            .create_with_context(Context {
                shared: shared.clone(),
            })
            .map_err(setup)?;
        let mut producer_config = config.connection.client_config();
        producer_config
            .set("client.id", "mailpipe-worker")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("message.timeout.ms", "30000");
        let producer: FutureProducer = producer_config.create().map_err(setup)?;
        Ok(KafkaSource {
            config,
            plan,
            shared,
            clients: Some((Arc::new(consumer), producer)),
            live: None,
        })
    }

    /// Checks (and in declare mode creates) the topics, retrying until the brokers answer
    /// or `stop`; then joins the group and starts the poll thread.
    async fn start(&mut self, stop: &CancellationToken) -> Option<Result<(), SetupError>> {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            match self.topics().await {
                Ok(()) => break,
                Err(error) => {
                    self.shared.health.set(Component::Broker, false);
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, retry_in = ?delay, "Kafka topics not ready");
                    tokio::select! {
                        _ = stop.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        Some(self.join())
    }

    /// The topics of the plan, created where missing (declare) or required (verify).
    async fn topics(&self) -> Result<(), String> {
        let admin: AdminClient<DefaultClientContext> = self
            .config
            .connection
            .client_config()
            .create()
            .map_err(|e| e.to_string())?;
        let admin = Arc::new(admin);
        let existing = {
            let admin = admin.clone();
            tokio::task::spawn_blocking(move || {
                topics_io::existing_partitions(admin.inner(), ADMIN_CALL)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
        };
        let Comparison { missing, drift } = topics_io::compare(&self.plan, &existing);
        for drift in drift {
            tracing::warn!(%drift, "topic partitions differ from the configuration");
        }
        if missing.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = missing.iter().map(|t| t.name.as_str()).collect();
        match self.config.topology {
            TopologyMode::Verify => Err(format!(
                "topics missing (the operator creates them): {}",
                names.join(", ")
            )),
            TopologyMode::Declare => {
                topics_io::create(&admin, &missing, ADMIN_CALL)
                    .await
                    .map_err(|e| format!("creating topics {}: {e}", names.join(", ")))?;
                tracing::info!(topics = ?names, "created Kafka topics");
                Ok(())
            }
        }
    }

    /// Subscribes and starts the poll thread.
    fn join(&mut self) -> Result<(), SetupError> {
        let (consumer, producer) = self.clients.take().expect("joined once");
        let consumed: Vec<&str> = self.plan.consumed().map(|t| t.name.as_str()).collect();
        consumer
            .subscribe(&consumed)
            .map_err(|e| SetupError(e.to_string()))?;
        tracing::info!(topics = ?consumed, group = %self.config.group, "joined the consumer group");
        // Room for a few batches of jobs: the rest waits in librdkafka's queue.
        let (sender, records) = mpsc::channel(256);
        let thread = {
            let consumer = consumer.clone();
            let shared = self.shared.clone();
            // As much again as librdkafka may fetch ahead.
            let hold = self.config.fetch_kbytes as usize * 1024;
            std::thread::Builder::new()
                .name("kafka-poll".into())
                .spawn(move || poller::run(consumer, shared, sender, hold))
                .map_err(|e| SetupError(e.to_string()))?
        };
        self.shared.health.set(Component::Broker, true);
        self.live = Some(Live {
            records,
            settling: Arc::new(Settling::new(
                consumer,
                producer,
                self.shared.clone(),
                &self.plan,
                self.config.settings.dead_letter,
            )),
            thread,
        });
        Ok(())
    }

    fn wrap(&self, record: Fetched, settling: &Arc<Settling>) -> Delivery {
        let attempt = record
            .header(headers::ATTEMPT)
            .and_then(|a| a.parse::<u32>().ok())
            .map_or(1, |a| a.max(1));
        let recipients = record
            .header(headers::RECIPIENTS)
            .and_then(|list| serde_json::from_str::<Vec<String>>(list).ok());
        Delivery {
            body: record.payload.clone(),
            attempt,
            recipients,
            settle: Box::new(KafkaSettle::new(record, settling.clone())),
        }
    }
}

impl MessageSource for KafkaSource {
    async fn next(&mut self, stop: &CancellationToken) -> Option<Delivery> {
        if self.live.is_none() {
            match self.start(stop).await? {
                Ok(()) => {}
                Err(error) => {
                    tracing::error!(%error, "the Kafka source cannot start");
                    return None;
                }
            }
        }
        let live = self.live.as_mut()?;
        loop {
            let record = tokio::select! {
                biased;
                _ = stop.cancelled() => return None,
                record = live.records.recv() => record,
            };
            let Some(record) = record else {
                tracing::error!("the Kafka poll thread ended");
                return None;
            };
            if self.shared.hand_out(&record) {
                let settling = live.settling.clone();
                return Some(self.wrap(record, &settling));
            }
        }
    }

    async fn stop_consuming(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
    }

    async fn held(&mut self) -> Option<Delivery> {
        loop {
            let live = self.live.as_mut()?;
            let record = live.records.try_recv().ok()?;
            if self.shared.hand_out(&record) {
                let settling = live.settling.clone();
                return Some(self.wrap(record, &settling));
            }
        }
    }

    async fn give_back(&mut self) -> usize {
        let Some(live) = self.live.as_mut() else {
            return 0;
        };
        // Not committed, so the group reads them again.
        let mut returned = 0;
        while live.records.try_recv().is_ok() {
            returned += 1;
        }
        returned
    }

    async fn close(self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.settled.notify_all();
        if let Some(live) = self.live {
            let Live {
                records, thread, ..
            } = live;
            drop(records);
            // Leaving the group waits for the brokers; past this the process exits anyway.
            let joined = tokio::time::timeout(
                CLOSE_WITHIN,
                tokio::task::spawn_blocking(move || thread.join()),
            )
            .await;
            if joined.is_err() {
                tracing::warn!(within = ?CLOSE_WITHIN, "leaving the consumer group took too long; the brokers will notice the session end");
            }
            let held = self.shared.held_at_close.load(Ordering::SeqCst);
            tracing::debug!(held, "left the consumer group");
        }
        self.shared.health.set(Component::Broker, false);
    }
}
