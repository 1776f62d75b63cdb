//! The email job, version 1: the JSON object a producer publishes, one per message.
//!
//! Data flows `bytes -> EmailJob::parse -> EmailJob::validate`; both steps return an
//! [`InvalidJob`] whose [`InvalidJob::reason`] is a bounded label (metrics, dead-letter header).
//! An invalid job is never retried: the worker dead-letters it at once.
//! The JSON Schema in `contract/schema/email-job.v1.json` is generated from these types.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The only job version this crate reads and writes.
pub const JOB_VERSION: u32 = 1;

/// One email to send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct EmailJob {
    /// Schema version; must be 1.
    #[serde(default = "default_version")]
    pub version: u32,
    /// Idempotency key. With deduplication on, a job id whose send was recorded is not sent
    /// again. When absent the worker derives one: `sha256:` and the hex SHA-256 of the raw body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = 200)))]
    pub id: Option<String>,
    /// Recipients: `user@example.com` or `Name <user@example.com>`. At least one of
    /// `to`, `cc`, `bcc` must name a recipient.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    /// Carbon-copy recipients.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cc: Vec<String>,
    /// Blind carbon-copy recipients (never written into the message headers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bcc: Vec<String>,
    /// Sender; the worker's default From is used when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Reply-To address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Subject line. Required unless a template renders the subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Plain-text body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// HTML body. With `text` too, the message is multipart/alternative.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    /// A named template rendered by the worker instead of `text`/`html`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateRef>,
    /// Extra headers. Names must be RFC 5322 field names and not one the worker sets itself
    /// (From, To, Subject, ...); values may not contain CR or LF.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Delivery priority; maps to the AMQP message priority on priority queues.
    #[serde(default)]
    pub priority: Priority,
    /// Small attachments, base64 encoded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attachment>,
    /// Past this instant (RFC 3339) the job is dead-lettered as expired, never sent.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "not_after"
    )]
    pub not_after: Option<DateTime<Utc>>,
}

fn default_version() -> u32 {
    JOB_VERSION
}

/// `not_after` as RFC 3339, with an error that names the field (serde's own says only
/// "input contains invalid characters").
fn not_after<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<DateTime<Utc>>, D::Error> {
    let text = Option::<String>::deserialize(de)?;
    text.map(|t| {
        DateTime::parse_from_rfc3339(&t)
            .map(|d| d.with_timezone(&Utc))
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "not_after must be an RFC 3339 time such as 2026-01-01T12:00:00Z ({e})"
                ))
            })
    })
    .transpose()
}

/// A template to render: `name` in the worker's template set, `data` its context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct TemplateRef {
    /// Template name: letters, digits, `-`, `_` and `.`.
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = 100)))]
    pub name: String,
    /// Values the template can use.
    #[serde(default)]
    pub data: serde_json::Map<String, serde_json::Value>,
}

/// An attachment carried inside the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    /// File name shown to the recipient.
    pub filename: String,
    /// MIME type, e.g. `application/pdf`.
    pub content_type: String,
    /// The content, standard base64.
    pub content_base64: String,
}

/// Job priority.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Sent before normal and low jobs on a priority queue.
    High,
    /// The default.
    #[default]
    Normal,
    /// Sent after the others on a priority queue.
    Low,
}

impl Priority {
    /// The AMQP message priority a producer should set for this job (queues are declared
    /// with `x-max-priority` [`Priority::AMQP_MAX`]).
    pub fn amqp_priority(self) -> u8 {
        match self {
            Priority::High => 9,
            Priority::Normal => 5,
            Priority::Low => 1,
        }
    }

    /// The `x-max-priority` a priority queue is declared with by default.
    pub const AMQP_MAX: u8 = 10;
}

/// Size limits a worker enforces on jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest raw message body accepted, in bytes.
    pub max_job_bytes: usize,
    /// Most recipients (to + cc + bcc) in one job.
    pub max_recipients: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_job_bytes: 1024 * 1024,
            max_recipients: 100,
        }
    }
}

