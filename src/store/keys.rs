//! Idempotency keys in the store: claim, complete, release.
//!
//! A key is claimed atomically (a free key is the caller's at once; a taken
//! one is a replay, in flight or a mismatch; an expired key or a lapsed
//! lease is taken over), and completed with its response in the business
//! transaction that used it, fenced on the holder.

use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use super::*;
use crate::idempotency::{Fingerprint, IdempotencyKey, KeyScope, StoredResponse};

/// A request to claim an idempotency key.
#[derive(Debug, Clone)]
pub struct KeyClaimRequest {
    pub scope: KeyScope,
    pub key: IdempotencyKey,
    pub fingerprint: Fingerprint,
    /// How long the claim holds before another request may take it over.
    pub lease: Duration,
    /// How long the key is kept once claimed.
    pub ttl: Duration,
    /// When the claim was sent: the database's expiry of a key claimed now
    /// is no earlier than `sent_at + ttl`.
    pub sent_at: std::time::Instant,
}

/// Proof that this request holds a key's lease; needed to complete or release it.
#[derive(Debug, Clone)]
pub struct KeyLease {
    pub scope: KeyScope,
    pub key: IdempotencyKey,
    pub fingerprint: Fingerprint,
    /// Fencing token: only the current holder may complete or release the key.
    pub holder: Uuid,
    /// No later than the database forgets the key (the claim's send time
    /// plus the TTL): a cache of it must be gone by then.
    pub forgotten_by: std::time::Instant,
}

/// What the database says about a key.
#[derive(Debug, Clone)]
pub enum KeyClaim {
    /// Nobody held it (or its holder's lease expired): run the request.
    New(KeyLease),
    /// Completed earlier with the same fingerprint: replay this response;
    /// the database keeps the key for the duration given, at most.
    Replay(StoredResponse, Duration),
    /// Another request with this key is running.
    InFlight,
    /// The key was used for a different request.
    Mismatch,
}

/// Idempotency keys: the claim a request makes before it runs, and its end.
#[async_trait]
pub trait KeyStore: Send + Sync {
    /// Atomically creates the key `in_progress` or reports its state.
    async fn claim_key(&self, claim: &KeyClaimRequest) -> Result<KeyClaim, StoreError>;

    /// Stores an outcome that carries no business rows (a 4xx answer).
    async fn complete_key(
        &self,
        lease: &KeyLease,
        response: &StoredResponse,
    ) -> Result<(), StoreError>;

    /// Forgets a claim whose request failed with a 5xx, so a retry can run.
    async fn release_key(&self, lease: &KeyLease) -> Result<(), StoreError>;
}
