//! RabbitMQ: the contract's topology plan (exchange, work queue, per-delay retry queues,
//! dead-letter exchange and queue; quorum queues with at-least-once dead-lettering) declared
//! over AMQP with the same code the worker uses, so the two never disagree on arguments.
//!
//! Beside the plan, the SMTP connection budget: a classic queue `<queue>.smtp-budget`
//! holding one token per connection of `spec.smtp.poolSize`, which the workers hold while
//! they may use a connection (see the worker's `mailer/budget.rs`). Its `x-max-length` is
//! the budget, so a changed `poolSize` is seen as a refused redeclaration: the queue is then
//! replaced (the workers' consumers are cancelled and they take the new tokens). Tokens are
//! topped up only while no worker consumes (none can hold one then): a first fill, a fill
//! cut short, or tokens lost. Classic, because the workers change their prefetch under a
//! running consumer (per-channel QoS), which quorum queues do not support.
//!
//! The operator's reconciles share one connection per broker ([`Connections`]); a topology
//! built without one (tests, tools) opens a connection per operation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use mailpipe_contract::topology::{RabbitSettings, TopologyPlan};
use mailpipe_contract::{amqp, naming};

use super::{BrokerTopology, Census, TopologyError};

/// A pipeline's RabbitMQ topology, reached with the URL from its connection Secret.
pub struct RabbitTopology {
    url: String,
    ca: Option<String>,
    settings: RabbitSettings,
    plan: TopologyPlan,
    management: Option<super::management::Management>,
    /// Tokens of the SMTP connection budget (`spec.smtp.poolSize`), when the workers share one.
    smtp_budget: Option<u32>,
    /// The connections shared with other reconciles, when given (else one per operation).
    connections: Option<Arc<Connections>>,
}

impl std::fmt::Debug for RabbitTopology {
    // The URL carries credentials: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitTopology")
            .field("queue", &self.settings.queue)
            .finish_non_exhaustive()
    }
}

/// What a broker error means for the operator.
pub(crate) fn classify(error: lapin::Error) -> TopologyError {
    let text = error.to_string();
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp_error) => match amqp_error.get_id() {
            404 => TopologyError::Missing(amqp_error.get_message().to_string()),
            406 => TopologyError::Conflict(amqp_error.get_message().to_string()),
            403 | 530 => TopologyError::Refused(amqp_error.get_message().to_string()),
            _ => TopologyError::Unreachable(text),
        },
        _ => TopologyError::Unreachable(text),
    }
}

/// Connects to the broker at `url` (verified with `ca`), listed by the broker as `name`;
/// a broker that does not answer within 10 s is unreachable.
pub(crate) async fn open(
    url: &str,
    ca: Option<&str>,
    name: &str,
) -> Result<Connection, TopologyError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let runtime = lapin::runtime::default_runtime().map_err(classify)?;
    let tls = OwnedTLSConfig {
        identity: None,
        cert_chain: ca.map(str::to_string),
    };
    let connect = Connection::connect_with_config(url, properties, tls, runtime);
    match tokio::time::timeout(std::time::Duration::from_secs(10), connect).await {
        Ok(connected) => connected.map_err(classify),
        Err(_) => Err(TopologyError::Unreachable("no answer within 10s".into())),
    }
}

impl RabbitTopology {
    /// The topology `plan` (for `settings`) on the broker at `url`, verified with `ca`.
    pub fn new(
        url: String,
        ca: Option<String>,
        settings: RabbitSettings,
        plan: TopologyPlan,
    ) -> RabbitTopology {
        RabbitTopology {
            url,
            ca,
            settings,
            plan,
            management: None,
            smtp_budget: None,
            connections: None,
        }
    }

    /// Works over `connections`' connection to this broker (shared with the other
    /// reconciles) instead of opening one per operation.
    pub fn sharing(mut self, connections: Arc<Connections>) -> RabbitTopology {
        self.connections = Some(connections);
        self
    }

    /// Keeps the SMTP connection budget's token queue with `total` tokens.
    pub fn with_smtp_budget(mut self, total: u32) -> RabbitTopology {
        self.smtp_budget = Some(total);
        self
    }

