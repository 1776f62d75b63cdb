//! HTTP: routes Kubernetes API paths to the store (`lists`, `watch` and `discovery` hold
//! what their names say).
//!
//! Paths: `/version`, `/healthz|readyz|livez`, discovery (`/api`, `/api/v1`, `/apis`,
//! `/apis/G`, `/apis/G/V`), and resources under `/api/v1` or `/apis/G/V`:
//! `[namespaces/NS/]PLURAL[/NAME[/SUBRESOURCE]]`. Every request is authenticated and
//! authorized first (`crate::auth`); `serviceaccounts/NAME/token` issues tokens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::auth::{Attributes, Identity};
use crate::errors::ApiError;
use crate::patch;
use crate::registry::Kind;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{
    set_path, spec_replicas_path, Deleted, FieldValidation, Part, Propagation, Store, Writer,
};
use crate::views;

mod discovery;
mod lists;
mod watch;

use discovery::*;
use lists::*;
use watch::*;

/// Shared server state.
pub type Shared = Arc<Mutex<Store>>;

struct ResourcePath {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn json_response(status: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.is_page() {
            return Response::builder()
                .status(404)
                .header("Content-Type", "text/plain; charset=utf-8")
                .body(axum::body::Body::from(self.message))
                .expect("a valid response");
        }
        let warnings = self.warnings.clone();
        with_warnings(json_response(self.code, &self.body()), warnings)
    }
}

/// The one handler: every request comes here.
pub async fn handle(
    axum::extract::State(store): axum::extract::State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query: HashMap<String, String> = uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    // Non-apply writes are recorded under `fieldManager`, else the User-Agent up to its
    // first '/', as the real server names them.
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("unknown");
    let manager = query.get("fieldManager").cloned().unwrap_or_else(|| {
        user_agent
            .split('/')
            .next()
            .unwrap_or("unknown")
            .to_string()
    });
    let verb = match (&method, query.get("watch").map(String::as_str)) {
        (&Method::GET, Some("1" | "true")) => "WATCH".to_string(),
        _ => method.to_string(),
    };
    let identity = {
        let mut store = store.lock().expect("store lock");
        store.note_request(format!("{verb} {}", uri.path()), &accept, user_agent);
        // Authentication, then authorization, before anything is looked up: a refused
        // request learns nothing of what exists.
        let authorization = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let identity = store.authenticate(authorization).and_then(|identity| {
            store
                .authorize(&identity, &Attributes::of(&verb, uri.path()))
                .map(|()| identity)
        });
        match identity {
            Ok(identity) => identity,
            Err(error) => return error.into_response(),
        }
    };
    let request = Request {
        identity: &identity,
        method: &method,
        path: uri.path(),
        query: &query,
        accept: &accept,
        content_type: &content_type,
        manager: &manager,
        body: &body,
    };
    let response = match route(&store, &request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    if serves_endpoints(uri.path()) {
        // Every answer about v1 Endpoints carries the deprecation (recording 156).
        return with_warnings(
            response,
            vec![
                "v1 Endpoints is deprecated in v1.33+; use discovery.k8s.io/v1 EndpointSlice"
                    .into(),
            ],
        );
    }
    response
}

/// Whether `path` is about core v1 Endpoints (a list, a namespace's, or one object).
fn serves_endpoints(path: &str) -> bool {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    matches!(
        segments.as_slice(),
        ["api", "v1", "endpoints"] | ["api", "v1", "namespaces", _, "endpoints", ..]
    )
}

/// What a handler needs of a request.
struct Request<'a> {
    identity: &'a Identity,
    method: &'a Method,
    path: &'a str,
    query: &'a HashMap<String, String>,
    accept: &'a str,
    content_type: &'a str,
    manager: &'a str,
    body: &'a Bytes,
}

