//! Pipelines for the operator's end-to-end tests: the example manifest pointed at a test's
//! queue and SMTP server, a cluster with an operator, and waits on a pipeline's conditions.

use std::time::Duration;

use crate::amqp::{self, Names, SHARED_URL};
use crate::cluster::{Cluster, Operator};
use crate::smtp::{SmtpOptions, SmtpServer};
use crate::{eventually, repo_root};

/// The example pipeline (`deploy/examples/emailpipeline.yaml`) pointed at this test's
/// queue and SMTP server.
pub fn manifest(name: &str, names: &Names, smtp_port: u16, policy: &str) -> String {
    let example = std::fs::read_to_string(repo_root().join("deploy/examples/emailpipeline.yaml"))
        .expect("the example pipeline");
    edited(
        example,
        test_smtp(smtp_port).into_iter().chain([
            ("name: welcome", format!("name: {name}")),
            (
                "exchange: smtp_send_email_exc",
                format!("exchange: {}", names.exchange),
            ),
            ("queue: smtp_send_email", format!("queue: {}", names.queue)),
            // A Delete deletion waits out the workers' grace period after the last job: keep it
            // at the shortest the schema allows.
            (
                "  scaling:\n",
                "  worker:\n    terminationGracePeriodSeconds: 10\n  scaling:\n".to_string(),
            ),
            (
                "deletionPolicy: Retain",
                format!("deletionPolicy: {policy}"),
            ),
        ]),
    )
}

/// The edits that point an example's `smtp` at a plain test server on `port` (the examples
/// say starttls on 587) and shorten its backoff to 200 ms .. 2 s.
pub fn test_smtp(port: u16) -> [(&'static str, String); 5] {
    [
        ("host: smtp.example.com", "host: 127.0.0.1".to_string()),
        ("port: 587", format!("port: {port}")),
        ("tls: starttls", "tls: none".to_string()),
        ("initial: 5s", "initial: 200ms".to_string()),
        ("max: 5m", "max: 2s".to_string()),
    ]
}

/// `example` with each `(from, to)` edit made once, in order; each `from` must be there.
pub fn edited<'a>(example: String, edits: impl IntoIterator<Item = (&'a str, String)>) -> String {
    let mut text = example;
    for (from, to) in edits {
        assert!(text.contains(from), "the example has {from:?}");
        text = text.replacen(from, &to, 1);
    }
    text
}

/// A manifest edit for workers that never run (no program for their image): what reaches
/// the queue stays there.
pub const IDLE: (&str, &str) = (
    "  worker:\n",
    "  worker:\n    image: example.com/not-runnable:1\n",
);

/// Deletes what a pipeline made from `manifest` declared on the shared broker (its delay
/// queues are named after the manifest's backoff).
pub async fn delete_topology(names: &Names) {
    let backoff = mailpipe_contract::RetryPolicy {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(2),
        ..Default::default()
    };
    amqp::delete_plan(SHARED_URL, &names.plan(&backoff)).await;
}

/// The broker Secret `amqp` (replace `URL`).
pub const SECRET: &str =
    "apiVersion: v1\nkind: Secret\nmetadata:\n  name: amqp\nstringData:\n  url: URL\n";

/// A cluster with one operator replica (`op-a`), the broker Secret `amqp` applied, and an
/// SMTP server started with `options`.
pub async fn with_operator(options: SmtpOptions) -> (Cluster, SmtpServer, Operator) {
    let cluster = Cluster::start().await;
    let smtp = SmtpServer::start(options).await;
    let operator = cluster.operator("op-a");
    assert!(cluster
        .apply(&SECRET.replace("URL", SHARED_URL))
        .await
        .status
        .success());
    (cluster, smtp, operator)
}

/// A field of pipeline `pipeline`'s condition `type_` (empty when absent).
pub async fn condition(cluster: &Cluster, pipeline: &str, type_: &str, field: &str) -> String {
    let path = format!("jsonpath={{.status.conditions[?(@.type==\"{type_}\")].{field}}}");
    let out = cluster
        .kubectl(&["get", "emp", pipeline, "-o", &path])
        .await;
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until pipeline `pipeline`'s condition `type_` has `status` and `reason`.
pub async fn wait_condition(
    cluster: &Cluster,
    pipeline: &str,
    type_: &str,
    status: &str,
    reason: &str,
) {
    eventually(
        Cluster::SETTLE,
        &format!("{pipeline}: {type_}={status} ({reason})"),
        || async {
            let ok = condition(cluster, pipeline, type_, "status").await == status
                && condition(cluster, pipeline, type_, "reason").await == reason;
            ok.then_some(())
        },
    )
    .await;
}

/// `spec.replicas` of pipeline `pipeline`'s worker Deployment (`None` while it is missing).
pub async fn worker_replicas(cluster: &Cluster, pipeline: &str) -> Option<i32> {
    let deployments: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
        kube::Api::default_namespaced(cluster.client.clone());
    deployments
        .get_opt(&format!("{pipeline}-worker"))
        .await
        .ok()
        .flatten()
        .and_then(|d| d.spec?.replicas)
}

/// A status field of pipeline `pipeline` as kubectl prints it (empty when unset).
pub async fn status_field(cluster: &Cluster, pipeline: &str, field: &str) -> String {
    cluster
        .kubectl_ok(&[
            "get",
            "emp",
            pipeline,
            "-o",
            &format!("jsonpath={{.status.{field}}}"),
        ])
        .await
}
