//! One shape for the actors that work on a schedule: [`Every`]`<P>` runs a
//! [`Periodic`] job every period (and, if it asks, once at start), holding
//! its [`Ticker`] in its state, so the schedule stops with the actor. The
//! auditor, the DLQ monitor, the janitor and the KeyRegistry's Redis probe
//! are each a [`Periodic`] job and nothing else; their supervisor restarts
//! them like any child. A test runs one now by sending it [`Tick`].
//!
//! The timers themselves ([`Timer`], [`Ticker`]) live here too: the
//! supervisor holds its pending restarts as [`Timer`]s.

use std::marker::PhantomData;
use std::time::Duration;

use async_trait::async_trait;
use ractor::{Actor, ActorProcessingErr, ActorRef};

/// The one message of a periodic actor: run the job now.
#[derive(Debug, Clone, Copy)]
pub struct Tick;

/// A job run on a schedule by [`Every`].
#[async_trait]
pub trait Periodic: Send + Sync + Sized + 'static {
    /// Its settings, cloned into each restart.
    type Args: Clone + Send + Sync + 'static;

    /// Whether it also runs once at start, before the first period.
    const AT_START: bool;

    /// How often it runs; `None`: never (it has nothing to watch).
    fn period(args: &Self::Args) -> Option<Duration>;

    /// Its state at (re)start.
    fn start(args: Self::Args) -> Self;

    /// One run. A failure is the job's to log: the next run retries.
    async fn run(&mut self);
}

/// The actor that runs `P` every period.
pub struct Every<P>(PhantomData<fn() -> P>);

impl<P> Every<P> {
    pub const fn new() -> Self {
        Every(PhantomData)
    }
}

impl<P> Default for Every<P> {
    fn default() -> Self {
        Every::new()
    }
}

/// A periodic actor's state: its job, and the schedule that sends it
/// [`Tick`]s (stopped with the actor).
pub struct EveryState<P> {
    job: P,
    _ticker: Option<Ticker>,
}

impl<P: Periodic> Actor for Every<P> {
    type Msg = Tick;
    type State = EveryState<P>;
    type Arguments = P::Args;

    async fn pre_start(
        &self,
        myself: ActorRef<Tick>,
        args: P::Args,
    ) -> Result<Self::State, ActorProcessingErr> {
        let ticker = P::period(&args).map(|period| {
            let ticker = Ticker::every(&myself, period, || Tick);
            if P::AT_START {
                let _ = myself.cast(Tick);
            }
            ticker
        });
        Ok(EveryState {
            job: P::start(args),
            _ticker: ticker,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Tick>,
        _tick: Tick,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.job.run().await;
        Ok(())
    }
}

/// A timer task an actor holds in its state: ractor's `send_interval` and
/// `send_after` hand back the task's handle, and a handle dropped leaves the
/// task running — an interval until its next tick finds the actor gone (an
/// hour later for an hourly audit). Held here, it is aborted when the actor
/// stops and its state is dropped, or when it is replaced.
pub struct Timer<T = ()>(tokio::task::JoinHandle<T>);

/// An actor's periodic message to itself.
pub type Ticker = Timer<()>;

/// The actors whose ticker task is alive, so a test can see one stop.
static TICKING: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<ractor::ActorId>>> =
    std::sync::LazyLock::new(Default::default);

/// Whether the ticker task of `actor` is still alive.
pub fn is_ticking(actor: ractor::ActorId) -> bool {
    TICKING.lock().is_ok_and(|t| t.contains(&actor))
}

/// Marks an actor's ticker task alive for as long as the task holds it.
struct TickingMark(ractor::ActorId);

impl Drop for TickingMark {
    fn drop(&mut self) {
        if let Ok(mut ticking) = TICKING.lock() {
            ticking.remove(&self.0);
        }
    }
}

impl Ticker {
    /// Sends `message()` to `myself` every `period`, the first after one period.
    pub fn every<M: ractor::Message>(
        myself: &ActorRef<M>,
        period: std::time::Duration,
        message: fn() -> M,
    ) -> Ticker {
        let id = myself.get_id();
        if let Ok(mut ticking) = TICKING.lock() {
            ticking.insert(id);
        }
        // Owned by the task's closure: dropped when the task ends or is aborted.
        let mark = TickingMark(id);
        Timer(myself.send_interval(period, move || {
            let _alive = &mark;
            message()
        }))
    }
}

impl<T> Timer<T> {
    /// Holds the timer task `handle`.
    pub fn hold(handle: tokio::task::JoinHandle<T>) -> Timer<T> {
        Timer(handle)
    }

    /// Whether the task has ended (sent its message, or was stopped).
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

impl<T> Drop for Timer<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
