//! scaler (client and broker required): the scaling loop, apart from the reconcile. The
//! leader looks at each pipeline every `scaling.pollInterval`: reads its work queue over the
//! broker's shared connection (`observe`; the other queues every 5 s, and where the pipeline
//! names a management API, the unacknowledged jobs and the ack rate that `rate` turns into a
//! per-replica send rate), asks the pure `policy` for a replica count, and sets it through
//! the `actuator` (which reads counts from the controllers' Deployment watch); it never
//! re-applies the pipeline's children. The pause annotation holds the count.
//!
//! Its status fields (`desiredReplicas`, `backlog`, `inFlight`, `deadLetterDepth`,
//! `sendRatePerReplica`, `timeToDrainSeconds`, `lastScaleTime`, the `Scaling` condition)
//! are written by a field manager of their own, `mailpipe-operator-scaler`, and only when
//! they change: the reconcile leaves them out of what it applies, so neither writer erases the
//! other's fields, and status writes trigger no reconcile. A pipeline being deleted is left
//! to its cleanup (which stops its workers itself).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::actuator::{Actuator, DeploymentScale, Workload};
use super::engine::{read_backlog, PipelineState, Read, Step};
use super::observe::{Brokers, Reading};
use super::policy::{Decision, Observation, Policy, Reason, Target};
use super::rate::{self, SAMPLE_INTERVAL};
use crate::crd::EmailPipeline;
use crate::reconcile::{publish_for, Context};
use crate::topology::management::{Management, QueueStats};
use crate::topology::TopologyError;
use crate::validate::{validate, ValidatedPipeline, ValidatedSource};

/// The field manager of the scaler's status fields.
pub const SCALER_MANAGER: &str = "mailpipe-operator-scaler";

/// How long the backlog may be unreadable before `fallbackReplicas` applies.
const FALLBACK_AFTER: Duration = Duration::from_secs(30);

/// When a pipeline whose spec does not validate is looked at again (its reconcile reports
/// why; a spec change makes it valid).
const INVALID_RETRY: Duration = Duration::from_secs(2);

/// How often the loop wakes to see which pipelines are due.
const TICK: Duration = Duration::from_millis(250);

/// How to reach a pipeline's broker. Secret: never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerAccess {
    /// The AMQP URL with credentials.
    pub url: String,
    /// The CA bundle (PEM) for its TLS, when the pipeline names one.
    pub ca: Option<String>,
    /// The management API URL with credentials, when the pipeline names one.
    pub management: Option<String>,
    /// A Kafka pipeline's brokers (then `url` is empty).
    pub kafka: Option<mailpipe_contract::kafka::Connection>,
}

/// The broker each pipeline's topology was declared on, as the reconcile last read it from
/// the pipeline's Secrets (by pipeline uid; in memory only, never logged).
#[derive(Default)]
pub struct BrokerUrls(Mutex<HashMap<String, BrokerAccess>>);

impl BrokerUrls {
    /// Remembers pipeline `uid`'s broker.
    pub fn remember(&self, uid: &str, access: BrokerAccess) {
        self.0
            .lock()
            .expect("broker urls lock")
            .insert(uid.to_string(), access);
    }

    /// Forgets pipeline `uid`'s broker (it was deleted).
    pub fn forget(&self, uid: &str) {
        self.0.lock().expect("broker urls lock").remove(uid);
    }

    fn get(&self, uid: &str) -> Option<BrokerAccess> {
        self.0.lock().expect("broker urls lock").get(uid).cloned()
    }
}

