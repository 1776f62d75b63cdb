//! The operator end to end: kubectl against the Kubernetes API test server, a real RabbitMQ,
//! real worker processes run by the runner, a real SMTP server. From `kubectl apply` of the
//! example pipeline to mail delivered, a rolled Deployment, refusals, a deletion that waits
//! for its queue, and a leader hand-over.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Api;
use mailpipe_tests::amqp::{self, Names, SHARED_URL};
use mailpipe_tests::cluster::Cluster;
use mailpipe_tests::eventually;
use mailpipe_tests::pipelines::{
    condition, delete_topology, manifest, status_field, wait_condition, with_operator,
    worker_replicas, IDLE, SECRET,
};
use mailpipe_tests::smtp::{SmtpOptions, SmtpServer};

/// Waits until the pipeline `name` and its work queue `queue` are gone.
async fn gone(cluster: &Cluster, name: &str, queue: &str, timeout: Duration) {
    eventually(
        timeout,
        &format!("the pipeline {name} and its queue gone"),
        || async {
            let gone = !cluster
                .kubectl(&["get", "emp", name])
                .await
                .status
                .success();
            (gone && !amqp::queue_exists(SHARED_URL, queue).await).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn an_applied_pipeline_gets_its_topology_workers_and_status_and_delivers_mail() {
    let cluster = Cluster::start().await;
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    let names = Names::new("e2e");
    let operator = cluster.operator("op-a");
    assert!(cluster
        .apply(&SECRET.replace("URL", SHARED_URL))
        .await
        .status
        .success());
    let applied = cluster
        .apply(&manifest("welcome", &names, smtp.port, "Delete"))
        .await;
    assert!(
        String::from_utf8_lossy(&applied.stdout)
            .contains("emailpipeline.mailpipe.dev/welcome created"),
        "{applied:?}"
    );

    // The topology exists in RabbitMQ: exchange, queue, dead-letter and retry queues.
    let dlq = mailpipe_contract::naming::dead_letter_queue(&names.queue);
    eventually(Cluster::SETTLE, "the queues declared", || async {
        (amqp::queue_exists(SHARED_URL, &names.queue).await
            && amqp::queue_exists(SHARED_URL, &dlq).await)
            .then_some(())
    })
    .await;

    // The children exist with the expected spec, once the reconcile that made them is done
    // (it reports the workers last).
    eventually(Cluster::SETTLE, "the workers reported", || async {
        (!condition(&cluster, "welcome", "WorkerReady", "status")
            .await
            .is_empty())
        .then_some(())
    })
    .await;
    let deployments: Api<Deployment> = Api::default_namespaced(cluster.client.clone());
    let deployment = deployments
        .get("welcome-worker")
        .await
        .expect("the worker Deployment");
    let template = deployment.spec.as_ref().unwrap().template.clone();
    let env = template.spec.unwrap().containers[0].env.clone().unwrap();
    let value = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(
        value("MAILPIPE_QUEUE").as_deref(),
        Some(names.queue.as_str())
    );
    assert_eq!(
        value("MAILPIPE_AMQP_URL_FILE").as_deref(),
        Some("/etc/mailpipe/amqp/url")
    );
    assert!(
        env.iter().all(|e| e.name != "MAILPIPE_AMQP_URL"),
        "no URL in plain env"
    );
    let owned = serde_json::to_string(&deployment.metadata.managed_fields).unwrap();
    assert!(owned.contains("mailpipe-operator"));
    let operator_entry = deployment
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .find(|e| e.manager.as_deref() == Some("mailpipe-operator"))
        .unwrap();
    let fields = serde_json::to_string(&operator_entry.fields_v1).unwrap();
    assert!(
        !fields.contains("f:replicas"),
        "the operator leaves spec.replicas to the scaler: {fields}"
    );
    // The scaler's manager owns the count it was created with.
    let scaler_entry = deployment
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .find(|e| e.manager.as_deref() == Some("mailpipe-operator-scaler"))
        .expect("the scaler's entry");
    let fields = serde_json::to_string(&scaler_entry.fields_v1).unwrap();
    assert!(fields.contains("f:replicas"), "{fields}");
    let services: Api<Service> = Api::default_namespaced(cluster.client.clone());
    let service = services.get("welcome-worker").await.unwrap();
    assert_eq!(service.spec.unwrap().ports.unwrap()[0].port, 9090);
    let budgets: Api<PodDisruptionBudget> = Api::default_namespaced(cluster.client.clone());
    let budget = budgets.get("welcome-worker").await.unwrap();
    assert_eq!(
        budget.spec.unwrap().max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );

    // Ready once a worker is ready; kubectl prints the columns.
    wait_condition(&cluster, "welcome", "Ready", "True", "Ready").await;
    let table = cluster.kubectl_ok(&["get", "emp"]).await;
    // `ep` is Endpoints' short name, and kubectl resolves it to the built-in kind.
    let endpoints = cluster.kubectl(&["get", "ep"]).await;
    let said = String::from_utf8_lossy(&endpoints.stdout).into_owned()
        + &String::from_utf8_lossy(&endpoints.stderr);
    assert!(!said.contains("welcome"), "ep is not ours: {said}");
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "SOURCE", "BACKLOG", "REPLICAS", "READY", "AGE"],
        "{table}"
    );
    assert!(
        table.contains(&format!("rabbitmq/{}", names.queue)),
        "{table}"
    );

    // Jobs published to the exchange arrive.
    let run = mailpipe_tests::unique("e2e");
    amqp::publish_numbered(SHARED_URL, &names.exchange, &run, 0..10).await;
    smtp.wait_for_count(10, Duration::from_secs(30)).await;
    assert_eq!(smtp.tally(&run, 10).await.lost, 0);

    // Editing the spec rolls the workers.
    let before = cluster.runner.pods("default", "welcome-worker");
    assert_eq!(before.len(), 1, "{before:?}");
    cluster
        .kubectl_ok(&[
            "patch",
            "emp",
            "welcome",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"worker":{"concurrency":4}}}"#,
        ])
        .await;
    eventually(Cluster::SETTLE, "the worker replaced", || async {
        let pods = cluster.runner.pods("default", "welcome-worker");
        (pods.len() == 1 && pods[0].name != before[0].name && pods[0].ready).then_some(())
    })
    .await;
    // A changed referenced Secret rolls the workers too.
    let rolled = cluster.runner.pods("default", "welcome-worker");
    let same_broker = SHARED_URL.replace("127.0.0.1", "localhost");
    assert_ne!(same_broker, SHARED_URL);
    assert!(cluster
        .apply(&SECRET.replace("URL", &same_broker))
        .await
        .status
        .success());
    eventually(
        Cluster::SETTLE,
        "the worker replaced after the Secret changed",
        || async {
            let pods = cluster.runner.pods("default", "welcome-worker");
            (pods.len() == 1 && pods[0].name != rolled[0].name && pods[0].ready).then_some(())
        },
    )
    .await;
    // It learnt of the change from Secret metadata alone: the operator lists and watches
    // no Secret's data (it reads the ones its pipelines name).
    let secret_collections: Vec<(String, String)> = cluster
        .server
        .store()
        .lock()
        .unwrap()
        .requests_with_accept()
        .into_iter()
        .filter(|(line, _)| {
            (line.starts_with("GET ") || line.starts_with("WATCH ")) && line.ends_with("/secrets")
        })
        .collect();
    assert!(!secret_collections.is_empty());
    assert!(
        secret_collections
            .iter()
            .all(|(_, accept)| accept.contains("as=PartialObjectMetadata")),
        "{secret_collections:?}"
    );

    // The operator's metrics say the same.
    let metrics = operator.metrics().await;
    for series in [
        "mailpipe_operator_topology_ready{namespace=\"default\",pipeline=\"welcome\"} 1",
        "mailpipe_operator_replicas{kind=\"ready\",namespace=\"default\",pipeline=\"welcome\"} 1",
        "mailpipe_operator_dead_letter_depth{namespace=\"default\",pipeline=\"welcome\"} 0",
        "mailpipe_operator_reconciles_total{result=\"ok\"}",
    ] {
        assert!(metrics.contains(series), "{series} in\n{metrics}");
    }

    let events = cluster.kubectl_ok(&["get", "events"]).await;
    assert!(
        events.contains("TopologyReady") && events.contains("emailpipeline/welcome"),
        "{events}"
    );

    // Deleting it (policy Delete, queues empty) removes the topology and the workers.
    cluster
        .kubectl_ok(&["delete", "emp", "welcome", "--timeout=60s"])
        .await;
    eventually(Cluster::SETTLE, "the queues deleted", || async {
        (!amqp::queue_exists(SHARED_URL, &names.queue).await
            && !amqp::queue_exists(SHARED_URL, &dlq).await)
            .then_some(())
    })
    .await;
    eventually(Cluster::SETTLE, "the workers stopped", || async {
        cluster
            .runner
            .pods("default", "welcome-worker")
            .is_empty()
            .then_some(())
    })
    .await;
    drop(operator);
    // Every request it made is allowed by the shipped RBAC.
    assert!(cluster.check_operator_rbac() > 0);
}

