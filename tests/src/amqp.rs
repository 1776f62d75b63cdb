//! RabbitMQ from the test's side: publish jobs as a producer would, count and read queues,
//! and remove a test's topology afterwards.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use mailpipe_contract::topology::{RabbitSettings, TopologyPlan};
use mailpipe_contract::RetryPolicy;

use crate::unique;

/// The shared broker every test may use (with its own names).
pub const SHARED_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A test's own exchange and queue names.
#[derive(Debug, Clone)]
pub struct Names {
    /// Exchange.
    pub exchange: String,
    /// Work queue.
    pub queue: String,
}

impl Names {
    /// Fresh names for test `label`.
    pub fn new(label: &str) -> Names {
        let base = unique(label);
        Names {
            exchange: format!("{base}_exc"),
            queue: base,
        }
    }

    /// The plan the worker declares for these names with `retry`.
    pub fn plan(&self, retry: &RetryPolicy) -> TopologyPlan {
        RabbitSettings {
            exchange: self.exchange.clone(),
            queue: self.queue.clone(),
            ..RabbitSettings::default()
        }
        .plan(retry)
    }
}

/// Connects, panicking with a hint when the broker is not there.
pub async fn connect(url: &str) -> Connection {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| {
            panic!("cannot reach RabbitMQ at {url}: {e} (scripts/test-servers.sh starts it)")
        })
}

/// Publishes each body to `exchange` as a persistent message, waiting for confirms.
pub async fn publish(url: &str, exchange: &str, bodies: impl IntoIterator<Item = Vec<u8>>) {
    publish_with(
        url,
        exchange,
        bodies.into_iter().map(|b| (b, BasicProperties::default())),
    )
    .await
}

/// Publishes the numbered jobs `range` of `run` (see [`crate::jobs::numbered`]).
pub async fn publish_numbered(url: &str, exchange: &str, run: &str, range: std::ops::Range<usize>) {
    publish(url, exchange, range.map(|n| crate::jobs::numbered(run, n))).await
}

/// Publishes with explicit properties.
pub async fn publish_with(
    url: &str,
    exchange: &str,
    messages: impl IntoIterator<Item = (Vec<u8>, BasicProperties)>,
) {
    publish_routed(url, exchange, "", messages).await
}

/// Publishes with a routing key and explicit properties.
pub async fn publish_routed(
    url: &str,
    exchange: &str,
    routing_key: &str,
    messages: impl IntoIterator<Item = (Vec<u8>, BasicProperties)>,
) {
    let connection = connect(url).await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let mut pending = Vec::new();
    for (body, properties) in messages {
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &body,
                properties.with_delivery_mode(2),
            )
            .await
            .expect("publish");
        pending.push(confirm);
        if pending.len() >= 256 {
            for confirm in pending.drain(..) {
                assert!(matches!(
                    confirm.await.expect("confirm"),
                    Confirmation::Ack(_)
                ));
            }
        }
    }
    for confirm in pending {
        assert!(matches!(
            confirm.await.expect("confirm"),
            Confirmation::Ack(_)
        ));
    }
    let _ = connection.close(200, "published".into()).await;
}

/// Messages ready in `queue` (not counting unacknowledged ones).
pub async fn ready(url: &str, queue: &str) -> u32 {
    depth(url, queue).await.0
}

/// Consumers of `queue` now.
pub async fn consumers(url: &str, queue: &str) -> u32 {
    depth(url, queue).await.1
}

/// Ready messages and consumers of `queue`.
async fn depth(url: &str, queue: &str) -> (u32, u32) {
    let connection = connect(url).await;
    let channel = connection.create_channel().await.expect("channel");
    let depth = mailpipe_contract::amqp::depth(&channel, queue)
        .await
        .unwrap_or_else(|e| panic!("queue {queue} should exist: {e}"));
    let _ = connection.close(200, "counted".into()).await;
    depth
}

/// Whether `queue` exists on the broker at `url`.
pub async fn queue_exists(url: &str, queue: &str) -> bool {
    let connection = connect(url).await;
    let channel = connection.create_channel().await.expect("channel");
    let exists = mailpipe_contract::amqp::depth(&channel, queue)
        .await
        .is_ok();
    let _ = connection.close(200, "checked".into()).await;
    exists
}

/// A message read back from a queue.
#[derive(Debug, Clone)]
pub struct Got {
    /// Headers rendered as strings (integers in decimal).
    pub headers: BTreeMap<String, String>,
    /// The body.
    pub body: Vec<u8>,
    /// The per-message TTL, when the message has one.
    pub expiration: Option<String>,
}

