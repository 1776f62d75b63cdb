//! Field sets in the `FieldsV1` form of `managedFields`, and the server-side apply rules
//! built on them.
//!
//! A set is a JSON object tree: `f:name` for a field, `k:{"name":"web"}` for an item of a
//! list keyed by fields, `v:"x"` for an item of a set-list, `.` for the node itself, `{}`
//! for a leaf. Which lists are keyed or sets, and which maps are atomic, comes from the
//! built-in kinds' rules (containers by name, finalizers as a set, `spec.selector` atomic,
//! ...) and, for custom kinds, from `x-kubernetes-list-type`, `x-kubernetes-list-map-keys`
//! and `x-kubernetes-map-type` in the CRD schema.

use serde_json::{json, Map, Value};

/// A field set.
pub type FieldSet = Map<String, Value>;

/// How a list is merged and tracked.
#[derive(Debug, Clone, PartialEq)]
enum ListType {
    Atomic,
    Set,
    Map(Vec<String>),
}

/// Schema knowledge for one kind.
#[derive(Debug, Clone, Default)]
pub struct Shape {
    schema: Option<Value>,
}

impl Shape {
    /// Rules for a kind, from its CRD schema when it has one.
    pub fn new(schema: Option<&Value>) -> Shape {
        Shape {
            schema: schema.cloned(),
        }
    }

    fn schema_at(&self, names: &[&str]) -> Option<&Value> {
        let mut node = self.schema.as_ref()?;
        for name in names {
            node = if *name == "[]" {
                node.get("items")?
            } else {
                node.get("properties").and_then(|p| p.get(*name))?
            };
        }
        Some(node)
    }

