//! What the real API server does to built-in kinds on every write, before storing them:
//! defaults (the `SetDefaults_*` functions of k8s.io/api), the conversions a kind needs
//! (Secret `stringData`), allocations (a Service's cluster IP), the validation rules mailpipe
//! meets (immutable Deployment selector, events.k8s.io Event fields), and the mapping
//! between the two Event APIs, which share one storage.

use serde_json::{json, Value};

use crate::registry::Kind;

/// Fills defaults of a built-in object; `creating` also sets what only creation sets.
pub fn default(kind: &Kind, object: &mut Value, creating: bool, next_ip: &mut u32) {
    match (kind.group.as_str(), kind.plural.as_str()) {
        ("apps", "deployments") => deployment(object, creating),
        ("", "services") => service(object, creating, next_ip),
        ("", "secrets") => secret(object),
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            insert_absent(
                entry(object, "spec"),
                "conversion",
                json!({"strategy": "None"}),
            );
            // names.listKind defaults to the kind + "List" (recording 148).
            if let Some(kind) = object["spec"]["names"]["kind"].as_str().map(str::to_string) {
                insert_absent(
                    entry(entry(object, "spec"), "names"),
                    "listKind",
                    json!(format!("{kind}List")),
                );
            }
        }
        ("policy", "poddisruptionbudgets") if creating => {
            object.as_object_mut().map(|o| {
                o.entry("status").or_insert_with(|| {
                    json!({"disruptionsAllowed": 0, "currentHealthy": 0, "desiredHealthy": 0, "expectedPods": 0})
                })
            });
        }
        ("events.k8s.io", "events") if creating => {
            for (field, value) in [
                ("deprecatedSource", json!({})),
                ("deprecatedFirstTimestamp", Value::Null),
                ("deprecatedLastTimestamp", Value::Null),
            ] {
                insert_absent(object, field, value);
            }
        }
        ("", "events") if creating => {
            for (field, value) in [
                ("source", json!({})),
                ("firstTimestamp", Value::Null),
                ("lastTimestamp", Value::Null),
                ("eventTime", Value::Null),
                ("reportingComponent", json!("")),
                ("reportingInstance", json!("")),
            ] {
                insert_absent(object, field, value);
            }
        }
        _ => {}
    }
}

/// The empty object of a kind as the real server serialises it: the Go structs that are
/// never absent, and null for lists and times. A create is compared with it when the
/// server records who set which fields.
pub fn zero(kind: &Kind) -> Value {
    let meta = json!({"creationTimestamp": null});
    match (kind.group.as_str(), kind.plural.as_str()) {
        ("apps", "deployments") => json!({"metadata": meta, "spec": {
            "selector": null, "strategy": {},
            "template": {"metadata": meta, "spec": {"containers": null}}}, "status": {}}),
        ("", "events") => json!({"metadata": meta, "involvedObject": {}, "source": {},
            "firstTimestamp": null, "lastTimestamp": null, "eventTime": null}),
        ("events.k8s.io", "events") => json!({"metadata": meta, "eventTime": null,
            "regarding": {}, "deprecatedSource": {}, "deprecatedFirstTimestamp": null,
            "deprecatedLastTimestamp": null}),
        ("", "services") => json!({"metadata": meta, "spec": {}, "status": {"loadBalancer": {}}}),
        ("policy", "poddisruptionbudgets") => json!({"metadata": meta, "spec": {}, "status": {
            "disruptionsAllowed": 0, "currentHealthy": 0, "desiredHealthy": 0, "expectedPods": 0}}),
        ("", "namespaces") => json!({"metadata": meta, "spec": {}, "status": {}}),
        ("coordination.k8s.io", "leases") => json!({"metadata": meta, "spec": {}}),
        ("rbac.authorization.k8s.io", "clusterroles" | "roles") => {
            json!({"metadata": meta, "rules": null})
        }
        ("rbac.authorization.k8s.io", "clusterrolebindings" | "rolebindings") => {
            json!({"metadata": meta, "roleRef": {"apiGroup": "", "kind": "", "name": ""}})
        }
        ("apiextensions.k8s.io", "customresourcedefinitions") => json!({"metadata": meta,
            "spec": {"names": {}, "versions": null}, "status": {"acceptedNames": {}, "storedVersions": null}}),
        _ => json!({"metadata": meta}),
    }
}

