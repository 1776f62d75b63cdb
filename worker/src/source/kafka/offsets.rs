//! Which Kafka offsets may be stored for commit: per partition, only up to the first job not
//! done yet.
//!
//! The worker runs several jobs of one partition at once and they finish in any order. A
//! committed offset says "everything before this is done": storing the offset of a job that
//! finished while an earlier one is still being sent would lose the earlier one on a crash or
//! a rebalance. So each partition keeps the offsets handed out and not yet done; when a job
//! is done, the partition may store the lowest offset still open (or, with none open, the one
//! after the highest handed out), and only when that moved forward.
//!
//! Pure bookkeeping, no IO: the Kafka source stores what [`Offsets::done`] returns.

use std::collections::{BTreeSet, HashMap};

/// A topic partition.
pub type Partition = (String, i32);

#[derive(Debug)]
struct State {
    /// Handed out and not done.
    open: BTreeSet<i64>,
    /// The offset after the highest one handed out.
    next: i64,
    /// The position consumption stands at: the first offset handed out (where the partition
    /// was resumed from), then the last offset returned for storing.
    stored: i64,
}

/// The open offsets of every partition this consumer holds.
#[derive(Debug, Default)]
pub struct Offsets {
    partitions: HashMap<Partition, State>,
}

impl Offsets {
    /// `offset` of `partition` was handed out for processing.
    pub fn delivered(&mut self, partition: &Partition, offset: i64) {
        let state = match self.partitions.get_mut(partition) {
            Some(state) => state,
            None => self.partitions.entry(partition.clone()).or_insert(State {
                open: BTreeSet::new(),
                next: offset,
                stored: offset,
            }),
        };
        state.open.insert(offset);
        state.next = state.next.max(offset + 1);
    }

    /// `offset` of `partition` is done (sent, skipped or dead-lettered). Returns the offset
    /// to store for the partition (the next one to consume after a restart) when it moved
    /// forward: the lowest offset still open, or the one after the highest handed out.
    pub fn done(&mut self, partition: &Partition, offset: i64) -> Option<i64> {
        let state = self.partitions.get_mut(partition)?;
        if !state.open.remove(&offset) {
            return None;
        }
        let safe = state.open.first().copied().unwrap_or(state.next);
        if safe <= state.stored {
            return None;
        }
        state.stored = safe;
        Some(safe)
    }

    /// Offsets of `partition` handed out and not done.
    pub fn open(&self, partition: &Partition) -> usize {
        self.partitions.get(partition).map_or(0, |s| s.open.len())
    }

    /// Offsets handed out and not done, over every partition.
    #[cfg(test)]
    pub fn open_total(&self) -> usize {
        self.partitions.values().map(|s| s.open.len()).sum()
    }

    /// Forgets `partition` (revoked in a rebalance): a job of it that ends afterwards
    /// stores nothing, since another consumer owns the partition now.
    pub fn forget(&mut self, partition: &Partition) {
        self.partitions.remove(partition);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: i32) -> Partition {
        ("jobs".to_string(), n)
    }

    #[test]
    fn in_order_completions_store_the_offset_after_each() {
        let mut offsets = Offsets::default();
        for o in 10..13 {
            offsets.delivered(&p(0), o);
        }
        assert_eq!(offsets.done(&p(0), 10), Some(11));
        assert_eq!(offsets.done(&p(0), 11), Some(12));
        assert_eq!(offsets.done(&p(0), 12), Some(13));
        assert_eq!(offsets.open(&p(0)), 0);
    }

    #[test]
    fn a_later_job_done_first_stores_nothing_past_the_earlier_one() {
        let mut offsets = Offsets::default();
        for o in 0..4 {
            offsets.delivered(&p(0), o);
        }
        assert_eq!(offsets.done(&p(0), 2), None, "0 is still open");
        assert_eq!(offsets.done(&p(0), 3), None);
        assert_eq!(offsets.done(&p(0), 1), None, "0 still open");
        assert_eq!(
            offsets.done(&p(0), 0),
            Some(4),
            "everything up to 3 done: the next offset is 4"
        );
    }

    #[test]
    fn partitions_are_independent() {
        let mut offsets = Offsets::default();
        offsets.delivered(&p(0), 5);
        offsets.delivered(&p(1), 7);
        offsets.delivered(&p(0), 6);
        assert_eq!(offsets.done(&p(1), 7), Some(8));
        assert_eq!(offsets.done(&p(0), 6), None);
        assert_eq!(offsets.open_total(), 1);
        assert_eq!(offsets.done(&p(0), 5), Some(7));
    }

    #[test]
    fn gaps_in_offsets_are_skipped_over() {
        // Compacted topics and transaction markers leave offsets that are never delivered.
        let mut offsets = Offsets::default();
        offsets.delivered(&p(0), 3);
        offsets.delivered(&p(0), 9);
        assert_eq!(offsets.done(&p(0), 3), Some(9));
        assert_eq!(offsets.done(&p(0), 9), Some(10));
    }

    #[test]
    fn a_revoked_partition_stores_nothing_afterwards() {
        let mut offsets = Offsets::default();
        offsets.delivered(&p(0), 0);
        offsets.delivered(&p(0), 1);
        offsets.forget(&p(0));
        assert_eq!(offsets.done(&p(0), 0), None);
        assert_eq!(offsets.done(&p(0), 1), None);
        assert_eq!(offsets.open_total(), 0);
    }

    #[test]
    fn an_offset_done_twice_or_never_delivered_stores_nothing() {
        let mut offsets = Offsets::default();
        offsets.delivered(&p(0), 0);
        assert_eq!(offsets.done(&p(0), 0), Some(1));
        assert_eq!(offsets.done(&p(0), 0), None);
        assert_eq!(offsets.done(&p(0), 42), None);
    }
}
