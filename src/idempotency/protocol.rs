//! The idempotency protocol, the one every keyed route follows:
//!
//! 1. **resolve** the key ([`Idempotency::begin`]): Redis ([`HotTier`]) answers
//!    replays of completed keys and concurrent duplicates without a database
//!    query; the database decides everything Redis cannot prove;
//! 2. **claim** it: the database's atomic claim hands the request a
//!    [`KeyLease`] ([`NextAction::StartProcessing`]), or the answer is a replay
//!    (`Replay`), 409 in flight or 422 reused ([`IdempotencyError`]);
//! 3. **run**: the handler builds its response first, then writes the
//!    business rows, the outbox event and the key's outcome in **one**
//!    transaction (the store's intake methods take the lease and the response);
//! 4. **complete or release** ([`Idempotency::end`]): cache what committed;
//!    store an answer that wrote nothing (a 4xx, an existing application) as
//!    the key's outcome; forget the claim of a request that failed (5xx).
//!
//! The Redis mode lives in [`RedisMode`]: a failed Redis call switches to
//! fallback (database only) right here, on the request's task; the
//! KeyRegistry actor probes Redis and switches back.

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::hot_tier::{CachedOutcome, FastPath, HotTier, RedisMode};
use super::{Fingerprint, IdempotencyKey, KeyScope, StoredResponse};
use crate::store::{KeyClaim, KeyClaimRequest, KeyLease, Store, StoreError};
use crate::telemetry::metrics as m;

/// What the handler does next, after [`Idempotency::begin`].
#[derive(Debug)]
pub enum NextAction {
    /// Answer with this stored response (`Idempotent-Replayed: true`).
    Replay(StoredResponse),
    /// Run the request, holding this lease (`None`: it carries no key).
    StartProcessing(Option<KeyLease>),
}

/// A key the request may not run under now.
#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    #[error("a request with this Idempotency-Key is in flight")]
    InFlight,
    #[error("this Idempotency-Key was used with another request")]
    Mismatch,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How the request holding a lease ended.
#[derive(Debug)]
pub enum Ending {
    /// Its transaction committed this response as the key's outcome.
    Committed(StoredResponse),
    /// Answered without a business write (a 4xx, or the user's existing
    /// application): this becomes the key's outcome now.
    Unwritten(StoredResponse),
    /// Failed (a 5xx): the claim is forgotten so a retry can run at once.
    Failed,
}

/// The protocol's state: the store, the hot tier and its mode, the key
/// settings. Cheap to clone; one per process.
#[derive(Clone)]
pub struct Idempotency {
    store: Arc<dyn Store>,
    hot: Option<HotTier>,
    mode: RedisMode,
    lease: Duration,
    ttl: Duration,
}

impl Idempotency {
    /// `lease`: how long a claim holds before a retry may take it over;
    /// `ttl`: how long a key replays.
    pub fn new(
        store: Arc<dyn Store>,
        hot: Option<HotTier>,
        mode: RedisMode,
        lease: Duration,
        ttl: Duration,
    ) -> Self {
        Idempotency {
            store,
            hot,
            mode,
            lease,
            ttl,
        }
    }

    /// Resolves and claims the key of a request to `scope` with `body`
    /// (steps 1 and 2), counting the outcome.
    pub async fn begin(
        &self,
        scope: KeyScope,
        key: Option<IdempotencyKey>,
        body: &serde_json::Value,
    ) -> Result<NextAction, IdempotencyError> {
        let Some(key) = key else {
            return Ok(NextAction::StartProcessing(None));
        };
        let claim = KeyClaimRequest {
            fingerprint: Fingerprint::of_request(scope.method, scope.route, body),
            scope,
            key,
            lease: self.lease,
            ttl: self.ttl,
            sent_at: std::time::Instant::now(),
        };
        let resolved = self.resolve(&claim).await?;
        m::idempotency_request(match &resolved {
            KeyClaim::New(_) => "new",
            KeyClaim::Replay(..) => "replay",
            KeyClaim::InFlight => "in_flight",
            KeyClaim::Mismatch => "mismatch",
        });
        match resolved {
            KeyClaim::New(lease) => Ok(NextAction::StartProcessing(Some(lease))),
            KeyClaim::Replay(response, _) => Ok(NextAction::Replay(response)),
            KeyClaim::InFlight => Err(IdempotencyError::InFlight),
            KeyClaim::Mismatch => Err(IdempotencyError::Mismatch),
        }
    }

