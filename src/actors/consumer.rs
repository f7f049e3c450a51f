//! The consuming side shared by every broker consumer (EmailSender,
//! LedgerConsumer): a reader task takes entries from one topic as this
//! process's member of the consumer's group (Redis Streams or in-process) and hands each to a worker;
//! at most `workers` run at once (a semaphore; the reader never reads more
//! than there are free workers). Every so often it also reclaims entries a
//! dead reader took and never acknowledged (`XAUTOCLAIM` on Redis).
//!
//! The workers are the reader's own [`JoinSet`]: when the actor stops, the
//! reader stops reading and waits for the deliveries in hand to be recorded
//! (the daemon's shutdown deadline bounds that); a worker that panics fails
//! the actor once the others are done, so the supervisor restarts and
//! reports it like any actor (its entry, unacknowledged, is reclaimed).
//!
//! What a worker does with an entry is the consumer's [`Handler`]; it
//! answers whether the entry may be acknowledged (its outcome is recorded in
//! the database). An entry left unacknowledged is reclaimed later and
//! deduped by the inbox.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use uuid::Uuid;

use super::ActorTasks;
use crate::broker::{Broker, BrokerError, Delivery};
use crate::retry::reconnect_pause;
use crate::store::{DeliveryDecision, DeliveryResult, StoreError};
use crate::telemetry::metrics as m;

/// One consumer's work on one entry.
pub trait Handler: Send + Sync + 'static {
    /// The consumer's name in inboxes, dead letters, metrics and the group.
    fn consumer(&self) -> &'static str;
    /// The topic it consumes.
    fn topic(&self) -> &'static str;
    /// Delivers one entry; `true` when it may be acknowledged.
    fn handle<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, bool>;
    /// Work the consumer runs beside its reader for as long as the actor
    /// lives (the EmailSender's batch loop); it should end only once
    /// `stopping` is cancelled, after finishing what it has in hand.
    fn background(self: Arc<Self>, stopping: CancellationToken) -> Option<BoxFuture<'static, ()>> {
        let _ = stopping;
        None
    }
}

/// Where and how widely a consumer reads.
#[derive(Clone)]
pub struct PoolArgs {
    /// Redis Streams, or the in-process broker of the embedded mode.
    pub broker: Arc<dyn Broker>,
    /// This process's name within the group (unique per process start).
    pub consumer_name: String,
    pub workers: usize,
    /// Idle time after which another process's unacknowledged entry is taken over.
    pub reclaim_after: Duration,
}

/// Reads and dispatches entries until `stopping` is cancelled, then waits
/// for the deliveries in hand. Fails when a worker panicked.
pub async fn consume<H: Handler>(
    pool: PoolArgs,
    handler: Arc<H>,
    stopping: CancellationToken,
) -> Result<(), BrokerError> {
    let mut in_hand: JoinSet<()> = JoinSet::new();
    let read = read_and_dispatch(pool, handler, &stopping, &mut in_hand).await;
    let mut panicked = None;
    while let Some(done) = in_hand.join_next().await {
        if let Err(e) = done {
            panicked = Some(e.to_string());
        }
    }
    match (read, panicked) {
        (Err(e), _) => Err(e),
        (Ok(()), Some(why)) => Err(BrokerError::Unavailable(format!("a worker failed: {why}"))),
        (Ok(()), None) => Ok(()),
    }
}

/// The reader: returns when `stopping` is cancelled or a worker panicked
/// (seen as its permit comes back).
async fn read_and_dispatch<H: Handler>(
    pool: PoolArgs,
    handler: Arc<H>,
    stopping: &CancellationToken,
    in_hand: &mut JoinSet<()>,
) -> Result<(), BrokerError> {
    let name = handler.consumer();
    let consumer = pool.broker.group(
        handler.topic(),
        name,
        &pool.consumer_name,
        Duration::from_millis(1000),
    )?;
    let workers = Arc::new(Semaphore::new(pool.workers.max(1)));
    let mut last_reclaim = tokio::time::Instant::now();
    let mut failures: u32 = 0;
    loop {
        // Finished workers leave the set; a panicked one ends the reader.
        while let Some(done) = in_hand.try_join_next() {
            if done.is_err() {
                return Ok(());
            }
        }
        // Wait for a free worker before reading, then read no more than
        // there are free workers.
        let first = tokio::select! {
            _ = stopping.cancelled() => return Ok(()),
            permit = workers.clone().acquire_owned() => permit
                .map_err(|_| BrokerError::Unavailable("worker pool closed".into()))?,
        };
        let free = 1 + workers.available_permits();
        let reading = async {
            if last_reclaim.elapsed() >= pool.reclaim_after / 2 {
                last_reclaim = tokio::time::Instant::now();
                match consumer.reclaim(pool.reclaim_after, free as u64).await {
                    Ok(reclaimed) if !reclaimed.is_empty() => Ok(reclaimed),
                    Ok(_) => consumer.read(free as u64).await,
                    Err(e) => Err(e),
                }
            } else {
                consumer.read(free as u64).await
            }
        };
        // A read cut off here leaves what it took pending: reclaimed later.
        let read = tokio::select! {
            _ = stopping.cancelled() => return Ok(()),
            read = reading => read,
        };
        let entries = match read {
            Ok(entries) => {
                failures = 0;
                entries
            }
            Err(e) => {
                drop(first);
                failures = failures.saturating_add(1);
                let pause = reconnect_pause(failures);
                warn!(consumer = name, error = %e, ?pause, "consumer cannot read the stream");
                tokio::time::sleep(pause).await;
                if let Err(e) = consumer.ensure_group().await {
                    warn!(consumer = name, error = %e, "consumer group not ready");
                }
                continue;
            }
        };
        let mut permit = Some(first);
        for entry in entries {
            let permit = match permit.take() {
                Some(p) => p,
                None => match workers.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return Ok(()),
                },
            };
            let delivery = match entry {
                Ok(delivery) => delivery,
                Err(BrokerError::Malformed { receipt, reason }) => {
                    // Its outbox row is the real record; the relay republishes it.
                    warn!(consumer = name, %receipt, %reason, "unreadable stream entry dropped");
                    let _ = consumer.ack(&[receipt]).await;
                    continue;
                }
                Err(e) => {
                    warn!(consumer = name, error = %e, "stream entry unusable");
                    continue;
                }
            };
            let (handler, consumer) = (handler.clone(), consumer.clone());
            in_hand.spawn(async move {
                // Failpoint (`consumer-worker=1*panic(…)`): a worker that
                // panics with an entry in hand.
                fail::fail_point!("consumer-worker");
                let acknowledge =
                    delivery.envelope.topic != handler.topic() || handler.handle(&delivery).await;
                if acknowledge {
                    if let Err(e) = consumer.ack(std::slice::from_ref(&delivery.receipt)).await {
                        warn!(error = %e, "ack failed; the entry will be reclaimed and deduped");
                    }
                }
                drop(permit);
            });
        }
    }
}

