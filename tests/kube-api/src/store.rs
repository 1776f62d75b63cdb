//! The object store: every object as JSON under one lock, one increasing resourceVersion,
//! and a history of changes that watches replay and follow.
//!
//! All Kubernetes semantics that do not depend on HTTP live here: names, uids, generation,
//! optimistic concurrency, status kept apart from the main resource, finalizers and
//! `deletionTimestamp`, CRDs registering their kinds.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

use crate::errors::ApiError;
use crate::fields::{self, FieldSet, Shape};
use crate::registry::{self, Kind};
use crate::selector::{labels_of, FieldSelector, LabelSelector};

/// Where an object lives.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectKey {
    /// API group.
    pub group: String,
    /// Resource (plural).
    pub plural: String,
    /// Namespace ("" when cluster-scoped).
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// What a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Removed.
    Deleted,
}

impl ChangeType {
    /// The watch event type.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeType::Added => "ADDED",
            ChangeType::Modified => "MODIFIED",
            ChangeType::Deleted => "DELETED",
        }
    }
}

/// One committed change.
#[derive(Debug, Clone)]
pub struct Change {
    /// The resourceVersion it produced.
    pub rv: u64,
    /// Which object.
    pub key: ObjectKey,
    /// What happened.
    pub change: ChangeType,
    /// The object after (for deletions, the last state with the deletion's resourceVersion).
    pub object: Value,
    /// The object before, for modifications (selectors need it).
    pub previous: Option<Value>,
}

/// Which part of an object a write addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The object itself (its status is left alone when the kind has a status subresource).
    Main,
    /// The `/status` subresource: only `status` changes.
    Status,
    /// The `/scale` subresource: only the spec replicas change.
    Scale,
}

/// What a DELETE came to.
#[derive(Debug, Clone)]
pub enum Deleted {
    /// Gone now: the last state.
    Gone(Value),
    /// Finalizers hold it: marked with `deletionTimestamp`.
    Marked(Value),
}

/// What to do with fields a custom resource's schema does not know (`fieldValidation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FieldValidation {
    /// Drop them silently.
    Ignore,
    /// Drop them and warn (the default).
    #[default]
    Warn,
    /// Refuse the request.
    Strict,
}

/// How a DELETE treats the object's dependents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    /// Delete the owner now; the collector deletes dependents whose owners are all gone.
    Background,
    /// Delete the dependents first (those with blockOwnerDeletion hold the owner).
    Foreground,
    /// Keep the dependents and remove their references to the owner.
    Orphan,
}

/// A step of the garbage collector.
enum Gc {
    Delete(ObjectKey),
    /// A namespace or CRD whose contents are gone.
    Finish(ObjectKey),
    Release(ObjectKey, &'static str),
    Disown(ObjectKey, String),
}

/// Who writes, as `managedFields` records it.
#[derive(Debug, Clone)]
pub enum Writer {
    /// A create, update or patch by this field manager: it comes to own what it changed.
    Update(String),
    /// A server-side apply whose `managedFields` were already worked out.
    Applied(Value),
}

const HISTORY: usize = 100_000;

fn subresource(part: Part) -> Option<&'static str> {
    match part {
        Part::Main => None,
        Part::Status => Some("status"),
        Part::Scale => Some("scale"),
    }
}

