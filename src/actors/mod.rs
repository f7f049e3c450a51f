//! The supervised actor tree.
//!
//! ```text
//!   HeraldSupervisor (root; restarts a crashed child with backoff, reports it to
//!   │                 Sentry, escalates — stops the daemon — when one keeps crashing)
//!   ├── KeyRegistry    resolves Idempotency-Keys: Redis hot tier (if any), the database as truth
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
//!   └── SseHub         job.posted (every process reads the whole topic) -> bounded
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
pub mod retry_budget;
pub mod sse_hub;
pub mod supervisor;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use ractor::ActorRef;

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

/// Runs an actor's long-lived loop on its own task and, should the loop
/// ever end (an error, a return, a panic), sends the actor `ended(reason)`,
/// which the actor answers by failing, so its supervisor restarts it.
pub fn spawn_loop<M, E>(
    myself: ActorRef<M>,
    what: &'static str,
    work: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
    ended: fn(String) -> M,
) -> tokio::task::JoinHandle<()>
where
    M: ractor::Message,
    E: std::fmt::Display,
{
    use futures::FutureExt;
    tokio::spawn(async move {
        let reason = match std::panic::AssertUnwindSafe(work).catch_unwind().await {
            Ok(Ok(())) => format!("{what} returned"),
            Ok(Err(e)) => format!("{what} failed: {e}"),
            Err(_) => format!("{what} panicked"),
        };
        let _ = myself.cast(ended(reason));
    })
}

/// One line of the actor tree in `/admin/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ActorStatus {
    pub name: &'static str,
    pub running: bool,
    pub restarts: u64,
}
