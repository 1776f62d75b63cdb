//! The runner: a stand-in for the Deployment controller and the kubelet, so end-to-end tests
//! (and the shell demo) see real worker processes behind the Deployments the operator writes.
//!
//! It watches the Deployments a label selector picks through the API (as a kubelet would, with
//! kube-rs), and runs each replica as a local process:
//! - the container image names a local program (`RunnerConfig::program`); the container's
//!   `command` after its first word and its `args` are the program's arguments;
//! - the environment is only what the pod template gives (`env`, `envFrom`; `value`,
//!   `secretKeyRef`, `configMapKeyRef`, `fieldRef`; `$(VAR)` expanded), plus `PATH` and
//!   `HOSTNAME`, never the runner's own;
//! - Secret, ConfigMap and emptyDir volumes are written under the pod's directory, and every
//!   argument or variable that names a path under a mount (alone, or after `=`) is rewritten
//!   to that place;
//! - each replica gets its own loopback HTTP port through `RunnerConfig::port_env`, and is
//!   ready when the container's readiness probe path answers 2xx there (running, without one);
//! - a changed template replaces the pods (RollingUpdate within maxSurge/maxUnavailable, or
//!   Recreate); extra replicas get SIGTERM, then SIGKILL after the pod's
//!   `terminationGracePeriodSeconds`; a process that exits is restarted with a capped backoff;
//! - the Deployment's status (replicas, updatedReplicas, readyReplicas, availableReplicas,
//!   unavailableReplicas, observedGeneration, Available and Progressing conditions) is written
//!   through `/status` as the Deployment controller writes it.
//!
//! Differences from a cluster, on purpose: no Pod or ReplicaSet objects are written; one
//! container per pod; liveness probes, resources and security contexts are not enforced; the
//! restart backoff runs from 1 s to 16 s instead of 10 s to 5 min.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition, DeploymentStatus};
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, PodSpec, PodTemplateSpec, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, PostParams};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// What the runner runs and where.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Local programs by image name: the image's last path segment without tag or digest
    /// (`ghcr.io/mailpipe/mailpipe-worker:0.1.0` -> `mailpipe-worker`).
    pub programs: BTreeMap<String, PathBuf>,
    /// Label selector of the Deployments to run (empty: all).
    pub selector: String,
    /// Where pods keep their volumes and logs.
    pub root: PathBuf,
    /// The variable that tells a process its HTTP address (`127.0.0.1:PORT`, one port per pod).
    pub port_env: String,
    /// How often pods are checked: exits, probes, replicas, status.
    pub period: Duration,
}

impl RunnerConfig {
    /// Runs Deployments matching `selector`, with pod files under `root`.
    pub fn new(selector: &str, root: &Path) -> RunnerConfig {
        RunnerConfig {
            programs: BTreeMap::new(),
            selector: selector.to_string(),
            root: root.to_path_buf(),
            port_env: "MAILPIPE_HTTP_ADDR".to_string(),
            period: Duration::from_millis(200),
        }
    }

    /// Runs `program` for containers of image `image`.
    pub fn program(mut self, image: &str, program: &Path) -> RunnerConfig {
        self.programs
            .insert(image.to_string(), program.to_path_buf());
        self
    }
}

/// One replica as tests see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub namespace: String,
    pub deployment: String,
    pub name: String,
    /// Hash of the pod template it runs.
    pub template_hash: String,
    /// `Waiting: <reason>`, `Running` or `Terminating`.
    pub phase: String,
    pub pid: Option<u32>,
    /// Its HTTP port on 127.0.0.1.
    pub port: u16,
    pub ready: bool,
    pub restarts: u32,
    /// stdout and stderr of every run of it.
    pub log: PathBuf,
}

/// A pod that is gone, and how its last process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub namespace: String,
    pub deployment: String,
    pub name: String,
    /// Exit code, when the process exited by itself.
    pub code: Option<i32>,
    /// Whether it outlived its grace period and was killed.
    pub killed: bool,
}

#[derive(Default)]
struct Views {
    pods: Vec<PodView>,
    finished: Vec<Finished>,
}

