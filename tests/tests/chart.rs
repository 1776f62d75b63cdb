//! The Helm chart, rendered offline by Helm's own engine for several value sets: it lints
//! clean; it agrees with the workspace (version, images, the CRD in `crds/`, the alert
//! rules); its RBAC is `deploy/rbac.yaml` (which the end-to-end tests check against every
//! request the operator makes), cluster-wide or per watched namespace; the operator pod is
//! locked down; the values schema refuses bad values.

use std::collections::BTreeSet;

use mailpipe_tests::chart::{self, find, render};
use mailpipe_tests::images::{image_name, VERSION};
use mailpipe_tests::repo_root;
use serde_json::{json, Value};

const NS: &str = "mailpipe-system";

/// `deploy/rbac.yaml`'s objects.
fn deploy_rbac() -> Vec<Value> {
    let text = std::fs::read_to_string(repo_root().join("deploy/rbac.yaml")).expect("rbac.yaml");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML"))
        .collect()
}

fn rules(object: &Value) -> Value {
    object["rules"].clone()
}

/// Every (group, resource, verb, name) a rule list grants.
fn grants(rules: &Value) -> BTreeSet<(String, String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in rules.as_array().expect("rules") {
        let list = |key: &str| -> Vec<String> {
            rule[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|v| v.as_str().expect("string").to_string())
                        .collect()
                })
                .unwrap_or_else(|| vec![String::new()])
        };
        for group in list("apiGroups") {
            for resource in list("resources") {
                for verb in list("verbs") {
                    for name in list("resourceNames") {
                        out.insert((group.clone(), resource.clone(), verb.clone(), name));
                    }
                }
            }
        }
    }
    out
}

fn operator_deployment(objects: &[Value], name: &str) -> Value {
    find(objects, "Deployment", name, Some(NS)).clone()
}

fn env(container: &Value) -> Vec<(String, Value)> {
    container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            let value = e
                .get("value")
                .cloned()
                .unwrap_or_else(|| e["valueFrom"].clone());
            (e["name"].as_str().expect("name").to_string(), value)
        })
        .collect()
}

fn env_value(container: &Value, name: &str) -> Option<Value> {
    env(container)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
}