#[tokio::test]
async fn bad_specs_are_refused_or_reported_and_deletion_waits_for_a_non_empty_queue() {
    let (cluster, smtp, _operator) = with_operator(SmtpOptions::default()).await;

    // Refused by the CEL rules, with their message.
    let names = Names::new("e2ebad");
    let both = manifest("both", &names, smtp.port, "Retain").replace(
        "  smtp:\n",
        "    kafka:\n      bootstrapServers: [\"kafka:9092\"]\n      topic: jobs\n  smtp:\n",
    );
    let refused = cluster.apply(&both).await;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("exactly one of spec.source.rabbitmq or spec.source.kafka must be set"),
        "{refused:?}"
    );

    // Accepted by the schema, but its Secret is missing: Ready=False with the reason.
    let missing =
        manifest("missing", &names, smtp.port, "Retain").replace("name: amqp", "name: nope");
    assert!(cluster.apply(&missing).await.status.success());
    wait_condition(&cluster, "missing", "Ready", "False", "MissingReference").await;
    let message = condition(&cluster, "missing", "Ready", "message").await;
    assert!(message.contains("Secret \"nope\" not found"), "{message}");
    // The same with policy Delete: it never had a topology, so deleting it is not held up
    // (it used to wait for the Secret, or for an admin's release annotation).
    let typo = manifest("typo", &names, smtp.port, "Delete").replace("name: amqp", "name: nope");
    assert!(cluster.apply(&typo).await.status.success());
    wait_condition(&cluster, "typo", "Ready", "False", "MissingReference").await;
    cluster
        .kubectl_ok(&["delete", "emp", "typo", "--timeout=30s"])
        .await;

    // A pipeline whose workers cannot start (no program for the image) keeps its jobs;
    // deleting it with policy Delete waits and says why, then finishes once drained.
    let held = Names::new("e2eheld");
    let held_manifest = manifest("held", &held, smtp.port, "Delete").replace(IDLE.0, IDLE.1);
    assert!(cluster.apply(&held_manifest).await.status.success());
    wait_condition(&cluster, "held", "TopologyReady", "True", "Declared").await;
    amqp::publish_numbered(SHARED_URL, &held.exchange, "held", 0..3).await;
    cluster
        .kubectl_ok(&["delete", "emp", "held", "--wait=false"])
        .await;
    wait_condition(&cluster, "held", "TopologyReady", "False", "QueueNotEmpty").await;
    let message = condition(&cluster, "held", "TopologyReady", "message").await;
    assert!(
        message.contains(&format!("queue {} still holds 3 jobs", held.queue)),
        "{message}"
    );
    assert_eq!(
        amqp::ready(SHARED_URL, &held.queue).await,
        3,
        "nothing was deleted"
    );
    // The count changes while the deletion waits (the intake is unbound: straight into the
    // queue): the condition follows, and there is still one Warning, not one per count.
    amqp::publish_routed(
        SHARED_URL,
        "",
        &held.queue,
        (0..2).map(|_| (b"{}".to_vec(), Default::default())),
    )
    .await;
    eventually(
        Cluster::SETTLE,
        "the new count in the condition",
        || async {
            condition(&cluster, "held", "TopologyReady", "message")
                .await
                .contains("still holds 5 jobs")
                .then_some(())
        },
    )
    .await;
    let events = cluster
        .kubectl_ok(&[
            "get",
            "events",
            "-o",
            "jsonpath={range .items[*]}{.involvedObject.name}/{.reason}{\"\\n\"}{end}",
        ])
        .await;
    assert_eq!(
        events
            .lines()
            .filter(|l| *l == "held/QueueNotEmpty")
            .count(),
        1,
        "one Warning while the count changes: {events}"
    );
    assert_eq!(amqp::take_all(SHARED_URL, &held.queue).await.len(), 5);
    eventually(
        Cluster::SETTLE,
        "the pipeline and its queue gone",
        || async {
            let gone = !cluster
                .kubectl(&["get", "emp", "held"])
                .await
                .status
                .success();
            (gone && !amqp::queue_exists(SHARED_URL, &held.queue).await).then_some(())
        },
    )
    .await;

    // A broker gone for good holds a Delete-policy deletion of a pipeline that has a
    // topology until an admin lets go. (One that never got a topology is not held, above.)
    let live_secret = SECRET
        .replace("name: amqp", "name: dead")
        .replace("URL", SHARED_URL);
    assert!(cluster.apply(&live_secret).await.status.success());
    let gone = Names::new("e2egone");
    let gone_manifest =
        manifest("gone", &gone, smtp.port, "Delete").replace("name: amqp", "name: dead");
    assert!(cluster.apply(&gone_manifest).await.status.success());
    wait_condition(&cluster, "gone", "TopologyReady", "True", "Declared").await;
    let dead = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        mailpipe_tests::free_port()
    );
    let dead_secret = SECRET
        .replace("name: amqp", "name: dead")
        .replace("URL", &dead);
    assert!(cluster.apply(&dead_secret).await.status.success());
    wait_condition(
        &cluster,
        "gone",
        "TopologyReady",
        "False",
        "BrokerUnreachable",
    )
    .await;
    cluster
        .kubectl_ok(&["delete", "emp", "gone", "--wait=false"])
        .await;
    eventually(
        Cluster::SETTLE,
        "the deletion waiting with advice",
        || async {
            let message = condition(&cluster, "gone", "TopologyReady", "message").await;
            message
                .contains("mailpipe.dev/release-finalizer=true")
                .then_some(())
        },
    )
    .await;
    assert!(
        cluster
            .kubectl(&["get", "emp", "gone"])
            .await
            .status
            .success(),
        "still there"
    );
    cluster
        .kubectl_ok(&[
            "annotate",
            "emp",
            "gone",
            "mailpipe.dev/release-finalizer=true",
        ])
        .await;
    eventually(Cluster::SETTLE, "the pipeline released", || async {
        (!cluster
            .kubectl(&["get", "emp", "gone"])
            .await
            .status
            .success())
        .then_some(())
    })
    .await;
    // Every request it made is allowed by the shipped RBAC.
    assert!(cluster.check_operator_rbac() > 0);
}

