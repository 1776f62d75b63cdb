//! The `EmailPipeline` custom resource (`mailpipe.dev/v1alpha1`): what users apply.
//!
//! The Rust types are the source of truth: the CRD in `crds/` is generated from them
//! (`mailpipe-operator crd`) and checked for drift. Validation lives in the schema where
//! the API server can enforce it (types, enums, ranges, patterns, lengths, and a few bounded
//! CEL rules: exactly one source, min <= max replicas, immutable queue and topic names, no
//! priority on quorum queues); what needs a look at other objects (Secrets, the broker)
//! is checked by the reconciler and reported in conditions.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
pub use mailpipe_contract::choices::{OnRedisUnavailable, SaslMechanism, TlsMode};
pub use mailpipe_contract::topology::{ExchangeKind, QueueType};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A duration as the worker reads it: `500ms`, `5s`, `1h30m`.
const DURATION: &str = "^([0-9]+(ms|s|m|h))+$";
/// Exchange, queue and topic names: what RabbitMQ and Kafka both accept, with room for the
/// retry and dead-letter suffixes.
const BROKER_NAME: &str = "^[A-Za-z0-9_.:-]+$";
/// A Kubernetes object name (DNS subdomain).
const OBJECT_NAME: &str = "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$";

/// An email delivery pipeline: a broker source, an SMTP destination, and the worker
/// Deployment that moves jobs from one to the other, scaled on the backlog.
// clippy reads the repeated `type_` keys of separate printcolumn(...) entries as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mailpipe.dev",
    version = "v1alpha1",
    kind = "EmailPipeline",
    namespaced,
    doc = "An email delivery pipeline: jobs from a RabbitMQ queue or Kafka topic, sent over SMTP by a worker Deployment scaled on the backlog.",
    // `ep` is Endpoints', and kubectl resolves a short name to the built-in kind first.
    shortname = "emp",
    shortname = "mailpipeline",
    category = "mailpipe",
    // The name becomes the worker Service `<name>-worker` (a DNS label: no dots, at most
    // 63 characters) and the value of the instance label (at most 63 bytes).
    validation = Rule::new("!self.metadata.name.contains('.') && size(self.metadata.name) <= 56")
        .message("metadata.name must have no dots and at most 56 characters: it names the worker Service <name>-worker (a DNS label) and a label value"),
    status = "EmailPipelineStatus",
    derive = "PartialEq",
    printcolumn(
        name = "Source",
        type_ = "string",
        json_path = ".status.source",
        description = "The broker and queue or topic jobs come from"
    ),
    printcolumn(
        name = "Backlog",
        type_ = "integer",
        json_path = ".status.backlog",
        description = "Jobs waiting in the queue, or the consumer group's lag"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".status.replicas",
        description = "Worker replicas"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the pipeline delivers mail"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EmailPipelineSpec {
    /// Where jobs come from: exactly one broker.
    pub source: Source,
    /// Where mail goes.
    pub smtp: Smtp,
    /// Named templates jobs can refer to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub templates: Option<Templates>,
    /// Attempts, backoff, dead-lettering and deduplication.
    #[serde(default)]
    pub delivery: Delivery,
    /// The worker pods.
    #[serde(default)]
    pub worker: Worker,
    /// How many workers run, from the backlog.
    #[serde(default)]
    pub scaling: Scaling,
    /// What happens to the broker topology when the pipeline is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// Exactly one broker.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.rabbitmq) != has(self.kafka)").message("exactly one of spec.source.rabbitmq or spec.source.kafka must be set"),
    validation = Rule::new("has(self.rabbitmq) == has(oldSelf.rabbitmq)").message("the source broker cannot change; create a new EmailPipeline")
)]
pub struct Source {
    /// A RabbitMQ exchange and queue (with retry and dead-letter queues beside it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbitmq: Option<RabbitSource>,
    /// A Kafka topic (with retry and dead-letter topics beside it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSource>,
}

