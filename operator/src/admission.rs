//! admission (no client required): what the API server checks of a custom resource before
//! a controller sees it: the CRD's structural schema (types, enums, bounds, lengths,
//! patterns, required fields, item counts; unknown fields pruned and named) and its
//! `x-kubernetes-validations` CEL rules, evaluated only when the schema checks pass, with
//! the real server's reasons and messages. In a cluster the API server does this; local
//! mode (`mailpipe local`, `mailpipe validate`), where none runs, calls [`admit`] with the
//! EmailPipeline CRD this crate generates, so a file a cluster would refuse is refused
//! there too. The project's Kubernetes API test server uses the same checks.

use cel::{Context, Program};
use serde_json::{Map, Value};

/// One violation: (field path, reason, message).
pub type Violation = (String, &'static str, String);

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn join(path: &str, child: &str) -> String {
    if path.is_empty() {
        child.to_string()
    } else {
        format!("{path}.{child}")
    }
}

/// Removes fields the schema does not know (outside `x-kubernetes-preserve-unknown-fields`
/// and `additionalProperties`), returning their paths.
pub fn prune(value: &mut Value, schema: &Value, path: &str, root: bool) -> Vec<String> {
    let mut unknown = Vec::new();
    if schema["x-kubernetes-preserve-unknown-fields"] == true {
        return unknown;
    }
    match value {
        Value::Object(map) => {
            let properties = schema["properties"].as_object();
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                if root && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let child_path = join(path, &key);
                match (properties.and_then(|p| p.get(&key)), additional) {
                    (Some(child_schema), _) | (None, Some(child_schema)) => {
                        if let Some(child) = map.get_mut(&key) {
                            unknown.extend(prune(child, child_schema, &child_path, false));
                        }
                    }
                    (None, None) if properties.is_some() || schema["type"] == "object" => {
                        map.remove(&key);
                        unknown.push(child_path);
                    }
                    (None, None) => {}
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                unknown.extend(prune(
                    item,
                    &schema["items"],
                    &format!("{path}[{i}]"),
                    false,
                ));
            }
        }
        _ => {}
    }
    unknown
}

/// Schema violations of `value` at `path`.
pub fn check(value: &Value, schema: &Value, path: &str, out: &mut Vec<Violation>) {
    // A null (nullable or not) passes: the real server keeps `"kafka": null` beside a
    // valid source and counts it as absent (recordings 166, 167).
    if value.is_null() {
        return;
    }
    let actual = type_name(value);
    if let Some(expected) = schema["type"].as_str() {
        let fits = actual == expected || (expected == "number" && actual == "integer");
        if !fits {
            out.push((
                path.to_string(),
                "FieldValueTypeInvalid",
                format!("Invalid value: \"{actual}\": {path} in body must be of type {expected}: \"{actual}\""),
            ));
            return;
        }
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
            out.push((
                path.to_string(),
                "FieldValueNotSupported",
                format!(
                    "Unsupported value: {value}: supported values: {}",
                    list.join(", ")
                ),
            ));
        }
    }
    let invalid = |message: String| (path.to_string(), "FieldValueInvalid", message);
    match value {
        Value::Number(n) => {
            let v = n.as_f64().unwrap_or(0.0);
            if let Some(max) = schema["maximum"].as_f64() {
                if v > max {
                    out.push(invalid(format!(
                        "Invalid value: {n}: {path} in body should be less than or equal to {}",
                        schema["maximum"]
                    )));
                }
            }
            if let Some(min) = schema["minimum"].as_f64() {
                if v < min {
                    out.push(invalid(format!(
                        "Invalid value: {n}: {path} in body should be greater than or equal to {}",
                        schema["minimum"]
                    )));
                }
            }
        }
        Value::String(s) => {
            let chars = s.chars().count() as u64;
            if let Some(min) = schema["minLength"].as_u64().filter(|m| chars < *m) {
                out.push(invalid(format!(
                    "Invalid value: \"{s}\": {path} in body should be at least {min} chars long"
                )));
            }
            if let Some(max) = schema["maxLength"].as_u64().filter(|m| chars > *m) {
                out.push(invalid(format!(
                    "Invalid value: \"{s}\": {path} in body should be at most {max} chars long"
                )));
            }
            if let Some(pattern) = schema["pattern"].as_str() {
                let matches = regex::Regex::new(pattern)
                    .map(|r| r.is_match(s))
                    .unwrap_or(true);
                if !matches {
                    out.push(invalid(format!(
                        "Invalid value: \"{s}\": {path} in body should match '{pattern}'"
                    )));
                }
            }
        }
        Value::Array(items) => {
            if let Some(max) = schema["maxItems"]
                .as_u64()
                .filter(|m| items.len() as u64 > *m)
            {
                out.push((
                    path.to_string(),
                    "FieldValueTooMany",
                    format!("Too many: {}: must have at most {max} items", items.len()),
                ));
            }
            if let Some(min) = schema["minItems"]
                .as_u64()
                .filter(|m| (items.len() as u64) < *m)
            {
                out.push(invalid(format!(
                    "Invalid value: {}: {path} in body should have at least {min} items",
                    items.len()
                )));
            }
            for (i, item) in items.iter().enumerate() {
                check(item, &schema["items"], &format!("{path}[{i}]"), out);
            }
        }
        Value::Object(map) => {
            for required in schema["required"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if map.get(required).is_none_or(Value::is_null) {
                    out.push((
                        join(path, required),
                        "FieldValueRequired",
                        "Required value".into(),
                    ));
                }
            }
            let properties = schema["properties"].as_object();
            for (key, child) in map {
                if path.is_empty() && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let child_schema = properties
                    .and_then(|p| p.get(key))
                    .or_else(|| schema.get("additionalProperties").filter(|a| a.is_object()));
                if let Some(child_schema) = child_schema {
                    check(child, child_schema, &join(path, key), out);
                }
            }
        }
        _ => {}
    }
}

