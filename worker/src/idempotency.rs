//! Deduplication: a job id is never sent twice at the same moment, and with Redis, a job id
//! whose send was recorded is not sent again within the TTL, across redeliveries, restarts
//! and several workers.
//!
//! Two layers, both taken before a send and given back after it:
//! - [`InFlight`], in the process: while one delivery of a job id is being sent, another
//!   delivery of the same id (the producer published it twice, the broker redelivered it
//!   after a reconnect, two retry copies came back together) waits; if the first was sent,
//!   the second is a duplicate and is acked without sending.
//! - [`Dedup`], in Redis: one script checks `PREFIX:sent:ID` and, when absent, takes a short
//!   claim `PREFIX:claim:ID` (a lease of [`LEASE`], renewed while the send runs). Another
//!   worker that finds the claim waits until the send is recorded (a duplicate) or the claim
//!   is gone (the send failed, or its worker died: the lease expires, so a crash delays a job
//!   by at most one lease, never loses it). After the server's 250 one script records
//!   `PREFIX:sent:ID` with the TTL and drops the claim.
//!
//! The one window left is a worker killed between the server's 250 and the record: that job
//! is sent again when redelivered (at-least-once wins over at-most-once). It is one Redis
//! round trip long.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::watch;

use crate::config::IdempotencyConfig;

/// How long a claim lives without renewal: the longest a copy waits after its sender died.
pub const LEASE: Duration = Duration::from_secs(15);
/// How often a held claim is renewed.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

/// Job ids being processed in this worker.
#[derive(Default)]
pub struct InFlight {
    ids: Mutex<HashMap<String, watch::Receiver<bool>>>,
}

/// The outcome of [`InFlight::enter`].
pub enum Entry<'a> {
    /// This delivery owns the id until the guard is dropped.
    Own(Guard<'a>),
    /// Another delivery of the id is under way; [`wait_for`] tells how it ended.
    Busy(watch::Receiver<bool>),
}

/// Ownership of a job id in this worker; dropping it lets waiting copies go on.
pub struct Guard<'a> {
    registry: &'a InFlight,
    id: String,
    sent: watch::Sender<bool>,
}

impl InFlight {
    /// Takes `id`, or says who holds it.
    pub fn enter(&self, id: &str) -> Entry<'_> {
        let mut ids = self.ids.lock().expect("in-flight lock");
        if let Some(busy) = ids.get(id) {
            return Entry::Busy(busy.clone());
        }
        let (sent, receiver) = watch::channel(false);
        ids.insert(id.to_string(), receiver);
        Entry::Own(Guard {
            registry: self,
            id: id.to_string(),
            sent,
        })
    }

    /// How many ids are held now.
    pub fn len(&self) -> usize {
        self.ids.lock().expect("in-flight lock").len()
    }

    /// Whether no id is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Guard<'_> {
    /// Marks the job as sent: waiting copies are duplicates.
    pub fn sent(&self) {
        self.sent.send_replace(true);
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.registry
            .ids
            .lock()
            .expect("in-flight lock")
            .remove(&self.id);
    }
}

/// Waits until the holder of an id is done: `true` when it sent the job.
pub async fn wait_for(mut holder: watch::Receiver<bool>) -> bool {
    holder.wait_for(|sent| *sent).await.is_ok()
}

/// The deduplication store.
#[derive(Clone)]
pub struct Dedup {
    connection: Arc<std::sync::RwLock<ConnectionManager>>,
    client: redis::Client,
    prefix: String,
    ttl_secs: u64,
    owner: Arc<str>,
}

/// Redis could not answer.
#[derive(Debug, thiserror::Error)]
#[error("deduplication store: {0}")]
pub struct StoreError(#[from] redis::RedisError);

impl StoreError {
    /// What an operator should check, without the URL (it may hold a password).
    pub fn advice(&self) -> &'static str {
        let e = &self.0;
        if e.kind() == redis::ErrorKind::AuthenticationFailed
            || e.code().is_some_and(|c| c == "WRONGPASS" || c == "NOAUTH")
        {
            "Redis refused the credentials in MAILPIPE_REDIS_URL"
        } else if e.is_connection_refusal() || e.is_timeout() || e.is_io_error() {
            "Redis is unreachable at the host and port of MAILPIPE_REDIS_URL"
        } else {
            "Redis answered with an error"
        }
    }
}

/// What [`Dedup::claim`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Claimed {
    /// The send was recorded: a duplicate.
    Sent,
    /// This worker holds the claim now.
    Own(Lease),
    /// Another worker is sending it now.
    Busy,
}

/// A claim held by this worker, identified by its token.
#[derive(Debug, PartialEq, Eq)]
pub struct Lease {
    token: String,
}

const CLAIM: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 2 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"#;

const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

const FINISH: &str = r#"
if ARGV[2] == '1' then redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"#;

/// A lazy connection (the first command connects) that reconnects by itself.
fn connect(client: &redis::Client) -> Result<ConnectionManager, StoreError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    Ok(ConnectionManager::new_lazy_with_config(
        client.clone(),
        config,
    )?)
}

