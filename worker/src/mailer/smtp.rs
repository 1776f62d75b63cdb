//! SMTP delivery: lettre speaks the protocol, this module owns the connections.
//!
//! A pool of at most `pool_size` connections (providers limit connections per account) is
//! reused across sends. The pool opens each TCP connection itself with `TCP_NODELAY` and
//! hands it to lettre's `AsyncSmtpConnection`: lettre writes a message body and its final
//! `.` in two writes, and with Nagle's algorithm on, the second one waits for the server's
//! delayed ACK (about 40 ms on Linux), which capped a 16-connection lettre transport at about
//! 360 messages per second even against a local server. Owning the sockets is also where a
//! pipelining (RFC 2920) transport will sit.
//!
//! STARTTLS is required by default (lettre upgrades the connection); implicit TLS (the
//! handshake done in `tls.rs`) and plain are explicit choices.
//! Certificates are verified against the system roots, or only against a given CA bundle;
//! skipping verification is an opt-in that `run` logs loudly. A connection that failed is
//! dropped, never returned to the pool; one idle for a while is checked with NOOP before
//! reuse, and one idle too long is closed; a reused one that fails without any reply is
//! replaced and the transaction sent again at once. lettre's errors are mapped to a classified
//! [`SendError`] here and nowhere else.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, Certificate, CertificateStore, TlsParameters,
};
use lettre::transport::smtp::extension::ClientId;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::tls::ImplicitTls;
use super::{Mailer, Outgoing, SendError};
use crate::config::{SmtpConfig, TlsMode};
use crate::metrics::Metrics;

/// Idle longer than this: check with NOOP before reuse (servers close idle connections).
const CHECK_AFTER_IDLE: Duration = Duration::from_secs(10);
/// Idle longer than this: close instead of reusing.
const CLOSE_AFTER_IDLE: Duration = Duration::from_secs(60);
const MECHANISMS: &[Mechanism] = &[Mechanism::Plain, Mechanism::Login];

/// Pooled SMTP transport.
pub struct SmtpMailer {
    host: String,
    port: u16,
    tls_parameters: Option<TlsParameters>,
    implicit_tls: Option<ImplicitTls>,
    credentials: Option<Credentials>,
    hello: ClientId,
    timeout: Duration,
    idle: Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
    permits: Arc<Semaphore>,
    metrics: Metrics,
}

/// The SMTP transport cannot be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The CA file cannot be read.
    #[error("cannot read SMTP CA file {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    /// The CA file or TLS settings were refused.
    #[error("SMTP TLS settings: {0}")]
    Tls(lettre::transport::smtp::Error),
    /// The TLS client configuration cannot be built.
    #[error("SMTP TLS settings: {0}")]
    Settings(String),
}

