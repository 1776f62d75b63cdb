//! What happens to a job after an attempt: a pure function of the failure, the attempt number
//! and the retry policy.
//!
//! - an invalid job (bad JSON, no recipient, header injection, unknown template, ...) and an
//!   expired one are dead-lettered at once: retrying cannot make them valid;
//! - a permanent SMTP failure (5xx to the message) is dead-lettered at once;
//! - a transient failure caused by this job's delivery (a 4xx reply to the message, an
//!   outcome left unknown by a connection lost after the final dot) is retried after the
//!   policy's delay, and dead-lettered as `max_attempts` after the last attempt;
//! - the server being unavailable (unreachable, hanging, refusing TLS or our credentials)
//!   says nothing about the job: it costs no attempt. The pipeline holds the job and stops
//!   consuming until the server answers again, so an outage of any length dead-letters
//!   nothing; [`decide`] only sees it when the worker is stopping, and then the job goes back
//!   to the queue unchanged.

use std::time::Duration;

use mailpipe_contract::RetryPolicy;

/// Whether an SMTP failure can succeed on a later attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendClass {
    /// Worth another attempt.
    Transient,
    /// Will fail the same way every time.
    Permanent,
    /// The server (not the job) is unavailable: wait for it, spend no attempt.
    Unavailable,
}

/// A failed send, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendError {
    /// Transient, permanent or unavailable.
    pub class: SendClass,
    /// A bounded label: `smtp_4xx`, `smtp_5xx`, `smtp_auth`, `smtp_tls`, `smtp_timeout`,
    /// `smtp_connection`, `smtp_outcome_unknown`, `smtputf8_unsupported`.
    pub reason: &'static str,
    /// The SMTP reply code, when the server answered.
    pub code: Option<u16>,
    /// A short explanation without recipients or content.
    pub detail: String,
}

/// Reply codes that concern our credentials, not the message.
const AUTH_CODES: &[u16] = &[530, 534, 535, 538];

impl SendError {
    /// Classifies an SMTP reply to a transaction command: 4xx transient, 5xx permanent,
    /// except the authentication codes, which mean the server refuses the worker.
    pub fn from_reply(code: u16, detail: String) -> SendError {
        let (class, reason) = if AUTH_CODES.contains(&code) {
            (SendClass::Unavailable, "smtp_auth")
        } else if (400..500).contains(&code) {
            (SendClass::Transient, "smtp_4xx")
        } else {
            (SendClass::Permanent, "smtp_5xx")
        };
        SendError {
            class,
            reason,
            code: Some(code),
            detail,
        }
    }

    /// The server is unavailable (connection, TLS, timeout, a refusal of the worker before
    /// any transaction): no attempt is spent.
    pub fn unavailable(reason: &'static str, detail: String) -> SendError {
        SendError {
            class: SendClass::Unavailable,
            reason,
            code: None,
            detail,
        }
    }

    /// The server refused the worker (not a message) with `code`, e.g. 421 or 554 in its
    /// greeting or a 535 to AUTH: unavailable, whatever the code's class.
    pub fn refused(reason: &'static str, code: u16, detail: String) -> SendError {
        SendError {
            code: Some(code),
            ..SendError::unavailable(reason, detail)
        }
    }

    /// The connection was lost after the whole message was handed over and before the
    /// server's reply (RFC 1047): the server may have stored it. Spends an attempt, so a
    /// resend goes through the retry queue and deduplication, never at once.
    pub fn outcome_unknown(detail: String) -> SendError {
        SendError {
            class: SendClass::Transient,
            reason: "smtp_outcome_unknown",
            code: None,
            detail,
        }
    }

    /// A job the server can never take as it is (e.g. a non-ASCII address to a server
    /// without SMTPUTF8).
    pub fn unsendable(reason: &'static str, detail: String) -> SendError {
        SendError {
            class: SendClass::Permanent,
            reason,
            code: None,
            detail,
        }
    }

    /// Whether the failure says the server (not the job) is in trouble.
    pub fn is_server_trouble(&self) -> bool {
        self.class == SendClass::Unavailable
    }
}

/// Why an attempt did not send the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The job can never be sent as it is (the reason is a bounded label).
    Invalid {
        /// Bounded label, e.g. `malformed_json`, `header_injection`, `unknown_template`.
        reason: &'static str,
        /// What is wrong, without recipients or content.
        detail: String,
    },
    /// Past its `not_after`.
    Expired,
    /// The SMTP server or the way to it failed.
    Send(SendError),
}

