//! The operator with a Kafka pipeline end to end: kubectl against the Kubernetes API test
//! server, a real Kafka-compatible broker (Tansu, one for the test), real worker processes
//! run by the runner, a real SMTP server. Applying the example Kafka pipeline creates its
//! topics; the workers deliver; the status shows the group's lag; the scaler scales on lag
//! up to the partition count; a Delete deletion waits while the group has lag and removes
//! the topics once it has none.

use std::time::Duration;

use mailpipe_contract::naming::{dead_letter_topic, retry_topic};
use mailpipe_tests::cluster::Cluster;
use mailpipe_tests::kafka::KafkaBroker;
use mailpipe_tests::pipelines::{condition, status_field, wait_condition, worker_replicas};
use mailpipe_tests::smtp::{SmtpOptions, SmtpServer};
use mailpipe_tests::{eventually, jobs, repo_root, unique};

const PARTITIONS: i32 = 3;

/// The example Kafka pipeline, pointed at `broker`, `topic` and the SMTP server on
/// `smtp_port`, with short backoffs, a fast scaler and `policy`.
fn kafka_manifest(
    name: &str,
    broker: &KafkaBroker,
    topic: &str,
    smtp_port: u16,
    policy: &str,
) -> String {
    let example =
        std::fs::read_to_string(repo_root().join("deploy/examples/kafka-emailpipeline.yaml"))
            .expect("the example Kafka pipeline");
    mailpipe_tests::pipelines::edited(
        example,
        mailpipe_tests::pipelines::test_smtp(smtp_port).into_iter().chain([
        ("name: email-events", format!("name: {name}")),
        (
            r#"bootstrapServers: ["kafka-0.kafka:9092", "kafka-1.kafka:9092", "kafka-2.kafka:9092"]"#,
            format!("bootstrapServers: [\"{}\"]", broker.bootstrap()),
        ),
        ("topic: email-events", format!("topic: {topic}")),
        ("replicationFactor: 3", "replicationFactor: 1".to_string()),
        ("consumerGroup: email-service-group", format!("consumerGroup: {topic}-group")),
        (
            "  scaling:\n",
            "  worker:\n    terminationGracePeriodSeconds: 10\n    concurrency: 2\n  scaling:\n"
                .to_string(),
        ),
        (
            "    maxReplicas: 6\n",
            "    maxReplicas: 6\n    targetBacklogPerReplica: 20\n    pollInterval: 1s\n    scaleDownStabilization: 5s\n"
                .to_string(),
        ),
        ("deletionPolicy: Retain", format!("deletionPolicy: {policy}")),
        (
            "      consumerGroup:",
            "      topicConfig: {retention.ms: \"86400000\"}\n      consumerGroup:".to_string(),
        ),
        ]),
    )
}

/// The topics the brokers list.
fn topics(broker: &KafkaBroker) -> Vec<String> {
    broker.topics()
}

#[tokio::test]
async fn a_kafka_pipeline_gets_its_topics_delivers_scales_on_lag_and_is_deleted_only_when_consumed()
{
    let cluster = Cluster::start().await;
    let broker = KafkaBroker::start().await;
    // 100 ms a message with 2 at a time per worker: a backlog of hundreds lasts long enough
    // to be scaled on.
    let smtp = SmtpServer::start(SmtpOptions {
        delay_ms: 100,
        ..SmtpOptions::default()
    })
    .await;
    let _operator = cluster.operator("op-a");
    let topic = unique("events");
    cluster
        .apply(&kafka_manifest(
            "events", &broker, &topic, smtp.port, "Delete",
        ))
        .await;

    // The topics: work, one per retry delay, dead-letter, with the asked partitions.
    wait_condition(&cluster, "events", "TopologyReady", "True", "Declared").await;
    let listed = topics(&broker);
    for name in [
        topic.clone(),
        retry_topic(&topic, Duration::from_millis(200)),
        retry_topic(&topic, Duration::from_millis(1600)),
        dead_letter_topic(&topic),
    ] {
        assert!(listed.contains(&name), "{name} in {listed:?}");
        assert_eq!(broker.high_watermarks(&name, PARTITIONS).len(), 3);
    }
    // With the configuration the spec gives.
    assert_eq!(
        broker.topic_config(&topic, "retention.ms").await.as_deref(),
        Some("86400000")
    );
    wait_condition(&cluster, "events", "Ready", "True", "Ready").await;
    let table = cluster.kubectl_ok(&["get", "emp", "events"]).await;
    assert!(table.contains(&format!("kafka/{topic}")), "{table}");

    // A backlog: the scaler scales on the group's lag, never beyond the 3 partitions
    // though maxReplicas is 6 and the lag asks for more.
    const N: usize = 600;
    let run = unique("run");
    broker
        .produce(&topic, PARTITIONS, (0..N).map(|n| jobs::numbered(&run, n)))
        .await;
    eventually(Duration::from_secs(60), "scaled up on the lag", || async {
        (worker_replicas(&cluster, "events").await == Some(PARTITIONS)).then_some(())
    })
    .await;
    let backlog: u64 = status_field(&cluster, "events", "backlog")
        .await
        .parse()
        .unwrap_or(0);
    assert!(backlog > 0, "the status shows the lag");
    let message = condition(&cluster, "events", "Scaling", "message").await;
    for _ in 0..5 {
        assert!(
            worker_replicas(&cluster, "events").await <= Some(PARTITIONS),
            "never more workers than partitions: {message}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // Deleting while the group has lag waits and says why.
    cluster
        .kubectl_ok(&["delete", "emp", "events", "--wait=false"])
        .await;
    eventually(Duration::from_secs(30), "the deletion waiting", || async {
        let message = condition(&cluster, "events", "TopologyReady", "message").await;
        message.contains(&topic).then_some(message)
    })
    .await;
    assert!(topics(&broker).contains(&topic), "kept while it has lag");

    // The workers drain it; then the topics go and the pipeline with them.
    smtp.wait_for_count(N, Duration::from_secs(240)).await;
    eventually(Duration::from_secs(120), "the pipeline gone", || async {
        let out = cluster.kubectl(&["get", "emp", "events"]).await;
        (!out.status.success()).then_some(())
    })
    .await;
    assert!(
        !topics(&broker).contains(&topic),
        "the consumed topic was deleted: {:?}",
        topics(&broker)
    );
    let tally = smtp.tally(&run, N).await;
    assert_eq!(tally.lost, 0, "{tally:?}");
}

#[tokio::test]
async fn a_topic_with_fewer_partitions_than_asked_is_reported_and_left_as_it_is() {
    let cluster = Cluster::start().await;
    let broker = KafkaBroker::start().await;
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let _operator = cluster.operator("op-a");
    let topic = unique("events");
    broker.create_topic(&topic, 1).await;
    cluster
        .apply(&kafka_manifest(
            "narrow", &broker, &topic, smtp.port, "Retain",
        ))
        .await;
    wait_condition(
        &cluster,
        "narrow",
        "TopologyReady",
        "False",
        "TopologyConflict",
    )
    .await;
    let message = condition(&cluster, "narrow", "TopologyReady", "message").await;
    assert!(
        message.contains(&format!(
            "topic {topic} has 1 partitions, the pipeline asks for 3"
        )),
        "{message}"
    );
    assert_eq!(broker.partitions(&topic), 1, "the topic is left as it is");
}