#[tokio::test]
async fn a_second_operator_replica_waits_and_takes_over_when_the_leader_dies() {
    let cluster = Cluster::start().await;
    let smtp = SmtpServer::start(SmtpOptions::default()).await;
    // With prometheus-operator's ServiceMonitor served, pipelines get one.
    assert!(cluster
        .apply(&mailpipe_tests::cluster::monitoring_crd(
            "ServiceMonitor",
            "servicemonitors"
        ))
        .await
        .status
        .success());
    let mut a = cluster.operator("op-a");
    let mut b = cluster.operator("op-b");
    assert!(cluster
        .apply(&SECRET.replace("URL", SHARED_URL))
        .await
        .status
        .success());
    let holder = || cluster.lease_holder();
    let first = eventually(Cluster::SETTLE, "a leader", || async {
        let h = holder().await;
        (!h.is_empty()).then_some(h)
    })
    .await;
    let names = Names::new("e2elead");
    assert!(cluster
        .apply(&manifest("first", &names, smtp.port, "Retain"))
        .await
        .status
        .success());
    let deployments: Api<Deployment> = Api::default_namespaced(cluster.client.clone());
    eventually(Cluster::SETTLE, "the first pipeline's workers", || async {
        deployments.get_opt("first-worker").await.ok().flatten()
    })
    .await;
    let monitor = cluster
        .kubectl_ok(&[
            "get",
            "servicemonitors",
            "first-worker",
            "-o",
            "jsonpath={.spec.endpoints[0].port}",
        ])
        .await;
    assert_eq!(monitor, "http");

    // The leader says so in its metrics; the standby says it stands by.
    let (leading, standing) = if first == "op-a" { (&a, &b) } else { (&b, &a) };
    let leader_gauge = "\nmailpipe_operator_leader 1\n";
    assert!(leading.metrics().await.contains(leader_gauge));
    assert!(standing
        .metrics()
        .await
        .contains("\nmailpipe_operator_leader 0\n"));

    // Kill the leader: the other replica takes the Lease and reconciles what comes next.
    let (leader, standby) = if first == "op-a" {
        (&mut a, "op-b")
    } else {
        (&mut b, "op-a")
    };
    leader.proc.kill();
    let second = Names::new("e2elead2");
    assert!(cluster
        .apply(&manifest("second", &second, smtp.port, "Retain"))
        .await
        .status
        .success());
    eventually(Cluster::SETTLE, "the standby leading", || async {
        (holder().await == standby).then_some(())
    })
    .await;
    eventually(Cluster::SETTLE, "the second pipeline's workers", || async {
        deployments.get_opt("second-worker").await.ok().flatten()
    })
    .await;
    let new_leader = if standby == "op-a" { &a } else { &b };
    assert!(new_leader.metrics().await.contains(leader_gauge));
    for n in [&names, &second] {
        delete_topology(n).await;
    }
    // Every request it made is allowed by the shipped RBAC.
    assert!(cluster.check_operator_rbac() > 0);
}

