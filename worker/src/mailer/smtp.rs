//! SMTP delivery: a pool of the worker's own connections (`connection.rs`, which speaks the
//! protocol with lettre's commands and parsers).
//!
//! A pool of at most `pool_size` connections (providers limit connections per account), or
//! of this worker's share of the pipeline's budget (`budget.rs`), is reused across sends.
//! Each TCP connection is opened with `TCP_NODELAY`: the worker writes whole commands and
//! messages, and with Nagle's algorithm on a small second write waits for the server's
//! delayed ACK (about 40 ms on Linux), which capped lettre's 16-connection transport (a
//! body and its final dot in two writes) at about 360 messages per second even against a
//! local server.
//!
//! STARTTLS is required by default; implicit TLS and plain are explicit choices. Both TLS
//! handshakes are done in `tls.rs`.
//! Certificates are verified against the system roots, or only against a given CA bundle;
//! skipping verification is an opt-in that `run` logs loudly.
//!
//! Every step has its own timeout (see `transaction.rs`). Anything that goes wrong while
//! opening a connection (connect, TLS, greeting, EHLO, STARTTLS, AUTH) means the server is
//! unavailable, never that the job is bad. A connection that failed is dropped, never
//! returned to the pool; one idle for a while is checked with NOOP before reuse, and one
//! idle too long is closed. A reused connection that fails without any reply before the
//! message was handed over (the server closed it while it sat in the pool) is replaced and
//! the transaction sent again at once; after the message was handed over it never is.
//! A connection's failures are mapped to a classified [`SendError`] here and in
//! `transaction.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::extension::ClientId;
use prometheus::IntGauge;
use tokio::net::TcpStream;

use super::connection::{Connection, Failure, Transport};
use super::pool::{Counted, Pool, Slot};
use super::tls::TlsClient;
use super::transaction::{self, Timeouts};
use super::{Delivered, Mailer, Outgoing, SendError};
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
    tls_mode: TlsMode,
    /// The TLS client for STARTTLS or implicit TLS (unset with TLS off).
    tls: Option<TlsClient>,
    credentials: Option<Credentials>,
    hello: ClientId,
    timeouts: Timeouts,
    pool: Arc<SmtpPool>,
    /// `mailpipe_smtp_pool_connections{state="busy"}`.
    busy: IntGauge,
    metrics: Metrics,
}

/// The pool of SMTP connections.
pub type SmtpPool = Pool<Connection>;

/// The SMTP transport cannot be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The CA file cannot be read.
    #[error("cannot read SMTP CA file {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    /// The TLS client configuration cannot be built.
    #[error("SMTP TLS settings: {0}")]
    Settings(String),
}

impl SmtpMailer {
    /// Prepares the pool; connections open on the first send or probe. With a shared
    /// budget the pool starts with no slot: they come with the budget's tokens.
    pub fn new(config: &SmtpConfig, metrics: Metrics) -> Result<SmtpMailer, BuildError> {
        let tls = match config.tls {
            TlsMode::None => None,
            TlsMode::Starttls | TlsMode::Tls => Some(TlsClient::new(config)?),
        };
        let credentials = config
            .credentials
            .as_ref()
            .map(|(user, password)| Credentials::new(user.clone(), password.expose().to_string()));
        let busy = metrics.smtp_pool_connections.with_label_values(&["busy"]);
        busy.set(0);
        let slots = match config.budget_queue {
            Some(_) => 0,
            None => config.pool_size as usize,
        };
        Ok(SmtpMailer {
            host: config.host.clone(),
            port: config.port,
            tls_mode: config.tls,
            tls,
            credentials,
            hello: ClientId::default(),
            timeouts: Timeouts::new(config.timeout, config.data_timeout),
            pool: Arc::new(Pool::new(slots, metrics.clone())),
            busy,
            metrics,
        })
    }

    /// The pool, for the budget to grant and withdraw slots.
    pub fn pool(&self) -> Arc<SmtpPool> {
        self.pool.clone()
    }

