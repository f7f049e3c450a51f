//! The unit of work, and the idempotency key it completes.
//!
//! Every state change Herald makes runs in one [`UnitOfWork`]: a transaction
//! the backend opens ([`Transact::begin`]) and hands to a use case
//! ([`crate::use_cases`]), which reads and writes through small per-table
//! operations (read a job for update, put a job, insert an application or a
//! charge, emit an outbox event). [`UnitOfWork::commit`] then writes the
//! buffered outbox rows and completes the request's idempotency key with its
//! answer, fenced on the key's holder, and commits: the business rows, their
//! events and the key's outcome are one transaction, on either backend,
//! whatever the use case. A unit dropped without commit rolls back.
//!
//! A key is claimed atomically before its unit opens (a free key is the
//! caller's at once; a taken one is a replay, in flight or a mismatch; an
//! expired key or a lapsed lease is taken over); the protocol around all of
//! this is [`crate::idempotency::protocol`].

use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use super::*;
use crate::domain::{Application, Charge, Job};
use crate::keys::{Fingerprint, IdempotencyKey, KeyScope, StoredResponse};

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

impl KeyClaimRequest {
    /// The lease this claim gives `holder`.
    pub fn lease_to(&self, holder: Uuid) -> KeyLease {
        KeyLease {
            scope: self.scope.clone(),
            key: self.key.clone(),
            fingerprint: self.fingerprint,
            holder,
            forgotten_by: self.sent_at + self.ttl,
        }
    }
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

/// A key the claim found taken, as the database holds it.
#[derive(Debug, Clone)]
pub struct TakenKey {
    pub fingerprint: Vec<u8>,
    /// `state = 'completed'`, with its stored response.
    pub completed: Option<StoredResponse>,
    /// Past `expires_at`: the key is forgotten, whatever its state.
    pub expired: bool,
    /// An `in_progress` key whose holder's lease ran out (it crashed).
    pub lease_lapsed: bool,
    /// How long the database keeps the key still.
    pub remaining: Duration,
}

/// What a claim does with a [`TakenKey`].
#[derive(Debug, Clone)]
pub enum TakenKeyDecision {
    /// Take it over (fenced on the previous holder), then it is `New`.
    TakeOver,
    /// Answer with this (never `New`).
    Answer(KeyClaim),
}

/// The one rule, on both backends, for a key the claim found taken: an
/// expired key starts afresh; the same request finds its lapsed lease
/// (its holder crashed) and takes it over, or replays its completed
/// response, or waits for the one in flight; another request is a mismatch.
pub fn decide_taken_key(taken: TakenKey, fingerprint: &Fingerprint) -> TakenKeyDecision {
    let same_request = taken.fingerprint == fingerprint.0;
    if taken.expired || (same_request && taken.completed.is_none() && taken.lease_lapsed) {
        return TakenKeyDecision::TakeOver;
    }
    TakenKeyDecision::Answer(match (same_request, taken.completed) {
        (false, _) => KeyClaim::Mismatch,
        (true, Some(response)) => KeyClaim::Replay(response, taken.remaining),
        (true, None) => KeyClaim::InFlight,
    })
}

/// The stored response of a taken key, read from its row (`state`,
/// `response_status` as a 64-bit integer, `response_body`): `Some` only for a
/// completed key. The same reading on both backends.
pub(crate) fn completed_response<R>(row: &R) -> Result<Option<StoredResponse>, sqlx::Error>
where
    R: sqlx::Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    if row.try_get::<String, _>("state")? != "completed" {
        return Ok(None);
    }
    Ok(Some(StoredResponse {
        status: stored_status(row.try_get("response_status")?),
        body: row.try_get("response_body")?,
    }))
}

/// A stored response status as the database keeps it (a small integer);
/// one that is not an HTTP status reads as 500, never as a wrapped number.
pub fn stored_status(column: i64) -> u16 {
    u16::try_from(column)
        .ok()
        .filter(|s| (100..600).contains(s))
        .unwrap_or(500)
}

/// An outbox event a unit of work emits: topic, aggregate id, payload.
pub type OutboxEvent = (&'static str, Uuid, serde_json::Value);

/// One line of the operators' audit trail (`admin_audit`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditEntry {
    /// What was done (`job.post`, `job.update`, `job.close`, `suppression.lift`).
    pub action: String,
    /// What it was done to (a job's id, an address).
    pub subject: String,
    /// JSON: the change.
    pub detail: String,
    /// Who: the operator's credential name (and their note).
    pub actor: String,
}

/// One open transaction of a backend, with the per-table operations the use
/// cases are written with. Opened by [`Transact::begin`]; ended by
/// [`UnitOfWork::commit`], or rolled back when dropped.
#[async_trait]
pub trait UnitOfWork: Send {
    /// A job, locked until this unit ends (its edits are serialised).
    async fn job_for_update(&mut self, id: Uuid) -> Result<Option<Job>, StoreError>;

    /// Writes a new job.
    async fn insert_job(&mut self, job: &Job) -> Result<(), StoreError>;