/// Label values over 63 bytes in `labels`.
fn long_label_values(labels: &Value) -> Vec<String> {
    labels
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, v)| v.as_str())
        .filter(|v| v.len() > 63)
        .map(str::to_string)
        .collect()
}

/// What the real server refuses in any object's metadata, built-in or custom: label values
/// over 63 bytes (recording 176).
pub fn metadata_violations(object: &Value) -> Vec<crate::validation::Violation> {
    long_label_values(&object["metadata"]["labels"])
        .into_iter()
        .map(|value| {
            (
                "metadata.labels".into(),
                "FieldValueInvalid",
                format!("Invalid value: \"{value}\": must be no more than 63 bytes"),
            )
        })
        .collect()
}

/// Validation of built-in objects: (field, reason, message) per violation.
pub fn validate(
    kind: &Kind,
    object: &Value,
    old: Option<&Value>,
) -> Vec<(String, &'static str, String)> {
    let mut errors = metadata_violations(object);
    match (kind.group.as_str(), kind.plural.as_str()) {
        ("", "services") => {
            // Service names are DNS labels: the real server says so for a dot (173, 175).
            let name = object["metadata"]["name"].as_str().unwrap_or("");
            if name.contains('.') {
                errors.push((
                    "metadata.name".into(),
                    "FieldValueInvalid",
                    format!("Invalid value: \"{name}\": must not contain dots"),
                ));
            }
        }
        ("apps", "deployments") => {
            let selector = &object["spec"]["selector"];
            let long = long_label_values(&selector["matchLabels"]);
            for value in &long {
                errors.push((
                    "spec.selector.matchLabels".into(),
                    "FieldValueInvalid",
                    format!("Invalid value: \"{value}\": must be no more than 63 bytes"),
                ));
            }
            if !long.is_empty() {
                errors.push((
                    "spec.selector".into(),
                    "FieldValueInvalid",
                    format!(
                        "Invalid value: {}: invalid label selector",
                        go_json(selector)
                    ),
                ));
            }
            if let Some(old) = old {
                let (before, after) = (&old["spec"]["selector"], &object["spec"]["selector"]);
                if before != after {
                    errors.push((
                        "spec.selector".into(),
                        "FieldValueInvalid",
                        format!("Invalid value: {}: field is immutable", go_json(after)),
                    ));
                }
            }
        }
        ("rbac.authorization.k8s.io", "clusterroles" | "roles") => {
            errors.extend(rule_violations(object, kind.plural == "roles"));
        }
        ("rbac.authorization.k8s.io", "clusterrolebindings" | "rolebindings") => {
            errors.extend(binding_violations(
                object,
                old,
                kind.plural == "rolebindings",
            ));
        }
        ("events.k8s.io", "events") if old.is_none() => {
            let text = |field: &str| object[field].as_str().unwrap_or("");
            if !object["eventTime"].is_string() {
                errors.push((
                    "eventTime".into(),
                    "FieldValueRequired",
                    "Required value".into(),
                ));
            } else {
                for field in [
                    "reportingController",
                    "reportingInstance",
                    "action",
                    "reason",
                ] {
                    if text(field).is_empty() {
                        errors.push((field.into(), "FieldValueRequired", "Required value".into()));
                    }
                }
                for (field, limit) in [
                    ("reportingInstance", 128),
                    ("action", 128),
                    ("reason", 128),
                    ("note", 1024),
                ] {
                    if text(field).len() > limit {
                        errors.push((
                            field.into(),
                            "FieldValueInvalid",
                            format!("Invalid value: \"\": can have at most {limit} characters"),
                        ));
                    }
                }
            }
            if !matches!(text("type"), "Normal" | "Warning") {
                errors.push((
                    "type".into(),
                    "FieldValueInvalid",
                    format!("Invalid value: \"\": has invalid value: {}", text("type")),
                ));
            }
        }
        _ => {}
    }
    errors
}

