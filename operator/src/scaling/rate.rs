//! rate (pure: no kube, no I/O): the send rate one busy replica of a pipeline has shown,
//! for the `drainWithin` objective and the time-to-drain estimate.
//!
//! The broker's ack rate (management API) over the queue's consumers (live, by passive
//! declare) says what the replicas did, not what they could do: it counts only once jobs
//! have waited without a break (every consumer busy) and the consumer count has held for
//! [`STEADY_FOR`], since the management API's rate covers a sample interval that ended up
//! to one interval before it is read (a rate read just after a scale-up still shows the old
//! count's work). Accepted samples are smoothed; the last measured value is kept while
//! nothing new can be measured (an idle pipeline has not become slower).

use std::time::Duration;

/// The management API's default sample interval (`collect_statistics_interval`).
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// How long the consumers must have been the same and busy before an ack rate counts: the
/// rate covers one sample interval that ended up to one interval before it is read.
pub const STEADY_FOR: Duration = Duration::from_secs(10);

/// The measured per-replica rate, with what it needs to judge the next sample.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateMeter {
    rate: Option<f64>,
    /// The live consumer count and since when it has held.
    consumers: Option<(u32, Duration)>,
    /// Since when jobs have been waiting without a break (every consumer busy).
    busy_since: Option<Duration>,
}

impl RateMeter {
    /// Weight of a new accepted sample.
    const NEW_WEIGHT: f64 = 0.5;

    /// A meter that starts from a rate measured before (kept in the pipeline's status
    /// across operator restarts).
    pub fn starting_at(rate: Option<f64>) -> RateMeter {
        RateMeter {
            rate: rate.filter(|r| r.is_finite() && *r > 0.0),
            ..RateMeter::default()
        }
    }

    /// Records a live reading of the queue (a passive declare): its consumers and ready jobs.
    pub fn observe(&mut self, at: Duration, consumers: u32, ready: u64) {
        let since = match self.consumers {
            Some((count, since)) if count == consumers => since,
            _ => at,
        };
        self.consumers = Some((consumers, since));
        self.busy_since = if ready > 0 {
            Some(self.busy_since.unwrap_or(at))
        } else {
            None
        };
    }

    /// Takes the broker's ack rate read at `at`; returns the rate now believed.
    pub fn sample(&mut self, at: Duration, ack_rate: f64) -> Option<f64> {
        let held = |since: Duration| at.saturating_sub(since) >= STEADY_FOR;
        let steady = match self.consumers {
            Some((count, since)) if count > 0 && held(since) => Some(count),
            _ => None,
        };
        let busy = self.busy_since.is_some_and(held);
        if let (Some(count), true) = (steady, busy) {
            if ack_rate > 0.0 && ack_rate.is_finite() {
                let per_replica = ack_rate / f64::from(count);
                self.rate = Some(match self.rate {
                    Some(old) => old + (per_replica - old) * Self::NEW_WEIGHT,
                    None => per_replica,
                });
            }
        }
        self.rate
    }

    /// The rate believed now.
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }
}

/// The rate as the status shows it: decimal text, at most one decimal place for rates
/// above 10 and two below.
pub fn status_text(rate: f64) -> String {
    if rate >= 10.0 {
        format!("{rate:.1}")
    } else {
        format!("{rate:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    /// Live readings every second from `from` to `to` (inclusive) with `consumers` and
    /// `ready`.
    fn busy(meter: &mut RateMeter, from: u64, to: u64, consumers: u32, ready: u64) {
        for t in from..=to {
            meter.observe(S(t), consumers, ready);
        }
    }

    #[test]
    fn a_rate_counts_once_the_consumers_held_and_were_busy_for_two_intervals() {
        let mut meter = RateMeter::default();
        busy(&mut meter, 0, 9, 2, 500);
        assert_eq!(meter.sample(S(9), 30.0), None, "not long enough");
        busy(&mut meter, 10, 10, 2, 500);
        assert_eq!(meter.sample(S(10), 40.0), Some(20.0));
    }

    #[test]
    fn an_idle_moment_says_nothing_about_what_a_replica_can_do() {
        let mut meter = RateMeter::starting_at(Some(20.0));
        busy(&mut meter, 0, 20, 2, 0);
        assert_eq!(meter.sample(S(20), 1.0), Some(20.0), "nothing waiting");
        busy(&mut meter, 21, 40, 2, 300);
        busy(&mut meter, 41, 41, 2, 0);
        busy(&mut meter, 42, 49, 2, 300);
        assert_eq!(meter.sample(S(49), 2.0), Some(20.0), "a break in the work");
        busy(&mut meter, 50, 80, 0, 300);
        assert_eq!(meter.sample(S(80), 0.0), Some(20.0), "no consumers");
    }

    #[test]
    fn a_scale_up_is_not_measured_until_the_new_count_held() {
        let mut meter = RateMeter::default();
        busy(&mut meter, 0, 10, 1, 900);
        assert_eq!(meter.sample(S(10), 20.0), Some(20.0));
        // Five replicas now, but the ack rate still shows one replica's work.
        busy(&mut meter, 11, 19, 5, 800);
        assert_eq!(meter.sample(S(15), 20.0), Some(20.0));
        assert_eq!(meter.sample(S(19), 60.0), Some(20.0));
        busy(&mut meter, 20, 21, 5, 500);
        assert_eq!(meter.sample(S(21), 100.0), Some(20.0));
    }

    #[test]
    fn accepted_samples_are_smoothed() {
        let mut meter = RateMeter::default();
        busy(&mut meter, 0, 10, 1, 10);
        meter.sample(S(10), 20.0);
        busy(&mut meter, 11, 15, 1, 10);
        assert_eq!(meter.sample(S(15), 30.0), Some(25.0));
    }

    #[test]
    fn a_remembered_rate_must_be_a_positive_number() {
        assert_eq!(RateMeter::starting_at(Some(f64::NAN)).rate(), None);
        assert_eq!(RateMeter::starting_at(Some(0.0)).rate(), None);
        assert_eq!(RateMeter::starting_at(Some(12.5)).rate(), Some(12.5));
    }

    #[test]
    fn the_status_text_keeps_small_rates_readable() {
        assert_eq!(status_text(41.63), "41.6");
        assert_eq!(status_text(0.5), "0.50");
    }
}
