//! EmailSender: the pool that turns `application.submitted` events into
//! exactly one confirmation email each, as few requests to the provider as
//! its rate allows.
//!
//! Resend counts requests, not emails (2 per second by default), and one
//! `POST /emails/batch` carries up to 100 emails. So the sender batches:
//!
//! 1. The reading side is the shared consumer pool ([`super::consumer`]):
//!    this process's member of the `email` group on the
//!    `application.submitted` stream. Each copy it reads waits in the
//!    sender's hand, unacknowledged.
//! 2. The batch loop waits for work, then until the rate's next slot is free
//!    (`email.max_per_sec`, requests per second) — under a backlog that wait
//!    is what gathers a full batch; on an idle board a lone email goes at
//!    once, after at most `email.batch_linger_ms` for company. The send
//!    itself takes the slot right before its request leaves, so the
//!    provider sees requests evenly spaced however long forming took. When
//!    a full batch already waits, it is formed while the previous send is
//!    still on its way to its slot (waiting would not fill it any more),
//!    and sent once that slot is taken: forming and sending overlap.
//! 3. It forms a batch of up to `email.max_batch` waiting copies
//!    ([`Store::form_batch`]): the ones still to deliver become its members,
//!    recorded in the database in one transaction; then every copy is
//!    acknowledged (its event now belongs to the batch, or was already
//!    delivered). Membership is never changed: every send of that batch is
//!    the same request under the same `Idempotency-Key` (the batch id).
//! 4. It sends the oldest due batch ([`Store::send_due_batch`]) — the new
//!    one, a retry, or one a crashed process left — and records per email
//!    an inbox row, the application `sent` and the event settled, or that
//!    email's own dead letter (an address the provider refused in
//!    permissive mode); a transient failure (429, 5xx, timeout, concurrent
//!    request) schedules the same batch again, full jitter with the
//!    provider's Retry-After as floor, a retry needing a RetryBudget token
//!    (without one it is deferred, spending no attempt); a permanent
//!    failure or the last attempt dead-letters each member.
//!
//! A crash after the batch is formed leaves a due batch for any process to
//! send; a crash after the send and before the commit leaves it unsettled,
//! and the repeat request carries the same key and body, so Resend sends
//! nothing new. Postgres holds the batch's row lock during the send
//! (another process skips it); SQLite holds a lease.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt;
use rand::Rng;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{warn, Instrument};

#[cfg(doc)]
use super::consumer::ConsumerActor;
use super::consumer::Handler;
use super::retry_budget::RetryBudgetHandle;
use crate::broker::{Delivery, Envelope};
use crate::domain::topics;
use crate::email::{Email, MemberAnswer, SendError, SendPacer, Transport};
use crate::retry::RetryPolicy;
use crate::store::{
    Admission, BatchDecision, BatchResult, BatchToSend, Consumer, DeliveryStore, Effect,
    MemberOutcome, StoreError,
};
use crate::telemetry::metrics as m;

/// The consumer's name in inboxes, dead letters, metrics and the group.
pub const CONSUMER: &str = "email";
/// What the store records for a sent confirmation: the application's
/// `email_status`.
pub const AS_STORED: Consumer = Consumer {
    name: CONSUMER,
    topic: topics::APPLICATION_SUBMITTED,
    effect: Effect::ApplicationEmail,
};
/// The RetryBudget call site of the email API.
pub const CALL_SITE: &str = "email_api";
/// How often an idle sender looks for due batches (retries, or batches a
/// crashed process formed).
const DUE_POLL: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct EmailSenderArgs {
    pub store: Arc<dyn DeliveryStore>,
    pub transport: Arc<dyn Transport>,
    pub from: String,
    /// Requests per second to the provider.
    pub pacer: Arc<SendPacer>,
    pub policy: RetryPolicy,
    pub budget: RetryBudgetHandle,
    /// Most emails per request.
    pub max_batch: usize,
    /// Longest wait for company when a request could go at once.
    pub linger: Duration,
    /// Most requests in flight at once.
    pub workers: usize,
}

/// A copy read from the stream, waiting to join a batch; `answer` says
/// whether it may be acknowledged.
struct Waiting {
    envelope: Envelope,
    answer: oneshot::Sender<bool>,
}

