//! OutboxRelay: moves committed outbox rows to the broker.
//!
//! One step ([`Store::relay_due_events`]) claims a batch of due rows of one
//! topic with `FOR UPDATE SKIP LOCKED` (several daemons never claim the same
//! row), publishes them, and marks them published in the same transaction,
//! after the broker accepted them, keeping each copy's stream entry id. A
//! crash between publish and mark rolls the claim back and the rows are
//! published again: at-least-once, absorbed by the consumers' inbox.
//!
//! An event is published once. A published row that is still unsettled
//! `relay.redeliver_after_secs` later is *checked*, not republished: the
//! relay asks the broker whether it still holds that entry for the
//! consumer's group ([`Broker::holds`]). Only an entry the broker lost
//! (FLUSHALL, a restart without persistence, a failover, trimming) or one
//! pending on a dead reader that nobody reclaimed is published again
//! (`herald_relay_republished_total{reason="lost"|"unclaimed"}`); an event
//! waiting its turn in a healthy queue — an email backlog behind the
//! provider's rate — is left where it is. A consumer's retry or deferral
//! reschedules its row, which is then published when due
//! (`reason="rescheduled"`).
//!
//! Each topic is its own lane: every round claims up to a batch from each,
//! so a backlog of one topic (application emails) never delays another
//! (a job's events, `charge.created`).
//!
//! The relay wakes when this process's request handlers commit an event (an
//! in-process signal), on Postgres `LISTEN herald_outbox` (a trigger
//! notifies for a job's events, whichever process wrote them), and every
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
use tokio::time::Instant;

use crate::rate::TokenBucket;
use tracing::warn;

use super::ActorTasks;
use crate::broker::{Broker, BrokerError, Holding};
use crate::domain::topics;
use crate::retry::reconnect_pause;
use crate::store::{DueEvent, RelayStore, Relayed};
use crate::telemetry::metrics as m;

/// One topic the relay publishes, and the consumer group that settles its
/// events (`None`: a fan-out topic, settled on publish; nobody records it in
/// an inbox).
struct Lane {
    topic: &'static str,
    group: Option<&'static str>,
}

/// The relay's lanes, served round-robin. A job's events go to one broker
/// stream ([`topics::stream`]) in this order within a round (posted, then
/// updated, then closed), the order they happen in; the stream's readers
/// still order a job's events by its `version`, since two relays or a
/// backlog longer than a round can interleave them.
const LANES: [Lane; 5] = [
    Lane {
        topic: topics::JOB_POSTED,
        group: None,
    },
    Lane {
        topic: topics::JOB_UPDATED,
        group: None,
    },
    Lane {
        topic: topics::JOB_CLOSED,
        group: None,
    },
    Lane {
        topic: topics::CHARGE_CREATED,
        group: Some(super::ledger::CONSUMER),
    },
    Lane {
        topic: topics::APPLICATION_SUBMITTED,
        group: Some(super::email_sender::CONSUMER),
    },
];

#[derive(Clone)]
pub struct OutboxRelayArgs {
    pub store: Arc<dyn RelayStore>,
    /// Redis Streams, or the in-process broker of the embedded mode.
    pub publisher: Arc<dyn Broker>,
    /// Poked by this process's request handlers after a commit with an event.
    pub wake: Arc<Notify>,
    pub max_publish_per_sec: u32,
    /// How long after a publish an unsettled event is checked against the broker.
    pub redeliver_after: Duration,
    /// A copy pending this long on a reader that never finished it (nor did
    /// anyone reclaim it) is published again.
    pub unclaimed_after: Duration,
    pub poll_interval: Duration,
}

pub enum OutboxRelayMsg {
    /// The relay loop ended (it never should): fail, so the supervisor restarts us.
    LoopEnded(String),
}

pub struct OutboxRelay;

