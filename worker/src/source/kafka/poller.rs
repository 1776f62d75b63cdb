//! The poll thread: the one thread that calls librdkafka's `poll`, so rebalances are served
//! where the worker can wait for them.
//!
//! librdkafka runs rebalance callbacks inside `poll`, and a revocation must not return before
//! the revoked partitions' jobs in flight were settled and their offsets committed (else the
//! next owner starts before them and repeats them). The worker's jobs run on its async
//! runtime, so `poll` runs here, on a thread of its own, which may block in the callback while
//! the runtime finishes those jobs ([`Shared::settled`] wakes it).
//!
//! Records go to the runtime through a bounded channel. While it is full the thread waits
//! for room (serving callbacks at least every 100 ms) instead of fetching more. A record that
//! cannot go yet is held here, in its partition's queue: a retry record not yet due (each
//! retry topic's records fall due in the order they were written, so the head of a
//! partition decides; that partition is paused), or one polled while the channel was full.
//! Past a bound of held bytes every partition is paused until the holding is down again.
//! Held records were never handed out, so a revoked partition's held records are dropped:
//! nothing of them was committed, and the next owner reads them again.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mailpipe_contract::naming::headers;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Message, TopicPartitionList};
use tokio::sync::mpsc;

use super::offsets::Partition;
use super::{Fetched, Shared};
use crate::health::Component;

/// The consumer as the poll thread and the settlements share it.
pub(super) type KafkaConsumer = BaseConsumer<Context>;

/// How long a revocation waits for the revoked partitions' jobs in flight: a rebalance holds
/// the whole group, so a job slower than this is abandoned to the next owner (which repeats
/// it; with idempotency on, the repeat is skipped once this send is recorded).
const REVOKE_WAIT: Duration = Duration::from_secs(20);

/// Longest `poll` wait; also how often a paused partition's head is checked.
const POLL: Duration = Duration::from_millis(100);

/// How often a worker that lost its brokers asks them for metadata, to tell when they are
/// back even while there is nothing to consume.
const PROBE_EVERY: Duration = Duration::from_secs(5);

/// How often a full channel is looked at for room.
const ROOM_EVERY: Duration = Duration::from_millis(1);

/// The consumer's callbacks: rebalances and errors.
pub(super) struct Context {
    pub(super) shared: Arc<Shared>,
}

impl ClientContext for Context {
    /// librdkafka's statistics (every 5 s): each assigned partition's lag behind the
    /// offset stored as done, else behind the committed offset, else its whole length.
    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                if *partition < 0 || !self.shared.assigned(&(topic.clone(), *partition)) {
                    continue;
                }
                let lag = if p.consumer_lag_stored >= 0 {
                    p.consumer_lag_stored
                } else if p.consumer_lag >= 0 {
                    p.consumer_lag
                } else if p.hi_offset >= 0 && p.lo_offset >= 0 {
                    p.hi_offset - p.lo_offset
                } else {
                    continue;
                };
                self.shared
                    .metrics
                    .kafka_consumer_lag
                    .with_label_values(&[topic, &partition.to_string()])
                    .set(lag);
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let all_down = matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::AllBrokersDown)
        );
        if all_down {
            self.shared.health.set(Component::Broker, false);
            tracing::warn!(%reason, "no Kafka broker reachable; waiting for one");
        } else {
            tracing::debug!(%error, %reason, "kafka client error");
        }
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &KafkaConsumer, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let partitions = partitions_of(list);
                tracing::info!(partitions = ?names(&partitions), "partitions assigned");
                self.shared.assign(&partitions);
                self.shared.health.set(Component::Broker, true);
            }
            Rebalance::Revoke(list) => self.revoke(consumer, &partitions_of(list)),
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance failed"),
        }
    }

    fn post_rebalance(&self, consumer: &KafkaConsumer, rebalance: &Rebalance<'_>) {
        // A partition paused under an earlier assignment starts afresh: nothing is held for it.
        if let Rebalance::Assign(list) = rebalance {
            if let Err(error) = consumer.resume(list) {
                tracing::debug!(%error, "resuming assigned partitions");
            }
        }
    }
}

