//! The writes: create, replace, patch and the rules every update follows (server-owned
//! fields, status and scale separated from the object, generation, finalizers), and delete.

use crate::errors::ApiError;
use crate::registry::{self, Kind};
use serde_json::{json, Value};

use super::*;

impl Store {
    /// Creates an object (POST). With `dry_run` nothing is stored.
    pub fn create(
        &mut self,
        kind: &Kind,
        namespace: &str,
        mut object: Value,
        dry_run: bool,
        writer: Writer,
    ) -> Result<Value, ApiError> {
        if !object.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be a JSON object",
            ));
        }
        let body_kind = object["kind"].as_str().unwrap_or("");
        if body_kind.is_empty() || object["apiVersion"].as_str().unwrap_or("").is_empty() {
            return Err(ApiError::bad_request(format!(
                "the object provided is unrecognized (must be of type {}): Object 'Kind' is missing",
                kind.kind
            )));
        }
        if body_kind != kind.kind {
            return Err(ApiError::bad_request(format!(
                "the object provided is unrecognized (must be of type {}): kind {body_kind}",
                kind.kind
            )));
        }
        let body_namespace = object["metadata"]["namespace"].as_str().unwrap_or("");
        if kind.namespaced && !body_namespace.is_empty() && body_namespace != namespace {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let mut name = object["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if name.is_empty() {
            let prefix = object["metadata"]["generateName"].as_str().unwrap_or("");
            if prefix.is_empty() {
                return Err(ApiError::invalid(
                    kind,
                    "",
                    vec![(
                        "metadata.name".into(),
                        "FieldValueRequired",
                        "Required value: name or generateName is required".into(),
                    )],
                ));
            }
            let suffix: String = uuid::Uuid::new_v4()
                .simple()
                .to_string()
                .chars()
                .take(5)
                .collect();
            name = format!("{prefix}{suffix}");
        }
        if !valid_name(&name) {
            return Err(ApiError::invalid(kind, &name, vec![(
                "metadata.name".into(),
                "FieldValueInvalid",
                format!("Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"),
            )]));
        }
        self.check_namespace(kind, namespace, &name)?;
        if kind.plural == "customresourcedefinitions" {
            let warnings = crate::validation::crd_format_warnings(&object, None);
            self.warnings.extend(warnings);
        }
        let key = Store::key(kind, namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(kind, &name));
        }
        if kind.status {
            if let Some(map) = object.as_object_mut() {
                if kind.plural != "namespaces" {
                    map.remove("status");
                }
            }
        }
        let metadata = meta(&mut object);
        metadata.insert("name".into(), json!(name));
        if kind.namespaced {
            metadata.insert("namespace".into(), json!(namespace));
        } else {
            metadata.remove("namespace");
        }
        metadata.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        metadata.insert("creationTimestamp".into(), json!(now()));
        metadata.remove("resourceVersion");
        metadata.remove("deletionTimestamp");
        if kind.generation {
            metadata.insert("generation".into(), json!(1));
        } else {
            metadata.remove("generation");
        }
        object["apiVersion"] = json!(kind.api_version());
        self.admit(kind, &name, &mut object, None)?;
        if kind.group.is_empty() && kind.plural == "namespaces" {
            let labels = meta(&mut object)
                .entry("labels")
                .or_insert_with(|| json!({}));
            labels["kubernetes.io/metadata.name"] = json!(name);
        }
        // The writer owns what it sent and the defaults; what the kind's own rules add
        // below (a namespace's finalizer and phase, a CRD's status) is nobody's.
        match writer {
            Writer::Update(manager) => record_update(kind, None, &mut object, &manager, Part::Main),
            Writer::Applied(entries) => {
                set_entries(&mut object, entries.as_array().cloned().unwrap_or_default());
            }
        }
        match (kind.group.as_str(), kind.plural.as_str()) {
            ("", "namespaces") => {
                object["spec"] = json!({"finalizers": ["kubernetes"]});
                object["status"] = json!({"phase": "Active"});
            }
            ("apiextensions.k8s.io", "customresourcedefinitions") => {
                let kinds = registry::kinds_of_crd(&object, self.rv + 1).map_err(|m| {
                    ApiError::invalid(kind, &name, vec![("spec".into(), "FieldValueInvalid", m)])
                })?;
                let names = object["spec"]["names"].clone();
                let versions: Vec<Value> = object["spec"]["versions"]
                    .as_array()
                    .map(|vs| {
                        vs.iter()
                            .filter(|v| v["storage"].as_bool() == Some(true))
                            .map(|v| v["name"].clone())
                            .collect()
                    })
                    .unwrap_or_default();
                // The API server's naming controller writes the status, as its own
                // manager, over the empty status of a new CRD.
                let mut before = object.clone();
                before["status"] =
                    json!({"acceptedNames": {}, "conditions": null, "storedVersions": versions});
                object["status"] = json!({
                    "acceptedNames": names,
                    "conditions": [
                        {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now()},
                        {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now()},
                    ],
                    "storedVersions": versions,
                });
                record_update(
                    kind,
                    Some(&before),
                    &mut object,
                    "kube-apiserver",
                    Part::Status,
                );
                if !dry_run {
                    self.kinds.retain(|k| {
                        !kinds
                            .iter()
                            .any(|n| n.group == k.group && n.plural == k.plural)
                    });
                    self.kinds.extend(kinds);
                }
            }
            _ => {}
        }
        if dry_run {
            return Ok(object);
        }
        Ok(self.commit(key, ChangeType::Added, object, None))
    }

    /// Replaces an object (PUT) or its status.
    pub fn replace(
        &mut self,
        kind: &Kind,
        namespace: &str,
        name: &str,
        object: Value,
        part: Part,
        writer: Writer,
    ) -> Result<Value, ApiError> {
        let body_name = object["metadata"]["name"].as_str().unwrap_or(name);
        if body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let old = self.get(kind, namespace, name)?;
        match object["metadata"]["resourceVersion"].as_str() {
            Some(rv) if rv != old["metadata"]["resourceVersion"] => {
                return Err(ApiError::conflict(kind, name, "the object has been modified; please apply your changes to the latest version and try again"));
            }
            None if !kind.unconditional_update => {
                return Err(ApiError::resource_version_required(kind, name));
            }
            _ => {}
        }
        self.update(kind, namespace, name, old, object, part, writer)
    }

    /// Applies `apply` to the current object and stores the result (PATCH).
    pub fn patch(
        &mut self,
        kind: &Kind,
        namespace: &str,
        name: &str,
        part: Part,
        writer: Writer,
        apply: impl FnOnce(&mut Value) -> Result<(), ApiError>,
    ) -> Result<Value, ApiError> {
        let old = self.get(kind, namespace, name)?;
        let mut new = old.clone();
        apply(&mut new)?;
        let (before, after) = (
            &old["metadata"]["resourceVersion"],
            &new["metadata"]["resourceVersion"],
        );
        if after.is_string() && before != after {
            return Err(ApiError::conflict(kind, name, "the object has been modified; please apply your changes to the latest version and try again"));
        }
        self.update(kind, namespace, name, old, new, part, writer)
    }

    /// The rules every update follows, whatever the verb.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn update(
        &mut self,
        kind: &Kind,
        namespace: &str,
        name: &str,
        old: Value,
        mut new: Value,
        part: Part,
        writer: Writer,
    ) -> Result<Value, ApiError> {
        if !new.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be a JSON object",
            ));
        }
        if part == Part::Scale {
            let path = spec_replicas_path(kind);
            let replicas = crate::views::json_path(&new, &path)
                .cloned()
                .unwrap_or(Value::Null);
            new = old.clone();
            set_path(&mut new, &path, replicas);
        } else if part == Part::Status {
            let status = new["status"].clone();
            new = old.clone();
            match status {
                Value::Null => {
                    new.as_object_mut().expect("object").remove("status");
                }
                status => new["status"] = status,
            }
        } else if kind.status && kind.plural != "namespaces" {
            match old.get("status") {
                Some(status) => new["status"] = status.clone(),
                None => {
                    new.as_object_mut().expect("checked").remove("status");
                }
            }
        }
        // Fields the server owns.
        for field in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "name",
            "namespace",
            "generation",
        ] {
            match old["metadata"].get(field) {
                Some(value) => {
                    meta(&mut new).insert(field.into(), value.clone());
                }
                None => {
                    meta(&mut new).remove(field);
                }
            }
        }
        new["apiVersion"] = json!(kind.api_version());
        new["kind"] = json!(kind.kind);
        self.admit(kind, name, &mut new, Some(&old))?;
        let terminating = old["metadata"]["deletionTimestamp"].is_string();
        if terminating {
            let before = finalizers(&old);
            let added: Vec<String> = finalizers(&new)
                .into_iter()
                .filter(|f| !before.contains(f))
                .collect();
            if !added.is_empty() {
                let cause = (
                    "metadata.finalizers".to_string(),
                    "FieldValueForbidden",
                    format!("Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{{{}}}", added.iter().map(|f| format!("{f:?}")).collect::<Vec<_>>().join(", ")),
                );
                // The real server reports this cause twice (two validation passes find it);
                // clients that count causes see the same here.
                return Err(ApiError::invalid(kind, name, vec![cause.clone(), cause]));
            }
        }
        if kind.generation && spec_of(&new) != spec_of(&old) {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            meta(&mut new).insert("generation".into(), json!(generation));
        }
        match writer {
            Writer::Update(manager) => record_update(kind, Some(&old), &mut new, &manager, part),
            Writer::Applied(entries) => {
                set_entries(&mut new, entries.as_array().cloned().unwrap_or_default());
            }
        }
        let key = Store::key(kind, namespace, name);
        // A namespace is held by its spec.finalizers until its controller finishes it.
        let namespace = kind.group.is_empty() && kind.plural == "namespaces";
        if terminating && finalizers(&new).is_empty() && !namespace {
            return Ok(self.commit(key, ChangeType::Deleted, new, Some(old)));
        }
        let mut unchanged = new.clone();
        meta(&mut unchanged).insert(
            "resourceVersion".into(),
            old["metadata"]["resourceVersion"].clone(),
        );
        // A write that changes neither the object nor who owns what is no write (an
        // apply that adds a manager's entry is one: recording 182).
        if unchanged == old {
            return Ok(old);
        }
        Ok(self.commit(key, ChangeType::Modified, new, Some(old)))
    }

    /// Deletes an object, or marks it when finalizers hold it. `precondition_uid` and
    /// `precondition_rv` come from DeleteOptions.
    pub fn delete(
        &mut self,
        kind: &Kind,
        namespace: &str,
        name: &str,
        precondition_uid: Option<&str>,
        precondition_rv: Option<&str>,
        propagation: Propagation,
    ) -> Result<Deleted, ApiError> {
        let old = self.get(kind, namespace, name)?;
        if let Some(uid) = precondition_uid {
            if old["metadata"]["uid"] != uid {
                return Err(ApiError::conflict(
                    kind,
                    name,
                    &format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        old["metadata"]["uid"].as_str().unwrap_or("")
                    ),
                ));
            }
        }
        if let Some(rv) = precondition_rv {
            if old["metadata"]["resourceVersion"] != rv {
                return Err(ApiError::conflict(kind, name, "the object has been modified; please apply your changes to the latest version and try again"));
            }
        }
        let key = Store::key(kind, namespace, name);
        // Namespaces and CRDs are marked, not removed: their controllers empty them first
        // (see `collect_garbage`). The API server marks them itself, outside managedFields.
        let definition = kind.group == "apiextensions.k8s.io";
        if kind.group.is_empty() && kind.plural == "namespaces" || definition {
            if terminating(&old) {
                return Ok(Deleted::Marked(old));
            }
            let mut marked = old.clone();
            meta(&mut marked).insert("deletionTimestamp".into(), json!(now()));
            if definition {
                let mut held = finalizers(&old);
                held.push(CRD_CLEANUP.into());
                meta(&mut marked).insert("finalizers".into(), json!(held));
                let mut conditions = old["status"]["conditions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                conditions.push(json!({"type": "Terminating", "status": "True", "lastTransitionTime": now(),
                    "reason": "InstanceDeletionPending",
                    "message": "CustomResourceDefinition marked for deletion; CustomResource deletion will begin soon"}));
                marked["status"]["conditions"] = json!(conditions);
            } else {
                marked["status"] = json!({"phase": "Terminating"});
                // The real namespace controller acts about 5 s after the DELETE (recording
                // 193); this one after a second, so clients see the Terminating phase.
                self.namespace_deadlines.insert(
                    key.clone(),
                    std::time::Instant::now() + std::time::Duration::from_secs(1),
                );
            }
            return Ok(Deleted::Marked(self.commit(
                key,
                ChangeType::Modified,
                marked,
                Some(old),
            )));
        }
        let propagation_finalizer = match propagation {
            Propagation::Background => None,
            Propagation::Foreground => Some("foregroundDeletion"),
            Propagation::Orphan => Some("orphan"),
        };
        if finalizers(&old).is_empty() && propagation_finalizer.is_none() {
            let gone = self.commit(key, ChangeType::Deleted, old, None);
            return Ok(Deleted::Gone(gone));
        }
        if old["metadata"]["deletionTimestamp"].is_string() {
            return Ok(Deleted::Marked(old));
        }
        let mut marked = old.clone();
        if let Some(finalizer) = propagation_finalizer {
            let mut held = finalizers(&old);
            if !held.iter().any(|f| f == finalizer) {
                held.push(finalizer.to_string());
            }
            meta(&mut marked).insert("finalizers".into(), json!(held));
        }
        meta(&mut marked).insert("deletionTimestamp".into(), json!(now()));
        meta(&mut marked).insert("deletionGracePeriodSeconds".into(), json!(0));
        if kind.generation {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            meta(&mut marked).insert("generation".into(), json!(generation));
        }
        Ok(Deleted::Marked(self.commit(
            key,
            ChangeType::Modified,
            marked,
            Some(old),
        )))
    }
}
