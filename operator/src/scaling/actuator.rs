//! actuator (client required): the seam through which the operator changes how many workers
//! a pipeline runs. In a cluster it is the worker Deployment's `/scale` subresource: a merge
//! patch of `spec.replicas` that nobody owns (the operator applies the Deployment without
//! it), so later applies of the Deployment leave the count alone and no managedFields entry
//! claims it (recordings 179-182). The scaler reads the counts from the controllers'
//! Deployment cache (a watch it already holds) rather than with a GET per look; until its
//! own change comes back through that watch, the count it set stands. The local mode's
//! supervised process pool is the second implementation.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio::time::Instant;

use crate::controller::Caches;

/// The workers of one pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Workload {
    pub namespace: String,
    /// The worker Deployment's name (or the local pool's).
    pub name: String,
}

/// How many workers are asked for and how many run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replicas {
    pub desired: u32,
    pub running: u32,
}

/// Why the actuator could not act.
#[derive(Debug, thiserror::Error)]
pub enum ActuatorError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// Reads and sets a pipeline's worker count.
pub trait Actuator {
    /// The counts now; `None` when the workload does not exist (yet, or any more).
    fn replicas(
        &self,
        workload: &Workload,
    ) -> impl Future<Output = Result<Option<Replicas>, ActuatorError>> + Send;
    /// Asks for `replicas` workers; a workload that does not exist is left alone.
    fn scale(
        &self,
        workload: &Workload,
        replicas: u32,
    ) -> impl Future<Output = Result<(), ActuatorError>> + Send;
}

/// How long a count this actuator set outranks a cache that does not show it yet (the
/// watch brings a change back within milliseconds; a slow one within this).
const ECHO_WAIT: Duration = Duration::from_secs(10);

/// The cluster's actuator: the Deployment's `/scale`.
#[derive(Clone)]
pub struct DeploymentScale {
    client: Client,
    /// Where counts are read without asking the API server; `None`: GET `/scale`.
    cache: Option<Arc<Caches<Deployment>>>,
    /// The counts this actuator set, and when.
    set: Arc<Mutex<HashMap<Workload, (u32, Instant)>>>,
}

impl DeploymentScale {
    /// Reads and sets through the API server.
    pub fn new(client: Client) -> DeploymentScale {
        DeploymentScale {
            client,
            cache: None,
            set: Arc::default(),
        }
    }

    /// Reads from `cache` (the controllers' Deployment watch) and sets through the API
    /// server.
    pub fn cached(client: Client, cache: Arc<Caches<Deployment>>) -> DeploymentScale {
        DeploymentScale {
            cache: Some(cache),
            ..DeploymentScale::new(client)
        }
    }

    fn api(&self, workload: &Workload) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &workload.namespace)
    }

    /// The count to believe for `workload` when the cache shows `cached`: the one set
    /// moments ago until the cache shows it (then the cache again, so a change made by
    /// someone else afterwards is seen at once).
    fn believed(&self, workload: &Workload, cached: u32) -> u32 {
        let mut set = self.set.lock().expect("actuator lock");
        set.retain(|_, (_, at)| at.elapsed() < ECHO_WAIT);
        match set.get(workload) {
            Some((n, _)) if *n != cached => *n,
            Some(_) => {
                set.remove(workload);
                cached
            }
            None => cached,
        }
    }
}

fn missing(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(response) if response.code == 404)
}

impl Actuator for DeploymentScale {
    async fn replicas(&self, workload: &Workload) -> Result<Option<Replicas>, ActuatorError> {
        if let Some(cache) = &self.cache {
            let Some(deployment) = cache.get(&workload.namespace, &workload.name) else {
                return Ok(None);
            };
            // The API server defaults an unset count to 1.
            let cached = deployment
                .spec
                .as_ref()
                .and_then(|s| s.replicas)
                .unwrap_or(1)
                .max(0) as u32;
            return Ok(Some(Replicas {
                desired: self.believed(workload, cached),
                running: deployment
                    .status
                    .as_ref()
                    .and_then(|s| s.replicas)
                    .unwrap_or(0)
                    .max(0) as u32,
            }));
        }
        match self.api(workload).get_scale(&workload.name).await {
            Ok(scale) => Ok(Some(Replicas {
                desired: scale.spec.and_then(|s| s.replicas).unwrap_or(0).max(0) as u32,
                running: scale.status.map_or(0, |s| s.replicas.max(0) as u32),
            })),
            Err(error) if missing(&error) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    async fn scale(&self, workload: &Workload, replicas: u32) -> Result<(), ActuatorError> {
        let patch = serde_json::json!({"spec": {"replicas": replicas}});
        match self
            .api(workload)
            .patch_scale(
                &workload.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {
                self.set
                    .lock()
                    .expect("actuator lock")
                    .insert(workload.clone(), (replicas, Instant::now()));
                Ok(())
            }
            Err(error) if missing(&error) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}