/// The rules of a validated pipeline (the drain objective applies once a rate is measured).
pub fn policy_of(valid: &ValidatedPipeline) -> Policy {
    let scaling = &valid.scaling;
    Policy {
        min_replicas: scaling.min_replicas,
        max_replicas: scaling.max_replicas,
        target: if scaling.thresholds.is_empty() {
            Target::PerReplica(scaling.target_backlog_per_replica)
        } else {
            Target::Thresholds(scaling.thresholds.clone())
        },
        activation_backlog: scaling.activation_backlog,
        drain_within: scaling.drain_within,
        scale_up_stabilization: valid.scale_up_stabilization,
        scale_down_stabilization: valid.scale_down_stabilization,
        max_step: scaling.max_step,
        fallback_replicas: scaling.fallback_replicas,
        fallback_after: FALLBACK_AFTER,
        connection_budget: valid.smtp_pool_size,
        connections_per_replica: valid
            .worker
            .concurrency
            .min(crate::build::pool_per_worker(valid)),
        idle_consumers: scaling.allow_idle_consumers,
    }
}

/// What the scaler remembers of one pipeline.
struct Tracked {
    /// What the engine remembers between looks (history, rate meter, queue detail).
    state: PipelineState,
    next_at: Instant,
    /// The status fields last written.
    shown: Option<Shown>,
    /// The pipeline's spec validated, for the generation it was validated at.
    valid: Option<(Option<i64>, Option<Arc<ValidatedPipeline>>)>,
    /// The management API's last figures of the work queue, and when they were read.
    stats: Option<(Instant, QueueStats)>,
}

/// Management API clients, one per API (and CA).
#[derive(Default)]
struct Managements(HashMap<(String, Option<String>), Management>);

impl Managements {
    fn get(&mut self, base: &str, ca: Option<&str>) -> Result<&Management, TopologyError> {
        let key = (base.to_string(), ca.map(str::to_string));
        if !self.0.contains_key(&key) {
            let client = Management::new(base, ca)?;
            self.0.insert(key.clone(), client);
        }
        Ok(&self.0[&key])
    }
}

/// While a pipeline carries this annotation, the scaler holds its workers at the count it
/// gives (`"0"` stops them) and still reports the backlog; removing it hands the count back.
pub const PAUSED_REPLICAS: &str = "mailpipe.dev/paused-replicas";

/// The count the pause annotation fixes, if it is present and a count.
fn paused_replicas(pipeline: &EmailPipeline) -> Result<Option<u32>, String> {
    match pipeline.annotations().get(PAUSED_REPLICAS) {
        None => Ok(None),
        Some(text) => text.trim().parse().map(Some).map_err(|_| {
            format!("annotation {PAUSED_REPLICAS}: {text:?} is not a replica count; ignored")
        }),
    }
}

/// The count a pipeline's worker Deployment is created with: the pause annotation's when
/// it holds one, else `minReplicas` (from 0 the scaler starts workers once the backlog
/// passes the activation mark). Never the API server's default of one, which would start
/// a worker a paused or scaled-to-zero pipeline does not want, even for a moment.
pub fn starting_replicas(pipeline: &EmailPipeline, valid: &ValidatedPipeline) -> u32 {
    paused_replicas(pipeline)
        .ok()
        .flatten()
        .unwrap_or(valid.scaling.min_replicas)
}

/// The management API's figures are in flight counts for this long after they were read.
const STATS_FRESH: Duration = Duration::from_secs(15);

