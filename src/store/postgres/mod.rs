//! The Postgres backend of [`Store`](super::Store), the production store.
//!
//! Key claims start with one atomic `INSERT … ON CONFLICT DO NOTHING
//! RETURNING` (never SELECT-then-INSERT): a free key is ours at once. A taken
//! key is then read to tell replay, in-flight and mismatch apart; an expired
//! key or a crashed holder's lapsed lease is taken over by an UPDATE fenced on
//! the previous holder.
//! Business transactions complete the key with a fencing check on the holder,
//! so a request that ran past its lease cannot overwrite its successor.

mod board;
mod dead_letters;
mod delivery;
mod maintenance;
mod provider_events;
mod relay;
mod work;

// `herald bench intake` has pgbench run the exact statements of an application.
pub use work::CLAIM_KEY;
pub use work::SUBMIT_APPLICATION;

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool::managed::{Manager, Metrics, Object, Pool, PoolError, RecycleError, RecycleResult};
use deadpool::Runtime;
use futures::future::BoxFuture;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Connection, Postgres, Row, Transaction};
use tokio_util::task::TaskTracker;
use tracing::instrument;
use uuid::Uuid;

use super::*;
use crate::broker::Envelope;
use crate::config::Config;
use crate::domain::{topics, Application, Charge, Job, JobFilter, JobStatus};
use crate::keys::StoredResponse;

/// Postgres reads ids and instants as their own types.
impl Columns for PgRow {
    fn id(&self, column: &str) -> Result<Uuid, sqlx::Error> {
        self.try_get(column)
    }

    fn instant(&self, column: &str) -> Result<DateTime<Utc>, sqlx::Error> {
        self.try_get(column)
    }
}

/// Migrations whose text changed after they shipped in comments only, with
/// the SHA-384 of the text as first shipped. sqlx refuses to run against a
/// database whose recorded checksum differs from the file's; for these the
/// record is brought up to date instead (the SQL itself is unchanged).
const COMMENT_ONLY_EDITS: [(i64, &str); 2] = [
    (
        3,
        "bb4342b9e0efe9b64582649ef26a319ee24e3e1f8af8b250eeb10d6f6ad1289d86623e18d6d6d3517b56f9718f889e04",
    ),
    (
        4,
        "13b17f6e44dc11a4ae738428501d1f9fb205dcce9037320921ed9a287566e72b0e6946a38dc45fe657f12dd040f07800",
    ),
];

