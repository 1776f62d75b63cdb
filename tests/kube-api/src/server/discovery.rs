//! Discovery: /version, /api, /apis and their group and version documents, legacy and
//! aggregated (apidiscovery.k8s.io/v2).

use axum::response::Response;
use serde_json::{json, Value};

use crate::errors::ApiError;
use crate::registry::{api_group, Kind};
use crate::store::Store;

use super::*;

pub(super) fn version() -> Value {
    json!({
        "major": "1",
        "minor": "36",
        "gitVersion": "v1.36.2-mailpipe-test",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-11-24T00:00:00Z",
        "goVersion": "rust",
        "compiler": "rustc",
        "platform": "linux/amd64",
    })
}

pub(super) fn groups(store: &Store) -> Vec<(String, Vec<String>)> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for kind in store.kinds().iter().filter(|k| !k.group.is_empty()) {
        match groups.iter_mut().find(|(g, _)| g == &kind.group) {
            Some((_, versions)) if !versions.contains(&kind.version) => {
                versions.push(kind.version.clone())
            }
            Some(_) => {}
            None => groups.push((kind.group.clone(), vec![kind.version.clone()])),
        }
    }
    groups
}

/// The media type of aggregated discovery, which kubectl asks for first.
pub(super) const AGGREGATED: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// Whether the client prefers aggregated discovery (v2) to the legacy documents.
pub(super) fn wants_aggregated(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.replace(' ', "") == AGGREGATED)
}

/// `/api` or `/apis` as one APIGroupDiscoveryList: every group, version and resource.
pub(super) fn aggregated_discovery(store: &Store, legacy: bool) -> Value {
    let group_names: Vec<(String, Vec<String>)> = if legacy {
        vec![(String::new(), vec!["v1".to_string()])]
    } else {
        groups(store)
    };
    let items: Vec<Value> = group_names
        .iter()
        .map(|(group, versions)| {
            let versions: Vec<Value> = versions
                .iter()
                .map(|version| {
                    let mut kinds: Vec<&Kind> = store
                        .kinds()
                        .iter()
                        .filter(|k| &k.group == group && &k.version == version)
                        .collect();
                    kinds.sort_by(|a, b| a.plural.cmp(&b.plural));
                    let resources: Vec<Value> =
                        kinds.iter().map(|k| k.aggregated_entry()).collect();
                    json!({"version": version, "resources": resources, "freshness": "Current"})
                })
                .collect();
            let metadata = if legacy {
                json!({})
            } else {
                json!({"name": group})
            };
            json!({"metadata": metadata, "versions": versions})
        })
        .collect();
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": items})
}

pub(super) fn group_list(store: &Shared) -> Value {
    let store = store.lock().expect("store lock");
    let groups: Vec<Value> = groups(&store)
        .iter()
        .map(|(g, vs)| api_group(g, vs))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub(super) fn group_document(store: &Shared, group: &str) -> Result<Response, ApiError> {
    let store = store.lock().expect("store lock");
    let (name, versions) = groups(&store)
        .into_iter()
        .find(|(g, _)| g == group)
        .ok_or_else(ApiError::no_route)?;
    let mut document = api_group(&name, &versions);
    document["kind"] = json!("APIGroup");
    document["apiVersion"] = json!("v1");
    Ok(json_response(200, &document))
}

pub(super) fn resource_list(store: &Shared, group: &str, version: &str) -> Result<Value, ApiError> {
    let store = store.lock().expect("store lock");
    let kinds: Vec<&Kind> = store
        .kinds()
        .iter()
        .filter(|k| k.group == group && k.version == version)
        .collect();
    if kinds.is_empty() {
        return Err(ApiError::page_not_found());
    }
    let resources: Vec<Value> = kinds.iter().flat_map(|k| k.discovery_entries()).collect();
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    let mut list =
        json!({"kind": "APIResourceList", "groupVersion": group_version, "resources": resources});
    if !group.is_empty() {
        list["apiVersion"] = json!("v1");
    }
    Ok(list)
}
