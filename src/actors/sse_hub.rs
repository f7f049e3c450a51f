//! SseHub: the live job stream's fan-out.
//!
//! ```text
//!  broker stream `jobs`      (job.posted, job.updated, job.closed; every
//!        │                     process reads all of it: a Tail —
//!        │                     XREAD on Redis, the log itself in-process)
//!        │  tail task, owned by the hub: cursor → Published(batch)
//!        ▼
//!  SseHub actor ── latest jobs (the snapshot, in memory)
//!        │         history ring (the last `sse.history` events, for Last-Event-ID)
//!        │         one bounded tokio channel per client (the hub owns the senders)
//!        ▼
//!  GET /api/jobs/stream handlers (src/http/stream.rs): subscribe, catch up, forward
//! ```
//!
//! A connect is two calls, in this order: [`SseHubMsg::Subscribe`] registers
//! the client's queue, *then* [`SseHubMsg::CatchUp`] answers the snapshot (or
//! the events missed since `Last-Event-ID`) with the cursor it reaches. An
//! event published between the two lands in the queue *and* may be in the
//! snapshot; the handler forwards only queued events past the cursor it has
//! sent, so nothing falls in the gap and nothing is shown twice.
//!
//! The snapshot comes from memory: the hub reads the latest jobs from the
//! database once, when it starts, and keeps them current from the stream.
//! Start order matters for the same reason as a connect: first the stream's
//! newest id, then the database read, then the stream from that id; a job
//! event seen both ways is recognised by the job's id and `version` and not
//! announced twice (also what absorbs a relay's duplicate publish, and an
//! edit relayed before its post: the older event is not announced).
//!
//! The hub never waits on a client: a full queue evicts the client (its stream
//! ends with a jittered `retry:` and the browser resumes with Last-Event-ID),
//! counted in `herald_sse_evicted_total`. Memory is bounded by `sse.history`
//! events plus `sse.client_queue` shared pointers per client.
//!
//! If the hub crashes, its supervisor restarts it; the clients' queues close
//! with it, so they reconnect and resume — nothing durable lives here.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc;
use tracing::{info, warn};
use uuid::Uuid;

use super::{ActorSlot, ActorTasks};
use crate::broker::{Broker, EventCursor};
use crate::domain::{topics, JobFilter};
use crate::rate::TokenBucket;
use crate::retry::reconnect_pause;
use crate::store::Store;
use crate::telemetry::metrics as m;

/// How many stream entries one read takes.
const READ_BATCH: u64 = 500;

#[derive(Clone)]
pub struct SseHubArgs {
    pub store: Arc<dyn Store>,
    /// Where the jobs stream is read from; `None` (this process delivers
    /// nothing: `relay.enabled = false` without Redis): the snapshot is read
    /// once and no deltas arrive.
    pub broker: Option<Arc<dyn Broker>>,
    /// How many of the latest jobs the snapshot carries.
    pub snapshot_jobs: usize,
    /// How many events the history ring keeps for `Last-Event-ID`.
    pub history: usize,
}

/// One event, rendered once and shared by every client's queue.
#[derive(Debug)]
pub struct StreamEvent {
    pub cursor: EventCursor,
    /// `id:`, `event:` and `data:` lines, ready to write.
    pub frame: Bytes,
}

/// What a client needs before its deltas.
pub enum CatchUp {
    /// The latest jobs as one `event: snapshot` frame, at `cursor`.
    Snapshot { cursor: EventCursor, frame: Bytes },
    /// The events after the client's `Last-Event-ID`, from the history.
    Missed {
        cursor: EventCursor,
        events: Vec<Arc<StreamEvent>>,
    },
    /// The hub has not read its first snapshot yet (it is starting).
    NotReady,
}

