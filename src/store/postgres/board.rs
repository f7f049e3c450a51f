//! The board's reads on Postgres: jobs, applications and charges. (They are
//! written in a [`super::work::PgUnitOfWork`].)

use super::*;

#[async_trait]
impl BoardReads for PgStore {
    #[instrument(skip_all)]
    async fn list_jobs(
        &self,
        limit: u32,
        before: Option<Uuid>,
        filter: &JobFilter,
    ) -> Result<Vec<Job>, StoreError> {
        self.with_conn(|conn, _| {
            Box::pin(async move {
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
            })
        })
        .await
    }

    #[instrument(skip_all)]
    async fn get_job(&self, id: Uuid) -> Result<Option<Job>, StoreError> {
        self.with_conn(|conn, _| {
            Box::pin(async move {
                let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
                let row = sqlx::query(AssertSqlSafe(sql))
                    .bind(id)
                    .fetch_optional(&mut *conn)
                    .await?;
                Ok(row.as_ref().map(job_from_row).transpose()?)
            })
        })
        .await
    }

    #[instrument(skip_all)]
    async fn list_applications(
        &self,
        user_id: &str,
        limit: u32,
        before: Option<Uuid>,
    ) -> Result<Vec<Application>, StoreError> {
        self.with_conn(|conn, _| {
            Box::pin(async move {
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
            })
        })
        .await
    }

    #[instrument(skip_all)]
    async fn get_application(
        &self,
        id: Uuid,
        user_id: &str,
    ) -> Result<Option<Application>, StoreError> {
        self.with_conn(|conn, _| {
            Box::pin(async move {
                let row = sqlx::query(AssertSqlSafe(format!(
                    "SELECT {APPLICATION_COLUMNS} FROM applications WHERE id = $1 AND user_id = $2"
                )))
                .bind(id)
                .bind(user_id)
                .fetch_optional(&mut *conn)
                .await?;
                Ok(row.as_ref().map(application_from_row).transpose()?)
            })
        })
        .await
    }

    #[instrument(skip_all)]
    async fn get_charge(&self, id: Uuid, user_id: &str) -> Result<Option<Charge>, StoreError> {
        self.with_conn(|conn, _| {
            Box::pin(async move {
                let row = sqlx::query(
                "SELECT id, user_id, amount_cents, currency, description, ledger_status, created_at
                   FROM charges WHERE id = $1 AND user_id = $2",
            )
            .bind(id)
            .bind(user_id)
            .fetch_optional(&mut *conn)
            .await?;
                Ok(row.as_ref().map(charge_from_row).transpose()?)
            })
        })
        .await
    }
}
