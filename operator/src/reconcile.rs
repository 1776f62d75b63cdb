//! reconcile: orchestration only. Each pipeline goes through named steps:
//! validate (pure) -> dereference (client) -> ensure topology (broker) -> build children
//! (pure) -> apply (client) -> observe and update status (client). Deletion goes through
//! the topology finalizer (`cleanup`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::finalizer::{self, finalizer, Event};
use kube::{Api, Client, Resource, ResourceExt};

use crate::build::{self, Inputs};
use crate::controller::Caches;
use crate::crd::{DeletionPolicy, EmailPipeline, EmailPipelineStatus, Intake};
use crate::dereference::{dereference, Referenced};
use crate::error::Error;
use crate::keep::{Keeper, Kept};
use crate::metrics::Metrics;
use crate::scaling::scaler::{starting_replicas, BrokerAccess, BrokerUrls, SCALER_MANAGER};
use crate::status::{self, set_conditions, ConditionUpdate};
use crate::topology::kafka::KafkaTopology;
use crate::topology::rabbitmq::{Connections, RabbitTopology};
use crate::topology::{BrokerTopology, PipelineTopology, TopologyError};
use crate::validate::{validate, ValidatedPipeline, ValidatedSource};
use crate::MANAGER;

/// The finalizer that holds a pipeline until its broker topology is dealt with.
pub const FINALIZER: &str = "mailpipe.dev/topology";
/// Set to `"true"` on a pipeline to release the finalizer without touching the broker
/// (when the broker is gone for good and the namespace must be deleted).
pub const RELEASE_ANNOTATION: &str = "mailpipe.dev/release-finalizer";
/// How often a healthy pipeline is looked at again (backlog, readiness).
const RESYNC: Duration = Duration::from_secs(30);

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    /// The worker image for pipelines that name none.
    pub default_image: String,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// Whether the cluster serves ServiceMonitors (prometheus-operator).
    pub service_monitors: bool,
    /// Pipelines whose last reconciles failed: how often in a row, and whether the last
    /// failure was in applying the children (at which generation).
    pub failures: Failures,
    /// The operator's own namespace (its Lease, the kept broker connections).
    pub own_namespace: String,
    /// The kept broker connections this process wrote (see `keep`).
    pub kept: Kept,
    /// Every pipeline the controllers see (see `sharing`, `scaling`).
    pub pipelines: Pipelines,
    /// The controllers' caches of the worker Deployments (the scaler reads replicas here).
    pub deployments: Arc<Caches<Deployment>>,
    /// Each pipeline's broker, for the scaler.
    pub broker_urls: BrokerUrls,
    /// The reconciles' broker connections, one per broker.
    pub connections: Arc<Connections>,
}

/// The controllers' caches of pipelines.
pub type Pipelines = Caches<EmailPipeline>;

impl Context {
    /// Where Delete pipelines' broker connections are kept for their cleanup.
    pub fn keeper(&self) -> Keeper<'_> {
        Keeper {
            client: &self.client,
            namespace: &self.own_namespace,
            kept: &self.kept,
        }
    }
}

/// Consecutive failures per pipeline, for a backoff that grows and for not repeating broker
/// work while only the cluster side fails.
#[derive(Default)]
pub struct Failures(std::sync::Mutex<std::collections::HashMap<(String, String), Failing>>);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Failing {
    in_a_row: u32,
    /// The generation whose children could not be applied (its topology was declared).
    apply_failed_at: Option<i64>,
}

impl Failures {
    fn key(pipeline: &EmailPipeline) -> (String, String) {
        (
            pipeline.namespace().unwrap_or_default(),
            pipeline.name_any(),
        )
    }

    /// Counts a failure; returns how many in a row.
    fn failed(&self, pipeline: &EmailPipeline) -> u32 {
        let mut map = self.0.lock().expect("failures lock");
        let entry = map.entry(Self::key(pipeline)).or_default();
        entry.in_a_row += 1;
        entry.in_a_row
    }

    fn apply_failed(&self, pipeline: &EmailPipeline) {
        let mut map = self.0.lock().expect("failures lock");
        map.entry(Self::key(pipeline)).or_default().apply_failed_at = pipeline.metadata.generation;
    }

    /// Whether this generation's topology was declared and only its children failed since.
    fn only_children_failed(&self, pipeline: &EmailPipeline) -> bool {
        let map = self.0.lock().expect("failures lock");
        map.get(&Self::key(pipeline)).is_some_and(|f| {
            f.apply_failed_at.is_some() && f.apply_failed_at == pipeline.metadata.generation
        })
    }

