//! EmailSender: the pool that turns `application.submitted` events into
//! exactly one confirmation email each (SPEC 1, 4, 6).
//!
//! A reader task takes entries from the `application.submitted` stream as
//! this process's member of the `email` consumer group, and hands each to a
//! worker; at most `email.workers` run at once (a semaphore; the reader never
//! reads more than there are free workers). Every so often it also reclaims
//! entries a dead process read and never acknowledged (`XAUTOCLAIM`).
//!
//! A worker delivers through [`Store::deliver_event`], which locks the
//! event's outbox row for the attempt and records the outcome with it:
//! - already settled, in the inbox, or a stale copy: dropped (`deduped`);
//! - a retry (the row has failed attempts) first needs a RetryBudget token;
//!   without one it is deferred, spending no attempt (`deferred`);
//! - then the pacer (`email.max_per_sec`), then the transport with the event
//!   id as idempotency key: success records the inbox row, settles the
//!   event and marks the application `sent` (`ok`); a transient failure
//!   schedules the retry on the row, full jitter with the downstream's
//!   Retry-After as floor (`retry`); a permanent one, or the last attempt,
//!   writes a dead letter and marks the application `dead` (`dead`).
//!
//! A crash after the send and before that commit leaves the row unsettled;
//! it is published again and the repeat call carries the same idempotency
//! key, so Resend sends nothing new.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use rand::Rng;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::retry_budget::RetryBudgetHandle;
use super::spawn_loop;
use crate::broker::redis_streams::StreamConsumer;
use crate::broker::{BrokerError, Delivery};
use crate::domain::topics;
use crate::email::{Email, SendError, SendPacer, Transport};
use crate::retry::{reconnect_pause, RetryPolicy};
use crate::store::{DeliveryDecision, DeliveryResult, Store};
use crate::telemetry::metrics as m;

/// The consumer's name in inboxes, dead letters, metrics and the group.
pub const CONSUMER: &str = "email";
/// The RetryBudget call site of the email API.
pub const CALL_SITE: &str = "email_api";

#[derive(Clone)]
pub struct EmailSenderArgs {
    pub store: Arc<dyn Store>,
    pub redis_url: String,
    /// This process's consumer name (unique per process start).
    pub consumer_name: String,
    pub transport: Arc<dyn Transport>,
    pub from: String,
    pub workers: usize,
    pub pacer: Arc<SendPacer>,
    pub policy: RetryPolicy,
    pub budget: RetryBudgetHandle,
    /// Idle time after which another process's unacknowledged entry is taken over.
    pub reclaim_after: Duration,
}

pub enum EmailSenderMsg {
    /// The reader loop ended (it never should): fail, so the supervisor restarts us.
    LoopEnded(String),
}

pub struct EmailSender;

pub struct EmailSenderState {
    reader: JoinHandle<()>,
}

impl Actor for EmailSender {
    type Msg = EmailSenderMsg;
    type State = EmailSenderState;
    type Arguments = EmailSenderArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: EmailSenderArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let reader = spawn_loop(
            myself,
            "email reader loop",
            read_loop(args),
            EmailSenderMsg::LoopEnded,
        );
        Ok(EmailSenderState { reader })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.reader.abort();
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let EmailSenderMsg::LoopEnded(reason) = message;
        Err(reason.into())
    }
}

/// Sends in progress, and the most there ever were.
#[derive(Default)]
struct InFlight {
    now: AtomicUsize,
    max: AtomicUsize,
}

impl InFlight {
    fn enter(&self) {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        let max = self.max.fetch_max(now, Ordering::SeqCst).max(now);
        m::email_in_flight(now, max);
    }
    fn leave(&self) {
        let now = self.now.fetch_sub(1, Ordering::SeqCst) - 1;
        m::email_in_flight(now, self.max.load(Ordering::SeqCst));
    }
}

