//! Durable state: the [`Store`] trait and its backends.
//!
//! Everything Herald must not lose lives behind this trait: jobs, applications,
//! idempotency keys and the transactional outbox. A backend is chosen by the
//! scheme of `database_url` ([`connect`]); each backend owns its migrations
//! folder under `migrations/<backend>/`. Postgres ([`postgres`]) is the
//! production backend; SQLite ([`sqlite`]) is the embedded mode's, one file
//! and nothing to install.
//!
//! The one rule every backend keeps: a business row, its outbox event and the
//! idempotency key's `completed` outcome commit in **one** transaction.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::broker::{BrokerError, Envelope};
use crate::config::Config;
use crate::domain::{Application, Charge, Job};
use crate::idempotency::{Fingerprint, IdempotencyKey, KeyScope, StoredResponse};

/// A storage failure, classified for the HTTP layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or refused the connection: answer 503.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The application names a job that does not exist.
    #[error("job not found")]
    JobNotFound,
    /// This request's lease on its idempotency key was taken over (it ran past
    /// the lease); the other holder's outcome stands, so nothing was written.
    #[error("idempotency lease lost")]
    LeaseLost,
    /// Anything else: a bug or a broken database. Answer 500.
    #[error("database error: {0}")]
    Internal(String),
}

impl StoreError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Postgres error codes that mean "try again later", not "your request is bad".
fn is_unavailable_pg_code(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources (too many connections, disk full)
        || code.starts_with("57P") // admin shutdown, crash shutdown, cannot connect now
        || code == "40001" // serialization failure
        || code == "40P01" // deadlock detected
}

/// SQLite result codes (primary code: the low byte of the extended one) that
/// mean "try again later": busy, locked, I/O error, disk full, cannot open.
fn is_unavailable_sqlite_code(code: Option<&str>) -> bool {
    let primary = code.and_then(|c| c.parse::<i32>().ok()).map(|c| c & 0xff);
    matches!(primary, Some(5 | 6 | 10 | 13 | 14))
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => StoreError::Unavailable(e.to_string()),
            sqlx::Error::Database(db) => {
                let unavailable = if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                    is_unavailable_sqlite_code(db.code().as_deref())
                } else {
                    db.code().is_some_and(|c| is_unavailable_pg_code(&c))
                };
                if unavailable {
                    StoreError::Unavailable(e.to_string())
                } else {
                    StoreError::Internal(e.to_string())
                }
            }
            _ => StoreError::Internal(e.to_string()),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        match e {
            sqlx::migrate::MigrateError::Execute(inner) => inner.into(),
            other => StoreError::Internal(other.to_string()),
        }
    }
}

/// A status column decoded into its enum through its serde names; an
/// unknown value is a decode error. Shared by both backends' row mappers.
fn status_column<R, T>(row: &R, column: &str) -> Result<T, sqlx::Error>
where
    R: sqlx::Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    T: serde::de::DeserializeOwned,
{
    let value: String = row.try_get(column)?;
    crate::domain::parse_status(&value)
        .ok_or_else(|| sqlx::Error::Decode(format!("unknown {column} `{value}`").into()))
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(value).map_err(|e| StoreError::Internal(e.to_string()))
}

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

/// The result of applying: a new application or the user's existing one.
#[derive(Debug, Clone)]
pub enum ApplyOutcome {
    Created(Application),
    AlreadyApplied(Application),
}

/// Turns an outcome into the HTTP response that is stored with the key.
pub type Render<'a, T> = &'a (dyn Fn(&T) -> StoredResponse + Send + Sync);

/// Unpublished outbox rows, for `/admin/status` and the lag gauges.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct OutboxStats {
    pub pending: i64,
    /// Age of the oldest unpublished row, 0 when none.
    pub lag_seconds: f64,
    /// Applications whose confirmation is recorded as sent: the durable
    /// count of emails, the same from every process and across restarts.
    pub emails_delivered: i64,
    /// Rows in the ledger (one per applied charge).
    pub ledger_entries: i64,
}

