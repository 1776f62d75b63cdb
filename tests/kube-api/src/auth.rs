//! Who a request is, and what it may do, as the real server decides.
//!
//! Authentication: a request with `Authorization: Bearer <token>` is the ServiceAccount the
//! token was issued for through the TokenRequest API (`POST .../serviceaccounts/NAME/token`,
//! as a kubelet asks for a pod's token); an unknown or expired token, or one whose
//! ServiceAccount was deleted (or deleted and created again), is answered 401. A request
//! without credentials is the cluster admin, as the recordings' client certificate
//! (`system:masters`) was: tests that do not care about identity keep working unchanged.
//!
//! Authorization, for ServiceAccounts: the RBAC authorizer over the stored ClusterRoles,
//! Roles and their bindings, plus what the bootstrap policy gives every authenticated user
//! (discovery, health, version, OpenAPI, the self reviews). A request is read into the
//! attributes the real request-info resolver gives (verb, API group, resource and
//! subresource, namespace, name), and a server-side apply that creates its object is also
//! authorized as `create` of that name, as the real patch handler does. Refusals are 403s
//! with the real message. The store keeps every rule grant that allowed a request and
//! every refusal, so tests can compare a component's RBAC with what it really used.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::errors::ApiError;
use crate::store::Store;

/// Who a request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// No credentials: the cluster admin.
    Admin,
    /// A ServiceAccount token.
    ServiceAccount { namespace: String, name: String },
}

impl Identity {
    /// The user name the authorizer and error messages use.
    pub fn username(&self) -> String {
        match self {
            Identity::Admin => "admin".to_string(),
            Identity::ServiceAccount { namespace, name } => {
                format!("system:serviceaccount:{namespace}:{name}")
            }
        }
    }
}

/// What a request asks for, as the authorizer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    pub verb: String,
    /// `None` for a non-resource request (`/version`, discovery documents, health).
    pub resource: Option<Resource>,
    /// The path, for non-resource rules.
    pub path: String,
}

/// The resource part of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub group: String,
    /// `deployments`.
    pub resource: String,
    /// `scale`, or empty.
    pub subresource: String,
    pub namespace: Option<String>,
    /// Empty for a list, a watch and a create.
    pub name: String,
}

impl Resource {
    /// `deployments` or `deployments/scale`.
    pub fn full(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

impl Attributes {
    /// The attributes of `method` (`WATCH` for a GET with `watch=true`) on `path`.
    pub fn of(method: &str, path: &str) -> Attributes {
        let segments: Vec<&str> = path
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        let non_resource = || Attributes {
            verb: method.to_ascii_lowercase(),
            resource: None,
            path: path.to_string(),
        };
        let rest = match segments.as_slice() {
            ["api", "v1", rest @ ..] if !rest.is_empty() => rest,
            ["apis", group, _version, rest @ ..] if !rest.is_empty() => {
                return Attributes::resource(method, path, group, rest);
            }
            _ => return non_resource(),
        };
        Attributes::resource(method, path, "", rest)
    }

    fn resource(method: &str, path: &str, group: &str, rest: &[&str]) -> Attributes {
        let (namespace, rest) = match rest {
            // A namespace itself (or its status, its finalize): cluster-scoped here. The real
            // resolver also names the namespace, which lets a Role in it grant its own
            // namespace; taking it as cluster-scoped is the stricter reading.
            ["namespaces", _] | ["namespaces", _, "status" | "finalize"] => (None, rest),
            ["namespaces", ns, rest @ ..] => (Some(ns.to_string()), rest),
            rest => (None, rest),
        };
        let (resource, name, subresource) = match rest {
            [resource] => (*resource, "", ""),
            [resource, name] => (*resource, *name, ""),
            [resource, name, sub, ..] => (*resource, *name, *sub),
            [] => ("namespaces", "", ""),
        };
        let verb = match (method, name.is_empty()) {
            ("WATCH", _) => "watch",
            ("GET" | "HEAD", false) => "get",
            ("GET" | "HEAD", true) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", false) => "delete",
            ("DELETE", true) => "deletecollection",
            (other, _) => {
                return Attributes {
                    verb: other.to_ascii_lowercase(),
                    resource: None,
                    path: path.to_string(),
                }
            }
        };
        Attributes {
            verb: verb.to_string(),
            resource: Some(Resource {
                group: group.to_string(),
                resource: resource.to_string(),
                subresource: subresource.to_string(),
                namespace,
                // A create names no object, but for a subresource (a TokenRequest).
                name: if verb == "create" && subresource.is_empty() {
                    String::new()
                } else {
                    name.to_string()
                },
            }),
            path: path.to_string(),
        }
    }

    /// The same request authorized as another verb on the named object (the `create` a
    /// server-side apply that creates its object needs).
    pub fn as_verb(&self, verb: &str, name: &str) -> Attributes {
        let mut other = self.clone();
        other.verb = verb.to_string();
        if let Some(resource) = other.resource.as_mut() {
            resource.name = name.to_string();
        }
        other
    }
}

/// One rule's permission that allowed a request: which role, and the group, resource, verb
/// and (for a rule with `resourceNames`) the name it allowed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Grant {
    /// `ClusterRole/NAME`, or `Role/NAMESPACE/NAME`.
    pub role: String,
    /// For a ClusterRole bound by a RoleBinding: the namespace it was bound in.
    pub bound_in: Option<String>,
    pub group: String,
    pub resource: String,
    pub verb: String,
    pub name: Option<String>,
}

/// A ServiceAccount token the server gave out.
#[derive(Debug, Clone)]
struct Token {
    namespace: String,
    name: String,
    uid: String,
    expires: Instant,
}

/// A token of the ServiceAccount `namespace/name`, valid for `seconds`, asked of the
/// TokenRequest API through `client`, as a kubelet asks for a pod's.
pub async fn token_for(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    seconds: i64,
) -> anyhow::Result<String> {
    let accounts: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
        kube::Api::namespaced(client.clone(), namespace);
    let request: k8s_openapi::api::authentication::v1::TokenRequest =
        serde_json::from_value(json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"audiences": [], "expirationSeconds": seconds},
        }))?;
    accounts
        .create_token_request(name, &Default::default(), &request)
        .await?
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| anyhow::anyhow!("the TokenRequest for {namespace}/{name} gave no token"))
}