/// Records the outcome of [`Store::deliver_event`](crate::store::Store::deliver_event)
/// in `herald_deliveries_total{consumer}` and the log; `true` when the entry
/// may be acknowledged. `done` runs for a completed delivery.
pub fn settle(
    consumer: &'static str,
    event_id: Uuid,
    outcome: Result<DeliveryResult, StoreError>,
    done: impl FnOnce(),
) -> bool {
    match outcome {
        Ok(DeliveryResult::Attempted { attempt, decision }) => {
            let result = match &decision {
                DeliveryDecision::Done => {
                    done();
                    "ok"
                }
                DeliveryDecision::Retry { after, error } => {
                    tracing::info!(consumer, %event_id, attempt, ?after, %error, "delivery failed; retry scheduled");
                    "retry"
                }
                DeliveryDecision::Defer { .. } => "deferred",
                DeliveryDecision::Dead { error } => {
                    warn!(consumer, %event_id, attempt, %error, "delivery dead-lettered");
                    "dead"
                }
            };
            m::delivery(consumer, result);
            true
        }
        Ok(DeliveryResult::Duplicate | DeliveryResult::Stale | DeliveryResult::Gone) => {
            m::delivery(consumer, "deduped");
            true
        }
        // Another worker holds the row and settles it.
        Ok(DeliveryResult::Busy) => true,
        Err(e) => {
            // Nothing recorded: leave the entry pending, to be reclaimed.
            warn!(consumer, %event_id, error = %e, "delivery not recorded; it will be retried");
            false
        }
    }
}

/// The actor around a consumer: it owns the reading loop, and fails when the
/// loop ends (it never should), so the supervisor restarts it. EmailSender
/// and LedgerConsumer are this actor with their own [`Handler`].
pub struct ConsumerActor<H>(std::marker::PhantomData<fn() -> H>);

impl<H> ConsumerActor<H> {
    pub fn new() -> Self {
        ConsumerActor(std::marker::PhantomData)
    }
}

impl<H> Default for ConsumerActor<H> {
    fn default() -> Self {
        ConsumerActor::new()
    }
}

/// A consumer's pool and handler.
pub struct ConsumerArgs<H> {
    pub pool: PoolArgs,
    pub handler: Arc<H>,
}

impl<H> Clone for ConsumerArgs<H> {
    fn clone(&self) -> Self {
        ConsumerArgs {
            pool: self.pool.clone(),
            handler: self.handler.clone(),
        }
    }
}

pub enum ConsumerMsg {
    /// The reader loop ended: fail, so the supervisor restarts the actor.
    LoopEnded(String),
}

impl<H: Handler> Actor for ConsumerActor<H> {
    type Msg = ConsumerMsg;
    /// The reader loop and the handler's background work.
    type State = ActorTasks;
    type Arguments = ConsumerArgs<H>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ConsumerArgs<H>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let what = args.handler.consumer();
        let mut tasks = ActorTasks::new();
        let handler = args.handler.clone();
        tasks.run_draining(
            myself.clone(),
            what,
            |stopping| async move {
                match handler.background(stopping.clone()) {
                    Some(background) => background.await,
                    None => stopping.cancelled().await,
                }
                Ok::<(), std::convert::Infallible>(())
            },
            ConsumerMsg::LoopEnded,
        );
        tasks.run_draining(
            myself,
            what,
            |stopping| consume(args.pool, args.handler, stopping),
            ConsumerMsg::LoopEnded,
        );
        Ok(tasks)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        tasks: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        tasks.finish().await;
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        _reader: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let ConsumerMsg::LoopEnded(reason) = message;
        Err(format!("{} reader loop: {reason}", std::any::type_name::<H>()).into())
    }
}
