//! The retry schedule of every outbound call: full jitter,
//! `sleep = random(0, min(cap, base · 2^attempt))`, with a downstream's
//! `Retry-After` (or Resend's `ratelimit_reset`) as a floor.
//!
//! Herald's own few lines rather than the design card's `backoff` crate:
//! `backoff` is unmaintained (RUSTSEC-2025-0012) and its randomisation
//! (`current ± factor · current`) cannot express full jitter, which is what
//! spreads the retries of many clients over the whole window instead of
//! synchronising them into waves. Whether a retry may happen at all is the
//! RetryBudget's decision ([`crate::actors::retry_budget`]); this module only
//! says *when*.

use std::time::Duration;

use rand::Rng;

use crate::config::RetryConfig;

/// The schedule: base, cap and how many attempts a delivery gets.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Scale of the first retry window (`retry.base_ms`).
    pub base: Duration,
    /// Upper bound of any window (`retry.cap_ms`).
    pub cap: Duration,
    /// Attempts before a delivery is dead-lettered (`retry.max_attempts`).
    pub max_attempts: u32,
    /// The longest floor a downstream may set (`retry.max_delay_ms`): a
    /// `Retry-After` beyond it is cut to it.
    pub max_delay: Duration,
}

impl From<&RetryConfig> for RetryPolicy {
    fn from(config: &RetryConfig) -> Self {
        RetryPolicy {
            base: Duration::from_millis(config.base_ms),
            cap: Duration::from_millis(config.cap_ms),
            max_attempts: config.max_attempts,
            max_delay: Duration::from_millis(config.max_delay_ms),
        }
    }
}

impl RetryPolicy {
    /// Upper end of the window after `attempt` failed attempts (1-based):
    /// `min(cap, base · 2^(attempt-1))`, saturating instead of overflowing.
    pub fn window(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(63);
        let factor = 1u64 << doublings;
        let base_ms = self.base.as_millis().min(u64::MAX as u128) as u64;
        Duration::from_millis(base_ms.saturating_mul(factor)).min(self.cap)
    }

    /// The delay before the next attempt after `attempt` failed ones: uniform
    /// in `[0, window]`, never below `floor` (the downstream's Retry-After),
    /// which itself is cut to `max_delay`.
    pub fn delay(&self, attempt: u32, floor: Option<Duration>, rng: &mut impl Rng) -> Duration {
        let window = self.window(attempt).as_millis().min(u64::MAX as u128) as u64;
        let jittered = Duration::from_millis(rng.random_range(0..=window));
        match floor {
            Some(floor) => jittered.max(self.bounded(floor)),
            None => jittered,
        }
    }

    /// A downstream's delay, cut to `max_delay`.
    pub fn bounded(&self, delay: Duration) -> Duration {
        delay.min(self.max_delay)
    }

    /// Whether a delivery that has now failed `attempt` times is out of attempts.
    pub fn exhausted(&self, attempt: u32) -> bool {
        attempt >= self.max_attempts
    }
}

/// The schedule of Herald's own reconnects (relay, consumers) after
/// `failures` consecutive failures: full jitter, 200 ms doubling to 5 s.
const RECONNECT: RetryPolicy = RetryPolicy {
    base: Duration::from_millis(200),
    cap: Duration::from_secs(5),
    max_attempts: u32::MAX,
    max_delay: Duration::from_secs(5),
};

/// How long to pause after `failures` consecutive failures of a loop that
/// talks to Redis or the database.
pub fn reconnect_pause(failures: u32) -> Duration {
    RECONNECT.delay(failures, None, &mut rand::rng())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
            max_attempts: 10,
            max_delay: Duration::from_secs(600),
        }
    }

    #[test]
    fn the_window_doubles_from_base_and_stops_at_the_cap() {
        let p = policy();
        let windows: Vec<u64> = (1..=12).map(|a| p.window(a).as_secs()).collect();
        assert_eq!(windows, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(p.window(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn delays_spread_uniformly_over_the_whole_window() {
        let p = policy();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // attempt 6: window 32 s. Ten buckets of 3.2 s each get ~10 % each.
        let mut buckets = [0u32; 10];
        let n = 10_000;
        for _ in 0..n {
            let d = p.delay(6, None, &mut rng).as_secs_f64();
            assert!((0.0..=32.0).contains(&d));
            buckets[((d / 3.2) as usize).min(9)] += 1;
        }
        for (i, &count) in buckets.iter().enumerate() {
            let share = count as f64 / n as f64;
            assert!((0.08..0.12).contains(&share), "bucket {i}: {share}");
        }
    }

    #[test]
    fn a_retry_after_is_a_floor_not_a_replacement() {
        let p = policy();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let floor = Duration::from_secs(2);
        let delays: Vec<Duration> = (0..1000)
            .map(|_| p.delay(8, Some(floor), &mut rng))
            .collect();
        assert!(delays.iter().all(|d| *d >= floor));
        // Above the floor the jitter is kept (window 128 s).
        assert!(delays.iter().any(|d| *d > Duration::from_secs(60)));
    }

    #[test]
    fn a_floor_past_max_delay_is_cut_to_it() {
        let p = policy();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let absurd = Duration::from_secs(u64::MAX);
        for attempt in [1, 5, u32::MAX] {
            let d = p.delay(attempt, Some(absurd), &mut rng);
            assert_eq!(d, Duration::from_secs(600), "attempt {attempt}");
        }
    }

    #[test]
    fn attempts_run_out_at_max_attempts() {
        let p = policy();
        assert!(!p.exhausted(9));
        assert!(p.exhausted(10));
    }
}
