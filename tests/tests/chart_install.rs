//! The Helm chart installed as `helm install` would install it, on the Kubernetes API test
//! server: its CRD first, then the rendered manifests applied server-side with kubectl.
//! The runner then plays kubelet for the operator's own Deployment, so the operator runs
//! from the chart's pod template (its arguments, environment, probes) with its
//! ServiceAccount's token, and the server authorizes every request it makes against the
//! chart's RBAC.
//!
//! It takes the transactional example (templates, idempotency, SMTP login over verified
//! STARTTLS) and a copy of it to Ready, sends a templated job published twice once, pauses,
//! resumes and pauses again, leaves a job in one queue and deletes the namespace: the
//! pipeline with the job keeps its topology, the other's is removed, and the namespace goes.
//! Then every permission the chart grants must have been used, and none refused (but in the
//! namespace being deleted, once its Roles went with it, when the chart watches a list of
//! namespaces): a missing verb and an extra one both fail. Both RBAC modes run.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use mailpipe_kube_api::auth::Grant;
use mailpipe_kube_api::runner::{Runner, RunnerConfig};
use mailpipe_tests::amqp::{self, Names, SHARED_URL};
use mailpipe_tests::certs;
use mailpipe_tests::chart::render;
use mailpipe_tests::cluster::{monitoring_crd, Cluster};
use mailpipe_tests::pipelines::delete_topology;
use mailpipe_tests::smtp::{SmtpOptions, SmtpServer, SmtpTls};
use mailpipe_tests::{built_binary, eventually, redis_server, repo_root, unique};
use serde_json::{json, Value};

const RELEASE: &str = "mailpipe";
const OPERATOR_NS: &str = "mailpipe-system";
const SHOP: &str = "shop";

/// Every permission the rendered RBAC grants: (role, group, resource, verb, name).
fn granted(objects: &[Value]) -> BTreeSet<(String, String, String, String, Option<String>)> {
    let mut all = BTreeSet::new();
    for object in objects {
        let role = match object["kind"].as_str() {
            Some("ClusterRole") => format!(
                "ClusterRole/{}",
                object["metadata"]["name"].as_str().unwrap()
            ),
            Some("Role") => format!(
                "Role/{}/{}",
                object["metadata"]["namespace"].as_str().unwrap(),
                object["metadata"]["name"].as_str().unwrap()
            ),
            _ => continue,
        };
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .map(|s| s.as_str().unwrap().to_string())
                .collect()
        };
        for rule in object["rules"].as_array().unwrap() {
            let names: Vec<Option<String>> = match strings(&rule["resourceNames"]) {
                names if names.is_empty() => vec![None],
                names => names.into_iter().map(Some).collect(),
            };
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        for name in &names {
                            all.insert((
                                role.clone(),
                                group.clone(),
                                resource.clone(),
                                verb.clone(),
                                name.clone(),
                            ));
                        }
                    }
                }
            }
        }
    }
    all
}

fn used(grants: &[Grant]) -> BTreeSet<(String, String, String, String, Option<String>)> {
    grants
        .iter()
        .map(|g| {
            (
                g.role.clone(),
                g.group.clone(),
                g.resource.clone(),
                g.verb.clone(),
                g.name.clone(),
            )
        })
        .collect()
}

/// The transactional example pointed at this test's queue, SMTP server and Redis prefix.
fn pipeline(name: &str, names: &Names, smtp_port: u16) -> String {
    let example = std::fs::read_to_string(
        repo_root().join("deploy/examples/transactional-emailpipeline.yaml"),
    )
    .expect("the example");
    mailpipe_tests::pipelines::edited(
        example,
        [
            ("  name: transactional\n", format!("  name: {name}\n")),
            (
                "exchange: transactional_exc",
                format!("exchange: {}", names.exchange),
            ),
            (
                "queue: transactional\n",
                format!("queue: {}\n", names.queue),
            ),
            ("host: smtp.example.com", "host: 127.0.0.1".to_string()),
            ("port: 587", format!("port: {smtp_port}")),
            (
                "tls: starttls\n",
                "tls: starttls\n    caSecret:\n      name: smtp-ca\n      key: ca.crt\n"
                    .to_string(),
            ),
            ("initial: 5s", "initial: 200ms".to_string()),
            ("max: 10m", "max: 2s".to_string()),
            // A Delete deletion waits out the workers' grace period: the shortest allowed.
            (
                "  worker:\n",
                "  worker:\n    terminationGracePeriodSeconds: 10\n".to_string(),
            ),
        ],
    )
}

