//! Documents rendered from the served kinds and objects: the OpenAPI v3 index and
//! group-version documents (kubectl checks there that `fieldValidation` is supported and
//! `kubectl explain` reads the schemas), and `meta.k8s.io/v1` Tables with a CRD's printer
//! columns (what `kubectl get` prints).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use serde_json::{json, Map, Value};

use crate::registry::Kind;

/// `api/v1` or `apis/G/V`: a group-version's path in the OpenAPI v3 index.
pub fn openapi_path(kind: &Kind) -> String {
    if kind.group.is_empty() {
        format!("api/{}", kind.version)
    } else {
        format!("apis/{}/{}", kind.group, kind.version)
    }
}

/// The schema name of a kind, as the real server names it.
fn schema_name(kind: &Kind) -> String {
    let group = match kind.group.as_str() {
        "" => "io.k8s.api.core".to_string(),
        "apps" | "policy" => format!("io.k8s.api.{}", kind.group),
        "coordination.k8s.io" => "io.k8s.api.coordination".to_string(),
        "events.k8s.io" => "io.k8s.api.events".to_string(),
        "apiextensions.k8s.io" => {
            "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions".to_string()
        }
        custom => custom.split('.').rev().collect::<Vec<_>>().join("."),
    };
    format!("{group}.{}.{}", kind.version, kind.kind)
}

fn hash(text: &str) -> String {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    format!("{:016X}", hasher.finish())
}

/// `GET /openapi/v3`: one entry per served group-version.
pub fn openapi_index(kinds: &[Kind]) -> Value {
    let mut paths = Map::new();
    let served: std::collections::BTreeSet<String> = kinds.iter().map(openapi_path).collect();
    for path in served {
        let document = openapi_document(kinds, &path).unwrap_or(Value::Null);
        paths.insert(
            path.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={}", hash(&document.to_string()))}),
        );
    }
    json!({"paths": paths})
}

fn operation(kind: &Kind, action: &str, writes: bool) -> Value {
    let mut parameters =
        vec![json!({"name": "pretty", "in": "query", "schema": {"type": "string"}})];
    if writes {
        for name in ["dryRun", "fieldManager", "fieldValidation"] {
            parameters.push(json!({"name": name, "in": "query", "schema": {"type": "string"}, "uniqueItems": true}));
        }
    }
    if action == "patch" {
        parameters.push(json!({"name": "force", "in": "query", "schema": {"type": "boolean"}, "uniqueItems": true}));
    }
    json!({
        "operationId": format!("{action}{}", kind.kind),
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": kind.group, "version": kind.version, "kind": kind.kind},
        "parameters": parameters,
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{}", schema_name(kind))}}}}},
    })
}

/// The path-level parameters of an operation path: namespace and name when the path has
/// them, and `pretty`.
fn parameters(kind: &Kind, namespaced: bool, named: bool) -> Value {
    let text = json!({"type": "string", "uniqueItems": true});
    let mut list = Vec::new();
    if named {
        list.push(json!({"name": "name", "in": "path", "description": format!("name of the {}", kind.kind), "required": true, "schema": text}));
    }
    if namespaced {
        list.push(json!({"name": "namespace", "in": "path", "description": "object name and auth scope, such as for teams and projects", "required": true, "schema": text}));
    }
    list.push(json!({"name": "pretty", "in": "query", "description": "If 'true', then the output is pretty printed. Defaults to 'false' unless the user-agent indicates a browser or command-line HTTP tool (curl and wget).", "schema": text}));
    json!(list)
}

