//! Dead letters on Postgres: list, replay into the outbox, discard; each
//! action closes the letter in one statement and audits it.

use super::*;

/// Reopens open dead letters for delivery: closes them as replayed, audits
/// each, puts their events back in the outbox (due now, attempts reset) and
/// returns each one's effect and aggregate, whose status the caller sets
/// back to pending in the same transaction. `$1` a topic or NULL, `$2` the
/// actor, `$3` one letter's id or NULL.
pub(super) const REPLAY_DEAD_LETTERS: &str = "
WITH letters AS (
    UPDATE dead_letters SET replayed_at = now()
     WHERE replayed_at IS NULL AND discarded_at IS NULL
       AND ($1::text IS NULL OR topic = $1)
       AND ($3::uuid IS NULL OR id = $3)
    RETURNING id, event_id, effect
), audit AS (
    INSERT INTO dlq_audit (dead_letter_id, event_id, action, actor)
    SELECT id, event_id, 'replay', $2 FROM letters
), events AS (
    UPDATE outbox_events o
       SET settled_at = NULL, attempts = 0, due_at = now(), last_error = NULL,
           first_failed_at = NULL, batch_id = NULL, stream_id = NULL
      FROM letters l
     WHERE o.event_id = l.event_id
    RETURNING o.event_id, o.aggregate_id
)
SELECT l.effect, e.aggregate_id
  FROM letters l LEFT JOIN events e ON e.event_id = l.event_id";

/// Discards one open dead letter, audited. `$1` its id, `$2` the actor.
pub(super) const DISCARD_DEAD_LETTER: &str = "
WITH letter AS (
    UPDATE dead_letters SET discarded_at = now()
     WHERE id = $1 AND replayed_at IS NULL AND discarded_at IS NULL
    RETURNING id, event_id
), audit AS (
    INSERT INTO dlq_audit (dead_letter_id, event_id, action, actor)
    SELECT id, event_id, 'discard', $2 FROM letter
)
SELECT count(*) FROM letter";

impl PgStore {
    /// Replays the open dead letters matching `topic` and `id` (both
    /// optional) in one transaction, their aggregates back to pending; how
    /// many.
    async fn replay_letters(
        conn: &mut PgConnection,
        topic: Option<&str>,
        id: Option<Uuid>,
        actor: &str,
    ) -> Result<u64, StoreError> {
        let mut tx = conn.begin().await?;
        let letters = sqlx::query(REPLAY_DEAD_LETTERS)
            .bind(topic)
            .bind(actor)
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
        for letter in &letters {
            let effect: Option<String> = letter.try_get("effect")?;
            let aggregate: Option<Uuid> = letter.try_get("aggregate_id")?;
            if let (Some(effect), Some(aggregate)) =
                (effect.as_deref().and_then(Effect::parse), aggregate)
            {
                Self::set_status(&mut tx, effect, aggregate, Settled::Replayed).await?;
            }
        }
        tx.commit().await?;
        Ok(letters.len() as u64)
    }

    /// Closes one open dead letter as `how` (`Replayed` or `Discarded`),
    /// audited, conditioned on the letter being open; if nothing was
    /// closed, says why (unknown id, or closed earlier).
    pub(super) async fn close_dead_letter(
        &self,
        id: Uuid,
        actor: &str,
        how: DlqAction,
    ) -> Result<DlqAction, StoreError> {
        self.with_conn(|conn, _| {
            Box::pin(async move {
                let closed: i64 = match how {
                    DlqAction::Replayed => {
                        Self::replay_letters(&mut *conn, None, Some(id), actor).await? as i64
                    }
                    _ => {
                        sqlx::query_scalar(DISCARD_DEAD_LETTER)
                            .bind(id)
                            .bind(actor)
                            .fetch_one(&mut *conn)
                            .await?
                    }
                };
                if closed > 0 {
                    return Ok(how);
                }
                let row = sqlx::query(
                    "SELECT replayed_at IS NOT NULL AS replayed FROM dead_letters WHERE id = $1",
                )
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?;
                Ok(match row {
                    None => DlqAction::NotFound,
                    Some(row) if row.try_get::<bool, _>("replayed")? => DlqAction::AlreadyReplayed,
                    Some(_) => DlqAction::AlreadyDiscarded,
                })
            })
        })
        .await
    }
}

#[async_trait]
impl DeadLetterStore for PgStore {
    #[instrument(skip_all)]
    async fn list_dead_letters(
        &self,
        topic: Option<&str>,
        limit: u32,
        before: Option<Uuid>,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.with_conn(|conn, _| {
            Box::pin(async move {
                let rows = sqlx::query(
                    "SELECT id, event_id, topic, consumer, attempts, last_error, first_failed_at,
                        dead_at
                   FROM dead_letters
                  WHERE replayed_at IS NULL AND discarded_at IS NULL
                    AND ($1::text IS NULL OR topic = $1)
                    AND ($2::uuid IS NULL OR id < $2)
                  ORDER BY id DESC
                  LIMIT $3",
                )
                .bind(topic)
                .bind(before)
                .bind(i64::from(limit))
                .fetch_all(&mut *conn)
                .await?;
                Ok(rows
                    .iter()
                    .map(dead_letter_from_row)
                    .collect::<Result<_, _>>()?)
            })
        })
        .await
    }

    #[instrument(skip_all)]
    async fn replay_dead_letter(&self, id: Uuid, actor: &str) -> Result<DlqAction, StoreError> {
        self.close_dead_letter(id, actor, DlqAction::Replayed).await
    }

    #[instrument(skip_all)]
    async fn replay_dead_letters(
        &self,
        topic: Option<&str>,
        actor: &str,
    ) -> Result<u64, StoreError> {
        self.with_conn(|conn, _| {
            Box::pin(async move { Self::replay_letters(conn, topic, None, actor).await })
        })
        .await
    }

    #[instrument(skip_all)]
    async fn discard_dead_letter(&self, id: Uuid, actor: &str) -> Result<DlqAction, StoreError> {
        self.close_dead_letter(id, actor, DlqAction::Discarded)
            .await
    }

    #[instrument(skip_all)]
    async fn recent_audit(&self, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        self.with_conn(|conn, _| {
            Box::pin(async move {
                let rows = sqlx::query(recent_audit_sql!("dead_letter_id::text", "$1"))
                    .bind(i64::from(limit))
                    .fetch_all(&mut *conn)
                    .await?;
                Ok(rows.iter().map(audit_record).collect::<Result<_, _>>()?)
            })
        })
        .await
    }

    async fn dlq_stats(&self) -> Result<Vec<DlqTopicStats>, StoreError> {
        self.with_conn(|conn, _| {
            Box::pin(async move {
                let rows = sqlx::query(
                    "SELECT topic, count(*) AS depth,
                        EXTRACT(EPOCH FROM now() - min(dead_at))::float8 AS oldest
                   FROM dead_letters
                  WHERE replayed_at IS NULL AND discarded_at IS NULL
                  GROUP BY topic ORDER BY topic",
                )
                .fetch_all(&mut *conn)
                .await?;
                rows.iter()
                    .map(|row| {
                        Ok(DlqTopicStats {
                            topic: row.try_get("topic")?,
                            depth: row.try_get("depth")?,
                            oldest_age_seconds: row.try_get::<f64, _>("oldest")?.max(0.0),
                        })
                    })
                    .collect()
            })
        })
        .await
    }
}
