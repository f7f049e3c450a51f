//! The Postgres backend of [`Store`](super::Store), the production store.
//!
//! Key claims are one atomic `INSERT … ON CONFLICT … DO UPDATE … WHERE`
//! statement: a free key is inserted, an expired key or a crashed holder's
//! lapsed lease is taken over, anything else is left alone and then read to
//! tell replay, in-flight and mismatch apart. Never SELECT-then-INSERT.
//! Business transactions complete the key with a fencing check on the holder,
//! so a request that ran past its lease cannot overwrite its successor.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};
use tracing::instrument;
use uuid::Uuid;

use super::{
    ApplyOutcome, KeyClaim, KeyClaimRequest, KeyLease, OutboxStats, Render, Store, StoreError,
};
use crate::config::Config;
use crate::domain::{topics, Application, Charge, EmailStatus, Job, LedgerStatus};
use crate::idempotency::StoredResponse;

/// Postgres error codes that mean "try again later", not "your request is bad".
fn is_unavailable_code(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources (too many connections, disk full)
        || code.starts_with("57P") // admin shutdown, crash shutdown, cannot connect now
        || code == "40001" // serialization failure
        || code == "40P01" // deadlock detected
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
            sqlx::Error::Database(db) if db.code().is_some_and(|c| is_unavailable_code(&c)) => {
                StoreError::Unavailable(e.to_string())
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

/// Postgres store over a connection pool.
#[derive(Clone)]
pub struct PgStore {
    /// Bounded pool; a request that cannot get a connection in
    /// `database.acquire_timeout_ms` is answered 503.
    pool: PgPool,
}

fn job_from_row(row: &PgRow) -> Result<Job, sqlx::Error> {
    Ok(Job {
        id: row.try_get("id")?,
        title: row.try_get("title")?,
        company: row.try_get("company")?,
        location: row.try_get("location")?,
        description: row.try_get("description")?,
        posted_at: row.try_get("posted_at")?,
    })
}

fn application_from_row(row: &PgRow) -> Result<Application, sqlx::Error> {
    let status: String = row.try_get("email_status")?;
    Ok(Application {
        id: row.try_get("id")?,
        job_id: row.try_get("job_id")?,
        user_id: row.try_get("user_id")?,
        email: row.try_get("email")?,
        resume_url: row.try_get("resume_url")?,
        cover_letter: row.try_get("cover_letter")?,
        email_status: EmailStatus::parse(&status).ok_or_else(|| {
            sqlx::Error::Decode(format!("unknown email_status `{status}`").into())
        })?,
        created_at: row.try_get("created_at")?,
    })
}

impl PgStore {
    pub async fn connect(config: &Config) -> Result<PgStore, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(config.database.max_connections)
            .acquire_timeout(Duration::from_millis(config.database.acquire_timeout_ms))
            .connect_lazy(config.database_url.expose())
            .map_err(|e| StoreError::Internal(format!("database_url: {e}")))?;
        Ok(PgStore { pool })
    }

    /// The pool, for benchmarks and tests that inspect rows.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Marks the key completed inside `tx`, only if `lease` still holds it.
    async fn complete_key_in(
        tx: &mut Transaction<'_, Postgres>,
        lease: &KeyLease,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE idempotency_keys
                SET state = 'completed', response_status = $6, response_body = $7,
                    lease_expires_at = NULL
              WHERE principal = $1 AND method = $2 AND route = $3 AND key = $4
                AND holder = $5 AND state = 'in_progress'",
        )
        .bind(&lease.scope.principal)
        .bind(lease.scope.method)
        .bind(lease.scope.route)
        .bind(lease.key.as_str())
        .bind(lease.holder)
        .bind(response.status as i16)
        .bind(&response.body)
        .execute(&mut **tx)
        .await?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(StoreError::LeaseLost)
        }
    }

    /// The common end of every business transaction: the outbox event, the
    /// key's outcome (when the request carries a key), commit.
    async fn finish(
        mut tx: Transaction<'_, Postgres>,
        event: Option<(&str, Uuid, serde_json::Value)>,
        lease: Option<&KeyLease>,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        if let Some((topic, aggregate_id, payload)) = event {
            sqlx::query(
                "INSERT INTO outbox_events (event_id, topic, aggregate_id, payload)
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(Uuid::now_v7())
            .bind(topic)
            .bind(aggregate_id)
            .bind(payload)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(lease) = lease {
            Self::complete_key_in(&mut tx, lease, response).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

fn charge_from_row(row: &PgRow) -> Result<Charge, sqlx::Error> {
    let status: String = row.try_get("ledger_status")?;
    Ok(Charge {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        amount_cents: row.try_get("amount_cents")?,
        currency: row.try_get("currency")?,
        description: row.try_get("description")?,
        ledger_status: LedgerStatus::parse(&status).ok_or_else(|| {
            sqlx::Error::Decode(format!("unknown ledger_status `{status}`").into())
        })?,
        created_at: row.try_get("created_at")?,
    })
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(value).map_err(|e| StoreError::Internal(e.to_string()))
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    #[instrument(skip_all)]
    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/postgres")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    #[instrument(skip_all)]
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    #[instrument(skip_all)]
    async fn list_jobs(&self, limit: u32, before: Option<Uuid>) -> Result<Vec<Job>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, title, company, location, description, posted_at FROM jobs
              WHERE ($1::uuid IS NULL OR id < $1)
              ORDER BY id DESC LIMIT $2",
        )
        .bind(before)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(job_from_row).collect::<Result<_, _>>()?)
    }

    #[instrument(skip_all)]
    async fn get_job(&self, id: Uuid) -> Result<Option<Job>, StoreError> {
        let row = sqlx::query(
            "SELECT id, title, company, location, description, posted_at FROM jobs WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(job_from_row).transpose()?)
    }

    #[instrument(skip_all)]
    async fn claim_key(&self, claim: &KeyClaimRequest) -> Result<KeyClaim, StoreError> {
        let holder = Uuid::new_v4();
        // Two passes at most: the second covers a row deleted by the janitor
        // between the upsert and the read.
        for _ in 0..2 {
            let claimed: Option<Uuid> = sqlx::query_scalar(
                "INSERT INTO idempotency_keys AS k
                        (principal, method, route, key, fingerprint, state, holder,
                         lease_expires_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, 'in_progress', $6,
                         now() + make_interval(secs => $7), now() + make_interval(secs => $8))
                 ON CONFLICT (principal, method, route, key) DO UPDATE
                    SET fingerprint = EXCLUDED.fingerprint, state = 'in_progress',
                        holder = EXCLUDED.holder, lease_expires_at = EXCLUDED.lease_expires_at,
                        response_status = NULL, response_body = NULL,
                        created_at = now(), expires_at = EXCLUDED.expires_at
                  WHERE k.expires_at < now()
                     OR (k.state = 'in_progress' AND k.lease_expires_at < now()
                         AND k.fingerprint = EXCLUDED.fingerprint)
                 RETURNING holder",
            )
            .bind(&claim.scope.principal)
            .bind(claim.scope.method)
            .bind(claim.scope.route)
            .bind(claim.key.as_str())
            .bind(&claim.fingerprint.0[..])
            .bind(holder)
            .bind(claim.lease.as_secs_f64())
            .bind(claim.ttl.as_secs_f64())
            .fetch_optional(&self.pool)
            .await?;
            if claimed == Some(holder) {
                return Ok(KeyClaim::New(KeyLease {
                    scope: claim.scope.clone(),
                    key: claim.key.clone(),
                    fingerprint: claim.fingerprint,
                    holder,
                }));
            }
            let existing = sqlx::query(
                "SELECT fingerprint, state, response_status, response_body FROM idempotency_keys
                  WHERE principal = $1 AND method = $2 AND route = $3 AND key = $4",
            )
            .bind(&claim.scope.principal)
            .bind(claim.scope.method)
            .bind(claim.scope.route)
            .bind(claim.key.as_str())
            .fetch_optional(&self.pool)
            .await?;
            let Some(row) = existing else { continue };
            let fingerprint: Vec<u8> = row.try_get("fingerprint")?;
            if fingerprint != claim.fingerprint.0 {
                return Ok(KeyClaim::Mismatch);
            }
            let state: String = row.try_get("state")?;
            if state == "completed" {
                let status: i16 = row.try_get("response_status")?;
                let body: String = row.try_get("response_body")?;
                return Ok(KeyClaim::Replay(StoredResponse {
                    status: status as u16,
                    body,
                }));
            }
            return Ok(KeyClaim::InFlight);
        }
        Ok(KeyClaim::InFlight)
    }

    #[instrument(skip_all)]
    async fn complete_key(
        &self,
        lease: &KeyLease,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        Self::complete_key_in(&mut tx, lease, response).await?;
        tx.commit().await?;
        Ok(())
    }

    #[instrument(skip_all)]
    async fn release_key(&self, lease: &KeyLease) -> Result<(), StoreError> {
        sqlx::query(
            "DELETE FROM idempotency_keys
              WHERE principal = $1 AND method = $2 AND route = $3 AND key = $4
                AND holder = $5 AND state = 'in_progress'",
        )
        .bind(&lease.scope.principal)
        .bind(lease.scope.method)
        .bind(lease.scope.route)
        .bind(lease.key.as_str())
        .bind(lease.holder)
        .execute(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO jobs (id, title, company, location, description, posted_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(job.id)
        .bind(&job.title)
        .bind(&job.company)
        .bind(&job.location)
        .bind(&job.description)
        .bind(job.posted_at)
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
        let mut tx = self.pool.begin().await?;
        let job = sqlx::query("SELECT title, company FROM jobs WHERE id = $1")
            .bind(application.job_id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(job) = job else {
            return Err(StoreError::JobNotFound);
        };
        let inserted = sqlx::query(
            "INSERT INTO applications
                    (id, job_id, user_id, email, resume_url, cover_letter, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (user_id, job_id) DO NOTHING",
        )
        .bind(application.id)
        .bind(application.job_id)
        .bind(&application.user_id)
        .bind(&application.email)
        .bind(&application.resume_url)
        .bind(&application.cover_letter)
        .bind(application.created_at)
        .execute(&mut *tx)
        .await?;
        let (outcome, event) = if inserted.rows_affected() == 1 {
            let title: String = job.try_get("title")?;
            let company: String = job.try_get("company")?;
            let payload = json!({
                "application_id": application.id,
                "job_id": application.job_id,
                "user_id": application.user_id,
                "email": application.email,
                "job_title": title,
                "company": company,
            });
            let event = (topics::APPLICATION_SUBMITTED, application.id, payload);
            (ApplyOutcome::Created(application.clone()), Some(event))
        } else {
            // The user already applied: return that application, emit nothing.
            let row = sqlx::query(
                "SELECT id, job_id, user_id, email, resume_url, cover_letter, email_status,
                        created_at
                   FROM applications WHERE user_id = $1 AND job_id = $2",
            )
            .bind(&application.user_id)
            .bind(application.job_id)
            .fetch_one(&mut *tx)
            .await?;
            (
                ApplyOutcome::AlreadyApplied(application_from_row(&row)?),
                None,
            )
        };
        let response = render(&outcome);
        Self::finish(tx, event, lease, &response).await?;
        Ok((outcome, response))
    }

    #[instrument(skip_all)]
    async fn get_application(
        &self,
        id: Uuid,
        user_id: &str,
    ) -> Result<Option<Application>, StoreError> {
        let row = sqlx::query(
            "SELECT id, job_id, user_id, email, resume_url, cover_letter, email_status, created_at
               FROM applications WHERE id = $1 AND user_id = $2",
        )
        .bind(id)
        .bind(user_id)
        .fetch_optional(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO charges (id, user_id, amount_cents, currency, description, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(charge.id)
        .bind(&charge.user_id)
        .bind(charge.amount_cents)
        .bind(&charge.currency)
        .bind(&charge.description)
        .bind(charge.created_at)
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
               FROM charges WHERE id = $1 AND user_id = $2",
        )
        .bind(id)
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(charge_from_row).transpose()?)
    }

    #[instrument(skip_all)]
    async fn outbox_stats(&self) -> Result<OutboxStats, StoreError> {
        let row = sqlx::query(
            "SELECT count(*) AS pending, min(created_at) AS oldest
               FROM outbox_events WHERE published_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        let pending: i64 = row.try_get("pending")?;
        let oldest: Option<DateTime<Utc>> = row.try_get("oldest")?;
        let lag_seconds = oldest
            .map(|t| (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0)
            .unwrap_or(0.0);
        Ok(OutboxStats {
            pending,
            lag_seconds,
        })
    }
}