type Violations = Vec<(String, &'static str, String)>;

fn required(field: String, why: &str) -> (String, &'static str, String) {
    let message = if why.is_empty() {
        "Required value".to_string()
    } else {
        format!("Required value: {why}")
    };
    (field, "FieldValueRequired", message)
}

/// A Role's or ClusterRole's rules, as `ValidatePolicyRule` checks them.
fn rule_violations(object: &Value, namespaced: bool) -> Violations {
    let mut errors = Vec::new();
    let empty = |v: &Value| v.as_array().is_none_or(|a| a.is_empty());
    for (i, rule) in object["rules"].as_array().into_iter().flatten().enumerate() {
        let at = |field: &str| format!("rules[{i}].{field}");
        if empty(&rule["verbs"]) {
            errors.push(required(
                at("verbs"),
                "verbs must contain at least one value",
            ));
        }
        if !empty(&rule["nonResourceURLs"]) {
            if namespaced {
                errors.push((
                    at("nonResourceURLs"),
                    "FieldValueInvalid",
                    format!(
                        "Invalid value: {}: namespaced rules cannot apply to non-resource URLs",
                        go_json(&rule["nonResourceURLs"])
                    ),
                ));
            }
            if !empty(&rule["apiGroups"]) || !empty(&rule["resources"]) {
                errors.push((
                    at("nonResourceURLs"),
                    "FieldValueInvalid",
                    format!(
                        "Invalid value: {}: rules cannot apply to both regular resources and non-resource URLs",
                        go_json(&rule["nonResourceURLs"])
                    ),
                ));
            }
            continue;
        }
        if empty(&rule["apiGroups"]) {
            errors.push(required(
                at("apiGroups"),
                "resource rules must supply at least one api group",
            ));
        }
        if empty(&rule["resources"]) {
            errors.push(required(
                at("resources"),
                "resource rules must supply at least one resource",
            ));
        }
    }
    errors
}

/// A RoleBinding's or ClusterRoleBinding's roleRef and subjects, as `ValidateRoleBinding`
/// checks them; the roleRef of an existing binding cannot change.
fn binding_violations(object: &Value, old: Option<&Value>, namespaced: bool) -> Violations {
    let mut errors = Vec::new();
    let role_ref = &object["roleRef"];
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    if text(&role_ref["apiGroup"]) != "rbac.authorization.k8s.io" {
        errors.push((
            "roleRef.apiGroup".into(),
            "FieldValueNotSupported",
            format!(
                "Unsupported value: \"{}\": supported values: \"rbac.authorization.k8s.io\"",
                text(&role_ref["apiGroup"])
            ),
        ));
    }
    let kinds: &[&str] = if namespaced {
        &["Role", "ClusterRole"]
    } else {
        &["ClusterRole"]
    };
    if !kinds.contains(&text(&role_ref["kind"]).as_str()) {
        let supported: Vec<String> = kinds.iter().map(|k| format!("\"{k}\"")).collect();
        errors.push((
            "roleRef.kind".into(),
            "FieldValueNotSupported",
            format!(
                "Unsupported value: \"{}\": supported values: {}",
                text(&role_ref["kind"]),
                supported.join(", ")
            ),
        ));
    }
    if text(&role_ref["name"]).is_empty() {
        errors.push(required("roleRef.name".into(), ""));
    }
    for (i, subject) in object["subjects"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let at = |field: &str| format!("subjects[{i}].{field}");
        if text(&subject["name"]).is_empty() {
            errors.push(required(at("name"), ""));
        }
        match text(&subject["kind"]).as_str() {
            "ServiceAccount" => {
                if !namespaced && text(&subject["namespace"]).is_empty() {
                    errors.push(required(at("namespace"), ""));
                }
            }
            "User" | "Group" => {}
            other => errors.push((
                at("kind"),
                "FieldValueNotSupported",
                format!(
                    "Unsupported value: \"{other}\": supported values: \"ServiceAccount\", \"User\", \"Group\""
                ),
            )),
        }
    }
    if let Some(old) = old {
        if old["roleRef"] != object["roleRef"] {
            errors.push((
                "roleRef".into(),
                "FieldValueInvalid",
                format!(
                    "Invalid value: {}: cannot change roleRef",
                    go_json(role_ref)
                ),
            ));
        }
    }
    errors
}

/// The fields that carry other names in the other Event API: (events.k8s.io/v1, core/v1).
const EVENT_FIELDS: &[(&str, &str)] = &[
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

/// `object` as `kind` shows it: the version's apiVersion, and for the two Event APIs (one
/// storage) the other API's field names.
pub fn convert(object: &mut Value, kind: &Kind) {
    let from = object["apiVersion"].as_str().unwrap_or("").to_string();
    object["apiVersion"] = json!(kind.api_version());
    if kind.plural != "events" || from == kind.api_version() {
        return;
    }
    let to_core = kind.group.is_empty();
    let Some(map) = object.as_object_mut() else {
        return;
    };
    for (events, core) in EVENT_FIELDS {
        let (old, new) = if to_core {
            (events, core)
        } else {
            (core, events)
        };
        if let Some(value) = map.remove(*old) {
            map.insert(new.to_string(), value);
        }
    }
}

/// The items of list `field`, if there is one (never adds the field).
fn items<'a>(object: &'a mut Value, field: &str) -> impl Iterator<Item = &'a mut Value> {
    object
        .get_mut(field)
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
}