    fn list_type(&self, names: &[&str]) -> ListType {
        if let Some(node) = self.schema_at(names) {
            return match node["x-kubernetes-list-type"].as_str() {
                Some("set") => ListType::Set,
                Some("map") => ListType::Map(
                    node["x-kubernetes-list-map-keys"]
                        .as_array()
                        .map(|k| {
                            k.iter()
                                .filter_map(|s| s.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default(),
                ),
                _ => ListType::Atomic,
            };
        }
        let last = names.last().copied().unwrap_or("");
        let keyed = |keys: &[&str]| ListType::Map(keys.iter().map(|k| k.to_string()).collect());
        match last {
            "finalizers" => ListType::Set,
            "containers"
            | "initContainers"
            | "ephemeralContainers"
            | "volumes"
            | "env"
            | "imagePullSecrets" => keyed(&["name"]),
            "ports" if names.contains(&"containers") => keyed(&["containerPort", "protocol"]),
            "ports" => keyed(&["port", "protocol"]),
            "volumeMounts" => keyed(&["mountPath"]),
            "ownerReferences" => keyed(&["uid"]),
            "conditions" => keyed(&["type"]),
            _ => ListType::Atomic,
        }
    }

    fn atomic_map(&self, names: &[&str]) -> bool {
        if let Some(node) = self.schema_at(names) {
            return node["x-kubernetes-map-type"].as_str() == Some("atomic");
        }
        // LabelSelector and ObjectReference are atomic structs.
        matches!(
            names,
            ["spec", "selector"] | ["regarding"] | ["related"] | ["involvedObject"]
        ) || names.ends_with(&["labelSelector"])
    }
}

/// Fields the server owns: never tracked.
fn untracked(names: &[&str]) -> bool {
    matches!(names, ["apiVersion"] | ["kind"])
        || matches!(
            names,
            [
                "metadata",
                "name"
                    | "namespace"
                    | "uid"
                    | "resourceVersion"
                    | "generation"
                    | "creationTimestamp"
                    | "managedFields"
                    | "deletionTimestamp"
                    | "deletionGracePeriodSeconds"
                    | "selfLink"
            ]
        )
}

/// An item's value of key field `k`. A key field the item leaves out counts with its
/// schema default: a port without a protocol is keyed as TCP (recording 179).
fn key_field(item: &Value, k: &str) -> Option<Value> {
    match item.get(k) {
        Some(v) => Some(v.clone()),
        None if k == "protocol" => Some(json!("TCP")),
        None => None,
    }
}

fn item_key(item: &Value, keys: &[String]) -> String {
    let mut key = Map::new();
    for k in keys {
        if let Some(v) = key_field(item, k) {
            key.insert(k.clone(), v);
        }
    }
    format!("k:{}", Value::Object(key))
}

/// The fields `value` sets. With `dots`, every map below the root (and below `metadata`)
/// carries `.` as an Update records it; without, only list items do, as an Apply records.
pub fn fields_of(value: &Value, shape: &Shape, dots: bool) -> FieldSet {
    let mut set = FieldSet::new();
    collect(value, shape, dots, &mut Vec::new(), &mut set);
    set
}

fn collect(value: &Value, shape: &Shape, dots: bool, names: &mut Vec<String>, out: &mut FieldSet) {
    let Some(map) = value.as_object() else { return };
    for (key, child) in map {
        // A custom resource is untyped: a null it stores is a field it sets (`f:kafka`,
        // recording 167). A built-in object's null is no value at all.
        if child.is_null() && shape.schema.is_none() {
            continue;
        }
        names.push(key.clone());
        let (skip, atomic, list_type, dotted) = {
            let path: Vec<&str> = names.iter().map(String::as_str).collect();
            (
                untracked(&path),
                shape.atomic_map(&path),
                shape.list_type(&path),
                path != ["metadata"],
            )
        };
        if !skip {
            let mut node = FieldSet::new();
            match child {
                Value::Object(inner) if !atomic => {
                    // An empty map is a leaf; `.` marks a map that exists (kept where the
                    // write created it: see `store::changed`).
                    if dots && dotted && !inner.is_empty() {
                        node.insert(".".into(), json!({}));
                    }
                    collect(child, shape, dots, names, &mut node);
                    // A map holding only untracked fields (metadata with just a name) sets
                    // nothing; an empty map is a leaf.
                    if node.is_empty() && !inner.is_empty() {
                        names.pop();
                        continue;
                    }
                }
                Value::Array(items) => match list_type {
                    ListType::Atomic => {}
                    ListType::Set => {
                        if dots {
                            node.insert(".".into(), json!({}));
                        }
                        for item in items {
                            node.insert(format!("v:{item}"), json!({}));
                        }
                    }
                    ListType::Map(keys) => {
                        if dots {
                            node.insert(".".into(), json!({}));
                        }
                        names.push("[]".into());
                        // Owner references are atomic items: the key alone is tracked.
                        let atomic_items =
                            names.len() == 3 && names[..2] == ["metadata", "ownerReferences"];
                        for item in items {
                            let mut item_node = FieldSet::new();
                            if !atomic_items {
                                item_node.insert(".".into(), json!({}));
                                collect(item, shape, dots, names, &mut item_node);
                            }
                            node.insert(item_key(item, &keys), Value::Object(item_node));
                        }
                        names.pop();
                    }
                },
                _ => {}
            }
            out.insert(format!("f:{key}"), Value::Object(node));
        }
        names.pop();
    }
}

/// Every leaf path of a set (a path ending in `.` stands for the node itself).
pub fn leaves(set: &FieldSet) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    walk(set, &mut Vec::new(), &mut out);
    out
}

fn walk(set: &FieldSet, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    for (key, child) in set {
        prefix.push(key.clone());
        match child.as_object() {
            Some(inner) if !inner.is_empty() => walk(inner, prefix, out),
            _ => out.push(prefix.clone()),
        }
        prefix.pop();
    }
}

/// Whether `set` holds the leaf `path`.
pub fn contains(set: &FieldSet, path: &[String]) -> bool {
    let mut node = set;
    for (i, step) in path.iter().enumerate() {
        match node.get(step).and_then(Value::as_object) {
            Some(inner) if i + 1 == path.len() => return inner.is_empty(),
            Some(inner) => node = inner,
            None => return false,
        }
    }
    false
}

/// Adds the leaf `path` to `set`.
pub fn insert(set: &mut FieldSet, path: &[String]) {
    let mut node = set;
    for step in path {
        node = node
            .entry(step.clone())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("field sets hold objects");
    }
}

/// Removes the leaf `path` from `set`, pruning emptied branches.
pub fn remove(set: &mut FieldSet, path: &[String]) {
    fn go(node: &mut FieldSet, path: &[String]) -> bool {
        let Some((first, rest)) = path.split_first() else {
            return false;
        };
        if rest.is_empty() {
            if node
                .get(first)
                .and_then(Value::as_object)
                .is_some_and(|m| m.is_empty())
            {
                node.remove(first);
            }
        } else if let Some(child) = node.get_mut(first).and_then(Value::as_object_mut) {
            if go(child, rest) && child.is_empty() {
                node.remove(first);
            }
        }
        true
    }
    go(set, path);
}

/// One step of a set path, parsed.
enum Step {
    /// `.`: the node itself.
    Itself,
    /// `f:name`: a field of an object.
    Field(String),
    /// `k:{...}`: the item of a keyed list whose key fields have these values.
    Keyed(Map<String, Value>),
    /// `v:...`: the item of a set-list equal to this value.
    Member(Value),
}

impl Step {
    fn parse(step: &str) -> Option<Step> {
        if step == "." {
            Some(Step::Itself)
        } else if let Some(name) = step.strip_prefix("f:") {
            Some(Step::Field(name.to_string()))
        } else if let Some(key) = step.strip_prefix("k:") {
            serde_json::from_str(key).ok().map(Step::Keyed)
        } else {
            step.strip_prefix("v:")
                .and_then(|v| serde_json::from_str(v).ok())
                .map(Step::Member)
        }
    }

    /// Whether a list item is the one this step names.
    fn names(&self, item: &Value) -> bool {
        match self {
            Step::Keyed(key) => key
                .iter()
                .all(|(k, v)| key_field(item, k).as_ref() == Some(v)),
            Step::Member(value) => item == value,
            Step::Itself | Step::Field(_) => false,
        }
    }
}

/// The value at a set path inside an object (`.` is the node itself).
pub fn value_at<'a>(object: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut node = object;
    for step in path {
        node = match Step::parse(step)? {
            Step::Itself => node,
            Step::Field(name) => node.get(&name)?,
            list_step => node.as_array()?.iter().find(|item| list_step.names(item))?,
        };
    }
    Some(node)
}

fn value_at_mut<'a>(object: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    let mut node = object;
    for step in path {
        node = match Step::parse(step)? {
            Step::Itself => node,
            Step::Field(name) => node.get_mut(&name)?,
            list_step => node
                .as_array_mut()?
                .iter_mut()
                .find(|item| list_step.names(item))?,
        };
    }
    Some(node)
}

