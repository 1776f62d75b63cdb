//! One SMTP mail transaction on an open connection, command by command: MAIL, one RCPT per
//! recipient, DATA, then the message and its final dot.
//!
//! lettre speaks each command; this module drives them so that every step has its own
//! timeout (RFC 5321 section 4.5.3.2 gives the upper bounds) and so that a failure says how
//! far the transaction got:
//! - a failure before the message was handed over means the server stored nothing: if no
//!   reply came (a drop, a hang) the server is unavailable and the same message may be sent
//!   again, at once on another connection, without spending an attempt;
//! - a connection lost or timed out after the message was handed over leaves the outcome
//!   unknown (RFC 1047): the server may have stored it, so the job takes the normal attempt
//!   path (retry queue, deduplication), never an immediate resend.
//!
//! Recipients are answered one by one: a refused recipient does not stop the message for
//! the others. It is reported back ([`Delivered::refused`]) for the pipeline to retry or
//! dead-letter that recipient alone. Only when every recipient is refused does the
//! transaction fail, with the job's error (transient if any refusal was).

use std::time::Duration;

use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{Extension, MailBodyParameter, MailParameter};

use super::{Delivered, Outgoing, Refused, SendError};
use crate::disposition::SendClass;

/// RFC 5321 4.5.3.2: the longest a client should wait for the greeting, MAIL and RCPT.
const RFC_COMMAND: Duration = Duration::from_secs(5 * 60);
/// RFC 5321 4.5.3.2.3: the longest wait for the 354 to DATA.
const RFC_DATA_INIT: Duration = Duration::from_secs(2 * 60);
/// RFC 5321 4.5.3.2.6: the longest wait for the reply to the final dot.
const RFC_DATA_END: Duration = Duration::from_secs(10 * 60);

/// How long each step may take; each is capped by RFC 5321's value for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Connect, TLS handshake, greeting, EHLO, STARTTLS, AUTH, NOOP, MAIL and RCPT.
    pub command: Duration,
    /// The 354 to DATA.
    pub data_init: Duration,
    /// Handing over the message and the reply to its final dot.
    pub data_end: Duration,
}

impl Timeouts {
    /// `command` for every command and `data_end` for the message, each capped by RFC 5321.
    pub fn new(command: Duration, data_end: Duration) -> Timeouts {
        Timeouts {
            command: command.min(RFC_COMMAND),
            data_init: command.min(RFC_DATA_INIT),
            data_end: data_end.min(RFC_DATA_END),
        }
    }
}

/// Runs one command under `limit`; a reply is classified by its code, no reply means the
/// server is unavailable (nothing of this transaction was stored).
async fn step<T>(
    what: &str,
    limit: Duration,
    command: impl std::future::Future<Output = Result<T, lettre::transport::smtp::Error>>,
) -> Result<T, SendError> {
    match tokio::time::timeout(limit, command).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(match reply_code(&error) {
            Some(code) => SendError::from_reply(code, format!("{what}: {error}")),
            None => SendError::unavailable("smtp_connection", format!("{what}: {error}")),
        }),
        Err(_) => Err(SendError::unavailable(
            "smtp_timeout",
            format!("no reply to {what} within {limit:?}"),
        )),
    }
}

/// The numeric reply code of a lettre error, when the server answered.
pub fn reply_code(error: &lettre::transport::smtp::Error) -> Option<u16> {
    error
        .status()
        .map(|code| code.to_string().parse().unwrap_or(500))
}

/// Sends `message` on `connection`. On error the connection is no longer usable.
pub async fn send(
    connection: &mut AsyncSmtpConnection,
    message: &Outgoing,
    timeouts: &Timeouts,
) -> Result<Delivered, SendError> {
    let envelope = &message.envelope;
    let mut options = Vec::new();
    let non_ascii = envelope
        .from()
        .is_some_and(|a| !AsRef::<str>::as_ref(a).is_ascii())
        || envelope
            .to()
            .iter()
            .any(|a| !AsRef::<str>::as_ref(a).is_ascii());
    if non_ascii {
        if !connection
            .server_info()
            .supports_feature(Extension::SmtpUtfEight)
        {
            return Err(SendError::unsendable(
                "smtputf8_unsupported",
                "an address is not ASCII and the server does not offer SMTPUTF8".into(),
            ));
        }
        options.push(MailParameter::SmtpUtfEight);
    }
    if !message.bytes.is_ascii() {
        if !connection
            .server_info()
            .supports_feature(Extension::EightBitMime)
        {
            return Err(SendError::unsendable(
                "8bitmime_unsupported",
                "the message is not ASCII and the server does not offer 8BITMIME".into(),
            ));
        }
        options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    step(
        "MAIL",
        timeouts.command,
        connection.command(Mail::new(envelope.from().cloned(), options)),
    )
    .await?;
    let mut refused = Vec::new();
    for recipient in envelope.to() {
        match step(
            "RCPT",
            timeouts.command,
            connection.command(Rcpt::new(recipient.clone(), Vec::new())),
        )
        .await
        {
            Ok(_) => {}
            // A reply about this recipient; no reply, or a refusal of the worker (530),
            // ends the whole transaction.
            Err(error) if error.code.is_some() && !error.is_server_trouble() => {
                refused.push(Refused {
                    recipient: recipient.clone(),
                    error,
                });
            }
            Err(error) => return Err(error),
        }
    }
    if refused.len() == envelope.to().len() {
        let first = refused
            .iter()
            .find(|r| r.error.class == SendClass::Transient)
            .unwrap_or(&refused[0]);
        return Err(first.error.clone());
    }
    step("DATA", timeouts.data_init, connection.command(Data)).await?;
    // From here the server may store the message: without its reply the outcome is unknown.
    match tokio::time::timeout(timeouts.data_end, connection.message(&message.bytes)).await {
        Ok(Ok(_)) => Ok(Delivered { refused }),
        Ok(Err(error)) => Err(match reply_code(&error) {
            Some(code) => SendError::from_reply(code, format!("end of data: {error}")),
            None => SendError::outcome_unknown(format!(
                "connection lost after the message was handed over: {error}"
            )),
        }),
        Err(_) => Err(SendError::outcome_unknown(format!(
            "no reply to the end of data within {:?}",
            timeouts.data_end
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_never_exceed_rfc_5321() {
        let t = Timeouts::new(Duration::from_secs(3600), Duration::from_secs(3600));
        assert_eq!(t.command, Duration::from_secs(300));
        assert_eq!(t.data_init, Duration::from_secs(120));
        assert_eq!(t.data_end, Duration::from_secs(600));
        let short = Timeouts::new(Duration::from_secs(30), Duration::from_secs(60));
        assert_eq!(short.data_init, Duration::from_secs(30));
        assert_eq!(short.data_end, Duration::from_secs(60));
    }
}
