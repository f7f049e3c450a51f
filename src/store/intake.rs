//! Intake in the store: jobs, applications and charges, each written with its
//! outbox event and its key's outcome in one transaction.

use async_trait::async_trait;
use uuid::Uuid;

use super::*;
use crate::domain::{Application, Charge, Job};
use crate::idempotency::StoredResponse;

/// The result of applying: a new application or the user's existing one.
#[derive(Debug, Clone)]
pub enum ApplyOutcome {
    Created(Application),
    AlreadyApplied(Application),
}

/// Turns an outcome into the HTTP response that is stored with the key.
pub type Render<'a, T> = &'a (dyn Fn(&T) -> StoredResponse + Send + Sync);

/// Jobs, applications and charges: the business rows and their events.
#[async_trait]
pub trait IntakeStore: Send + Sync {
    /// Jobs newest first, strictly older than the `before` cursor.
    async fn list_jobs(&self, limit: u32, before: Option<Uuid>) -> Result<Vec<Job>, StoreError>;

    async fn get_job(&self, id: Uuid) -> Result<Option<Job>, StoreError>;

    /// Inserts the job and its `job.posted` event, completing the key if any,
    /// in one transaction.
    async fn post_job(
        &self,
        job: &Job,
        lease: Option<&KeyLease>,
        render: Render<'_, Job>,
    ) -> Result<StoredResponse, StoreError>;

    /// Inserts the application and its `application.submitted` event — or finds
    /// the user's existing application for the job — completing the key if
    /// any, in one transaction.
    async fn submit_application(
        &self,
        application: &Application,
        lease: Option<&KeyLease>,
        render: Render<'_, ApplyOutcome>,
    ) -> Result<(ApplyOutcome, StoredResponse), StoreError>;

    /// One application, only if it belongs to `user_id`.
    async fn get_application(
        &self,
        id: Uuid,
        user_id: &str,
    ) -> Result<Option<Application>, StoreError>;

    /// Inserts the charge and its `charge.created` event and completes the
    /// (required) key, in one transaction.
    async fn create_charge(
        &self,
        charge: &Charge,
        lease: &KeyLease,
        render: Render<'_, Charge>,
    ) -> Result<StoredResponse, StoreError>;

    /// One charge, only if it belongs to `user_id`.
    async fn get_charge(&self, id: Uuid, user_id: &str) -> Result<Option<Charge>, StoreError>;
}