/// Deletes what a set path names from an object.
pub fn delete_at(object: &mut Value, path: &[String]) {
    let path: Vec<String> = path.iter().filter(|s| s.as_str() != ".").cloned().collect();
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let Some(parent) = value_at_mut(object, parents) else {
        return;
    };
    match Step::parse(last) {
        Some(Step::Field(name)) => {
            if let Some(map) = parent.as_object_mut() {
                map.remove(&name);
            }
        }
        Some(list_step) => {
            if let Some(items) = parent.as_array_mut() {
                items.retain(|item| !list_step.names(item));
            }
        }
        None => {}
    }
}

/// Merges an applied configuration into the live object: maps merge, keyed lists merge
/// item by item, set-lists take the union, atomic lists and maps are replaced.
pub fn merge_applied(live: &mut Value, applied: &Value, shape: &Shape) {
    merge_at(live, applied, shape, &mut Vec::new());
}

fn merge_at(live: &mut Value, applied: &Value, shape: &Shape, names: &mut Vec<String>) {
    let (atomic, list_type, root) = {
        let path: Vec<&str> = names.iter().map(String::as_str).collect();
        (
            shape.atomic_map(&path),
            shape.list_type(&path),
            path.is_empty(),
        )
    };
    match (live, applied) {
        (Value::Object(live), Value::Object(applied)) if !atomic || root => {
            for (key, value) in applied {
                if value.is_null() {
                    continue;
                }
                names.push(key.clone());
                match live.get_mut(key) {
                    Some(existing) => merge_at(existing, value, shape, names),
                    None => {
                        live.insert(key.clone(), value.clone());
                    }
                }
                names.pop();
            }
        }
        (Value::Array(live), Value::Array(applied)) => match list_type {
            ListType::Atomic => *live = applied.clone(),
            ListType::Set => {
                for item in applied {
                    if !live.contains(item) {
                        live.push(item.clone());
                    }
                }
            }
            ListType::Map(keys) => {
                names.push("[]".into());
                for item in applied {
                    let matches =
                        |l: &Value| keys.iter().all(|k| key_field(l, k) == key_field(item, k));
                    match live.iter_mut().find(|l| matches(l)) {
                        Some(existing) => merge_at(existing, item, shape, names),
                        None => live.push(item.clone()),
                    }
                }
                names.pop();
            }
        },
        (live, applied) => *live = applied.clone(),
    }
}

