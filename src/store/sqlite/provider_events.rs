//! The provider's reports and the suppression list on SQLite: one write
//! transaction (the one writer) per report; a report that outran the
//! send's record is applied by that record's transaction (one writer: the
//! two never overlap).

use super::*;
use crate::domain::EmailEvent;

impl SqliteStore {
    /// Applies `event` to the sent emails with `email_id`: their report
    /// ([`apply_event`]) and their address's suppression.
    async fn apply_to_email(
        tx: &mut Transaction<'_, Sqlite>,
        email_id: &str,
        event: EmailEvent,
        now: i64,
    ) -> Result<Recorded, StoreError> {
        let emails = sqlx::query(
            "SELECT id, email, email_report FROM applications WHERE email_id = ? ORDER BY id",
        )
        .bind(email_id)
        .fetch_all(&mut **tx)
        .await?;
        let mut recorded = if emails.is_empty() {
            Recorded::UnknownEmail
        } else {
            Recorded::Unchanged
        };
        for row in &emails {
            let id: String = row.try_get("id")?;
            let current = match row.optional_text("email_report")? {
                Some(r) => crate::domain::parse_status(&r),
                None => None,
            };
            let applied = apply_event(event, current);
            if let Recorded::Applied { report, suppressed } = applied {
                if let Some(report) = report {
                    sqlx::query(
                        "UPDATE applications SET email_report = ?, email_report_at = ? WHERE id = ?",
                    )
                    .bind(report.as_str())
                    .bind(now)
                    .bind(&id)
                    .execute(&mut **tx)
                    .await?;
                }
                if let Some(reason) = suppressed {
                    let address: String = row.try_get("email")?;
                    sqlx::query(
                        "INSERT INTO suppressions
                             (address, reason, email_id, application_id, suppressed_at)
                         VALUES (?, ?, ?, ?, ?) ON CONFLICT (address) DO NOTHING",
                    )
                    .bind(crate::domain::address_key(&address))
                    .bind(reason.as_str())
                    .bind(email_id)
                    .bind(&id)
                    .bind(now)
                    .execute(&mut **tx)
                    .await?;
                }
                recorded = applied;
            }
        }
        Ok(recorded)
    }

    /// Applies the reports that arrived before the sends of `email_ids`
    /// were recorded (they wait as `unknown_email`), in arrival order, in
    /// the transaction that records the sends.
    pub(super) async fn apply_waiting_reports(
        tx: &mut Transaction<'_, Sqlite>,
        email_ids: &[&str],
        now: i64,
    ) -> Result<(), StoreError> {
        for email_id in email_ids {
            let waiting = sqlx::query(
                "SELECT id, event FROM provider_events
                  WHERE outcome = 'unknown_email' AND email_id = ?
                  ORDER BY received_at, id",
            )
            .bind(email_id)
            .fetch_all(&mut **tx)
            .await?;
            for row in &waiting {
                let id: String = row.try_get("id")?;
                let Some(event) = row
                    .optional_text("event")?
                    .as_deref()
                    .and_then(EmailEvent::parse)
                else {
                    continue;
                };
                let recorded = Self::apply_to_email(tx, email_id, event, now).await?;
                sqlx::query("UPDATE provider_events SET outcome = ? WHERE id = ?")
                    .bind(recorded.outcome())
                    .bind(&id)
                    .execute(&mut **tx)
                    .await?;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl ProviderEventStore for SqliteStore {
    #[instrument(skip_all, fields(kind = %event.kind))]
    async fn record_provider_event(&self, event: &ProviderEvent) -> Result<Recorded, StoreError> {
        let mut tx = self.write().await?;
        let now = now_us();
        let new = sqlx::query(
            "INSERT INTO provider_events (id, type, event, email_id, outcome, detail, received_at)
             VALUES (?, ?, ?, ?, 'pending', ?, ?) ON CONFLICT (id) DO NOTHING",
        )
        .bind(&event.id)
        .bind(&event.kind)
        .bind(event.event.map(EmailEvent::as_str))
        .bind(&event.email_id)
        .bind(&event.detail)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !new {
            return Ok(Recorded::Duplicate);
        }
        let recorded = match (event.event, &event.email_id) {
            (Some(email_event), Some(email_id)) => {
                Self::apply_to_email(&mut tx, email_id, email_event, now).await?
            }
            (Some(_), None) => Recorded::UnknownEmail,
            (None, _) => Recorded::Ignored,
        };
        sqlx::query("UPDATE provider_events SET outcome = ? WHERE id = ?")
            .bind(recorded.outcome())
            .bind(&event.id)
            .execute(&mut *tx)
            .await?;
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
