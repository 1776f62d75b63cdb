//! The operator's RabbitMQ topology against the real broker: ensured idempotently, measured,
//! refused clearly when it conflicts, and deleted only when every queue of it is empty.

use mailpipe_contract::topology::{QueueType, RabbitSettings};
use mailpipe_contract::RetryPolicy;
use mailpipe_operator::topology::rabbitmq::RabbitTopology;
use mailpipe_operator::topology::{BrokerTopology, TopologyError};
use mailpipe_tests::amqp::{self, Names, SHARED_URL};

fn topology(names: &Names, queue_type: QueueType) -> (RabbitTopology, RabbitSettings) {
    topology_at(SHARED_URL, names, queue_type)
}

/// The topology of `names` (default retry policy) on the broker at `url`.
fn topology_at(
    url: &str,
    names: &Names,
    queue_type: QueueType,
) -> (RabbitTopology, RabbitSettings) {
    let settings = RabbitSettings {
        exchange: names.exchange.clone(),
        queue: names.queue.clone(),
        queue_type,
        ..RabbitSettings::default()
    };
    let plan = settings.plan(&RetryPolicy::default());
    (
        RabbitTopology::new(url.to_string(), None, settings.clone(), plan),
        settings,
    )
}

/// Every queue of the topology `settings` plans (with the default retry policy) is gone.
async fn assert_all_queues_gone(settings: &RabbitSettings) {
    for queue in settings.plan(&RetryPolicy::default()).queues {
        assert!(
            !amqp::queue_exists(SHARED_URL, &queue.name).await,
            "{}",
            queue.name
        );
    }
}

#[tokio::test]
async fn topology_is_ensured_measured_and_deleted_only_when_empty() {
    let names = Names::new("optopo");
    let (topology, settings) = topology(&names, QueueType::Classic);
    topology.ensure().await.expect("declared");
    topology
        .ensure()
        .await
        .expect("declaring again changes nothing");
    for queue in settings.plan(&RetryPolicy::default()).queues {
        assert_eq!(
            amqp::ready(SHARED_URL, &queue.name).await,
            0,
            "{} exists",
            queue.name
        );
    }

    amqp::publish_numbered(SHARED_URL, &names.exchange, "optopo", 0..7).await;
    // The census names the queue that still holds jobs; nothing is deleted.
    let census = topology.census().await.unwrap();
    let dead_letter = mailpipe_contract::naming::dead_letter_queue(&names.queue);
    assert!(
        census.queues.contains(&(names.queue.clone(), 7))
            && census.queues.contains(&(dead_letter, 0)),
        "{census:?}"
    );
    assert_eq!(census.first_non_empty(), Some((names.queue.as_str(), 7)));
    assert_eq!(census.dead_letters(), None);
    assert_eq!(census.consumers, 0);

    // Intake stopped: a job published now reaches no queue of the pipeline.
    topology.stop_intake().await.unwrap();
    topology
        .stop_intake()
        .await
        .expect("stopping again changes nothing");
    amqp::publish_numbered(SHARED_URL, &names.exchange, "optopo", 7..8).await;
    assert_eq!(amqp::ready(SHARED_URL, &names.queue).await, 7);

    // Drained (as workers would), it goes entirely.
    assert_eq!(amqp::take_all(SHARED_URL, &names.queue).await.len(), 7);
    assert_eq!(topology.census().await.unwrap().first_non_empty(), None);
    topology.remove().await.unwrap();
    assert_eq!(
        topology.census().await.unwrap().queues,
        vec![],
        "every queue gone"
    );
    assert_all_queues_gone(&settings).await;
}

/// Quorum queues refuse `if-empty` deletes (540 NOT_IMPLEMENTED): the old deletion waited
/// forever on them.
#[tokio::test]
async fn a_quorum_topology_is_removed() {
    let names = Names::new("opquorumrm");
    let (topology, settings) = topology(&names, QueueType::Quorum);
    topology.ensure().await.unwrap();
    topology.stop_intake().await.unwrap();
    assert_eq!(topology.census().await.unwrap().first_non_empty(), None);
    topology.remove().await.expect("removed");
    assert_all_queues_gone(&settings).await;
}

