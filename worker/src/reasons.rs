//! Every reason label the worker counts, by kind, in one place.
//!
//! The reason-labelled counters (`failed`, `retried`, `dead_lettered`, `smtp_unavailable`)
//! start every label they can carry at zero, so `rate()` and `increase()` see the first
//! failure of a kind instead of a series born at its first increment. A counter asked for
//! a label not listed here trips a debug assertion, so a test that produces a new reason
//! fails until it is listed.

use mailpipe_contract::InvalidJob;

/// Jobs that can never be sent as they are: dead-lettered at once. The job's own
/// (`InvalidJob`), the renderer's, and what the server cannot take (a non-ASCII address to a
/// server without SMTPUTF8, 8-bit content without 8BITMIME); `expired` past `not_after`.
pub const INVALID: &[&str] = &[
    "oversize",
    "malformed_json",
    "schema_violation",
    "unsupported_version",
    "no_recipient",
    "too_many_recipients",
    "header_injection",
    "forbidden_header",
    "no_body",
    "no_subject",
    "bad_field",
    "unknown_template",
    "template_error",
    "no_from",
    "bad_address",
    "bad_message",
    "smtputf8_unsupported",
    "8bitmime_unsupported",
    "expired",
];

/// Failures of this job's delivery worth another attempt: a 4xx to the message or to some
/// of its recipients, an outcome left unknown by a connection lost after the final dot.
pub const TRANSIENT: &[&str] = &["smtp_4xx", "smtp_outcome_unknown", "recipient_4xx"];

/// Refusals of the message for good: a 5xx, or every recipient refused.
pub const PERMANENT: &[&str] = &["smtp_5xx", "recipient_refused"];

/// The server unavailable (unreachable, hanging, refusing TLS or the credentials): no
/// attempt spent; a job is only put back with one of these while the worker stops.
pub const UNAVAILABLE: &[&str] = &["smtp_auth", "smtp_tls", "smtp_timeout", "smtp_connection"];

/// A transient failure on the last attempt.
pub const MAX_ATTEMPTS: &str = "max_attempts";

/// The labels of `mailpipe_jobs_failed_total`: every failed attempt.
pub fn failed() -> Vec<&'static str> {
    [INVALID, TRANSIENT, PERMANENT, UNAVAILABLE].concat()
}

/// The labels of `mailpipe_jobs_retried_total`.
pub fn retried() -> Vec<&'static str> {
    [TRANSIENT, UNAVAILABLE].concat()
}

/// The labels of `mailpipe_jobs_dead_lettered_total`.
pub fn dead_lettered() -> Vec<&'static str> {
    [INVALID, PERMANENT, &[MAX_ATTEMPTS]].concat()
}

/// The labels of `mailpipe_smtp_unavailable_total`.
pub fn unavailable() -> Vec<&'static str> {
    UNAVAILABLE.to_vec()
}

/// The reason of each kind of invalid job, one per variant: a new variant does not compile
/// until it is added here (and then to [`INVALID`], which the tests check).
pub fn of_invalid_job(kind: &InvalidJob) -> &'static str {
    match kind {
        InvalidJob::Oversize { .. }
        | InvalidJob::MalformedJson(_)
        | InvalidJob::SchemaViolation(_)
        | InvalidJob::UnsupportedVersion(_)
        | InvalidJob::NoRecipient
        | InvalidJob::TooManyRecipients { .. }
        | InvalidJob::HeaderInjection { .. }
        | InvalidJob::ForbiddenHeader { .. }
        | InvalidJob::NoBody
        | InvalidJob::NoSubject
        | InvalidJob::BadField(_) => kind.reason(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_invalid_job_reason_is_listed() {
        let every = [
            InvalidJob::Oversize { bytes: 2, max: 1 },
            InvalidJob::MalformedJson(String::new()),
            InvalidJob::SchemaViolation(String::new()),
            InvalidJob::UnsupportedVersion(9),
            InvalidJob::NoRecipient,
            InvalidJob::TooManyRecipients { count: 2, max: 1 },
            InvalidJob::HeaderInjection {
                field: String::new(),
            },
            InvalidJob::ForbiddenHeader {
                name: String::new(),
            },
            InvalidJob::NoBody,
            InvalidJob::NoSubject,
            InvalidJob::BadField(String::new()),
        ];
        for kind in &every {
            assert!(INVALID.contains(&of_invalid_job(kind)), "{kind:?}");
        }
    }

    #[test]
    fn no_label_is_listed_twice() {
        let mut all = [INVALID, TRANSIENT, PERMANENT, UNAVAILABLE, &[MAX_ATTEMPTS]].concat();
        let count = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), count);
    }
}
