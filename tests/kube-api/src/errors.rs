//! API errors as the real server reports them: a `Status` object with reason and code.

use serde_json::{json, Value};

use crate::registry::Kind;

/// An error answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub code: u16,
    /// `NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, `BadRequest`, ...
    pub reason: &'static str,
    /// Human message.
    pub message: String,
    /// `details`, when the real server sends them.
    pub details: Option<Value>,
    /// `Warning` headers the request earned before it failed (a CRD's unknown formats are
    /// reported on a 409 too).
    pub warnings: Vec<String>,
}

fn details(kind: &Kind, name: &str) -> Value {
    let mut d = json!({"name": name, "kind": kind.plural});
    if !kind.group.is_empty() {
        d["group"] = json!(kind.group);
    }
    d
}

impl ApiError {
    pub(crate) fn new(
        code: u16,
        reason: &'static str,
        message: String,
        details: Option<Value>,
    ) -> ApiError {
        ApiError {
            code,
            reason,
            message,
            details,
            warnings: Vec::new(),
        }
    }

    /// The same error, with the warnings the request earned on its way.
    pub fn with_warnings(mut self, warnings: Vec<String>) -> ApiError {
        self.warnings = warnings;
        self
    }

    /// 500 from server-side apply when the applied object has a field the schema does not
    /// declare: no reason, no details, whatever `fieldValidation` says (recordings
    /// 162-165). `namespace` is empty in the message, as the real server prints it.
    pub fn typed_patch(kind: &Kind, name: &str, field: &str) -> ApiError {
        ApiError::new(
            500,
            "",
            format!(
                "failed to create typed patch object (/{name}; {}, Kind={}): .{field}: field not declared in schema",
                kind.api_version(),
                kind.kind
            ),
            None,
        )
    }

    /// 404 for an object.
    pub fn not_found(kind: &Kind, name: &str) -> ApiError {
        let message = format!("{} \"{name}\" not found", kind.group_resource());
        ApiError::new(404, "NotFound", message, Some(details(kind, name)))
    }

    /// 404 for a group, version or resource the server does not serve: the real server
    /// answers these from its mux with a plain-text page, not a Status.
    pub fn page_not_found() -> ApiError {
        ApiError::new(404, "", "404 page not found\n".into(), None)
    }

    /// Whether this error is the plain-text 404 page.
    pub fn is_page(&self) -> bool {
        self.reason.is_empty() && self.code == 404
    }