/// Requests in progress, and the most there ever were.
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

/// The handler of the EmailSender actor, a [`ConsumerActor`]: hands each
/// copy to the batch loop and acknowledges it once it is in a batch.
pub struct EmailSender {
    args: EmailSenderArgs,
    in_flight: InFlight,
    /// The running batch loop's inbox; replaced each time the actor
    /// (re)starts the loop. Unbounded, yet bounded in fact: a copy is only
    /// read while one of the pool's permits is free, and it holds that
    /// permit until answered.
    to_batch: std::sync::Mutex<Option<mpsc::UnboundedSender<Waiting>>>,
}

impl EmailSender {
    pub fn new(args: EmailSenderArgs) -> EmailSender {
        EmailSender {
            args,
            in_flight: InFlight::default(),
            to_batch: std::sync::Mutex::new(None),
        }
    }

    /// Copies in hand the reading side may hold: two full batches, so the
    /// next one fills while one is sent.
    pub fn reading_width(max_batch: usize, workers: usize) -> usize {
        (max_batch * 2).max(workers)
    }

    /// The batch loop: wait for work, for a free sender and the rate's next
    /// slot, form a batch of what waits, send the oldest due batch.
    /// When `stopping` is cancelled it stops wherever it waits, and the
    /// sends already in flight are awaited, so each is recorded before the
    /// process exits (what waited unformed stays pending, to be reclaimed).
    async fn run(
        self: Arc<Self>,
        inbox: mpsc::UnboundedReceiver<Waiting>,
        stopping: CancellationToken,
    ) {
        let mut sends: JoinSet<()> = JoinSet::new();
        tokio::select! {
            _ = stopping.cancelled() => {}
            _ = self.clone().rounds(inbox, &mut sends) => {}
        }
        while sends.join_next().await.is_some() {}
    }

    async fn rounds(
        self: Arc<Self>,
        mut inbox: mpsc::UnboundedReceiver<Waiting>,
        sends: &mut JoinSet<()>,
    ) {
        let mut waiting: Vec<Waiting> = Vec::new();
        // Whether the last round sent a batch: then more may be due (retries
        // after an outage, batches a crashed process formed), and the next
        // round goes at the rate's next slot instead of waiting for news.
        let mut sent_last = false;
        // The last send, until it has taken the rate's slot (or found
        // nothing due).
        let mut reaching_slot: Option<oneshot::Receiver<()>> = None;
        loop {
            gather(&mut inbox, &mut waiting, self.args.max_batch);
            // A full batch is formed while the last send is still on its way
            // to its slot: waiting would not make it any fuller, and forming
            // is a transaction of its own. Anything less waits for that slot
            // and then for the next, since the wait is what fills a batch.
            let full = waiting.len() >= self.args.max_batch;
            if !full {
                if let Some(sent) = last_send(&mut reaching_slot).await {
                    sent_last = sent;
                }
                if waiting.is_empty() && !sent_last {
                    tokio::select! {
                        got = inbox.recv() => match got {
                            Some(w) => waiting.push(w),
                            None => return,
                        },
                        _ = tokio::time::sleep(DUE_POLL) => {}
                    }
                }
            }
            while sends.len() >= self.args.workers.max(1) {
                sends.join_next().await;
            }
            while sends.try_join_next().is_some() {}
            if full {
                self.form(next_batch(&mut waiting, self.args.max_batch))
                    .await;
                if let Some(sent) = last_send(&mut reaching_slot).await {
                    sent_last = sent;
                }
                // Formed ahead: the send still finds its slot free, rather
                // than waiting for it inside its transaction.
                self.args.pacer.until_free().await;
            } else {
                // The rate's next slot: under a backlog, this wait is what
                // fills the batch.
                self.args.pacer.until_free().await;
                gather(&mut inbox, &mut waiting, self.args.max_batch);
                self.linger(&mut inbox, &mut waiting).await;
                if !waiting.is_empty() {
                    self.form(next_batch(&mut waiting, self.args.max_batch))
                        .await;
                }
            }
            // The send takes its slot right before the request leaves (so
            // the provider sees requests 1/rate apart, however long forming
            // took); the next round waits until it has, or forms the next
            // full batch meanwhile.
            let (reserved, slot_taken) = oneshot::channel();
            let sender = self.clone();
            sends.spawn(async move { sender.send_due(reserved).await });
            reaching_slot = Some(slot_taken);
        }
    }

