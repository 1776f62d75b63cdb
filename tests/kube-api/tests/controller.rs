//! A kube-rs `Controller` with a finalizer and status updates, run against the test server
//! for a minute while pipelines are created, changed and deleted: it must settle (no
//! re-list loop, no reconcile storm, no errors) and finalize what is deleted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{finalizer, Event};
use kube::runtime::watcher;
use kube::Client;
use mailpipe_kube_api::KubeApiServer;
use serde_json::json;

const FINALIZER: &str = "mailpipe.dev/cleanup";

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failed(String);

struct Context {
    api: Api<DynamicObject>,
    reconciles: AtomicUsize,
    cleanups: AtomicUsize,
}

async fn reconcile(object: Arc<DynamicObject>, ctx: Arc<Context>) -> Result<Action, Failed> {
    ctx.reconciles.fetch_add(1, Ordering::SeqCst);
    let api = ctx.api.clone();
    let cleanups = ctx.clone();
    finalizer(&ctx.api, FINALIZER, object, |event| async move {
        match event {
            Event::Apply(object) => {
                let name = object.metadata.name.clone().unwrap_or_default();
                let status = json!({
                    "apiVersion": "mailpipe.dev/v1alpha1", "kind": "EmailPipeline",
                    "status": {"phase": "Ready", "observedGeneration": object.metadata.generation},
                });
                api.patch_status(
                    &name,
                    &PatchParams::apply("test-controller"),
                    &Patch::Apply(status),
                )
                .await
                .map_err(|e| Failed(e.to_string()))?;
                Ok::<_, Failed>(Action::requeue(Duration::from_secs(300)))
            }
            Event::Cleanup(_) => {
                cleanups.cleanups.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Failed>(Action::await_change())
            }
        }
    })
    .await
    .map_err(|e| Failed(e.to_string()))
}

fn pipeline(name: &str, queue: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "mailpipe.dev/v1alpha1", "kind": "EmailPipeline",
        "metadata": {"name": name},
        "spec": {"source": {"rabbitmq": {"queue": queue}}, "destination": {"mailbox": "ops@example.com"}},
    }))
    .unwrap()
}

#[tokio::test]
async fn a_controller_with_a_finalizer_settles_and_does_not_relist_for_a_minute() {
    let server = KubeApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&path).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    let client = Client::try_from(config).unwrap();

    let crd_body = mailpipe_kube_api::recorded_crd();
    let crds: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
            "customresourcedefinitions",
        ),
    );
    crds.create(
        &PostParams::default(),
        &serde_json::from_value(crd_body.clone()).unwrap(),
    )
    .await
    .unwrap();

    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("mailpipe.dev", "v1alpha1", "EmailPipeline"),
        "emailpipelines",
    );
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &resource);
    for name in ["a", "b", "c"] {
        api.create(&PostParams::default(), &pipeline(name, "inbox"))
            .await
            .unwrap();
    }
    let ctx = Arc::new(Context {
        api: api.clone(),
        reconciles: AtomicUsize::new(0),
        cleanups: AtomicUsize::new(0),
    });
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let controller = {
        let errors = errors.clone();
        Controller::new_with(api.clone(), watcher::Config::default(), resource.clone())
            .run(
                reconcile,
                |_, _: &Failed, _| Action::requeue(Duration::from_secs(5)),
                ctx.clone(),
            )
            .for_each(move |result| {
                if let Err(error) = result {
                    errors.lock().unwrap().push(error.to_string());
                }
                async {}
            })
    };
    let driver = tokio::spawn(controller);

    // Changes while it runs: a spec edit, a new pipeline, a deletion through the finalizer.
    tokio::time::sleep(Duration::from_secs(5)).await;
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 3}})),
    )
    .await
    .unwrap();
    api.create(&PostParams::default(), &pipeline("d", "outbox"))
        .await
        .unwrap();
    api.delete("b", &DeleteParams::default()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(55)).await;
    driver.abort();

    let errors = errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "controller errors: {errors:?}");
    assert_eq!(
        ctx.cleanups.load(Ordering::SeqCst),
        1,
        "b was finalized once"
    );
    assert!(
        api.get_opt("b").await.unwrap().is_none(),
        "b is gone after its finalizer"
    );
    for name in ["a", "c", "d"] {
        let object = api.get(name).await.unwrap();
        assert_eq!(object.data["status"]["phase"], "Ready", "{name}");
        assert_eq!(
            object.data["status"]["observedGeneration"],
            object.metadata.generation.unwrap(),
            "{name}"
        );
        assert_eq!(
            object.metadata.finalizers.as_deref(),
            Some(&[FINALIZER.to_string()][..]),
            "{name}"
        );
    }
    let reconciles = ctx.reconciles.load(Ordering::SeqCst);
    assert!(
        reconciles <= 20,
        "{reconciles} reconciles for 4 pipelines and 3 changes: a reconcile storm"
    );
    let requests = server.store().lock().unwrap().requests().to_vec();
    let lists = requests
        .iter()
        .filter(|r| r.starts_with("GET ") && r.ends_with("/emailpipelines"))
        .count();
    let watches = requests
        .iter()
        .filter(|r| r.starts_with("WATCH ") && r.ends_with("/emailpipelines"))
        .count();
    println!("{reconciles} reconciles, {lists} lists, {watches} watches in a minute");
    assert!(lists <= 1, "the controller re-listed {lists} times");
    assert!(watches <= 2, "the controller re-watched {watches} times");
}
