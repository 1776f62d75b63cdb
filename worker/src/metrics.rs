//! The worker's Prometheus metrics (prefix `mailpipe_`), registered once and shared.
//!
//! Every label is bounded: reasons are the static labels of failures, never error text,
//! listed in `reasons` and started at zero.
//! Dashboards and alert rules depend on these names; rename nothing lightly.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::reasons;

/// The labels a reason-labelled counter can carry (a list of `reasons`).
type Labels = fn() -> Vec<&'static str>;

/// All worker metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Deliveries taken from the source (redeliveries included).
    pub consumed: IntCounter,
    /// Jobs the SMTP server accepted (or, in log mode, rendered and logged).
    pub sent: IntCounter,
    /// Failed processing attempts, by reason.
    pub failed: IntCounterVec,
    /// Jobs put back for a later attempt, by reason.
    pub retried: IntCounterVec,
    /// Jobs dead-lettered (or dropped when dead-lettering is off), by reason.
    pub dead_lettered: IntCounterVec,
    /// Jobs skipped because their send was already recorded.
    pub duplicates_skipped: IntCounter,
    /// Jobs past their `not_after`.
    pub expired: IntCounter,
    /// Jobs being processed now.
    pub in_flight: IntGauge,
    /// Time from delivery to settlement.
    pub processing_seconds: Histogram,
    /// Time of one SMTP transaction.
    pub smtp_send_seconds: Histogram,
    /// SMTP connections: `max` is the pool cap, `busy` those carrying a send now, `idle`
    /// those open and waiting in the pool.
    pub smtp_pool_connections: IntGaugeVec,
    /// SMTP transactions whose connection was lost after the message was handed over and
    /// before the reply (RFC 1047): the server may have stored the message.
    pub smtp_outcome_unknown: IntCounter,
    /// Sends and probes that found the SMTP server unavailable (jobs waited; no attempt
    /// spent), by reason.
    pub smtp_unavailable: IntCounterVec,
    /// Recipients the server refused while it accepted the message for others, by class
    /// (`transient`: retried alone; `permanent`: dead-lettered alone).
    pub recipients_refused: IntCounterVec,
    /// Jobs not started because another delivery of the same job id was being sent.
    pub concurrent_copies: IntCounter,
    /// Retry or dead-letter copies the broker refused (nack); the job went back to the
    /// queue unchanged.
    pub broker_nacks: IntCounter,
    /// Jobs requeued unsent at shutdown.
    pub given_back: IntCounter,
    /// Deliveries the broker marked as redelivered.
    pub redelivered: IntCounter,
    /// Reconnections to the broker.
    pub broker_reconnects: IntCounter,
    /// Errors talking to the deduplication store, by operation.
    pub idempotency_errors: IntCounterVec,
    /// Kafka: records of each assigned partition not done yet (the high watermark as last
    /// fetched minus the first offset not done), by topic and partition.
    pub kafka_consumer_lag: IntGaugeVec,
    /// 1 when the worker is ready (broker, SMTP and store reachable), else 0.
    pub ready: IntGauge,
}

