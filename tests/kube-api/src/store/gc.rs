//! The garbage collector and the namespace and CRD controllers of the controller manager,
//! run in-process: dependents, foreground and orphan deletion, emptying terminating
//! namespaces and CRDs.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::*;

/// A step of the garbage collector.
enum Gc {
    Delete(ObjectKey),
    /// A namespace or CRD whose contents are gone.
    Finish(ObjectKey),
    Release(ObjectKey, &'static str),
    Disown(ObjectKey, String),
}

impl Store {
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
        let mut namespace_passes: Vec<(ObjectKey, Vec<Value>, bool)> = Vec::new();
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
            if key.plural == "namespaces" {
                if due && !contents.is_empty() {
                    // The namespace controller: built-in objects first (the Secrets a
                    // pipeline names are gone before the pipeline is marked, recording
                    // 193), custom resources on a later pass.
                    let custom = |k: &ObjectKey| {
                        self.kinds.iter().any(|kind| {
                            kind.custom && kind.group == k.group && kind.plural == k.plural
                        })
                    };
                    let builtin: Vec<&ObjectKey> = contents
                        .iter()
                        .filter(|(k, o)| !custom(k) && !terminating(o))
                        .map(|(k, _)| *k)
                        .collect();
                    let later: Vec<&ObjectKey> = contents
                        .iter()
                        .filter(|(k, o)| custom(k) && !terminating(o))
                        .map(|(k, _)| *k)
                        .collect();
                    let remaining: Vec<Value> =
                        contents.iter().map(|(_, o)| (*o).clone()).collect();
                    if !builtin.is_empty() {
                        work.extend(builtin.into_iter().cloned().map(Gc::Delete));
                    } else {
                        work.extend(later.into_iter().cloned().map(Gc::Delete));
                    }
                    let has_conditions = object["status"]["conditions"].is_array();
                    namespace_passes.push((key.clone(), remaining, has_conditions));
                }
                continue;
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
        let mut changed = !work.is_empty();
        for (key, remaining, has_conditions) in namespace_passes {
            // Another pass after a short wait, as the real controller requeues.
            self.namespace_deadlines.insert(
                key.clone(),
                std::time::Instant::now() + std::time::Duration::from_millis(200),
            );
            let held: Vec<&Value> = remaining.iter().filter(|o| terminating(o)).collect();
            if held.len() < remaining.len() || has_conditions {
                continue;
            }
            // Everything left waits for finalizers: the controller says so in conditions.
            changed = true;
            let conditions = namespace_conditions(&remaining, &self.kinds);
            if let Some(kind) = self
                .kinds
                .iter()
                .find(|k| k.group.is_empty() && k.plural == "namespaces")
                .cloned()
            {
                let _ = self.patch(
                    &kind,
                    "",
                    &key.name,
                    Part::Status,
                    Writer::Update("kube-controller-manager".into()),
                    |o| {
                        o["status"]["conditions"] = conditions.clone();
                        Ok(())
                    },
                );
            }
        }
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
}

/// The conditions the namespace controller writes while content waits for finalizers
/// (recordings 193, 194).
fn namespace_conditions(remaining: &[Value], kinds: &[crate::registry::Kind]) -> Value {
    let mut resources: std::collections::BTreeMap<String, usize> = Default::default();
    let mut held: std::collections::BTreeMap<String, usize> = Default::default();
    for object in remaining {
        let api_version = object["apiVersion"].as_str().unwrap_or("");
        let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        let kind = object["kind"].as_str().unwrap_or("");
        let plural = kinds
            .iter()
            .find(|k| k.group == group && k.kind == kind)
            .map(|k| k.plural.clone())
            .unwrap_or_default();
        let resource = if group.is_empty() {
            plural
        } else {
            format!("{plural}.{group}")
        };
        *resources.entry(resource).or_default() += 1;
        for finalizer in finalizers(object) {
            *held.entry(finalizer).or_default() += 1;
        }
    }
    let list = |counts: &std::collections::BTreeMap<String, usize>, how: &str| {
        counts
            .iter()
            .map(|(name, n)| format!("{name} {how} {n} resource instances"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let at = now();
    json!([
        {"type": "NamespaceDeletionDiscoveryFailure", "status": "False", "lastTransitionTime": at,
         "reason": "ResourcesDiscovered", "message": "All resources successfully discovered"},
        {"type": "NamespaceDeletionGroupVersionParsingFailure", "status": "False", "lastTransitionTime": at,
         "reason": "ParsedGroupVersions", "message": "All legacy kube types successfully parsed"},
        {"type": "NamespaceDeletionContentFailure", "status": "False", "lastTransitionTime": at,
         "reason": "ContentDeleted", "message": "All content successfully deleted, may be waiting on finalization"},
        {"type": "NamespaceContentRemaining", "status": "True", "lastTransitionTime": at,
         "reason": "SomeResourcesRemain", "message": format!("Some resources are remaining: {}", list(&resources, "has"))},
        {"type": "NamespaceFinalizersRemaining", "status": "True", "lastTransitionTime": at,
         "reason": "SomeFinalizersRemain", "message": format!("Some content in the namespace has finalizers remaining: {}", list(&held, "in"))},
    ])
}
