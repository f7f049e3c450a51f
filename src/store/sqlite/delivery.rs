//! Deliveries and batches on SQLite: a lease on the row (or the batch)
//! instead of a lock held through the send, the outcome recorded in a second
//! transaction fenced on the lease.

use super::provider_events::SqliteReports;
use super::*;

/// How long a consumer's lease on an outbox row lasts: longer than any one
/// delivery (the Resend call times out after 10 s).
pub(super) const DELIVERY_LEASE: Duration = Duration::from_secs(60);

impl SqliteStore {
    /// Settles an outbox row after `attempt` attempts, with the last error
    /// (`None` when delivered).
    pub(super) async fn settle_row(
        tx: &mut Transaction<'_, Sqlite>,
        event_id: &str,
        attempt: i32,
        error: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE outbox_events SET settled_at = ?, attempts = ?, last_error = ?
              WHERE event_id = ?",
        )
        .bind(now)
        .bind(attempt)
        .bind(error)
        .bind(event_id)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Records one event as done: settles its row, writes its inbox row
    /// and its consumer's effect (the aggregate's status and the provider's
    /// id; for a delivered [`Effect::ChargeLedger`] first the ledger entry),
    /// in the caller's transaction.
    pub(super) async fn record_done(
        tx: &mut Transaction<'_, Sqlite>,
        done: &DoneEvent<'_>,
        now: i64,
    ) -> Result<(), StoreError> {
        let (event_id, aggregate_id) = (done.event_id.to_string(), done.aggregate_id.to_string());
        Self::settle_row(tx, &event_id, done.attempt, None, now).await?;
        sqlx::query("INSERT INTO inbox (consumer, event_id, processed_at) VALUES (?, ?, ?)")
            .bind(done.consumer.name)
            .bind(&event_id)
            .bind(now)
            .execute(&mut **tx)
            .await?;
        let effect = done.consumer.effect;
        if effect.writes_ledger_entry() && done.settled == Settled::Delivered {
            sqlx::query(
                "INSERT INTO ledger_entries
                     (charge_id, event_id, user_id, amount_cents, currency, applied_at)
                 SELECT id, ?, user_id, amount_cents, currency, ? FROM charges WHERE id = ?",
            )
            .bind(&event_id)
            .bind(now)
            .bind(&aggregate_id)
            .execute(&mut **tx)
            .await?;
        }
        if let (Some(id), Some(sql)) = (done.provider_id, effect.provider_id_update()) {
            sqlx::query(sql)
                .bind(id)
                .bind(&aggregate_id)
                .execute(&mut **tx)
                .await?;
        }
        Self::set_status(tx, effect, &aggregate_id, done.settled).await
    }

    /// Writes one event's dead letter, marks its aggregate `dead` and
    /// settles the row, in the caller's transaction.
    pub(super) async fn record_dead(
        tx: &mut Transaction<'_, Sqlite>,
        dead: &DeadEvent<'_>,
        now: i64,
    ) -> Result<(), StoreError> {
        let event_id = dead.event_id.to_string();
        Self::settle_row(tx, &event_id, dead.attempt, Some(dead.error), now).await?;
        sqlx::query(
            "INSERT INTO dead_letters
                 (id, event_id, consumer, topic, attempts, last_error, first_failed_at, dead_at,
                  effect)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (consumer, event_id) DO UPDATE
                SET attempts = excluded.attempts, last_error = excluded.last_error,
                    dead_at = excluded.dead_at, replayed_at = NULL, discarded_at = NULL",
        )
        .bind(Uuid::now_v7().to_string())
        .bind(&event_id)
        .bind(dead.consumer.name)
        .bind(dead.topic)
        .bind(dead.attempt)
        .bind(dead.error)
        .bind(dead.first_at.timestamp_micros())
        .bind(now)
        .bind(dead.consumer.effect.as_str())
        .execute(&mut **tx)
        .await?;
        let aggregate_id = dead.aggregate_id.to_string();
        Self::set_status(tx, dead.consumer.effect, &aggregate_id, Settled::Dead).await
    }