fn insert_absent(object: &mut Value, field: &str, value: Value) {
    if let Some(map) = object.as_object_mut() {
        map.entry(field).or_insert(value);
    }
}

fn entry<'a>(object: &'a mut Value, field: &str) -> &'a mut Value {
    if !object.is_object() {
        *object = json!({});
    }
    object
        .as_object_mut()
        .expect("an object")
        .entry(field)
        .or_insert_with(|| json!({}))
}

fn deployment(object: &mut Value, creating: bool) {
    if creating {
        insert_absent(object, "status", json!({}));
    }
    let spec = entry(object, "spec");
    insert_absent(spec, "replicas", json!(1));
    let strategy = entry(spec, "strategy");
    insert_absent(strategy, "type", json!("RollingUpdate"));
    if strategy["type"] == "RollingUpdate" {
        let rolling = entry(strategy, "rollingUpdate");
        insert_absent(rolling, "maxUnavailable", json!("25%"));
        insert_absent(rolling, "maxSurge", json!("25%"));
    }
    insert_absent(spec, "revisionHistoryLimit", json!(10));
    insert_absent(spec, "progressDeadlineSeconds", json!(600));
    if let Some(pod) = spec.get_mut("template").and_then(|t| t.get_mut("spec")) {
        pod_spec(pod);
    }
}

/// `SetDefaults_PodSpec` and what it reaches: containers, probes, env, volumes.
fn pod_spec(spec: &mut Value) {
    insert_absent(spec, "restartPolicy", json!("Always"));
    insert_absent(spec, "terminationGracePeriodSeconds", json!(30));
    insert_absent(spec, "dnsPolicy", json!("ClusterFirst"));
    insert_absent(spec, "securityContext", json!({}));
    insert_absent(spec, "schedulerName", json!("default-scheduler"));
    for list in ["initContainers", "containers"] {
        for container in items(spec, list) {
            self::container(container);
        }
    }
    for volume in items(spec, "volumes") {
        for source in ["secret", "configMap", "projected", "downwardAPI"] {
            if let Some(source) = volume.get_mut(source).filter(|s| s.is_object()) {
                insert_absent(source, "defaultMode", json!(420));
            }
        }
    }
}

fn container(container: &mut Value) {
    let image = container["image"].as_str().unwrap_or("");
    let last = image.rsplit('/').next().unwrap_or(image);
    let latest = !image.contains('@') && (!last.contains(':') || last.ends_with(":latest"));
    insert_absent(container, "resources", json!({}));
    insert_absent(
        container,
        "terminationMessagePath",
        json!("/dev/termination-log"),
    );
    insert_absent(container, "terminationMessagePolicy", json!("File"));
    insert_absent(
        container,
        "imagePullPolicy",
        json!(if latest { "Always" } else { "IfNotPresent" }),
    );
    for port in items(container, "ports") {
        insert_absent(port, "protocol", json!("TCP"));
    }
    for var in items(container, "env") {
        if let Some(field) = var.pointer_mut("/valueFrom/fieldRef") {
            insert_absent(field, "apiVersion", json!("v1"));
        }
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        let Some(probe) = container.get_mut(probe).filter(|p| p.is_object()) else {
            continue;
        };
        insert_absent(probe, "timeoutSeconds", json!(1));
        insert_absent(probe, "periodSeconds", json!(10));
        insert_absent(probe, "successThreshold", json!(1));
        insert_absent(probe, "failureThreshold", json!(3));
        if let Some(get) = probe.get_mut("httpGet").filter(|g| g.is_object()) {
            insert_absent(get, "path", json!("/"));
            insert_absent(get, "scheme", json!("HTTP"));
        }
    }
}

