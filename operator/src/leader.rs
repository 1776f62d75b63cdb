//! Leader election through a coordination.k8s.io Lease, so two operator replicas are safe:
//! one reconciles, the others wait and take over when the leader stops renewing (killed,
//! partitioned) or releases the Lease (a clean shutdown, for a quick hand-over).
//!
//! The rules are client-go's (`tools/leaderelection`), not a maintained crate's: the one
//! there is for kube-rs (`kube-lease-manager`) trails the kube and k8s-openapi versions the
//! operator uses (a second copy of both in the build) and judges expiry by comparing the
//! holder's `renewTime` with the local clock plus a skew allowance, where client-go needs
//! no clock agreement at all. So:
//! - **Observed time.** A candidate never reads the holder's timestamps as times: it notes
//!   when *it* saw the record change, and the Lease counts as expired only when the record
//!   has not changed for the record's lease duration on the candidate's own clock. Clock
//!   skew between nodes does not matter, only their rates.
//! - **Renew deadline < lease duration.** The leader retries renewing every retry period;
//!   if it has not renewed within the renew deadline (shorter than the lease duration), it
//!   gives up leading, before any standby can consider the Lease expired.
//! - **Every call has a timeout**, so a hung API server cannot hold a renewal past the
//!   deadline.
//! - Every write is a replace with the resourceVersion read, so two candidates cannot both
//!   win; a lost race is not an error, only "not leading".

use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a Lease is held, renewed and retried (client-go's names and defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long standbys wait, from their last sight of a change, before taking over.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it stops leading.
    pub renew_deadline: Duration,
    /// How often candidates try to acquire, and the leader to renew.
    pub retry_period: Duration,
}

/// client-go's `JitterFactor`: retries wait up to this much longer, at random.
const JITTER: f64 = 1.2;

impl Timing {
    /// client-go's defaults: 15 s, 10 s, 2 s.
    pub const DEFAULT: Timing = Timing {
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
    };

    /// Checked as client-go checks it: lease duration > renew deadline > retry period
    /// times the jitter factor.
    pub fn new(
        lease_duration: Duration,
        renew_deadline: Duration,
        retry_period: Duration,
    ) -> Result<Timing, String> {
        if lease_duration <= renew_deadline {
            return Err(format!("the lease duration ({lease_duration:?}) must be longer than the renew deadline ({renew_deadline:?})"));
        }
        if renew_deadline.as_secs_f64() <= retry_period.as_secs_f64() * JITTER {
            return Err(format!("the renew deadline ({renew_deadline:?}) must be longer than {JITTER} times the retry period ({retry_period:?})"));
        }
        if retry_period.is_zero() {
            return Err("the retry period must not be zero".into());
        }
        Ok(Timing {
            lease_duration,
            renew_deadline,
            retry_period,
        })
    }

    /// The retry period stretched by a random part of the jitter factor.
    fn jittered_retry(&self) -> Duration {
        let extra = (JITTER - 1.0) * rand_fraction();
        self.retry_period.mul_f64(1.0 + extra)
    }
}

/// A number in [0, 1) without a random-number crate: the sub-second clock is random enough
/// to keep two candidates' retries apart.
fn rand_fraction() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}

/// What a candidate last saw of the Lease, and when (on its own clock).
#[derive(Debug, Clone)]
struct Observed {
    record: LeaseSpec,
    at: Instant,
}

/// The outcome of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// This candidate holds the Lease (acquired or renewed).
    Leading,
    /// Someone else holds an unexpired Lease.
    HeldBy(String),
    /// Another candidate wrote first (a conflict): try again.
    Raced,
}

/// One candidate for the Lease `name`.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    observed: Mutex<Option<Observed>>,
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// The parts of a record that say someone renewed it.
fn same_record(a: &LeaseSpec, b: &LeaseSpec) -> bool {
    a.holder_identity == b.holder_identity
        && a.renew_time == b.renew_time
        && a.acquire_time == b.acquire_time
        && a.lease_transitions == b.lease_transitions
        && a.lease_duration_seconds == b.lease_duration_seconds
}

