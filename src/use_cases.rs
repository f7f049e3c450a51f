//! The use cases: every state change a request makes, written once over a
//! [`UnitOfWork`] and so the same on both backends.
//!
//! A use case reads and writes through the unit's per-table operations and
//! emits its outbox event; it never commits. Whoever opened the unit (the
//! idempotency protocol, [`crate::idempotency::protocol::Idempotency::run`])
//! commits it with the request's answer, so the rows, the event and the
//! key's outcome are one transaction. Adding a state change is adding a
//! function here (and, if it touches a new table, an operation to
//! [`UnitOfWork`]); no backend grows a method per use case.
//!
//! (Recording the provider's reports follows the same shape on its own
//! per-table trait, [`crate::store::ReportTx`], inside the webhook's
//! transaction.)

use chrono::{DateTime, Utc};

use crate::domain::{
    topics, Application, ApplicationSubmitted, ChangeRefused, Charge, Job, JobChange, JobStatus,
};
use crate::keys::StoredResponse;
use crate::store::{ApplyOutcome, OutboxEvent, StoreError, UnitOfWork};

fn to_json<T: serde::Serialize>(value: &T) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(value).map_err(|e| StoreError::Internal(e.to_string()))
}

/// Posts a job: the row and its `job.posted` event (the job as the API
/// shows it).
pub async fn post_job(tx: &mut dyn UnitOfWork, job: &Job) -> Result<(), StoreError> {
    tx.insert_job(job).await?;
    tx.emit((topics::JOB_POSTED, job.id, to_json(job)?));
    Ok(())
}

/// Edits or closes job `id` ([`decide_job_change`]): the changed row and
/// its `job.updated` / `job.closed` event, or nothing when the change
/// changes nothing. The job as it now is.
pub async fn change_job(
    tx: &mut dyn UnitOfWork,
    id: uuid::Uuid,
    change: &JobChange,
) -> Result<Job, StoreError> {
    let job = tx
        .job_for_update(id)
        .await?
        .ok_or(StoreError::JobNotFound)?;
    match decide_job_change(change, &job, Utc::now())? {
        Some((next, event)) => {
            tx.update_job(&next).await?;
            tx.emit(event);
            Ok(next)
        }
        None => Ok(job),
    }
}

/// What a change does to `job` at `now`: the job after it and the event it
/// emits (`job.updated`: the job, and `before`, the texts it had;
/// `job.closed`: the job, closed), or `None` when it changes nothing (no
/// version spent, no event: the caller answers with the job as it is).
pub fn decide_job_change(
    change: &JobChange,
    job: &Job,
    now: DateTime<Utc>,
) -> Result<Option<(Job, OutboxEvent)>, StoreError> {
    // Both backends keep instants to the microsecond: the job returned and
    // sent is the job stored.
    let now = chrono::SubsecRound::trunc_subsecs(now, 6);
    match change.apply(job, now) {
        Err(ChangeRefused::Closed) => Err(StoreError::JobClosed),
        Ok(None) => Ok(None),
        Ok(Some(next)) => {
            let payload = match change {
                // The texts it had ride along, so a stream reader can tell
                // which filters the edit took it out of.
                JobChange::Edit(_) => {
                    let mut payload = to_json(&next)?;
                    payload["before"] = serde_json::json!({
                        "title": job.title, "company": job.company,
                        "location": job.location, "description": job.description,
                    });
                    payload
                }
                // The whole job, closed: its texts say which filters it
                // leaves (stream clients get `{"id", "version"}`).
                JobChange::Close => to_json(&next)?,
            };
            Ok(Some((next, (change.topic(), job.id, payload))))
        }
    }
}

/// Submits an application to an open job: the row and its
/// `application.submitted` event (with the job's title and company as they
/// are now), or the user's existing application to that job, with nothing
/// written. `created` is the answer to a new one, built before the unit
/// commits: the backend's declared fast path
/// ([`UnitOfWork::submit_at_once`]) completes the key with it in the same
/// statement.
pub async fn submit_application(
    tx: &mut dyn UnitOfWork,
    application: &Application,
    created: &StoredResponse,
) -> Result<ApplyOutcome, StoreError> {
    if let Some(outcome) = tx.submit_at_once(application, created).await {
        return outcome;
    }
    submit_application_in_steps(tx, application).await
}

/// [`submit_application`]'s general path, one operation at a time (public
/// so the conformance suite can run it where the fast path exists too).
pub async fn submit_application_in_steps(
    tx: &mut dyn UnitOfWork,
    application: &Application,
) -> Result<ApplyOutcome, StoreError> {
    // Locked: a close that commits meanwhile waits, so no application
    // lands on a job closed before it.
    let job = tx
        .job_for_update(application.job_id)
        .await?
        .ok_or(StoreError::JobNotFound)?;
    if job.status != JobStatus::Open {
        return Err(StoreError::JobClosed);
    }
    if !tx.insert_application(application).await? {
        let existing = tx
            .application_of(&application.user_id, application.job_id)
            .await?
            .ok_or_else(|| StoreError::Internal("the existing application vanished".into()))?;
        return Ok(ApplyOutcome::AlreadyApplied(existing));
    }
    let submitted = ApplicationSubmitted::of(application, &job.title, &job.company);
    tx.emit((
        topics::APPLICATION_SUBMITTED,
        application.id,
        to_json(&submitted)?,
    ));
    Ok(ApplyOutcome::Created(application.clone()))
}

/// Creates a charge: the row and its `charge.created` event (the charge
/// and its user).
pub async fn create_charge(tx: &mut dyn UnitOfWork, charge: &Charge) -> Result<(), StoreError> {
    tx.insert_charge(charge).await?;
    let mut payload = to_json(charge)?;
    payload["user_id"] = serde_json::json!(charge.user_id);
    tx.emit((topics::CHARGE_CREATED, charge.id, payload));
    Ok(())
}
