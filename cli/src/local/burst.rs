//! burst: test jobs published into a pipeline the way an application publishes them (to
//! its exchange, with its routing key, persistent, each confirmed by the broker; or to its
//! Kafka topic, each acknowledged by all in-sync replicas), so a
//! local run shows the workers scale up and back down. Job `n` of the run `<id>` has the id
//! `local-<id>-<n>`, the subject `Job <n> of local-<id>` and a recipient at `example.com`.

use std::sync::Arc;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::BasicProperties;
use mailpipe_operator::topology::rabbitmq::Connections;
use mailpipe_operator::validate::{ValidatedPipeline, ValidatedSource};

use super::board::Board;
use super::scale::Reach;

/// Jobs published before their confirms are awaited.
const BATCH: usize = 250;

/// The `n`th job of the burst `run`.
pub fn job(run: &str, n: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": format!("local-{run}-{n}"),
        "to": [format!("user{n}@example.com")],
        "subject": format!("Job {n} of local-{run}"),
        "text": "Sent by `mailpipe local`: a test job of a burst.",
    }))
    .expect("a job serialises")
}

/// Publishes jobs `first..first + count` of `run` into `valid`'s exchange; row `index` of
/// `board` counts them as they are confirmed. `stop` ends it between two batches, each
/// confirmed whole, so the count stays what the broker holds.
#[allow(clippy::too_many_arguments)]
pub async fn publish(
    connections: Arc<Connections>,
    reach: &Reach,
    valid: &ValidatedPipeline,
    board: &Board,
    index: usize,
    run: &str,
    first: u64,
    count: u64,
    started: tokio::time::Instant,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    board.update(index, |row| row.publishing = true);
    let result = match (&valid.source, reach) {
        (ValidatedSource::Rabbit { settings, .. }, Reach::Rabbit { url, ca }) => {
            let target = Target {
                exchange: &settings.exchange,
                routing_key: &settings.routing_key,
            };
            to_rabbit(
                &connections,
                url,
                ca.as_deref(),
                target,
                board,
                index,
                run,
                first,
                count,
                &stop,
            )
            .await
        }
        (ValidatedSource::Kafka(kafka), Reach::Kafka(connection)) => {
            to_kafka(
                connection,
                &kafka.settings.topic,
                board,
                index,
                run,
                first,
                count,
                &stop,
            )
            .await
        }
        _ => unreachable!("a pipeline's reach is made from its source"),
    };
    board.update(index, |row| {
        row.publishing = false;
        row.published_at = Some(started.elapsed());
    });
    result
}

/// Where a RabbitMQ burst goes.
struct Target<'a> {
    exchange: &'a str,
    routing_key: &'a str,
}

/// Publishes to a RabbitMQ exchange, each batch confirmed whole.
#[allow(clippy::too_many_arguments)]
async fn to_rabbit(
    connections: &Connections,
    url: &str,
    ca: Option<&str>,
    target: Target<'_>,
    board: &Board,
    index: usize,
    run: &str,
    first: u64,
    count: u64,
    stop: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    {
        let connection = connections.get(url, ca).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let mut n = first;
        while n < first + count && !stop.is_cancelled() {
            let end = (n + BATCH as u64).min(first + count);
            let mut confirms = Vec::with_capacity(BATCH);
            for i in n..end {
                confirms.push(
                    channel
                        .basic_publish(
                            target.exchange.into(),
                            target.routing_key.into(),
                            BasicPublishOptions::default(),
                            &job(run, i),
                            properties.clone(),
                        )
                        .await?,
                );
            }
            for confirm in confirms {
                let confirmation = confirm.await?;
                if confirmation.is_nack() {
                    anyhow::bail!("the broker refused a job of the burst");
                }
            }
            let done = end - n;
            board.update(index, |row| row.published += done);
            n = end;
        }
        let _ = channel.close(200, "burst published".into()).await;
        anyhow::Ok(())
    }
}

/// Produces to a Kafka topic (keyed by job id, so partitions share the work), each batch
/// acknowledged whole.
#[allow(clippy::too_many_arguments)]
async fn to_kafka(
    connection: &mailpipe_contract::kafka::Connection,
    topic: &str,
    board: &Board,
    index: usize,
    run: &str,
    first: u64,
    count: u64,
    stop: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let mut config = connection.client_config();
    config.set("acks", "all").set("linger.ms", "5");
    let producer: rdkafka::producer::FutureProducer = config.create()?;
    let mut n = first;
    while n < first + count && !stop.is_cancelled() {
        let end = (n + BATCH as u64).min(first + count);
        let sends = (n..end).map(|i| {
            let producer = producer.clone();
            let (key, payload) = (format!("local-{run}-{i}"), job(run, i));
            async move {
                producer
                    .send(
                        rdkafka::producer::FutureRecord::to(topic)
                            .key(&key)
                            .payload(&payload),
                        std::time::Duration::from_secs(5),
                    )
                    .await
                    .map(drop)
                    .map_err(|(error, _)| {
                        anyhow::anyhow!("the brokers refused a job of the burst: {error}")
                    })
            }
        });
        for result in futures::future::join_all(sends).await {
            result?;
        }
        let done = end - n;
        board.update(index, |row| row.published += done);
        n = end;
    }
    Ok(())
}