    /// Opens, secures and authenticates a new connection. Every failure here means the
    /// server is unavailable to us, whatever it is.
    async fn open(&self) -> Result<Connection, SendError> {
        let limit = self.timeouts.command;
        let timed_out = |what: &str| {
            SendError::unavailable(
                "smtp_timeout",
                format!("{what}: no answer within {limit:?}"),
            )
        };
        let stream = connect_tcp(&self.host, self.port, limit).await?;
        let transport = match (&self.tls, self.tls_mode) {
            (Some(tls), TlsMode::Tls) => Transport::Tls(Box::new(
                tokio::time::timeout(limit, tls.wrap(stream))
                    .await
                    .map_err(|_| timed_out("TLS handshake"))?
                    .map_err(|e| tls_failure("TLS handshake", &e))?,
            )),
            _ => Transport::Plain(stream),
        };
        // The greeting and EHLO: two replies.
        let mut connection =
            tokio::time::timeout(limit * 2, Connection::greet(transport, &self.hello))
                .await
                .map_err(|_| timed_out("greeting and EHLO"))?
                .map_err(|e| refusal("smtp_connection", "greeting and EHLO", &e))?;
        if let (Some(tls), TlsMode::Starttls) = (&self.tls, self.tls_mode) {
            if !connection.can_starttls() {
                return Err(SendError::unavailable(
                    "smtp_tls",
                    "the server does not offer STARTTLS, which is required (tls mode starttls)"
                        .into(),
                ));
            }
            connection = tokio::time::timeout(limit * 2, connection.starttls(tls, &self.hello))
                .await
                .map_err(|_| timed_out("STARTTLS"))?
                .map_err(|e| match e.code() {
                    Some(_) => refusal("smtp_tls", "STARTTLS", &e),
                    None => tls_failure("STARTTLS", &e),
                })?;
        }
        if let Some(credentials) = &self.credentials {
            tokio::time::timeout(limit, connection.auth(MECHANISMS, credentials))
                .await
                .map_err(|_| timed_out("AUTH"))?
                .map_err(|e| match e {
                    Failure::Reply { .. } => refusal("smtp_auth", "AUTH", &e),
                    Failure::NoMechanism => SendError::unavailable(
                        "smtp_auth",
                        format!(
                            "no AUTH mechanism in common (the worker offers PLAIN and LOGIN): {e}"
                        ),
                    ),
                    _ => refusal("smtp_connection", "AUTH", &e),
                })?;
        }
        Ok(connection)
    }

    /// An idle connection that still answers, or a new one (always new with `fresh`);
    /// `true` when it was reused.
    async fn checkout(&self, fresh: bool) -> Result<(Counted<Connection>, bool), SendError> {
        loop {
            let candidate = if fresh { None } else { self.pool.take_idle() };
            let Some((mut connection, since)) = candidate else {
                return Ok((self.pool.counted(self.open().await?), false));
            };
            let idle_for = since.elapsed();
            if idle_for > CLOSE_AFTER_IDLE {
                // Closed before another opens under the same slot.
                connection.quit().await;
                continue;
            }
            if idle_for > CHECK_AFTER_IDLE && !self.answers_noop(&mut connection).await {
                continue;
            }
            return Ok((connection, true));
        }
    }

    /// A slot in the pool (at most as many connections in use at once as slots).
    async fn permit(&self) -> Slot<'_, Connection> {
        self.pool.slot().await
    }

    async fn answers_noop(&self, connection: &mut Connection) -> bool {
        tokio::time::timeout(self.timeouts.command, connection.noop())
            .await
            .unwrap_or(false)
    }

    /// One transaction on a pooled connection (a new one with `fresh`), under `slot`: the
    /// connection goes back to the pool with the slot only when it succeeded. A failure
    /// gives the slot back for another try and says whether the connection was a reused
    /// one.
    async fn transact<'a>(
        &'a self,
        slot: Slot<'a, Connection>,
        message: &Outgoing,
        fresh: bool,
    ) -> Result<Delivered, (SendError, bool, Slot<'a, Connection>)> {
        let (mut connection, reused) = match self.checkout(fresh).await {
            Ok(checked_out) => checked_out,
            Err(error) => return Err((error, false, slot)),
        };
        match transaction::send(&mut connection, message, &self.timeouts).await {
            Ok(delivered) => {
                checkin(slot, connection);
                Ok(delivered)
            }
            Err(error) => Err((error, reused, slot)),
        }
    }
}

/// Gives the slot back with its connection, which stays in the pool for reuse unless it
/// broke. One step, so the pool never counts the connection both idle and busy.
fn checkin(slot: Slot<'_, Connection>, connection: Counted<Connection>) {
    if connection.has_broken() {
        return;
    }
    slot.release_with(connection);
}

