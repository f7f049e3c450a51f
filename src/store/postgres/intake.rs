//! Intake on Postgres: jobs, applications and charges, each with its
//! outbox event and its key's outcome in one transaction.

use super::*;

/// A new application in one statement (Postgres runs all of it in one
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
/// The flags it returns tell the caller which case it was.
pub const SUBMIT_APPLICATION: &str = "
WITH held AS (
    SELECT 1 WHERE $12::uuid IS NULL OR EXISTS (
        SELECT 1 FROM idempotency_keys
         WHERE principal = $8 AND method = $9 AND route = $10 AND key = $11
           AND holder = $12 AND state = 'in_progress')
), job AS (
    SELECT id, title, company, status = $20 AS open FROM jobs WHERE id = $2
), app AS (
    INSERT INTO applications (id, job_id, user_id, email, resume_url, cover_letter, created_at)
    SELECT $1, job.id, $3, $4, $5, $6, $7 FROM job, held WHERE job.open
    ON CONFLICT (user_id, job_id) DO NOTHING
    RETURNING id
), event AS (
    INSERT INTO outbox_events (event_id, topic, aggregate_id, payload)
    SELECT $13, $16, app.id,
           $17::jsonb || jsonb_build_object($18::text, job.title, $19::text, job.company)
      FROM app, job
), done AS (
    UPDATE idempotency_keys
       SET state = 'completed', response_status = $14, response_body = $15,
           lease_expires_at = NULL
     WHERE principal = $8 AND method = $9 AND route = $10 AND key = $11
       AND holder = $12 AND state = 'in_progress' AND EXISTS (SELECT 1 FROM app)
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM held) AS held,
       EXISTS (SELECT 1 FROM job) AS job_found,
       EXISTS (SELECT 1 FROM job WHERE open) AS job_open,
       EXISTS (SELECT 1 FROM app) AS created,
       EXISTS (SELECT 1 FROM done) AS completed";

/// Binds `$1`-`$11` of [`INSERT_JOB`] and [`UPDATE_JOB`].
trait BindJob<'q> {
    fn bind_job(self, job: &'q Job, keys: &'q SearchKeys) -> Self;
}

impl<'q> BindJob<'q> for sqlx::query::Query<'q, Postgres, PgArguments> {
    fn bind_job(self, job: &'q Job, keys: &'q SearchKeys) -> Self {
        self.bind(job.id)
            .bind(&job.title)
            .bind(&job.company)
            .bind(&job.location)
            .bind(&job.description)
            .bind(job.status.as_str())
            .bind(job.version)
            .bind(job.updated_at)
            .bind(&keys.text)
            .bind(&keys.location)
            .bind(&keys.company)
    }
}

impl PgStore {
    pub(super) async fn finish(
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
        // Failpoint: a business transaction that holds its locks (the key's
        // row, the outbox row) for a while before committing, so a request
        // timeout can cut it off mid-transaction.
        if let Some(pause) = crate::failpoints::pause("business-before-commit") {
            tokio::time::sleep(pause).await;
        }
        tx.commit().await?;
        Ok(())
    }
}

#[async_trait]
impl IntakeStore for PgStore {
    #[instrument(skip_all)]
    async fn list_jobs(
        &self,
        limit: u32,
        before: Option<Uuid>,
        filter: &JobFilter,
    ) -> Result<Vec<Job>, StoreError> {
        let mut session = self.session().await?;
        let result: Result<Vec<Job>, StoreError> = async {
            let conn: &mut PgConnection = &mut session;
            let sql = format!(
                "SELECT {JOB_COLUMNS} FROM jobs
                  WHERE status = $3 AND ($1::uuid IS NULL OR id < $1)
                    AND ($4::text IS NULL OR strpos(search_text, $4) > 0)
                    AND ($5::text IS NULL OR location_key = $5)
                    AND ($6::text IS NULL OR company_key = $6)
                  ORDER BY id DESC LIMIT $2"
            );
            let rows = sqlx::query(AssertSqlSafe(sql))
                .bind(before)
                .bind(limit as i64)
                .bind(JobStatus::Open.as_str())
                .bind(filter.q.as_deref())
                .bind(filter.location.as_deref())
                .bind(filter.company.as_deref())
                .fetch_all(&mut *conn)
                .await?;
            Ok(rows.iter().map(job_from_row).collect::<Result<_, _>>()?)
        }
        .await;
        session.settle(result)
    }

    #[instrument(skip_all)]
    async fn get_job(&self, id: Uuid) -> Result<Option<Job>, StoreError> {
        let mut session = self.session().await?;
        let result: Result<Option<Job>, StoreError> = async {
            let conn: &mut PgConnection = &mut session;
            let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
            let row = sqlx::query(AssertSqlSafe(sql))
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?;
            Ok(row.as_ref().map(job_from_row).transpose()?)
        }
        .await;
        session.settle(result)
    }

    #[instrument(skip_all)]
    async fn post_job(
        &self,
        job: &Job,
        lease: Option<&KeyLease>,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        let mut session = self.session().await?;
        let result: Result<(), StoreError> = async {
            let conn: &mut PgConnection = &mut session;
            let mut tx = conn.begin().await?;
            let keys = job.search_keys();
            sqlx::query(INSERT_JOB)
                .bind_job(job, &keys)
                .bind(job.posted_at)
                .execute(&mut *tx)
                .await?;
            let event = (topics::JOB_POSTED, job.id, job_posted_payload(job)?);
            Self::finish(tx, Some(event), lease, response).await
        }
        .await;
        session.settle(result)
    }

