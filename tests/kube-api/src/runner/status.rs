//! The Deployment status the Deployment controller would write, and the rollout limits
//! (maxSurge, maxUnavailable) it works within.

use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition, DeploymentStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, PostParams};
use kube::ResourceExt;

use super::{key, Kubelet};

impl Kubelet {
    /// Writes the status the Deployment controller would, when it changed.
    pub(super) async fn write_status(
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
pub(super) fn rollout_limits(deployment: &Deployment, desired: usize) -> (usize, usize) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
