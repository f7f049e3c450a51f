//! KeyRegistry: resolves an `Idempotency-Key` into new / in-flight / replay /
//! mismatch.
//!
//! Two tiers. Redis ([`HotTier`]) answers replays of completed keys and
//! concurrent duplicates without a database query; Postgres is the truth and
//! decides everything Redis cannot prove. When a Redis call fails or times
//! out, the registry switches to *fallback* (database only), logs it and sets
//! `herald_redis_fallback` to 1; a periodic probe switches back when Redis
//! answers again.
//!
//! The actor owns that mode: it is the only place that switches it, logs the
//! switch and sets the gauge, and it runs the probe. Resolutions themselves run
//! on the requesting task through a [`KeyRegistryHandle`] — no mailbox hop
//! per request (routing every request through the mailbox and a spawned task
//! cost about a fifth of the intake throughput in `herald bench intake`); a
//! Redis failure seen there is reported to the actor as a message.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::ActorSlot;
use tracing::{info, warn};

use crate::idempotency::hot_tier::{CachedOutcome, FastPath, HotTier};
use crate::idempotency::StoredResponse;
use crate::store::{KeyClaim, KeyClaimRequest, KeyLease, Store, StoreError};
use crate::telemetry::metrics as m;

/// Messages the KeyRegistry actor handles.
pub enum KeyRegistryMsg {
    /// A resolution saw Redis fail.
    RedisFailed(String),
    /// Time to probe Redis.
    Probe,
    /// The probe's answer.
    ProbeResult(Result<(), String>),
}

/// Whether the hot tier is in use, shared with `/admin/status` and `/readyz`.
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
    /// Sets the mode; returns whether it changed.
    fn set_healthy(&self, healthy: bool) -> bool {
        match &self.healthy {
            Some(h) => h.swap(healthy, Ordering::Relaxed) != healthy,
            None => false,
        }
    }
}

/// Everything a KeyRegistry needs; cloned into each restart.
#[derive(Clone)]
pub struct KeyRegistryArgs {
    pub store: Arc<dyn Store>,
    pub hot: Option<HotTier>,
    pub mode: RedisMode,
    /// How long completed keys are cached (same as the database's retention).
    pub ttl: Duration,
    pub probe_interval: Duration,
}

pub struct KeyRegistry;

pub struct KeyRegistryState {
    args: KeyRegistryArgs,
}

impl Actor for KeyRegistry {
    type Msg = KeyRegistryMsg;
    type State = KeyRegistryState;
    type Arguments = KeyRegistryArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: KeyRegistryArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        if args.hot.is_some() {
            myself.send_interval(args.probe_interval, || KeyRegistryMsg::Probe);
            let _ = myself.cast(KeyRegistryMsg::Probe);
        }
        m::redis_fallback(!args.mode.is_healthy() && args.hot.is_some());
        Ok(KeyRegistryState { args })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let args = &state.args;
        match message {
            KeyRegistryMsg::RedisFailed(error) => {
                if args.mode.set_healthy(false) {
                    warn!(%error, "redis hot tier lost: idempotency served from the database alone (fallback)");
                    m::redis_fallback(true);
                }
            }
            KeyRegistryMsg::Probe => {
                // Probed here, bounded by Redis's command timeout: requests
                // never wait on this actor's mailbox (they resolve keys
                // through the handle), only probes and failures queue here.
                if let Some(hot) = args.hot.clone() {
                    let result = hot.probe().await.map_err(|e| e.to_string());
                    let _ = myself.cast(KeyRegistryMsg::ProbeResult(result));
                }
            }
            KeyRegistryMsg::ProbeResult(Ok(())) => {
                if args.mode.set_healthy(true) {
                    info!("redis hot tier healthy: fast path on (leaving fallback)");
                    m::redis_fallback(false);
                }
            }
            KeyRegistryMsg::ProbeResult(Err(error)) => {
                if args.mode.set_healthy(false) {
                    warn!(%error, "redis probe failed: idempotency served from the database alone (fallback)");
                    m::redis_fallback(true);
                }
            }
        }
        Ok(())
    }
}

/// What the request path holds to resolve keys: the registry's shared state
/// plus the way to tell the actor about Redis failures.
#[derive(Clone)]
pub struct KeyRegistryHandle {
    args: KeyRegistryArgs,
    /// The running KeyRegistry actor (refilled by the supervisor on restart).
    actor: Arc<ActorSlot<KeyRegistryMsg>>,
}

