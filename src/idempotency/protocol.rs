//! The idempotency protocol, the one every write follows, as one call:
//! [`Idempotency::run`]`(scope, key, body, use case)`.
//!
//! 1. **resolve** the key: Redis ([`HotTier`]) answers replays of completed
//!    keys and concurrent duplicates without a database query; the database
//!    decides everything Redis cannot prove;
//! 2. **claim** it: the database's atomic claim hands the request a
//!    [`KeyLease`], or the answer is a replay, 409 in flight or 422 reused
//!    ([`IdempotencyError`]);
//! 3. **run** the use case in a unit of work opened for the key: the
//!    handler built its answer first, so the business rows, the outbox event
//!    and the key's outcome commit in **one** transaction;
//! 4. **cache or release**: cache what committed; a use case refused with a
//!    4xx (the job is closed) stores that answer as the key's outcome; a
//!    failure (5xx) forgets the claim so a retry can run at once.
//!
//! Its 4xx/5xx policy lives here and nowhere else. A request without a key
//! runs steps 3 alone.
//!
//! The Redis mode lives in [`RedisMode`]: a failed Redis call switches to
//! fallback (database only) right here, on the request's task; the
//! KeyRegistry actor probes Redis and switches back.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tracing::warn;
use tracing::Instrument;

use super::hot_tier::{CachedOutcome, FastPath, HotTier, RedisMode};
use super::{Fingerprint, IdempotencyKey, KeyScope, StoredResponse};
use crate::store::{
    KeyClaim, KeyClaimRequest, KeyLease, KeyStore, StoreError, Transact, UnitOfWork,
};
use crate::telemetry::metrics as m;

