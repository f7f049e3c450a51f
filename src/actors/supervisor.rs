//! The root supervisor: starts every child, restarts a crashed one with
//! exponential backoff, and refills its [`ActorSlot`] so the HTTP front
//! reaches the new instance.
//!
//! Restarts are handled in `handle_supervisor_evt`: a child that fails (panic
//! or error) or stops unexpectedly is respawned after `100 ms · 2^n` (capped at
//! 10 s), where `n` counts restarts within the last minute. Children keep no
//! state worth saving: everything durable is in the database.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tracing::{error, info};

use super::key_registry::{KeyRegistry, KeyRegistryArgs, KeyRegistryHandle, KeyRegistryMsg};
use super::ActorSlot;

/// Handles to the running tree, shared with the HTTP front.
#[derive(Clone)]
pub struct ActorTree {
    pub supervisor: ActorRef<SupervisorMsg>,
    pub key_registry: Arc<ActorSlot<KeyRegistryMsg>>,
    /// The request path's way into the KeyRegistry.
    pub keys: KeyRegistryHandle,
}

impl ActorTree {
    /// Starts the tree; returns once every child is running.
    pub async fn start(key_registry_args: KeyRegistryArgs) -> Result<ActorTree, anyhow::Error> {
        let key_registry = ActorSlot::new("key_registry");
        let keys = KeyRegistryHandle::new(key_registry_args.clone(), key_registry.clone());
        let (supervisor, _handle) = Actor::spawn(
            None,
            HeraldSupervisor,
            SupervisorArgs {
                key_registry: key_registry.clone(),
                key_registry_args,
            },
        )
        .await?;
        Ok(ActorTree {
            supervisor,
            key_registry,
            keys,
        })
    }

    /// Statuses of every child, for `/admin/status`.
    pub fn status(&self) -> Vec<super::ActorStatus> {
        vec![self.key_registry.status()]
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

pub struct SupervisorArgs {
    key_registry: Arc<ActorSlot<KeyRegistryMsg>>,
    key_registry_args: KeyRegistryArgs,
}

pub struct SupervisorState {
    args: SupervisorArgs,
    /// Recent restart instants, for the backoff.
    recent_restarts: Vec<Instant>,
    stopping: bool,
}

pub struct HeraldSupervisor;

impl HeraldSupervisor {
    async fn spawn_key_registry(
        myself: &ActorRef<SupervisorMsg>,
        args: &SupervisorArgs,
    ) -> Result<(), ActorProcessingErr> {
        let (actor, _) = Actor::spawn_linked(
            None,
            KeyRegistry,
            args.key_registry_args.clone(),
            myself.get_cell(),
        )
        .await?;
        args.key_registry.set(Some(actor));
        Ok(())
    }
}

impl Actor for HeraldSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Self::spawn_key_registry(&myself, &args).await?;
        Ok(SupervisorState {
            args,
            recent_restarts: Vec::new(),
            stopping: false,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.stopping = true;
        if let Some(child) = state.args.key_registry.get() {
            child.stop(None);
        }
        state.args.key_registry.set(None);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMsg::Restart("key_registry") if !state.stopping => {
                Self::spawn_key_registry(&myself, &state.args).await?;
                info!(actor = "key_registry", "restarted");
            }
            SupervisorMsg::Restart(_) => {}
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
        let is_registry = state
            .args
            .key_registry
            .get()
            .is_some_and(|r| r.get_id() == cell.get_id());
        if !is_registry {
            return Ok(());
        }
        state.args.key_registry.set(None);
        let restarts = state.args.key_registry.record_restart();
        let now = Instant::now();
        state
            .recent_restarts
            .retain(|t| now.duration_since(*t) < Duration::from_secs(60));
        state.recent_restarts.push(now);
        let exp = (state.recent_restarts.len() as u32 - 1).min(7);
        let delay = Duration::from_millis(100 * 2u64.pow(exp)).min(Duration::from_secs(10));
        error!(actor = "key_registry", %reason, restarts, ?delay, "actor died; restarting");
        myself.send_after(delay, || SupervisorMsg::Restart("key_registry"));
        Ok(())
    }
}