/// RabbitMQ: producers publish to the exchange; the worker consumes the queue.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.queue == oldSelf.queue").message("spec.source.rabbitmq.queue is immutable: jobs in the old queue would be stranded"),
    validation = Rule::new("self.queueType == oldSelf.queueType").message("spec.source.rabbitmq.queueType is immutable: RabbitMQ cannot change the type of a queue"),
    validation = Rule::new("self.exchangeType == oldSelf.exchangeType").message("spec.source.rabbitmq.exchangeType is immutable: RabbitMQ cannot change the type of an exchange"),
    validation = Rule::new("has(self.maxPriority) == has(oldSelf.maxPriority) && (!has(self.maxPriority) || self.maxPriority == oldSelf.maxPriority)").message("spec.source.rabbitmq.maxPriority is immutable: RabbitMQ cannot change a queue's x-max-priority"),
    validation = Rule::new("!has(self.maxPriority) || self.queueType == 'classic'").message("maxPriority needs queueType classic: quorum queues refuse x-max-priority")
)]
pub struct RabbitSource {
    /// The Secret key holding the AMQP URL (`amqp://` or `amqps://user:pass@host:port/vhost`).
    pub connection_secret: SecretKeyRef,
    /// The Secret key holding a PEM CA bundle to verify an amqps server with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<SecretKeyRef>,
    /// The Secret key holding the management API URL with administrator credentials
    /// (`https://admin:pass@rabbitmq:15672`). Set, the operator creates the connection
    /// URL's virtual host and gives its user access; unset, the virtual host must exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management_secret: Option<SecretKeyRef>,
    /// The exchange producers publish to. Unset: the queue's name and `_exc` (for the
    /// queue `smtp_send_email`, `smtp_send_email_exc`), so two pipelines never share a
    /// fanout exchange by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 200), regex(pattern = BROKER_NAME))]
    pub exchange: Option<String>,
    /// The exchange type.
    #[serde(default)]
    pub exchange_type: ExchangeKind,
    /// The work queue (immutable).
    #[schemars(length(min = 1, max = 200), regex(pattern = BROKER_NAME))]
    pub queue: String,
    /// The type of every queue of the pipeline (immutable). Quorum queues dead-letter
    /// at least once.
    #[serde(default)]
    pub queue_type: QueueType,
    /// The binding key between exchange and queue (ignored by fanout exchanges).
    #[serde(default)]
    #[schemars(length(max = 255))]
    pub routing_key: String,
    /// Unacknowledged jobs the broker hands each worker.
    #[serde(default = "default_prefetch")]
    #[schemars(range(min = 1, max = 10000))]
    pub prefetch: u16,
    /// `x-max-priority` of the queue (classic queues only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10))]
    pub max_priority: Option<u8>,
}

/// Kafka: producers write to the topic; the workers read it as one consumer group.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.topic == oldSelf.topic").message("spec.source.kafka.topic is immutable: jobs in the old topic would be stranded"))]
pub struct KafkaSource {
    /// `host:port` of the bootstrap brokers.
    #[schemars(length(min = 1, max = 16))]
    pub bootstrap_servers: Vec<BootstrapServer>,
    /// The topic (immutable).
    #[schemars(length(min = 1, max = 200), regex(pattern = BROKER_NAME))]
    pub topic: String,
    /// Partitions of a topic the operator creates.
    #[serde(default = "default_partitions")]
    #[schemars(range(min = 1, max = 1000))]
    pub partitions: i32,
    /// Replication factor of a topic the operator creates.
    #[serde(default = "default_replication")]
    #[schemars(range(min = 1, max = 7))]
    pub replication_factor: i16,
    /// The consumer group (default: the pipeline's namespace and name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 200), regex(pattern = BROKER_NAME))]
    pub consumer_group: Option<String>,
    /// The Secret key holding a PEM CA bundle; set, the connection uses TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<SecretKeyRef>,
    /// SASL credentials (a Secret with `username` and `password` keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl: Option<Sasl>,
    /// Topic configuration set on every topic the operator creates (`retention.ms`, say);
    /// existing topics are not changed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub topic_config: BTreeMap<String, String>,
}

