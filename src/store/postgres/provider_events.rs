//! The provider's reports and the suppression list on Postgres: a report's
//! dedupe row, the email it names (row-locked) and its address's
//! suppression in one transaction; a report that outran the send's record
//! is applied by that record's transaction.

use super::*;
use crate::domain::{EmailEvent, EmailReport, SuppressionReason};

/// The class of Herald's advisory locks on an email's provider id (the
/// two-number form, so no other advisory lock can collide with them).
const EMAIL_LOCK_CLASS: i32 = 24;

/// [`ReportTx`] on a Postgres transaction.
pub(super) struct PgReports<'t, 'c> {
    pub(super) tx: &'t mut Transaction<'c, Postgres>,
}

#[async_trait]
impl ReportTx for PgReports<'_, '_> {
    async fn insert_event(&mut self, event: &ProviderEvent) -> Result<bool, StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO provider_events (id, type, event, email_id, outcome, detail)
             VALUES ($1, $2, $3, $4, 'pending', $5) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&event.id)
        .bind(&event.kind)
        .bind(event.event.map(EmailEvent::as_str))
        .bind(&event.email_id)
        .bind(&event.detail)
        .execute(&mut **self.tx)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    async fn set_outcome(&mut self, id: &str, outcome: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE provider_events SET outcome = $2 WHERE id = $1")
            .bind(id)
            .bind(outcome)
            .execute(&mut **self.tx)
            .await?;
        Ok(())
    }

    /// Without it a report and the send it is about could each commit
    /// unseen by the other (the report finds no email yet, the send finds
    /// no report yet) and the report would wait forever. In hash order, so
    /// two holders never wait on each other crosswise.
    async fn lock_emails(&mut self, email_ids: &[&str]) -> Result<(), StoreError> {
        if email_ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "SELECT pg_advisory_xact_lock($1, h)
               FROM (SELECT DISTINCT hashtext(id) AS h FROM unnest($2::text[]) AS id) AS ids
              ORDER BY h",
        )
        .bind(EMAIL_LOCK_CLASS)
        .bind(email_ids)
        .execute(&mut **self.tx)
        .await?;
        Ok(())
    }

    async fn sent_emails(&mut self, email_id: &str) -> Result<Vec<SentEmail>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, email, email_report FROM applications
              WHERE email_id = $1 ORDER BY id FOR UPDATE",
        )
        .bind(email_id)
        .fetch_all(&mut **self.tx)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(SentEmail {
                    application: row.try_get("id")?,
                    address: row.try_get("email")?,
                    report: row
                        .optional_text("email_report")?
                        .and_then(|r| crate::domain::parse_status(&r)),
                })
            })
            .collect()
    }

    async fn set_report(
        &mut self,
        application: Uuid,
        report: EmailReport,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE applications SET email_report = $1, email_report_at = now() WHERE id = $2",
        )
        .bind(report.as_str())
        .bind(application)
        .execute(&mut **self.tx)
        .await?;
        Ok(())
    }

    async fn suppress(
        &mut self,
        address: &str,
        reason: SuppressionReason,
        email_id: &str,
        application: Uuid,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO suppressions (address, reason, email_id, application_id)
             VALUES ($1, $2, $3, $4) ON CONFLICT (address) DO NOTHING",
        )
        .bind(address)
        .bind(reason.as_str())
        .bind(email_id)
        .bind(application)
        .execute(&mut **self.tx)
        .await?;
        Ok(())
    }

    async fn waiting_reports(
        &mut self,
        email_ids: &[&str],
    ) -> Result<Vec<(String, String, EmailEvent)>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, event, email_id FROM provider_events
              WHERE outcome = 'unknown_email' AND email_id = ANY($1)
              ORDER BY received_at, id",
        )
        .bind(email_ids)
        .fetch_all(&mut **self.tx)
        .await?;
        waiting_from_rows(&rows)
    }
}

#[async_trait]
impl ProviderEventStore for PgStore {
    #[instrument(skip_all, fields(kind = %event.kind))]
    async fn record_provider_event(&self, event: &ProviderEvent) -> Result<Recorded, StoreError> {
        self.with_conn(|conn, _| {
            Box::pin(async move {
                let mut tx = conn
                    .begin_with("BEGIN; SET LOCAL lock_timeout = '5s'")
                    .await?;
                let recorded = record_report(&mut PgReports { tx: &mut tx }, event).await?;
                tx.commit().await?;
                Ok(recorded)
            })
        })
        .await
    }

    async fn list_suppressions(
        &self,
        address: Option<&str>,
        limit: u32,
        before: Option<&str>,
    ) -> Result<Vec<Suppression>, StoreError> {
        self.with_conn(|conn, _| {
            Box::pin(async move {
                let sql = format!(
                    "SELECT {SUPPRESSION_COLUMNS} FROM suppressions s
                  WHERE ($1::text IS NULL OR address = $1)
                    AND ($2::text IS NULL OR (suppressed_at, address) <
                         (SELECT suppressed_at, address FROM suppressions WHERE address = $2))
                  ORDER BY suppressed_at DESC, address DESC LIMIT $3"
                );
                let rows = sqlx::query(AssertSqlSafe(sql))
                    .bind(address)
                    .bind(before)
                    .bind(i64::from(limit))
                    .fetch_all(&mut *conn)
                    .await?;
                rows.iter()
                    .map(|r| suppression_from_row(r).map_err(StoreError::from))
                    .collect()
            })
        })
        .await
    }

    async fn lift_suppression(
        &self,
        address: &str,
        actor: &str,
    ) -> Result<Option<Suppression>, StoreError> {
        self.with_conn(|conn, _| {
            Box::pin(async move {
                let mut tx = conn.begin().await?;
                let sql = format!(
                    "DELETE FROM suppressions WHERE address = $1 RETURNING {SUPPRESSION_COLUMNS}"
                );
                let Some(row) = sqlx::query(AssertSqlSafe(sql))
                    .bind(address)
                    .fetch_optional(&mut *tx)
                    .await?
                else {
                    return Ok(None);
                };
                let lifted = suppression_from_row(&row)?;
                sqlx::query(
                    "INSERT INTO admin_audit (action, subject, detail, actor)
                 VALUES ('suppression.lift', $1, $2, $3)",
                )
                .bind(address)
                .bind(lift_detail(&lifted))
                .bind(actor)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(Some(lifted))
            })
        })
        .await
    }
}