/// What the server remembers about identities: tokens, the grants used, the refusals.
#[derive(Debug, Default)]
pub struct Ledger {
    tokens: std::collections::HashMap<String, Token>,
    issued: u64,
    grants: BTreeSet<(String, Grant)>,
    refusals: Vec<(String, String)>,
}

/// The shortest token lifetime a TokenRequest may ask for (the real server's minimum).
const MIN_EXPIRATION: u64 = 600;

impl Store {
    /// Issues a token for the ServiceAccount `namespace/name` (its `TokenRequest` body is
    /// `request`): the TokenRequest answered, with `status.token`.
    pub fn request_token(
        &mut self,
        namespace: &str,
        name: &str,
        request: &Value,
    ) -> Result<Value, ApiError> {
        let kinds = self.kind("", "v1", "serviceaccounts").expect("built in");
        let account = self.get(&kinds, namespace, name)?;
        let seconds = match &request["spec"]["expirationSeconds"] {
            Value::Null => 3600,
            value => value.as_u64().unwrap_or(0),
        };
        if seconds < MIN_EXPIRATION {
            return Err(ApiError::invalid_token_request(
                name,
                "spec.expirationSeconds",
                format!(
                    "Invalid value: {seconds}: may not specify a duration less than 10 minutes"
                ),
            ));
        }
        let ledger = &mut self.auth;
        ledger.issued += 1;
        let token = format!(
            "mailpipe-test.{}.{:016x}",
            ledger.issued,
            rand_u64() ^ ledger.issued
        );
        ledger.tokens.insert(
            token.clone(),
            Token {
                namespace: namespace.to_string(),
                name: name.to_string(),
                uid: account["metadata"]["uid"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                expires: Instant::now() + Duration::from_secs(seconds),
            },
        );
        let expires = chrono::Utc::now() + chrono::Duration::seconds(seconds as i64);
        let audiences = match &request["spec"]["audiences"] {
            Value::Array(a) if !a.is_empty() => json!(a),
            _ => json!(["https://kubernetes.default.svc.cluster.local"]),
        };
        Ok(json!({
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": null},
            "spec": {
                "audiences": audiences,
                "expirationSeconds": seconds,
                "boundObjectRef": request["spec"]["boundObjectRef"],
            },
            "status": {
                "token": token,
                "expirationTimestamp": expires.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            },
        }))
    }

    /// Who a request with this `Authorization` header is; 401 for credentials the server
    /// does not accept.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Identity, ApiError> {
        let Some(header) = authorization else {
            return Ok(Identity::Admin);
        };
        let token = header
            .strip_prefix("Bearer ")
            .ok_or_else(ApiError::unauthorized)?;
        let known = self
            .auth
            .tokens
            .get(token.trim())
            .ok_or_else(ApiError::unauthorized)?;
        if known.expires < Instant::now() {
            return Err(ApiError::unauthorized());
        }
        // A token is bound to its ServiceAccount: deleted, or deleted and made again, and
        // the token is no good.
        let kinds = self.kind("", "v1", "serviceaccounts").expect("built in");
        let live = self
            .get(&kinds, &known.namespace, &known.name)
            .ok()
            .filter(|sa| sa["metadata"]["uid"].as_str() == Some(known.uid.as_str()))
            .filter(|sa| !sa["metadata"]["deletionTimestamp"].is_string());
        if live.is_none() {
            return Err(ApiError::unauthorized());
        }
        Ok(Identity::ServiceAccount {
            namespace: known.namespace.clone(),
            name: known.name.clone(),
        })
    }