/// One bootstrap broker, `host:port`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[schemars(transparent)]
pub struct BootstrapServer(
    #[schemars(
        length(min = 3, max = 253),
        regex(pattern = r"^[A-Za-z0-9.-]+:[0-9]{1,5}$")
    )]
    pub String,
);

/// SASL settings.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Sasl {
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    #[serde(default)]
    pub mechanism: SaslMechanism,
    /// The Secret holding `username` and `password`.
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME))]
    pub secret: String,
}

/// A key of a Secret in the pipeline's namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME))]
    pub name: String,
    /// The key in it.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// The SMTP server mail goes to.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Smtp {
    /// Host name.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// Port.
    #[serde(default = "default_smtp_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// `starttls` (default), `tls` (implicit TLS, usually port 465) or `none` (explicitly
    /// plain text).
    #[serde(default)]
    pub tls: TlsMode,
    /// The Secret key holding a PEM CA bundle to verify the server with (instead of the
    /// system roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<SecretKeyRef>,
    /// Skip certificate verification: an explicit opt-in the worker logs loudly.
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// The Secret holding the SMTP user name and password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<Credentials>,
    /// The sender used when a job names none.
    pub from: Sender,
    /// SMTP connections for the whole pipeline: all replicas together never hold more (they
    /// share them at run time through the token queue `<queue>.smtp-budget`, so one replica
    /// alone may use them all), and no more replicas run than there are connections.
    #[serde(default = "default_pool_size")]
    #[schemars(range(min = 1, max = 1000))]
    pub pool_size: u32,
    /// Messages per second for the whole pipeline (unset: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub rate_limit: Option<u32>,
}

/// A Secret with the SMTP user name and password.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Credentials {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME))]
    pub name: String,
    /// The key of the user name.
    #[serde(default = "default_username_key")]
    #[schemars(length(min = 1, max = 253))]
    pub username_key: String,
    /// The key of the password.
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1, max = 253))]
    pub password_key: String,
}

/// The default sender.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Sender {
    /// Address, e.g. `noreply@example.com`.
    #[schemars(length(min = 3, max = 254), regex(pattern = r"^[^@\s]+@[^@\s]+$"))]
    pub address: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 200))]
    pub name: Option<String>,
}

/// Templates: a ConfigMap of `NAME.subject`, `NAME.txt` and `NAME.html` entries.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Templates {
    /// The ConfigMap's name.
    #[schemars(length(min = 1, max = 253), regex(pattern = OBJECT_NAME))]
    pub config_map: String,
}

/// Attempts, backoff, dead-lettering and deduplication.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.deadLetter == oldSelf.deadLetter").message("spec.delivery.deadLetter is immutable: it is part of the work queue's declaration, which RabbitMQ cannot change")
)]
pub struct Delivery {
    /// Attempts per job, the first included.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: u32,
    /// Delays between attempts.
    #[serde(default)]
    pub backoff: Backoff,
    /// Whether jobs that can never be sent go to the dead-letter queue (else dropped).
    #[serde(default = "yes")]
    pub dead_letter: bool,
    /// Deduplication by job id in Redis (unset: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<Idempotency>,
}

/// Capped exponential backoff.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Backoff {
    /// The first delay.
    #[serde(default = "default_backoff_initial")]
    #[schemars(length(max = 32), regex(pattern = DURATION))]
    pub initial: String,
    /// Growth per attempt.
    #[serde(default = "default_backoff_multiplier")]
    #[schemars(range(min = 1.0, max = 10.0))]
    pub multiplier: f64,
    /// The largest delay.
    #[serde(default = "default_backoff_max")]
    #[schemars(length(max = 32), regex(pattern = DURATION))]
    pub max: String,
}

