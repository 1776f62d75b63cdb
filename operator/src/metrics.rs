//! The operator's Prometheus metrics (prefix `mailpipe_operator_`). Labels are bounded:
//! results and error categories are static, pipelines are what the cluster holds.

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// All operator metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles, by result (`ok`, `error`).
    pub reconciles: IntCounterVec,
    /// Failed reconciles, by error category.
    pub reconcile_failures: IntCounterVec,
    /// Reconcile duration.
    pub reconcile_seconds: HistogramVec,
    /// Jobs waiting, per pipeline.
    pub backlog: IntGaugeVec,
    /// Jobs in the dead-letter queue, per pipeline.
    pub dead_letter_depth: IntGaugeVec,
    /// Worker replicas, per pipeline and kind (`desired`, `current`, `ready`).
    pub replicas: IntGaugeVec,
    /// 1 when the pipeline's topology is in place.
    pub topology_ready: IntGaugeVec,
    /// Estimated seconds until a pipeline's waiting work is done.
    pub time_to_drain: IntGaugeVec,
    /// A pipeline's drain objective (`scaling.drainWithin`), in seconds.
    pub drain_objective: IntGaugeVec,
    /// Jobs a second one busy replica of a pipeline has been settling.
    pub send_rate_per_replica: GaugeVec,
    /// Replica count changes made by the scaler, per pipeline, direction and the decision's
    /// reason (`Target`, `MaxReplicas`, `Idle`, ...: the Scaling condition's reasons).
    pub scale_events: IntCounterVec,
    /// 1 while this replica leads (holds the Lease), 0 while it stands by.
    pub leader: IntGauge,
    /// From the start of a scaler pass (every due pipeline's backlog read at once) to one
    /// pipeline's count decided and set.
    pub scale_decision_seconds: HistogramVec,
    /// 1, labelled with the version.
    pub build_info: IntGaugeVec,
}

const PIPELINE: &[&str] = &["namespace", "pipeline"];

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &[])
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let reconcile_seconds = histogram(
            "mailpipe_operator_reconcile_duration_seconds",
            "Time of one reconcile.",
            vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        );
        let scale_decision_seconds = histogram(
            "mailpipe_operator_scale_decision_duration_seconds",
            "From the start of a scaler pass (every due backlog read at once) to one pipeline's count decided and set.",
            vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ],
        );
        let send_rate_per_replica = GaugeVec::new(
            Opts::new(
                "mailpipe_operator_send_rate_per_replica",
                "Jobs a second one busy worker replica of a pipeline has been settling (from the broker's acks).",
            ),
            PIPELINE,
        )
        .expect("valid metric");
        registry
            .register(Box::new(send_rate_per_replica.clone()))
            .expect("unique metric");
        let metrics = Metrics {
            send_rate_per_replica,
            time_to_drain: gauge(
                "mailpipe_operator_time_to_drain_seconds",
                "Estimated seconds until a pipeline's waiting work is done at the desired replicas and the measured rate.",
                PIPELINE,
            ),
            drain_objective: gauge(
                "mailpipe_operator_drain_objective_seconds",
                "A pipeline's scaling.drainWithin, for alerts comparing the time to drain with it.",
                PIPELINE,
            ),
            reconciles: counter(
                "mailpipe_operator_reconciles_total",
                "Reconciles, by result.",
                &["result"],
            ),
            reconcile_failures: counter(
                "mailpipe_operator_reconcile_failures_total",
                "Failed reconciles, by error category.",
                &["category"],
            ),
            reconcile_seconds,
            scale_decision_seconds,
            backlog: gauge(
                "mailpipe_operator_backlog",
                "Jobs waiting in a pipeline's queue.",
                PIPELINE,
            ),
            dead_letter_depth: gauge(
                "mailpipe_operator_dead_letter_depth",
                "Jobs in a pipeline's dead-letter queue.",
                PIPELINE,
            ),
            replicas: gauge(
                "mailpipe_operator_replicas",
                "Worker replicas of a pipeline: desired, current and ready.",
                &["namespace", "pipeline", "kind"],
            ),
            topology_ready: gauge(
                "mailpipe_operator_topology_ready",
                "1 when a pipeline's broker topology is in place.",
                PIPELINE,
            ),
            scale_events: counter(
                "mailpipe_operator_scale_events_total",
                "Replica count changes made by the scaler, by direction and reason.",
                &["namespace", "pipeline", "direction", "reason"],
            ),
            leader: {
                let g = IntGauge::new(
                    "mailpipe_operator_leader",
                    "1 while this replica leads (holds the Lease), 0 while it stands by.",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            build_info: gauge(
                "mailpipe_operator_build_info",
                "1, labelled with the version.",
                &["version"],
            ),
            registry,
        };
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Each result and failure category at zero from the start: a first failure is then
        // an increase, which rate() and increase() see.
        for result in ["ok", "error"] {
            metrics.reconciles.with_label_values(&[result]);
        }
        for category in crate::error::Error::CATEGORIES {
            metrics.reconcile_failures.with_label_values(&[category]);
        }
        metrics
    }

    /// Forgets a deleted pipeline's series.
    pub fn forget(&self, namespace: &str, pipeline: &str) {
        let labels = [namespace, pipeline];
        let _ = self.backlog.remove_label_values(&labels);
        let _ = self.dead_letter_depth.remove_label_values(&labels);
        let _ = self.topology_ready.remove_label_values(&labels);
        let _ = self.time_to_drain.remove_label_values(&labels);
        let _ = self.drain_objective.remove_label_values(&labels);
        let _ = self.send_rate_per_replica.remove_label_values(&labels);
        for kind in ["desired", "current", "ready"] {
            let _ = self
                .replicas
                .remove_label_values(&[namespace, pipeline, kind]);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .expect("metrics encode");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