/// `deletionPolicy: Delete` used to count only ready jobs and delete with `if-empty` while
/// the workers still ran: jobs in flight, and retry copies waiting in a delay queue, could
/// be dropped, and quorum queues (which refuse `if-empty`) were never deleted. Now the
/// intake stops, the workers drain what is left, then stop, and the queues go only when
/// every one is empty and no worker can still hold a job.
#[tokio::test]
async fn a_delete_deletion_loses_no_job_in_flight_and_finishes_on_quorum_queues() {
    const N: usize = 40;
    let (cluster, smtp, _operator) = with_operator(SmtpOptions {
        delay_ms: 200,
        ..SmtpOptions::default()
    })
    .await;
    let busy = Names::new("e2ebusy");
    assert!(cluster
        .apply(&manifest("busy", &busy, smtp.port, "Delete"))
        .await
        .status
        .success());
    wait_condition(&cluster, "busy", "Ready", "True", "Ready").await;
    // Every job fails once (a retry copy waits in a delay queue), then goes out.
    smtp.set_fault(451, "4.3.0 try again").await;
    let run = mailpipe_tests::unique("busy");
    amqp::publish_numbered(SHARED_URL, &busy.exchange, &run, 0..N).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster
        .kubectl_ok(&["delete", "emp", "busy", "--wait=false"])
        .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    smtp.clear_fault().await;
    gone(&cluster, "busy", &busy.queue, Duration::from_secs(120)).await;
    let tally = smtp.tally(&run, N).await;
    assert_eq!(
        tally,
        mailpipe_tests::jobs::Tally::EXACT,
        "every job delivered once"
    );

    // A quorum-queue pipeline is deleted too (quorum queues refuse `if-empty`).
    let quorum = Names::new("e2equorum");
    let quorum_manifest = manifest("quorum", &quorum, smtp.port, "Delete").replace(
        &format!("queue: {}", quorum.queue),
        &format!("queue: {}\n      queueType: quorum", quorum.queue),
    );
    assert!(cluster.apply(&quorum_manifest).await.status.success());
    wait_condition(&cluster, "quorum", "Ready", "True", "Ready").await;
    cluster
        .kubectl_ok(&["delete", "emp", "quorum", "--wait=false"])
        .await;
    gone(&cluster, "quorum", &quorum.queue, Duration::from_secs(90)).await;
    // Every request it made is allowed by the shipped RBAC.
    assert!(cluster.check_operator_rbac() > 0);
}

