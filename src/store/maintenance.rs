//! Maintenance in the store: the auditor's invariant checks and the
//! janitor's deletes.

use std::time::Duration;

use async_trait::async_trait;

use super::*;

/// The effectively-once invariants the auditor checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invariant {
    /// Every application has at most one sent email (one inbox row).
    OneEmailPerApplication,
    /// Every charge has at most one ledger entry.
    OneLedgerEntryPerCharge,
    /// No event is settled without its effect (an inbox row) or its dead letter.
    NoSettledEventWithoutEffect,
    /// No event stays unsettled past `audit.max_unsettled_age_secs`.
    NoEventUnsettledTooLong,
}

impl Invariant {
    pub const ALL: [Invariant; 4] = [
        Invariant::OneEmailPerApplication,
        Invariant::OneLedgerEntryPerCharge,
        Invariant::NoSettledEventWithoutEffect,
        Invariant::NoEventUnsettledTooLong,
    ];

    /// Its `invariant` label in `herald_audit_violations`.
    pub fn name(self) -> &'static str {
        match self {
            Invariant::OneEmailPerApplication => "one_email_per_application",
            Invariant::OneLedgerEntryPerCharge => "one_ledger_entry_per_charge",
            Invariant::NoSettledEventWithoutEffect => "no_settled_event_without_effect",
            Invariant::NoEventUnsettledTooLong => "no_event_unsettled_too_long",
        }
    }

    /// The instant the check's horizon parameter stands for, if any.
    pub fn horizon(self, max_unsettled_age: Duration, retention: Duration) -> Option<Duration> {
        match self {
            Invariant::NoSettledEventWithoutEffect => Some(retention),
            Invariant::NoEventUnsettledTooLong => Some(max_unsettled_age),
            _ => None,
        }
    }

    /// Whom the check runs for: once per consumer it names (the consumer's
    /// counts are summed), or once for the whole database (`[None]`). The
    /// consumers come from the caller; the store knows no consumer's topic.
    pub fn scopes(self, consumers: &[Consumer]) -> Vec<Option<Consumer>> {
        match self {
            Invariant::OneEmailPerApplication => consumers
                .iter()
                .filter(|c| c.effect == Effect::ApplicationEmail)
                .map(|c| Some(*c))
                .collect(),
            Invariant::NoSettledEventWithoutEffect => consumers.iter().map(|c| Some(*c)).collect(),
            Invariant::OneLedgerEntryPerCharge | Invariant::NoEventUnsettledTooLong => vec![None],
        }
    }

    /// The check, a count of offending rows: one SQL text for both backends
    /// (sqlx binds SQLite's `$n` by its number). A check scoped to a
    /// consumer ([`Self::scopes`]) takes its name as `$1` and its topic as
    /// `$2`; the horizon ([`Self::horizon`], now minus it) comes after them.
    pub fn query(self) -> &'static str {
        match self {
            Invariant::OneEmailPerApplication => {
                "SELECT count(*) FROM (
                     SELECT o.aggregate_id FROM inbox i
                       JOIN outbox_events o ON o.event_id = i.event_id
                      WHERE i.consumer = $1 AND o.topic = $2
                      GROUP BY o.aggregate_id HAVING count(*) > 1) AS twice"
            }
            Invariant::OneLedgerEntryPerCharge => {
                "SELECT count(*) FROM (
                     SELECT charge_id FROM ledger_entries
                      GROUP BY charge_id HAVING count(*) > 1) AS twice"
            }
            // The consumer's settled events with neither its inbox row nor
            // a dead letter, settled since the horizon.
            Invariant::NoSettledEventWithoutEffect => {
                "SELECT count(*) FROM outbox_events o
                  WHERE o.settled_at > $3 AND o.topic = $2
                    AND NOT EXISTS (SELECT 1 FROM inbox i
                                     WHERE i.consumer = $1 AND i.event_id = o.event_id)
                    AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.event_id = o.event_id)"
            }
            Invariant::NoEventUnsettledTooLong => {
                "SELECT count(*) FROM outbox_events WHERE settled_at IS NULL AND created_at < $1"
            }
        }
    }
}

/// Tables the janitor empties by age alone, with the instant that ages each
/// row: settled batches (their members settled with them), and the
/// provider's reports past its redelivery window (it stops retrying a
/// message after about a day and a half). Written here once for both
/// backends' deletes.
pub(crate) const PURGED_BY_AGE: [(&str, &str); 2] = [
    ("send_batches", "settled_at"),
    ("provider_events", "received_at"),
];

/// What one janitor pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub keys: u64,
    pub outbox: u64,
    pub inbox: u64,
}

/// The auditor's checks and the janitor's deletes.
#[async_trait]
pub trait MaintenanceStore: Send + Sync {
    /// The auditor's checks of the effectively-once invariants, from the
    /// database alone: for each [`Invariant`], how many rows break it (0 is
    /// the only healthy value), over `consumers`. Events settled longer than `retention` ago
    /// are left out of the effect check (the janitor deletes their inbox
    /// rows); an event unsettled longer than `max_unsettled_age` is one.
    async fn audit(
        &self,
        consumers: &[Consumer],
        max_unsettled_age: Duration,
        retention: Duration,
    ) -> Result<Vec<(Invariant, i64)>, StoreError>;

    /// One janitor pass: deletes at most `batch` rows of each kind: expired
    /// idempotency keys, settled outbox rows and inbox rows older than
    /// `retention`. Each delete is its own short statement.
    async fn purge_expired(&self, batch: u32, retention: Duration) -> Result<Purged, StoreError>;
}
