//! The outbox as the relay sees it: due rows claimed per topic, published,
//! and marked with what the broker took.

use std::time::Duration;

use async_trait::async_trait;

use super::*;
use crate::broker::{BrokerError, Envelope};

/// Unpublished outbox rows, for `/admin/status` and the lag gauges.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct OutboxStats {
    pub pending: i64,
    /// Age of the oldest unpublished row, 0 when none.
    pub lag_seconds: f64,
    /// Applications whose confirmation is recorded as sent: the durable
    /// count of emails, the same from every process and across restarts.
    pub emails_delivered: i64,
    /// Rows in the ledger (one per applied charge).
    pub ledger_entries: i64,
}

/// A due outbox row, as the relay sees it.
#[derive(Debug, Clone)]
pub struct DueEvent {
    pub envelope: Envelope,
    /// The broker's id of the copy last published, while one is believed
    /// held; `None` when the row must be published (new, or rescheduled by a
    /// retry, a deferral or a dead-letter replay).
    pub stream_id: Option<String>,
    /// Published at least once before.
    pub published_before: bool,
}

/// What the relay did with one [`DueEvent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relayed {
    /// Published: the broker's id of the new copy.
    Published(String),
    /// The broker still holds the last copy: nothing published.
    StillHeld,
}

/// The relay's work on a claimed set of due rows, one answer per row in
/// order; `Err` leaves every row as it was.
pub type RelayFn<'a> = &'a (dyn Fn(Vec<DueEvent>) -> futures::future::BoxFuture<'static, Result<Vec<Relayed>, BrokerError>>
         + Send
         + Sync);

/// What one relay step did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RelayStep {
    /// Rows claimed.
    pub claimed: usize,
    /// Of those, rows published.
    pub published: usize,
}

/// The outbox rows the relay publishes.
#[async_trait]
pub trait RelayStore: Send + Sync {
    async fn outbox_stats(&self) -> Result<OutboxStats, StoreError>;

    /// Pokes `wake` whenever another process commits an outbox event, for
    /// as long as it runs (Postgres: `LISTEN herald_outbox`, reconnecting on
    /// loss). A backend without such news (SQLite: one process, which wakes
    /// its relay itself) never returns.
    async fn watch_commits(&self, wake: std::sync::Arc<tokio::sync::Notify>) {
        let _ = wake;
        std::future::pending::<()>().await
    }

    /// The OutboxRelay's step for one topic (each topic is its own lane):
    /// claims up to `limit` due, unsettled rows of `topic` that no batch
    /// owns (Postgres: `FOR UPDATE SKIP LOCKED`, so several relays never
    /// claim the same row; SQLite: one write transaction that skips rows a
    /// consumer holds a lease on), hands them to `relay`, and records what
    /// it did: a row published (again) keeps the new copy's broker id; a
    /// row whose copy the broker still holds is only looked at again after
    /// `check_after`. Rows of a `fan_out` topic settle on publish. A failure
    /// (or a crash before the commit) leaves the rows as they were.
    async fn relay_due_events(
        &self,
        topic: &str,
        limit: i64,
        check_after: Duration,
        fan_out: bool,
        relay: RelayFn<'_>,
    ) -> Result<RelayStep, StoreError>;
}