/// Herald's durable state. Implementations are cheap to share (`Arc<dyn Store>`).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The backend's name, for `/admin/status`.
    fn backend(&self) -> &'static str;

    /// Applies pending migrations.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Waits for the store's own background work (a dropped connection's
    /// queued ROLLBACK) before the process exits.
    async fn close(&self) {}

    /// One round trip, for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Jobs newest first, strictly older than the `before` cursor.
    async fn list_jobs(&self, limit: u32, before: Option<Uuid>) -> Result<Vec<Job>, StoreError>;

    async fn get_job(&self, id: Uuid) -> Result<Option<Job>, StoreError>;

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

    /// Inserts the job and its `job.posted` event, completing the key if any,
    /// in one transaction.
    async fn post_job(
        &self,
        job: &Job,
        lease: Option<&KeyLease>,
        render: Render<'_, Job>,
    ) -> Result<StoredResponse, StoreError>;

    /// Inserts the application and its `application.submitted` event — or finds
    /// the user's existing application for the job — completing the key if
    /// any, in one transaction.
    async fn submit_application(
        &self,
        application: &Application,
        lease: Option<&KeyLease>,
        render: Render<'_, ApplyOutcome>,
    ) -> Result<(ApplyOutcome, StoredResponse), StoreError>;

    /// One application, only if it belongs to `user_id`.
    async fn get_application(
        &self,
        id: Uuid,
        user_id: &str,
    ) -> Result<Option<Application>, StoreError>;

    /// Inserts the charge and its `charge.created` event and completes the
    /// (required) key, in one transaction.
    async fn create_charge(
        &self,
        charge: &Charge,
        lease: &KeyLease,
        render: Render<'_, Charge>,
    ) -> Result<StoredResponse, StoreError>;

    /// One charge, only if it belongs to `user_id`.
    async fn get_charge(&self, id: Uuid, user_id: &str) -> Result<Option<Charge>, StoreError>;

    async fn outbox_stats(&self) -> Result<OutboxStats, StoreError>;

    /// The OutboxRelay's step for one topic (each topic is its own lane):
    /// claims up to `limit` due, unsettled rows of `topic` that no batch
    /// owns (Postgres: `FOR UPDATE SKIP LOCKED`, so several relays never
    /// claim the same row; SQLite: one write transaction that skips rows a
    /// consumer holds a lease on), hands them to `relay`, and records what
    /// it did: a row published (again) keeps the new copy's broker id; a
    /// row whose copy the broker still holds is only looked at again after
    /// `check_after`. Rows of a `fan_out` topic settle on publish. A failure
    /// (or a crash before the commit) leaves the rows as they were.
    async fn relay_due_events(
        &self,
        topic: &str,
        limit: i64,
        check_after: Duration,
        fan_out: bool,
        relay: RelayFn<'_>,
    ) -> Result<RelayStep, StoreError>;

    /// Makes the still-deliverable ones among `envelopes` (copies read by
    /// `consumer`) the members of a new batch `batch_id`, due now, in one
    /// transaction; says what became of each envelope, in order. A member
    /// belongs to that batch until it settles: every send of the batch
    /// carries the same members under the same key.
    async fn form_batch(
        &self,
        consumer: &str,
        batch_id: Uuid,
        envelopes: &[Envelope],
    ) -> Result<Vec<Admission>, StoreError>;

    /// Claims the oldest due, unsettled batch of `consumer` (Postgres: row
    /// lock held through the send, skipping batches another sender holds;
    /// SQLite: a lease), hands it to `send`, and records the decision in one
    /// transaction: per member an inbox row + effect + settle, or a dead
    /// letter; or the whole batch retried, deferred, or dead-lettered.
    /// `None` when no batch is due.
    async fn send_due_batch(
        &self,
        consumer: &str,
        send: BatchSendFn<'_>,
    ) -> Result<Option<BatchResult>, StoreError>;

    /// A consumer's step for one delivered envelope: locks its outbox row
    /// (Postgres: `FOR UPDATE`; SQLite: a lease, so no transaction stays open
    /// during the send),
    /// drops it if already settled, recorded in `consumer`'s inbox or stale
    /// (its attempt count moved on), otherwise runs `deliver` and records
    /// the decision in the same transaction: inbox row + local effect +
    /// settle, a scheduled retry, a deferral, or a dead letter.
    async fn deliver_event(
        &self,
        consumer: &str,
        envelope: &Envelope,
        deliver: DeliverFn<'_>,
    ) -> Result<DeliveryResult, StoreError>;

    /// Open dead letters, newest first, optionally of one topic.
    async fn list_dead_letters(
        &self,
        topic: Option<&str>,
        limit: u32,
        before: Option<Uuid>,
    ) -> Result<Vec<DeadLetter>, StoreError>;

    /// Puts one dead letter's event back in the outbox with a fresh attempt
    /// count (the relay publishes it at its rate) and audits it. Replaying
    /// a letter already replayed changes nothing.
    async fn replay_dead_letter(&self, id: Uuid, actor: &str) -> Result<DlqAction, StoreError>;

    /// Replays every open dead letter (of `topic`); how many.
    async fn replay_dead_letters(
        &self,
        topic: Option<&str>,
        actor: &str,
    ) -> Result<u64, StoreError>;

    /// Closes a dead letter without delivering it, keeping an audit row.
    async fn discard_dead_letter(&self, id: Uuid, actor: &str) -> Result<DlqAction, StoreError>;

    /// Depth and oldest age of the open dead letters, per topic.
    async fn dlq_stats(&self) -> Result<Vec<DlqTopicStats>, StoreError>;

    /// The auditor's checks of the effectively-once invariants, from the
    /// database alone: for each [`Invariant`], how many rows break it (0 is
    /// the only healthy value). Events settled longer than `retention` ago
    /// are left out of the effect check (the janitor deletes their inbox
    /// rows); an event unsettled longer than `max_unsettled_age` is one.
    async fn audit(
        &self,
        max_unsettled_age: Duration,
        retention: Duration,
    ) -> Result<Vec<(Invariant, i64)>, StoreError>;

    /// One janitor pass: deletes at most `batch` rows of each kind: expired
    /// idempotency keys, settled outbox rows and inbox rows older than
    /// `retention`. Each delete is its own short statement.
    async fn purge_expired(&self, batch: u32, retention: Duration) -> Result<Purged, StoreError>;
}