/// A key the request may not run under now, or the use case's failure.
#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    #[error("a request with this Idempotency-Key is in flight")]
    InFlight,
    #[error("this Idempotency-Key was used with another request")]
    Mismatch,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a use case answered, inside its unit of work (which then commits
/// with that answer as the key's outcome).
#[derive(Debug)]
pub enum Outcome {
    /// It wrote business rows (and an outbox event).
    Written(StoredResponse),
    /// It wrote nothing: the answer is what exists (the user's existing
    /// application).
    Unwritten(StoredResponse),
}

/// The answer to a write that ran (or replayed).
#[derive(Debug)]
pub struct Answer {
    pub response: StoredResponse,
    /// A replay of the key's stored outcome (`Idempotent-Replayed: true`).
    pub replayed: bool,
    /// It carried a key.
    pub keyed: bool,
    /// It committed business rows, and so an outbox event.
    pub wrote: bool,
}

/// The answer a use case's refusal is stored as (a 4xx: the job is
/// closed), or `None` for a failure (a 5xx) that must not be stored. Given
/// by the HTTP layer, which owns problem bodies.
pub type Refusal = fn(&StoreError) -> Option<StoredResponse>;

/// The protocol's state: the store, the hot tier and its mode, the key
/// settings. Cheap to clone; one per process.
#[derive(Clone)]
pub struct Idempotency {
    keys: Arc<dyn KeyStore>,
    units: Arc<dyn Transact>,
    refusal: Refusal,
    /// Woken after a commit that wrote an event (this process's
    /// OutboxRelay, so it relays at once without a database NOTIFY per
    /// transaction, which serialises commits; other processes' relays poll).
    committed: Arc<tokio::sync::Notify>,
    hot: Option<HotTier>,
    mode: RedisMode,
    lease: Duration,
    ttl: Duration,
}

impl Idempotency {
    /// `lease`: how long a claim holds before a retry may take it over;
    /// `ttl`: how long a key replays; `refusal`: which failures are stored.
    pub fn new(
        keys: Arc<dyn KeyStore>,
        units: Arc<dyn Transact>,
        refusal: Refusal,
        hot: Option<HotTier>,
        mode: RedisMode,
        lease: Duration,
        ttl: Duration,
    ) -> Self {
        Idempotency {
            keys,
            units,
            refusal,
            committed: Arc::default(),
            hot,
            mode,
            lease,
            ttl,
        }
    }

    /// Wakes `relay` after each commit that wrote an event.
    pub fn waking(mut self, relay: Arc<tokio::sync::Notify>) -> Self {
        self.committed = relay;
        self
    }

    /// Runs `work` (a use case: `|tx| Box::pin(async move { … })`, like
    /// sqlx's `Connection::transaction`) for a request to `scope` with `body` under
    /// `key`: the whole protocol, steps 1 to 4. Returns once the outcome is
    /// where a retry will look for it, so a client never gets its answer
    /// before a retry could replay it.
    pub async fn run<W>(
        &self,
        scope: KeyScope,
        key: Option<IdempotencyKey>,
        body: &serde_json::Value,
        work: W,
    ) -> Result<Answer, IdempotencyError>
    where
        W: for<'t> FnOnce(&'t mut dyn UnitOfWork) -> BoxFuture<'t, Result<Outcome, StoreError>>,
    {
        let lease = match key {
            None => None,
            Some(key) => match self.claim(scope, key, body).await? {
                Ok(lease) => {
                    // Failpoint: a request that holds its claim for a while
                    // (the in-flight duplicate case, on any backend).
                    if let Some(pause) = crate::failpoints::pause("intake-after-claim") {
                        tokio::time::sleep(pause).await;
                    }
                    Some(lease)
                }
                Err(response) => {
                    return Ok(Answer {
                        response,
                        replayed: true,
                        keyed: true,
                        wrote: false,
                    })
                }
            },
        };
        let keyed = lease.is_some();
        // The unit of work is the span traces continue from: the outbox
        // events it commits carry its context.
        let unit = tracing::info_span!("outbox commit", otel.kind = "internal");
        match self
            .work_in_unit(lease.clone(), work)
            .instrument(unit)
            .await
        {
            Ok((response, wrote)) => {
                if wrote {
                    self.committed.notify_one();
                }
                if let Some(lease) = &lease {
                    self.cache(lease, &response).await;
                }
                Ok(Answer {
                    response,
                    replayed: false,
                    keyed,
                    wrote,
                })
            }
            // It ran past its lease and another request took the key over:
            // that request's outcome stands, and this one wrote nothing.
            Err(StoreError::LeaseLost) => Err(IdempotencyError::InFlight),
            Err(e) => {
                if let Some(lease) = lease {
                    match (self.refusal)(&e) {
                        Some(refused) => self.store_refusal(lease, &refused).await,
                        None => self.release(lease).await,
                    }
                }
                Err(IdempotencyError::Store(e))
            }
        }
    }

    /// Steps 1 and 2: the lease to run under, or the stored response to
    /// replay; counts the outcome.
    async fn claim(
        &self,
        scope: KeyScope,
        key: IdempotencyKey,
        body: &serde_json::Value,
    ) -> Result<Result<KeyLease, StoredResponse>, IdempotencyError> {
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
            KeyClaim::New(lease) => Ok(Ok(lease)),
            KeyClaim::Replay(response, _) => Ok(Err(response)),
            KeyClaim::InFlight => Err(IdempotencyError::InFlight),
            KeyClaim::Mismatch => Err(IdempotencyError::Mismatch),
        }
    }

    /// Step 3: the use case in a unit of work opened for `lease`, committed
    /// with its answer. The answer, and whether it wrote.
    async fn work_in_unit<W>(
        &self,
        lease: Option<KeyLease>,
        work: W,
    ) -> Result<(StoredResponse, bool), StoreError>
    where
        W: for<'t> FnOnce(&'t mut dyn UnitOfWork) -> BoxFuture<'t, Result<Outcome, StoreError>>,
    {
        let mut unit = self.units.begin(lease).await?;
        let (response, wrote) = match work(&mut *unit).await? {
            Outcome::Written(response) => (response, true),
            Outcome::Unwritten(response) => (response, false),
        };
        unit.commit(&response).await?;
        Ok((response, wrote))
    }

    /// Stores a refusal as the key's outcome (in a unit of its own: the
    /// use case's was rolled back), then caches it; should that fail, the
    /// claim is released instead.
    async fn store_refusal(&self, lease: KeyLease, refused: &StoredResponse) {
        let stored = match self.units.begin(Some(lease.clone())).await {
            Ok(unit) => unit.commit(refused).await,
            Err(e) => Err(e),
        };
        match stored {
            Ok(()) => self.cache(&lease, refused).await,
            Err(_) => self.release(lease).await,
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
        if let Err(e) = self.keys.release_key(&lease).await {
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

        let result = self.keys.claim_key(claim).await;
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
