//! The retry policy: how many attempts a job gets and how long it waits between them.
//!
//! Pure arithmetic shared by the worker (which delay queue a failed job goes to) and the
//! operator (which delay queues to declare). The delay grows exponentially from `initial` by
//! `multiplier` and is capped at `max`; there is no jitter, because each distinct delay is a
//! queue with a fixed message TTL, and a bounded set of queues needs a bounded set of delays.

use std::collections::BTreeSet;
use std::time::Duration;

/// Attempts and capped exponential backoff between them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Total attempts including the first; after the last one fails transiently the job is
    /// dead-lettered. At least 1.
    pub max_attempts: u32,
    /// Delay after the first failed attempt.
    pub initial: Duration,
    /// Growth factor per attempt, at least 1.0.
    pub multiplier: f64,
    /// Upper bound of any delay.
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial: Duration::from_secs(5),
            multiplier: 2.0,
            max: Duration::from_secs(300),
        }
    }
}

/// Why a retry policy cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRetryPolicy(pub &'static str);

impl std::fmt::Display for InvalidRetryPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for InvalidRetryPolicy {}

impl RetryPolicy {
    /// Checks the bounds every user of the policy relies on.
    pub fn validate(&self) -> Result<(), InvalidRetryPolicy> {
        if self.max_attempts == 0 || self.max_attempts > 100 {
            return Err(InvalidRetryPolicy("max attempts must be between 1 and 100"));
        }
        if !(1.0..=10.0).contains(&self.multiplier) {
            return Err(InvalidRetryPolicy(
                "backoff multiplier must be between 1 and 10",
            ));
        }
        if self.initial < Duration::from_millis(1) || self.initial > self.max {
            return Err(InvalidRetryPolicy(
                "initial backoff must be at least 1ms and at most the maximum backoff",
            ));
        }
        if self.max > Duration::from_secs(24 * 3600) {
            return Err(InvalidRetryPolicy("maximum backoff must be at most 24h"));
        }
        Ok(())
    }

    /// The delay before attempt `failed_attempt + 1`, rounded to whole milliseconds.
    /// `failed_attempt` counts from 1.
    pub fn delay_after(&self, failed_attempt: u32) -> Duration {
        let exponent = failed_attempt.saturating_sub(1).min(64) as i32;
        let millis = self.initial.as_millis() as f64 * self.multiplier.powi(exponent);
        let capped = millis.min(self.max.as_millis() as f64);
        Duration::from_millis(capped.round() as u64)
    }

    /// Whether a job whose attempt `failed_attempt` failed transiently gets another one.
    pub fn has_attempt_after(&self, failed_attempt: u32) -> bool {
        failed_attempt < self.max_attempts
    }

    /// Every distinct delay the policy can produce, shortest first: one delay queue each.
    pub fn distinct_delays(&self) -> BTreeSet<Duration> {
        (1..self.max_attempts)
            .map(|a| self.delay_after(a))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_and_are_capped() {
        let policy = RetryPolicy {
            max_attempts: 8,
            initial: Duration::from_secs(5),
            multiplier: 2.0,
            max: Duration::from_secs(60),
        };
        let delays: Vec<u64> = (1..8).map(|a| policy.delay_after(a).as_secs()).collect();
        assert_eq!(delays, vec![5, 10, 20, 40, 60, 60, 60]);
        assert_eq!(policy.distinct_delays().len(), 5);
    }

    #[test]
    fn the_last_attempt_has_no_successor() {
        let policy = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        };
        assert!(policy.has_attempt_after(2));
        assert!(!policy.has_attempt_after(3));
    }

    #[test]
    fn one_attempt_means_no_delay_queue() {
        let policy = RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        };
        assert!(policy.distinct_delays().is_empty());
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.delay_after(u32::MAX), policy.max);
    }

    #[test]
    fn nonsense_policies_are_refused() {
        let bad = [
            RetryPolicy {
                max_attempts: 0,
                ..RetryPolicy::default()
            },
            RetryPolicy {
                multiplier: 0.5,
                ..RetryPolicy::default()
            },
            RetryPolicy {
                initial: Duration::from_secs(600),
                ..RetryPolicy::default()
            },
        ];
        for policy in bad {
            assert!(policy.validate().is_err(), "{policy:?}");
        }
        RetryPolicy::default().validate().unwrap();
    }
}
