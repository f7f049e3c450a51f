//! What the email provider reports after `sent` (its webhooks), and the
//! addresses Herald no longer mails: recorded once per delivery of a
//! report, applied by the rule in [`crate::domain::email`], written in the
//! same transaction as the report's dedupe row.

use async_trait::async_trait;
use uuid::Uuid;

use super::*;
use crate::domain::{next_report, EmailEvent, EmailReport, SuppressionReason};

/// One verified report, as the webhook carried it.
#[derive(Debug, Clone)]
pub struct ProviderEvent {
    /// The delivery's id (`svix-id`): a redelivery carries the same one.
    pub id: String,
    /// Its `type` as sent (`email.bounced`), kept for the operator.
    pub kind: String,
    /// What it says of an email; `None` for a type that says nothing of
    /// delivery (recorded and ignored).
    pub event: Option<EmailEvent>,
    /// The provider's id of the email it is about.
    pub email_id: Option<String>,
    /// The provider's words about it (a bounce's message), if any.
    pub detail: Option<String>,
}

/// What recording one report did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Its id was recorded before: nothing changed.
    Duplicate,
    /// A type that says nothing of delivery.
    Ignored,
    /// No email Herald sent has that id (another system's mail on the same
    /// account, or an email whose send Herald has not recorded yet).
    UnknownEmail,
    /// The email's status stays as it is (a `delivery_delayed`, or a report
    /// that says less than the one it has, arriving late).
    Unchanged,
    /// The email's status, and perhaps its address's suppression, changed.
    Applied {
        report: Option<EmailReport>,
        suppressed: Option<SuppressionReason>,
    },
}

impl Recorded {
    /// Its `outcome` label (`herald_webhook_events_total`, `provider_events.outcome`).
    pub fn outcome(self) -> &'static str {
        match self {
            Recorded::Duplicate => "duplicate",
            Recorded::Ignored => "ignored",
            Recorded::UnknownEmail => "unknown_email",
            Recorded::Unchanged => "unchanged",
            Recorded::Applied { .. } => "applied",
        }
    }
}

/// What one report does to one sent email whose report is `current`: the
/// new report to write (if it changes) and the suppression to add (if
/// any). The same on both backends.
pub fn apply_event(event: EmailEvent, current: Option<EmailReport>) -> Recorded {
    let report = next_report(current, event);
    let suppressed = event.suppresses();
    if report.is_none() && suppressed.is_none() {
        Recorded::Unchanged
    } else {
        Recorded::Applied { report, suppressed }
    }
}

/// An address Herald does not mail, as `GET /admin/suppressions` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Suppression {
    /// Lowercased ([`crate::domain::address_key`]).
    pub address: String,
    pub reason: SuppressionReason,
    /// The provider's id of the email that bounced or was complained about.
    pub email_id: Option<String>,
    /// The application whose confirmation it was.
    pub application_id: Option<Uuid>,
    pub suppressed_at: chrono::DateTime<chrono::Utc>,
}

/// The columns [`suppression_from_row`] reads.
/// (`application_id` as text: a `uuid` on Postgres, text on SQLite.)
pub(crate) const SUPPRESSION_COLUMNS: &str =
    "address, reason, email_id, CAST(application_id AS TEXT) AS application_id, suppressed_at";

pub(crate) fn suppression_from_row(row: &impl Columns) -> Result<Suppression, sqlx::Error> {
    Ok(Suppression {
        address: row.text("address")?,
        reason: row.status("reason")?,
        email_id: row.optional_text("email_id")?,
        application_id: match row.optional_text("application_id")? {
            Some(id) => Some(Uuid::parse_str(&id).map_err(|e| sqlx::Error::Decode(Box::new(e)))?),
            None => None,
        },
        suppressed_at: row.instant("suppressed_at")?,
    })
}

/// Longest `type` and `detail` kept of a report (they come from outside).
pub const MAX_EVENT_TEXT: usize = 500;

/// The provider's reports and the suppression list.
#[async_trait]
pub trait ProviderEventStore: Send + Sync {
    /// Records one verified report in one transaction: its id (a repeat is
    /// [`Recorded::Duplicate`] and changes nothing), and what it does to
    /// the email it names ([`apply_event`]): the report shown over `sent`,
    /// and the address suppressed after a permanent bounce or a complaint.
    async fn record_provider_event(&self, event: &ProviderEvent) -> Result<Recorded, StoreError>;

    /// Suppressed addresses, newest first; `address` picks one (lowercase
    /// it first), `before` continues after that address of a previous page.
    async fn list_suppressions(
        &self,
        address: Option<&str>,
        limit: u32,
        before: Option<&str>,
    ) -> Result<Vec<Suppression>, StoreError>;

    /// Lifts the suppression of `address` (lowercased), recording in
    /// `admin_audit` who lifted what; `None` when it was not suppressed.
    async fn lift_suppression(
        &self,
        address: &str,
        actor: &str,
    ) -> Result<Option<Suppression>, StoreError>;
}

/// The `admin_audit` detail of a lifted suppression.
pub(crate) fn lift_detail(lifted: &Suppression) -> String {
    serde_json::to_string(lifted).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_applies_what_it_adds_and_suppresses_what_it_must() {
        let bounce = EmailEvent::Bounced { permanent: true };
        assert_eq!(
            apply_event(bounce, Some(EmailReport::Delivered)),
            Recorded::Applied {
                report: Some(EmailReport::Bounced),
                suppressed: Some(SuppressionReason::Bounced)
            }
        );
        assert_eq!(
            apply_event(EmailEvent::Delivered, Some(EmailReport::Bounced)),
            Recorded::Unchanged
        );
        assert_eq!(
            apply_event(EmailEvent::DeliveryDelayed, None),
            Recorded::Unchanged
        );
        // A second complaint changes no report, yet suppresses again (the
        // suppression may have been lifted meanwhile).
        assert_eq!(
            apply_event(EmailEvent::Complained, Some(EmailReport::Complained)),
            Recorded::Applied {
                report: None,
                suppressed: Some(SuppressionReason::Complained)
            }
        );
    }
}