async fn route(store: &Shared, request: &Request<'_>) -> Result<Response, ApiError> {
    let Request {
        identity,
        method,
        path,
        query,
        accept,
        content_type,
        manager,
        body,
    } = *request;
    let segments: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    match segments.as_slice() {
        ["version"] => return Ok(json_response(200, &version())),
        ["api"] | ["apis"] if wants_aggregated(accept) => {
            let store = store.lock().expect("store lock");
            let legacy = segments == ["api"];
            let body = aggregated_discovery(&store, legacy);
            return Ok((
                StatusCode::OK,
                [(header::CONTENT_TYPE, AGGREGATED)],
                body.to_string(),
            )
                .into_response());
        }
        [check @ ("healthz" | "readyz" | "livez")] => {
            // With `verbose`, each check on a line, as the real server lists its own.
            let text = if query.contains_key("verbose") {
                format!("[+]ping ok\n[+]log ok\n[+]etcd ok\n{check} check passed\n")
            } else {
                "ok".to_string()
            };
            return Ok((
                StatusCode::OK,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                text,
            )
                .into_response());
        }
        ["api"] => {
            return Ok(json_response(
                200,
                &json!({
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
                }),
            ));
        }
        ["apis"] => return Ok(json_response(200, &group_list(store))),
        ["api", "v1"] => return Ok(json_response(200, &resource_list(store, "", "v1")?)),
        ["apis", group] => return group_document(store, group),
        ["openapi", "v3"] => {
            let store = store.lock().expect("store lock");
            return Ok(json_response(200, &views::openapi_index(store.kinds())));
        }
        ["openapi", "v3", rest @ ..] => {
            let store = store.lock().expect("store lock");
            return views::openapi_document(store.kinds(), &rest.join("/"))
                .map(|doc| json_response(200, &doc))
                .ok_or_else(ApiError::no_route);
        }
        ["apis", group, version] => {
            return Ok(json_response(200, &resource_list(store, group, version)?))
        }
        _ => {}
    }
    if !accept_ok(accept) {
        return Err(ApiError::not_acceptable(accept));
    }
    let (group, version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(ApiError::page_not_found()),
    };
    let target = resolve(store, group, version, rest)?;
    let media = content_type.split(';').next().unwrap_or("").trim();
    let readable = matches!(
        media,
        "application/json"
            | "application/merge-patch+json"
            | "application/json-patch+json"
            | "application/strategic-merge-patch+json"
            | "application/apply-patch+yaml"
            | ""
    );
    if !body.is_empty() && !readable {
        return Err(ApiError::unsupported_media_type(media));
    }
    let dry_run = query.get("dryRun").is_some_and(|v| v == "All");
    let field_validation = match query.get("fieldValidation").map(String::as_str) {
        Some("Strict") => FieldValidation::Strict,
        Some("Ignore") => FieldValidation::Ignore,
        _ => FieldValidation::Warn,
    };
    match (&target.name, &target.subresource, method.clone()) {
        (None, None, Method::GET) => {
            let watching = query.get("watch").is_some_and(|w| w == "1" || w == "true");
            if watching {
                watch(store, target, query, accept)
            } else {
                list(store, &target, query, accept)
            }
        }
        (None, None, Method::POST) => {
            let object = parse_json(body)?;
            let namespace = target.namespace.clone().unwrap_or_default();
            let mut guard = begin(store, field_validation);
            let created = guard
                .create(
                    &target.kind,
                    &namespace,
                    object,
                    dry_run,
                    Writer::Update(manager.to_string()),
                )
                .map_err(|e| e.with_warnings(guard.take_warnings()))?;
            Ok(with_warnings(
                json_response(201, &created),
                guard.take_warnings(),
            ))
        }
        (None, None, Method::DELETE) => delete_collection(store, &target, query),
        (Some(name), Some(sub), Method::POST) if sub == "token" && target.kind.issues_tokens() => {
            let request = parse_json(body)?;
            let namespace = target.namespace.clone().unwrap_or_default();
            let issued = store
                .lock()
                .expect("store lock")
                .request_token(&namespace, name, &request)?;
            Ok(json_response(201, &issued))
        }
        (Some(_), _, Method::POST) => Err(ApiError::method_not_allowed()),
        (Some(name), None, Method::GET) => {
            let namespace = target.namespace.clone().unwrap_or_default();
            let store = store.lock().expect("store lock");
            let object = store.get(&target.kind, &namespace, name)?;
            match first_media(accept) {
                Media::Table => Ok(json_response(
                    200,
                    &views::table(&target.kind, &[object], store.rv()),
                )),
                Media::Metadata => Ok(json_response(200, &partial_metadata(&object))),
                Media::Yaml => Ok((
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/yaml")],
                    serde_yaml_ng::to_string(&object).unwrap_or_default(),
                )
                    .into_response()),
                Media::Json => Ok(json_response(200, &object)),
            }
        }
        (Some(name), sub, Method::GET) if sub.is_some() => {
            let part = part(&target.kind, sub.as_deref())?;
            let namespace = target.namespace.clone().unwrap_or_default();
            let object = store
                .lock()
                .expect("store lock")
                .get(&target.kind, &namespace, name)?;
            Ok(json_response(200, &view(&target.kind, part, &object)))
        }
        (Some(name), sub, Method::PUT) => {
            let part = part(&target.kind, sub.as_deref())?;
            let object = parse_json(body)?;
            let namespace = target.namespace.clone().unwrap_or_default();
            let mut guard = begin(store, field_validation);
            let updated = if part == Part::Scale {
                // A Scale in, its replicas onto the object (optimistically, when it says).
                let replicas = object["spec"]["replicas"].clone();
                let rv = object["metadata"]["resourceVersion"].clone();
                let path = spec_replicas_path(&target.kind);
                guard.patch(
                    &target.kind,
                    &namespace,
                    name,
                    part,
                    Writer::Update(manager.to_string()),
                    |current| {
                        if rv.is_string() {
                            current["metadata"]["resourceVersion"] = rv;
                        }
                        set_path(current, &path, replicas);
                        Ok(())
                    },
                )?
            } else {
                guard.replace(
                    &target.kind,
                    &namespace,
                    name,
                    object,
                    part,
                    Writer::Update(manager.to_string()),
                )?
            };
            Ok(with_warnings(
                json_response(200, &view(&target.kind, part, &updated)),
                guard.take_warnings(),
            ))
        }
        (Some(name), sub, Method::PATCH)
            if content_type.starts_with("application/apply-patch+yaml") =>
        {
            let part = part(&target.kind, sub.as_deref())?;
            let Some(manager) = query.get("fieldManager").filter(|m| !m.is_empty()) else {
                return Err(ApiError::field_manager_required());
            };
            let text = std::str::from_utf8(body)
                .map_err(|_| ApiError::bad_request("the apply body is not UTF-8"))?;
            let applied: Value = serde_yaml_ng::from_str(text)
                .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
            let namespace = target.namespace.clone().unwrap_or_default();
            let force = query.get("force").is_some_and(|f| f == "true");
            let mut guard = begin(store, field_validation);
            // An apply that creates its object is also a `create` of that name. Only the
            // main resource: a subresource never creates (the real status and scale stores
            // answer 404 without asking).
            if part == Part::Main && guard.get(&target.kind, &namespace, name).is_err() {
                let create = Attributes::of("PATCH", path).as_verb("create", name);
                guard.authorize(identity, &create)?;
            }
            let (object, created) = guard.apply(
                &target.kind,
                &namespace,
                name,
                applied,
                manager,
                force,
                part,
                dry_run,
            )?;
            Ok(with_warnings(
                json_response(if created { 201 } else { 200 }, &object),
                guard.take_warnings(),
            ))
        }
        (Some(name), sub, Method::PATCH) => {
            let part = part(&target.kind, sub.as_deref())?;
            let patch_body = parse_json(body)?;
            let namespace = target.namespace.clone().unwrap_or_default();
            let kind = target.kind.clone();
            let media = content_type
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            let mut guard = begin(store, field_validation);
            let updated = guard.patch(
                &kind,
                &namespace,
                name,
                part,
                Writer::Update(manager.to_string()),
                |object| {
                    let patch_in_place = |target: &mut Value| match media.as_str() {
                        "application/merge-patch+json" => {
                            patch::merge(target, &patch_body);
                            Ok(())
                        }
                        "application/json-patch+json" => patch::json_patch(target, &patch_body)
                            .map_err(|_| ApiError::patch_failed()),
                        "application/strategic-merge-patch+json" if !kind.custom => {
                            patch::strategic(target, &patch_body);
                            Ok(())
                        }
                        other => Err(ApiError::unsupported_media_type(other)),
                    };
                    if part != Part::Scale {
                        return patch_in_place(object);
                    }
                    // A patch to /scale patches the Scale view; its replicas go back.
                    let mut scale = views::scale(&kind, object);
                    patch_in_place(&mut scale)?;
                    set_path(
                        object,
                        &spec_replicas_path(&kind),
                        scale["spec"]["replicas"].clone(),
                    );
                    Ok(())
                },
            )?;
            Ok(with_warnings(
                json_response(200, &view(&kind, part, &updated)),
                guard.take_warnings(),
            ))
        }
        (Some(name), None, Method::DELETE) => {
            let options = if body.is_empty() {
                json!({})
            } else {
                parse_json(body)?
            };
            let namespace = target.namespace.clone().unwrap_or_default();
            let policy = options["propagationPolicy"]
                .as_str()
                .or(query.get("propagationPolicy").map(String::as_str));
            let orphan = options["orphanDependents"].as_bool() == Some(true)
                || query.get("orphanDependents").is_some_and(|v| v == "true");
            let propagation = match policy {
                Some("Foreground") => Propagation::Foreground,
                Some("Orphan") => Propagation::Orphan,
                Some("Background") | None if !orphan => Propagation::Background,
                None => Propagation::Orphan,
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                        "unknown propagationPolicy {other:?}"
                    )))
                }
            };
            let deleted = store.lock().expect("store lock").delete(
                &target.kind,
                &namespace,
                name,
                options["preconditions"]["uid"].as_str(),
                options["preconditions"]["resourceVersion"].as_str(),
                propagation,
            )?;
            Ok(match deleted {
                Deleted::Marked(object) => json_response(200, &object),
                Deleted::Gone(object) => json_response(200, &deleted_status(&target.kind, &object)),
            })
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn accept_ok(accept: &str) -> bool {
    accept.split(',').any(|media| {
        let base = media.split(';').next().unwrap_or("").trim();
        matches!(
            base,
            "application/json" | "application/yaml" | "*/*" | "application/*" | ""
        )
    })
}