/// Why a job can never be sent. Invalid jobs are dead-lettered at once, never retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidJob {
    /// The body is larger than [`Limits::max_job_bytes`].
    Oversize { bytes: usize, max: usize },
    /// The body is not JSON, or not a JSON object (the serde message says where).
    MalformedJson(String),
    /// Well-formed JSON that breaks the job schema: an unknown field, a wrong type, a bad
    /// time (the message names the field).
    SchemaViolation(String),
    /// `version` is not one this worker reads.
    UnsupportedVersion(u32),
    /// No recipient in `to`, `cc` or `bcc`.
    NoRecipient,
    /// More recipients than [`Limits::max_recipients`].
    TooManyRecipients { count: usize, max: usize },
    /// A header name or value, the subject or an address carries CR or LF (header injection).
    HeaderInjection { field: String },
    /// A header name that is not an RFC 5322 field name or that the worker sets itself.
    ForbiddenHeader { name: String },
    /// No `text`, `html` or `template`.
    NoBody,
    /// No `subject` and no template to render one.
    NoSubject,
    /// Bad `id`, template name or attachment (the text says which).
    BadField(String),
}

impl InvalidJob {
    /// A bounded label for metrics and the dead-letter `x-mailpipe-reason` header.
    pub fn reason(&self) -> &'static str {
        match self {
            InvalidJob::Oversize { .. } => "oversize",
            InvalidJob::MalformedJson(_) => "malformed_json",
            InvalidJob::SchemaViolation(_) => "schema_violation",
            InvalidJob::UnsupportedVersion(_) => "unsupported_version",
            InvalidJob::NoRecipient => "no_recipient",
            InvalidJob::TooManyRecipients { .. } => "too_many_recipients",
            InvalidJob::HeaderInjection { .. } => "header_injection",
            InvalidJob::ForbiddenHeader { .. } => "forbidden_header",
            InvalidJob::NoBody => "no_body",
            InvalidJob::NoSubject => "no_subject",
            InvalidJob::BadField(_) => "bad_field",
        }
    }
}

impl fmt::Display for InvalidJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidJob::Oversize { bytes, max } => write!(f, "job is {bytes} bytes, limit {max}"),
            InvalidJob::MalformedJson(e) => write!(f, "not a JSON job object: {e}"),
            InvalidJob::SchemaViolation(e) => write!(f, "not a valid job: {e}"),
            InvalidJob::UnsupportedVersion(v) => {
                write!(
                    f,
                    "job version {v} is not supported (this worker reads {JOB_VERSION})"
                )
            }
            InvalidJob::NoRecipient => f.write_str("no recipient in to, cc or bcc"),
            InvalidJob::TooManyRecipients { count, max } => {
                write!(f, "{count} recipients, limit {max}")
            }
            InvalidJob::HeaderInjection { field } => write!(f, "CR or LF in {field}"),
            InvalidJob::ForbiddenHeader { name } => write!(f, "header {name:?} is not allowed"),
            InvalidJob::NoBody => f.write_str("no text, html or template"),
            InvalidJob::NoSubject => f.write_str("no subject and no template"),
            InvalidJob::BadField(what) => f.write_str(what),
        }
    }
}

impl std::error::Error for InvalidJob {}

/// Headers the worker writes itself; a job may not set them through `headers`.
const RESERVED_HEADERS: &[&str] = &[
    "from",
    "sender",
    "to",
    "cc",
    "bcc",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
    "return-path",
];

