//! The SMTP connection pool's bookkeeping: the connections that sit idle, and how many
//! connections the worker may hold at once (its *slots*).
//!
//! A worker on its own has a fixed number of slots (`--smtp-pool-size`). A worker whose
//! pipeline shares one connection budget among its replicas (`budget.rs`) has a slot for each
//! token of the budget it keeps. Fewer slots take effect for new sends at once; connections
//! beyond the free slots (idle ones at once, busy ones as their send ends) leave the pool and
//! are handed to the budget, which closes them (QUIT) before it gives their tokens back. So
//! the connections a worker holds, idle or busy, never outnumber its tokens; the one
//! exception is losing every token with the broker connection, when sends already under way
//! finish (their connections close as they end).
//!
//! Generic over the connection so the accounting is tested without sockets.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus::IntGauge;
use tokio::sync::Notify;

use crate::metrics::Metrics;

/// Idle connections and slots.
pub struct Pool<C> {
    state: Mutex<State<C>>,
    /// Connections open now, wherever they are (idle, under a send, waiting to close).
    open: Arc<AtomicUsize>,
    changed: Notify,
    /// `mailpipe_smtp_pool_connections` for `max` (the slots) and `idle`.
    max_gauge: IntGauge,
    idle_gauge: IntGauge,
}

/// A connection counted as open until it is dropped.
pub struct Counted<C> {
    connection: C,
    open: Arc<AtomicUsize>,
}

impl<C> std::ops::Deref for Counted<C> {
    type Target = C;
    fn deref(&self) -> &C {
        &self.connection
    }
}

impl<C> std::ops::DerefMut for Counted<C> {
    fn deref_mut(&mut self) -> &mut C {
        &mut self.connection
    }
}

impl<C> Drop for Counted<C> {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

struct State<C> {
    /// Connections the worker may hold now.
    slots: usize,
    /// Slots taken by a send or a probe.
    busy: usize,
    /// Open connections not in use, oldest first, with the time each was put back.
    idle: Vec<(Counted<C>, Instant)>,
    /// Connections beyond the slots taken out of the pool when a send ended, kept for
    /// the next `set_slots` to hand over for closing.
    retired: Vec<Counted<C>>,
}

impl<C> State<C> {
    /// Takes out the oldest idle connections while more connections are open than slots
    /// (those under a send stay; they are trimmed as they come back).
    fn trim(&mut self, open: usize) -> Vec<Counted<C>> {
        let beyond = open
            .saturating_sub(self.retired.len())
            .saturating_sub(self.slots);
        let excess = beyond.min(self.idle.len());
        self.idle.drain(..excess).map(|(c, _)| c).collect()
    }
}

/// A taken slot; given back when dropped.
pub struct Slot<'a, C> {
    pool: &'a Pool<C>,
}

impl<C> Slot<'_, C> {
    /// Gives the slot back with its connection, kept for reuse when it fits the slots.
    pub fn release_with(self, connection: Counted<C>) {
        let pool = self.pool;
        // The release below is the drop's, with the connection.
        std::mem::forget(self);
        pool.release(Some(connection));
    }
}

impl<C> Drop for Slot<'_, C> {
    fn drop(&mut self) {
        self.pool.release(None);
    }
}

impl<C> Pool<C> {
    /// A slot given back, with its connection when it has one to keep.
    fn release(&self, connection: Option<Counted<C>>) {
        let closed = {
            let mut state = self.lock();
            state.busy -= 1;
            if let Some(connection) = connection {
                state.idle.push((connection, Instant::now()));
            }
            let closed = state.trim(self.open.load(Ordering::SeqCst));
            if state.slots == 0 {
                // No token left to give back after it: closed now.
                closed
            } else {
                state.retired.extend(closed);
                Vec::new()
            }
        };
        drop(closed);
        self.changed();
    }

