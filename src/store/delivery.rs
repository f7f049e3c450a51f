//! Delivery in the store: a consumer's step for one envelope, and the
//! EmailSender's batches (formed once, sent under one key, settled per
//! member). The decisions that are the same on both backends (is a copy
//! still to deliver, what a batch decision means per member, what a
//! settled member writes) are the plain functions here.

use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use super::*;
use crate::broker::Envelope;

/// A consumer as the store sees it: the name its inbox rows, batches and
/// dead letters carry, the topic it consumes, and the typed effect its
/// deliveries have on Herald's own tables. The consumer says what it does;
/// the store never works that out from an event's topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Consumer {
    pub name: &'static str,
    pub topic: &'static str,
    pub effect: Effect,
}

/// What a consumer's delivery changes besides its inbox row and the settled
/// outbox row. Stored on a dead letter (`dead_letters.effect`), so that a
/// replay undoes exactly what the letter's consumer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// An application's `email_status` follows its confirmation email.
    ApplicationEmail,
    /// A charge's ledger entry is written when it is delivered, and its
    /// `ledger_status` follows.
    ChargeLedger,
}

/// Where a delivery ended, as its aggregate's status shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Delivered,
    /// Not delivered on purpose: the recipient's address is suppressed.
    Suppressed,
    Dead,
    /// A dead letter put back in the outbox: waiting again.
    Replayed,
}

impl Effect {
    /// Its name in `dead_letters.effect`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Effect::ApplicationEmail => "application_email",
            Effect::ChargeLedger => "charge_ledger",
        }
    }

    /// The effect a stored name means; `None` for a name this build does
    /// not know (a letter then replays without touching an aggregate).
    pub fn parse(name: &str) -> Option<Self> {
        [Effect::ApplicationEmail, Effect::ChargeLedger]
            .into_iter()
            .find(|e| e.as_str() == name)
    }

    /// The statement that sets the aggregate's status: `$1` the status,
    /// `$2` the aggregate's id. One text for both backends (sqlx binds
    /// SQLite's `$n` by its number).
    pub(crate) const fn status_update(self) -> &'static str {
        match self {
            Effect::ApplicationEmail => "UPDATE applications SET email_status = $1 WHERE id = $2",
            Effect::ChargeLedger => "UPDATE charges SET ledger_status = $1 WHERE id = $2",
        }
    }

    /// The aggregate's status once a delivery has `settled` so.
    pub(crate) const fn status(self, settled: Settled) -> &'static str {
        match (self, settled) {
            (Effect::ApplicationEmail, Settled::Delivered) => "sent",
            (Effect::ChargeLedger, Settled::Delivered) => "applied",
            (_, Settled::Suppressed) => "suppressed",
            (_, Settled::Dead) => "dead",
            (_, Settled::Replayed) => "pending",
        }
    }

    /// Whether a delivery writes a ledger entry (in the same transaction as
    /// its inbox row, so the entry exists exactly when the row does).
    pub(crate) const fn writes_ledger_entry(self) -> bool {
        matches!(self, Effect::ChargeLedger)
    }

    /// The statement that keeps the provider's id of a delivered effect:
    /// `$1` the id, `$2` the aggregate's id (one text for both backends).
    pub(crate) const fn provider_id_update(self) -> Option<&'static str> {
        match self {
            Effect::ApplicationEmail => Some("UPDATE applications SET email_id = $1 WHERE id = $2"),
            Effect::ChargeLedger => None,
        }
    }

    /// The address a delivery of `envelope` goes to, as suppressions
    /// compare it ([`crate::domain::address_key`]); `None` for an effect
    /// that mails no one, or a payload without an address (it is
    /// dead-lettered when rendered).
    pub fn recipient(self, envelope: &Envelope) -> Option<String> {
        match self {
            Effect::ApplicationEmail => envelope
                .payload
                .get("email")
                .and_then(|e| e.as_str())
                .map(crate::domain::address_key),
            Effect::ChargeLedger => None,
        }
    }
}

/// The longest a row is ever put off (a retry, a deferral), whatever the
/// caller asked: the bound every backend's time arithmetic stays within.
pub const LONGEST_DELAY: Duration = Duration::from_secs(30 * 24 * 3600);

/// `after`, bounded by [`LONGEST_DELAY`].
pub(crate) fn bounded_delay(after: Duration) -> Duration {
    after.min(LONGEST_DELAY)
}

/// What [`Store::form_batch`] made of one envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Now a member of the new batch.
    Member,
    /// Already settled, or in the consumer's inbox.
    Duplicate,
    /// A copy published before the row's attempt count moved on.
    Stale,
    /// The row no longer exists.
    Gone,
    /// Already a member of an unsettled batch (a redelivered copy).
    Batched,
    /// To an address that is suppressed: settled at once, never sent.
    Suppressed,
}

