//! One SMTP mail transaction on an open connection: MAIL, one RCPT per recipient, DATA, then
//! the message and its final dot.
//!
//! When the server offers PIPELINING (RFC 2920), MAIL, every RCPT and DATA go out in one
//! write and their replies are read in order, then the message goes in one more write: two
//! round trips a message. Without it, a command at a time. Either way every reply has its
//! own timeout (RFC 5321 section 4.5.3.2 gives the upper bounds) and a failure says how far
//! the transaction got:
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

use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{Extension, MailBodyParameter, MailParameter};

use super::connection::{Connection, Failure};
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

/// Writes what is queued (with `flush`) and reads the reply to `what` under `limit`; a
/// reply is classified by its code, no reply means the server is unavailable (nothing of
/// this transaction was stored).
async fn step(
    connection: &mut Connection,
    flush: bool,
    what: &str,
    limit: Duration,
) -> Result<u16, SendError> {
    let exchange = async {
        if flush {
            connection.flush().await?;
        }
        connection.reply().await
    };
    match tokio::time::timeout(limit, exchange).await {
        Ok(Ok(code)) => Ok(code),
        Ok(Err(Failure::Reply { code, text })) => Err(SendError::from_reply(
            code,
            format!("{what}: {code} {text}"),
        )),
        Ok(Err(error)) => Err(SendError::unavailable(
            "smtp_connection",
            format!("{what}: {error}"),
        )),
        Err(_) => Err(SendError::unavailable(
            "smtp_timeout",
            format!("no reply to {what} within {limit:?}"),
        )),
    }
}