/// The effectively-once invariants the auditor checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invariant {
    /// Every application has at most one sent email (one inbox row).
    OneEmailPerApplication,
    /// Every charge has at most one ledger entry.
    OneLedgerEntryPerCharge,
    /// No event is settled without its effect (an inbox row) or its dead letter.
    NoSettledEventWithoutEffect,
    /// No event stays unsettled past `audit.max_unsettled_age_secs`.
    NoEventUnsettledTooLong,
}

impl Invariant {
    pub const ALL: [Invariant; 4] = [
        Invariant::OneEmailPerApplication,
        Invariant::OneLedgerEntryPerCharge,
        Invariant::NoSettledEventWithoutEffect,
        Invariant::NoEventUnsettledTooLong,
    ];

    /// Its `invariant` label in `herald_audit_violations`.
    pub fn name(self) -> &'static str {
        match self {
            Invariant::OneEmailPerApplication => "one_email_per_application",
            Invariant::OneLedgerEntryPerCharge => "one_ledger_entry_per_charge",
            Invariant::NoSettledEventWithoutEffect => "no_settled_event_without_effect",
            Invariant::NoEventUnsettledTooLong => "no_event_unsettled_too_long",
        }
    }

    /// The instant the check's `$1` (`?1` on SQLite) stands for, if any.
    pub fn horizon(self, max_unsettled_age: Duration, retention: Duration) -> Option<Duration> {
        match self {
            Invariant::NoSettledEventWithoutEffect => Some(retention),
            Invariant::NoEventUnsettledTooLong => Some(max_unsettled_age),
            _ => None,
        }
    }

    /// The check, a count of offending rows, the same SQL on both backends
    /// but for the placeholder: `$1` (`?1`) is now minus [`Self::horizon`].
    pub fn query(self, sqlite: bool) -> &'static str {
        match (self, sqlite) {
            (Invariant::OneEmailPerApplication, _) => {
                "SELECT count(*) FROM (
                     SELECT o.aggregate_id FROM inbox i
                       JOIN outbox_events o ON o.event_id = i.event_id
                      WHERE i.consumer = 'email' AND o.topic = 'application.submitted'
                      GROUP BY o.aggregate_id HAVING count(*) > 1) AS twice"
            }
            (Invariant::OneLedgerEntryPerCharge, _) => {
                "SELECT count(*) FROM (
                     SELECT charge_id FROM ledger_entries
                      GROUP BY charge_id HAVING count(*) > 1) AS twice"
            }
            (Invariant::NoSettledEventWithoutEffect, false) => NO_EFFECT_PG,
            (Invariant::NoSettledEventWithoutEffect, true) => NO_EFFECT_SQLITE,
            (Invariant::NoEventUnsettledTooLong, false) => {
                "SELECT count(*) FROM outbox_events WHERE settled_at IS NULL AND created_at < $1"
            }
            (Invariant::NoEventUnsettledTooLong, true) => {
                "SELECT count(*) FROM outbox_events WHERE settled_at IS NULL AND created_at < ?1"
            }
        }
    }
}

