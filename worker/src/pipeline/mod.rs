//! The consume -> send -> settle loop.
//!
//! [`run`] takes deliveries from a [`MessageSource`] while a concurrency permit is free and
//! the SMTP server is available, and hands each to [`Pipeline::handle`]:
//! parse -> expiry -> render -> one delivery of an id at a time -> already sent or claimed?
//! -> rate limit -> send -> record -> settle.
//! A job is acked only after the SMTP server accepted it, after it was found already sent,
//! or after a retry or dead-letter copy was confirmed by the broker.
//!
//! An unavailable SMTP server (unreachable, hanging, refusing TLS or our credentials) is not
//! the job's fault: the job keeps its attempt and waits, consuming stops, the dependency
//! watcher probes with capped backoff, and every waiting job is sent once the server answers.
//!
//! Shutdown: when `stop` is cancelled no new delivery is taken and the source cancels its
//! consumer. The jobs the worker already holds (in flight, and those the broker pushed before
//! the cancel) are sent and settled while they fit the drain deadline at the pace the worker
//! has shown ([`drain`]); the others are given back (requeued) at once, and so is every job
//! that has not started its send when the SMTP server is unavailable or when starting it could
//! no longer finish in time. Then the source closes.

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
use crate::disposition::Failure;
use crate::health::{Component, Health};
use crate::idempotency::{self, Claimed, Dedup, Entry, InFlight, Lease};
use crate::mailer::{Delivered, Mailer};
use crate::metrics::Metrics;
use crate::render::{self, Renderer};
use crate::source::{Delivery, MessageSource, Settlement};
use drain::{DrainPlan, Pace};

pub mod drain;
mod settlement;

/// Everything a job needs on its way.
pub struct Pipeline<M> {
    /// Delivers rendered messages.
    pub mailer: M,
    /// Builds messages from jobs.
    pub renderer: Renderer,
    /// The deduplication store, when configured.
    pub dedup: Option<Dedup>,
    /// Job ids being processed in this worker.
    pub in_flight: InFlight,
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
    pub rate: Option<SendRate>,
    /// The send time shown so far, for the drain at shutdown.
    pub pace: Pace,
}

/// A per-second send-rate limit (a burst of one second's worth).
pub struct SendRate {
    limiter: DefaultDirectRateLimiter,
    per_second: u32,
}

impl SendRate {
    /// `per_second` messages a second; `None` for 0 (no limit).
    pub fn new(per_second: u32) -> Option<SendRate> {
        std::num::NonZeroU32::new(per_second).map(|n| SendRate {
            limiter: RateLimiter::direct(Quota::per_second(n)),
            per_second,
        })
    }
}

/// What an attempt came to.
#[derive(Debug)]
enum Outcome {
    /// Accepted by the server, for every recipient but those refused.
    Sent(Delivered),
    Duplicate,
    Failed(Failure),
    /// Shutting down before the send began.
    NotStarted,
}

enum Seen {
    Sent,
    /// Not sent; this worker holds the claim.
    Claimed(Lease),
    /// The store is down and the policy says send anyway.
    Unknown,
    Stopped,
}

