//! Capped exponential backoff for reconnecting (broker, SMTP probe, Redis), with jitter so
//! that many workers restarted together do not reconnect in lockstep.

use std::time::Duration;

/// Successive delays: `initial`, doubling, capped at `max`, each with up to 20% jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
}

impl Backoff {
    /// A backoff starting at `initial`, never longer than `max`.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            next: initial,
            initial,
            max,
        }
    }

    /// The delay to wait now; the following one doubles.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = base.mul_f64(0.2 * fastrand_fraction());
        (base + jitter).min(self.max)
    }

    /// Back to the initial delay after a success.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// A cheap pseudo-random fraction in [0, 1) from the clock; good enough for jitter.
fn fastrand_fraction() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    f64::from(nanos % 1000) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..6).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(100) && delays[0] <= Duration::from_millis(120));
        assert!(delays[1] >= Duration::from_millis(200) && delays[1] <= Duration::from_millis(240));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
        assert_eq!(delays[5], Duration::from_secs(1));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(120));
    }
}
