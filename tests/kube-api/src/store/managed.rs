//! managedFields: who set which fields, recorded on every write as the real server does
//! (Update entries for creates, updates and patches; the subresource an entry belongs to).

use serde_json::{json, Value};

use crate::fields::{self, FieldSet, Shape};
use crate::registry::Kind;

use super::*;

pub(super) fn subresource(part: Part) -> Option<&'static str> {
    match part {
        Part::Main => None,
        Part::Status => Some("status"),
        Part::Scale => Some("scale"),
    }
}

/// The part of an object a write through `part` can own: the status alone through
/// `/status`, everything but the status through the main resource when the kind has a
/// status subresource.
pub(super) fn tracked(object: &Value, kind: &Kind, part: Part) -> Value {
    match part {
        Part::Status => json!({"status": object["status"]}),
        Part::Scale => {
            let path = spec_replicas_path(kind);
            let mut only = json!({});
            if let Some(replicas) = crate::views::json_path(object, &path) {
                set_path(&mut only, &path, replicas.clone());
            }
            only
        }
        Part::Main if kind.status && kind.plural != "namespaces" => {
            let mut copy = object.clone();
            if let Some(map) = copy.as_object_mut() {
                map.remove("status");
            }
            copy
        }
        Part::Main => object.clone(),
    }
}

pub(super) fn entry_matches(entry: &Value, manager: &str, operation: &str, part: Part) -> bool {
    entry["manager"] == manager
        && entry["operation"] == operation
        && entry["subresource"].as_str() == subresource(part)
}

pub(super) fn entry_set(entry: &Value) -> FieldSet {
    entry["fieldsV1"].as_object().cloned().unwrap_or_default()
}

pub(super) fn new_entry(
    manager: &str,
    operation: &str,
    api_version: &str,
    part: Part,
    set: FieldSet,
) -> Value {
    let mut entry = json!({
        "manager": manager,
        "operation": operation,
        "apiVersion": api_version,
        "time": now(),
        "fieldsType": "FieldsV1",
        "fieldsV1": set,
    });
    if let Some(sub) = subresource(part) {
        entry["subresource"] = json!(sub);
    }
    if part == Part::Scale {
        // The real server records writes through /scale without a time.
        entry.as_object_mut().expect("an object").remove("time");
    }
    entry
}

pub(super) fn exists(object: &Value, leaf: &[String]) -> bool {
    let path: Vec<String> = leaf.iter().filter(|s| s.as_str() != ".").cloned().collect();
    fields::value_at(object, &path).is_some()
}

/// The fields of `new` that a write changed from `old`, as leaves.
pub(super) fn changed(old: &Value, new: &Value, set: &FieldSet) -> Vec<Vec<String>> {
    fields::leaves(set)
        .into_iter()
        .filter(|leaf| match leaf.split_last() {
            Some((last, parent)) if last == "." => fields::value_at(old, parent).is_none(),
            _ => fields::value_at(old, leaf) != fields::value_at(new, leaf),
        })
        .collect()
}

/// Records an Update by `manager` in `new`'s managedFields: it owns what it changed, the
/// other managers lose it, and nobody keeps fields that no longer exist.
pub(super) fn record_update(
    kind: &Kind,
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    part: Part,
) {
    let shape = Shape::new(kind.schema.as_ref());
    // A create compares with the kind's empty object, as the real server does: what that
    // already holds (Go structs that are never absent) was not added by the writer.
    let zero = crate::builtin::zero(kind);
    let old_object = old.unwrap_or(&zero);
    let full = fields::fields_of(&tracked(new, kind, part), &shape, true);
    let changed = changed(old_object, new, &full);
    let mut entries: Vec<Value> = old_object["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // A write through /scale records its manager only when somebody owned the replicas
    // before; otherwise they stay unowned (recordings 180, 181, 184, 185).
    let unowned_scale = part == Part::Scale
        && !changed.iter().any(|leaf| {
            entries
                .iter()
                .any(|e| fields::contains(&entry_set(e), leaf))
        });
    for entry in entries.iter_mut() {
        let mut set = entry_set(entry);
        let before = set.clone();
        for leaf in &changed {
            fields::remove(&mut set, leaf);
        }
        for leaf in fields::leaves(&set) {
            if !exists(new, &leaf) {
                fields::remove(&mut set, &leaf);
            }
        }
        if set != before {
            entry["fieldsV1"] = Value::Object(set);
        }
    }
    if !changed.is_empty() && !unowned_scale {
        match entries
            .iter_mut()
            .find(|e| entry_matches(e, manager, "Update", part))
        {
            Some(entry) => {
                let mut set = entry_set(entry);
                for leaf in &changed {
                    fields::insert(&mut set, leaf);
                }
                entry["fieldsV1"] = Value::Object(set);
                if part != Part::Scale {
                    entry["time"] = json!(now());
                }
                entry["apiVersion"] = json!(kind.api_version());
            }
            None => {
                let mut set = FieldSet::new();
                for leaf in &changed {
                    fields::insert(&mut set, leaf);
                }
                entries.push(new_entry(manager, "Update", &kind.api_version(), part, set));
            }
        }
    }
    entries.retain(|e| !entry_set(e).is_empty());
    set_entries(new, entries);
}

/// Stores the entries in the real server's order: Apply before Update, then oldest first,
/// then by manager, apiVersion and subresource.
pub(super) fn set_entries(object: &mut Value, mut entries: Vec<Value>) {
    let key = |e: &Value| {
        let text = |f: &str| e[f].as_str().unwrap_or("").to_string();
        (
            text("operation"),
            text("time"),
            text("manager"),
            text("apiVersion"),
            text("subresource"),
        )
    };
    entries.sort_by_key(key);
    if entries.is_empty() {
        meta(object).remove("managedFields");
    } else {
        meta(object).insert("managedFields".into(), Value::Array(entries));
    }
}

/// `"op"`, `"kube-recorder" with subresource "status" using v1`: a manager as conflict
/// messages name it.
pub(super) fn describe(entry: &Value) -> String {
    let mut text = format!("\"{}\"", entry["manager"].as_str().unwrap_or(""));
    if let Some(sub) = entry["subresource"].as_str() {
        text.push_str(&format!(" with subresource \"{sub}\""));
    }
    if entry["operation"] == "Update" {
        text.push_str(&format!(
            " using {}",
            entry["apiVersion"].as_str().unwrap_or("")
        ));
    }
    text
}