/// Deduplication by job id.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Idempotency {
    /// The Secret key holding the Redis URL.
    pub redis_secret: SecretKeyRef,
    /// How long a sent job id is remembered.
    #[serde(default = "default_idempotency_ttl")]
    #[schemars(length(max = 32), regex(pattern = DURATION))]
    pub ttl: String,
    /// While Redis is unreachable: `pause` consuming (default) or `send` without
    /// deduplication.
    #[serde(default)]
    pub on_unavailable: OnRedisUnavailable,
}

/// The worker pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Worker {
    /// The worker image (default: the one the operator was released with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Jobs each replica processes at once.
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = 1024))]
    pub concurrency: u32,
    /// CPU and memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra environment (secrets only through `valueFrom.secretKeyRef`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub env: Vec<EnvVar>,
    /// Node labels the pods must run on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,
    /// Seconds a stopping pod gets; in-flight sends finish 5 s before it ends.
    #[serde(default = "default_grace")]
    #[schemars(range(min = 10, max = 3600))]
    pub termination_grace_period_seconds: i64,
}

/// How many workers run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("spec.scaling.minReplicas must be <= spec.scaling.maxReplicas"))]
pub struct Scaling {
    /// Fewest replicas; 0 lets an idle pipeline scale to zero.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,
    /// Most replicas.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Backlog one replica is expected to handle.
    #[serde(default = "default_target_backlog")]
    #[schemars(range(min = 1, max = 10000000))]
    pub target_backlog_per_replica: i64,
    /// Backlog above which a pipeline at zero replicas wakes up.
    #[serde(default)]
    #[schemars(range(min = 0, max = 10000000))]
    pub activation_backlog: i64,
    /// How often the scaler reads the backlog and decides. A reading is a passive declare
    /// per queue over one connection per broker (about a millisecond of broker time), so
    /// the default of 2 s reacts within seconds and stays cheap for hundreds of pipelines.
    #[serde(default = "default_poll_interval")]
    #[schemars(length(max = 32), regex(pattern = DURATION))]
    pub poll_interval: String,
    /// How long a higher replica count must be wanted before scaling up.
    #[serde(default = "default_scale_up_window")]
    #[schemars(length(max = 32), regex(pattern = DURATION))]
    pub scale_up_stabilization: String,
    /// How long a lower replica count must be wanted before scaling down.
    #[serde(default = "default_scale_down_window")]
    #[schemars(length(max = 32), regex(pattern = DURATION))]
    pub scale_down_stabilization: String,
    /// Most replicas added or removed in one step (unset: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_step: Option<i32>,
    /// A runbook table instead of `targetBacklogPerReplica`: each row runs `replicas` from
    /// `backlog` jobs up to the next row's (rows in increasing `backlog`; below the first
    /// row, the first row's count).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub thresholds: Vec<Threshold>,
    /// Replicas to run once the backlog could not be read for 30 s (unset: keep the current
    /// count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub fallback_replicas: Option<i32>,
    /// A drain-time objective: run enough replicas that the work clears within this time at
    /// the send rate one replica has shown (measured from the broker's acks through the
    /// management API, so RabbitMQ pipelines need `managementSecret`). The target still
    /// applies; the larger count wins, within the bounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = DURATION))]
    pub drain_within: Option<String>,
    /// Kafka: let the scaler run more workers than the topic has partitions (the extra ones
    /// stand by without a partition until a rebalance gives them one). Off, the partitions
    /// cap the workers.
    #[serde(default)]
    pub allow_idle_consumers: bool,
}

/// One row of a scaling table.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Threshold {
    /// Jobs waiting from which this row applies.
    #[schemars(range(min = 0, max = 10000000))]
    pub backlog: i64,
    /// Replicas to run (still within minReplicas and maxReplicas).
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
}

/// What happens to the broker topology when the pipeline is deleted.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeletionPolicy {
    /// Keep the exchange and queues (default).
    #[default]
    Retain,
    /// Delete them, but only when they hold no jobs; otherwise a condition says why the
    /// deletion waits.
    Delete,
}

