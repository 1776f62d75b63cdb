//! The operator's RBAC (`deploy/rbac.yaml`) checked against what it really asks: every
//! request the test server noted from the operator's User-Agent is turned into the
//! attributes Kubernetes authorizes (verb, API group, resource and subresource, namespace,
//! name) and must be allowed by the ClusterRole, or by the Role in the operator's own
//! namespace. Discovery (`/api`, `/apis/...` documents, `/version`) is every user's.

use std::path::Path;

use serde_json::Value;

/// One RBAC rule.
#[derive(Debug, Clone)]
struct Rule {
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    names: Vec<String>,
}

/// What a request asks for, as the authorizer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    /// `deployments` or `deployments/scale`.
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl Attributes {
    /// The attributes of a noted request (`VERB /path`); `None` for discovery.
    pub fn of(line: &str) -> Option<Attributes> {
        let (method, path) = line.split_once(' ')?;
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match segments.as_slice() {
            ["api", "v1", rest @ ..] => ("", rest),
            ["apis", group, _version, rest @ ..] => (*group, rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            // A namespace itself (or its status): cluster-scoped.
            ["namespaces", name] => (None, &["namespaces", name][..]),
            ["namespaces", name, sub @ ("status" | "finalize")] => {
                (None, &["namespaces", name, sub][..])
            }
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
            rest => (None, rest),
        };
        let (resource, name, sub) = match rest {
            [] => return None,
            [resource] => (*resource, None, None),
            [resource, name] => (*resource, Some(name.to_string()), None),
            [resource, name, sub, ..] => (*resource, Some(name.to_string()), Some(*sub)),
        };
        let verb = match (method, name.is_some()) {
            ("WATCH", _) => "watch",
            ("GET", true) => "get",
            ("GET", false) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", true) => "delete",
            ("DELETE", false) => "deletecollection",
            _ => return None,
        };
        Some(Attributes {
            verb: verb.to_string(),
            group: group.to_string(),
            resource: match sub {
                Some(sub) => format!("{resource}/{sub}"),
                None => resource.to_string(),
            },
            namespace,
            // A create is authorized before the object has a name.
            name: if verb == "create" { None } else { name },
        })
    }
}

impl Rule {
    fn allows(&self, a: &Attributes) -> bool {
        self.groups.contains(&a.group)
            && self.resources.contains(&a.resource)
            && self.verbs.contains(&a.verb)
            && (self.names.is_empty() || a.name.as_ref().is_some_and(|n| self.names.contains(n)))
    }
}

/// The rules of `deploy/rbac.yaml`.
pub struct Rbac {
    cluster: Vec<Rule>,
    own: Vec<Rule>,
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

impl Rbac {
    /// Reads the ClusterRole and the Role from a multi-document YAML file.
    pub fn load(path: &Path) -> Rbac {
        let text = std::fs::read_to_string(path).expect("the RBAC manifest");
        let mut rbac = Rbac {
            cluster: Vec::new(),
            own: Vec::new(),
        };
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(document).expect("YAML");
            let rules: Vec<Rule> = value["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| Rule {
                    groups: strings(&r["apiGroups"]),
                    resources: strings(&r["resources"]),
                    verbs: strings(&r["verbs"]),
                    names: strings(&r["resourceNames"]),
                })
                .collect();
            for rule in &rules {
                assert!(
                    !rule.verbs.contains(&"*".into())
                        && !rule.resources.contains(&"*".into())
                        && !rule.groups.contains(&"*".into()),
                    "no wildcards: {rule:?}"
                );
            }
            match value["kind"].as_str() {
                Some("ClusterRole") => rbac.cluster.extend(rules),
                Some("Role") => rbac.own.extend(rules),
                _ => {}
            }
        }
        rbac
    }

    /// Whether a request is allowed, for an operator running in `own_namespace`.
    pub fn allows(&self, a: &Attributes, own_namespace: &str) -> bool {
        self.cluster.iter().any(|r| r.allows(a))
            || (a.namespace.as_deref() == Some(own_namespace)
                && self.own.iter().any(|r| r.allows(a)))
    }

    /// The requests among `lines` these rules refuse.
    pub fn refused(&self, lines: &[String], own_namespace: &str) -> Vec<String> {
        let mut refused: Vec<String> = lines
            .iter()
            .filter(|line| Attributes::of(line).is_some_and(|a| !self.allows(&a, own_namespace)))
            .cloned()
            .collect();
        refused.sort();
        refused.dedup();
        refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_the_authorizer_reads_them() {
        let a = |line: &str| Attributes::of(line).expect("a resource request");
        let scale = a("PATCH /apis/apps/v1/namespaces/shop/deployments/w/scale");
        assert_eq!(
            (
                scale.verb.as_str(),
                scale.group.as_str(),
                scale.resource.as_str()
            ),
            ("patch", "apps", "deployments/scale")
        );
        assert_eq!(scale.namespace.as_deref(), Some("shop"));
        assert_eq!(a("GET /api/v1/secrets").verb, "list");
        assert_eq!(a("WATCH /api/v1/secrets").verb, "watch");
        let namespace = a("GET /api/v1/namespaces/shop");
        assert_eq!(
            (namespace.resource.as_str(), namespace.namespace),
            ("namespaces", None)
        );
        let create = a("POST /apis/coordination.k8s.io/v1/namespaces/default/leases");
        assert_eq!((create.verb.as_str(), create.name), ("create", None));
        assert!(Attributes::of("GET /apis/mailpipe.dev/v1alpha1").is_none());
        assert!(Attributes::of("GET /version").is_none());
    }

    #[test]
    fn the_shipped_rules_refuse_what_the_operator_never_needs() {
        let rbac = Rbac::load(&crate::repo_root().join("deploy/rbac.yaml"));
        let refused = rbac.refused(
            &[
                "DELETE /apis/mailpipe.dev/v1alpha1/namespaces/a/emailpipelines/x".into(),
                "PUT /api/v1/namespaces/a/secrets/s".into(),
                "POST /api/v1/namespaces/a/secrets".into(),
                "PUT /apis/coordination.k8s.io/v1/namespaces/ops/leases/other".into(),
                "PUT /apis/coordination.k8s.io/v1/namespaces/ops/leases/mailpipe-operator".into(),
                "POST /api/v1/namespaces/ops/secrets".into(),
            ],
            "ops",
        );
        assert_eq!(
            refused,
            vec![
                "DELETE /apis/mailpipe.dev/v1alpha1/namespaces/a/emailpipelines/x",
                "POST /api/v1/namespaces/a/secrets",
                "PUT /api/v1/namespaces/a/secrets/s",
                "PUT /apis/coordination.k8s.io/v1/namespaces/ops/leases/other",
            ]
        );
    }
}