/// `GET /openapi/v3/<path>`: paths and schemas of one group-version.
pub fn openapi_document(kinds: &[Kind], path: &str) -> Option<Value> {
    let served: Vec<&Kind> = kinds.iter().filter(|k| openapi_path(k) == path).collect();
    if served.is_empty() {
        return None;
    }
    let mut paths = Map::new();
    let mut schemas = Map::new();
    schemas.insert(
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta".into(),
        json!({"description": "ObjectMeta is metadata that all persisted resources must have.", "type": "object", "x-kubernetes-preserve-unknown-fields": true}),
    );
    for kind in served {
        let base = if kind.namespaced {
            format!("/{path}/namespaces/{{namespace}}/{}", kind.plural)
        } else {
            format!("/{path}/{}", kind.plural)
        };
        let scope = parameters(kind, kind.namespaced, false);
        let object = parameters(kind, kind.namespaced, true);
        if kind.namespaced {
            paths.insert(
                format!("/{path}/{}", kind.plural),
                json!({"get": operation(kind, "list", false), "parameters": parameters(kind, false, false)}),
            );
        }
        paths.insert(
            base.clone(),
            json!({"get": operation(kind, "list", false), "post": operation(kind, "post", true),
                   "delete": operation(kind, "deletecollection", false), "parameters": scope}),
        );
        paths.insert(
            format!("{base}/{{name}}"),
            json!({"get": operation(kind, "get", false), "put": operation(kind, "put", true),
                   "patch": operation(kind, "patch", true), "delete": operation(kind, "delete", false),
                   "parameters": object}),
        );
        for (served, sub) in [(kind.status, "status"), (kind.scale, "scale")] {
            if served {
                paths.insert(
                    format!("{base}/{{name}}/{sub}"),
                    json!({"get": operation(kind, "get", false), "put": operation(kind, "put", true),
                           "patch": operation(kind, "patch", true), "parameters": object}),
                );
            }
        }
        let mut schema = kind.schema.clone().unwrap_or_else(
            || json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
        );
        if let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) {
            // What the real server adds to every custom kind's schema.
            properties.insert(
                "apiVersion".into(),
                json!({"description": "APIVersion defines the versioned schema of this representation of an object. Servers should convert recognized schemas to the latest internal value, and may reject unrecognized values. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#resources", "type": "string"}),
            );
            properties.insert(
                "kind".into(),
                json!({"description": "Kind is a string value representing the REST resource this object represents. Servers may infer this from the endpoint the client submits requests to. Cannot be updated. In CamelCase. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds", "type": "string"}),
            );
            properties.insert(
                "metadata".into(),
                json!({"allOf": [{"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}], "description": "Standard object's metadata. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata"}),
            );
        }
        schema["x-kubernetes-group-version-kind"] =
            json!([{"group": kind.group, "version": kind.version, "kind": kind.kind}]);
        schemas.insert(schema_name(kind), schema);
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.36.2"},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

/// The `autoscaling/v1` Scale view of an object whose kind has `/scale`.
pub fn scale(kind: &Kind, object: &Value) -> Value {
    let (spec_path, status_path, selector_path) = kind
        .scale_paths
        .clone()
        .unwrap_or_else(|| (".spec.replicas".into(), ".status.replicas".into(), None));
    let number = |path: &str| json_path(object, path).cloned().unwrap_or(json!(0));
    let selector = match selector_path {
        Some(path) => json_path(object, &path).cloned(),
        None => object["spec"]["selector"]["matchLabels"]
            .as_object()
            .map(|labels| {
                let pairs: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect();
                json!(pairs.join(","))
            }),
    };
    let metadata = &object["metadata"];
    let mut status = json!({"replicas": number(&status_path)});
    if let Some(selector) = selector {
        status["selector"] = selector;
    }
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": metadata["name"], "namespace": metadata["namespace"], "uid": metadata["uid"],
            "resourceVersion": metadata["resourceVersion"], "creationTimestamp": metadata["creationTimestamp"],
        },
        "spec": {"replicas": number(&spec_path)},
        "status": status,
    })
}

/// Evaluates the JSONPath subset printer columns use: `.a.b`, `[0]`, and
/// `[?(@.type=="Ready")]` filters on lists.
pub fn json_path<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    let mut node = object;
    let mut rest = path
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .trim_start_matches('$');
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('.') {
            let end = after.find(['.', '[']).unwrap_or(after.len());
            node = node.get(&after[..end])?;
            rest = &after[end..];
        } else if let Some(after) = rest.strip_prefix("[?(@.") {
            let end = after.find(")]")?;
            let (field, wanted) = after[..end].split_once("==")?;
            let wanted = wanted.trim().trim_matches(|c| c == '"' || c == '\'');
            node = node
                .as_array()?
                .iter()
                .find(|item| item.get(field.trim()).and_then(Value::as_str) == Some(wanted))?;
            rest = &after[end + 2..];
        } else if let Some(after) = rest.strip_prefix('[') {
            let end = after.find(']')?;
            node = node.get(after[..end].parse::<usize>().ok()?)?;
            rest = &after[end + 1..];
        } else {
            return None;
        }
    }
    Some(node)
}

const NAME_DESCRIPTION: &str = "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names";

fn age(object: &Value) -> Value {
    relative_age(&object["metadata"]["creationTimestamp"])
}

/// A timestamp as the real server's tables print it: the time since, in its short form
/// (`2s`, `5m30s`, `3h`, `2d4h`).
fn relative_age(timestamp: &Value) -> Value {
    let Ok(then) = chrono::DateTime::parse_from_rfc3339(timestamp.as_str().unwrap_or("")) else {
        return Value::Null;
    };
    let seconds = (chrono::Utc::now() - then.with_timezone(&chrono::Utc)).num_seconds();
    json!(human_duration(seconds))
}