    /// Declares the budget's token queue (replacing it when the budget changed) and fills it
    /// when no worker consumes it.
    async fn ensure_budget(&self, session: &Session, total: u32) -> Result<(), TopologyError> {
        let queue = naming::smtp_budget_queue(&self.settings.queue);
        let channel = session.channel().await?;
        let (ready, consumers) = match declare_budget(&channel, &queue, total).await {
            Ok(counts) => counts,
            Err(error) => match classify(error) {
                TopologyError::Conflict(_) => {
                    // Another budget: the refusal closed the channel.
                    let channel = session.channel().await?;
                    amqp::delete_queue(&channel, &queue)
                        .await
                        .map_err(classify)?;
                    declare_budget(&channel, &queue, total)
                        .await
                        .map_err(classify)?
                }
                other => return Err(other),
            },
        };
        if consumers > 0 || ready >= total {
            return Ok(());
        }
        let publisher = session.channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(classify)?;
        // Every token published before any confirm is awaited: one round trip per fill,
        // not one per token (200 pipelines of 160 tokens took most of a minute).
        let mut confirms = Vec::with_capacity((total - ready) as usize);
        for _ in ready..total {
            confirms.push(
                publisher
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        b"smtp-connection",
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .map_err(classify)?,
            );
        }
        for confirm in confirms {
            if !confirm.await.map_err(classify)?.is_ack() {
                return Err(TopologyError::Unreachable(format!(
                    "the broker refused a token of {queue}"
                )));
            }
        }
        let _ = publisher.close(200, "budget filled".into()).await;
        Ok(())
    }

    /// Creates the connection URL's virtual host through the management API at `base`
    /// before declaring anything.
    pub fn with_management(mut self, base: &str) -> Result<RabbitTopology, TopologyError> {
        self.management = Some(super::management::Management::new(
            base,
            self.ca.as_deref(),
        )?);
        Ok(self)
    }

    async fn connect(&self) -> Result<Session, TopologyError> {
        let (connection, shared) = match &self.connections {
            Some(connections) => (connections.get(&self.url, self.ca.as_deref()).await?, true),
            None => (
                Arc::new(open(&self.url, self.ca.as_deref(), Connections::NAME).await?),
                false,
            ),
        };
        Ok(Session {
            connection,
            shared,
            channels: std::sync::Mutex::default(),
        })
    }

    /// Every queue of the plan with its depth. A failed passive declare closes the
    /// channel, so each queue gets a channel of its own.
    async fn depths(&self, session: &Session) -> Result<Vec<(String, u64, u32)>, TopologyError> {
        let mut depths = Vec::new();
        for queue in &self.plan.queues {
            let channel = session.channel().await?;
            match amqp::depth(&channel, &queue.name).await {
                Ok((messages, consumers)) => {
                    depths.push((queue.name.clone(), u64::from(messages), consumers))
                }
                Err(e) => match classify(e) {
                    TopologyError::Missing(_) => {}
                    other => return Err(other),
                },
            }
            let _ = channel.close(200, "measured".into()).await;
        }
        Ok(depths)
    }
}

impl BrokerTopology for RabbitTopology {
    async fn ensure(&self) -> Result<(), TopologyError> {
        if let Some(management) = &self.management {
            management.ensure_vhost(&self.url).await?;
        }
        let session = self.connect().await?;
        let ensured = async {
            let channel = session.channel().await?;
            amqp::declare(&channel, &self.plan, false)
                .await
                .map_err(classify)?;
            match self.smtp_budget {
                Some(total) => self.ensure_budget(&session, total).await,
                None => Ok(()),
            }
        }
        .await;
        session.end("topology ensured").await;
        ensured
    }

    async fn census(&self) -> Result<Census, TopologyError> {
        let session = self.connect().await?;
        let depths = self.depths(&session).await;
        session.end("counted").await;
        let depths = depths?;
        let consumers = depths
            .iter()
            .find(|(q, _, _)| *q == self.settings.queue)
            .map_or(0, |(_, _, c)| *c);
        Ok(Census {
            queues: depths.into_iter().map(|(q, n, _)| (q, n)).collect(),
            consumers,
            dead_letter: self
                .settings
                .dead_letter
                .then(|| mailpipe_contract::naming::dead_letter_queue(&self.settings.queue)),
        })
    }

    async fn retire_binding(&self, exchange: &str, routing_key: &str) -> Result<(), TopologyError> {
        let binding = mailpipe_contract::topology::BindingDecl {
            exchange: exchange.to_string(),
            queue: self.settings.queue.clone(),
            routing_key: routing_key.to_string(),
        };
        let session = self.connect().await?;
        let result = async {
            let channel = session.channel().await?;
            match amqp::unbind(&channel, &binding).await.map_err(classify) {
                Ok(()) | Err(TopologyError::Missing(_)) => Ok(()),
                Err(other) => Err(other),
            }
        }
        .await;
        session.end("binding retired").await;
        result
    }

