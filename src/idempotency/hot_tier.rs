//! The Redis hot tier of the KeyRegistry.
//!
//! One Redis key per scoped idempotency key, `herald:idem:<digest>`, an
//! optimisation only. It holds one of two things:
//! - the in-flight marker [`IN_FLIGHT`], planted with `SET NX PX <lease>`, so
//!   a concurrent duplicate is answered 409 without touching the database;
//! - the completed outcome (fingerprint, status, and the body when it is at
//!   most [`CACHED_BODY_MAX`] bytes, as JSON), written over the marker on
//!   completion, so a replay of a small outcome costs no database query.
//!   A larger body stays in the database alone (a key then costs about
//!   250 bytes of Redis; a cached body at most about 1.3 KB): the broker's
//!   streams share this Redis, and a day of 40 KB cover letters must not
//!   push them out.
//!
//! One command does the whole lookup: `SET key IN_FLIGHT NX PX lease GET`
//! either plants the marker (reply nil: the caller is first) or leaves the
//! key alone and returns what it holds (an outcome: replay; the marker: in
//! flight). Completion is one `SET … EX ttl` over the marker. No Lua and no
//! second key, so there is no stale marker to outlive its outcome. `NX` with
//! `GET` needs Redis 7.0 or later; the KeyRegistry's probe runs that very
//! command, so an older server keeps Herald in fallback with the reason logged.
//!
//! Every call is bounded by `redis.command_timeout_ms`; any error or timeout
//! is returned to the KeyRegistry, which switches to database-only mode. The
//! database decides every outcome that Redis cannot prove, so losing any of
//! these keys (FLUSHALL, restart, failover) never causes a second effect.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use fred::types::{Expiration, SetOptions};
use serde::{Deserialize, Serialize};

use super::{Fingerprint, StoredResponse};
use crate::config::RedisConfig;
use crate::telemetry::metrics as m;

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

/// The largest response body the hot tier keeps; a replay of a larger one
/// reads the database.
pub const CACHED_BODY_MAX: usize = 1024;

/// A completed outcome as cached in Redis.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedOutcome {
    /// Hex fingerprint of the request that produced the response.
    pub fp: String,
    pub status: u16,
    /// The response body, if it is small enough to cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

impl CachedOutcome {
    /// The outcome of `response` to the request fingerprinted `fp`, its body
    /// kept only up to [`CACHED_BODY_MAX`] bytes.
    pub fn of(fp: Fingerprint, response: &StoredResponse) -> CachedOutcome {
        CachedOutcome {
            fp: fp.to_hex(),
            status: response.status,
            body: (response.body.len() <= CACHED_BODY_MAX).then(|| response.body.clone()),
        }
    }

    pub fn matches(&self, fp: Fingerprint) -> bool {
        self.fp == fp.to_hex()
    }

