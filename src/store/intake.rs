//! Intake in the store: jobs, applications and charges, each written with its
//! outbox event and its key's outcome in one transaction.

use async_trait::async_trait;
use uuid::Uuid;

use super::*;
use crate::domain::{Application, Charge, Job};
use crate::keys::StoredResponse;

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
    "id, job_id, user_id, email, resume_url, cover_letter, email_status, created_at";

pub(crate) fn job_from_row(row: &impl Columns) -> Result<Job, sqlx::Error> {
    Ok(Job {
        id: row.id("id")?,
        title: row.text("title")?,
        company: row.text("company")?,
        location: row.text("location")?,
        description: row.text("description")?,
        posted_at: row.instant("posted_at")?,
    })
}

pub(crate) fn application_from_row(row: &impl Columns) -> Result<Application, sqlx::Error> {
    Ok(Application {
        id: row.id("id")?,
        job_id: row.id("job_id")?,
        user_id: row.text("user_id")?,
        email: row.text("email")?,
        resume_url: row.optional_text("resume_url")?,
        cover_letter: row.optional_text("cover_letter")?,
        email_status: row.status("email_status")?,
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

/// The `job.posted` event's payload: the job as the API shows it.
pub fn job_posted_payload(job: &Job) -> Result<serde_json::Value, StoreError> {
    to_json(job)
}

/// The `charge.created` event's payload: the charge and its user.
pub fn charge_created_payload(charge: &Charge) -> Result<serde_json::Value, StoreError> {
    let mut payload = to_json(charge)?;
    payload["user_id"] = serde_json::json!(charge.user_id);
    Ok(payload)
}

/// Jobs, applications and charges: the business rows and their events.
#[async_trait]
pub trait IntakeStore: Send + Sync {
    /// Jobs newest first, strictly older than the `before` cursor.
    async fn list_jobs(&self, limit: u32, before: Option<Uuid>) -> Result<Vec<Job>, StoreError>;

    async fn get_job(&self, id: Uuid) -> Result<Option<Job>, StoreError>;

    /// Inserts the job and its `job.posted` event, completing the key if any
    /// with `response` (built by the caller before this, its one commit),
    /// in one transaction.
    async fn post_job(
        &self,
        job: &Job,
        lease: Option<&KeyLease>,
        response: &StoredResponse,
    ) -> Result<(), StoreError>;

    /// Inserts the application and its `application.submitted` event and
    /// completes the key if any with `created`, in one transaction; or finds
    /// the user's existing application for the job, writes nothing and
    /// leaves the key to the caller (whose answer depends on it).
    async fn submit_application(
        &self,
        application: &Application,
        lease: Option<&KeyLease>,
        created: &StoredResponse,
    ) -> Result<ApplyOutcome, StoreError>;

    /// One application, only if it belongs to `user_id`.
    async fn get_application(
        &self,
        id: Uuid,
        user_id: &str,
    ) -> Result<Option<Application>, StoreError>;

    /// Inserts the charge and its `charge.created` event and completes the
    /// (required) key with `response`, in one transaction.
    async fn create_charge(
        &self,
        charge: &Charge,
        lease: &KeyLease,
        response: &StoredResponse,
    ) -> Result<(), StoreError>;

    /// One charge, only if it belongs to `user_id`.
    async fn get_charge(&self, id: Uuid, user_id: &str) -> Result<Option<Charge>, StoreError>;
}
