//! The RabbitMQ management API, for what AMQP cannot do: creating the virtual host of a
//! pipeline's connection URL and giving its user access to it. Used only when the
//! pipeline names a management Secret (administrator credentials stay in that Secret).

use std::str::FromStr;

use lapin::uri::AMQPUri;

use super::TopologyError;

/// A management API at `base` (`https://admin:pass@rabbitmq:15672`; the credentials go
/// out as basic auth).
pub struct Management {
    base: String,
    http: reqwest::Client,
}

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

    async fn put(&self, path: &str, body: serde_json::Value) -> Result<(), TopologyError> {
        let response = self
            .http
            .put(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            // reqwest's error text names the URL, which carries the credentials.
            .map_err(|e| {
                TopologyError::Unreachable(format!(
                    "the management API did not answer{}",
                    if e.is_timeout() { " in time" } else { "" }
                ))
            })?;
        match response.status().as_u16() {
            200..=299 => Ok(()),
            401 | 403 => Err(TopologyError::Refused(
                "the management API refused the credentials of the management Secret".into(),
            )),
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
        .await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn vhost_names_are_encoded_as_one_path_segment() {
        assert_eq!(super::segment("/"), "%2F");
        assert_eq!(super::segment("mail/prod"), "mail%2Fprod");
        assert_eq!(super::segment("a b"), "a%20b");
    }
}