const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str| {
            let opts = HistogramOpts::new(name, help).buckets(SECONDS_BUCKETS.to_vec());
            let h = Histogram::with_opts(opts).expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let build_info = IntGaugeVec::new(
            Opts::new("mailpipe_worker_build_info", "Worker version; always 1."),
            &["version", "source"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), "rabbitmq"])
            .set(1);
        registry
            .register(Box::new(build_info))
            .expect("unique metric");
        let smtp_pool_connections = IntGaugeVec::new(
            Opts::new(
                "mailpipe_smtp_pool_connections",
                "SMTP connections: max is the pool cap, busy those carrying a send, idle those waiting.",
            ),
            &["state"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(smtp_pool_connections.clone()))
            .expect("unique metric");
        let kafka_consumer_lag = IntGaugeVec::new(
            Opts::new(
                "mailpipe_kafka_consumer_lag",
                "Kafka records of each assigned partition not done yet.",
            ),
            &["topic", "partition"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(kafka_consumer_lag.clone()))
            .expect("unique metric");

        let metrics = Metrics {
            kafka_consumer_lag,
            consumed: counter(
                "mailpipe_jobs_consumed_total",
                "Deliveries taken from the source.",
            ),
            sent: counter(
                "mailpipe_jobs_sent_total",
                "Jobs accepted by the SMTP server.",
            ),
            failed: counter_vec(
                "mailpipe_jobs_failed_total",
                "Failed attempts by reason.",
                "reason",
            ),
            retried: counter_vec(
                "mailpipe_jobs_retried_total",
                "Jobs scheduled for another attempt.",
                "reason",
            ),
            dead_lettered: counter_vec(
                "mailpipe_jobs_dead_lettered_total",
                "Jobs dead-lettered by reason.",
                "reason",
            ),
            duplicates_skipped: counter(
                "mailpipe_jobs_duplicates_skipped_total",
                "Jobs not sent because their send was already recorded.",
            ),
            expired: counter(
                "mailpipe_jobs_expired_total",
                "Jobs dead-lettered past not_after.",
            ),
            in_flight: gauge("mailpipe_jobs_in_flight", "Jobs being processed."),
            processing_seconds: histogram(
                "mailpipe_job_processing_duration_seconds",
                "Time from delivery to settlement.",
            ),
            smtp_send_seconds: histogram(
                "mailpipe_smtp_send_duration_seconds",
                "Time of one SMTP transaction.",
            ),
            smtp_pool_connections,
            smtp_outcome_unknown: counter(
                "mailpipe_smtp_outcome_unknown_total",
                "SMTP transactions lost after the message was handed over, before the reply.",
            ),
            smtp_unavailable: counter_vec(
                "mailpipe_smtp_unavailable_total",
                "Sends and probes that found the SMTP server unavailable (no attempt spent), by reason.",
                "reason",
            ),
            recipients_refused: counter_vec(
                "mailpipe_recipients_refused_total",
                "Recipients refused while others were accepted, by class.",
                "class",
            ),
            concurrent_copies: counter(
                "mailpipe_jobs_concurrent_copies_total",
                "Deliveries that waited for another delivery of the same job id.",
            ),
            broker_nacks: counter(
                "mailpipe_broker_nacks_total",
                "Retry or dead-letter copies the broker refused; the job was requeued.",
            ),
            given_back: counter(
                "mailpipe_jobs_given_back_total",
                "Jobs requeued unsent at shutdown (held beyond what the drain deadline allows, or the SMTP server unavailable).",
            ),
            redelivered: counter(
                "mailpipe_jobs_redelivered_total",
                "Deliveries the broker marked as redelivered (another consumer held them before).",
            ),
            broker_reconnects: counter(
                "mailpipe_broker_reconnects_total",
                "Connections to the broker re-established.",
            ),
            idempotency_errors: counter_vec(
                "mailpipe_idempotency_errors_total",
                "Errors talking to the deduplication store.",
                "operation",
            ),
            ready: gauge("mailpipe_worker_ready", "1 when the worker is ready."),
            registry,
        };
        // Every reason starts at zero (see `reasons`), and so do the other bounded labels.
        for (family, known) in metrics.by_reason() {
            for reason in known() {
                family.with_label_values(&[reason]);
            }
        }
        for class in ["transient", "permanent"] {
            metrics.recipients_refused.with_label_values(&[class]);
        }
        for operation in ["check", "record"] {
            metrics.idempotency_errors.with_label_values(&[operation]);
        }
        metrics
    }

    fn by_reason(&self) -> [(&IntCounterVec, Labels); 4] {
        [
            (&self.failed, reasons::failed),
            (&self.retried, reasons::retried),
            (&self.dead_lettered, reasons::dead_lettered),
            (&self.smtp_unavailable, reasons::unavailable),
        ]
    }

    /// `mailpipe_jobs_failed_total` of `reason`.
    pub fn failed_for(&self, reason: &str) -> IntCounter {
        labelled(&self.failed, reasons::failed, reason)
    }

    /// `mailpipe_jobs_retried_total` of `reason`.
    pub fn retried_for(&self, reason: &str) -> IntCounter {
        labelled(&self.retried, reasons::retried, reason)
    }

    /// `mailpipe_jobs_dead_lettered_total` of `reason`.
    pub fn dead_lettered_for(&self, reason: &str) -> IntCounter {
        labelled(&self.dead_lettered, reasons::dead_lettered, reason)
    }

    /// `mailpipe_smtp_unavailable_total` of `reason`.
    pub fn unavailable_for(&self, reason: &str) -> IntCounter {
        labelled(&self.smtp_unavailable, reasons::unavailable, reason)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .expect("text encoding of gathered metrics")
    }
}

/// The counter of `reason` in `family`, which must be one of `known()`: a reason nobody
/// listed would be born at its first increment.
fn labelled(family: &IntCounterVec, known: Labels, reason: &str) -> IntCounter {
    debug_assert!(
        known().contains(&reason),
        "the reason {reason:?} is not listed in worker/src/reasons.rs"
    );
    family.with_label_values(&[reason])
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_starts_at_zero() {
        let text = Metrics::new().render();
        for (family, reason) in [
            ("mailpipe_jobs_failed_total", "smtp_5xx"),
            ("mailpipe_jobs_failed_total", "malformed_json"),
            ("mailpipe_jobs_retried_total", "smtp_4xx"),
            ("mailpipe_jobs_dead_lettered_total", "max_attempts"),
            ("mailpipe_jobs_dead_lettered_total", "expired"),
            ("mailpipe_smtp_unavailable_total", "smtp_connection"),
        ] {
            let line = format!("{family}{{reason=\"{reason}\"}} 0\n");
            assert!(text.contains(&line), "{line} in\n{text}");
        }
        let failed = text
            .lines()
            .filter(|l| l.starts_with("mailpipe_jobs_failed_total{"))
            .count();
        assert_eq!(failed, reasons::failed().len());
    }

    #[test]
    #[should_panic(expected = "not listed")]
    #[cfg(debug_assertions)]
    fn a_reason_nobody_listed_is_caught_by_the_tests() {
        Metrics::new().failed_for("made_up").inc();
    }
}