/// A failure of the TLS layer, named so that a person can act on it.
fn tls_failure(what: &str, error: &(dyn std::error::Error + 'static)) -> SendError {
    if has_tls_failure(error) {
        SendError::unavailable("smtp_tls", format!("{what}: {}", tls_advice(error)))
    } else {
        SendError::unavailable("smtp_connection", format!("{what}: {}", error_chain(error)))
    }
}

/// The server answered, but refused the worker (not a message).
fn refusal(reason: &'static str, what: &str, error: &Failure) -> SendError {
    match error.code() {
        Some(code) => SendError::refused(reason, code, format!("{what}: {error}")),
        None if has_tls_failure(error) => tls_failure(what, error),
        None => SendError::unavailable(reason, format!("{what}: {}", error_chain(error))),
    }
}

/// Opens the TCP connection with `TCP_NODELAY` (see the module docs for why).
async fn connect_tcp(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, SendError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect((host, port)))
        .await
        .map_err(|_| SendError::unavailable("smtp_timeout", "connect timed out".into()))?
        .map_err(|e| SendError::unavailable("smtp_connection", format!("connect: {e}")))?;
    stream
        .set_nodelay(true)
        .map_err(|e| SendError::unavailable("smtp_connection", format!("TCP_NODELAY: {e}")))?;
    Ok(stream)
}

/// The rustls error in the error's chain, if the failure is one of TLS (an untrusted or
/// invalid certificate, a failed handshake). tokio-rustls reports rustls errors met during
/// the handshake as an `io::Error` whose `source()` skips the rustls error itself, so
/// `io::Error::get_ref` is looked into as well.
fn rustls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = next {
        if let Some(found) = current.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        if let Some(found) = current
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| rustls_error(inner))
        {
            return Some(found);
        }
        next = current.source();
    }
    None
}

fn has_tls_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    rustls_error(error).is_some()
}

/// What went wrong in a TLS handshake, said so that a person knows what to change.
fn tls_advice(error: &(dyn std::error::Error + 'static)) -> String {
    use rustls::CertificateError as C;
    let Some(tls) = rustls_error(error) else {
        return error_chain(error);
    };
    let advice = match tls {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => {
            "the server's certificate is not signed by a trusted CA; give the CA that issued it as the SMTP CA file (spec.smtp.caSecret, --smtp-ca-file)"
        }
        rustls::Error::InvalidCertificate(C::BadSignature) => {
            "the server's certificate was not signed by the CA in the SMTP CA file; give the CA that issued it (spec.smtp.caSecret, --smtp-ca-file)"
        }
        rustls::Error::InvalidCertificate(C::NotValidForName)
        | rustls::Error::InvalidCertificate(C::NotValidForNameContext { .. }) => {
            "the server's certificate does not name the SMTP host the worker connects to; connect by a name the certificate lists"
        }
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the server's certificate has expired"
        }
        rustls::Error::InvalidCertificate(C::Other(other))
            if other.to_string().contains("CaUsedAsEndEntity") =>
        {
            "the server presents a CA certificate (CA:TRUE) as its own; give it a server certificate signed by that CA, and that CA as the SMTP CA file"
        }
        _ => "",
    };
    if advice.is_empty() {
        format!("TLS failure: {tls}")
    } else {
        format!("{advice} ({tls})")
    }
}

/// The error and its sources on one line (a top-level text is often just "Connection
/// error", and the useful part, such as "UnknownIssuer", sits in the source). A source
/// whose text the line already holds is not repeated.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let more = inner.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = inner.source();
    }
    text
}

impl Mailer for SmtpMailer {
    async fn send(&self, message: &Outgoing) -> Result<Delivered, SendError> {
        let started = Instant::now();
        let slot = self.permit().await;
        self.busy.inc();
        // A reused connection that fails without any reply before the message was handed
        // over was closed by the server while it sat in the pool (a restart, an idle timeout
        // shorter than ours): the server stored nothing, so the transaction goes once more
        // on a new connection at once. A reply, even an error, is final, and so is anything
        // after the message was handed over.
        let result = match self.transact(slot, message, false).await {
            Err((error, true, slot)) if error.is_server_trouble() && error.code.is_none() => {
                tracing::debug!(
                    reason = error.reason,
                    "a pooled SMTP connection failed before the message; using a new one"
                );
                self.transact(slot, message, true).await
            }
            other => other,
        }
        .map_err(|(error, _, _)| error);
        self.busy.dec();
        if result
            .as_ref()
            .is_err_and(|e| e.reason == "smtp_outcome_unknown")
        {
            self.metrics.smtp_outcome_unknown.inc();
        }
        self.metrics
            .smtp_send_seconds
            .observe(started.elapsed().as_secs_f64());
        result
    }

    async fn probe(&self) -> Result<(), SendError> {
        let slot = self.permit().await;
        let (mut connection, _) = self.checkout(false).await?;
        if self.answers_noop(&mut connection).await {
            checkin(slot, connection);
            Ok(())
        } else {
            Err(SendError::unavailable(
                "smtp_connection",
                "the server did not answer NOOP".into(),
            ))
        }
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
