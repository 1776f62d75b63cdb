//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and strategic merge
//! patch for built-in kinds (lists merged by their merge keys, e.g. containers by name).

use serde_json::{Map, Value};

/// Applies a JSON merge patch.
pub fn merge(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch);
}

/// Applies a JSON patch; `Err` carries the failing operation's message.
///
/// Like the real server's JSON-patch library, a `test` that a missing path equals `null`
/// succeeds (RFC 6902 would fail it); clients rely on it, e.g. kube-rs adds the first
/// finalizer with `test /metadata/finalizers == null` then `add`.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), String> {
    let operations = patch
        .as_array()
        .ok_or("a JSON patch is a list of operations")?;
    let mut working = target.clone();
    for operation in operations {
        let missing_equals_null = operation["op"] == "test"
            && operation["value"].is_null()
            && operation["path"]
                .as_str()
                .is_some_and(|p| working.pointer(p).is_none());
        if missing_equals_null {
            continue;
        }
        let single: json_patch::Patch =
            serde_json::from_value(Value::Array(vec![operation.clone()]))
                .map_err(|e| format!("invalid JSON patch: {e}"))?;
        json_patch::patch(&mut working, &single).map_err(|e| e.to_string())?;
    }
    *target = working;
    Ok(())
}

/// The merge key of a list field in built-in kinds, by field name.
fn merge_key(field: &str) -> Option<&'static str> {
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        "ports" => Some("containerPort"),
        "tolerations" => Some("key"),
        _ => None,
    }
}

/// Applies a strategic merge patch: maps merge, `null` deletes, lists with a merge key merge
/// element by element, other lists are replaced.
pub fn strategic(target: &mut Value, patch: &Value) {
    strategic_field(None, target, patch);
}

fn strategic_field(field: Option<&str>, target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => merge_maps(target, patch),
        (Value::Array(target), Value::Array(patch)) if field.and_then(merge_key).is_some() => {
            let key = field.and_then(merge_key).expect("checked");
            for item in patch {
                let id = &item[key];
                match target.iter_mut().find(|t| &t[key] == id && !id.is_null()) {
                    Some(existing) => strategic_field(None, existing, item),
                    None => target.push(item.clone()),
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

fn merge_maps(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else if let Some(existing) = target.get_mut(key) {
            strategic_field(Some(key), existing, value);
        } else {
            target.insert(key.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merge_merges_containers_by_name() {
        let mut deployment = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "web", "image": "nginx:1"}, {"name": "sidecar", "image": "busybox:1"}
        ]}}}});
        strategic(
            &mut deployment,
            &json!({"spec": {"template": {"spec": {"containers": [
                {"name": "sidecar", "image": "busybox:2"}
            ]}}}}),
        );
        let containers = &deployment["spec"]["template"]["spec"]["containers"];
        assert_eq!(containers[0]["image"], "nginx:1");
        assert_eq!(containers[1]["image"], "busybox:2");
    }

    #[test]
    fn merge_patch_replaces_lists_and_null_deletes() {
        let mut object = json!({"a": [1, 2], "b": {"c": 1, "d": 2}});
        merge(&mut object, &json!({"a": [3], "b": {"c": null}}));
        assert_eq!(object, json!({"a": [3], "b": {"d": 2}}));
    }

    #[test]
    fn testing_a_missing_path_against_null_passes_as_on_the_real_server() {
        let mut object = json!({"metadata": {"name": "a"}});
        json_patch(
            &mut object,
            &json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]}
            ]),
        )
        .unwrap();
        assert_eq!(object["metadata"]["finalizers"], json!(["x/y"]));
        let mut object = json!({"metadata": {"finalizers": ["x/y"]}});
        let refused = json_patch(
            &mut object,
            &json!([{"op": "test", "path": "/metadata/finalizers", "value": null}]),
        );
        assert!(refused.is_err(), "a present value is not null");
    }

    #[test]
    fn a_failed_json_patch_leaves_the_object_alone() {
        let mut object = json!({"a": 1});
        let result = json_patch(
            &mut object,
            &json!([
                {"op": "add", "path": "/b", "value": 2},
                {"op": "test", "path": "/a", "value": 3}
            ]),
        );
        assert!(result.is_err());
        assert_eq!(object, json!({"a": 1}));
    }

    #[test]
    fn a_failed_json_patch_test_is_an_error() {
        let mut object = json!({"spec": {"format": "mime"}});
        let err = json_patch(
            &mut object,
            &json!([{"op": "test", "path": "/spec/format", "value": "eml"}]),
        );
        assert!(err.is_err());
    }
}
