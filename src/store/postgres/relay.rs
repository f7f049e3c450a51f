//! The relay's side of the outbox on Postgres: due rows claimed per topic
//! with `FOR UPDATE SKIP LOCKED`, published, marked.

use super::*;

#[async_trait]
impl RelayStore for PgStore {
    async fn watch_commits(&self, wake: std::sync::Arc<tokio::sync::Notify>) {
        loop {
            // A one-connection sqlx pool of its own: PgListener holds it.
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect_lazy_with(self.options.clone());
            match sqlx::postgres::PgListener::connect_with(&pool).await {
                Ok(mut listener) => {
                    if let Err(e) = listener.listen("herald_outbox").await {
                        tracing::warn!(error = %e, "outbox LISTEN failed; polling only until it works");
                    } else {
                        // recv reconnects by itself; an error here is worth a pause.
                        while listener.recv().await.is_ok() {
                            wake.notify_one();
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "outbox listener cannot connect yet"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    #[instrument(skip_all)]
    async fn outbox_stats(&self) -> Result<OutboxStats, StoreError> {
        self.with_conn(|conn, _| {
            Box::pin(async move {
                let row = sqlx::query(
                    // The effect counts come from the triggers' counters
                    // (migrations/postgres/0005): O(1) however many rows.
                    "SELECT count(*) AS pending, min(due_at) AS oldest,
                        (SELECT coalesce(sum(value), 0) FROM effect_counters
                          WHERE name = 'emails_delivered')::bigint AS emails_delivered,
                        (SELECT coalesce(sum(value), 0) FROM effect_counters
                          WHERE name = 'ledger_entries')::bigint AS ledger_entries
                   FROM outbox_events WHERE settled_at IS NULL AND due_at <= now()",
                )
                .fetch_one(&mut *conn)
                .await?;
                let pending: i64 = row.try_get("pending")?;
                let oldest: Option<DateTime<Utc>> = row.try_get("oldest")?;
                let lag_seconds = oldest
                    .map(|t| (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0)
                    .unwrap_or(0.0);
                Ok(OutboxStats {
                    pending,
                    lag_seconds,
                    emails_delivered: row.try_get("emails_delivered")?,
                    ledger_entries: row.try_get("ledger_entries")?,
                })
            })
        })
        .await
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
        self.with_conn(|conn, _| {
            Box::pin(async move {
                let mut tx = conn.begin().await?;
                let rows = sqlx::query(
                    "SELECT event_id, topic, attempts, payload, traceparent, stream_id,
                        published_at IS NOT NULL AS published
                   FROM outbox_events
                  WHERE settled_at IS NULL AND batch_id IS NULL AND topic = $2
                    AND due_at <= now()
                  ORDER BY due_at
                  LIMIT $1
                  FOR UPDATE SKIP LOCKED",
                )
                .bind(limit)
                .bind(topic)
                .fetch_all(&mut *tx)
                .await?;
                if rows.is_empty() {
                    return Ok(RelayStep::default());
                }
                let mut due = Vec::with_capacity(rows.len());
                for row in &rows {
                    due.push(DueEvent {
                        envelope: Envelope {
                            event_id: row.try_get("event_id")?,
                            topic: row.try_get("topic")?,
                            attempts: row.try_get("attempts")?,
                            traceparent: row.try_get("traceparent")?,
                            payload: row.try_get("payload")?,
                        },
                        stream_id: row.try_get("stream_id")?,
                        published_before: row.try_get("published")?,
                    });
                }
                let ids: Vec<Uuid> = due.iter().map(|d| d.envelope.event_id).collect();
                // On failure the transaction rolls back: the rows stay due.
                let relayed = relay(due)
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                fail::fail_point!("relay-after-publish", |_| std::process::abort());
                let mut published = (Vec::new(), Vec::new());
                let mut held = Vec::new();
                for (id, what) in ids.iter().zip(relayed) {
                    match what {
                        Relayed::Published(stream_id) => {
                            published.0.push(*id);
                            published.1.push(stream_id);
                        }
                        Relayed::StillHeld => held.push(*id),
                    }
                }
                sqlx::query(
                    "UPDATE outbox_events o
                    SET published_at = now(), stream_id = p.stream_id,
                        due_at = now() + make_interval(secs => $3),
                        settled_at = CASE WHEN $4 THEN now() END
                   FROM unnest($1::uuid[], $2::text[]) AS p(event_id, stream_id)
                  WHERE o.event_id = p.event_id",
                )
                .bind(&published.0)
                .bind(&published.1)
                .bind(check_after.as_secs_f64())
                .bind(fan_out)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE outbox_events SET due_at = now() + make_interval(secs => $2)
                  WHERE event_id = ANY($1)",
                )
                .bind(&held)
                .bind(check_after.as_secs_f64())
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(RelayStep {
                    claimed: ids.len(),
                    published: published.0.len(),
                })
            })
        })
        .await
    }
}
