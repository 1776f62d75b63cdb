//! The generated CRD follows the apiextensions.k8s.io/v1 rules a real API server enforces
//! before it accepts a CRD: a structural schema (every node typed, no `$ref`, `anyOf` only
//! for int-or-string, no unknown fields kept unless meant), defaults that fit their schema,
//! and CEL rules that compile and stay cheap (no iteration over unbounded lists).

use serde_json::Value;

fn schema() -> Value {
    let crd = serde_json::to_value(mailpipe_operator::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// Every schema node below `node`, with its path.
fn nodes(node: &Value, path: String, out: &mut Vec<(String, Value)>) {
    out.push((path.clone(), node.clone()));
    for (name, child) in node["properties"].as_object().into_iter().flatten() {
        nodes(child, format!("{path}.{name}"), out);
    }
    if node["items"].is_object() {
        nodes(&node["items"], format!("{path}[]"), out);
    }
    if node["additionalProperties"].is_object() {
        nodes(&node["additionalProperties"], format!("{path}{{}}"), out);
    }
}

fn all_nodes() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    nodes(&schema(), String::new(), &mut out);
    out
}

#[test]
fn every_node_has_a_type_and_nothing_refers_elsewhere() {
    let text = serde_json::to_string(&schema()).unwrap();
    assert!(!text.contains("\"$ref\""), "no $ref in a structural schema");
    assert!(!text.contains("\"definitions\"") && !text.contains("\"$defs\""));
    for (path, node) in all_nodes() {
        let int_or_string = node["x-kubernetes-int-or-string"] == true;
        assert!(
            node["type"].is_string() || int_or_string,
            "{path} has no type: {node}"
        );
        assert!(
            !(node["properties"].is_object() && node["additionalProperties"].is_object()),
            "{path} has both properties and additionalProperties"
        );
        assert!(
            !node["items"].is_array(),
            "{path}: items must be one schema"
        );
    }
}

#[test]
fn any_of_appears_only_in_the_int_or_string_shape() {
    for (path, node) in all_nodes() {
        for junctor in ["oneOf", "allOf", "not"] {
            assert!(node.get(junctor).is_none(), "{path} uses {junctor}");
        }
        if let Some(any_of) = node.get("anyOf") {
            assert_eq!(
                node["x-kubernetes-int-or-string"], true,
                "{path}: anyOf {any_of}"
            );
            let types: Vec<&str> = any_of
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["type"].as_str().unwrap())
                .collect();
            assert_eq!(types, ["integer", "string"], "{path}");
        }
    }
}

#[test]
fn no_field_keeps_unknown_content() {
    for (path, node) in all_nodes() {
        assert!(
            node.get("x-kubernetes-preserve-unknown-fields").is_none(),
            "{path} keeps unknown fields"
        );
    }
}

#[test]
fn defaults_fit_their_schema() {
    fn fits(value: &Value, schema: &Value) -> bool {
        if let Some(allowed) = schema["enum"].as_array() {
            if !allowed.contains(value) {
                return false;
            }
        }
        match (schema["type"].as_str(), value) {
            (Some("object"), Value::Object(map)) => map
                .iter()
                .all(|(k, v)| schema["properties"].get(k).is_some_and(|s| fits(v, s))),
            (Some("string"), Value::String(_)) | (Some("boolean"), Value::Bool(_)) => true,
            (Some("integer"), Value::Number(n)) => n.is_i64() || n.is_u64(),
            (Some("number"), Value::Number(_)) => true,
            (Some("array"), Value::Array(items)) => items.iter().all(|i| fits(i, &schema["items"])),
            _ => false,
        }
    }
    let mut checked = 0;
    for (path, node) in all_nodes() {
        if let Some(default) = node.get("default") {
            assert!(
                fits(default, &node),
                "{path}: default {default} does not fit"
            );
            checked += 1;
        }
    }
    assert!(checked > 20, "defaults were generated ({checked})");
}

#[test]
fn cel_rules_compile_and_never_iterate() {
    let mut rules = Vec::new();
    for (path, node) in all_nodes() {
        for rule in node["x-kubernetes-validations"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let text = rule["rule"].as_str().unwrap().to_string();
            assert!(
                rule["message"].is_string(),
                "{path}: a rule without a message"
            );
            rules.push((path.clone(), text));
        }
    }
    let texts: Vec<&str> = rules.iter().map(|(_, r)| r.as_str()).collect();
    assert_eq!(
        texts,
        [
            "!self.metadata.name.contains('.') && size(self.metadata.name) <= 56",
            "self.deadLetter == oldSelf.deadLetter",
            "self.minReplicas <= self.maxReplicas",
            "has(self.rabbitmq) != has(self.kafka)",
            "has(self.rabbitmq) == has(oldSelf.rabbitmq)",
            "self.topic == oldSelf.topic",
            "self.queue == oldSelf.queue",
            "self.queueType == oldSelf.queueType",
            "self.exchangeType == oldSelf.exchangeType",
            "has(self.maxPriority) == has(oldSelf.maxPriority) && (!has(self.maxPriority) || self.maxPriority == oldSelf.maxPriority)",
            "!has(self.maxPriority) || self.queueType == 'classic'",
        ],
        "the rules, in schema order"
    );
    for (path, rule) in &rules {
        cel::Program::compile(rule).unwrap_or_else(|e| panic!("{path}: {rule}: {e}"));
        for iterating in [".all(", ".exists(", ".map(", ".filter(", ".exists_one("] {
            assert!(!rule.contains(iterating), "{path}: {rule} iterates");
        }
    }
}

#[test]
fn the_crd_matches_what_the_recorded_real_server_accepted_in_shape() {
    let crd = serde_json::to_value(mailpipe_operator::crd()).unwrap();
    assert_eq!(crd["apiVersion"], "apiextensions.k8s.io/v1");
    assert_eq!(crd["metadata"]["name"], "emailpipelines.mailpipe.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(
        crd["spec"]["names"]["shortNames"],
        serde_json::json!(["emp", "mailpipeline"])
    );
    assert_eq!(
        crd["spec"]["names"]["categories"],
        serde_json::json!(["mailpipe"])
    );
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(
        (version["served"].as_bool(), version["storage"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(version["subresources"]["status"], serde_json::json!({}));
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Source", "Backlog", "Replicas", "Ready", "Age"]);
    assert_eq!(schema()["required"], serde_json::json!(["spec"]));
}

/// The real API server answered the first CRD with `unrecognized format "uint16"` and three
/// more warnings (recording 148): only formats it knows, and each integer's bounds kept.
#[test]
fn every_format_is_one_the_api_server_knows_and_integers_keep_their_bounds() {
    const KNOWN: &[&str] = &["int32", "int64", "double", "float", "date-time", "byte"];
    for (path, node) in all_nodes() {
        if let Some(format) = node["format"].as_str() {
            assert!(KNOWN.contains(&format), "{path}: format {format}");
        }
        if node["type"] == "integer" && node["format"] == "int32" && path.starts_with(".spec") {
            let has = |k: &str| node[k].is_number();
            assert!(
                has("minimum") && has("maximum"),
                "{path}: a narrowed integer keeps its bounds"
            );
        }
    }
}