impl Elector {
    /// A candidate `identity` for Lease `namespace/name`.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timing: Timing,
    ) -> Elector {
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            timing,
            observed: Mutex::new(None),
        }
    }

    fn observe(&self, record: &LeaseSpec) {
        let mut observed = self.observed.lock().expect("observed lock");
        let changed = observed
            .as_ref()
            .is_none_or(|o| !same_record(&o.record, record));
        if changed {
            *observed = Some(Observed {
                record: record.clone(),
                at: Instant::now(),
            });
        }
    }

    /// Whether the Lease as last observed has gone unrenewed for its duration.
    fn observed_expired(&self) -> bool {
        let observed = self.observed.lock().expect("observed lock");
        let Some(observed) = observed.as_ref() else {
            return true;
        };
        let duration = observed
            .record
            .lease_duration_seconds
            .filter(|s| *s > 0)
            .map(|s| Duration::from_secs(s as u64))
            .unwrap_or(self.timing.lease_duration);
        observed.at.elapsed() >= duration
    }

    /// One try to take or renew the Lease, as client-go's `tryAcquireOrRenew`.
    pub async fn try_acquire_or_renew(&self) -> Result<Attempt, kube::Error> {
        let seconds = self.timing.lease_duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let record = LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            };
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(record.clone()),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    self.observe(&record);
                    Ok(Attempt::Leading)
                }
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Raced),
                Err(e) => Err(e),
            };
        };
        let record = lease.spec.clone().unwrap_or_default();
        self.observe(&record);
        let holder = record.holder_identity.clone().unwrap_or_default();
        let mine = holder == self.identity;
        if !holder.is_empty() && !mine && !self.observed_expired() {
            return Ok(Attempt::HeldBy(holder));
        }
        let mut next = record.clone();
        if !mine {
            next.acquire_time = Some(now());
            next.lease_transitions = Some(record.lease_transitions.unwrap_or(0) + 1);
            next.holder_identity = Some(self.identity.clone());
        }
        next.renew_time = Some(now());
        next.lease_duration_seconds = Some(seconds);
        lease.spec = Some(next.clone());
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                self.observe(&next);
                Ok(Attempt::Leading)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Raced),
            Err(e) => Err(e),
        }
    }

    /// One attempt, bounded by `limit`: a call that does not answer in time is a failure.
    async fn attempt(&self, limit: Duration) -> Result<Attempt, String> {
        match tokio::time::timeout(limit, self.try_acquire_or_renew()).await {
            Ok(Ok(attempt)) => Ok(attempt),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {limit:?}")),
        }
    }

    /// Waits until this candidate holds the Lease (or `stop`): `true` when it does.
    pub async fn acquire(&self, stop: &CancellationToken) -> bool {
        let mut warned = false;
        loop {
            match self.attempt(self.timing.renew_deadline).await {
                Ok(Attempt::Leading) => return true,
                Ok(Attempt::HeldBy(_) | Attempt::Raced) => warned = false,
                Err(e) if !warned => {
                    tracing::warn!("cannot read the leader lease (retrying): {e}");
                    warned = true;
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep(self.timing.jittered_retry()) => {}
            }
        }
    }

    /// Renews the Lease every retry period until `stop`. Returns `Err` with the reason when
    /// this replica must stop leading: another holder took the Lease, or no renewal
    /// succeeded within the renew deadline (the Lease may expire for the standbys soon
    /// after; the caller stops reconciling at once).
    pub async fn hold(&self, stop: &CancellationToken) -> Result<(), String> {
        let mut renewed = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(self.timing.retry_period) => {}
            }
            let deadline = renewed + self.timing.renew_deadline;
            let left = deadline.saturating_duration_since(Instant::now());
            match self.attempt(left).await {
                Ok(Attempt::Leading) => renewed = Instant::now(),
                Ok(Attempt::HeldBy(holder)) => {
                    return Err(format!("the leader lease is held by {holder} now"));
                }
                Ok(Attempt::Raced) => {}
                Err(e) => tracing::warn!("cannot renew the leader lease: {e}"),
            }
            if Instant::now() >= renewed + self.timing.renew_deadline {
                return Err(format!(
                    "the leader lease could not be renewed within {:?}",
                    self.timing.renew_deadline
                ));
            }
        }
    }

    /// Gives the Lease up (on a clean shutdown), so another replica takes over at once.
    pub async fn release(&self) {
        let limit = self.timing.retry_period;
        let Ok(Ok(Some(mut lease))) =
            tokio::time::timeout(limit, self.api.get_opt(&self.name)).await
        else {
            return;
        };
        if let Some(spec) = lease
            .spec
            .as_mut()
            .filter(|s| s.holder_identity.as_deref() == Some(&self.identity))
        {
            // As client-go: no holder, a one-second duration, so a standby acquires on its
            // next try.
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(now());
            let _ = tokio::time::timeout(
                limit,
                self.api.replace(&self.name, &PostParams::default(), &lease),
            )
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_follow_client_gos_rules() {
        let s = Duration::from_secs;
        assert!(Timing::new(s(15), s(10), s(2)).is_ok());
        assert!(Timing::new(s(10), s(10), s(2)).is_err(), "lease > renew");
        assert!(
            Timing::new(s(15), s(2), s(2)).is_err(),
            "renew > 1.2 * retry"
        );
        assert!(Timing::new(s(3), s(2), Duration::ZERO).is_err());
        assert_eq!(Timing::new(s(15), s(10), s(2)).unwrap(), Timing::DEFAULT);
    }

    #[test]
    fn a_jittered_retry_is_between_one_and_one_point_two_periods() {
        for _ in 0..100 {
            let retry = Timing::DEFAULT.jittered_retry();
            assert!(retry >= Duration::from_secs(2) && retry <= Duration::from_millis(2400));
        }
    }
}