/// The set path as the real server prints it in conflicts:
/// `.spec.template.spec.containers[name="web"].image`.
pub fn display(path: &[String]) -> String {
    let mut text = String::new();
    for step in path {
        if let Some(name) = step.strip_prefix("f:") {
            text.push('.');
            text.push_str(name);
        } else if let Some(key) = step.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(key).unwrap_or_default();
            let parts: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
            text.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(value) = step.strip_prefix("v:") {
            text.push_str(&format!("[={value}]"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment() -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "ssa-web", "labels": {"app": "ssa-web"}},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "ssa-web"}},
                "template": {"metadata": {"labels": {"app": "ssa-web"}},
                    "spec": {"containers": [{"name": "web", "image": "nginx:1.25"}]}}}})
    }

    #[test]
    fn an_apply_set_has_leaves_keyed_items_and_atomic_selectors_as_the_real_server_records() {
        let set = fields_of(&deployment(), &Shape::default(), false);
        let expected = json!({"f:metadata": {"f:labels": {"f:app": {}}}, "f:spec": {"f:replicas": {}, "f:selector": {}, "f:template": {"f:metadata": {"f:labels": {"f:app": {}}}, "f:spec": {"f:containers": {"k:{\"name\":\"web\"}": {".": {}, "f:image": {}, "f:name": {}}}}}}});
        assert_eq!(Value::Object(set), expected);
    }

    #[test]
    fn an_update_set_marks_maps_with_dots_but_not_metadata() {
        let object = json!({"metadata": {"labels": {"w": "yes"}}, "data": {"k": "v"}});
        let set = fields_of(&object, &Shape::default(), true);
        assert_eq!(
            Value::Object(set),
            json!({"f:data": {".": {}, "f:k": {}}, "f:metadata": {"f:labels": {".": {}, "f:w": {}}}})
        );
    }

    #[test]
    fn paths_read_delete_and_print_like_the_real_server() {
        let mut object = deployment();
        let path: Vec<String> = [
            "f:spec",
            "f:template",
            "f:spec",
            "f:containers",
            "k:{\"name\":\"web\"}",
            "f:image",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(value_at(&object, &path), Some(&json!("nginx:1.25")));
        assert_eq!(
            display(&path),
            ".spec.template.spec.containers[name=\"web\"].image"
        );
        delete_at(&mut object, &path);
        assert_eq!(value_at(&object, &path), None);
    }

    #[test]
    fn applied_keyed_lists_merge_by_key() {
        let mut live = deployment();
        merge_applied(
            &mut live,
            &json!({"spec": {"template": {"spec": {"containers": [{"name": "sidecar", "image": "busybox"}]}}}}),
            &Shape::default(),
        );
        assert_eq!(
            live["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }
}