    /// Whether `identity` may do what `attributes` say: the grants that allow it (noted),
    /// or a 403 (noted too).
    pub fn authorize(
        &mut self,
        identity: &Identity,
        attributes: &Attributes,
    ) -> Result<(), ApiError> {
        let Identity::ServiceAccount { namespace, name } = identity else {
            return Ok(());
        };
        if everyone_may(attributes) {
            return Ok(());
        }
        let grants = self.grants_for(namespace, name, attributes);
        let user = identity.username();
        if grants.is_empty() {
            let line = describe(attributes);
            self.auth.refusals.push((user.clone(), line));
            return Err(ApiError::forbidden(&user, attributes));
        }
        for grant in grants {
            self.auth.grants.insert((user.clone(), grant));
        }
        Ok(())
    }

    /// Every grant that allowed a request of `user` so far.
    pub fn grants_used(&self, user: &str) -> Vec<Grant> {
        self.auth
            .grants
            .iter()
            .filter(|(u, _)| u == user)
            .map(|(_, g)| g.clone())
            .collect()
    }

    /// Every request of `user` refused so far (`verb resource ...`), oldest first.
    pub fn refusals(&self, user: &str) -> Vec<String> {
        self.auth
            .refusals
            .iter()
            .filter(|(u, _)| u == user)
            .map(|(_, line)| line.clone())
            .collect()
    }

