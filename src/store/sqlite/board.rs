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
        if filter.q.is_none() {
            return self.indexed_page(limit, before, filter).await;
        }
        q_page(
            &mut SqliteQSearch {
                store: self,
                filter,
            },
            limit,
            before,
        )
        .await
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

/// The filter's conditions, as many as it has, each one bound; `q` as
/// itself, which [`SqliteStore::indexed_page`] narrows first. `q` is tested
/// by `LIKE` with its wildcards escaped rather than by `instr`, which
/// compares at every character: over 20,000 cached rows of 1.5 kB texts,
/// `instr` took 52 ms and `LIKE` 30, of which 18 reading the rows (SQLite's
/// timer). SQLite's `LIKE` ignores ASCII case, and both the text and `q`
/// are lowercased, so it matches exactly where `q` occurs.
fn push_filter(sql: &mut sqlx::QueryBuilder<Sqlite>, filter: &JobFilter) {
    if let Some(pattern) = filter.q_like_pattern() {
        sql.push(" AND search_text LIKE ")
            .push_bind(pattern)
            .push(" ESCAPE '\\'");
    }
    if let Some(location) = &filter.location {
        sql.push(" AND location_key = ").push_bind(location.clone());
    }
    if let Some(company) = &filter.company {
        sql.push(" AND company_key = ").push_bind(company.clone());
    }
}

impl SqliteStore {
    /// Open jobs matching `filter` below `before`, newest first, through
    /// the indexes: `q` by the trigram index (migrations/sqlite/0008) when
    /// it is long enough for one, then checked as itself; location and
    /// company by their indexes.
    async fn indexed_page(
        &self,
        limit: u32,
        before: Option<Uuid>,
        filter: &JobFilter,
    ) -> Result<Vec<Job>, StoreError> {
        let mut sql = sqlx::QueryBuilder::<Sqlite>::new(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE status = "
        ));
        sql.push_bind(JobStatus::Open.as_str());
        if let Some(before) = before {
            sql.push(" AND id < ").push_bind(before.to_string());
        }
        if let Some(phrase) = filter.q_trigram_phrase() {
            sql.push(" AND search_id IN (SELECT rowid FROM jobs_search WHERE jobs_search MATCH ")
                .push_bind(phrase)
                .push(")");
        }
        push_filter(&mut sql, filter);
        sql.push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::from(limit));
        let rows = sql.build().fetch_all(&self.reader).await?;
        Ok(rows.iter().map(job_from_row).collect::<Result<_, _>>()?)
    }
}

/// A `q` list on the read-only pool ([`q_page`] drives it).
struct SqliteQSearch<'s> {
    store: &'s SqliteStore,
    filter: &'s JobFilter,
}

#[async_trait]
impl QSearch for SqliteQSearch<'_> {
    /// The matches among the newest `window` open jobs below `before`, and
    /// the window's oldest job when it was full.
    async fn newest_matching(
        &mut self,
        limit: u32,
        before: Option<Uuid>,
        window: i64,
    ) -> Result<WindowHits, StoreError> {
        // The window's oldest job first (a walk of the index alone), then
        // the matches at or above it, newest first, so that the scan stops
        // at the page's last match. (A window as a subquery with its own
        // LIMIT is read whole and sorted again: SQLite does not carry its
        // order out of it.)
        let mut sql = sqlx::QueryBuilder::<Sqlite>::new("SELECT id FROM jobs WHERE status = ");
        sql.push_bind(JobStatus::Open.as_str());
        if let Some(before) = before {
            sql.push(" AND id < ").push_bind(before.to_string());
        }
        sql.push(" ORDER BY id DESC LIMIT 1 OFFSET ")
            .push_bind(window - 1);
        let floor = sql.build().fetch_optional(&self.store.reader).await?;
        let floor = match floor {
            Some(row) => Some(
                Uuid::parse_str(&row.try_get::<String, _>("id")?)
                    .map_err(|e| sqlx::Error::Decode(e.into()))?,
            ),
            None => None,
        };
        let mut sql = sqlx::QueryBuilder::<Sqlite>::new(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE status = "
        ));
        sql.push_bind(JobStatus::Open.as_str());
        if let Some(before) = before {
            sql.push(" AND id < ").push_bind(before.to_string());
        }
        if let Some(floor) = floor {
            sql.push(" AND id >= ").push_bind(floor.to_string());
        }
        push_filter(&mut sql, self.filter);
        sql.push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::from(limit));
        let rows = sql.build().fetch_all(&self.store.reader).await?;
        let jobs: Vec<Job> = rows.iter().map(job_from_row).collect::<Result<_, _>>()?;
        // Below the window only if it was full and did not fill the page.
        let below = floor.filter(|_| jobs.len() < limit as usize);
        Ok(WindowHits { jobs, below })
    }

    async fn indexed(&mut self, limit: u32, before: Option<Uuid>) -> Result<Vec<Job>, StoreError> {
        self.store.indexed_page(limit, before, self.filter).await
    }
}
