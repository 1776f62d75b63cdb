//! actuator (client required): the seam through which the operator changes how many workers
//! a pipeline runs. In a cluster it is the worker Deployment's `/scale` subresource: a merge
//! patch of `spec.replicas` that nobody owns (the operator applies the Deployment without
//! it), so later applies of the Deployment leave the count alone and no managedFields entry
//! claims it (recordings 179-182). The local mode's supervised process pool is the second
//! implementation.

use std::future::Future;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

/// The workers of one pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// The cluster's actuator: the Deployment's `/scale`.
#[derive(Clone)]
pub struct DeploymentScale {
    pub client: Client,
}

impl DeploymentScale {
    fn api(&self, workload: &Workload) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &workload.namespace)
    }
}

fn missing(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(response) if response.code == 404)
}

impl Actuator for DeploymentScale {
    async fn replicas(&self, workload: &Workload) -> Result<Option<Replicas>, ActuatorError> {
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
            Ok(_) => Ok(()),
            Err(error) if missing(&error) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}