    /// Writes a changed job over its row.
    async fn update_job(&mut self, job: &Job) -> Result<(), StoreError>;

    /// Inserts an application; `false` (nothing written) when its user
    /// already applied to its job.
    async fn insert_application(&mut self, application: &Application) -> Result<bool, StoreError>;

    /// A user's application to a job.
    async fn application_of(
        &mut self,
        user_id: &str,
        job_id: Uuid,
    ) -> Result<Option<Application>, StoreError>;

    /// Inserts a charge.
    async fn insert_charge(&mut self, charge: &Charge) -> Result<(), StoreError>;

    /// Records what an operator did in `admin_audit`, in this unit: the
    /// entry exists exactly when the change does.
    async fn audit(&mut self, entry: &AuditEntry) -> Result<(), StoreError>;

    /// Emits an outbox event, written when the unit commits.
    fn emit(&mut self, event: OutboxEvent);

    /// The declared fast path of [`crate::use_cases::submit_application`]:
    /// a backend that can run the whole submission as one statement (the
    /// job's checks, the insert, its event and the key's completion with
    /// `created`) does so here, before anything else ran in this unit, and
    /// returns its outcome; the unit's commit then has nothing left to do.
    /// `None`: the use case takes the general path. The conformance suite
    /// runs both on the same cases.
    async fn submit_at_once(
        &mut self,
        _application: &Application,
        _created: &StoredResponse,
    ) -> Option<Result<ApplyOutcome, StoreError>> {
        None
    }

    /// Writes the emitted events, completes the unit's key (if it was
    /// opened for one) with `answer` — only if its lease still holds it,
    /// else nothing is written and the result is [`StoreError::LeaseLost`] —
    /// and commits.
    async fn commit(self: Box<Self>, answer: &StoredResponse) -> Result<(), StoreError>;
}

/// Opens units of work.
#[async_trait]
pub trait Transact: Send + Sync {
    /// A unit of work; opened for `key`, its commit completes that key.
    async fn begin(&self, key: Option<KeyLease>) -> Result<Box<dyn UnitOfWork>, StoreError>;
}

/// Idempotency keys: the claim a request makes before it runs, and the
/// release of one whose request failed. (A key is completed by the unit of
/// work that answered it.)
#[async_trait]
pub trait KeyStore: Send + Sync {
    /// Atomically creates the key `in_progress` or reports its state.
    async fn claim_key(&self, claim: &KeyClaimRequest) -> Result<KeyClaim, StoreError>;

    /// Forgets a claim whose request failed with a 5xx, so a retry can run.
    async fn release_key(&self, lease: &KeyLease) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(fingerprint: &[u8], completed: bool, expired: bool, lapsed: bool) -> TakenKey {
        TakenKey {
            fingerprint: fingerprint.to_vec(),
            completed: completed.then(|| StoredResponse {
                status: 201,
                body: "{}".into(),
            }),
            expired,
            lease_lapsed: lapsed,
            remaining: Duration::from_secs(60),
        }
    }

    fn decide(taken: TakenKey) -> &'static str {
        let fingerprint = Fingerprint::of_request("POST", "/r", &serde_json::json!({"a": 1}));
        match decide_taken_key(taken, &fingerprint) {
            TakenKeyDecision::TakeOver => "take over",
            TakenKeyDecision::Answer(KeyClaim::Replay(r, left)) => {
                assert_eq!((r.status, left), (201, Duration::from_secs(60)));
                "replay"
            }
            TakenKeyDecision::Answer(KeyClaim::InFlight) => "in flight",
            TakenKeyDecision::Answer(KeyClaim::Mismatch) => "mismatch",
            TakenKeyDecision::Answer(KeyClaim::New(_)) => unreachable!("never New"),
        }
    }

    #[test]
    fn a_taken_key_is_taken_over_replayed_waited_for_or_refused() {
        let same = Fingerprint::of_request("POST", "/r", &serde_json::json!({"a": 1})).0;
        let other = [0u8; 32];
        // Expired: afresh, whoever asks.
        assert_eq!(decide(taken(&other, true, true, false)), "take over");
        assert_eq!(decide(taken(&same, false, true, false)), "take over");
        // The same request: its crashed holder's lease, its answer, its wait.
        assert_eq!(decide(taken(&same, false, false, true)), "take over");
        assert_eq!(decide(taken(&same, true, false, false)), "replay");
        assert_eq!(decide(taken(&same, false, false, false)), "in flight");
        // Another request under the key, in flight or done: a mismatch.
        assert_eq!(decide(taken(&other, false, false, true)), "mismatch");
        assert_eq!(decide(taken(&other, true, false, false)), "mismatch");
    }

    #[test]
    fn a_stored_status_that_is_not_an_http_status_reads_as_500() {
        assert_eq!(stored_status(422), 422);
        assert_eq!(stored_status(-1), 500);
        assert_eq!(stored_status(70_000), 500);
        assert_eq!(stored_status(42), 500);
    }
}
