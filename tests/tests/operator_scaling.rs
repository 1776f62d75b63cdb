//! The scaler's backlog reader against real brokers: one connection per broker however
//! often and for however many pipelines it reads, ready work counted apart from jobs
//! waiting out a retry delay and from dead letters, and a connection lost with its broker
//! re-established with backoff.

use std::time::Duration;

use mailpipe_contract::naming;
use mailpipe_contract::topology::RabbitSettings;
use mailpipe_contract::RetryPolicy;
use mailpipe_operator::scaling::observe::{Brokers, QueueBacklog};
use mailpipe_operator::topology::rabbitmq::RabbitTopology;
use mailpipe_operator::topology::{BrokerTopology, TopologyError};
use mailpipe_tests::amqp::{self, Names, SHARED_URL};
use mailpipe_tests::eventually;
use mailpipe_tests::rabbit_node::RabbitNode;

fn settings(names: &Names) -> RabbitSettings {
    RabbitSettings {
        exchange: names.exchange.clone(),
        queue: names.queue.clone(),
        ..RabbitSettings::default()
    }
}

async fn declared(url: &str, names: &Names) -> RabbitSettings {
    let settings = settings(names);
    let plan = settings.plan(&RetryPolicy::default());
    RabbitTopology::new(url.to_string(), None, settings.clone(), plan)
        .ensure()
        .await
        .expect("declared");
    settings
}

#[tokio::test]
async fn the_reader_counts_work_apart_from_delayed_and_dead_jobs_over_one_connection() {
    let name = mailpipe_tests::unique("scaler-reader");
    let brokers = Brokers::named(&name);
    let first = Names::new("scaleread");
    let second = Names::new("scaleread2");
    let (a, b) = (
        declared(SHARED_URL, &first).await,
        declared(SHARED_URL, &second).await,
    );
    let plan = a.plan(&RetryPolicy::default());
    amqp::publish_numbered(SHARED_URL, &first.exchange, "read", 0..7).await;
    // Three retry copies waiting out the first delay (5 s by default).
    let delay = plan
        .queues
        .iter()
        .find(|q| q.name != a.queue && q.name != naming::dead_letter_queue(&a.queue))
        .map(|q| q.name.clone())
        .expect("a delay queue");
    amqp::publish_routed(
        SHARED_URL,
        "",
        &delay,
        (0..3).map(|_| (b"{}".to_vec(), Default::default())),
    )
    .await;
    let b_plan = b.plan(&RetryPolicy::default());
    for _ in 0..30 {
        let read = brokers
            .read_queues(SHARED_URL, None, &a, &plan)
            .await
            .expect("a reading");
        assert_eq!(
            read,
            QueueBacklog {
                ready: 7,
                consumers: 0,
                delayed: 3,
                dead_letter: Some(0),
            },
            "delay queue {delay}"
        );
        let other = brokers
            .read_queues(SHARED_URL, None, &b, &b_plan)
            .await
            .expect("a reading");
        assert_eq!(other.ready, 0);
    }
    assert_eq!(
        brokers.opened(),
        1,
        "60 readings of two pipelines, one connection"
    );
    assert_eq!(
        amqp::connections_named(&name),
        1,
        "the broker sees one scaler connection"
    );
    // A missing work queue is reported as missing, not as an unreachable broker.
    let gone = Names::new("scalegone");
    let missing = settings(&gone);
    let err = brokers
        .read_queues(
            SHARED_URL,
            None,
            &missing,
            &missing.plan(&RetryPolicy::default()),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, TopologyError::Missing(_)), "{err:?}");
    assert_eq!(
        brokers.opened(),
        1,
        "a missing queue does not cost the connection"
    );
    // The 404 closed the reader's channel: the next reading opens another and goes on.
    // The work queue alone: one passive declare, the other queues left unknown.
    let work = brokers
        .read_work_queue(SHARED_URL, None, &a, &plan)
        .await
        .expect("a reading after the 404");
    assert_eq!(
        work,
        QueueBacklog {
            ready: 7,
            consumers: 0,
            delayed: 0,
            dead_letter: None,
        }
    );
    assert_eq!(brokers.opened(), 1);
    for n in [&first, &second] {
        amqp::delete_plan(SHARED_URL, &n.plan(&RetryPolicy::default())).await;
    }
}

