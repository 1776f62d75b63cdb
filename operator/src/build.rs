//! build (no client required): the children of a pipeline, as pure functions of a
//! `ValidatedPipeline` and what the reconciler read for it (`Inputs`).
//!
//! The worker Deployment carries only the environment the contract names; secrets reach
//! it as mounted Secret files (the AMQP and Redis URLs, the SMTP password, CA bundles) or a
//! `secretKeyRef` (the SMTP user name), never as values. `spec.replicas` is sent only when
//! the Deployment is created (the count the scaler would hold it at, not the API server's
//! default of one); after that the scaler owns it through `/scale`, and server-side apply
//! leaves a field alone that the applier does not send and another manager owns. A hash of
//! the rendered configuration and of the referenced Secrets and ConfigMaps sits on the pod
//! template, so a change to either rolls the pods.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext,
    Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mailpipe_contract::{env, labels, naming};
use sha2::{Digest, Sha256};

use crate::crd::SecretKeyRef;
use crate::validate::{ValidatedPipeline, ValidatedSource};

/// The annotation on the pod template that changes when the configuration does.
pub const CONFIG_HASH: &str = "mailpipe.dev/config-hash";
/// The worker's HTTP port (metrics, health).
pub const HTTP_PORT: i32 = 9090;
/// Where Secret and ConfigMap volumes are mounted in the worker.
const MOUNTS: &str = "/etc/mailpipe";

/// What the builders need besides the validated spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Inputs {
    /// The pipeline as owner of its children.
    pub owner: OwnerReference,
    /// The image when the spec names none.
    pub default_image: String,
    /// A digest of the referenced Secrets' and ConfigMaps' content (see `references_digest`).
    pub references: String,
    /// The worker count to create the Deployment with; `None` once it exists (the
    /// scaler's from then on).
    pub starting_replicas: Option<u32>,
}

/// `<pipeline>-worker`: the Deployment, Service and PodDisruptionBudget share it.
pub fn worker_name(pipeline: &ValidatedPipeline) -> String {
    format!("{}-worker", pipeline.name)
}

/// The labels that pick a pipeline's worker pods (stable: a Deployment's selector is
/// immutable).
pub fn selector_labels(pipeline: &ValidatedPipeline) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::NAME.to_string(), labels::WORKER_NAME.to_string()),
        (labels::INSTANCE.to_string(), pipeline.name.clone()),
    ])
}

/// Every label on the worker objects.
pub fn worker_labels(pipeline: &ValidatedPipeline) -> BTreeMap<String, String> {
    let mut all = selector_labels(pipeline);
    all.insert(labels::COMPONENT.into(), labels::WORKER_COMPONENT.into());
    all.insert(labels::PART_OF.into(), labels::PROJECT.into());
    all.insert(labels::MANAGED_BY.into(), labels::OPERATOR.into());
    all
}

fn metadata(pipeline: &ValidatedPipeline, inputs: &Inputs) -> ObjectMeta {
    ObjectMeta {
        name: Some(worker_name(pipeline)),
        namespace: Some(pipeline.namespace.clone()),
        labels: Some(worker_labels(pipeline)),
        owner_references: Some(vec![inputs.owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// A digest of referenced content: (kind/name, key, bytes) in any order.
pub fn references_digest<'a>(items: impl IntoIterator<Item = (String, &'a [u8])>) -> String {
    let mut items: Vec<(String, &[u8])> = items.into_iter().collect();
    items.sort();
    let mut hash = Sha256::new();
    for (name, bytes) in items {
        hash.update(name.as_bytes());
        hash.update([0]);
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
    }
    hex(&hash.finalize()[..8])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value(name: &str, value: impl ToString) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.to_string()),
        value_from: None,
    }
}

fn millis(duration: std::time::Duration) -> String {
    format!("{}ms", duration.as_millis())
}

/// A Secret key mounted as a file: the volume, its mount, and the file's path.
fn secret_file(volume: &str, secret: &SecretKeyRef, file: &str) -> (Volume, VolumeMount, String) {
    let dir = format!("{MOUNTS}/{volume}");
    (
        Volume {
            name: volume.to_string(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.name.clone()),
                items: Some(vec![KeyToPath {
                    key: secret.key.clone(),
                    path: file.to_string(),
                    mode: None,
                }]),
                default_mode: Some(0o440),
                optional: None,
            }),
            ..Volume::default()
        },
        VolumeMount {
            name: volume.to_string(),
            mount_path: dir.clone(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        format!("{dir}/{file}"),
    )
}