/// Settled events of the consumed topics with neither an inbox row nor a
/// dead letter, settled since the horizon (`$1`).
const NO_EFFECT_PG: &str = "SELECT count(*) FROM outbox_events o
  WHERE o.settled_at > $1 AND o.topic IN ('application.submitted', 'charge.created')
    AND NOT EXISTS (SELECT 1 FROM inbox i WHERE i.event_id = o.event_id)
    AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.event_id = o.event_id)";
const NO_EFFECT_SQLITE: &str = "SELECT count(*) FROM outbox_events o
  WHERE o.settled_at > ?1 AND o.topic IN ('application.submitted', 'charge.created')
    AND NOT EXISTS (SELECT 1 FROM inbox i WHERE i.event_id = o.event_id)
    AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.event_id = o.event_id)";

/// What one janitor pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub keys: u64,
    pub outbox: u64,
    pub inbox: u64,
}

/// A dead letter as the admin API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub id: Uuid,
    pub event_id: Uuid,
    pub topic: String,
    pub consumer: String,
    pub attempts: i32,
    pub last_error: String,
    pub first_failed_at: chrono::DateTime<chrono::Utc>,
    pub dead_at: chrono::DateTime<chrono::Utc>,
}

/// What a replay or discard of one dead letter did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DlqAction {
    Replayed,
    Discarded,
    /// Already replayed: nothing done (replay is idempotent).
    AlreadyReplayed,
    /// Already discarded: nothing done.
    AlreadyDiscarded,
    NotFound,
}

/// Open dead letters of one topic.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DlqTopicStats {
    pub topic: String,
    pub depth: i64,
    pub oldest_age_seconds: f64,
}

/// A due outbox row, as the relay sees it.
#[derive(Debug, Clone)]
pub struct DueEvent {
    pub envelope: Envelope,
    /// The broker's id of the copy last published, while one is believed
    /// held; `None` when the row must be published (new, or rescheduled by a
    /// retry, a deferral or a dead-letter replay).
    pub stream_id: Option<String>,
    /// Published at least once before.
    pub published_before: bool,
}

/// What the relay did with one [`DueEvent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relayed {
    /// Published: the broker's id of the new copy.
    Published(String),
    /// The broker still holds the last copy: nothing published.
    StillHeld,
}

/// The relay's work on a claimed set of due rows, one answer per row in
/// order; `Err` leaves every row as it was.
pub type RelayFn<'a> = &'a (dyn Fn(Vec<DueEvent>) -> futures::future::BoxFuture<'static, Result<Vec<Relayed>, BrokerError>>
         + Send
         + Sync);

/// What [`Store::form_batch`] made of one envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Now a member of the new batch.
    Member,
    /// Already settled, or in the consumer's inbox.
    Duplicate,
    /// A copy published before the row's attempt count moved on.
    Stale,
    /// The row no longer exists.
    Gone,
    /// Already a member of an unsettled batch (a redelivered copy).
    Batched,
}

