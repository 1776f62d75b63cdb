//! From a valid job to an [`Outgoing`] message: templates rendered, MIME built by lettre.
//!
//! Templates live in one directory, loaded once at start-up (a broken template stops the
//! worker, not a job): `NAME.html` and/or `NAME.txt` make template `NAME`, and an optional
//! `NAME.subject` renders the subject when the job has none. HTML templates escape their
//! values; a value the template uses but the job does not give is an error (strict).
//! Anything here that a job can get wrong (an address that does not parse, an unknown
//! template) is a [`Failure::Invalid`]: the job is dead-lettered, never retried.

use std::collections::BTreeSet;
use std::path::Path;

use base64::Engine;
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};
use lettre::Message;
use mailpipe_contract::EmailJob;
use minijinja::{Environment, UndefinedBehavior};
use sha2::{Digest, Sha256};

use crate::disposition::Failure;
use crate::mailer::Outgoing;

/// Builds messages from jobs.
pub struct Renderer {
    templates: Environment<'static>,
    names: BTreeSet<String>,
    default_from: Option<Mailbox>,
}

/// The renderer cannot be set up (a configuration problem, reported at start-up).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The default From does not parse.
    #[error("default From address {0:?} is not a valid address")]
    From(String),
    /// The template directory cannot be read.
    #[error("cannot read template directory {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    /// A template does not compile.
    #[error("template {name}: {source}")]
    Template {
        name: String,
        source: minijinja::Error,
    },
}

fn invalid(reason: &'static str, detail: impl Into<String>) -> Failure {
    Failure::Invalid {
        reason,
        detail: detail.into(),
    }
}

impl Renderer {
    /// Loads every template in `dir` and parses the default From.
    pub fn new(
        dir: Option<&Path>,
        from_address: Option<&str>,
        from_name: Option<&str>,
    ) -> Result<Renderer, SetupError> {
        let default_from = from_address
            .map(|address| {
                let parsed = address
                    .parse()
                    .map_err(|_| SetupError::From(address.to_string()))?;
                Ok(Mailbox::new(from_name.map(str::to_string), parsed))
            })
            .transpose()?;
        let mut templates = Environment::new();
        templates.set_undefined_behavior(UndefinedBehavior::Strict);
        let mut names = BTreeSet::new();
        if let Some(dir) = dir {
            let dir_error = |source| SetupError::Dir {
                path: dir.display().to_string(),
                source,
            };
            let mut entries: Vec<_> = std::fs::read_dir(dir)
                .map_err(dir_error)?
                .collect::<Result<_, _>>()
                .map_err(dir_error)?;
            entries.sort_by_key(|e| e.file_name());
            for entry in entries {
                let file_name = entry.file_name().to_string_lossy().into_owned();
                let Some((stem, ext)) = file_name.rsplit_once('.') else {
                    continue;
                };
                if !matches!(ext, "html" | "txt" | "subject") || stem.starts_with('.') {
                    continue;
                }
                let source = std::fs::read_to_string(entry.path()).map_err(dir_error)?;
                templates
                    .add_template_owned(file_name.clone(), source)
                    .map_err(|source| SetupError::Template {
                        name: file_name.clone(),
                        source,
                    })?;
                if ext != "subject" {
                    names.insert(stem.to_string());
                }
            }
        }
        Ok(Renderer {
            templates,
            names,
            default_from,
        })
    }