    /// Lets a partial batch wait up to `email.batch_linger_ms` for company
    /// (a request could go at once, so only a short wait is worth it).
    async fn linger(
        &self,
        inbox: &mut mpsc::UnboundedReceiver<Waiting>,
        waiting: &mut Vec<Waiting>,
    ) {
        if waiting.is_empty() || waiting.len() >= self.args.max_batch {
            return;
        }
        // Checked: a linger no clock can express is "as long as it takes".
        let now = tokio::time::Instant::now();
        let deadline = now
            .checked_add(self.args.linger)
            .unwrap_or_else(|| now + Duration::from_secs(86_400));
        while waiting.len() < self.args.max_batch {
            match tokio::time::timeout_at(deadline, inbox.recv()).await {
                Ok(Some(w)) => waiting.push(w),
                _ => break,
            }
        }
    }

    /// Records a new batch of the waiting copies and answers each.
    async fn form(&self, members: Vec<Waiting>) {
        let envelopes: Vec<Envelope> = members.iter().map(|w| w.envelope.clone()).collect();
        let formed = self
            .args
            .store
            .form_batch(AS_STORED, uuid::Uuid::now_v7(), &envelopes)
            .await;
        // Failpoint (`batch-after-form=panic` or `=return`): a crash after
        // the membership commit, before any send and before the acks.
        fail::fail_point!("batch-after-form", |_| std::process::abort());
        match formed {
            Ok(admissions) => {
                for (waiting, admission) in members.into_iter().zip(admissions) {
                    match admission {
                        Admission::Member => {}
                        // Settled at once, without a request: the address
                        // bounced or complained before.
                        Admission::Suppressed => m::delivery(CONSUMER, "suppressed"),
                        _ => m::delivery(CONSUMER, "deduped"),
                    }
                    let _ = waiting.answer.send(true);
                }
            }
            Err(e) => {
                // Nothing recorded: the copies stay pending, to be reclaimed.
                warn!(error = %e, "batch not formed; its copies will be read again");
                for waiting in members {
                    let _ = waiting.answer.send(false);
                }
            }
        }
    }

    /// Sends the oldest due batch, if any, and records its metrics;
    /// `reserved` is answered once the send has taken the rate's slot (or
    /// dropped when nothing was sent).
    async fn send_due(&self, reserved: oneshot::Sender<()>) {
        self.in_flight.enter();
        let args = self.args.clone();
        let reserved = Arc::new(std::sync::Mutex::new(Some(reserved)));
        let send = move |batch: BatchToSend| {
            let (args, reserved) = (args.clone(), reserved.clone());
            async move { send_batch(&args, batch, &reserved).await }.boxed()
        };
        let sent = self.args.store.send_due_batch(AS_STORED, &send).await;
        self.in_flight.leave();
        record(sent);
    }
}

/// Waits until the last send took its slot: whether it sent a batch
/// (`None` when no send is on its way).
async fn last_send(reaching_slot: &mut Option<oneshot::Receiver<()>>) -> Option<bool> {
    Some(reaching_slot.take()?.await.is_ok())
}

/// The oldest waiting copies, at most `max_batch`: the next batch's members.
fn next_batch(waiting: &mut Vec<Waiting>, max_batch: usize) -> Vec<Waiting> {
    let take = waiting.len().min(max_batch);
    waiting.drain(..take).collect()
}

/// Moves what the readers handed over meanwhile into `waiting`.
fn gather(
    inbox: &mut mpsc::UnboundedReceiver<Waiting>,
    waiting: &mut Vec<Waiting>,
    max_batch: usize,
) {
    while waiting.len() < max_batch {
        match inbox.try_recv() {
            Ok(w) => waiting.push(w),
            Err(_) => break,
        }
    }
}

