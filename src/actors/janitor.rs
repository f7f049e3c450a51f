//! Janitor: keeps the tables that grow with traffic bounded.
//!
//! Deletes expired idempotency keys (never one in progress), settled outbox
//! rows and inbox rows older than `janitor.retention_secs` (an outbox row of
//! an open dead letter is kept: a replay needs it). Work comes in batches of
//! `janitor.batch` rows per statement, picked with `SKIP LOCKED`, so no
//! statement waits on or holds a lock for long; a sweep repeats batches
//! while they come back full, then rests `janitor.interval_ms`.
//!
//! Deleting a settled row is safe against late copies of its event: a
//! consumer that receives an event whose row is gone drops it (`Gone`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::periodic::{Every, Periodic};
use tracing::{debug, warn};

use crate::store::{MaintenanceStore, Purged};
use crate::telemetry::metrics as m;

#[derive(Clone)]
pub struct JanitorArgs {
    pub store: Arc<dyn MaintenanceStore>,
    pub interval: Duration,
    pub batch: u32,
    pub retention: Duration,
}

/// The janitor: a [`Sweep`] every `janitor.interval_ms`.
pub type Janitor = Every<Sweep>;

/// One sweep of the janitor.
pub struct Sweep {
    args: JanitorArgs,
}

#[async_trait]
impl Periodic for Sweep {
    type Args = JanitorArgs;
    const AT_START: bool = false;

    fn period(args: &JanitorArgs) -> Option<Duration> {
        Some(args.interval)
    }

    fn start(args: JanitorArgs) -> Self {
        Sweep { args }
    }

    async fn run(&mut self) {
        let args = &self.args;
        let mut total = Purged::default();
        // Bounded: at most 100 batches per sweep; the rest waits for the next.
        for _ in 0..100 {
            match args.store.purge_expired(args.batch, args.retention).await {
                Ok(purged) => {
                    total.keys += purged.keys;
                    total.outbox += purged.outbox;
                    total.inbox += purged.inbox;
                    let full = u64::from(args.batch);
                    if purged.keys < full && purged.outbox < full && purged.inbox < full {
                        break;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "janitor sweep failed; next sweep retries");
                    break;
                }
            }
        }
        m::janitor_deleted("idempotency_keys", total.keys);
        m::janitor_deleted("outbox_events", total.outbox);
        m::janitor_deleted("inbox", total.inbox);
        debug!(?total, "janitor sweep");
    }
}