    /// Step 4 for the request holding `lease`. Returns once the outcome is
    /// where a retry will look for it, so a client never gets its answer
    /// before a retry could replay it.
    pub async fn end(&self, lease: KeyLease, ending: Ending) {
        match ending {
            Ending::Committed(response) => self.cache(&lease, &response).await,
            Ending::Unwritten(response) => match self.store.complete_key(&lease, &response).await {
                Ok(()) => self.cache(&lease, &response).await,
                Err(_) => self.release(lease).await,
            },
            Ending::Failed => self.release(lease).await,
        }
    }

    fn hot(&self) -> Option<&HotTier> {
        self.hot.as_ref().filter(|_| self.mode.is_healthy())
    }

    /// Caches a committed outcome in Redis, over the in-flight marker.
    async fn cache(&self, lease: &KeyLease, response: &StoredResponse) {
        if let Some(hot) = self.hot() {
            let outcome = CachedOutcome::of(lease.fingerprint, response);
            // The database keeps the key until at least `forgotten_by`
            // (measured from before the claim was sent), so this never
            // outlives it.
            let ttl = lease
                .forgotten_by
                .saturating_duration_since(std::time::Instant::now());
            let digest = lease.scope.digest(&lease.key);
            if let Err(e) = hot.store_completed(&digest, &outcome, ttl).await {
                self.mode.lost(&e);
            }
        }
    }

    /// Forgets a claim (should this fail, the lease expires anyway).
    async fn release(&self, lease: KeyLease) {
        if let Err(e) = self.store.release_key(&lease).await {
            warn!(error = %e, "could not release idempotency key; it frees when its lease expires");
        }
        if let Some(hot) = self.hot() {
            if let Err(e) = hot.clear_in_flight(&lease.scope.digest(&lease.key)).await {
                self.mode.lost(&e);
            }
        }
    }

    /// The two-tier resolution of one key.
    async fn resolve(&self, claim: &KeyClaimRequest) -> Result<KeyClaim, StoreError> {
        let digest = claim.scope.digest(&claim.key);
        let hot = self.hot();
        let mut marked = false;
        if let Some(hot) = hot {
            match hot.lookup_or_mark(&digest, claim.lease).await {
                Ok(FastPath::Cached(cached)) => {
                    if !cached.matches(claim.fingerprint) {
                        return Ok(KeyClaim::Mismatch);
                    }
                    // Redis expires it; the remaining time is not needed. A
                    // body too large to cache is read from the database.
                    if let Some(response) = cached.response() {
                        return Ok(KeyClaim::Replay(response, Duration::ZERO));
                    }
                }
                Ok(FastPath::Marked) => marked = true,
                // Someone holds the marker: a concurrent duplicate, answered
                // without a database query. (If that holder crashed, the
                // marker expires with its lease, exactly like the database's.)
                Ok(FastPath::Held) => return Ok(KeyClaim::InFlight),
                Err(e) => self.mode.lost(&e),
            }
        }

        let result = self.store.claim_key(claim).await;
        if let Some(hot) = hot {
            let tidy = match &result {
                // We hold the key: the marker stays until completion or release.
                Ok(KeyClaim::New(_)) => Ok(()),
                // Known to the database but not to Redis (flushed, restarted,
                // evicted): warm the cache again, for no longer than the
                // database keeps the key — Redis must never answer for a key
                // the database has forgotten.
                Ok(KeyClaim::Replay(response, remaining)) if !remaining.is_zero() => {
                    let outcome = CachedOutcome::of(claim.fingerprint, response);
                    hot.store_completed(&digest, &outcome, *remaining).await
                }
                _ if marked => hot.clear_in_flight(&digest).await,
                _ => Ok(()),
            };
            if let Err(e) = tidy {
                self.mode.lost(&e);
            }
        }
        result
    }
}
