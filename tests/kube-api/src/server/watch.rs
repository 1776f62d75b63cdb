//! Watches: history replay from a resourceVersion, live changes, selectors that make
//! objects enter or leave, bookmarks, the initial-events-end marker, 410 Gone, timeouts.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::errors::ApiError;
use crate::selector::{labels_of, FieldSelector, LabelSelector};
use crate::store::{Change, ChangeType};
use crate::views;

use super::*;

/// What a watch sends for `change`, given its selectors: a label change can make an object
/// enter (ADDED) or leave (DELETED) the selection.
pub(super) fn watch_event(
    change: &Change,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> Option<(&'static str, Value)> {
    let selected = |o: &Value| labels.matches(&labels_of(o)) && fields.matches(o);
    let now = selected(&change.object);
    let before = change.previous.as_ref().map(selected);
    match (change.change, before, now) {
        (ChangeType::Added, _, true) => Some(("ADDED", change.object.clone())),
        (ChangeType::Deleted, _, true) => Some(("DELETED", change.object.clone())),
        (ChangeType::Modified, Some(true), true) => Some(("MODIFIED", change.object.clone())),
        (ChangeType::Modified, Some(false), true) => Some(("ADDED", change.object.clone())),
        (ChangeType::Modified, Some(true), false) => {
            let mut last = change.previous.clone().expect("checked");
            last["metadata"]["resourceVersion"] =
                change.object["metadata"]["resourceVersion"].clone();
            Some(("DELETED", last))
        }
        _ => None,
    }
}

pub(super) fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

pub(super) fn watch(
    store: &Shared,
    target: ResourcePath,
    query: &HashMap<String, String>,
    accept: &str,
) -> Result<Response, ApiError> {
    let as_table = wants_table(accept);
    let as_metadata = first_media(accept) == Media::Metadata;
    let (labels, fields) = selectors(query)?;
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true" || v == "1");
    let initial_events = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    let from: Option<u64> = match query.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(rv) => Some(
            rv.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?,
        ),
    };
    let kind = target.kind.clone();
    let in_scope = {
        let (group, plural, namespace) = (
            kind.storage_group().to_string(),
            kind.plural.clone(),
            target.namespace.clone(),
        );
        move |change: &Change| {
            change.key.group == group
                && change.key.plural == plural
                && namespace
                    .as_ref()
                    .is_none_or(|ns| &change.key.namespace == ns)
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
    let (mut changes, backlog, floor, current) = {
        let store = store.lock().expect("store lock");
        let changes = store.subscribe();
        let current = store.rv();
        let backlog: Vec<(&'static str, Value)> = match from {
            Some(rv) if rv < kind.watch_start => {
                let error = ApiError::expired(rv, kind.watch_start);
                let _ = tx.try_send(event_line("ERROR", &error.body()));
                drop(tx);
                return Ok(stream_response(rx));
            }
            Some(rv) if !initial_events => match store.changes_since(rv) {
                Some(history) => history
                    .iter()
                    .filter(|c| in_scope(c))
                    .filter_map(|c| watch_event(c, &labels, &fields))
                    .collect(),
                None => {
                    let error = ApiError::expired(rv, kind.watch_start);
                    let _ = tx.try_send(event_line("ERROR", &error.body()));
                    drop(tx);
                    return Ok(stream_response(rx));
                }
            },
            _ => store
                .list(&kind, target.namespace.as_deref(), &labels, &fields)
                .into_iter()
                .map(|o| ("ADDED", o))
                .collect(),
        };
        // Live changes at or below `floor` are covered by the backlog (or predate a future rv).
        (changes, backlog, from.unwrap_or(0).max(current), current)
    };
    let api_version = kind.api_version();
    let kind_name = kind.kind.clone();
    // An event carries the object, or a one-row Table of it when the client asked for Tables.
    let render = move |mut object: Value| {
        crate::builtin::convert(&mut object, &kind);
        if as_metadata {
            return partial_metadata(&object);
        }
        if as_table {
            let rv = object["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            views::table(&kind, &[object], rv)
        } else {
            object
        }
    };
    tokio::spawn(async move {
        let mut last_rv = current;
        for (event, object) in backlog {
            if tx.send(event_line(event, &render(object))).await.is_err() {
                return;
            }
        }
        let bookmark = |rv: u64, initial_end: bool| {
            let mut metadata = json!({"resourceVersion": rv.to_string()});
            if initial_end {
                metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            }
            event_line(
                "BOOKMARK",
                &json!({"kind": kind_name, "apiVersion": api_version, "metadata": metadata}),
            )
        };
        if initial_events && bookmarks && tx.send(bookmark(current, true)).await.is_err() {
            return;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        // Bookmarks shortly before the watch ends, and every 30 s on long watches.
        let mut next_bookmark = tokio::time::Instant::now()
            + timeout
                .saturating_sub(Duration::from_millis(1500))
                .min(Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                _ = tokio::time::sleep_until(next_bookmark), if bookmarks => {
                    if tx.send(bookmark(last_rv, false)).await.is_err() {
                        return;
                    }
                    next_bookmark = (next_bookmark + Duration::from_secs(30)).min(deadline + Duration::from_secs(1));
                }
                received = changes.recv() => match received {
                    Ok(change) => {
                        last_rv = change.rv;
                        if change.rv <= floor || !in_scope(&change) {
                            continue;
                        }
                                                if let Some((event, object)) = watch_event(&change, &labels, &fields) {
                            if tx.send(event_line(event, &render(object))).await.is_err() {
                                return;
                            }
                        }
                    }
                    // Fell behind: end the watch; the client lists or rewatches.
                    Err(_) => break,
                },
            }
        }
    });
    Ok(stream_response(rx))
}

pub(super) fn stream_response(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<_, std::convert::Infallible>(bytes), rx))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}