/// What the operator observed.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EmailPipelineStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `SpecValid`, `TopologyReady`, `WorkerReady` and `Scaling`, each with a
    /// reason. A list keyed by type, so the reconcile and the scaler (two field managers)
    /// each own their conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// `rabbitmq/<queue>` or `kafka/<topic>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Jobs waiting (queue depth or consumer lag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<i64>,
    /// Jobs delivered and not yet settled, where the broker tells.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<i64>,
    /// Jobs in the dead-letter queue or topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_depth: Option<i64>,
    /// Worker replicas now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Worker replicas ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Worker replicas the scaler wants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// Jobs a second one busy replica has been settling (measured from the broker's acks
    /// while the queue had work; decimal text, as Kubernetes avoids floats).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub send_rate_per_replica: Option<String>,
    /// Estimated seconds until the work now waiting is done at the desired replica count
    /// and the measured rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_drain_seconds: Option<i64>,
    /// When the scaler last changed the replica count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// Whether the operator ever declared this pipeline's topology: a deletion of a
    /// pipeline that never got one (a typo in its spec, a missing Secret) has nothing to
    /// delete on the broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_declared: Option<bool>,
    /// While a `Delete` deletion waits: when the operator stopped the workers, so the
    /// queues go only once no stopping worker can still hold a job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers_stopped_at: Option<Time>,
    /// The binding that brings jobs to the work queue, as last declared: when the spec's
    /// exchange or routing key changes, the old binding is removed after the new one is
    /// declared (otherwise jobs would keep arriving from the old exchange).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intake: Option<Intake>,
    /// The broker the topology was declared on: scheme, host, port and virtual host of its
    /// URL, never the credentials (`amqp://rabbitmq:5672/%2f`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub broker: Option<String>,
}

/// An exchange and routing key the work queue is bound with.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Intake {
    #[schemars(length(max = 255))]
    pub exchange: String,
    #[schemars(length(max = 255))]
    pub routing_key: String,
}

fn default_prefetch() -> u16 {
    32
}
fn default_partitions() -> i32 {
    6
}
fn default_replication() -> i16 {
    3
}
fn default_smtp_port() -> u16 {
    587
}
fn default_pool_size() -> u32 {
    20
}
fn default_username_key() -> String {
    "username".into()
}
fn default_password_key() -> String {
    "password".into()
}
fn default_max_attempts() -> u32 {
    5
}
fn default_backoff_initial() -> String {
    "5s".into()
}
fn default_backoff_multiplier() -> f64 {
    2.0
}
fn default_backoff_max() -> String {
    "5m".into()
}
fn default_idempotency_ttl() -> String {
    "24h".into()
}
fn default_concurrency() -> u32 {
    16
}
fn default_grace() -> i64 {
    60
}
fn default_max_replicas() -> i32 {
    5
}
fn default_target_backlog() -> i64 {
    100
}
fn default_poll_interval() -> String {
    "2s".into()
}
fn default_scale_up_window() -> String {
    "0s".into()
}
fn default_scale_down_window() -> String {
    "5m".into()
}
fn one() -> i32 {
    1
}
fn yes() -> bool {
    true
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: default_backoff_initial(),
            multiplier: default_backoff_multiplier(),
            max: default_backoff_max(),
        }
    }
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            max_attempts: default_max_attempts(),
            backoff: Backoff::default(),
            dead_letter: true,
            idempotency: None,
        }
    }
}

impl Default for Worker {
    fn default() -> Self {
        Worker {
            image: None,
            concurrency: default_concurrency(),
            resources: None,
            env: Vec::new(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            termination_grace_period_seconds: default_grace(),
        }
    }
}

impl Default for Scaling {
    fn default() -> Self {
        Scaling {
            min_replicas: 1,
            max_replicas: default_max_replicas(),
            target_backlog_per_replica: default_target_backlog(),
            activation_backlog: 0,
            poll_interval: default_poll_interval(),
            scale_up_stabilization: default_scale_up_window(),
            scale_down_stabilization: default_scale_down_window(),
            max_step: None,
            thresholds: Vec::new(),
            fallback_replicas: None,
            drain_within: None,
            allow_idle_consumers: false,
        }
    }
}