/// The running runner; stops its pods (SIGKILL) when dropped, gracefully with `shutdown`.
pub struct Runner {
    views: Arc<Mutex<Views>>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Runner {
    /// Starts watching Deployments through `client`.
    pub fn start(client: Client, config: RunnerConfig) -> Runner {
        let views = Arc::new(Mutex::new(Views::default()));
        let stop = CancellationToken::new();
        let kubelet = Kubelet::new(client, config, views.clone());
        let task = tokio::spawn(kubelet.run(stop.clone()));
        Runner {
            views,
            stop,
            task: Some(task),
        }
    }

    /// The live pods of one Deployment.
    pub fn pods(&self, namespace: &str, deployment: &str) -> Vec<PodView> {
        let views = self.views.lock().expect("views lock");
        views
            .pods
            .iter()
            .filter(|p| p.namespace == namespace && p.deployment == deployment)
            .cloned()
            .collect()
    }

    /// Every pod that is gone, oldest first.
    pub fn finished(&self) -> Vec<Finished> {
        self.views.lock().expect("views lock").finished.clone()
    }

    /// Stops every pod as a node drain would (SIGTERM, then SIGKILL after its grace period).
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            // Children are spawned with kill_on_drop: aborting the task kills them.
            task.abort();
        }
    }
}

type Key = (String, String);

enum State {
    Waiting {
        reason: String,
        retry_at: Instant,
    },
    Running(Child),
    Terminating {
        child: Option<Child>,
        kill_at: Instant,
    },
}

struct Pod {
    name: String,
    hash: String,
    dir: PathBuf,
    port: u16,
    grace: Duration,
    probe: Option<String>,
    state: State,
    ready: bool,
    restarts: u32,
    killed: bool,
    exit: Option<ExitStatus>,
}

impl Pod {
    fn terminating(&self) -> bool {
        matches!(self.state, State::Terminating { .. })
    }

    fn pid(&self) -> Option<u32> {
        match &self.state {
            State::Running(child) => child.id(),
            State::Terminating {
                child: Some(child), ..
            } => child.id(),
            _ => None,
        }
    }

    /// Asks the process to stop (SIGTERM) and gives it the grace period.
    fn terminate(&mut self) {
        self.ready = false;
        let state = std::mem::replace(
            &mut self.state,
            State::Waiting {
                reason: String::new(),
                retry_at: Instant::now(),
            },
        );
        self.state = match state {
            State::Running(child) => {
                if let Some(pid) = child.id() {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
                }
                State::Terminating {
                    child: Some(child),
                    kill_at: Instant::now() + self.grace,
                }
            }
            State::Waiting { .. } => State::Terminating {
                child: None,
                kill_at: Instant::now(),
            },
            terminating => terminating,
        };
    }

    /// Notices exits: a running process that exited waits for its restart; a terminating
    /// one is done (true). Kills a terminating process whose grace period is over.
    fn observe(&mut self) -> bool {
        let now = Instant::now();
        match &mut self.state {
            State::Running(child) => {
                if let Ok(Some(status)) = child.try_wait() {
                    self.restarts += 1;
                    self.ready = false;
                    self.exit = Some(status);
                    let backoff = Duration::from_secs(1 << (self.restarts - 1).min(4));
                    self.state = State::Waiting {
                        reason: format!("exited ({status}); restarting"),
                        retry_at: now + backoff,
                    };
                }
                false
            }
            State::Waiting { .. } => false,
            State::Terminating { child: None, .. } => true,
            State::Terminating {
                child: Some(child),
                kill_at,
            } => match child.try_wait() {
                Ok(Some(status)) => {
                    self.exit = Some(status);
                    true
                }
                Ok(None) if now >= *kill_at => {
                    let _ = child.start_kill();
                    self.killed = true;
                    false
                }
                _ => false,
            },
        }
    }