/// One variable of the worker's environment, before it is placed in a pod (here) or in a
/// local worker process (the `mailpipe local` command, which supplies Secrets from files
/// or its own environment).
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerVar {
    /// A plain value.
    Value(String, String),
    /// The variable names the file a Secret key is in; a pod mounts it as `file` in the
    /// volume `volume`.
    SecretFile {
        name: String,
        volume: &'static str,
        secret: SecretKeyRef,
        file: &'static str,
    },
    /// The variable carries a Secret key's value (a `secretKeyRef`).
    SecretValue { name: String, secret: SecretKeyRef },
    /// The variable names the directory in which a ConfigMap's keys are files.
    ConfigMapDir { name: String, config_map: String },
    /// One of the spec's own `worker.env` entries, as written.
    Extra(Box<EnvVar>),
}

/// The worker's environment and the volumes its secret files come from.
#[derive(Default)]
struct Environment {
    vars: Vec<EnvVar>,
    volumes: Vec<Volume>,
    mounts: Vec<VolumeMount>,
}

/// The worker's environment in a pod: Secret keys and ConfigMaps mounted under `MOUNTS`.
fn environment(pipeline: &ValidatedPipeline) -> Environment {
    let mut out = Environment::default();
    for var in worker_environment(pipeline) {
        match var {
            WorkerVar::Value(name, v) => out.vars.push(value(&name, v)),
            WorkerVar::SecretFile {
                name,
                volume,
                secret,
                file,
            } => {
                let (v, m, path) = secret_file(volume, &secret, file);
                out.volumes.push(v);
                out.mounts.push(m);
                out.vars.push(value(&name, path));
            }
            WorkerVar::SecretValue { name, secret } => out.vars.push(EnvVar {
                name,
                value: None,
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: secret.name,
                        key: secret.key,
                        optional: None,
                    }),
                    ..EnvVarSource::default()
                }),
            }),
            WorkerVar::ConfigMapDir { name, config_map } => {
                let dir = format!("{MOUNTS}/templates");
                out.volumes.push(Volume {
                    name: "templates".into(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: config_map,
                        ..ConfigMapVolumeSource::default()
                    }),
                    ..Volume::default()
                });
                out.mounts.push(VolumeMount {
                    name: "templates".into(),
                    mount_path: dir.clone(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                });
                out.vars.push(value(&name, dir));
            }
            WorkerVar::Extra(var) => out.vars.push(*var),
        }
    }
    out
}

/// Collects the worker's variables in order.
#[derive(Default)]
struct Vars(Vec<WorkerVar>);

impl Vars {
    fn value(&mut self, name: &str, value: impl ToString) {
        self.0
            .push(WorkerVar::Value(name.to_string(), value.to_string()));
    }

    /// Variable `name` names the file a Secret key is mounted as.
    fn file(
        &mut self,
        name: &str,
        volume: &'static str,
        secret: &SecretKeyRef,
        file: &'static str,
    ) {
        self.0.push(WorkerVar::SecretFile {
            name: name.to_string(),
            volume,
            secret: secret.clone(),
            file,
        });
    }
}

/// The SMTP connections one worker opens: RabbitMQ workers share the pipeline's pool
/// through the budget queue, so each is told the whole; Kafka workers have no such queue,
/// so each gets an equal share at the most replicas (at least one), and together they never
/// exceed the pool.
pub(crate) fn pool_per_worker(pipeline: &ValidatedPipeline) -> u32 {
    match pipeline.source {
        ValidatedSource::Rabbit { .. } => pipeline.smtp_pool_size,
        ValidatedSource::Kafka(_) => {
            (pipeline.smtp_pool_size / pipeline.scaling.max_replicas.max(1)).max(1)
        }
    }
}

