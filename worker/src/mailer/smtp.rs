//! SMTP delivery through lettre's pooled async transport.
//!
//! Connections are reused from a pool capped at the configured size (providers limit
//! connections per account). STARTTLS is required by default; implicit TLS and plain are
//! explicit choices. Certificates are verified against the system roots, or only against a
//! given CA bundle; skipping verification is an opt-in that `main` logs loudly.
//! lettre's errors are mapped to a classified [`SendError`] here and nowhere else.

use std::time::Instant;

use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use super::{Mailer, Outgoing, SendError};
use crate::config::{SmtpConfig, TlsMode};
use crate::metrics::Metrics;

/// Pooled SMTP transport.
pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
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
}

impl SmtpMailer {
    /// Builds the transport; connects lazily on the first send or probe.
    pub fn new(config: &SmtpConfig, metrics: Metrics) -> Result<SmtpMailer, BuildError> {
        let tls = match config.tls {
            TlsMode::None => Tls::None,
            TlsMode::Starttls => Tls::Required(tls_parameters(config)?),
            TlsMode::Tls => Tls::Wrapper(tls_parameters(config)?),
        };
        let pool = PoolConfig::new().max_size(config.pool_size);
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&config.host)
            .port(config.port)
            .tls(tls)
            .timeout(Some(config.timeout))
            .pool_config(pool);
        if let Some((user, password)) = &config.credentials {
            builder = builder.credentials(Credentials::new(
                user.clone(),
                password.expose().to_string(),
            ));
        }
        metrics
            .smtp_pool_connections
            .with_label_values(&["max"])
            .set(config.pool_size.into());
        Ok(SmtpMailer {
            transport: builder.build(),
            metrics,
        })
    }
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
        let busy = self
            .metrics
            .smtp_pool_connections
            .with_label_values(&["busy"]);
        busy.inc();
        let started = Instant::now();
        let result = self
            .transport
            .send_raw(&message.envelope, &message.bytes)
            .await;
        self.metrics
            .smtp_send_seconds
            .observe(started.elapsed().as_secs_f64());
        busy.dec();
        result.map(|_| ()).map_err(|e| classify(&e))
    }

    async fn probe(&self) -> Result<(), SendError> {
        match self.transport.test_connection().await {
            Ok(true) => Ok(()),
            Ok(false) => Err(SendError::without_reply(
                "smtp_connection",
                "the server did not answer NOOP".into(),
            )),
            Err(e) => Err(classify(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