impl SmtpMailer {
    /// Prepares the pool; connections open on the first send or probe.
    pub fn new(config: &SmtpConfig, metrics: Metrics) -> Result<SmtpMailer, BuildError> {
        let (tls_parameters, implicit_tls) = match config.tls {
            TlsMode::None => (None, None),
            TlsMode::Starttls => (Some(tls_parameters(config)?), None),
            TlsMode::Tls => (None, Some(ImplicitTls::new(config)?)),
        };
        let credentials = config
            .credentials
            .as_ref()
            .map(|(user, password)| Credentials::new(user.clone(), password.expose().to_string()));
        for state in ["busy", "idle"] {
            metrics
                .smtp_pool_connections
                .with_label_values(&[state])
                .set(0);
        }
        metrics
            .smtp_pool_connections
            .with_label_values(&["max"])
            .set(config.pool_size.into());
        Ok(SmtpMailer {
            host: config.host.clone(),
            port: config.port,
            tls_parameters,
            implicit_tls,
            credentials,
            hello: ClientId::default(),
            timeout: config.timeout,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(config.pool_size as usize)),
            metrics,
        })
    }

    /// Opens, secures and authenticates a new connection.
    async fn open(&self) -> Result<AsyncSmtpConnection, SendError> {
        let stream = connect_tcp(&self.host, self.port, self.timeout).await?;
        let mut connection = match &self.implicit_tls {
            Some(tls) => {
                let stream = tokio::time::timeout(self.timeout, tls.wrap(stream))
                    .await
                    .map_err(|_| {
                        SendError::without_reply("smtp_timeout", "TLS handshake timed out".into())
                    })?
                    .map_err(|e| {
                        let reason = if has_tls_failure(&e) {
                            "smtp_tls"
                        } else {
                            "smtp_connection"
                        };
                        SendError::without_reply(
                            reason,
                            format!("TLS handshake: {}", error_chain(&e)),
                        )
                    })?;
                AsyncSmtpConnection::connect_with_transport(Box::new(stream), &self.hello)
                    .await
                    .map_err(|e| classify(&e))?
            }
            None => {
                let mut connection =
                    AsyncSmtpConnection::connect_with_transport(Box::new(stream), &self.hello)
                        .await
                        .map_err(|e| classify(&e))?;
                if let Some(parameters) = &self.tls_parameters {
                    connection
                        .starttls(parameters.clone(), &self.hello)
                        .await
                        .map_err(|e| classify(&e))?;
                }
                connection
            }
        };
        if let Some(credentials) = &self.credentials {
            connection
                .auth(MECHANISMS, credentials)
                .await
                .map_err(|e| match classify(&e) {
                    error if error.code.is_none() && e.is_client() => SendError::without_reply(
                        "smtp_auth",
                        format!("no usable AUTH mechanism: {e}"),
                    ),
                    error => error,
                })?;
        }
        Ok(connection)
    }

    /// An idle connection that still answers, or a new one (always new with `fresh`);
    /// `true` when it was reused.
    async fn checkout(&self, fresh: bool) -> Result<(AsyncSmtpConnection, bool), SendError> {
        loop {
            let candidate = if fresh {
                None
            } else {
                self.idle.lock().expect("pool lock").pop()
            };
            let Some((mut connection, since)) = candidate else {
                return Ok((self.open().await?, false));
            };
            self.metrics
                .smtp_pool_connections
                .with_label_values(&["idle"])
                .dec();
            let idle_for = since.elapsed();
            if idle_for > CLOSE_AFTER_IDLE {
                connection.abort().await;
                continue;
            }
            if idle_for > CHECK_AFTER_IDLE && !connection.test_connected().await {
                continue;
            }
            return Ok((connection, true));
        }
    }

    fn checkin(&self, connection: AsyncSmtpConnection) {
        if connection.has_broken() {
            return;
        }
        self.idle
            .lock()
            .expect("pool lock")
            .push((connection, Instant::now()));
        self.metrics
            .smtp_pool_connections
            .with_label_values(&["idle"])
            .inc();
    }

    /// Runs `work` on a pooled connection (a new one with `fresh`) within the timeout; the
    /// connection goes back to the pool only when the work succeeded. A failure says
    /// whether the connection was a reused one.
    async fn with_connection<T>(
        &self,
        fresh: bool,
        work: impl AsyncFnOnce(&mut AsyncSmtpConnection) -> Result<T, SendError>,
    ) -> Result<T, (SendError, bool)> {
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("the pool semaphore is never closed");
        let busy = self
            .metrics
            .smtp_pool_connections
            .with_label_values(&["busy"]);
        busy.inc();
        let outcome = tokio::time::timeout(self.timeout, async {
            let (mut connection, reused) = self.checkout(fresh).await.map_err(|e| (e, false))?;
            let result = work(&mut connection).await;
            if result.is_ok() {
                self.checkin(connection);
            }
            result.map_err(|e| (e, reused))
        })
        .await
        .unwrap_or_else(|_| {
            Err((
                SendError::without_reply(
                    "smtp_timeout",
                    format!("no answer within {:?}", self.timeout),
                ),
                false,
            ))
        });
        busy.dec();
        outcome
    }
}

/// Opens the TCP connection with `TCP_NODELAY` (see the module docs for why).
async fn connect_tcp(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, SendError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect((host, port)))
        .await
        .map_err(|_| SendError::without_reply("smtp_timeout", "connect timed out".into()))?
        .map_err(|e| SendError::without_reply("smtp_connection", format!("connect: {e}")))?;
    stream
        .set_nodelay(true)
        .map_err(|e| SendError::without_reply("smtp_connection", format!("TCP_NODELAY: {e}")))?;
    Ok(stream)
}

