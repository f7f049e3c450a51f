//! The board's rows in the store: how jobs, applications and charges are
//! read (the [`BoardReads`] trait), and the row mappers and statements both
//! backends share. They are written by the use cases, in a [`UnitOfWork`].

use async_trait::async_trait;
use uuid::Uuid;

use super::*;
use crate::domain::{Application, Charge, Job, JobFilter, SearchKeys};
use crate::keys::{IdempotencyKey, KeyScope};

/// The result of applying: a new application or the user's existing one.
#[derive(Debug, Clone)]
pub enum ApplyOutcome {
    Created(Application),
    AlreadyApplied(Application),
}

/// A result row's columns of the types both backends store alike: text and
/// integers, for any sqlx row (the blanket impl below).
pub(crate) trait PlainColumns {
    fn text(&self, column: &str) -> Result<String, sqlx::Error>;
    fn optional_text(&self, column: &str) -> Result<Option<String>, sqlx::Error>;
    fn int(&self, column: &str) -> Result<i32, sqlx::Error>;
    fn bigint(&self, column: &str) -> Result<i64, sqlx::Error>;
}

impl<R> PlainColumns for R
where
    R: sqlx::Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    fn text(&self, column: &str) -> Result<String, sqlx::Error> {
        self.try_get(column)
    }

    fn optional_text(&self, column: &str) -> Result<Option<String>, sqlx::Error> {
        self.try_get(column)
    }

    fn int(&self, column: &str) -> Result<i32, sqlx::Error> {
        self.try_get(column)
    }

    fn bigint(&self, column: &str) -> Result<i64, sqlx::Error> {
        self.try_get(column)
    }
}

/// A result row as the row mappers below read it. The backends keep ids and
/// instants in different column types (Postgres `uuid` and `timestamptz`;
/// SQLite text and integer microseconds): each says how it reads those two,
/// and the mappers are written once.
pub(crate) trait Columns: PlainColumns {
    fn id(&self, column: &str) -> Result<Uuid, sqlx::Error>;
    fn instant(&self, column: &str) -> Result<chrono::DateTime<chrono::Utc>, sqlx::Error>;

    /// A status column, decoded into its enum through its serde names; an
    /// unknown value is a decode error.
    fn status<T: serde::de::DeserializeOwned>(&self, column: &str) -> Result<T, sqlx::Error> {
        let value = self.text(column)?;
        crate::domain::parse_status(&value)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown {column} `{value}`").into()))
    }
}

/// The columns [`application_from_row`] reads.
pub(crate) const APPLICATION_COLUMNS: &str =
    "id, job_id, user_id, email, resume_url, cover_letter, email_status, email_report, created_at";

/// The columns [`job_from_row`] reads.
pub(crate) const JOB_COLUMNS: &str =
    "id, title, company, location, description, posted_at, status, version, updated_at";

pub(crate) fn job_from_row(row: &impl Columns) -> Result<Job, sqlx::Error> {
    Ok(Job {
        id: row.id("id")?,
        title: row.text("title")?,
        company: row.text("company")?,
        location: row.text("location")?,
        description: row.text("description")?,
        posted_at: row.instant("posted_at")?,
        status: row.status("status")?,
        version: row.bigint("version")?,
        updated_at: row.instant("updated_at")?,
    })
}

/// A statement's parameters as both backends bind them: ids and instants in
/// each backend's column types (Postgres `uuid` and `timestamptz`; SQLite
/// text and integer microseconds), text and integers alike. The mirror of
/// [`Columns`]: each backend says how it binds those two, and the binders
/// below ([`bind_job`], [`bind_application`], [`bind_charge`]) are written
/// once.
pub(crate) trait Binds<'q>: PlainBinds<'q> {
    fn id(self, id: Uuid) -> Self;
    fn instant(self, at: chrono::DateTime<chrono::Utc>) -> Self;
}