/// A child the API server refuses (here the worker Deployment's selector, which is
/// immutable, differs from a Deployment of the same name already there) used to leave the
/// status empty, publish no Warning, retry every 5 s forever and re-declare the topology
/// with a Normal event each time. Now: the reason and the server's message in `WorkerReady`,
/// one Warning, one Normal `TopologyReady`, and retries that wait longer each time.
#[tokio::test]
async fn a_refused_child_is_reported_once_and_retried_with_a_growing_wait() {
    let (cluster, smtp, operator) = with_operator(SmtpOptions::default()).await;
    let squatter = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: clash-worker
spec:
  selector:
    matchLabels: {app: other}
  template:
    metadata:
      labels: {app: other}
    spec:
      containers:
      - name: other
        image: example.com/other:1
";
    assert!(cluster.apply(squatter).await.status.success());
    let names = Names::new("e2eclash");
    assert!(cluster
        .apply(&manifest("clash", &names, smtp.port, "Retain"))
        .await
        .status
        .success());
    wait_condition(&cluster, "clash", "WorkerReady", "False", "InvalidChild").await;
    let message = condition(&cluster, "clash", "WorkerReady", "message").await;
    assert!(message.contains("field is immutable"), "{message}");
    let first = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(25)).await;

    let errors = |metrics: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with("mailpipe_operator_reconciles_total{result=\"error\"}"))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0.0)
    };
    let failed = errors(&operator.metrics().await);
    println!("{failed} failed reconciles in {:?}", first.elapsed());
    // A 5 s wait every time would make 6 or more; 5, 10, 20 s makes 4 at most.
    assert!(
        (2.0..=4.0).contains(&failed),
        "{failed} failed reconciles in 25 s"
    );
    let events = cluster
        .kubectl_ok(&[
            "get",
            "events",
            "-o",
            "jsonpath={range .items[*]}{.involvedObject.name}/{.reason}{\"\\n\"}{end}",
        ])
        .await;
    let count = |reason: &str| {
        events
            .lines()
            .filter(|l| *l == format!("clash/{reason}"))
            .count()
    };
    assert_eq!(count("InvalidChild"), 1, "one Warning: {events}");
    assert_eq!(count("TopologyReady"), 1, "one Normal event: {events}");
    // Every request it made is allowed by the shipped RBAC.
    assert!(cluster.check_operator_rbac() > 0);
}

