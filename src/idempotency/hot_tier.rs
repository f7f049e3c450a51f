//! The Redis hot tier of the KeyRegistry.
//!
//! Two kinds of Redis keys, both optimisations only:
//! - `herald:idem:done:<digest>`: a completed outcome (fingerprint, status,
//!   body), so a replay costs one Redis GET and no database query;
//! - `herald:idem:lock:<digest>`: an in-flight marker set with `SET NX PX`
//!   (the lease), so a concurrent duplicate is answered 409 without touching
//!   the database.
//!
//! Every call is bounded by `redis.command_timeout_ms`; any error or timeout
//! is returned to the KeyRegistry, which switches to database-only mode. The
//! database decides every outcome that Redis cannot prove, so losing any of
//! these keys (FLUSHALL, restart, failover) never causes a second effect.

use std::time::Duration;

use fred::prelude::*;
use fred::types::{Expiration, Value};
use serde::{Deserialize, Serialize};

use super::{Fingerprint, StoredResponse};
use crate::config::RedisConfig;

/// A failure of the hot tier; the caller falls back to the database.
#[derive(Debug, thiserror::Error)]
pub enum HotTierError {
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis held an unreadable value: {0}")]
    Corrupt(String),
}

/// A completed outcome as cached in Redis.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedOutcome {
    /// Hex fingerprint of the request that produced the response.
    pub fp: String,
    pub status: u16,
    pub body: String,
}

impl CachedOutcome {
    pub fn matches(&self, fp: Fingerprint) -> bool {
        self.fp == fp.to_hex()
    }
    pub fn response(self) -> StoredResponse {
        StoredResponse {
            status: self.status,
            body: self.body,
        }
    }
}

/// What Redis knows about a key, from one round trip.
#[derive(Debug)]
pub enum FastPath {
    /// Completed earlier: the cached outcome.
    Cached(CachedOutcome),
    /// Unknown to Redis; this caller now holds the in-flight marker.
    Marked,
    /// Another request holds the in-flight marker.
    Held,
}

/// GET the completed outcome, or else SET NX the in-flight marker: atomically,
/// in one round trip (so a replay never plants a marker).
const LOOKUP_OR_MARK: &str = r#"
local done = redis.call('GET', KEYS[1])
if done then return {1, done} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2} end
return {3}
"#;

/// Handle to Redis for the idempotency fast path.
#[derive(Clone)]
pub struct HotTier {
    /// fred client; reconnects on its own in the background.
    client: Client,
    /// Upper bound of one call, so a dead Redis costs at most this much latency.
    timeout: Duration,
}

impl HotTier {
    /// Builds the client and starts connecting in the background. Never waits
    /// for Redis: a daemon must start (in fallback) while Redis is down.
    pub fn connect(url: &str, config: &RedisConfig) -> Result<HotTier, HotTierError> {
        let timeout = Duration::from_millis(config.command_timeout_ms);
        let redis_config = Config::from_url(url)?;
        let client = Builder::from_config(redis_config)
            .with_performance_config(|p| {
                p.default_command_timeout = timeout;
            })
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_millis(1000);
                c.internal_command_timeout = timeout;
                c.max_command_attempts = 1;
                // Bounded queue to the connection task: a stalled Redis
                // cannot make commands pile up in memory.
                c.max_command_buffer_len = 10_000;
            })
            // Unlimited attempts, 200 ms apart: Redis coming back is noticed quickly.
            .set_policy(ReconnectPolicy::new_constant(0, 200))
            .build()?;
        client.connect();
        Ok(HotTier { client, timeout })
    }

    /// Maps fred's result; the time bound itself is fred's
    /// `default_command_timeout`, which also drops a command still queued
    /// while Redis is unreachable (so it is never sent late, after the
    /// request gave up on it).
    async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, fred::error::Error>>,
    ) -> Result<T, HotTierError> {
        fut.await.map_err(|e| {
            if e.kind() == &fred::error::ErrorKind::Timeout {
                HotTierError::Timeout(self.timeout)
            } else {
                HotTierError::Redis(e)
            }
        })
    }

    fn done_key(digest: &str) -> String {
        format!("herald:idem:done:{digest}")
    }

    fn lock_key(digest: &str) -> String {
        format!("herald:idem:lock:{digest}")
    }

    /// The cached outcome of a key, or else the in-flight marker for this caller.
    pub async fn lookup_or_mark(
        &self,
        digest: &str,
        fp: Fingerprint,
        lease: Duration,
    ) -> Result<FastPath, HotTierError> {
        let reply: Vec<Value> = self
            .bounded(self.client.eval(
                LOOKUP_OR_MARK,
                vec![Self::done_key(digest), Self::lock_key(digest)],
                vec![fp.to_hex(), lease.as_millis().to_string()],
            ))
            .await?;
        match reply.as_slice() {
            [tag, done] if tag.as_i64() == Some(1) => {
                let done = done
                    .as_str()
                    .ok_or_else(|| HotTierError::Corrupt("non-string outcome".into()))?;
                serde_json::from_str(&done)
                    .map(FastPath::Cached)
                    .map_err(|e| HotTierError::Corrupt(e.to_string()))
            }
            [tag] if tag.as_i64() == Some(2) => Ok(FastPath::Marked),
            [tag] if tag.as_i64() == Some(3) => Ok(FastPath::Held),
            other => Err(HotTierError::Corrupt(format!("unexpected reply {other:?}"))),
        }
    }

    /// Removes the in-flight marker (request finished or released).
    pub async fn clear_in_flight(&self, digest: &str) -> Result<(), HotTierError> {
        let _: i64 = self
            .bounded(self.client.del(Self::lock_key(digest)))
            .await?;
        Ok(())
    }

    /// Caches a completed outcome for `ttl` and clears the in-flight marker,
    /// in one pipelined round trip. (Leaving the marker to expire would save
    /// a command, but an evicted or deleted outcome would then expose a stale
    /// marker and turn replays into 409s for the rest of the lease.)
    pub async fn store_completed(
        &self,
        digest: &str,
        outcome: &CachedOutcome,
        ttl: Duration,
    ) -> Result<(), HotTierError> {
        let value =
            serde_json::to_string(outcome).map_err(|e| HotTierError::Corrupt(e.to_string()))?;
        let pipeline = self.client.pipeline();
        let _: () = pipeline
            .set(
                Self::done_key(digest),
                value,
                Some(Expiration::EX(ttl.as_secs().max(1) as i64)),
                None,
                false,
            )
            .await?;
        let _: () = pipeline.del(Self::lock_key(digest)).await?;
        let _: Vec<Value> = self.bounded(pipeline.all()).await?;
        Ok(())
    }

    /// A round trip to Redis; used by the KeyRegistry's probe.
    pub async fn ping(&self) -> Result<(), HotTierError> {
        let _: String = self.bounded(self.client.ping(None)).await?;
        Ok(())
    }
}