    /// Sets the aggregate's status for an `effect` that `settled` so, in
    /// the caller's transaction.
    pub(super) async fn set_status(
        tx: &mut Transaction<'_, Sqlite>,
        effect: Effect,
        aggregate_id: &str,
        settled: Settled,
    ) -> Result<(), StoreError> {
        sqlx::query(effect.status_update())
            .bind(effect.status(settled))
            .bind(aggregate_id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl DeliveryStore for SqliteStore {
    #[instrument(skip_all, fields(consumer = consumer.name, members = envelopes.len()))]
    async fn form_batch(
        &self,
        consumer: Consumer,
        batch_id: Uuid,
        envelopes: &[Envelope],
    ) -> Result<Vec<Admission>, StoreError> {
        let mut tx = self.write().await?;
        let now = now_us();
        let mut admissions = Vec::with_capacity(envelopes.len());
        let mut members = Vec::new();
        for envelope in envelopes {
            let event_id = envelope.event_id.to_string();
            // Each copy reads its row afresh: one settled a moment ago (a
            // suppressed one) is a repeat.
            let row = sqlx::query(
                "SELECT o.attempts, o.settled_at IS NOT NULL AS settled, o.aggregate_id,
                        o.batch_id IS NOT NULL AS batched,
                        EXISTS (SELECT 1 FROM inbox i
                                 WHERE i.consumer = ?2 AND i.event_id = o.event_id) AS in_inbox,
                        EXISTS (SELECT 1 FROM suppressions s WHERE s.address = ?3) AS suppressed
                   FROM outbox_events o WHERE o.event_id = ?1",
            )
            .bind(&event_id)
            .bind(consumer.name)
            .bind(consumer.effect.recipient(envelope))
            .fetch_optional(&mut *tx)
            .await?;
            let state = match &row {
                Some(row) => Some(RowState {
                    settled: row.try_get("settled")?,
                    in_inbox: row.try_get("in_inbox")?,
                    batched: row.try_get::<bool, _>("batched")? || members.contains(&event_id),
                    attempts: row.try_get("attempts")?,
                    suppressed: row.try_get("suppressed")?,
                }),
                None => None,
            };
            let admission = admit(state, envelope.attempts);
            match (admission, &row) {
                (Admission::Member, _) => members.push(event_id),
                (Admission::Suppressed, Some(row)) => {
                    let aggregate_id = uuid_column(row, "aggregate_id")?;
                    let done = suppressed_record(consumer, envelope.event_id, aggregate_id);
                    Self::record_done(&mut tx, &done, now).await?;
                }
                _ => {}
            }
            admissions.push(admission);
        }
        if !members.is_empty() {
            sqlx::query(
                "INSERT INTO send_batches (id, consumer, created_at, due_at) VALUES (?, ?, ?, ?)",
            )
            .bind(batch_id.to_string())
            .bind(consumer.name)
            .bind(now)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            for event_id in &members {
                sqlx::query("UPDATE outbox_events SET batch_id = ? WHERE event_id = ?")
                    .bind(batch_id.to_string())
                    .bind(event_id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(admissions)
    }

    #[instrument(skip_all, fields(consumer = consumer.name))]
    async fn send_due_batch(
        &self,
        consumer: Consumer,
        send: BatchSendFn<'_>,
    ) -> Result<Option<BatchResult>, StoreError> {
        // 1. Take the oldest due batch's lease in a short transaction (no
        //    transaction stays open while the batch is sent).
        let token = Uuid::new_v4().to_string();
        let mut tx = self.write().await?;
        let now = now_us();
        let Some(batch) = sqlx::query(
            "SELECT id, attempts, first_failed_at FROM send_batches
              WHERE consumer = ?1 AND settled_at IS NULL AND due_at <= ?2
                AND (locked_until IS NULL OR locked_until <= ?2)
              ORDER BY due_at LIMIT 1",
        )
        .bind(consumer.name)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        let id = uuid_column(&batch, "id")?;
        let attempts: i32 = batch.try_get("attempts")?;
        let first_at = instant(
            batch
                .try_get::<Option<i64>, _>("first_failed_at")?
                .unwrap_or(now),
        )?;
        sqlx::query("UPDATE send_batches SET locked_by = ?, locked_until = ? WHERE id = ?")
            .bind(&token)
            .bind(now + us(DELIVERY_LEASE))
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        let rows = sqlx::query(
            "SELECT event_id, topic, attempts, payload, traceparent, aggregate_id FROM outbox_events
              WHERE batch_id = ? AND settled_at IS NULL
              ORDER BY event_id",
        )
        .bind(id.to_string())
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut members = Vec::with_capacity(rows.len());
        let mut aggregates = Vec::with_capacity(rows.len());
        for row in &rows {
            let payload: String = row.try_get("payload")?;
            members.push(Envelope {
                event_id: uuid_column(row, "event_id")?,
                topic: row.try_get("topic")?,
                attempts: row.try_get("attempts")?,
                traceparent: row.try_get("traceparent")?,
                payload: serde_json::from_str(&payload)
                    .map_err(|e| StoreError::Internal(format!("outbox payload: {e}")))?,
            });
            aggregates.push(uuid_column(row, "aggregate_id")?);
        }

        // 2. Send.
        let attempt = attempts + 1;
        let decision = if members.is_empty() {
            BatchDecision::Answered(Vec::new())
        } else {
            let decision = send(BatchToSend {
                id,
                attempts,
                members: members.clone(),
            })
            .await;
            fail::fail_point!("batch-after-send", |_| std::process::abort());
            decision
        };

        // 3. Record, fenced on the lease (another sender that took the batch
        //    over sends the same members under the same key: its outcome stands).
        let mut tx = self.write().await?;
        let now = now_us();
        let fenced = |sql: &'static str| {
            sqlx::query(sql)
                .bind(attempt)
                .bind(now)
                .bind(id.to_string())
                .bind(token.clone())
        };
        let held = match &decision {
            BatchDecision::Retry { after, error } => fenced(
                "UPDATE send_batches
                    SET attempts = ?1, due_at = ?5, last_error = ?6,
                        first_failed_at = COALESCE(first_failed_at, ?2),
                        locked_by = NULL, locked_until = NULL
                  WHERE id = ?3 AND locked_by = ?4",
            )
            .bind(later(now, *after))
            .bind(error),
            BatchDecision::Defer { after } => fenced(
                "UPDATE send_batches SET due_at = ?5, locked_by = NULL, locked_until = NULL
                  WHERE id = ?3 AND locked_by = ?4 AND ?1 = ?1 AND ?2 = ?2",
            )
            .bind(later(now, *after)),
            BatchDecision::Answered(_) | BatchDecision::Dead { .. } => fenced(
                "UPDATE send_batches
                    SET attempts = ?1, settled_at = ?2, locked_by = NULL, locked_until = NULL
                  WHERE id = ?3 AND locked_by = ?4",
            ),
        }
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !held {
            return Ok(None);
        }
        let outcomes = batch_outcomes(&decision, members.len());
        for record in member_records(
            consumer,
            &members,
            &aggregates,
            &outcomes,
            attempt,
            first_at,
        ) {
            match record {
                MemberRecord::Done(done) => Self::record_done(&mut tx, &done, now).await?,
                MemberRecord::Dead(dead) => Self::record_dead(&mut tx, &dead, now).await?,
            }
        }
        let email_ids = provider_ids(&outcomes);
        apply_waiting_reports(&mut SqliteReports { tx: &mut tx, now }, &email_ids).await?;
        // Failpoint: a crash with the outcome written, before the commit.
        fail::fail_point!("batch-before-commit", |_| std::process::abort());
        tx.commit().await?;
        Ok(Some(BatchResult {
            id,
            attempt,
            members: members.len(),
            decision,
        }))
    }

    #[instrument(skip_all, fields(event_id = %envelope.event_id))]
    async fn deliver_event(
        &self,
        consumer: Consumer,
        envelope: &Envelope,
        deliver: DeliverFn<'_>,
    ) -> Result<DeliveryResult, StoreError> {
        let event_id = envelope.event_id.to_string();
        let token = Uuid::new_v4().to_string();
        // 1. Take the row's lease in a short transaction (no transaction
        //    stays open while the email is sent).
        let mut tx = self.write().await?;
        let now = now_us();
        let row = sqlx::query(
            "SELECT o.attempts, o.settled_at IS NOT NULL AS settled, o.topic, o.aggregate_id,
                    o.first_failed_at, o.locked_until,
                    EXISTS (SELECT 1 FROM inbox i
                             WHERE i.consumer = ?2 AND i.event_id = o.event_id) AS in_inbox
               FROM outbox_events o WHERE o.event_id = ?1",
        )
        .bind(&event_id)
        .bind(consumer.name)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(DeliveryResult::Gone);
        };
        let attempts: i32 = row.try_get("attempts")?;
        let state = RowState {
            settled: row.try_get("settled")?,
            in_inbox: row.try_get("in_inbox")?,
            batched: false,
            attempts,
            suppressed: false,
        };
        if let Some(refused) = admit(Some(state), envelope.attempts).refusal() {
            return Ok(refused);
        }
        if row
            .try_get::<Option<i64>, _>("locked_until")?
            .is_some_and(|until| until > now)
        {
            return Ok(DeliveryResult::Busy);
        }
        sqlx::query("UPDATE outbox_events SET locked_by = ?, locked_until = ? WHERE event_id = ?")
            .bind(&token)
            .bind(now + us(DELIVERY_LEASE))
            .bind(&event_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let topic: String = row.try_get("topic")?;
        let aggregate_id = uuid_column(&row, "aggregate_id")?;
        let first_failed_at: Option<i64> = row.try_get("first_failed_at")?;

        // 2. Deliver.
        let decision = deliver(attempts).await;
        fail::fail_point!("consumer-after-deliver", |_| std::process::abort());

        // 3. Record the outcome, fenced on the lease: if it ran out and
        //    another worker took the row, that worker's outcome stands (a
        //    resent email carries the same idempotency key).
        let attempt = attempts + 1;
        let mut tx = self.write().await?;
        let now = now_us();
        let held = sqlx::query(
            "UPDATE outbox_events SET locked_by = NULL, locked_until = NULL
              WHERE event_id = ? AND locked_by = ?",
        )
        .bind(&event_id)
        .bind(&token)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !held {
            return Ok(DeliveryResult::Busy);
        }
        match &decision {
            DeliveryDecision::Done => {
                let done = DoneEvent::delivered(consumer, envelope.event_id, aggregate_id, attempt);
                Self::record_done(&mut tx, &done, now).await?;
            }
            DeliveryDecision::Retry { after, error } => {
                sqlx::query(
                    "UPDATE outbox_events
                        SET attempts = ?, last_error = ?, due_at = ?,
                            first_failed_at = COALESCE(first_failed_at, ?), stream_id = NULL
                      WHERE event_id = ?",
                )
                .bind(attempt)
                .bind(error)
                .bind(later(now, *after))
                .bind(now)
                .bind(&event_id)
                .execute(&mut *tx)
                .await?;
            }
            DeliveryDecision::Defer { after } => {
                sqlx::query(
                    "UPDATE outbox_events SET due_at = ?, stream_id = NULL WHERE event_id = ?",
                )
                .bind(later(now, *after))
                .bind(&event_id)
                .execute(&mut *tx)
                .await?;
            }
            DeliveryDecision::Dead { error } => {
                let dead = DeadEvent {
                    consumer,
                    event_id: envelope.event_id,
                    topic: &topic,
                    aggregate_id,
                    attempt,
                    error,
                    first_at: instant(first_failed_at.unwrap_or(now))?,
                };
                Self::record_dead(&mut tx, &dead, now).await?;
            }
        }
        tx.commit().await?;
        Ok(DeliveryResult::Attempted { attempt, decision })
    }
}
