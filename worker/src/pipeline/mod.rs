//! The consume -> send -> settle loop.
//!
//! [`run`] takes deliveries from a [`MessageSource`] while a concurrency permit is free and
//! hands each to [`Pipeline::handle`]:
//! parse -> expiry -> render -> already sent? -> rate limit -> send -> record -> settle.
//! A job is acked only after the SMTP server accepted it, after it was found already sent,
//! or after a retry or dead-letter copy was confirmed by the broker.
//!
//! Shutdown: when `stop` is cancelled no new delivery is taken; a job that has not started
//! its send is given back (requeued); sends under way finish and are settled, within the
//! drain deadline; then the source closes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use mailpipe_contract::{EmailJob, Limits, RetryPolicy};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::config::OnRedisUnavailable;
use crate::disposition::{decide, Disposition, Failure};
use crate::health::{Component, Health};
use crate::idempotency::Dedup;
use crate::mailer::Mailer;
use crate::metrics::Metrics;
use crate::render::{self, Renderer};
use crate::source::{Delivery, MessageSource, Settlement};

/// Everything a job needs on its way.
pub struct Pipeline<M> {
    /// Delivers rendered messages.
    pub mailer: M,
    /// Builds messages from jobs.
    pub renderer: Renderer,
    /// The deduplication store, when configured.
    pub dedup: Option<Dedup>,
    /// What to do while the store is unreachable.
    pub on_store_unavailable: OnRedisUnavailable,
    /// Attempts and delays.
    pub retry: RetryPolicy,
    /// Job size limits.
    pub limits: Limits,
    /// Metrics.
    pub metrics: Metrics,
    /// Readiness.
    pub health: Arc<Health>,
    /// Send-rate limit, when configured.
    pub rate: Option<DefaultDirectRateLimiter>,
}

/// What an attempt came to.
#[derive(Debug)]
enum Outcome {
    Sent,
    Duplicate,
    Failed(Failure),
    /// Shutting down before the send began.
    NotStarted,
}

enum Seen {
    Sent,
    NotSent,
    /// The store is down and the policy says send anyway.
    Unknown,
    Stopped,
}

/// A per-second rate limiter for `per_second` messages (a burst of one second's worth).
pub fn rate_limiter(per_second: u32) -> Option<DefaultDirectRateLimiter> {
    std::num::NonZeroU32::new(per_second).map(|n| RateLimiter::direct(Quota::per_second(n)))
}

impl<M: Mailer> Pipeline<M> {
    /// Processes one delivery and settles it.
    pub async fn handle(&self, delivery: Delivery, stop: &CancellationToken) {
        let started = Instant::now();
        self.metrics.consumed.inc();
        self.metrics.in_flight.inc();
        let Delivery {
            body,
            attempt,
            settle,
        } = delivery;
        let parsed = EmailJob::parse(&body, &self.limits);
        let job_id = render::job_id(parsed.as_ref().ok(), &body);
        let span = tracing::info_span!("job", job_id = %job_id, attempt);
        async {
            let outcome = self.process(parsed, &job_id, stop).await;
            let settlement = self.settlement(outcome, attempt, job_id);
            if let Err(error) = settle.settle(settlement).await {
                tracing::warn!(%error, "settlement did not reach the broker; the job will be redelivered");
            }
        }
        .instrument(span)
        .await;
        self.metrics
            .processing_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.in_flight.dec();
    }

