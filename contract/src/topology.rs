//! The RabbitMQ topology of one pipeline, as plain data.
//!
//! [`RabbitSettings::plan`] turns what a user configures (exchange, queue, type, priority) and
//! the retry policy into every exchange, queue and binding the pipeline needs, with their
//! arguments. The worker declares (or passively verifies) this plan; the operator declares the
//! same plan from an `EmailPipeline`, so both always agree on names and arguments.
//!
//! Shape: `exchange --routing key--> work queue`; a failed job waits in
//! `work.retry.<ms>ms` (message TTL, then dead-lettered back to the work queue through the
//! default exchange); a job that can never be sent goes to `work.dlx` (fanout) -> `work.dlq`.
//! Quorum queues dead-letter at-least-once (which RabbitMQ only allows with
//! `x-overflow: reject-publish`).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::choices::from_str_by_name;
use crate::naming;
use crate::retry::RetryPolicy;

/// The AMQP exchange type of the pipeline's entry exchange.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    /// Every bound queue gets every message (the usual `smtp_send_email_exc`).
    #[default]
    Fanout,
    /// Routed by exact routing key.
    Direct,
    /// Routed by routing-key pattern.
    Topic,
}

impl ExchangeKind {
    /// The AMQP name of the type.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Direct => "direct",
            ExchangeKind::Topic => "topic",
        }
    }
}

/// The RabbitMQ queue type of the work, retry and dead-letter queues.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Classic durable queues; the only type that supports priorities on RabbitMQ 3.x.
    #[default]
    Classic,
    /// Replicated quorum queues, dead-lettering at-least-once.
    Quorum,
}

impl QueueType {
    /// The value of the `x-queue-type` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

from_str_by_name!(
    ExchangeKind,
    "exchange type",
    [
        ExchangeKind::Fanout,
        ExchangeKind::Direct,
        ExchangeKind::Topic
    ]
);
from_str_by_name!(
    QueueType,
    "queue type",
    [QueueType::Classic, QueueType::Quorum]
);

/// What a user configures about a pipeline's RabbitMQ side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RabbitSettings {
    /// The exchange producers publish to, e.g. `smtp_send_email_exc`.
    pub exchange: String,
    /// Its type.
    pub exchange_kind: ExchangeKind,
    /// The work queue, e.g. `smtp_send_email`.
    pub queue: String,
    /// The queue type of every queue of the pipeline.
    pub queue_type: QueueType,
    /// The binding key between exchange and work queue (ignored by fanout).
    pub routing_key: String,
    /// `x-max-priority` of the work queue; classic queues only.
    pub max_priority: Option<u8>,
    /// Whether jobs that can never be sent go to a dead-letter queue (else they are dropped).
    pub dead_letter: bool,
}

impl Default for RabbitSettings {
    fn default() -> Self {
        RabbitSettings {
            exchange: "smtp_send_email_exc".into(),
            exchange_kind: ExchangeKind::Fanout,
            queue: "smtp_send_email".into(),
            queue_type: QueueType::Classic,
            routing_key: String::new(),
            max_priority: None,
            dead_letter: true,
        }
    }
}

/// A configuration that RabbitMQ would refuse or that cannot work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTopology(pub String);

impl fmt::Display for InvalidTopology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidTopology {}

/// Room left in a 255-byte AMQP short string for the longest suffix we append.
const MAX_QUEUE_NAME: usize = 255 - ".retry.86400000ms".len();

/// An argument value in a queue declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgValue {
    /// A long string argument.
    Str(String),
    /// A signed integer argument.
    Int(i64),
}

/// One exchange to declare (always durable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeDecl {
    /// Exchange name.
    pub name: String,
    /// Exchange type.
    pub kind: ExchangeKind,
}

/// One queue to declare (always durable), with its `x-` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDecl {
    /// Queue name.
    pub name: String,
    /// Declaration arguments.
    pub args: BTreeMap<String, ArgValue>,
}

/// One binding of a queue to an exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingDecl {
    /// Source exchange.
    pub exchange: String,
    /// Destination queue.
    pub queue: String,
    /// Binding key.
    pub routing_key: String,
}

/// Everything a pipeline declares, in declaration order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyPlan {
    /// Exchanges first.
    pub exchanges: Vec<ExchangeDecl>,
    /// Then queues: work queue, dead-letter queue, delay queues.
    pub queues: Vec<QueueDecl>,
    /// Then bindings.
    pub bindings: Vec<BindingDecl>,
}

impl RabbitSettings {
    /// Refuses what RabbitMQ would refuse, with a message that says what to change.
    pub fn validate(&self) -> Result<(), InvalidTopology> {
        let bad = |m: String| Err(InvalidTopology(m));
        if self.exchange.is_empty() || self.exchange.len() > 255 {
            return bad("exchange name must be 1 to 255 bytes".into());
        }
        if self.exchange.starts_with("amq.") {
            return bad(format!(
                "exchange name {:?} is reserved (amq.*)",
                self.exchange
            ));
        }
        if self.queue.is_empty() || self.queue.len() > MAX_QUEUE_NAME {
            return bad(format!("queue name must be 1 to {MAX_QUEUE_NAME} bytes"));
        }
        if self.queue.starts_with("amq.") {
            return bad(format!("queue name {:?} is reserved (amq.*)", self.queue));
        }
        if self.routing_key.len() > 255 {
            return bad("routing key must be at most 255 bytes".into());
        }
        match (self.queue_type, self.max_priority) {
            (QueueType::Quorum, Some(_)) => bad(
                "priority is a classic-queue feature: RabbitMQ 3.x quorum queues refuse \
                 x-max-priority; use queue type classic or drop the max priority"
                    .into(),
            ),
            (_, Some(0)) => bad("max priority must be between 1 and 255".into()),
            _ => Ok(()),
        }
    }

