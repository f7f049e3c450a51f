//! The root supervisor: starts every child, restarts a crashed one with
//! exponential backoff, and refills its [`ActorSlot`] so the rest of the
//! daemon reaches the new instance.
//!
//! Restarts are handled in `handle_supervisor_evt`: a child that fails (panic
//! or error) or stops unexpectedly is reported (an error log line and a Sentry
//! event; a panic's own Sentry event comes from the panic hook) and respawned
//! after `100 ms · 2^n` (capped at 10 s), where `n` counts that child's
//! restarts within the last minute. A child that dies more than
//! [`MAX_RESTARTS_PER_MINUTE`] times in a minute is not restarted again: the
//! supervisor escalates (a fatal Sentry event) and stops, the daemon exits
//! with an error, and its service manager (systemd, Docker) restarts the whole
//! process instead of letting one actor loop hot.
//! Children keep no state worth saving: everything durable is in the database.
//!
//! Each child is described by a [`Child`]: its name, its slot and how to spawn
//! it. [`SlotChild`] is the one implementation, for any actor whose arguments
//! can be cloned into each restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use tracing::{error, info, warn};

use super::auditor::{Auditor, AuditorArgs};
use super::consumer::{ConsumerActor, ConsumerArgs, ConsumerMsg};
use super::dlq_monitor::{DlqMonitor, DlqMonitorArgs};
use super::email_sender::EmailSender;
use super::janitor::{Janitor, JanitorArgs};
use super::key_registry::{KeyRegistry, KeyRegistryArgs};
use super::ledger::LedgerConsumer;
use super::outbox_relay::{OutboxRelay, OutboxRelayArgs, OutboxRelayMsg};
use super::retry_budget::{RetryBudget, RetryBudgetArgs, RetryBudgetMsg};
use super::sse_hub::{SseHub, SseHubArgs, SseHubMsg};
use super::{ActorSlot, ActorStatus};

/// Deaths of one child within a minute that are still restarted; one more
/// escalates.
pub const MAX_RESTARTS_PER_MINUTE: usize = 5;

/// A supervised child: how to (re)spawn it and where its live reference is.
#[async_trait::async_trait]
pub trait Child: Send + Sync {
    fn name(&self) -> &'static str;
    /// Spawns the actor linked to `supervisor` and fills its slot.
    async fn spawn(&self, supervisor: ActorCell) -> Result<(), ActorProcessingErr>;
    /// The running instance, if any.
    fn cell(&self) -> Option<ActorCell>;
    /// Empties the slot (the instance died) and counts a restart.
    fn died(&self) -> u64;
    fn status(&self) -> ActorStatus;
}

/// A [`Child`] for actor `A`, spawned with clones of `args`.
pub struct SlotChild<A: Actor> {
    /// Builds the actor value (actors here are unit structs).
    actor: fn() -> A,
    args: A::Arguments,
    slot: Arc<ActorSlot<A::Msg>>,
}

impl<A: Actor> SlotChild<A> {
    pub fn new(actor: fn() -> A, args: A::Arguments, slot: Arc<ActorSlot<A::Msg>>) -> Arc<Self> {
        Arc::new(SlotChild { actor, args, slot })
    }
}

#[async_trait::async_trait]
impl<A> Child for SlotChild<A>
where
    A: Actor,
    A::Arguments: Clone + Sync,
{
    fn name(&self) -> &'static str {
        self.slot.name()
    }

    async fn spawn(&self, supervisor: ActorCell) -> Result<(), ActorProcessingErr> {
        let (actor, _) =
            Actor::spawn_linked(None, (self.actor)(), self.args.clone(), supervisor).await?;
        self.slot.set(Some(actor));
        Ok(())
    }

    fn cell(&self) -> Option<ActorCell> {
        self.slot.get().map(|a| a.get_cell())
    }

    fn died(&self) -> u64 {
        self.slot.set(None);
        self.slot.record_restart()
    }

    fn status(&self) -> ActorStatus {
        self.slot.status()
    }
}

/// Handles to the running tree, shared with the HTTP front.
#[derive(Clone)]
pub struct ActorTree {
    pub supervisor: ActorRef<SupervisorMsg>,
    /// Every child, in start order.
    children: Arc<Vec<Arc<dyn Child>>>,
}

/// Arguments of every child of the tree.
pub struct TreeArgs {
    pub key_registry: KeyRegistryArgs,
    pub retry_budget: RetryBudgetArgs,
    /// `None` when the pipeline is off (no broker configured yet).
    pub outbox_relay: Option<OutboxRelayArgs>,
    pub email_sender: Option<ConsumerArgs<EmailSender>>,
    pub ledger: Option<ConsumerArgs<LedgerConsumer>>,
    pub dlq_monitor: DlqMonitorArgs,
    pub janitor: JanitorArgs,
    pub auditor: AuditorArgs,
    pub sse_hub: SseHubArgs,
}

/// The slots of the pipeline's actors, for those that talk to each other.
pub struct Slots {
    pub retry_budget: Arc<ActorSlot<RetryBudgetMsg>>,
    pub outbox_relay: Arc<ActorSlot<OutboxRelayMsg>>,
    pub email_sender: Arc<ActorSlot<ConsumerMsg>>,
    pub sse_hub: Arc<ActorSlot<SseHubMsg>>,
}

impl Slots {
    pub fn new() -> Slots {
        Slots {
            retry_budget: ActorSlot::new("retry_budget"),
            outbox_relay: ActorSlot::new("outbox_relay"),
            email_sender: ActorSlot::new("email_sender"),
            sse_hub: ActorSlot::new("sse_hub"),
        }
    }
}

