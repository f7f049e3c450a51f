//! Deliveries and batches on Postgres: the outbox row (or the batch row)
//! locked through the send, the outcome recorded in the same transaction.

use super::provider_events::PgReports;
use super::*;

/// Records delivered events, however many, in one statement: their
/// consumer's inbox rows, their effect (the aggregate's status and the
/// provider's id of the email; for [`Effect::ChargeLedger`] also the ledger
/// entry) and their rows settled, so a charge's ledger entry exists exactly
/// when its inbox row does. A batch of a hundred settles in this one
/// statement (and the counters' one statement trigger,
/// migrations/postgres/0011); a single delivery is a set of one. `$1`
/// consumer, `$2`–`$6` one array each (event id, aggregate id, attempts
/// spent, the aggregate's new status ([`Effect::status`]), the provider's
/// id of the email or NULL to keep the one it has), `$7` the effect's name
/// ([`Effect::as_str`]: a unit test below keeps the names here in step). A
/// copy to a suppressed address is recorded the same way, with its status.
pub(super) const SETTLE_DELIVERED: &str = "
WITH m AS (
    SELECT * FROM unnest($2::uuid[], $3::uuid[], $4::int4[], $5::text[], $6::text[])
        AS m(event_id, aggregate_id, attempts, status, provider_id)
), inbox_rows AS (
    INSERT INTO inbox (consumer, event_id) SELECT $1, event_id FROM m
), effect AS (
    UPDATE applications a SET email_status = m.status, email_id = COALESCE(m.provider_id, a.email_id)
      FROM m
     WHERE $7 = 'application_email' AND a.id = m.aggregate_id
), ledger AS (
    INSERT INTO ledger_entries (charge_id, event_id, user_id, amount_cents, currency)
    SELECT c.id, m.event_id, c.user_id, c.amount_cents, c.currency
      FROM m JOIN charges c ON c.id = m.aggregate_id
     WHERE $7 = 'charge_ledger'
), charge AS (
    UPDATE charges c SET ledger_status = m.status
      FROM m
     WHERE $7 = 'charge_ledger' AND c.id = m.aggregate_id
)
UPDATE outbox_events o SET settled_at = now(), attempts = m.attempts, last_error = NULL
  FROM m
 WHERE o.event_id = m.event_id";

/// Dead-letters events, however many, in one statement: each one's dead
/// letter (a replayed letter dies again in place), its aggregate's status
/// `$9` ([`Effect::status`] of [`Settled::Dead`]) and its row settled with
/// the error. `$1`–`$7` one array each (event id, aggregate id, topic,
/// attempts spent, error, first failure, the letter's new id), `$8` the
/// consumer, `$10` the effect's name.
pub(super) const SETTLE_DEAD: &str = "
WITH m AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int4[], $5::text[],
                         $6::timestamptz[], $7::uuid[])
        AS m(event_id, aggregate_id, topic, attempts, error, first_at, letter_id)
), letters AS (
    INSERT INTO dead_letters
           (event_id, consumer, topic, attempts, last_error, first_failed_at, id, effect)
    SELECT event_id, $8, topic, attempts, error, first_at, letter_id, $10 FROM m
    ON CONFLICT (consumer, event_id) DO UPDATE
       SET attempts = EXCLUDED.attempts, last_error = EXCLUDED.last_error,
           dead_at = now(), replayed_at = NULL, discarded_at = NULL
), effect AS (
    UPDATE applications a SET email_status = $9
      FROM m
     WHERE $10 = 'application_email' AND a.id = m.aggregate_id
), charge AS (
    UPDATE charges c SET ledger_status = $9
      FROM m
     WHERE $10 = 'charge_ledger' AND c.id = m.aggregate_id
)
UPDATE outbox_events o SET settled_at = now(), attempts = m.attempts, last_error = m.error
  FROM m
 WHERE o.event_id = m.event_id";