async fn read_loop(args: EmailSenderArgs) -> Result<(), BrokerError> {
    let consumer = Arc::new(StreamConsumer::connect(
        &args.redis_url,
        topics::APPLICATION_SUBMITTED,
        CONSUMER,
        &args.consumer_name,
        Duration::from_millis(1000),
    )?);
    let workers = Arc::new(Semaphore::new(args.workers.max(1)));
    let in_flight = Arc::new(InFlight::default());
    let mut last_reclaim = tokio::time::Instant::now();
    let mut failures: u32 = 0;
    loop {
        // Wait for a free worker before reading, then read no more than
        // there are free workers.
        let first = workers
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| BrokerError::Unavailable("worker pool closed".into()))?;
        let free = 1 + workers.available_permits();
        let read = if last_reclaim.elapsed() >= args.reclaim_after / 2 {
            last_reclaim = tokio::time::Instant::now();
            match consumer.reclaim(args.reclaim_after, free as u64).await {
                Ok(reclaimed) if !reclaimed.is_empty() => Ok(reclaimed),
                Ok(_) => consumer.read(free as u64).await,
                Err(e) => Err(e),
            }
        } else {
            consumer.read(free as u64).await
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
                warn!(error = %e, ?pause, "email consumer cannot read the stream");
                tokio::time::sleep(pause).await;
                if let Err(e) = consumer.ensure_group().await {
                    warn!(error = %e, "email consumer group not ready");
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
                    warn!(%receipt, %reason, "unreadable stream entry dropped");
                    let _ = consumer.ack(&[receipt]).await;
                    continue;
                }
                Err(e) => {
                    warn!(error = %e, "stream entry unusable");
                    continue;
                }
            };
            let (args, consumer, in_flight) = (args.clone(), consumer.clone(), in_flight.clone());
            tokio::spawn(async move {
                in_flight.enter();
                let settled = handle_delivery(&args, &delivery).await;
                in_flight.leave();
                if settled {
                    if let Err(e) = consumer.ack(std::slice::from_ref(&delivery.receipt)).await {
                        warn!(error = %e, "ack failed; the entry will be reclaimed and deduped");
                    }
                }
                drop(permit);
            });
        }
    }
}

/// Delivers one stream entry; `true` when it may be acknowledged.
async fn handle_delivery(args: &EmailSenderArgs, delivery: &Delivery) -> bool {
    let envelope = &delivery.envelope;
    if envelope.topic != topics::APPLICATION_SUBMITTED {
        return true;
    }
    let attempt_args = args.clone();
    let event_id = envelope.event_id;
    let payload = envelope.payload.clone();
    let deliver = move |attempts: i32| {
        let (args, payload) = (attempt_args.clone(), payload.clone());
        async move { attempt(&args, event_id, &payload, attempts).await }.boxed()
    };
    match args.store.deliver_event(CONSUMER, envelope, &deliver).await {
        Ok(DeliveryResult::Attempted { attempt, decision }) => {
            let result = match &decision {
                DeliveryDecision::Done => {
                    m::email_sent();
                    "ok"
                }
                DeliveryDecision::Retry { after, error } => {
                    info!(%event_id, attempt, ?after, %error, "email send failed; retry scheduled");
                    "retry"
                }
                DeliveryDecision::Defer { .. } => "deferred",
                DeliveryDecision::Dead { error } => {
                    warn!(%event_id, attempt, %error, "email dead-lettered");
                    "dead"
                }
            };
            m::delivery(CONSUMER, result);
            true
        }
        Ok(DeliveryResult::Duplicate | DeliveryResult::Stale | DeliveryResult::Gone) => {
            m::delivery(CONSUMER, "deduped");
            true
        }
        // Another worker holds the row and settles it.
        Ok(DeliveryResult::Busy) => true,
        Err(e) => {
            // Nothing recorded: leave the entry pending, to be reclaimed.
            warn!(%event_id, error = %e, "delivery not recorded; it will be retried");
            false
        }
    }
}

/// One attempt (the row is locked by the caller): budget, pace, send, classify.
async fn attempt(
    args: &EmailSenderArgs,
    event_id: uuid::Uuid,
    payload: &serde_json::Value,
    attempts: i32,
) -> DeliveryDecision {
    if attempts > 0 && !args.budget.try_retry(CALL_SITE).await {
        let after = Duration::from_millis(rand::rng().random_range(1000..=5000));
        return DeliveryDecision::Defer { after };
    }
    let email = match Email::confirmation(&args.from, payload) {
        Ok(email) => email,
        Err(error) => return DeliveryDecision::Dead { error },
    };
    args.pacer.until_ready().await;
    let attempt = attempts + 1;
    m::delivery_attempt(CONSUMER, attempt);
    match args.transport.send(&email, event_id).await {
        Ok(()) => {
            args.budget.succeeded(CALL_SITE);
            DeliveryDecision::Done
        }
        Err(SendError::Transient {
            reason,
            retry_after,
        }) => {
            let attempt = attempt.max(1) as u32;
            if args.policy.exhausted(attempt) {
                DeliveryDecision::Dead {
                    error: format!("{reason} (after {attempt} attempts)"),
                }
            } else {
                let after = args.policy.delay(attempt, retry_after, &mut rand::rng());
                DeliveryDecision::Retry {
                    after,
                    error: reason,
                }
            }
        }
        Err(SendError::Permanent(error)) => DeliveryDecision::Dead { error },
    }
}
