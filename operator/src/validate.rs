//! validate (no client required): an `EmailPipeline` spec into a `ValidatedPipeline`, the
//! one input of the pure builders and of the topology step.
//!
//! The API server already enforced the schema and the CEL rules; this step checks what the
//! schema cannot say (durations that parse, retry bounds, names RabbitMQ reserves, a pool
//! too small for the replicas) with the same words the worker and the broker would use, and
//! turns the spec into the contract's types (retry policy, RabbitMQ settings, topology plan)
//! so the operator and the worker agree by construction.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration};
use mailpipe_contract::topics::{KafkaSettings, TopicPlan};
use mailpipe_contract::topology::{RabbitSettings, TopologyPlan};
use mailpipe_contract::RetryPolicy;

use crate::crd::{
    self, Credentials, EmailPipelineSpec, OnRedisUnavailable, SecretKeyRef, Sender, TlsMode,
};

/// What an invalid spec gets wrong: the field and what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidSpec {
    /// `spec.delivery.backoff.initial`, say.
    pub field: String,
    /// What is wrong, in words a user can act on.
    pub message: String,
}

impl fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for InvalidSpec {}

fn invalid(field: &str, message: impl Into<String>) -> InvalidSpec {
    InvalidSpec {
        field: field.to_string(),
        message: message.into(),
    }
}

/// The broker side of a validated pipeline.
#[derive(Debug, Clone, PartialEq)]
pub enum ValidatedSource {
    /// RabbitMQ, with the plan both the operator and the worker declare.
    Rabbit {
        settings: RabbitSettings,
        plan: TopologyPlan,
        connection: RabbitConnection,
    },
    /// Kafka, with the topic plan both the operator and the worker create.
    Kafka(KafkaTarget),
}

/// A Kafka source: its topics, the consumer group and how to reach the brokers (Secret
/// references, mounted in the workers, read by the operator for its admin client).
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaTarget {
    pub settings: KafkaSettings,
    pub plan: TopicPlan,
    /// `host:port,...`
    pub bootstrap: String,
    pub group: String,
    pub ca_secret: Option<SecretKeyRef>,
    pub sasl: Option<crd::Sasl>,
}

/// How the workers reach RabbitMQ: Secret references (mounted, never read here) and the
/// prefetch.
#[derive(Debug, Clone, PartialEq)]
pub struct RabbitConnection {
    pub connection_secret: SecretKeyRef,
    pub ca_secret: Option<SecretKeyRef>,
    pub prefetch: u16,
}

/// Where and how the workers send (the pool and rate per replica are on the pipeline).
#[derive(Debug, Clone, PartialEq)]
pub struct SmtpTarget {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub ca_secret: Option<SecretKeyRef>,
    pub insecure_skip_verify: bool,
    pub credentials: Option<Credentials>,
    pub from: Sender,
}

/// The worker pods: image, concurrency and the pod-level settings, with the user's extra
/// environment already checked not to touch the operator's.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerShape {
    pub image: Option<String>,
    pub concurrency: u32,
    pub resources: Option<ResourceRequirements>,
    pub env: Vec<EnvVar>,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    pub termination_grace_period_seconds: i64,
}

/// The replica bounds and targets (the durations are on the pipeline).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalingRules {
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub target_backlog_per_replica: u64,
    pub activation_backlog: u64,
    pub max_step: Option<u32>,
    pub fallback_replicas: Option<u32>,
    /// `(from backlog, replicas)` rows in increasing backlog; empty: the target per replica.
    pub thresholds: Vec<(u64, u32)>,
    /// The drain-time objective.
    pub drain_within: Option<Duration>,
    /// Kafka: workers beyond the partition count are allowed (they stand by).
    pub allow_idle_consumers: bool,
}

/// Deduplication through Redis, its record kept for `ttl`.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedIdempotency {
    pub redis_secret: SecretKeyRef,
    pub ttl: Duration,
    pub on_unavailable: OnRedisUnavailable,
}

