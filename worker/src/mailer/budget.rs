//! The pipeline's SMTP connection budget, shared among its replicas through the broker.
//!
//! Providers limit connections per account, so `spec.smtp.poolSize` bounds the connections
//! of all replicas together, whatever their number. The operator keeps a durable queue
//! holding one token message per connection of the budget (`<queue>.smtp-budget`); each
//! worker consumes it without acking and may hold one SMTP connection per token it holds
//! (`pool.rs` turns tokens into slots). The broker is the arbiter: a token is held by one
//! consumer at a time, and those of a worker that dies return to the queue with its
//! connection, for the others.
//!
//! Sharing: every look (each second) a worker counts the queue's consumers and keeps its
//! share ([`Share`]): the budget divided evenly, the prefetch set to it so the broker hands
//! over no more, no new send beyond it, and tokens beyond it given back once the sends under
//! way fit in it. One replica alone holds the whole budget; when replicas join, those above
//! their share give back within a look or two, even under full load; when they leave, the
//! rest take the freed tokens.
//!
//! Tokens are returned by closing the channel when the worker stops (after its last send),
//! and all slots are withdrawn the moment the broker connection or the consumer is lost.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::FieldTable;
use lapin::{Acker, Channel, Connection};
use mailpipe_contract::amqp;
use tokio_util::sync::CancellationToken;

use super::smtp::SmtpPool;
use crate::backoff::Backoff;
use crate::config::AmqpConfig;
use crate::source::rabbitmq::open;

/// How often a worker counts the consumers and adjusts its share.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// The budget this worker shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// The token queue.
    pub queue: String,
    /// Tokens in all (`spec.smtp.poolSize`).
    pub total: u32,
    /// The most this worker can use (one connection per concurrent job).
    pub cap: u32,
}

/// How many tokens one worker keeps, from what it sees at each look.
///
/// Each of `c` consumers keeps `total / c` (at least 1). When that does not divide evenly,
/// the remainder would sit in the queue unused; once a worker has its share and has seen
/// tokens lying in the queue at two looks in a row with the same consumers, it takes one
/// more, so the remainder goes to some of them. Any change in the consumer count starts
/// over from the even share, so a worker that joins always gets its part.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Share {
    consumers: u32,
    spare_looks: u32,
    extra: bool,
}

impl Share {
    /// The tokens to keep, after a look that saw `consumers` (this worker included),
    /// `ready` tokens nobody holds, and `held` tokens held by this worker.
    pub fn limit(&mut self, budget: &Budget, consumers: u32, ready: u32, held: u32) -> u32 {
        let consumers = consumers.max(1);
        if consumers != self.consumers {
            *self = Share {
                consumers,
                ..Share::default()
            };
        }
        let even = (budget.total / consumers).max(1);
        let uneven = !budget.total.is_multiple_of(consumers);
        if uneven && !self.extra && ready > 0 && held >= even {
            self.spare_looks += 1;
            self.extra = self.spare_looks >= 2;
        }
        (even + u32::from(self.extra && uneven))
            .min(budget.cap)
            .max(1)
    }
}

/// One subscription to the token queue.
struct Holding {
    connection: Connection,
    channel: Channel,
    consumer: lapin::Consumer,
    /// The tokens to keep (the prefetch asked for).
    limit: u16,
    tokens: Vec<Acker>,
    share: Share,
    /// Connections closed at this look: their tokens wait for the next, so the server has
    /// seen them go before another holder connects.
    just_closed: usize,
}

impl Holding {
    /// Slots for the tokens held, up to the limit.
    fn slots(&self) -> usize {
        self.tokens.len().min(usize::from(self.limit))
    }
}