/// Runs until `stop`: every pipeline the controllers see, each at its poll interval.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    let brokers = Brokers::default();
    let mut managements = Managements::default();
    let actuator = DeploymentScale::cached(ctx.client.clone(), ctx.deployments.clone());
    let started = Instant::now();
    let mut tracked: HashMap<String, Tracked> = HashMap::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        let pipelines = ctx.pipelines.all();
        let seen: std::collections::HashSet<String> =
            pipelines.iter().filter_map(|p| p.uid()).collect();
        tracked.retain(|uid, _| seen.contains(uid));
        let now = Instant::now();
        let mut due = Vec::new();
        for pipeline in pipelines {
            if pipeline.meta().deletion_timestamp.is_some() {
                continue;
            }
            let (Some(uid), Some(namespace)) = (pipeline.uid(), pipeline.namespace()) else {
                continue;
            };
            let entry = tracked.entry(uid.clone()).or_insert_with(|| Tracked {
                // A rate measured before this operator started, as the status kept it.
                state: PipelineState::new(
                    pipeline
                        .status
                        .as_ref()
                        .and_then(|s| s.send_rate_per_replica.as_deref())
                        .and_then(|text| text.parse().ok()),
                ),
                next_at: now,
                shown: None,
                valid: None,
                stats: None,
            });
            if entry.next_at > now {
                continue;
            }
            // Validated once per generation (a spec change bumps it); a spec that does not
            // validate is the reconcile's to report, and waits for a change.
            let generation = pipeline.metadata.generation;
            if entry.valid.as_ref().is_none_or(|(at, _)| *at != generation) {
                let name = pipeline.name_any();
                let valid = validate(&name, &namespace, &pipeline.spec)
                    .ok()
                    .map(Arc::new);
                entry.valid = Some((generation, valid));
            }
            let Some(valid) = entry.valid.as_ref().and_then(|(_, v)| v.clone()) else {
                entry.next_at = now + INVALID_RETRY;
                continue;
            };
            // On a fixed schedule (the loop wakes every 250 ms and must not add that to
            // each interval), but never owing looks after a stall.
            entry.next_at = (entry.next_at + valid.poll_interval).max(now);
            due.push((pipeline, uid, valid));
        }
        // The backlogs of every pipeline due, read at once (each on a channel of its own:
        // the broker answers them together, with far fewer wake-ups than one by one).
        let reads: HashMap<String, Read> = {
            let tracked = &tracked;
            let brokers = &brokers;
            futures::stream::iter(due.iter().filter_map(|(_, uid, valid)| {
                let ValidatedSource::Rabbit { settings, plan, .. } = &valid.source else {
                    return None;
                };
                // None: the reconcile has not read the pipeline's Secrets yet.
                let access = ctx.broker_urls.get(uid)?;
                let detail = tracked.get(uid).and_then(|t| t.state.fresh_detail());
                Some(async move {
                    let (url, ca) = (&access.url, access.ca.as_deref());
                    let read = read_backlog(brokers, url, ca, settings, plan, detail).await;
                    (uid.clone(), read)
                })
            }))
            .buffer_unordered(READS_AT_ONCE)
            .collect()
            .await
        };
        let mut reads = reads;
        for (pipeline, uid, valid) in due {
            let Some(entry) = tracked.get_mut(&uid) else {
                continue;
            };
            let links = Links {
                managements: &mut managements,
                actuator: &actuator,
            };
            let read = reads.remove(&uid);
            let at = now - started;
            tick(&ctx, links, &pipeline, &valid, at, entry, read).await;
            ctx.metrics
                .scale_decision_seconds
                .with_label_values::<&str>(&[])
                .observe(now.elapsed().as_secs_f64());
        }
    }
}

/// How many backlog readings one pass of the loop has under way at once.
const READS_AT_ONCE: usize = 32;

/// What the scaler reaches the outside through.
struct Links<'a> {
    managements: &'a mut Managements,
    actuator: &'a DeploymentScale,
}

