//! The phase-two retry policy: exponential backoff with jitter, a per-call timeout, and an end.

use std::time::Duration;

use crate::model::Timestamp;

/// How phase two retries a transaction whose branches fail, and when it gives up and flags it.
///
/// The delay before retry `n` (1-based) is `initial_backoff * multiplier^(n-1)`, capped at
/// `max_backoff`, then lowered by a random share of up to `jitter` so that many transactions failing
/// together do not retry in lockstep.
///
/// ```
/// use std::time::Duration;
/// use tcc_core::RetryPolicy;
/// let p = RetryPolicy { jitter: 0.0, ..RetryPolicy::default() };
/// assert_eq!(p.backoff(1, 0.5), p.initial_backoff);
/// assert_eq!(p.backoff(2, 0.5), p.initial_backoff * 2);
/// assert_eq!(p.backoff(100, 0.5), p.max_backoff);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Delay before the first retry.
    pub initial_backoff: Duration,
    /// Growth of the delay per retry.
    pub multiplier: f64,
    /// Largest delay between two rounds.
    pub max_backoff: Duration,
    /// Share (0 to 1) of each delay that is randomised away.
    pub jitter: f64,
    /// Rounds with a failure after which the transaction is flagged for an operator.
    pub max_attempts: u32,
    /// Longest a single call to a participant may take before it counts as failed.
    pub call_timeout: Duration,
}

impl Default for RetryPolicy {
    /// 0.5 s doubling to at most 60 s, 20% jitter, 12 rounds (about 6 minutes), 5 s per call.
    fn default() -> RetryPolicy {
        RetryPolicy {
            initial_backoff: Duration::from_millis(500),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(60),
            jitter: 0.2,
            max_attempts: 12,
            call_timeout: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// The delay before retry `attempt` (1-based), with `random` in `[0, 1)` choosing the jitter.
    pub fn backoff(&self, attempt: u32, random: f64) -> Duration {
        let exp = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let base = self.initial_backoff.as_secs_f64() * self.multiplier.max(1.0).powi(exp);
        let capped = base.min(self.max_backoff.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0) * random.clamp(0.0, 1.0);
        Duration::try_from_secs_f64(capped * (1.0 - jitter)).unwrap_or(self.max_backoff)
    }

    /// When to run the next round after `attempts` failed rounds, or `None` once the policy is spent.
    pub fn next_retry(&self, attempts: u32, now: Timestamp, random: f64) -> Option<Timestamp> {
        (attempts < self.max_attempts).then(|| now + self.backoff(attempts, random))
    }

    /// This policy with a transaction's own overrides applied. A retry interval longer than
    /// `max_backoff` raises the cap to it; zero values are ignored.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tcc_core::{RetryPolicy, TxOptions};
    /// let p = RetryPolicy::default().for_transaction(&TxOptions { retry_interval_ms: Some(120_000), call_timeout_ms: Some(250) });
    /// assert_eq!(p.initial_backoff, Duration::from_secs(120));
    /// assert_eq!(p.max_backoff, Duration::from_secs(120));
    /// assert_eq!(p.call_timeout, Duration::from_millis(250));
    /// ```
    pub fn for_transaction(&self, options: &crate::model::TxOptions) -> RetryPolicy {
        let mut p = self.clone();
        if let Some(ms) = options.retry_interval_ms.filter(|&ms| ms > 0) {
            p.initial_backoff = Duration::from_millis(ms);
            p.max_backoff = p.max_backoff.max(p.initial_backoff);
        }
        if let Some(ms) = options.call_timeout_ms.filter(|&ms| ms > 0) {
            p.call_timeout = Duration::from_millis(ms);
        }
        p
    }

    /// Checks that the policy makes sense.
    pub fn validate(&self) -> Result<(), crate::Error> {
        let bad = |m: &str| Err(crate::Error::InvalidInput(format!("retry policy: {m}")));
        if self.max_attempts == 0 {
            return bad("max_attempts must be at least 1");
        }
        if self.call_timeout.is_zero() {
            return bad("call_timeout must be positive");
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return bad("multiplier must be a finite number >= 1");
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return bad("jitter must be between 0 and 1");
        }
        if self.max_backoff < self.initial_backoff {
            return bad("max_backoff must not be below initial_backoff");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_up_to_the_cap() {
        let p = RetryPolicy { jitter: 0.0, ..RetryPolicy::default() };
        let delays: Vec<_> = (1..=9).map(|n| p.backoff(n, 0.0).as_millis()).collect();
        assert_eq!(delays, vec![500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000]);
    }

    #[test]
    fn jitter_only_shortens_within_its_share() {
        let p = RetryPolicy { jitter: 0.2, ..RetryPolicy::default() };
        for r in [0.0, 0.3, 0.999] {
            let d = p.backoff(3, r).as_millis();
            assert!((1600..=2000).contains(&d), "{d}");
        }
        assert_ne!(p.backoff(3, 0.0), p.backoff(3, 0.9));
    }

    #[test]
    fn the_policy_ends_after_max_attempts() {
        let p = RetryPolicy { max_attempts: 3, ..RetryPolicy::default() };
        assert!(p.next_retry(2, Timestamp(0), 0.0).is_some());
        assert!(p.next_retry(3, Timestamp(0), 0.0).is_none());
    }

    #[test]
    fn nonsense_policies_are_refused() {
        for p in [
            RetryPolicy { max_attempts: 0, ..RetryPolicy::default() },
            RetryPolicy { call_timeout: Duration::ZERO, ..RetryPolicy::default() },
            RetryPolicy { multiplier: f64::NAN, ..RetryPolicy::default() },
            RetryPolicy { jitter: 2.0, ..RetryPolicy::default() },
            RetryPolicy { max_backoff: Duration::ZERO, ..RetryPolicy::default() },
        ] {
            assert!(p.validate().is_err(), "{p:?}");
        }
        assert!(RetryPolicy::default().validate().is_ok());
    }
}