/// Takes (and acks) every message now in `queue`.
pub async fn take_all(url: &str, queue: &str) -> Vec<Got> {
    let connection = connect(url).await;
    let channel = connection.create_channel().await.expect("channel");
    let mut got = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .expect("basic.get")
    {
        let headers = message
            .delivery
            .properties
            .headers()
            .as_ref()
            .map(|table| {
                table
                    .inner()
                    .iter()
                    .map(|(k, v)| (k.to_string(), amqp_text(v)))
                    .collect()
            })
            .unwrap_or_default();
        message
            .delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        got.push(Got {
            headers,
            body: message.delivery.data.clone(),
            expiration: message
                .delivery
                .properties
                .expiration()
                .as_ref()
                .map(|e| e.to_string()),
        });
    }
    let _ = connection.close(200, "taken".into()).await;
    got
}

fn amqp_text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::LongLongInt(i) => i.to_string(),
        AMQPValue::LongInt(i) => i.to_string(),
        AMQPValue::ShortInt(i) => i.to_string(),
        AMQPValue::LongUInt(i) => i.to_string(),
        other => format!("{other:?}"),
    }
}

/// Deletes every queue and exchange of `plan` (best effort; a test's cleanup).
pub async fn delete_plan(url: &str, plan: &TopologyPlan) {
    let Ok(connection) = Connection::connect(url, ConnectionProperties::default()).await else {
        return;
    };
    for queue in &plan.queues {
        if let Ok(channel) = connection.create_channel().await {
            let _ = channel
                .queue_delete(queue.name.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    for exchange in &plan.exchanges {
        if let Ok(channel) = connection.create_channel().await {
            let _ = channel
                .exchange_delete(
                    exchange.name.as_str().into(),
                    ExchangeDeleteOptions::default(),
                )
                .await;
        }
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        connection.close(200, "cleanup".into()),
    )
    .await;
}

/// Unacknowledged messages of `queue`, as the broker counts them (via rabbitmqctl, so it
/// works while the consumer is frozen with SIGSTOP). `node` is None for the shared node.
pub fn unacked(node: Option<&str>, queue: &str) -> u64 {
    let listing = rabbitmqctl(
        node,
        &[
            "-q",
            "list_queues",
            "name",
            "messages_unacknowledged",
            "--no-table-headers",
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    listing
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            (parts.next()? == queue).then(|| parts.next()?.parse().ok())?
        })
        .next()
        .unwrap_or_else(|| panic!("queue {queue} not listed by rabbitmqctl"))
}

/// Runs rabbitmqctl against `node` (the shared node when None); its output, or why not.
pub fn rabbitmqctl(node: Option<&str>, args: &[&str]) -> Result<String, String> {
    let mut command = std::process::Command::new("rabbitmqctl");
    if let Some(node) = node {
        command.args(["-n", node]);
    }
    let out = command
        .args(args)
        .output()
        .map_err(|e| format!("rabbitmqctl cannot run ({e}); apt-get install -y rabbitmq-server"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "rabbitmqctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The shared node's management API (tests: guest, enabled by `scripts/test-servers.sh`).
pub const SHARED_MANAGEMENT: &str = "http://127.0.0.1:15672";

/// How many deliveries of `queue` on the shared node the broker marked as redelivered (a
/// job given back or left unacked by a consumer that went away), as its management API
/// counts them. The figures refresh every 5 s: read after the last change has settled.
pub async fn redelivered(queue: &str) -> u64 {
    let url = format!("{SHARED_MANAGEMENT}/api/queues/%2F/{queue}");
    let body: serde_json::Value = reqwest::Client::new()
        .get(&url)
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .expect("a queue object");
    body["message_stats"]["redeliver"].as_u64().unwrap_or(0)
}

/// Connections the shared broker lists under `name` (operators of other tests run
/// scalers of their own on it, under the default name).
pub fn connections_named(name: &str) -> usize {
    rabbitmqctl(None, &["list_connections", "client_properties"])
        .expect("rabbitmqctl")
        .lines()
        .filter(|l| l.contains(name))
        .count()
}

/// Removes every ready message of `queue` at once.
pub async fn purge(url: &str, queue: &str) {
    let connection = connect(url).await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_purge(queue.into(), lapin::options::QueuePurgeOptions::default())
        .await
        .expect("queue.purge");
    let _ = connection.close(200, "purged".into()).await;
}