/// The parameters both backends bind alike (text and integers), for any
/// sqlx query (the blanket impl below).
pub(crate) trait PlainBinds<'q>: Sized {
    fn text(self, text: &'q str) -> Self;
    fn optional_text(self, text: Option<&'q str>) -> Self;
    fn bigint(self, n: i64) -> Self;

    /// The four columns that identify an idempotency key, in the order
    /// every key statement takes them: principal, method, route, key.
    fn bind_key(self, scope: &'q KeyScope, key: &'q IdempotencyKey) -> Self {
        self.text(&scope.principal)
            .text(scope.method)
            .text(scope.route)
            .text(key.as_str())
    }
}

impl<'q, DB> PlainBinds<'q> for sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments>
where
    DB: sqlx::Database,
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    fn text(self, text: &'q str) -> Self {
        self.bind(text)
    }

    fn optional_text(self, text: Option<&'q str>) -> Self {
        self.bind(text)
    }

    fn bigint(self, n: i64) -> Self {
        self.bind(n)
    }
}

/// Binds `$1`-`$11` of [`INSERT_JOB`] and [`UPDATE_JOB`].
pub(crate) fn bind_job<'q, Q: Binds<'q>>(query: Q, job: &'q Job, keys: &'q SearchKeys) -> Q {
    query
        .id(job.id)
        .text(&job.title)
        .text(&job.company)
        .text(&job.location)
        .text(&job.description)
        .text(job.status.as_str())
        .bigint(job.version)
        .instant(job.updated_at)
        .text(&keys.text)
        .text(&keys.location)
        .text(&keys.company)
}

/// Writes an application unless its user applied to its job already:
/// `$1`-`$7` as [`bind_application`] binds them.
pub(crate) const INSERT_APPLICATION: &str = "
INSERT INTO applications (id, job_id, user_id, email, resume_url, cover_letter, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (user_id, job_id) DO NOTHING";

/// Binds `$1`-`$7` of [`INSERT_APPLICATION`].
pub(crate) fn bind_application<'q, Q: Binds<'q>>(query: Q, application: &'q Application) -> Q {
    query
        .id(application.id)
        .id(application.job_id)
        .text(&application.user_id)
        .text(&application.email)
        .optional_text(application.resume_url.as_deref())
        .optional_text(application.cover_letter.as_deref())
        .instant(application.created_at)
}

/// A user's application to a job: `$1` user, `$2` job.
pub(crate) fn application_of() -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(format!(
        "SELECT {APPLICATION_COLUMNS} FROM applications WHERE user_id = $1 AND job_id = $2"
    ))
}

/// Writes a charge: `$1`-`$6` as [`bind_charge`] binds them.
pub(crate) const INSERT_CHARGE: &str = "
INSERT INTO charges (id, user_id, amount_cents, currency, description, created_at)
VALUES ($1, $2, $3, $4, $5, $6)";

/// Binds `$1`-`$6` of [`INSERT_CHARGE`].
pub(crate) fn bind_charge<'q, Q: Binds<'q>>(query: Q, charge: &'q Charge) -> Q {
    query
        .id(charge.id)
        .text(&charge.user_id)
        .bigint(charge.amount_cents)
        .text(&charge.currency)
        .text(&charge.description)
        .instant(charge.created_at)
}