impl Context {
    /// Revocation: stop handing out the partitions, wait (bounded) for their jobs in flight,
    /// commit what they settled, forget them.
    fn revoke(&self, consumer: &KafkaConsumer, partitions: &[Partition]) {
        let lost = consumer.assignment_lost();
        self.shared.revoking(partitions);
        let wait = if lost || self.shared.closing.load(Ordering::SeqCst) {
            Duration::ZERO
        } else {
            REVOKE_WAIT
        };
        let open = self.shared.wait_settled(partitions, wait);
        if open > 0 {
            tracing::warn!(
                open,
                "partitions revoked with jobs still in flight; their next owner repeats them"
            );
        }
        if !lost {
            match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) => {}
                Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
                Err(error) => tracing::warn!(%error, "committing the revoked partitions' offsets"),
            }
        }
        self.shared.forget(partitions);
        for (topic, partition) in partitions {
            let _ = self
                .shared
                .metrics
                .kafka_consumer_lag
                .remove_label_values(&[topic, &partition.to_string()]);
        }
        tracing::info!(partitions = ?names(partitions), lost, "partitions revoked");
    }
}

fn partitions_of(list: &TopicPartitionList) -> Vec<Partition> {
    list.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

fn names(partitions: &[Partition]) -> Vec<String> {
    partitions.iter().map(|(t, p)| format!("{t}/{p}")).collect()
}

fn one(partition: &Partition) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    list.add_partition(&partition.0, partition.1);
    list
}

/// When a record may be handed out: its `not before` header (retry copies), else now.
fn not_before(message: &BorrowedMessage<'_>) -> Option<SystemTime> {
    let headers = message.headers()?;
    let millis = headers
        .iter()
        .find(|h| h.key == headers::NOT_BEFORE)?
        .value
        .and_then(|v| std::str::from_utf8(v).ok())?
        .parse::<u64>()
        .ok()?;
    Some(UNIX_EPOCH + Duration::from_millis(millis))
}

/// One fetched record, owned, with when it falls due.
fn fetched(message: &BorrowedMessage<'_>, generation: u64) -> (Fetched, Option<SystemTime>) {
    let record = Fetched {
        partition: (message.topic().to_string(), message.partition()),
        offset: message.offset(),
        generation,
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().unwrap_or_default().into(),
        headers: message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default(),
    };
    (record, not_before(message))
}

/// Records held back, per partition, in offset order, with what pausing they caused.
///
/// librdkafka drops what it fetched ahead for a partition when the partition is paused and
/// fetches it again on resume, so pausing for every full channel would turn each batch
/// into a new fetch. Records that merely wait for room are held here instead, up to `high`
/// bytes; only past that is every partition paused, until the holding is down to `low`.
/// A partition whose head is a retry not yet due is paused at once: nothing of it can go.
struct Held {
    queues: BTreeMap<Partition, VecDeque<(Fetched, Option<SystemTime>)>>,
    /// Bytes held, roughly (payloads, keys and headers).
    bytes: usize,
    /// Past this, every partition is paused.
    high: usize,
    /// Back under this, they resume.
    low: usize,
    /// Every partition is paused because the holding reached `high`.
    backpressure: bool,
    /// Partitions whose held head is not due yet.
    not_due: BTreeSet<Partition>,
    /// Partitions this thread paused (for either reason).
    paused: BTreeSet<Partition>,
}

impl Held {
    fn new(high: usize) -> Held {
        Held {
            queues: BTreeMap::new(),
            bytes: 0,
            high,
            low: high / 4,
            backpressure: false,
            not_due: BTreeSet::new(),
            paused: BTreeSet::new(),
        }
    }

    fn pause(&mut self, consumer: &KafkaConsumer, partition: &Partition) {
        if self.paused.insert(partition.clone()) {
            set_paused(consumer, &one(partition), true);
        }
    }

    fn resume(&mut self, consumer: &KafkaConsumer, partition: &Partition) {
        if self.paused.remove(partition) {
            set_paused(consumer, &one(partition), false);
        }
    }