#[test]
fn the_chart_lints_clean_and_agrees_with_the_workspace() {
    for values in [
        json!({}),
        json!({"replicaCount": 3, "watchNamespaces": ["mail"], "serviceMonitor": {"enabled": true}, "prometheusRule": {"enabled": true}}),
    ] {
        let report = chart::lint(values.clone());
        assert_eq!(report["errors"], json!([]), "{values}: {report}");
        let serious: Vec<&Value> = report["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter(|m| m["severity"].as_i64() >= Some(2))
            .collect();
        assert!(serious.is_empty(), "{values}: {serious:?}");
    }
    let chart_yaml: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(chart::chart_dir().join("Chart.yaml")).expect("Chart.yaml"),
    )
    .expect("YAML");
    assert_eq!(chart_yaml["version"], VERSION, "one version source");
    assert_eq!(chart_yaml["appVersion"], VERSION, "one version source");
    for (copy, source) in [
        (
            "crds/emailpipelines.mailpipe.dev.yaml",
            "crds/emailpipelines.mailpipe.dev.yaml",
        ),
        ("files/alerts.yaml", "deploy/prometheus/alerts.yaml"),
    ] {
        let read =
            |p: std::path::PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
        assert!(
            read(chart::chart_dir().join(copy)) == read(repo_root().join(source)),
            "charts/mailpipe/{copy} is {source} (scripts/generate.sh copies it)"
        );
    }
    let objects = render(json!({}), "mailpipe", NS).expect("the defaults render");
    let operator = operator_deployment(&objects, "mailpipe");
    let container = &operator["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], image_name("operator"));
    assert_eq!(
        env_value(container, "MAILPIPE_OPERATOR_WORKER_IMAGE"),
        Some(json!(image_name("worker")))
    );
    // No wildcard anywhere.
    for object in &objects {
        if let Some(rules) = object.get("rules") {
            for (group, resource, verb, _) in grants(rules) {
                assert!(
                    ![&group, &resource, &verb].iter().any(|s| s.contains('*')),
                    "a wildcard in {}",
                    object["metadata"]["name"]
                );
            }
        }
    }
}

/// Release `mailpipe-operator` in `mailpipe-system` renders the objects of
/// `deploy/rbac.yaml`, rule for rule.
#[test]
fn the_default_rbac_is_deploy_rbac_yaml() {
    let objects = render(json!({}), "mailpipe-operator", NS).expect("renders");
    let deploy = deploy_rbac();
    let kinds = [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    ];
    let rendered: Vec<&Value> = objects
        .iter()
        .filter(|o| kinds.contains(&o["kind"].as_str().unwrap_or_default()))
        .collect();
    assert_eq!(
        rendered.len(),
        deploy.len(),
        "the same objects: {rendered:?}"
    );
    for wanted in &deploy {
        let kind = wanted["kind"].as_str().expect("kind");
        let name = wanted["metadata"]["name"].as_str().expect("name");
        let namespace = wanted["metadata"]["namespace"].as_str();
        let got = find(&objects, kind, name, namespace);
        if rules(wanted).is_array() {
            assert_eq!(grants(&rules(got)), grants(&rules(wanted)), "{kind} {name}");
        }
        for key in ["roleRef", "subjects"] {
            assert_eq!(got[key], wanted[key], "{kind} {name}: {key}");
        }
    }
    // The Lease the Role names is the one the operator is told to use.
    let operator = operator_deployment(&objects, "mailpipe-operator");
    let container = &operator["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        env_value(container, "MAILPIPE_OPERATOR_LEASE"),
        Some(json!("mailpipe-operator"))
    );
}

/// With `watchNamespaces`, each watched namespace gets the cluster-wide rules as a Role,
/// and the ClusterRole keeps only the namespace reads.
#[test]
fn watched_namespaces_get_roles_and_only_pipeline_writes_and_namespace_reads_stay_cluster_wide() {
    let objects = render(
        json!({"watchNamespaces": ["mail", "billing"]}),
        "mailpipe-operator",
        NS,
    )
    .expect("renders");
    let deploy = deploy_rbac();
    let everywhere = grants(&rules(find(
        &deploy,
        "ClusterRole",
        "mailpipe-operator",
        None,
    )));
    // Cluster-wide: a namespace's deletion state, and the pipelines' writes (the finalizer,
    // the status), which a namespace being deleted must not lose with its Roles.
    let namespaces: BTreeSet<_> = everywhere
        .iter()
        .filter(|g| g.1 == "namespaces" || (g.1.starts_with("emailpipelines") && g.2 == "patch"))
        .cloned()
        .collect();
    let per_namespace: BTreeSet<_> = everywhere.difference(&namespaces).cloned().collect();
    assert_eq!(namespaces.len(), 3, "{namespaces:?}");
    assert_eq!(
        grants(&rules(find(
            &objects,
            "ClusterRole",
            "mailpipe-operator",
            None
        ))),
        namespaces
    );
    for namespace in ["mail", "billing"] {
        let role = find(&objects, "Role", "mailpipe-operator-watch", Some(namespace));
        assert_eq!(grants(&rules(role)), per_namespace, "{namespace}");
        let binding = find(
            &objects,
            "RoleBinding",
            "mailpipe-operator-watch",
            Some(namespace),
        );
        assert_eq!(binding["subjects"][0]["namespace"], NS);
        assert_eq!(binding["roleRef"]["name"], "mailpipe-operator-watch");
    }
    let operator = operator_deployment(&objects, "mailpipe-operator");
    let container = &operator["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        env_value(container, "MAILPIPE_OPERATOR_NAMESPACES"),
        Some(json!("mail,billing"))
    );
    // Its own namespace's Role stays (the Lease, the kept broker connections).
    find(&objects, "Role", "mailpipe-operator", Some(NS));
}

#[test]
fn the_operator_pod_is_locked_down_and_elects_a_leader() {
    for replicas in [1, 3] {
        let objects = render(json!({ "replicaCount": replicas }), "mailpipe", NS).expect("renders");
        let operator = operator_deployment(&objects, "mailpipe");
        assert_eq!(operator["spec"]["replicas"], replicas);
        let pod = &operator["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "mailpipe");
        assert_eq!(
            pod["securityContext"],
            json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                   "seccompProfile": {"type": "RuntimeDefault"}})
        );
        let container = &pod["containers"][0];
        assert_eq!(
            container["securityContext"],
            json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                   "runAsNonRoot": true, "capabilities": {"drop": ["ALL"]}})
        );
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert!(container["resources"]["requests"]["memory"].is_string());
        assert!(container["resources"]["limits"]["memory"].is_string());
        // The pod's namespace and name reach the operator (its Lease namespace, identity).
        assert_eq!(
            env_value(container, "POD_NAMESPACE"),
            Some(json!({"fieldRef": {"fieldPath": "metadata.namespace"}}))
        );
        assert_eq!(
            env_value(container, "HOSTNAME"),
            Some(json!({"fieldRef": {"fieldPath": "metadata.name"}}))
        );
        let budgets: Vec<&Value> = objects
            .iter()
            .filter(|o| o["kind"] == "PodDisruptionBudget")
            .collect();
        if replicas > 1 {
            assert_eq!(budgets.len(), 1);
            assert_eq!(budgets[0]["spec"]["minAvailable"], 1);
            assert_eq!(
                budgets[0]["spec"]["selector"]["matchLabels"],
                operator["spec"]["selector"]["matchLabels"]
            );
        } else {
            assert!(budgets.is_empty(), "no budget for a single replica");
        }
        let service = find(&objects, "Service", "mailpipe-metrics", Some(NS));
        assert_eq!(
            service["spec"]["selector"],
            operator["spec"]["selector"]["matchLabels"]
        );
    }
}