/// The scaler reads every due pipeline at once: the readings share the one connection,
/// each on a channel of its own, and keep a bounded set of channels open between looks.
#[tokio::test]
async fn readings_at_once_share_the_connection_on_a_bounded_set_of_channels() {
    let name = mailpipe_tests::unique("scaler-many");
    let brokers = Brokers::named(&name);
    let names: Vec<Names> = (0..4).map(|_| Names::new("scalemany")).collect();
    let mut pipelines = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let settings = declared(SHARED_URL, n).await;
        amqp::publish_numbered(SHARED_URL, &n.exchange, "many", 0..i + 1).await;
        let plan = settings.plan(&RetryPolicy::default());
        pipelines.push((settings, plan));
    }
    for _ in 0..3 {
        let reads = futures::future::join_all((0..100).map(|k| {
            let (settings, plan) = &pipelines[k % 4];
            brokers.read_work_queue(SHARED_URL, None, settings, plan)
        }))
        .await;
        for (k, read) in reads.into_iter().enumerate() {
            assert_eq!(read.expect("a reading").ready, (k % 4 + 1) as u64);
        }
    }
    assert_eq!(brokers.opened(), 1, "one connection for every reading");
    // Channels beyond those kept idle are closed as their readings end.
    let channels = || {
        let listing = amqp::rabbitmqctl(
            None,
            &[
                "-q",
                "list_connections",
                "channels",
                "client_properties",
                "--no-table-headers",
            ],
        )
        .expect("rabbitmqctl");
        listing
            .lines()
            .filter(|l| l.contains(&name))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u32>().ok())
            .collect::<Vec<_>>()
    };
    let kept = eventually(
        Duration::from_secs(10),
        "at most 32 channels kept",
        || async {
            let open = channels();
            (open.len() == 1 && (1..=32).contains(&open[0])).then_some(open[0])
        },
    )
    .await;
    println!("{kept} channels kept between looks");
    for (_, plan) in &pipelines {
        amqp::delete_plan(SHARED_URL, plan).await;
    }
}

#[tokio::test]
async fn private_broker_restart_costs_the_reader_one_reconnect_with_backoff() {
    let node = tokio::task::spawn_blocking(|| RabbitNode::start(None))
        .await
        .expect("node");
    let url = node.url();
    let names = Names::new("scaleback");
    let settings = declared(&url, &names).await;
    let plan = settings.plan(&RetryPolicy::default());
    let brokers = Brokers::default();
    brokers
        .read_queues(&url, None, &settings, &plan)
        .await
        .expect("a reading");
    let node = tokio::task::spawn_blocking(move || {
        node.stop_app();
        node
    })
    .await
    .expect("stopped");
    let down = brokers.read_queues(&url, None, &settings, &plan).await;
    assert!(
        matches!(down, Err(TopologyError::Unreachable(_))),
        "{down:?}"
    );
    // Right after a failed connect, the reader waits before trying again.
    let _ = brokers.read_queues(&url, None, &settings, &plan).await;
    let waiting = brokers.read_queues(&url, None, &settings, &plan).await;
    assert!(
        matches!(&waiting, Err(TopologyError::Unreachable(why)) if why.contains("reconnecting in")),
        "{waiting:?}"
    );
    let node = tokio::task::spawn_blocking(move || {
        node.start_app();
        node
    })
    .await
    .expect("started");
    eventually(
        Duration::from_secs(60),
        "a reading after the restart",
        || async { brokers.read_queues(&url, None, &settings, &plan).await.ok() },
    )
    .await;
    assert_eq!(brokers.opened(), 2, "one connection before, one after");
    drop(node);
}

