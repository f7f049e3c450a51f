//! Intake on SQLite: jobs, applications and charges, each with its outbox
//! event and its key's outcome in one write transaction.

use super::keys::Query;
use super::*;

/// Binds `$1`-`$11` of [`INSERT_JOB`] and [`UPDATE_JOB`].
fn bind_job<'q>(query: Query<'q>, job: &'q Job, keys: &'q SearchKeys) -> Query<'q> {
    query
        .bind(job.id.to_string())
        .bind(&job.title)
        .bind(&job.company)
        .bind(&job.location)
        .bind(&job.description)
        .bind(job.status.as_str())
        .bind(job.version)
        .bind(job.updated_at.timestamp_micros())
        .bind(&keys.text)
        .bind(&keys.location)
        .bind(&keys.company)
}

impl SqliteStore {
    /// The common end of every business transaction: the outbox event, the
    /// key's outcome (when the request carries a key), commit.
    pub(super) async fn finish(
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
}

#[async_trait]
impl IntakeStore for SqliteStore {
    #[instrument(skip_all)]
    async fn list_jobs(
        &self,
        limit: u32,
        before: Option<Uuid>,
        filter: &JobFilter,
    ) -> Result<Vec<Job>, StoreError> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs
              WHERE status = ?3 AND (?1 IS NULL OR id < ?1)
                AND (?4 IS NULL OR instr(search_text, ?4) > 0)
                AND (?5 IS NULL OR location_key = ?5)
                AND (?6 IS NULL OR company_key = ?6)
              ORDER BY id DESC LIMIT ?2"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(before.map(|b| b.to_string()))
            .bind(i64::from(limit))
            .bind(JobStatus::Open.as_str())
            .bind(filter.q.as_deref())
            .bind(filter.location.as_deref())
            .bind(filter.company.as_deref())
            .fetch_all(&self.reader)
            .await?;
        Ok(rows.iter().map(job_from_row).collect::<Result<_, _>>()?)
    }

    #[instrument(skip_all)]
    async fn get_job(&self, id: Uuid) -> Result<Option<Job>, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await?;
        Ok(row.as_ref().map(job_from_row).transpose()?)
    }

    #[instrument(skip_all)]
    async fn post_job(
        &self,
        job: &Job,
        lease: Option<&KeyLease>,
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
        let mut tx = self.write_holding(lease).await?;
        let keys = job.search_keys();
        bind_job(sqlx::query(INSERT_JOB), job, &keys)
            .bind(job.posted_at.timestamp_micros())
            .execute(&mut *tx)
            .await?;
        let event = (topics::JOB_POSTED, job.id, job_posted_payload(job)?);
        Self::finish(tx, Some(event), lease, response).await
    }

    #[instrument(skip_all)]
    async fn change_job(
        &self,
        id: Uuid,
        change: &JobChange,
        lease: Option<&KeyLease>,
        status: u16,
    ) -> Result<Job, StoreError> {
        let mut tx = self.write_holding(lease).await?;
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::JobNotFound)?;
        let job = job_from_row(&row)?;
        let (job, event) = match decide_job_change(change, &job, chrono::Utc::now())? {
            Some((next, event)) => {
                let keys = next.search_keys();
                bind_job(sqlx::query(UPDATE_JOB), &next, &keys)
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

    #[instrument(skip_all)]
    async fn submit_application(
        &self,
        application: &Application,
        lease: Option<&KeyLease>,
        created: &StoredResponse,
    ) -> Result<ApplyOutcome, StoreError> {
        let mut tx = self.write_holding(lease).await?;
        let job = sqlx::query("SELECT title, company, status FROM jobs WHERE id = ?")
            .bind(application.job_id.to_string())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::JobNotFound)?;
        if job.status::<JobStatus>("status")? != JobStatus::Open {
            return Err(StoreError::JobClosed);
        }
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
            let payload = to_json(&ApplicationSubmitted::of(
                application,
                &job.try_get::<String, _>("title")?,
                &job.try_get::<String, _>("company")?,
            ))?;
            let event = (topics::APPLICATION_SUBMITTED, application.id, payload);
            Self::finish(tx, Some(event), lease, created).await?;
            return Ok(ApplyOutcome::Created(application.clone()));
        }
        // The user already applied: return that application, write nothing
        // (the transaction rolls back when dropped).
        let sql = format!(
            "SELECT {APPLICATION_COLUMNS} FROM applications WHERE user_id = ? AND job_id = ?"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(&application.user_id)
            .bind(application.job_id.to_string())
            .fetch_one(&mut *tx)
            .await?;
        Ok(ApplyOutcome::AlreadyApplied(application_from_row(&row)?))
    }

    #[instrument(skip_all)]
    async fn list_applications(
        &self,
        user_id: &str,
        limit: u32,
        before: Option<Uuid>,
    ) -> Result<Vec<Application>, StoreError> {
        let sql = format!(
            "SELECT {APPLICATION_COLUMNS} FROM applications
              WHERE user_id = ?1 AND (?2 IS NULL OR id < ?2)
              ORDER BY id DESC LIMIT ?3"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(user_id)
            .bind(before.map(|b| b.to_string()))
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        Ok(rows
            .iter()
            .map(application_from_row)
            .collect::<Result<_, _>>()?)
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
        response: &StoredResponse,
    ) -> Result<(), StoreError> {
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
        let event = (
            topics::CHARGE_CREATED,
            charge.id,
            charge_created_payload(charge)?,
        );
        Self::finish(tx, Some(event), Some(lease), response).await
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
}