    /// A pool with `slots` slots and no connection.
    pub fn new(slots: usize, metrics: Metrics) -> Pool<C> {
        let pool = Pool {
            state: Mutex::new(State {
                slots,
                busy: 0,
                idle: Vec::new(),
                retired: Vec::new(),
            }),
            open: Arc::new(AtomicUsize::new(0)),
            changed: Notify::new(),
            max_gauge: metrics.smtp_pool_connections.with_label_values(&["max"]),
            idle_gauge: metrics.smtp_pool_connections.with_label_values(&["idle"]),
        };
        pool.changed();
        pool
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<C>> {
        self.state.lock().expect("pool lock")
    }

    /// After a change: gauges updated, waiters woken.
    fn changed(&self) {
        let (slots, idle) = {
            let state = self.lock();
            (state.slots, state.idle.len())
        };
        self.max_gauge.set(slots as i64);
        self.idle_gauge.set(idle as i64);
        self.changed.notify_waiters();
    }

    /// Waits for a free slot and takes it.
    pub async fn slot(&self) -> Slot<'_, C> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut state = self.lock();
                if state.busy < state.slots {
                    state.busy += 1;
                    return Slot { pool: self };
                }
            }
            changed.await;
        }
    }

    /// Counts a connection just opened (under a slot) as open until it is dropped.
    pub fn counted(&self, connection: C) -> Counted<C> {
        self.open.fetch_add(1, Ordering::SeqCst);
        Counted {
            connection,
            open: self.open.clone(),
        }
    }

    /// The most recently used idle connection, with when it was put back.
    pub fn take_idle(&self) -> Option<(Counted<C>, Instant)> {
        let taken = self.lock().idle.pop();
        if taken.is_some() {
            self.changed();
        }
        taken
    }

    /// Sets the slots: more wake waiting sends; fewer take effect for new sends at once,
    /// while sends under way finish (until then `busy` may exceed the slots). Returns the
    /// connections beyond the free slots, idle ones and those of sends that ended since,
    /// taken out of the pool for the caller to close (dropping one closes it abruptly).
    pub fn set_slots(&self, slots: usize) -> Vec<Counted<C>> {
        let closed = {
            let mut state = self.lock();
            state.slots = slots;
            let mut closed = state.trim(self.open.load(Ordering::SeqCst));
            closed.append(&mut state.retired);
            closed
        };
        self.changed();
        closed
    }

    /// Connections open now, wherever they are.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Slots under a send or a probe now.
    pub fn busy(&self) -> usize {
        self.lock().busy
    }

    /// Slots now.
    #[cfg(test)]
    fn slots(&self) -> usize {
        self.lock().slots
    }

    /// Idle connections now.
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.lock().idle.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// A connection that counts how many of its kind are open.
    struct Conn(Arc<AtomicUsize>);

    impl Conn {
        fn open(count: &Arc<AtomicUsize>) -> Conn {
            count.fetch_add(1, Ordering::SeqCst);
            Conn(count.clone())
        }
    }

    impl Drop for Conn {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn connect(pool: &Pool<Conn>, open: &Arc<AtomicUsize>) -> Counted<Conn> {
        pool.counted(Conn::open(open))
    }

    fn pool(slots: usize) -> Arc<Pool<Conn>> {
        Arc::new(Pool::new(slots, Metrics::new()))
    }

    #[tokio::test]
    async fn a_send_waits_for_a_slot() {
        let pool = pool(0);
        let waiting = {
            let pool = pool.clone();
            tokio::spawn(async move {
                let _slot = pool.slot().await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "no slot, no send");
        assert!(pool.set_slots(1).is_empty());
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("the new slot wakes the waiting send")
            .unwrap();
    }

    #[tokio::test]
    async fn fewer_slots_stop_new_sends_at_once_and_let_those_under_way_finish() {
        let pool = pool(2);
        let first = pool.slot().await;
        let second = pool.slot().await;
        assert!(pool.set_slots(1).is_empty());
        assert_eq!(pool.busy(), 2, "sends under way go on");
        let waiting = {
            let pool = pool.clone();
            tokio::spawn(async move {
                let _slot = pool.slot().await;
            })
        };
        drop(first);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "one slot, still busy");
        drop(second);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("a send starts once the busy ones fit")
            .unwrap();
    }

    #[tokio::test]
    async fn fewer_slots_close_idle_connections_beyond_the_free_ones() {
        let open = Arc::new(AtomicUsize::new(0));
        let pool = pool(3);
        {
            // Three sends at once leave three idle connections.
            let slots = [pool.slot().await, pool.slot().await, pool.slot().await];
            for slot in slots {
                slot.release_with(connect(&pool, &open));
            }
        }
        assert_eq!(pool.idle(), 3);
        let busy = pool.slot().await;
        let reused = pool.take_idle().unwrap();
        let closed = pool.set_slots(2);
        // 2 slots: the busy one and one free, so one idle connection may stay.
        assert_eq!((closed.len(), pool.idle()), (1, 1));
        drop(closed);
        assert_eq!(open.load(Ordering::SeqCst), 2);
        busy.release_with(reused.0);
        assert!(pool.set_slots(2).is_empty());
        assert_eq!(open.load(Ordering::SeqCst), 2, "two slots, two connections");
        // One slot while both are busy: the connection a send ends with beyond it is handed
        // over for closing, not kept.
        let first = pool.slot().await;
        let second = pool.slot().await;
        let (a, b) = (pool.take_idle().unwrap(), pool.take_idle().unwrap());
        assert!(pool.set_slots(1).is_empty(), "nothing idle");
        first.release_with(a.0);
        second.release_with(b.0);
        assert_eq!(pool.idle(), 1);
        assert_eq!(pool.set_slots(1).len(), 1, "the one beyond the slot");
        assert_eq!(open.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_given_back_with_its_slot_is_never_counted_twice() {
        let open = Arc::new(AtomicUsize::new(0));
        let pool = pool(2);
        let (a, b) = (pool.slot().await, pool.slot().await);
        let (a_conn, b_conn) = (connect(&pool, &open), connect(&pool, &open));
        // One send ends: its connection is idle and its slot free in the same step, so a
        // look at that moment finds one idle connection for one free slot, nothing beyond.
        a.release_with(a_conn);
        assert!(pool.set_slots(2).is_empty());
        b.release_with(b_conn);
        assert_eq!((pool.idle(), open.load(Ordering::SeqCst)), (2, 2));
    }

    #[tokio::test]
    async fn a_send_that_has_not_taken_its_connection_yet_does_not_make_others_excess() {
        let open = Arc::new(AtomicUsize::new(0));
        let pool = pool(2);
        let (a, b) = (pool.slot().await, pool.slot().await);
        let (a_conn, b_conn) = (connect(&pool, &open), connect(&pool, &open));
        a.release_with(a_conn);
        // A new send holds the freed slot but has not taken the idle connection yet.
        let c = pool.slot().await;
        b.release_with(b_conn);
        assert_eq!(pool.idle(), 2, "two connections for two slots: none beyond");
        assert!(pool.set_slots(2).is_empty());
        drop(c);
        assert_eq!(open.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn losing_every_token_closes_idle_connections_now_and_busy_ones_after_their_send() {
        let open = Arc::new(AtomicUsize::new(0));
        let pool = pool(4);
        {
            let slots = [pool.slot().await, pool.slot().await, pool.slot().await];
            for slot in slots {
                slot.release_with(connect(&pool, &open));
            }
        }
        let busy = pool.slot().await;
        let in_use = pool.take_idle().unwrap();
        drop(pool.set_slots(0));
        assert_eq!((open.load(Ordering::SeqCst), pool.idle()), (1, 0));
        busy.release_with(in_use.0);
        assert_eq!(open.load(Ordering::SeqCst), 0, "closed as its send ends");
        assert_eq!(pool.slots(), 0);
    }

    #[tokio::test]
    async fn no_more_sends_at_once_than_slots() {
        let pool = pool(3);
        let at_once = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut sends = Vec::new();
        for _ in 0..20 {
            let (pool, at_once, peak) = (pool.clone(), at_once.clone(), peak.clone());
            sends.push(tokio::spawn(async move {
                let _slot = pool.slot().await;
                let now = at_once.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                at_once.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        for send in sends {
            send.await.unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 3);
    }
}
