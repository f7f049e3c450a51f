//! The unit of work on Postgres, and the idempotency key it completes: the
//! claim (`INSERT … ON CONFLICT DO NOTHING RETURNING`, then a fenced
//! takeover), the release, and [`PgUnitOfWork`], whose commit writes the
//! outbox rows and completes the key. The key's fence (`held_by!`), its
//! completion (`complete_key!`) and the outbox insert (`insert_outbox!`)
//! are each written once, here; the declared fast path of an application
//! ([`SUBMIT_APPLICATION`]) is composed of them.

// A unit owns its connection, so it cannot hold a `Transaction` (which
// borrows one): it begins, commits and starts rolling back through sqlx's
// own transaction manager, the one `Connection::begin` uses. sqlx then
// tracks the transaction, and a unit dropped open queues its ROLLBACK, which
// `Session`'s drop flushes before the connection rejoins the pool. (sqlx
// does not re-export the trait: hence the direct `sqlx-core` dependency.)
use sqlx::postgres::PgTransactionManager;
use sqlx_core::transaction::TransactionManager;

use super::*;
use crate::domain::{ApplicationSubmitted, JobStatus};

/// The fence of every completion and release: the key's four columns and
/// its holder, still in progress. Arguments: the placeholders of principal,
/// method, route, key and holder.
macro_rules! held_by {
    ($principal:literal, $method:literal, $route:literal, $key:literal, $holder:literal) => {
        concat!(
            "principal = ",
            $principal,
            " AND method = ",
            $method,
            " AND route = ",
            $route,
            " AND key = ",
            $key,
            " AND holder = ",
            $holder,
            " AND state = 'in_progress'"
        )
    };
}

/// Completes a held key with its answer: [`held_by!`]'s placeholders, then
/// the answer's status and body.
macro_rules! complete_key {
    ($principal:literal, $method:literal, $route:literal, $key:literal, $holder:literal,
     $status:literal, $body:literal) => {
        concat!(
            "UPDATE idempotency_keys SET state = 'completed', response_status = ",
            $status,
            ", response_body = ",
            $body,
            ", lease_expires_at = NULL WHERE ",
            held_by!($principal, $method, $route, $key, $holder)
        )
    };
}

/// The outbox insert, its columns in the order every caller gives them:
/// event id, topic, aggregate id, payload (a `VALUES` or `SELECT` follows).
macro_rules! insert_outbox {
    () => {
        "INSERT INTO outbox_events (event_id, topic, aggregate_id, payload, traceparent) "
    };
}

/// Atomic creation of a key, `in_progress` with a lease. DO NOTHING never
/// waits on an existing row's lock, so a duplicate of a running request is
/// answered at once.
pub const CLAIM_KEY: &str = "INSERT INTO idempotency_keys
        (principal, method, route, key, fingerprint, state, holder, lease_expires_at, expires_at)
 VALUES ($1, $2, $3, $4, $5, 'in_progress', $6,
         now() + make_interval(secs => $7), now() + make_interval(secs => $8))
 ON CONFLICT (principal, method, route, key) DO NOTHING
 RETURNING holder";

