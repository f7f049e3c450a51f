//! Herald's one rate-limiting primitive: a token bucket ([`TokenBucket`]),
//! and the two ways it is shared ([`Pacer`] for tasks that wait their turn,
//! [`KeyedBuckets`] for one bucket per client).
//!
//! Every limit in the daemon is this bucket: the retry budget (a retry takes
//! a token; a success puts some back), the email pacer (requests to the
//! provider at `email.max_per_sec`, pushed back by a 429's `retry-after`),
//! the relay's publish rate, the stream's connect admission and the
//! per-client abuse limits.
//!
//! Why not `governor` (the ecosystem's GCRA limiter, which the abuse limits
//! used before): the budget must *give back* tokens on success, the pacer
//! must be *pushed back* by the provider and must *look* for a free slot
//! without taking it (a batch gathers company meanwhile), and every wait must
//! follow tokio's clock so tests can pause it. governor does none of these;
//! the bucket below is a few lines of arithmetic.
//!
//! A bucket may go into debt: [`TokenBucket::take`] always takes and says how
//! long the caller must wait for the tokens it took (the "virtual
//! scheduling" form of GCRA: waiters are spaced exactly `1/rate` apart).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Tokens refilled at `rate` per second up to `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    /// Tokens as of `at`; negative when waiters are queued (debt).
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket. `rate` tokens per second (> 0), at most `burst` (≥ 1)
    /// held at once.
    pub fn new(rate: f64, burst: f64, now: Instant) -> TokenBucket {
        let burst = burst.max(1.0);
        TokenBucket {
            rate: rate.max(1e-9),
            burst,
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = self.at.max(now);
    }

    /// Tokens held at `now` (negative: owed to waiters).
    pub fn tokens(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }

    /// Takes `n` tokens if the bucket holds them; else takes nothing and says
    /// how long until it would.
    pub fn try_take(&mut self, n: f64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else {
            Err(self.wait_for(n))
        }
    }

    /// Takes `n` tokens, into debt if need be; returns how long the caller
    /// must wait before acting on them (zero when they were there).
    pub fn take(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n;
        self.wait_for(0.0)
    }

    /// How long until `n` tokens are held, without taking any.
    pub fn available_in(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.wait_for(n)
    }

    /// Puts `n` tokens back (never above `burst`).
    pub fn deposit(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens + n).min(self.burst);
    }

    /// No token before `pause` from now, whatever the bucket held.
    pub fn hold_off(&mut self, pause: Duration, now: Instant) {
        self.refill(now);
        let owed = (pause.as_secs_f64() * self.rate).min(f64::MAX / 2.0);
        self.tokens = self.tokens.min(1.0 - owed);
    }

    /// From `now` on, `rate` tokens per second (> 0); what was held stays.
    pub fn set_rate(&mut self, rate: f64, now: Instant) {
        self.refill(now);
        self.rate = rate.max(1e-9);
    }

    /// Whether the bucket is full again at `now` (its client can be forgotten).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }

    fn wait_for(&self, n: f64) -> Duration {
        let missing = n - self.tokens;
        if missing <= 0.0 {
            Duration::ZERO
        } else {
            // Checked: a debt no float can express waits "forever" (tokio
            // saturates a far deadline) instead of panicking.
            Duration::try_from_secs_f64(missing / self.rate).unwrap_or(Duration::MAX)
        }
    }
}

/// One bucket shared by tasks that wait their turn: each takes the next
/// slot and sleeps until it (the email senders, `1/rate` apart, no burst).
pub struct Pacer {
    bucket: Mutex<TokenBucket>,
}

impl Pacer {
    /// `per_sec` slots a second, none saved up.
    pub fn new(per_sec: f64) -> Pacer {
        Pacer {
            bucket: Mutex::new(TokenBucket::new(per_sec, 1.0, Instant::now())),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut TokenBucket, Instant) -> T) -> T {
        let now = Instant::now();
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut bucket, now)
    }

    /// Waits for this caller's slot.
    pub async fn until_ready(&self) {
        let wait = self.with(|b, now| b.take(1.0, now));
        tokio::time::sleep(wait).await;
    }

    /// Waits until the next slot is free, without taking it.
    pub async fn until_free(&self) {
        let wait = self.with(|b, now| b.available_in(1.0, now));
        tokio::time::sleep(wait).await;
    }

    /// No slot before `pause` from now (the provider said 429).
    pub fn hold_off(&self, pause: Duration) {
        self.with(|b, now| b.hold_off(pause, now));
    }

    /// `per_sec` slots a second from now on.
    pub fn set_rate(&self, per_sec: f64) {
        self.with(|b, now| b.set_rate(per_sec, now));
    }
}

/// One bucket per client key, in shards so that clients rarely wait on
/// each other's lock. A client's bucket starts full.
pub struct KeyedBuckets<K> {
    rate: f64,
    burst: f64,
    shards: Vec<Mutex<HashMap<K, TokenBucket>>>,
    hasher: std::collections::hash_map::RandomState,
}

