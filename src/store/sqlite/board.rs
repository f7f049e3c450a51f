//! The board's reads on SQLite: jobs, applications and charges, from the
//! read-only pool. (They are written in a [`super::work::SqliteUnitOfWork`].)

use super::*;

#[async_trait]
impl BoardReads for SqliteStore {
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
