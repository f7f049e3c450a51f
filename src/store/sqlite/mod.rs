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

mod board;
mod dead_letters;
mod delivery;
mod maintenance;
mod provider_events;
mod relay;
mod work;

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
// `AssertSqlSafe`: the dynamic statements here are built only from constants
// and placeholder counts, never from input.
use sqlx::{AssertSqlSafe, Row, Sqlite, Transaction};
use tracing::instrument;
use uuid::Uuid;

use super::*;
use crate::broker::Envelope;
use crate::config::Config;
use crate::domain::{Application, Charge, Job, JobFilter, JobStatus};
use crate::keys::StoredResponse;

/// Now, in the schema's unit (microseconds since the epoch).
fn now_us() -> i64 {
    Utc::now().timestamp_micros()
}

fn us(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// The instant `after` from `now` (microseconds), `after` bounded by
/// [`LONGEST_DELAY`]: no overflow whatever a caller asked for.
fn later(now: i64, after: Duration) -> i64 {
    now.saturating_add(us(bounded_delay(after)))
}

fn instant(micros: i64) -> Result<DateTime<Utc>, sqlx::Error> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| sqlx::Error::Decode(format!("instant out of range: {micros}").into()))
}

fn uuid_column(row: &SqliteRow, column: &str) -> Result<Uuid, sqlx::Error> {
    let text: String = row.try_get(column)?;
    Uuid::parse_str(&text).map_err(|e| sqlx::Error::Decode(format!("{column}: {e}").into()))
}

/// SQLite keeps ids as text and instants as integer microseconds.
impl Columns for SqliteRow {
    fn id(&self, column: &str) -> Result<Uuid, sqlx::Error> {
        uuid_column(self, column)
    }

    fn instant(&self, column: &str) -> Result<DateTime<Utc>, sqlx::Error> {
        instant(self.try_get(column)?)
    }
}

/// The page cache of each read-only connection, in KiB (SQLite's default
/// is 2 MiB). A `q` list reads the rows of the newest thousand jobs, about a
/// page each: in 2 MiB they did not stay, and every list read them from the
/// file again (filters bench, 100,000 jobs: `q` p50 6.9 ms, p99 15.6; with
/// 8 MiB 4.9 and 11.0). At most 8 readers, so at most 64 MiB, taken only as
/// pages are read.
const READER_CACHE_KIB: u32 = 8 * 1024;

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
            .connect_lazy_with(
                options
                    .read_only(true)
                    .pragma("cache_size", format!("-{READER_CACHE_KIB}")),
            );
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

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    #[instrument(skip_all)]
    async fn migrate(&self) -> Result<(), StoreError> {
        super::migrations::sqlite().run(&self.writer).await?;
        // Jobs written before their search keys were get them now.
        loop {
            let rows = sqlx::query(JOBS_WITHOUT_SEARCH_KEYS)
                .fetch_all(&self.writer)
                .await?;
            if rows.is_empty() {
                break;
            }
            for row in &rows {
                let (id, keys) = search_keys_from_row(row)?;
                sqlx::query(SET_SEARCH_KEYS)
                    .bind(id.to_string())
                    .bind(keys.text)
                    .bind(keys.location)
                    .bind(keys.company)
                    .execute(&self.writer)
                    .await?;
            }
        }
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
}
