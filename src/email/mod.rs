//! Outbound email: what a confirmation says, and the transports that send it.
//!
//! The EmailSender pool ([`crate::actors::email_sender`]) builds one
//! [`Email`] per `application.submitted` event and hands it to a
//! [`Transport`] with the event id as the idempotency key. A transport only
//! sends and classifies the outcome ([`SendError`]); rate, retries and dead
//! letters are Herald's, never the transport's.

pub mod file;
pub mod resend;

use std::time::Duration;

use serde::Deserialize;
use uuid::Uuid;

use crate::domain::ApplicationSubmitted;

/// One email, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Email {
    pub from: String,
    pub to: String,
    pub subject: String,
    pub text: String,
}

impl Email {
    /// The confirmation for an application, from its event payload (an
    /// [`ApplicationSubmitted`]). The address is the one the applicant's
    /// verified token carried.
    pub fn confirmation(from: &str, payload: &serde_json::Value) -> Result<Email, String> {
        let submitted = ApplicationSubmitted::deserialize(payload)
            .map_err(|e| format!("payload is not an application.submitted: {e}"))?;
        let (to, title, company) = (
            submitted.email.as_str(),
            submitted.job_title.as_str(),
            submitted.company.as_str(),
        );
        if !crate::domain::valid_email(to) {
            return Err("payload `email` is not an address".into());
        }
        Ok(Email {
            from: from.to_string(),
            to: to.to_string(),
            // One line whatever the row holds (the API refuses line breaks
            // in these; rows written before it did are mended here).
            subject: format!("Your application: {title} at {company}").replace(['\r', '\n'], " "),
            text: format!(
                "Thank you for applying for {title} at {company}.\n\n\
                 Your application has been received and passed on to the employer.\n\
                 This is the only confirmation you will get for it.\n"
            ),
        })
    }
}

/// Why a send did not succeed, classified for the retry policy (docs/ARCHITECTURE.md).
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    /// Worth retrying (timeouts, connection errors, 429, 5xx, concurrent
    /// idempotent request). `retry_after` is the downstream's floor.
    #[error("transient: {reason}")]
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Retrying cannot help (other 4xx, invalid payload): dead-letter now.
    #[error("permanent: {0}")]
    Permanent(String),
}

/// The provider's answer for one email of a batch: accepted, or refused
/// for good with its reason (the rest of the batch is unaffected).
pub type BatchAnswer = Result<(), String>;

/// Something that sends email.
#[async_trait::async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Sends `email`; `idempotency_key` (the event id) makes a repeat of the
    /// same call send nothing new.
    async fn send(&self, email: &Email, idempotency_key: Uuid) -> Result<(), SendError>;

    /// Sends several emails in one request under `batch_key`, so a repeat of
    /// the same call (same key, same emails) sends nothing new; each email
    /// also carries its own event id. `Ok` holds one answer per email, in
    /// order; `Err` means the request as a whole failed (nothing to record
    /// per email: retry the same batch, or dead-letter all of it).
    ///
    /// The default sends one at a time, each under its event id; a
    /// transient failure stops there (those already sent are deduplicated by
    /// their keys when the batch is retried).
    async fn send_batch(
        &self,
        batch_key: Uuid,
        emails: &[(Uuid, Email)],
    ) -> Result<Vec<BatchAnswer>, SendError> {
        let _ = batch_key;
        let mut answers = Vec::with_capacity(emails.len());
        for (event_id, email) in emails {
            answers.push(match self.send(email, *event_id).await {
                Ok(()) => Ok(()),
                Err(SendError::Permanent(reason)) => Err(reason),
                Err(transient) => return Err(transient),
            });
        }
        Ok(answers)
    }
}

/// Herald's own outbound rate (`email.max_per_sec`: requests per second to
/// the provider, each carrying up to `email.max_batch` emails), shared by
/// every sender of the process: each request takes the next free slot,
/// `1/rate` apart, and waits for it. No burst, so a backlog never exceeds
/// the provider's rate; a 429's `retry-after` holds every sender off.
pub type SendPacer = crate::rate::Pacer;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confirmation_names_the_job_and_company_and_goes_to_the_applicant() {
        let mut payload = serde_json::json!({
            "application_id": "0190a0a0-0000-7000-8000-000000000001",
            "job_id": "0190a0a0-0000-7000-8000-000000000002",
            "user_id": "ada", "email": "ada@example.com",
            "job_title": "Rust engineer", "company": "Herald"
        });
        let email = Email::confirmation("jobs@herald.test", &payload).unwrap();
        assert_eq!(email.to, "ada@example.com");
        assert_eq!(email.subject, "Your application: Rust engineer at Herald");
        payload["email"] = "nope".into();
        assert!(Email::confirmation("x", &payload).is_err());
        assert!(
            Email::confirmation("x", &serde_json::json!({"email": "a@b.c"}))
                .unwrap_err()
                .contains("missing field")
        );
    }
}
