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

    /// The OutboxRelay's step: claims up to `limit` due, unsettled rows of
    /// `topics` (Postgres: `FOR UPDATE SKIP LOCKED`, so several relays never
    /// claim the same row; SQLite: one write transaction that skips rows a
    /// consumer holds a lease on), hands them to `publish`, and only if that succeeded marks them
    /// published: due again after `redeliver_after` unless a consumer
    /// settles them first; rows of `fan_out_topics` settle at once. A
    /// publish failure (or a crash before the commit) leaves the rows as
    /// they were, to be claimed again.
    async fn relay_due_events(
        &self,
        limit: i64,
        redeliver_after: Duration,
        topics: &[&str],
        fan_out_topics: &[&str],
        publish: PublishFn<'_>,
    ) -> Result<RelayStep, StoreError>;

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

    /// One janitor pass: deletes at most `batch` rows of each kind: expired
    /// idempotency keys, settled outbox rows and inbox rows older than
    /// `retention`. Each delete is its own short statement.
    async fn purge_expired(&self, batch: u32, retention: Duration) -> Result<Purged, StoreError>;
}

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

/// Publishes a batch to the broker; `Ok` only if the broker took all of it.
pub type PublishFn<'a> = &'a (dyn Fn(Vec<Envelope>) -> futures::future::BoxFuture<'static, Result<(), BrokerError>>
         + Send
         + Sync);

/// Performs a delivery attempt, given the attempts already spent, and says
/// what to record.
pub type DeliverFn<'a> =
    &'a (dyn Fn(i32) -> futures::future::BoxFuture<'static, DeliveryDecision> + Send + Sync);

/// What one relay step did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RelayStep {
    /// Rows claimed and published.
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