impl<M: Mailer> Pipeline<M> {
    /// Processes one delivery and settles it; if `give_back` is cancelled before its send
    /// begins, the job is requeued unsent.
    pub async fn handle(&self, delivery: Delivery, give_back: &CancellationToken) {
        let started = Instant::now();
        self.metrics.consumed.inc();
        self.metrics.in_flight.inc();
        let Delivery {
            body,
            attempt,
            recipients,
            settle,
        } = delivery;
        let parsed = EmailJob::parse(&body, &self.limits);
        let job_id = render::job_id(parsed.as_ref().ok(), &body);
        let span = tracing::info_span!("job", job_id = %job_id, attempt);
        async {
            let outcome = self
                .process(parsed, &job_id, recipients.as_deref(), give_back)
                .await;
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
        recipients: Option<&[String]>,
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
        let mut message = match self.renderer.build(&job, job_id) {
            Ok(message) => message,
            Err(failure) => return Outcome::Failed(failure),
        };
        // A copy for the recipients a partial delivery left has a deduplication key of its
        // own: the job id itself was recorded when the others were served.
        let key = match recipients {
            None => job_id.to_string(),
            Some(list) => match render::restrict(&mut message, list) {
                Ok(()) => render::recipients_key(job_id, list),
                Err(failure) => return Outcome::Failed(failure),
            },
        };
        let job_id = key.as_str();
        tracing::debug!(to = ?job.to, cc = ?job.cc, bcc_count = job.bcc.len(), subject = ?job.subject, "rendered");
        // One delivery of a job id at a time in this worker: a copy waits for the first.
        let local = loop {
            match self.in_flight.enter(job_id) {
                Entry::Own(guard) => break guard,
                Entry::Busy(holder) => {
                    self.metrics.concurrent_copies.inc();
                    tracing::info!("another delivery of this job id is being sent; waiting for it");
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => return Outcome::NotStarted,
                        sent = idempotency::wait_for(holder) => if sent {
                            return Outcome::Duplicate;
                        },
                    }
                }
            }
        };
        let claim = match &self.dedup {
            None => None,
            Some(dedup) => match self.seen(dedup, job_id, stop).await {
                Seen::Sent => {
                    local.sent();
                    return Outcome::Duplicate;
                }
                Seen::Claimed(lease) => Some((dedup, lease)),
                Seen::Unknown => None,
                Seen::Stopped => return Outcome::NotStarted,
            },
        };
        let outcome = match &claim {
            Some((dedup, lease)) => {
                // The claim is renewed while the send runs, so a slow send keeps it.
                tokio::select! {
                    outcome = self.send(&message, stop) => outcome,
                    () = renew(dedup, job_id, lease) => unreachable!("renewing never ends"),
                }
            }
            None => self.send(&message, stop).await,
        };
        let sent = matches!(outcome, Outcome::Sent(_));
        if let Some((dedup, lease)) = claim {
            self.finish(dedup, job_id, &lease, sent).await;
        }
        if sent {
            local.sent();
        }
        outcome
    }