#[async_trait]
impl KeyStore for PgStore {
    #[instrument(skip_all)]
    async fn claim_key(&self, claim: &KeyClaimRequest) -> Result<KeyClaim, StoreError> {
        self.with_conn(|conn, _| {
            Box::pin(async move {
                let holder = Uuid::new_v4();
                let lease_secs = claim.lease.as_secs_f64();
                let ttl_secs = claim.ttl.as_secs_f64();
                // A few passes at most: each retry follows a row that changed under us
                // (deleted by the janitor, or taken over by another request).
                for _ in 0..3 {
                    let created = sqlx::query(CLAIM_KEY)
                        .bind_key(&claim.scope, &claim.key)
                        .bind(&claim.fingerprint.0[..])
                        .bind(holder)
                        .bind(lease_secs)
                        .bind(ttl_secs)
                        .fetch_optional(&mut *conn)
                        .await?;
                    if created.is_some() {
                        return Ok(KeyClaim::New(claim.lease_to(holder)));
                    }
                    let existing = sqlx::query(
                    "SELECT fingerprint, state, holder, response_status::int8 AS response_status,
                            response_body,
                            expires_at < now() AS expired,
                            EXTRACT(EPOCH FROM expires_at - now())::float8 AS remaining_secs,
                            lease_expires_at < now() AS lapsed
                       FROM idempotency_keys
                      WHERE principal = $1 AND method = $2 AND route = $3 AND key = $4",
                )
                .bind_key(&claim.scope, &claim.key)
                .fetch_optional(&mut *conn)
                .await?;
                    let Some(row) = existing else { continue };
                    let previous: Uuid = row.try_get("holder")?;
                    let taken = TakenKey {
                        fingerprint: row.try_get("fingerprint")?,
                        completed: completed_response(&row)?,
                        expired: row.try_get("expired")?,
                        lease_lapsed: row.try_get::<Option<bool>, _>("lapsed")? == Some(true),
                        remaining: Duration::from_secs_f64(
                            row.try_get::<f64, _>("remaining_secs")?.max(0.0),
                        ),
                    };
                    let answer = match decide_taken_key(taken, &claim.fingerprint) {
                        TakenKeyDecision::Answer(answer) => answer,
                        TakenKeyDecision::TakeOver => {
                            // An expired key starts afresh; a lapsed lease (its holder
                            // crashed) passes to this request. Fenced on the previous
                            // holder, so of two racing takeovers exactly one wins.
                            let taken = sqlx::query(
                                "UPDATE idempotency_keys
                            SET fingerprint = $6, state = 'in_progress', holder = $7,
                                lease_expires_at = now() + make_interval(secs => $8),
                                response_status = NULL, response_body = NULL,
                                created_at = now(), expires_at = now() + make_interval(secs => $9)
                          WHERE principal = $1 AND method = $2 AND route = $3 AND key = $4
                            AND holder = $5
                            AND (expires_at < now()
                                 OR (state = 'in_progress' AND lease_expires_at < now()))",
                            )
                            .bind_key(&claim.scope, &claim.key)
                            .bind(previous)
                            .bind(&claim.fingerprint.0[..])
                            .bind(holder)
                            .bind(lease_secs)
                            .bind(ttl_secs)
                            .execute(&mut *conn)
                            .await?;
                            if taken.rows_affected() == 1 {
                                return Ok(KeyClaim::New(claim.lease_to(holder)));
                            }
                            continue;
                        }
                    };
                    return Ok(answer);
                }
                Ok(KeyClaim::InFlight)
            })
        })
        .await
    }

    #[instrument(skip_all)]
    async fn release_key(&self, lease: &KeyLease) -> Result<(), StoreError> {
        self.with_conn(|conn, _| {
            Box::pin(async move {
                sqlx::query(concat!(
                    "DELETE FROM idempotency_keys WHERE ",
                    held_by!("$1", "$2", "$3", "$4", "$5")
                ))
                .bind_key(&lease.scope, &lease.key)
                .bind(lease.holder)
                .execute(&mut *conn)
                .await?;
                Ok(())
            })
        })
        .await
    }
}