    /// 404 for a path the server does not serve.
    pub fn no_route() -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource".into(),
            Some(json!({})),
        )
    }

    /// 409 on create of an existing name.
    pub fn already_exists(kind: &Kind, name: &str) -> ApiError {
        let message = format!("{} \"{name}\" already exists", kind.group_resource());
        ApiError::new(409, "AlreadyExists", message, Some(details(kind, name)))
    }

    /// 409 on a stale resourceVersion or precondition.
    pub fn conflict(kind: &Kind, name: &str, why: &str) -> ApiError {
        let message = format!(
            "Operation cannot be fulfilled on {} \"{name}\": {why}",
            kind.group_resource()
        );
        ApiError::new(409, "Conflict", message, Some(details(kind, name)))
    }

    /// 422 with field causes `(field, reason, message)`, as in
    /// `EmailPipeline.mailpipe.dev "x" is invalid: field: message`.
    pub fn invalid(
        kind: &Kind,
        name: &str,
        causes: Vec<(String, &'static str, String)>,
    ) -> ApiError {
        let mut text: Vec<String> = causes.iter().map(|(f, _, m)| format!("{f}: {m}")).collect();
        text.dedup();
        let qualified = if kind.group.is_empty() {
            kind.kind.clone()
        } else {
            format!("{}.{}", kind.kind, kind.group)
        };
        let listed = if text.len() == 1 {
            text[0].clone()
        } else {
            format!("[{}]", text.join(", "))
        };
        let message = format!("{qualified} \"{name}\" is invalid: {listed}");
        let mut d = details(kind, name);
        d["kind"] = json!(kind.kind);
        d["causes"] = causes
            .iter()
            .map(|(field, reason, message)| json!({"reason": reason, "message": message, "field": field}))
            .collect();
        ApiError::new(422, "Invalid", message, Some(d))
    }

    /// 422 for a custom-resource update without resourceVersion.
    pub fn resource_version_required(kind: &Kind, name: &str) -> ApiError {
        let message = "Invalid value: 0: must be specified for an update";
        let mut d = details(kind, name);
        d["causes"] = json!([{"reason": "FieldValueInvalid", "message": message, "field": "metadata.resourceVersion"}]);
        ApiError::new(
            422,
            "Invalid",
            format!(
                "{} \"{name}\" is invalid: metadata.resourceVersion: {message}",
                kind.group_resource()
            ),
            Some(d),
        )
    }

    /// 422 for a JSON patch whose operation failed (the real server gives no detail).
    pub fn patch_failed() -> ApiError {
        ApiError::new(
            422,
            "Invalid",
            "the server rejected our request due to an error in our request".into(),
            Some(json!({})),
        )
    }

    /// 409 for a server-side apply that would change fields other managers own; each
    /// conflict is (manager as described, field path).
    pub fn apply_conflicts(conflicts: &[(String, String)]) -> ApiError {
        let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
        for (manager, field) in conflicts {
            match groups.iter_mut().find(|(m, _)| m == manager) {
                Some((_, fields)) => fields.push(field),
                None => groups.push((manager, vec![field])),
            }
        }
        let message = if conflicts.len() == 1 {
            format!(
                "Apply failed with 1 conflict: conflict with {}: {}",
                conflicts[0].0, conflicts[0].1
            )
        } else {
            let parts: Vec<String> = groups
                .iter()
                .map(|(manager, fields)| {
                    let lines: Vec<String> = fields.iter().map(|f| format!("- {f}")).collect();
                    format!("conflicts with {manager}:\n{}", lines.join("\n"))
                })
                .collect();
            format!(
                "Apply failed with {} conflicts: {}",
                conflicts.len(),
                parts.join("\n")
            )
        };
        let causes: Vec<Value> = conflicts
            .iter()
            .map(|(manager, field)| {
                json!({"reason": "FieldManagerConflict", "message": format!("conflict with {manager}"), "field": field})
            })
            .collect();
        ApiError::new(409, "Conflict", message, Some(json!({"causes": causes})))
    }

    /// 422 for an apply without a field manager.
    pub fn field_manager_required() -> ApiError {
        ApiError::new(
            422,
            "Invalid",
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch".into(),
            Some(json!({"group": "meta.k8s.io", "kind": "PatchOptions", "causes": [{"reason": "FieldValueRequired", "message": "Required value: is required for apply patch", "field": "fieldManager"}]})),
        )
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message.into(), None)
    }

    /// 403 for a create in a namespace that is being deleted.
    pub fn namespace_terminating(kind: &Kind, name: &str, namespace: &str) -> ApiError {
        let mut details = details(kind, name);
        details["causes"] = json!([{
            "reason": "NamespaceTerminating",
            "message": format!("namespace {namespace} is being terminated"),
            "field": "metadata.namespace",
        }]);
        ApiError::new(
            403,
            "Forbidden",
            format!(
                "{} \"{name}\" is forbidden: unable to create new content in namespace {namespace} because it is being terminated",
                kind.group_resource()
            ),
            Some(details),
        )
    }

    /// 405 for a create of a custom resource whose definition is being deleted.
    pub fn definition_terminating() -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            "create not allowed while custom resource definition is terminating".into(),
            Some(json!({})),
        )
    }

    /// 405.
    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource".into(),
            Some(json!({})),
        )
    }

    /// 410 for a watch from a resourceVersion older than the watch cache.
    pub fn expired(rv: u64, oldest: u64) -> ApiError {
        ApiError::new(
            410,
            "Expired",
            format!("too old resource version: {rv} ({oldest})"),
            None,
        )
    }

    /// 415.
    pub fn unsupported_media_type(content_type: &str) -> ApiError {
        let _ = content_type;
        ApiError::new(415, "UnsupportedMediaType", "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml".into(), None)
    }

    /// 406.
    pub fn not_acceptable(accept: &str) -> ApiError {
        ApiError::new(406, "NotAcceptable", format!("only the following media types are accepted: application/json, application/yaml (got {accept})"), None)
    }

    /// The `Status` body.
    pub fn body(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if self.reason.is_empty() {
            status.as_object_mut().expect("an object").remove("reason");
        }
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}