/// A status write (the backlog the reconciler reports) used to trigger the next reconcile at
/// once, so a pipeline whose backlog kept changing was reconciled in a tight loop,
/// each time opening broker connections and applying its children. Status-only changes no
/// longer trigger a reconcile.
#[tokio::test]
async fn a_changing_backlog_does_not_make_the_operator_reconcile_in_a_loop() {
    let (cluster, smtp, operator) = with_operator(SmtpOptions::default()).await;
    // Workers that never run: the backlog only grows. One replica at most, so the scaler
    // (which would otherwise follow the backlog, and each scale is a change of the
    // Deployment) leaves the count alone: only status writes are under test here.
    let names = Names::new("e2eloop");
    let pipeline = manifest("loop", &names, smtp.port, "Retain")
        .replace(IDLE.0, IDLE.1)
        .replace("maxReplicas: 5", "maxReplicas: 1");
    assert!(cluster.apply(&pipeline).await.status.success());
    wait_condition(&cluster, "loop", "TopologyReady", "True", "Declared").await;
    let reconciles = |metrics: String| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("mailpipe_operator_reconciles_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    // Trigger one reconcile (an annotation), then let the backlog change all the time.
    cluster
        .kubectl_ok(&["annotate", "emp", "loop", "example.com/poke=1"])
        .await;
    let before = reconciles(operator.metrics().await);
    let started = std::time::Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(12) {
        amqp::publish_numbered(SHARED_URL, &names.exchange, "loop", n..n + 5).await;
        n += 5;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = reconciles(operator.metrics().await) - before;
    println!("{during} reconciles in 12 s while the backlog grew to {n}");
    // The annotation's reconcile, its status write's, and the 30 s resync at most.
    assert!(during <= 3.0, "{during} reconciles in 12 s");
    delete_topology(&names).await;
    // Every request it made is allowed by the shipped RBAC.
    assert!(cluster.check_operator_rbac() > 0);
}

/// Deleting a namespace deletes its Secrets first and only then marks the pipelines in it
/// (recording 193): a `Delete` pipeline's cleanup used to find its broker Secret gone and
/// hold the namespace in Terminating until someone released it by hand. Now the operator
/// keeps a copy of the broker connection in its own namespace: an idle pipeline's topology
/// is removed, and one whose jobs no worker can ever take any more (no Deployment may be
/// created in a namespace being deleted) keeps its queues and jobs, as `Retain` would. The
/// namespace goes without an admin, the copies with it.
#[tokio::test]
async fn deleting_a_namespace_with_delete_pipelines_completes_and_drops_no_job() {
    const N: usize = 25;
    let (cluster, smtp, _operator) = with_operator(SmtpOptions::default()).await;
    let in_shop = |text: String| {
        text.replacen(
            "metadata:\n  name: ",
            "metadata:\n  namespace: shop\n  name: ",
            1,
        )
    };
    assert!(cluster
        .apply("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n")
        .await
        .status
        .success());
    assert!(cluster
        .apply(&in_shop(SECRET.replace("URL", SHARED_URL)))
        .await
        .status
        .success());
    let idle = Names::new("e2eidle");
    assert!(cluster
        .apply(&in_shop(manifest("idle", &idle, smtp.port, "Delete")))
        .await
        .status
        .success());
    // Workers that never run: the jobs stay in the queue.
    let stuck = Names::new("e2estuck");
    let stuck_manifest =
        in_shop(manifest("stuck", &stuck, smtp.port, "Delete")).replace(IDLE.0, IDLE.1);
    assert!(cluster.apply(&stuck_manifest).await.status.success());
    let ready_in_shop = |name: &'static str| {
        let cluster = &cluster;
        async move {
            let path = "jsonpath={.status.conditions[?(@.type==\"TopologyReady\")].status}";
            let out = cluster
                .kubectl(&["get", "emp", name, "-n", "shop", "-o", path])
                .await;
            (String::from_utf8_lossy(&out.stdout) == "True").then_some(())
        }
    };
    eventually(Cluster::SETTLE, "idle's topology", || ready_in_shop("idle")).await;
    eventually(Cluster::SETTLE, "stuck's topology", || {
        ready_in_shop("stuck")
    })
    .await;
    let kept = || async {
        cluster
            .kubectl_ok(&[
                "get",
                "secrets",
                "-n",
                "default",
                "-l",
                "app.kubernetes.io/managed-by=mailpipe-operator",
                "-o",
                "name",
            ])
            .await
            .lines()
            .count()
    };
    eventually(Cluster::SETTLE, "two kept broker connections", || async {
        (kept().await == 2).then_some(())
    })
    .await;
    let run = mailpipe_tests::unique("stuck");
    amqp::publish_numbered(SHARED_URL, &stuck.exchange, &run, 0..N).await;

    cluster
        .kubectl_ok(&["delete", "namespace", "shop", "--wait=false"])
        .await;
    eventually(
        Duration::from_secs(90),
        "the namespace gone without an admin",
        || async {
            (!cluster
                .kubectl(&["get", "namespace", "shop"])
                .await
                .status
                .success())
            .then_some(())
        },
    )
    .await;
    assert!(
        !amqp::queue_exists(SHARED_URL, &idle.queue).await,
        "the idle pipeline's topology was removed"
    );
    assert_eq!(
        amqp::ready(SHARED_URL, &stuck.queue).await as usize,
        N,
        "the stuck pipeline's jobs are kept on the broker"
    );
    assert_eq!(kept().await, 0, "the kept copies are gone");
    delete_topology(&stuck).await;
    // Every request it made is allowed by the shipped RBAC.
    assert!(cluster.check_operator_rbac() > 0);
}

/// The leader used to judge expiry by comparing the holder's renewTime with its own clock,
/// gave up only after a full lease duration (exactly when a standby may take over), and
/// had no timeout on its Lease calls; losing the Lease ended in a backtrace. Now, with the
/// default timing (15 s lease, 10 s renew deadline, 2 s retry): a leader cut off from the
/// API server (a proxy that cuts its connections and then never answers) stops within the
/// renew deadline with one clear line and exit code 1, and the standby takes over only
/// after that, a lease duration after it last saw a renewal.
#[tokio::test]
async fn a_leader_cut_off_from_the_api_server_stops_before_a_standby_takes_over() {
    use mailpipe_tests::proxy::{Mode, Proxy};
    use std::time::Instant;
    let cluster = Cluster::start().await;
    let proxy = Proxy::start(cluster.server.addr.port()).await;
    let mut a = cluster.operator_with("op-a", &[], Some(proxy.port));
    let holder = || cluster.lease_holder();
    eventually(Cluster::SETTLE, "op-a leading", || async {
        (holder().await == "op-a").then_some(())
    })
    .await;
    let _b = cluster.operator_with("op-b", &[], None);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        holder().await,
        "op-a",
        "the standby waits while op-a renews"
    );

    proxy.set(Mode::Hang);
    let cut = Instant::now();
    // Polled without blocking: the API server runs on this test's runtime.
    while a.proc.is_running() && cut.elapsed() < Duration::from_secs(14) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stopped = cut.elapsed();
    let status = a
        .proc
        .wait_timeout(Duration::ZERO)
        .expect("op-a stops leading within the renew deadline (10 s) and its last retry");
    assert_eq!(status.code(), Some(1), "exit code 1: {}", a.proc.output());
    let log = a.proc.output();
    assert!(log.contains("stopped leading"), "{log}");
    assert!(
        !log.contains("panicked") && !log.contains("backtrace"),
        "one clear line, no backtrace: {log}"
    );
    eventually(Duration::from_secs(30), "op-b leading", || async {
        (holder().await == "op-b").then_some(())
    })
    .await;
    let taken = cut.elapsed();
    println!("op-a stopped {stopped:?} after the cut; op-b led {taken:?} after it");
    assert!(
        taken > stopped,
        "op-b took over ({taken:?}) after op-a stopped ({stopped:?})"
    );
    // Every request it made is allowed by the shipped RBAC.
    assert!(cluster.check_operator_rbac() > 0);
}

