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

/// A sent email a report names: its application, its address and the
/// report it has.
pub(crate) struct SentEmail {
    pub(crate) application: Uuid,
    pub(crate) address: String,
    pub(crate) report: Option<EmailReport>,
}

/// The per-table operations recording a report needs, on one backend's open
/// transaction. The steps that use them ([`record_report`],
/// [`apply_waiting_reports`]) are written once, here.
#[async_trait]
pub(crate) trait ReportTx: Send {
    /// Keeps a delivery's id and what it says; `false` when the id was
    /// kept before (a redelivery).
    async fn insert_event(&mut self, event: &ProviderEvent) -> Result<bool, StoreError>;
    async fn set_outcome(&mut self, id: &str, outcome: &str) -> Result<(), StoreError>;
    /// Orders this transaction with any other one that records these
    /// emails' sends or reports, held to its commit (Postgres: an advisory
    /// lock per id, in one order; SQLite has one writer already).
    async fn lock_emails(&mut self, email_ids: &[&str]) -> Result<(), StoreError>;
    /// The sent emails with this provider id, locked for update.
    async fn sent_emails(&mut self, email_id: &str) -> Result<Vec<SentEmail>, StoreError>;
    async fn set_report(
        &mut self,
        application: Uuid,
        report: EmailReport,
    ) -> Result<(), StoreError>;
    /// Suppresses `address` (already [`crate::domain::address_key`]ed),
    /// unless it is suppressed already.
    async fn suppress(
        &mut self,
        address: &str,
        reason: SuppressionReason,
        email_id: &str,
        application: Uuid,
    ) -> Result<(), StoreError>;
    /// Reports that named one of `email_ids` before its send was recorded
    /// (`unknown_email`), in arrival order: (delivery id, email id, event).
    async fn waiting_reports(
        &mut self,
        email_ids: &[&str],
    ) -> Result<Vec<(String, String, EmailEvent)>, StoreError>;
}

/// Records one verified report: its id (a repeat changes nothing), then
/// what it does to the email it names.
pub(crate) async fn record_report(
    tx: &mut impl ReportTx,
    event: &ProviderEvent,
) -> Result<Recorded, StoreError> {
    if !tx.insert_event(event).await? {
        return Ok(Recorded::Duplicate);
    }
    let recorded = match (event.event, &event.email_id) {
        (Some(email_event), Some(email_id)) => {
            tx.lock_emails(&[email_id.as_str()]).await?;
            apply_to_email(tx, email_id, email_event).await?
        }
        (Some(_), None) => Recorded::UnknownEmail,
        (None, _) => Recorded::Ignored,
    };
    tx.set_outcome(&event.id, recorded.outcome()).await?;
    Ok(recorded)
}

/// Applies `event` to the sent emails with `email_id`: their report
/// ([`apply_event`]) and their address's suppression.
async fn apply_to_email(
    tx: &mut impl ReportTx,
    email_id: &str,
    event: EmailEvent,
) -> Result<Recorded, StoreError> {
    let emails = tx.sent_emails(email_id).await?;
    let mut recorded = if emails.is_empty() {
        Recorded::UnknownEmail
    } else {
        Recorded::Unchanged
    };
    for email in emails {
        let applied = apply_event(event, email.report);
        if let Recorded::Applied { report, suppressed } = applied {
            if let Some(report) = report {
                tx.set_report(email.application, report).await?;
            }
            if let Some(reason) = suppressed {
                let address = crate::domain::address_key(&email.address);
                tx.suppress(&address, reason, email_id, email.application)
                    .await?;
            }
            recorded = applied;
        }
    }
    Ok(recorded)
}

/// Applies the reports that arrived before the sends of `email_ids` were
/// recorded, in the transaction that records the sends (which took
/// [`ReportTx::lock_emails`] before the emails got their ids).
pub(crate) async fn apply_waiting_reports(
    tx: &mut impl ReportTx,
    email_ids: &[&str],
) -> Result<(), StoreError> {
    if email_ids.is_empty() {
        return Ok(());
    }
    for (id, email_id, event) in tx.waiting_reports(email_ids).await? {
        let recorded = apply_to_email(tx, &email_id, event).await?;
        tx.set_outcome(&id, recorded.outcome()).await?;
    }
    Ok(())
}

/// The rows of [`ReportTx::waiting_reports`] (`id`, `event`, `email_id`); a
/// row whose event this build does not know is passed over.
pub(crate) fn waiting_from_rows<R>(
    rows: &[R],
) -> Result<Vec<(String, String, EmailEvent)>, StoreError>
where
    R: PlainColumns,
{
    let mut waiting = Vec::with_capacity(rows.len());
    for row in rows {
        let Some(event) = row
            .optional_text("event")?
            .as_deref()
            .and_then(EmailEvent::parse)
        else {
            continue;
        };
        waiting.push((row.text("id")?, row.text("email_id")?, event));
    }
    Ok(waiting)
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