pub enum SseHubMsg {
    /// Registers a client's queue; answers its id (`None` while closing).
    Subscribe {
        queue: mpsc::Sender<Arc<StreamEvent>>,
        reply: RpcReplyPort<Option<u64>>,
    },
    /// The snapshot, or what was missed after `after`.
    CatchUp {
        after: Option<EventCursor>,
        reply: RpcReplyPort<CatchUp>,
    },
    /// A client went away.
    Unsubscribe(u64),
    /// The first snapshot: the stream's cursor read before the database.
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

pub struct SseHubState {
    args: SseHubArgs,
    /// Every stream event at or before this cursor is reflected in `latest`.
    cursor: EventCursor,
    loaded: bool,
    /// Newest first: (job id, job JSON).
    latest: VecDeque<(Uuid, serde_json::Value)>,
    /// The snapshot frame for the current `latest`, rendered on first use.
    snapshot: Option<Bytes>,
    /// The last events, oldest first.
    history: VecDeque<Arc<StreamEvent>>,
    /// The history holds every event after this cursor.
    history_floor: EventCursor,
    /// The newest version seen of each recent job (announced, or in the
    /// first snapshot), bounded: an entry at or below it is a duplicate
    /// publish or arrived out of order, and is not announced.
    versions: HashMap<Uuid, i64>,
    versions_order: VecDeque<Uuid>,
    clients: HashMap<u64, mpsc::Sender<Arc<StreamEvent>>>,
    next_client: u64,
    closing: bool,
    /// The tail task.
    tasks: ActorTasks,
}

impl SseHubState {
    /// Records `version` of `job`; false when an equal or newer one was
    /// seen (then the entry changes nothing).
    fn remember(&mut self, job: Uuid, version: i64) -> bool {
        match self.versions.get_mut(&job) {
            Some(seen) if *seen >= version => return false,
            Some(seen) => {
                *seen = version;
                return true;
            }
            None => {}
        }
        self.versions.insert(job, version);
        self.versions_order.push_back(job);
        let bound = 2 * (self.args.history + self.args.snapshot_jobs).max(1);
        while self.versions_order.len() > bound {
            if let Some(old) = self.versions_order.pop_front() {
                self.versions.remove(&old);
            }
        }
        true
    }

    fn snapshot_frame(&mut self) -> Bytes {
        if let Some(frame) = &self.snapshot {
            return frame.clone();
        }
        let jobs: Vec<&serde_json::Value> = self.latest.iter().map(|(_, job)| job).collect();
        let data = serde_json::json!({ "jobs": jobs }).to_string();
        let frame = Bytes::from(format!(
            "id: {}\nevent: snapshot\ndata: {data}\n\n",
            self.cursor
        ));
        self.snapshot = Some(frame.clone());
        frame
    }

    /// Brings the snapshot's jobs (newest first, by id) up to one event:
    /// a posted or edited job is put in its place, a closed one removed.
    fn apply_to_latest(&mut self, topic: &str, id: Uuid, data: &serde_json::Value) {
        let at = self.latest.iter().position(|(held, _)| *held == id);
        if topic == topics::JOB_CLOSED {
            if let Some(at) = at {
                self.latest.remove(at);
            }
            return;
        }
        match at {
            Some(at) => self.latest[at].1 = data.clone(),
            None => {
                let at = self
                    .latest
                    .iter()
                    .position(|(held, _)| *held < id)
                    .unwrap_or(self.latest.len());
                self.latest.insert(at, (id, data.clone()));
                self.latest.truncate(self.args.snapshot_jobs);
            }
        }
    }

