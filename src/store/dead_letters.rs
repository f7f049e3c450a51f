//! Dead letters in the store: listed, replayed into the outbox, discarded,
//! every action audited.

use async_trait::async_trait;
use uuid::Uuid;

use super::*;

/// A dead letter as the admin API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub id: Uuid,
    pub event_id: Uuid,
    pub topic: String,
    pub consumer: String,
    pub attempts: i32,
    pub last_error: String,
    pub first_failed_at: chrono::DateTime<chrono::Utc>,
    pub dead_at: chrono::DateTime<chrono::Utc>,
}

pub(crate) fn dead_letter_from_row(row: &impl Columns) -> Result<DeadLetter, sqlx::Error> {
    Ok(DeadLetter {
        id: row.id("id")?,
        event_id: row.id("event_id")?,
        topic: row.text("topic")?,
        consumer: row.text("consumer")?,
        attempts: row.int("attempts")?,
        last_error: row.text("last_error")?,
        first_failed_at: row.instant("first_failed_at")?,
        dead_at: row.instant("dead_at")?,
    })
}

/// What a replay or discard of one dead letter did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DlqAction {
    Replayed,
    Discarded,
    /// Already replayed: nothing done (replay is idempotent).
    AlreadyReplayed,
    /// Already discarded: nothing done.
    AlreadyDiscarded,
    NotFound,
}

/// Open dead letters of one topic.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DlqTopicStats {
    pub topic: String,
    pub depth: i64,
    pub oldest_age_seconds: f64,
}

/// Dead letters: list, replay, discard, depth.
#[async_trait]
pub trait DeadLetterStore: Send + Sync {
    /// Open dead letters, newest first, optionally of one topic.
    async fn list_dead_letters(
        &self,
        topic: Option<&str>,
        limit: u32,
        before: Option<Uuid>,
    ) -> Result<Vec<DeadLetter>, StoreError>;

    /// Puts one dead letter's event back in the outbox with a fresh attempt
    /// count (the relay publishes it at its rate) and audits it. Replaying
    /// a letter already replayed changes nothing.
    async fn replay_dead_letter(&self, id: Uuid, actor: &str) -> Result<DlqAction, StoreError>;

    /// Replays every open dead letter (of `topic`); how many.
    async fn replay_dead_letters(
        &self,
        topic: Option<&str>,
        actor: &str,
    ) -> Result<u64, StoreError>;

    /// Closes a dead letter without delivering it, keeping an audit row.
    async fn discard_dead_letter(&self, id: Uuid, actor: &str) -> Result<DlqAction, StoreError>;

    /// Depth and oldest age of the open dead letters, per topic.
    async fn dlq_stats(&self) -> Result<Vec<DlqTopicStats>, StoreError>;

    /// The newest `limit` lines of the operators' audit trail: job writes
    /// and suppression lifts (`admin_audit`), dead-letter replays and
    /// discards (`dlq_audit`, as `dlq.replay`/`dlq.discard` of the letter).
    async fn recent_audit(&self, limit: u32) -> Result<Vec<AuditRecord>, StoreError>;
}

/// One line of the audit trail, as read back.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditRecord {
    pub at: chrono::DateTime<chrono::Utc>,
    #[serde(flatten)]
    pub entry: crate::store::AuditEntry,
}

/// The audit trail's newest lines, both tables; `$1`/`?` the limit. The
/// backends differ only in how a letter's id becomes text.
macro_rules! recent_audit_sql {
    ($letter_id:literal, $limit:literal) => {
        concat!(
            "SELECT at, action, subject, detail, actor FROM (
                 SELECT at, action, subject, detail, actor FROM admin_audit
                 UNION ALL
                 SELECT at, 'dlq.' || action, ",
            $letter_id,
            ", '{}', actor FROM dlq_audit
             ) trail ORDER BY at DESC LIMIT ",
            $limit
        )
    };
}
pub(crate) use recent_audit_sql;

/// An audit line from a row of [`recent_audit_sql`].
pub(crate) fn audit_record(
    row: &impl crate::store::board::Columns,
) -> Result<AuditRecord, sqlx::Error> {
    Ok(AuditRecord {
        at: row.instant("at")?,
        entry: crate::store::AuditEntry {
            action: row.text("action")?,
            subject: row.text("subject")?,
            detail: row.text("detail")?,
            actor: row.text("actor")?,
        },
    })
}