    fn succeeded(&self, pipeline: &EmailPipeline) {
        self.0
            .lock()
            .expect("failures lock")
            .remove(&Self::key(pipeline));
    }
}

/// The longest wait between two tries of a failing pipeline.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The error's own delay, doubled for each failure in a row before this one, capped.
fn backoff(base: Duration, in_a_row: u32) -> Duration {
    let factor = 2u32.saturating_pow(in_a_row.saturating_sub(1).min(16));
    base.saturating_mul(factor).min(MAX_BACKOFF)
}

/// Reconciles one pipeline.
pub async fn reconcile(pipeline: Arc<EmailPipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let namespace = pipeline.namespace().unwrap_or_default();
    let api: Api<EmailPipeline> = Api::namespaced(ctx.client.clone(), &namespace);
    let failures_key = pipeline.clone();
    let result = finalizer(&api, FINALIZER, pipeline, |event| async {
        match event {
            Event::Apply(pipeline) => apply(&api, &pipeline, &ctx).await,
            Event::Cleanup(pipeline) => crate::cleanup::cleanup(&api, &pipeline, &ctx).await,
        }
    })
    .await
    .or_else(finalizer_outcome);
    ctx.metrics
        .reconcile_seconds
        .with_label_values::<&str>(&[])
        .observe(started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.failures.succeeded(&failures_key);
    }
    let outcome = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics.reconciles.with_label_values(&[outcome]).inc();
    result
}

/// How long to wait after losing the race to add the finalizer.
const AFTER_FINALIZER_RACE: Duration = Duration::from_secs(1);

/// A failed finalizer step as the reconcile's result. Two reconciles of a new pipeline can
/// both try to add the finalizer from a cache that does not show it yet: the second one's
/// JSON patch `test` fails with 422 (recordings 187-189). That is a lost race, not a failure:
/// the finalizer is there, and the pipeline is looked at again in a moment.
fn finalizer_outcome(error: finalizer::Error<Error>) -> Result<Action, Error> {
    match error {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => Err(e),
        finalizer::Error::AddFinalizer(kube::Error::Api(response)) if response.code == 422 => {
            tracing::debug!("another reconcile added the finalizer first");
            Ok(Action::requeue(AFTER_FINALIZER_RACE))
        }
        other => Err(Error::Finalizer(other.to_string())),
    }
}

/// What the controller does after a failed reconcile: the error's own policy.
pub fn error_policy(pipeline: Arc<EmailPipeline>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_failures
        .with_label_values(&[error.category()])
        .inc();
    let in_a_row = ctx.failures.failed(&pipeline);
    // A deletion that waits for its queues to drain looks again at its own pace; what
    // fails grows its wait.
    let after = match error {
        Error::Waiting(_) => error.requeue_after(),
        _ => backoff(error.requeue_after(), in_a_row),
    };
    tracing::warn!(
        pipeline = %pipeline.name_any(),
        namespace = %pipeline.namespace().unwrap_or_default(),
        category = error.category(),
        in_a_row,
        retry_in = ?after,
        "reconcile failed: {error}"
    );
    Action::requeue(after)
}

pub(crate) async fn publish(
    ctx: &Context,
    pipeline: &EmailPipeline,
    type_: EventType,
    reason: &str,
    note: String,
) {
    publish_for(ctx, pipeline, "Reconcile", type_, reason, note).await;
}