impl Failure {
    /// The bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::Invalid { reason, .. } => reason,
            Failure::Expired => "expired",
            Failure::Send(e) => e.reason,
        }
    }

    /// The explanation carried in the dead-letter header.
    pub fn detail(&self) -> String {
        match self {
            Failure::Invalid { detail, .. } => detail.clone(),
            Failure::Expired => "not_after passed before the job could be sent".into(),
            Failure::Send(e) => e.detail.clone(),
        }
    }
}

/// The decision for a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Try again: attempt `next_attempt` after `after`.
    Retry {
        /// The attempt number the job will be on.
        next_attempt: u32,
        /// How long it waits first.
        after: Duration,
    },
    /// Give up: dead-letter with this reason.
    DeadLetter {
        /// Bounded label, e.g. `smtp_5xx`, `expired`, `max_attempts`.
        reason: &'static str,
    },
}

/// Decides what happens after `failure` on attempt `attempt` (counting from 1).
pub fn decide(failure: &Failure, attempt: u32, policy: &RetryPolicy) -> Disposition {
    match failure {
        Failure::Invalid { reason, .. } => Disposition::DeadLetter { reason },
        Failure::Expired => Disposition::DeadLetter { reason: "expired" },
        Failure::Send(error) => match error.class {
            SendClass::Permanent => Disposition::DeadLetter {
                reason: error.reason,
            },
            // Reached only while stopping (the pipeline otherwise waits for the server):
            // the job keeps its attempt number.
            SendClass::Unavailable => Disposition::Retry {
                next_attempt: attempt,
                after: policy.delay_after(1),
            },
            SendClass::Transient if policy.has_attempt_after(attempt) => Disposition::Retry {
                next_attempt: attempt + 1,
                after: policy.delay_after(attempt),
            },
            SendClass::Transient => Disposition::DeadLetter {
                reason: "max_attempts",
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            initial: Duration::from_secs(1),
            multiplier: 3.0,
            max: Duration::from_secs(60),
        }
    }

    fn smtp(code: u16) -> Failure {
        Failure::Send(SendError::from_reply(code, format!("{code} test")))
    }

    #[test]
    fn invalid_jobs_are_dead_lettered_at_once_whatever_the_attempt() {
        let failure = Failure::Invalid {
            reason: "header_injection",
            detail: "CR or LF in subject".into(),
        };
        assert_eq!(
            decide(&failure, 1, &policy()),
            Disposition::DeadLetter {
                reason: "header_injection"
            }
        );
    }

    #[test]
    fn expired_jobs_are_dead_lettered_at_once() {
        assert_eq!(
            decide(&Failure::Expired, 1, &policy()),
            Disposition::DeadLetter { reason: "expired" }
        );
    }

    #[test]
    fn smtp_5xx_is_dead_lettered_at_once() {
        assert_eq!(
            decide(&smtp(550), 1, &policy()),
            Disposition::DeadLetter { reason: "smtp_5xx" }
        );
    }

    #[test]
    fn transient_smtp_failure_is_retried_with_growing_delay_then_dead_lettered() {
        assert_eq!(
            decide(&smtp(451), 1, &policy()),
            Disposition::Retry {
                next_attempt: 2,
                after: Duration::from_secs(1)
            }
        );
        assert_eq!(
            decide(&smtp(451), 2, &policy()),
            Disposition::Retry {
                next_attempt: 3,
                after: Duration::from_secs(3)
            }
        );
        assert_eq!(
            decide(&smtp(451), 3, &policy()),
            Disposition::DeadLetter {
                reason: "max_attempts"
            }
        );
    }

    #[test]
    fn an_unavailable_server_never_spends_an_attempt_even_on_the_last_one() {
        let failure = Failure::Send(SendError::unavailable(
            "smtp_connection",
            "connection refused".into(),
        ));
        assert_eq!(
            decide(&failure, 3, &policy()),
            Disposition::Retry {
                next_attempt: 3,
                after: Duration::from_secs(1)
            }
        );
    }

    #[test]
    fn authentication_failures_are_not_blamed_on_the_job() {
        let failure = smtp(535);
        assert_eq!(failure.reason(), "smtp_auth");
        let Failure::Send(error) = &failure else {
            unreachable!()
        };
        assert!(error.is_server_trouble());
        assert!(matches!(
            decide(&failure, 3, &policy()),
            Disposition::Retry {
                next_attempt: 3,
                ..
            }
        ));
    }

    #[test]
    fn an_unknown_outcome_spends_an_attempt() {
        let failure = Failure::Send(SendError::outcome_unknown("lost after the dot".into()));
        assert_eq!(
            decide(&failure, 3, &policy()),
            Disposition::DeadLetter {
                reason: "max_attempts"
            }
        );
    }
}
