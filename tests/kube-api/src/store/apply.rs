//! Server-side apply: field ownership, conflicts and force, removal of fields a manager
//! stopped applying.

use serde_json::{json, Value};

use crate::errors::ApiError;
use crate::fields::{self, Shape};
use crate::registry::Kind;

use super::*;

impl Store {
    /// Server-side apply by `manager`: creates the object when absent, else merges the
    /// applied configuration, refusing (409) to change a field another manager owns unless
    /// `force`, and removing fields this manager applied before and no longer applies when
    /// nobody else owns them. Returns the object and whether it was created.
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &mut self,
        kind: &Kind,
        namespace: &str,
        name: &str,
        applied: Value,
        manager: &str,
        force: bool,
        part: Part,
        dry_run: bool,
    ) -> Result<(Value, bool), ApiError> {
        let mut applied = applied;
        // Compared with what is stored, where `2.0` reads `2`.
        integral_numbers(&mut applied);
        let shape = Shape::new(kind.schema.as_ref());
        let applied_name = applied["metadata"]["name"].as_str().unwrap_or(name);
        if applied_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({applied_name}) does not match the name on the URL ({name})"
            )));
        }
        // Server-side apply builds a typed object from the schema first: a field it does
        // not declare fails the request with a 500, whatever fieldValidation says.
        if let Some(schema) = &kind.schema {
            let mut typed = applied.clone();
            if let Some(field) = crate::validation::prune(&mut typed, schema, "", true).first() {
                return Err(ApiError::typed_patch(kind, name, field));
            }
        }
        let applied_part = tracked(&applied, kind, part);
        let applied_set = fields::fields_of(&applied_part, &shape, false);
        let Ok(live) = self.get(kind, namespace, name) else {
            if part != Part::Main {
                return Err(ApiError::not_found(kind, name));
            }
            let mut object = applied.clone();
            meta(&mut object).insert("name".into(), json!(name));
            let entry = new_entry(manager, "Apply", &kind.api_version(), part, applied_set);
            let created = self.create(
                kind,
                namespace,
                object,
                dry_run,
                Writer::Applied(json!([entry])),
            )?;
            return Ok((created, true));
        };
        let entries: Vec<Value> = live["metadata"]["managedFields"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let is_mine = |e: &Value| entry_matches(e, manager, "Apply", part);
        // Fields whose value this apply changes; another owner of one is a conflict.
        let changing: Vec<Vec<String>> = fields::leaves(&applied_set)
            .into_iter()
            .filter(|leaf| leaf.last().is_some_and(|l| l != "."))
            .filter(|leaf| {
                let live_value = fields::value_at(&live, leaf);
                live_value.is_some() && live_value != fields::value_at(&applied_part, leaf)
            })
            .collect();
        let mut conflicts: Vec<(String, String)> = Vec::new();
        for entry in entries.iter().filter(|e| !is_mine(e)) {
            let set = entry_set(entry);
            for leaf in changing.iter().filter(|leaf| fields::contains(&set, leaf)) {
                conflicts.push((describe(entry), fields::display(leaf)));
            }
        }
        if !conflicts.is_empty() && !force {
            return Err(ApiError::apply_conflicts(&conflicts));
        }
        let mut new = live.clone();
        fields::merge_applied(&mut new, &applied_part, &shape);
        let previous = entries
            .iter()
            .find(|e| is_mine(e))
            .map(entry_set)
            .unwrap_or_default();
        for leaf in fields::leaves(&previous) {
            let still_applied = fields::contains(&applied_set, &leaf);
            let owned_elsewhere = entries
                .iter()
                .filter(|e| !is_mine(e))
                .any(|e| fields::contains(&entry_set(e), &leaf));
            if !still_applied && !owned_elsewhere {
                fields::delete_at(&mut new, &leaf);
            }
        }
        // Fields whose value this apply changed now belong to it alone.
        let mut entries: Vec<Value> = entries
            .into_iter()
            .map(|mut entry| {
                if !is_mine(&entry) {
                    let mut set = entry_set(&entry);
                    for leaf in &changing {
                        fields::remove(&mut set, leaf);
                    }
                    entry["fieldsV1"] = Value::Object(set);
                }
                entry
            })
            .collect();
        match entries.iter_mut().find(|e| is_mine(e)) {
            Some(entry) if entry_set(entry) != applied_set => {
                entry["fieldsV1"] = Value::Object(applied_set);
                entry["time"] = json!(now());
                entry["apiVersion"] = json!(kind.api_version());
            }
            Some(_) => {}
            None => {
                let mut entry = new_entry(manager, "Apply", &kind.api_version(), part, applied_set);
                // An apply that changes nothing records its manager without a time
                // (recordings 182, 186).
                let bare = |o: &Value| {
                    let mut o = o.clone();
                    meta(&mut o).remove("managedFields");
                    o
                };
                if bare(&new) == bare(&live) {
                    entry.as_object_mut().expect("an object").remove("time");
                }
                entries.push(entry);
            }
        }
        entries.retain(|e| !entry_set(e).is_empty());
        if dry_run {
            set_entries(&mut new, entries);
            return Ok((new, false));
        }
        let updated = self.update(
            kind,
            namespace,
            name,
            live,
            new,
            part,
            Writer::Applied(Value::Array(entries)),
        )?;
        Ok((updated, false))
    }
}