fn secret(name: &str, data: &[(&str, &str)]) -> String {
    let mut text = format!("apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {SHOP}\nstringData:\n");
    for (key, value) in data {
        text.push_str(&format!("  {key}: {value:?}\n"));
    }
    text
}

/// What a failed wait shows: the pipelines, the operator's refusals and log, the workers'
/// logs.
async fn diagnose(cluster: &Cluster, operator_log: &Path) -> String {
    let pipelines = cluster
        .kubectl(&["-n", SHOP, "get", "emp", "-o", "yaml"])
        .await;
    let user = format!("system:serviceaccount:{OPERATOR_NS}:{RELEASE}");
    let refused = cluster.server.store().lock().unwrap().refusals(&user);
    let workers: Vec<String> = ["transactional-worker", "receipts-worker"]
        .iter()
        .flat_map(|d| cluster.runner.pods(SHOP, d))
        .map(|w| {
            format!(
                "{w:?}\n{}",
                std::fs::read_to_string(&w.log).unwrap_or_default()
            )
        })
        .collect();
    format!(
        "{}\nrefused: {refused:#?}\noperator log:\n{}\nworkers:\n{}",
        String::from_utf8_lossy(&pipelines.stdout),
        std::fs::read_to_string(operator_log).unwrap_or_default(),
        workers.join("\n")
    )
}

async fn kubectl_in(cluster: &Cluster, namespace: &str, args: &[&str]) -> String {
    let mut all = vec!["-n", namespace];
    all.extend_from_slice(args);
    cluster.kubectl_ok(&all).await
}

