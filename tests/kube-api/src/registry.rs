//! The kinds the server serves: the built-in ones mailpipe uses, and any kind a created
//! CustomResourceDefinition defines. Discovery documents are rendered from here.

use serde_json::{json, Value};

/// One served resource type.
#[derive(Debug, Clone, PartialEq)]
pub struct Kind {
    /// API group ("" for core).
    pub group: String,
    /// Version.
    pub version: String,
    /// Kind, e.g. `ConfigMap`.
    pub kind: String,
    /// URL name, e.g. `configmaps`.
    pub plural: String,
    /// Singular name.
    pub singular: String,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Short names (clients only; the server does not route them).
    pub short_names: Vec<String>,
    /// Categories such as `all`.
    pub categories: Vec<String>,
    /// Has a `/status` subresource (status ignored on the main resource).
    pub status: bool,
    /// Has a `/scale` subresource.
    pub scale: bool,
    /// Defined by a CRD.
    pub custom: bool,
    /// `metadata.generation` is kept (bumped on spec changes).
    pub generation: bool,
    /// A PUT without `metadata.resourceVersion` is allowed (built-ins yes, custom no).
    pub unconditional_update: bool,
    /// The resourceVersion from which watches can start (its watch cache began there).
    pub watch_start: u64,
    /// The CRD's OpenAPI v3 schema for this version, for custom kinds.
    pub schema: Option<Value>,
    /// The CRD's additional printer columns, for custom kinds.
    pub printer_columns: Vec<Value>,
    /// For kinds with `/scale`: the JSONPaths of spec replicas, status replicas and the
    /// label selector (`None` for the selector means "from spec.selector.matchLabels").
    pub scale_paths: Option<(String, String, Option<String>)>,
}

impl Kind {
    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The group whose storage holds this kind's objects: events.k8s.io Events live with
    /// core Events (one storage, two APIs); every other kind in its own group.
    pub fn storage_group(&self) -> &str {
        if self.group == "events.k8s.io" && self.plural == "events" {
            ""
        } else {
            &self.group
        }
    }

    /// `configmaps` or `emailpipelines.mailpipe.dev`, as error messages name it.
    pub fn group_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Whether this is ServiceAccount, whose `/token` subresource issues tokens
    /// (TokenRequest).
    pub fn issues_tokens(&self) -> bool {
        self.group.is_empty() && self.plural == "serviceaccounts"
    }

    fn verbs(&self) -> Vec<&'static str> {
        if self.custom {
            vec![
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "create",
                "update",
                "watch",
            ]
        } else if self.plural == "namespaces" {
            vec![
                "create", "delete", "get", "list", "patch", "update", "watch",
            ]
        } else {
            vec![
                "create",
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "update",
                "watch",
            ]
        }
    }

    /// This kind in an aggregated discovery document (apidiscovery.k8s.io/v2
    /// APIResourceDiscovery). Built-in kinds name their response kind without group and
    /// version and list subresources alphabetically; custom kinds name both, status first.
    pub fn aggregated_entry(&self) -> Value {
        let own = |kind: &str| {
            if self.custom {
                json!({"group": self.group, "version": self.version, "kind": kind})
            } else {
                json!({"group": "", "version": "", "kind": kind})
            }
        };
        let status = json!({"subresource": "status", "responseKind": own(&self.kind), "verbs": ["get", "patch", "update"]});
        let scale = json!({"subresource": "scale", "responseKind": {"group": "autoscaling", "version": "v1", "kind": "Scale"}, "verbs": ["get", "patch", "update"]});
        let mut subresources = Vec::new();
        if self.issues_tokens() {
            subresources.push(json!({"subresource": "token", "responseKind": {"group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest"}, "verbs": ["create"]}));
        }
        if self.status {
            subresources.push(status);
        }
        if self.scale {
            subresources.push(scale);
        }
        if !self.custom {
            subresources.sort_by_key(|s| s["subresource"].as_str().unwrap_or("").to_string());
        }
        let mut entry = json!({
            "resource": self.plural,
            "responseKind": own(&self.kind),
            "scope": if self.namespaced { "Namespaced" } else { "Cluster" },
            "singularResource": self.singular,
            "verbs": self.verbs(),
        });
        if !self.short_names.is_empty() {
            entry["shortNames"] = json!(self.short_names);
        }
        if !self.categories.is_empty() {
            entry["categories"] = json!(self.categories);
        }
        if !subresources.is_empty() {
            entry["subresources"] = json!(subresources);
        }
        entry
    }

    /// Entries of this kind in an APIResourceList (the resource and its subresources).
    pub fn discovery_entries(&self) -> Vec<Value> {
        let mut main = json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": self.verbs(),
        });
        if !self.short_names.is_empty() {
            main["shortNames"] = json!(self.short_names);
        }
        if !self.categories.is_empty() {
            main["categories"] = json!(self.categories);
        }
        let mut entries = vec![main];
        if self.issues_tokens() {
            entries.push(json!({
                "name": format!("{}/token", self.plural),
                "singularName": "",
                "namespaced": true,
                "group": "authentication.k8s.io",
                "version": "v1",
                "kind": "TokenRequest",
                "verbs": ["create"],
            }));
        }
        if self.status {
            entries.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if self.scale {
            entries.push(json!({
                "name": format!("{}/scale", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }));
        }
        entries
    }
}