/// Everything the worker of `pipeline` is told, in the contract's variables, with the
/// Secrets and the templates' ConfigMap as references for the caller to place.
pub fn worker_environment(pipeline: &ValidatedPipeline) -> Vec<WorkerVar> {
    let mut out = Vars::default();
    match &pipeline.source {
        ValidatedSource::Rabbit {
            settings,
            connection,
            ..
        } => {
            out.file(
                env::AMQP_URL_FILE,
                "amqp",
                &connection.connection_secret,
                "url",
            );
            if let Some(ca) = &connection.ca_secret {
                out.file(env::AMQP_CA_FILE, "amqp-ca", ca, "ca.crt");
            }
            out.value(env::TOPOLOGY, "verify");
            out.value(env::EXCHANGE, &settings.exchange);
            out.value(env::EXCHANGE_TYPE, settings.exchange_kind.as_str());
            out.value(env::QUEUE, &settings.queue);
            out.value(env::QUEUE_TYPE, settings.queue_type.as_str());
            out.value(env::ROUTING_KEY, &settings.routing_key);
            if let Some(priority) = settings.max_priority {
                out.value(env::MAX_PRIORITY, priority);
            }
            out.value(env::PREFETCH, connection.prefetch);
            // The workers share spec.smtp.poolSize through the budget's token queue.
            out.value(
                env::SMTP_BUDGET_QUEUE,
                naming::smtp_budget_queue(&settings.queue),
            );
        }
        ValidatedSource::Kafka(kafka) => {
            out.value(env::SOURCE, "kafka");
            out.value(env::KAFKA_BOOTSTRAP_SERVERS, &kafka.bootstrap);
            out.value(env::KAFKA_TOPIC, &kafka.settings.topic);
            out.value(env::KAFKA_GROUP, &kafka.group);
            out.value(env::KAFKA_PARTITIONS, kafka.settings.partitions);
            out.value(env::KAFKA_REPLICATION_FACTOR, kafka.settings.replication);
            out.value(env::TOPOLOGY, "verify");
            if let Some(ca) = &kafka.ca_secret {
                out.file(env::KAFKA_CA_FILE, "kafka-ca", ca, "ca.crt");
            }
            if let Some(sasl) = &kafka.sasl {
                out.value(env::KAFKA_SASL_MECHANISM, sasl.mechanism.as_str());
                out.0.push(WorkerVar::SecretValue {
                    name: env::KAFKA_SASL_USERNAME.to_string(),
                    secret: SecretKeyRef {
                        name: sasl.secret.clone(),
                        key: "username".into(),
                    },
                });
                let password = SecretKeyRef {
                    name: sasl.secret.clone(),
                    key: "password".into(),
                };
                out.file(
                    env::KAFKA_SASL_PASSWORD_FILE,
                    "kafka-sasl",
                    &password,
                    "password",
                );
            }
        }
    }
    out.value(env::CONCURRENCY, pipeline.worker.concurrency);
    let smtp = &pipeline.smtp;
    out.value(env::SMTP_HOST, &smtp.host);
    out.value(env::SMTP_PORT, smtp.port);
    out.value(env::SMTP_TLS, smtp.tls.as_str());
    if let Some(ca) = &smtp.ca_secret {
        out.file(env::SMTP_CA_FILE, "smtp-ca", ca, "ca.crt");
    }
    if smtp.insecure_skip_verify {
        out.value(env::SMTP_INSECURE_SKIP_VERIFY, true);
    }
    if let Some(credentials) = &smtp.credentials {
        out.0.push(WorkerVar::SecretValue {
            name: env::SMTP_USERNAME.to_string(),
            secret: SecretKeyRef {
                name: credentials.name.clone(),
                key: credentials.username_key.clone(),
            },
        });
        let password = SecretKeyRef {
            name: credentials.name.clone(),
            key: credentials.password_key.clone(),
        };
        out.file(
            env::SMTP_PASSWORD_FILE,
            "smtp-credentials",
            &password,
            "password",
        );
    }
    out.value(env::SMTP_POOL_SIZE, pool_per_worker(pipeline));
    if let Some(rate) = pipeline.rate_per_replica {
        out.value(env::SMTP_RATE_LIMIT, rate);
    }
    out.value(env::FROM_ADDRESS, &smtp.from.address);
    if let Some(name) = &smtp.from.name {
        out.value(env::FROM_NAME, name);
    }
    if let Some(config_map) = &pipeline.templates {
        out.0.push(WorkerVar::ConfigMapDir {
            name: env::TEMPLATES_DIR.to_string(),
            config_map: config_map.clone(),
        });
    }
    let retry = &pipeline.retry;
    out.value(env::MAX_ATTEMPTS, retry.max_attempts);
    out.value(env::BACKOFF_INITIAL, millis(retry.initial));
    out.value(env::BACKOFF_MULTIPLIER, retry.multiplier);
    out.value(env::BACKOFF_MAX, millis(retry.max));
    out.value(env::DEAD_LETTER, pipeline.dead_letter);
    if let Some(idempotency) = &pipeline.idempotency {
        out.file(
            env::REDIS_URL_FILE,
            "redis",
            &idempotency.redis_secret,
            "url",
        );
        out.value(env::IDEMPOTENCY_TTL, millis(idempotency.ttl));
        out.value(
            env::IDEMPOTENCY_PREFIX,
            format!("mailpipe:{}:{}", pipeline.namespace, pipeline.name),
        );
        out.value(
            env::ON_REDIS_UNAVAILABLE,
            idempotency.on_unavailable.as_str(),
        );
    }
    out.value(env::HTTP_ADDR, format!("0.0.0.0:{HTTP_PORT}"));
    out.value(env::LOG_FORMAT, "json");
    out.value(env::SHUTDOWN_TIMEOUT, millis(pipeline.shutdown_timeout));
    out.0.extend(
        pipeline
            .worker
            .env
            .iter()
            .cloned()
            .map(|var| WorkerVar::Extra(Box::new(var))),
    );
    out.0
}