/// The declared fast path of [`crate::use_cases::submit_application`]: a
/// new application in one statement (Postgres runs all of it in one
/// transaction, against one snapshot):
/// - `held`: the request still holds its key's lease, or carries no key ($12
///   is NULL). Not locked: a lock here would make a concurrent duplicate's
///   claim wait instead of answering 409;
/// - `job`: the job exists, and whether it is open ($20 = `open`): a closed
///   job takes no application;
/// - `app`: the application, unless this user already applied to this job;
/// - `event`: its `application.submitted` outbox row, only if `app` inserted.
///   The payload is [`ApplicationSubmitted`], built in Rust ($17) with the
///   job's title and company filled in from the row under the field names
///   the type gives ($18, $19): nothing of its shape is spelled here;
/// - `done`: the key completed with the 201 response, only if `app` inserted
///   and the lease is still ours (re-checked on the row's latest version, so a
///   takeover that committed meanwhile wins: then `completed` is false).
///
/// The flags it returns tell the caller which case it was. The conformance
/// suite runs it and the general path on the same cases.
pub const SUBMIT_APPLICATION: &str = concat!(
    "
WITH held AS (
    SELECT 1 WHERE $12::uuid IS NULL OR EXISTS (
        SELECT 1 FROM idempotency_keys WHERE ",
    held_by!("$8", "$9", "$10", "$11", "$12"),
    ")
), job AS (
    SELECT id, title, company, status = $20 AS open FROM jobs WHERE id = $2
), app AS (
    INSERT INTO applications (id, job_id, user_id, email, resume_url, cover_letter, created_at)
    SELECT $1, job.id, $3, $4, $5, $6, $7 FROM job, held WHERE job.open
    ON CONFLICT (user_id, job_id) DO NOTHING
    RETURNING id
), event AS (
    ",
    insert_outbox!(),
    "SELECT $13, $16, app.id,
           $17::jsonb || jsonb_build_object($18::text, job.title, $19::text, job.company), $21
      FROM app, job
), done AS (
    ",
    complete_key!("$8", "$9", "$10", "$11", "$12", "$14", "$15"),
    " AND EXISTS (SELECT 1 FROM app)
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM held) AS held,
       EXISTS (SELECT 1 FROM job) AS job_found,
       EXISTS (SELECT 1 FROM job WHERE open) AS job_open,
       EXISTS (SELECT 1 FROM app) AS created,
       EXISTS (SELECT 1 FROM done) AS completed"
);

/// Postgres binds ids and instants as their own types.
impl<'q> Binds<'q> for sqlx::query::Query<'q, Postgres, PgArguments> {
    fn id(self, id: Uuid) -> Self {
        self.bind(id)
    }

    fn instant(self, at: DateTime<Utc>) -> Self {
        self.bind(at)
    }
}

/// A unit of work on one pooled connection. Its transaction begins with its
/// first statement, so a unit that runs one statement only (the fast path,
/// a key completed with an answer that wrote nothing) runs it alone.
pub struct PgUnitOfWork {
    session: Session,
    /// The key its commit completes.
    key: Option<KeyLease>,
    /// Emitted events, written at commit.
    events: Vec<OutboxEvent>,
    /// `BEGIN` was sent and no `COMMIT` yet.
    open: bool,
    /// The fast path wrote and completed everything already.
    done: bool,
}

impl PgUnitOfWork {
    /// Marks the connection broken when `result` says the database is
    /// unreachable through it.
    fn check<T>(&mut self, result: Result<T, sqlx::Error>) -> Result<T, StoreError> {
        self.session.settle(result.map_err(StoreError::from))
    }

    /// The connection, inside this unit's transaction.
    async fn begun(&mut self) -> Result<&mut PgConnection, StoreError> {
        if !self.open {
            let conn: &mut PgConnection = &mut self.session;
            let begun = PgTransactionManager::begin(conn, None).await;
            self.check(begun)?;
            self.open = true;
        }
        Ok(&mut self.session)
    }

    /// Completes the unit's key with `answer` on `conn`, fenced on its holder.
    async fn complete_key(
        conn: &mut PgConnection,
        key: &KeyLease,
        answer: &StoredResponse,
    ) -> Result<(), StoreError> {
        let done = sqlx::query(complete_key!("$1", "$2", "$3", "$4", "$5", "$6", "$7"))
            .bind_key(&key.scope, &key.key)
            .bind(key.holder)
            .bind(answer.status as i16)
            .bind(&answer.body)
            .execute(conn)
            .await?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(StoreError::LeaseLost)
        }
    }
}

impl Drop for PgUnitOfWork {
    fn drop(&mut self) {
        if self.open {
            let conn: &mut PgConnection = &mut self.session;
            PgTransactionManager::start_rollback(conn);
        }
    }
}