    async fn process(
        &self,
        parsed: Result<EmailJob, mailpipe_contract::InvalidJob>,
        job_id: &str,
        stop: &CancellationToken,
    ) -> Outcome {
        let job = match parsed {
            Ok(job) => job,
            Err(invalid) => {
                return Outcome::Failed(Failure::Invalid {
                    reason: invalid.reason(),
                    detail: invalid.to_string(),
                })
            }
        };
        if job.is_expired(Utc::now()) {
            return Outcome::Failed(Failure::Expired);
        }
        let message = match self.renderer.build(&job, job_id) {
            Ok(message) => message,
            Err(failure) => return Outcome::Failed(failure),
        };
        tracing::debug!(to = ?job.to, cc = ?job.cc, bcc_count = job.bcc.len(), subject = ?job.subject, "rendered");
        let dedup = match &self.dedup {
            None => None,
            Some(dedup) => match self.seen(dedup, job_id, stop).await {
                Seen::Sent => return Outcome::Duplicate,
                Seen::NotSent => Some(dedup),
                Seen::Unknown => None,
                Seen::Stopped => return Outcome::NotStarted,
            },
        };
        if let Some(rate) = &self.rate {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Outcome::NotStarted,
                _ = rate.until_ready() => {}
            }
        }
        if stop.is_cancelled() {
            return Outcome::NotStarted;
        }
        // From here on the send is not interrupted: shutdown waits for it.
        match self.mailer.send(&message).await {
            Ok(()) => {
                self.health.set(Component::Smtp, true);
                if let Some(dedup) = dedup {
                    self.record(dedup, job_id).await;
                }
                Outcome::Sent
            }
            Err(error) => {
                if error.is_server_trouble() && self.health.set(Component::Smtp, false) {
                    tracing::warn!(reason = error.reason, code = ?error.code, "SMTP server unavailable");
                }
                Outcome::Failed(Failure::Send(error))
            }
        }
    }

    /// Asks the store whether `job_id` was sent, waiting while it is down if the policy
    /// says pause (readiness is false meanwhile, and since every permit ends up waiting here,
    /// consuming pauses too).
    async fn seen(&self, dedup: &Dedup, job_id: &str, stop: &CancellationToken) -> Seen {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            match dedup.was_sent(job_id).await {
                Ok(sent) => {
                    if self.health.set(Component::Store, true) {
                        tracing::info!("deduplication store reachable again");
                    }
                    return if sent { Seen::Sent } else { Seen::NotSent };
                }
                Err(error) => {
                    self.metrics
                        .idempotency_errors
                        .with_label_values(&["check"])
                        .inc();
                    if self.health.set(Component::Store, false) {
                        tracing::warn!(%error, policy = ?self.on_store_unavailable, "deduplication store unreachable");
                    }
                    if self.on_store_unavailable == OnRedisUnavailable::Send {
                        return Seen::Unknown;
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return Seen::Stopped,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }

    /// Records a send, retrying briefly; if the store stays down the job is acked anyway
    /// (it was delivered) and only a redelivery of it could send it again.
    async fn record(&self, dedup: &Dedup, job_id: &str) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for _ in 0..6 {
            match dedup.record_sent(job_id).await {
                Ok(()) => return,
                Err(error) => {
                    self.metrics
                        .idempotency_errors
                        .with_label_values(&["record"])
                        .inc();
                    tracing::warn!(%error, "could not record the send yet");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        tracing::error!("send not recorded: the store stayed unreachable; a redelivery of this job would send it again");
    }

    /// Turns an outcome into a settlement, with the metrics and the log line that go with it.
    fn settlement(&self, outcome: Outcome, attempt: u32, job_id: String) -> Settlement {
        match outcome {
            Outcome::Sent => {
                self.metrics.sent.inc();
                tracing::info!("sent");
                Settlement::Ack
            }
            Outcome::Duplicate => {
                self.metrics.duplicates_skipped.inc();
                tracing::info!("already sent; skipped");
                Settlement::Ack
            }
            Outcome::NotStarted => Settlement::Requeue,
            Outcome::Failed(failure) => {
                let reason = failure.reason();
                self.metrics.failed.with_label_values(&[reason]).inc();
                if failure == Failure::Expired {
                    self.metrics.expired.inc();
                }
                let code = match &failure {
                    Failure::Send(e) => e.code,
                    _ => None,
                };
                tracing::debug!(detail = %failure.detail(), "failure detail");
                match decide(&failure, attempt, &self.retry) {
                    Disposition::Retry {
                        next_attempt,
                        after,
                    } => {
                        self.metrics.retried.with_label_values(&[reason]).inc();
                        tracing::warn!(reason, ?code, next_attempt, retry_in = ?after, "attempt failed; will retry");
                        Settlement::Retry {
                            next_attempt,
                            after,
                        }
                    }
                    Disposition::DeadLetter {
                        reason: final_reason,
                    } => {
                        self.metrics
                            .dead_lettered
                            .with_label_values(&[final_reason])
                            .inc();
                        tracing::warn!(
                            reason = final_reason,
                            cause = reason,
                            ?code,
                            "dead-lettered"
                        );
                        let detail = if final_reason == reason {
                            failure.detail()
                        } else {
                            format!("{reason}: {}", failure.detail())
                        };
                        Settlement::DeadLetter {
                            reason: final_reason,
                            detail,
                            attempts: attempt,
                            job_id,
                        }
                    }
                }
            }
        }
    }

    /// While the SMTP server or the deduplication store is marked down, probes it with
    /// capped backoff, so readiness comes back (and is right at start-up) without waiting
    /// for the next job.
    pub async fn watch_dependencies(&self, stop: CancellationToken) {
        let mut smtp_backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut store_backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        loop {
            // The next look: in a second while all is well, else after the shortest backoff.
            let mut retry_in: Option<Duration> = None;
            if self.health.is_up(Component::Smtp) {
                smtp_backoff.reset();
            } else {
                match self.mailer.probe().await {
                    Ok(()) => {
                        if self.health.set(Component::Smtp, true) {
                            tracing::info!("SMTP server reachable");
                        }
                    }
                    Err(error) => {
                        tracing::debug!(reason = error.reason, "SMTP probe failed");
                        retry_in = Some(smtp_backoff.next_delay());
                    }
                }
            }
            if let Some(dedup) = &self.dedup {
                if self.health.is_up(Component::Store) {
                    store_backoff.reset();
                } else {
                    match dedup.ping().await {
                        Ok(()) => {
                            if self.health.set(Component::Store, true) {
                                tracing::info!("deduplication store reachable");
                            }
                        }
                        Err(error) => {
                            tracing::debug!(%error, "deduplication store probe failed");
                            let delay = store_backoff.next_delay();
                            retry_in = Some(retry_in.map_or(delay, |d| d.min(delay)));
                        }
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(retry_in.unwrap_or(Duration::from_secs(1))) => {}
            }
        }
    }
}

/// What the drain after `stop` came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Jobs still in flight when the deadline passed (the broker redelivers them).
    pub abandoned: usize,
}

/// Runs until `stop` is cancelled, then drains in-flight jobs within `deadline`.
pub async fn run<S: MessageSource, M: Mailer>(
    pipeline: Arc<Pipeline<M>>,
    mut source: S,
    concurrency: usize,
    stop: CancellationToken,
    deadline: Duration,
) -> Drained {
    let permits = Arc::new(Semaphore::new(concurrency));
    let tasks = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let Some(delivery) = source.next(&stop).await else {
            break;
        };
        let pipeline = pipeline.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            pipeline.handle(delivery, &stop).await;
            drop(permit);
        });
    }
    pipeline.health.set_draining();
    tasks.close();
    let in_flight = tasks.len();
    tracing::info!(
        in_flight,
        ?deadline,
        "stopped consuming; finishing in-flight jobs"
    );
    let abandoned = match tokio::time::timeout(deadline, tasks.wait()).await {
        Ok(()) => 0,
        Err(_) => {
            let left = tasks.len();
            tracing::warn!(
                left,
                "drain deadline passed; unsettled jobs go back to the queue"
            );
            left
        }
    };
    source.close().await;
    Drained { abandoned }
}