    /// The response to replay, when its body was cached.
    pub fn response(self) -> Option<StoredResponse> {
        Some(StoredResponse {
            status: self.status,
            body: self.body?,
        })
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

/// The value of a key whose request is still running. A completed outcome is
/// JSON, so it always starts with `{` and is never mistaken for the marker.
const IN_FLIGHT: &str = "~";

/// Key the probe plants (and lets expire) to prove `SET NX PX GET` works.
const PROBE_KEY: &str = "herald:idem:probe";

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
        let client = crate::redis_client::client(url, timeout)?;
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

    fn key(digest: &str) -> String {
        format!("herald:idem:{digest}")
    }

    /// `SET key IN_FLIGHT NX PX lease GET`: plants the marker unless the key
    /// exists, and returns what it held (`None`: the marker is ours now).
    async fn set_marker_or_get(
        &self,
        key: String,
        lease: Duration,
    ) -> Result<Option<String>, HotTierError> {
        let lease_ms = lease.as_millis().clamp(1, i64::MAX as u128) as i64;
        self.bounded(self.client.set(
            key,
            IN_FLIGHT,
            Some(Expiration::PX(lease_ms)),
            Some(SetOptions::NX),
            true,
        ))
        .await
    }

    /// The cached outcome of a key, or else the in-flight marker for this
    /// caller: one round trip, and a replay never plants a marker.
    pub async fn lookup_or_mark(
        &self,
        digest: &str,
        lease: Duration,
    ) -> Result<FastPath, HotTierError> {
        match self.set_marker_or_get(Self::key(digest), lease).await? {
            None => Ok(FastPath::Marked),
            Some(held) if held == IN_FLIGHT => Ok(FastPath::Held),
            Some(done) => serde_json::from_str(&done)
                .map(FastPath::Cached)
                .map_err(|e| HotTierError::Corrupt(e.to_string())),
        }
    }

    /// Removes this caller's in-flight marker (request released or settled
    /// by the database). Should the key hold an outcome by then, deleting it
    /// only costs the next replay a database query.
    pub async fn clear_in_flight(&self, digest: &str) -> Result<(), HotTierError> {
        let _: i64 = self.bounded(self.client.del(Self::key(digest))).await?;
        Ok(())
    }

    /// Caches a completed outcome for `ttl`, over the in-flight marker.
    pub async fn store_completed(
        &self,
        digest: &str,
        outcome: &CachedOutcome,
        ttl: Duration,
    ) -> Result<(), HotTierError> {
        let value =
            serde_json::to_string(outcome).map_err(|e| HotTierError::Corrupt(e.to_string()))?;
        // Milliseconds, rounded down: the cache never outlives `ttl`.
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        if ttl_ms < 1 {
            // Nothing left to cache: drop the in-flight marker instead.
            let _: i64 = self.bounded(self.client.del(Self::key(digest))).await?;
            return Ok(());
        }
        let _: () = self
            .bounded(self.client.set(
                Self::key(digest),
                value,
                Some(Expiration::PX(ttl_ms)),
                None,
                false,
            ))
            .await?;
        Ok(())
    }

    /// The KeyRegistry's probe: the fast path's own command on a scratch key,
    /// so a Redis that answers PING but cannot serve it (read-only replica,
    /// a version before 7.0) is not taken for healthy.
    pub async fn probe(&self) -> Result<(), HotTierError> {
        let _ = self
            .set_marker_or_get(PROBE_KEY.to_string(), Duration::from_millis(1000))
            .await?;
        Ok(())
    }
}

/// Whether the hot tier is in use, shared by the protocol, the KeyRegistry
/// (which probes it), `/admin/status` and `/readyz`.
#[derive(Clone, Default)]
pub struct RedisMode {
    /// `None` without Redis configured; otherwise `true` while healthy.
    healthy: Option<Arc<AtomicBool>>,
}

impl RedisMode {
    pub fn configured(healthy: bool) -> Self {
        RedisMode {
            healthy: Some(Arc::new(AtomicBool::new(healthy))),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy
            .as_ref()
            .is_some_and(|h| h.load(Ordering::Relaxed))
    }

    /// `healthy`, `fallback` or `disabled` (no Redis configured).
    pub fn label(&self) -> &'static str {
        match &self.healthy {
            None => "disabled",
            Some(h) if h.load(Ordering::Relaxed) => "healthy",
            Some(_) => "fallback",
        }
    }

    /// A Redis call failed: idempotency is served from the database alone
    /// until a probe succeeds (logged and gauged once, when it changes).
    pub fn lost(&self, error: &dyn std::fmt::Display) {
        if self.set_healthy(false) {
            tracing::warn!(%error, "redis hot tier lost: idempotency served from the database alone (fallback)");
            m::redis_fallback(true);
        }
    }

    /// A probe succeeded: the fast path is on again.
    pub fn recovered(&self) {
        if self.set_healthy(true) {
            tracing::info!("redis hot tier healthy: fast path on (leaving fallback)");
            m::redis_fallback(false);
        }
    }

    /// Sets the mode; returns whether it changed.
    fn set_healthy(&self, healthy: bool) -> bool {
        match &self.healthy {
            Some(h) => h.swap(healthy, Ordering::Relaxed) != healthy,
            None => false,
        }
    }
}