#[tokio::test]
async fn a_queue_declared_otherwise_is_a_conflict_not_a_retry() {
    let names = Names::new("opconflict");
    let (classic, _) = topology(&names, QueueType::Classic);
    classic.ensure().await.unwrap();
    let (quorum, settings) = topology(&names, QueueType::Quorum);
    let error = quorum.ensure().await.unwrap_err();
    assert!(matches!(error, TopologyError::Conflict(_)), "{error:?}");
    assert!(!error.is_transient());
    assert!(error.to_string().contains("inequivalent arg"), "{error}");
    assert_eq!(error.category(), "TopologyConflict");
    amqp::delete_plan(SHARED_URL, &settings.plan(&RetryPolicy::default())).await;
}

#[tokio::test]
async fn wrong_credentials_are_refused_and_a_dead_port_is_unreachable() {
    let names = Names::new("oprefused");
    let (_, settings) = topology(&names, QueueType::Classic);
    let plan = settings.plan(&RetryPolicy::default());
    let refused = RabbitTopology::new(
        "amqp://guest:wrong@127.0.0.1:5672/%2f".into(),
        None,
        settings.clone(),
        plan.clone(),
    );
    let error = refused.ensure().await.unwrap_err();
    assert!(
        matches!(
            error,
            TopologyError::Refused(_) | TopologyError::Unreachable(_)
        ),
        "{error:?}"
    );
    let port = mailpipe_tests::free_port();
    let dead = RabbitTopology::new(
        format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        None,
        settings,
        plan,
    );
    let error = dead.ensure().await.unwrap_err();
    assert!(matches!(error, TopologyError::Unreachable(_)), "{error:?}");
    assert!(error.is_transient());
}

