//! pipelines: `EmailPipeline` files (YAML, one or several documents each, as users apply
//! them in a cluster) into validated pipelines, with the operator's own checks. What a
//! cluster's API server would refuse (the CRD's schema: a field of the wrong type or out of
//! bounds, a value no enum has, a field the schema does not have, which `kubectl apply`
//! refuses by default; and its CEL rules) is refused by the operator's `admission`, with
//! the API server's words and the field's path; then the operator's `validate` checks what
//! the schema cannot say, with the messages the operator puts in a pipeline's status.

use std::path::{Path, PathBuf};

use mailpipe_operator::admission::admit;
use mailpipe_operator::crd::EmailPipelineSpec;
use mailpipe_operator::validate::{validate, ValidatedPipeline};
use serde::Deserialize;

/// The namespace of a pipeline that names none (as `kubectl apply` would use).
pub const DEFAULT_NAMESPACE: &str = "default";

const API_VERSION: &str = "mailpipe.dev/v1alpha1";

/// A pipeline read from a file, valid.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub valid: ValidatedPipeline,
    /// The spec as written (for the Secrets it names).
    pub spec: EmailPipelineSpec,
    /// Where it came from: `FILE` (document `N`).
    pub origin: String,
}

/// Why a file gives no pipelines: where, and what is wrong (with the field's path).
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct Refused {
    pub origin: String,
    pub message: String,
}

fn refused(origin: &str, message: impl Into<String>) -> Refused {
    Refused {
        origin: origin.to_string(),
        message: message.into(),
    }
}

/// Every pipeline of `files` (`-` reads standard input), or every reason some are refused.
pub fn load(files: &[PathBuf]) -> Result<Vec<Loaded>, Vec<Refused>> {
    let mut loaded = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        let text = if file == Path::new("-") {
            std::io::read_to_string(std::io::stdin())
        } else {
            std::fs::read_to_string(file)
        };
        match text {
            Ok(text) => match parse(&file.display().to_string(), &text) {
                Ok(found) => loaded.extend(found),
                Err(found) => errors.extend(found),
            },
            Err(error) => errors.push(refused(
                &file.display().to_string(),
                format!("cannot read it: {error}"),
            )),
        }
    }
    // Two pipelines of one name in one namespace would be one object in a cluster.
    for (i, a) in loaded.iter().enumerate() {
        if let Some(b) = loaded[..i].iter().find(|b| {
            (b.valid.namespace.as_str(), b.valid.name.as_str())
                == (a.valid.namespace.as_str(), a.valid.name.as_str())
        }) {
            errors.push(refused(
                &a.origin,
                format!(
                    "metadata.name: pipeline {}/{} is also defined at {}",
                    a.valid.namespace, a.valid.name, b.origin
                ),
            ));
        }
    }
    if files.is_empty() {
        errors.push(refused("(no files)", "name at least one pipeline file"));
    } else if loaded.is_empty() && errors.is_empty() {
        errors.push(refused(
            &files[0].display().to_string(),
            "holds no EmailPipeline",
        ));
    }
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(errors)
    }
}

/// The pipelines of one file's text; `name` says where it came from.
pub fn parse(name: &str, text: &str) -> Result<Vec<Loaded>, Vec<Refused>> {
    let mut loaded = Vec::new();
    let mut errors = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let origin = format!("{name} (document {})", index + 1);
        let value = match serde_json::Value::deserialize(document) {
            Ok(serde_json::Value::Null) => continue,
            Ok(value) => value,
            Err(error) => {
                errors.push(refused(&origin, format!("not YAML: {error}")));
                // The rest of the stream cannot be trusted after a syntax error.
                break;
            }
        };
        match document_pipeline(&origin, value) {
            Ok(pipeline) => loaded.push(pipeline),
            Err(error) => errors.push(error),
        }
    }
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(errors)
    }
}

fn document_pipeline(origin: &str, value: serde_json::Value) -> Result<Loaded, Refused> {
    let text = |field: &str| value.get(field).and_then(|v| v.as_str());
    match (text("apiVersion"), text("kind")) {
        (Some(API_VERSION), Some("EmailPipeline")) => {}
        (_, Some("Secret")) => {
            return Err(refused(
                origin,
                "a Secret: local mode takes no secret values from pipeline files; put each key in a file under --secrets-dir (DIR/<secret>/<key>) or in MAILPIPE_SECRET_<SECRET>_<KEY>",
            ))
        }
        (Some(version), Some("EmailPipeline")) => {
            return Err(refused(
                origin,
                format!("apiVersion: {version:?} is not served; use {API_VERSION}"),
            ))
        }
        (_, Some(kind)) => {
            return Err(refused(
                origin,
                format!("kind: {kind:?}: local mode runs EmailPipeline documents only"),
            ))
        }
        (_, None) => return Err(refused(origin, "kind: Required value")),
    }
    let metadata = value.get("metadata");
    let name = metadata
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .ok_or_else(|| refused(origin, "metadata.name: Required value"))?;
    if !dns_subdomain(name) {
        return Err(refused(
            origin,
            format!("metadata.name: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"),
        ));
    }
    let namespace = metadata
        .and_then(|m| m.get("namespace"))
        .and_then(|n| n.as_str())
        .unwrap_or(DEFAULT_NAMESPACE);
    let violations = admit(&value);
    if !violations.is_empty() {
        let all: Vec<String> = violations
            .iter()
            .map(|(field, _, message)| format!("{field}: {message}"))
            .collect();
        return Err(refused(origin, all.join("; ")));
    }
    let spec_value = value
        .get("spec")
        .cloned()
        .ok_or_else(|| refused(origin, "spec: Required value"))?;
    let spec = spec_of(spec_value).map_err(|message| refused(origin, message))?;
    let valid = validate(name, namespace, &spec).map_err(|e| refused(origin, e.to_string()))?;
    Ok(Loaded {
        valid,
        spec,
        origin: format!("{origin}, pipeline {namespace}/{name}"),
    })
}

