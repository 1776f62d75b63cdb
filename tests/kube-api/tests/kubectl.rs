//! kubectl, unchanged, against the test server: get (label selectors, JSONPath, printer
//! columns of custom and built-in kinds), apply (client- and server-side), patch, label,
//! annotate, scale, explain, delete (of a namespace with its content) and get --watch.

use std::process::{Command, Output};
use std::time::Duration;

use mailpipe_kube_api::KubeApiServer;

fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> Output {
    Command::new("kubectl")
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .output()
        .expect("kubectl is installed (/usr/bin/kubectl on these machines)")
}

fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "kubectl failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn kubectl_gets_patches_labels_deletes_and_watches() {
    let server = KubeApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let http = reqwest::Client::new();
    let created = http
        .post(format!("{}/api/v1/namespaces/default/configmaps", server.url()))
        .header("Content-Type", "application/json")
        .body(r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"demo","labels":{"team":"mail"}},"data":{"a":"b"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status().as_u16(), 201);

    let kc = kubeconfig.clone();
    let run = move |args: &'static [&'static str]| {
        let kc = kc.clone();
        tokio::task::spawn_blocking(move || kubectl(&kc, args))
    };
    assert!(ok(run(&["get", "configmaps"]).await.unwrap()).contains("demo"));
    assert_eq!(
        ok(run(&["get", "cm", "-l", "team=mail", "-o", "name"])
            .await
            .unwrap())
        .trim(),
        "configmap/demo"
    );
    assert_eq!(
        ok(run(&["get", "cm", "-l", "team=web", "-o", "name"])
            .await
            .unwrap())
        .trim(),
        ""
    );
    ok(run(&[
        "patch",
        "cm",
        "demo",
        "--type",
        "merge",
        "-p",
        r#"{"data":{"x":"y"}}"#,
    ])
    .await
    .unwrap());
    ok(run(&["label", "cm", "demo", "tier=gold"]).await.unwrap());
    ok(run(&["annotate", "cm", "demo", "note=hi"]).await.unwrap());
    let data = ok(run(&[
        "get",
        "cm",
        "demo",
        "-o",
        "jsonpath={.data.x} {.metadata.labels.tier} {.metadata.annotations.note}",
    ])
    .await
    .unwrap());
    assert_eq!(data, "y gold hi");
    let missing = run(&["get", "cm", "nope"]).await.unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains(r#"configmaps "nope" not found"#));

    let watch = run(&[
        "get",
        "cm",
        "--watch",
        "--output-watch-events",
        "--request-timeout=4s",
    ]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ok(run(&["delete", "cm", "demo"]).await.unwrap());
    let watched = String::from_utf8_lossy(&watch.await.unwrap().stdout).into_owned();
    let events: Vec<&str> = watched
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(events, ["EVENT", "ADDED", "DELETED"], "{watched}");
}

const PIPELINE: &str = "apiVersion: mailpipe.dev/v1alpha1
kind: EmailPipeline
metadata:
  name: demo
spec:
  source:
    rabbitmq:
      queue: inbox
  destination:
    mailbox: ops@example.com
";

#[tokio::test]
async fn kubectl_applies_a_crd_and_its_resources_and_prints_their_columns() {
    let server = KubeApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    // The CRD the real server was recorded with (printer columns, status and scale).
    let crd_body = mailpipe_kube_api::recorded_crd();
    let crd = dir.path().join("crd.json");
    std::fs::write(&crd, crd_body.to_string()).unwrap();
    let pipeline = dir.path().join("pipeline.yaml");
    std::fs::write(&pipeline, PIPELINE).unwrap();
    let (crd, pipeline_path) = (
        crd.to_str().unwrap().to_string(),
        pipeline.to_str().unwrap().to_string(),
    );
    let run = move |args: Vec<String>| {
        let kc = kubeconfig.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            kubectl(&kc, &args)
        })
    };
    let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    assert!(ok(run(args(&["apply", "-f", &crd])).await.unwrap()).contains("created"));
    assert!(
        ok(run(args(&["apply", "-f", &pipeline_path])).await.unwrap())
            .contains("emailpipeline.mailpipe.dev/demo created")
    );
    // The recorded CRD's short name `ep` is Endpoints' too, and kubectl resolves it to the
    // built-in kind, as it did against the real server (recording 156).
    let endpoints = ok(run(args(&["get", "ep", "-o", "name"])).await.unwrap());
    assert!(!endpoints.contains("demo"), "{endpoints}");
    let table = ok(run(args(&["get", "emailpipelines"])).await.unwrap());
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "FORMAT", "REPLICAS", "PHASE"], "{table}");
    assert!(table.lines().nth(1).unwrap().starts_with("demo"), "{table}");
    assert!(ok(run(args(&["apply", "-f", &pipeline_path])).await.unwrap()).contains("unchanged"));
    std::fs::write(&pipeline, PIPELINE.replace("queue: inbox", "queue: outbox")).unwrap();
    assert!(ok(run(args(&["apply", "-f", &pipeline_path])).await.unwrap()).contains("configured"));
    assert!(
        ok(run(args(&["apply", "--server-side", "-f", &pipeline_path]))
            .await
            .unwrap())
        .contains("serverside-applied")
    );
    assert!(ok(
        run(args(&["scale", "emailpipelines", "demo", "--replicas=3"]))
            .await
            .unwrap()
    )
    .contains("scaled"));
    let replicas = ok(run(args(&[
        "get",
        "emailpipelines",
        "demo",
        "-o",
        "jsonpath={.spec.replicas} {.spec.source.rabbitmq.queue}",
    ]))
    .await
    .unwrap());
    assert_eq!(replicas, "3 outbox");
    let explained = ok(run(args(&["explain", "emailpipelines.spec.source"]))
        .await
        .unwrap());
    assert!(explained.contains("rabbitmq"), "{explained}");
    assert!(ok(run(args(&["delete", "-f", &pipeline_path])).await.unwrap()).contains("deleted"));
}