#[test]
fn monitoring_objects_come_only_when_asked_for() {
    let kinds = |values: Value| -> Vec<String> {
        render(values, "mailpipe", NS)
            .expect("renders")
            .iter()
            .map(|o| o["kind"].as_str().unwrap_or_default().to_string())
            .filter(|k| k == "ServiceMonitor" || k == "PrometheusRule")
            .collect()
    };
    assert!(kinds(json!({})).is_empty());
    let objects = render(
        json!({"serviceMonitor": {"enabled": true, "labels": {"release": "prom"}},
               "prometheusRule": {"enabled": true}}),
        "mailpipe",
        NS,
    )
    .expect("renders");
    let monitor = find(&objects, "ServiceMonitor", "mailpipe", Some(NS));
    assert_eq!(monitor["metadata"]["labels"]["release"], "prom");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "http");
    // The operator's series keep their own namespace and pipeline labels.
    assert_eq!(monitor["spec"]["endpoints"][0]["honorLabels"], true);
    let rule = find(&objects, "PrometheusRule", "mailpipe", Some(NS));
    let alerts: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts.yaml"))
            .expect("alerts"),
    )
    .expect("YAML");
    assert_eq!(
        rule["spec"]["groups"], alerts["groups"],
        "the alert rules, unchanged"
    );
}

/// The Grafana dashboards as ConfigMaps for the sidecar, word for word `deploy/grafana/`.
#[test]
fn dashboards_come_as_configmaps_for_the_grafana_sidecar() {
    let configmaps = |values: Value| -> Vec<Value> {
        render(values, "mailpipe", NS)
            .expect("renders")
            .into_iter()
            .filter(|o| o["kind"] == "ConfigMap")
            .collect()
    };
    assert!(configmaps(json!({})).is_empty());
    let rendered = configmaps(
        json!({"dashboards": {"enabled": true, "namespace": "monitoring",
                                                    "annotations": {"grafana_folder": "mailpipe"}}}),
    );
    assert_eq!(rendered.len(), 2);
    for board in ["pipeline", "operator"] {
        let map = find(
            &rendered,
            "ConfigMap",
            &format!("mailpipe-dashboard-{board}"),
            Some("monitoring"),
        );
        assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], "1");
        assert_eq!(map["metadata"]["annotations"]["grafana_folder"], "mailpipe");
        let file = format!("mailpipe-{board}.json");
        let committed = std::fs::read_to_string(repo_root().join("deploy/grafana").join(&file))
            .expect("dashboard");
        assert_eq!(
            map["data"][&file].as_str().map(str::trim_end),
            Some(committed.trim_end()),
            "{file}"
        );
    }
}

