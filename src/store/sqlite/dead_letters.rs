//! Dead letters on SQLite: list, replay into the outbox, discard, audited.

use super::*;

impl SqliteStore {
    /// Replays the open dead letters matching `topic` and `id` (both
    /// optional), in one transaction; how many.
    pub(super) async fn replay_open_letters(
        &self,
        topic: Option<&str>,
        id: Option<Uuid>,
        actor: &str,
    ) -> Result<u64, StoreError> {
        let mut tx = self.write().await?;
        let now = now_us();
        let letters = sqlx::query(
            "SELECT d.id, d.event_id, d.effect, o.aggregate_id
               FROM dead_letters d LEFT JOIN outbox_events o ON o.event_id = d.event_id
              WHERE d.replayed_at IS NULL AND d.discarded_at IS NULL
                AND (?1 IS NULL OR d.topic = ?1) AND (?2 IS NULL OR d.id = ?2)",
        )
        .bind(topic)
        .bind(id.map(|id| id.to_string()))
        .fetch_all(&mut *tx)
        .await?;
        for letter in &letters {
            let letter_id: String = letter.try_get("id")?;
            let event_id: String = letter.try_get("event_id")?;
            sqlx::query("UPDATE dead_letters SET replayed_at = ? WHERE id = ?")
                .bind(now)
                .bind(&letter_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO dlq_audit (dead_letter_id, event_id, action, actor, at)
                 VALUES (?, ?, 'replay', ?, ?)",
            )
            .bind(&letter_id)
            .bind(&event_id)
            .bind(actor)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE outbox_events
                    SET settled_at = NULL, attempts = 0, due_at = ?, last_error = NULL,
                        first_failed_at = NULL, locked_by = NULL, locked_until = NULL,
                        batch_id = NULL, stream_id = NULL
                  WHERE event_id = ?",
            )
            .bind(now)
            .bind(&event_id)
            .execute(&mut *tx)
            .await?;
            let effect: Option<String> = letter.try_get("effect")?;
            let aggregate: Option<String> = letter.try_get("aggregate_id")?;
            if let (Some(effect), Some(aggregate)) =
                (effect.as_deref().and_then(Effect::parse), aggregate)
            {
                Self::set_status(&mut tx, effect, &aggregate, Settled::Replayed).await?;
            }
        }
        tx.commit().await?;
        Ok(letters.len() as u64)
    }

    /// Why a dead letter could not be closed: unknown, or closed earlier.
    pub(super) async fn closed_earlier(&self, id: Uuid) -> Result<DlqAction, StoreError> {
        let row = sqlx::query(
            "SELECT replayed_at IS NOT NULL AS replayed FROM dead_letters WHERE id = ?",
        )
        .bind(id.to_string())
        .fetch_optional(&self.reader)
        .await?;
        Ok(match row {
            None => DlqAction::NotFound,
            Some(row) if row.try_get::<bool, _>("replayed")? => DlqAction::AlreadyReplayed,
            Some(_) => DlqAction::AlreadyDiscarded,
        })
    }
}

#[async_trait]
impl DeadLetterStore for SqliteStore {
    #[instrument(skip_all)]
    async fn list_dead_letters(
        &self,
        topic: Option<&str>,
        limit: u32,
        before: Option<Uuid>,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, event_id, topic, consumer, attempts, last_error, first_failed_at, dead_at
               FROM dead_letters
              WHERE replayed_at IS NULL AND discarded_at IS NULL
                AND (?1 IS NULL OR topic = ?1)
                AND (?2 IS NULL OR id < ?2)
              ORDER BY id DESC
              LIMIT ?3",
        )
        .bind(topic)
        .bind(before.map(|b| b.to_string()))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        Ok(rows
            .iter()
            .map(dead_letter_from_row)
            .collect::<Result<_, _>>()?)
    }

    #[instrument(skip_all)]
    async fn replay_dead_letter(&self, id: Uuid, actor: &str) -> Result<DlqAction, StoreError> {
        if self.replay_open_letters(None, Some(id), actor).await? > 0 {
            return Ok(DlqAction::Replayed);
        }
        self.closed_earlier(id).await
    }

    #[instrument(skip_all)]
    async fn replay_dead_letters(
        &self,
        topic: Option<&str>,
        actor: &str,
    ) -> Result<u64, StoreError> {
        self.replay_open_letters(topic, None, actor).await
    }

    #[instrument(skip_all)]
    async fn discard_dead_letter(&self, id: Uuid, actor: &str) -> Result<DlqAction, StoreError> {
        let mut tx = self.write().await?;
        let now = now_us();
        let letter = sqlx::query(
            "UPDATE dead_letters SET discarded_at = ?
              WHERE id = ? AND replayed_at IS NULL AND discarded_at IS NULL
             RETURNING event_id",
        )
        .bind(now)
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(letter) = letter else {
            drop(tx);
            return self.closed_earlier(id).await;
        };
        sqlx::query(
            "INSERT INTO dlq_audit (dead_letter_id, event_id, action, actor, at)
             VALUES (?, ?, 'discard', ?, ?)",
        )
        .bind(id.to_string())
        .bind(letter.try_get::<String, _>("event_id")?)
        .bind(actor)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(DlqAction::Discarded)
    }

    #[instrument(skip_all)]
    async fn recent_audit(&self, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(recent_audit_sql!("dead_letter_id", "?"))
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        Ok(rows.iter().map(audit_record).collect::<Result<_, _>>()?)
    }

    async fn dlq_stats(&self) -> Result<Vec<DlqTopicStats>, StoreError> {
        let now = now_us();
        let rows = sqlx::query(
            "SELECT topic, count(*) AS depth, min(dead_at) AS oldest
               FROM dead_letters
              WHERE replayed_at IS NULL AND discarded_at IS NULL
              GROUP BY topic ORDER BY topic",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
                let oldest: i64 = row.try_get("oldest")?;
                Ok(DlqTopicStats {
                    topic: row.try_get("topic")?,
                    depth: row.try_get("depth")?,
                    oldest_age_seconds: (now - oldest).max(0) as f64 / 1e6,
                })
            })
            .collect()
    }
}
