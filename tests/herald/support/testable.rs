//! [`Testable`]: runs any of Herald's actors unchanged and reports each
//! message it handled, so an in-process test awaits the actor instead of
//! sleeping (after indexer-rs's `TestableActor`).

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::mpsc;

/// `A`, with a report after every handled message (`Err` carries the
/// handler's error text).
pub struct Testable<A> {
    inner: A,
    handled: mpsc::UnboundedSender<Result<(), String>>,
}

/// The reports of one [`Testable`] actor.
pub struct Handled(mpsc::UnboundedReceiver<Result<(), String>>);

impl Handled {
    /// Waits (at most 10 s) for the next handled message; its result.
    pub async fn next(&mut self) -> Result<(), String> {
        tokio::time::timeout(Duration::from_secs(10), self.0.recv())
            .await
            .expect("the actor handled no message within 10 s")
            .expect("the actor stopped")
    }

    /// Asserts the actor stops (within 10 s) having handled no message
    /// since the last report.
    pub async fn assert_stopped_without_a_message(&mut self) {
        let report = tokio::time::timeout(Duration::from_secs(10), self.0.recv())
            .await
            .expect("the actor stops within 10 s");
        assert!(report.is_none(), "a message was handled: {report:?}");
    }
}

/// Spawns `actor` with `args` behind the wrapper.
pub async fn spawn<A: Actor>(actor: A, args: A::Arguments) -> (ActorRef<A::Msg>, Handled) {
    let (handled, reports) = mpsc::unbounded_channel();
    let (actor, _) = Actor::spawn(
        None,
        Testable {
            inner: actor,
            handled,
        },
        args,
    )
    .await
    .expect("the actor starts");
    (actor, Handled(reports))
}

impl<A: Actor> Actor for Testable<A> {
    type Msg = A::Msg;
    type State = A::State;
    type Arguments = A::Arguments;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        self.inner.pre_start(myself, args).await
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        self.inner.post_start(myself, state).await
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        self.inner.post_stop(myself, state).await
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let result = self.inner.handle(myself, message, state).await;
        let _ = self
            .handled
            .send(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        result
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        self.inner.handle_supervisor_evt(myself, event, state).await
    }
}