fn probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("50m".into())),
            ("memory".to_string(), Quantity("64Mi".into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity("256Mi".into()),
        )])),
        ..ResourceRequirements::default()
    }
}

/// The worker Deployment (`spec.replicas` only when it is created: the scaler's after).
pub fn worker_deployment(pipeline: &ValidatedPipeline, inputs: &Inputs) -> Deployment {
    let worker = &pipeline.worker;
    let Environment {
        vars,
        volumes,
        mounts,
    } = environment(pipeline);
    let container = Container {
        name: "worker".into(),
        image: Some(
            worker
                .image
                .clone()
                .unwrap_or_else(|| inputs.default_image.clone()),
        ),
        image_pull_policy: Some("IfNotPresent".into()),
        env: Some(vars),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: HTTP_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(probe("/readyz", 5)),
        liveness_probe: Some(probe("/healthz", 10)),
        resources: Some(worker.resources.clone().unwrap_or_else(default_resources)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        ..Container::default()
    };
    let pod = PodSpec {
        containers: vec![container],
        automount_service_account_token: Some(false),
        termination_grace_period_seconds: Some(worker.termination_grace_period_seconds),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            fs_group: Some(65532),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..PodSecurityContext::default()
        }),
        volumes: (!volumes.is_empty()).then_some(volumes),
        node_selector: (!worker.node_selector.is_empty()).then(|| worker.node_selector.clone()),
        tolerations: (!worker.tolerations.is_empty()).then(|| worker.tolerations.clone()),
        ..PodSpec::default()
    };
    let mut template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(worker_labels(pipeline)),
            ..ObjectMeta::default()
        }),
        spec: Some(pod),
    };
    // The hash covers the rendered template and the content it refers to.
    let rendered = serde_json::to_vec(&template).expect("a template serialises");
    let hash = references_digest([
        ("template".to_string(), rendered.as_slice()),
        ("references".to_string(), inputs.references.as_bytes()),
    ]);
    template.metadata.as_mut().expect("set above").annotations =
        Some(BTreeMap::from([(CONFIG_HASH.to_string(), hash)]));
    Deployment {
        metadata: metadata(pipeline, inputs),
        spec: Some(DeploymentSpec {
            replicas: inputs.starting_replicas.map(|n| n as i32),
            selector: LabelSelector {
                match_labels: Some(selector_labels(pipeline)),
                match_expressions: None,
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template,
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// The Service Prometheus scrapes the workers' metrics through.
pub fn metrics_service(pipeline: &ValidatedPipeline, inputs: &Inputs) -> Service {
    Service {
        metadata: metadata(pipeline, inputs),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(pipeline)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: HTTP_PORT,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// At most one worker away at a time during voluntary disruptions (node drains): the rest
/// keep sending while the leaving one finishes its in-flight jobs. Workers go unready while
/// the SMTP server or Redis is unreachable (they pause); such pods may always be evicted
/// (`AlwaysAllow`), or an outage outside the cluster would block every node drain. An
/// evicted worker drains like any other: nothing it holds is lost.
pub fn disruption_budget(pipeline: &ValidatedPipeline, inputs: &Inputs) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: metadata(pipeline, inputs),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(pipeline)),
                match_expressions: None,
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}

/// The worker pods' `app.kubernetes.io/instance` (the pipeline's name) as Prometheus's
/// Kubernetes service discovery names it.
pub const PIPELINE_POD_LABEL: &str = "__meta_kubernetes_pod_label_app_kubernetes_io_instance";

/// A prometheus-operator ServiceMonitor for the metrics Service (applied when that CRD
/// exists in the cluster).
pub fn service_monitor(pipeline: &ValidatedPipeline, inputs: &Inputs) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": metadata(pipeline, inputs),
        "spec": {
            "selector": {"matchLabels": selector_labels(pipeline)},
            // The pod's pipeline label becomes the series' `pipeline` (the alerts and
            // dashboards group worker series by namespace and pipeline, as the operator's
            // own series are).
            "endpoints": [{"port": "http", "path": "/metrics", "interval": "30s",
                           "relabelings": [{
                               "action": "replace",
                               "sourceLabels": [PIPELINE_POD_LABEL],
                               "targetLabel": "pipeline",
                           }]}],
        },
    })
}
