//! acks: the consumer channel's acknowledgements, batched without waiting. A settled
//! job's ack is queued; one flusher at a time sends what is queued (starting at once when
//! none runs), and the acks settled while it sends go in its next round (group commit: the
//! busier the channel, the larger the batches, and an ack on an idle channel leaves at
//! once, so the prefetch window is never held by acks waiting for a timer). Each ack's
//! caller waits until its round was written, so a job counts as in flight until the broker
//! has its ack, as before batching. The acks of
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
use tokio::sync::oneshot;

/// An ack waiting for its round: the delivery's acker and who waits for the outcome.
type Waiting = (Acker, oneshot::Sender<Result<(), String>>);

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
    queued: BTreeMap<u64, Waiting>,
    /// A flusher task runs.
    flushing: bool,
}

/// What one round sends: the tags one `multiple` ack covers (in order: the ack goes at the
/// last), and those acked one by one.
struct Flush<T> {
    multiple: Vec<T>,
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

    /// Acknowledges `tag`: queued, and sent by the flusher at once or in its next round;
    /// resolves once its round was written (the error says why it was not).
    pub(crate) async fn ack(self: &Arc<Self>, tag: u64, acker: Acker) -> Result<(), String> {
        let (sender, written) = oneshot::channel();
        let start = {
            let mut state = self.state.lock().expect("acks lock");
            state.open.remove(&tag);
            state.queued.insert(tag, (acker, sender));
            !std::mem::replace(&mut state.flushing, true)
        };
        if start {
            let acks = self.clone();
            tokio::spawn(async move { while acks.round(true).await {} });
        }
        written
            .await
            .unwrap_or_else(|_| Err("the acknowledgements stopped".into()))
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
    fn take(&self, ending: bool) -> Option<Flush<Waiting>> {
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

    async fn send(&self, flush: Flush<Waiting>) {
        let Flush { multiple, single } = flush;
        if let Some((last, _)) = multiple.last() {
            let outcome = written(last.ack(BasicAckOptions { multiple: true }).await);
            for (_, waiter) in multiple {
                let _ = waiter.send(outcome.clone());
            }
        }
        for (acker, waiter) in single {
            let _ = waiter.send(written(acker.ack(BasicAckOptions::default()).await));
        }
    }
}

/// What lapin said of an ack, as its waiter takes it.
fn written(result: lapin::Result<bool>) -> Result<(), String> {
    match result {
        Ok(true) => Ok(()),
        Ok(false) => Err("the channel closed before the ack".into()),
        Err(error) => Err(error.to_string()),
    }
}

/// Splits `queued` at the lowest open tag: the tags below it go as one `multiple` ack (at
/// the highest of them), the ones above it singly.
fn plan<T>(open: &BTreeSet<u64>, mut queued: BTreeMap<u64, T>) -> Flush<T> {
    let above = match open.first() {
        Some(lowest) => queued.split_off(lowest),
        None => BTreeMap::new(),
    };
    Flush {
        multiple: queued.into_values().collect(),
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
        (multiple.last().map(|last| (*last, multiple.len())), single)
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