    /// Pauses every assigned partition (the holding reached `high`).
    fn pause_all(&mut self, consumer: &KafkaConsumer) {
        self.backpressure = true;
        for partition in assigned(consumer) {
            self.pause(consumer, &partition);
        }
    }

    /// Resumes every partition paused for the holding (the holding is down to `low`).
    fn resume_all(&mut self, consumer: &KafkaConsumer) {
        self.backpressure = false;
        let paused: Vec<Partition> = self
            .paused
            .iter()
            .filter(|p| !self.not_due.contains(*p))
            .cloned()
            .collect();
        for partition in paused {
            self.resume(consumer, &partition);
        }
    }
}

/// The partitions assigned now.
fn assigned(consumer: &KafkaConsumer) -> Vec<Partition> {
    consumer
        .assignment()
        .map(|list| partitions_of(&list))
        .unwrap_or_default()
}

/// Roughly what a record takes in memory.
fn size(record: &Fetched) -> usize {
    record.payload.len()
        + record.key.as_ref().map_or(0, Vec::len)
        + record
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
        + 64
}

/// Runs the poll loop until `shared.closing`, then closes the consumer (committing what was
/// settled). At most `hold_bytes` of fetched records are held beside librdkafka's own queue.
pub(super) fn run(
    consumer: Arc<KafkaConsumer>,
    shared: Arc<Shared>,
    out: mpsc::Sender<Fetched>,
    hold_bytes: usize,
) {
    let mut held = Held::new(hold_bytes);
    let mut probed = Instant::now();
    let mut revocations = 0;
    while !shared.closing.load(Ordering::SeqCst) {
        if !shared.health.is_up(Component::Broker) && probed.elapsed() >= PROBE_EVERY {
            probed = Instant::now();
            if consumer.fetch_metadata(None, POLL * 20).is_ok() {
                tracing::info!("Kafka brokers reachable again");
                shared.health.set(Component::Broker, true);
            }
        }
        let mut wait = POLL;
        if release(&consumer, &shared, &mut held, &out) {
            // The jobs make room as they take records: wait for it here rather than fetch
            // more to hold (or pause, which drops what librdkafka fetched ahead), still
            // serving librdkafka's callbacks (rebalances) at least every `POLL`.
            let until = Instant::now() + POLL;
            while out.capacity() == 0
                && Instant::now() < until
                && !shared.closing.load(Ordering::SeqCst)
            {
                std::thread::sleep(ROOM_EVERY);
            }
            if out.capacity() > 0 {
                continue;
            }
            wait = Duration::ZERO;
        }
        let wait = next_due(&held)
            .and_then(|due| due.duration_since(SystemTime::now()).ok())
            .map_or(wait, |until| until.min(wait));
        match consumer.poll(wait) {
            Some(Ok(message)) => {
                let Some(generation) = shared.generation(message.topic(), message.partition())
                else {
                    continue;
                };
                let (record, due) = fetched(&message, generation);
                drop(message);
                route(&consumer, &shared, &mut held, &out, record, due);
            }
            Some(Err(error)) => tracing::debug!(%error, "kafka consumer"),
            None => {}
        }
        let now_revoked = shared.revocations.load(Ordering::SeqCst);
        if now_revoked != revocations {
            revocations = now_revoked;
            drop_revoked(&consumer, &shared, &mut held);
        }
    }
    let unsent: usize = held.queues.values().map(VecDeque::len).sum();
    shared.held_at_close.store(unsent, Ordering::SeqCst);
    close(consumer);
}

/// Commits what was settled and leaves the group: dropping the last handle closes the
/// consumer (the revocation callback runs once more, without waiting, since nothing is in
/// flight any more).
fn close(consumer: Arc<KafkaConsumer>) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(error) => tracing::warn!(%error, "committing offsets at shutdown"),
    }
    drop(consumer);
}