/// An event about `pipeline` from `action` (`Reconcile`, `Scale`).
pub(crate) async fn publish_for(
    ctx: &Context,
    pipeline: &EmailPipeline,
    action: &str,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = KubeEvent {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx
        .recorder
        .publish(&event, &pipeline.object_ref(&()))
        .await
    {
        tracing::warn!(pipeline = %pipeline.name_any(), "cannot publish an event: {e}");
    }
}

/// The status with `updates` applied to its conditions and `Ready` derived from them.
fn next_status(
    pipeline: &EmailPipeline,
    mut base: EmailPipelineStatus,
    updates: &[ConditionUpdate<'_>],
) -> EmailPipelineStatus {
    let generation = pipeline.metadata.generation;
    let mut conditions = set_conditions(&base.conditions, updates, generation, status::now());
    let failing = conditions
        .iter()
        // `Scaling` says what the scaler decided, not whether mail flows.
        .find(|c| c.type_ != "Ready" && c.type_ != "Scaling" && c.status != "True")
        .map(|c| (c.reason.clone(), c.message.clone()));
    let ready = match &failing {
        None => (
            "Ready",
            true,
            "Ready",
            "the pipeline delivers mail".to_string(),
        ),
        Some((reason, message)) => ("Ready", false, reason.as_str(), message.clone()),
    };
    conditions = set_conditions(
        &conditions,
        &[(ready.0, ready.1, ready.2, ready.3)],
        generation,
        status::now(),
    );
    base.conditions = conditions;
    base.observed_generation = generation;
    base
}

async fn fail(
    api: &Api<EmailPipeline>,
    pipeline: &EmailPipeline,
    ctx: &Context,
    condition: &str,
    reason: &str,
    message: String,
) -> Result<(), Error> {
    let current = pipeline.status.clone().unwrap_or_default();
    fail_from(api, pipeline, current, ctx, condition, reason, message).await
}

/// [`fail`] starting from `current` (the pipeline's status with other changes made).
pub(crate) async fn fail_from(
    api: &Api<EmailPipeline>,
    pipeline: &EmailPipeline,
    current: EmailPipelineStatus,
    ctx: &Context,
    condition: &str,
    reason: &str,
    message: String,
) -> Result<(), Error> {
    // A wait that reports a changing count (a deletion waiting for a queue to drain) is
    // one Warning per reason; any other failure is one per distinct message.
    let counting = matches!(reason, "QueueNotEmpty" | "WorkersStopping");
    let was_reported = current
        .conditions
        .iter()
        .any(|c| c.type_ == condition && c.reason == reason && (counting || c.message == message));
    let next = next_status(
        pipeline,
        current,
        &[(condition, false, reason, message.clone())],
    );
    // A failure seen again leaves the status as it is: no write, no event.
    if pipeline.status.as_ref() != Some(&next) {
        status::write(api, pipeline, &next).await?;
    }
    if !was_reported {
        publish(ctx, pipeline, EventType::Warning, reason, message).await;
    }
    Ok(())
}

/// A child the API server would not take (Forbidden, an invalid or immutable field): the
/// reason and the server's message go to `WorkerReady` and one Warning event, and the next
/// tries leave the broker alone.
async fn children_failed(
    api: &Api<EmailPipeline>,
    pipeline: &EmailPipeline,
    ctx: &Context,
    error: Error,
) -> Result<Action, Error> {
    ctx.failures.apply_failed(pipeline);
    if let Error::Kube(kube::Error::Api(response)) = &error {
        let reason = match response.code {
            403 => "Forbidden",
            409 => "Conflict",
            422 => "InvalidChild",
            _ => "ApplyFailed",
        };
        let message = format!(
            "the API server refused a worker object: {}",
            response.message
        );
        fail(api, pipeline, ctx, "WorkerReady", reason, message).await?;
    }
    Err(error)
}

/// Server-side applies a child built for the pipeline (forced: the operator owns what it
/// sends; it sends nothing it does not own).
async fn apply_child<K>(ctx: &Context, namespace: &str, child: &K) -> Result<K, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    let name = child.meta().name.clone().unwrap_or_default();
    let params = PatchParams::apply(MANAGER).force();
    Ok(api.patch(&name, &params, &Patch::Apply(child)).await?)
}

/// Whether the worker Deployment is still to be created. The cache answers when it holds
/// it; when it does not (just created, or an operator that has just started), only the API
/// server can say it is absent, since a count sent to an existing Deployment would reset
/// the scaler's. It is asked through `/scale`, which the scaler may read already.
async fn worker_is_new(ctx: &Context, namespace: &str, worker: &str) -> Result<bool, Error> {
    if ctx.deployments.get(namespace, worker).is_some() {
        return Ok(false);
    }
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    match api.get_scale(worker).await {
        Ok(_) => Ok(false),
        Err(kube::Error::Api(response)) if response.code == 404 => Ok(true),
        Err(error) => Err(error.into()),
    }
}

/// Makes the scaler's field manager a co-owner of the count the Deployment was just created
/// with. Server-side apply removes a field its applier stops sending when nobody else owns
/// it: without this, the next apply (which leaves `spec.replicas` out) would reset the count
/// to the API server's default of one.
async fn hand_replicas_to_scaler(
    ctx: &Context,
    namespace: &str,
    worker: &str,
    replicas: u32,
) -> Result<(), Error> {
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    let count = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": worker},
        "spec": {"replicas": replicas},
    });
    api.patch(
        worker,
        &PatchParams::apply(SCALER_MANAGER).force(),
        &Patch::Apply(&count),
    )
    .await?;
    Ok(())
}