fn tls_parameters(config: &SmtpConfig) -> Result<TlsParameters, BuildError> {
    let mut builder = TlsParameters::builder(config.host.clone());
    if let Some(path) = &config.ca_file {
        let pem = std::fs::read(path).map_err(|source| BuildError::CaFile {
            path: path.display().to_string(),
            source,
        })?;
        let ca = Certificate::from_pem(&pem).map_err(BuildError::Tls)?;
        builder = builder
            .certificate_store(CertificateStore::None)
            .add_root_certificate(ca);
    }
    if config.insecure_skip_verify {
        builder = builder.dangerous_accept_invalid_certs(true);
    }
    builder.build_rustls().map_err(BuildError::Tls)
}

/// Maps a lettre error to a classified failure. The detail keeps the server's reply text
/// (it goes into the dead-letter header, beside the job that holds the same data) but logs
/// only print the reason and code.
fn classify(error: &lettre::transport::smtp::Error) -> SendError {
    if let Some(code) = error.status() {
        let numeric: u16 = code.to_string().parse().unwrap_or(500);
        return SendError::from_reply(numeric, error.to_string());
    }
    let reason = if error.is_tls() || has_tls_failure(error) {
        "smtp_tls"
    } else if error.is_timeout() {
        "smtp_timeout"
    } else {
        "smtp_connection"
    };
    SendError::without_reply(reason, error_chain(error))
}

/// Whether a TLS failure (an untrusted or invalid certificate, a failed handshake) sits in
/// the error's chain. lettre reports rustls errors met during the handshake as connection
/// errors wrapping an `io::Error`, whose `source()` skips the rustls error itself, so
/// `io::Error::get_ref` is looked into as well.
fn has_tls_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = next {
        if current.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(inner) = current
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if has_tls_failure(inner) {
                return true;
            }
        }
        next = current.source();
    }
    false
}

/// The error and its sources on one line (lettre's top-level text is often just "Connection
/// error", and the useful part, such as "UnknownIssuer", sits in the source).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

impl Mailer for SmtpMailer {
    async fn send(&self, message: &Outgoing) -> Result<(), SendError> {
        let started = Instant::now();
        let transaction = async |connection: &mut AsyncSmtpConnection| {
            connection
                .send(&message.envelope, &message.bytes)
                .await
                .map(drop)
                .map_err(|e| classify(&e))
        };
        // A reused connection that fails without any reply was closed by the server while it
        // sat in the pool (a restart, an idle timeout shorter than ours): the transaction
        // goes once more on a new connection, and the job loses no attempt. A reply, even
        // an error, is final.
        let result = match self.with_connection(false, transaction).await {
            Err((error, true)) if error.reason == "smtp_connection" => {
                tracing::debug!(
                    "a pooled SMTP connection was closed by the server; using a new one"
                );
                self.with_connection(true, transaction).await
            }
            other => other,
        }
        .map_err(|(error, _)| error);
        self.metrics
            .smtp_send_seconds
            .observe(started.elapsed().as_secs_f64());
        result
    }

    async fn probe(&self) -> Result<(), SendError> {
        self.with_connection(false, async |connection| {
            if connection.test_connected().await {
                Ok(())
            } else {
                Err(SendError::without_reply(
                    "smtp_connection",
                    "the server did not answer NOOP".into(),
                ))
            }
        })
        .await
        .map_err(|(error, _)| error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn smtp_sockets_are_opened_with_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stream = connect_tcp("127.0.0.1", port, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(stream.nodelay().unwrap());
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_transient_connection_failure() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let error = connect_tcp("127.0.0.1", port, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(error.reason, "smtp_connection");
        assert!(error.is_server_trouble());
    }

    #[test]
    fn a_certificate_error_wrapped_in_io_errors_is_a_tls_failure() {
        let rustls_error =
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let wrapped = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls_error);
        let outer = std::io::Error::other(wrapped);
        assert!(has_tls_failure(&outer));
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(!has_tls_failure(&plain));
    }
}
