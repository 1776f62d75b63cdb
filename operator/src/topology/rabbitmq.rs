//! RabbitMQ: the contract's topology plan (exchange, work queue, per-delay retry queues,
//! dead-letter exchange and queue; quorum queues with at-least-once dead-lettering) declared
//! over AMQP with the same code the worker uses, so the two never disagree on arguments.

use lapin::tcp::OwnedTLSConfig;
use lapin::{Channel, Connection, ConnectionProperties};
use mailpipe_contract::amqp;
use mailpipe_contract::topology::{RabbitSettings, TopologyPlan};

use super::{Backlog, BrokerTopology, Removal, TopologyError};

/// A pipeline's RabbitMQ topology, reached with the URL from its connection Secret.
pub struct RabbitTopology {
    url: String,
    ca: Option<String>,
    settings: RabbitSettings,
    plan: TopologyPlan,
    management: Option<super::management::Management>,
}

impl std::fmt::Debug for RabbitTopology {
    // The URL carries credentials: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitTopology")
            .field("queue", &self.settings.queue)
            .finish_non_exhaustive()
    }
}

fn classify(error: lapin::Error) -> TopologyError {
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
        }
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

    async fn connect(&self) -> Result<Connection, TopologyError> {
        let properties =
            ConnectionProperties::default().with_connection_name("mailpipe-operator".into());
        let runtime = lapin::runtime::default_runtime().map_err(classify)?;
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: self.ca.clone(),
        };
        let connect = Connection::connect_with_config(&self.url, properties, tls, runtime);
        match tokio::time::timeout(std::time::Duration::from_secs(10), connect).await {
            Ok(connected) => connected.map_err(classify),
            Err(_) => Err(TopologyError::Unreachable("no answer within 10s".into())),
        }
    }

    async fn channel(connection: &Connection) -> Result<Channel, TopologyError> {
        connection.create_channel().await.map_err(classify)
    }

    /// Every queue of the plan with its depth. A failed passive declare closes the
    /// channel, so each queue gets a channel of its own.
    async fn depths(
        &self,
        connection: &Connection,
    ) -> Result<Vec<(String, u64, u32)>, TopologyError> {
        let mut depths = Vec::new();
        for queue in &self.plan.queues {
            let channel = Self::channel(connection).await?;
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
        let connection = self.connect().await?;
        let channel = Self::channel(&connection).await?;
        let declared = amqp::declare(&channel, &self.plan, false)
            .await
            .map_err(classify);
        let _ = connection.close(200, "topology ensured".into()).await;
        declared
    }

    async fn backlog(&self) -> Result<Backlog, TopologyError> {
        let connection = self.connect().await?;
        let depths = self.depths(&connection).await;
        let _ = connection.close(200, "measured".into()).await;
        let depths = depths?;
        let of = |name: &str| depths.iter().find(|(q, _, _)| q == name);
        let (ready, consumers) = of(&self.settings.queue)
            .map(|(_, messages, consumers)| (*messages, *consumers))
            .ok_or_else(|| TopologyError::Missing(format!("queue {:?}", self.settings.queue)))?;
        let dead_letter = self
            .settings
            .dead_letter
            .then(|| {
                of(&mailpipe_contract::naming::dead_letter_queue(
                    &self.settings.queue,
                ))
                .map(|(_, m, _)| *m)
            })
            .flatten();
        Ok(Backlog {
            ready,
            consumers,
            dead_letter,
        })
    }

    async fn delete(&self) -> Result<Removal, TopologyError> {
        let connection = self.connect().await?;
        let result = async {
            // Retry queues hold jobs waiting for their next attempt: they count too.
            for (queue, messages, _) in self.depths(&connection).await? {
                if messages > 0 {
                    return Ok(Removal::Waiting { queue, messages });
                }
            }
            for queue in &self.plan.queues {
                let channel = Self::channel(&connection).await?;
                match amqp::delete_queue_if_empty(&channel, &queue.name)
                    .await
                    .map_err(classify)
                {
                    // A job that arrived since the count: keep everything that is left.
                    Err(TopologyError::Conflict(_)) => {
                        return Ok(Removal::Waiting {
                            queue: queue.name.clone(),
                            messages: 1,
                        })
                    }
                    Err(TopologyError::Missing(_)) | Ok(()) => {}
                    Err(other) => return Err(other),
                }
            }
            for exchange in &self.plan.exchanges {
                let channel = Self::channel(&connection).await?;
                // Only when nothing else is bound to it: another team's queue may be.
                match amqp::delete_exchange_if_unused(&channel, &exchange.name)
                    .await
                    .map_err(classify)
                {
                    Ok(()) | Err(TopologyError::Missing(_)) | Err(TopologyError::Conflict(_)) => {}
                    Err(other) => return Err(other),
                }
            }
            Ok(Removal::Removed)
        }
        .await;
        let _ = connection.close(200, "topology deleted".into()).await;
        result
    }
}
