//! RabbitMQ source (lapin): declare or verify the topology, consume with a prefetch, settle
//! with publisher confirms.
//!
//! One connection carries two channels: the consumer channel (acks, nacks) and a publisher
//! channel in confirm mode (retry and dead-letter copies). A retry or dead-letter copy is
//! published and confirmed *before* the original is acked, so a crash in between leaves a
//! duplicate, never a loss. When the connection drops, unacked deliveries return to the queue
//! on the broker's side; `next` reconnects with capped exponential backoff and readiness is
//! false meanwhile. At shutdown the consumer is cancelled first; what the broker had already
//! pushed is then handed out with [`MessageSource::held`] while the pipeline can still send
//! it, and the rest goes back to the queue at once ([`MessageSource::give_back`]), for the
//! other replicas.
//!
//! Retry and dead-letter copies drop the producer's per-message `expiration`: a job waiting
//! for its next attempt, or kept for a person to look at, must not silently vanish. When the
//! broker refuses a copy (a nack: a full queue with `reject-publish`, a resource alarm), the
//! original is not acked: it goes back to the queue after a pause, unchanged, and is counted.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable};
use lapin::Acker;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};
use mailpipe_contract::amqp::{self, long};
use mailpipe_contract::naming::{self, headers};
use mailpipe_contract::topology::TopologyPlan;
use tokio_util::sync::CancellationToken;

use super::acks::Acks;
use super::{truncate, Delivery, MessageSource, Settle, SettleError, Settlement};
use crate::backoff::Backoff;
use crate::config::{AmqpConfig, TopologyMode};
use crate::health::{Component, Health};
use crate::metrics::Metrics;

/// Consumes the work queue of one pipeline.
pub struct RabbitSource {
    config: AmqpConfig,
    plan: TopologyPlan,
    tls: OwnedTLSConfig,
    health: Arc<Health>,
    metrics: Metrics,
    live: Option<Live>,
    backoff: Backoff,
    connected_once: bool,
    /// The consumer was cancelled and may still yield deliveries pushed before the cancel.
    holding: bool,
}

struct Live {
    connection: Connection,
    channel: Channel,
    consumer: Consumer,
    /// Shared by every delivery of this connection.
    settling: Arc<Settling>,
}

/// What every delivery of one connection settles through, shared rather than copied into
/// each delivery.
struct Settling {
    /// The publisher channel (confirms on), for retry and dead-letter copies.
    publisher: Channel,
    /// The consumer channel's acknowledgements, batched.
    acks: Arc<Acks>,
    work_queue: String,
    dead_letter: bool,
    metrics: Metrics,
}

/// How long a refused (nacked) copy's original waits before it goes back to the queue, so a
/// broker that keeps refusing does not turn into a hot loop.
const AFTER_NACK: Duration = Duration::from_secs(1);

/// Setting up the source failed before any connection was tried.
#[derive(Debug, thiserror::Error)]
#[error("cannot read AMQP CA file {path}: {source}")]
pub struct SetupError {
    path: String,
    source: std::io::Error,
}

/// The TLS settings of the broker connection (the CA file, when one is given, read once).
pub(crate) fn broker_tls(config: &AmqpConfig) -> Result<OwnedTLSConfig, SetupError> {
    let cert_chain = match &config.ca_file {
        Some(path) => Some(std::fs::read_to_string(path).map_err(|source| SetupError {
            path: path.display().to_string(),
            source,
        })?),
        None => None,
    };
    Ok(OwnedTLSConfig {
        identity: None,
        cert_chain,
    })
}

/// Opens a connection to the broker, listed by the broker as `name`.
pub(crate) async fn open(
    config: &AmqpConfig,
    tls: &OwnedTLSConfig,
    name: &str,
) -> Result<Connection, lapin::Error> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let runtime = lapin::runtime::default_runtime()?;
    Connection::connect_with_config(config.url.expose(), properties, tls.clone(), runtime).await
}