/// An outbox row's state, as far as admitting a copy of it goes.
#[derive(Debug, Clone, Copy)]
pub struct RowState {
    pub settled: bool,
    pub in_inbox: bool,
    pub batched: bool,
    pub attempts: i32,
    /// Its recipient's address is suppressed.
    pub suppressed: bool,
}

/// The one rule, on both backends, for a copy read from the broker: is it
/// still to be delivered (`Member`), or already taken care of?
pub fn admit(row: Option<RowState>, copy_attempts: i32) -> Admission {
    match row {
        None => Admission::Gone,
        Some(r) if r.settled || r.in_inbox => Admission::Duplicate,
        Some(r) if r.batched => Admission::Batched,
        Some(r) if r.attempts != copy_attempts => Admission::Stale,
        Some(r) if r.suppressed => Admission::Suppressed,
        Some(_) => Admission::Member,
    }
}

impl Admission {
    /// What a single delivery ([`DeliveryStore::deliver_event`]) answers
    /// for a copy not to be delivered; `None` when it is to be delivered.
    pub fn refusal(self) -> Option<DeliveryResult> {
        match self {
            Admission::Member => None,
            // A batch member is settled by its batch; a suppressed copy
            // was settled when it was admitted.
            Admission::Duplicate | Admission::Batched | Admission::Suppressed => {
                Some(DeliveryResult::Duplicate)
            }
            Admission::Stale => Some(DeliveryResult::Stale),
            Admission::Gone => Some(DeliveryResult::Gone),
        }
    }
}

/// A batch, ready to send: its id is the request's idempotency key; its
/// members are in the order they were admitted (event id order).
#[derive(Debug, Clone)]
pub struct BatchToSend {
    pub id: Uuid,
    /// Sends already spent on this batch.
    pub attempts: i32,
    pub members: Vec<Envelope>,
}

/// What became of one member of a sent batch.
#[derive(Debug, Clone, PartialEq)]
pub enum MemberOutcome {
    /// Accepted by the provider (under its id for it, when it named one):
    /// record it in the inbox and settle.
    Done { provider_id: Option<String> },
    /// Refused for good: dead-letter this member alone.
    Dead { error: String },
}

/// A sender's verdict on one send of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchDecision {
    /// The provider answered for each member, in order.
    Answered(Vec<MemberOutcome>),
    /// Transient failure: spend an attempt, send the same batch after `after`.
    Retry { after: Duration, error: String },
    /// No retry budget: send it after `after`, spending no attempt.
    Defer { after: Duration },
    /// Permanent failure, or out of attempts: dead-letter every member.
    Dead { error: String },
}

/// What [`Store::send_due_batch`] recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchResult {
    pub id: Uuid,
    /// 1-based.
    pub attempt: i32,
    pub members: usize,
    pub decision: BatchDecision,
}

/// The per-member outcomes a batch decision records, in member order:
/// the provider's answers, or every member dead; none for a retry or a
/// deferral (the batch stays as it is). The same on both backends.
pub fn batch_outcomes(decision: &BatchDecision, members: usize) -> Vec<MemberOutcome> {
    match decision {
        BatchDecision::Answered(answers) => (0..members)
            .map(|i| {
                answers.get(i).cloned().unwrap_or(MemberOutcome::Dead {
                    error: "the provider's answer did not cover this email".into(),
                })
            })
            .collect(),
        BatchDecision::Dead { error } => vec![
            MemberOutcome::Dead {
                error: error.clone()
            };
            members
        ],
        BatchDecision::Retry { .. } | BatchDecision::Defer { .. } => Vec::new(),
    }
}

/// The provider's ids of the members a batch decision records as sent.
pub(crate) fn provider_ids(outcomes: &[MemberOutcome]) -> Vec<&str> {
    outcomes
        .iter()
        .filter_map(|o| match o {
            MemberOutcome::Done {
                provider_id: Some(id),
            } => Some(id.as_str()),
            _ => None,
        })
        .collect()
}