impl EmailJob {
    /// Parses a raw message body, enforcing the size limit before reading any JSON.
    pub fn parse(body: &[u8], limits: &Limits) -> Result<EmailJob, InvalidJob> {
        if body.len() > limits.max_job_bytes {
            return Err(InvalidJob::Oversize {
                bytes: body.len(),
                max: limits.max_job_bytes,
            });
        }
        // serde reads a struct from a JSON array too (field by field); the schema says object.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(InvalidJob::MalformedJson(
                "the job must be a JSON object".into(),
            ));
        }
        let job: EmailJob = serde_json::from_slice(body).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Data => InvalidJob::SchemaViolation(e.to_string()),
                Category::Io | Category::Syntax | Category::Eof => {
                    InvalidJob::MalformedJson(e.to_string())
                }
            }
        })?;
        job.validate(limits)?;
        Ok(job)
    }

    /// Checks everything that can be checked without a template set or an address parser:
    /// version, recipients, header injection, reserved headers, body presence, sizes.
    pub fn validate(&self, limits: &Limits) -> Result<(), InvalidJob> {
        if self.version != JOB_VERSION {
            return Err(InvalidJob::UnsupportedVersion(self.version));
        }
        let recipients = self.to.len() + self.cc.len() + self.bcc.len();
        if recipients == 0 {
            return Err(InvalidJob::NoRecipient);
        }
        if recipients > limits.max_recipients {
            return Err(InvalidJob::TooManyRecipients {
                count: recipients,
                max: limits.max_recipients,
            });
        }
        if let Some(id) = &self.id {
            if !is_valid_id(id) {
                return Err(InvalidJob::BadField(
                    "id must be 1 to 200 characters without control characters".into(),
                ));
            }
        }
        let single_line_fields = [
            ("subject", self.subject.as_deref()),
            ("from", self.from.as_deref()),
            ("reply_to", self.reply_to.as_deref()),
        ];
        for (field, value) in single_line_fields {
            if value.is_some_and(has_line_break) {
                return Err(InvalidJob::HeaderInjection {
                    field: field.into(),
                });
            }
        }
        for (field, list) in [("to", &self.to), ("cc", &self.cc), ("bcc", &self.bcc)] {
            if list.iter().any(|a| has_line_break(a)) {
                return Err(InvalidJob::HeaderInjection {
                    field: field.into(),
                });
            }
        }
        for (name, value) in &self.headers {
            if has_line_break(name) || has_line_break(value) {
                return Err(InvalidJob::HeaderInjection {
                    field: format!("header {name:?}"),
                });
            }
            if !is_field_name(name)
                || RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str())
            {
                return Err(InvalidJob::ForbiddenHeader { name: name.clone() });
            }
        }
        if let Some(template) = &self.template {
            let ok_name = !template.name.is_empty()
                && template.name.len() <= 100
                && template
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !template.name.starts_with('.');
            if !ok_name {
                return Err(InvalidJob::BadField(
                    "template name must be letters, digits, '-', '_' or '.'".into(),
                ));
            }
        } else {
            if self.text.is_none() && self.html.is_none() {
                return Err(InvalidJob::NoBody);
            }
            if self.subject.is_none() {
                return Err(InvalidJob::NoSubject);
            }
        }
        for attachment in &self.attachments {
            if attachment.filename.is_empty()
                || attachment.filename.chars().any(char::is_control)
                || attachment.content_type.chars().any(char::is_control)
            {
                return Err(InvalidJob::BadField(
                    "attachment filename and content_type must be set, one line each".into(),
                ));
            }
        }
        Ok(())
    }

    /// Whether the job's `not_after` has passed at `now`.
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.not_after.is_some_and(|deadline| now > deadline)
    }
}

/// Whether `id` can be a job id: 1 to 200 characters, none of them control characters.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 200 && !id.chars().any(char::is_control)
}

fn has_line_break(s: &str) -> bool {
    s.contains(['\r', '\n'])
}

