//! SseHub: the live job stream's fan-out, one filtered list per client.
//!
//! ```text
//!  broker stream `jobs`      (job.posted, job.updated, job.closed; every
//!        │                     process reads all of it: a Tail —
//!        │                     XREAD on Redis, the log itself in-process)
//!        │  tail task, owned by the hub: cursor → Published(batch)
//!        ▼
//!  SseHub actor ── board (board.rs): the open jobs, newest first, with their
//!        │         filter keys; the history (the last `sse.history` events);
//!        │         each event routed once per distinct filter
//!        │         one ClientQueue per client (queue.rs), grouped by filter
//!        ▼
//!  GET /api/jobs/stream handlers (src/http/stream.rs): subscribe, catch up, forward
//! ```
//!
//! A connect is two calls, in this order: [`SseHubMsg::Subscribe`] registers
//! the client's queue under its filter, *then* [`SseHubMsg::CatchUp`]
//! answers its snapshot (or what its filter missed since `Last-Event-ID`)
//! with the cursor it reaches. An event published between the two lands in
//! the queue *and* may be in the snapshot; the handler forwards only queued
//! events past the cursor it has sent, so nothing falls in the gap and
//! nothing is shown twice.
//!
//! Snapshots come from memory: the hub reads the open jobs (up to
//! `sse.index_jobs`) from the database once, when it starts, and keeps them
//! current from the stream. Start order matters for the same reason as a
//! connect: first the stream's newest id, then the database read, then the
//! stream from that id; a job event seen both ways is recognised by the
//! job's id and `version` and not announced twice (also what absorbs a
//! relay's duplicate publish, and an edit relayed before its post).
//!
//! The hub never waits on a client. A slow client's queue keeps the newest
//! event per job; past `sse.client_queue` jobs it owes the client one
//! snapshot, rendered here (a [`SseHubMsg::CatchUp`] without a cursor) when
//! the client's stream takes it; only a client that leaves it untaken for
//! `sse.stall_timeout_ms` while its queue keeps overflowing is let go
//! (queue.rs).
//!
//! If the hub crashes, its supervisor restarts it; the clients' queues close
//! with it, so they reconnect and resume — nothing durable lives here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tracing::{info, warn};

mod board;
mod queue;

pub use board::{Board, BoardEvent, BoardSize};
pub use queue::{ClientQueue, Next, Pushed};

use super::{ActorSlot, ActorTasks};
use crate::broker::{Broker, EventCursor};
use crate::domain::{topics, JobFilter};
use crate::rate::TokenBucket;
use crate::retry::reconnect_pause;
use crate::store::BoardReads;
use crate::telemetry::metrics as m;

/// How many stream entries one read takes.
const READ_BATCH: u64 = 500;

#[derive(Clone)]
pub struct SseHubArgs {
    pub store: Arc<dyn BoardReads>,
    /// Where the jobs stream is read from; `None` (this process delivers
    /// nothing: `relay.enabled = false` without Redis): the board is read
    /// once and no deltas arrive.
    pub broker: Option<Arc<dyn Broker>>,
    /// Open jobs the board holds (`sse.index_jobs`), how many a snapshot
    /// carries (`sse.snapshot_jobs`), events kept for `Last-Event-ID`
    /// (`sse.history`).
    pub size: BoardSize,
    /// Where the hub tells the request path which resumes are cheap.
    pub resume_window: Arc<ResumeWindow>,
    /// The connects' admission, which a resume is charged to.
    pub admission: Arc<Admission>,
}

/// The cursors a `Last-Event-ID` must fall between to be caught up from
/// the history, without a snapshot: kept by the hub, read by admission and
/// `/readyz`. None while the hub has no board (starting, restarting): every
/// stream connect is then turned away with `retry:`.
#[derive(Default)]
pub struct ResumeWindow(Mutex<Option<(EventCursor, EventCursor)>>);

impl ResumeWindow {
    fn set(&self, window: Option<(EventCursor, EventCursor)>) {
        if let Ok(mut held) = self.0.lock() {
            *held = window;
        }
    }

    /// Whether a client resuming after `after` needs no snapshot.
    pub fn covers(&self, after: EventCursor) -> bool {
        self.0
            .lock()
            .map(|w| w.is_some_and(|(floor, top)| after >= floor && after <= top))
            .unwrap_or(false)
    }

    /// Whether the hub has read its board and serves streams.
    pub fn board_loaded(&self) -> bool {
        self.0.lock().map(|w| w.is_some()).unwrap_or(false)
    }
}

/// What a client needs before its deltas.
pub enum CatchUp {
    /// Its filter's open jobs as one `event: snapshot` frame, at `cursor`.
    Snapshot { cursor: EventCursor, frame: Bytes },
    /// What its filter missed after its `Last-Event-ID`, from the history.
    Missed {
        cursor: EventCursor,
        frames: Vec<Bytes>,
    },
    /// The hub has not read the board yet (it is starting).
    NotReady,
}

