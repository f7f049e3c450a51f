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
                if filter.q.is_none() {
                    return indexed_page(conn, limit, before, filter).await;
                }
                q_page(&mut PgQSearch { conn, filter }, limit, before).await
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

/// How a `q` is tested: by `strpos` where the rows are read anyway (a
/// window of the newest: the cheapest test of a text), by `LIKE` where the
/// trigram index should answer it.
#[derive(Clone, Copy)]
enum QTest {
    Strpos,
    Like,
}

/// The filter's conditions, as many as it has, each one bound.
fn push_filter(sql: &mut sqlx::QueryBuilder<Postgres>, filter: &JobFilter, q_test: QTest) {
    match q_test {
        QTest::Strpos => {
            if let Some(q) = &filter.q {
                sql.push(" AND strpos(search_text, ")
                    .push_bind(q.clone())
                    .push(") > 0");
            }
        }
        QTest::Like => {
            if let Some(pattern) = filter.q_like_pattern() {
                sql.push(" AND search_text LIKE ").push_bind(pattern);
            }
        }
    }
    if let Some(location) = &filter.location {
        sql.push(" AND location_key = ").push_bind(location.clone());
    }
    if let Some(company) = &filter.company {
        sql.push(" AND company_key = ").push_bind(company.clone());
    }
}

/// Open jobs matching `filter` below `before`, newest first, through the
/// indexes: only the conditions the filter has, so the planner sees each one
/// (a generic `$n IS NULL OR …` hides them from an index): `q` by the trigram
/// index, location and company by theirs (migrations/postgres/0012).
async fn indexed_page(
    conn: &mut PgConnection,
    limit: u32,
    before: Option<Uuid>,
    filter: &JobFilter,
) -> Result<Vec<Job>, StoreError> {
    let mut sql = sqlx::QueryBuilder::<Postgres>::new(format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE status = "
    ));
    sql.push_bind(JobStatus::Open.as_str());
    if let Some(before) = before {
        sql.push(" AND id < ").push_bind(before);
    }
    push_filter(&mut sql, filter, QTest::Like);
    sql.push(" ORDER BY id DESC LIMIT ")
        .push_bind(i64::from(limit));
    let rows = sql.build().fetch_all(&mut *conn).await?;
    Ok(rows.iter().map(job_from_row).collect::<Result<_, _>>()?)
}

/// A `q` list on one connection ([`q_page`] drives it).
struct PgQSearch<'c> {
    conn: &'c mut PgConnection,
    filter: &'c JobFilter,
}

#[async_trait]
impl QSearch for PgQSearch<'_> {
    /// The matches among the newest `window` open jobs below `before`, and
    /// the window's oldest job when it was full.
    async fn newest_matching(
        &mut self,
        limit: u32,
        before: Option<Uuid>,
        window: i64,
    ) -> Result<WindowHits, StoreError> {
        // Reads the window newest first and stops at the page's last match.
        let mut sql = sqlx::QueryBuilder::<Postgres>::new(format!(
            "SELECT {JOB_COLUMNS} FROM jobs JOIN (SELECT id AS hit FROM (
                SELECT id, search_text, location_key, company_key FROM jobs WHERE status = "
        ));
        sql.push_bind(JobStatus::Open.as_str());
        if let Some(before) = before {
            sql.push(" AND id < ").push_bind(before);
        }
        sql.push(" ORDER BY id DESC LIMIT ")
            .push_bind(window)
            .push(") AS newest WHERE true");
        push_filter(&mut sql, self.filter, QTest::Strpos);
        sql.push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::from(limit))
            .push(") AS hits ON jobs.id = hits.hit ORDER BY jobs.id DESC");
        let rows = sql.build().fetch_all(&mut *self.conn).await?;
        let jobs: Vec<Job> = rows.iter().map(job_from_row).collect::<Result<_, _>>()?;
        if jobs.len() >= limit as usize {
            return Ok(WindowHits { jobs, below: None });
        }
        // The whole window was read: its oldest job, if it was full.
        let mut sql = sqlx::QueryBuilder::<Postgres>::new("SELECT id FROM jobs WHERE status = ");
        sql.push_bind(JobStatus::Open.as_str());
        if let Some(before) = before {
            sql.push(" AND id < ").push_bind(before);
        }
        sql.push(" ORDER BY id DESC OFFSET ")
            .push_bind(window - 1)
            .push(" LIMIT 1");
        let floor = sql.build().fetch_optional(&mut *self.conn).await?;
        let floor = floor.map(|row| row.try_get::<Uuid, _>("id")).transpose()?;
        Ok(WindowHits { jobs, below: floor })
    }

    async fn indexed(&mut self, limit: u32, before: Option<Uuid>) -> Result<Vec<Job>, StoreError> {
        indexed_page(self.conn, limit, before, self.filter).await
    }
}