#[allow(clippy::too_many_arguments)]
fn builtin(
    group: &str,
    kind: &str,
    plural: &str,
    namespaced: bool,
    short_names: &[&str],
    status: bool,
    scale: bool,
    generation: bool,
) -> Kind {
    Kind {
        group: group.into(),
        version: "v1".into(),
        kind: kind.into(),
        plural: plural.into(),
        singular: kind.to_ascii_lowercase(),
        namespaced,
        short_names: short_names.iter().map(|s| s.to_string()).collect(),
        categories: Vec::new(),
        status,
        scale,
        custom: false,
        generation,
        unconditional_update: true,
        watch_start: 1,
        schema: None,
        printer_columns: Vec::new(),
        scale_paths: scale.then(|| {
            (
                ".spec.replicas".to_string(),
                ".status.replicas".to_string(),
                None,
            )
        }),
    }
}

/// The built-in kinds this server implements.
pub fn builtins() -> Vec<Kind> {
    let mut kinds = vec![
        builtin(
            "",
            "ConfigMap",
            "configmaps",
            true,
            &["cm"],
            false,
            false,
            false,
        ),
        // Served so that `ep` resolves as on a real server (recording 156): to Endpoints.
        builtin(
            "",
            "Endpoints",
            "endpoints",
            true,
            &["ep"],
            false,
            false,
            false,
        ),
        builtin("", "Event", "events", true, &["ev"], false, false, false),
        builtin(
            "",
            "Namespace",
            "namespaces",
            false,
            &["ns"],
            true,
            false,
            false,
        ),
        builtin("", "Secret", "secrets", true, &[], false, false, false),
        builtin(
            "",
            "ServiceAccount",
            "serviceaccounts",
            true,
            &["sa"],
            false,
            false,
            false,
        ),
        builtin(
            "",
            "Service",
            "services",
            true,
            &["svc"],
            true,
            false,
            false,
        ),
        builtin(
            "apps",
            "Deployment",
            "deployments",
            true,
            &["deploy"],
            true,
            true,
            true,
        ),
        builtin(
            "policy",
            "PodDisruptionBudget",
            "poddisruptionbudgets",
            true,
            &["pdb"],
            true,
            false,
            true,
        ),
        builtin(
            "coordination.k8s.io",
            "Lease",
            "leases",
            true,
            &[],
            false,
            false,
            false,
        ),
        builtin(
            "events.k8s.io",
            "Event",
            "events",
            true,
            &["ev"],
            false,
            false,
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "ClusterRole",
            "clusterroles",
            false,
            &[],
            false,
            false,
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "ClusterRoleBinding",
            "clusterrolebindings",
            false,
            &[],
            false,
            false,
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "Role",
            "roles",
            true,
            &[],
            false,
            false,
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "RoleBinding",
            "rolebindings",
            true,
            &[],
            false,
            false,
            false,
        ),
        builtin(
            "apiextensions.k8s.io",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
            &["crd", "crds"],
            true,
            false,
            true,
        ),
    ];
    for kind in kinds
        .iter_mut()
        .filter(|k| matches!(k.plural.as_str(), "deployments" | "services"))
    {
        kind.categories = vec!["all".into()];
    }
    kinds
}

/// The kinds a CRD defines (one per served version), starting their watch cache at `rv`.
pub fn kinds_of_crd(crd: &Value, rv: u64) -> Result<Vec<Kind>, String> {
    let spec = &crd["spec"];
    let text = |v: &Value, what: &str| {
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("spec.{what} is required"))
    };
    let group = text(&spec["group"], "group")?;
    let names = &spec["names"];
    let kind = text(&names["kind"], "names.kind")?;
    let plural = text(&names["plural"], "names.plural")?;
    let singular = names["singular"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| kind.to_ascii_lowercase());
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let namespaced = spec["scope"].as_str() != Some("Cluster");
    let versions = spec["versions"]
        .as_array()
        .ok_or("spec.versions is required")?;
    Ok(versions
        .iter()
        .filter(|v| v["served"].as_bool().unwrap_or(true))
        .map(|v| Kind {
            group: group.clone(),
            version: v["name"].as_str().unwrap_or("v1").to_string(),
            kind: kind.clone(),
            plural: plural.clone(),
            singular: singular.clone(),
            namespaced,
            short_names: strings(&names["shortNames"]),
            categories: strings(&names["categories"]),
            status: v["subresources"]["status"].is_object(),
            scale: v["subresources"]["scale"].is_object(),
            custom: true,
            generation: true,
            unconditional_update: false,
            watch_start: rv,
            schema: v["schema"].get("openAPIV3Schema").cloned(),
            printer_columns: v["additionalPrinterColumns"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
            scale_paths: v["subresources"]["scale"].as_object().map(|scale| {
                let text = |f: &str| scale.get(f).and_then(Value::as_str).map(str::to_string);
                (
                    text("specReplicasPath").unwrap_or_else(|| ".spec.replicas".into()),
                    text("statusReplicasPath").unwrap_or_else(|| ".status.replicas".into()),
                    text("labelSelectorPath"),
                )
            }),
        })
        .collect())
}

/// The APIGroup entry of `group` served with `versions`.
pub fn api_group(group: &str, versions: &[String]) -> Value {
    let entries: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({
        "name": group,
        "versions": entries,
        "preferredVersion": entries.first().cloned().unwrap_or(Value::Null),
    })
}