    /// Names of the loaded templates.
    pub fn template_names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    fn render(
        &self,
        file: &str,
        data: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Option<String>, Failure> {
        let Ok(template) = self.templates.get_template(file) else {
            return Ok(None);
        };
        template
            .render(data)
            .map(Some)
            .map_err(|e| invalid("template_error", format!("template {file}: {}", e.kind())))
    }

    /// Builds the message for `job` (already validated), with a Message-ID derived from
    /// `job_id` so a resent job carries the same id and receivers can spot the duplicate.
    pub fn build(&self, job: &EmailJob, job_id: &str) -> Result<Outgoing, Failure> {
        let (subject, text, html) = match &job.template {
            Some(template) => {
                if !self.names.contains(&template.name) {
                    return Err(invalid(
                        "unknown_template",
                        format!("no template named {:?}", template.name),
                    ));
                }
                let subject = match &job.subject {
                    Some(s) => s.clone(),
                    None => self
                        .render(&format!("{}.subject", template.name), &template.data)?
                        .map(|s| s.trim().to_string())
                        .ok_or_else(|| {
                            invalid("no_subject", "no subject and no subject template")
                        })?,
                };
                if subject.contains(['\r', '\n']) {
                    return Err(invalid(
                        "header_injection",
                        "rendered subject has a line break",
                    ));
                }
                let text = self.render(&format!("{}.txt", template.name), &template.data)?;
                let html = self.render(&format!("{}.html", template.name), &template.data)?;
                (subject, text, html)
            }
            None => (
                job.subject.clone().unwrap_or_default(),
                job.text.clone(),
                job.html.clone(),
            ),
        };

        let from = match &job.from {
            Some(from) => mailbox(from, "from")?,
            None => self
                .default_from
                .clone()
                .ok_or_else(|| invalid("no_from", "no from in the job and no default From"))?,
        };
        let mut builder = Message::builder()
            .from(from.clone())
            .raw_header(header_value(
                HeaderName::new_from_ascii_str("Subject"),
                subject,
            ))
            .message_id(Some(message_id(job_id, &from)));
        for to in &job.to {
            builder = builder.to(mailbox(to, "to")?);
        }
        for cc in &job.cc {
            builder = builder.cc(mailbox(cc, "cc")?);
        }
        for bcc in &job.bcc {
            builder = builder.bcc(mailbox(bcc, "bcc")?);
        }
        if let Some(reply_to) = &job.reply_to {
            builder = builder.reply_to(mailbox(reply_to, "reply_to")?);
        }
        for (name, value) in &job.headers {
            let name = HeaderName::new_from_ascii(name.clone())
                .map_err(|_| invalid("forbidden_header", format!("bad header name {name:?}")))?;
            builder = builder.raw_header(header_value(name, value.clone()));
        }

        let body = match (text, html) {
            (Some(text), Some(html)) => Body::Multi(MultiPart::alternative_plain_html(text, html)),
            (Some(text), None) => Body::Single(SinglePart::plain(text)),
            (None, Some(html)) => Body::Single(SinglePart::html(html)),
            (None, None) => {
                return Err(invalid(
                    "no_body",
                    "the template renders no text and no html",
                ))
            }
        };
        let message = if job.attachments.is_empty() {
            match body {
                Body::Single(part) => builder.singlepart(part),
                Body::Multi(part) => builder.multipart(part),
            }
        } else {
            let mut mixed = match body {
                Body::Single(part) => MultiPart::mixed().singlepart(part),
                Body::Multi(part) => MultiPart::mixed().multipart(part),
            };
            for attachment in &job.attachments {
                let content = base64::engine::general_purpose::STANDARD
                    .decode(attachment.content_base64.as_bytes())
                    .map_err(|_| {
                        invalid(
                            "bad_field",
                            format!("attachment {:?} is not base64", attachment.filename),
                        )
                    })?;
                let content_type = ContentType::parse(&attachment.content_type).map_err(|_| {
                    invalid(
                        "bad_field",
                        format!("attachment content type {:?}", attachment.content_type),
                    )
                })?;
                mixed = mixed.singlepart(
                    Attachment::new(attachment.filename.clone()).body(content, content_type),
                );
            }
            builder.multipart(mixed)
        }
        .map_err(|e| invalid("bad_message", e.to_string()))?;
        Ok(Outgoing {
            envelope: message.envelope().clone(),
            bytes: message.formatted(),
        })
    }
}

/// A word longer than this cannot be folded by lettre (it folds only at spaces), and with
/// the header name it could pass RFC 5322's hard limit of 998 characters per line.
const LONGEST_FOLDABLE_WORD: usize = 900;
/// Raw bytes per RFC 2047 encoded-word: 45 bytes are 60 base64 characters, and with
/// `=?utf-8?b?` and `?=` the word stays within RFC 2047's 75 characters.
const ENCODED_WORD_BYTES: usize = 45;

/// A header value that fits RFC 5322's line limit. lettre folds at spaces and encodes
/// non-ASCII words; a single long word (a long URL, a token) it leaves on one line, which a
/// server refuses with `500 Line too long`. Such a value is written as RFC 2047 encoded-words
/// on folded lines instead: readers join adjacent encoded-words without the whitespace
/// between them (RFC 2047 section 6.2), so the value reads exactly as it was.
fn header_value(name: HeaderName, value: String) -> HeaderValue {
    if value.split(' ').all(|w| w.len() <= LONGEST_FOLDABLE_WORD) {
        return HeaderValue::new(name, value);
    }
    let engine = base64::engine::general_purpose::STANDARD;
    let mut words = Vec::new();
    let mut rest = value.as_str();
    while !rest.is_empty() {
        let mut end = rest.len().min(ENCODED_WORD_BYTES);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        words.push(format!(
            "=?utf-8?b?{}?=",
            engine.encode(&rest.as_bytes()[..end])
        ));
        rest = &rest[end..];
    }
    let encoded = words.join("\r\n ");
    HeaderValue::dangerous_new_pre_encoded(name, value, encoded)
}

enum Body {
    Single(SinglePart),
    Multi(MultiPart),
}

fn mailbox(text: &str, field: &str) -> Result<Mailbox, Failure> {
    text.parse().map_err(|_| {
        invalid(
            "bad_address",
            format!("{field} has an address that does not parse"),
        )
    })
}

/// Narrows the envelope to `recipients`, those of the job's own recipients a partial
/// delivery left to serve (a header naming anyone else adds no one).
pub fn restrict(message: &mut Outgoing, recipients: &[String]) -> Result<(), Failure> {
    let to: Vec<lettre::Address> = message
        .envelope
        .to()
        .iter()
        .filter(|a| recipients.iter().any(|r| r == &a.to_string()))
        .cloned()
        .collect();
    if to.is_empty() {
        return Err(invalid(
            "bad_field",
            "the recipients header names none of the job's recipients",
        ));
    }
    message.envelope = lettre::address::Envelope::new(message.envelope.from().cloned(), to)
        .map_err(|e| invalid("bad_message", e.to_string()))?;
    Ok(())
}

/// The deduplication key of a copy for some of the job's recipients.
pub fn recipients_key(job_id: &str, recipients: &[String]) -> String {
    let mut sorted: Vec<&str> = recipients.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    let digest = Sha256::digest(sorted.join("\n").as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{job_id}#rcpt-{hex}")
}

/// `<first 32 hex digits of sha256(job id)@domain of From>`.
fn message_id(job_id: &str, from: &Mailbox) -> String {
    let digest = Sha256::digest(job_id.as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("<{hex}@{}>", from.email.domain())
}

/// The job id: the producer's (read from the raw JSON even when the job is invalid, so a
/// dead-lettered job can be found by it), else `sha256:` and the hex SHA-256 of the body.
pub fn job_id(job: Option<&EmailJob>, body: &[u8]) -> String {
    if let Some(id) = job.and_then(|j| j.id.clone()) {
        return id;
    }
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: String,
    }
    if let Ok(IdOnly { id }) = serde_json::from_slice(body) {
        if mailpipe_contract::job::is_valid_id(&id) {
            return id;
        }
    }
    let digest = Sha256::digest(body);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailpipe_contract::Limits;

    fn job(json: &str) -> EmailJob {
        EmailJob::parse(json.as_bytes(), &Limits::default()).unwrap()
    }

    fn renderer_with(files: &[(&str, &str)]) -> (Renderer, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        for (name, body) in files {
            std::fs::write(dir.path().join(name), body).unwrap();
        }
        let renderer = Renderer::new(
            Some(dir.path()),
            Some("noreply@example.com"),
            Some("Example"),
        )
        .unwrap();
        (renderer, dir)
    }

    fn text_of(out: &Outgoing) -> String {
        String::from_utf8(out.bytes.clone()).unwrap()
    }

    #[test]
    fn text_and_html_make_multipart_alternative_with_default_from() {
        let (renderer, _dir) = renderer_with(&[]);
        let out = renderer
            .build(&job(r#"{"to":["Ann <ann@example.com>"],"subject":"Hi","text":"plain","html":"<p>rich</p>"}"#), "j1")
            .unwrap();
        let text = text_of(&out);
        assert!(text.contains("multipart/alternative"), "{text}");
        assert!(
            text.contains("From: Example <noreply@example.com>"),
            "{text}"
        );
        assert!(text.contains("<p>rich</p>"));
        assert_eq!(out.envelope.to().len(), 1);
    }

    #[test]
    fn bcc_is_in_the_envelope_but_not_the_headers() {
        let (renderer, _dir) = renderer_with(&[]);
        let out = renderer
            .build(&job(r#"{"to":["a@example.com"],"bcc":["hidden@example.com"],"subject":"s","text":"t"}"#), "j")
            .unwrap();
        assert_eq!(out.envelope.to().len(), 2);
        assert!(!text_of(&out).contains("hidden@example.com"));
    }

    #[test]
    fn the_same_job_id_gives_the_same_message_id() {
        let (renderer, _dir) = renderer_with(&[]);
        let j = job(r#"{"to":["a@example.com"],"subject":"s","text":"t"}"#);
        let a = text_of(&renderer.build(&j, "same").unwrap());
        let b = text_of(&renderer.build(&j, "same").unwrap());
        let id = |t: &str| {
            t.lines()
                .find(|l| l.starts_with("Message-ID"))
                .unwrap()
                .to_string()
        };
        assert_eq!(id(&a), id(&b));
    }

    #[test]
    fn templates_render_subject_text_and_escaped_html() {
        let (renderer, _dir) = renderer_with(&[
            ("welcome.subject", "Welcome, {{ name }}!\n"),
            ("welcome.txt", "Hello {{ name }}"),
            ("welcome.html", "<p>Hello {{ name }}</p>"),
        ]);
        let out = renderer
            .build(&job(r#"{"to":["a@example.com"],"template":{"name":"welcome","data":{"name":"<Bob>"}}}"#), "j")
            .unwrap();
        let text = text_of(&out);
        assert!(text.contains("Subject: Welcome, <Bob>!"), "{text}");
        assert!(text.contains("Hello <Bob>"), "{text}");
        assert!(text.contains("&lt;Bob&gt;"), "{text}");
    }

    #[test]
    fn unknown_templates_and_missing_values_are_invalid_jobs() {
        let (renderer, _dir) = renderer_with(&[("welcome.txt", "Hello {{ name }}")]);
        let unknown = renderer
            .build(
                &job(r#"{"to":["a@example.com"],"subject":"s","template":{"name":"nope"}}"#),
                "j",
            )
            .unwrap_err();
        assert_eq!(unknown.reason(), "unknown_template");
        let missing = renderer
            .build(
                &job(r#"{"to":["a@example.com"],"subject":"s","template":{"name":"welcome"}}"#),
                "j",
            )
            .unwrap_err();
        assert_eq!(missing.reason(), "template_error");
    }

    #[test]
    fn unparseable_addresses_are_invalid_jobs() {
        let (renderer, _dir) = renderer_with(&[]);
        let err = renderer
            .build(
                &job(r#"{"to":["not an address"],"subject":"s","text":"t"}"#),
                "j",
            )
            .unwrap_err();
        assert_eq!(err.reason(), "bad_address");
    }

    #[test]
    fn attachments_make_multipart_mixed() {
        let (renderer, _dir) = renderer_with(&[]);
        let out = renderer
            .build(
                &job(r#"{"to":["a@example.com"],"subject":"s","text":"t","attachments":[{"filename":"a.txt","content_type":"text/plain","content_base64":"aGVsbG8="}]}"#),
                "j",
            )
            .unwrap();
        let text = text_of(&out);
        assert!(text.contains("multipart/mixed"), "{text}");
        assert!(text.contains("a.txt"), "{text}");
    }

    #[test]
    fn derived_job_ids_hash_the_body() {
        assert_eq!(
            job_id(None, b"x"),
            format!(
                "sha256:{}",
                "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
            )
        );
        let j = job(r#"{"id":"given","to":["a@example.com"],"subject":"s","text":"t"}"#);
        assert_eq!(job_id(Some(&j), b"ignored"), "given");
        let invalid = br#"{"id":"kept","subject":"no recipient"}"#;
        assert_eq!(job_id(None, invalid), "kept");
        let bad_id = b"{\"id\":\"a\\nb\"}";
        assert!(job_id(None, bad_id).starts_with("sha256:"));
    }

    #[test]
    fn long_words_in_headers_are_encoded_on_lines_within_the_limit() {
        let (renderer, _dir) = renderer_with(&[]);
        let url = format!("https://example.com/{}", "a".repeat(1200));
        let subject = format!("Your link: {url} é");
        let job = job(&serde_json::json!({
            "to": ["a@example.com"], "subject": subject, "text": "t",
            "headers": {"X-Long": "x".repeat(1500)},
        })
        .to_string());
        let text = text_of(&renderer.build(&job, "j").unwrap());
        let longest = text.split("\r\n").map(str::len).max().unwrap();
        assert!(longest <= 998, "a line of {longest} characters");
        // Unfold, then decode the encoded-words: the values read as they were.
        let decoded = |name: &str| -> String {
            let start = text.find(&format!("\r\n{name}: ")).unwrap() + name.len() + 4;
            let mut value = String::new();
            for (i, line) in text[start..].split("\r\n").enumerate() {
                if i > 0 && !line.starts_with(' ') {
                    break;
                }
                value.push_str(line.trim());
            }
            value
                .split("?=")
                .filter(|w| !w.is_empty())
                .map(|w| w.trim_start_matches("=?utf-8?b?"))
                .map(|b| base64::engine::general_purpose::STANDARD.decode(b).unwrap())
                .map(|bytes| String::from_utf8(bytes).unwrap())
                .collect::<Vec<_>>()
                .concat()
        };
        assert_eq!(decoded("Subject"), subject);
        assert_eq!(decoded("X-Long"), "x".repeat(1500));
    }

    #[test]
    fn short_headers_are_left_to_lettre() {
        let (renderer, _dir) = renderer_with(&[]);
        let text = text_of(
            &renderer
                .build(
                    &job(r#"{"to":["a@example.com"],"subject":"Hello there","text":"t"}"#),
                    "j",
                )
                .unwrap(),
        );
        assert!(text.contains("Subject: Hello there\r\n"), "{text}");
    }

    #[test]
    fn a_broken_template_stops_start_up() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bad.html"), "{% if %}").unwrap();
        let err = Renderer::new(Some(dir.path()), Some("a@example.com"), None)
            .err()
            .unwrap();
        assert!(err.to_string().contains("bad.html"), "{err}");
    }
}
