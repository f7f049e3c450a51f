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

mod board;
mod dead_letters;
mod delivery;
mod maintenance;
mod migrations;
pub mod postgres;
mod provider_events;
mod relay;
pub mod sqlite;
mod work;

pub use board::*;
pub use dead_letters::*;
pub use delivery::*;
pub use maintenance::*;
pub use provider_events::*;
pub use relay::*;
pub use work::*;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::config::Config;

/// A storage failure, classified for the HTTP layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or refused the connection: answer 503.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database answered and refused who Herald says it is, or has no
    /// database of that name (Postgres 28xxx, 3D000): `database_url` is
    /// wrong, and waiting does not fix it. At start the command exits 2
    /// at once; on a request, 503 like an unavailable database.
    #[error("the database refused the connection's settings (database_url): {0}")]
    Refused(String),
    /// The application names a job that does not exist.
    #[error("job not found")]
    JobNotFound,
    /// The job is closed: it takes no applications and no edits.
    #[error("job closed")]
    JobClosed,
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

/// Postgres error codes that mean the connection's settings are wrong: the
/// role or its password (class 28), or the database's name.
fn is_refused_pg_code(code: &str) -> bool {
    code.starts_with("28") || code == "3D000"
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
                let sqlite = db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some();
                let unavailable = if sqlite {
                    is_unavailable_sqlite_code(db.code().as_deref())
                } else {
                    db.code().is_some_and(|c| is_unavailable_pg_code(&c))
                };
                if !sqlite && db.code().is_some_and(|c| is_refused_pg_code(&c)) {
                    StoreError::Refused(e.to_string())
                } else if unavailable {
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

/// Herald's durable state. Implementations are cheap to share (`Arc<dyn Store>`).
#[async_trait]
pub trait Store:
    KeyStore
    + BoardReads
    + Transact
    + RelayStore
    + DeliveryStore
    + DeadLetterStore
    + MaintenanceStore
    + ProviderEventStore
    + 'static
{
    /// The backend's name, for `/admin/status`.
    fn backend(&self) -> &'static str;

    /// Applies pending migrations.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Waits for the store's own background work (a dropped connection's
    /// queued ROLLBACK) before the process exits.
    async fn close(&self) {}

    /// One round trip, for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// What a command needs of the database before it starts its work.
#[derive(Clone, Copy, Debug)]
pub enum AtStart {
    /// The schema up to date (`serve`, `migrate`).
    Migrated,
    /// One round trip (`audit`).
    Reachable,
}

/// The store a command starts with, retried while the database is not
/// available yet: Postgres unreachable or still starting, or an embedded
/// file another process holds (`StoreError::Unavailable`). A unit restarted
/// with its database, or a deploy that overlaps the old process, then
/// starts without an operator; past `database.connect_timeout_ms` the last
/// error is returned (the command exits 3). Any other error returns at once.
pub async fn open_at_start(config: &Config, need: AtStart) -> Result<Arc<dyn Store>, StoreError> {
    let deadline = Instant::now() + Duration::from_millis(config.database.connect_timeout_ms);
    let mut pause = Duration::from_millis(100);
    loop {
        let attempt = async {
            let store = connect(config).await?;
            match need {
                AtStart::Migrated => store.migrate().await?,
                AtStart::Reachable => store.ping().await?,
            }
            Ok::<_, StoreError>(store)
        };
        match attempt.await {
            Ok(store) => return Ok(store),
            Err(e) if e.is_unavailable() && Instant::now() < deadline => {
                // The last pause ends at the deadline, for one last try.
                let wait = pause.min(deadline.saturating_duration_since(Instant::now()));
                tracing::warn!(
                    error = %e,
                    retry_in_ms = wait.as_millis() as u64,
                    "the database is not available; retrying until database.connect_timeout_ms"
                );
                tokio::time::sleep(wait).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
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
