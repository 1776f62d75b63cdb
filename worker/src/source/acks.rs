//! acks: the consumer channel's acknowledgements, batched without waiting. A settled
//! job's ack is queued; one flusher at a time sends what is queued (starting at once when
//! none runs), and the acks settled while it sends go in its next round (group commit: the
//! busier the channel, the larger the batches, and an ack on an idle channel leaves at
//! once, so the prefetch window is never held by acks waiting for a timer). The acks of
//! every queued tag below the lowest tag still open (delivered, not settled) go as one
//! `multiple` ack; queued tags above it go one by one, so a tag whose job is not settled is
//! never acknowledged, and no ack waits on a slow job. Nacks and rejects are sent at once by the
//! caller, which then closes the tag here; a `multiple` ack only ever covers tags below
//! the lowest open one, so it cannot reach a tag still to be nacked.
//!
//! Only deliveries this source handed out are tracked; the ones the consumer had not
//! yielded yet (and those given back at shutdown) carry higher tags than any tracked one
//! that was settled, so no `multiple` ack reaches them either.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use lapin::options::BasicAckOptions;
use lapin::Acker;

/// The acknowledgements of one consumer channel.
#[derive(Default)]
pub(crate) struct Acks {
    state: Mutex<State>,
    /// Held while a round is sent, so rounds go out in order and a final flush waits for
    /// the one under way.
    sending: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    /// Delivered and not settled.
    open: BTreeSet<u64>,
    /// Settled by an ack not sent yet.
    queued: BTreeMap<u64, Acker>,
    /// A flusher task runs.
    flushing: bool,
}

/// What one flush sends: a `multiple` ack (its acker, and how many tags it covers) and
/// single ones.
struct Flush<T> {
    multiple: Option<(T, usize)>,
    single: Vec<T>,
}

impl Acks {
    /// A delivery with `tag` was handed out.
    pub(crate) fn delivered(&self, tag: u64) {
        self.state.lock().expect("acks lock").open.insert(tag);
    }

    /// The delivery `tag` was settled otherwise (nacked, rejected): its frame was sent.
    pub(crate) fn closed(&self, tag: u64) {
        self.state.lock().expect("acks lock").open.remove(&tag);
    }

    /// Queues the ack of `tag`; the flusher sends it at once or in its next round.
    pub(crate) fn ack(self: &Arc<Self>, tag: u64, acker: Acker) {
        let start = {
            let mut state = self.state.lock().expect("acks lock");
            state.open.remove(&tag);
            state.queued.insert(tag, acker);
            !std::mem::replace(&mut state.flushing, true)
        };
        if start {
            let acks = self.clone();
            tokio::spawn(async move { while acks.round(true).await {} });
        }
    }

    /// Sends every queued ack now, after any round under way (before the channel closes).
    pub(crate) async fn flush(&self) {
        while self.round(false).await {}
    }

    /// One round: takes what is queued and sends it, holding `sending` throughout, so each
    /// round's `multiple` ack is computed and sent after every earlier round went out (a
    /// later round never re-acknowledges a tag an earlier one still has to send). False
    /// when nothing was queued (a flusher, `ending` its rounds, then stops).
    async fn round(&self, ending: bool) -> bool {
        let _sending = self.sending.lock().await;
        match self.take(ending) {
            Some(flush) => {
                self.send(flush).await;
                true
            }
            None => false,
        }
    }

    /// What the next round sends, or `None` when nothing is queued (then a flusher, `ending`
    /// its rounds, stops).
    fn take(&self, ending: bool) -> Option<Flush<Acker>> {
        let mut state = self.state.lock().expect("acks lock");
        if state.queued.is_empty() {
            if ending {
                state.flushing = false;
            }
            return None;
        }
        let queued = std::mem::take(&mut state.queued);
        Some(plan(&state.open, queued))
    }

    async fn send(&self, flush: Flush<Acker>) {
        let Flush { multiple, single } = flush;
        if let Some((acker, covered)) = multiple {
            if let Err(error) = acker.ack(BasicAckOptions { multiple: true }).await {
                tracing::warn!(%error, jobs = covered, "acks did not reach the broker; the jobs will be redelivered");
            }
        }
        for acker in single {
            if let Err(error) = acker.ack(BasicAckOptions::default()).await {
                tracing::warn!(%error, "an ack did not reach the broker; the job will be redelivered");
            }
        }
    }
}

/// Splits `queued` at the lowest open tag: below it one `multiple` ack (at the highest
/// queued tag below it), above it single acks.
fn plan<T>(open: &BTreeSet<u64>, mut queued: BTreeMap<u64, T>) -> Flush<T> {
    let above = match open.first() {
        Some(lowest) => queued.split_off(lowest),
        None => BTreeMap::new(),
    };
    let covered = queued.len();
    let multiple = queued
        .into_values()
        .next_back()
        .map(|acker| (acker, covered));
    Flush {
        multiple,
        single: above.into_values().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tags `plan` acks: the `multiple` one (and how many it covers), the single ones.
    fn planned(open: &[u64], queued: &[u64]) -> (Option<(u64, usize)>, Vec<u64>) {
        let open: BTreeSet<u64> = open.iter().copied().collect();
        let Flush { multiple, single } = plan(&open, queued.iter().map(|t| (*t, *t)).collect());
        (multiple, single)
    }

    #[test]
    fn only_tags_below_the_lowest_open_one_go_as_one_multiple_ack() {
        // 1..=4 settled, 5 still sending, 6 and 8 settled, 7 not yet.
        assert_eq!(
            planned(&[5, 7], &[1, 2, 3, 4, 6, 8]),
            (Some((4, 4)), vec![6, 8])
        );
        // Nothing open: everything in one.
        assert_eq!(planned(&[], &[3, 9, 10]), (Some((10, 3)), vec![]));
        // The lowest tag still open: every ack goes alone.
        assert_eq!(planned(&[1], &[2, 3]), (None, vec![2, 3]));
    }
}