/// `EVAL script numkeys keys...`; arguments follow. Plain EVAL rather than EVALSHA: a
/// restarted Redis has no cached scripts, and EVAL needs no NOSCRIPT round trip to load
/// them again. The scripts are a few hundred bytes.
fn eval(script: &str, keys: &[String]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(keys.len());
    for key in keys {
        cmd.arg(key);
    }
    cmd
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl Dedup {
    /// Prepares a lazy connection (the first command connects), so a worker starts even
    /// while Redis is down and pauses until it answers.
    pub fn new(config: &IdempotencyConfig) -> Result<Dedup, StoreError> {
        let client = redis::Client::open(config.url.expose())?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        Ok(Dedup {
            connection: Arc::new(std::sync::RwLock::new(connect(&client)?)),
            client,
            prefix: config.prefix.clone(),
            ttl_secs: config.ttl.as_secs().max(1),
            owner: format!("{}-{nanos}", std::process::id()).into(),
        })
    }

    fn sent_key(&self, job_id: &str) -> String {
        format!("{}:sent:{job_id}", self.prefix)
    }

    fn claim_key(&self, job_id: &str) -> String {
        format!("{}:claim:{job_id}", self.prefix)
    }

    fn connection(&self) -> ConnectionManager {
        self.connection.read().expect("store lock").clone()
    }

    /// Passes a result on; a reply that does not parse as the command's (`Parse`,
    /// `UnexpectedReturnType`) means the connection's replies no longer line up with its
    /// requests, so it is replaced by a fresh one before the caller retries. Seen once in a
    /// test after Redis was killed and restarted: every later command failed with
    /// "Incompatible type" and the worker stayed paused although Redis was back.
    fn checked<T>(&self, result: redis::RedisResult<T>) -> Result<T, StoreError> {
        if let Err(error) = &result {
            if matches!(
                error.kind(),
                redis::ErrorKind::Parse | redis::ErrorKind::UnexpectedReturnType
            ) {
                if let Ok(fresh) = connect(&self.client) {
                    *self.connection.write().expect("store lock") = fresh;
                    tracing::warn!("replaced the deduplication store connection after a reply that did not parse");
                }
            }
        }
        Ok(result?)
    }

    /// Checks whether `job_id` was sent and, if not and nobody else is sending it, claims it.
    pub async fn claim(&self, job_id: &str) -> Result<Claimed, StoreError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let token = format!("{}-{}", self.owner, NEXT.fetch_add(1, Ordering::Relaxed));
        let mut connection = self.connection();
        let found: i64 = self.checked(
            eval(CLAIM, &[self.sent_key(job_id), self.claim_key(job_id)])
                .arg(&token)
                .arg(LEASE.as_millis() as u64)
                .query_async(&mut connection)
                .await,
        )?;
        Ok(match found {
            2 => Claimed::Sent,
            1 => Claimed::Own(Lease { token }),
            _ => Claimed::Busy,
        })
    }

    /// Extends a held claim by another lease; `false` when it was lost (expired, or taken).
    pub async fn renew(&self, job_id: &str, lease: &Lease) -> Result<bool, StoreError> {
        let mut connection = self.connection();
        let renewed: i64 = self.checked(
            eval(RENEW, &[self.claim_key(job_id)])
                .arg(&lease.token)
                .arg(LEASE.as_millis() as u64)
                .query_async(&mut connection)
                .await,
        )?;
        Ok(renewed == 1)
    }

    /// Drops the claim, first recording the send when `sent`.
    pub async fn finish(&self, job_id: &str, lease: &Lease, sent: bool) -> Result<(), StoreError> {
        let mut connection = self.connection();
        let _: i64 = self.checked(
            eval(FINISH, &[self.sent_key(job_id), self.claim_key(job_id)])
                .arg(&lease.token)
                .arg(if sent { "1" } else { "0" })
                .arg(unix_now())
                .arg(self.ttl_secs)
                .query_async(&mut connection)
                .await,
        )?;
        Ok(())
    }

    /// Checks that the store answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut connection = self.connection();
        let _: String = self.checked(redis::cmd("PING").query_async(&mut connection).await)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_delivery_of_an_id_waits_and_is_a_duplicate_once_the_first_is_sent() {
        let in_flight = InFlight::default();
        let Entry::Own(first) = in_flight.enter("job-1") else {
            panic!("the first delivery owns the id");
        };
        let Entry::Busy(holder) = in_flight.enter("job-1") else {
            panic!("the second delivery must wait");
        };
        assert!(matches!(in_flight.enter("job-2"), Entry::Own(_)));
        let waiter = tokio::spawn(wait_for(holder));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        first.sent();
        drop(first);
        assert!(waiter.await.unwrap(), "the first was sent: a duplicate");
        assert!(in_flight.is_empty());
    }

    #[tokio::test]
    async fn a_copy_waiting_behind_a_failed_send_goes_on_to_send_itself() {
        let in_flight = InFlight::default();
        let Entry::Own(first) = in_flight.enter("job") else {
            panic!()
        };
        let Entry::Busy(holder) = in_flight.enter("job") else {
            panic!()
        };
        drop(first);
        assert!(!wait_for(holder).await, "not sent: the copy goes on");
        assert!(matches!(in_flight.enter("job"), Entry::Own(_)));
    }
}
