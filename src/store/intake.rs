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
