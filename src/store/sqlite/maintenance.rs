//! The auditor's checks and the janitor's deletes on SQLite.

use super::*;

#[async_trait]
impl MaintenanceStore for SqliteStore {
    #[instrument(skip_all)]
    async fn audit(
        &self,
        consumers: &[Consumer],
        max_unsettled_age: Duration,
        retention: Duration,
    ) -> Result<Vec<(Invariant, i64)>, StoreError> {
        let mut found = Vec::new();
        for invariant in Invariant::ALL {
            let mut rows = 0;
            for scope in invariant.scopes(consumers) {
                let mut query = sqlx::query_scalar::<_, i64>(invariant.query());
                if let Some(consumer) = scope {
                    query = query.bind(consumer.name).bind(consumer.topic);
                }
                if let Some(ago) = invariant.horizon(max_unsettled_age, retention) {
                    query = query.bind(now_us().saturating_sub(us(ago)));
                }
                rows += query.fetch_one(&self.reader).await?;
            }
            found.push((invariant, rows));
        }
        Ok(found)
    }

    #[instrument(skip_all)]
    async fn purge_expired(&self, batch: u32, retention: Duration) -> Result<Purged, StoreError> {
        let batch = i64::from(batch);
        let now = now_us();
        let horizon = now - us(retention);
        // Each delete is its own short write transaction on a bounded set.
        let keys = sqlx::query(
            "DELETE FROM idempotency_keys WHERE rowid IN (
                 SELECT rowid FROM idempotency_keys
                  WHERE expires_at < ?1
                    AND (state <> 'in_progress' OR lease_expires_at < ?1) LIMIT ?2)",
        )
        .bind(now)
        .bind(batch)
        .execute(&self.writer)
        .await?
        .rows_affected();
        let outbox = sqlx::query(
            "DELETE FROM outbox_events WHERE rowid IN (
                 SELECT rowid FROM outbox_events
                  WHERE settled_at < ?
                    AND NOT EXISTS (SELECT 1 FROM dead_letters d
                                     WHERE d.event_id = outbox_events.event_id
                                       AND d.replayed_at IS NULL AND d.discarded_at IS NULL)
                  LIMIT ?)",
        )
        .bind(horizon)
        .bind(batch)
        .execute(&self.writer)
        .await?
        .rows_affected();
        let inbox = sqlx::query(
            "DELETE FROM inbox WHERE rowid IN (
                 SELECT rowid FROM inbox WHERE processed_at < ? LIMIT ?)",
        )
        .bind(horizon)
        .bind(batch)
        .execute(&self.writer)
        .await?
        .rows_affected();
        for (table, aged_by) in PURGED_BY_AGE {
            sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE rowid IN (
                     SELECT rowid FROM {table} WHERE {aged_by} < ? LIMIT ?)"
            )))
            .bind(horizon)
            .bind(batch)
            .execute(&self.writer)
            .await?;
        }
        Ok(Purged {
            keys,
            outbox,
            inbox,
        })
    }
}