/// Changing a pipeline's exchange (or routing key) used to declare the new binding and
/// leave the old one: jobs kept arriving from the old exchange. Now the old binding goes
/// once the new one is declared, and the status says which binding is current.
#[tokio::test]
async fn changing_the_exchange_moves_the_work_queue_to_the_new_one() {
    let (cluster, smtp, _operator) = with_operator(SmtpOptions::default()).await;
    let names = Names::new("e2emove");
    // Workers that never run: what reaches the queue stays there to be counted.
    let pipeline = manifest("move", &names, smtp.port, "Retain").replace(IDLE.0, IDLE.1);
    assert!(cluster.apply(&pipeline).await.status.success());
    let intake = || async {
        cluster
            .kubectl_ok(&[
                "get",
                "emp",
                "move",
                "-o",
                "jsonpath={.status.intake.exchange}",
            ])
            .await
    };
    eventually(Cluster::SETTLE, "the first binding in status", || async {
        (intake().await == names.exchange).then_some(())
    })
    .await;
    let moved = Names {
        exchange: format!("{}_new", names.exchange),
        queue: names.queue.clone(),
    };
    let changed = pipeline.replace(
        &format!("exchange: {}", names.exchange),
        &format!("exchange: {}", moved.exchange),
    );
    assert!(cluster.apply(&changed).await.status.success());
    eventually(Cluster::SETTLE, "the new binding in status", || async {
        (intake().await == moved.exchange).then_some(())
    })
    .await;
    amqp::publish_numbered(SHARED_URL, &names.exchange, "old", 0..3).await;
    amqp::publish_numbered(SHARED_URL, &moved.exchange, "new", 0..4).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        amqp::ready(SHARED_URL, &names.queue).await,
        4,
        "only the new exchange's jobs reach the queue"
    );
    // Every request it made is allowed by the shipped RBAC.
    assert!(cluster.check_operator_rbac() > 0);
    delete_topology(&names).await;
    delete_topology(&moved).await;
}

