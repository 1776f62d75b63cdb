//! kube-rs, unchanged, against the test server: typed and dynamic Api calls and the
//! runtime watcher, as the operator will use them.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::Client;
use mailpipe_kube_api::KubeApiServer;
use serde_json::json;

async fn client(server: &KubeApiServer) -> Client {
    let dir = tempfile_dir();
    let path = dir.join("kubeconfig");
    server.write_kubeconfig(&path).unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "mailpipe-kube-rs-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn config_map(name: &str, labels: serde_json::Value) -> ConfigMap {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels},
        "data": {"k": "v"},
    }))
    .unwrap()
}

#[tokio::test]
async fn kube_rs_creates_reads_lists_patches_and_deletes() {
    let server = KubeApiServer::start().await.unwrap();
    let client = client(&server).await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "work"}})).unwrap();
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();

    let api: Api<ConfigMap> = Api::namespaced(client, "work");
    let created = api
        .create(
            &PostParams::default(),
            &config_map("a", json!({"team": "mail"})),
        )
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.resource_version.is_some());
    api.create(
        &PostParams::default(),
        &config_map("b", json!({"team": "web"})),
    )
    .await
    .unwrap();

    let err = api
        .create(&PostParams::default(), &config_map("a", json!({})))
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{err:?}"
    );

    let selected = api
        .list(&ListParams::default().labels("team=mail"))
        .await
        .unwrap();
    let names: Vec<_> = selected
        .items
        .iter()
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    assert_eq!(names, ["a"]);

    let patched = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"k": "v2"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.data.unwrap()["k"], "v2");

    let mut stale = created.clone();
    stale.data = Some([("k".to_string(), "old".to_string())].into());
    let err = api
        .replace("a", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409),
        "{err:?}"
    );

    api.delete("a", &DeleteParams::default()).await.unwrap();
    let err = api.get("a").await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_kube_runtime_watcher_sees_applies_and_deletes() {
    let server = KubeApiServer::start().await.unwrap();
    let client = client(&server).await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    api.create(&PostParams::default(), &config_map("before", json!({})))
        .await
        .unwrap();

    let mut stream =
        watcher::watcher(api.clone(), watcher::Config::default().labels("w=yes")).boxed();
    let mut seen = Vec::new();
    let writer = {
        let api = api.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            api.create(
                &PostParams::default(),
                &config_map("w1", json!({"w": "yes"})),
            )
            .await
            .unwrap();
            api.patch(
                "w1",
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {"k": "v2"}})),
            )
            .await
            .unwrap();
            api.patch(
                "before",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"w": "yes"}}})),
            )
            .await
            .unwrap();
            api.delete("w1", &DeleteParams::default()).await.unwrap();
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seen.len() < 4 {
        let event = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("watcher events in time")
            .expect("stream goes on")
            .expect("no watcher error");
        match event {
            Event::Apply(cm) => seen.push(format!("apply {}", cm.metadata.name.unwrap())),
            Event::Delete(cm) => seen.push(format!("delete {}", cm.metadata.name.unwrap())),
            Event::InitDone => seen.push("init done".into()),
            Event::Init | Event::InitApply(_) => {}
        }
    }
    writer.await.unwrap();
    assert_eq!(seen, ["init done", "apply w1", "apply w1", "apply before"]);
    let next = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(next, Event::Delete(ref cm) if cm.metadata.name.as_deref() == Some("w1")));
}

fn deployment(replicas: Option<i32>, image: &str) -> serde_json::Value {
    let mut spec = json!({
        "selector": {"matchLabels": {"app": "worker"}},
        "template": {"metadata": {"labels": {"app": "worker"}},
            "spec": {"containers": [{"name": "worker", "image": image}]}},
    });
    if let Some(replicas) = replicas {
        spec["replicas"] = json!(replicas);
    }
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "worker"}, "spec": spec})
}

