//! The SQLite backend of [`Store`](super::Store): the embedded mode's store
//! (one process, one file, nothing to install; SQLite is compiled in).
//!
//! SQLite has one writer at a time and no row locks, so this backend keeps
//! the same guarantees differently from Postgres:
//!
//! - **One writer connection.** Every write runs in a `BEGIN IMMEDIATE`
//!   transaction on a pool of exactly one connection: writes queue in the
//!   pool instead of failing with `SQLITE_BUSY`, and a transaction that reads
//!   then writes (a key claim, an application) cannot be overtaken between
//!   the two. Reads use a separate pool of read-only connections; WAL lets
//!   them run beside the writer, each on a consistent snapshot.
//! - **Claims without `SKIP LOCKED`.** The relay's claim-publish-mark runs in
//!   one write transaction (the in-process broker accepts a batch in
//!   microseconds). A consumer does *not* hold a transaction while it sends
//!   an email: it takes a lease on the outbox row (`locked_by`,
//!   `locked_until`) in one short transaction, delivers, and records the
//!   outcome in a second one fenced on its lease. The relay skips leased
//!   rows, as Postgres' `SKIP LOCKED` skips locked ones. Leases left by a
//!   killed process are cleared at the next start ([`Store::migrate`]).
//! - **Durability.** WAL with `synchronous = FULL`: a committed transaction
//!   survives a kill -9 (and a power cut) at any instant.
//!
//! Key creation is still one atomic `INSERT … ON CONFLICT DO NOTHING
//! RETURNING`; the business row, its outbox event and the key's outcome still
//! commit in one transaction. UUIDs are stored as text, instants as integer
//! microseconds (see `migrations/sqlite/0001_schema.sql`).

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
// `AssertSqlSafe`: the dynamic statements here are built only from constants
// and placeholder counts, never from input.
use sqlx::{AssertSqlSafe, Row, Sqlite, Transaction};
use tracing::instrument;
use uuid::Uuid;

use super::{
    admit, batch_outcomes, member_records, status_column, to_json, Admission, ApplyOutcome,
    BatchDecision, BatchResult, BatchSendFn, BatchToSend, DeadEvent, DeadLetter, DeliverFn,
    DeliveryDecision, DeliveryResult, DlqAction, DlqTopicStats, DoneEvent, DueEvent, Invariant,
    KeyClaim, KeyClaimRequest, KeyLease, MemberRecord, OutboxStats, Purged, RelayFn, RelayStep,
    Relayed, Render, RowState, Store, StoreError,
};
use crate::broker::Envelope;
use crate::config::Config;
use crate::domain::{topics, Application, Charge, Job};
use crate::idempotency::{KeyScope, StoredResponse};

/// How long a consumer's lease on an outbox row lasts: longer than any one
/// delivery (the Resend call times out after 10 s).
const DELIVERY_LEASE: Duration = Duration::from_secs(60);

/// Now, in the schema's unit (microseconds since the epoch).
fn now_us() -> i64 {
    Utc::now().timestamp_micros()
}

fn us(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

fn instant(micros: i64) -> Result<DateTime<Utc>, sqlx::Error> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| sqlx::Error::Decode(format!("instant out of range: {micros}").into()))
}

fn uuid_column(row: &SqliteRow, column: &str) -> Result<Uuid, sqlx::Error> {
    let text: String = row.try_get(column)?;
    Uuid::parse_str(&text).map_err(|e| sqlx::Error::Decode(format!("{column}: {e}").into()))
}

fn time_column(row: &SqliteRow, column: &str) -> Result<DateTime<Utc>, sqlx::Error> {
    instant(row.try_get(column)?)
}

fn job_from_row(row: &SqliteRow) -> Result<Job, sqlx::Error> {
    Ok(Job {
        id: uuid_column(row, "id")?,
        title: row.try_get("title")?,
        company: row.try_get("company")?,
        location: row.try_get("location")?,
        description: row.try_get("description")?,
        posted_at: time_column(row, "posted_at")?,
    })
}

fn application_from_row(row: &SqliteRow) -> Result<Application, sqlx::Error> {
    Ok(Application {
        id: uuid_column(row, "id")?,
        job_id: uuid_column(row, "job_id")?,
        user_id: row.try_get("user_id")?,
        email: row.try_get("email")?,
        resume_url: row.try_get("resume_url")?,
        cover_letter: row.try_get("cover_letter")?,
        email_status: status_column(row, "email_status")?,
        created_at: time_column(row, "created_at")?,
    })
}

fn charge_from_row(row: &SqliteRow) -> Result<Charge, sqlx::Error> {
    Ok(Charge {
        id: uuid_column(row, "id")?,
        user_id: row.try_get("user_id")?,
        amount_cents: row.try_get("amount_cents")?,
        currency: row.try_get("currency")?,
        description: row.try_get("description")?,
        ledger_status: status_column(row, "ledger_status")?,
        created_at: time_column(row, "created_at")?,
    })
}

const APPLICATION_COLUMNS: &str =
    "id, job_id, user_id, email, resume_url, cover_letter, email_status, created_at";

type Query<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>;

/// Binds the four columns that identify a key: principal, method, route, key.
fn bind_key<'q>(query: Query<'q>, scope: &'q KeyScope, key: &'q str) -> Query<'q> {
    query
        .bind(scope.principal.as_str())
        .bind(scope.method)
        .bind(scope.route)
        .bind(key)
}

const KEY_WHERE: &str = "principal = ? AND method = ? AND route = ? AND key = ?";

/// SQLite store: one writer connection, a few readers, one file.
#[derive(Clone)]
pub struct SqliteStore {
    /// Exactly one connection: writes queue here, one transaction at a time.
    writer: SqlitePool,
    /// Read-only connections for queries that write nothing.
    reader: SqlitePool,
    /// `<file>.lock`, locked for as long as this process runs: the embedded
    /// mode is one process per file, and a second one is refused at start.
    _single_process: Arc<std::fs::File>,
}

