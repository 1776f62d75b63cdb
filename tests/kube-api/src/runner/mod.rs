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
//! - a pod that mounts its ServiceAccount token (the default) gets one from the TokenRequest
//!   API, as a kubeconfig named by `KUBECONFIG` instead of the in-cluster files;
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

mod launch;
mod pod;
mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::api::Api;
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;

pub use launch::{expand, image_name, remap};
use pod::{Key, Pod, State};
use status::rollout_limits;

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
    /// The API server address written into pods' credentials (`None`: pods that need
    /// credentials wait).
    pub api_server: Option<String>,
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
            api_server: None,
        }
    }

    /// Gives pods credentials for the API server at `url` (their ServiceAccount's token).
    pub fn api_server(mut self, url: &str) -> RunnerConfig {
        self.api_server = Some(url.to_string());
        self
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
}

fn key(deployment: &Deployment) -> Key {
    (
        deployment.namespace().unwrap_or_default(),
        deployment.name_any(),
    )
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