    async fn stop_intake(&self) -> Result<(), TopologyError> {
        let session = self.connect().await?;
        let result = async {
            for binding in self
                .plan
                .bindings
                .iter()
                .filter(|b| b.queue == self.settings.queue)
            {
                let channel = session.channel().await?;
                match amqp::unbind(&channel, binding).await.map_err(classify) {
                    Ok(()) | Err(TopologyError::Missing(_)) => {}
                    Err(other) => return Err(other),
                }
            }
            Ok(())
        }
        .await;
        session.end("intake stopped").await;
        result
    }

    async fn remove(&self) -> Result<(), TopologyError> {
        let session = self.connect().await?;
        let result = async {
            // Delay queues first (they dead-letter into the work queue), then the work queue
            // (it dead-letters into the dead-letter exchange), then the dead-letter queue.
            let work = &self.settings.queue;
            let dead_letter = mailpipe_contract::naming::dead_letter_queue(work);
            let mut order: Vec<&mailpipe_contract::topology::QueueDecl> = self
                .plan
                .queues
                .iter()
                .filter(|q| q.name != *work && q.name != dead_letter)
                .collect();
            order.extend(self.plan.queues.iter().filter(|q| q.name == *work));
            order.extend(self.plan.queues.iter().filter(|q| q.name == dead_letter));
            for queue in order {
                // `if-empty` guards against a job published straight to the queue since the
                // census. Quorum queues refuse it with 540 NOT_IMPLEMENTED, a connection
                // error, so they get a plain delete: the census found them empty with no
                // consumer and the intake stopped.
                let quorum = matches!(
                    queue.args.get("x-queue-type"),
                    Some(mailpipe_contract::topology::ArgValue::Str(t)) if t == "quorum"
                );
                let channel = session.channel().await?;
                let result = if quorum {
                    amqp::delete_queue(&channel, &queue.name).await
                } else {
                    amqp::delete_queue_if_empty(&channel, &queue.name).await
                };
                match result.map_err(classify) {
                    Ok(()) | Err(TopologyError::Missing(_)) => {}
                    Err(TopologyError::Conflict(_)) => {
                        return Err(TopologyError::Conflict(format!(
                            "queue {} received a job while it was being deleted",
                            queue.name
                        )))
                    }
                    Err(other) => return Err(other),
                }
            }
            // The budget's tokens are no jobs: the queue goes whatever it holds.
            let channel = session.channel().await?;
            match amqp::delete_queue(&channel, &naming::smtp_budget_queue(work))
                .await
                .map_err(classify)
            {
                Ok(()) | Err(TopologyError::Missing(_)) => {}
                Err(other) => return Err(other),
            }
            for exchange in &self.plan.exchanges {
                let channel = session.channel().await?;
                // Only when nothing else is bound to it: another team's queue may be.
                match amqp::delete_exchange_if_unused(&channel, &exchange.name)
                    .await
                    .map_err(classify)
                {
                    Ok(()) | Err(TopologyError::Missing(_)) | Err(TopologyError::Conflict(_)) => {}
                    Err(other) => return Err(other),
                }
            }
            Ok(())
        }
        .await;
        session.end("topology deleted").await;
        result
    }
}

/// Broker connections, one per broker (URL, with its virtual host and credentials, and
/// CA), opened when first needed, shared by everything that works on that broker, replaced
/// once lost, and closed after [`Connections::IDLE`] unused. The reconciles share one set
/// (each operation opens its own channels and closes them when it ends; a refused
/// declaration closes only its channel); the scaler's backlog reader another, under a name
/// of its own and with a growing wait between failed connects (it looks every second).
pub struct Connections {
    links: Mutex<HashMap<BrokerKey, Arc<tokio::sync::Mutex<Link>>>>,
    opened: AtomicU64,
    /// The connection name the broker shows.
    name: String,
    /// Whether a failed connect makes the next ones wait (see [`Connections::backing_off`]).
    backoff: bool,
}

/// A broker: its URL (with credentials: never printed) and CA.
pub(crate) type BrokerKey = (String, Option<String>);

#[derive(Default)]
struct Link {
    connection: Option<Arc<Connection>>,
    used: Option<tokio::time::Instant>,
    failures: u32,
    retry_at: Option<tokio::time::Instant>,
}

impl Default for Connections {
    fn default() -> Self {
        Connections::named(Connections::NAME)
    }
}

impl Connections {
    /// The name the broker lists the operator's topology connections under.
    pub const NAME: &str = "mailpipe-operator";

    /// A connection no operation used for this long is closed (its pipelines were deleted
    /// or moved to another broker).
    pub const IDLE: Duration = Duration::from_secs(300);

    const FIRST_RETRY: Duration = Duration::from_millis(500);
    const LAST_RETRY: Duration = Duration::from_secs(30);