impl Default for Slots {
    fn default() -> Self {
        Slots::new()
    }
}

impl ActorTree {
    /// Starts the tree; returns once every child is running, with the
    /// supervisor's join handle: it finishes when the tree stops (at shutdown,
    /// or when the supervisor escalated).
    pub async fn start(
        args: TreeArgs,
        slots: Slots,
    ) -> Result<(ActorTree, tokio::task::JoinHandle<()>), anyhow::Error> {
        let mut children: Vec<Arc<dyn Child>> = vec![
            SlotChild::new(
                KeyRegistry::new,
                args.key_registry,
                ActorSlot::new("key_registry"),
            ),
            SlotChild::new(|| RetryBudget, args.retry_budget, slots.retry_budget),
        ];
        if let Some(relay) = args.outbox_relay {
            children.push(SlotChild::new(|| OutboxRelay, relay, slots.outbox_relay));
        }
        if let Some(sender) = args.email_sender {
            children.push(SlotChild::new(
                ConsumerActor::<EmailSender>::new,
                sender,
                slots.email_sender,
            ));
        }
        if let Some(ledger) = args.ledger {
            children.push(SlotChild::new(
                ConsumerActor::<LedgerConsumer>::new,
                ledger,
                ActorSlot::new("ledger"),
            ));
        }
        children.push(SlotChild::new(
            DlqMonitor::new,
            args.dlq_monitor,
            ActorSlot::new("dlq_monitor"),
        ));
        children.push(SlotChild::new(
            Janitor::new,
            args.janitor,
            ActorSlot::new("janitor"),
        ));
        children.push(SlotChild::new(
            Auditor::new,
            args.auditor,
            ActorSlot::new("auditor"),
        ));
        children.push(SlotChild::new(|| SseHub, args.sse_hub, slots.sse_hub));
        let children = Arc::new(children);
        let (supervisor, handle) = Actor::spawn(None, HeraldSupervisor, children.clone()).await?;
        Ok((
            ActorTree {
                supervisor,
                children,
            },
            handle,
        ))
    }

    /// Statuses of every child, for `/admin/status`.
    pub fn status(&self) -> Vec<ActorStatus> {
        self.children.iter().map(|c| c.status()).collect()
    }

    /// Stops the tree (children first, via linking).
    pub fn stop(&self) {
        self.supervisor.stop(Some("shutdown".into()));
    }
}

pub enum SupervisorMsg {
    /// Respawn the named child (sent to itself after the backoff delay).
    Restart(&'static str),
}

pub struct SupervisorState {
    children: Arc<Vec<Arc<dyn Child>>>,
    /// Recent restart instants per child, for the backoff.
    recent_restarts: HashMap<&'static str, Vec<Instant>>,
    /// Restarts waiting out their backoff, stopped with the supervisor.
    pending_restarts: Vec<super::Timer<Result<(), ractor::MessagingErr<SupervisorMsg>>>>,
    stopping: bool,
}

pub struct HeraldSupervisor;

impl Actor for HeraldSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = Arc<Vec<Arc<dyn Child>>>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        children: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        for child in children.iter() {
            child.spawn(myself.get_cell()).await?;
        }
        Ok(SupervisorState {
            children,
            recent_restarts: HashMap::new(),
            pending_restarts: Vec::new(),
            stopping: false,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.stopping = true;
        // Last started, first stopped; each is waited for, so the consumers
        // record the deliveries they hold before the daemon exits (its
        // shutdown deadline bounds the whole stop).
        for child in state.children.iter().rev() {
            if let Some(cell) = child.cell() {
                if let Err(e) = cell.stop_and_wait(None, None).await {
                    warn!(actor = child.name(), error = %e, "actor did not stop cleanly");
                }
            }
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let SupervisorMsg::Restart(name) = message;
        if state.stopping {
            return Ok(());
        }
        if let Some(child) = state.children.iter().find(|c| c.name() == name) {
            child.spawn(myself.get_cell()).await?;
            info!(actor = name, "restarted");
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        if state.stopping {
            return Ok(());
        }
        let Some(child) = state
            .children
            .iter()
            .find(|c| c.cell().is_some_and(|c| c.get_id() == cell.get_id()))
        else {
            return Ok(());
        };
        let name = child.name();
        let restarts = child.died();
        let now = Instant::now();
        let recent = state.recent_restarts.entry(name).or_default();
        recent.retain(|t| now.duration_since(*t) < Duration::from_secs(60));
        recent.push(now);
        if recent.len() > MAX_RESTARTS_PER_MINUTE {
            let message = format!(
                "actor {name} died {} times within a minute (last: {reason}); escalating: \
                 the daemon stops so its service manager restarts it",
                recent.len()
            );
            error!(actor = name, %reason, restarts, "{message}");
            sentry::capture_message(&message, sentry::Level::Fatal);
            state.stopping = true;
            myself.stop(Some(message));
            return Ok(());
        }
        let exp = (recent.len() as u32 - 1).min(7);
        let delay = Duration::from_millis(100 * 2u64.pow(exp)).min(Duration::from_secs(10));
        error!(actor = name, %reason, restarts, ?delay, "actor died; restarting");
        sentry::capture_message(
            &format!("actor {name} died ({reason}); restarting in {delay:?}"),
            sentry::Level::Error,
        );
        state.pending_restarts.retain(|t| !t.is_finished());
        state.pending_restarts.push(super::Timer::hold(
            myself.send_after(delay, move || SupervisorMsg::Restart(name)),
        ));
        Ok(())
    }
}