pub enum SseHubMsg {
    /// Registers a client's queue under its filter; answers its id (`None`
    /// while closing).
    Subscribe {
        filter: JobFilter,
        queue: Arc<ClientQueue>,
        reply: RpcReplyPort<Option<u64>>,
    },
    /// The client's snapshot, or what it missed after `after`.
    CatchUp {
        after: Option<EventCursor>,
        filter: JobFilter,
        reply: RpcReplyPort<CatchUp>,
    },
    /// A client went away.
    Unsubscribe(u64),
    /// The board as first read: the stream's cursor read before the
    /// database, and the open jobs, newest first.
    Loaded {
        cursor: EventCursor,
        jobs: Vec<serde_json::Value>,
    },
    /// Entries read from the stream, in order: cursor, topic, payload.
    Published(Vec<(EventCursor, String, serde_json::Value)>),
    /// Ends every stream (shutdown): queues close, handlers send `retry:`.
    CloseAll,
    /// The stream-reading task ended (it never should); the hub fails.
    TailEnded(String),
}

pub struct SseHub;

/// The clients of one filter.
type Group = HashMap<u64, Arc<ClientQueue>>;

pub struct SseHubState {
    args: SseHubArgs,
    /// `None` until the board is read.
    board: Option<Board>,
    /// Clients by filter: an event is routed once per filter.
    groups: HashMap<JobFilter, Group>,
    filter_of: HashMap<u64, JobFilter>,
    next_client: u64,
    closing: bool,
    /// The tail task.
    tasks: ActorTasks,
}

impl SseHubState {
    fn client_count(&self) -> usize {
        self.filter_of.len()
    }

    fn publish(&mut self, cursor: EventCursor, topic: &str, payload: serde_json::Value) {
        let Some(board) = self.board.as_mut() else {
            return;
        };
        let Some(event) = board.apply(cursor, topic, payload) else {
            return;
        };
        m::sse_event();
        let (mut conflated, mut resnapshots, mut evicted) = (0, 0, 0);
        let mut gone = Vec::new();
        let now = Instant::now();
        for (filter, clients) in &self.groups {
            let Some(frame) = event.frame_for(filter) else {
                continue;
            };
            for (id, queue) in clients {
                match queue.push(event.cursor, event.job, frame, now) {
                    Pushed::Queued | Pushed::Covered => {}
                    Pushed::Conflated => conflated += 1,
                    Pushed::Resnapshot => resnapshots += 1,
                    Pushed::Evicted => {
                        evicted += 1;
                        gone.push(*id);
                    }
                    Pushed::Closed => gone.push(*id),
                }
            }
        }
        self.args.resume_window.set(Some(board.resume_window()));
        for id in gone {
            self.unsubscribe(id);
        }
        m::sse_conflated(conflated);
        m::sse_resnapshots(resnapshots);
        if evicted > 0 {
            m::sse_evicted(evicted);
        }
        m::sse_clients(self.client_count());
    }

    fn unsubscribe(&mut self, id: u64) {
        if let Some(filter) = self.filter_of.remove(&id) {
            if let Some(group) = self.groups.get_mut(&filter) {
                group.remove(&id);
                if group.is_empty() {
                    self.groups.remove(&filter);
                }
            }
        }
    }

    fn catch_up(&mut self, after: Option<EventCursor>, filter: &JobFilter) -> CatchUp {
        let Some(board) = self.board.as_mut() else {
            return CatchUp::NotReady;
        };
        if let Some(after) = after {
            if let Some(frames) = board.missed(after, filter) {
                // Charged by what it read back: the whole history's worth
                // costs what a snapshot does. Admitted already (it was
                // cheap to promise); the charge slows the connects after it.
                let read_back = board.events_after(after) as f64;
                let history = (self.args.size.history.max(1)) as f64;
                self.args.admission.charge(read_back / history);
                return CatchUp::Missed {
                    cursor: board.cursor.max(after),
                    frames: frames.into_iter().map(|(_, frame)| frame).collect(),
                };
            }
        }
        CatchUp::Snapshot {
            cursor: board.cursor,
            frame: board.snapshot(filter),
        }
    }
}