/// apimachinery's `duration.HumanDuration`.
fn human_duration(seconds: i64) -> String {
    let with = |big: i64, unit: &str, small: i64, small_unit: &str| {
        if small == 0 {
            format!("{big}{unit}")
        } else {
            format!("{big}{unit}{small}{small_unit}")
        }
    };
    let (minutes, hours) = (seconds / 60, seconds / 3600);
    match seconds {
        s if s < -1 => "<invalid>".into(),
        s if s < 0 => "0s".into(),
        s if s < 120 => format!("{s}s"),
        _ if minutes < 10 => with(minutes, "m", seconds % 60, "s"),
        _ if minutes < 180 => format!("{minutes}m"),
        _ if hours < 8 => with(hours, "h", minutes % 60, "m"),
        _ if hours < 48 => format!("{hours}h"),
        _ if hours < 24 * 8 => with(hours / 24, "d", hours % 24, "h"),
        _ if hours < 24 * 365 * 2 => format!("{}d", hours / 24),
        _ if hours < 24 * 365 * 8 => with(hours / 24 / 365, "y", (hours / 24) % 365, "d"),
        _ => format!("{}y", hours / 24 / 365),
    }
}

const AGE_DESCRIPTION: &str = "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata";

/// A built-in kind's own column: name, description, priority, cell.
type Column = (&'static str, &'static str, i64, fn(&Value) -> Value);

/// The columns the real server prints for a built-in kind, after Name.
fn builtin_columns(kind: &Kind) -> Option<Vec<Column>> {
    match (kind.group.as_str(), kind.plural.as_str()) {
        ("apps", "deployments") => Some(vec![
            ("Ready", "Number of the pod with ready state", 0, |d| {
                let ready = d["status"]["readyReplicas"].as_i64().unwrap_or(0);
                let desired = d["spec"]["replicas"].as_i64().unwrap_or(0);
                json!(format!("{ready}/{desired}"))
            }),
            ("Up-to-date", "Total number of non-terminating pods targeted by this deployment that have the desired template spec.", 0,
                |d| json!(d["status"]["updatedReplicas"].as_i64().unwrap_or(0))),
            ("Available", "Total number of available non-terminating pods (ready for at least minReadySeconds) targeted by this deployment.", 0,
                |d| json!(d["status"]["availableReplicas"].as_i64().unwrap_or(0))),
            ("Age", AGE_DESCRIPTION, 0, age),
            ("Containers", "Names of each container in the template.", 1, |d| containers(d, "name")),
            ("Images", "Images referenced by each container in the template.", 1, |d| containers(d, "image")),
            ("Selector", "Label selector for pods. Existing ReplicaSets whose pods are selected by this will be the ones affected by this deployment. It must match the pod template's labels.", 1,
                |d| json!(selector_text(&d["spec"]["selector"]))),
        ]),
        ("", "namespaces") => Some(vec![
            ("Status", "The status of the namespace", 0, |n| n["status"]["phase"].clone()),
            ("Age", AGE_DESCRIPTION, 0, age),
        ]),
        ("", "endpoints") => Some(vec![
            ("Endpoints", "The set of all endpoints is the union of all subsets. Addresses are placed into subsets according to the IPs they share. A single address with multiple ports, some of which are ready and some of which are not (because they come from different containers) will result in the address being displayed in different subsets for the different ports. No address will appear in both Addresses and NotReadyAddresses in the same subset. Sets of addresses and ports that comprise a service.", 0, endpoints),
            ("Age", AGE_DESCRIPTION, 0, age),
        ]),
        // `kubectl get events` (not recorded; the columns of the real server's printer).
        ("", "events") => Some(vec![
            ("Last Seen", "Time of the last occurrence.", 0, |e| {
                let last = ["lastTimestamp", "eventTime"]
                    .iter()
                    .find_map(|f| e[*f].as_str())
                    .or_else(|| e["series"]["lastObservedTime"].as_str())
                    .or_else(|| e["metadata"]["creationTimestamp"].as_str());
                age(&json!({"metadata": {"creationTimestamp": last}}))
            }),
            ("Type", "Type of this event (Normal, Warning).", 0, |e| e["type"].clone()),
            ("Reason", "Why the action was taken.", 0, |e| e["reason"].clone()),
            ("Object", "The object this event is about.", 0, |e| {
                let object = &e["involvedObject"];
                json!(format!(
                    "{}/{}",
                    object["kind"].as_str().unwrap_or("").to_lowercase(),
                    object["name"].as_str().unwrap_or("")
                ))
            }),
            ("Message", "A human-readable description.", 0, |e| e["message"].clone()),
        ]),
        _ => None,
    }
}