pub struct OutboxRelayState {
    /// The relay loop and the listener feeding it.
    tasks: ActorTasks,
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
        let mut tasks = ActorTasks::new();
        // Other processes' commits (Postgres NOTIFY) wake the loop too.
        let (store, news) = (args.store.clone(), wake.clone());
        tasks.run(
            myself.clone(),
            "outbox listener",
            async move {
                store.watch_commits(news).await;
                Ok::<(), std::convert::Infallible>(())
            },
            OutboxRelayMsg::LoopEnded,
        );
        tasks.run(
            myself,
            "relay loop",
            async move {
                relay_loop(args, wake).await;
                Ok::<(), std::convert::Infallible>(())
            },
            OutboxRelayMsg::LoopEnded,
        );
        Ok(OutboxRelayState { tasks })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.tasks.finish().await;
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

/// The relay: a round over every lane, pace, back off, sleep until woken.
async fn relay_loop(args: OutboxRelayArgs, wake: Arc<Notify>) {
    let rate = f64::from(args.max_publish_per_sec.max(1));
    // A tenth of a second's worth per lane and round, so pacing stays smooth.
    let batch = (rate / 10.0).ceil().clamp(1.0, 500.0) as i64;
    // Each published event takes a token; the next round waits until the
    // bucket is out of debt, so publishes average `rate` a second.
    let mut pacing = TokenBucket::new(rate, 1.0, Instant::now());
    let mut failures: u32 = 0;
    loop {
        tokio::time::sleep(pacing.available_in(0.0, Instant::now())).await;
        // Failpoint (`outbox-relay-step=panic`): a crash inside an actor, for
        // the supervision tests.
        fail::fail_point!("outbox-relay-step");
        let mut round = Ok((0usize, false));
        for lane in &LANES {
            match relay_lane(&args, lane, batch).await {
                Ok(step) => {
                    if let Ok((published, full)) = &mut round {
                        *published += step.published;
                        *full |= step.claimed as i64 >= batch;
                    }
                }
                Err(e) => round = Err(e),
            }
        }
        match round {
            Ok((published, full)) => {
                failures = 0;
                pacing.take(published as f64, Instant::now());
                if !full {
                    // Caught up in every lane: wait for news.
                    wait_for_news(&wake, args.poll_interval).await;
                }
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                m::relay_failure();
                let pause = reconnect_pause(failures);
                warn!(error = %e, failures, ?pause, "outbox relay step failed; rows stay due");
                tokio::time::sleep(pause).await;
                pacing = TokenBucket::new(rate, 1.0, Instant::now());
            }
        }
    }
}

/// One lane's step: publish what is new or rescheduled, check what was
/// published before, republish only what the broker lost.
async fn relay_lane(
    args: &OutboxRelayArgs,
    lane: &'static Lane,
    batch: i64,
) -> Result<crate::store::RelayStep, crate::store::StoreError> {
    let broker = args.publisher.clone();
    let unclaimed_after = args.unclaimed_after;
    let relay = move |due: Vec<DueEvent>| {
        let broker = broker.clone();
        async move { relay_due(&*broker, lane, due, unclaimed_after).await }.boxed()
    };
    args.store
        .relay_due_events(
            lane.topic,
            batch,
            args.redeliver_after,
            lane.group.is_none(),
            &relay,
        )
        .await
}

/// Decides, publishes, and answers for each due row in order.
async fn relay_due(
    broker: &dyn Broker,
    lane: &Lane,
    due: Vec<DueEvent>,
    unclaimed_after: Duration,
) -> Result<Vec<Relayed>, BrokerError> {
    // What the broker says of the copies published before.
    let checked: Vec<(usize, String)> = due
        .iter()
        .enumerate()
        .filter_map(|(i, d)| Some((i, d.stream_id.clone()?)))
        .collect();
    let mut holding = vec![None; due.len()];
    if let (Some(group), false) = (lane.group, checked.is_empty()) {
        let receipts: Vec<String> = checked.iter().map(|(_, r)| r.clone()).collect();
        let held = broker
            .holds(lane.topic, group, &receipts, unclaimed_after)
            .await?;
        for ((i, _), h) in checked.iter().zip(held) {
            holding[*i] = Some(h);
        }
    }
    let mut to_publish = Vec::new();
    let mut reasons: [usize; 3] = [0; 3];
    for (d, h) in due.iter().zip(&holding) {
        match (h, d.published_before) {
            (Some(Holding::Held), _) => continue,
            (Some(Holding::Lost), _) => reasons[0] += 1,
            (Some(Holding::Unclaimed), _) => reasons[1] += 1,
            (None, true) => reasons[2] += 1,
            (None, false) => {}
        }
        to_publish.push(d.envelope.clone());
    }
    // With traces on, each event's publish is a span of the trace it was
    // committed in (they share the one broker call).
    let spans: Vec<tracing::Span> = if crate::telemetry::traces::on() {
        to_publish
            .iter()
            .map(|e| {
                let span = tracing::info_span!(
                    "outbox publish",
                    otel.kind = "producer",
                    messaging.destination.name = %e.topic,
                    messaging.message.id = %e.event_id,
                );
                crate::telemetry::traces::continue_from(&span, e.traceparent.as_deref());
                span
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut receipts = broker.publish(&to_publish).await?.into_iter();
    drop(spans);
    // Counted as the broker took them, whether or not the marking commits.
    m::relay_published(to_publish.len());
    for (reason, n) in ["lost", "unclaimed", "rescheduled"]
        .into_iter()
        .zip(reasons)
    {
        if n > 0 {
            m::relay_republished(reason, n);
        }
    }
    let mut relayed = Vec::with_capacity(due.len());
    for h in &holding {
        relayed.push(if *h == Some(Holding::Held) {
            Relayed::StillHeld
        } else {
            Relayed::Published(receipts.next().ok_or_else(|| {
                BrokerError::Unavailable("the broker answered fewer ids than entries".into())
            })?)
        });
    }
    Ok(relayed)
}

async fn wait_for_news(wake: &Notify, poll_interval: Duration) {
    let _ = tokio::time::timeout(poll_interval, wake.notified()).await;
}