/// Reads the first snapshot, then follows the stream, forever.
async fn follow_stream(
    myself: ActorRef<SseHubMsg>,
    store: Arc<dyn BoardReads>,
    broker: Option<Arc<dyn Broker>>,
    index_jobs: usize,
) -> anyhow::Result<()> {
    let tail = broker
        .map(|b| b.tail(topics::JOBS_STREAM, Duration::from_secs(5)))
        .transpose()?;
    // The stream's position first, the database second: a job committed in
    // between is then both in the snapshot and after the cursor, never in
    // neither.
    let mut failures = 0;
    let mut cursor = loop {
        let Some(tail) = &tail else {
            break EventCursor::ZERO;
        };
        match tail.newest().await {
            Ok(cursor) => break cursor,
            Err(e) => {
                failures += 1;
                warn!(error = %e, "sse hub: cannot read the stream's position; retrying");
                tokio::time::sleep(reconnect_pause(failures)).await;
            }
        }
    };
    let jobs = loop {
        match store
            // One more than the board holds: whether there are more.
            .list_jobs(
                u32::try_from(index_jobs.saturating_add(1)).unwrap_or(u32::MAX),
                None,
                &JobFilter::default(),
            )
            .await
        {
            Ok(jobs) => break jobs,
            Err(e) => {
                failures += 1;
                warn!(error = %e, "sse hub: cannot read the latest jobs; retrying");
                tokio::time::sleep(reconnect_pause(failures)).await;
            }
        }
    };
    let jobs = jobs
        .iter()
        .filter_map(|job| serde_json::to_value(job).ok())
        .collect();
    if myself.cast(SseHubMsg::Loaded { cursor, jobs }).is_err() {
        return Ok(()); // the hub is gone
    }
    let Some(tail) = tail else {
        warn!("no broker in this process: the job stream serves its snapshot but no live deltas");
        return std::future::pending().await;
    };
    failures = 0;
    loop {
        match tail.read_after(cursor, READ_BATCH).await {
            Ok(entries) => {
                failures = 0;
                let mut batch = Vec::with_capacity(entries.len());
                for (at, envelope) in entries {
                    cursor = at;
                    match envelope {
                        Ok(envelope) => batch.push((at, envelope.topic, envelope.payload)),
                        Err(e) => warn!(error = %e, "sse hub: unreadable stream entry skipped"),
                    }
                }
                if !batch.is_empty() && myself.cast(SseHubMsg::Published(batch)).is_err() {
                    return Ok(()); // the hub is gone
                }
            }
            Err(e) => {
                failures += 1;
                warn!(error = %e, "sse hub: stream read failed; retrying");
                tokio::time::sleep(reconnect_pause(failures)).await;
            }
        }
    }
}

impl SseHubState {
    /// Ends every client's stream (what it has queued is still written).
    fn close_all(&mut self) {
        for queue in self.groups.values().flat_map(|group| group.values()) {
            queue.close();
        }
        self.groups.clear();
        self.filter_of.clear();
        m::sse_clients(0);
    }
}

impl Actor for SseHub {
    type Msg = SseHubMsg;
    type State = SseHubState;
    type Arguments = SseHubArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SseHubArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        // A restarted hub has no board until its reader has read one.
        args.resume_window.set(None);
        let mut tasks = ActorTasks::new();
        tasks.run(
            myself.clone(),
            "job stream reader",
            follow_stream(
                myself,
                args.store.clone(),
                args.broker.clone(),
                args.size.jobs,
            ),
            SseHubMsg::TailEnded,
        );
        m::sse_clients(0);
        Ok(SseHubState {
            args,
            board: None,
            groups: HashMap::new(),
            filter_of: HashMap::new(),
            next_client: 0,
            closing: false,
            tasks,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.tasks.finish().await;
        // A stopped or crashed hub ends its clients' streams: they resume
        // with the restarted one.
        state.close_all();
        state.args.resume_window.set(None);
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SseHubMsg::Subscribe {
                filter,
                queue,
                reply,
            } => {
                if state.closing {
                    queue.close();
                    let _ = reply.send(None);
                    return Ok(());
                }
                state.next_client += 1;
                let id = state.next_client;
                state
                    .groups
                    .entry(filter.clone())
                    .or_default()
                    .insert(id, queue);
                state.filter_of.insert(id, filter);
                m::sse_clients(state.client_count());
                let _ = reply.send(Some(id));
            }
            SseHubMsg::CatchUp {
                after,
                filter,
                reply,
            } => {
                let _ = reply.send(state.catch_up(after, &filter));
            }
            SseHubMsg::Unsubscribe(id) => {
                state.unsubscribe(id);
                m::sse_clients(state.client_count());
            }
            SseHubMsg::Loaded { cursor, jobs } => {
                let board = Board::load(state.args.size, cursor, jobs);
                if !board.is_complete() {
                    warn!(
                        index_jobs = state.args.size.jobs,
                        "sse hub: more jobs are open than sse.index_jobs; a filter's \
                         snapshot shows its matches among the newest only"
                    );
                }
                info!(%cursor, jobs = board.len(), "sse hub: board loaded");
                state.args.resume_window.set(Some(board.resume_window()));
                state.board = Some(board);
            }
            SseHubMsg::Published(batch) => {
                for (cursor, topic, data) in batch {
                    state.publish(cursor, &topic, data);
                }
            }
            SseHubMsg::CloseAll => {
                state.closing = true;
                state.close_all();
            }
            SseHubMsg::TailEnded(reason) => {
                return Err(format!("sse hub: {reason}").into());
            }
        }
        Ok(())
    }
}