const SHARDS: usize = 16;

impl<K: Hash + Eq + Clone> KeyedBuckets<K> {
    pub fn new(rate: f64, burst: f64) -> KeyedBuckets<K> {
        KeyedBuckets {
            rate,
            burst,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
        }
    }

    fn shard(&self, key: &K) -> std::sync::MutexGuard<'_, HashMap<K, TokenBucket>> {
        let index = (self.hasher.hash_one(key) as usize) % SHARDS;
        self.shards[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a token from `key`'s bucket, or says how long until it has one.
    pub fn try_take(&self, key: &K) -> Result<(), Duration> {
        let now = Instant::now();
        let mut shard = self.shard(key);
        match shard.get_mut(key) {
            Some(bucket) => bucket.try_take(1.0, now),
            None => {
                let mut bucket = TokenBucket::new(self.rate, self.burst, now);
                let taken = bucket.try_take(1.0, now);
                shard.insert(key.clone(), bucket);
                taken
            }
        }
    }

    /// Whether `key`'s bucket has a token, without taking it; else how
    /// long until it has one.
    pub fn peek(&self, key: &K) -> Result<(), Duration> {
        let now = Instant::now();
        match self.shard(key).get_mut(key) {
            Some(bucket) => match bucket.available_in(1.0, now) {
                wait if wait.is_zero() => Ok(()),
                wait => Err(wait),
            },
            None => Ok(()),
        }
    }

    /// Forgets every client whose bucket is full again: it would start full.
    pub fn forget_full(&self) {
        let now = Instant::now();
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            shard.retain(|_, bucket| !bucket.is_full(now));
            shard.shrink_to_fit();
        }
    }

    /// Clients with a bucket (for tests and status).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|s| s.len()).unwrap_or(0))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_grants_its_burst_then_refills_at_its_rate_never_above_it() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(1.0, 3.0, t0);
        let granted = (0..10).filter(|_| bucket.try_take(1.0, t0).is_ok()).count();
        assert_eq!(granted, 3);
        assert_eq!(bucket.try_take(1.0, t0), Err(Duration::from_secs(1)));
        assert!(bucket.try_take(1.0, t0 + Duration::from_secs(1)).is_ok());
        let later = t0 + Duration::from_secs(3600);
        let granted = (0..10)
            .filter(|_| bucket.try_take(1.0, later).is_ok())
            .count();
        assert_eq!(granted, 3, "never above the burst");
    }

    #[test]
    fn deposits_put_tokens_back_up_to_the_burst() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(0.001, 3.0, t0);
        for _ in 0..3 {
            bucket.try_take(1.0, t0).unwrap();
        }
        bucket.deposit(0.5, t0);
        bucket.deposit(0.5, t0);
        assert!(bucket.try_take(1.0, t0).is_ok(), "two halves make one");
        assert!(bucket.try_take(1.0, t0).is_err());
        bucket.deposit(10.0, t0);
        assert_eq!(bucket.tokens(t0), 3.0);
    }

    #[test]
    fn taking_into_debt_spaces_waiters_one_interval_apart() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(4.0, 1.0, t0);
        let waits: Vec<_> = (0..4).map(|_| bucket.take(1.0, t0)).collect();
        assert_eq!(
            waits,
            [0, 250, 500, 750].map(Duration::from_millis),
            "the first at once, then 1/rate apart"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_pacer_spaces_callers_by_the_rate() {
        let pacer = Pacer::new(4.0);
        let start = Instant::now();
        for _ in 0..9 {
            pacer.until_ready().await;
        }
        // Nine at 4/s: the ninth at 2 s, none earlier.
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_off_pushes_every_caller_back_and_looking_takes_no_slot() {
        let pacer = Pacer::new(2.0);
        let start = Instant::now();
        pacer.until_ready().await;
        pacer.until_free().await;
        pacer.until_free().await;
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(500),
            "looking takes no slot"
        );
        pacer.hold_off(Duration::from_secs(3));
        pacer.until_ready().await;
        assert_eq!(start.elapsed(), Duration::from_millis(3500));
    }

    #[tokio::test(start_paused = true)]
    async fn each_client_has_its_own_bucket_and_full_ones_are_forgotten() {
        let buckets: KeyedBuckets<u32> = KeyedBuckets::new(1.0, 2.0);
        assert!(buckets.try_take(&1).is_ok());
        assert!(buckets.try_take(&1).is_ok());
        assert_eq!(
            buckets.try_take(&1),
            Err(Duration::from_secs(1)),
            "client 1 is over"
        );
        assert!(buckets.try_take(&2).is_ok(), "client 2 is not");
        buckets.forget_full();
        assert_eq!(buckets.len(), 2, "neither is full yet");
        tokio::time::advance(Duration::from_secs(2)).await;
        buckets.forget_full();
        assert!(buckets.is_empty());
    }
}