const DEPLOYMENT: &str = "apiVersion: v1
kind: Namespace
metadata:
  name: mail
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: mail
spec:
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: nginx:1.25
";

#[tokio::test]
async fn kubectl_prints_deployment_columns_and_deletes_a_namespace_with_its_content() {
    let server = KubeApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let manifest = dir.path().join("web.yaml");
    std::fs::write(&manifest, DEPLOYMENT).unwrap();
    let manifest = manifest.to_str().unwrap().to_string();
    let run = move |args: Vec<&'static str>, file: Option<String>| {
        let kc = kubeconfig.clone();
        tokio::task::spawn_blocking(move || {
            let mut args: Vec<&str> = args;
            if let Some(file) = file.as_deref() {
                args.extend(["-f", file]);
                return kubectl(&kc, &args);
            }
            kubectl(&kc, &args)
        })
    };
    let applied = ok(run(vec!["apply"], Some(manifest)).await.unwrap());
    assert!(applied.contains("deployment.apps/web created"), "{applied}");
    let table = ok(run(vec!["get", "deploy", "-n", "mail", "-o", "wide"], None)
        .await
        .unwrap());
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        [
            "NAME",
            "READY",
            "UP-TO-DATE",
            "AVAILABLE",
            "AGE",
            "CONTAINERS",
            "IMAGES",
            "SELECTOR"
        ],
        "{table}"
    );
    assert_eq!(
        [
            lines[1][0],
            lines[1][1],
            lines[1][5],
            lines[1][6],
            lines[1][7]
        ],
        ["web", "0/1", "web", "nginx:1.25", "app=web"],
        "{table}"
    );
    // The defaults the real server fills in are there.
    let policy =
        ok(run(
            vec!["get", "deploy", "web", "-n", "mail", "-o",
             "jsonpath={.spec.strategy.type} {.spec.template.spec.containers[0].imagePullPolicy}"],
            None,
        )
        .await
        .unwrap());
    assert_eq!(policy, "RollingUpdate IfNotPresent");
    // kubectl waits until the namespace and what it held are gone.
    let deleted = ok(
        run(vec!["delete", "namespace", "mail", "--timeout=20s"], None)
            .await
            .unwrap(),
    );
    assert!(deleted.contains(r#"namespace "mail" deleted"#), "{deleted}");
    let gone = run(vec!["get", "deploy", "web", "-n", "mail"], None)
        .await
        .unwrap();
    assert!(!gone.status.success());
}
