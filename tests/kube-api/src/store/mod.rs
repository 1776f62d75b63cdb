//! The object store: every object as JSON under one lock, one increasing resourceVersion,
//! and a history of changes that watches replay and follow.
//!
//! All Kubernetes semantics that do not depend on HTTP live here: names, uids, generation,
//! optimistic concurrency, status kept apart from the main resource, finalizers and
//! `deletionTimestamp`, CRDs registering their kinds. By concern: `write` (create, replace,
//! patch, update, delete), `apply` (server-side apply), `managed` (managedFields), `gc` (the
//! garbage collector and the namespace and CRD controllers).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

use crate::errors::ApiError;
use crate::registry::{self, Kind};
use crate::selector::{labels_of, FieldSelector, LabelSelector};

mod apply;
mod gc;
mod managed;
#[cfg(test)]
mod tests;
mod write;

use managed::{describe, entry_matches, entry_set, new_entry, record_update, set_entries, tracked};

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

/// Who writes, as `managedFields` records it.
#[derive(Debug, Clone)]
pub enum Writer {
    /// A create, update or patch by this field manager: it comes to own what it changed.
    Update(String),
    /// A server-side apply whose `managedFields` were already worked out.
    Applied(Value),
}

const HISTORY: usize = 100_000;

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

/// The store.
pub struct Store {
    rv: u64,
    kinds: Vec<Kind>,
    objects: BTreeMap<ObjectKey, Value>,
    history: VecDeque<Arc<Change>>,
    changes: broadcast::Sender<Arc<Change>>,
    requests: Vec<String>,
    accepts: Vec<String>,
    agents: Vec<String>,
    field_validation: FieldValidation,
    warnings: Vec<String>,
    /// Service cluster IPs given out so far.
    cluster_ips: u32,
    /// When the namespace controller may finish a terminating namespace.
    namespace_deadlines: BTreeMap<ObjectKey, std::time::Instant>,
    /// Tokens given out, the RBAC grants used and the refusals (`crate::auth`).
    pub(crate) auth: crate::auth::Ledger,
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

/// Fills in `default` values of a structural schema, as the API server does (the
/// operator's `admission` holds it, for local mode too).
pub use mailpipe_operator::admission::apply_defaults;

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
            accepts: Vec::new(),
            agents: Vec::new(),
            field_validation: FieldValidation::Warn,
            warnings: Vec::new(),
            cluster_ips: 0,
            namespace_deadlines: BTreeMap::new(),
            auth: crate::auth::Ledger::default(),
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
        integral_numbers(object);
        let Some(schema) = kind.schema.clone() else {
            if kind.plural == "customresourcedefinitions" && old.is_some() {
                let warnings = crate::validation::crd_format_warnings(object, old);
                self.warnings.extend(warnings);
            }
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
        integral_numbers(object);
        let old_envelope = old.map(crate::validation::strip_envelope);
        let mut violations = crate::builtin::metadata_violations(object);
        violations.extend(crate::validation::validate(
            &crate::validation::strip_envelope(object),
            old_envelope.as_ref(),
            &schema,
        ));
        if violations.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid(kind, name, violations))
        }
    }

    /// Notes a request (`VERB path`), what it accepts and who sent it, for tests that count
    /// what clients ask and how.
    pub fn note_request(&mut self, line: String, accept: &str, agent: &str) {
        self.accepts.push(accept.to_string());
        self.agents.push(agent.to_string());
        self.requests.push(line);
    }

    /// Every request noted so far (`VERB path`) from a client whose User-Agent starts with
    /// `agent`, oldest first: what a component asked, for checking its RBAC.
    pub fn requests_from(&self, agent: &str) -> Vec<String> {
        self.requests
            .iter()
            .zip(&self.agents)
            .filter(|(_, a)| a.starts_with(agent))
            .map(|(line, _)| line.clone())
            .collect()
    }

    /// Every request noted so far with its `Accept` header, oldest first.
    pub fn requests_with_accept(&self) -> Vec<(String, String)> {
        self.requests
            .iter()
            .cloned()
            .zip(self.accepts.iter().cloned())
            .collect()
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
}

/// Objects are stored as JSON whose writer prints a float with no fraction as an integer
/// (`2.0` reads back as `2`: a custom resource in recording 157, a CRD's defaults in 148).
pub(crate) fn integral_numbers(value: &mut Value) {
    match value {
        Value::Number(n) if !n.is_i64() && !n.is_u64() => {
            if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15) {
                *value = Value::from(f as i64);
            }
        }
        Value::Object(map) => map.values_mut().for_each(integral_numbers),
        Value::Array(items) => items.iter_mut().for_each(integral_numbers),
        _ => {}
    }
}