/// A spec that can work, in the types the builders and the topology use: the builders read
/// only this (never the raw spec), so a value that needs converting or checking cannot be
/// read unconverted.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedPipeline {
    /// The pipeline's name and namespace.
    pub name: String,
    pub namespace: String,
    pub source: ValidatedSource,
    pub smtp: SmtpTarget,
    pub worker: WorkerShape,
    /// The ConfigMap holding the templates, when the pipeline has some.
    pub templates: Option<String>,
    /// Whether failed jobs go to the dead-letter queue (else the broker drops them).
    pub dead_letter: bool,
    pub idempotency: Option<ValidatedIdempotency>,
    pub scaling: ScalingRules,
    /// The SMTP connections all replicas together may hold.
    pub smtp_pool_size: u32,
    pub retry: RetryPolicy,
    /// How long a stopping worker finishes in-flight sends: the grace period less 5 s.
    pub shutdown_timeout: Duration,
    /// Messages per second each replica may send, so the pipeline stays within its limit.
    pub rate_per_replica: Option<u32>,
    pub poll_interval: Duration,
    pub scale_up_stabilization: Duration,
    pub scale_down_stabilization: Duration,
}

impl ValidatedPipeline {
    /// `rabbitmq/<queue>` or `kafka/<topic>`, as the status and the printer column show.
    pub fn source_label(&self) -> String {
        match &self.source {
            ValidatedSource::Rabbit { settings, .. } => format!("rabbitmq/{}", settings.queue),
            ValidatedSource::Kafka(kafka) => format!("kafka/{}", kafka.settings.topic),
        }
    }
}

fn duration(field: &str, text: &str) -> Result<Duration, InvalidSpec> {
    humantime::parse_duration(text).map_err(|e| {
        invalid(
            field,
            format!("{text:?} is not a duration such as 5s or 1h30m ({e})"),
        )
    })
}

