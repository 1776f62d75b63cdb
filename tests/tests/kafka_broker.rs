//! The Kafka-compatible broker the tests use (Tansu, see `tests/src/kafka.rs`) against the
//! rdkafka crate's bundled librdkafka: every broker feature the worker's Kafka source and the
//! operator's lag reading rely on, checked here first so that a broker or client upgrade
//! that breaks one fails by name.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use mailpipe_tests::kafka::KafkaBroker;
use mailpipe_tests::unique;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};

const PARTITIONS: i32 = 3;

/// A group member that stores offsets itself (`enable.auto.offset.store=false`) and lets
/// librdkafka commit what was stored, as the worker does.
fn member(broker: &KafkaBroker, group: &str, topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("broker.address.family", "v4")
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "200")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    consumer
}

/// Takes `n` messages, storing each one's next offset; returns (partition, offset, payload).
async fn take(consumer: &StreamConsumer, n: usize) -> Vec<(i32, i64, Vec<u8>)> {
    let mut taken = Vec::new();
    let mut stream = consumer.stream();
    while taken.len() < n {
        let message = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} messages within 30 s", taken.len()))
            .expect("the stream goes on")
            .expect("a message");
        let mut next = TopicPartitionList::new();
        next.add_partition_offset(
            message.topic(),
            message.partition(),
            Offset::Offset(message.offset() + 1),
        )
        .expect("offset");
        consumer.store_offsets(&next).expect("store offset");
        taken.push((
            message.partition(),
            message.offset(),
            message.payload().unwrap_or_default().to_vec(),
        ));
    }
    taken
}

#[tokio::test]
async fn a_group_consumes_commits_resumes_and_reports_lag() {
    let broker = KafkaBroker::start().await;
    let (topic, group) = (unique("jobs"), unique("group"));
    broker.create_topic(&topic, PARTITIONS).await;
    broker
        .produce(
            &topic,
            PARTITIONS,
            (0..300).map(|n| format!("job-{n}").into_bytes()),
        )
        .await;
    assert_eq!(broker.high_watermarks(&topic, PARTITIONS), vec![100; 3]);
    assert_eq!(
        broker.committed(&group, &topic, PARTITIONS),
        vec![None; 3],
        "a group that never committed has no offsets"
    );
    assert_eq!(broker.lag(&group, &topic, PARTITIONS), 300);

    let first = member(&broker, &group, &topic);
    let taken = take(&first, 300).await;
    let payloads: BTreeSet<_> = taken.iter().map(|(_, _, p)| p.clone()).collect();
    assert_eq!(payloads.len(), 300, "every job once");
    let per_partition = taken.iter().fold(HashMap::new(), |mut m, (p, _, _)| {
        *m.entry(*p).or_insert(0) += 1;
        m
    });
    assert_eq!(per_partition.len(), 3);
    mailpipe_tests::eventually(
        Duration::from_secs(10),
        "the stored offsets committed",
        || async { (broker.lag(&group, &topic, PARTITIONS) == 0).then_some(()) },
    )
    .await;
    assert_eq!(
        broker.committed(&group, &topic, PARTITIONS),
        vec![Some(100); 3]
    );
    drop(first);

    // A new member of the group starts where the group committed.
    broker
        .produce(
            &topic,
            PARTITIONS,
            (300..330).map(|n| format!("job-{n}").into_bytes()),
        )
        .await;
    let second = member(&broker, &group, &topic);
    let resumed = take(&second, 30).await;
    let mut names: Vec<String> = resumed
        .iter()
        .map(|(_, _, p)| String::from_utf8_lossy(p).into_owned())
        .collect();
    names.sort();
    let mut expected: Vec<String> = (300..330).map(|n| format!("job-{n}")).collect();
    expected.sort();
    assert_eq!(names, expected, "only what was produced after the commit");
    assert!(
        tokio::time::timeout(Duration::from_secs(2), second.recv())
            .await
            .is_err(),
        "nothing more"
    );
}