fn service(object: &mut Value, creating: bool, next_ip: &mut u32) {
    if creating {
        insert_absent(object, "status", json!({"loadBalancer": {}}));
    }
    let spec = entry(object, "spec");
    insert_absent(spec, "type", json!("ClusterIP"));
    insert_absent(spec, "sessionAffinity", json!("None"));
    for port in items(spec, "ports") {
        insert_absent(port, "protocol", json!("TCP"));
        let number = port["port"].clone();
        insert_absent(port, "targetPort", number);
    }
    if spec["type"] == "ClusterIP" || spec["type"] == "NodePort" || spec["type"] == "LoadBalancer" {
        insert_absent(spec, "internalTrafficPolicy", json!("Cluster"));
    }
    if creating && spec["type"] != "ExternalName" {
        if !spec["clusterIP"].is_string() {
            *next_ip += 1;
            spec["clusterIP"] = json!(format!("10.96.{}.{}", *next_ip / 250, *next_ip % 250 + 1));
        }
        let ip = spec["clusterIP"].clone();
        insert_absent(spec, "clusterIPs", json!([ip]));
        insert_absent(spec, "ipFamilies", json!(["IPv4"]));
        insert_absent(spec, "ipFamilyPolicy", json!("SingleStack"));
    }
}

/// `stringData` is write-only: merged into `data` (base64), then dropped.
fn secret(object: &mut Value) {
    use base64::Engine;
    insert_absent(object, "type", json!("Opaque"));
    let Some(map) = object.as_object_mut() else {
        return;
    };
    if let Some(Value::Object(strings)) = map.remove("stringData") {
        let data = map.entry("data").or_insert_with(|| json!({}));
        if !data.is_object() {
            *data = json!({});
        }
        for (key, value) in strings {
            let text = value.as_str().unwrap_or("").to_string();
            data[key] = json!(base64::engine::general_purpose::STANDARD.encode(text));
        }
    }
}

/// A value as Go's `%v`-like JSON rendering in validation messages (no spaces).
fn go_json(value: &Value) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::builtins;

    fn kind(group: &str, plural: &str) -> Kind {
        builtins()
            .into_iter()
            .find(|k| k.group == group && k.plural == plural)
            .unwrap()
    }

    #[test]
    fn secret_string_data_becomes_data() {
        let mut secret = json!({"stringData": {"url": "amqp://x"}, "data": {"a": "Yg=="}});
        default(&kind("", "secrets"), &mut secret, true, &mut 0);
        assert_eq!(
            secret,
            json!({"type": "Opaque", "data": {"a": "Yg==", "url": "YW1xcDovL3g="}})
        );
    }

    #[test]
    fn services_get_a_cluster_ip_and_target_ports() {
        let mut service = json!({"spec": {"ports": [{"name": "http", "port": 8080}]}});
        let mut ip = 0;
        default(&kind("", "services"), &mut service, true, &mut ip);
        assert_eq!(service["spec"]["clusterIP"], "10.96.0.2");
        assert_eq!(service["spec"]["ports"][0]["targetPort"], 8080);
        assert_eq!(service["spec"]["clusterIPs"], json!(["10.96.0.2"]));
    }

    #[test]
    fn events_read_through_either_api() {
        let mut event = json!({"apiVersion": "events.k8s.io/v1", "note": "n", "regarding": {"name": "p"}, "reason": "r"});
        convert(&mut event, &kind("", "events"));
        assert_eq!(
            event,
            json!({"apiVersion": "v1", "message": "n", "involvedObject": {"name": "p"}, "reason": "r"})
        );
        convert(&mut event, &kind("events.k8s.io", "events"));
        assert_eq!(event["note"], "n");
    }
}