/// Whether two paths name the same directory, as written or once resolved.
fn same_place(a: &Path, b: &Path) -> bool {
    let clean = |p: &Path| p.components().collect::<PathBuf>();
    clean(a) == clean(b) || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// Makes `dir` (and its parents) with mode 0700 if it is missing.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Takes the embedded mode's one-process lock on the database `path`.
fn lock_single_process(path: &Path) -> Result<std::fs::File, StoreError> {
    let lock_path = PathBuf::from(format!("{}.lock", path.display()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| StoreError::Unavailable(format!("opening {}: {e}", lock_path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Unavailable(format!(
            "another Herald process is using {} (it holds {}): the embedded mode runs one \
             process per SQLite file; stop the other one, or give this one its own \
             HERALD_DATABASE_URL and HERALD_STATE_DIR",
            path.display(),
            lock_path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Unavailable(format!(
            "locking {}: {e}",
            lock_path.display()
        ))),
    }
}

impl SqliteStore {
    pub async fn connect(config: &Config) -> Result<SqliteStore, StoreError> {
        let url = config.database_url.expose();
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Internal(format!("database_url: {e}")))?;
        let path = options.get_filename().to_path_buf();
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // Herald makes its own state directory; any other directory must
        // exist, so a mistyped path is an error instead of a new, empty
        // database somewhere unexpected.
        if same_place(dir, &config.state_dir) {
            create_private_dir(dir)
                .map_err(|e| StoreError::Unavailable(format!("creating {}: {e}", dir.display())))?;
        } else if !dir.is_dir() {
            return Err(StoreError::Unavailable(format!(
                "database_url: the directory {} does not exist (Herald creates only its \
                 state_dir, {}); check HERALD_DATABASE_URL for a typo",
                dir.display(),
                config.state_dir.display()
            )));
        }
        let single_process = lock_single_process(&path)?;
        if !path.exists() {
            tracing::info!(path = %path.display(), "creating a new, empty database");
        }
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let acquire = Duration::from_millis(config.database.acquire_timeout_ms);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(acquire)
            .connect_with(options.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(config.database.max_connections.clamp(1, 8))
            .acquire_timeout(acquire)
            .connect_lazy_with(options.read_only(true));
        // Files made before the process umask was 0077 (an older Herald).
        for suffix in ["", "-wal", "-shm"] {
            let file = PathBuf::from(format!("{}{suffix}", path.display()));
            if file.exists() {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).map_err(
                    |e| StoreError::Unavailable(format!("chmod 600 {}: {e}", file.display())),
                )?;
            }
        }
        Ok(SqliteStore {
            writer,
            reader,
            _single_process: Arc::new(single_process),
        })
    }

    /// A write transaction: the database's write lock is taken at `BEGIN`.
    async fn write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Marks the key completed inside `tx`, only if `lease` still holds it.
    async fn complete_key_in(
        tx: &mut Transaction<'_, Sqlite>,
        lease: &KeyLease,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        let sql = format!(
            "UPDATE idempotency_keys
                SET state = 'completed', response_status = ?, response_body = ?,
                    lease_expires_at = NULL
              WHERE {KEY_WHERE} AND holder = ? AND state = 'in_progress'"
        );
        let done = bind_key(
            sqlx::query(AssertSqlSafe(sql))
                .bind(i64::from(response.status))
                .bind(response.body.as_str()),
            &lease.scope,
            lease.key.as_str(),
        )
        .bind(lease.holder.to_string())
        .execute(&mut **tx)
        .await?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(StoreError::LeaseLost)
        }
    }

    /// A write transaction for a business write: if the request carries a
    /// key, it must still hold the key's lease (else `LeaseLost`).
    async fn write_holding(
        &self,
        lease: Option<&KeyLease>,
    ) -> Result<Transaction<'static, Sqlite>, StoreError> {
        let mut tx = self.write().await?;
        if let Some(lease) = lease {
            if !Self::holds(&mut tx, lease).await? {
                return Err(StoreError::LeaseLost);
            }
        }
        Ok(tx)
    }

    /// Whether `lease` still holds its key, inside `tx`.
    async fn holds(tx: &mut Transaction<'_, Sqlite>, lease: &KeyLease) -> Result<bool, StoreError> {
        let sql = format!(
            "SELECT 1 FROM idempotency_keys WHERE {KEY_WHERE} AND holder = ? AND state = 'in_progress'"
        );
        let row = bind_key(
            sqlx::query(AssertSqlSafe(sql)),
            &lease.scope,
            lease.key.as_str(),
        )
        .bind(lease.holder.to_string())
        .fetch_optional(&mut **tx)
        .await?;
        Ok(row.is_some())
    }

    /// The common end of every business transaction: the outbox event, the
    /// key's outcome (when the request carries a key), commit.
    async fn finish(
        mut tx: Transaction<'_, Sqlite>,
        event: Option<(&str, Uuid, serde_json::Value)>,
        lease: Option<&KeyLease>,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        if let Some((topic, aggregate_id, payload)) = event {
            let now = now_us();
            sqlx::query(
                "INSERT INTO outbox_events (event_id, topic, aggregate_id, payload, created_at, due_at)
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(Uuid::now_v7().to_string())
            .bind(topic)
            .bind(aggregate_id.to_string())
            .bind(payload.to_string())
            .bind(now)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(lease) = lease {
            Self::complete_key_in(&mut tx, lease, response).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Settles an outbox row after `attempt` attempts, with the last error
    /// (`None` when delivered).
    async fn settle_row(
        tx: &mut Transaction<'_, Sqlite>,
        event_id: &str,
        attempt: i32,
        error: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE outbox_events SET settled_at = ?, attempts = ?, last_error = ?
              WHERE event_id = ?",
        )
        .bind(now)
        .bind(attempt)
        .bind(error)
        .bind(event_id)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Records one delivered event: settles its row, writes its inbox row
    /// and its effect (the application `sent`; the charge's ledger entry and
    /// `applied`), in the caller's transaction.
    async fn record_done(
        tx: &mut Transaction<'_, Sqlite>,
        done: &DoneEvent<'_>,
        now: i64,
    ) -> Result<(), StoreError> {
        let (event_id, aggregate_id) = (done.event_id.to_string(), done.aggregate_id.to_string());
        Self::settle_row(tx, &event_id, done.attempt, None, now).await?;
        sqlx::query("INSERT INTO inbox (consumer, event_id, processed_at) VALUES (?, ?, ?)")
            .bind(done.consumer)
            .bind(&event_id)
            .bind(now)
            .execute(&mut **tx)
            .await?;
        match done.topic {
            topics::APPLICATION_SUBMITTED => {
                Self::apply_effect(tx, done.topic, &aggregate_id, "sent").await?;
            }
            topics::CHARGE_CREATED => {
                sqlx::query(
                    "INSERT INTO ledger_entries
                         (charge_id, event_id, user_id, amount_cents, currency, applied_at)
                     SELECT id, ?, user_id, amount_cents, currency, ? FROM charges WHERE id = ?",
                )
                .bind(&event_id)
                .bind(now)
                .bind(&aggregate_id)
                .execute(&mut **tx)
                .await?;
                Self::apply_effect(tx, done.topic, &aggregate_id, "applied").await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Writes one event's dead letter, marks its aggregate `dead` and
    /// settles the row, in the caller's transaction.
    async fn record_dead(
        tx: &mut Transaction<'_, Sqlite>,
        dead: &DeadEvent<'_>,
        now: i64,
    ) -> Result<(), StoreError> {
        let event_id = dead.event_id.to_string();
        Self::settle_row(tx, &event_id, dead.attempt, Some(dead.error), now).await?;
        sqlx::query(
            "INSERT INTO dead_letters
                 (id, event_id, consumer, topic, attempts, last_error, first_failed_at, dead_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (consumer, event_id) DO UPDATE
                SET attempts = excluded.attempts, last_error = excluded.last_error,
                    dead_at = excluded.dead_at, replayed_at = NULL, discarded_at = NULL",
        )
        .bind(Uuid::now_v7().to_string())
        .bind(&event_id)
        .bind(dead.consumer)
        .bind(dead.topic)
        .bind(dead.attempt)
        .bind(dead.error)
        .bind(dead.first_at.timestamp_micros())
        .bind(now)
        .execute(&mut **tx)
        .await?;
        Self::apply_effect(tx, dead.topic, &dead.aggregate_id.to_string(), "dead").await?;
        Ok(())
    }

    /// The local effect of a dead delivery on its aggregate.
    async fn apply_effect(
        tx: &mut Transaction<'_, Sqlite>,
        topic: &str,
        aggregate_id: &str,
        status: &str,
    ) -> Result<(), StoreError> {
        let update = match topic {
            topics::APPLICATION_SUBMITTED => {
                "UPDATE applications SET email_status = ? WHERE id = ?"
            }
            topics::CHARGE_CREATED => "UPDATE charges SET ledger_status = ? WHERE id = ?",
            _ => return Ok(()),
        };
        sqlx::query(update)
            .bind(status)
            .bind(aggregate_id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Replays the open dead letters matching `topic` and `id` (both
    /// optional), in one transaction; how many.
    async fn replay_open_letters(
        &self,
        topic: Option<&str>,
        id: Option<Uuid>,
        actor: &str,
    ) -> Result<u64, StoreError> {
        let mut tx = self.write().await?;
        let now = now_us();
        let letters = sqlx::query(
            "SELECT d.id, d.event_id, o.topic, o.aggregate_id
               FROM dead_letters d LEFT JOIN outbox_events o ON o.event_id = d.event_id
              WHERE d.replayed_at IS NULL AND d.discarded_at IS NULL
                AND (?1 IS NULL OR d.topic = ?1) AND (?2 IS NULL OR d.id = ?2)",
        )
        .bind(topic)
        .bind(id.map(|id| id.to_string()))
        .fetch_all(&mut *tx)
        .await?;
        for letter in &letters {
            let letter_id: String = letter.try_get("id")?;
            let event_id: String = letter.try_get("event_id")?;
            sqlx::query("UPDATE dead_letters SET replayed_at = ? WHERE id = ?")
                .bind(now)
                .bind(&letter_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO dlq_audit (dead_letter_id, event_id, action, actor, at)
                 VALUES (?, ?, 'replay', ?, ?)",
            )
            .bind(&letter_id)
            .bind(&event_id)
            .bind(actor)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE outbox_events
                    SET settled_at = NULL, attempts = 0, due_at = ?, last_error = NULL,
                        first_failed_at = NULL, locked_by = NULL, locked_until = NULL,
                        batch_id = NULL, stream_id = NULL
                  WHERE event_id = ?",
            )
            .bind(now)
            .bind(&event_id)
            .execute(&mut *tx)
            .await?;
            let topic: Option<String> = letter.try_get("topic")?;
            let aggregate: Option<String> = letter.try_get("aggregate_id")?;
            if let (Some(topic), Some(aggregate)) = (topic, aggregate) {
                Self::apply_effect(&mut tx, &topic, &aggregate, "pending").await?;
            }
        }
        tx.commit().await?;
        Ok(letters.len() as u64)
    }

    /// Why a dead letter could not be closed: unknown, or closed earlier.
    async fn closed_earlier(&self, id: Uuid) -> Result<DlqAction, StoreError> {
        let row = sqlx::query(
            "SELECT replayed_at IS NOT NULL AS replayed FROM dead_letters WHERE id = ?",
        )
        .bind(id.to_string())
        .fetch_optional(&self.reader)
        .await?;
        Ok(match row {
            None => DlqAction::NotFound,
            Some(row) if row.try_get::<bool, _>("replayed")? => DlqAction::AlreadyReplayed,
            Some(_) => DlqAction::AlreadyDiscarded,
        })
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    #[instrument(skip_all)]
    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/sqlite")
            .run(&self.writer)
            .await?;
        // One process owns an embedded database: a lease still held at start
        // was left by a process that died (kill -9); release it, so its rows
        // are delivered now rather than when the lease runs out.
        sqlx::query(
            "UPDATE outbox_events SET locked_by = NULL, locked_until = NULL
              WHERE locked_by IS NOT NULL",
        )
        .execute(&self.writer)
        .await?;
        sqlx::query(
            "UPDATE send_batches SET locked_by = NULL, locked_until = NULL
              WHERE locked_by IS NOT NULL",
        )
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    #[instrument(skip_all)]
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    #[instrument(skip_all)]
    async fn list_jobs(&self, limit: u32, before: Option<Uuid>) -> Result<Vec<Job>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, title, company, location, description, posted_at FROM jobs
              WHERE (?1 IS NULL OR id < ?1)
              ORDER BY id DESC LIMIT ?2",
        )
        .bind(before.map(|b| b.to_string()))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.iter().map(job_from_row).collect::<Result<_, _>>()?)
    }

    #[instrument(skip_all)]
    async fn get_job(&self, id: Uuid) -> Result<Option<Job>, StoreError> {
        let row = sqlx::query(
            "SELECT id, title, company, location, description, posted_at FROM jobs WHERE id = ?",
        )
        .bind(id.to_string())
        .fetch_optional(&self.reader)
        .await?;
        Ok(row.as_ref().map(job_from_row).transpose()?)
    }

    #[instrument(skip_all)]
    async fn claim_key(&self, claim: &KeyClaimRequest) -> Result<KeyClaim, StoreError> {
        let holder = Uuid::new_v4();
        let lease = |holder: Uuid| KeyLease {
            scope: claim.scope.clone(),
            key: claim.key.clone(),
            fingerprint: claim.fingerprint,
            holder,
            forgotten_by: claim.sent_at + claim.ttl,
        };
        let mut tx = self.write().await?;
        let now = now_us();
        let created = bind_key(
            sqlx::query(
                "INSERT INTO idempotency_keys
                    (principal, method, route, key, fingerprint, state, holder,
                     lease_expires_at, created_at, expires_at)
                 VALUES (?, ?, ?, ?, ?, 'in_progress', ?, ?, ?, ?)
                 ON CONFLICT (principal, method, route, key) DO NOTHING
                 RETURNING holder",
            ),
            &claim.scope,
            claim.key.as_str(),
        )
        .bind(&claim.fingerprint.0[..])
        .bind(holder.to_string())
        .bind(now + us(claim.lease))
        .bind(now)
        .bind(now + us(claim.ttl))
        .fetch_optional(&mut *tx)
        .await?;
        if created.is_some() {
            tx.commit().await?;
            return Ok(KeyClaim::New(lease(holder)));
        }
        let sql = format!(
            "SELECT fingerprint, state, response_status, response_body, expires_at,
                    lease_expires_at
               FROM idempotency_keys WHERE {KEY_WHERE}"
        );
        let row = bind_key(
            sqlx::query(AssertSqlSafe(sql)),
            &claim.scope,
            claim.key.as_str(),
        )
        .fetch_one(&mut *tx)
        .await?;
        let fingerprint: Vec<u8> = row.try_get("fingerprint")?;
        let state: String = row.try_get("state")?;
        let expires_at = row.try_get::<i64, _>("expires_at")?;
        let expired = expires_at < now;
        let lapsed = row
            .try_get::<Option<i64>, _>("lease_expires_at")?
            .is_some_and(|t| t < now);
        let same_request = fingerprint == claim.fingerprint.0;
        if expired || (same_request && state == "in_progress" && lapsed) {
            // An expired key starts afresh; a lapsed lease (its holder
            // crashed) passes to this request. This transaction holds the
            // write lock, so nobody takes it over in between.
            let sql = format!(
                "UPDATE idempotency_keys
                    SET fingerprint = ?, state = 'in_progress', holder = ?, lease_expires_at = ?,
                        response_status = NULL, response_body = NULL, created_at = ?,
                        expires_at = ?
                  WHERE {KEY_WHERE}"
            );
            let query = sqlx::query(AssertSqlSafe(sql))
                .bind(&claim.fingerprint.0[..])
                .bind(holder.to_string())
                .bind(now + us(claim.lease))
                .bind(now)
                .bind(now + us(claim.ttl));
            bind_key(query, &claim.scope, claim.key.as_str())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(KeyClaim::New(lease(holder)));
        }
        tx.commit().await?;
        if !same_request {
            return Ok(KeyClaim::Mismatch);
        }
        if state == "completed" {
            let status: i64 = row.try_get("response_status")?;
            let remaining_us = u64::try_from(expires_at - now).unwrap_or(0);
            return Ok(KeyClaim::Replay(
                StoredResponse {
                    status: u16::try_from(status).unwrap_or(500),
                    body: row.try_get("response_body")?,
                },
                Duration::from_micros(remaining_us),
            ));
        }
        Ok(KeyClaim::InFlight)
    }

    #[instrument(skip_all)]
    async fn complete_key(
        &self,
        lease: &KeyLease,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        Self::complete_key_in(&mut tx, lease, response).await?;
        tx.commit().await?;
        Ok(())
    }

    #[instrument(skip_all)]
    async fn release_key(&self, lease: &KeyLease) -> Result<(), StoreError> {
        let sql = format!(
            "DELETE FROM idempotency_keys WHERE {KEY_WHERE} AND holder = ? AND state = 'in_progress'"
        );
        bind_key(
            sqlx::query(AssertSqlSafe(sql)),
            &lease.scope,
            lease.key.as_str(),
        )
        .bind(lease.holder.to_string())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    #[instrument(skip_all)]
    async fn post_job(
        &self,
        job: &Job,
        lease: Option<&KeyLease>,
        render: Render<'_, Job>,
    ) -> Result<StoredResponse, StoreError> {
        let mut tx = self.write_holding(lease).await?;
        sqlx::query(
            "INSERT INTO jobs (id, title, company, location, description, posted_at)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(job.id.to_string())
        .bind(&job.title)
        .bind(&job.company)
        .bind(&job.location)
        .bind(&job.description)
        .bind(job.posted_at.timestamp_micros())
        .execute(&mut *tx)
        .await?;
        let response = render(job);
        let event = (topics::JOB_POSTED, job.id, to_json(job)?);
        Self::finish(tx, Some(event), lease, &response).await?;
        Ok(response)
    }

    #[instrument(skip_all)]
    async fn submit_application(
        &self,
        application: &Application,
        lease: Option<&KeyLease>,
        render: Render<'_, ApplyOutcome>,
    ) -> Result<(ApplyOutcome, StoredResponse), StoreError> {
        let mut tx = self.write_holding(lease).await?;
        let job = sqlx::query("SELECT title, company FROM jobs WHERE id = ?")
            .bind(application.job_id.to_string())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::JobNotFound)?;
        let inserted = sqlx::query(
            "INSERT INTO applications (id, job_id, user_id, email, resume_url, cover_letter, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (user_id, job_id) DO NOTHING",
        )
        .bind(application.id.to_string())
        .bind(application.job_id.to_string())
        .bind(&application.user_id)
        .bind(&application.email)
        .bind(&application.resume_url)
        .bind(&application.cover_letter)
        .bind(application.created_at.timestamp_micros())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if inserted {
            let outcome = ApplyOutcome::Created(application.clone());
            let response = render(&outcome);
            let payload = json!({
                "application_id": application.id,
                "job_id": application.job_id,
                "user_id": application.user_id,
                "email": application.email,
                "job_title": job.try_get::<String, _>("title")?,
                "company": job.try_get::<String, _>("company")?,
            });
            let event = (topics::APPLICATION_SUBMITTED, application.id, payload);
            Self::finish(tx, Some(event), lease, &response).await?;
            return Ok((outcome, response));
        }
        // The user already applied: return that application, emit nothing,
        // store this answer as the key's outcome.
        let sql = format!(
            "SELECT {APPLICATION_COLUMNS} FROM applications WHERE user_id = ? AND job_id = ?"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(&application.user_id)
            .bind(application.job_id.to_string())
            .fetch_one(&mut *tx)
            .await?;
        let outcome = ApplyOutcome::AlreadyApplied(application_from_row(&row)?);
        let response = render(&outcome);
        Self::finish(tx, None, lease, &response).await?;
        Ok((outcome, response))
    }

    #[instrument(skip_all)]
    async fn get_application(
        &self,
        id: Uuid,
        user_id: &str,
    ) -> Result<Option<Application>, StoreError> {
        let sql =
            format!("SELECT {APPLICATION_COLUMNS} FROM applications WHERE id = ? AND user_id = ?");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id.to_string())
            .bind(user_id)
            .fetch_optional(&self.reader)
            .await?;
        Ok(row.as_ref().map(application_from_row).transpose()?)
    }

    #[instrument(skip_all)]
    async fn create_charge(
        &self,
        charge: &Charge,
        lease: &KeyLease,
        render: Render<'_, Charge>,
    ) -> Result<StoredResponse, StoreError> {
        let mut tx = self.write_holding(Some(lease)).await?;
        sqlx::query(
            "INSERT INTO charges (id, user_id, amount_cents, currency, description, created_at)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(charge.id.to_string())
        .bind(&charge.user_id)
        .bind(charge.amount_cents)
        .bind(&charge.currency)
        .bind(&charge.description)
        .bind(charge.created_at.timestamp_micros())
        .execute(&mut *tx)
        .await?;
        let response = render(charge);
        let mut payload = to_json(charge)?;
        payload["user_id"] = json!(charge.user_id);
        let event = (topics::CHARGE_CREATED, charge.id, payload);
        Self::finish(tx, Some(event), Some(lease), &response).await?;
        Ok(response)
    }

    #[instrument(skip_all)]
    async fn get_charge(&self, id: Uuid, user_id: &str) -> Result<Option<Charge>, StoreError> {
        let row = sqlx::query(
            "SELECT id, user_id, amount_cents, currency, description, ledger_status, created_at
               FROM charges WHERE id = ? AND user_id = ?",
        )
        .bind(id.to_string())
        .bind(user_id)
        .fetch_optional(&self.reader)
        .await?;
        Ok(row.as_ref().map(charge_from_row).transpose()?)
    }

    #[instrument(skip_all)]
    async fn outbox_stats(&self) -> Result<OutboxStats, StoreError> {
        let now = now_us();
        let row = sqlx::query(
            // The effect counts come from the triggers' counters
            // (migrations/sqlite/0002): O(1) however many rows.
            "SELECT count(*) AS pending, min(due_at) AS oldest,
                    (SELECT value FROM effect_counters WHERE name = 'emails_delivered')
                        AS emails_delivered,
                    (SELECT value FROM effect_counters WHERE name = 'ledger_entries')
                        AS ledger_entries
               FROM outbox_events WHERE settled_at IS NULL AND due_at <= ?",
        )
        .bind(now)
        .fetch_one(&self.reader)
        .await?;
        let oldest: Option<i64> = row.try_get("oldest")?;
        Ok(OutboxStats {
            pending: row.try_get("pending")?,
            lag_seconds: oldest.map_or(0.0, |t| (now - t).max(0) as f64 / 1e6),
            emails_delivered: row.try_get("emails_delivered")?,
            ledger_entries: row.try_get("ledger_entries")?,
        })
    }

    #[instrument(skip_all, fields(topic))]
    async fn relay_due_events(
        &self,
        topic: &str,
        limit: i64,
        check_after: Duration,
        fan_out: bool,
        relay: RelayFn<'_>,
    ) -> Result<RelayStep, StoreError> {
        let mut tx = self.write().await?;
        let now = now_us();
        // Rows a consumer holds a lease on are skipped, as Postgres skips
        // locked rows.
        let rows = sqlx::query(
            "SELECT event_id, topic, attempts, payload, stream_id,
                    published_at IS NOT NULL AS published
               FROM outbox_events
              WHERE settled_at IS NULL AND batch_id IS NULL AND topic = ?1 AND due_at <= ?2
                AND (locked_until IS NULL OR locked_until <= ?2)
              ORDER BY due_at LIMIT ?3",
        )
        .bind(topic)
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(RelayStep::default());
        }
        let mut due = Vec::with_capacity(rows.len());
        for row in &rows {
            let payload: String = row.try_get("payload")?;
            due.push(DueEvent {
                envelope: Envelope {
                    event_id: uuid_column(row, "event_id")?,
                    topic: row.try_get("topic")?,
                    attempts: row.try_get("attempts")?,
                    payload: serde_json::from_str(&payload)
                        .map_err(|e| StoreError::Internal(format!("outbox payload: {e}")))?,
                },
                stream_id: row.try_get("stream_id")?,
                published_before: row.try_get("published")?,
            });
        }
        let ids: Vec<String> = due
            .iter()
            .map(|d| d.envelope.event_id.to_string())
            .collect();
        // On failure the transaction rolls back: the rows stay due.
        let relayed = relay(due)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        fail::fail_point!("relay-after-publish", |_| std::process::abort());
        let next_check = now + us(check_after);
        let mut published = 0;
        for (id, what) in ids.iter().zip(relayed) {
            match what {
                Relayed::Published(stream_id) => {
                    published += 1;
                    sqlx::query(
                        "UPDATE outbox_events
                            SET published_at = ?1, stream_id = ?2, due_at = ?3,
                                settled_at = CASE WHEN ?4 THEN ?1 END
                          WHERE event_id = ?5",
                    )
                    .bind(now)
                    .bind(stream_id)
                    .bind(next_check)
                    .bind(fan_out)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                }
                Relayed::StillHeld => {
                    sqlx::query("UPDATE outbox_events SET due_at = ? WHERE event_id = ?")
                        .bind(next_check)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(RelayStep {
            claimed: ids.len(),
            published,
        })
    }

    #[instrument(skip_all, fields(consumer, members = envelopes.len()))]
    async fn form_batch(
        &self,
        consumer: &str,
        batch_id: Uuid,
        envelopes: &[Envelope],
    ) -> Result<Vec<Admission>, StoreError> {
        let mut tx = self.write().await?;
        let now = now_us();
        let mut admissions = Vec::with_capacity(envelopes.len());
        let mut members = Vec::new();
        for envelope in envelopes {
            let event_id = envelope.event_id.to_string();
            let row = sqlx::query(
                "SELECT o.attempts, o.settled_at IS NOT NULL AS settled,
                        o.batch_id IS NOT NULL AS batched,
                        EXISTS (SELECT 1 FROM inbox i
                                 WHERE i.consumer = ?2 AND i.event_id = o.event_id) AS in_inbox
                   FROM outbox_events o WHERE o.event_id = ?1",
            )
            .bind(&event_id)
            .bind(consumer)
            .fetch_optional(&mut *tx)
            .await?;
            let state = match row {
                Some(row) => Some(RowState {
                    settled: row.try_get("settled")?,
                    in_inbox: row.try_get("in_inbox")?,
                    batched: row.try_get::<bool, _>("batched")? || members.contains(&event_id),
                    attempts: row.try_get("attempts")?,
                }),
                None => None,
            };
            let admission = admit(state, envelope.attempts);
            if admission == Admission::Member {
                members.push(event_id);
            }
            admissions.push(admission);
        }
        if !members.is_empty() {
            sqlx::query(
                "INSERT INTO send_batches (id, consumer, created_at, due_at) VALUES (?, ?, ?, ?)",
            )
            .bind(batch_id.to_string())
            .bind(consumer)
            .bind(now)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            for event_id in &members {
                sqlx::query("UPDATE outbox_events SET batch_id = ? WHERE event_id = ?")
                    .bind(batch_id.to_string())
                    .bind(event_id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(admissions)
    }

    #[instrument(skip_all, fields(consumer))]
    async fn send_due_batch(
        &self,
        consumer: &str,
        send: BatchSendFn<'_>,
    ) -> Result<Option<BatchResult>, StoreError> {
        // 1. Take the oldest due batch's lease in a short transaction (no
        //    transaction stays open while the batch is sent).
        let token = Uuid::new_v4().to_string();
        let mut tx = self.write().await?;
        let now = now_us();
        let Some(batch) = sqlx::query(
            "SELECT id, attempts, first_failed_at FROM send_batches
              WHERE consumer = ?1 AND settled_at IS NULL AND due_at <= ?2
                AND (locked_until IS NULL OR locked_until <= ?2)
              ORDER BY due_at LIMIT 1",
        )
        .bind(consumer)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        let id = uuid_column(&batch, "id")?;
        let attempts: i32 = batch.try_get("attempts")?;
        let first_at = instant(
            batch
                .try_get::<Option<i64>, _>("first_failed_at")?
                .unwrap_or(now),
        )?;
        sqlx::query("UPDATE send_batches SET locked_by = ?, locked_until = ? WHERE id = ?")
            .bind(&token)
            .bind(now + us(DELIVERY_LEASE))
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query(
            "SELECT event_id, topic, attempts, payload, aggregate_id FROM outbox_events
              WHERE batch_id = ? AND settled_at IS NULL
              ORDER BY event_id",
        )
        .bind(id.to_string())
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut members = Vec::with_capacity(rows.len());
        let mut aggregates = Vec::with_capacity(rows.len());
        for row in &rows {
            let payload: String = row.try_get("payload")?;
            members.push(Envelope {
                event_id: uuid_column(row, "event_id")?,
                topic: row.try_get("topic")?,
                attempts: row.try_get("attempts")?,
                payload: serde_json::from_str(&payload)
                    .map_err(|e| StoreError::Internal(format!("outbox payload: {e}")))?,
            });
            aggregates.push(uuid_column(row, "aggregate_id")?);
        }

        // 2. Send.
        let attempt = attempts + 1;
        let decision = if members.is_empty() {
            BatchDecision::Answered(Vec::new())
        } else {
            let decision = send(BatchToSend {
                id,
                attempts,
                members: members.clone(),
            })
            .await;
            fail::fail_point!("batch-after-send", |_| std::process::abort());
            decision
        };

        // 3. Record, fenced on the lease (another sender that took the batch
        //    over sends the same members under the same key: its outcome stands).
        let mut tx = self.write().await?;
        let now = now_us();
        let fenced = |sql: &'static str| {
            sqlx::query(sql)
                .bind(attempt)
                .bind(now)
                .bind(id.to_string())
                .bind(token.clone())
        };
        let held = match &decision {
            BatchDecision::Retry { after, error } => fenced(
                "UPDATE send_batches
                    SET attempts = ?1, due_at = ?2 + ?5, last_error = ?6,
                        first_failed_at = COALESCE(first_failed_at, ?2),
                        locked_by = NULL, locked_until = NULL
                  WHERE id = ?3 AND locked_by = ?4",
            )
            .bind(us(*after))
            .bind(error),
            BatchDecision::Defer { after } => fenced(
                "UPDATE send_batches SET due_at = ?2 + ?5, locked_by = NULL, locked_until = NULL
                  WHERE id = ?3 AND locked_by = ?4 AND ?1 = ?1",
            )
            .bind(us(*after)),
            BatchDecision::Answered(_) | BatchDecision::Dead { .. } => fenced(
                "UPDATE send_batches
                    SET attempts = ?1, settled_at = ?2, locked_by = NULL, locked_until = NULL
                  WHERE id = ?3 AND locked_by = ?4",
            ),
        }
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !held {
            return Ok(None);
        }
        let outcomes = batch_outcomes(&decision, members.len());
        for record in member_records(
            consumer,
            &members,
            &aggregates,
            &outcomes,
            attempt,
            first_at,
        ) {
            match record {
                MemberRecord::Done(done) => Self::record_done(&mut tx, &done, now).await?,
                MemberRecord::Dead(dead) => Self::record_dead(&mut tx, &dead, now).await?,
            }
        }
        // Failpoint: a crash with the outcome written, before the commit.
        fail::fail_point!("batch-before-commit", |_| std::process::abort());
        tx.commit().await?;
        Ok(Some(BatchResult {
            id,
            attempt,
            members: members.len(),
            decision,
        }))
    }

    #[instrument(skip_all, fields(event_id = %envelope.event_id))]
    async fn deliver_event(
        &self,
        consumer: &str,
        envelope: &Envelope,
        deliver: DeliverFn<'_>,
    ) -> Result<DeliveryResult, StoreError> {
        let event_id = envelope.event_id.to_string();
        let token = Uuid::new_v4().to_string();
        // 1. Take the row's lease in a short transaction (no transaction
        //    stays open while the email is sent).
        let mut tx = self.write().await?;
        let now = now_us();
        let row = sqlx::query(
            "SELECT o.attempts, o.settled_at IS NOT NULL AS settled, o.topic, o.aggregate_id,
                    o.first_failed_at, o.locked_until,
                    EXISTS (SELECT 1 FROM inbox i
                             WHERE i.consumer = ?2 AND i.event_id = o.event_id) AS in_inbox
               FROM outbox_events o WHERE o.event_id = ?1",
        )
        .bind(&event_id)
        .bind(consumer)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(DeliveryResult::Gone);
        };
        let attempts: i32 = row.try_get("attempts")?;
        if row.try_get::<bool, _>("settled")? || row.try_get::<bool, _>("in_inbox")? {
            return Ok(DeliveryResult::Duplicate);
        }
        if attempts != envelope.attempts {
            return Ok(DeliveryResult::Stale);
        }
        if row
            .try_get::<Option<i64>, _>("locked_until")?
            .is_some_and(|until| until > now)
        {
            return Ok(DeliveryResult::Busy);
        }
        sqlx::query("UPDATE outbox_events SET locked_by = ?, locked_until = ? WHERE event_id = ?")
            .bind(&token)
            .bind(now + us(DELIVERY_LEASE))
            .bind(&event_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let topic: String = row.try_get("topic")?;
        let aggregate_id = uuid_column(&row, "aggregate_id")?;
        let first_failed_at: Option<i64> = row.try_get("first_failed_at")?;

        // 2. Deliver.
        let decision = deliver(attempts).await;
        fail::fail_point!("consumer-after-deliver", |_| std::process::abort());

        // 3. Record the outcome, fenced on the lease: if it ran out and
        //    another worker took the row, that worker's outcome stands (a
        //    resent email carries the same idempotency key).
        let attempt = attempts + 1;
        let mut tx = self.write().await?;
        let now = now_us();
        let held = sqlx::query(
            "UPDATE outbox_events SET locked_by = NULL, locked_until = NULL
              WHERE event_id = ? AND locked_by = ?",
        )
        .bind(&event_id)
        .bind(&token)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !held {
            return Ok(DeliveryResult::Busy);
        }
        match &decision {
            DeliveryDecision::Done => {
                let done = DoneEvent {
                    consumer,
                    event_id: envelope.event_id,
                    topic: &topic,
                    aggregate_id,
                    attempt,
                };
                Self::record_done(&mut tx, &done, now).await?;
            }
            DeliveryDecision::Retry { after, error } => {
                sqlx::query(
                    "UPDATE outbox_events
                        SET attempts = ?, last_error = ?, due_at = ?,
                            first_failed_at = COALESCE(first_failed_at, ?), stream_id = NULL
                      WHERE event_id = ?",
                )
                .bind(attempt)
                .bind(error)
                .bind(now + us(*after))
                .bind(now)
                .bind(&event_id)
                .execute(&mut *tx)
                .await?;
            }
            DeliveryDecision::Defer { after } => {
                sqlx::query(
                    "UPDATE outbox_events SET due_at = ?, stream_id = NULL WHERE event_id = ?",
                )
                .bind(now + us(*after))
                .bind(&event_id)
                .execute(&mut *tx)
                .await?;
            }
            DeliveryDecision::Dead { error } => {
                let dead = DeadEvent {
                    consumer,
                    event_id: envelope.event_id,
                    topic: &topic,
                    aggregate_id,
                    attempt,
                    error,
                    first_at: instant(first_failed_at.unwrap_or(now))?,
                };
                Self::record_dead(&mut tx, &dead, now).await?;
            }
        }
        tx.commit().await?;
        Ok(DeliveryResult::Attempted { attempt, decision })
    }

    #[instrument(skip_all)]
    async fn list_dead_letters(
        &self,
        topic: Option<&str>,
        limit: u32,
        before: Option<Uuid>,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, event_id, topic, consumer, attempts, last_error, first_failed_at, dead_at
               FROM dead_letters
              WHERE replayed_at IS NULL AND discarded_at IS NULL
                AND (?1 IS NULL OR topic = ?1)
                AND (?2 IS NULL OR id < ?2)
              ORDER BY id DESC
              LIMIT ?3",
        )
        .bind(topic)
        .bind(before.map(|b| b.to_string()))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(DeadLetter {
                    id: uuid_column(row, "id")?,
                    event_id: uuid_column(row, "event_id")?,
                    topic: row.try_get("topic")?,
                    consumer: row.try_get("consumer")?,
                    attempts: row.try_get("attempts")?,
                    last_error: row.try_get("last_error")?,
                    first_failed_at: time_column(row, "first_failed_at")?,
                    dead_at: time_column(row, "dead_at")?,
                })
            })
            .collect()
    }

    #[instrument(skip_all)]
    async fn replay_dead_letter(&self, id: Uuid, actor: &str) -> Result<DlqAction, StoreError> {
        if self.replay_open_letters(None, Some(id), actor).await? > 0 {
            return Ok(DlqAction::Replayed);
        }
        self.closed_earlier(id).await
    }

    #[instrument(skip_all)]
    async fn replay_dead_letters(
        &self,
        topic: Option<&str>,
        actor: &str,
    ) -> Result<u64, StoreError> {
        self.replay_open_letters(topic, None, actor).await
    }

    #[instrument(skip_all)]
    async fn discard_dead_letter(&self, id: Uuid, actor: &str) -> Result<DlqAction, StoreError> {
        let mut tx = self.write().await?;
        let now = now_us();
        let letter = sqlx::query(
            "UPDATE dead_letters SET discarded_at = ?
              WHERE id = ? AND replayed_at IS NULL AND discarded_at IS NULL
             RETURNING event_id",
        )
        .bind(now)
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(letter) = letter else {
            drop(tx);
            return self.closed_earlier(id).await;
        };
        sqlx::query(
            "INSERT INTO dlq_audit (dead_letter_id, event_id, action, actor, at)
             VALUES (?, ?, 'discard', ?, ?)",
        )
        .bind(id.to_string())
        .bind(letter.try_get::<String, _>("event_id")?)
        .bind(actor)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(DlqAction::Discarded)
    }

    #[instrument(skip_all)]
    async fn dlq_stats(&self) -> Result<Vec<DlqTopicStats>, StoreError> {
        let now = now_us();
        let rows = sqlx::query(
            "SELECT topic, count(*) AS depth, min(dead_at) AS oldest
               FROM dead_letters
              WHERE replayed_at IS NULL AND discarded_at IS NULL
              GROUP BY topic ORDER BY topic",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                let oldest: i64 = row.try_get("oldest")?;
                Ok(DlqTopicStats {
                    topic: row.try_get("topic")?,
                    depth: row.try_get("depth")?,
                    oldest_age_seconds: (now - oldest).max(0) as f64 / 1e6,
                })
            })
            .collect()
    }

    #[instrument(skip_all)]
    async fn audit(
        &self,
        max_unsettled_age: Duration,
        retention: Duration,
    ) -> Result<Vec<(Invariant, i64)>, StoreError> {
        let mut found = Vec::new();
        for invariant in Invariant::ALL {
            let query = sqlx::query_scalar(invariant.query(true));
            let query = match invariant.horizon(max_unsettled_age, retention) {
                Some(ago) => query.bind(now_us().saturating_sub(us(ago))),
                None => query,
            };
            found.push((invariant, query.fetch_one(&self.reader).await?));
        }
        Ok(found)
    }

    #[instrument(skip_all)]
    async fn purge_expired(&self, batch: u32, retention: Duration) -> Result<Purged, StoreError> {
        let batch = i64::from(batch);
        let now = now_us();
        let horizon = now - us(retention);
        // Each delete is its own short write transaction on a bounded set.
        let keys = sqlx::query(
            "DELETE FROM idempotency_keys WHERE rowid IN (
                 SELECT rowid FROM idempotency_keys
                  WHERE expires_at < ?1
                    AND (state <> 'in_progress' OR lease_expires_at < ?1) LIMIT ?2)",
        )
        .bind(now)
        .bind(batch)
        .execute(&self.writer)
        .await?
        .rows_affected();
        let outbox = sqlx::query(
            "DELETE FROM outbox_events WHERE rowid IN (
                 SELECT rowid FROM outbox_events
                  WHERE settled_at < ?
                    AND NOT EXISTS (SELECT 1 FROM dead_letters d
                                     WHERE d.event_id = outbox_events.event_id
                                       AND d.replayed_at IS NULL AND d.discarded_at IS NULL)
                  LIMIT ?)",
        )
        .bind(horizon)
        .bind(batch)
        .execute(&self.writer)
        .await?
        .rows_affected();
        let inbox = sqlx::query(
            "DELETE FROM inbox WHERE rowid IN (
                 SELECT rowid FROM inbox WHERE processed_at < ? LIMIT ?)",
        )
        .bind(horizon)
        .bind(batch)
        .execute(&self.writer)
        .await?
        .rows_affected();
        // Settled batches: their members settled with them.
        sqlx::query(
            "DELETE FROM send_batches WHERE rowid IN (
                 SELECT rowid FROM send_batches WHERE settled_at < ? LIMIT ?)",
        )
        .bind(horizon)
        .bind(batch)
        .execute(&self.writer)
        .await?;
        Ok(Purged {
            keys,
            outbox,
            inbox,
        })
    }
}