/// Reports a topology failure (condition, event, metric) and returns it as the error.
async fn topology_failed(
    api: &Api<EmailPipeline>,
    pipeline: &EmailPipeline,
    ctx: &Context,
    error: TopologyError,
) -> Result<Action, Error> {
    let (namespace, name) = (
        pipeline.namespace().unwrap_or_default(),
        pipeline.name_any(),
    );
    ctx.metrics
        .topology_ready
        .with_label_values(&[&namespace, &name])
        .set(0);
    fail(
        api,
        pipeline,
        ctx,
        "TopologyReady",
        error.category(),
        error.to_string(),
    )
    .await?;
    Err(error.into())
}

pub(crate) fn topology_of(
    valid: &ValidatedPipeline,
    referenced: &Referenced,
    ctx: &Context,
) -> Result<PipelineTopology, TopologyError> {
    match &valid.source {
        ValidatedSource::Rabbit { settings, plan, .. } => {
            let topology = RabbitTopology::new(
                referenced.amqp_url.clone().unwrap_or_default(),
                referenced.amqp_ca.clone(),
                settings.clone(),
                plan.clone(),
            )
            .with_smtp_budget(valid.smtp_pool_size)
            .sharing(ctx.connections.clone());
            Ok(PipelineTopology::Rabbit(Box::new(
                match &referenced.management_url {
                    Some(base) => topology.with_management(base)?,
                    None => topology,
                },
            )))
        }
        ValidatedSource::Kafka(kafka) => Ok(PipelineTopology::Kafka(KafkaTopology::new(
            kafka_connection(kafka, referenced),
            kafka.plan.clone(),
            kafka.group.clone(),
        ))),
    }
}

/// How the operator reaches a Kafka pipeline's brokers: TLS when the spec names a CA
/// Secret, SASL when it names a login Secret.
pub(crate) fn kafka_connection(
    kafka: &crate::validate::KafkaTarget,
    referenced: &Referenced,
) -> mailpipe_contract::kafka::Connection {
    mailpipe_contract::kafka::Connection {
        bootstrap: kafka.bootstrap.clone(),
        ca_file: None,
        ca_pem: referenced.kafka_ca.clone(),
        tls: kafka.ca_secret.is_some(),
        sasl: kafka.sasl.as_ref().zip(referenced.kafka_sasl.as_ref()).map(
            |(sasl, (username, password))| mailpipe_contract::kafka::SaslLogin {
                mechanism: sasl.mechanism,
                username: username.clone(),
                password: password.clone(),
            },
        ),
    }
}