/// Writes a new job: one SQL text for both backends (sqlx binds SQLite's
/// `$n` by its number). `$1` id, `$2`-`$5` title, company, location,
/// description, `$6` status, `$7` version, `$8` updated_at, `$9`-`$11` the
/// search keys ([`bind_job`]), `$12` posted_at.
pub(crate) const INSERT_JOB: &str = "
INSERT INTO jobs (id, title, company, location, description, status, version, updated_at,
                  search_text, location_key, company_key, posted_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";

/// Writes a changed job over its row, `$1`-`$11` as in [`INSERT_JOB`]
/// (posted_at never changes).
pub(crate) const UPDATE_JOB: &str = "
UPDATE jobs SET title = $2, company = $3, location = $4, description = $5, status = $6,
                version = $7, updated_at = $8, search_text = $9, location_key = $10,
                company_key = $11
 WHERE id = $1";

/// Up to 500 jobs written before their search keys were (migrations
/// `0008`/`0005`), for the backfill each backend's `migrate` runs.
pub(crate) const JOBS_WITHOUT_SEARCH_KEYS: &str =
    "SELECT id, title, company, location, description FROM jobs
      WHERE search_text IS NULL LIMIT 500";

/// Fills one job's search keys: `$1` id, `$2`-`$4` text, location, company.
pub(crate) const SET_SEARCH_KEYS: &str =
    "UPDATE jobs SET search_text = $2, location_key = $3, company_key = $4 WHERE id = $1";

/// A row of [`JOBS_WITHOUT_SEARCH_KEYS`]: its id and keys.
pub(crate) fn search_keys_from_row(row: &impl Columns) -> Result<(Uuid, SearchKeys), sqlx::Error> {
    let keys = crate::domain::search_keys(
        &row.text("title")?,
        &row.text("company")?,
        &row.text("location")?,
        &row.text("description")?,
    );
    Ok((row.id("id")?, keys))
}

pub(crate) fn application_from_row(row: &impl Columns) -> Result<Application, sqlx::Error> {
    Ok(Application {
        id: row.id("id")?,
        job_id: row.id("job_id")?,
        user_id: row.text("user_id")?,
        email: row.text("email")?,
        resume_url: row.optional_text("resume_url")?,
        cover_letter: row.optional_text("cover_letter")?,
        email_status: row
            .status::<crate::domain::EmailStatus>("email_status")?
            .shown(match row.optional_text("email_report")? {
                Some(report) => Some(crate::domain::parse_status(&report).ok_or_else(|| {
                    sqlx::Error::Decode(format!("unknown email_report `{report}`").into())
                })?),
                None => None,
            }),
        created_at: row.instant("created_at")?,
    })
}

pub(crate) fn charge_from_row(row: &impl Columns) -> Result<Charge, sqlx::Error> {
    Ok(Charge {
        id: row.id("id")?,
        user_id: row.text("user_id")?,
        amount_cents: row.bigint("amount_cents")?,
        currency: row.text("currency")?,
        description: row.text("description")?,
        ledger_status: row.status("ledger_status")?,
        created_at: row.instant("created_at")?,
    })
}

/// How many of the newest open jobs a `q` list reads directly before it
/// decides how to go on. A term in a fraction `f` of the jobs fills a page
/// of `n` from about `n / f` of the newest; the text index instead reads
/// every one of its `f · N` matches below them to sort them, at several
/// times a directly read job's cost (it checks each match's text again and
/// then sorts). This first window measures `f` for the term at hand
/// ([`further_window`] uses it); a thousand jobs cost about 2 ms on the
/// reference machine.
pub(crate) const Q_WINDOW: i64 = 1_000;

/// The most jobs a `q` list reads directly after [`Q_WINDOW`], when the
/// first window's rate of matches says they will fill the page.
pub(crate) const Q_FURTHER: i64 = 4_000;

/// What a window of the newest open jobs (below the cursor) gave a `q`
/// list: its matches among them, newest first (at most a page), and
/// `below`: set only when they did not fill the page and the window was
/// full, to the window's oldest job, below which the list must go on.
pub(crate) struct WindowHits {
    pub(crate) jobs: Vec<Job>,
    pub(crate) below: Option<Uuid>,
}

/// After a window of `read` jobs gave `hits` matches and `rest` more are
/// wanted: how many more of the newest jobs to read directly, or `None` to
/// ask the text index now. At the window's rate the page fills from about
/// `rest · read / hits` more jobs; while that is within [`Q_FURTHER`]
/// reading them is the cheaper way (the index would read about `hits / read
/// · N` matches, several times dearer each, and `N` is 100,000 on the bench
/// board). A rarer term goes to the index, which then reads few matches.
/// The same on both backends.
pub(crate) fn further_window(read: i64, hits: usize, rest: u32) -> Option<i64> {
    if hits == 0 || rest == 0 {
        return None;
    }
    let expected = i64::from(rest) * read / hits as i64;
    (expected <= Q_FURTHER).then_some(Q_FURTHER)
}

/// The two ways a backend finds a `q` list's jobs: reading a window of the
/// newest directly, and its text index (with the filter's other
/// conditions in both).
#[async_trait]
pub(crate) trait QSearch: Send {
    /// The matches among the `window` newest open jobs below `before`
    /// (at most `limit`), and the window's oldest job when it was full and
    /// they did not fill `limit`.
    async fn newest_matching(
        &mut self,
        limit: u32,
        before: Option<Uuid>,
        window: i64,
    ) -> Result<WindowHits, StoreError>;

    /// At most `limit` matches below `before`, newest first, through the
    /// text index.
    async fn indexed(&mut self, limit: u32, before: Option<Uuid>) -> Result<Vec<Job>, StoreError>;
}

/// A `q` list's page: the newest [`Q_WINDOW`] jobs, then as many more as
/// [`further_window`] says, then the text index below them. Its cost is
/// bounded whatever the term: a common one stops in the windows, a rare
/// one reads few matches from the index.
pub(crate) async fn q_page(
    search: &mut impl QSearch,
    limit: u32,
    before: Option<Uuid>,
) -> Result<Vec<Job>, StoreError> {
    let WindowHits {
        mut jobs,
        mut below,
    } = search.newest_matching(limit, before, Q_WINDOW).await?;
    if let Some(floor) = below {
        let rest = limit - jobs.len() as u32;
        if let Some(window) = further_window(Q_WINDOW, jobs.len(), rest) {
            let more = search.newest_matching(rest, Some(floor), window).await?;
            jobs.extend(more.jobs);
            below = more.below;
        }
    }
    if let Some(floor) = below {
        let rest = limit - jobs.len() as u32;
        jobs.extend(search.indexed(rest, Some(floor)).await?);
    }
    Ok(jobs)
}

/// Jobs, applications and charges as the API reads them. (They are written
/// by the use cases, [`crate::use_cases`], in a [`UnitOfWork`].)
#[async_trait]
pub trait BoardReads: Send + Sync {
    /// Open jobs matching `filter`, newest first, strictly older than the
    /// `before` cursor.
    async fn list_jobs(
        &self,
        limit: u32,
        before: Option<Uuid>,
        filter: &JobFilter,
    ) -> Result<Vec<Job>, StoreError>;

    /// A job, open or closed.
    async fn get_job(&self, id: Uuid) -> Result<Option<Job>, StoreError>;

    /// `user_id`'s applications, newest first, strictly older than the
    /// `before` cursor.
    async fn list_applications(
        &self,
        user_id: &str,
        limit: u32,
        before: Option<Uuid>,
    ) -> Result<Vec<Application>, StoreError>;

    /// One application, only if it belongs to `user_id`.
    async fn get_application(
        &self,
        id: Uuid,
        user_id: &str,
    ) -> Result<Option<Application>, StoreError>;

    /// One charge, only if it belongs to `user_id`.
    async fn get_charge(&self, id: Uuid, user_id: &str) -> Result<Option<Charge>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_term_goes_on_reading_while_its_rate_promises_the_page_and_to_the_index_below_it() {
        // 14 of the first 1,000 match (3 % of a 100,000-job board, unlucky
        // in its newest): 6 more are about 430 jobs away; the index would
        // read all 3,000 matches.
        assert_eq!(further_window(Q_WINDOW, 14, 6), Some(Q_FURTHER));
        // At the edge: 20 more at 5 in 1,000 are 4,000 jobs away; at 4, 5,000.
        assert_eq!(further_window(Q_WINDOW, 5, 20), Some(Q_FURTHER));
        assert_eq!(further_window(Q_WINDOW, 4, 20), None);
        // A rare term: the index reads its few matches.
        assert_eq!(further_window(Q_WINDOW, 1, 19), None);
        assert_eq!(further_window(Q_WINDOW, 0, 20), None);
        assert_eq!(further_window(Q_WINDOW, 20, 0), None, "nothing more wanted");
    }
}