/// Metrics and log lines for one recorded send.
fn record(sent: Result<Option<BatchResult>, StoreError>) {
    let result = match sent {
        Ok(Some(result)) => result,
        Ok(None) => return,
        Err(e) => {
            warn!(error = %e, "batch send not recorded; it will be sent again under the same key");
            return;
        }
    };
    let kind = match &result.decision {
        BatchDecision::Answered(outcomes) => {
            for outcome in outcomes {
                match outcome {
                    MemberOutcome::Done { .. } => {
                        m::delivery(CONSUMER, "ok");
                        m::email_sent();
                    }
                    MemberOutcome::Dead { error } => {
                        warn!(batch = %result.id, %error, "email dead-lettered");
                        m::delivery(CONSUMER, "dead");
                    }
                }
            }
            "ok"
        }
        BatchDecision::Retry { after, error } => {
            tracing::info!(batch = %result.id, attempt = result.attempt, ?after, %error,
                "batch failed; the same batch is sent again later");
            for _ in 0..result.members {
                m::delivery(CONSUMER, "retry");
            }
            "retry"
        }
        BatchDecision::Defer { .. } => {
            for _ in 0..result.members {
                m::delivery(CONSUMER, "deferred");
            }
            "deferred"
        }
        BatchDecision::Dead { error } => {
            warn!(batch = %result.id, attempt = result.attempt, %error,
                "batch dead-lettered, each email on its own");
            for _ in 0..result.members {
                m::delivery(CONSUMER, "dead");
            }
            "dead"
        }
    };
    m::email_request(kind, result.members);
}

impl Handler for EmailSender {
    fn consumer(&self) -> &'static str {
        CONSUMER
    }

    fn topic(&self) -> &'static str {
        AS_STORED.topic
    }

    fn handle<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, bool> {
        async move {
            let (answer, answered) = oneshot::channel();
            let waiting = Waiting {
                envelope: delivery.envelope.clone(),
                answer,
            };
            let handed = match self.to_batch.lock() {
                Ok(slot) => slot.as_ref().is_some_and(|tx| tx.send(waiting).is_ok()),
                Err(_) => false,
            };
            if !handed {
                return false;
            }
            // No answer (the loop restarted): leave it pending, to be reclaimed.
            answered.await.unwrap_or(false)
        }
        .boxed()
    }

    fn background(self: Arc<Self>, stopping: CancellationToken) -> Option<BoxFuture<'static, ()>> {
        let (to_batch, inbox) = mpsc::unbounded_channel();
        *self.to_batch.lock().ok()? = Some(to_batch);
        Some(self.run(inbox, stopping).boxed())
    }
}

/// One send of a batch (its row is held by the caller): budget, render,
/// the rate's slot, send, classify.
async fn send_batch(
    args: &EmailSenderArgs,
    batch: BatchToSend,
    reserved: &std::sync::Mutex<Option<oneshot::Sender<()>>>,
) -> BatchDecision {
    // One send serves many applications: its span starts a trace of its
    // own, linked to the trace each member was committed in.
    let span = tracing::info_span!(
        "email batch send",
        otel.kind = "consumer",
        messaging.batch.message_count = batch.members.len(),
        batch = %batch.id,
        attempt = batch.attempts + 1,
    );
    crate::telemetry::traces::link_to(
        &span,
        batch
            .members
            .iter()
            .filter_map(|m| m.traceparent.as_deref()),
    );
    send_batch_in_span(args, batch, reserved)
        .instrument(span)
        .await
}