    /// The grants of every rule bound to the ServiceAccount that allow the request.
    fn grants_for(&self, sa_namespace: &str, sa_name: &str, a: &Attributes) -> Vec<Grant> {
        let Some(resource) = &a.resource else {
            // No shipped role grants non-resource URLs beyond the bootstrap policy.
            return Vec::new();
        };
        let kind = |plural: &str| {
            self.kind("rbac.authorization.k8s.io", "v1", plural)
                .expect("built in")
        };
        let none = crate::selector::LabelSelector::parse("").expect("empty selector");
        let all = crate::selector::FieldSelector::parse("").expect("empty selector");
        let binds = |binding: &Value| {
            binding["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| {
                    s["kind"] == "ServiceAccount"
                        && s["name"] == sa_name
                        && s["namespace"].as_str().unwrap_or("") == sa_namespace
                })
        };
        let mut grants = Vec::new();
        // ClusterRoleBindings: their ClusterRole everywhere.
        for binding in self.list(&kind("clusterrolebindings"), None, &none, &all) {
            if !binds(&binding) || binding["roleRef"]["kind"] != "ClusterRole" {
                continue;
            }
            let role_name = binding["roleRef"]["name"].as_str().unwrap_or("");
            if let Ok(role) = self.get(&kind("clusterroles"), "", role_name) {
                grants.extend(rule_grants(
                    &role,
                    &format!("ClusterRole/{role_name}"),
                    None,
                    a,
                    resource,
                ));
            }
        }
        // RoleBindings in the request's namespace: their Role, or a ClusterRole there.
        if let Some(ns) = &resource.namespace {
            for binding in self.list(&kind("rolebindings"), Some(ns), &none, &all) {
                if !binds(&binding) {
                    continue;
                }
                let role_name = binding["roleRef"]["name"].as_str().unwrap_or("");
                match binding["roleRef"]["kind"].as_str() {
                    Some("Role") => {
                        if let Ok(role) = self.get(&kind("roles"), ns, role_name) {
                            let label = format!("Role/{ns}/{role_name}");
                            grants.extend(rule_grants(&role, &label, None, a, resource));
                        }
                    }
                    Some("ClusterRole") => {
                        if let Ok(role) = self.get(&kind("clusterroles"), "", role_name) {
                            let label = format!("ClusterRole/{role_name}");
                            grants.extend(rule_grants(&role, &label, Some(ns), a, resource));
                        }
                    }
                    _ => {}
                }
            }
        }
        grants
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    hasher.finish()
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// The grants of `role`'s rules that allow the request.
fn rule_grants(
    role: &Value,
    label: &str,
    bound_in: Option<&str>,
    a: &Attributes,
    resource: &Resource,
) -> Vec<Grant> {
    let full = resource.full();
    role["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|rule| {
            let groups = strings(&rule["apiGroups"]);
            let resources = strings(&rule["resources"]);
            let verbs = strings(&rule["verbs"]);
            let names = strings(&rule["resourceNames"]);
            (groups.contains(&"*") || groups.contains(&resource.group.as_str()))
                && resources.iter().any(|r| {
                    *r == "*"
                        || *r == full
                        || (resource.subresource.is_empty() && *r == resource.resource)
                        || (!resource.subresource.is_empty()
                            && (*r == format!("{}/*", resource.resource)
                                || *r == format!("*/{}", resource.subresource)))
                })
                && (verbs.contains(&"*") || verbs.contains(&a.verb.as_str()))
                && (names.is_empty() || names.contains(&resource.name.as_str()))
        })
        .map(|rule| Grant {
            role: label.to_string(),
            bound_in: bound_in.map(str::to_string),
            group: resource.group.clone(),
            resource: full.clone(),
            verb: a.verb.clone(),
            name: (!strings(&rule["resourceNames"]).is_empty()).then(|| resource.name.clone()),
        })
        .collect()
}

/// What the bootstrap ClusterRoles `system:discovery`, `system:public-info-viewer` and
/// `system:basic-user` give every authenticated user.
fn everyone_may(a: &Attributes) -> bool {
    match &a.resource {
        None => {
            let path = a.path.trim_end_matches('/');
            a.verb == "get"
                && (matches!(
                    path,
                    "/api" | "/apis" | "/version" | "/healthz" | "/livez" | "/readyz" | "/openapi"
                ) || [
                    "/api/",
                    "/apis/",
                    "/openapi/",
                    "/healthz/",
                    "/livez/",
                    "/readyz/",
                ]
                .iter()
                .any(|prefix| path.starts_with(prefix)))
        }
        Some(r) => {
            a.verb == "create"
                && matches!(
                    (r.group.as_str(), r.resource.as_str()),
                    (
                        "authorization.k8s.io",
                        "selfsubjectaccessreviews" | "selfsubjectrulesreviews"
                    ) | ("authentication.k8s.io", "selfsubjectreviews")
                )
        }
    }
}

/// A refused request as the ledger notes it.
fn describe(a: &Attributes) -> String {
    match &a.resource {
        None => format!("{} {}", a.verb, a.path),
        Some(r) => format!(
            "{} {}{} {}{}",
            a.verb,
            r.full(),
            if r.group.is_empty() {
                String::new()
            } else {
                format!(".{}", r.group)
            },
            r.namespace
                .as_deref()
                .map_or("(cluster)".to_string(), |n| format!("in {n}")),
            if r.name.is_empty() {
                String::new()
            } else {
                format!(" {}", r.name)
            }
        ),
    }
}

impl ApiError {
    /// 401 for credentials the server does not accept.
    pub fn unauthorized() -> ApiError {
        ApiError::new(401, "Unauthorized", "Unauthorized".into(), None)
    }

