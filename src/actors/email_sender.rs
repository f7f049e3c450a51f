//! EmailSender: the pool that turns `application.submitted` events into
//! exactly one confirmation email each.
//!
//! The reading side is the shared consumer pool ([`super::consumer`]): this
//! process's member of the `email` group on the `application.submitted`
//! stream, at most `email.workers` sends at once.
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

use futures::future::BoxFuture;
use futures::FutureExt;
use rand::Rng;

#[cfg(doc)]
use super::consumer::ConsumerActor;
use super::consumer::{self, Handler};
use super::retry_budget::RetryBudgetHandle;
use crate::broker::Delivery;
use crate::domain::topics;
use crate::email::{Email, SendError, SendPacer, Transport};
use crate::retry::RetryPolicy;
use crate::store::{DeliveryDecision, Store};
use crate::telemetry::metrics as m;

/// The consumer's name in inboxes, dead letters, metrics and the group.
pub const CONSUMER: &str = "email";
/// The RetryBudget call site of the email API.
pub const CALL_SITE: &str = "email_api";

#[derive(Clone)]
pub struct EmailSenderArgs {
    pub store: Arc<dyn Store>,
    pub transport: Arc<dyn Transport>,
    pub from: String,
    pub pacer: Arc<SendPacer>,
    pub policy: RetryPolicy,
    pub budget: RetryBudgetHandle,
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

/// Sends one confirmation per `application.submitted` entry: the handler of
/// the EmailSender actor, a [`ConsumerActor`] with `email.workers` workers.
pub struct EmailSender {
    args: EmailSenderArgs,
    in_flight: InFlight,
}

impl EmailSender {
    pub fn new(args: EmailSenderArgs) -> EmailSender {
        EmailSender {
            args,
            in_flight: InFlight::default(),
        }
    }
}

impl Handler for EmailSender {
    fn consumer(&self) -> &'static str {
        CONSUMER
    }

    fn topic(&self) -> &'static str {
        topics::APPLICATION_SUBMITTED
    }

    fn handle<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, bool> {
        async move {
            self.in_flight.enter();
            let envelope = &delivery.envelope;
            let event_id = envelope.event_id;
            let deliver = |attempts: i32| {
                let (args, payload) = (self.args.clone(), envelope.payload.clone());
                async move { attempt(&args, event_id, &payload, attempts).await }.boxed()
            };
            let outcome = self
                .args
                .store
                .deliver_event(CONSUMER, envelope, &deliver)
                .await;
            self.in_flight.leave();
            consumer::settle(CONSUMER, event_id, outcome, m::email_sent)
        }
        .boxed()
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
