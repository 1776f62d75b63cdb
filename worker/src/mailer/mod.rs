//! The mailer seam: hand a built message to something that delivers it.
//!
//! An [`Outgoing`] is the envelope plus the formatted MIME bytes (lettre builds them in
//! `render`), so any transport can sit behind [`Mailer`]: lettre's pooled SMTP transport
//! ([`smtp`]), the log transport ([`log`]), and later a pipelining transport (RFC 2920) that
//! needs exactly the same two things.

pub mod log;
pub mod smtp;
pub mod tls;

use std::future::Future;

use lettre::address::Envelope;

pub use crate::disposition::SendError;

/// A message ready to go: who it goes to (envelope) and what it is (RFC 5322 bytes).
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// SMTP envelope: MAIL FROM and RCPT TO (Bcc included).
    pub envelope: Envelope,
    /// The formatted message.
    pub bytes: Vec<u8>,
}

/// Delivers messages.
pub trait Mailer: Send + Sync + 'static {
    /// Delivers one message; `Ok` only once the server accepted it (250).
    fn send(&self, message: &Outgoing) -> impl Future<Output = Result<(), SendError>> + Send;

    /// Checks the server can be reached and accepts our credentials.
    fn probe(&self) -> impl Future<Output = Result<(), SendError>> + Send;
}
