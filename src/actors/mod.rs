//! The supervised actor tree.
//!
//! ```text
//!   HeraldSupervisor (root; restarts a crashed child with backoff, reports it to
//!   │                 Sentry, escalates — stops the daemon — when one keeps crashing)
//!   ├── KeyRegistry    probes the idempotency protocol's Redis hot tier; leaves fallback
//!   ├── RetryBudget    token bucket per outbound call site: may this retry run now?
//!   ├── OutboxRelay    due outbox rows -> broker (Redis Streams or in-process), rate-capped,
//!   │                  marked after the broker took them
//!   ├── EmailSender    pool of workers: broker -> Resend / .eml, inbox dedupe,
//!   │                  retry / defer / dead-letter recorded on the outbox row
//!   ├── LedgerConsumer charge.created -> one ledger entry per charge, written with
//!   │                  its inbox row in one transaction
//!   ├── DlqMonitor     dead-letter depth and age -> herald_dlq_depth, Sentry alerts
//!   ├── Janitor        expired keys, settled outbox rows, old inbox rows: small batches
//!   ├── Auditor        the effectively-once invariants, checked in the database ->
//!   │                  herald_audit_violations, Sentry on a rising edge
//!   └── SseHub         the jobs stream (every process reads all of it) -> bounded
//!                      per-client queues; snapshot and history in memory
//! ```
//!
//! EmailSender and LedgerConsumer share one stream-consumer pool
//! ([`consumer`]). All durable state lives in the database, so a restarted
//! actor loses nothing (a restarted SseHub closes its streams; clients resume).
//!
//! The HTTP front never holds an [`ActorRef`] directly: it reads the current
//! one from an [`ActorSlot`], which the supervisor refills after a restart.

pub mod auditor;
pub mod consumer;
pub mod dlq_monitor;
pub mod email_sender;
pub mod janitor;
pub mod key_registry;
pub mod ledger;
pub mod outbox_relay;
pub mod periodic;
pub mod retry_budget;
pub mod sse_hub;
pub mod supervisor;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use std::future::Future;

use ractor::ActorRef;

/// Every consumer with an effect, as the store sees it: what the audit
/// checks the effectively-once invariants over.
pub const CONSUMERS: [crate::store::Consumer; 2] = [email_sender::AS_STORED, ledger::AS_STORED];
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use periodic::{is_ticking, Ticker, Timer};

/// The live reference to a supervised actor, refilled by the supervisor
/// whenever it restarts the actor, plus what `/admin/status` shows about it.
pub struct ActorSlot<M: ractor::Message> {
    /// Name of the actor, as shown by `/admin/status`.
    name: &'static str,
    /// Current reference; `None` while the actor is being restarted.
    current: RwLock<Option<ActorRef<M>>>,
    /// How many times the supervisor restarted it.
    restarts: AtomicU64,
}

impl<M: ractor::Message> ActorSlot<M> {
    pub fn new(name: &'static str) -> Arc<Self> {
        Arc::new(ActorSlot {
            name,
            current: RwLock::new(None),
            restarts: AtomicU64::new(0),
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn get(&self) -> Option<ActorRef<M>> {
        self.current.read().ok().and_then(|g| g.clone())
    }

    pub fn set(&self, actor: Option<ActorRef<M>>) {
        if let Ok(mut g) = self.current.write() {
            *g = actor;
        }
    }

    pub fn record_restart(&self) -> u64 {
        self.restarts.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn status(&self) -> ActorStatus {
        ActorStatus {
            name: self.name,
            running: self.get().is_some(),
            restarts: self.restarts.load(Ordering::Relaxed),
        }
    }
}

/// The tasks one actor owns. Its long-lived loops run on the actor's own
/// [`JoinSet`] (dropping the set aborts them, so none outlives its actor),
/// and should a loop ever end (an error, a return, a panic) the actor is
/// sent `ended(reason)`, which it answers by failing, so its supervisor
/// restarts and reports it. Stopping the actor ([`ActorTasks::finish`])
/// cuts off plain loops ([`ActorTasks::run`]) and lets draining ones
/// ([`ActorTasks::run_draining`], the consumers) finish what they hold.
pub struct ActorTasks {
    tasks: JoinSet<()>,
    stopping: CancellationToken,
}

impl Default for ActorTasks {
    fn default() -> Self {
        ActorTasks::new()
    }
}

impl ActorTasks {
    pub fn new() -> Self {
        ActorTasks {
            tasks: JoinSet::new(),
            stopping: CancellationToken::new(),
        }
    }

    /// Runs `work` until it ends or the actor stops (then it is cut off
    /// wherever it waits).
    pub fn run<M, E>(
        &mut self,
        myself: ActorRef<M>,
        what: &'static str,
        work: impl Future<Output = Result<(), E>> + Send + 'static,
        ended: fn(String) -> M,
    ) where
        M: ractor::Message,
        E: std::fmt::Display,
    {
        let stopping = self.stopping.clone();
        self.run_draining(
            myself,
            what,
            move |_| async move {
                tokio::select! {
                    _ = stopping.cancelled() => Ok(()),
                    result = work => result,
                }
            },
            ended,
        );
    }

    /// Runs the loop `work(stopping)` makes; when the actor stops,
    /// `stopping` is cancelled and the loop is awaited: it should finish
    /// what it has in hand, start nothing new, and return.
    pub fn run_draining<M, E, F>(
        &mut self,
        myself: ActorRef<M>,
        what: &'static str,
        work: impl FnOnce(CancellationToken) -> F,
        ended: fn(String) -> M,
    ) where
        M: ractor::Message,
        E: std::fmt::Display,
        F: Future<Output = Result<(), E>> + Send + 'static,
    {
        use futures::FutureExt;
        let stopping = self.stopping.clone();
        let work = work(stopping.clone());
        self.tasks.spawn(async move {
            let reason = match std::panic::AssertUnwindSafe(work).catch_unwind().await {
                Ok(Ok(())) => format!("{what} returned"),
                Ok(Err(e)) => format!("{what} failed: {e}"),
                Err(_) => format!("{what} panicked"),
            };
            if !stopping.is_cancelled() {
                let _ = myself.cast(ended(reason));
            }
        });
    }

    /// Stops every loop as [`run`](Self::run) and
    /// [`run_draining`](Self::run_draining) say, and waits for all of them.
    /// The daemon's shutdown deadline bounds the wait.
    pub async fn finish(&mut self) {
        self.stopping.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// One line of the actor tree in `/admin/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ActorStatus {
    pub name: &'static str,
    pub running: bool,
    pub restarts: u64,
}