    fn view(&self, key: &Key, log: PathBuf) -> PodView {
        let phase = match &self.state {
            State::Waiting { reason, .. } => format!("Waiting: {reason}"),
            State::Running(_) => "Running".to_string(),
            State::Terminating { .. } => "Terminating".to_string(),
        };
        PodView {
            namespace: key.0.clone(),
            deployment: key.1.clone(),
            name: self.name.clone(),
            template_hash: self.hash.clone(),
            phase,
            pid: self.pid(),
            port: self.port,
            ready: self.ready,
            restarts: self.restarts,
            log,
        }
    }
}

#[derive(Default)]
struct Managed {
    pods: Vec<Pod>,
}

struct Kubelet {
    client: Client,
    config: RunnerConfig,
    views: Arc<Mutex<Views>>,
    managed: BTreeMap<Key, Managed>,
    probes: reqwest::Client,
}

impl Kubelet {
    fn new(client: Client, config: RunnerConfig, views: Arc<Mutex<Views>>) -> Kubelet {
        Kubelet {
            client,
            config,
            views,
            managed: BTreeMap::new(),
            probes: reqwest::Client::builder()
                .timeout(Duration::from_secs(1))
                .build()
                .expect("HTTP client"),
        }
    }

    async fn run(mut self, stop: CancellationToken) {
        let api: Api<Deployment> = Api::all(self.client.clone());
        let (reader, writer) = reflector::store();
        let config = watcher::Config::default().labels(&self.config.selector);
        let watch = watcher(api, config)
            .default_backoff()
            .reflect(writer)
            .applied_objects()
            .for_each(|_| futures::future::ready(()));
        let watch = tokio::spawn(watch);
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = reader.wait_until_ready() => loop {
                self.tick(&reader.state()).await;
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(self.config.period) => {}
                }
            },
        }
        watch.abort();
        self.drain().await;
    }

    /// Stops every pod gracefully and waits until they are gone.
    async fn drain(&mut self) {
        for managed in self.managed.values_mut() {
            managed.pods.iter_mut().for_each(Pod::terminate);
        }
        while self.managed.values().any(|m| !m.pods.is_empty()) {
            self.reap_all();
            self.publish();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.publish();
    }

    fn reap_all(&mut self) {
        let mut finished = Vec::new();
        for (key, managed) in &mut self.managed {
            managed.pods.retain_mut(|pod| {
                if pod.observe() {
                    finished.push(Finished {
                        namespace: key.0.clone(),
                        deployment: key.1.clone(),
                        name: pod.name.clone(),
                        code: pod.exit.and_then(|s| s.code()),
                        killed: pod.killed,
                    });
                    false
                } else {
                    true
                }
            });
        }
        self.views
            .lock()
            .expect("views lock")
            .finished
            .extend(finished);
    }

    async fn tick(&mut self, deployments: &[Arc<Deployment>]) {
        self.reap_all();
        let live: BTreeSet<Key> = deployments.iter().map(|d| key(d)).collect();
        for (key, managed) in &mut self.managed {
            if !live.contains(key) {
                managed.pods.iter_mut().for_each(Pod::terminate);
            }
        }
        self.managed
            .retain(|key, m| live.contains(key) || !m.pods.is_empty());
        for deployment in deployments {
            if let Err(e) = self.sync(deployment).await {
                tracing::warn!(deployment = %deployment.name_any(), "runner: {e:#}");
            }
        }
        self.publish();
    }

    fn publish(&self) {
        let pods = self
            .managed
            .iter()
            .flat_map(|(key, m)| {
                m.pods
                    .iter()
                    .map(|p| p.view(key, p.dir.join("container.log")))
            })
            .collect();
        self.views.lock().expect("views lock").pods = pods;
    }

    async fn sync(&mut self, deployment: &Deployment) -> anyhow::Result<()> {
        let key = key(deployment);
        let spec = deployment.spec.clone().unwrap_or_default();
        let template = spec.template;
        let hash = template_hash(&template);
        let desired = spec.replicas.unwrap_or(1).max(0) as usize;
        let (surge, unavailable) = rollout_limits(deployment, desired);
        let recreate = spec
            .strategy
            .as_ref()
            .and_then(|s| s.type_.as_deref())
            .is_some_and(|t| t == "Recreate");

        // Start what waits for a (re)start, then probe what runs.
        let mut pods = std::mem::take(&mut self.managed.entry(key.clone()).or_default().pods);
        let now = Instant::now();
        for pod in pods.iter_mut() {
            if let State::Waiting { retry_at, .. } = &pod.state {
                if *retry_at <= now && pod.hash == hash {
                    self.launch(&key, &template, pod).await;
                }
            }
        }
        self.probe(&mut pods).await;

        // Replicas: new pods up to the desired count within the surge, old pods stopped
        // as long as enough pods stay available.
        let old_left = pods.iter().any(|p| p.hash != hash);
        let current = pods
            .iter()
            .filter(|p| p.hash == hash && !p.terminating())
            .count();
        let alive = pods.iter().filter(|p| !p.terminating()).count();
        let room = if recreate {
            if old_left {
                0
            } else {
                desired
            }
        } else {
            (desired + surge).saturating_sub(alive)
        };
        for _ in 0..desired.saturating_sub(current).min(room) {
            let mut pod = self.new_pod(deployment, &key, &hash, &template)?;
            self.launch(&key, &template, &mut pod).await;
            pods.push(pod);
        }
        let min_available = desired.saturating_sub(unavailable);
        let mut ready = pods.iter().filter(|p| p.ready).count();
        // Not-ready pods first, then the youngest.
        let mut order: Vec<usize> = (0..pods.len()).collect();
        order.sort_by_key(|&i| (pods[i].ready, std::cmp::Reverse(i)));
        for &i in &order {
            let pod = &pods[i];
            if pod.hash == hash || pod.terminating() {
                continue;
            }
            if recreate || !pod.ready {
                pods[i].terminate();
            } else if ready > min_available {
                ready -= 1;
                pods[i].terminate();
            }
        }
        let mut current = pods
            .iter()
            .filter(|p| p.hash == hash && !p.terminating())
            .count();
        for &i in &order {
            if current <= desired {
                break;
            }
            if pods[i].hash == hash && !pods[i].terminating() {
                pods[i].terminate();
                current -= 1;
            }
        }
        self.managed.entry(key.clone()).or_default().pods = pods;
        self.write_status(deployment, &hash, desired, unavailable)
            .await
    }

    fn new_pod(
        &self,
        deployment: &Deployment,
        key: &Key,
        hash: &str,
        template: &PodTemplateSpec,
    ) -> anyhow::Result<Pod> {
        let suffix: String = uuid::Uuid::new_v4().simple().to_string()[..5].to_string();
        let name = format!("{}-{hash}-{suffix}", deployment.name_any());
        let dir = self.config.root.join(&key.0).join(&name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let pod_spec = template.spec.clone().unwrap_or_default();
        let probe = pod_spec.containers.first().and_then(|c| {
            c.readiness_probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .map(|h| h.path.clone().unwrap_or_else(|| "/".into()))
        });
        Ok(Pod {
            name,
            hash: hash.to_string(),
            dir,
            port: free_port()?,
            grace: Duration::from_secs(
                pod_spec
                    .termination_grace_period_seconds
                    .unwrap_or(30)
                    .max(0) as u64,
            ),
            probe,
            state: State::Waiting {
                reason: "ContainerCreating".into(),
                retry_at: Instant::now(),
            },
            ready: false,
            restarts: 0,
            killed: false,
            exit: None,
        })
    }

    /// Starts the pod's process, or leaves it waiting with the reason (a missing Secret, say)
    /// and tries again a second later, as the kubelet does.
    async fn launch(&self, key: &Key, template: &PodTemplateSpec, pod: &mut Pod) {
        match self.spawn(key, template, pod).await {
            Ok(child) => pod.state = State::Running(child),
            Err(e) => {
                tracing::warn!(pod = %pod.name, "runner: cannot start: {e:#}");
                pod.state = State::Waiting {
                    reason: format!("{e:#}"),
                    retry_at: Instant::now() + Duration::from_secs(1),
                }
            }
        }
    }

    async fn spawn(
        &self,
        key: &Key,
        template: &PodTemplateSpec,
        pod: &Pod,
    ) -> anyhow::Result<Child> {
        let spec = template.spec.clone().unwrap_or_default();
        let [container] = spec.containers.as_slice() else {
            return Err(anyhow!("the runner runs pods of exactly one container"));
        };
        let image = container.image.clone().unwrap_or_default();
        let program = self
            .config
            .programs
            .get(image_name(&image))
            .ok_or_else(|| anyhow!("no local program for image {image:?}"))?;
        let mounts = self
            .mount_volumes(&key.0, &spec, container, &pod.dir)
            .await?;
        let mut env = self.environment(&key.0, &pod.name, container).await?;
        for value in env.values_mut() {
            *value = remap(value, &mounts);
        }
        env.insert(
            self.config.port_env.clone(),
            format!("127.0.0.1:{}", pod.port),
        );
        let lookup: BTreeMap<String, String> = env.clone().into_iter().collect();
        let args: Vec<String> = container
            .command
            .iter()
            .flatten()
            .skip(1)
            .chain(container.args.iter().flatten())
            .map(|a| remap(&expand(a, &lookup), &mounts))
            .collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(pod.dir.join("container.log"))?;
        let mut command = Command::new(program);
        command
            .args(&args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOSTNAME", &pod.name)
            .envs(&env)
            .current_dir(&pod.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        command
            .spawn()
            .with_context(|| format!("starting {}", program.display()))
    }

    /// Writes the container's Secret, ConfigMap and emptyDir mounts under the pod's
    /// directory; returns (mount path, local path), longest mount first.
    async fn mount_volumes(
        &self,
        namespace: &str,
        spec: &PodSpec,
        container: &Container,
        dir: &Path,
    ) -> anyhow::Result<Vec<(String, PathBuf)>> {
        let mut mounts = Vec::new();
        for mount in container.volume_mounts.iter().flatten() {
            let volume = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == mount.name)
                .ok_or_else(|| anyhow!("volume {:?} is not defined", mount.name))?;
            let local = dir.join("mounts").join(mount.name.as_str());
            std::fs::create_dir_all(&local)?;
            let (files, items) = if let Some(secret) = &volume.secret {
                let name = secret.secret_name.clone().unwrap_or_default();
                let files = match self.secret(namespace, &name).await? {
                    Some(files) => files,
                    None if secret.optional == Some(true) => BTreeMap::new(),
                    None => return Err(anyhow!("secret \"{name}\" not found")),
                };
                (files, secret.items.clone())
            } else if let Some(map) = &volume.config_map {
                let files = match self.config_map(namespace, &map.name).await? {
                    Some(files) => files,
                    None if map.optional == Some(true) => BTreeMap::new(),
                    None => return Err(anyhow!("configmap \"{}\" not found", map.name)),
                };
                (files, map.items.clone())
            } else if volume.empty_dir.is_some() {
                (BTreeMap::new(), None)
            } else {
                return Err(anyhow!(
                    "volume {:?}: the runner mounts secret, configMap and emptyDir volumes",
                    mount.name
                ));
            };
            let files: Vec<(String, Vec<u8>)> = match items {
                None => files.into_iter().collect(),
                Some(items) => items
                    .iter()
                    .map(|item| {
                        files
                            .get(&item.key)
                            .map(|bytes| (item.path.clone(), bytes.clone()))
                            .ok_or_else(|| anyhow!("key {:?} is missing", item.key))
                    })
                    .collect::<anyhow::Result<_>>()?,
            };
            for (path, bytes) in files {
                let file = local.join(&path);
                if let Some(parent) = file.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&file, bytes)?;
            }
            let target = match mount.sub_path.as_deref() {
                Some(sub) if !sub.is_empty() => local.join(sub),
                _ => local,
            };
            mounts.push((mount.mount_path.trim_end_matches('/').to_string(), target));
        }
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        Ok(mounts)
    }

    /// The container's environment, resolved as the kubelet resolves it: `envFrom` first,
    /// then `env` in order, each value expanding `$(VAR)` of the variables before it.
    async fn environment(
        &self,
        namespace: &str,
        pod: &str,
        container: &Container,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        let mut env = BTreeMap::new();
        for source in container.env_from.iter().flatten() {
            let prefix = source.prefix.clone().unwrap_or_default();
            let values = if let Some(secret) = &source.secret_ref {
                match self.secret(namespace, &secret.name).await? {
                    Some(values) => values,
                    None if secret.optional == Some(true) => BTreeMap::new(),
                    None => return Err(anyhow!("secret \"{}\" not found", secret.name)),
                }
            } else if let Some(map) = &source.config_map_ref {
                match self.config_map(namespace, &map.name).await? {
                    Some(values) => values,
                    None if map.optional == Some(true) => BTreeMap::new(),
                    None => return Err(anyhow!("configmap \"{}\" not found", map.name)),
                }
            } else {
                BTreeMap::new()
            };
            for (name, bytes) in values {
                env.insert(format!("{prefix}{name}"), text(bytes));
            }
        }
        for var in container.env.iter().flatten() {
            if let Some(value) = self.env_value(namespace, pod, var, &env).await? {
                env.insert(var.name.clone(), value);
            }
        }
        Ok(env)
    }

    async fn env_value(
        &self,
        namespace: &str,
        pod: &str,
        var: &EnvVar,
        env: &BTreeMap<String, String>,
    ) -> anyhow::Result<Option<String>> {
        let Some(from) = &var.value_from else {
            return Ok(Some(expand(var.value.as_deref().unwrap_or(""), env)));
        };
        if let Some(r) = &from.secret_key_ref {
            let values = self.secret(namespace, &r.name).await?;
            return pick(values, &r.key, r.optional, "secret", &r.name);
        }
        if let Some(r) = &from.config_map_key_ref {
            let values = self.config_map(namespace, &r.name).await?;
            return pick(values, &r.key, r.optional, "configmap", &r.name);
        }
        if let Some(r) = &from.field_ref {
            let value = match r.field_path.as_str() {
                "metadata.name" => pod.to_string(),
                "metadata.namespace" => namespace.to_string(),
                "status.podIP" | "status.hostIP" => "127.0.0.1".to_string(),
                "spec.nodeName" => "local".to_string(),
                other => return Err(anyhow!("fieldRef {other:?} is not supported")),
            };
            return Ok(Some(value));
        }
        Err(anyhow!("env {:?}: unsupported valueFrom", var.name))
    }

    async fn secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<Option<BTreeMap<String, Vec<u8>>>> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        Ok(api.get_opt(name).await?.map(|s| {
            s.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect()
        }))
    }

    async fn config_map(
        &self,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<Option<BTreeMap<String, Vec<u8>>>> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        Ok(api.get_opt(name).await?.map(|m| {
            let text = m
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()));
            let binary = m
                .binary_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0));
            text.chain(binary).collect()
        }))
    }

    /// Readiness: the probe path answers 2xx on the pod's port; without a probe, running.
    async fn probe(&self, pods: &mut [Pod]) {
        let checks = pods.iter().map(|pod| {
            let running = matches!(pod.state, State::Running(_));
            let url = pod
                .probe
                .as_ref()
                .map(|path| format!("http://127.0.0.1:{}{path}", pod.port));
            async move {
                match (running, url) {
                    (false, _) => false,
                    (true, None) => true,
                    (true, Some(url)) => self
                        .probes
                        .get(url)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success()),
                }
            }
        });
        let ready = futures::future::join_all(checks).await;
        for (pod, ready) in pods.iter_mut().zip(ready) {
            if !pod.terminating() {
                pod.ready = ready;
            }
        }
    }

    /// Writes the status the Deployment controller would, when it changed.
    async fn write_status(
        &self,
        deployment: &Deployment,
        hash: &str,
        desired: usize,
        unavailable: usize,
    ) -> anyhow::Result<()> {
        let pods = &self.managed[&key(deployment)].pods;
        let alive = pods.iter().filter(|p| !p.terminating()).count() as i32;
        let updated = pods
            .iter()
            .filter(|p| !p.terminating() && p.hash == hash)
            .count() as i32;
        let ready = pods.iter().filter(|p| p.ready).count() as i32;
        let desired = desired as i32;
        let old = deployment.status.clone().unwrap_or_default();
        let positive = |n: i32| (n > 0).then_some(n);
        let available_enough = ready >= desired - unavailable as i32;
        let done = updated == desired && ready == desired && alive == desired;
        let conditions = vec![
            condition(
                &old,
                "Available",
                available_enough,
                if available_enough {
                    (
                        "MinimumReplicasAvailable",
                        "Deployment has minimum availability.",
                    )
                } else {
                    (
                        "MinimumReplicasUnavailable",
                        "Deployment does not have minimum availability.",
                    )
                },
            ),
            condition(
                &old,
                "Progressing",
                true,
                if done {
                    (
                        "NewReplicaSetAvailable",
                        "ReplicaSet has successfully progressed.",
                    )
                } else {
                    ("ReplicaSetUpdated", "ReplicaSet is progressing.")
                },
            ),
        ];
        let status = DeploymentStatus {
            observed_generation: deployment.metadata.generation,
            replicas: positive(alive),
            updated_replicas: positive(updated),
            ready_replicas: positive(ready),
            available_replicas: positive(ready),
            unavailable_replicas: positive(desired - ready),
            conditions: Some(conditions),
            ..Default::default()
        };
        if deployment.status.as_ref() == Some(&status) {
            return Ok(());
        }
        let mut next = deployment.clone();
        next.status = Some(status);
        next.metadata.managed_fields = None;
        let api: Api<Deployment> = Api::namespaced(
            self.client.clone(),
            deployment.namespace().as_deref().unwrap_or("default"),
        );
        match api
            .replace_status(&deployment.name_any(), &PostParams::default(), &next)
            .await
        {
            // A newer Deployment is on its way through the watch; the next tick writes.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            other => other.map(|_| ()).map_err(Into::into),
        }
    }
}