/// An outbox row's state, as far as admitting a copy of it goes.
#[derive(Debug, Clone, Copy)]
pub struct RowState {
    pub settled: bool,
    pub in_inbox: bool,
    pub batched: bool,
    pub attempts: i32,
}

/// The one rule, on both backends, for a copy read from the broker: is it
/// still to be delivered (`Member`), or already taken care of?
pub fn admit(row: Option<RowState>, copy_attempts: i32) -> Admission {
    match row {
        None => Admission::Gone,
        Some(r) if r.settled || r.in_inbox => Admission::Duplicate,
        Some(r) if r.batched => Admission::Batched,
        Some(r) if r.attempts != copy_attempts => Admission::Stale,
        Some(_) => Admission::Member,
    }
}

/// A batch, ready to send: its id is the request's idempotency key; its
/// members are in the order they were admitted (event id order).
#[derive(Debug, Clone)]
pub struct BatchToSend {
    pub id: Uuid,
    /// Sends already spent on this batch.
    pub attempts: i32,
    pub members: Vec<Envelope>,
}

/// What became of one member of a sent batch.
#[derive(Debug, Clone, PartialEq)]
pub enum MemberOutcome {
    /// Accepted by the provider: record it in the inbox and settle.
    Done,
    /// Refused for good: dead-letter this member alone.
    Dead { error: String },
}

/// A sender's verdict on one send of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchDecision {
    /// The provider answered for each member, in order.
    Answered(Vec<MemberOutcome>),
    /// Transient failure: spend an attempt, send the same batch after `after`.
    Retry { after: Duration, error: String },
    /// No retry budget: send it after `after`, spending no attempt.
    Defer { after: Duration },
    /// Permanent failure, or out of attempts: dead-letter every member.
    Dead { error: String },
}

/// What [`Store::send_due_batch`] recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchResult {
    pub id: Uuid,
    /// 1-based.
    pub attempt: i32,
    pub members: usize,
    pub decision: BatchDecision,
}

/// The per-member outcomes a batch decision records, in member order:
/// the provider's answers, or every member dead; none for a retry or a
/// deferral (the batch stays as it is). The same on both backends.
pub fn batch_outcomes(decision: &BatchDecision, members: usize) -> Vec<MemberOutcome> {
    match decision {
        BatchDecision::Answered(answers) => (0..members)
            .map(|i| {
                answers.get(i).cloned().unwrap_or(MemberOutcome::Dead {
                    error: "the provider's answer did not cover this email".into(),
                })
            })
            .collect(),
        BatchDecision::Dead { error } => vec![
            MemberOutcome::Dead {
                error: error.clone()
            };
            members
        ],
        BatchDecision::Retry { .. } | BatchDecision::Defer { .. } => Vec::new(),
    }
}

/// What a settled batch writes for one member.
enum MemberRecord<'a> {
    Done(DoneEvent<'a>),
    Dead(DeadEvent<'a>),
}

/// The records of a batch's members, in order, from the outcomes
/// [`batch_outcomes`] gave; the same on both backends.
fn member_records<'a>(
    consumer: &'a str,
    members: &'a [Envelope],
    aggregates: &'a [Uuid],
    outcomes: &'a [MemberOutcome],
    attempt: i32,
    first_at: chrono::DateTime<chrono::Utc>,
) -> impl Iterator<Item = MemberRecord<'a>> {
    members
        .iter()
        .zip(aggregates)
        .zip(outcomes)
        .map(move |((member, aggregate_id), outcome)| match outcome {
            MemberOutcome::Done => MemberRecord::Done(DoneEvent {
                consumer,
                event_id: member.event_id,
                topic: &member.topic,
                aggregate_id: *aggregate_id,
                attempt,
            }),
            MemberOutcome::Dead { error } => MemberRecord::Dead(DeadEvent {
                consumer,
                event_id: member.event_id,
                topic: &member.topic,
                aggregate_id: *aggregate_id,
                attempt,
                error,
                first_at,
            }),
        })
}

/// One delivered event to record, as both backends record it.
struct DoneEvent<'a> {
    consumer: &'a str,
    event_id: Uuid,
    topic: &'a str,
    aggregate_id: Uuid,
    /// The attempt that succeeded (1-based).
    attempt: i32,
}