    /// 403 from the authorizer, worded as the real server words it.
    pub fn forbidden(user: &str, a: &Attributes) -> ApiError {
        let Some(r) = &a.resource else {
            return ApiError::new(
                403,
                "Forbidden",
                format!(
                    "forbidden: User \"{user}\" cannot {} path \"{}\"",
                    a.verb, a.path
                ),
                Some(json!({})),
            );
        };
        let mut why = format!(
            "User \"{user}\" cannot {} resource \"{}\" in API group \"{}\"",
            a.verb,
            r.full(),
            r.group
        );
        match &r.namespace {
            Some(ns) => why.push_str(&format!(" in the namespace \"{ns}\"")),
            None => why.push_str(" at the cluster scope"),
        }
        let qualified = if r.group.is_empty() {
            r.resource.clone()
        } else {
            format!("{}.{}", r.resource, r.group)
        };
        let message = if r.name.is_empty() {
            format!("{qualified} is forbidden: {why}")
        } else {
            format!("{qualified} \"{}\" is forbidden: {why}", r.name)
        };
        let mut details = json!({"name": r.name, "kind": r.resource});
        if !r.group.is_empty() {
            details["group"] = json!(r.group);
        }
        if r.name.is_empty() {
            details.as_object_mut().expect("an object").remove("name");
        }
        ApiError::new(403, "Forbidden", message, Some(details))
    }

    /// 422 for a TokenRequest the server refuses.
    fn invalid_token_request(name: &str, field: &str, message: String) -> ApiError {
        ApiError::new(
            422,
            "Invalid",
            format!("TokenRequest.authentication.k8s.io \"{name}\" is invalid: {field}: {message}"),
            Some(json!({
                "name": name,
                "group": "authentication.k8s.io",
                "kind": "TokenRequest",
                "causes": [{"reason": "FieldValueInvalid", "message": message, "field": field}],
            })),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(method: &str, path: &str) -> (String, Resource) {
        let a = Attributes::of(method, path);
        (a.verb, a.resource.expect("a resource request"))
    }

    #[test]
    fn requests_read_as_the_request_info_resolver_reads_them() {
        let (verb, scale) = resource("PATCH", "/apis/apps/v1/namespaces/shop/deployments/w/scale");
        assert_eq!(verb, "patch");
        assert_eq!(
            (
                scale.group.as_str(),
                scale.full().as_str(),
                scale.namespace.as_deref(),
                scale.name.as_str()
            ),
            ("apps", "deployments/scale", Some("shop"), "w")
        );
        assert_eq!(resource("GET", "/api/v1/secrets").0, "list");
        assert_eq!(resource("WATCH", "/api/v1/namespaces/a/secrets").0, "watch");
        assert_eq!(
            resource("DELETE", "/api/v1/namespaces/a/secrets").0,
            "deletecollection"
        );
        let (verb, namespace) = resource("GET", "/api/v1/namespaces/shop");
        assert_eq!(
            (verb.as_str(), namespace.namespace, namespace.name.as_str()),
            ("get", None, "shop")
        );
        let (verb, create) = resource("POST", "/apis/coordination.k8s.io/v1/namespaces/d/leases");
        assert_eq!((verb.as_str(), create.name.as_str()), ("create", ""));
        let (_, token) = resource("POST", "/api/v1/namespaces/d/serviceaccounts/op/token");
        assert_eq!(
            (token.full().as_str(), token.name.as_str()),
            ("serviceaccounts/token", "op")
        );
        for path in [
            "/apis/mailpipe.dev/v1alpha1",
            "/version",
            "/api",
            "/openapi/v3",
        ] {
            let a = Attributes::of("GET", path);
            assert!(a.resource.is_none(), "{path}");
            assert!(everyone_may(&a), "{path}");
        }
    }

    #[test]
    fn refusals_are_worded_as_the_real_server_words_them() {
        let user = "system:serviceaccount:ops:op";
        let get = ApiError::forbidden(
            user,
            &Attributes::of("GET", "/apis/apps/v1/namespaces/shop/deployments/w"),
        );
        assert_eq!(
            get.message,
            "deployments.apps \"w\" is forbidden: User \"system:serviceaccount:ops:op\" cannot get resource \"deployments\" in API group \"apps\" in the namespace \"shop\""
        );
        assert_eq!(
            get.details,
            Some(json!({"name": "w", "group": "apps", "kind": "deployments"}))
        );
        let list = ApiError::forbidden(user, &Attributes::of("GET", "/api/v1/secrets"));
        assert_eq!(
            list.message,
            "secrets is forbidden: User \"system:serviceaccount:ops:op\" cannot list resource \"secrets\" in API group \"\" at the cluster scope"
        );
        assert_eq!(list.details, Some(json!({"kind": "secrets"})));
        assert_eq!(ApiError::unauthorized().body()["reason"], "Unauthorized");
    }
}