/// Updates the recorded checksum of each [`COMMENT_ONLY_EDITS`] migration a
/// database applied as first shipped; nothing on a new database.
async fn accept_comment_only_edits(
    pool: &sqlx::PgPool,
    migrator: &sqlx::migrate::Migrator,
) -> Result<(), StoreError> {
    let recorded: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
            .fetch_one(pool)
            .await?;
    if recorded.is_none() {
        return Ok(());
    }
    for (version, shipped) in COMMENT_ONLY_EDITS {
        let Some(current) = migrator.iter().find(|m| m.version == version) else {
            continue;
        };
        sqlx::query(
            "UPDATE _sqlx_migrations SET checksum = $1
              WHERE version = $2 AND checksum = decode($3, 'hex')",
        )
        .bind(&current.checksum[..])
        .bind(version)
        .bind(shipped)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// A bare sqlx connection, marked broken when a query on it failed in a way
/// that says the connection (or the server) is gone.
pub struct TrackedConn {
    conn: PgConnection,
    broken: bool,
}

impl Deref for TrackedConn {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl DerefMut for TrackedConn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

/// deadpool manager of sqlx Postgres connections.
///
/// Why not `sqlx::PgPool`: sqlx's pool sends a round trip (Sync) on *every*
/// release of a connection to re-check it, whatever the options say; on the
/// intake path that was two extra round trips per request and ~13 % of
/// Herald's CPU in `herald bench intake`. Here a connection goes back to the
/// pool as it is when it is clean; one whose query failed with a
/// connection-class error is discarded instead. One that is not clean — a
/// transaction dropped without commit only *queues* its ROLLBACK in sqlx's
/// write buffer — is flushed before it goes back ([`Session`]'s drop), so
/// no row lock outlives the call that took it; recycling refuses one still
/// inside a transaction.
pub struct PgManager {
    options: PgConnectOptions,
}

impl Manager for PgManager {
    type Type = TrackedConn;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<TrackedConn, sqlx::Error> {
        Ok(TrackedConn {
            conn: PgConnection::connect_with(&self.options).await?,
            broken: false,
        })
    }

    async fn recycle(&self, conn: &mut TrackedConn, _: &Metrics) -> RecycleResult<sqlx::Error> {
        if conn.broken {
            return Err(RecycleError::message("connection failed earlier"));
        }
        if conn.should_flush() {
            // Its return-time flush did not run (no runtime, or timed out).
            conn.flush().await?;
        }
        if conn.is_in_transaction() {
            return Err(RecycleError::message(
                "connection still inside a transaction",
            ));
        }
        Ok(())
    }
}

/// Longest a returning connection may take to finish its queued ROLLBACK
/// before it is discarded instead.
const RETURN_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// One pooled connection held for one store call. Dropped with a queued
/// ROLLBACK (an early return or an error inside a transaction, or the whole
/// call cut off by the request timeout), it sends it and waits for the
/// answer on a task of its own before the connection rejoins the pool: the
/// transaction's row locks are released now, not whenever the connection
/// happens to be used next.
struct Session(Option<Object<PgManager>>, TaskTracker);

impl Deref for Session {
    type Target = Object<PgManager>;
    fn deref(&self) -> &Object<PgManager> {
        // Only `drop` takes the object out.
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("session used after drop"))
    }
}

impl DerefMut for Session {
    fn deref_mut(&mut self) -> &mut Object<PgManager> {
        self.0
            .as_mut()
            .unwrap_or_else(|| unreachable!("session used after drop"))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let Some(mut conn) = self.0.take() else {
            return;
        };
        if !conn.should_flush() && !conn.is_in_transaction() {
            return;
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        self.1.spawn(async move {
            let flushed = tokio::time::timeout(RETURN_FLUSH_TIMEOUT, conn.flush()).await;
            if !matches!(flushed, Ok(Ok(()))) || conn.is_in_transaction() {
                conn.broken = true;
            }
        });
    }
}

trait Settle {
    /// Marks the connection broken when `result` says the database is
    /// unreachable through it, then passes `result` on.
    fn settle<T>(&mut self, result: Result<T, StoreError>) -> Result<T, StoreError>;
}

impl Settle for Session {
    fn settle<T>(&mut self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if matches!(&result, Err(e) if e.is_unavailable()) {
            self.broken = true;
        }
        result
    }
}

/// `'a: 'c`, implied by an argument of this type: a closure given one may
/// return a future (living `'c`) that holds borrows living `'a`.
type Borrows<'c, 'a> = std::marker::PhantomData<&'c &'a ()>;

/// Postgres store over a connection pool.
#[derive(Clone)]
pub struct PgStore {
    /// Bounded pool; a request that cannot get a connection in
    /// `database.acquire_timeout_ms` is answered 503.
    pool: Pool<PgManager>,
    /// Where to connect, for the migrator's own connection.
    options: PgConnectOptions,
    /// `database.acquire_timeout_ms`: also how long the first connection
    /// may take before start-up gives up, saying why.
    acquire_timeout: Duration,
    /// The return-time flushes of dropped [`Session`]s, waited for by
    /// [`Store::close`].
    returns: TaskTracker,
}

impl PgStore {
    pub async fn connect(config: &Config) -> Result<PgStore, StoreError> {
        let options: PgConnectOptions = config
            .database_url
            .expose()
            .parse()
            .map_err(|e| StoreError::Internal(format!("database_url: {e}")))?;
        let acquire = Duration::from_millis(config.database.acquire_timeout_ms);
        let pool = Pool::builder(PgManager {
            options: options.clone(),
        })
        .max_size(config.database.max_connections as usize)
        .wait_timeout(Some(acquire))
        .create_timeout(Some(acquire.max(Duration::from_secs(2))))
        .recycle_timeout(Some(acquire))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| StoreError::Internal(format!("database pool: {e}")))?;
        Ok(PgStore {
            pool,
            options,
            acquire_timeout: acquire,
            returns: TaskTracker::new(),
        })
    }

    /// Runs `work` on one pooled connection, and marks the connection
    /// broken when its result says the database is unreachable through it:
    /// the ceremony of every store call, written once. (`work` gets a
    /// [`Borrows`] so the future it returns may hold the caller's borrows.)
    async fn with_conn<'a, T>(
        &self,
        work: impl for<'c> FnOnce(
            &'c mut PgConnection,
            Borrows<'c, 'a>,
        ) -> BoxFuture<'c, Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let mut session = self.session().await?;
        let conn: &mut PgConnection = &mut session;
        let result = work(conn, std::marker::PhantomData).await;
        session.settle(result)
    }

    async fn session(&self) -> Result<Session, StoreError> {
        self.pool
            .get()
            .await
            .map(|c| Session(Some(c), self.returns.clone()))
            .map_err(|e| match e {
                PoolError::Backend(e) => StoreError::from(e),
                PoolError::Timeout(_) | PoolError::Closed => {
                    StoreError::Unavailable(format!("no database connection: {e}"))
                }
                other => StoreError::Internal(other.to_string()),
            })
    }
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn close(&self) {
        self.returns.close();
        self.returns.wait().await;
    }

    #[instrument(skip_all)]
    async fn migrate(&self) -> Result<(), StoreError> {
        // One direct connection first, bounded by the acquire timeout: a
        // pool retries a refused connection quietly until its own timeout
        // and then reports only "pool timed out"; this says why, at once.
        let timeout = self.acquire_timeout;
        match tokio::time::timeout(timeout, PgConnection::connect_with(&self.options)).await {
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "cannot connect to the database: no answer within {timeout:?} \
                     (database.acquire_timeout_ms)"
                )))
            }
            // A wrong role, password or database name is a setting:
            // retrying does not fix it.
            Ok(Err(sqlx::Error::Database(db)))
                if db.code().is_some_and(|c| super::is_refused_pg_code(&c)) =>
            {
                return Err(StoreError::Refused(db.to_string()))
            }
            Ok(Err(e)) => {
                return Err(StoreError::Unavailable(format!(
                    "cannot connect to the database: {e}"
                )))
            }
            Ok(Ok(probe)) => {
                let _ = probe.close().await;
            }
        }
        // A one-connection sqlx pool just for this: sqlx's migrator takes any
        // `Acquire`, and a pool is the one it can hold across its awaits.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(timeout.max(Duration::from_secs(5)))
            .connect_with(self.options.clone())
            .await?;
        let migrator = super::migrations::postgres();
        if let Err(e) = accept_comment_only_edits(&pool, &migrator).await {
            pool.close().await;
            return Err(e);
        }
        let result = match migrator.run(&pool).await {
            Ok(()) => backfill_search_keys(&pool).await,
            Err(e) => Err(e.into()),
        };
        pool.close().await;
        result
    }

    #[instrument(skip_all)]
    async fn ping(&self) -> Result<(), StoreError> {
        self.with_conn(|conn, _| {
            Box::pin(async move {
                sqlx::query("SELECT 1").execute(&mut *conn).await?;
                Ok(())
            })
        })
        .await
    }
}

/// Jobs written before their search keys were (migration 0008) get them:
/// idempotent, so processes migrating at once only repeat each other.
async fn backfill_search_keys(pool: &sqlx::PgPool) -> Result<(), StoreError> {
    loop {
        let rows = sqlx::query(JOBS_WITHOUT_SEARCH_KEYS)
            .fetch_all(pool)
            .await?;
        if rows.is_empty() {
            return Ok(());
        }
        for row in &rows {
            let (id, keys) = search_keys_from_row(row)?;
            sqlx::query(SET_SEARCH_KEYS)
                .bind(id)
                .bind(keys.text)
                .bind(keys.location)
                .bind(keys.company)
                .execute(pool)
                .await?;
        }
    }
}