impl KeyRegistryHandle {
    pub fn new(args: KeyRegistryArgs, actor: Arc<ActorSlot<KeyRegistryMsg>>) -> Self {
        KeyRegistryHandle { args, actor }
    }

    fn report(&self, error: &dyn std::fmt::Display) {
        if let Some(actor) = self.actor.get() {
            let _ = actor.cast(KeyRegistryMsg::RedisFailed(error.to_string()));
        }
    }

    fn hot(&self) -> Option<&HotTier> {
        self.args
            .hot
            .as_ref()
            .filter(|_| self.args.mode.is_healthy())
    }

    /// Resolves a key (two tiers) and counts the outcome.
    pub async fn resolve(&self, claim: &KeyClaimRequest) -> Result<KeyClaim, StoreError> {
        let result = self.resolve_two_tier(claim).await;
        if let Ok(outcome) = &result {
            m::idempotency_request(match outcome {
                KeyClaim::New(_) => "new",
                KeyClaim::Replay(..) => "replay",
                KeyClaim::InFlight => "in_flight",
                KeyClaim::Mismatch => "mismatch",
            });
        }
        result
    }

    /// The request holding `lease` committed `response`: cache it in Redis,
    /// over the in-flight marker. The request answers its client only
    /// after this, so a retry never finds a stale marker (409) for a request
    /// whose response the client already has.
    pub async fn completed(&self, lease: &KeyLease, response: &StoredResponse) {
        if let Some(hot) = self.hot() {
            let outcome = CachedOutcome {
                fp: lease.fingerprint.to_hex(),
                status: response.status,
                body: response.body.clone(),
            };
            let digest = lease.scope.digest(&lease.key);
            // The database keeps the key until at least `forgotten_by`
            // (measured from before the claim was sent), so this never
            // outlives it.
            let ttl = lease
                .forgotten_by
                .saturating_duration_since(std::time::Instant::now());
            if let Err(e) = hot.store_completed(&digest, &outcome, ttl).await {
                self.report(&e);
            }
        }
    }

    /// The request holding `lease` failed with a 5xx: forget the claim so a
    /// retry can run at once (should this fail, the lease expires anyway).
    pub async fn release(&self, lease: KeyLease) {
        if let Err(e) = self.args.store.release_key(&lease).await {
            warn!(error = %e, "could not release idempotency key; it frees when its lease expires");
        }
        if let Some(hot) = self.hot() {
            if let Err(e) = hot.clear_in_flight(&lease.scope.digest(&lease.key)).await {
                self.report(&e);
            }
        }
    }

    /// The two-tier resolution of one key.
    async fn resolve_two_tier(&self, claim: &KeyClaimRequest) -> Result<KeyClaim, StoreError> {
        let args = &self.args;
        let digest = claim.scope.digest(&claim.key);
        let hot = self.hot();
        let mut marked = false;
        if let Some(hot) = hot {
            match hot.lookup_or_mark(&digest, claim.lease).await {
                Ok(FastPath::Cached(cached)) => {
                    return Ok(if cached.matches(claim.fingerprint) {
                        // Redis expires it; the remaining time is not needed.
                        KeyClaim::Replay(cached.response(), Duration::ZERO)
                    } else {
                        KeyClaim::Mismatch
                    });
                }
                Ok(FastPath::Marked) => marked = true,
                // Someone holds the marker: a concurrent duplicate, answered
                // without a database query. (If that holder crashed, the
                // marker expires with its lease, exactly like the database's.)
                Ok(FastPath::Held) => return Ok(KeyClaim::InFlight),
                Err(e) => self.report(&e),
            }
        }

        let result = args.store.claim_key(claim).await;
        if let Some(hot) = hot {
            let tidy = match &result {
                // We hold the key: the marker stays until completion or release.
                Ok(KeyClaim::New(_)) => Ok(()),
                // Known to the database but not to Redis (flushed, restarted,
                // evicted): warm the cache again, for no longer than the
                // database keeps the key — Redis must never answer for a key
                // the database has forgotten.
                Ok(KeyClaim::Replay(response, remaining)) if !remaining.is_zero() => {
                    let outcome = CachedOutcome {
                        fp: claim.fingerprint.to_hex(),
                        status: response.status,
                        body: response.body.clone(),
                    };
                    hot.store_completed(&digest, &outcome, *remaining).await
                }
                Ok(KeyClaim::Replay(..)) if marked => hot.clear_in_flight(&digest).await,
                _ if marked => hot.clear_in_flight(&digest).await,
                _ => Ok(()),
            };
            if let Err(e) = tidy {
                self.report(&e);
            }
        }
        result
    }
}