    /// The full topology for these settings and retry policy.
    pub fn plan(&self, retry: &RetryPolicy) -> TopologyPlan {
        let queue_type = self.queue_type;
        let base_args = || {
            let mut args = BTreeMap::new();
            args.insert(
                "x-queue-type".to_string(),
                ArgValue::Str(queue_type.as_str().into()),
            );
            if queue_type == QueueType::Quorum {
                args.insert(
                    "x-dead-letter-strategy".into(),
                    ArgValue::Str("at-least-once".into()),
                );
                args.insert("x-overflow".into(), ArgValue::Str("reject-publish".into()));
            }
            args
        };
        let dlx = naming::dead_letter_exchange(&self.queue);
        let dlq = naming::dead_letter_queue(&self.queue);

        let mut exchanges = vec![ExchangeDecl {
            name: self.exchange.clone(),
            kind: self.exchange_kind,
        }];
        let mut work_args = base_args();
        if let Some(max) = self.max_priority {
            work_args.insert("x-max-priority".into(), ArgValue::Int(max.into()));
        }
        if !self.dead_letter && queue_type == QueueType::Quorum {
            work_args.remove("x-dead-letter-strategy");
        }
        let mut queues = Vec::new();
        let mut bindings = vec![BindingDecl {
            exchange: self.exchange.clone(),
            queue: self.queue.clone(),
            routing_key: self.routing_key.clone(),
        }];
        if self.dead_letter {
            work_args.insert("x-dead-letter-exchange".into(), ArgValue::Str(dlx.clone()));
            exchanges.push(ExchangeDecl {
                name: dlx.clone(),
                kind: ExchangeKind::Fanout,
            });
        }
        queues.push(QueueDecl {
            name: self.queue.clone(),
            args: work_args,
        });
        if self.dead_letter {
            let mut dlq_args = base_args();
            dlq_args.remove("x-dead-letter-strategy");
            queues.push(QueueDecl {
                name: dlq.clone(),
                args: dlq_args,
            });
            bindings.push(BindingDecl {
                exchange: dlx,
                queue: dlq,
                routing_key: String::new(),
            });
        }
        for delay in retry.distinct_delays() {
            let mut args = base_args();
            args.insert(
                "x-message-ttl".into(),
                ArgValue::Int(delay.as_millis() as i64),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                ArgValue::Str(String::new()),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                ArgValue::Str(self.queue.clone()),
            );
            queues.push(QueueDecl {
                name: naming::delay_queue(&self.queue, delay),
                args,
            });
        }
        TopologyPlan {
            exchanges,
            queues,
            bindings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn retry() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max: Duration::from_secs(60),
        }
    }

    #[test]
    fn quorum_queue_with_priority_is_a_clear_error() {
        let settings = RabbitSettings {
            queue_type: QueueType::Quorum,
            max_priority: Some(10),
            ..RabbitSettings::default()
        };
        let err = settings.validate().unwrap_err();
        assert!(err.0.contains("classic-queue feature"), "{err}");
    }

    #[test]
    fn classic_plan_has_work_dead_letter_and_one_delay_queue_per_delay() {
        let plan = RabbitSettings::default().plan(&retry());
        let names: Vec<&str> = plan.queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "smtp_send_email",
                "smtp_send_email.dlq",
                "smtp_send_email.retry.1000ms",
                "smtp_send_email.retry.2000ms"
            ]
        );
        let work = &plan.queues[0];
        assert_eq!(
            work.args.get("x-dead-letter-exchange"),
            Some(&ArgValue::Str("smtp_send_email.dlx".into()))
        );
        let delay = &plan.queues[2];
        assert_eq!(delay.args.get("x-message-ttl"), Some(&ArgValue::Int(1000)));
        assert_eq!(
            delay.args.get("x-dead-letter-routing-key"),
            Some(&ArgValue::Str("smtp_send_email".into()))
        );
        assert_eq!(plan.bindings.len(), 2);
    }

    #[test]
    fn quorum_queues_dead_letter_at_least_once_with_reject_publish() {
        let plan = RabbitSettings {
            queue_type: QueueType::Quorum,
            ..RabbitSettings::default()
        }
        .plan(&retry());
        for queue in plan.queues.iter().filter(|q| !q.name.ends_with(".dlq")) {
            assert_eq!(
                queue.args.get("x-dead-letter-strategy"),
                Some(&ArgValue::Str("at-least-once".into())),
                "{}",
                queue.name
            );
            assert_eq!(
                queue.args.get("x-overflow"),
                Some(&ArgValue::Str("reject-publish".into()))
            );
        }
    }

    #[test]
    fn reserved_and_empty_names_are_refused() {
        for settings in [
            RabbitSettings {
                queue: String::new(),
                ..RabbitSettings::default()
            },
            RabbitSettings {
                exchange: "amq.direct".into(),
                ..RabbitSettings::default()
            },
        ] {
            assert!(settings.validate().is_err());
        }
    }

    #[test]
    fn names_parse_from_their_amqp_spelling() {
        assert_eq!("topic".parse::<ExchangeKind>(), Ok(ExchangeKind::Topic));
        assert!("stream"
            .parse::<QueueType>()
            .unwrap_err()
            .contains("classic, quorum"));
    }
}