/// Sends `message` on `connection`. On error the connection is no longer usable.
pub async fn send(
    connection: &mut Connection,
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
    // With PIPELINING the whole envelope and DATA go in one write; the replies come in order.
    let pipelined = connection.pipelining();
    connection.queue(Mail::new(envelope.from().cloned(), options));
    if pipelined {
        for recipient in envelope.to() {
            connection.queue(Rcpt::new(recipient.clone(), Vec::new()));
        }
        connection.queue(Data);
    }
    step(connection, true, "MAIL", timeouts.command).await?;
    let mut refused = Vec::new();
    for recipient in envelope.to() {
        if !pipelined {
            connection.queue(Rcpt::new(recipient.clone(), Vec::new()));
        }
        match step(connection, !pipelined, "RCPT", timeouts.command).await {
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
        // Pipelined, the DATA was refused too (RFC 2920 3.1); the connection is dropped
        // either way, which ends a transaction the server may still hold.
        let first = refused
            .iter()
            .find(|r| r.error.class == SendClass::Transient)
            .unwrap_or(&refused[0]);
        return Err(first.error.clone());
    }
    if !pipelined {
        connection.queue(Data);
    }
    let go_ahead = step(connection, !pipelined, "DATA", timeouts.data_init).await?;
    if go_ahead != 354 {
        // The server would read the message as commands: nothing is handed over.
        return Err(SendError::unavailable(
            "smtp_connection",
            format!("DATA: answered {go_ahead}, not 354"),
        ));
    }
    // From here the server may store the message: without its reply the outcome is unknown.
    connection.queue_message(&message.bytes);
    let handed_over = async {
        connection.flush().await?;
        connection.reply().await
    };
    match tokio::time::timeout(timeouts.data_end, handed_over).await {
        Ok(Ok(_)) => Ok(Delivered { refused }),
        Ok(Err(Failure::Reply { code, text })) => Err(SendError::from_reply(
            code,
            format!("end of data: {code} {text}"),
        )),
        Ok(Err(error)) => Err(SendError::outcome_unknown(format!(
            "connection lost after the message was handed over: {error}"
        ))),
        Err(_) => Err(SendError::outcome_unknown(format!(
            "no reply to the end of data within {:?}",
            timeouts.data_end
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lettre::address::Envelope;
    use tokio::io::AsyncWriteExt;

    use crate::mailer::connection::testing::{line, scripted};

    const TIMEOUTS: Timeouts = Timeouts {
        command: Duration::from_secs(5),
        data_init: Duration::from_secs(5),
        data_end: Duration::from_secs(5),
    };

    fn message(to: &[&str]) -> Outgoing {
        Outgoing {
            envelope: Envelope::new(
                Some("from@example.com".parse().unwrap()),
                to.iter().map(|a| a.parse().unwrap()).collect(),
            )
            .unwrap(),
            bytes: b"Subject: x\r\n\r\n.hi\r\n".to_vec(),
        }
    }

    #[tokio::test]
    async fn with_pipelining_the_envelope_and_data_go_before_any_reply() {
        let (mut connection, server) = scripted(
            "250-scripted\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
            |mut read, mut write| async move {
                // Every command of the envelope arrives before any reply is sent.
                let mut commands = Vec::new();
                for _ in 0..4 {
                    commands.push(line(&mut read).await);
                }
                write
                    .write_all(b"250 ok\r\n250 ok\r\n550 5.1.1 no such user\r\n354 go\r\n")
                    .await
                    .unwrap();
                let mut data = String::new();
                loop {
                    let next = line(&mut read).await;
                    if next == ".\r\n" || next.is_empty() {
                        break;
                    }
                    data.push_str(&next);
                }
                write.write_all(b"250 queued\r\n").await.unwrap();
                (commands, data)
            },
        )
        .await;
        assert!(connection.pipelining());
        let delivered = tokio::time::timeout(
            Duration::from_secs(5),
            send(
                &mut connection,
                &message(&["a@example.com", "b@example.com"]),
                &TIMEOUTS,
            ),
        )
        .await
        .expect("no reply is awaited before the whole envelope is written")
        .expect("delivered to a@");
        assert_eq!(delivered.refused.len(), 1);
        assert_eq!(delivered.refused[0].recipient.to_string(), "b@example.com");
        assert_eq!(delivered.refused[0].error.code, Some(550));
        assert_eq!(delivered.refused[0].error.class, SendClass::Permanent);
        let (commands, data) = server.await.unwrap();
        assert_eq!(
            commands,
            [
                "MAIL FROM:<from@example.com>\r\n",
                "RCPT TO:<a@example.com>\r\n",
                "RCPT TO:<b@example.com>\r\n",
                "DATA\r\n"
            ]
        );
        assert_eq!(data, "Subject: x\r\n\r\n..hi\r\n\r\n", "dot-stuffed");
    }

    #[tokio::test]
    async fn without_pipelining_each_command_waits_for_its_reply() {
        let (mut connection, server) = scripted(
            "250-scripted\r\n250 8BITMIME\r\n",
            |mut read, mut write| async move {
                assert!(line(&mut read).await.starts_with("MAIL FROM:"));
                let early = tokio::time::timeout(Duration::from_millis(300), line(&mut read)).await;
                assert!(
                    early.is_err(),
                    "RCPT sent before the reply to MAIL: {early:?}"
                );
                write.write_all(b"250 ok\r\n").await.unwrap();
                assert!(line(&mut read).await.starts_with("RCPT TO:"));
                write.write_all(b"451 4.2.1 later\r\n").await.unwrap();
                // Every recipient refused: no DATA, the client gives the connection up.
                line(&mut read).await
            },
        )
        .await;
        assert!(!connection.pipelining());
        let error = send(&mut connection, &message(&["a@example.com"]), &TIMEOUTS)
            .await
            .unwrap_err();
        assert_eq!(error.code, Some(451));
        assert_eq!(error.class, SendClass::Transient);
        drop(connection);
        assert_eq!(server.await.unwrap(), "", "nothing after the refused RCPT");
    }

    #[tokio::test]
    async fn a_data_answered_otherwise_than_354_gets_no_message() {
        let (mut connection, server) = scripted(
            "250-scripted\r\n250 PIPELINING\r\n",
            |mut read, mut write| async move {
                for _ in 0..3 {
                    line(&mut read).await;
                }
                write
                    .write_all(b"250 ok\r\n250 ok\r\n250 ok\r\n")
                    .await
                    .unwrap();
                line(&mut read).await
            },
        )
        .await;
        let error = send(&mut connection, &message(&["a@example.com"]), &TIMEOUTS)
            .await
            .unwrap_err();
        assert!(error.is_server_trouble(), "{error:?}");
        assert_eq!(error.code, None, "nothing was handed over: {error:?}");
        drop(connection);
        assert_eq!(
            server.await.unwrap(),
            "",
            "no message after a DATA without 354"
        );
    }

    #[tokio::test]
    async fn pipelined_with_every_recipient_refused_the_first_refusal_is_the_job_s() {
        let (mut connection, server) = scripted(
            "250-scripted\r\n250 PIPELINING\r\n",
            |mut read, mut write| async move {
                for _ in 0..4 {
                    line(&mut read).await;
                }
                write
                    .write_all(b"250 ok\r\n550 5.1.1 no\r\n452 4.2.2 full\r\n554 5.5.1 no valid recipients\r\n")
                    .await
                    .unwrap();
                line(&mut read).await
            },
        )
        .await;
        let error = send(
            &mut connection,
            &message(&["a@example.com", "b@example.com"]),
            &TIMEOUTS,
        )
        .await
        .unwrap_err();
        assert_eq!(
            error.code,
            Some(452),
            "a transient refusal makes the job transient"
        );
        drop(connection);
        assert_eq!(server.await.unwrap(), "", "no message after a refused DATA");
    }

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
