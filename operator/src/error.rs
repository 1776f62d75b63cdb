//! Reconcile errors: one enum, each variant with a bounded `category()` (a metric label and
//! an event reason) and its requeue policy. An invalid spec is not an error here: it is a
//! condition, and the reconciler waits for the spec to change.

use std::time::Duration;

use crate::topology::TopologyError;

/// Why a reconcile did not finish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed a call.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A referenced Secret or ConfigMap (or a key in it) is missing.
    #[error("{0}")]
    MissingReference(String),
    /// The broker did not do what was asked.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// The finalizer machinery failed (adding or removing it).
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// A deletion waits (a queue still holds jobs, or the broker cannot be reached).
    #[error("{0}")]
    Waiting(String),
}

impl Error {
    /// Every `category()`: the failure counter starts each at zero, so the first failure
    /// of a kind is an increase a dashboard or an alert can see.
    pub const CATEGORIES: [&'static str; 8] = [
        "KubernetesApi",
        "MissingReference",
        "BrokerUnreachable",
        "BrokerRefused",
        "TopologyConflict",
        "TopologyMissing",
        "Finalizer",
        "DeletionWaiting",
    ];

    /// A bounded label: metrics, event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesApi",
            Error::MissingReference(_) => "MissingReference",
            Error::Topology(e) => e.category(),
            Error::Finalizer(_) => "Finalizer",
            Error::Waiting(_) => "DeletionWaiting",
        }
    }

    /// When to look again: transient trouble soon, what needs a human change later (a
    /// watched Secret or a spec change triggers a reconcile before that anyway).
    pub fn requeue_after(&self) -> Duration {
        match self {
            Error::Kube(_) => Duration::from_secs(5),
            Error::Topology(e) if e.is_transient() => Duration::from_secs(10),
            Error::Topology(_) | Error::MissingReference(_) => Duration::from_secs(60),
            Error::Finalizer(_) => Duration::from_secs(5),
            Error::Waiting(_) => Duration::from_secs(10),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_category_is_listed() {
        let text = || "x".to_string();
        let all = [
            Error::Kube(kube::Error::LinesCodecMaxLineLengthExceeded),
            Error::MissingReference(text()),
            Error::Topology(TopologyError::Unreachable(text())),
            Error::Topology(TopologyError::Refused(text())),
            Error::Topology(TopologyError::Conflict(text())),
            Error::Topology(TopologyError::Missing(text())),
            Error::Finalizer(text()),
            Error::Waiting(text()),
        ];
        let categories: Vec<&str> = all.iter().map(Error::category).collect();
        assert_eq!(categories, Error::CATEGORIES);
    }
}
