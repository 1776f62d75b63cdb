//! burst: test jobs published into a pipeline the way an application publishes them (to
//! its exchange, with its routing key, persistent, each confirmed by the broker), so a
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
    let ValidatedSource::Rabbit { settings, .. } = &valid.source else {
        anyhow::bail!("{}: bursts go to RabbitMQ pipelines", valid.name);
    };
    board.update(index, |row| row.publishing = true);
    let result = async {
        let connection = connections.get(&reach.url, reach.ca.as_deref()).await?;
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
                            settings.exchange.as_str().into(),
                            settings.routing_key.as_str().into(),
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
    .await;
    board.update(index, |row| {
        row.publishing = false;
        row.published_at = Some(started.elapsed());
    });
    result
}
