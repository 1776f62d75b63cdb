//! The Helm chart (`charts/mailpipe`) through Helm's own engine: helm-python-sdk, in the
//! virtual environment `scripts/test-servers.sh` makes (`~/.cache/mailpipe/helm-venv`, or
//! the Python named by `MAILPIPE_HELM_PYTHON`), driven by `tests/chart/helm.py`.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use crate::repo_root;

fn python() -> PathBuf {
    std::env::var_os("MAILPIPE_HELM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/mailpipe/helm-venv/bin/python")
        })
}

/// The chart's folder.
pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/mailpipe")
}

/// Sends `request` to the helper; `Ok(answer)` or `Err(Helm's message)`.
fn ask(request: Value) -> Result<Value, String> {
    let mut child = Command::new(python())
        .arg(repo_root().join("tests/chart/helm.py"))
        .arg(chart_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("helm-python-sdk's Python (scripts/test-servers.sh installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(request.to_string().as_bytes())
        .expect("the request is written");
    let output = child.wait_with_output().expect("the helper ends");
    assert!(
        output.status.success(),
        "tests/chart/helm.py: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut answer: Value = serde_json::from_slice(&output.stdout).expect("a JSON answer");
    match answer.get("error") {
        Some(error) => Err(error.as_str().unwrap_or_default().to_string()),
        None => Ok(answer["ok"].take()),
    }
}

/// `helm lint --strict` of the chart with `values`: the report.
pub fn lint(values: Value) -> Value {
    ask(json!({"lint": values, "namespace": "mailpipe-system"})).expect("lint reports")
}

/// Whether `values.schema.json` takes `values` (`Err`: Helm's message).
pub fn validate(values: Value) -> Result<(), String> {
    ask(json!({ "validate": values })).map(|_| ())
}

/// `helm template` of release `name` in `namespace`: every object rendered, in template
/// order (NOTES.txt left out), or Helm's message.
pub fn render(values: Value, name: &str, namespace: &str) -> Result<Vec<Value>, String> {
    let rendered = ask(json!({"render": values, "name": name, "namespace": namespace}))?;
    let mut objects = Vec::new();
    let templates = rendered.as_object().expect("template -> text");
    for (template, text) in templates {
        if template.ends_with("NOTES.txt") {
            continue;
        }
        let text = text.as_str().expect("rendered text");
        for document in serde_yaml_ng::Deserializer::from_str(text) {
            let object: Value = serde::Deserialize::deserialize(document)
                .unwrap_or_else(|e| panic!("{template} renders YAML: {e}\n{text}"));
            if !object.is_null() {
                objects.push(object);
            }
        }
    }
    Ok(objects)
}

/// The rendered NOTES.txt.
pub fn notes(values: Value, name: &str, namespace: &str) -> String {
    let rendered = ask(json!({"render": values, "name": name, "namespace": namespace}))
        .expect("the chart renders");
    rendered
        .as_object()
        .expect("template -> text")
        .iter()
        .find(|(template, _)| template.ends_with("NOTES.txt"))
        .and_then(|(_, text)| text.as_str())
        .expect("NOTES.txt")
        .to_string()
}

/// The one object of `kind` named `name` (in `namespace`, when given).
pub fn find<'a>(
    objects: &'a [Value],
    kind: &str,
    name: &str,
    namespace: Option<&str>,
) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .filter(|o| namespace.is_none_or(|ns| o["metadata"]["namespace"] == ns))
        .collect();
    assert_eq!(found.len(), 1, "one {kind} {name} in {namespace:?}");
    found[0]
}
