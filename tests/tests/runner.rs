//! The runner that plays kubelet: a worker Deployment in the Kubernetes API test server becomes
//! real worker processes, configured only through the pod template (a mounted Secret, a
//! mounted ConfigMap, configMapKeyRef env), scaled, rolled and stopped as in a cluster.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use mailpipe_contract::labels;
use mailpipe_kube_api::runner::{Runner, RunnerConfig};
use mailpipe_kube_api::KubeApiServer;
use mailpipe_tests::amqp::{self, Names, SHARED_URL};
use mailpipe_tests::smtp::{SmtpOptions, SmtpServer};
use mailpipe_tests::{eventually, worker};
use serde_json::json;

fn deployment(names: &Names) -> Deployment {
    let selector = json!({
        labels::NAME: labels::WORKER_NAME,
        labels::INSTANCE: "welcome",
    });
    let mut template_labels = selector.clone();
    template_labels[labels::PART_OF] = json!(labels::PROJECT);
    template_labels[labels::COMPONENT] = json!(labels::WORKER_COMPONENT);
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "welcome-worker", "labels": template_labels},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": template_labels},
                "spec": {
                    // Workers never call the API: no ServiceAccount token, as the operator
                    // writes them.
                    "automountServiceAccountToken": false,
                    "terminationGracePeriodSeconds": 20,
                    "containers": [{
                        "name": "worker",
                        "image": "ghcr.io/mailpipe/mailpipe-worker:test",
                        "args": ["--exchange", names.exchange, "--queue", names.queue,
                                 "--smtp-tls", "none", "--from-address", "noreply@mailpipe.test",
                                 "--backoff-initial", "200ms", "--backoff-max", "2s"],
                        "env": [
                            {"name": "MAILPIPE_AMQP_URL_FILE", "value": "/etc/mailpipe/amqp/url"},
                            {"name": "MAILPIPE_SMTP_HOST", "valueFrom": {"configMapKeyRef": {"name": "smtp", "key": "host"}}},
                            {"name": "MAILPIPE_SMTP_PORT", "valueFrom": {"configMapKeyRef": {"name": "smtp", "key": "port"}}},
                            {"name": "MAILPIPE_TEMPLATES_DIR", "value": "/etc/mailpipe/templates"},
                            {"name": "MAILPIPE_HTTP_ADDR", "value": "0.0.0.0:8080"},
                        ],
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}},
                        "volumeMounts": [
                            {"name": "amqp", "mountPath": "/etc/mailpipe/amqp", "readOnly": true},
                            {"name": "templates", "mountPath": "/etc/mailpipe/templates", "readOnly": true},
                        ],
                    }],
                    "volumes": [
                        {"name": "amqp", "secret": {"secretName": "amqp", "items": [{"key": "AMQP_URL", "path": "url"}]}},
                        {"name": "templates", "configMap": {"name": "templates"}},
                    ],
                },
            },
        },
    }))
    .expect("a valid Deployment")
}

async fn status_of(api: &Api<Deployment>) -> (i64, i64, i32, i32, i32) {
    let d = api.get("welcome-worker").await.expect("the Deployment");
    let status = d.status.unwrap_or_default();
    (
        d.metadata.generation.unwrap_or_default(),
        status.observed_generation.unwrap_or_default(),
        status.replicas.unwrap_or_default(),
        status.ready_replicas.unwrap_or_default(),
        status.updated_replicas.unwrap_or_default(),
    )
}

