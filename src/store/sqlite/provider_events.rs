//! The provider's reports and the suppression list on SQLite: one write
//! transaction (the one writer) per report; a report that outran the
//! send's record is applied by that record's transaction (one writer: the
//! two never overlap).

use super::*;
use crate::domain::{EmailEvent, EmailReport, SuppressionReason};

/// [`ReportTx`] on SQLite's write transaction (`now` its instant).
pub(super) struct SqliteReports<'t, 'c> {
    pub(super) tx: &'t mut Transaction<'c, Sqlite>,
    pub(super) now: i64,
}

#[async_trait]
impl ReportTx for SqliteReports<'_, '_> {
    async fn insert_event(&mut self, event: &ProviderEvent) -> Result<bool, StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO provider_events (id, type, event, email_id, outcome, detail, received_at)
             VALUES (?, ?, ?, ?, 'pending', ?, ?) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&event.id)
        .bind(&event.kind)
        .bind(event.event.map(EmailEvent::as_str))
        .bind(&event.email_id)
        .bind(&event.detail)
        .bind(self.now)
        .execute(&mut **self.tx)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    async fn set_outcome(&mut self, id: &str, outcome: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE provider_events SET outcome = ? WHERE id = ?")
            .bind(outcome)
            .bind(id)
            .execute(&mut **self.tx)
            .await?;
        Ok(())
    }

    /// One writer: a report and a send's record never overlap.
    async fn lock_emails(&mut self, _email_ids: &[&str]) -> Result<(), StoreError> {
        Ok(())
    }

    async fn sent_emails(&mut self, email_id: &str) -> Result<Vec<SentEmail>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, email, email_report FROM applications WHERE email_id = ? ORDER BY id",
        )
        .bind(email_id)
        .fetch_all(&mut **self.tx)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(SentEmail {
                    application: uuid_column(row, "id")?,
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
        sqlx::query("UPDATE applications SET email_report = ?, email_report_at = ? WHERE id = ?")
            .bind(report.as_str())
            .bind(self.now)
            .bind(application.to_string())
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
            "INSERT INTO suppressions (address, reason, email_id, application_id, suppressed_at)
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (address) DO NOTHING",
        )
        .bind(address)
        .bind(reason.as_str())
        .bind(email_id)
        .bind(application.to_string())
        .bind(self.now)
        .execute(&mut **self.tx)
        .await?;
        Ok(())
    }

    async fn waiting_reports(
        &mut self,
        email_ids: &[&str],
    ) -> Result<Vec<(String, String, EmailEvent)>, StoreError> {
        let mut waiting = Vec::new();
        for email_id in email_ids {
            let rows = sqlx::query(
                "SELECT id, event, email_id FROM provider_events
                  WHERE outcome = 'unknown_email' AND email_id = ?
                  ORDER BY received_at, id",
            )
            .bind(email_id)
            .fetch_all(&mut **self.tx)
            .await?;
            waiting.extend(waiting_from_rows(&rows)?);
        }
        Ok(waiting)
    }
}

#[async_trait]
impl ProviderEventStore for SqliteStore {
    #[instrument(skip_all, fields(kind = %event.kind))]
    async fn record_provider_event(&self, event: &ProviderEvent) -> Result<Recorded, StoreError> {
        let mut tx = self.write().await?;
        let now = now_us();
        let recorded = record_report(&mut SqliteReports { tx: &mut tx, now }, event).await?;
        tx.commit().await?;
        Ok(recorded)
    }

    async fn list_suppressions(
        &self,
        address: Option<&str>,
        limit: u32,
        before: Option<&str>,
    ) -> Result<Vec<Suppression>, StoreError> {
        let sql = format!(
            "SELECT {SUPPRESSION_COLUMNS} FROM suppressions
              WHERE (?1 IS NULL OR address = ?1)
                AND (?2 IS NULL OR (suppressed_at, address) <
                     (SELECT suppressed_at, address FROM suppressions WHERE address = ?2))
              ORDER BY suppressed_at DESC, address DESC LIMIT ?3"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(address)
            .bind(before)
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|r| suppression_from_row(r).map_err(StoreError::from))
            .collect()
    }

    async fn lift_suppression(
        &self,
        address: &str,
        actor: &str,
    ) -> Result<Option<Suppression>, StoreError> {
        let mut tx = self.write().await?;
        let sql =
            format!("DELETE FROM suppressions WHERE address = ? RETURNING {SUPPRESSION_COLUMNS}");
        let Some(row) = sqlx::query(AssertSqlSafe(sql))
            .bind(address)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(None);
        };
        let lifted = suppression_from_row(&row)?;
        sqlx::query(
            "INSERT INTO admin_audit (action, subject, detail, actor, at)
             VALUES ('suppression.lift', ?, ?, ?, ?)",
        )
        .bind(address)
        .bind(lift_detail(&lifted))
        .bind(actor)
        .bind(now_us())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(lifted))
    }
}