/// Pauses or resumes `list`, logging (at debug) what librdkafka refuses.
fn set_paused(consumer: &KafkaConsumer, list: &TopicPartitionList, pause: bool) {
    let result = if pause {
        consumer.pause(list)
    } else {
        consumer.resume(list)
    };
    if let Err(error) = result {
        tracing::debug!(%error, pause, "pausing or resuming partitions");
    }
}

/// A new record: handed out at once when its partition holds nothing back, it is due and
/// the channel has room; else held.
fn route(
    consumer: &KafkaConsumer,
    shared: &Shared,
    held: &mut Held,
    out: &mpsc::Sender<Fetched>,
    record: Fetched,
    due: Option<SystemTime>,
) {
    let partition = record.partition.clone();
    let waiting = held.queues.get(&partition).is_some_and(|q| !q.is_empty());
    let ready = due.is_none_or(|d| d <= SystemTime::now());
    let record = if !waiting && ready && !shared.stopped.load(Ordering::SeqCst) {
        match out.try_send(record) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(record)) => record,
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    } else {
        record
    };
    if !waiting && !ready {
        held.not_due.insert(partition.clone());
        held.pause(consumer, &partition);
    }
    held.bytes += size(&record);
    if held.bytes > held.high {
        if held.backpressure {
            // Assigned since the others were paused.
            held.pause(consumer, &partition);
        } else {
            held.pause_all(consumer);
        }
    }
    held.queues
        .entry(partition)
        .or_default()
        .push_back((record, due));
}

/// Hands out the held records that are due while the channel has room; resumes what can
/// fetch again. True when the channel filled up.
fn release(
    consumer: &KafkaConsumer,
    shared: &Shared,
    held: &mut Held,
    out: &mpsc::Sender<Fetched>,
) -> bool {
    if shared.stopped.load(Ordering::SeqCst) || held.queues.is_empty() {
        return false;
    }
    let now = SystemTime::now();
    let mut full = false;
    let mut emptied = Vec::new();
    for (partition, queue) in &mut held.queues {
        while let Some((_, due)) = queue.front() {
            if due.is_some_and(|d| d > now) {
                break;
            }
            let Ok(permit) = out.try_reserve() else {
                full = true;
                break;
            };
            let (record, _) = queue.pop_front().expect("a front");
            held.bytes = held.bytes.saturating_sub(size(&record));
            permit.send(record);
        }
        if queue.is_empty() {
            emptied.push(partition.clone());
        }
        if full {
            break;
        }
    }
    for partition in emptied {
        held.queues.remove(&partition);
        if held.not_due.remove(&partition) && !held.backpressure {
            held.resume(consumer, &partition);
        }
    }
    if held.backpressure && held.bytes < held.low {
        held.resume_all(consumer);
    }
    full
}

/// When the earliest held head falls due.
fn next_due(held: &Held) -> Option<SystemTime> {
    held.queues
        .values()
        .filter_map(|q| q.front().and_then(|(_, due)| *due))
        .min()
}

/// Drops the held records of partitions no longer assigned (or assigned anew since), and
/// pauses again what still needs it (a new assignment starts resumed).
fn drop_revoked(consumer: &KafkaConsumer, shared: &Shared, held: &mut Held) {
    held.queues.retain(|partition, queue| {
        let current = shared.generation(&partition.0, partition.1);
        queue.retain(|(record, _)| Some(record.generation) == current);
        !queue.is_empty()
    });
    held.bytes = held
        .queues
        .values()
        .flat_map(|q| q.iter().map(|(record, _)| size(record)))
        .sum();
    let queues = &held.queues;
    held.not_due
        .retain(|partition| queues.contains_key(partition));
    // A new assignment starts resumed (post_rebalance); what is held decides again, and a
    // partition kept through the rebalance is resumed unless it still needs the pause.
    let before = std::mem::take(&mut held.paused);
    held.backpressure = false;
    for partition in held.not_due.clone() {
        held.pause(consumer, &partition);
    }
    if held.bytes > held.low {
        held.pause_all(consumer);
    }
    let kept = assigned(consumer);
    for partition in before.difference(&held.paused) {
        if kept.contains(partition) {
            set_paused(consumer, &one(partition), false);
        }
    }
}