/// RFC 5322 field name: printable US-ASCII except colon.
fn is_field_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| (33..=126).contains(&b) && b != b':')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<EmailJob, InvalidJob> {
        EmailJob::parse(json.as_bytes(), &Limits::default())
    }

    #[test]
    fn minimal_job_parses_with_defaults() {
        let job = parse(r#"{"to":["a@example.com"],"subject":"Hi","text":"Hello"}"#).unwrap();
        assert_eq!(job.version, 1);
        assert_eq!(job.priority, Priority::Normal);
        assert_eq!(job.id, None);
    }

    #[test]
    fn malformed_json_and_schema_violations_are_told_apart() {
        assert_eq!(parse("{not json").unwrap_err().reason(), "malformed_json");
        let err = parse(r#"{"to":["a@example.com"],"subject":"x","text":"y","txet":1}"#);
        assert_eq!(err.unwrap_err().reason(), "schema_violation");
        let err = parse(r#"{"to":"a@example.com","subject":"x","text":"y"}"#);
        assert_eq!(err.unwrap_err().reason(), "schema_violation");
    }

    #[test]
    fn a_json_array_is_not_a_job() {
        let err = parse(r#"[1, [], ["a@example.com"], [], [], null, null, "s", "t"]"#);
        assert_eq!(err.unwrap_err().reason(), "malformed_json");
    }

    #[test]
    fn a_malformed_not_after_names_the_field() {
        let err =
            parse(r#"{"to":["a@example.com"],"subject":"x","text":"y","not_after":"tomorrow"}"#)
                .unwrap_err();
        assert_eq!(err.reason(), "schema_violation");
        assert!(err.to_string().contains("not_after"), "{err}");
    }

    #[test]
    fn a_job_without_recipient_is_refused() {
        let err = parse(r#"{"subject":"Hi","text":"Hello"}"#).unwrap_err();
        assert_eq!(err, InvalidJob::NoRecipient);
    }

    #[test]
    fn line_breaks_in_subject_address_or_header_are_header_injection() {
        for json in [
            r#"{"to":["a@example.com"],"subject":"Hi\r\nBcc: x@evil.test","text":"y"}"#,
            r#"{"to":["a@example.com\nBcc: x@evil.test"],"subject":"Hi","text":"y"}"#,
            r#"{"to":["a@example.com"],"subject":"Hi","text":"y","headers":{"X-A":"1\r\nBcc: x@evil.test"}}"#,
        ] {
            assert_eq!(
                parse(json).unwrap_err().reason(),
                "header_injection",
                "{json}"
            );
        }
    }

    #[test]
    fn reserved_or_malformed_header_names_are_refused() {
        let json =
            r#"{"to":["a@example.com"],"subject":"x","text":"y","headers":{"Bcc":"b@x.test"}}"#;
        assert_eq!(parse(json).unwrap_err().reason(), "forbidden_header");
        let json = r#"{"to":["a@example.com"],"subject":"x","text":"y","headers":{"X A":"1"}}"#;
        assert_eq!(parse(json).unwrap_err().reason(), "forbidden_header");
    }

    #[test]
    fn oversize_is_refused_before_parsing() {
        let limits = Limits {
            max_job_bytes: 10,
            ..Limits::default()
        };
        let err = EmailJob::parse(b"{\"to\":[\"a@example.com\"]}", &limits).unwrap_err();
        assert_eq!(err.reason(), "oversize");
    }

    #[test]
    fn body_and_subject_are_required_without_template() {
        assert_eq!(
            parse(r#"{"to":["a@example.com"],"subject":"x"}"#).unwrap_err(),
            InvalidJob::NoBody
        );
        assert_eq!(
            parse(r#"{"to":["a@example.com"],"text":"x"}"#).unwrap_err(),
            InvalidJob::NoSubject
        );
        parse(r#"{"to":["a@example.com"],"template":{"name":"welcome","data":{"n":1}}}"#).unwrap();
    }

    #[test]
    fn template_names_cannot_walk_paths() {
        let json = r#"{"to":["a@example.com"],"template":{"name":"../etc/passwd"}}"#;
        assert_eq!(parse(json).unwrap_err().reason(), "bad_field");
    }

    #[test]
    fn unsupported_version_is_refused() {
        let json = r#"{"version":2,"to":["a@example.com"],"subject":"x","text":"y"}"#;
        assert_eq!(parse(json).unwrap_err(), InvalidJob::UnsupportedVersion(2));
    }

    #[test]
    fn expiry_compares_against_not_after() {
        let job = parse(
            r#"{"to":["a@example.com"],"subject":"x","text":"y","not_after":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        let before = "2025-12-31T23:59:59Z".parse().unwrap();
        let after = "2026-01-01T00:00:01Z".parse().unwrap();
        assert!(!job.is_expired(before));
        assert!(job.is_expired(after));
    }
}