fn part(kind: &Kind, subresource: Option<&str>) -> Result<Part, ApiError> {
    match subresource {
        None => Ok(Part::Main),
        Some("status") if kind.status => Ok(Part::Status),
        Some("scale") if kind.scale => Ok(Part::Scale),
        Some(_) => Err(ApiError::no_route()),
    }
}

/// Locks the store for one write with its `fieldValidation` mode; the same guard then
/// hands over that write's warnings, so concurrent requests never see each other's.
fn begin(store: &Shared, mode: FieldValidation) -> std::sync::MutexGuard<'_, Store> {
    let mut guard = store.lock().expect("store lock");
    guard.begin_request(mode);
    guard
}

/// Adds `Warning: 299 - "..."` headers, as the real server reports pruned fields.
fn with_warnings(mut response: Response, warnings: Vec<String>) -> Response {
    for warning in warnings {
        let text = format!("299 - \"{}\"", warning.replace('"', "\\\""));
        if let Ok(value) = axum::http::HeaderValue::from_str(&text) {
            response.headers_mut().append(header::WARNING, value);
        }
    }
    response
}

/// What a subresource shows of an object: the Scale view for `/scale`, else the object.
fn view(kind: &Kind, part: Part, object: &Value) -> Value {
    match part {
        Part::Scale => views::scale(kind, object),
        Part::Main | Part::Status => object.clone(),
    }
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding the body: {e}")))
}

