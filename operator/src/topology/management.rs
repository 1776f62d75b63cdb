//! The RabbitMQ management API, for what AMQP cannot do: creating the virtual host of a
//! pipeline's connection URL and giving its user access to it, and the queue figures AMQP
//! does not tell (unacknowledged jobs, the ack rate the scaler measures workers by). Used
//! only when the pipeline names a management Secret (administrator credentials stay in that
//! Secret).

use std::str::FromStr;

use lapin::uri::AMQPUri;

use super::TopologyError;

/// A management API at `base` (`https://admin:pass@rabbitmq:15672`; the credentials go
/// out as basic auth).
pub struct Management {
    base: String,
    http: reqwest::Client,
}

/// A queue as the management API last sampled it (every 5 s by default).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueStats {
    /// Consumers of the queue.
    pub consumers: u32,
    /// Jobs ready.
    pub ready: u64,
    /// Jobs delivered and not yet settled.
    pub unacked: u64,
    /// Acknowledgements a second over the last sample interval.
    pub ack_rate: f64,
}

impl QueueStats {
    /// Reads the management API's queue object.
    pub fn from_json(queue: &serde_json::Value) -> QueueStats {
        let int = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        QueueStats {
            consumers: int(&queue["consumers"]).min(u64::from(u32::MAX)) as u32,
            ready: int(&queue["messages_ready"]),
            unacked: int(&queue["messages_unacknowledged"]),
            ack_rate: queue["message_stats"]["ack_details"]["rate"]
                .as_f64()
                .unwrap_or(0.0)
                .max(0.0),
        }
    }
}

/// How long a new virtual host may take to start.
const VHOST_START: std::time::Duration = std::time::Duration::from_secs(10);

/// A path segment, percent-encoded (`/` is the default vhost's whole name).
fn segment(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

impl Management {
    /// A client for the API at `base`, verifying TLS with the system roots or `ca` (PEM).
    pub fn new(base: &str, ca: Option<&str>) -> Result<Management, TopologyError> {
        let mut builder = reqwest::Client::builder().timeout(std::time::Duration::from_secs(10));
        if let Some(pem) = ca {
            let certificate = reqwest::Certificate::from_pem(pem.as_bytes())
                .map_err(|e| TopologyError::Refused(format!("the CA bundle is not PEM: {e}")))?;
            builder = builder.add_root_certificate(certificate);
        }
        Ok(Management {
            base: base.trim_end_matches('/').to_string(),
            http: builder
                .build()
                .map_err(|e| TopologyError::Unreachable(format!("HTTP client: {e}")))?,
        })
    }

    /// The figures of `queue` in the virtual host of `amqp_url`.
    pub async fn queue_stats(
        &self,
        amqp_url: &str,
        queue: &str,
    ) -> Result<QueueStats, TopologyError> {
        let uri = AMQPUri::from_str(amqp_url).map_err(|_| {
            TopologyError::Refused("the connection Secret does not hold an AMQP URL".into())
        })?;
        let path = format!("/api/queues/{}/{}", segment(&uri.vhost), segment(queue));
        match self.get(&path).await? {
            Ok(body) => Ok(QueueStats::from_json(&body)),
            Err(code) => Err(TopologyError::Unreachable(format!(
                "the management API answered {code} to GET {path}"
            ))),
        }
    }

    /// GETs `path`: its JSON body, or the status code other than 200 (a refusal of the
    /// credentials is an error of its own).
    async fn get(&self, path: &str) -> Result<Result<serde_json::Value, u16>, TopologyError> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .map_err(|e| unanswered(&e))?;
        match response.status().as_u16() {
            200 => Ok(Ok(response.json().await.map_err(|e| unanswered(&e))?)),
            401 | 403 => Err(refused_credentials()),
            code => Ok(Err(code)),
        }
    }

    async fn put(&self, path: &str, body: serde_json::Value) -> Result<(), TopologyError> {
        let response = self
            .http
            .put(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .map_err(|e| unanswered(&e))?;
        match response.status().as_u16() {
            200..=299 => Ok(()),
            401 | 403 => Err(refused_credentials()),
            code => Err(TopologyError::Unreachable(format!(
                "the management API answered {code} to PUT {path}"
            ))),
        }
    }

    /// Creates the virtual host of `amqp_url` (if missing) and lets its user configure,
    /// write and read everything in it.
    pub async fn ensure_vhost(&self, amqp_url: &str) -> Result<(), TopologyError> {
        let uri = AMQPUri::from_str(amqp_url).map_err(|_| {
            TopologyError::Refused("the connection Secret does not hold an AMQP URL".into())
        })?;
        let vhost = segment(&uri.vhost);
        self.put(&format!("/api/vhosts/{vhost}"), serde_json::json!({}))
            .await?;
        let user = segment(&uri.authority.userinfo.username);
        self.put(
            &format!("/api/permissions/{vhost}/{user}"),
            serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}),
        )
        .await?;
        self.vhost_running(&vhost).await
    }

    /// Waits until the virtual host (a path segment) runs on every node: the API answers
    /// the PUT before a new one has started, and a connection to it in between is refused
    /// ("vhost ... is down").
    async fn vhost_running(&self, vhost: &str) -> Result<(), TopologyError> {
        let path = format!("/api/vhosts/{vhost}");
        let deadline = tokio::time::Instant::now() + VHOST_START;
        loop {
            // Versions without the field report nothing to wait for.
            let running = self.get(&path).await?.is_ok_and(|body| {
                body["cluster_state"]
                    .as_object()
                    .is_none_or(|nodes| nodes.values().all(|state| state == "running"))
            });
            if running {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(TopologyError::Unreachable(format!(
                    "the virtual host did not start within {VHOST_START:?}"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

/// reqwest's error text names the URL, which carries the credentials: never shown.
fn unanswered(error: &reqwest::Error) -> TopologyError {
    TopologyError::Unreachable(format!(
        "the management API did not answer{}",
        if error.is_timeout() { " in time" } else { "" }
    ))
}

fn refused_credentials() -> TopologyError {
    TopologyError::Refused(
        "the management API refused the credentials of the management Secret".into(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn vhost_names_are_encoded_as_one_path_segment() {
        assert_eq!(super::segment("/"), "%2F");
        assert_eq!(super::segment("mail/prod"), "mail%2Fprod");
        assert_eq!(super::segment("a b"), "a%20b");
    }

    #[test]
    fn queue_figures_are_read_and_missing_stats_count_as_none() {
        let stats = super::QueueStats::from_json(&serde_json::json!({
            "consumers": 3, "messages_ready": 120, "messages_unacknowledged": 48,
            "message_stats": {"ack": 9000, "ack_details": {"rate": 41.6}}
        }));
        assert_eq!((stats.consumers, stats.ready, stats.unacked), (3, 120, 48));
        assert!((stats.ack_rate - 41.6).abs() < 1e-9);
        // A queue nobody consumed from yet has no message_stats at all.
        let fresh = super::QueueStats::from_json(&serde_json::json!({"consumers": 0}));
        assert_eq!(fresh.ack_rate, 0.0);
    }
}
