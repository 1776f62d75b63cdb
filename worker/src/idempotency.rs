//! Deduplication of sends in Redis: a job id whose send was recorded is not sent again
//! within the TTL, across redeliveries, restarts and several workers.
//!
//! Order of events for one job: `was_sent(id)` -> SMTP send (250) -> `record_sent(id)` ->
//! ack. The record is written only after the server accepted the message, never before
//! (claiming first would turn a crash before the send into a lost email). So the one window
//! left is a worker killed between the 250 and the record: that job is sent again on
//! redelivery; the window is one Redis round trip long.
//!
//! Keys are `PREFIX:sent:ID` with the TTL as expiry; the value is the Unix time of the send.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;

use crate::config::IdempotencyConfig;

/// The deduplication store.
#[derive(Clone)]
pub struct Dedup {
    connection: ConnectionManager,
    prefix: String,
    ttl_secs: u64,
}

/// Redis could not answer.
#[derive(Debug, thiserror::Error)]
#[error("deduplication store: {0}")]
pub struct StoreError(#[from] redis::RedisError);

impl Dedup {
    /// Prepares a lazy connection (the first command connects), so a worker starts even
    /// while Redis is down and pauses until it answers.
    pub fn new(config: &IdempotencyConfig) -> Result<Dedup, StoreError> {
        let client = redis::Client::open(config.url.expose())?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        Ok(Dedup {
            connection: ConnectionManager::new_lazy_with_config(client, manager_config)?,
            prefix: config.prefix.clone(),
            ttl_secs: config.ttl.as_secs().max(1),
        })
    }

    fn key(&self, job_id: &str) -> String {
        format!("{}:sent:{job_id}", self.prefix)
    }

    /// Whether a send of `job_id` was recorded within the TTL.
    pub async fn was_sent(&self, job_id: &str) -> Result<bool, StoreError> {
        let mut connection = self.connection.clone();
        Ok(connection.exists(self.key(job_id)).await?)
    }

    /// Checks that the store answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let _: String = redis::cmd("PING").query_async(&mut connection).await?;
        Ok(())
    }

    /// Records that `job_id` was accepted by the SMTP server.
    pub async fn record_sent(&self, job_id: &str) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let _: () = connection
            .set_ex(self.key(job_id), now, self.ttl_secs)
            .await?;
        Ok(())
    }
}