/// Two pipelines that name the same fanout exchange would each get every job: the second
/// one is refused with the reason before anything is declared for it, and the first keeps
/// the exchange.
#[tokio::test]
async fn a_second_pipeline_naming_a_bound_fanout_exchange_is_refused() {
    let (cluster, smtp, _operator) = with_operator(SmtpOptions::default()).await;
    let first = Names::new("e2efana");
    let second = Names {
        exchange: first.exchange.clone(),
        queue: Names::new("e2efanb").queue,
    };
    let not_runnable = |text: String| text.replace(IDLE.0, IDLE.1);
    assert!(cluster
        .apply(&not_runnable(manifest(
            "fan-a", &first, smtp.port, "Retain"
        )))
        .await
        .status
        .success());
    wait_condition(&cluster, "fan-a", "TopologyReady", "True", "Declared").await;
    assert!(cluster
        .apply(&not_runnable(manifest(
            "fan-b", &second, smtp.port, "Retain"
        )))
        .await
        .status
        .success());
    wait_condition(
        &cluster,
        "fan-b",
        "TopologyReady",
        "False",
        "SharedExchange",
    )
    .await;
    let message = condition(&cluster, "fan-b", "TopologyReady", "message").await;
    assert!(message.contains("default/fan-a"), "{message}");
    assert!(
        !amqp::queue_exists(SHARED_URL, &second.queue).await,
        "nothing was declared for the refused pipeline"
    );
    amqp::publish_numbered(SHARED_URL, &first.exchange, "fan", 0..3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(amqp::ready(SHARED_URL, &first.queue).await, 3);
    // Every request it made is allowed by the shipped RBAC.
    assert!(cluster.check_operator_rbac() > 0);
    delete_topology(&first).await;
}

/// The scaler, a loop of its own beside the reconcile: a backlog raises the worker
/// Deployment in one step to the count the target calls for, within two poll intervals of
/// the pause annotation's removal (the jobs wait under it, so no look sees half of them);
/// once the queue is empty the workers go back to the minimum (0) after the scale-down
/// window. The scaler's status fields and the reconcile's stand side by side.
#[tokio::test]
async fn a_backlog_scales_the_workers_up_in_one_step_and_an_empty_queue_back_to_zero() {
    let (cluster, smtp, operator) = with_operator(SmtpOptions::default()).await;
    let names = Names::new("e2escale");
    // Workers that never run: the backlog stays until the test takes it.
    // 64 connections: 4 replicas of 16 concurrent jobs use them all.
    // The jobs are published while the pause annotation holds the workers at 0: a scaler
    // look in the middle of the publishing would rightly see a part of the backlog.
    let pipeline = manifest("scale", &names, smtp.port, "Retain")
        .replace(IDLE.0, IDLE.1)
        .replace("    tls: none\n", "    tls: none\n    poolSize: 64\n")
        .replace("minReplicas: 1", "minReplicas: 0")
        .replace(
            "maxReplicas: 5",
            "maxReplicas: 4\n    targetBacklogPerReplica: 10\n    pollInterval: 1s\n    scaleDownStabilization: 5s",
        )
        .replacen(
            "  name: scale\n",
            "  name: scale\n  annotations:\n    mailpipe.dev/paused-replicas: \"0\"\n",
            1,
        );
    assert!(cluster.apply(&pipeline).await.status.success());
    wait_condition(&cluster, "scale", "TopologyReady", "True", "Declared").await;
    let replicas = || worker_replicas(&cluster, "scale");
    eventually(Cluster::SETTLE, "no work, no workers", || async {
        (replicas().await == Some(0)).then_some(())
    })
    .await;

    amqp::publish_numbered(SHARED_URL, &names.exchange, "scale", 0..35).await;
    eventually(
        Cluster::SETTLE,
        "the paused scaler sees the backlog",
        || async { (status_field(&cluster, "scale", "backlog").await == "35").then_some(()) },
    )
    .await;
    assert_eq!(replicas().await, Some(0), "the pause held");
    cluster
        .kubectl_ok(&["annotate", "emp", "scale", "mailpipe.dev/paused-replicas-"])
        .await;
    let unpaused = std::time::Instant::now();
    let seen = std::sync::Mutex::new(Vec::new());
    let reached = eventually(Duration::from_secs(10), "four workers", || async {
        let now = replicas().await;
        let mut seen = seen.lock().unwrap();
        if seen.last() != Some(&now) {
            seen.push(now);
        }
        (now == Some(4)).then(std::time::Instant::now)
    })
    .await;
    let seen = seen.into_inner().unwrap();
    let took = reached - unpaused;
    println!("35 jobs, pause ended -> 4 workers in {took:?}, counts seen {seen:?}");
    assert!(
        took < Duration::from_secs(3),
        "within two 1 s polls: {took:?}"
    );
    assert_eq!(seen, vec![Some(0), Some(4)], "in one step");
    let status = |field: &'static str| status_field(&cluster, "scale", field);
    eventually(Cluster::SETTLE, "the scaler's status", || async {
        (status("backlog").await == "35" && status("desiredReplicas").await == "4").then_some(())
    })
    .await;
    assert_eq!(
        status("source").await,
        format!("rabbitmq/{}", names.queue),
        "the reconcile's field stays"
    );
    // The scaler's condition beside the reconcile's (the scale-up made the reconcile write
    // its status again, and the Scaling condition survived it).
    wait_condition(&cluster, "scale", "Scaling", "True", "Target").await;
    wait_condition(&cluster, "scale", "TopologyReady", "True", "Declared").await;
    let message = condition(&cluster, "scale", "Scaling", "message").await;
    assert_eq!(message, "4 replicas for 35 jobs");
    let events = cluster.kubectl_ok(&["get", "events"]).await;
    assert!(events.contains("Scaled"), "{events}");
    let metrics = operator.metrics().await;
    for series in [
        "mailpipe_operator_scale_events_total{direction=\"up\",namespace=\"default\",pipeline=\"scale\",reason=\"Target\"} 1",
        "mailpipe_operator_replicas{kind=\"desired\",namespace=\"default\",pipeline=\"scale\"} 4",
        "mailpipe_operator_backlog{namespace=\"default\",pipeline=\"scale\"} 35",
        "mailpipe_operator_scale_decision_duration_seconds_count",
    ] {
        assert!(metrics.contains(series), "{series} in\n{metrics}");
    }

    // Empty again: back to zero, but only after the 5 s scale-down window.
    assert_eq!(amqp::take_all(SHARED_URL, &names.queue).await.len(), 35);
    let emptied = std::time::Instant::now();
    eventually(Duration::from_secs(30), "back to zero", || async {
        (replicas().await == Some(0)).then_some(())
    })
    .await;
    let down = emptied.elapsed();
    println!("empty -> 0 workers in {down:?}");
    assert!(
        down >= Duration::from_secs(4),
        "the scale-down window held: {down:?}"
    );
    // Every request it made is allowed by the shipped RBAC.
    assert!(cluster.check_operator_rbac() > 0);
    delete_topology(&names).await;
}