/// What a settled batch writes for one member.
pub(crate) enum MemberRecord<'a> {
    Done(DoneEvent<'a>),
    Dead(DeadEvent<'a>),
}

/// The records of a batch's members, in order, from the outcomes
/// [`batch_outcomes`] gave; the same on both backends.
pub(crate) fn member_records<'a>(
    consumer: Consumer,
    members: &'a [Envelope],
    aggregates: &'a [Uuid],
    outcomes: &'a [MemberOutcome],
    attempt: i32,
    first_at: chrono::DateTime<chrono::Utc>,
) -> impl Iterator<Item = MemberRecord<'a>> {
    members
        .iter()
        .zip(aggregates)
        .zip(outcomes)
        .map(move |((member, aggregate_id), outcome)| match outcome {
            MemberOutcome::Done { provider_id } => MemberRecord::Done(DoneEvent {
                consumer,
                event_id: member.event_id,
                aggregate_id: *aggregate_id,
                attempt,
                settled: Settled::Delivered,
                provider_id: provider_id.as_deref(),
            }),
            MemberOutcome::Dead { error } => MemberRecord::Dead(DeadEvent {
                consumer,
                event_id: member.event_id,
                topic: &member.topic,
                aggregate_id: *aggregate_id,
                attempt,
                error,
                first_at,
            }),
        })
}

/// One event to record as done (its inbox row, its effect, the row
/// settled), as both backends record it.
pub(crate) struct DoneEvent<'a> {
    pub(crate) consumer: Consumer,
    pub(crate) event_id: Uuid,
    pub(crate) aggregate_id: Uuid,
    /// The attempt that succeeded (1-based).
    pub(crate) attempt: i32,
    /// [`Settled::Delivered`], or [`Settled::Suppressed`] for a copy to a
    /// suppressed address (no ledger entry, no provider id).
    pub(crate) settled: Settled,
    /// The provider's id of what it delivered.
    pub(crate) provider_id: Option<&'a str>,
}

impl DoneEvent<'static> {
    /// A single delivery's record (no provider id).
    pub(crate) fn delivered(
        consumer: Consumer,
        event_id: Uuid,
        aggregate_id: Uuid,
        attempt: i32,
    ) -> Self {
        DoneEvent {
            consumer,
            event_id,
            aggregate_id,
            attempt,
            settled: Settled::Delivered,
            provider_id: None,
        }
    }
}

/// The record of a copy admitted as [`Admission::Suppressed`].
pub(crate) fn suppressed_record(
    consumer: Consumer,
    event_id: Uuid,
    aggregate_id: Uuid,
) -> DoneEvent<'static> {
    DoneEvent {
        consumer,
        event_id,
        aggregate_id,
        attempt: 0,
        settled: Settled::Suppressed,
        provider_id: None,
    }
}

/// One event to dead-letter, as both backends record it.
pub(crate) struct DeadEvent<'a> {
    pub(crate) consumer: Consumer,
    pub(crate) event_id: Uuid,
    pub(crate) topic: &'a str,
    pub(crate) aggregate_id: Uuid,
    /// The attempt that failed (1-based).
    pub(crate) attempt: i32,
    pub(crate) error: &'a str,
    pub(crate) first_at: chrono::DateTime<chrono::Utc>,
}

/// Sends one batch and says what to record.
pub type BatchSendFn<'a> =
    &'a (dyn Fn(BatchToSend) -> futures::future::BoxFuture<'static, BatchDecision> + Send + Sync);

/// Performs a delivery attempt, given the attempts already spent, and says
/// what to record.
pub type DeliverFn<'a> =
    &'a (dyn Fn(i32) -> futures::future::BoxFuture<'static, DeliveryDecision> + Send + Sync);

/// A consumer's verdict on one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryDecision {
    /// The effect happened: record it in the inbox and settle.
    Done,
    /// Transient failure: spend an attempt and try again after `after`.
    Retry { after: Duration, error: String },
    /// No retry budget: try again after `after` without spending an attempt.
    Defer { after: Duration },
    /// Permanent failure, or out of attempts: dead-letter it.
    Dead { error: String },
}

/// How a delivered envelope was handled.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryResult {
    /// `deliver` ran; its decision is recorded. `attempt` is 1-based.
    Attempted {
        attempt: i32,
        decision: DeliveryDecision,
    },
    /// Already settled or in this consumer's inbox: nothing to do.
    Duplicate,
    /// A copy published before the row's attempt count moved on.
    Stale,
    /// The row no longer exists (settled and removed by the janitor).
    Gone,
    /// Another worker held the row past the lock timeout; it settles it, or
    /// the relay republishes it when it comes due.
    Busy,
}

/// What consumers record: deliveries, batches, their outcomes.
#[async_trait]
pub trait DeliveryStore: Send + Sync {
    /// Makes the still-deliverable ones among `envelopes` (copies read by
    /// `consumer`) the members of a new batch `batch_id`, due now, in one
    /// transaction; says what became of each envelope, in order. A member
    /// belongs to that batch until it settles: every send of the batch
    /// carries the same members under the same key.
    async fn form_batch(
        &self,
        consumer: Consumer,
        batch_id: Uuid,
        envelopes: &[Envelope],
    ) -> Result<Vec<Admission>, StoreError>;