async fn tick(
    ctx: &Context,
    links: Links<'_>,
    pipeline: &EmailPipeline,
    valid: &ValidatedPipeline,
    at: Duration,
    tracked: &mut Tracked,
    read: Option<Read>,
) {
    let (namespace, name) = (valid.namespace.as_str(), valid.name.as_str());
    let uid = pipeline.uid().unwrap_or_default();
    let workload = Workload {
        namespace: namespace.to_string(),
        name: crate::build::worker_name(valid),
    };
    // No Deployment yet (or any more): nothing to scale.
    let Links {
        managements,
        actuator,
    } = links;
    let current = match actuator.replicas(&workload).await {
        Ok(Some(current)) => current,
        Ok(None) => return,
        Err(error) => {
            tracing::warn!(pipeline = %name, "cannot read the worker replicas: {error}");
            return;
        }
    };
    let reading = match &valid.source {
        ValidatedSource::Rabbit { settings, .. } => {
            let Some(access) = ctx.broker_urls.get(&uid) else {
                // The reconcile has not read the pipeline's Secrets yet.
                return;
            };
            let Some(read) = read else {
                return;
            };
            match tracked.state.take_in(read, at) {
                Ok(reading) => {
                    // Then the management API's figures: unacknowledged jobs and the ack
                    // rate (they change only every 5 s there).
                    if let Some(base) = &access.management {
                        let due = tracked
                            .stats
                            .is_none_or(|(read, _)| read.elapsed() >= SAMPLE_INTERVAL);
                        if due {
                            read_stats(managements, &access, base, &settings.queue, at, tracked)
                                .await
                                .unwrap_or_else(|error| {
                                    tracing::debug!(pipeline = %name, "cannot read the queue's figures: {error}");
                                });
                        }
                    }
                    Some(reading)
                }
                Err(error) => {
                    tracing::debug!(pipeline = %name, "cannot read the backlog: {error}");
                    None
                }
            }
        }
        ValidatedSource::Kafka(kafka) => {
            let Some(connection) = ctx.broker_urls.get(&uid).and_then(|a| a.kafka) else {
                return;
            };
            let lag = super::observe::read_lag(connection, kafka).await;
            match tracked.state.take_lag(lag, current.running, at) {
                Ok(reading) => Some(reading),
                Err(error) => {
                    tracing::debug!(pipeline = %name, "cannot read the consumer group's lag: {error}");
                    None
                }
            }
        }
    };
    // Jobs held by workers, where the management API tells (its figures lag up to 5 s).
    let in_flight = tracked
        .stats
        .filter(|(read, _)| read.elapsed() < STATS_FRESH)
        .map(|(_, stats)| stats.unacked);
    let paused = match paused_replicas(pipeline) {
        Ok(paused) => paused,
        Err(why) => {
            tracing::warn!(pipeline = %name, "{why}");
            None
        }
    };
    let policy = policy_of(valid);
    let step = tracked
        .state
        .decide(
            actuator,
            &workload,
            &policy,
            current,
            reading.as_ref(),
            in_flight,
            paused,
            at,
        )
        .await;
    let Step {
        observation,
        decision,
        scaled,
        ..
    } = match step {
        Ok(step) => step,
        Err(error) => {
            tracing::warn!(pipeline = %name, "cannot scale the workers: {error}");
            return;
        }
    };
    if scaled {
        let direction = if decision.replicas > current.desired {
            "up"
        } else {
            "down"
        };
        ctx.metrics
            .scale_events
            .with_label_values(&[namespace, name, direction, decision.reason.as_str()])
            .inc();
        let work = observation.work.map_or(0, |w| w.ready + w.in_flight);
        announce(ctx, pipeline, current.desired, &decision, work).await;
    }
    let (backlog_now, dead_letters) = match &reading {
        Some(Reading::Queue(backlog)) => (Some(backlog.ready), backlog.dead_letter),
        Some(Reading::Lag(lag)) => (Some(lag.per_partition.iter().sum()), lag.dead_letter),
        None => (None, None),
    };
    if let Some(ready) = backlog_now {
        ctx.metrics
            .backlog
            .with_label_values(&[namespace, name])
            .set(ready as i64);
    }
    if let Some(depth) = dead_letters {
        ctx.metrics
            .dead_letter_depth
            .with_label_values(&[namespace, name])
            .set(depth as i64);
    }
    ctx.metrics
        .replicas
        .with_label_values(&[namespace, name, "desired"])
        .set(i64::from(decision.replicas));
    // The scaler's status fields, written when they change (compared in this cheap form
    // first: most looks at most pipelines change nothing).
    let rate_text = tracked.state.meter.rate().map(rate::status_text);
    let eta_seconds = decision
        .time_to_drain
        .map(|eta| eta.as_secs_f64().ceil() as i64);
    if let Some(rate) = tracked.state.meter.rate() {
        ctx.metrics
            .send_rate_per_replica
            .with_label_values(&[namespace, name])
            .set(rate);
    }
    if let Some(seconds) = eta_seconds {
        ctx.metrics
            .time_to_drain
            .with_label_values(&[namespace, name])
            .set(seconds);
    }
    if let Some(within) = policy.drain_within {
        ctx.metrics
            .drain_objective
            .with_label_values(&[namespace, name])
            .set(within.as_secs() as i64);
    }
    let shown = Shown {
        desired: decision.replicas,
        backlog: backlog_now,
        dead_letter: dead_letters,
        in_flight,
        rate: rate_text.clone(),
        eta: eta_seconds,
        reason: decision.reason.as_str(),
        message: scaling_message(&decision, &observation, &policy),
        readable: observation.work.is_some(),
        generation: pipeline.metadata.generation,
    };
    if !scaled && tracked.shown.as_ref() == Some(&shown) {
        return;
    }
    let mut fields = serde_json::json!({"desiredReplicas": decision.replicas});
    if let Some(ready) = shown.backlog {
        fields["backlog"] = serde_json::json!(ready);
    }
    if let Some(depth) = shown.dead_letter {
        fields["deadLetterDepth"] = serde_json::json!(depth);
    }
    if let Some(held) = in_flight {
        fields["inFlight"] = serde_json::json!(held);
    }
    if let Some(text) = rate_text {
        fields["sendRatePerReplica"] = serde_json::json!(text);
    }
    if let Some(seconds) = eta_seconds {
        fields["timeToDrainSeconds"] = serde_json::json!(seconds);
    }
    let last_scale = pipeline
        .status
        .as_ref()
        .and_then(|s| s.last_scale_time.clone());
    match (scaled, last_scale) {
        (true, _) => fields["lastScaleTime"] = serde_json::json!(crate::status::now()),
        (false, Some(time)) => fields["lastScaleTime"] = serde_json::json!(time),
        (false, None) => {}
    }
    fields["conditions"] = serde_json::json!([scaling_condition(pipeline, &shown)]);
    let api: Api<EmailPipeline> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = serde_json::json!({
        "apiVersion": "mailpipe.dev/v1alpha1",
        "kind": "EmailPipeline",
        "status": fields,
    });
    match api
        .patch_status(
            name,
            &PatchParams::apply(SCALER_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(_) => tracked.shown = Some(shown),
        Err(error) => tracing::warn!(pipeline = %name, "cannot write the scaling status: {error}"),
    }
}

/// Reads the work queue's figures from the management API and feeds the rate meter.
async fn read_stats(
    managements: &mut Managements,
    access: &BrokerAccess,
    base: &str,
    queue: &str,
    at: Duration,
    tracked: &mut Tracked,
) -> Result<(), TopologyError> {
    let stats = managements
        .get(base, access.ca.as_deref())?
        .queue_stats(&access.url, queue)
        .await?;
    tracked.state.meter.sample(at, stats.ack_rate);
    tracked.stats = Some((Instant::now(), stats));
    Ok(())
}

/// What the scaler last wrote to a pipeline's status, in a form cheap to compare.
#[derive(Debug, Clone, PartialEq)]
struct Shown {
    desired: u32,
    backlog: Option<u64>,
    dead_letter: Option<u64>,
    in_flight: Option<u64>,
    rate: Option<String>,
    eta: Option<i64>,
    reason: &'static str,
    message: String,
    readable: bool,
    /// The condition's observedGeneration.
    generation: Option<i64>,
}

/// The `Scaling` condition's message for a decision.
fn scaling_message(decision: &Decision, observation: &Observation, policy: &Policy) -> String {
    let Some(work) = observation.work else {
        return format!("the backlog cannot be read; {} replicas", decision.replicas);
    };
    let jobs = work.ready + work.in_flight;
    let mut message = match decision.time_to_drain {
        Some(eta) => format!(
            "{} replicas for {jobs} jobs, about {}s to drain",
            decision.replicas,
            eta.as_secs()
        ),
        None => format!("{} replicas for {jobs} jobs", decision.replicas),
    };
    if decision.reason == Reason::ConnectionBudget {
        message.push_str(&format!(
            "; they use all {} SMTP connections of spec.smtp.poolSize ({} each at most, the concurrency): more would only wait for one",
            policy.connection_budget, policy.connections_per_replica
        ));
    }
    message
}

/// The `Scaling` condition: True with the decision's reason while the backlog can be read,
/// False while it cannot. Its transition time holds while its status does.
fn scaling_condition(
    pipeline: &EmailPipeline,
    shown: &Shown,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    let previous = pipeline
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    crate::status::set_conditions(
        &previous,
        &[(
            "Scaling",
            shown.readable,
            shown.reason,
            shown.message.clone(),
        )],
        shown.generation,
        crate::status::now(),
    )
    .into_iter()
    .find(|c| c.type_ == "Scaling")
    .expect("the condition just set")
}

/// One Normal event per scale decision, with its reason.
async fn announce(
    ctx: &Context,
    pipeline: &EmailPipeline,
    from: u32,
    decision: &Decision,
    work: u64,
) {
    let note = format!(
        "scaled the workers from {from} to {} ({}; {work} jobs waiting)",
        decision.replicas,
        decision.reason.as_str()
    );
    tracing::info!(pipeline = %pipeline.name_any(), "{note}");
    publish_for(ctx, pipeline, "Scale", EventType::Normal, "Scaled", note).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(scaling: serde_json::Value) -> ValidatedPipeline {
        let spec = serde_json::from_value(serde_json::json!({
            "source": {"rabbitmq": {"connectionSecret": {"name": "amqp", "key": "url"}, "queue": "q"}},
            "smtp": {"host": "smtp.example.com", "from": {"address": "noreply@example.com"}},
            "scaling": scaling,
        }))
        .expect("a spec");
        validate("w", "m", &spec).expect("valid")
    }

    #[test]
    fn the_pause_annotation_gives_a_count_or_is_refused() {
        let with = |value: Option<&str>| {
            let mut pipeline = EmailPipeline::new("w", serde_json::from_value(serde_json::json!({
                "source": {"rabbitmq": {"connectionSecret": {"name": "amqp", "key": "url"}, "queue": "q"}},
                "smtp": {"host": "smtp.example.com", "from": {"address": "noreply@example.com"}},
            })).unwrap());
            if let Some(value) = value {
                pipeline
                    .annotations_mut()
                    .insert(PAUSED_REPLICAS.into(), value.into());
            }
            paused_replicas(&pipeline)
        };
        assert_eq!(with(None), Ok(None));
        assert_eq!(with(Some("0")), Ok(Some(0)));
        assert_eq!(with(Some(" 3 ")), Ok(Some(3)));
        assert!(with(Some("three"))
            .unwrap_err()
            .contains("not a replica count"));
        assert!(with(Some("-1")).is_err());
    }

    #[test]
    fn the_spec_becomes_the_policy() {
        let v = valid(serde_json::json!({"minReplicas": 0, "maxReplicas": 4,
            "targetBacklogPerReplica": 10, "activationBacklog": 3, "maxStep": 2,
            "fallbackReplicas": 1, "scaleDownStabilization": "30s"}));
        let p = policy_of(&v);
        assert_eq!(
            (p.min_replicas, p.max_replicas, p.activation_backlog),
            (0, 4, 3)
        );
        assert_eq!(p.target, Target::PerReplica(10));
        assert_eq!((p.max_step, p.fallback_replicas), (Some(2), Some(1)));
        assert_eq!(p.scale_down_stabilization, Duration::from_secs(30));
        assert_eq!((p.connection_budget, p.connections_per_replica), (20, 16));
        let table = valid(serde_json::json!({"thresholds": [
            {"backlog": 0, "replicas": 1}, {"backlog": 1000, "replicas": 5}]}));
        assert_eq!(
            policy_of(&table).target,
            Target::Thresholds(vec![(0, 1), (1000, 5)])
        );
    }
}