fn key(deployment: &Deployment) -> Key {
    (
        deployment.namespace().unwrap_or_default(),
        deployment.name_any(),
    )
}

/// A condition of `type_`, keeping its transition time while its status does not change.
fn condition(
    old: &DeploymentStatus,
    type_: &str,
    ok: bool,
    (reason, message): (&str, &str),
) -> DeploymentCondition {
    let status = if ok { "True" } else { "False" };
    let previous = old.conditions.iter().flatten().find(|c| c.type_ == type_);
    let same = previous.is_some_and(|c| c.status == status && c.reason.as_deref() == Some(reason));
    let now = Time(chrono_now());
    let transition = previous
        .filter(|c| c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    let update = if same {
        previous.and_then(|c| c.last_update_time.clone())
    } else {
        None
    };
    DeploymentCondition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: Some(reason.to_string()),
        message: Some(message.to_string()),
        last_transition_time: Some(transition),
        last_update_time: Some(update.unwrap_or(now)),
    }
}

fn chrono_now() -> k8s_openapi::jiff::Timestamp {
    // Whole seconds, as the API server stores times.
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(now.as_second()).unwrap_or(now)
}

/// maxSurge and maxUnavailable of a RollingUpdate (25% each by default; surge rounds up,
/// unavailability down; never both zero).
fn rollout_limits(deployment: &Deployment, desired: usize) -> (usize, usize) {
    let rolling = deployment
        .spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.rolling_update.as_ref());
    let resolve = |value: Option<&IntOrString>, up: bool| match value {
        None => scaled(25, desired, up),
        Some(IntOrString::Int(n)) => (*n).max(0) as usize,
        Some(IntOrString::String(s)) => s
            .trim_end_matches('%')
            .parse::<usize>()
            .map(|p| scaled(p, desired, up))
            .unwrap_or(0),
    };
    let surge = resolve(rolling.and_then(|r| r.max_surge.as_ref()), true);
    let unavailable = resolve(rolling.and_then(|r| r.max_unavailable.as_ref()), false);
    if surge == 0 && unavailable == 0 {
        (0, 1)
    } else {
        (surge, unavailable)
    }
}

