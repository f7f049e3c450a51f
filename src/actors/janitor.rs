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

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::{debug, warn};

use crate::store::{Purged, Store};
use crate::telemetry::metrics as m;

#[derive(Clone)]
pub struct JanitorArgs {
    pub store: Arc<dyn Store>,
    pub interval: Duration,
    pub batch: u32,
    pub retention: Duration,
}

pub enum JanitorMsg {
    Sweep,
}

pub struct Janitor;

pub struct JanitorState {
    args: JanitorArgs,
    /// The schedule, stopped with the actor.
    _ticker: super::Ticker,
}

impl Actor for Janitor {
    type Msg = JanitorMsg;
    type State = JanitorState;
    type Arguments = JanitorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: JanitorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let ticker = super::Ticker::every(&myself, args.interval, || JanitorMsg::Sweep);
        Ok(JanitorState {
            args,
            _ticker: ticker,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let JanitorMsg::Sweep = message;
        let args = &state.args;
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
        Ok(())
    }
}