    /// Sends, waiting out an unavailable server without spending the job's attempt.
    async fn send(&self, message: &crate::mailer::Outgoing, stop: &CancellationToken) -> Outcome {
        // The probe may find the server answering while it still refuses this transaction
        // (say a 530 to MAIL while NOOP passes): each try of the same job waits longer, so
        // that never becomes a loop.
        let mut again = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut tried = false;
        loop {
            if tried {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return Outcome::NotStarted,
                    _ = tokio::time::sleep(again.next_delay()) => {}
                }
            }
            tried = true;
            if let Some(rate) = &self.rate {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return Outcome::NotStarted,
                    _ = rate.limiter.until_ready() => {}
                }
            }
            if stop.is_cancelled() {
                return Outcome::NotStarted;
            }
            // From here on the send is not interrupted: shutdown waits for it.
            let began = Instant::now();
            let sent = self.mailer.send(message).await;
            if !sent.as_ref().is_err_and(|e| e.is_server_trouble()) {
                self.pace.record(began.elapsed());
            }
            match sent {
                Ok(delivered) => {
                    self.health.set(Component::Smtp, true);
                    return Outcome::Sent(delivered);
                }
                Err(error) if error.is_server_trouble() => {
                    self.metrics.unavailable_for(error.reason).inc();
                    if self.health.report_down(Component::Smtp) {
                        tracing::warn!(reason = error.reason, code = ?error.code, "SMTP server unavailable; consuming paused, jobs wait without spending attempts");
                    }
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => return Outcome::NotStarted,
                        () = self.health.wait_up(Component::Smtp) => {}
                    }
                }
                Err(error) => return Outcome::Failed(Failure::Send(error)),
            }
        }
    }

    /// Asks the store whether `job_id` was sent and claims it, waiting while another worker
    /// sends it, and while the store is down if the policy says pause (readiness is false
    /// meanwhile, and consuming pauses too).
    async fn seen(&self, dedup: &Dedup, job_id: &str, stop: &CancellationToken) -> Seen {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut waited = false;
        loop {
            let delay = match dedup.claim(job_id).await {
                Ok(claimed) => {
                    if self.health.set(Component::Store, true) {
                        tracing::info!("deduplication store reachable again");
                    }
                    match claimed {
                        Claimed::Sent => return Seen::Sent,
                        Claimed::Own(lease) => return Seen::Claimed(lease),
                        Claimed::Busy => {
                            if !waited {
                                waited = true;
                                self.metrics.concurrent_copies.inc();
                                tracing::info!(
                                    "another worker is sending this job id; waiting for it"
                                );
                            }
                            Duration::from_millis(250)
                        }
                    }
                }
                Err(error) => {
                    self.metrics
                        .idempotency_errors
                        .with_label_values(&["check"])
                        .inc();
                    if self.health.report_down(Component::Store) {
                        tracing::warn!(%error, advice = error.advice(), policy = ?self.on_store_unavailable, "deduplication store unreachable");
                    }
                    if self.on_store_unavailable == OnRedisUnavailable::Send {
                        return Seen::Unknown;
                    }
                    backoff.next_delay()
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return Seen::Stopped,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Records a send (when `sent`) and drops the claim, retrying briefly; if the store stays
    /// down the job is acked anyway (it was delivered) and only a redelivery of it could send
    /// it again. An unrecorded failure leaves the claim to expire.
    async fn finish(&self, dedup: &Dedup, job_id: &str, lease: &Lease, sent: bool) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for _ in 0..6 {
            match dedup.finish(job_id, lease, sent).await {
                Ok(()) => return,
                Err(error) => {
                    self.metrics
                        .idempotency_errors
                        .with_label_values(&["record"])
                        .inc();
                    tracing::warn!(%error, advice = error.advice(), "could not record the send yet");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        if sent {
            tracing::error!("send not recorded: the store stayed unreachable; a redelivery of this job would send it again");
        }
    }

    /// Gives a delivery back unopened (shutting down before a slot for it was free).
    pub async fn requeue(&self, delivery: Delivery) {
        self.metrics.given_back.inc();
        if let Err(error) = delivery.settle.settle(Settlement::Requeue).await {
            tracing::debug!(%error, "giving a held job back; the broker requeues it anyway");
        }
    }

    /// While the SMTP server or the deduplication store is marked down, probes it with
    /// capped backoff, so readiness comes back (and is right at start-up) without waiting
    /// for the next job.
    pub async fn watch_dependencies(&self, stop: CancellationToken) {
        // Capped at 10 s: after an outage the backlog moves again within seconds, and one
        // probe every 10 s costs a down server nothing.
        let mut smtp_backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        let mut store_backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        loop {
            // The next look: in a second while all is well, else after the shortest backoff.
            let mut retry_in: Option<Duration> = None;
            if self.health.is_up(Component::Smtp) {
                smtp_backoff.reset();
            } else {
                // A hanging server must not hold up shutdown.
                let probed = tokio::select! {
                    biased;
                    _ = stop.cancelled() => return,
                    probed = self.mailer.probe() => probed,
                };
                match probed {
                    Ok(()) => {
                        if self.health.set(Component::Smtp, true) {
                            tracing::info!("SMTP server reachable; consuming again");
                        }
                    }
                    Err(error) => {
                        self.metrics.unavailable_for(error.reason).inc();
                        if self.health.report_down(Component::Smtp) {
                            tracing::warn!(reason = error.reason, code = ?error.code, detail = %error.detail, "SMTP server unavailable; waiting for it before consuming");
                        }
                        tracing::debug!(reason = error.reason, "SMTP probe failed");
                        retry_in = Some(smtp_backoff.next_delay());
                    }
                }
            }
            if let Some(dedup) = &self.dedup {
                if self.health.is_up(Component::Store) {
                    store_backoff.reset();
                } else {
                    let pinged = tokio::select! {
                        biased;
                        _ = stop.cancelled() => return,
                        pinged = dedup.ping() => pinged,
                    };
                    match pinged {
                        Ok(()) => {
                            if self.health.set(Component::Store, true) {
                                tracing::info!("deduplication store reachable");
                            }
                        }
                        Err(error) => {
                            if self.health.report_down(Component::Store) {
                                tracing::warn!(%error, advice = error.advice(), "deduplication store unreachable");
                            }
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

/// Renews a claim every [`idempotency::RENEW_EVERY`] until dropped.
async fn renew(dedup: &Dedup, job_id: &str, lease: &Lease) {
    loop {
        tokio::time::sleep(idempotency::RENEW_EVERY).await;
        match dedup.renew(job_id, lease).await {
            Ok(true) => {}
            Ok(false) => tracing::warn!("the deduplication claim expired during a long send; another worker may send this job too"),
            Err(error) => tracing::warn!(%error, "could not renew the deduplication claim"),
        }
    }
}

/// What the drain after `stop` came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Held jobs given back to the broker unsent (they are redelivered elsewhere).
    pub given_back: usize,
    /// Jobs still in flight when the deadline passed (the broker redelivers them).
    pub abandoned: usize,
}

/// Runs until `stop` is cancelled, then drains what the worker holds within `deadline`.
pub async fn run<S: MessageSource, M: Mailer>(
    pipeline: Arc<Pipeline<M>>,
    mut source: S,
    concurrency: usize,
    stop: CancellationToken,
    deadline: Duration,
) -> Drained {
    let permits = Arc::new(Semaphore::new(concurrency));
    let tasks = TaskTracker::new();
    // Jobs watch `give_back`, not `stop`: after the stop a held job is still sent while it
    // can finish in time.
    let give_back = CancellationToken::new();
    loop {
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        // Nothing new is taken while the server cannot be sent to (or the store is down and
        // the policy says pause): the jobs stay in the queue, their attempts untouched.
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            () = pipeline.health.wait_sendable() => {}
        }
        let Some(delivery) = source.next(&stop).await else {
            break;
        };
        let pipeline = pipeline.clone();
        let give_back = give_back.clone();
        tasks.spawn(async move {
            pipeline.handle(delivery, &give_back).await;
            drop(permit);
        });
    }
    let stopped = tokio::time::Instant::now();
    pipeline.health.set_draining();
    source.stop_consuming().await;
    let in_flight = tasks.len();
    let plan = DrainPlan::new(
        deadline,
        concurrency,
        in_flight,
        pipeline.pace.per_send(),
        pipeline.rate.as_ref().map(|r| r.per_second),
    );
    // Jobs that have not begun their send go back once the server is unavailable (they
    // would wait, not send) or once starting one could no longer end before the deadline.
    let trigger = {
        let give_back = give_back.clone();
        let health = pipeline.health.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = health.wait_unsendable() => {}
                () = tokio::time::sleep_until(stopped + plan.start_by) => {}
                () = give_back.cancelled() => {}
            }
            give_back.cancel();
        })
    };
    // What the broker pushed before the cancel: taken out at once up to what fits (each
    // waits for a free slot), the rest given back at once for the other replicas.
    let mut taken = 0usize;
    while plan.more.is_none_or(|more| taken < more) && !give_back.is_cancelled() {
        let Some(delivery) = source.held().await else {
            break;
        };
        taken += 1;
        let pipeline = pipeline.clone();
        let give_back = give_back.clone();
        let permits = permits.clone();
        tasks.spawn(async move {
            let permit = tokio::select! {
                biased;
                permit = permits.acquire_owned() => permit.expect("the semaphore is never closed"),
                _ = give_back.cancelled() => {
                    pipeline.requeue(delivery).await;
                    return;
                }
            };
            pipeline.handle(delivery, &give_back).await;
            drop(permit);
        });
    }
    let returned = source.give_back().await;
    pipeline.metrics.given_back.inc_by(returned as u64);
    tasks.close();
    tracing::info!(
        in_flight,
        held = taken,
        given_back = returned,
        send_time = ?pipeline.pace.per_send(),
        ?deadline,
        "stopped consuming; finishing the jobs that fit the drain deadline"
    );
    let abandoned = match tokio::time::timeout_at(stopped + deadline, tasks.wait()).await {
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
    give_back.cancel();
    let _ = trigger.await;
    source.close().await;
    Drained {
        // The held jobs handed back unopened and those requeued before their send began.
        given_back: pipeline.metrics.given_back.get() as usize,
        abandoned,
    }
}
