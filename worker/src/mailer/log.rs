//! The log transport: renders the message and logs it instead of sending, for trying a
//! pipeline out. Job id and size at info; the whole message (recipients, content) only at
//! debug, because both are personal data.

use super::{Delivered, Mailer, Outgoing, SendError};

/// Logs messages instead of sending them.
#[derive(Debug, Default)]
pub struct LogMailer;

impl Mailer for LogMailer {
    async fn send(&self, message: &Outgoing) -> Result<Delivered, SendError> {
        tracing::info!(
            recipients = message.envelope.to().len(),
            bytes = message.bytes.len(),
            "log mode: message rendered, not sent (MAILPIPE_LOG=debug shows it)"
        );
        tracing::debug!(
            message = %String::from_utf8_lossy(&message.bytes),
            "log mode: rendered message"
        );
        Ok(Delivered::default())
    }

    async fn probe(&self) -> Result<(), SendError> {
        Ok(())
    }
}