/// The actuator scales the worker Deployment through `/scale` without taking ownership of
/// `spec.replicas`: the operator's next apply of the Deployment (which leaves replicas out)
/// keeps the count, as the real server does (recordings 179-182).
#[tokio::test]
async fn the_actuator_scales_through_scale_and_the_next_apply_keeps_the_count() {
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::api::{Api, Patch, PatchParams};
    use mailpipe_operator::scaling::actuator::{Actuator, DeploymentScale, Workload};

    let server = mailpipe_kube_api::KubeApiServer::start()
        .await
        .expect("the test server");
    let client = server.client();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let deployment = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "mail-worker"},
        "spec": {
            "selector": {"matchLabels": {"app": "w"}},
            "template": {"metadata": {"labels": {"app": "w"}},
                "spec": {"containers": [{"name": "worker", "image": "example.com/w:1"}]}}
        }
    });
    let apply = || async {
        deployments
            .patch(
                "mail-worker",
                &PatchParams::apply("mailpipe-operator").force(),
                &Patch::Apply(&deployment),
            )
            .await
            .expect("applied")
    };
    apply().await;
    let actuator = DeploymentScale::new(client.clone());
    let workload = Workload {
        namespace: "default".into(),
        name: "mail-worker".into(),
    };
    assert_eq!(
        actuator
            .replicas(&workload)
            .await
            .unwrap()
            .map(|r| r.desired),
        Some(1),
        "the API server's default"
    );
    actuator.scale(&workload, 4).await.expect("scaled");
    let after = apply().await;
    assert_eq!(
        after.spec.unwrap().replicas,
        Some(4),
        "the apply kept the count"
    );
    let owners: Vec<String> = after
        .metadata
        .managed_fields
        .unwrap_or_default()
        .iter()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.to_string().contains("f:replicas"))
        })
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(owners.is_empty(), "nobody owns spec.replicas: {owners:?}");
    let gone = Workload {
        namespace: "default".into(),
        name: "no-such-worker".into(),
    };
    assert_eq!(actuator.replicas(&gone).await.unwrap(), None);
    actuator
        .scale(&gone, 2)
        .await
        .expect("a missing workload is left alone");
}

/// The scaler's actuator reads from the controllers' Deployment cache, not the API server:
/// its own change stands until the watch brings it back, and a change made by someone else
/// afterwards is seen as soon as the watch brings that.
#[tokio::test]
async fn the_cached_actuator_reads_the_watch_and_trusts_its_own_change_until_it_echoes() {
    use futures::StreamExt;
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::api::{Api, Patch, PatchParams, PostParams};
    use kube::runtime::{reflector, watcher, WatchStreamExt};
    use mailpipe_operator::controller::Caches;
    use mailpipe_operator::scaling::actuator::{Actuator, DeploymentScale, Workload};

    let server = mailpipe_kube_api::KubeApiServer::start()
        .await
        .expect("the test server");
    let client = server.client();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "mail-worker"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "w"}},
            "template": {"metadata": {"labels": {"app": "w"}},
                "spec": {"containers": [{"name": "worker", "image": "example.com/w:1"}]}}
        }
    }))
    .unwrap();
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .expect("created");
    let (store, writer) = reflector::store();
    let caches = std::sync::Arc::new(Caches::default());
    caches.register(store.clone());
    let watch = tokio::spawn(
        watcher(deployments.clone(), watcher::Config::default())
            .reflect(writer)
            .for_each(|_| futures::future::ready(())),
    );
    let actuator = DeploymentScale::cached(client.clone(), caches);
    let workload = Workload {
        namespace: "default".into(),
        name: "mail-worker".into(),
    };
    // Requests for the one Deployment (a GET of it or of its /scale), not the watch's.
    let requests = || {
        server
            .store()
            .lock()
            .expect("store lock")
            .requests()
            .iter()
            .filter(|line| line.contains("deployments/mail-worker"))
            .count()
    };
    let desired = || async {
        actuator
            .replicas(&workload)
            .await
            .unwrap()
            .map(|r| r.desired)
    };
    eventually(Duration::from_secs(5), "the cache filled", || async {
        (desired().await == Some(1)).then_some(())
    })
    .await;
    let before = requests();
    for _ in 0..20 {
        assert_eq!(desired().await, Some(1));
    }
    assert_eq!(requests(), before, "reads do not reach the API server");

    actuator.scale(&workload, 4).await.expect("scaled");
    assert_eq!(desired().await, Some(4), "its own change stands at once");
    eventually(
        Duration::from_secs(5),
        "the watch brings the change",
        || async {
            let cached = store
                .get(&reflector::ObjectRef::new("mail-worker").within("default"))
                .and_then(|d| d.spec.as_ref()?.replicas);
            (cached == Some(4)).then_some(())
        },
    )
    .await;
    // Someone else scales it (kubectl scale): seen as soon as the watch brings it.
    deployments
        .patch_scale(
            "mail-worker",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 2}})),
        )
        .await
        .expect("scaled by someone else");
    eventually(Duration::from_secs(5), "the outside change", || async {
        (desired().await == Some(2)).then_some(())
    })
    .await;
    let gone = Workload {
        namespace: "default".into(),
        name: "no-such-worker".into(),
    };
    assert_eq!(actuator.replicas(&gone).await.unwrap(), None);
    watch.abort();
}