/// One event to dead-letter, as both backends record it.
struct DeadEvent<'a> {
    consumer: &'a str,
    event_id: Uuid,
    topic: &'a str,
    aggregate_id: Uuid,
    /// The attempt that failed (1-based).
    attempt: i32,
    error: &'a str,
    first_at: chrono::DateTime<chrono::Utc>,
}

/// Sends one batch and says what to record.
pub type BatchSendFn<'a> =
    &'a (dyn Fn(BatchToSend) -> futures::future::BoxFuture<'static, BatchDecision> + Send + Sync);

/// Performs a delivery attempt, given the attempts already spent, and says
/// what to record.
pub type DeliverFn<'a> =
    &'a (dyn Fn(i32) -> futures::future::BoxFuture<'static, DeliveryDecision> + Send + Sync);

/// What one relay step did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RelayStep {
    /// Rows claimed.
    pub claimed: usize,
    /// Of those, rows published.
    pub published: usize,
}

/// A consumer's verdict on one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryDecision {
    /// The effect happened: record it in the inbox and settle.
    Done,
    /// Transient failure: spend an attempt and try again after `after`.
    Retry { after: Duration, error: String },
    /// No retry budget: try again after `after` without spending an attempt.
    Defer { after: Duration },
    /// Permanent failure, or out of attempts: dead-letter it.
    Dead { error: String },
}

/// How a delivered envelope was handled.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryResult {
    /// `deliver` ran; its decision is recorded. `attempt` is 1-based.
    Attempted {
        attempt: i32,
        decision: DeliveryDecision,
    },
    /// Already settled or in this consumer's inbox: nothing to do.
    Duplicate,
    /// A copy published before the row's attempt count moved on.
    Stale,
    /// The row no longer exists (settled and removed by the janitor).
    Gone,
    /// Another worker held the row past the lock timeout; it settles it, or
    /// the relay republishes it when it comes due.
    Busy,
}

/// Connects to the backend named by `database_url`'s scheme.
pub async fn connect(config: &Config) -> Result<Arc<dyn Store>, StoreError> {
    match config.database_url.scheme() {
        "postgres" | "postgresql" => Ok(Arc::new(postgres::PgStore::connect(config).await?)),
        "sqlite" => Ok(Arc::new(sqlite::SqliteStore::connect(config).await?)),
        other => Err(StoreError::Unavailable(format!(
            "unsupported database_url scheme `{other}`"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_decision_gives_each_member_its_own_outcome() {
        let dead = |e: &str| MemberOutcome::Dead { error: e.into() };
        let answered = BatchDecision::Answered(vec![MemberOutcome::Done, dead("refused")]);
        assert_eq!(
            batch_outcomes(&answered, 3),
            [
                MemberOutcome::Done,
                dead("refused"),
                dead("the provider's answer did not cover this email")
            ]
        );
        let all_dead = BatchDecision::Dead {
            error: "403".into(),
        };
        assert_eq!(batch_outcomes(&all_dead, 2), [dead("403"), dead("403")]);
        let retry = BatchDecision::Retry {
            after: Duration::from_secs(1),
            error: "503".into(),
        };
        assert!(
            batch_outcomes(&retry, 2).is_empty(),
            "a retry keeps the batch"
        );
    }

    #[test]
    fn a_copy_is_admitted_only_while_its_row_waits_for_it() {
        let row = |settled, in_inbox, batched, attempts| {
            Some(RowState {
                settled,
                in_inbox,
                batched,
                attempts,
            })
        };
        assert_eq!(admit(row(false, false, false, 0), 0), Admission::Member);
        assert_eq!(admit(None, 0), Admission::Gone);
        assert_eq!(admit(row(true, false, false, 0), 0), Admission::Duplicate);
        assert_eq!(admit(row(false, true, false, 0), 0), Admission::Duplicate);
        assert_eq!(admit(row(false, false, true, 0), 0), Admission::Batched);
        assert_eq!(admit(row(false, false, false, 2), 1), Admission::Stale);
    }
}