fn deleted_status(kind: &Kind, object: &Value) -> Value {
    let mut details = json!({
        "name": object["metadata"]["name"],
        "kind": kind.plural,
        "uid": object["metadata"]["uid"],
    });
    if !kind.group.is_empty() {
        details["group"] = json!(kind.group);
    }
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details})
}

fn resolve(
    store: &Shared,
    group: &str,
    version: &str,
    rest: &[&str],
) -> Result<ResourcePath, ApiError> {
    let store = store.lock().expect("store lock");
    let find = |plural: &str| store.kind(group, version, plural);
    let namespaced_kind = match rest {
        ["namespaces", _, plural, ..] => find(plural).filter(|k| k.namespaced),
        _ => None,
    };
    let (kind, namespace, tail) = match (namespaced_kind, rest) {
        (Some(kind), ["namespaces", ns, _, tail @ ..]) => (kind, Some(ns.to_string()), tail),
        (_, [plural, tail @ ..]) => {
            let kind = find(plural).ok_or_else(ApiError::page_not_found)?;
            (kind, None, tail)
        }
        _ => return Err(ApiError::no_route()),
    };
    let (name, subresource) = match tail {
        [] => (None, None),
        [name] => (Some(name.to_string()), None),
        [name, sub] => (Some(name.to_string()), Some(sub.to_string())),
        _ => return Err(ApiError::no_route()),
    };
    if kind.namespaced && namespace.is_none() && name.is_some() {
        return Err(ApiError::no_route());
    }
    Ok(ResourcePath {
        kind,
        namespace,
        name,
        subresource,
    })
}

fn selectors(query: &HashMap<String, String>) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
        .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?;
    let fields = FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))
        .map_err(ApiError::bad_request)?;
    Ok((labels, fields))
}