#[async_trait]
impl Transact for PgStore {
    async fn begin(&self, key: Option<KeyLease>) -> Result<Box<dyn UnitOfWork>, StoreError> {
        Ok(Box::new(PgUnitOfWork {
            session: self.session().await?,
            key,
            events: Vec::new(),
            open: false,
            done: false,
        }))
    }
}

#[async_trait]
impl UnitOfWork for PgUnitOfWork {
    async fn job_for_update(&mut self, id: Uuid) -> Result<Option<Job>, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 FOR UPDATE");
        let conn = self.begun().await?;
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(conn)
            .await;
        let row = self.check(row)?;
        Ok(row.as_ref().map(job_from_row).transpose()?)
    }

    async fn insert_job(&mut self, job: &Job) -> Result<(), StoreError> {
        let keys = job.search_keys();
        let conn = self.begun().await?;
        let done = bind_job(sqlx::query(INSERT_JOB), job, &keys)
            .instant(job.posted_at)
            .execute(conn)
            .await;
        self.check(done).map(drop)
    }

    async fn update_job(&mut self, job: &Job) -> Result<(), StoreError> {
        let keys = job.search_keys();
        let conn = self.begun().await?;
        let done = bind_job(sqlx::query(UPDATE_JOB), job, &keys)
            .execute(conn)
            .await;
        self.check(done).map(drop)
    }

    async fn insert_application(&mut self, application: &Application) -> Result<bool, StoreError> {
        let conn = self.begun().await?;
        let done = bind_application(sqlx::query(INSERT_APPLICATION), application)
            .execute(conn)
            .await;
        Ok(self.check(done)?.rows_affected() == 1)
    }

    async fn application_of(
        &mut self,
        user_id: &str,
        job_id: Uuid,
    ) -> Result<Option<Application>, StoreError> {
        // Read where the unit stands: inside its transaction if it began.
        let conn: &mut PgConnection = &mut self.session;
        let row = sqlx::query(application_of())
            .text(user_id)
            .id(job_id)
            .fetch_optional(conn)
            .await;
        let row = self.check(row)?;
        Ok(row.as_ref().map(application_from_row).transpose()?)
    }

    async fn insert_charge(&mut self, charge: &Charge) -> Result<(), StoreError> {
        let conn = self.begun().await?;
        let done = bind_charge(sqlx::query(INSERT_CHARGE), charge)
            .execute(conn)
            .await;
        self.check(done).map(drop)
    }

    async fn audit(&mut self, entry: &AuditEntry) -> Result<(), StoreError> {
        let conn = self.begun().await?;
        let done = sqlx::query(
            "INSERT INTO admin_audit (action, subject, detail, actor) VALUES ($1, $2, $3, $4)",
        )
        .bind(&entry.action)
        .bind(&entry.subject)
        .bind(&entry.detail)
        .bind(&entry.actor)
        .execute(conn)
        .await;
        self.check(done).map(drop)
    }

    fn emit(&mut self, event: OutboxEvent) {
        self.events.push(event);
    }

    async fn submit_at_once(
        &mut self,
        application: &Application,
        created: &StoredResponse,
    ) -> Option<Result<ApplyOutcome, StoreError>> {
        if self.open || self.done || !self.events.is_empty() {
            // Something ran in this unit already: the general path keeps it.
            return None;
        }
        let result = self.submit_in_one_statement(application, created).await;
        let result = self.session.settle(result);
        // A new application committed with its event and its key's
        // completion: nothing is left to commit. Otherwise nothing was
        // written, and the commit completes the key with whatever answer
        // the caller gives (the existing application).
        self.done = matches!(result, Ok(ApplyOutcome::Created(_)));
        Some(result)
    }

    async fn commit(mut self: Box<Self>, answer: &StoredResponse) -> Result<(), StoreError> {
        if self.done {
            return Ok(());
        }
        let events = std::mem::take(&mut self.events);
        if !self.open && events.is_empty() {
            // Nothing written: the key's completion alone, one statement.
            let Some(key) = self.key.clone() else {
                return Ok(());
            };
            let conn: &mut PgConnection = &mut self.session;
            let result = Self::complete_key(conn, &key, answer).await;
            return self.session.settle(result);
        }
        let key = self.key.clone();
        // The context the events are committed in: traces continue from it.
        let traceparent = crate::telemetry::traces::current();
        let conn = self.begun().await?;
        let result: Result<(), StoreError> = async {
            for (topic, aggregate_id, payload) in events {
                sqlx::query(concat!(insert_outbox!(), "VALUES ($1, $2, $3, $4, $5)"))
                    .bind(Uuid::now_v7())
                    .bind(topic)
                    .bind(aggregate_id)
                    .bind(payload)
                    .bind(&traceparent)
                    .execute(&mut *conn)
                    .await?;
            }
            if let Some(key) = &key {
                Self::complete_key(conn, key, answer).await?;
            }
            // Failpoint: a business transaction that holds its locks (the
            // key's row, the outbox row) for a while before committing, so a
            // request timeout can cut it off mid-transaction.
            if let Some(pause) = crate::failpoints::pause("business-before-commit") {
                tokio::time::sleep(pause).await;
            }
            PgTransactionManager::commit(conn).await?;
            Ok(())
        }
        .await;
        if result.is_ok() {
            self.open = false;
        }
        self.session.settle(result)
    }
}

