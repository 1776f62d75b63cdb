//! The mailer seam: hand a built message to something that delivers it.
//!
//! An [`Outgoing`] is the envelope plus the formatted MIME bytes (lettre builds them in
//! `render`), so any transport can sit behind [`Mailer`]: the pooled SMTP transport
//! ([`smtp`], over the worker's own connections that pipeline where the server allows,
//! [`connection`]) and the log transport ([`log`]).

pub mod budget;
pub mod connection;
pub mod log;
pub mod pool;
pub mod smtp;
pub mod tls;
pub mod transaction;

use std::future::Future;

use lettre::address::Envelope;
use lettre::Address;

pub use crate::disposition::SendError;

/// A message ready to go: who it goes to (envelope) and what it is (RFC 5322 bytes).
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// SMTP envelope: MAIL FROM and RCPT TO (Bcc included).
    pub envelope: Envelope,
    /// The formatted message.
    pub bytes: Vec<u8>,
}

/// A message the server accepted (250), for every recipient but those listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivered {
    /// Recipients the server refused at RCPT while it accepted others, with its reply.
    pub refused: Vec<Refused>,
}

/// One recipient the server refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The envelope address.
    pub recipient: Address,
    /// The server's reply, classified (transient or permanent).
    pub error: SendError,
}

/// Delivers messages.
pub trait Mailer: Send + Sync + 'static {
    /// Delivers one message; `Ok` only once the server accepted it (250) for at least one
    /// recipient. When every recipient is refused, the error is the job's.
    fn send(&self, message: &Outgoing)
        -> impl Future<Output = Result<Delivered, SendError>> + Send;

    /// Checks the server can be reached and accepts our credentials.
    fn probe(&self) -> impl Future<Output = Result<(), SendError>> + Send;
}
