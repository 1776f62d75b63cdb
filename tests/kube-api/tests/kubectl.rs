//! kubectl, unchanged, against the test server, for what this stage serves: get (with label
//! selectors and JSONPath), patch, label, annotate, delete and get --watch. (`kubectl apply`
//! needs the OpenAPI documents of the next stage.)

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