async fn apply(
    api: &Api<EmailPipeline>,
    pipeline: &EmailPipeline,
    ctx: &Context,
) -> Result<Action, Error> {
    let name = pipeline.name_any();
    let namespace = pipeline.namespace().unwrap_or_default();

    // validate (no client required): an invalid spec waits for a change.
    let valid = match validate(&name, &namespace, &pipeline.spec) {
        Ok(valid) => valid,
        Err(invalid) => {
            fail(
                api,
                pipeline,
                ctx,
                "SpecValid",
                "InvalidSpec",
                invalid.to_string(),
            )
            .await?;
            return Ok(Action::await_change());
        }
    };

    // dereference (client required).
    let referenced = match dereference(&ctx.client, &namespace, &pipeline.spec).await {
        Ok(referenced) => referenced,
        Err(Error::MissingReference(message)) => {
            fail(
                api,
                pipeline,
                ctx,
                "SpecValid",
                "MissingReference",
                message.clone(),
            )
            .await?;
            return Err(Error::MissingReference(message));
        }
        Err(other) => return Err(other),
    };

    // ensure topology (broker required).
    let topology = match topology_of(&valid, &referenced, ctx) {
        Ok(topology) => topology,
        Err(error) => return topology_failed(api, pipeline, ctx, error).await,
    };
    if let (Some(url), Some(uid)) = (&referenced.amqp_url, pipeline.uid()) {
        ctx.broker_urls.remember(
            &uid,
            BrokerAccess {
                url: url.clone(),
                ca: referenced.amqp_ca.clone(),
                management: referenced.management_url.clone(),
                kafka: None,
            },
        );
    }
    if let (ValidatedSource::Kafka(kafka), Some(uid)) = (&valid.source, pipeline.uid()) {
        ctx.broker_urls.remember(
            &uid,
            BrokerAccess {
                url: String::new(),
                ca: None,
                management: None,
                kafka: Some(kafka_connection(kafka, &referenced)),
            },
        );
    }
    // sharing (no client required): a fanout exchange another pipeline's queue is bound to
    // on this broker would send every job twice.
    let broker = referenced
        .amqp_url
        .as_deref()
        .and_then(crate::sharing::broker_identity);
    if let Some(broker) = &broker {
        let others = ctx.pipelines.all();
        if let Some(owner) = crate::sharing::shared_fanout_exchange(pipeline, broker, &others) {
            let ValidatedSource::Rabbit { settings, .. } = &valid.source else {
                unreachable!("only RabbitMQ pipelines bind to exchanges")
            };
            let message = format!(
                "the fanout exchange {:?} on this broker already feeds the queue of pipeline {owner}: every job published to it would be sent by both; name an exchange of this pipeline's own (or leave spec.source.rabbitmq.exchange unset for {:?})",
                settings.exchange,
                mailpipe_contract::naming::default_exchange(&settings.queue)
            );
            fail(
                api,
                pipeline,
                ctx,
                "TopologyReady",
                "SharedExchange",
                message,
            )
            .await?;
            // Looked at again later: the other pipeline may go, or this spec change.
            return Ok(Action::requeue(Duration::from_secs(60)));
        }
    }
    // While only the children of this generation fail to apply, the broker is left alone:
    // its topology was declared, and declaring it again on every retry helps nothing.
    if !ctx.failures.only_children_failed(pipeline) {
        if let Err(error) = topology.ensure().await {
            return topology_failed(api, pipeline, ctx, error).await;
        }
    }
    let declared_before = pipeline
        .status
        .as_ref()
        .is_some_and(|s| s.topology_declared == Some(true));
    // The exchange or routing key changed: the new binding is declared, the old one goes.
    let intake = match &valid.source {
        ValidatedSource::Rabbit { settings, .. } => Some(Intake {
            exchange: settings.exchange.clone(),
            routing_key: settings.routing_key.clone(),
        }),
        ValidatedSource::Kafka(_) => None,
    };
    let previous = pipeline.status.as_ref().and_then(|s| s.intake.clone());
    if let Some(old) = previous
        .as_ref()
        .filter(|old| Some(*old) != intake.as_ref())
    {
        if let Err(error) = topology
            .retire_binding(&old.exchange, &old.routing_key)
            .await
        {
            return topology_failed(api, pipeline, ctx, error).await;
        }
    }
    let broker_before = pipeline.status.as_ref().and_then(|s| s.broker.clone());
    let remembered;
    let pipeline = if declared_before && previous == intake && broker_before == broker {
        pipeline
    } else {
        // Remembered at once (not with the rest of the status, which a failing child
        // could hold back): a later deletion must know there is something to delete, and
        // a later change which binding to retire. The rest of this reconcile starts from
        // that status, so no later write drops it.
        let mut current = pipeline.status.clone().unwrap_or_default();
        current.topology_declared = Some(true);
        current.intake = intake;
        current.broker = broker;
        status::write(api, pipeline, &current).await?;
        remembered = EmailPipeline {
            status: Some(current),
            ..pipeline.clone()
        };
        &remembered
    };
    // keep (client required): a Delete pipeline's cleanup must reach the broker even after
    // its Secrets are gone (a namespace deletion removes them first).
    match pipeline.spec.deletion_policy {
        DeletionPolicy::Delete => ctx.keeper().remember(pipeline, &referenced).await?,
        DeletionPolicy::Retain => ctx.keeper().forget_if_kept(pipeline).await?,
    }
    ctx.metrics
        .topology_ready
        .with_label_values(&[&namespace, &name])
        .set(1);
    // A Normal event when the topology is first declared, or declared again after it had
    // failed; not on every retry of a pipeline whose children fail.
    let recovered = status::has_condition(pipeline.status.as_ref(), "TopologyReady", "False");
    if !declared_before || recovered {
        let message = match &valid.source {
            ValidatedSource::Rabbit { plan, settings, .. } => format!(
                "exchange {}, queue {} and {} more queues (retry, dead-letter) are declared",
                settings.exchange,
                settings.queue,
                plan.queues.len() - 1
            ),
            ValidatedSource::Kafka(kafka) => format!(
                "topic {} and {} more topics (retry, dead-letter) exist",
                kafka.settings.topic,
                kafka.plan.topics.len() - 1
            ),
        };
        publish(ctx, pipeline, EventType::Normal, "TopologyReady", message).await;
    }

    // build (no client required), then apply (client required).
    let worker = build::worker_name(&valid);
    let starting_replicas = worker_is_new(ctx, &namespace, &worker)
        .await?
        .then(|| starting_replicas(pipeline, &valid));
    let inputs = Inputs {
        owner: pipeline
            .controller_owner_ref(&())
            .expect("a stored object has a name and uid"),
        default_image: ctx.default_image.clone(),
        references: referenced.digest.clone(),
        starting_replicas,
    };
    let params = PatchParams::apply(MANAGER).force();
    let children = async {
        let mut deployment = build::worker_deployment(&valid, &inputs);
        let mut applied: Deployment = apply_child(ctx, &namespace, &deployment).await?;
        if let Some(replicas) = starting_replicas {
            hand_replicas_to_scaler(ctx, &namespace, &worker, replicas).await?;
            // ...and the operator lets go of the count at once: from the creating reconcile
            // on, only the scaler's manager owns it.
            if let Some(spec) = deployment.spec.as_mut() {
                spec.replicas = None;
            }
            applied = apply_child(ctx, &namespace, &deployment).await?;
        }
        let _: Service =
            apply_child(ctx, &namespace, &build::metrics_service(&valid, &inputs)).await?;
        let _: PodDisruptionBudget =
            apply_child(ctx, &namespace, &build::disruption_budget(&valid, &inputs)).await?;
        Ok::<Deployment, Error>(applied)
    };
    let applied = match children.await {
        Ok(applied) => applied,
        Err(error) => return children_failed(api, pipeline, ctx, error).await,
    };
    if ctx.service_monitors {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
            "servicemonitors",
        );
        let monitors: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &namespace, &resource);
        monitors
            .patch(
                &worker,
                &params,
                &Patch::Apply(&build::service_monitor(&valid, &inputs)),
            )
            .await?;
    }

    // observe, then update status.
    let observed = applied.status.unwrap_or_default();
    let replicas = observed.replicas.unwrap_or(0);
    let ready = observed.ready_replicas.unwrap_or(0);
    let desired = applied.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let rolled_out = applied.metadata.generation == observed.observed_generation;
    let worker_ready = if desired == 0 {
        (
            true,
            "ScaledToZero",
            "no worker runs: the backlog is empty".to_string(),
        )
    } else if ready > 0 && rolled_out {
        (true, "Ready", format!("{ready} of {desired} workers ready"))
    } else {
        (
            false,
            "WorkersStarting",
            format!("{ready} of {desired} workers ready"),
        )
    };
    // The backlog, the desired count and their metrics are the scaler's (its own loop and
    // field manager); the reconcile reports what runs.
    let mut current = pipeline.status.clone().unwrap_or_default();
    current.source = Some(valid.source_label());
    current.replicas = Some(replicas);
    current.ready_replicas = Some(ready);
    for (kind, value) in [("current", replicas), ("ready", ready)] {
        ctx.metrics
            .replicas
            .with_label_values(&[&namespace, &name, kind])
            .set(i64::from(value));
    }
    let next = next_status(
        pipeline,
        current,
        &[
            (
                "SpecValid",
                true,
                "Valid",
                "the spec and the objects it refers to are valid".into(),
            ),
            (
                "TopologyReady",
                true,
                "Declared",
                format!("{} is declared", valid.source_label()),
            ),
            (
                "WorkerReady",
                worker_ready.0,
                worker_ready.1,
                worker_ready.2,
            ),
        ],
    );
    if pipeline.status.as_ref() != Some(&next) {
        status::write(api, pipeline, &next).await?;
    }
    Ok(Action::requeue(RESYNC))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(
            serde_json::from_value(serde_json::json!({
                "status": "Failure", "message": "the server rejected our request due to an error in our request",
                "reason": "Invalid", "code": code,
            }))
            .unwrap(),
        )
    }

    #[test]
    fn the_wait_after_a_failure_doubles_with_each_one_in_a_row_up_to_five_minutes() {
        let base = Duration::from_secs(5);
        let waits: Vec<u64> = (1..=9).map(|n| backoff(base, n).as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(backoff(base, u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn losing_the_race_to_add_the_finalizer_is_not_a_failure() {
        let outcome = finalizer_outcome(finalizer::Error::AddFinalizer(api_error(422)));
        assert_eq!(outcome.unwrap(), Action::requeue(AFTER_FINALIZER_RACE));
        let other = finalizer_outcome(finalizer::Error::AddFinalizer(api_error(403)));
        assert_eq!(other.unwrap_err().category(), "Finalizer");
    }
}