#[tokio::test]
async fn with_a_management_secret_the_virtual_host_is_created_first() {
    let vhost = mailpipe_tests::unique("mpvhost");
    let url = format!("amqp://guest:guest@127.0.0.1:5672/{vhost}");
    let names = Names::new("opvhost");
    let settings = RabbitSettings {
        exchange: names.exchange.clone(),
        queue: names.queue.clone(),
        ..RabbitSettings::default()
    };
    let plan = settings.plan(&RetryPolicy::default());
    let without = RabbitTopology::new(url.clone(), None, settings.clone(), plan.clone());
    let error = without.ensure().await.unwrap_err();
    assert!(
        matches!(error, TopologyError::Refused(_)),
        "a missing vhost: {error:?}"
    );

    let management = "http://guest:guest@127.0.0.1:15672";
    let topology = RabbitTopology::new(url.clone(), None, settings, plan)
        .with_management(management)
        .unwrap();
    topology.ensure().await.expect("vhost, then topology");
    topology.ensure().await.expect("again: nothing changes");
    assert!(
        amqp::queue_exists(&url, &names.queue).await,
        "the queue is in the new vhost"
    );
    assert!(
        !amqp::queue_exists(SHARED_URL, &names.queue).await,
        "and not in the default one"
    );

    let wrong = RabbitTopology::new(
        url.clone(),
        None,
        RabbitSettings::default(),
        RabbitSettings::default().plan(&RetryPolicy::default()),
    )
    .with_management("http://guest:wrong@127.0.0.1:15672")
    .unwrap();
    let error = wrong.ensure().await.unwrap_err();
    assert!(matches!(error, TopologyError::Refused(_)), "{error:?}");
    assert!(
        !error.to_string().contains("wrong"),
        "no credentials in messages: {error}"
    );

    let deleted = reqwest::Client::new()
        .delete(format!("http://127.0.0.1:15672/api/vhosts/{vhost}"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success());
}

/// Three pipelines in one vhost that keep the default exchange used to bind their queues to
/// the one fanout `smtp_send_email_exc`, so every job would be sent by every pipeline. Each
/// now gets its own: a job published for one reaches only its queue.
#[tokio::test]
async fn pipelines_that_keep_the_default_exchange_do_not_get_each_others_jobs() {
    use mailpipe_operator::validate::{validate, ValidatedSource};
    let queues: Vec<String> = (0..3)
        .map(|_| mailpipe_tests::unique("defaultexc"))
        .collect();
    let mut topologies = Vec::new();
    for queue in &queues {
        let spec: mailpipe_operator::crd::EmailPipelineSpec = serde_json::from_value(serde_json::json!({
            "source": {"rabbitmq": {"connectionSecret": {"name": "amqp", "key": "url"}, "queue": queue}},
            "smtp": {"host": "smtp.example.com", "from": {"address": "noreply@example.com"}},
        }))
        .unwrap();
        let valid = validate(queue, "default", &spec).unwrap();
        let ValidatedSource::Rabbit { settings, plan, .. } = valid.source else {
            panic!("a RabbitMQ source")
        };
        let topology =
            RabbitTopology::new(SHARED_URL.to_string(), None, settings.clone(), plan.clone());
        topology.ensure().await.expect("declared");
        topologies.push((settings, plan, topology));
    }
    let first = &topologies[0].0;
    amqp::publish_numbered(SHARED_URL, &first.exchange, "defaultexc", 0..1).await;
    let counts: Vec<u32> =
        futures::future::join_all(queues.iter().map(|q| amqp::ready(SHARED_URL, q))).await;
    assert_eq!(
        counts,
        [1, 0, 0],
        "only the first pipeline's queue got the job"
    );
    for (_, plan, _) in &topologies {
        amqp::delete_plan(SHARED_URL, plan).await;
    }
}

/// A consumer of `queue` that acks nothing, as a worker holds its tokens.
async fn consume(channel: &lapin::Channel, queue: &str) -> lapin::Consumer {
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            lapin::options::BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn the_smtp_budget_queue_holds_one_token_per_connection_and_follows_the_pool_size() {
    use futures::StreamExt;
    use lapin::options::BasicQosOptions;
    use mailpipe_contract::naming::smtp_budget_queue;

    let names = Names::new("optokens");
    let (plain, settings) = topology(&names, QueueType::Classic);
    let tokens = smtp_budget_queue(&settings.queue);
    let topology = plain.with_smtp_budget(5);
    topology.ensure().await.expect("declared");
    assert_eq!(
        amqp::ready(SHARED_URL, &tokens).await,
        5,
        "one token per connection"
    );
    topology.ensure().await.expect("again");
    assert_eq!(
        amqp::ready(SHARED_URL, &tokens).await,
        5,
        "not filled twice"
    );

    // A worker holds 2 tokens: they are not missing, nothing is added.
    let holder = amqp::connect(SHARED_URL).await;
    let channel = holder.create_channel().await.unwrap();
    channel
        .basic_qos(2, BasicQosOptions { global: true })
        .await
        .unwrap();
    let mut consumer = consume(&channel, &tokens).await;
    for _ in 0..2 {
        consumer.next().await.unwrap().unwrap();
    }
    topology.ensure().await.expect("with a holder");
    assert_eq!(amqp::ready(SHARED_URL, &tokens).await, 3);

    // Tokens lost while nobody consumes are put back (a fill cut short, a purge).
    amqp::purge(SHARED_URL, &tokens).await;
    drop(consumer);
    let _ = holder.close(200, "gone".into()).await;
    assert_eq!(
        amqp::ready(SHARED_URL, &tokens).await,
        2,
        "the held two came back"
    );
    topology.ensure().await.expect("refilled");
    assert_eq!(amqp::ready(SHARED_URL, &tokens).await, 5);

    // A new pool size replaces the queue; a consumer of the old one is cancelled.
    let holder = amqp::connect(SHARED_URL).await;
    let channel = holder.create_channel().await.unwrap();
    let mut consumer = consume(&channel, &tokens).await;
    let (plain, _) = self::topology(&names, QueueType::Classic);
    let bigger = plain.with_smtp_budget(8);
    bigger.ensure().await.expect("replaced");
    let mut held = 0;
    while let Ok(Some(Ok(_))) =
        tokio::time::timeout(std::time::Duration::from_secs(5), consumer.next()).await
    {
        held += 1;
    }
    assert_eq!(held, 5, "the old tokens, then the cancel ends the stream");
    let _ = holder.close(200, "gone".into()).await;
    assert_eq!(amqp::ready(SHARED_URL, &tokens).await, 8);

    // Deleting the topology deletes the budget, tokens and all.
    bigger.stop_intake().await.unwrap();
    bigger.remove().await.expect("removed");
    assert!(!amqp::queue_exists(SHARED_URL, &tokens).await);
    assert_all_queues_gone(&settings).await;
}

/// The reconciles' connections: pipelines on one broker share one connection; each
/// operation closes the channels it opened (a refused declaration included), and a
/// connection the broker closed is replaced by the next operation.
#[tokio::test]
async fn pipelines_on_one_broker_share_one_connection_and_leave_no_channel_open() {
    use mailpipe_operator::topology::rabbitmq::Connections;
    use std::sync::Arc;
    let vhost = mailpipe_tests::unique("mpshare");
    let url = format!("amqp://guest:guest@127.0.0.1:5672/{vhost}");
    let management = "http://guest:guest@127.0.0.1:15672";
    let connections = Arc::new(Connections::default());
    let on_vhost = |names: &Names, queue_type| {
        topology_at(&url, names, queue_type)
            .0
            .with_smtp_budget(4)
            .with_management(management)
            .unwrap()
            .sharing(connections.clone())
    };
    let names: Vec<Names> = (0..3).map(|_| Names::new("opshare")).collect();
    let topologies: Vec<RabbitTopology> = names
        .iter()
        .map(|n| on_vhost(n, QueueType::Classic))
        .collect();
    futures::future::try_join_all(topologies.iter().map(|t| t.ensure()))
        .await
        .expect("three pipelines declared at once");
    for topology in &topologies {
        let census = topology.census().await.unwrap();
        assert_eq!((census.first_non_empty(), census.consumers), (None, 0));
    }
    // A refused declaration closes its channel, not the connection the others use.
    let error = on_vhost(&names[0], QueueType::Quorum)
        .ensure()
        .await
        .unwrap_err();
    assert!(matches!(error, TopologyError::Conflict(_)), "{error:?}");
    topologies[1]
        .ensure()
        .await
        .expect("the connection lives on");
    assert_eq!(
        connections.opened(),
        1,
        "one connection for every operation"
    );

    // What the broker lists in the vhost: one connection, no channel left open.
    let listed = || {
        amqp::rabbitmqctl(
            None,
            &[
                "-q",
                "list_connections",
                "vhost",
                "pid",
                "channels",
                "--no-table-headers",
            ],
        )
        .expect("rabbitmqctl")
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(vhost.as_str()))
        .map(str::to_string)
        .collect::<Vec<_>>()
    };
    let lines = listed();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let fields: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(fields.get(2), Some(&"0"), "no channel open: {lines:?}");

    // The broker closes it (a restart, an administrator): the next operation reconnects.
    amqp::rabbitmqctl(None, &["close_connection", fields[1], "test"]).expect("closed");
    mailpipe_tests::eventually(
        std::time::Duration::from_secs(10),
        "the next ensure on a new connection",
        || async { topologies[2].ensure().await.ok() },
    )
    .await;
    assert_eq!(connections.opened(), 2, "replaced once");

    for topology in &topologies {
        topology.remove().await.expect("removed");
    }
    let deleted = reqwest::Client::new()
        .delete(format!("http://127.0.0.1:15672/api/vhosts/{vhost}"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success());
}
