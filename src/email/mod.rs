//! Outbound email: what a confirmation says, and the transports that send it.
//!
//! The EmailSender pool ([`crate::actors::email_sender`]) builds one
//! [`Email`] per `application.submitted` event and hands a batch of them to a
//! [`Transport`] under the batch's idempotency key. A transport only sends
//! and classifies the outcome ([`reply`], [`SendError`]); rate, retries and
//! dead letters are Herald's, never the transport's.

pub mod file;
pub mod pace;
pub mod reply;
pub mod resend;

use serde::Deserialize;
use uuid::Uuid;

use crate::domain::ApplicationSubmitted;
pub use pace::SendPacer;
pub use reply::{MemberAnswer, SendError};

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

/// What the provider answered for each email of one request.
pub type BatchAnswers = Result<Vec<MemberAnswer>, SendError>;

/// Something that sends email.
#[async_trait::async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Sends several emails in one request under `batch_key`, so a repeat of
    /// the same call (same key, same emails) sends nothing new; each email
    /// also carries its own event id. `Ok` holds one answer per email, in
    /// order (a transport checks that the provider's reply names each one,
    /// [`reply`]); `Err` means the request as a whole failed or its outcome
    /// is unknown (nothing to record per email: retry the same batch, or
    /// dead-letter all of it).
    async fn send_batch(&self, batch_key: Uuid, emails: &[(Uuid, Email)]) -> BatchAnswers;
}

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