/// Waits until the status has caught up with the spec and shows `n` ready replicas.
async fn settled(api: &Api<Deployment>, n: i32) {
    eventually(
        Duration::from_secs(60),
        &format!("{n} ready replicas observed"),
        || async {
            let (generation, observed, replicas, ready, updated) = status_of(api).await;
            (generation == observed && replicas == n && ready == n && updated == n).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn the_runner_runs_scales_rolls_and_stops_worker_processes() {
    let server = KubeApiServer::start().await.unwrap();
    let client = server.client();
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let names = Names::new("runner");
    let pods = tempfile::tempdir().unwrap();
    let runner = Runner::start(
        client.clone(),
        RunnerConfig::new(labels::WORKER_SELECTOR, pods.path())
            .program("mailpipe-worker", &worker::binary()),
    );

    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    let mut secret = Secret::default();
    secret.metadata.name = Some("amqp".into());
    secret.data = Some(BTreeMap::from([(
        "AMQP_URL".to_string(),
        ByteString(SHARED_URL.as_bytes().to_vec()),
    )]));
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let maps: Api<ConfigMap> = Api::default_namespaced(client.clone());
    for (name, data) in [
        (
            "smtp",
            json!({"host": "127.0.0.1", "port": smtp.port.to_string()}),
        ),
        (
            "templates",
            json!({"hello.subject": "Hello {{ name }}", "hello.txt": "Hi {{ name }}."}),
        ),
    ] {
        let map: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": name}, "data": data})).unwrap();
        maps.create(&PostParams::default(), &map).await.unwrap();
    }
    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());
    deployments
        .create(&PostParams::default(), &deployment(&names))
        .await
        .unwrap();

    // Two replicas, each its own process on its own port, ready, and sending.
    settled(&deployments, 2).await;
    let first = runner.pods("default", "welcome-worker");
    assert_eq!(first.len(), 2, "{first:?}");
    assert!(first.iter().all(|p| p.ready && p.pid.is_some()));
    assert_ne!(first[0].port, first[1].port);
    let run = mailpipe_tests::unique("runner");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..20).await;
    let templated = json!({"id": format!("{run}-t"), "to": ["ada@example.com"],
                           "template": {"name": "hello", "data": {"name": "Ada"}}});
    amqp::publish(
        SHARED_URL,
        &names.exchange,
        [templated.to_string().into_bytes()],
    )
    .await;
    smtp.wait_for_count(21, Duration::from_secs(30)).await;
    let tally = smtp.tally(&run, 20).await;
    assert_eq!((tally.lost, tally.duplicated), (0, 0), "{tally:?}");
    let messages = smtp.messages().await;
    assert!(
        messages
            .iter()
            .any(|m| m.data.contains("Subject: Hello Ada")),
        "the template from the mounted ConfigMap was used"
    );

    // Scale up through /scale, then down: the extra processes get SIGTERM and exit cleanly.
    let scale = |n: i32| json!({"spec": {"replicas": n}});
    let params = PatchParams::default();
    deployments
        .patch_scale("welcome-worker", &params, &Patch::Merge(scale(3)))
        .await
        .unwrap();
    settled(&deployments, 3).await;
    deployments
        .patch_scale("welcome-worker", &params, &Patch::Merge(scale(1)))
        .await
        .unwrap();
    settled(&deployments, 1).await;
    eventually(Duration::from_secs(30), "two pods gone", || async {
        (runner.finished().len() == 2).then_some(())
    })
    .await;
    for gone in runner.finished() {
        assert_eq!(
            (gone.code, gone.killed),
            (Some(0), false),
            "{gone:?} stopped on SIGTERM within its grace period"
        );
    }
    let survivor = runner.pods("default", "welcome-worker").remove(0);

    // A template change replaces the process; the new one sends.
    let rolled = json!({"spec": {"template": {"metadata": {"annotations": {"mailpipe.dev/config-hash": "2"}}}}});
    deployments
        .patch("welcome-worker", &params, &Patch::Merge(rolled))
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "the pod replaced", || async {
        let pods = runner.pods("default", "welcome-worker");
        (pods.len() == 1 && pods[0].name != survivor.name && pods[0].ready).then_some(())
    })
    .await;
    settled(&deployments, 1).await;
    let finished = runner.finished();
    let old = finished.iter().find(|f| f.name == survivor.name).unwrap();
    assert_eq!((old.code, old.killed), (Some(0), false), "{old:?}");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 20..25).await;
    smtp.wait_for_count(26, Duration::from_secs(30)).await;

    // A template the kubelet cannot start (missing Secret) waits with the reason, and the
    // running pod stays: the rollout does not take away the last available replica.
    let broken = json!({"spec": {"template": {"spec": {"containers": [{"name": "worker", "env": [
        {"name": "MAILPIPE_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": "redis", "key": "url"}}}
    ]}]}}}});
    deployments
        .patch("welcome-worker", &params, &Patch::Strategic(broken))
        .await
        .unwrap();
    let waiting = eventually(Duration::from_secs(30), "a waiting pod", || async {
        let pods = runner.pods("default", "welcome-worker");
        pods.into_iter().find(|p| p.phase.starts_with("Waiting"))
    })
    .await;
    assert!(
        waiting.phase.contains("secret \"redis\" not found"),
        "{waiting:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pods = runner.pods("default", "welcome-worker");
    assert!(
        pods.iter().any(|p| p.ready && p.phase == "Running"),
        "the old replica still serves: {pods:?}"
    );
    let (_, _, replicas, ready, updated) = status_of(&deployments).await;
    assert_eq!((replicas, ready, updated), (2, 1, 1));

    // Deleting the Deployment stops everything.
    deployments
        .delete("welcome-worker", &DeleteParams::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "no pods left", || async {
        runner
            .pods("default", "welcome-worker")
            .is_empty()
            .then_some(())
    })
    .await;
    runner.shutdown().await;
    assert_eq!(amqp::ready(SHARED_URL, &names.queue).await, 0);
}