/// The spec in the operator's types (after `admit`, a failure here is a rule the schema
/// does not carry), naming the field that does not fit.
fn spec_of(value: serde_json::Value) -> Result<EmailPipelineSpec, String> {
    serde_path_to_error::deserialize(&value).map_err(|error| {
        let path = error.path().to_string();
        let field = if path == "." || path.is_empty() {
            "spec".to_string()
        } else {
            format!("spec.{path}")
        };
        format!("{field}: {}", error.inner())
    })
}

/// Kubernetes' object-name rule (a DNS-1123 subdomain).
fn dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
apiVersion: mailpipe.dev/v1alpha1
kind: EmailPipeline
metadata:
  name: welcome
spec:
  source:
    rabbitmq:
      connectionSecret: {name: amqp, key: url}
      queue: welcome
  smtp:
    host: 127.0.0.1
    port: 1025
    tls: none
    from: {address: noreply@example.com}
";

    fn refusal(text: &str) -> String {
        let errors = parse("p.yaml", text).expect_err("refused");
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn several_documents_give_several_pipelines() {
        let two = format!(
            "{GOOD}---\n{}\n---\n",
            GOOD.replace("name: welcome", "name: receipts\n  namespace: shop")
        );
        let loaded = parse("p.yaml", &two).expect("valid");
        let names: Vec<(&str, &str)> = loaded
            .iter()
            .map(|l| (l.valid.namespace.as_str(), l.valid.name.as_str()))
            .collect();
        assert_eq!(names, [("default", "welcome"), ("shop", "receipts")]);
        assert!(
            loaded[1].origin.contains("document 2"),
            "{}",
            loaded[1].origin
        );
    }

    #[test]
    fn a_field_of_the_wrong_type_is_named() {
        let text = format!("{GOOD}  scaling:\n    maxReplicas: four\n");
        let message = refusal(&text);
        assert!(
            message.contains("spec.scaling.maxReplicas: Invalid value: \"string\": spec.scaling.maxReplicas in body must be of type integer"),
            "{message}"
        );
        assert!(message.contains("document 1"), "{message}");
    }

    #[test]
    fn an_unknown_field_is_named() {
        let text = format!("{GOOD}  scaling:\n    maxReplica: 4\n");
        let message = refusal(&text);
        assert!(
            message.contains("spec.scaling.maxReplica: unknown field"),
            "{message}"
        );
    }

    #[test]
    fn the_crds_bounds_and_rules_are_checked() {
        let negative = refusal(&format!("{GOOD}  scaling:\n    minReplicas: -1\n"));
        assert!(
            negative.contains("spec.scaling.minReplicas: Invalid value: -1"),
            "{negative}"
        );
        let inverted = refusal(&format!(
            "{GOOD}  scaling:\n    minReplicas: 5\n    maxReplicas: 2\n"
        ));
        assert!(
            inverted.contains("spec.scaling.minReplicas must be <= spec.scaling.maxReplicas"),
            "{inverted}"
        );
        let idle = refusal(&format!("{GOOD}  worker:\n    concurrency: 0\n"));
        assert!(idle.contains("spec.worker.concurrency"), "{idle}");
    }

    #[test]
    fn the_operators_validation_names_its_field() {
        let text = format!("{GOOD}  delivery:\n    backoff:\n      initial: soon\n");
        let message = refusal(&text);
        assert!(
            message.contains("spec.delivery.backoff.initial"),
            "{message}"
        );
    }

    #[test]
    fn secrets_and_other_kinds_are_refused() {
        let secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: amqp}\nstringData: {url: x}\n";
        assert!(refusal(secret).contains("--secrets-dir"));
        let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n";
        assert!(refusal(deployment).contains("EmailPipeline documents only"));
        let nameless = GOOD.replace("  name: welcome\n", "  labels: {}\n");
        assert!(refusal(&nameless).contains("metadata.name: Required value"));
        let dotted = GOOD.replace("name: welcome", "name: mail.v2");
        assert!(refusal(&dotted).contains("metadata.name"));
    }

    #[test]
    fn one_name_twice_is_refused() {
        let dir = tempfile::tempdir().expect("a directory");
        let a = dir.path().join("a.yaml");
        let b = dir.path().join("b.yaml");
        std::fs::write(&a, GOOD).expect("written");
        std::fs::write(&b, GOOD).expect("written");
        let errors = load(&[a, b]).expect_err("refused");
        assert!(
            errors[0].message.contains("is also defined at"),
            "{}",
            errors[0]
        );
    }
}