    /// Connections the broker lists under `name`.
    pub fn named(name: &str) -> Connections {
        Connections {
            links: Mutex::default(),
            opened: AtomicU64::new(0),
            name: name.to_string(),
            backoff: false,
        }
    }

    /// After a failed connect to a broker, the next ones wait (0.5 s, doubling, at most
    /// 30 s) and answer "reconnecting in ..." meanwhile: for callers that come back every
    /// second (a reconcile backs off by itself).
    pub fn backing_off(mut self) -> Connections {
        self.backoff = true;
        self
    }

    /// How many connections were opened so far (one per broker, plus one per reconnect).
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// The live connection to the broker at `url` (verified with `ca`), opened if needed.
    pub async fn get(&self, url: &str, ca: Option<&str>) -> Result<Arc<Connection>, TopologyError> {
        let link = {
            let mut links = self.links.lock().expect("connections lock");
            Self::close_idle(&mut links);
            links
                .entry((url.to_string(), ca.map(str::to_string)))
                .or_default()
                .clone()
        };
        let mut link = link.lock().await;
        let now = tokio::time::Instant::now();
        link.used = Some(now);
        if let Some(connection) = link.connection.as_ref().filter(|c| c.status().connected()) {
            return Ok(connection.clone());
        }
        link.connection = None;
        if let Some(at) = link.retry_at.filter(|at| *at > now) {
            return Err(TopologyError::Unreachable(format!(
                "reconnecting in {:?}",
                at - now
            )));
        }
        match open(url, ca, &self.name).await {
            Ok(connection) => {
                let connection = Arc::new(connection);
                self.opened.fetch_add(1, Ordering::Relaxed);
                link.connection = Some(connection.clone());
                link.failures = 0;
                link.retry_at = None;
                Ok(connection)
            }
            Err(error) => {
                if self.backoff {
                    let wait = Self::FIRST_RETRY
                        .saturating_mul(1 << link.failures.min(6))
                        .min(Self::LAST_RETRY);
                    link.failures += 1;
                    link.retry_at = Some(tokio::time::Instant::now() + wait);
                }
                Err(error)
            }
        }
    }

    /// Drops `connection` (suspect: an operation on it failed or timed out) if it is still
    /// the one for the broker at `url`: the next [`Connections::get`] opens a new one.
    pub async fn lost(&self, url: &str, ca: Option<&str>, connection: &Arc<Connection>) {
        let key = (url.to_string(), ca.map(str::to_string));
        let Some(link) = self
            .links
            .lock()
            .expect("connections lock")
            .get(&key)
            .cloned()
        else {
            return;
        };
        let mut link = link.lock().await;
        if link
            .connection
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, connection))
        {
            link.connection = None;
        }
    }

    /// Forgets (and closes) the connections nothing used for [`Connections::IDLE`] and no
    /// operation holds.
    fn close_idle(links: &mut HashMap<BrokerKey, Arc<tokio::sync::Mutex<Link>>>) {
        links.retain(|_, link| {
            let Ok(mut link) = link.try_lock() else {
                return true;
            };
            let idle = link.used.is_none_or(|used| used.elapsed() >= Self::IDLE);
            let held = link
                .connection
                .as_ref()
                .is_some_and(|c| Arc::strong_count(c) > 1);
            if !idle || held {
                return true;
            }
            if let Some(connection) = link.connection.take() {
                tokio::spawn(async move {
                    let _ = connection.close(200, "nothing used it".into()).await;
                });
            }
            false
        });
    }
}

/// One operation's use of a broker connection: the channels it opened, closed when it ends,
/// and the connection, closed too when it was the operation's own.
struct Session {
    connection: Arc<Connection>,
    shared: bool,
    channels: Mutex<Vec<Channel>>,
}

impl Session {
    async fn channel(&self) -> Result<Channel, TopologyError> {
        let channel = self.connection.create_channel().await.map_err(classify)?;
        self.channels
            .lock()
            .expect("session lock")
            .push(channel.clone());
        Ok(channel)
    }

    async fn end(self, why: &str) {
        if !self.shared {
            let _ = self.connection.close(200, why.into()).await;
            return;
        }
        let channels = self.channels.into_inner().expect("session lock");
        for channel in channels.iter().filter(|c| c.status().connected()) {
            let _ = channel.close(200, why.into()).await;
        }
    }
}

/// Declares the budget's token queue: classic, durable, at most `total` tokens; returns its
/// ready tokens and consumers. A queue declared with another budget refuses it (406).
async fn declare_budget(
    channel: &Channel,
    queue: &str,
    total: u32,
) -> Result<(u32, u32), lapin::Error> {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), amqp::long("classic"));
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(total.into()));
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await?;
    Ok((declared.message_count(), declared.consumer_count()))
}