/// The part of an object a write through `part` can own: the status alone through
/// `/status`, everything but the status through the main resource when the kind has a
/// status subresource.
fn tracked(object: &Value, kind: &Kind, part: Part) -> Value {
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

/// Where a kind keeps its replicas (for `/scale`).
pub fn spec_replicas_path(kind: &Kind) -> String {
    kind.scale_paths
        .as_ref()
        .map(|(spec, _, _)| spec.clone())
        .unwrap_or_else(|| ".spec.replicas".into())
}

/// Sets the value at a simple dotted path (`.spec.replicas`), creating objects on the way.
pub fn set_path(object: &mut Value, path: &str, value: Value) {
    let names: Vec<&str> = path.trim_start_matches('.').split('.').collect();
    let mut node = object;
    for name in &names[..names.len() - 1] {
        if !node[*name].is_object() {
            node[*name] = json!({});
        }
        node = &mut node[*name];
    }
    node[names[names.len() - 1]] = value;
}

fn entry_matches(entry: &Value, manager: &str, operation: &str, part: Part) -> bool {
    entry["manager"] == manager
        && entry["operation"] == operation
        && entry["subresource"].as_str() == subresource(part)
}

fn entry_set(entry: &Value) -> FieldSet {
    entry["fieldsV1"].as_object().cloned().unwrap_or_default()
}

fn new_entry(
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

fn exists(object: &Value, leaf: &[String]) -> bool {
    let path: Vec<String> = leaf.iter().filter(|s| s.as_str() != ".").cloned().collect();
    fields::value_at(object, &path).is_some()
}

/// The fields of `new` that a write changed from `old`, as leaves.
fn changed(old: &Value, new: &Value, set: &FieldSet) -> Vec<Vec<String>> {
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
fn record_update(kind: &Kind, old: Option<&Value>, new: &mut Value, manager: &str, part: Part) {
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
    if !changed.is_empty() {
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
fn set_entries(object: &mut Value, mut entries: Vec<Value>) {
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
fn describe(entry: &Value) -> String {
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

/// The store.
pub struct Store {
    rv: u64,
    kinds: Vec<Kind>,
    objects: BTreeMap<ObjectKey, Value>,
    history: VecDeque<Arc<Change>>,
    changes: broadcast::Sender<Arc<Change>>,
    requests: Vec<String>,
    field_validation: FieldValidation,
    warnings: Vec<String>,
    /// Service cluster IPs given out so far.
    cluster_ips: u32,
    /// When the namespace controller may finish a terminating namespace.
    namespace_deadlines: BTreeMap<ObjectKey, std::time::Instant>,
}

fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// RFC 1123 subdomain, as object names must be.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

fn meta(object: &mut Value) -> &mut Map<String, Value> {
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    object["metadata"]
        .as_object_mut()
        .expect("made an object above")
}

/// Everything but metadata and status: what a generation counts changes of.
fn spec_of(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(map) = copy.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    copy
}

/// Fills in `default` values of a structural schema, as the API server does for custom
/// resources: a property absent from an object that is present gets its default, and
/// defaults are applied inside defaults too.
pub fn apply_defaults(value: &mut Value, schema: &Value) {
    match value {
        Value::Object(map) => {
            if let Some(properties) = schema["properties"].as_object() {
                for (name, property) in properties {
                    if !map.contains_key(name) {
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

/// The objects of `kind` (in `namespace` when given) the selectors select, as `kind` shows
/// them.
fn select<'a>(
    objects: impl Iterator<Item = (&'a ObjectKey, &'a Value)>,
    kind: &Kind,
    namespace: Option<&str>,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> Vec<Value> {
    objects
        .filter(|(key, _)| key.group == kind.storage_group() && key.plural == kind.plural)
        .filter(|(key, _)| namespace.is_none_or(|ns| key.namespace == ns))
        .map(|(_, object)| object)
        .filter(|object| labels.matches(&labels_of(object)) && fields.matches(object))
        .map(|object| {
            let mut object = object.clone();
            crate::builtin::convert(&mut object, kind);
            object
        })
        .collect()
}

fn terminating(object: &Value) -> bool {
    object["metadata"]["deletionTimestamp"].is_string()
}

/// The finalizer the API server puts on a deleted CRD until its custom resources are gone.
const CRD_CLEANUP: &str = "customresourcecleanup.apiextensions.k8s.io";

fn finalizers(object: &Value) -> Vec<String> {
    object["metadata"]["finalizers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

impl Store {
    /// A store with the built-in kinds and the `default` and `kube-system` namespaces.
    pub fn new() -> Store {
        let (changes, _) = broadcast::channel(16_384);
        let mut store = Store {
            rv: 0,
            kinds: registry::builtins(),
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            changes,
            requests: Vec::new(),
            field_validation: FieldValidation::Warn,
            warnings: Vec::new(),
            cluster_ips: 0,
            namespace_deadlines: BTreeMap::new(),
        };
        let namespaces = store.kind("", "v1", "namespaces").expect("built in");
        for name in ["default", "kube-system", "kube-public"] {
            store
                .create(
                    &namespaces,
                    "",
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
                    false,
                    Writer::Update("kube-apiserver".into()),
                )
                .expect("bootstrap namespaces");
        }
        store
    }

    /// Starts a write request: how it treats unknown fields; warnings start empty.
    pub fn begin_request(&mut self, field_validation: FieldValidation) {
        self.field_validation = field_validation;
        self.warnings.clear();
    }

    /// The warnings the last write produced (sent as `Warning` headers).
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    /// Prunes fields the kind's schema does not know, then warns or refuses as asked, fills
    /// defaults and validates (schema, then CEL rules with `old` for transition rules).
    fn admit(
        &mut self,
        kind: &Kind,
        name: &str,
        object: &mut Value,
        old: Option<&Value>,
    ) -> Result<(), ApiError> {
        let Some(schema) = kind.schema.clone() else {
            crate::builtin::default(kind, object, old.is_none(), &mut self.cluster_ips);
            let violations = crate::builtin::validate(kind, object, old);
            if violations.is_empty() {
                return Ok(());
            }
            // Errors name the kind of the storage (events.k8s.io Events are core Events).
            let stored = self
                .kinds
                .iter()
                .find(|k| k.group == kind.storage_group() && k.plural == kind.plural)
                .unwrap_or(kind);
            return Err(ApiError::invalid(stored, name, violations));
        };
        let unknown = crate::validation::prune(object, &schema, "", true);
        if !unknown.is_empty() {
            match self.field_validation {
                FieldValidation::Strict => {
                    let fields: Vec<String> = unknown
                        .iter()
                        .map(|f| format!("unknown field \"{f}\""))
                        .collect();
                    return Err(ApiError::bad_request(format!(
                        "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
                        kind.kind,
                        kind.version,
                        kind.kind,
                        fields.join(", ")
                    )));
                }
                FieldValidation::Warn => {
                    self.warnings
                        .extend(unknown.iter().map(|f| format!("unknown field \"{f}\"")));
                }
                FieldValidation::Ignore => {}
            }
        }
        apply_defaults(object, &schema);
        let old_envelope = old.map(crate::validation::strip_envelope);
        let violations = crate::validation::validate(
            &crate::validation::strip_envelope(object),
            old_envelope.as_ref(),
            &schema,
        );
        if violations.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid(kind, name, violations))
        }
    }

    /// Notes a request (`VERB path`), for tests that count what clients ask.
    pub fn note_request(&mut self, line: String) {
        self.requests.push(line);
    }

    /// Every request noted so far, oldest first.
    pub fn requests(&self) -> &[String] {
        &self.requests
    }

    /// The current resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// Every served kind.
    pub fn kinds(&self) -> &[Kind] {
        &self.kinds
    }

    /// The kind served at `group`/`version`/`plural`.
    pub fn kind(&self, group: &str, version: &str, plural: &str) -> Option<Kind> {
        self.kinds
            .iter()
            .find(|k| k.group == group && k.version == version && k.plural == plural)
            .cloned()
    }

    /// Follows changes committed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }

    /// Changes after `rv`, oldest first; `None` when history no longer reaches back there.
    pub fn changes_since(&self, rv: u64) -> Option<Vec<Arc<Change>>> {
        if let Some(oldest) = self.history.front() {
            if oldest.rv > rv + 1 && self.history.len() == HISTORY {
                return None;
            }
        }
        Some(self.history.iter().filter(|c| c.rv > rv).cloned().collect())
    }

    fn commit(
        &mut self,
        key: ObjectKey,
        change: ChangeType,
        mut object: Value,
        previous: Option<Value>,
    ) -> Value {
        self.rv += 1;
        meta(&mut object).insert("resourceVersion".into(), json!(self.rv.to_string()));
        match change {
            ChangeType::Deleted => {
                self.objects.remove(&key);
            }
            _ => {
                self.objects.insert(key.clone(), object.clone());
            }
        }
        let record = Arc::new(Change {
            rv: self.rv,
            key,
            change,
            object: object.clone(),
            previous,
        });
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(record.clone());
        let _ = self.changes.send(record);
        object
    }

    fn key(kind: &Kind, namespace: &str, name: &str) -> ObjectKey {
        ObjectKey {
            group: kind.storage_group().to_string(),
            plural: kind.plural.clone(),
            namespace: if kind.namespaced {
                namespace.to_string()
            } else {
                String::new()
            },
            name: name.to_string(),
        }
    }

    /// The object, with `apiVersion` of the version asked for.
    pub fn get(&self, kind: &Kind, namespace: &str, name: &str) -> Result<Value, ApiError> {
        let mut object = self
            .objects
            .get(&Store::key(kind, namespace, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(kind, name))?;
        crate::builtin::convert(&mut object, kind);
        Ok(object)
    }

    /// Objects of `kind` (in `namespace` when given) that the selectors select, by name.
    pub fn list(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> Vec<Value> {
        select(self.objects.iter(), kind, namespace, labels, fields)
    }

    /// Objects of `kind` as they were at resourceVersion `rv` (a list with
    /// `resourceVersionMatch=Exact`), rebuilt from the change history; `None` when the
    /// history no longer reaches back there.
    pub fn list_at(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
        rv: u64,
    ) -> Option<Vec<Value>> {
        if rv > self.rv || self.history.front().is_some_and(|c| c.rv > 1) {
            return None;
        }
        let mut objects: BTreeMap<&ObjectKey, &Value> = BTreeMap::new();
        for change in self.history.iter().take_while(|c| c.rv <= rv) {
            match change.change {
                ChangeType::Deleted => {
                    objects.remove(&change.key);
                }
                _ => {
                    objects.insert(&change.key, &change.object);
                }
            }
        }
        Some(select(objects.into_iter(), kind, namespace, labels, fields))
    }

    fn check_namespace(&self, kind: &Kind, namespace: &str, name: &str) -> Result<(), ApiError> {
        if kind.custom
            && self
                .definition_of(kind)
                .is_some_and(|crd| terminating(&crd))
        {
            return Err(ApiError::definition_terminating());
        }
        if !kind.namespaced {
            return Ok(());
        }
        let namespaces = self.kind("", "v1", "namespaces").expect("built in");
        let ns = self
            .objects
            .get(&Store::key(&namespaces, "", namespace))
            .ok_or_else(|| ApiError::not_found(&namespaces, namespace))?;
        if terminating(ns) {
            return Err(ApiError::namespace_terminating(kind, name, namespace));
        }
        Ok(())
    }

    /// The CustomResourceDefinition that defines a custom kind.
    fn definition_of(&self, kind: &Kind) -> Option<Value> {
        self.objects
            .iter()
            .find(|(key, crd)| {
                key.group == "apiextensions.k8s.io"
                    && crd["spec"]["group"] == kind.group.as_str()
                    && crd["spec"]["names"]["plural"] == kind.plural.as_str()
            })
            .map(|(_, crd)| crd.clone())
    }

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
    fn update(
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
        if terminating && finalizers(&new).is_empty() {
            return Ok(self.commit(key, ChangeType::Deleted, new, Some(old)));
        }
        let mut unchanged = new.clone();
        meta(&mut unchanged).insert(
            "resourceVersion".into(),
            old["metadata"]["resourceVersion"].clone(),
        );
        // Only a change of the object itself is a write; managedFields follow it.
        let mut before = old.clone();
        meta(&mut unchanged).remove("managedFields");
        meta(&mut before).remove("managedFields");
        if unchanged == before {
            return Ok(old);
        }
        Ok(self.commit(key, ChangeType::Modified, new, Some(old)))
    }

    /// One pass of the garbage collector, as the controller manager runs it: dependents of
    /// an owner deleted in the foreground are deleted and the owner released once those
    /// that block it are gone; dependents of an owner deleted with Orphan lose their
    /// reference and the owner is released; objects whose owners are all gone are deleted.
    /// Returns whether anything changed.
    pub fn collect_garbage(&mut self) -> bool {
        let uids: HashMap<String, ObjectKey> = self
            .objects
            .iter()
            .filter_map(|(key, o)| {
                o["metadata"]["uid"]
                    .as_str()
                    .map(|u| (u.to_string(), key.clone()))
            })
            .collect();
        let owner_uids = |o: &Value| -> Vec<String> {
            o["metadata"]["ownerReferences"]
                .as_array()
                .map(|refs| {
                    refs.iter()
                        .filter_map(|r| r["uid"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let dependents_of = |uid: &str| -> Vec<(ObjectKey, Value)> {
            self.objects
                .iter()
                .filter(|(_, o)| owner_uids(o).iter().any(|u| u == uid))
                .map(|(k, o)| (k.clone(), o.clone()))
                .collect()
        };
        let mut work: Vec<Gc> = Vec::new();
        // The namespace controller: a terminating namespace loses its content, then goes.
        // The CRD finalizer controller: a terminating CRD loses its custom resources, then
        // its kinds stop being served, then it goes.
        for (key, object) in self.objects.iter().filter(|(_, o)| terminating(o)) {
            let contents: Vec<(&ObjectKey, &Value)> =
                if key.group.is_empty() && key.plural == "namespaces" {
                    self.objects
                        .iter()
                        .filter(|(k, _)| k.namespace == key.name)
                        .collect()
                } else if key.group == "apiextensions.k8s.io"
                    && finalizers(object).iter().any(|f| f == CRD_CLEANUP)
                {
                    let (group, plural) =
                        (&object["spec"]["group"], &object["spec"]["names"]["plural"]);
                    self.objects
                        .iter()
                        .filter(|(k, _)| {
                            k.group == group.as_str().unwrap_or("")
                                && k.plural == plural.as_str().unwrap_or("")
                        })
                        .collect()
                } else {
                    continue;
                };
            let due = self
                .namespace_deadlines
                .get(key)
                .is_none_or(|deadline| std::time::Instant::now() >= *deadline);
            if contents.is_empty() && due {
                work.push(Gc::Finish(key.clone()));
            }
            for (content, o) in contents {
                if !terminating(o) {
                    work.push(Gc::Delete(content.clone()));
                }
            }
        }
        for (key, object) in &self.objects {
            let uid = object["metadata"]["uid"].as_str().unwrap_or("").to_string();
            let terminating = object["metadata"]["deletionTimestamp"].is_string();
            let held = finalizers(object);
            if terminating && held.iter().any(|f| f == "foregroundDeletion") {
                let dependents = dependents_of(&uid);
                let blocking = dependents.iter().any(|(_, d)| {
                    d["metadata"]["ownerReferences"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|r| {
                            r["uid"] == uid.as_str()
                                && r["blockOwnerDeletion"].as_bool() == Some(true)
                        })
                });
                for (dependent, d) in &dependents {
                    if !d["metadata"]["deletionTimestamp"].is_string() {
                        work.push(Gc::Delete(dependent.clone()));
                    }
                }
                if !blocking {
                    work.push(Gc::Release(key.clone(), "foregroundDeletion"));
                }
            } else if terminating && held.iter().any(|f| f == "orphan") {
                for (dependent, _) in dependents_of(&uid) {
                    work.push(Gc::Disown(dependent, uid.clone()));
                }
                work.push(Gc::Release(key.clone(), "orphan"));
            }
            let owners = owner_uids(object);
            if !owners.is_empty() && !terminating && owners.iter().all(|u| !uids.contains_key(u)) {
                work.push(Gc::Delete(key.clone()));
            }
        }
        let changed = !work.is_empty();
        for step in work {
            let Some(kind) = self.kinds.iter().find(|k| {
                let key = match &step {
                    Gc::Delete(key)
                    | Gc::Finish(key)
                    | Gc::Release(key, _)
                    | Gc::Disown(key, _) => key,
                };
                k.group == key.group && k.plural == key.plural
            }) else {
                continue;
            };
            let kind = kind.clone();
            let gc = Writer::Update("kube-controller-manager".into());
            let _ = match step {
                Gc::Delete(key) => self
                    .delete(
                        &kind,
                        &key.namespace,
                        &key.name,
                        None,
                        None,
                        Propagation::Background,
                    )
                    .map(drop),
                Gc::Finish(key) if kind.plural == "namespaces" => {
                    self.namespace_deadlines.remove(&key);
                    if let Some(namespace) = self.objects.get(&key).cloned() {
                        self.commit(key, ChangeType::Deleted, namespace, None);
                    }
                    Ok(())
                }
                Gc::Finish(key) => {
                    if let Some(crd) = self.objects.get(&key) {
                        let (group, plural) = (
                            crd["spec"]["group"].clone(),
                            crd["spec"]["names"]["plural"].clone(),
                        );
                        self.kinds.retain(|k| {
                            !(k.custom
                                && k.group == group.as_str().unwrap_or("")
                                && k.plural == plural.as_str().unwrap_or(""))
                        });
                    }
                    self.patch(&kind, &key.namespace, &key.name, Part::Main, gc, |o| {
                        let kept: Vec<String> = finalizers(o)
                            .into_iter()
                            .filter(|f| f != CRD_CLEANUP)
                            .collect();
                        o["metadata"]["finalizers"] = json!(kept);
                        Ok(())
                    })
                    .map(drop)
                }
                Gc::Release(key, finalizer) => self
                    .patch(&kind, &key.namespace, &key.name, Part::Main, gc, |o| {
                        let kept: Vec<String> = finalizers(o)
                            .into_iter()
                            .filter(|f| f != finalizer)
                            .collect();
                        o["metadata"]["finalizers"] = json!(kept);
                        Ok(())
                    })
                    .map(drop),
                Gc::Disown(key, uid) => self
                    .patch(&kind, &key.namespace, &key.name, Part::Main, gc, |o| {
                        let kept: Vec<Value> = o["metadata"]["ownerReferences"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter(|r| r["uid"] != uid.as_str())
                            .cloned()
                            .collect();
                        if kept.is_empty() {
                            meta(o).remove("ownerReferences");
                        } else {
                            o["metadata"]["ownerReferences"] = json!(kept);
                        }
                        Ok(())
                    })
                    .map(drop),
            };
        }
        changed
    }

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
        let shape = Shape::new(kind.schema.as_ref());
        let applied_name = applied["metadata"]["name"].as_str().unwrap_or(name);
        if applied_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({applied_name}) does not match the name on the URL ({name})"
            )));
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
            None => entries.push(new_entry(
                manager,
                "Apply",
                &kind.api_version(),
                part,
                applied_set,
            )),
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
                // The real namespace controller takes seconds (it walks discovery); this
                // one lets clients see the Terminating phase for half a second.
                self.namespace_deadlines.insert(
                    key.clone(),
                    std::time::Instant::now() + std::time::Duration::from_millis(500),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_defaults_fill_absent_fields_of_present_objects() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
            "replicas": {"type": "integer", "default": 1},
            "scaling": {"type": "object", "properties": {"min": {"type": "integer", "default": 1}}},
            "absent": {"type": "object", "properties": {"x": {"type": "integer", "default": 3}}}
        }}}});
        let mut object = json!({"spec": {"scaling": {}}});
        apply_defaults(&mut object, &schema);
        assert_eq!(
            object,
            json!({"spec": {"replicas": 1, "scaling": {"min": 1}}})
        );
    }

    #[test]
    fn generation_moves_with_spec_changes_only() {
        let mut store = Store::new();
        let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "things.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                "names": {"kind": "Thing", "plural": "things"},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}});
        let crds = store
            .kind("apiextensions.k8s.io", "v1", "customresourcedefinitions")
            .unwrap();
        store
            .create(&crds, "", crd, false, Writer::Update("test".into()))
            .unwrap();
        let things = store.kind("example.com", "v1", "things").unwrap();
        let thing = json!({"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "a"}, "spec": {"n": 1}});
        let created = store
            .create(
                &things,
                "default",
                thing,
                false,
                Writer::Update("test".into()),
            )
            .unwrap();
        assert_eq!(created["metadata"]["generation"], 1);
        let relabelled = store
            .patch(
                &things,
                "default",
                "a",
                Part::Main,
                Writer::Update("test".into()),
                |o| {
                    o["metadata"]["labels"] = json!({"x": "y"});
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(relabelled["metadata"]["generation"], 1);
        let status = store
            .patch(
                &things,
                "default",
                "a",
                Part::Status,
                Writer::Update("test".into()),
                |o| {
                    o["status"] = json!({"ready": true});
                    o["spec"] = json!({"n": 99});
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(
            status["spec"]["n"], 1,
            "spec changes through /status are ignored"
        );
        assert_eq!(status["metadata"]["generation"], 1);
        let respec = store
            .patch(
                &things,
                "default",
                "a",
                Part::Main,
                Writer::Update("test".into()),
                |o| {
                    o["spec"]["n"] = json!(2);
                    o["status"] = json!({"ready": false});
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(respec["metadata"]["generation"], 2);
        assert_eq!(
            respec["status"]["ready"], true,
            "status changes through the main resource are ignored"
        );
    }

    #[test]
    fn finalizers_hold_a_deleted_object_until_they_are_removed() {
        let mut store = Store::new();
        let cms = store.kind("", "v1", "configmaps").unwrap();
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "finalizers": ["x/y"]}});
        store
            .create(&cms, "default", cm, false, Writer::Update("test".into()))
            .unwrap();
        let Deleted::Marked(marked) = store
            .delete(&cms, "default", "a", None, None, Propagation::Background)
            .unwrap()
        else {
            panic!("finalizers hold the object");
        };
        assert!(marked["metadata"]["deletionTimestamp"].is_string());
        let refused = store.patch(
            &cms,
            "default",
            "a",
            Part::Main,
            Writer::Update("test".into()),
            |o| {
                o["metadata"]["finalizers"] = json!(["x/y", "x/z"]);
                Ok(())
            },
        );
        assert_eq!(refused.unwrap_err().code, 422);
        store
            .patch(
                &cms,
                "default",
                "a",
                Part::Main,
                Writer::Update("test".into()),
                |o| {
                    o["metadata"]["finalizers"] = json!([]);
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(store.get(&cms, "default", "a").unwrap_err().code, 404);
    }
}
