//! "Nothing more can arrive": the point after which a test may count what the SMTP server
//! received and call the count final.
//!
//! Waiting a fixed time after the n-th message lets a late duplicate escape the count when
//! it travels through a delay queue (5 s and more with the users' defaults). Instead the
//! test waits until the work queue and every delay queue are empty and every worker has
//! nothing in flight, several checks in a row: then no copy of any job is anywhere but in
//! the dead-letter queue.

use std::time::{Duration, Instant};

use mailpipe_contract::naming::dead_letter_queue;
use mailpipe_contract::topology::TopologyPlan;

use crate::amqp;
use crate::worker::Worker;

/// Where jobs of one pipeline can still be.
pub struct Quiet<'a> {
    /// The broker.
    pub url: &'a str,
    /// The pipeline's topology (its work and delay queues are watched).
    pub plan: TopologyPlan,
    /// The workers that consume it.
    pub workers: Vec<&'a Worker>,
}

impl Quiet<'_> {
    async fn is_quiet(&self) -> bool {
        let dlq = self
            .plan
            .queues
            .first()
            .map(|work| dead_letter_queue(&work.name));
        for queue in &self.plan.queues {
            if Some(&queue.name) == dlq.as_ref() {
                continue;
            }
            if amqp::ready(self.url, &queue.name).await > 0 {
                return false;
            }
        }
        for worker in &self.workers {
            if worker.metric("mailpipe_jobs_in_flight").await > 0.0 {
                return false;
            }
        }
        true
    }

    /// What is where now: each queue's ready jobs, each worker's counters (for a test that
    /// timed out waiting).
    async fn describe(&self) -> String {
        let mut parts = Vec::new();
        for queue in &self.plan.queues {
            if amqp::queue_exists(self.url, &queue.name).await {
                parts.push(format!(
                    "{}: {} ready",
                    queue.name,
                    amqp::ready(self.url, &queue.name).await
                ));
            }
        }
        for (i, worker) in self.workers.iter().enumerate() {
            let metrics = worker.metrics().await;
            let shown: Vec<String> = metrics
                .iter()
                .filter(|(name, _)| {
                    [
                        "mailpipe_jobs_in_flight",
                        "mailpipe_jobs_consumed_total",
                        "mailpipe_jobs_sent_total",
                        "mailpipe_broker_reconnects_total",
                        "mailpipe_jobs_duplicates_skipped_total",
                        "mailpipe_jobs_concurrent_copies_total",
                        "mailpipe_jobs_retried_total",
                        "mailpipe_jobs_failed_total",
                        "mailpipe_smtp_unavailable_total",
                        "mailpipe_worker_ready",
                    ]
                    .iter()
                    .any(|prefix| name.starts_with(prefix))
                })
                .map(|(name, value)| format!("{name}={value}"))
                .collect();
            parts.push(format!("worker {i}: {}", shown.join(" ")));
        }
        parts.join("; ")
    }

    /// Waits until every queue but the dead-letter queue is empty and no worker has a job
    /// in flight, three checks in a row half a second apart.
    pub async fn wait(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut calm = 0;
        while calm < 3 {
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for the queues to drain and the workers to go idle; {}",
                    self.describe().await
                );
            }
            calm = if self.is_quiet().await { calm + 1 } else { 0 };
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