/// Admits new stream connections at `sse.admit_per_sec`. A burst of a fifth of a second's worth is allowed;
/// past it a connect is turned away with a jittered `retry:`.
pub struct Admission {
    bucket: Mutex<TokenBucket>,
}

impl Admission {
    pub fn new(rate: f64) -> Admission {
        let burst = (rate / 5.0).max(1.0);
        Admission {
            bucket: Mutex::new(TokenBucket::new(rate, burst, tokio::time::Instant::now())),
        }
    }

    /// Spends `tokens` (a fraction of one connect's), into debt if need
    /// be: a resume's cost, paid by the connects after it.
    pub fn charge(&self, tokens: f64) {
        if let Ok(mut bucket) = self.bucket.lock() {
            bucket.take(tokens, tokio::time::Instant::now());
        }
    }

    pub fn try_admit(&self) -> bool {
        let Ok(mut bucket) = self.bucket.lock() else {
            return false;
        };
        bucket.try_take(1.0, tokio::time::Instant::now()).is_ok()
    }
}

/// The request path's way into the hub.
#[derive(Clone)]
pub struct SseHubHandle {
    pub slot: Arc<ActorSlot<SseHubMsg>>,
    pub admission: Arc<Admission>,
    /// Capacity of each client's queue (`sse.client_queue`).
    pub client_queue: usize,
    /// How long a client may leave a snapshot it is owed untaken while its
    /// queue keeps overflowing (`sse.stall_timeout_ms`).
    pub stall_timeout: Duration,
    /// Which resumes need no snapshot (kept by the hub).
    pub resume_window: Arc<ResumeWindow>,
    /// Comment sent on an idle stream this often (`sse.heartbeat_ms`), so
    /// proxies and browsers do not take it for dead.
    pub heartbeat: Duration,
}

/// Why a connect is answered with `retry:` alone.
#[derive(Debug)]
pub enum NotAdmitted {
    /// Over the admission rate.
    OverRate,
    /// The hub is restarting, starting or shutting down.
    Unavailable,
}

/// A client's registration, undone when the stream is dropped.
pub struct Subscription {
    id: u64,
    hub: ActorRef<SseHubMsg>,
    filter: JobFilter,
    pub queue: Arc<ClientQueue>,
}

impl Subscription {
    /// The client's snapshot, or what it missed after `after`: asked
    /// *after* subscribing; `after` = `None` is also how a stream takes the
    /// snapshot its queue owes it after an overflow. The future owns what
    /// it needs, so a stream can hold it while the hub answers.
    pub fn catch_up(
        &self,
        after: Option<EventCursor>,
    ) -> impl std::future::Future<Output = CatchUp> + Send + 'static {
        let (hub, filter) = (self.hub.clone(), self.filter.clone());
        async move {
            ractor::call!(hub, |reply| SseHubMsg::CatchUp {
                after,
                filter,
                reply
            })
            .unwrap_or(CatchUp::NotReady)
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.hub.cast(SseHubMsg::Unsubscribe(self.id));
    }
}

impl SseHubHandle {
    /// Admission by cost, then registration of a fresh bounded queue under
    /// `filter`. A client resuming within the history (`resume_after` in
    /// the hub's window) costs a slice of it and is always admitted; one
    /// that needs a snapshot takes a token of `sse.admit_per_sec`, so under
    /// a reconnect storm the cheap ones all get in first.
    pub async fn subscribe(
        &self,
        filter: JobFilter,
        resume_after: Option<EventCursor>,
    ) -> Result<Subscription, NotAdmitted> {
        let hub = self.slot.get().ok_or(NotAdmitted::Unavailable)?;
        let cheap = resume_after.is_some_and(|after| self.resume_window.covers(after));
        if !cheap && !self.admission.try_admit() {
            m::sse_rejected();
            return Err(NotAdmitted::OverRate);
        }
        let queue = ClientQueue::new(self.client_queue, self.stall_timeout);
        let registered = queue.clone();
        let registered_filter = filter.clone();
        let id = ractor::call!(hub, |reply| SseHubMsg::Subscribe {
            filter: registered_filter,
            queue: registered,
            reply
        })
        .ok()
        .flatten()
        .ok_or(NotAdmitted::Unavailable)?;
        Ok(Subscription {
            id,
            hub,
            filter,
            queue,
        })
    }

    /// Ends every open stream (shutdown).
    pub fn close_all(&self) {
        if let Some(hub) = self.slot.get() {
            let _ = hub.cast(SseHubMsg::CloseAll);
        }
    }
}
