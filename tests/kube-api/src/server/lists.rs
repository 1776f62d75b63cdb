//! Lists: Tables, PartialObjectMetadata, YAML and JSON forms, continue tokens and limits,
//! lists at an exact resourceVersion, and delete-collection.

use std::collections::HashMap;

use axum::response::Response;
use serde_json::{json, Value};

use crate::errors::ApiError;
use crate::store::{Deleted, Propagation};
use crate::views;

use super::*;

/// The form a client asked for first: a `meta.k8s.io/v1` Table (as `kubectl get` does),
/// PartialObjectMetadata (kube-rs's metadata watches), YAML, or the object as JSON.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Media {
    Json,
    Table,
    Metadata,
    Yaml,
}

pub(super) fn first_media(accept: &str) -> Media {
    let first = accept.split(',').next().unwrap_or("");
    if first.contains("as=Table") {
        Media::Table
    } else if first.contains("as=PartialObjectMetadata") {
        Media::Metadata
    } else if first.trim().starts_with("application/yaml") {
        Media::Yaml
    } else {
        Media::Json
    }
}

pub(super) fn wants_table(accept: &str) -> bool {
    first_media(accept) == Media::Table
}

/// An object reduced to its metadata (`meta.k8s.io/v1` PartialObjectMetadata).
pub(super) fn partial_metadata(object: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": object["metadata"]})
}

pub(super) fn list(
    store: &Shared,
    target: &ResourcePath,
    query: &HashMap<String, String>,
    accept: &str,
) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(query)?;
    let store = store.lock().expect("store lock");
    let exact = query
        .get("resourceVersionMatch")
        .is_some_and(|m| m == "Exact");
    let (mut items, rv) = match query
        .get("resourceVersion")
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(at) if exact => {
            let items = store
                .list_at(
                    &target.kind,
                    target.namespace.as_deref(),
                    &labels,
                    &fields,
                    at,
                )
                .ok_or_else(|| ApiError::expired(at, store.rv()))?;
            (items, at)
        }
        _ => (
            store.list(&target.kind, target.namespace.as_deref(), &labels, &fields),
            store.rv(),
        ),
    };
    drop(store);
    if wants_table(accept) {
        return Ok(json_response(200, &views::table(&target.kind, &items, rv)));
    }
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some(token) = query.get("continue").filter(|t| !t.is_empty()) {
        let start = decode_continue(token)?;
        items.retain(|item| item_position(item) > start);
    }
    if let Some(limit) = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
    {
        if items.len() > limit {
            let remaining = items.len() - limit;
            items.truncate(limit);
            let last = item_position(items.last().expect("limit > 0"));
            metadata["continue"] = json!(encode_continue(rv, &last));
            metadata["remainingItemCount"] = json!(remaining);
        }
    }
    if first_media(accept) == Media::Metadata {
        let items: Vec<Value> = items.iter().map(partial_metadata).collect();
        return Ok(json_response(
            200,
            &json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1",
                    "metadata": metadata, "items": items}),
        ));
    }
    Ok(json_response(
        200,
        &json!({
            "kind": format!("{}List", target.kind.kind),
            "apiVersion": target.kind.api_version(),
            "metadata": metadata,
            "items": items,
        }),
    ))
}

pub(super) fn item_position(item: &Value) -> String {
    format!(
        "{}/{}",
        item["metadata"]["namespace"].as_str().unwrap_or(""),
        item["metadata"]["name"].as_str().unwrap_or("")
    )
}

pub(super) fn encode_continue(rv: u64, last: &str) -> String {
    use base64::Engine;
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{last}\u{0}")});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

pub(super) fn decode_continue(token: &str) -> Result<String, ApiError> {
    use base64::Engine;
    let invalid = || ApiError::bad_request("continue key is not valid");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|_| invalid())?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    value["start"]
        .as_str()
        .map(|s| s.trim_end_matches('\u{0}').to_string())
        .ok_or_else(invalid)
}

pub(super) fn delete_collection(
    store: &Shared,
    target: &ResourcePath,
    query: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(query)?;
    let mut store = store.lock().expect("store lock");
    let victims = store.list(&target.kind, target.namespace.as_deref(), &labels, &fields);
    let mut items = Vec::new();
    for victim in victims {
        let namespace = victim["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = victim["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_string();
        match store.delete(
            &target.kind,
            &namespace,
            &name,
            None,
            None,
            Propagation::Background,
        )? {
            Deleted::Gone(object) | Deleted::Marked(object) => items.push(object),
        }
    }
    Ok(json_response(
        200,
        &json!({
            "kind": format!("{}List", target.kind.kind),
            "apiVersion": target.kind.api_version(),
            "metadata": {"resourceVersion": store.rv().to_string()},
            "items": items,
        }),
    ))
}
