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
}