/// Installs the chart with `values`, runs the pipeline through its life, and checks the
/// grants the operator used against the ones the chart gives.
async fn install_and_run(values: Value) {
    let per_namespace = values["watchNamespaces"]
        .as_array()
        .is_some_and(|n| !n.is_empty());
    let cluster = Cluster::start().await;
    for (kind, plural) in [
        ("ServiceMonitor", "servicemonitors"),
        ("PrometheusRule", "prometheusrules"),
    ] {
        assert!(cluster
            .apply(&monitoring_crd(kind, plural))
            .await
            .status
            .success());
    }
    // (kubectl create sends protobuf, which the test server does not read: manifests are
    // applied instead.)
    for namespace in [OPERATOR_NS, SHOP] {
        let manifest = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}\n");
        assert!(cluster.apply(&manifest).await.status.success());
    }

    // helm install: crds/ (the same file Cluster::start applied), then the templates.
    let objects = render(values, RELEASE, OPERATOR_NS).expect("the chart renders");
    let dir = tempfile::tempdir().unwrap();
    let rendered = dir.path().join("rendered.yaml");
    let text: Vec<String> = objects
        .iter()
        .map(|o| serde_yaml_ng::to_string(o).unwrap())
        .collect();
    std::fs::write(&rendered, text.join("---\n")).unwrap();
    let applied = cluster
        .kubectl_ok(&["apply", "--server-side", "-f", rendered.to_str().unwrap()])
        .await;
    assert_eq!(
        applied.matches("serverside-applied").count(),
        objects.len(),
        "every rendered object applied: {applied}"
    );

    // The kubelet for the operator's pods: the chart's image is the local operator binary.
    let operator_pods = Runner::start(cluster.client.clone(), {
        let mut config = RunnerConfig::new(
            "app.kubernetes.io/name=mailpipe-operator",
            &dir.path().join("operator-pods"),
        )
        .api_server(&cluster.server.url())
        .program(
            "mailpipe-operator",
            &built_binary("mailpipe-operator", "MAILPIPE_OPERATOR_BIN"),
        );
        config.port_env = "MAILPIPE_OPERATOR_HTTP_ADDR".into();
        config
    });
    let pod = eventually(Cluster::SETTLE, "the operator pod ready", || async {
        operator_pods
            .pods(OPERATOR_NS, RELEASE)
            .into_iter()
            .find(|p| p.ready)
    })
    .await;
    let holder = eventually(Cluster::SETTLE, "the operator leads", || async {
        let out = cluster
            .kubectl(&[
                "-n",
                OPERATOR_NS,
                "get",
                "lease",
                RELEASE,
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ])
            .await;
        let holder = String::from_utf8_lossy(&out.stdout).into_owned();
        (!holder.is_empty()).then_some(holder)
    })
    .await;
    assert_eq!(holder, pod.name, "the pod's name is its identity");

    // What the example names. The provider as the example expects one: STARTTLS, verified with the CA it names, and
    // a login.
    let pki = certs::make(dir.path());
    let smtp = SmtpServer::start(SmtpOptions {
        tls: SmtpTls::Starttls,
        cert: Some((pki.cert.clone(), pki.key.clone())),
        auth: Some(("mailer".into(), "s3cret".into())),
        ..SmtpOptions::default()
    })
    .await;
    let ca = std::fs::read_to_string(&pki.ca).unwrap();
    let names = Names::new("chart");
    let prefix = unique("chart");
    for manifest in [
        secret("amqp", &[("url", SHARED_URL)]),
        secret(
            "smtp-credentials",
            &[("username", "mailer"), ("password", "s3cret")],
        ),
        secret("redis", &[("url", redis_server::SHARED_URL)]),
        secret("smtp-ca", &[("ca.crt", &ca)]),
    ] {
        assert!(cluster.apply(&manifest).await.status.success());
    }
    let templates = repo_root().join("deploy/examples/templates");
    let map = kubectl_in(
        &cluster,
        SHOP,
        &[
            "create",
            "configmap",
            "mail-templates",
            "--from-file",
            templates.to_str().unwrap(),
            "--dry-run=client",
            "-o",
            "yaml",
        ],
    )
    .await;
    assert!(cluster.apply(&map).await.status.success());
    // The example, and a second copy of it that will have nothing left in its queues.
    let receipts = Names::new("chartr");
    for (name, names) in [("transactional", &names), ("receipts", &receipts)] {
        let manifest = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&manifest, pipeline(name, names, smtp.port)).unwrap();
        kubectl_in(&cluster, SHOP, &["apply", "-f", manifest.to_str().unwrap()]).await;
    }
    for name in ["transactional", "receipts"] {
        let ready = tokio::time::timeout(Cluster::SETTLE, async {
            loop {
                let ready = kubectl_in(
                    &cluster,
                    SHOP,
                    &[
                        "get",
                        "emp",
                        name,
                        "-o",
                        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                    ],
                )
                .await;
                if ready == "True" {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        if ready.is_err() {
            panic!(
                "{name} is not Ready:\n{}",
                diagnose(&cluster, &pod.log).await
            );
        }
    }

    // A templated job, published twice: rendered, and sent once.
    let job = json!({
        "id": format!("{prefix}-signup"),
        "to": ["ann@example.com"],
        "template": {"name": "welcome", "data": {"name": "Ann", "product": "Shop"}},
    });
    let body = serde_json::to_vec(&job).unwrap();
    amqp::publish(SHARED_URL, &names.exchange, [body.clone(), body]).await;
    smtp.wait_for_count(1, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let received = smtp.messages().await;
    assert_eq!(received.len(), 1, "the repeat was skipped");
    assert!(
        received[0].data.contains("Welcome to Shop, Ann!"),
        "{}",
        received[0].data
    );

    // Paused, resumed and paused again: the scaler sets the count through /scale, and the
    // second identical decision updates its Event's series instead of writing another.
    let pause = |paused: bool| {
        let annotation = if paused {
            "mailpipe.dev/paused-replicas=0"
        } else {
            "mailpipe.dev/paused-replicas-"
        };
        let cluster = &cluster;
        async move {
            kubectl_in(
                cluster,
                SHOP,
                &["annotate", "emp", "transactional", annotation],
            )
            .await;
            eventually(Cluster::SETTLE, "the workers paused or back", || async {
                let pods = cluster.runner.pods(SHOP, "transactional-worker");
                let settled = if paused {
                    pods.is_empty()
                } else {
                    pods.len() == 1 && pods[0].ready
                };
                settled.then_some(())
            })
            .await;
        }
    };
    pause(true).await;
    pause(false).await;
    pause(true).await;
    let series = kubectl_in(
        &cluster,
        SHOP,
        &[
            "get",
            "events.events.k8s.io",
            "-o",
            "jsonpath={.items[*].series.count}",
        ],
    )
    .await;
    assert!(
        !series.trim().is_empty(),
        "a Scaled event seen more than once"
    );

    // A job left in the queue, then the namespace deleted: its Secrets go first, so the
    // cleanup reads the broker connection the operator kept in its own namespace, sees the
    // namespace going, keeps the topology with the job on the broker and lets go.
    amqp::publish(
        SHARED_URL,
        &names.exchange,
        [serde_json::to_vec(&job).unwrap()],
    )
    .await;
    // The other pipeline's queues are empty: its workers stop (the Deployment goes with the
    // namespace), their grace period passes, and its topology is removed.
    let user = format!("system:serviceaccount:{OPERATOR_NS}:{RELEASE}");
    let refused = cluster.server.store().lock().unwrap().refusals(&user);
    assert!(
        refused.is_empty(),
        "the chart's RBAC refused the operator: {refused:#?}"
    );
    cluster
        .kubectl_ok(&["delete", "namespace", SHOP, "--wait=false"])
        .await;
    let gone = tokio::time::timeout(Duration::from_secs(120), async {
        while cluster
            .kubectl(&["get", "namespace", SHOP])
            .await
            .status
            .success()
        {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    if gone.is_err() {
        panic!(
            "namespace {SHOP} is still there:\n{}",
            diagnose(&cluster, &pod.log).await
        );
    }
    assert_eq!(
        amqp::ready(SHARED_URL, &names.queue).await,
        1,
        "the job is kept"
    );
    assert!(
        !amqp::queue_exists(SHARED_URL, &receipts.queue).await,
        "the empty topology is removed"
    );
    delete_topology(&names).await;
    operator_pods.shutdown().await;

    // Nothing it asked was refused, but (watching a list of namespaces) in the namespace
    // being deleted once its Role had gone with it; and it used every permission the chart
    // gives.
    let store = cluster.server.store().lock().unwrap();
    let refused = store.refusals(&user);
    assert!(
        refused
            .iter()
            .all(|r| per_namespace && r.contains(&format!(" in {SHOP}"))),
        "the chart's RBAC refused the operator: {refused:#?}"
    );
    let used = used(&store.grants_used(&user));
    let unused: Vec<_> = granted(&objects).difference(&used).cloned().collect();
    assert!(
        unused.is_empty(),
        "the chart grants what the operator never used: {unused:#?}"
    );
    assert!(!used.is_empty());
    drop(store);
}

#[tokio::test]
async fn the_installed_chart_runs_the_operator_as_its_service_account_to_a_ready_pipeline() {
    install_and_run(json!({
        "serviceMonitor": {"enabled": true},
        "prometheusRule": {"enabled": true},
        "dashboards": {"enabled": true},
    }))
    .await;
}

#[tokio::test]
async fn the_chart_watching_one_namespace_needs_only_its_roles_there() {
    install_and_run(json!({"watchNamespaces": [SHOP]})).await;
}