async fn send_batch_in_span(
    args: &EmailSenderArgs,
    batch: BatchToSend,
    reserved: &std::sync::Mutex<Option<oneshot::Sender<()>>>,
) -> BatchDecision {
    if batch.attempts > 0 && !args.budget.try_retry(CALL_SITE).await {
        let after = Duration::from_millis(rand::rng().random_range(1000..=5000));
        return BatchDecision::Defer { after };
    }
    // Rendering is a pure function of the payload (and `email.from`), so
    // every send of the batch carries the same body.
    let rendered: Vec<Result<Email, String>> = batch
        .members
        .iter()
        .map(|e| Email::confirmation(&args.from, &e.payload))
        .collect();
    let emails: Vec<(uuid::Uuid, Email)> = batch
        .members
        .iter()
        .zip(&rendered)
        .filter_map(|(e, r)| Some((e.event_id, r.as_ref().ok()?.clone())))
        .collect();
    let attempt = batch.attempts + 1;
    m::delivery_attempt(CONSUMER, attempt);
    let answers = if emails.is_empty() {
        Vec::new()
    } else {
        args.pacer.until_ready().await;
        if let Some(reserved) = reserved.lock().ok().and_then(|mut r| r.take()) {
            let _ = reserved.send(());
        }
        let asked = Instant::now();
        let answered = args
            .transport
            .send_batch(batch.id, &emails)
            .instrument(tracing::info_span!(
                "provider request",
                otel.kind = "client"
            ))
            .await;
        m::provider_request(provider_outcome(&answered), asked.elapsed());
        match answered {
            Ok(answers) => answers,
            Err(error) => return failed(args, attempt, error).await,
        }
    };
    args.budget.succeeded(CALL_SITE);
    let mut answers = answers.into_iter();
    let outcomes: Vec<MemberOutcome> = rendered
        .into_iter()
        .map(|r| match r {
            Err(error) => MemberOutcome::Dead { error },
            // The transport answers once per email it was handed, in
            // order (it checked the provider named each one).
            Ok(_) => match answers.next() {
                Some(MemberAnswer::Accepted { provider_id }) => MemberOutcome::Done { provider_id },
                Some(MemberAnswer::Refused(error)) => MemberOutcome::Dead { error },
                None => MemberOutcome::Dead {
                    error: "the provider's answer did not cover this email".into(),
                },
            },
        })
        .collect();
    for (member, outcome) in batch.members.iter().zip(&outcomes) {
        if let (MemberOutcome::Done { .. }, Some(seconds)) =
            (outcome, seconds_since_commit(member.event_id))
        {
            m::email_delivered_after(seconds);
        }
    }
    BatchDecision::Answered(outcomes)
}

/// The outcome label of one provider request.
fn provider_outcome(answered: &crate::email::BatchAnswers) -> &'static str {
    match answered {
        Ok(_) => "ok",
        Err(SendError::RateLimited { .. }) => "rate_limited",
        Err(SendError::Transient { .. }) => "transient",
        Err(SendError::Permanent(_)) => "permanent",
        Err(SendError::ReplyInvalid(_)) => "reply_invalid",
    }
}

/// Seconds since `event_id` was committed: outbox ids are UUIDv7, minted
/// in the committing transaction, so the id carries its commit's instant
/// (to the millisecond) and no column or envelope field is needed.
pub fn seconds_since_commit(event_id: uuid::Uuid) -> Option<f64> {
    let (secs, nanos) = event_id.get_timestamp()?.to_unix();
    let committed = std::time::UNIX_EPOCH + Duration::new(secs, nanos);
    Some(
        std::time::SystemTime::now()
            .duration_since(committed)
            .unwrap_or_default()
            .as_secs_f64(),
    )
}

/// What a failed send of a batch (its `attempt`, 1-based) becomes: the
/// same batch again later, under the same key, or every member's dead
/// letter once the attempts are spent or the failure is permanent. A reply
/// that named no outcome is retried like a timeout, and its dead letters
/// say `provider_reply_invalid`.
async fn failed(args: &EmailSenderArgs, attempt: i32, error: SendError) -> BatchDecision {
    let (reason, floor) = match error {
        SendError::Permanent(error) => return BatchDecision::Dead { error },
        SendError::RateLimited {
            reason,
            retry_after,
        } => {
            // The provider is over its limit: every sender waits (never
            // longer than `retry.max_delay_ms`, whatever it asked).
            let pause = args
                .policy
                .bounded(retry_after.unwrap_or(Duration::from_secs(1)));
            args.pacer.hold_off(pause).await;
            (reason, retry_after)
        }
        SendError::Transient {
            reason,
            retry_after,
        } => (reason, retry_after),
        invalid @ SendError::ReplyInvalid(_) => (invalid.to_string(), None),
    };
    let attempt = u32::try_from(attempt).unwrap_or(1).max(1);
    if args.policy.exhausted(attempt) {
        BatchDecision::Dead {
            error: format!("{reason} (after {attempt} attempts)"),
        }
    } else {
        BatchDecision::Retry {
            after: args.policy.delay(attempt, floor, &mut rand::rng()),
            error: reason,
        }
    }
}