#[tokio::test]
async fn server_side_apply_leaves_replicas_to_the_scaler_and_reports_conflicts() {
    use k8s_openapi::api::apps::v1::Deployment;
    let server = KubeApiServer::start().await.unwrap();
    let api: Api<Deployment> = Api::namespaced(client(&server).await, "default");
    let operator = PatchParams::apply("mailpipe-operator");

    let created = api
        .patch(
            "worker",
            &operator,
            &Patch::Apply(deployment(Some(1), "worker:1")),
        )
        .await
        .unwrap();
    assert_eq!(created.spec.as_ref().unwrap().replicas, Some(1));

    // A scaler takes over spec.replicas with an ordinary update.
    let scaler = PatchParams {
        field_manager: Some("scaler".into()),
        ..PatchParams::default()
    };
    api.patch(
        "worker",
        &scaler,
        &Patch::Merge(json!({"spec": {"replicas": 4}})),
    )
    .await
    .unwrap();

    // The operator's next apply leaves replicas out and so leaves them alone.
    let applied = api
        .patch(
            "worker",
            &operator,
            &Patch::Apply(deployment(None, "worker:2")),
        )
        .await
        .unwrap();
    let spec = applied.spec.unwrap();
    assert_eq!(
        spec.replicas,
        Some(4),
        "the scaler's replicas survive the operator's apply"
    );
    assert_eq!(
        spec.template.spec.unwrap().containers[0].image.as_deref(),
        Some("worker:2")
    );

    // Applying replicas again would fight the scaler: a conflict naming it.
    let err = api
        .patch(
            "worker",
            &operator,
            &Patch::Apply(deployment(Some(1), "worker:2")),
        )
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 409);
            assert!(
                status
                    .message
                    .contains("conflict with \"scaler\" using apps/v1: .spec.replicas"),
                "{}",
                status.message
            );
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let forced = api
        .patch(
            "worker",
            &operator.clone().force(),
            &Patch::Apply(deployment(Some(1), "worker:2")),
        )
        .await
        .unwrap();
    assert_eq!(forced.spec.unwrap().replicas, Some(1));
    let owners: Vec<String> = forced
        .metadata
        .managed_fields
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e.manager.clone())
        .collect();
    assert!(
        owners.contains(&"mailpipe-operator".to_string()),
        "{owners:?}"
    );
}

#[tokio::test]
async fn status_is_applied_through_the_status_subresource_only() {
    use k8s_openapi::api::apps::v1::Deployment;
    let server = KubeApiServer::start().await.unwrap();
    let api: Api<Deployment> = Api::namespaced(client(&server).await, "default");
    api.patch(
        "worker",
        &PatchParams::apply("op"),
        &Patch::Apply(deployment(Some(1), "worker:1")),
    )
    .await
    .unwrap();
    let status = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "worker"},
        "status": {"replicas": 1, "readyReplicas": 1, "observedGeneration": 1}});
    let updated = api
        .patch_status(
            "worker",
            &PatchParams::apply("runner"),
            &Patch::Apply(status.clone()),
        )
        .await
        .unwrap();
    assert_eq!(updated.status.unwrap().ready_replicas, Some(1));
    // Status sent to the main resource is ignored.
    let mut sneaky = deployment(Some(1), "worker:1");
    sneaky["status"] = json!({"readyReplicas": 7});
    let main = api
        .patch("worker", &PatchParams::apply("op"), &Patch::Apply(sneaky))
        .await
        .unwrap();
    assert_eq!(main.status.unwrap().ready_replicas, Some(1));
}

/// Children a pipeline name could make invalid are refused as the real server refused them:
/// a Service name with a dot (recording 173) and a label value over 63 bytes on a
/// Deployment (recording 176), with the same messages.
#[tokio::test]
async fn invalid_child_names_and_label_values_are_refused_like_the_real_server() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Service;
    let server = KubeApiServer::start().await.unwrap();
    let client = server.client();
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "mail.v2-worker"},
        "spec": {"ports": [{"port": 9090}]},
    }))
    .unwrap();
    match services.create(&PostParams::default(), &service).await {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422);
            assert_eq!(
                e.message,
                "Service \"mail.v2-worker\" is invalid: metadata.name: Invalid value: \"mail.v2-worker\": must not contain dots"
            );
        }
        other => panic!("a dotted Service name was accepted: {other:?}"),
    }
    let long = "transactional-mail-for-customer-accounts-in-the-eu-west-region-1";
    let labels =
        json!({"app.kubernetes.io/instance": long, "app.kubernetes.io/name": "mailpipe-worker"});
    let deployments: Api<Deployment> = Api::namespaced(client, "default");
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": format!("{long}-worker"), "labels": labels},
        "spec": {"selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "worker", "image": "w"}]}}},
    }))
    .unwrap();
    match deployments
        .create(&PostParams::default(), &deployment)
        .await
    {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422);
            assert_eq!(
                e.message,
                format!(
                    "Deployment.apps \"{long}-worker\" is invalid: [metadata.labels: Invalid value: \"{long}\": must be no more than 63 bytes, spec.selector.matchLabels: Invalid value: \"{long}\": must be no more than 63 bytes, spec.selector: Invalid value: {{\"matchLabels\":{{\"app.kubernetes.io/instance\":\"{long}\",\"app.kubernetes.io/name\":\"mailpipe-worker\"}}}}: invalid label selector]"
                )
            );
        }
        other => panic!("a label value over 63 bytes was accepted: {other:?}"),
    }
}
