//! KeyRegistry: resolves an `Idempotency-Key` into new / in-flight / replay /
//! mismatch (SPEC section 3).
//!
//! Two tiers. Redis ([`HotTier`]) answers replays of completed keys and
//! concurrent duplicates without a database query; Postgres is the truth and
//! decides everything Redis cannot prove. When a Redis call fails or times
//! out, the registry switches to *fallback* (database only), logs it and sets
//! `herald_redis_fallback` to 1; a periodic probe switches back when Redis
//! answers again.
//!
//! The actor owns that mode and the probe. Each resolution runs in its own
//! task, so one slow database round trip never queues the others behind it;
//! tasks report Redis failures back to the actor as messages.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tracing::{info, warn};

use crate::idempotency::hot_tier::{CachedOutcome, HotTier};
use crate::idempotency::StoredResponse;
use crate::store::{KeyClaim, KeyClaimRequest, KeyLease, Store, StoreError};
use crate::telemetry::metrics as m;

/// Messages the KeyRegistry handles.
pub enum KeyRegistryMsg {
    /// Resolve a key; the reply comes from a task spawned for this request.
    Resolve {
        claim: KeyClaimRequest,
        reply: RpcReplyPort<Result<KeyClaim, StoreError>>,
    },
    /// The request holding `lease` committed `response`: cache it in Redis
    /// and clear the in-flight marker, then reply. The request answers its
    /// client only after this, so a retry never finds a stale marker (409)
    /// for a request whose response the client already has.
    Completed {
        lease: KeyLease,
        response: StoredResponse,
        reply: RpcReplyPort<()>,
    },
    /// The request holding `lease` failed with a 5xx: forget the claim.
    Release { lease: KeyLease },
    /// A task saw Redis fail.
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
            KeyRegistryMsg::Resolve { claim, reply } => {
                let args = args.clone();
                tokio::spawn(async move {
                    let result = resolve(&args, &myself, &claim).await;
                    if let Ok(outcome) = &result {
                        m::idempotency_request(match outcome {
                            KeyClaim::New(_) => "new",
                            KeyClaim::Replay(_) => "replay",
                            KeyClaim::InFlight => "in_flight",
                            KeyClaim::Mismatch => "mismatch",
                        });
                    }
                    let _ = reply.send(result);
                });
            }
            KeyRegistryMsg::Completed {
                lease,
                response,
                reply,
            } => match args.hot.clone().filter(|_| args.mode.is_healthy()) {
                Some(hot) => {
                    let ttl = args.ttl;
                    tokio::spawn(async move {
                        let digest = lease.scope.digest(&lease.key);
                        let outcome = CachedOutcome {
                            fp: lease.fingerprint.to_hex(),
                            status: response.status,
                            body: response.body,
                        };
                        if let Err(e) = hot.store_completed(&digest, &outcome, ttl).await {
                            let _ = myself.cast(KeyRegistryMsg::RedisFailed(e.to_string()));
                        }
                        let _ = reply.send(());
                    });
                }
                None => {
                    let _ = reply.send(());
                }
            },
            KeyRegistryMsg::Release { lease } => {
                let args = args.clone();
                tokio::spawn(async move {
                    if let Err(e) = args.store.release_key(&lease).await {
                        // The lease expires on its own; a retry takes it over then.
                        warn!(error = %e, "could not release idempotency key; it frees when its lease expires");
                    }
                    if let Some(hot) = args.hot.as_ref().filter(|_| args.mode.is_healthy()) {
                        if let Err(e) = hot.clear_in_flight(&lease.scope.digest(&lease.key)).await {
                            let _ = myself.cast(KeyRegistryMsg::RedisFailed(e.to_string()));
                        }
                    }
                });
            }
            KeyRegistryMsg::RedisFailed(error) => {
                if args.mode.set_healthy(false) {
                    warn!(%error, "redis hot tier lost: idempotency served from the database alone (fallback)");
                    m::redis_fallback(true);
                }
            }
            KeyRegistryMsg::Probe => {
                if let Some(hot) = args.hot.clone() {
                    tokio::spawn(async move {
                        let result = hot.ping().await.map_err(|e| e.to_string());
                        let _ = myself.cast(KeyRegistryMsg::ProbeResult(result));
                    });
                }
            }
            KeyRegistryMsg::ProbeResult(Ok(())) => {
                if args.mode.set_healthy(true) {
                    info!("redis hot tier back: leaving fallback");
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

/// The two-tier resolution of one key.
async fn resolve(
    args: &KeyRegistryArgs,
    myself: &ActorRef<KeyRegistryMsg>,
    claim: &KeyClaimRequest,
) -> Result<KeyClaim, StoreError> {
    let digest = claim.scope.digest(&claim.key);
    let hot = args.hot.as_ref().filter(|_| args.mode.is_healthy());
    let report = |e: &dyn std::fmt::Display| {
        let _ = myself.cast(KeyRegistryMsg::RedisFailed(e.to_string()));
    };

    let mut marked = false;
    if let Some(hot) = hot {
        match hot.cached(&digest).await {
            Ok(Some(cached)) => {
                return Ok(if cached.matches(claim.fingerprint) {
                    KeyClaim::Replay(cached.response())
                } else {
                    KeyClaim::Mismatch
                });
            }
            Ok(None) => match hot
                .mark_in_flight(&digest, claim.fingerprint, claim.lease)
                .await
            {
                Ok(true) => marked = true,
                // Someone holds the marker: a concurrent duplicate, answered
                // without a database query. (If that holder crashed, the marker
                // expires with its lease, exactly like the database's.)
                Ok(false) => return Ok(KeyClaim::InFlight),
                Err(e) => report(&e),
            },
            Err(e) => report(&e),
        }
    }

    let result = args.store.claim_key(claim).await;
    if let Some(hot) = hot {
        let tidy = match &result {
            // We hold the key: the marker stays until completion or release.
            Ok(KeyClaim::New(_)) => Ok(()),
            // Known to the database but not to Redis (flushed, restarted,
            // evicted): warm the cache again.
            Ok(KeyClaim::Replay(response)) => {
                let outcome = CachedOutcome {
                    fp: claim.fingerprint.to_hex(),
                    status: response.status,
                    body: response.body.clone(),
                };
                hot.store_completed(&digest, &outcome, args.ttl).await
            }
            _ if marked => hot.clear_in_flight(&digest).await,
            _ => Ok(()),
        };
        if let Err(e) = tidy {
            report(&e);
        }
    }
    result
}
