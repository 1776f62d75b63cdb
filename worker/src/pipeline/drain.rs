//! How a stopping worker spends its drain deadline: which held jobs it still sends and when
//! it gives the rest back.
//!
//! A worker told to stop (a scale-down, a rollout) has cancelled its consumer; it still holds
//! the jobs in flight and those the broker pushed before the cancel. Giving a held job back
//! makes it a redelivery on another replica, so the worker sends every held job that it can
//! finish before the deadline at the pace it has shown ([`Pace`]), gives back at once those
//! that would not fit (another replica can start them now rather than after the deadline),
//! and gives back any job still waiting to start once starting it could no longer finish in
//! time ([`DrainPlan::start_by`]). Pure: no clock, no IO; the pipeline feeds it measurements.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Kept back from the deadline for settling the last jobs and closing the connection.
pub const SETTLE_MARGIN: Duration = Duration::from_secs(1);

/// The send time this worker has shown: an exponentially weighted moving average of its
/// SMTP transactions (successful or refused; waits for an unavailable server excluded).
#[derive(Debug, Default)]
pub struct Pace {
    /// Microseconds; 0 until the first send.
    average_micros: AtomicU64,
}

impl Pace {
    /// Weight of the newest sample, out of 8.
    const NEW_WEIGHT: u64 = 2;

    /// Adds one send's duration.
    pub fn record(&self, took: Duration) {
        let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .average_micros
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 {
                    sample
                } else {
                    (old * (8 - Self::NEW_WEIGHT) + sample * Self::NEW_WEIGHT) / 8
                })
            });
    }

    /// The average send time, once there was a send.
    pub fn per_send(&self) -> Option<Duration> {
        match self.average_micros.load(Ordering::Relaxed) {
            0 => None,
            micros => Some(Duration::from_micros(micros)),
        }
    }
}

/// What a worker that just stopped consuming can still do within its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainPlan {
    /// How many held jobs that have not started (beyond those in flight) it still takes on;
    /// `None` when it has no pace yet and relies on [`DrainPlan::start_by`] alone.
    pub more: Option<usize>,
    /// After this long from the stop, a job that has not begun its send is given back: it
    /// could not be sent and settled before the deadline.
    pub start_by: Duration,
}

impl DrainPlan {
    /// The plan for `in_flight` jobs under way with `concurrency` slots, a drain `deadline`,
    /// the send time shown so far and the send-rate limit (messages per second), if any.
    pub fn new(
        deadline: Duration,
        concurrency: usize,
        in_flight: usize,
        per_send: Option<Duration>,
        rate_per_second: Option<u32>,
    ) -> DrainPlan {
        let budget = deadline.saturating_sub(SETTLE_MARGIN);
        let Some(per_send) = per_send.filter(|d| !d.is_zero()) else {
            return DrainPlan {
                more: None,
                start_by: budget,
            };
        };
        // Each slot runs its sends one after another; a send that starts must end in budget.
        let rounds = (budget.as_secs_f64() / per_send.as_secs_f64()).floor() as usize;
        let mut capacity = concurrency.max(1).saturating_mul(rounds);
        if let Some(rate) = rate_per_second.filter(|r| *r > 0) {
            // The limiter allows a second's worth at once, then `rate` a second.
            let by_rate = (f64::from(rate) * (1.0 + budget.as_secs_f64())).floor() as usize;
            capacity = capacity.min(by_rate);
        }
        DrainPlan {
            more: Some(capacity.saturating_sub(in_flight)),
            start_by: budget.saturating_sub(per_send),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn fast_sends_keep_every_held_job() {
        // 16 slots, 50 ms a send, 24 s of budget: thousands fit, far beyond any prefetch.
        let plan = DrainPlan::new(S(25), 16, 16, Some(MS(50)), None);
        assert_eq!(plan.more, Some(16 * 480 - 16));
        assert_eq!(plan.start_by, MS(23_950));
    }

    #[test]
    fn slow_sends_keep_only_what_fits_before_the_deadline() {
        // 2 slots, 4 s a send, 24 s budget: 6 rounds of 2, of which the 2 in flight are one.
        let plan = DrainPlan::new(S(25), 2, 2, Some(S(4)), None);
        assert_eq!(plan.more, Some(10));
        assert_eq!(plan.start_by, S(20));
    }

    #[test]
    fn a_send_longer_than_the_deadline_takes_nothing_more() {
        let plan = DrainPlan::new(S(25), 4, 3, Some(S(40)), None);
        assert_eq!(plan.more, Some(0));
        assert_eq!(plan.start_by, Duration::ZERO);
    }

    #[test]
    fn the_rate_limit_caps_what_fits() {
        // 10 a second over 24 s (plus the first second's burst) beats 16 slots of 10 ms.
        let plan = DrainPlan::new(S(25), 16, 0, Some(MS(10)), Some(10));
        assert_eq!(plan.more, Some(250));
    }

    #[test]
    fn without_a_pace_the_start_by_time_alone_decides() {
        let plan = DrainPlan::new(S(25), 16, 4, None, None);
        assert_eq!(plan.more, None);
        assert_eq!(plan.start_by, S(24));
    }

    #[test]
    fn a_deadline_below_the_margin_gives_everything_back() {
        let plan = DrainPlan::new(MS(500), 16, 0, Some(MS(10)), None);
        assert_eq!(plan.more, Some(0));
        assert_eq!(plan.start_by, Duration::ZERO);
    }

    #[test]
    fn the_pace_follows_recent_sends() {
        let pace = Pace::default();
        assert_eq!(pace.per_send(), None);
        pace.record(MS(100));
        assert_eq!(pace.per_send(), Some(MS(100)));
        for _ in 0..40 {
            pace.record(MS(20));
        }
        let now = pace.per_send().unwrap();
        assert!(now >= MS(20) && now < MS(21), "{now:?}");
    }
}