impl RabbitSource {
    /// Prepares the source; it connects on the first `next`.
    pub fn new(
        config: AmqpConfig,
        plan: TopologyPlan,
        health: Arc<Health>,
        metrics: Metrics,
    ) -> Result<RabbitSource, SetupError> {
        Ok(RabbitSource {
            tls: broker_tls(&config)?,
            config,
            plan,
            health,
            metrics,
            live: None,
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(30)),
            connected_once: false,
            holding: false,
        })
    }

    async fn connect(&self) -> Result<Live, lapin::Error> {
        let connection = open(&self.config, &self.tls, "mailpipe-worker").await?;
        let setup = connection.create_channel().await?;
        amqp::declare(
            &setup,
            &self.plan,
            self.config.topology == TopologyMode::Verify,
        )
        .await?;
        let _ = setup.close(200, "topology ready".into()).await;

        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                self.config.settings.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let settings = &self.config.settings;
        Ok(Live {
            connection,
            channel,
            consumer,
            settling: Arc::new(Settling {
                publisher,
                acks: Arc::default(),
                work_queue: settings.queue.clone(),
                dead_letter: settings.dead_letter,
                metrics: self.metrics.clone(),
            }),
        })
    }

    /// After the consumer was cancelled: the next delivery it had already received.
    async fn next_held(&mut self) -> Option<lapin::message::Delivery> {
        if !self.holding {
            return None;
        }
        let live = self.live.as_mut()?;
        // The stream ends after the cancel-ok; the timeout only guards a broken connection.
        match tokio::time::timeout(Duration::from_secs(1), live.consumer.next()).await {
            Ok(Some(Ok(delivery))) => Some(delivery),
            _ => {
                self.holding = false;
                None
            }
        }
    }

    fn wrap(&self, delivery: lapin::message::Delivery, settling: &Arc<Settling>) -> Delivery {
        settling.acks.delivered(delivery.delivery_tag);
        if delivery.redelivered {
            self.metrics.redelivered.inc();
        }
        let attempt = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(headers::ATTEMPT))
            .and_then(amqp_int)
            .map(|a| a.clamp(1, u32::MAX.into()) as u32)
            .unwrap_or(1);
        // A retried job comes back through the default exchange; the headers written on
        // its first retry remember where the producer published it.
        let header_text = |name: &str| {
            delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| match h.inner().get(name) {
                    Some(AMQPValue::LongString(s)) => {
                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                    }
                    _ => None,
                })
        };
        let exchange = header_text(headers::ORIGINAL_EXCHANGE)
            .unwrap_or_else(|| delivery.exchange.to_string());
        let routing_key = header_text(headers::ORIGINAL_ROUTING_KEY)
            .unwrap_or_else(|| delivery.routing_key.to_string());
        let recipients = header_text(headers::RECIPIENTS)
            .and_then(|list| serde_json::from_str::<Vec<String>>(&list).ok());
        let body: Arc<[u8]> = delivery.data.into();
        Delivery {
            body: body.clone(),
            attempt,
            recipients,
            settle: Box::new(RabbitSettle {
                acker: delivery.acker,
                tag: delivery.delivery_tag,
                settling: settling.clone(),
                properties: delivery.properties,
                body,
                exchange,
                routing_key,
            }),
        }
    }
}

fn amqp_int(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(v) => Some((*v).into()),
        AMQPValue::ShortShortUInt(v) => Some((*v).into()),
        AMQPValue::ShortInt(v) => Some((*v).into()),
        AMQPValue::ShortUInt(v) => Some((*v).into()),
        AMQPValue::LongInt(v) => Some((*v).into()),
        AMQPValue::LongUInt(v) => Some((*v).into()),
        AMQPValue::LongLongInt(v) => Some(*v),
        _ => None,
    }
}

