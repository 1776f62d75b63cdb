//! sharing (no client required): two pipelines must not silently share a fanout exchange.
//!
//! A fanout exchange copies every job to every queue bound to it: two pipelines whose
//! queues are bound to the same fanout exchange on the same broker would each send every
//! job. Each pipeline's default exchange is its own (`<queue>_exc`); this is the rule for
//! an exchange named explicitly. The first pipeline bound to the exchange keeps it; a later
//! one is refused (`TopologyReady=False`, reason `SharedExchange`) before anything is
//! declared for it. Topic and direct exchanges route by key and may be shared.
//!
//! Which broker a pipeline uses is known from its status (`status.broker`: scheme, host,
//! port and virtual host of its AMQP URL, never the credentials), written once its
//! topology is declared; which exchange feeds its queue, from `status.intake`.

use std::str::FromStr;

use kube::ResourceExt;
use lapin::uri::AMQPUri;

use crate::crd::{EmailPipeline, ExchangeKind};

/// `amqp://host:port/vhost` (the vhost with `/` written `%2f`): where a pipeline's topology
/// lives, without the credentials. `None` for a URL that does not parse.
pub fn broker_identity(url: &str) -> Option<String> {
    let uri = AMQPUri::from_str(url).ok()?;
    let scheme = match uri.scheme {
        lapin::uri::AMQPScheme::AMQP => "amqp",
        lapin::uri::AMQPScheme::AMQPS => "amqps",
    };
    Some(format!(
        "{scheme}://{}:{}/{}",
        uri.authority.host.to_lowercase(),
        uri.authority.port,
        uri.vhost.replace('/', "%2f")
    ))
}

fn fanout_exchange(pipeline: &EmailPipeline) -> Option<(String, String)> {
    let rabbit = pipeline.spec.source.rabbitmq.as_ref()?;
    (rabbit.exchange_type == ExchangeKind::Fanout).then(|| {
        let exchange = rabbit
            .exchange
            .clone()
            .unwrap_or_else(|| mailpipe_contract::naming::default_exchange(&rabbit.queue));
        (exchange, rabbit.queue.clone())
    })
}

/// The pipeline (`namespace/name`) whose queue is already bound to the fanout exchange
/// `pipeline` asks for on the same broker (`broker`), when `pipeline` itself is not bound
/// to it yet: then `pipeline` must be refused.
pub fn shared_fanout_exchange(
    pipeline: &EmailPipeline,
    broker: &str,
    others: &[std::sync::Arc<EmailPipeline>],
) -> Option<String> {
    let (exchange, queue) = fanout_exchange(pipeline)?;
    let bound = |p: &EmailPipeline| {
        p.status.as_ref().is_some_and(|s| {
            s.broker.as_deref() == Some(broker)
                && s.intake.as_ref().is_some_and(|i| i.exchange == exchange)
        })
    };
    if bound(pipeline) {
        return None;
    }
    others
        .iter()
        .filter(|other| other.uid() != pipeline.uid())
        .filter(|other| fanout_exchange(other).is_some_and(|(e, q)| e == exchange && q != queue))
        .find(|other| bound(other))
        .map(|other| {
            format!(
                "{}/{}",
                other.namespace().unwrap_or_default(),
                other.name_any()
            )
        })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::crd::{EmailPipelineStatus, Intake};

    fn pipeline(name: &str, queue: &str, exchange: &str, kind: &str) -> EmailPipeline {
        let mut p: EmailPipeline = serde_json::from_value(serde_json::json!({
            "apiVersion": "mailpipe.dev/v1alpha1", "kind": "EmailPipeline",
            "metadata": {"name": name, "namespace": "mail", "uid": format!("uid-{name}")},
            "spec": {
                "source": {"rabbitmq": {"connectionSecret": {"name": "amqp", "key": "url"},
                    "queue": queue, "exchange": exchange, "exchangeType": kind}},
                "smtp": {"host": "smtp.example.com", "from": {"address": "noreply@example.com"}}
            }
        }))
        .expect("a pipeline");
        p.status = None;
        p
    }

    fn bound(mut p: EmailPipeline, broker: &str, exchange: &str) -> Arc<EmailPipeline> {
        p.status = Some(EmailPipelineStatus {
            broker: Some(broker.into()),
            intake: Some(Intake {
                exchange: exchange.into(),
                routing_key: String::new(),
            }),
            ..EmailPipelineStatus::default()
        });
        Arc::new(p)
    }

    const BROKER: &str = "amqp://rabbitmq:5672/%2f";

    #[test]
    fn the_broker_identity_has_no_credentials() {
        assert_eq!(
            broker_identity("amqp://user:secret@RabbitMQ:5672/%2f").as_deref(),
            Some(BROKER)
        );
        assert_eq!(
            broker_identity("amqps://u:p@mq.example.com/mail").as_deref(),
            Some("amqps://mq.example.com:5671/mail")
        );
        assert_eq!(broker_identity("not a url"), None);
    }

    #[test]
    fn a_second_pipeline_on_a_bound_fanout_exchange_is_refused_and_the_first_keeps_it() {
        let first = bound(
            pipeline("first", "q1", "events", "fanout"),
            BROKER,
            "events",
        );
        let second = pipeline("second", "q2", "events", "fanout");
        let others = vec![first.clone()];
        assert_eq!(
            shared_fanout_exchange(&second, BROKER, &others).as_deref(),
            Some("mail/first")
        );
        // The first, already bound, is never refused because of a newcomer.
        let newcomer = bound(pipeline("second", "q2", "other", "fanout"), BROKER, "other");
        assert_eq!(shared_fanout_exchange(&first, BROKER, &[newcomer]), None);
    }

    #[test]
    fn other_brokers_routed_exchanges_and_the_same_queue_are_not_sharing() {
        let first = bound(
            pipeline("first", "q1", "events", "fanout"),
            BROKER,
            "events",
        );
        let second = pipeline("second", "q2", "events", "fanout");
        let elsewhere = "amqp://other:5672/%2f";
        assert_eq!(
            shared_fanout_exchange(&second, elsewhere, std::slice::from_ref(&first)),
            None
        );
        let topic_first = bound(pipeline("t1", "q1", "events", "topic"), BROKER, "events");
        let topic_second = pipeline("t2", "q2", "events", "topic");
        assert_eq!(
            shared_fanout_exchange(&topic_second, BROKER, &[topic_first]),
            None
        );
        let same_queue = pipeline("again", "q1", "events", "fanout");
        assert_eq!(shared_fanout_exchange(&same_queue, BROKER, &[first]), None);
    }
}
