//! The controller: watches pipelines, the children it owns, and the Secrets and ConfigMaps
//! pipelines refer to (a changed Secret rolls the workers and may unblock a pipeline).
//!
//! A pipeline's own changes trigger a reconcile only when its spec (generation, which a
//! deletion also bumps), annotations or finalizers change: the reconciler writes the status
//! itself (backlog, replicas), and a status write that triggered the next reconcile kept
//! busy pipelines in a tight loop. The resync and the children's changes still come.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{predicates, watcher, Controller, Predicate, WatchStreamExt};
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::crd::EmailPipeline;
use crate::dereference::{refers_to_config_map, refers_to_secret};
use crate::reconcile::{error_policy, reconcile, Context};

/// The controllers' caches of one kind (one per watched namespace, or one for all).
pub struct Caches<K: kube::Resource<DynamicType = ()> + 'static>(std::sync::Mutex<Vec<Store<K>>>);

impl<K: kube::Resource<DynamicType = ()> + Clone + 'static> Default for Caches<K> {
    fn default() -> Self {
        Caches(std::sync::Mutex::default())
    }
}

impl<K: kube::Resource<DynamicType = ()> + Clone + 'static> Caches<K> {
    /// Adds a controller's cache.
    pub fn register(&self, store: Store<K>) {
        self.0.lock().expect("caches lock").push(store);
    }

    /// Every object in every cache now.
    pub fn all(&self) -> Vec<Arc<K>> {
        self.0
            .lock()
            .expect("caches lock")
            .iter()
            .flat_map(|store| store.state())
            .collect()
    }

    /// The object `namespace/name`, if a cache holds it.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<K>> {
        let key = kube::runtime::reflector::ObjectRef::new(name).within(namespace);
        self.0
            .lock()
            .expect("caches lock")
            .iter()
            .find_map(|store| store.get(&key))
    }
}

/// The pipelines in the namespace of `object` that `refers` says refer to it.
fn referring<K: ResourceExt>(
    store: &Store<EmailPipeline>,
    object: &K,
    refers: fn(&crate::crd::EmailPipelineSpec, &str) -> bool,
) -> Vec<ObjectRef<EmailPipeline>> {
    let namespace = object.namespace();
    let name = object.name_any();
    store
        .state()
        .iter()
        .filter(|p| p.namespace() == namespace && refers(&p.spec, &name))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// An Api for `K` in `namespace`, or across all namespaces.
fn scoped<K>(client: &kube::Client, namespace: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Cached objects keep no managedFields: nothing here reads them, and they are a large part
/// of each object (three managers' field sets on a pipeline, two on a Deployment).
fn forget_managed_fields<K: ResourceExt>(object: &mut K) {
    object.managed_fields_mut().clear();
}

/// Reconciles running at once, per controller.
const RECONCILES_AT_ONCE: u16 = 4;

/// Runs the controller for one namespace (`None`: all) until `stop`.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>, stop: CancellationToken) {
    let client = ctx.client.clone();
    let owned = watcher::Config::default().labels(&format!(
        "{}={}",
        mailpipe_contract::labels::MANAGED_BY,
        mailpipe_contract::labels::OPERATOR
    ));
    let (reader, writer) = reflector::store();
    let pipelines = watcher(
        scoped::<EmailPipeline>(&client, &namespace),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(forget_managed_fields)
    .reflect(writer)
    .applied_objects()
    .predicate_filter(
        predicates::generation
            .combine(predicates::annotations)
            .combine(predicates::finalizers),
        Default::default(),
    );
    // At most this many reconciles at once: each holds a broker connection of its own while
    // it declares a topology, and 200 pipelines applied together opened 200 at a time (356
    // MiB RSS, kept by the allocator afterwards). At 16 the operator stayed at 56-87 MiB
    // with 200 pipelines, at 4 at 42-62 MiB, all Ready in 21-24 s either way.
    let controller = Controller::for_stream(pipelines, reader)
        .with_config(kube::runtime::controller::Config::default().concurrency(RECONCILES_AT_ONCE));
    let store = controller.store();
    ctx.pipelines.register(store.clone());
    let secrets_store = store.clone();
    // The worker Deployments are cached whole (not metadata only): the scaler reads their
    // replicas here instead of asking the API server at every look.
    let (deployments, deployment_writer) = reflector::store();
    ctx.deployments.register(deployments);
    let deployment_changes = watcher(scoped::<Deployment>(&client, &namespace), owned.clone())
        .default_backoff()
        .modify(forget_managed_fields)
        .reflect(deployment_writer)
        .touched_objects();
    controller
        .owns_stream(deployment_changes)
        .owns(scoped::<Service>(&client, &namespace), owned.clone())
        .owns(scoped::<PodDisruptionBudget>(&client, &namespace), owned)
        // Only the Secrets' metadata is watched: which one changed is all the mapping
        // needs, and the operator keeps no copy of every Secret's data in memory (it reads
        // the ones a pipeline names when it reconciles that pipeline).
        .watches_stream(
            watcher(
                scoped::<PartialObjectMeta<Secret>>(&client, &namespace),
                watcher::Config::default(),
            )
            .default_backoff()
            .touched_objects(),
            move |secret| referring(&secrets_store, &secret, refers_to_secret),
        )
        .watches(
            scoped::<ConfigMap>(&client, &namespace),
            watcher::Config::default(),
            move |map| referring(&store, &map, refers_to_config_map),
        )
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}