#[test]
fn the_values_schema_refuses_bad_values() {
    chart::validate(json!({})).expect("the defaults");
    chart::validate(json!({"replicaCount": 2, "watchNamespaces": ["mail"],
                           "leaderElection": {"leaseDuration": "1m30s"}}))
    .expect("good values");
    for (values, says) in [
        (json!({"replicaCount": 0}), "replicaCount"),
        (json!({"replicas": 2}), "replicas"),
        (
            json!({"watchNamespaces": ["Not_A_Namespace"]}),
            "watchNamespaces",
        ),
        (
            json!({"leaderElection": {"leaseDuration": "fifteen"}}),
            "leaseDuration",
        ),
        (json!({"logFormat": "xml"}), "logFormat"),
        (
            json!({"image": {"repository": "x", "pullPolicy": "Sometimes"}}),
            "pullPolicy",
        ),
        (json!({"metrics": {"port": 70000}}), "port"),
        (json!({"serviceMonitor": {"enabled": "yes"}}), "enabled"),
    ] {
        let error = chart::validate(values.clone()).expect_err(&format!("{values} is refused"));
        assert!(error.contains(says), "{values}: {error}");
        // helm template refuses them too.
        assert!(
            render(values.clone(), "mailpipe", NS).is_err(),
            "{values} does not render"
        );
    }
    // Without a ServiceAccount of its own, the chart needs the name of one.
    let error = render(json!({"serviceAccount": {"create": false}}), "mailpipe", NS)
        .expect_err("no ServiceAccount named");
    assert!(error.contains("serviceAccount.name"), "{error}");
}

#[test]
fn the_notes_say_what_was_installed_and_how_to_upgrade_the_crd() {
    let notes = chart::notes(json!({"watchNamespaces": ["mail"]}), "mailpipe", NS);
    assert!(notes.contains("the namespaces mail"), "{notes}");
    assert!(notes.contains(&image_name("worker")), "{notes}");
    assert!(
        notes.contains("kubectl apply --server-side -f crds/"),
        "{notes}"
    );
}

/// `deploy/` (kustomize) installs what the chart installs as release `mailpipe-operator` in
/// `mailpipe-system`: the same CRD, RBAC, Deployment and Service, without Helm's labels.
#[test]
fn the_kustomize_base_is_the_chart_without_helm() {
    let text = mailpipe_tests::process::run(
        std::process::Command::new("kubectl")
            .args(["kustomize"])
            .arg(repo_root().join("deploy")),
        "kubectl kustomize deploy/",
    );
    let base: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML"))
        .collect();
    let objects = render(json!({}), "mailpipe-operator", NS).expect("renders");
    let helm_free = |object: &Value| {
        let mut object = object.clone();
        if let Some(labels) = object["metadata"]["labels"].as_object_mut() {
            labels.remove("helm.sh/chart");
            labels.remove("app.kubernetes.io/managed-by");
        }
        object
    };
    for (kind, name) in [
        ("Deployment", "mailpipe-operator"),
        ("Service", "mailpipe-operator-metrics"),
    ] {
        assert_eq!(
            find(&base, kind, name, Some(NS)),
            &helm_free(find(&objects, kind, name, Some(NS))),
            "{kind} {name}"
        );
    }
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    ] {
        let names = |list: &[Value]| -> BTreeSet<String> {
            list.iter()
                .filter(|o| o["kind"] == kind)
                .map(|o| {
                    o["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                })
                .collect()
        };
        assert_eq!(names(&base), names(&objects), "{kind}s");
    }
    let crd: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo_root().join("crds/emailpipelines.mailpipe.dev.yaml"))
            .expect("the CRD"),
    )
    .expect("YAML");
    // kustomize writes `3600.0` as `3600`: the same number.
    fn numbers_as_f64(value: &Value) -> Value {
        match value {
            Value::Number(n) => json!(n.as_f64().expect("a number")),
            Value::Array(items) => Value::Array(items.iter().map(numbers_as_f64).collect()),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), numbers_as_f64(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
    assert!(
        numbers_as_f64(find(
            &base,
            "CustomResourceDefinition",
            "emailpipelines.mailpipe.dev",
            None
        )) == numbers_as_f64(&crd),
        "deploy/ installs the CRD of crds/"
    );
    find(&base, "Namespace", NS, None);
}