impl MessageSource for RabbitSource {
    async fn next(&mut self, stop: &CancellationToken) -> Option<Delivery> {
        loop {
            if self.live.is_none() {
                let connected = tokio::select! {
                    biased;
                    _ = stop.cancelled() => return None,
                    result = self.connect() => result,
                };
                match connected {
                    Ok(live) => {
                        if self.connected_once {
                            self.metrics.broker_reconnects.inc();
                        }
                        self.connected_once = true;
                        tracing::info!(queue = %self.config.settings.queue, "connected to the broker, consuming");
                        self.health.set(Component::Broker, true);
                        self.backoff.reset();
                        self.live = Some(live);
                    }
                    Err(error) => {
                        self.health.set(Component::Broker, false);
                        let delay = self.backoff.next_delay();
                        tracing::warn!(%error, retry_in = ?delay, "cannot connect to the broker");
                        tokio::select! {
                            _ = stop.cancelled() => return None,
                            _ = tokio::time::sleep(delay) => continue,
                        }
                    }
                }
            }
            let live = self.live.as_mut().expect("connected above");
            let item = tokio::select! {
                biased;
                _ = stop.cancelled() => return None,
                item = live.consumer.next() => item,
            };
            match item {
                Some(Ok(delivery)) => {
                    let settling = live.settling.clone();
                    return Some(self.wrap(delivery, &settling));
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "lost the broker connection; reconnecting");
                }
                None => tracing::warn!("the broker cancelled the consumer; reconnecting"),
            }
            self.health.set(Component::Broker, false);
            if let Some(old) = self.live.take() {
                let _ = old.connection.close(320, "reconnecting".into()).await;
            }
        }
    }

    async fn stop_consuming(&mut self) {
        let Some(live) = self.live.as_mut() else {
            return;
        };
        // basic.cancel waits for cancel-ok: nothing arrives after it but what was already
        // pushed, which the consumer stream yields before it ends.
        match live
            .channel
            .basic_cancel(live.consumer.tag(), BasicCancelOptions::default())
            .await
        {
            Ok(()) => self.holding = true,
            // The connection is gone: the broker requeued everything on its side.
            Err(error) => tracing::debug!(%error, "cancelling the consumer"),
        }
    }

    async fn held(&mut self) -> Option<Delivery> {
        let delivery = self.next_held().await?;
        let live = self.live.as_ref()?;
        let settling = live.settling.clone();
        Some(self.wrap(delivery, &settling))
    }

    async fn give_back(&mut self) -> usize {
        let mut returned = 0;
        while let Some(delivery) = self.next_held().await {
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            if delivery.acker.nack(requeue).await.is_ok() {
                returned += 1;
            }
        }
        returned
    }

    async fn close(self) {
        if let Some(live) = self.live {
            // The acks still queued go before the connection does.
            live.settling.acks.flush().await;
            if let Err(error) = live
                .connection
                .close(200, "worker shutting down".into())
                .await
            {
                tracing::debug!(%error, "closing the broker connection");
            }
        }
        self.health.set(Component::Broker, false);
    }
}

struct RabbitSettle {
    acker: Acker,
    tag: u64,
    settling: Arc<Settling>,
    properties: BasicProperties,
    body: Arc<[u8]>,
    exchange: String,
    routing_key: String,
}

/// What the broker said to a copy.
enum Copied {
    /// Stored.
    Stored,
    /// Not routed: the target queue is missing.
    Unroutable,
    /// Refused (nack).
    Refused,
}

/// The producer's properties without its per-message `expiration`, made persistent.
fn copy_properties(from: &BasicProperties, headers: FieldTable) -> BasicProperties {
    let mut to = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2);
    if let Some(v) = from.content_type() {
        to = to.with_content_type(v.clone());
    }
    if let Some(v) = from.content_encoding() {
        to = to.with_content_encoding(v.clone());
    }
    if let Some(v) = from.priority() {
        to = to.with_priority(*v);
    }
    if let Some(v) = from.correlation_id() {
        to = to.with_correlation_id(v.clone());
    }
    if let Some(v) = from.reply_to() {
        to = to.with_reply_to(v.clone());
    }
    if let Some(v) = from.message_id() {
        to = to.with_message_id(v.clone());
    }
    if let Some(v) = from.timestamp() {
        to = to.with_timestamp(*v);
    }
    if let Some(v) = from.kind() {
        to = to.with_type(v.clone());
    }
    if let Some(v) = from.app_id() {
        to = to.with_app_id(v.clone());
    }
    to
}

impl RabbitSettle {
    /// Publishes a copy with extra headers and waits for the broker's confirm.
    async fn publish_copy(
        &self,
        exchange: &str,
        routing_key: &str,
        extra: Vec<(&'static str, AMQPValue)>,
    ) -> Result<Copied, lapin::Error> {
        let mut table = self.properties.headers().clone().unwrap_or_default();
        for (key, value) in extra {
            table.insert(key.into(), value);
        }
        let properties = copy_properties(&self.properties, table);
        let confirm = self
            .settling
            .publisher
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &self.body,
                properties,
            )
            .await?
            .await?;
        Ok(match confirm {
            Confirmation::Ack(None) => Copied::Stored,
            Confirmation::Ack(Some(_)) => Copied::Unroutable,
            Confirmation::Nack(_) | Confirmation::NotRequested => Copied::Refused,
        })
    }

