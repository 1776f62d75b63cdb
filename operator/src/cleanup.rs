//! cleanup (client and broker required): what happens to a pipeline's broker topology when
//! the pipeline is deleted, run by the topology finalizer.
//!
//! `Retain` (and the release annotation) let go at once. `Delete` follows a protocol that
//! drops no job: dead letters wait for a person; intake stops (unbind); jobs left are
//! drained by the workers; then the workers stop, and once no consumer is left and the last
//! one's grace period has passed, the queues are removed. The broker connection comes from
//! the pipeline's Secrets, or from the copy the operator kept (`keep`) when they are gone.
//!
//! A namespace being deleted is the one case where no worker can ever drain what is left
//! (its Deployment is gone and nothing may be created there): the topology is then kept on
//! the broker with its jobs, as `Retain` would, a Warning says which queue holds how many,
//! and the pipeline lets go so the namespace deletion completes. The namespace controller
//! deletes the Roles in it too: when the operator watches a list of namespaces, a refused
//! read of the pipeline's Secrets or write of its workers' count there is then taken as
//! gone (the kept copy serves; the Deployment is being deleted), and the pipeline's own
//! writes rest on cluster-wide rules (the chart's RBAC).

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};

use crate::build;
use crate::crd::{DeletionPolicy, EmailPipeline};
use crate::dereference::{broker_connection, Referenced};
use crate::error::Error;
use crate::reconcile::{fail_from, publish, topology_of, Context, RELEASE_ANNOTATION};
use crate::scaling::actuator::{Actuator, ActuatorError, DeploymentScale, Workload};
use crate::status;
use crate::topology::BrokerTopology;
use crate::validate::validate;

/// Deals with a deleted pipeline's topology; `Ok` lets the finalizer go.
pub async fn cleanup(
    api: &Api<EmailPipeline>,
    pipeline: &EmailPipeline,
    ctx: &Context,
) -> Result<Action, Error> {
    let name = pipeline.name_any();
    let namespace = pipeline.namespace().unwrap_or_default();
    // Whatever else happens, a pipeline that lets go forgets its metrics and kept copy.
    let let_go = || async {
        ctx.metrics.forget(&namespace, &name);
        ctx.broker_urls.forget(&pipeline.uid().unwrap_or_default());
        ctx.keeper().forget(pipeline).await?;
        Ok::<Action, Error>(Action::await_change())
    };
    let release = pipeline
        .annotations()
        .get(RELEASE_ANNOTATION)
        .is_some_and(|v| v == "true");
    if release || pipeline.spec.deletion_policy == DeletionPolicy::Retain {
        if release {
            publish(
                ctx,
                pipeline,
                EventType::Warning,
                "FinalizerReleased",
                format!("{RELEASE_ANNOTATION} is set: the broker topology was left as it is"),
            )
            .await;
        }
        return let_go().await;
    }
    let waiting = |reason: &str, message: String, stopped_at: Option<Time>| {
        let api = api.clone();
        let reason = reason.to_string();
        async move {
            let message = format!("{message}; deleting the pipeline waits (set the annotation {RELEASE_ANNOTATION}=true to keep the topology and finish)");
            let mut current = pipeline.status.clone().unwrap_or_default();
            current.workers_stopped_at = stopped_at;
            fail_from(
                &api,
                pipeline,
                current,
                ctx,
                "TopologyReady",
                &reason,
                message.clone(),
            )
            .await?;
            Err::<Action, Error>(Error::Waiting(message))
        }
    };
    let stopped_at = pipeline
        .status
        .as_ref()
        .and_then(|s| s.workers_stopped_at.clone());
    // Never declared (an invalid spec, a missing Secret from the start): nothing on the
    // broker is this pipeline's, and nothing holds the deletion.
    let declared = pipeline
        .status
        .as_ref()
        .is_some_and(|s| s.topology_declared == Some(true))
        || status::is_true(pipeline.status.as_ref(), "TopologyReady");
    if !declared {
        publish(
            ctx,
            pipeline,
            EventType::Normal,
            "NothingToDelete",
            "the pipeline never had a topology on the broker; nothing to delete".into(),
        )
        .await;
        return let_go().await;
    }
    // A pipeline whose spec is broken never got a topology from this generation's spec;
    // the release annotation is the way out when it did earlier.
    let valid = match validate(&name, &namespace, &pipeline.spec) {
        Ok(valid) => valid,
        Err(invalid) => return waiting("InvalidSpec", invalid.to_string(), stopped_at).await,
    };
    // The pipeline's own Secrets while they exist (and may be read), else the kept copy.
    let mut referenced = match broker_connection(&ctx.client, &namespace, &pipeline.spec).await {
        Err(e) if refused_while_terminating(ctx, &e, &namespace).await => {
            tracing::info!(pipeline = %name, "the pipeline's Secrets may no longer be read in namespace {namespace}, which is being deleted; using the kept copy");
            Referenced::default()
        }
        other => other?,
    };
    // A Kafka pipeline may need no Secret at all (no TLS CA, no SASL); one that needs them
    // and lost them recalls the kept copy too.
    let kafka = pipeline.spec.source.kafka.as_ref();
    let needs_secrets = match kafka {
        Some(k) => {
            (k.ca_secret.is_some() && referenced.kafka_ca.is_none())
                || (k.sasl.is_some() && referenced.kafka_sasl.is_none())
        }
        None => referenced.amqp_url.is_none(),
    };
    if needs_secrets && !ctx.keeper().recall(pipeline, &mut referenced).await? {
        let secret = match (&pipeline.spec.source.rabbitmq, kafka) {
            (Some(r), _) => r.connection_secret.name.clone(),
            (None, Some(k)) => k
                .sasl
                .as_ref()
                .map(|s| s.secret.clone())
                .or_else(|| k.ca_secret.as_ref().map(|c| c.name.clone()))
                .unwrap_or_default(),
            (None, None) => String::new(),
        };
        return waiting(
            "MissingReference",
            format!("Secret {secret:?} (the broker connection) is gone and no copy was kept"),
            stopped_at,
        )
        .await;
    }
    let topology = match topology_of(&valid, &referenced, ctx) {
        Ok(topology) => topology,
        Err(error) => return waiting(error.category(), error.to_string(), stopped_at).await,
    };
    // The deletion protocol: no job may be dropped, waiting in the work queue, in flight at
    // a worker, or waiting out a retry delay.
    let census = match topology.census().await {
        Ok(census) => census,
        Err(error) => return waiting(error.category(), error.to_string(), stopped_at).await,
    };
    let left = census
        .dead_letters()
        .map(|(queue, jobs)| (queue, jobs, true))
        .or_else(|| {
            census
                .first_non_empty()
                .map(|(queue, jobs)| (queue, jobs, false))
        });
    if let Some((queue, jobs, _)) = &left {
        if namespace_terminating(ctx, &namespace).await {
            let note = format!("namespace {namespace} is being deleted and no worker can take the {jobs} jobs in queue {queue}: the topology is kept on the broker with its jobs, as deletionPolicy: Retain would");
            // Logged too: a namespace being deleted refuses new Events.
            tracing::warn!(pipeline = %name, "{note}");
            publish(ctx, pipeline, EventType::Warning, "TopologyKept", note).await;
            return let_go().await;
        }
    }
    // 1. Dead letters wait for a person: nothing changes until they are dealt with.
    if let Some((queue, jobs, true)) = &left {
        return waiting(
            "QueueNotEmpty",
            format!("dead-letter queue {queue} holds {jobs} jobs; redrive or purge them"),
            stopped_at,
        )
        .await;
    }
    // 2. No new jobs from the producers' exchange.
    if let Err(error) = topology.stop_intake().await {
        return waiting(error.category(), error.to_string(), stopped_at).await;
    }
    let workers = build::worker_name(&valid);
    // 3. Jobs left: the workers (back, if they were stopped) drain them.
    if let Some((queue, jobs, false)) = &left {
        if stopped_at.is_some() {
            scale_workers(ctx, &namespace, &workers, 1).await?;
        }
        return waiting(
            "QueueNotEmpty",
            format!("queue {queue} still holds {jobs} jobs"),
            None,
        )
        .await;
    }
    // 4. Every queue empty: stop the workers, and wait until none can still hold a job
    //    (no consumer, and the grace period of the last one to stop has passed).
    let now = status::now();
    let stopped_at = match stopped_at {
        Some(at) => at,
        None => {
            scale_workers(ctx, &namespace, &workers, 0).await?;
            now.clone()
        }
    };
    let grace = valid.shutdown_timeout + Duration::from_secs(10);
    let stopped_for = now.0.as_second() - stopped_at.0.as_second();
    if census.consumers > 0 || stopped_for < grace.as_secs() as i64 {
        return waiting(
            "WorkersStopping",
            format!(
                "every queue is empty; waiting for the workers to stop ({} still consuming) before deleting the queues",
                census.consumers
            ),
            Some(stopped_at),
        )
        .await;
    }
    // 5. Nothing anywhere and no one to hold it: remove.
    match topology.remove().await {
        Ok(()) => {
            publish(
                ctx,
                pipeline,
                EventType::Normal,
                "TopologyDeleted",
                format!("the topology of {} is deleted", valid.source_label()),
            )
            .await;
            let_go().await
        }
        // The broker may be gone for good: say how to let go.
        Err(error) => waiting(error.category(), error.to_string(), Some(stopped_at)).await,
    }
}

