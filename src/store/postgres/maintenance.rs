//! The auditor's checks and the janitor's deletes on Postgres.

use super::*;

#[async_trait]
impl MaintenanceStore for PgStore {
    #[instrument(skip_all)]
    async fn audit(
        &self,
        consumers: &[Consumer],
        max_unsettled_age: Duration,
        retention: Duration,
    ) -> Result<Vec<(Invariant, i64)>, StoreError> {
        self.with_conn(|conn, _| {
            Box::pin(async move {
                let mut found = Vec::new();
                for invariant in Invariant::ALL {
                    let mut rows = 0;
                    for scope in invariant.scopes(consumers) {
                        let mut query = sqlx::query_scalar::<_, i64>(invariant.query());
                        if let Some(consumer) = scope {
                            query = query.bind(consumer.name).bind(consumer.topic);
                        }
                        if let Some(ago) = invariant.horizon(max_unsettled_age, retention) {
                            query = query.bind(
                                Utc::now()
                                    - chrono::Duration::from_std(ago)
                                        .unwrap_or(chrono::Duration::MAX),
                            );
                        }
                        rows += query.fetch_one(&mut *conn).await?;
                    }
                    found.push((invariant, rows));
                }
                Ok(found)
            })
        })
        .await
    }

    #[instrument(skip_all)]
    async fn purge_expired(&self, batch: u32, retention: Duration) -> Result<Purged, StoreError> {
        self.with_conn(|conn, _| {
            Box::pin(async move {
                let batch = i64::from(batch);
                let retention = retention.as_secs_f64();
                // Each statement picks a bounded set of rows with SKIP LOCKED, so
                // it never waits on, nor holds for long, a row in use.
                let keys = sqlx::query(
                    "DELETE FROM idempotency_keys WHERE ctid IN (
                     SELECT ctid FROM idempotency_keys
                      WHERE expires_at < now()
                        AND (state <> 'in_progress' OR lease_expires_at < now())
                      LIMIT $1 FOR UPDATE SKIP LOCKED)",
                )
                .bind(batch)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                let outbox = sqlx::query(
                    "DELETE FROM outbox_events WHERE event_id IN (
                     SELECT event_id FROM outbox_events
                      WHERE settled_at < now() - make_interval(secs => $2)
                        AND NOT EXISTS (SELECT 1 FROM dead_letters d
                                         WHERE d.event_id = outbox_events.event_id
                                           AND d.replayed_at IS NULL AND d.discarded_at IS NULL)
                      LIMIT $1 FOR UPDATE SKIP LOCKED)",
                )
                .bind(batch)
                .bind(retention)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                let inbox = sqlx::query(
                    "DELETE FROM inbox WHERE (consumer, event_id) IN (
                     SELECT consumer, event_id FROM inbox
                      WHERE processed_at < now() - make_interval(secs => $2)
                      LIMIT $1 FOR UPDATE SKIP LOCKED)",
                )
                .bind(batch)
                .bind(retention)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                for (table, aged_by) in PURGED_BY_AGE {
                    sqlx::query(AssertSqlSafe(format!(
                        "DELETE FROM {table} WHERE id IN (
                         SELECT id FROM {table}
                          WHERE {aged_by} < now() - make_interval(secs => $2)
                          LIMIT $1 FOR UPDATE SKIP LOCKED)"
                    )))
                    .bind(batch)
                    .bind(retention)
                    .execute(&mut *conn)
                    .await?;
                }
                Ok(Purged {
                    keys,
                    outbox,
                    inbox,
                })
            })
        })
        .await
    }
}