    #[instrument(skip_all)]
    async fn change_job(
        &self,
        id: Uuid,
        change: &JobChange,
        lease: Option<&KeyLease>,
        status: u16,
    ) -> Result<Job, StoreError> {
        let mut session = self.session().await?;
        let result: Result<Job, StoreError> = async {
            let conn: &mut PgConnection = &mut session;
            let mut tx = conn.begin().await?;
            let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 FOR UPDATE");
            let row = sqlx::query(AssertSqlSafe(sql))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::JobNotFound)?;
            let job = job_from_row(&row)?;
            let (job, event) = match decide_job_change(change, &job, chrono::Utc::now())? {
                Some((next, event)) => {
                    let keys = next.search_keys();
                    sqlx::query(UPDATE_JOB)
                        .bind_job(&next, &keys)
                        .execute(&mut *tx)
                        .await?;
                    (next, Some(event))
                }
                None => (job, None),
            };
            let response = StoredResponse::json(status, &job);
            Self::finish(tx, event, lease, &response).await?;
            Ok(job)
        }
        .await;
        session.settle(result)
    }

    #[instrument(skip_all)]
    async fn submit_application(
        &self,
        application: &Application,
        lease: Option<&KeyLease>,
        created: &StoredResponse,
    ) -> Result<ApplyOutcome, StoreError> {
        let mut session = self.session().await?;
        let result: Result<ApplyOutcome, StoreError> = async {
            let conn: &mut PgConnection = &mut session;
            // The common case — a new application — is one atomic statement: the
            // key's lease is checked (and locked), the application and its event
            // inserted and the key completed, or nothing at all. One round trip
            // instead of six; `SUBMIT_APPLICATION` explains each part.
            let response = created;
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
                .bind(response.status as i16)
                .bind(&response.body)
                .bind(topics::APPLICATION_SUBMITTED)
                .bind(to_json(&ApplicationSubmitted::of(application, "", ""))?)
                .bind(ApplicationSubmitted::JOB_TITLE)
                .bind(ApplicationSubmitted::COMPANY)
                .bind(JobStatus::Open.as_str())
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
                    tracing::warn!(
                        "idempotency lease lost while applying; the successor owns the key"
                    );
                    return Err(StoreError::LeaseLost);
                }
                return Ok(ApplyOutcome::Created(application.clone()));
            }
            // The user already applied: return that application, write nothing.
            let row = sqlx::query(AssertSqlSafe(format!(
                "SELECT {APPLICATION_COLUMNS} FROM applications WHERE user_id = $1 AND job_id = $2"
            )))
            .bind(&application.user_id)
            .bind(application.job_id)
            .fetch_one(&mut *conn)
            .await?;
            Ok(ApplyOutcome::AlreadyApplied(application_from_row(&row)?))
        }
        .await;
        session.settle(result)
    }

    #[instrument(skip_all)]
    async fn list_applications(
        &self,
        user_id: &str,
        limit: u32,
        before: Option<Uuid>,
    ) -> Result<Vec<Application>, StoreError> {
        let mut session = self.session().await?;
        let result: Result<Vec<Application>, StoreError> = async {
            let conn: &mut PgConnection = &mut session;
            let sql = format!(
                "SELECT {APPLICATION_COLUMNS} FROM applications
                  WHERE user_id = $1 AND ($2::uuid IS NULL OR id < $2)
                  ORDER BY id DESC LIMIT $3"
            );
            let rows = sqlx::query(AssertSqlSafe(sql))
                .bind(user_id)
                .bind(before)
                .bind(i64::from(limit))
                .fetch_all(&mut *conn)
                .await?;
            Ok(rows
                .iter()
                .map(application_from_row)
                .collect::<Result<_, _>>()?)
        }
        .await;
        session.settle(result)
    }

    #[instrument(skip_all)]
    async fn get_application(
        &self,
        id: Uuid,
        user_id: &str,
    ) -> Result<Option<Application>, StoreError> {
        let mut session = self.session().await?;
        let result: Result<Option<Application>, StoreError> = async {
            let conn: &mut PgConnection = &mut session;
            let row = sqlx::query(AssertSqlSafe(format!(
                "SELECT {APPLICATION_COLUMNS} FROM applications WHERE id = $1 AND user_id = $2"
            )))
            .bind(id)
            .bind(user_id)
            .fetch_optional(&mut *conn)
            .await?;
            Ok(row.as_ref().map(application_from_row).transpose()?)
        }
        .await;
        session.settle(result)
    }

    #[instrument(skip_all)]
    async fn create_charge(
        &self,
        charge: &Charge,
        lease: &KeyLease,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        let mut session = self.session().await?;
        let result: Result<(), StoreError> = async {
            let conn: &mut PgConnection = &mut session;
            let mut tx = conn.begin().await?;
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
            let event = (
                topics::CHARGE_CREATED,
                charge.id,
                charge_created_payload(charge)?,
            );
            Self::finish(tx, Some(event), Some(lease), response).await
        }
        .await;
        session.settle(result)
    }

    #[instrument(skip_all)]
    async fn get_charge(&self, id: Uuid, user_id: &str) -> Result<Option<Charge>, StoreError> {
        let mut session = self.session().await?;
        let result: Result<Option<Charge>, StoreError> = async {
            let conn: &mut PgConnection = &mut session;
            let row = sqlx::query(
                "SELECT id, user_id, amount_cents, currency, description, ledger_status, created_at
                   FROM charges WHERE id = $1 AND user_id = $2",
            )
            .bind(id)
            .bind(user_id)
            .fetch_optional(&mut *conn)
            .await?;
            Ok(row.as_ref().map(charge_from_row).transpose()?)
        }
        .await;
        session.settle(result)
    }
}