fn scaled(percent: usize, of: usize, up: bool) -> usize {
    if up {
        (percent * of).div_ceil(100)
    } else {
        percent * of / 100
    }
}

fn pick(
    values: Option<BTreeMap<String, Vec<u8>>>,
    key: &str,
    optional: Option<bool>,
    kind: &str,
    name: &str,
) -> anyhow::Result<Option<String>> {
    let optional = optional == Some(true);
    match values {
        None if optional => Ok(None),
        None => Err(anyhow!("{kind} \"{name}\" not found")),
        Some(values) => match values.get(key) {
            Some(bytes) => Ok(Some(text(bytes.clone()))),
            None if optional => Ok(None),
            None => Err(anyhow!("couldn't find key {key} in {kind} {name}")),
        },
    }
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The image's name: last path segment, without tag or digest.
pub fn image_name(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    let last = image.rsplit('/').next().unwrap_or(image);
    last.split(':').next().unwrap_or(last)
}

/// `$(VAR)` expanded from `env` as Kubernetes does: unknown references stay as written and
/// `$$` is a literal `$`.
pub fn expand(value: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(name_end) = after.strip_prefix('(').and_then(|s| s.find(')')) {
            let name = &after[1..=name_end];
            match env.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&rest[at..at + name_end + 3]),
            }
            rest = &after[name_end + 2..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A value naming a path under a mount (the whole value, or after `--flag=`), rewritten to
/// where the runner mounted it. `mounts` is longest first.
pub fn remap(value: &str, mounts: &[(String, PathBuf)]) -> String {
    let (head, path) = match value.split_once('=') {
        Some((flag, path)) if flag.starts_with('-') => (format!("{flag}="), path),
        _ => (String::new(), value),
    };
    for (mount, local) in mounts {
        if let Some(rest) = path.strip_prefix(mount.as_str()) {
            if rest.is_empty() || rest.starts_with('/') {
                return format!("{head}{}{rest}", local.display());
            }
        }
    }
    value.to_string()
}

/// A stable hash of the pod template, as the `pod-template-hash` label carries one.
pub fn template_hash(template: &PodTemplateSpec) -> String {
    let bytes = serde_json::to_vec(template).expect("a template serialises");
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..10)
        .map(|i| ALPHABET[((hash >> (i * 6)) % ALPHABET.len() as u64) as usize] as char)
        .collect()
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_drop_registry_tag_and_digest() {
        assert_eq!(
            image_name("ghcr.io/mailpipe/mailpipe-worker:0.1.0"),
            "mailpipe-worker"
        );
        assert_eq!(image_name("mailpipe-worker"), "mailpipe-worker");
        assert_eq!(image_name("registry:5000/w@sha256:abc"), "w");
    }

    #[test]
    fn expansion_follows_kubernetes_rules() {
        let env = BTreeMap::from([("A".to_string(), "x".to_string())]);
        assert_eq!(expand("$(A)-$(B)-$$(A)-$5", &env), "x-$(B)-$(A)-$5");
        assert_eq!(expand("tail $(", &env), "tail $(");
    }

    #[test]
    fn paths_under_mounts_are_rewritten_whole_or_after_a_flag() {
        let mounts = vec![
            (
                "/etc/mailpipe/smtp".to_string(),
                PathBuf::from("/pods/p/smtp"),
            ),
            ("/etc/mailpipe".to_string(), PathBuf::from("/pods/p/cfg")),
        ];
        assert_eq!(
            remap("/etc/mailpipe/smtp/password", &mounts),
            "/pods/p/smtp/password"
        );
        assert_eq!(
            remap("--templates=/etc/mailpipe/t", &mounts),
            "--templates=/pods/p/cfg/t"
        );
        assert_eq!(remap("/etc/mailpipeX", &mounts), "/etc/mailpipeX");
        assert_eq!(remap("a=/etc/mailpipe", &mounts), "a=/etc/mailpipe");
    }

    #[test]
    fn rollout_limits_default_to_a_quarter() {
        let deployment: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "d"},
            "spec": {"selector": {}, "template": {}}
        }))
        .unwrap();
        assert_eq!(rollout_limits(&deployment, 4), (1, 1));
        assert_eq!(rollout_limits(&deployment, 1), (1, 0));
        assert_eq!(rollout_limits(&deployment, 0), (0, 1));
    }
}
