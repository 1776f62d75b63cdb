//! The topology plan over AMQP (feature `amqp`, with lapin): declared by the operator,
//! declared or passively verified by the worker, measured and deleted by the operator. One
//! implementation, so both sides send RabbitMQ the same declarations byte for byte.

use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::Channel;

use crate::topology::{ArgValue, BindingDecl, ExchangeKind, TopologyPlan};

/// An AMQP long string (header values, string arguments).
pub fn long(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}

fn lapin_kind(kind: ExchangeKind) -> lapin::ExchangeKind {
    match kind {
        ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
        ExchangeKind::Direct => lapin::ExchangeKind::Direct,
        ExchangeKind::Topic => lapin::ExchangeKind::Topic,
    }
}

fn field_table(args: &std::collections::BTreeMap<String, ArgValue>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in args {
        let value = match value {
            ArgValue::Str(s) => long(s),
            ArgValue::Int(i) => AMQPValue::LongLongInt(*i),
        };
        table.insert(ShortString::from(key.as_str()), value);
    }
    table
}

/// Declares every exchange, queue and binding of the plan; with `passive`, only checks
/// that the exchanges and queues exist (a missing one closes the channel with 404).
pub async fn declare(
    channel: &Channel,
    plan: &TopologyPlan,
    passive: bool,
) -> Result<(), lapin::Error> {
    for exchange in &plan.exchanges {
        channel
            .exchange_declare(
                exchange.name.as_str().into(),
                lapin_kind(exchange.kind),
                ExchangeDeclareOptions {
                    passive,
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
    }
    for queue in &plan.queues {
        channel
            .queue_declare(
                queue.name.as_str().into(),
                QueueDeclareOptions {
                    passive,
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                if passive {
                    FieldTable::default()
                } else {
                    field_table(&queue.args)
                },
            )
            .await?;
    }
    if !passive {
        for binding in &plan.bindings {
            channel
                .queue_bind(
                    binding.queue.as_str().into(),
                    binding.exchange.as_str().into(),
                    binding.routing_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
    }
    Ok(())
}

/// Ready messages and consumers of a queue (passive declare: 404 closes the channel when
/// the queue is missing).
pub async fn depth(channel: &Channel, queue: &str) -> Result<(u32, u32), lapin::Error> {
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((declared.message_count(), declared.consumer_count()))
}

/// Deletes a queue only if it holds no messages (RabbitMQ refuses otherwise with 406,
/// closing the channel).
pub async fn delete_queue_if_empty(channel: &Channel, queue: &str) -> Result<(), lapin::Error> {
    channel
        .queue_delete(
            queue.into(),
            QueueDeleteOptions {
                if_empty: true,
                ..QueueDeleteOptions::default()
            },
        )
        .await
        .map(drop)
}

/// Removes a binding (nothing happens when it does not exist).
pub async fn unbind(channel: &Channel, binding: &BindingDecl) -> Result<(), lapin::Error> {
    channel
        .queue_unbind(
            binding.queue.as_str().into(),
            binding.exchange.as_str().into(),
            binding.routing_key.as_str().into(),
            FieldTable::default(),
        )
        .await
}

/// Deletes a queue whatever it holds: only for a queue known to be empty, with no consumer
/// and nothing routed to it (quorum queues refuse `if-empty` with 540 NOT_IMPLEMENTED).
pub async fn delete_queue(channel: &Channel, queue: &str) -> Result<(), lapin::Error> {
    channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .map(drop)
}

/// Deletes an exchange only if no queue or exchange is bound to it (406 otherwise).
pub async fn delete_exchange_if_unused(
    channel: &Channel,
    exchange: &str,
) -> Result<(), lapin::Error> {
    channel
        .exchange_delete(
            exchange.into(),
            lapin::options::ExchangeDeleteOptions {
                if_unused: true,
                ..lapin::options::ExchangeDeleteOptions::default()
            },
        )
        .await
}