/// Whether `namespace` is being deleted (a failed read counts as no).
async fn namespace_terminating(ctx: &Context, namespace: &str) -> bool {
    let api: Api<Namespace> = Api::all(ctx.client.clone());
    match api.get_opt(namespace).await {
        Ok(Some(ns)) => ns.metadata.deletion_timestamp.is_some(),
        Ok(None) => true,
        Err(e) => {
            tracing::warn!(%namespace, "cannot read the namespace: {e}");
            false
        }
    }
}

/// Sets the worker Deployment's replicas through the actuator (a missing Deployment is
/// fine: there is nothing to stop).
async fn scale_workers(
    ctx: &Context,
    namespace: &str,
    name: &str,
    replicas: u32,
) -> Result<(), Error> {
    let workload = Workload {
        namespace: namespace.to_string(),
        name: name.to_string(),
    };
    match DeploymentScale::new(ctx.client.clone())
        .scale(&workload, replicas)
        .await
    {
        Err(ActuatorError::Kube(e)) if refused_while_terminating(ctx, &e, namespace).await => {
            // The namespace controller deletes the Deployment: its pods stop with their
            // grace period, which the protocol waits out before removing anything.
            tracing::info!(%namespace, deployment = %name, "the workers' count may no longer be set in a namespace being deleted; its Deployment goes with it");
            Ok(())
        }
        Err(ActuatorError::Kube(e)) => Err(Error::Kube(e)),
        Ok(()) => Ok(()),
    }
}

/// Whether `error` is a refusal (403) in `namespace` while it is being deleted: the Roles
/// that let the operator in were deleted with the rest of it.
async fn refused_while_terminating(ctx: &Context, error: &kube::Error, namespace: &str) -> bool {
    let forbidden = matches!(error, kube::Error::Api(status) if status.code == 403);
    forbidden && namespace_terminating(ctx, namespace).await
}
