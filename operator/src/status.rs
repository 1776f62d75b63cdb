//! update_status: the conditions and figures users read (`kubectl get ep`, `describe`),
//! computed purely from what the reconcile observed, and written with server-side apply on
//! `/status` by the operator's one field manager.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::crd::{EmailPipeline, EmailPipelineStatus};
use crate::MANAGER;

/// One condition's new state: (type, ok, reason, message).
pub type ConditionUpdate<'a> = (&'a str, bool, &'a str, String);

/// `conditions` with `updates` applied: a condition keeps its transition time while its
/// status stays the same; every condition carries the generation it describes.
pub fn set_conditions(
    conditions: &[Condition],
    updates: &[ConditionUpdate<'_>],
    generation: Option<i64>,
    now: Time,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = conditions.to_vec();
    for (type_, ok, reason, message) in updates {
        let status = if *ok { "True" } else { "False" };
        let previous = out.iter().position(|c| c.type_ == *type_);
        let transition = previous
            .map(|i| &out[i])
            .filter(|c| c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        let condition = Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: reason.to_string(),
            message: message.clone(),
            last_transition_time: transition,
            observed_generation: generation,
        };
        match previous {
            Some(i) => out[i] = condition,
            None => out.push(condition),
        }
    }
    out
}

/// Whether condition `type_` is True in `status`.
pub fn is_true(status: Option<&EmailPipelineStatus>, type_: &str) -> bool {
    has_condition(status, type_, "True")
}

/// Whether `status` has condition `type_` with status `value` (`True`, `False`).
pub fn has_condition(status: Option<&EmailPipelineStatus>, type_: &str, value: &str) -> bool {
    status
        .into_iter()
        .flat_map(|s| s.conditions.iter())
        .any(|c| c.type_ == type_ && c.status == value)
}

/// The current time, to the second (as the API server keeps it).
pub fn now() -> Time {
    let now = k8s_openapi::jiff::Timestamp::now();
    Time(k8s_openapi::jiff::Timestamp::from_second(now.as_second()).unwrap_or(now))
}

/// Writes `status`: what the reconcile owns in it. The scaler's fields (`desiredReplicas`,
/// `backlog`, `deadLetterDepth`, `lastScaleTime` and the `Scaling` condition, written by
/// its own field manager) are left out, so this write never sets them back to an older
/// value.
pub async fn write(
    api: &Api<EmailPipeline>,
    pipeline: &EmailPipeline,
    status: &EmailPipelineStatus,
) -> Result<(), kube::Error> {
    let status = EmailPipelineStatus {
        desired_replicas: None,
        backlog: None,
        dead_letter_depth: None,
        last_scale_time: None,
        conditions: status
            .conditions
            .iter()
            .filter(|c| c.type_ != "Scaling")
            .cloned()
            .collect(),
        ..status.clone()
    };
    let patch = json!({
        "apiVersion": "mailpipe.dev/v1alpha1",
        "kind": "EmailPipeline",
        "status": status,
    });
    api.patch_status(
        &pipeline.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(second).unwrap())
    }

    #[test]
    fn a_condition_keeps_its_transition_time_until_its_status_changes() {
        let first = set_conditions(
            &[],
            &[("Ready", false, "Pending", "starting".into())],
            Some(1),
            at(10),
        );
        assert_eq!(first[0].last_transition_time, at(10));
        let same = set_conditions(
            &first,
            &[("Ready", false, "TopologyConflict", "x".into())],
            Some(2),
            at(20),
        );
        assert_eq!(same[0].last_transition_time, at(10), "still False");
        assert_eq!(
            (same[0].reason.as_str(), same[0].observed_generation),
            ("TopologyConflict", Some(2))
        );
        let flipped = set_conditions(
            &same,
            &[("Ready", true, "Ready", "ok".into())],
            Some(2),
            at(30),
        );
        assert_eq!(flipped[0].last_transition_time, at(30));
        assert_eq!(flipped.len(), 1);
        let more = set_conditions(
            &flipped,
            &[("WorkerReady", true, "Ready", "ok".into())],
            Some(2),
            at(40),
        );
        let types: Vec<&str> = more.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Ready", "WorkerReady"]);
    }
}
