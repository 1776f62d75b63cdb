//! TLS for SMTP connections: implicit TLS (SMTPS, port 465) and STARTTLS both do their
//! handshake here, with tokio-rustls on the worker's own `TCP_NODELAY` socket.
//!
//! Certificates are verified against the system roots, or only against a given CA bundle,
//! and the server name; skipping verification still checks handshake signatures, only not
//! the chain or the name.

use std::io;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::smtp::BuildError;
use crate::config::SmtpConfig;

/// Wraps TCP connections in TLS for one SMTP server.
pub struct TlsClient {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl TlsClient {
    /// Builds the client configuration from the SMTP settings.
    pub fn new(config: &SmtpConfig) -> Result<TlsClient, BuildError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| BuildError::Settings(e.to_string()))?;
        let client = if config.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth()
        } else {
            builder
                .with_root_certificates(roots(config)?)
                .with_no_client_auth()
        };
        let server_name = ServerName::try_from(config.host.clone())
            .map_err(|e| BuildError::Settings(format!("SMTP host {:?}: {e}", config.host)))?;
        Ok(TlsClient {
            connector: TlsConnector::from(Arc::new(client)),
            server_name,
        })
    }

    /// Performs the TLS handshake on `tcp`.
    pub async fn wrap(
        &self,
        tcp: TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        self.connector.connect(self.server_name.clone(), tcp).await
    }
}

fn roots(config: &SmtpConfig) -> Result<RootCertStore, BuildError> {
    let mut roots = RootCertStore::empty();
    match &config.ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| BuildError::CaFile {
                path: path.display().to_string(),
                source,
            })?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| BuildError::Settings(format!("CA file: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| BuildError::Settings(format!("CA file: {e}")))?;
            }
            if roots.is_empty() {
                return Err(BuildError::Settings(format!(
                    "CA file {} holds no certificate",
                    path.display()
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(BuildError::Settings(
                    "no system root certificates found; set an SMTP CA file".into(),
                ));
            }
        }
    }
    Ok(roots)
}

/// Accepts any certificate chain and name, still checking handshake signatures.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