    fn publish(&mut self, cursor: EventCursor, topic: &str, data: serde_json::Value) {
        if cursor <= self.cursor {
            return;
        }
        self.cursor = cursor;
        if ![topics::JOB_POSTED, topics::JOB_UPDATED, topics::JOB_CLOSED].contains(&topic) {
            warn!(%cursor, topic, "job stream entry of an unknown topic; skipped");
            return;
        }
        let Some(id) = job_id(&data) else {
            warn!(%cursor, topic, "job stream entry without a job id; skipped");
            return;
        };
        // A job posted before jobs had versions is at its first.
        let version = data.get("version").and_then(|v| v.as_i64()).unwrap_or(1);
        if !self.remember(id, version) {
            return;
        }
        let frame = Bytes::from(format!("id: {cursor}\nevent: {topic}\ndata: {data}\n\n"));
        self.apply_to_latest(topic, id, &data);
        self.snapshot = None;
        let event = Arc::new(StreamEvent { cursor, frame });
        self.history.push_back(event.clone());
        while self.history.len() > self.args.history {
            if let Some(old) = self.history.pop_front() {
                self.history_floor = old.cursor;
            }
        }
        m::sse_event();
        let mut evicted = 0;
        self.clients
            .retain(|_, queue| match queue.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    evicted += 1;
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
        if evicted > 0 {
            m::sse_evicted(evicted);
        }
        m::sse_clients(self.clients.len());
    }

    fn catch_up(&mut self, after: Option<EventCursor>) -> CatchUp {
        if !self.loaded {
            return CatchUp::NotReady;
        }
        match after {
            Some(after) if after >= self.history_floor && after <= self.cursor => CatchUp::Missed {
                cursor: self.cursor.max(after),
                events: self
                    .history
                    .iter()
                    .filter(|e| e.cursor > after)
                    .cloned()
                    .collect(),
            },
            _ => CatchUp::Snapshot {
                cursor: self.cursor,
                frame: self.snapshot_frame(),
            },
        }
    }
}

fn job_id(job: &serde_json::Value) -> Option<Uuid> {
    job.get("id")?.as_str()?.parse().ok()
}

/// Reads the first snapshot, then follows the stream, forever.
async fn follow_stream(
    myself: ActorRef<SseHubMsg>,
    store: Arc<dyn Store>,
    broker: Option<Arc<dyn Broker>>,
    snapshot_jobs: usize,
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
            .list_jobs(
                u32::try_from(snapshot_jobs).unwrap_or(u32::MAX),
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

impl Actor for SseHub {
    type Msg = SseHubMsg;
    type State = SseHubState;
    type Arguments = SseHubArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SseHubArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut tasks = ActorTasks::new();
        tasks.run(
            myself.clone(),
            "job stream reader",
            follow_stream(
                myself,
                args.store.clone(),
                args.broker.clone(),
                args.snapshot_jobs,
            ),
            SseHubMsg::TailEnded,
        );
        m::sse_clients(0);
        Ok(SseHubState {
            args,
            cursor: EventCursor::ZERO,
            loaded: false,
            latest: VecDeque::new(),
            snapshot: None,
            history: VecDeque::new(),
            history_floor: EventCursor::ZERO,
            versions: HashMap::new(),
            versions_order: VecDeque::new(),
            clients: HashMap::new(),
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
        state.clients.clear();
        m::sse_clients(0);
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SseHubMsg::Subscribe { queue, reply } => {
                if state.closing {
                    let _ = reply.send(None);
                    return Ok(());
                }
                state.next_client += 1;
                state.clients.insert(state.next_client, queue);
                m::sse_clients(state.clients.len());
                let _ = reply.send(Some(state.next_client));
            }
            SseHubMsg::CatchUp { after, reply } => {
                let _ = reply.send(state.catch_up(after));
            }
            SseHubMsg::Unsubscribe(id) => {
                state.clients.remove(&id);
                m::sse_clients(state.clients.len());
            }
            SseHubMsg::Loaded { cursor, jobs } => {
                for job in jobs {
                    if let Some(id) = job_id(&job) {
                        let version = job.get("version").and_then(|v| v.as_i64()).unwrap_or(1);
                        if state.remember(id, version) {
                            state.latest.push_back((id, job));
                        }
                    }
                }
                state.latest.truncate(state.args.snapshot_jobs);
                state.cursor = cursor;
                state.history_floor = cursor;
                state.snapshot = None;
                state.loaded = true;
                info!(%cursor, jobs = state.latest.len(), "sse hub: snapshot loaded");
            }
            SseHubMsg::Published(batch) => {
                for (cursor, topic, data) in batch {
                    state.publish(cursor, &topic, data);
                }
            }
            SseHubMsg::CloseAll => {
                state.closing = true;
                state.clients.clear();
                m::sse_clients(0);
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
    pub queue: mpsc::Receiver<Arc<StreamEvent>>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.hub.cast(SseHubMsg::Unsubscribe(self.id));
    }
}

impl SseHubHandle {
    /// Admission, then registration of a fresh bounded queue.
    pub async fn subscribe(&self) -> Result<Subscription, NotAdmitted> {
        let hub = self.slot.get().ok_or(NotAdmitted::Unavailable)?;
        if !self.admission.try_admit() {
            m::sse_rejected();
            return Err(NotAdmitted::OverRate);
        }
        let (queue, receiver) = mpsc::channel(self.client_queue);
        let id = ractor::call!(hub, |reply| SseHubMsg::Subscribe { queue, reply })
            .ok()
            .flatten()
            .ok_or(NotAdmitted::Unavailable)?;
        Ok(Subscription {
            id,
            hub,
            queue: receiver,
        })
    }

    /// The snapshot or the missed events, asked *after* subscribing.
    pub async fn catch_up(
        &self,
        subscription: &Subscription,
        after: Option<EventCursor>,
    ) -> CatchUp {
        ractor::call!(subscription.hub, |reply| SseHubMsg::CatchUp {
            after,
            reply
        })
        .unwrap_or(CatchUp::NotReady)
    }

    /// Ends every open stream (shutdown).
    pub fn close_all(&self) {
        if let Some(hub) = self.slot.get() {
            let _ = hub.cast(SseHubMsg::CloseAll);
        }
    }
}