    /// The broker refused the copy: the original goes back to the queue after a pause,
    /// with its attempt unchanged.
    async fn requeue_after_refusal(&self, what: &str) -> Result<(), SettleError> {
        self.settling.metrics.broker_nacks.inc();
        tracing::warn!(
            copy = what,
            "the broker refused the copy (nack); the job goes back to the queue unchanged"
        );
        tokio::time::sleep(AFTER_NACK).await;
        self.requeue().await
    }

    async fn requeue(&self) -> Result<(), SettleError> {
        self.acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
            .map_err(|e| SettleError(e.to_string()))?;
        self.settling.acks.closed(self.tag);
        Ok(())
    }

    /// Acknowledges the delivery, in one round with the acks of other jobs settled
    /// meanwhile (see `acks`); resolves once its round was written.
    async fn ack(&self) -> Result<(), SettleError> {
        self.settling
            .acks
            .ack(self.tag, self.acker.clone())
            .await
            .map_err(SettleError)
    }

    async fn reject_without_requeue(&self) -> Result<(), SettleError> {
        self.acker
            .reject(BasicRejectOptions { requeue: false })
            .await
            .map_err(|e| SettleError(e.to_string()))?;
        self.settling.acks.closed(self.tag);
        Ok(())
    }

    async fn apply(self, settlement: Settlement) -> Result<(), SettleError> {
        let lapin_error = |e: lapin::Error| SettleError(e.to_string());
        match settlement {
            Settlement::Ack => self.ack().await,
            Settlement::Requeue => self.requeue().await,
            Settlement::Retry {
                next_attempt,
                after,
                recipients,
            } => {
                let queue = naming::delay_queue(&self.settling.work_queue, after);
                let mut extra = recipients_header(recipients);
                extra.extend([
                    (
                        headers::ATTEMPT,
                        AMQPValue::LongLongInt(next_attempt.into()),
                    ),
                    (headers::ORIGINAL_EXCHANGE, long(&self.exchange)),
                    (headers::ORIGINAL_ROUTING_KEY, long(&self.routing_key)),
                ]);
                match self
                    .publish_copy("", &queue, extra)
                    .await
                    .map_err(lapin_error)?
                {
                    Copied::Stored => self.ack().await,
                    Copied::Refused => self.requeue_after_refusal("retry").await,
                    Copied::Unroutable => {
                        // The delay queue is missing (deleted, or a policy the topology was
                        // not declared for): hand the job to the broker's dead-lettering
                        // instead of losing it or looping on it.
                        tracing::error!(%queue, "retry delay queue is missing; dead-lettering through the broker");
                        self.reject_without_requeue().await
                    }
                }
            }
            Settlement::DeadLetter {
                reason,
                detail,
                attempts,
                job_id,
                recipients,
            } => {
                if !self.settling.dead_letter {
                    return self.reject_without_requeue().await;
                }
                let mut extra = recipients_header(recipients);
                extra.extend([
                    (headers::REASON, long(reason)),
                    (headers::DETAIL, long(&truncate(&detail, 500))),
                    (headers::ATTEMPT, AMQPValue::LongLongInt(attempts.into())),
                    (headers::JOB_ID, long(&job_id)),
                    (
                        headers::DEAD_LETTERED_AT,
                        long(&chrono::Utc::now().to_rfc3339()),
                    ),
                    (headers::ORIGINAL_EXCHANGE, long(&self.exchange)),
                    (headers::ORIGINAL_ROUTING_KEY, long(&self.routing_key)),
                ]);
                let dlx = naming::dead_letter_exchange(&self.settling.work_queue);
                match self
                    .publish_copy(&dlx, "", extra)
                    .await
                    .map_err(lapin_error)?
                {
                    Copied::Stored => self.ack().await,
                    Copied::Refused => self.requeue_after_refusal("dead-letter").await,
                    Copied::Unroutable => {
                        tracing::error!(exchange = %dlx, "dead-letter exchange has no queue; rejecting to the broker");
                        self.reject_without_requeue().await
                    }
                }
            }
        }
    }
}

/// The recipients header of a copy for some of the job's recipients (none: keep what the
/// delivery had).
fn recipients_header(recipients: Option<Vec<String>>) -> Vec<(&'static str, AMQPValue)> {
    recipients
        .map(|list| {
            let json = serde_json::to_string(&list).expect("a list of strings serializes");
            vec![(headers::RECIPIENTS, long(&json))]
        })
        .unwrap_or_default()
}

impl Settle for RabbitSettle {
    fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> BoxFuture<'static, Result<(), SettleError>> {
        Box::pin(self.apply(settlement))
    }
}