#[tokio::test]
async fn two_members_split_the_partitions_and_a_restarted_broker_keeps_topics_and_offsets() {
    let mut broker = KafkaBroker::start().await;
    let (topic, group) = (unique("jobs"), unique("group"));
    broker.create_topic(&topic, PARTITIONS).await;
    // The members join one at a time: Tansu 0.6 can leave a rebalance that two joins
    // overlap without an assignment for one of them (seen under a loaded machine).
    let a = Arc::new(member(&broker, &group, &topic));
    let polling = {
        let a = a.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(30), a.recv()).await;
        })
    };
    mailpipe_tests::eventually(Duration::from_secs(30), "the first member assigned", || {
        let a = a.clone();
        async move { (a.assignment().map_or(0, |l| l.count()) == 3).then_some(()) }
    })
    .await;
    polling.abort();
    let _ = polling.await;
    let b = Arc::new(member(&broker, &group, &topic));
    // Each reads until 15 s pass without a message.
    let read = |consumer: Arc<StreamConsumer>| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            let mut stream = consumer.stream();
            while let Ok(Some(Ok(m))) =
                tokio::time::timeout(Duration::from_secs(15), stream.next()).await
            {
                got.push(m.partition());
            }
            got
        })
    };
    let (reading_a, reading_b) = (read(a.clone()), read(b.clone()));
    mailpipe_tests::eventually(Duration::from_secs(30), "both members assigned", || {
        let (a, b) = (a.clone(), b.clone());
        async move {
            let count = |c: &StreamConsumer| c.assignment().map_or(0, |l| l.count());
            (count(&a) > 0 && count(&b) > 0 && count(&a) + count(&b) == 3).then_some(())
        }
    })
    .await;
    broker
        .produce(
            &topic,
            PARTITIONS,
            (0..60).map(|n| format!("job-{n}").into_bytes()),
        )
        .await;
    let (from_a, from_b) = (reading_a.await.unwrap(), reading_b.await.unwrap());
    let parts_a: BTreeSet<i32> = from_a.iter().copied().collect();
    let parts_b: BTreeSet<i32> = from_b.iter().copied().collect();
    println!("member a read partitions {parts_a:?}, member b {parts_b:?}");
    assert_eq!(from_a.len() + from_b.len(), 60, "each message once");
    assert!(
        parts_a.is_disjoint(&parts_b),
        "no partition read by both: {parts_a:?} {parts_b:?}"
    );
    assert!(
        !parts_a.is_empty() && !parts_b.is_empty(),
        "both members got partitions"
    );
    // One member leaves: the other takes every partition. Then it leaves too. (One at a
    // time: Tansu 0.6 keeps a leader that left a group in the middle of a rebalance as its
    // leader, and a member that joins afterwards never gets a partition.)
    drop(a);
    let polling = {
        let b = b.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(20), b.recv()).await;
        })
    };
    mailpipe_tests::eventually(
        Duration::from_secs(20),
        "the member left takes every partition",
        || {
            let b = b.clone();
            async move { (b.assignment().map_or(0, |l| l.count()) == 3).then_some(()) }
        },
    )
    .await;
    polling.abort();
    let _ = polling.await;
    drop(b);

    // Commit a known position, restart the broker: topic, messages and offsets survive.
    let c = member(&broker, &group, &topic);
    take(&c, 60).await;
    mailpipe_tests::eventually(Duration::from_secs(10), "the offsets committed", || async {
        (broker.lag(&group, &topic, PARTITIONS) == 0).then_some(())
    })
    .await;
    drop(c);
    broker.stop();
    broker.restart().await;
    assert_eq!(broker.high_watermarks(&topic, PARTITIONS), vec![20; 3]);
    assert_eq!(
        broker.committed(&group, &topic, PARTITIONS),
        vec![Some(20); 3]
    );
}