/// Checks `spec` of pipeline `namespace/name` and converts it.
pub fn validate(
    name: &str,
    namespace: &str,
    spec: &EmailPipelineSpec,
) -> Result<ValidatedPipeline, InvalidSpec> {
    // The schema's CEL rule refuses these at admission; checked again for a server that
    // did not run it.
    if name.contains('.') || name.len() > 56 {
        return Err(invalid(
            "metadata.name",
            "must have no dots and at most 56 characters: it names the worker Service <name>-worker (a DNS label) and a label value",
        ));
    }
    let delivery = &spec.delivery;
    let retry = RetryPolicy {
        max_attempts: delivery.max_attempts,
        initial: duration("spec.delivery.backoff.initial", &delivery.backoff.initial)?,
        multiplier: delivery.backoff.multiplier,
        max: duration("spec.delivery.backoff.max", &delivery.backoff.max)?,
    };
    retry
        .validate()
        .map_err(|e| invalid("spec.delivery", e.to_string()))?;

    let source = match (&spec.source.rabbitmq, &spec.source.kafka) {
        (Some(rabbit), None) => {
            let settings = RabbitSettings {
                exchange: rabbit
                    .exchange
                    .clone()
                    .unwrap_or_else(|| mailpipe_contract::naming::default_exchange(&rabbit.queue)),
                exchange_kind: rabbit.exchange_type,
                queue: rabbit.queue.clone(),
                queue_type: rabbit.queue_type,
                routing_key: rabbit.routing_key.clone(),
                max_priority: rabbit.max_priority,
                dead_letter: delivery.dead_letter,
            };
            settings
                .validate()
                .map_err(|e| invalid("spec.source.rabbitmq", e.to_string()))?;
            if u32::from(rabbit.prefetch) < spec.worker.concurrency {
                return Err(invalid(
                    "spec.source.rabbitmq.prefetch",
                    format!(
                        "prefetch {} is below spec.worker.concurrency {}: the broker would hand each worker at most {} jobs at once; raise prefetch or lower concurrency",
                        rabbit.prefetch, spec.worker.concurrency, rabbit.prefetch
                    ),
                ));
            }
            let plan = settings.plan(&retry);
            ValidatedSource::Rabbit {
                settings,
                plan,
                connection: RabbitConnection {
                    connection_secret: rabbit.connection_secret.clone(),
                    ca_secret: rabbit.ca_secret.clone(),
                    prefetch: rabbit.prefetch,
                },
            }
        }
        (None, Some(kafka)) => {
            let settings = KafkaSettings {
                topic: kafka.topic.clone(),
                partitions: kafka.partitions,
                replication: kafka.replication_factor,
                dead_letter: delivery.dead_letter,
                config: kafka.topic_config.clone(),
            };
            settings
                .validate(&retry)
                .map_err(|e| invalid("spec.source.kafka", e.to_string()))?;
            if let Some(key) = kafka.topic_config.keys().find(|k| {
                k.is_empty()
                    || !k
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.')
            }) {
                return Err(invalid(
                    "spec.source.kafka.topicConfig",
                    format!("{key:?} is not a Kafka topic configuration name (like retention.ms)"),
                ));
            }
            let plain = kafka
                .sasl
                .as_ref()
                .is_some_and(|s| s.mechanism == crd::SaslMechanism::Plain);
            if plain && kafka.ca_secret.is_none() {
                return Err(invalid(
                    "spec.source.kafka.sasl.mechanism",
                    "SASL PLAIN sends the password as it is: set spec.source.kafka.caSecret (TLS) or use SCRAM",
                ));
            }
            let plan = settings.plan(&retry);
            ValidatedSource::Kafka(KafkaTarget {
                settings,
                plan,
                bootstrap: kafka
                    .bootstrap_servers
                    .iter()
                    .map(|s| s.0.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                group: kafka
                    .consumer_group
                    .clone()
                    .unwrap_or_else(|| format!("{namespace}.{name}")),
                ca_secret: kafka.ca_secret.clone(),
                sasl: kafka.sasl.clone(),
            })
        }
        _ => {
            return Err(invalid(
                "spec.source",
                "exactly one of spec.source.rabbitmq or spec.source.kafka must be set",
            ))
        }
    };

    let scaling = &spec.scaling;
    if scaling.min_replicas > scaling.max_replicas {
        return Err(invalid(
            "spec.scaling",
            "spec.scaling.minReplicas must be <= spec.scaling.maxReplicas",
        ));
    }
    if scaling
        .thresholds
        .windows(2)
        .any(|pair| pair[0].backlog >= pair[1].backlog)
    {
        return Err(invalid(
            "spec.scaling.thresholds",
            "rows must be in strictly increasing backlog order",
        ));
    }
    let drain_within = match &scaling.drain_within {
        None => None,
        Some(text) => {
            let within = duration("spec.scaling.drainWithin", text)?;
            if within.is_zero() {
                return Err(invalid(
                    "spec.scaling.drainWithin",
                    "must be above zero (leave it out for no drain-time objective)",
                ));
            }
            if spec
                .source
                .rabbitmq
                .as_ref()
                .is_some_and(|r| r.management_secret.is_none())
            {
                return Err(invalid(
                    "spec.scaling.drainWithin",
                    "needs the send rate the workers show, which the scaler reads from the broker's acks through the management API: set spec.source.rabbitmq.managementSecret",
                ));
            }
            Some(within)
        }
    };
    let replicas = scaling.max_replicas.max(1) as u32;
    let pool = spec.smtp.pool_size;
    if pool < replicas {
        return Err(invalid(
            "spec.smtp.poolSize",
            format!(
                "{pool} connections cannot be shared by up to {replicas} replicas (spec.scaling.maxReplicas): \
                 raise poolSize to at least {replicas} or lower maxReplicas"
            ),
        ));
    }
    let rate_per_replica = match spec.smtp.rate_limit {
        Some(rate) if rate < replicas => {
            return Err(invalid(
                "spec.smtp.rateLimit",
                format!(
                    "{rate} messages per second cannot be shared by up to {replicas} replicas: \
                     raise rateLimit to at least {replicas} or lower spec.scaling.maxReplicas"
                ),
            ))
        }
        Some(rate) => Some(rate / replicas),
        None => None,
    };
    if spec.smtp.tls == crd::TlsMode::None && spec.smtp.insecure_skip_verify {
        return Err(invalid(
            "spec.smtp.insecureSkipVerify",
            "there is no certificate to skip with tls none",
        ));
    }
    for var in &spec.worker.env {
        if var.name.starts_with("MAILPIPE_") {
            return Err(invalid(
                "spec.worker.env",
                format!(
                    "{} is set by the operator from the spec; set the matching spec field instead",
                    var.name
                ),
            ));
        }
    }
    let grace = Duration::from_secs(spec.worker.termination_grace_period_seconds.max(10) as u64);
    // Destructured whole: a field added to the CRD must be handled here.
    let crd::Smtp {
        host,
        port,
        tls,
        ca_secret,
        insecure_skip_verify,
        credentials_secret,
        from,
        pool_size,
        rate_limit: _,
    } = spec.smtp.clone();
    let crd::Worker {
        image,
        concurrency,
        resources,
        env,
        node_selector,
        tolerations,
        termination_grace_period_seconds,
    } = spec.worker.clone();
    let idempotency = match &delivery.idempotency {
        Some(crd::Idempotency {
            redis_secret,
            ttl,
            on_unavailable,
        }) => Some(ValidatedIdempotency {
            redis_secret: redis_secret.clone(),
            ttl: duration("spec.delivery.idempotency.ttl", ttl)?,
            on_unavailable: *on_unavailable,
        }),
        None => None,
    };
    Ok(ValidatedPipeline {
        name: name.to_string(),
        namespace: namespace.to_string(),
        source,
        smtp: SmtpTarget {
            host,
            port,
            tls,
            ca_secret,
            insecure_skip_verify,
            credentials: credentials_secret,
            from,
        },
        worker: WorkerShape {
            image,
            concurrency,
            resources,
            env,
            node_selector,
            tolerations,
            termination_grace_period_seconds,
        },
        templates: spec.templates.as_ref().map(|t| t.config_map.clone()),
        dead_letter: delivery.dead_letter,
        idempotency,
        scaling: ScalingRules {
            min_replicas: scaling.min_replicas.max(0) as u32,
            max_replicas: scaling.max_replicas.max(0) as u32,
            target_backlog_per_replica: scaling.target_backlog_per_replica.max(1) as u64,
            activation_backlog: scaling.activation_backlog.max(0) as u64,
            max_step: scaling.max_step.map(|n| n.max(1) as u32),
            fallback_replicas: scaling.fallback_replicas.map(|n| n.max(0) as u32),
            thresholds: scaling
                .thresholds
                .iter()
                .map(|t| (t.backlog.max(0) as u64, t.replicas.max(0) as u32))
                .collect(),
            drain_within,
            allow_idle_consumers: scaling.allow_idle_consumers,
        },
        smtp_pool_size: pool_size,
        retry,
        shutdown_timeout: grace - Duration::from_secs(5),
        rate_per_replica,
        poll_interval: duration("spec.scaling.pollInterval", &scaling.poll_interval)?,
        scale_up_stabilization: duration(
            "spec.scaling.scaleUpStabilization",
            &scaling.scale_up_stabilization,
        )?,
        scale_down_stabilization: duration(
            "spec.scaling.scaleDownStabilization",
            &scaling.scale_down_stabilization,
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(patch: serde_json::Value) -> EmailPipelineSpec {
        let mut base = json!({
            "source": {"rabbitmq": {"connectionSecret": {"name": "amqp", "key": "url"}, "queue": "welcome"}},
            "smtp": {"host": "smtp.example.com", "from": {"address": "noreply@example.com"}},
        });
        merge(&mut base, patch);
        serde_json::from_value(base).expect("a spec")
    }

    fn merge(base: &mut serde_json::Value, patch: serde_json::Value) {
        match (base, patch) {
            (serde_json::Value::Object(b), serde_json::Value::Object(p)) => {
                for (k, v) in p {
                    merge(b.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (b, p) => *b = p,
        }
    }

    #[test]
    fn a_minimal_spec_gets_the_contract_defaults() {
        let valid = validate("welcome", "mail", &spec(json!({}))).unwrap();
        assert_eq!(valid.retry, RetryPolicy::default());
        assert_eq!(valid.shutdown_timeout, Duration::from_secs(55));
        assert_eq!(valid.smtp_pool_size, 20);
        assert_eq!(valid.rate_per_replica, None);
        assert_eq!(valid.source_label(), "rabbitmq/welcome");
        let ValidatedSource::Rabbit { settings, plan, .. } = &valid.source else {
            panic!("a RabbitMQ source")
        };
        assert_eq!(
            *settings,
            RabbitSettings {
                exchange: "welcome_exc".into(),
                queue: "welcome".into(),
                ..RabbitSettings::default()
            }
        );
        assert_eq!(*plan, settings.plan(&RetryPolicy::default()));
    }

    #[test]
    fn the_rate_is_shared_out_among_the_largest_replica_count_and_the_pool_caps_it() {
        let valid = validate(
            "w",
            "m",
            &spec(
                json!({"smtp": {"poolSize": 40, "rateLimit": 100}, "scaling": {"maxReplicas": 4}}),
            ),
        )
        .unwrap();
        // The connections are shared at run time (the budget's tokens), the rate is not.
        assert_eq!(
            (valid.smtp_pool_size, valid.rate_per_replica),
            (40, Some(25))
        );
        let small = validate(
            "w",
            "m",
            &spec(json!({"smtp": {"poolSize": 2}, "scaling": {"maxReplicas": 4}})),
        );
        assert_eq!(small.unwrap_err().field, "spec.smtp.poolSize");
    }

    #[test]
    fn threshold_rows_must_rise_in_backlog() {
        let table = |rows: serde_json::Value| {
            validate("w", "m", &spec(json!({"scaling": {"thresholds": rows}})))
        };
        let valid =
            table(json!([{"backlog": 0, "replicas": 1}, {"backlog": 100, "replicas": 3}])).unwrap();
        assert_eq!(valid.scaling.thresholds, vec![(0, 1), (100, 3)]);
        let err = table(json!([{"backlog": 100, "replicas": 3}, {"backlog": 100, "replicas": 4}]))
            .unwrap_err();
        assert_eq!(err.field, "spec.scaling.thresholds");
    }

    #[test]
    fn a_drain_objective_needs_a_measured_rate_and_a_positive_time() {
        let drain = |scaling: serde_json::Value, management: bool| {
            let mut patch = json!({"scaling": scaling});
            if management {
                patch["source"] =
                    json!({"rabbitmq": {"managementSecret": {"name": "admin", "key": "url"}}});
            }
            validate("w", "m", &spec(patch))
        };
        let valid = drain(json!({"drainWithin": "30s"}), true).unwrap();
        assert_eq!(valid.scaling.drain_within, Some(Duration::from_secs(30)));
        let err = drain(json!({"drainWithin": "30s"}), false).unwrap_err();
        assert_eq!(err.field, "spec.scaling.drainWithin");
        assert!(err.to_string().contains("managementSecret"), "{err}");
        let err = drain(json!({"drainWithin": "0s"}), true).unwrap_err();
        assert_eq!(err.field, "spec.scaling.drainWithin");
        assert_eq!(drain(json!({}), false).unwrap().scaling.drain_within, None);
    }

    #[test]
    fn bad_durations_and_retry_bounds_name_their_field() {
        let err = validate(
            "w",
            "m",
            &spec(json!({"delivery": {"backoff": {"initial": "soon"}}})),
        )
        .unwrap_err();
        assert_eq!(err.field, "spec.delivery.backoff.initial");
        let err = validate(
            "w",
            "m",
            &spec(json!({"delivery": {"backoff": {"initial": "10m", "max": "1m"}}})),
        )
        .unwrap_err();
        assert_eq!(
            err,
            invalid(
                "spec.delivery",
                "initial backoff must be at least 1ms and at most the maximum backoff"
            )
        );
    }

    #[test]
    fn names_that_would_make_invalid_children_are_refused() {
        for name in ["mail.v2", &"a".repeat(57)] {
            assert_eq!(
                validate(name, "m", &spec(json!({}))).unwrap_err().field,
                "metadata.name"
            );
        }
        validate(&"a".repeat(56), "m", &spec(json!({}))).unwrap();
    }

    #[test]
    fn pipelines_that_keep_the_default_exchange_never_share_one() {
        let exchange = |queue: &str| {
            let valid = validate(
                queue,
                "mail",
                &spec(json!({"source": {"rabbitmq": {"queue": queue}}})),
            )
            .unwrap();
            let ValidatedSource::Rabbit { settings, .. } = valid.source else {
                panic!("a RabbitMQ source")
            };
            settings.exchange
        };
        assert_eq!(exchange("welcome"), "welcome_exc");
        assert_eq!(exchange("smtp_send_email"), "smtp_send_email_exc");
        assert_ne!(exchange("invoices"), exchange("welcome"));
    }

    #[test]
    fn a_prefetch_below_the_concurrency_is_refused_not_silently_capped() {
        let err = validate("w", "m", &spec(json!({"worker": {"concurrency": 64}}))).unwrap_err();
        assert_eq!(err.field, "spec.source.rabbitmq.prefetch");
        assert!(
            err.message.contains("below spec.worker.concurrency 64"),
            "{err}"
        );
        validate(
            "w",
            "m",
            &spec(json!({"worker": {"concurrency": 64}, "source": {"rabbitmq": {"prefetch": 64}}})),
        )
        .unwrap();
    }

    #[test]
    fn what_rabbitmq_refuses_is_refused_here_first() {
        let err = validate(
            "w",
            "m",
            &spec(json!({"source": {"rabbitmq": {"queue": "amq.mine"}}})),
        )
        .unwrap_err();
        assert_eq!(err.field, "spec.source.rabbitmq");
        assert!(err.message.contains("reserved"), "{err}");
        let err = validate(
            "w",
            "m",
            &spec(json!({"source": {"rabbitmq": {"queueType": "quorum", "maxPriority": 3}}})),
        )
        .unwrap_err();
        assert!(
            err.message.contains("quorum queues refuse x-max-priority"),
            "{err}"
        );
    }

    #[test]
    fn the_operator_owns_the_worker_environment() {
        let err = validate(
            "w",
            "m",
            &spec(json!({"worker": {"env": [{"name": "MAILPIPE_SMTP_PASSWORD", "value": "x"}]}})),
        )
        .unwrap_err();
        assert_eq!(err.field, "spec.worker.env");
    }

    fn kafka(patch: serde_json::Value) -> EmailPipelineSpec {
        let mut base = json!({
            "source": {"rabbitmq": null, "kafka": {"bootstrapServers": ["k1:9092", "k2:9092"], "topic": "email-events"}},
            "scaling": {"maxReplicas": 4},
        });
        merge(&mut base, patch);
        let mut out = spec(base);
        out.source.rabbitmq = None;
        out
    }

    #[test]
    fn a_kafka_source_gets_its_topic_plan_group_and_worker_environment() {
        let valid = validate(
            "events",
            "mail",
            &kafka(json!({"source": {"kafka": {
                "caSecret": {"name": "kafka-ca", "key": "ca.crt"},
                "sasl": {"mechanism": "SCRAM-SHA-512", "secret": "kafka-login"}}}})),
        )
        .unwrap();
        let ValidatedSource::Kafka(target) = &valid.source else {
            panic!("a Kafka source")
        };
        assert_eq!(target.bootstrap, "k1:9092,k2:9092");
        assert_eq!(
            target.group, "mail.events",
            "the namespace and name by default"
        );
        assert_eq!(target.plan.work(), "email-events");
        assert_eq!(target.plan.topics.last().unwrap().name, "email-events-dlq");
        assert_eq!(valid.source_label(), "kafka/email-events");
        let vars = crate::build::worker_environment(&valid);
        let value = |name: &str| {
            vars.iter().find_map(|v| match v {
                crate::build::WorkerVar::Value(n, value) if n == name => Some(value.clone()),
                _ => None,
            })
        };
        assert_eq!(value("MAILPIPE_SOURCE").as_deref(), Some("kafka"));
        assert_eq!(
            value("MAILPIPE_KAFKA_TOPIC").as_deref(),
            Some("email-events")
        );
        assert_eq!(
            value("MAILPIPE_KAFKA_GROUP").as_deref(),
            Some("mail.events")
        );
        assert_eq!(value("MAILPIPE_TOPOLOGY").as_deref(), Some("verify"));
        assert_eq!(
            value("MAILPIPE_KAFKA_SASL_MECHANISM").as_deref(),
            Some("SCRAM-SHA-512")
        );
        assert_eq!(
            value("MAILPIPE_SMTP_POOL_SIZE").as_deref(),
            Some("5"),
            "an equal share of the pool (20) at the most replicas (4): no budget queue on Kafka"
        );
        assert!(value("MAILPIPE_SMTP_BUDGET_QUEUE").is_none());
        let password_is_a_file = vars.iter().any(|v| {
            matches!(v, crate::build::WorkerVar::SecretFile { name, secret, .. }
                if name == "MAILPIPE_KAFKA_SASL_PASSWORD_FILE" && secret.name == "kafka-login" && secret.key == "password")
        });
        assert!(password_is_a_file, "the password only as a mounted file");
        assert!(value("MAILPIPE_KAFKA_SASL_PASSWORD").is_none());
    }

    #[test]
    fn sasl_plain_without_tls_is_refused() {
        let err = validate(
            "events",
            "mail",
            &kafka(
                json!({"source": {"kafka": {"sasl": {"mechanism": "PLAIN", "secret": "login"}}}}),
            ),
        )
        .unwrap_err();
        assert_eq!(err.field, "spec.source.kafka.sasl.mechanism");
        let err = validate(
            "events",
            "mail",
            &kafka(json!({"source": {"kafka": {"topic": "a b"}}})),
        )
        .unwrap_err();
        assert_eq!(err.field, "spec.source.kafka");
        let err = validate(
            "events",
            "mail",
            &kafka(json!({"source": {"kafka": {"topicConfig": {"Retention MS": "1"}}}})),
        )
        .unwrap_err();
        assert_eq!(err.field, "spec.source.kafka.topicConfig");
        let valid = validate(
            "events",
            "mail",
            &kafka(json!({"source": {"kafka": {"topicConfig": {"retention.ms": "86400000"}}}})),
        )
        .unwrap();
        let ValidatedSource::Kafka(target) = valid.source else {
            panic!("a Kafka source")
        };
        assert!(target.plan.topics.iter().all(|t| t
            .config
            .get("retention.ms")
            .map(String::as_str)
            == Some("86400000")));
    }
}