/// Whether a schema (or any schema below it) carries CEL rules.
pub fn has_rules(schema: &Value) -> bool {
    match schema {
        Value::Object(map) => {
            map.get("x-kubernetes-validations").is_some() || map.values().any(has_rules)
        }
        Value::Array(items) => items.iter().any(has_rules),
        _ => false,
    }
}

/// Evaluates the `x-kubernetes-validations` rules on `value` (`old` for transition rules,
/// which are skipped on create).
pub fn check_rules(
    value: &Value,
    old: Option<&Value>,
    schema: &Value,
    path: &str,
    out: &mut Vec<Violation>,
) {
    let rules = schema["x-kubernetes-validations"].as_array();
    for rule in rules.into_iter().flatten() {
        let Some(expression) = rule["rule"].as_str() else {
            continue;
        };
        let transition = expression.contains("oldSelf");
        if transition && old.is_none() {
            continue;
        }
        let message = rule["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("failed rule: {expression}"));
        let field = match rule["fieldPath"].as_str() {
            Some(extra) => format!("{path}{extra}"),
            None => path.to_string(),
        };
        match evaluate(expression, value, old) {
            Ok(true) => {}
            Ok(false) => out.push((
                field,
                "FieldValueInvalid",
                format!("Invalid value: {message}"),
            )),
            Err(error) => out.push((
                field,
                "FieldValueInvalid",
                format!("Invalid value: rule {expression:?} could not be evaluated: {error}"),
            )),
        }
    }
    let properties = schema["properties"].as_object();
    if let (Value::Object(map), Some(properties)) = (value, properties) {
        for (key, child_schema) in properties {
            if let Some(child) = map.get(key).filter(|c| !c.is_null()) {
                let old_child = old.and_then(|o| o.get(key));
                check_rules(child, old_child, child_schema, &join(path, key), out);
            }
        }
    }
    if let (Value::Array(items), Some(item_schema)) = (value, schema.get("items")) {
        for (i, item) in items.iter().enumerate() {
            check_rules(item, None, item_schema, &format!("{path}[{i}]"), out);
        }
    }
}

fn evaluate(expression: &str, value: &Value, old: Option<&Value>) -> Result<bool, String> {
    let program = Program::compile(expression).map_err(|e| e.to_string())?;
    let mut context = Context::default();
    context
        .add_variable("self", without_nulls(value))
        .map_err(|e| e.to_string())?;
    if let Some(old) = old {
        context
            .add_variable("oldSelf", without_nulls(old))
            .map_err(|e| e.to_string())?;
    }
    match program.execute(&context).map_err(|e| e.to_string())? {
        cel::Value::Bool(result) => Ok(result),
        other => Err(format!("the rule gave {other:?}, not a boolean")),
    }
}

/// `value` as CEL sees it: a field set to null is absent (`has()` is false).
fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// Every violation of a custom resource: the schema's, then the CEL rules' unless a schema
/// violation blocks them (a wrong type, a missing required field, a value not in the enum,
/// too long, too many), in which case one `<nil>` cause says they were not checked, as the
/// real server's `hasBlockingErr` does (recordings 158-161). Violations that do not block
/// (a maximum, a pattern) leave the rules running.
pub fn validate(object: &Value, old: Option<&Value>, schema: &Value) -> Vec<Violation> {
    let mut out = Vec::new();
    check(object, schema, "", &mut out);
    if !has_rules(schema) {
        return out;
    }
    let blocking = out.iter().any(|(_, reason, _)| {
        matches!(
            *reason,
            "FieldValueNotSupported"
                | "FieldValueRequired"
                | "FieldValueTooLong"
                | "FieldValueTooMany"
                | "FieldValueTypeInvalid"
        )
    });
    if blocking {
        out.push((
            "<nil>".into(),
            "FieldValueInvalid",
            "Invalid value: null: some validation rules were not checked because the object was invalid; correct the existing errors to complete validation".into(),
        ));
    } else {
        check_rules(object, old, schema, "", &mut out);
    }
    out
}

/// A map without the top-level fields validation leaves alone.
pub fn strip_envelope(object: &Value) -> Value {
    let mut copy: Map<String, Value> = object.as_object().cloned().unwrap_or_default();
    // Rules at the root may read `metadata.name` and `metadata.generateName`, nothing else.
    let metadata = &object["metadata"];
    let mut visible = Map::new();
    for field in ["name", "generateName"] {
        if let Some(value) = metadata.get(field) {
            visible.insert(field.to_string(), value.clone());
        }
    }
    copy.insert("metadata".into(), Value::Object(visible));
    Value::Object(copy)
}

/// Fills in `default` values of a structural schema, as the API server does for custom
/// resources: a property absent from an object that is present gets its default, and
/// defaults are applied inside defaults too.
pub fn apply_defaults(value: &mut Value, schema: &Value) {
    match value {
        Value::Object(map) => {
            if let Some(properties) = schema["properties"].as_object() {
                for (name, property) in properties {
                    // A null where the schema is not nullable is dropped before defaulting
                    // when the field has a default; without one it is kept (recording 167).
                    let null_with_default = map.get(name).is_some_and(Value::is_null)
                        && property["nullable"] != true
                        && property.get("default").is_some();
                    if !map.contains_key(name) || null_with_default {
                        if let Some(default) = property.get("default") {
                            map.insert(name.clone(), default.clone());
                        }
                    }
                    if let Some(child) = map.get_mut(name) {
                        apply_defaults(child, property);
                    }
                }
            }
            if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                let known = schema["properties"].as_object();
                for (name, child) in map.iter_mut() {
                    if known.is_none_or(|k| !k.contains_key(name)) {
                        apply_defaults(child, additional);
                    }
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                apply_defaults(item, &schema["items"]);
            }
        }
        _ => {}
    }
}

/// Every reason the API server would refuse `object` as an EmailPipeline of this
/// operator's CRD: fields the schema does not have (a strict `kubectl apply`, the default,
/// refuses them), then the schema's and the CEL rules' violations once the schema's
/// defaults are filled in, in the API server's order.
pub fn admit(object: &Value) -> Vec<Violation> {
    let crd = serde_json::to_value(crate::crd()).expect("a CRD serialises");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut admitted = object.clone();
    let mut out: Vec<Violation> = prune(&mut admitted, schema, "", true)
        .into_iter()
        .map(|field| (field, "FieldValueInvalid", "unknown field".to_string()))
        .collect();
    apply_defaults(&mut admitted, schema);
    out.extend(validate(&strip_envelope(&admitted), None, schema));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "properties": {"spec": {"type": "object", "required": ["source"], "properties": {
            "replicas": {"type": "integer", "minimum": 0, "maximum": 50},
            "format": {"type": "string", "enum": ["mime", "json"]},
            "mailbox": {"type": "string", "pattern": "^[a-z]+@[a-z.]+$"},
            "source": {"type": "object",
                "x-kubernetes-validations": [{"rule": "has(self.rabbitmq) != has(self.kafka)", "message": "exactly one source"}],
                "properties": {"rabbitmq": {"type": "object"}, "kafka": {"type": "object"}}},
            "scaling": {"type": "object",
                "x-kubernetes-validations": [{"rule": "self.min <= self.max", "message": "min <= max"}],
                "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}}}
        }}}})
    }

    #[test]
    fn schema_violations_read_like_the_real_servers() {
        let object = json!({"spec": {"replicas": 100, "format": "xml", "mailbox": "Not Mail"}});
        let found = validate(&object, None, &schema());
        let messages: Vec<&str> = found.iter().map(|(_, _, m)| m.as_str()).collect();
        assert!(
            messages.contains(
                &"Invalid value: 100: spec.replicas in body should be less than or equal to 50"
            ),
            "{messages:?}"
        );
        assert!(
            messages.contains(&"Unsupported value: \"xml\": supported values: \"mime\", \"json\""),
            "{messages:?}"
        );
        assert!(found
            .iter()
            .any(|(f, r, _)| f == "spec.source" && *r == "FieldValueRequired"));
        assert!(
            found.iter().any(|(f, _, _)| f == "<nil>"),
            "a missing required field and a bad enum value block the rules"
        );
    }

    #[test]
    fn a_blocking_violation_skips_every_rule_and_says_so() {
        let object = json!({"spec": {"source": {"rabbitmq": 5}, "scaling": {"min": 5, "max": 1}}});
        let found = validate(&object, None, &schema());
        let fields: Vec<&str> = found.iter().map(|(f, _, _)| f.as_str()).collect();
        assert_eq!(fields, vec!["spec.source.rabbitmq", "<nil>"]);
    }

    #[test]
    fn a_violation_that_does_not_block_leaves_the_rules_running() {
        let object = json!({"spec": {"replicas": 100, "source": {"kafka": {}}, "scaling": {"min": 5, "max": 1}}});
        let found = validate(&object, None, &schema());
        let fields: Vec<&str> = found.iter().map(|(f, _, _)| f.as_str()).collect();
        assert_eq!(fields, vec!["spec.replicas", "spec.scaling"]);
    }

    #[test]
    fn a_null_field_passes_the_schema_and_is_absent_for_the_rules() {
        let object = json!({"spec": {"source": {"rabbitmq": {}, "kafka": null}}});
        assert!(validate(&object, None, &schema()).is_empty());
        let missing = json!({"spec": {"source": null}});
        assert_eq!(
            validate(&missing, None, &schema())[0].1,
            "FieldValueRequired"
        );
    }

    #[test]
    fn cel_rules_run_once_the_schema_passes() {
        let both = json!({"spec": {"source": {"rabbitmq": {}, "kafka": {}}}});
        let found = validate(&both, None, &schema());
        assert_eq!(
            found,
            vec![(
                "spec.source".to_string(),
                "FieldValueInvalid",
                "Invalid value: exactly one source".to_string()
            )]
        );
        let inverted = json!({"spec": {"source": {"kafka": {}}, "scaling": {"min": 5, "max": 2}}});
        assert_eq!(validate(&inverted, None, &schema())[0].0, "spec.scaling");
        let fine = json!({"spec": {"source": {"kafka": {}}, "scaling": {"min": 1, "max": 2}}});
        assert!(validate(&fine, None, &schema()).is_empty());
    }

    #[test]
    fn the_crds_own_bounds_and_rules_are_checked() {
        let pipeline = |scaling: Value| {
            json!({"apiVersion": "mailpipe.dev/v1alpha1", "kind": "EmailPipeline",
                "metadata": {"name": "w"},
                "spec": {
                    "source": {"rabbitmq": {"connectionSecret": {"name": "amqp", "key": "url"}, "queue": "q"}},
                    "smtp": {"host": "smtp.example.com", "from": {"address": "noreply@example.com"}},
                    "scaling": scaling}})
        };
        assert!(admit(&pipeline(json!({"minReplicas": 0, "maxReplicas": 4}))).is_empty());
        let negative = admit(&pipeline(json!({"minReplicas": -1})));
        assert_eq!(negative[0].0, "spec.scaling.minReplicas", "{negative:?}");
        let inverted = admit(&pipeline(json!({"minReplicas": 5, "maxReplicas": 2})));
        assert_eq!(inverted[0].0, "spec.scaling", "{inverted:?}");
        assert!(
            inverted[0].2.contains("minReplicas must be <="),
            "{inverted:?}"
        );
        let unknown = admit(&pipeline(json!({"maxReplica": 2})));
        assert_eq!(
            unknown,
            vec![(
                "spec.scaling.maxReplica".to_string(),
                "FieldValueInvalid",
                "unknown field".to_string()
            )]
        );
    }

    #[test]
    fn unknown_fields_are_pruned_and_named() {
        let mut object = json!({"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "a"}, "spec": {"replicas": 1, "color": "blue"}});
        let unknown = prune(&mut object, &schema(), "", true);
        assert_eq!(unknown, vec!["spec.color".to_string()]);
        assert_eq!(object["spec"], json!({"replicas": 1}));
    }
}
