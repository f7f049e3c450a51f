//! The relay's side of the outbox on SQLite: claim, publish and mark in one
//! write transaction, skipping rows a consumer holds a lease on.

use super::*;

#[async_trait]
impl RelayStore for SqliteStore {
    #[instrument(skip_all)]
    async fn outbox_stats(&self) -> Result<OutboxStats, StoreError> {
        let now = now_us();
        let row = sqlx::query(
            // The effect counts come from the triggers' counters
            // (migrations/sqlite/0002): O(1) however many rows.
            "SELECT count(*) AS pending, min(due_at) AS oldest,
                    (SELECT value FROM effect_counters WHERE name = 'emails_delivered')
                        AS emails_delivered,
                    (SELECT value FROM effect_counters WHERE name = 'ledger_entries')
                        AS ledger_entries
               FROM outbox_events WHERE settled_at IS NULL AND due_at <= ?",
        )
        .bind(now)
        .fetch_one(&self.reader)
        .await?;
        let oldest: Option<i64> = row.try_get("oldest")?;
        Ok(OutboxStats {
            pending: row.try_get("pending")?,
            lag_seconds: oldest.map_or(0.0, |t| (now - t).max(0) as f64 / 1e6),
            emails_delivered: row.try_get("emails_delivered")?,
            ledger_entries: row.try_get("ledger_entries")?,
        })
    }

    #[instrument(skip_all, fields(topic))]
    async fn relay_due_events(
        &self,
        topic: &str,
        limit: i64,
        check_after: Duration,
        fan_out: bool,
        relay: RelayFn<'_>,
    ) -> Result<RelayStep, StoreError> {
        let mut tx = self.write().await?;
        let now = now_us();
        // Rows a consumer holds a lease on are skipped, as Postgres skips
        // locked rows.
        let rows = sqlx::query(
            "SELECT event_id, topic, attempts, payload, traceparent, stream_id,
                    published_at IS NOT NULL AS published
               FROM outbox_events
              WHERE settled_at IS NULL AND batch_id IS NULL AND topic = ?1 AND due_at <= ?2
                AND (locked_until IS NULL OR locked_until <= ?2)
              ORDER BY due_at LIMIT ?3",
        )
        .bind(topic)
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(RelayStep::default());
        }
        let mut due = Vec::with_capacity(rows.len());
        for row in &rows {
            let payload: String = row.try_get("payload")?;
            due.push(DueEvent {
                envelope: Envelope {
                    event_id: uuid_column(row, "event_id")?,
                    topic: row.try_get("topic")?,
                    attempts: row.try_get("attempts")?,
                    traceparent: row.try_get("traceparent")?,
                    payload: serde_json::from_str(&payload)
                        .map_err(|e| StoreError::Internal(format!("outbox payload: {e}")))?,
                },
                stream_id: row.try_get("stream_id")?,
                published_before: row.try_get("published")?,
            });
        }
        let ids: Vec<String> = due
            .iter()
            .map(|d| d.envelope.event_id.to_string())
            .collect();
        // On failure the transaction rolls back: the rows stay due.
        let relayed = relay(due)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        fail::fail_point!("relay-after-publish", |_| std::process::abort());
        let next_check = now + us(check_after);
        let mut published = 0;
        for (id, what) in ids.iter().zip(relayed) {
            match what {
                Relayed::Published(stream_id) => {
                    published += 1;
                    sqlx::query(
                        "UPDATE outbox_events
                            SET published_at = ?1, stream_id = ?2, due_at = ?3,
                                settled_at = CASE WHEN ?4 THEN ?1 END
                          WHERE event_id = ?5",
                    )
                    .bind(now)
                    .bind(stream_id)
                    .bind(next_check)
                    .bind(fan_out)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                }
                Relayed::StillHeld => {
                    sqlx::query("UPDATE outbox_events SET due_at = ? WHERE event_id = ?")
                        .bind(next_check)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(RelayStep {
            claimed: ids.len(),
            published,
        })
    }
}