/// Takes and gives back the budget's tokens for `pool` until `stop` is cancelled, then
/// gives every token back. Call `stop` only once no send is under way.
pub async fn run(
    amqp_config: AmqpConfig,
    tls: OwnedTLSConfig,
    budget: Budget,
    pool: Arc<SmtpPool>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut reported = false;
    tracing::info!(
        queue = %budget.queue,
        total = budget.total,
        "sharing the pipeline's SMTP connections with its other replicas"
    );
    loop {
        let subscribed = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            subscribed = subscribe(&amqp_config, &tls, &budget) => subscribed,
        };
        let mut holding = match subscribed {
            Ok(holding) => holding,
            Err(error) => {
                if !reported {
                    tracing::warn!(%error, queue = %budget.queue, "cannot take SMTP connection tokens yet; sending waits for them");
                    reported = true;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => continue,
                }
            }
        };
        backoff.reset();
        if reported {
            tracing::info!(queue = %budget.queue, "taking SMTP connection tokens");
            reported = false;
        }
        let ended = hold(&mut holding, &budget, &pool, &stop).await;
        // Lost or stopping: the tokens go back to the queue with the channel, so none may
        // be used any more.
        drop(pool.set_slots(0));
        let _ = holding.channel.close(200, "tokens returned".into()).await;
        let _ = holding
            .connection
            .close(200, "tokens returned".into())
            .await;
        match ended {
            Ended::Stopped => return,
            Ended::Lost(why) => {
                tracing::warn!(queue = %budget.queue, %why, "lost the SMTP connection tokens; taking them again");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}

enum Ended {
    Stopped,
    Lost(String),
}

async fn subscribe(
    config: &AmqpConfig,
    tls: &OwnedTLSConfig,
    budget: &Budget,
) -> Result<Holding, lapin::Error> {
    let connection = open(config, tls, "mailpipe-worker-smtp-budget").await?;
    let subscribed = async {
        let channel = connection.create_channel().await?;
        let (ready, others) = amqp::depth(&channel, &budget.queue).await?;
        let mut share = Share::default();
        let prefetch = share.limit(budget, others + 1, ready, 0);
        let prefetch = u16::try_from(prefetch).unwrap_or(u16::MAX);
        // Per channel (`global`), so the limit can be changed under a running consumer.
        channel
            .basic_qos(prefetch, BasicQosOptions { global: true })
            .await?;
        let consumer = channel
            .basic_consume(
                budget.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok::<_, lapin::Error>((channel, consumer, prefetch, share))
    }
    .await;
    match subscribed {
        Ok((channel, consumer, limit, share)) => Ok(Holding {
            connection,
            channel,
            consumer,
            limit,
            tokens: Vec::new(),
            share,
            just_closed: 0,
        }),
        Err(error) => {
            let _ = connection.close(200, "no tokens".into()).await;
            Err(error)
        }
    }
}

/// Holds tokens, adjusting to the share at each look, until stopped or lost.
async fn hold(
    holding: &mut Holding,
    budget: &Budget,
    pool: &SmtpPool,
    stop: &CancellationToken,
) -> Ended {
    let mut look = tokio::time::interval(LOOK_EVERY);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Ended::Stopped,
            token = holding.consumer.next() => match token {
                Some(Ok(token)) => {
                    holding.tokens.push(token.acker);
                    drop(pool.set_slots(holding.slots()));
                }
                Some(Err(error)) => return Ended::Lost(error.to_string()),
                None => return Ended::Lost("the broker cancelled the consumer (the token queue was deleted or replaced)".into()),
            },
            _ = look.tick() => {
                if let Err(error) = adjust(holding, budget, pool).await {
                    return Ended::Lost(error.to_string());
                }
            }
        }
    }
}

/// One look: the share for the consumers now, the prefetch and the slots set to it, and
/// tokens beyond it given back once the sends under way fit (the prefetch first, so they go
/// to another consumer, not back to this one).
async fn adjust(
    holding: &mut Holding,
    budget: &Budget,
    pool: &SmtpPool,
) -> Result<(), lapin::Error> {
    let (ready, consumers) = amqp::depth(&holding.channel, &budget.queue).await?;
    let held = u32::try_from(holding.tokens.len()).unwrap_or(u32::MAX);
    let limit = holding.share.limit(budget, consumers, ready, held);
    let limit = u16::try_from(limit).unwrap_or(u16::MAX);
    if limit != holding.limit {
        holding
            .channel
            .basic_qos(limit, BasicQosOptions { global: true })
            .await?;
        holding.limit = limit;
    }
    // No new send beyond the limit from now on.
    let closed = pool.set_slots(holding.slots());
    // Connections beyond the share end (QUIT) before their tokens go: the server must not
    // see the next holder's connection while it still counts this one.
    holding.just_closed = closed.len();
    for mut connection in closed {
        connection.quit().await;
    }
    // Never fewer tokens than connections open, or than sends under way (each may open
    // one); both only fall from here on. The tokens of connections closed now go at the
    // next look, a second after the server closed its end (or did not within the time QUIT is given).
    let keep = usize::from(limit)
        .max(pool.busy())
        .max(pool.open() + holding.just_closed);
    while holding.tokens.len() > keep {
        let token = holding.tokens.pop().expect("more tokens than kept");
        token.reject(BasicRejectOptions { requeue: true }).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(total: u32, cap: u32) -> Budget {
        Budget {
            queue: "q.smtp-budget".into(),
            total,
            cap,
        }
    }

    #[test]
    fn one_replica_alone_keeps_the_whole_budget() {
        let mut share = Share::default();
        assert_eq!(share.limit(&budget(16, 16), 1, 16, 0), 16);
    }

    #[test]
    fn the_budget_is_split_evenly_and_never_beyond_what_a_replica_can_use() {
        let mut share = Share::default();
        assert_eq!(share.limit(&budget(16, 16), 2, 0, 8), 8);
        assert_eq!(share.limit(&budget(16, 16), 4, 0, 4), 4);
        let mut share = Share::default();
        assert_eq!(
            share.limit(&budget(40, 16), 1, 40, 0),
            16,
            "capped at the concurrency"
        );
    }

    #[test]
    fn more_replicas_than_tokens_keep_one_each_at_most() {
        let mut share = Share::default();
        assert_eq!(share.limit(&budget(3, 16), 5, 0, 1), 1);
    }

    #[test]
    fn the_remainder_goes_out_only_after_it_lay_unused_for_two_looks() {
        let b = budget(16, 16);
        let mut share = Share::default();
        // 3 replicas: 5 each, 1 left in the queue.
        assert_eq!(share.limit(&b, 3, 1, 5), 5);
        assert_eq!(
            share.limit(&b, 3, 1, 5),
            6,
            "spare at two looks: take one more"
        );
        assert_eq!(share.limit(&b, 3, 0, 6), 6, "kept while nothing changes");
        // A fourth replica joins: back to the even share at once.
        assert_eq!(share.limit(&b, 4, 0, 6), 4);
    }

    #[test]
    fn a_replica_short_of_its_share_does_not_reach_for_the_remainder() {
        let b = budget(16, 16);
        let mut share = Share::default();
        for _ in 0..5 {
            assert_eq!(share.limit(&b, 3, 1, 2), 5, "still taking its own part");
        }
    }

    #[test]
    fn an_even_split_never_takes_extra() {
        let b = budget(16, 16);
        let mut share = Share::default();
        for _ in 0..5 {
            assert_eq!(share.limit(&b, 2, 3, 8), 8);
        }
    }
}
