//! Readiness of the worker's dependencies, set where connections succeed or fail and read by
//! `/readyz` and the `mailpipe_worker_ready` gauge.
//!
//! Ready means: the broker connection is up, the SMTP server answered the last time we tried,
//! the deduplication store answers (when it is in use and its outage pauses sending), and the
//! worker is not shutting down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::metrics::Metrics;

/// One dependency whose state readiness depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// The message broker.
    Broker,
    /// The SMTP server.
    Smtp,
    /// The deduplication store.
    Store,
}

/// Shared readiness flags.
pub struct Health {
    broker: AtomicBool,
    smtp: AtomicBool,
    store: AtomicBool,
    store_required: bool,
    draining: AtomicBool,
    /// Whether the current down period of broker, SMTP, store was logged.
    reported: [AtomicBool; 3],
    changed: Notify,
    metrics: Metrics,
}

impl Health {
    /// All dependencies start down; `store_required` says whether the store counts.
    pub fn new(store_required: bool, metrics: Metrics) -> Arc<Health> {
        Arc::new(Health {
            broker: AtomicBool::new(false),
            smtp: AtomicBool::new(false),
            store: AtomicBool::new(!store_required),
            store_required,
            draining: AtomicBool::new(false),
            reported: Default::default(),
            changed: Notify::new(),
            metrics,
        })
    }

    fn flag(&self, component: Component) -> &AtomicBool {
        match component {
            Component::Broker => &self.broker,
            Component::Smtp => &self.smtp,
            Component::Store => &self.store,
        }
    }

    /// Records whether `component` is reachable; returns whether it changed.
    pub fn set(&self, component: Component, up: bool) -> bool {
        if component == Component::Store && !self.store_required {
            return false;
        }
        let changed = self.flag(component).swap(up, Ordering::SeqCst) != up;
        self.metrics.ready.set(i64::from(self.is_ready()));
        if up {
            self.reported[component as usize].store(false, Ordering::SeqCst);
        }
        if changed {
            self.changed.notify_waiters();
        }
        changed
    }

    /// Marks `component` unreachable; `true` the first time in this down period, so that the
    /// caller logs the outage once (also when it began before the first check, at start-up).
    pub fn report_down(&self, component: Component) -> bool {
        self.set(component, false);
        !self.reported[component as usize].swap(true, Ordering::SeqCst)
    }

    /// Waits until the SMTP server and, when it counts, the store are reachable.
    pub async fn wait_sendable(&self) {
        loop {
            let changed = self.changed.notified();
            if self.is_up(Component::Smtp) && self.is_up(Component::Store) {
                return;
            }
            changed.await;
        }
    }

    /// Waits until the SMTP server or, when it counts, the store is marked unreachable.
    pub async fn wait_unsendable(&self) {
        loop {
            let changed = self.changed.notified();
            if !(self.is_up(Component::Smtp) && self.is_up(Component::Store)) {
                return;
            }
            changed.await;
        }
    }

    /// Waits until `component` is marked reachable.
    pub async fn wait_up(&self, component: Component) {
        loop {
            // Created before the check, so a change in between is not missed.
            let changed = self.changed.notified();
            if self.is_up(component) {
                return;
            }
            changed.await;
        }
    }

    /// Whether `component` was reachable last time.
    pub fn is_up(&self, component: Component) -> bool {
        self.flag(component).load(Ordering::SeqCst)
    }

    /// Marks the worker as shutting down: not ready from now on.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.metrics.ready.set(0);
    }

    /// Ready to take work.
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::SeqCst)
            && self.is_up(Component::Broker)
            && self.is_up(Component::Smtp)
            && self.is_up(Component::Store)
    }

    /// One line per dependency, for the `/readyz` body.
    pub fn report(&self) -> String {
        let state = |up: bool| if up { "up" } else { "down" };
        let mut lines = vec![
            format!("broker: {}", state(self.is_up(Component::Broker))),
            format!("smtp: {}", state(self.is_up(Component::Smtp))),
        ];
        if self.store_required {
            lines.push(format!("store: {}", state(self.is_up(Component::Store))));
        }
        if self.draining.load(Ordering::SeqCst) {
            lines.push("shutting down".into());
        }
        lines.join("\n") + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_required_dependency_is_up() {
        let health = Health::new(true, Metrics::new());
        assert!(!health.is_ready());
        health.set(Component::Broker, true);
        health.set(Component::Smtp, true);
        assert!(!health.is_ready(), "store still down");
        health.set(Component::Store, true);
        assert!(health.is_ready());
        health.set_draining();
        assert!(!health.is_ready());
        assert!(health.report().contains("shutting down"));
    }

    #[tokio::test]
    async fn waiting_for_a_component_ends_when_it_comes_up() {
        let health = Health::new(false, Metrics::new());
        let waiter = {
            let health = health.clone();
            tokio::spawn(async move { health.wait_up(Component::Smtp).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        health.set(Component::Smtp, true);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
    }

    #[test]
    fn an_unused_store_never_blocks_readiness() {
        let health = Health::new(false, Metrics::new());
        health.set(Component::Broker, true);
        health.set(Component::Smtp, true);
        health.set(Component::Store, false);
        assert!(health.is_ready());
    }
}