    /// Claims the oldest due, unsettled batch of `consumer` (Postgres: row
    /// lock held through the send, skipping batches another sender holds;
    /// SQLite: a lease), hands it to `send`, and records the decision in one
    /// transaction: per member an inbox row + effect + settle, or a dead
    /// letter; or the whole batch retried, deferred, or dead-lettered.
    /// `None` when no batch is due.
    async fn send_due_batch(
        &self,
        consumer: Consumer,
        send: BatchSendFn<'_>,
    ) -> Result<Option<BatchResult>, StoreError>;

    /// A consumer's step for one delivered envelope: locks its outbox row
    /// (Postgres: `FOR UPDATE`; SQLite: a lease, so no transaction stays open
    /// during the send),
    /// drops it if already settled, recorded in `consumer`'s inbox or stale
    /// (its attempt count moved on), otherwise runs `deliver` and records
    /// the decision in the same transaction: inbox row + local effect +
    /// settle, a scheduled retry, a deferral, or a dead letter.
    async fn deliver_event(
        &self,
        consumer: Consumer,
        envelope: &Envelope,
        deliver: DeliverFn<'_>,
    ) -> Result<DeliveryResult, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_effect_names_itself_and_its_statuses() {
        for effect in [Effect::ApplicationEmail, Effect::ChargeLedger] {
            assert_eq!(Effect::parse(effect.as_str()), Some(effect));
            assert_eq!(effect.status(Settled::Dead), "dead");
            assert_eq!(effect.status(Settled::Replayed), "pending");
        }
        assert_eq!(Effect::parse("application.submitted"), None);
        assert_eq!(Effect::ApplicationEmail.status(Settled::Delivered), "sent");
        assert_eq!(Effect::ChargeLedger.status(Settled::Delivered), "applied");
        assert!(Effect::ChargeLedger.writes_ledger_entry());
        assert!(!Effect::ApplicationEmail.writes_ledger_entry());
        assert!(Effect::ChargeLedger.status_update().contains("charges"));
        assert!(Effect::ApplicationEmail
            .status_update()
            .contains("applications"));
    }

    #[test]
    fn a_batch_decision_gives_each_member_its_own_outcome() {
        let dead = |e: &str| MemberOutcome::Dead { error: e.into() };
        let done = MemberOutcome::Done { provider_id: None };
        let answered = BatchDecision::Answered(vec![done.clone(), dead("refused")]);
        assert_eq!(
            batch_outcomes(&answered, 3),
            [
                done,
                dead("refused"),
                dead("the provider's answer did not cover this email")
            ]
        );
        let all_dead = BatchDecision::Dead {
            error: "403".into(),
        };
        assert_eq!(batch_outcomes(&all_dead, 2), [dead("403"), dead("403")]);
        let retry = BatchDecision::Retry {
            after: Duration::from_secs(1),
            error: "503".into(),
        };
        assert!(
            batch_outcomes(&retry, 2).is_empty(),
            "a retry keeps the batch"
        );
    }

    #[test]
    fn a_copy_is_admitted_only_while_its_row_waits_for_it() {
        let row = |settled, in_inbox, batched, attempts| {
            Some(RowState {
                settled,
                in_inbox,
                batched,
                attempts,
                suppressed: false,
            })
        };
        assert_eq!(admit(row(false, false, false, 0), 0), Admission::Member);
        assert_eq!(admit(None, 0), Admission::Gone);
        assert_eq!(admit(row(true, false, false, 0), 0), Admission::Duplicate);
        assert_eq!(admit(row(false, true, false, 0), 0), Admission::Duplicate);
        assert_eq!(admit(row(false, false, true, 0), 0), Admission::Batched);
        assert_eq!(admit(row(false, false, false, 2), 1), Admission::Stale);
        let suppressed = row(false, false, false, 0).map(|r| RowState {
            suppressed: true,
            ..r
        });
        assert_eq!(admit(suppressed, 0), Admission::Suppressed);
        let settled_and_suppressed = row(true, false, false, 0).map(|r| RowState {
            suppressed: true,
            ..r
        });
        assert_eq!(
            admit(settled_and_suppressed, 0),
            Admission::Duplicate,
            "a settled copy stays settled"
        );
        // What a single delivery answers for each.
        assert_eq!(Admission::Member.refusal(), None);
        assert_eq!(
            Admission::Duplicate.refusal(),
            Some(DeliveryResult::Duplicate)
        );
        assert_eq!(
            Admission::Batched.refusal(),
            Some(DeliveryResult::Duplicate)
        );
        assert_eq!(Admission::Stale.refusal(), Some(DeliveryResult::Stale));
        assert_eq!(Admission::Gone.refusal(), Some(DeliveryResult::Gone));
    }
}
