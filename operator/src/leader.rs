//! Leader election through a coordination.k8s.io Lease, so two operator replicas are safe:
//! one reconciles, the other waits and takes over when the leader stops renewing (killed,
//! partitioned) or releases the Lease (a clean shutdown, for a quick hand-over).
//!
//! The rules are the client-go ones: a holder renews every third of the lease duration;
//! anyone may take a Lease whose renew time is older than its duration; every write is a
//! replace with the resourceVersion read, so two candidates cannot both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

/// One candidate for the Lease `name`.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

impl Elector {
    /// A candidate `identity` for Lease `namespace/name` held for `duration` per renewal.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Elector {
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
        }
    }

    /// Takes or renews the Lease if it is free, expired or already ours. `Ok(false)`: someone
    /// else holds it (or won the race).
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let seconds = self.duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let held_for =
            Duration::from_secs(spec.lease_duration_seconds.unwrap_or(seconds).max(1) as u64);
        let expired = match &spec.renew_time {
            Some(renewed) => {
                let age = k8s_openapi::jiff::Timestamp::now().duration_since(renewed.0);
                age.as_secs_f64() > held_for.as_secs_f64()
            }
            None => true,
        };
        if holder != self.identity && !holder.is_empty() && !expired {
            return Ok(false);
        }
        if holder != self.identity {
            spec.acquire_time = Some(now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(self.identity.clone());
        }
        spec.renew_time = Some(now());
        spec.lease_duration_seconds = Some(seconds);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this candidate holds the Lease (or `stop`): `true` when it does.
    pub async fn acquire(&self, stop: &CancellationToken) -> bool {
        let retry = self.duration / 5;
        loop {
            match self.try_acquire().await {
                Ok(true) => return true,
                Ok(false) => {}
                Err(e) => tracing::warn!("cannot read the leader lease: {e}"),
            }
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep(retry) => {}
            }
        }
    }

    /// Renews the Lease until `stop`; cancels `lost` when it could not be renewed before it
    /// expired (another replica may lead by now).
    pub async fn hold(&self, stop: &CancellationToken, lost: &CancellationToken) {
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.duration / 3) => {}
            }
            match self.try_acquire().await {
                Ok(true) => last = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!("the leader lease was taken over");
                    lost.cancel();
                    return;
                }
                Err(e) => tracing::warn!("cannot renew the leader lease: {e}"),
            }
            if last.elapsed() >= self.duration {
                tracing::error!("the leader lease expired before it could be renewed");
                lost.cancel();
                return;
            }
        }
    }

    /// Gives the Lease up (on a clean shutdown), so another replica takes over at once.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await {
            if let Some(spec) = lease
                .spec
                .as_mut()
                .filter(|s| s.holder_identity.as_deref() == Some(&self.identity))
            {
                spec.holder_identity = None;
                spec.renew_time = None;
                let _ = self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await;
            }
        }
    }
}