impl PgUnitOfWork {
    /// [`SUBMIT_APPLICATION`], and what its flags say.
    async fn submit_in_one_statement(
        &mut self,
        application: &Application,
        created: &StoredResponse,
    ) -> Result<ApplyOutcome, StoreError> {
        let lease = self.key.as_ref();
        let payload = serde_json::to_value(ApplicationSubmitted::of(application, "", ""))
            .map_err(|e| StoreError::Internal(e.to_string()))?;
        let conn: &mut PgConnection = &mut self.session;
        let row = sqlx::query(SUBMIT_APPLICATION)
            .bind(application.id)
            .bind(application.job_id)
            .bind(&application.user_id)
            .bind(&application.email)
            .bind(&application.resume_url)
            .bind(&application.cover_letter)
            .bind(application.created_at)
            .bind(lease.map(|l| l.scope.principal.as_str()))
            .bind(lease.map(|l| l.scope.method))
            .bind(lease.map(|l| l.scope.route))
            .bind(lease.map(|l| l.key.as_str()))
            .bind(lease.map(|l| l.holder))
            .bind(Uuid::now_v7())
            .bind(created.status as i16)
            .bind(&created.body)
            .bind(topics::APPLICATION_SUBMITTED)
            .bind(payload)
            .bind(ApplicationSubmitted::JOB_TITLE)
            .bind(ApplicationSubmitted::COMPANY)
            .bind(JobStatus::Open.as_str())
            .bind(crate::telemetry::traces::current())
            .fetch_one(&mut *conn)
            .await?;
        let (held, job_found, job_open, inserted, completed): (bool, bool, bool, bool, bool) = (
            row.try_get("held")?,
            row.try_get("job_found")?,
            row.try_get("job_open")?,
            row.try_get("created")?,
            row.try_get("completed")?,
        );
        if !held {
            return Err(StoreError::LeaseLost);
        }
        if !job_found {
            return Err(StoreError::JobNotFound);
        }
        if !job_open {
            return Err(StoreError::JobClosed);
        }
        if inserted {
            if lease.is_some() && !completed {
                // Ran past its lease and was taken over while inserting: the
                // application exists once; the successor's answer ("already
                // applied") is the key's outcome, so this client retries to it.
                tracing::warn!("idempotency lease lost while applying; the successor owns the key");
                return Err(StoreError::LeaseLost);
            }
            return Ok(ApplyOutcome::Created(application.clone()));
        }
        // The user already applied: that application is the answer, and
        // the key is completed with it when the unit commits.
        let existing = self
            .application_of(&application.user_id, application.job_id)
            .await?;
        existing
            .map(ApplyOutcome::AlreadyApplied)
            .ok_or_else(|| StoreError::Internal("the existing application vanished".into()))
    }
}