/// The Endpoints column: `ip:port` of ready addresses, three at most, then how many more.
fn endpoints(object: &Value) -> Value {
    let mut all = Vec::new();
    for subset in object["subsets"].as_array().into_iter().flatten() {
        for address in subset["addresses"].as_array().into_iter().flatten() {
            let ip = address["ip"].as_str().unwrap_or("");
            let ports = subset["ports"].as_array().cloned().unwrap_or_default();
            if ports.is_empty() {
                all.push(ip.to_string());
            }
            for port in ports {
                all.push(format!("{ip}:{}", port["port"]));
            }
        }
    }
    json!(match all.len() {
        0 => "<none>".to_string(),
        n if n <= 3 => all.join(","),
        n => format!("{} + {} more...", all[..3].join(","), n - 3),
    })
}

fn containers(deployment: &Value, field: &str) -> Value {
    let values: Vec<&str> = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c[field].as_str())
        .collect();
    json!(values.join(","))
}

/// A LabelSelector as `kubectl` writes one: `a=b,c in (d,e),!f`.
pub fn selector_text(selector: &Value) -> String {
    let mut parts: Vec<String> = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    for expression in selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let key = expression["key"].as_str().unwrap_or("");
        let values: Vec<&str> = expression["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        parts.push(match expression["operator"].as_str().unwrap_or("") {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.to_string(),
            _ => format!("!{key}"),
        });
    }
    if parts.is_empty() {
        "<none>".into()
    } else {
        parts.join(",")
    }
}

/// A `meta.k8s.io/v1` Table of `objects`: Name, then a built-in kind's own columns, or the
/// CRD's printer columns (or Age when it declares none), rows carrying PartialObjectMetadata.
pub fn table(kind: &Kind, objects: &[Value], resource_version: u64) -> Value {
    if let Some(own) = builtin_columns(kind) {
        let mut columns = vec![
            json!({"name": "Name", "type": "string", "format": "name", "description": NAME_DESCRIPTION, "priority": 0}),
        ];
        columns.extend(own.iter().map(|(name, description, priority, _)| {
            json!({"name": name, "type": "string", "format": "", "description": description, "priority": priority})
        }));
        let rows: Vec<Value> = objects
            .iter()
            .map(|object| {
                let mut cells = vec![object["metadata"]["name"].clone()];
                cells.extend(own.iter().map(|(_, _, _, cell)| cell(object)));
                json!({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": object["metadata"]}})
            })
            .collect();
        return json!({
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": resource_version.to_string()},
            "columnDefinitions": columns,
            "rows": rows,
        });
    }
    let mut columns = vec![
        json!({"name": "Name", "type": "string", "format": "name", "description": NAME_DESCRIPTION, "priority": 0}),
    ];
    let printer: Vec<&Value> = kind.printer_columns.iter().collect();
    for column in &printer {
        let path = column["jsonPath"].as_str().unwrap_or("");
        columns.push(json!({
            "name": column["name"],
            "type": column["type"],
            "format": column["format"].as_str().unwrap_or(""),
            "description": column["description"].as_str().map(str::to_string)
                .unwrap_or_else(|| format!("Custom resource definition column (in JSONPath format): {path}")),
            "priority": column["priority"].as_i64().unwrap_or(0),
        }));
    }
    if printer.is_empty() {
        columns.push(json!({"name": "Age", "type": "date", "format": "", "description": "CreationTimestamp is a timestamp representing the server time when this object was created.", "priority": 0}));
    }
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let mut cells = vec![object["metadata"]["name"].clone()];
            for column in &printer {
                let value = json_path(object, column["jsonPath"].as_str().unwrap_or("")).cloned().unwrap_or(Value::Null);
                // A `date` column prints the time since (recording 171).
                cells.push(if column["type"] == "date" && !value.is_null() { relative_age(&value) } else { value });
            }
            if printer.is_empty() {
                cells.push(age(object));
            }
            json!({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": object["metadata"]}})
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version.to_string()},
        "columnDefinitions": columns,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printer_column_paths_follow_fields_indexes_and_filters() {
        let object = json!({"spec": {"replicas": 2}, "status": {"conditions": [
            {"type": "Ready", "status": "True"}, {"type": "TopologyReady", "status": "False"}]}});
        assert_eq!(json_path(&object, ".spec.replicas"), Some(&json!(2)));
        assert_eq!(
            json_path(&object, ".status.conditions[1].type"),
            Some(&json!("TopologyReady"))
        );
        assert_eq!(
            json_path(&object, ".status.conditions[?(@.type==\"Ready\")].status"),
            Some(&json!("True"))
        );
        assert_eq!(json_path(&object, ".status.phase"), None);
    }
}
