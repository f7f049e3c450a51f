//! OutboxRelay: moves committed outbox rows to the broker.
//!
//! One step ([`Store::relay_due_events`]) claims a batch of due rows with
//! `FOR UPDATE SKIP LOCKED` (several daemons never claim the same row),
//! publishes them, and marks them published in the same transaction, after
//! the broker accepted them. A crash between publish and mark rolls the
//! claim back and the rows are published again: at-least-once, absorbed by
//! the consumers' inbox. A published row comes due again after
//! `relay.redeliver_after_secs` unless a consumer settles it first, which is
//! what recovers events Redis lost.
//!
//! The relay wakes when this process's request handlers commit an event (an
//! in-process signal), on Postgres `LISTEN herald_outbox` (a trigger
//! notifies for `job.posted`, whichever process posted it), and every
//! `relay.poll_interval_ms`. The trigger deliberately skips the high-volume
//! topics: a NOTIFY takes a database-wide lock at commit, and one per
//! application halved the intake rate (`herald bench intake`: pgbench with the
//! same SQL went from ~5,000 to ~2,300 tx/s). Publishing is paced
//! to `relay.max_publish_per_sec`, so a large backlog (a broker outage)
//! drains at that rate instead of flooding the consumers. While the broker
//! or the database fails, the relay backs off (full jitter, up to 5 s) and
//! the outbox simply grows; `herald_outbox_pending` and
//! `herald_outbox_lag_seconds` show it.
//!
//! The loop runs on a task owned by the actor; if it ever ends, the actor
//! fails and the supervisor restarts it.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::spawn_loop;
use crate::broker::{Broker, Envelope};
use crate::domain::topics;
use crate::retry::reconnect_pause;
use crate::store::Store;
use crate::telemetry::metrics as m;

/// Topics the relay publishes, and which of them settle on publish
/// (fan-out: nobody records them in an inbox).
const RELAYED_TOPICS: [&str; 3] = [
    topics::APPLICATION_SUBMITTED,
    topics::CHARGE_CREATED,
    topics::JOB_POSTED,
];
const FAN_OUT_TOPICS: [&str; 1] = [topics::JOB_POSTED];

#[derive(Clone)]
pub struct OutboxRelayArgs {
    pub store: Arc<dyn Store>,
    /// Redis Streams, or the in-process broker of the embedded mode.
    pub publisher: Arc<dyn Broker>,
    /// `postgres://…` URL for `LISTEN`; `None` (SQLite) relies on the
    /// in-process wake-up and the poll.
    pub listen_url: Option<String>,
    /// Poked by this process's request handlers after a commit with an event.
    pub wake: Arc<Notify>,
    pub max_publish_per_sec: u32,
    pub redeliver_after: Duration,
    pub poll_interval: Duration,
}

pub enum OutboxRelayMsg {
    /// The relay loop ended (it never should): fail, so the supervisor restarts us.
    LoopEnded(String),
}

pub struct OutboxRelay;

pub struct OutboxRelayState {
    /// The relay loop and the listener feeding it.
    tasks: Vec<JoinHandle<()>>,
}

impl Actor for OutboxRelay {
    type Msg = OutboxRelayMsg;
    type State = OutboxRelayState;
    type Arguments = OutboxRelayArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: OutboxRelayArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let wake = args.wake.clone();
        let mut tasks = Vec::new();
        if let Some(url) = args.listen_url.clone() {
            tasks.push(tokio::spawn(listen(url, wake.clone())));
        }
        let relay = spawn_loop(
            myself,
            "relay loop",
            async move {
                relay_loop(args, wake).await;
                Ok::<(), std::convert::Infallible>(())
            },
            OutboxRelayMsg::LoopEnded,
        );
        tasks.push(relay);
        Ok(OutboxRelayState { tasks })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        for task in &state.tasks {
            task.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let OutboxRelayMsg::LoopEnded(reason) = message;
        Err(reason.into())
    }
}

/// Forwards `NOTIFY herald_outbox` to the relay loop; reconnects on loss.
async fn listen(url: String, wake: Arc<Notify>) {
    loop {
        match sqlx::postgres::PgListener::connect(&url).await {
            Ok(mut listener) => {
                if let Err(e) = listener.listen("herald_outbox").await {
                    warn!(error = %e, "outbox LISTEN failed; polling only until it works");
                } else {
                    // recv reconnects by itself; an error here is worth a pause.
                    while listener.recv().await.is_ok() {
                        wake.notify_one();
                    }
                }
            }
            Err(e) => debug!(error = %e, "outbox listener cannot connect yet"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The relay: step, pace, back off, sleep until woken.
async fn relay_loop(args: OutboxRelayArgs, wake: Arc<Notify>) {
    let rate = f64::from(args.max_publish_per_sec.max(1));
    // A tenth of a second's worth per batch, so pacing stays smooth.
    let batch = (rate / 10.0).ceil().clamp(1.0, 500.0) as i64;
    let per_event = Duration::from_secs_f64(1.0 / rate);
    let mut next_slot = Instant::now();
    let mut failures: u32 = 0;
    loop {
        tokio::time::sleep_until(next_slot).await;
        // Failpoint (`outbox-relay-step=panic`): a crash inside an actor, for
        // the supervision tests.
        fail::fail_point!("outbox-relay-step");
        let publisher = args.publisher.clone();
        let publish = move |envelopes: Vec<Envelope>| {
            let publisher = publisher.clone();
            async move { publisher.publish(&envelopes).await }.boxed()
        };
        let step = args
            .store
            .relay_due_events(
                batch,
                args.redeliver_after,
                &RELAYED_TOPICS,
                &FAN_OUT_TOPICS,
                &publish,
            )
            .await;
        match step {
            Ok(step) if step.published > 0 => {
                failures = 0;
                m::relay_published(step.published);
                next_slot =
                    next_slot.max(Instant::now() - per_event) + per_event * step.published as u32;
                if (step.published as i64) < batch {
                    // Caught up: wait for news.
                    wait_for_news(&wake, args.poll_interval).await;
                }
            }
            Ok(_) => {
                failures = 0;
                wait_for_news(&wake, args.poll_interval).await;
                next_slot = Instant::now();
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                m::relay_failure();
                let pause = reconnect_pause(failures);
                warn!(error = %e, failures, ?pause, "outbox relay step failed; rows stay due");
                tokio::time::sleep(pause).await;
                next_slot = Instant::now();
            }
        }
    }
}

async fn wait_for_news(wake: &Notify, poll_interval: Duration) {
    let _ = tokio::time::timeout(poll_interval, wake.notified()).await;
}