impl PgStore {
    /// Records `done` events of `consumer` ([`SETTLE_DELIVERED`]), in the
    /// caller's transaction: one statement however many there are.
    pub(super) async fn record_done(
        tx: &mut Transaction<'_, Postgres>,
        consumer: Consumer,
        done: &[DoneEvent<'_>],
    ) -> Result<(), StoreError> {
        if done.is_empty() {
            return Ok(());
        }
        debug_assert!(done.iter().all(|d| d.consumer == consumer));
        sqlx::query(SETTLE_DELIVERED)
            .bind(consumer.name)
            .bind(done.iter().map(|d| d.event_id).collect::<Vec<_>>())
            .bind(done.iter().map(|d| d.aggregate_id).collect::<Vec<_>>())
            .bind(done.iter().map(|d| d.attempt).collect::<Vec<_>>())
            .bind(
                done.iter()
                    .map(|d| consumer.effect.status(d.settled))
                    .collect::<Vec<_>>(),
            )
            .bind(done.iter().map(|d| d.provider_id).collect::<Vec<_>>())
            .bind(consumer.effect.as_str())
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Dead-letters `dead` events of `consumer` ([`SETTLE_DEAD`]), in the
    /// caller's transaction: one statement however many there are.
    pub(super) async fn record_dead(
        tx: &mut Transaction<'_, Postgres>,
        consumer: Consumer,
        dead: &[DeadEvent<'_>],
    ) -> Result<(), StoreError> {
        if dead.is_empty() {
            return Ok(());
        }
        debug_assert!(dead.iter().all(|d| d.consumer == consumer));
        sqlx::query(SETTLE_DEAD)
            .bind(dead.iter().map(|d| d.event_id).collect::<Vec<_>>())
            .bind(dead.iter().map(|d| d.aggregate_id).collect::<Vec<_>>())
            .bind(dead.iter().map(|d| d.topic).collect::<Vec<_>>())
            .bind(dead.iter().map(|d| d.attempt).collect::<Vec<_>>())
            .bind(dead.iter().map(|d| d.error).collect::<Vec<_>>())
            .bind(dead.iter().map(|d| d.first_at).collect::<Vec<_>>())
            .bind(dead.iter().map(|_| Uuid::now_v7()).collect::<Vec<_>>())
            .bind(consumer.name)
            .bind(consumer.effect.status(Settled::Dead))
            .bind(consumer.effect.as_str())
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Sets the aggregate's status for an `effect` that `settled` so, in
    /// the caller's transaction.
    pub(super) async fn set_status(
        tx: &mut Transaction<'_, Postgres>,
        effect: Effect,
        aggregate_id: Uuid,
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
impl DeliveryStore for PgStore {
    #[instrument(skip_all, fields(consumer = consumer.name, members = envelopes.len()))]
    async fn form_batch(
        &self,
        consumer: Consumer,
        batch_id: Uuid,
        envelopes: &[Envelope],
    ) -> Result<Vec<Admission>, StoreError> {
        self.with_conn(|conn, _| {
            Box::pin(async move {
                let mut tx = conn
                    .begin_with("BEGIN; SET LOCAL lock_timeout = '5s'")
                    .await?;
                let ids: Vec<Uuid> = envelopes.iter().map(|e| e.event_id).collect();
                // A join, not an `EXISTS` per row: for a set, the planner
                // made that a hashed subplan over the consumer's whole inbox
                // (every row it ever settled, read on every batch).
                let rows = sqlx::query(
                    "SELECT o.event_id, o.attempts, o.settled_at IS NOT NULL AS settled,
                        o.batch_id IS NOT NULL AS batched, o.aggregate_id,
                        i.event_id IS NOT NULL AS in_inbox
                   FROM outbox_events o
                   LEFT JOIN inbox i ON i.consumer = $2 AND i.event_id = o.event_id
                  WHERE o.event_id = ANY($1)
                  ORDER BY o.event_id
                  FOR UPDATE OF o",
                )
                .bind(&ids)
                .bind(consumer.name)
                .fetch_all(&mut *tx)
                .await?;
                let recipients: Vec<Option<String>> = envelopes
                    .iter()
                    .map(|e| consumer.effect.recipient(e))
                    .collect();
                let addresses: Vec<&str> =
                    recipients.iter().flatten().map(String::as_str).collect();
                let suppressed: std::collections::HashSet<String> = if addresses.is_empty() {
                    Default::default()
                } else {
                    sqlx::query_scalar("SELECT address FROM suppressions WHERE address = ANY($1)")
                        .bind(&addresses)
                        .fetch_all(&mut *tx)
                        .await?
                        .into_iter()
                        .collect()
                };
                let mut states = std::collections::HashMap::new();
                let mut aggregates = std::collections::HashMap::new();
                for row in &rows {
                    let id: Uuid = row.try_get("event_id")?;
                    aggregates.insert(id, row.try_get::<Uuid, _>("aggregate_id")?);
                    states.insert(
                        id,
                        RowState {
                            settled: row.try_get("settled")?,
                            in_inbox: row.try_get("in_inbox")?,
                            batched: row.try_get("batched")?,
                            attempts: row.try_get("attempts")?,
                            suppressed: false,
                        },
                    );
                }
                let mut members = Vec::new();
                let mut unsent = Vec::new();
                let admissions: Vec<Admission> = envelopes
                    .iter()
                    .zip(&recipients)
                    .map(|(e, to)| {
                        let state = states.get_mut(&e.event_id).map(|state| {
                            state.suppressed =
                                to.as_ref().is_some_and(|to| suppressed.contains(to));
                            *state
                        });
                        let admission = admit(state, e.attempts);
                        // A second copy of the same event in this set is a repeat.
                        if let Some(state) = states.get_mut(&e.event_id) {
                            match admission {
                                Admission::Member => {
                                    state.batched = true;
                                    members.push(e.event_id);
                                }
                                Admission::Suppressed => {
                                    state.settled = true;
                                    unsent.push(e.event_id);
                                }
                                _ => {}
                            }
                        }
                        admission
                    })
                    .collect();
                let unsent: Vec<DoneEvent> = unsent
                    .into_iter()
                    .map(|event_id| {
                        let aggregate_id = aggregates.get(&event_id).copied().unwrap_or_default();
                        suppressed_record(consumer, event_id, aggregate_id)
                    })
                    .collect();
                Self::record_done(&mut tx, consumer, &unsent).await?;
                if !members.is_empty() {
                    sqlx::query("INSERT INTO send_batches (id, consumer) VALUES ($1, $2)")
                        .bind(batch_id)
                        .bind(consumer.name)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query("UPDATE outbox_events SET batch_id = $1 WHERE event_id = ANY($2)")
                        .bind(batch_id)
                        .bind(&members)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(admissions)
            })
        })
        .await
    }

    #[instrument(skip_all, fields(consumer = consumer.name))]
    async fn send_due_batch(
        &self,
        consumer: Consumer,
        send: BatchSendFn<'_>,
    ) -> Result<Option<BatchResult>, StoreError> {
        self.with_conn(|conn, _| {
            Box::pin(async move {
                let mut tx = conn.begin().await?;
                let Some(batch) = sqlx::query(
                    "SELECT id, attempts, first_failed_at FROM send_batches
                  WHERE consumer = $1 AND settled_at IS NULL AND due_at <= now()
                  ORDER BY due_at
                  LIMIT 1
                  FOR UPDATE SKIP LOCKED",
                )
                .bind(consumer.name)
                .fetch_optional(&mut *tx)
                .await?
                else {
                    return Ok(None);
                };
                let id: Uuid = batch.try_get("id")?;
                let attempts: i32 = batch.try_get("attempts")?;
                let first_at: DateTime<Utc> = batch
                    .try_get::<Option<DateTime<Utc>>, _>("first_failed_at")?
                    .unwrap_or_else(Utc::now);
                let rows = sqlx::query(
                    "SELECT event_id, topic, attempts, payload, traceparent, aggregate_id FROM outbox_events
                  WHERE batch_id = $1 AND settled_at IS NULL
                  ORDER BY event_id",
                )
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
                let mut members = Vec::with_capacity(rows.len());
                let mut aggregates = Vec::with_capacity(rows.len());
                for row in &rows {
                    members.push(Envelope {
                        event_id: row.try_get("event_id")?,
                        topic: row.try_get("topic")?,
                        attempts: row.try_get("attempts")?,
                        traceparent: row.try_get("traceparent")?,
                        payload: row.try_get("payload")?,
                    });
                    aggregates.push(row.try_get::<Uuid, _>("aggregate_id")?);
                }
                let attempt = attempts + 1;
                let decision = if members.is_empty() {
                    BatchDecision::Answered(Vec::new())
                } else {
                    let to_send = BatchToSend {
                        id,
                        attempts,
                        members: members.clone(),
                    };
                    let decision = send(to_send).await;
                    fail::fail_point!("batch-after-send", |_| std::process::abort());
                    decision
                };
                let outcomes = batch_outcomes(&decision, members.len());
                match &decision {
                    BatchDecision::Retry { after, error } => {
                        sqlx::query(
                            "UPDATE send_batches
                            SET attempts = $2, last_error = $3,
                                due_at = now() + make_interval(secs => $4),
                                first_failed_at = COALESCE(first_failed_at, now())
                          WHERE id = $1",
                        )
                        .bind(id)
                        .bind(attempt)
                        .bind(error)
                        .bind(bounded_delay(*after).as_secs_f64())
                        .execute(&mut *tx)
                        .await?;
                    }
                    BatchDecision::Defer { after } => {
                        sqlx::query(
                            "UPDATE send_batches SET due_at = now() + make_interval(secs => $2)
                          WHERE id = $1",
                        )
                        .bind(id)
                        .bind(bounded_delay(*after).as_secs_f64())
                        .execute(&mut *tx)
                        .await?;
                    }
                    BatchDecision::Answered(_) | BatchDecision::Dead { .. } => {
                        // Before the emails get their ids: a report about one of
                        // them waits for this commit, or has committed before and
                        // is applied below.
                        let email_ids = provider_ids(&outcomes);
                        PgReports { tx: &mut tx }.lock_emails(&email_ids).await?;
                        let records = member_records(
                            consumer,
                            &members,
                            &aggregates,
                            &outcomes,
                            attempt,
                            first_at,
                        );
                        // Every member in two statements at most, whatever the
                        // batch's size: no lock but the members' own rows and
                        // one counter shard (migrations/postgres/0011).
                        let (mut done, mut dead) = (Vec::new(), Vec::new());
                        for record in records {
                            match record {
                                MemberRecord::Done(record) => done.push(record),
                                MemberRecord::Dead(record) => dead.push(record),
                            }
                        }
                        Self::record_done(&mut tx, consumer, &done).await?;
                        Self::record_dead(&mut tx, consumer, &dead).await?;
                        apply_waiting_reports(&mut PgReports { tx: &mut tx }, &email_ids).await?;
                        sqlx::query(
                            "UPDATE send_batches SET settled_at = now(), attempts = $2
                          WHERE id = $1",
                        )
                        .bind(id)
                        .bind(attempt)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                // Failpoint: a crash with the outcome written, before the commit.
                fail::fail_point!("batch-before-commit", |_| std::process::abort());
                tx.commit().await?;
                Ok(Some(BatchResult {
                    id,
                    attempt,
                    members: members.len(),
                    decision,
                }))
            })
        })
        .await
    }

    #[instrument(skip_all, fields(event_id = %envelope.event_id))]
    async fn deliver_event(
        &self,
        consumer: Consumer,
        envelope: &Envelope,
        deliver: DeliverFn<'_>,
    ) -> Result<DeliveryResult, StoreError> {
        self.with_conn(|conn, _| {
            Box::pin(async move {
                // Another worker may hold the row while it sends a copy of this
                // event (or the relay, while it marks it published): wait for its
                // outcome rather than skip, but not forever. One round trip.
                let mut tx = conn
                    .begin_with("BEGIN; SET LOCAL lock_timeout = '5s'")
                    .await?;
                let row = sqlx::query(
                    "SELECT o.attempts, o.settled_at IS NOT NULL AS settled, o.topic,
                        o.aggregate_id, o.first_failed_at,
                        EXISTS (SELECT 1 FROM inbox i
                                 WHERE i.consumer = $2 AND i.event_id = o.event_id) AS in_inbox
                   FROM outbox_events o
                  WHERE o.event_id = $1
                  FOR UPDATE OF o",
                )
                .bind(envelope.event_id)
                .bind(consumer.name)
                .fetch_optional(&mut *tx)
                .await;
                let row = match row {
                    Ok(Some(row)) => row,
                    Ok(None) => return Ok(DeliveryResult::Gone),
                    Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("55P03") => {
                        return Ok(DeliveryResult::Busy)
                    }
                    Err(e) => return Err(e.into()),
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
                let topic: String = row.try_get("topic")?;
                let aggregate_id: Uuid = row.try_get("aggregate_id")?;
                let first_at: DateTime<Utc> = row
                    .try_get::<Option<DateTime<Utc>>, _>("first_failed_at")?
                    .unwrap_or_else(Utc::now);
                let decision = deliver(attempts).await;
                fail::fail_point!("consumer-after-deliver", |_| std::process::abort());
                let attempt = attempts + 1;
                match &decision {
                    DeliveryDecision::Done => {
                        // Inbox row, local effect and settling in one statement.
                        let done = DoneEvent::delivered(
                            consumer,
                            envelope.event_id,
                            aggregate_id,
                            attempt,
                        );
                        Self::record_done(&mut tx, consumer, &[done]).await?;
                    }
                    DeliveryDecision::Retry { after, error } => {
                        sqlx::query(
                            "UPDATE outbox_events
                            SET attempts = $2, last_error = $3,
                                due_at = now() + make_interval(secs => $4),
                                first_failed_at = COALESCE(first_failed_at, now()),
                                stream_id = NULL
                          WHERE event_id = $1",
                        )
                        .bind(envelope.event_id)
                        .bind(attempt)
                        .bind(error)
                        .bind(bounded_delay(*after).as_secs_f64())
                        .execute(&mut *tx)
                        .await?;
                    }
                    DeliveryDecision::Defer { after } => {
                        sqlx::query(
                            "UPDATE outbox_events
                            SET due_at = now() + make_interval(secs => $2), stream_id = NULL
                          WHERE event_id = $1",
                        )
                        .bind(envelope.event_id)
                        .bind(bounded_delay(*after).as_secs_f64())
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
                            first_at,
                        };
                        Self::record_dead(&mut tx, consumer, &[dead]).await?;
                    }
                }
                tx.commit().await?;
                Ok(DeliveryResult::Attempted { attempt, decision })
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_one_statement_settles_name_every_effect_as_effect_does() {
        for effect in [Effect::ApplicationEmail, Effect::ChargeLedger] {
            let name = format!("$7 = '{}'", effect.as_str());
            assert!(SETTLE_DELIVERED.contains(&name), "{name} missing");
            let name = format!("$10 = '{}'", effect.as_str());
            assert!(SETTLE_DEAD.contains(&name), "{name} missing");
        }
    }
}
