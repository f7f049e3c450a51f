//! `GET /api/jobs/stream`: the live job stream as Server-Sent Events.
//!
//! A connect names its filter (`q`, `location`, `company`, as on `GET
//! /api/jobs`; a malformed one is a 400), is admitted by cost (a resume the
//! history covers always, one that needs a snapshot through the hub's token
//! bucket), subscribes to the [`SseHub`](crate::actors::sse_hub) *first*,
//! then asks it for its snapshot (or, with a `Last-Event-ID` the history
//! still covers, what its filter missed since), then forwards the queued
//! deltas past the cursor it has sent. The
//! answer is always HTTP 200 — a browser's EventSource gives up for good on
//! anything else — and a connect that cannot be served now (over the rate,
//! hub restarting, shutting down) gets only a jittered `retry:` and is closed.
//!
//! Every stream opens with a per-client jittered `retry:`, carries a
//! heartbeat comment every `sse.heartbeat_ms` (15 s), and ends — when the hub evicts the client,
//! restarts, or shuts down — with another jittered `retry:`, so clients do
//! not come back in one wave. No database query is made on any of these paths.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use http::{HeaderValue, StatusCode};
use rand::Rng;
use warp::reply::{Reply, Response};

use super::{AppState, Request};
use crate::actors::sse_hub::{CatchUp, Next, NotAdmitted, Subscription};
use crate::broker::EventCursor;

/// `retry:` windows, in milliseconds: on connect, when turned away, when the
/// stream ends (eviction, restart, shutdown).
const RETRY_ON_CONNECT_MS: (u64, u64) = (1_000, 4_000);
const RETRY_TURNED_AWAY_MS: (u64, u64) = (2_000, 8_000);
const RETRY_ON_END_MS: (u64, u64) = (1_000, 10_000);

fn retry_frame((low, high): (u64, u64)) -> Bytes {
    let millis = rand::rng().random_range(low..=high);
    Bytes::from(format!("retry: {millis}\n\n"))
}

/// The client's resume cursor; a malformed one is ignored (fresh snapshot):
/// a stream request is never refused for it.
fn last_event_id(request: &Request) -> Option<EventCursor> {
    request
        .headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(EventCursor::parse)
}

fn event_stream(body: warp::reply::Response) -> Response {
    let mut response = body;
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store"),
    );
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// A 200 carrying only a jittered `retry:`, then the end of the stream.
fn turned_away() -> Response {
    let mut response = event_stream(Response::new(retry_frame(RETRY_TURNED_AWAY_MS).into()));
    // Closed, not kept alive: the point is to shed this connection now.
    response
        .headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    response
}

pub async fn job_stream(state: &AppState, request: &Request) -> Response {
    // A filter the client got wrong is its bug, not a reason to retry: 400,
    // whatever the limits would have said.
    let filter = match super::job_filter(&request.query) {
        Ok(filter) => filter,
        Err(e) => return e.into_response(),
    };
    // This client's own limits first (connect rate, open streams), then the
    // process-wide admission: one address cannot use up everyone's rate.
    let slot = match state.limits.open_stream(request.client) {
        Ok(slot) => slot,
        Err(_) => return turned_away(),
    };
    let resume_after = last_event_id(request);
    let subscription = match state.sse.subscribe(filter, resume_after).await {
        Ok(subscription) => subscription,
        Err(NotAdmitted::OverRate | NotAdmitted::Unavailable) => return turned_away(),
    };
    // Failpoint: a pause between subscribing and asking for the snapshot
    // (the race this order closes).
    if let Some(pause) = crate::failpoints::pause("sse-after-subscribe") {
        tokio::time::sleep(pause).await;
    }
    let mut frames = VecDeque::from([retry_frame(RETRY_ON_CONNECT_MS)]);
    let sent_upto = match subscription.catch_up(resume_after).await {
        CatchUp::Snapshot { cursor, frame } => {
            frames.push_back(frame);
            cursor
        }
        CatchUp::Missed {
            cursor,
            frames: missed,
        } => {
            frames.extend(missed);
            cursor
        }
        CatchUp::NotReady => return turned_away(),
    };
    let stream = ClientStream {
        frames,
        subscription,
        _slot: slot,
        sent_upto,
        heartbeat: {
            let every = state.sse.heartbeat;
            tokio::time::interval_at(tokio::time::Instant::now() + every, every)
        },
        snapshot: None,
        ended: false,
    };
    event_stream(warp::reply::stream(stream).into_response())
}

/// One client's body: the catch-up frames, then its queue past `sent_upto`
/// (a snapshot the queue owes asked of the hub when it comes to it),
/// heartbeats in between, a jittered `retry:` at the end.
struct ClientStream {
    /// Frames to write before anything from the queue.
    frames: VecDeque<Bytes>,
    subscription: Subscription,
    /// The newest cursor this client has been sent (snapshot or event);
    /// queued events at or before it are already shown.
    sent_upto: EventCursor,
    heartbeat: tokio::time::Interval,
    /// The hub's answer to the snapshot the queue owes after an overflow;
    /// nothing from the queue is written until it has been. In a `Mutex`
    /// only because warp wants the body `Sync`; it is reached through
    /// `get_mut`, never locked.
    snapshot: Option<Mutex<Pin<Box<dyn Future<Output = CatchUp> + Send>>>>,
    ended: bool,
    /// This client's place in its open-stream count, given back when the
    /// stream ends (`None` with the per-client limits off).
    _slot: Option<super::limits::StreamSlot>,
}

impl Stream for ClientStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(frame) = this.frames.pop_front() {
            if this.frames.is_empty() {
                // The catch-up is written: its buffer is not kept for the
                // life of the stream.
                this.frames = VecDeque::new();
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        loop {
            if let Some(snapshot) = this.snapshot.as_mut() {
                let snapshot = snapshot.get_mut().unwrap_or_else(|p| p.into_inner());
                let Poll::Ready(answer) = snapshot.as_mut().poll(cx) else {
                    break;
                };
                this.snapshot = None;
                let CatchUp::Snapshot { cursor, frame } = answer else {
                    // The hub is gone (restarting): resume with it.
                    return this.end();
                };
                // Events queued meanwhile at or before its cursor are in it.
                this.sent_upto = this.sent_upto.max(cursor);
                return Poll::Ready(Some(Ok(frame)));
            }
            match this.subscription.queue.poll_next(cx) {
                Poll::Ready(Some(Next::Event(cursor, frame))) => {
                    if cursor > this.sent_upto {
                        this.sent_upto = cursor;
                        crate::telemetry::metrics::sse_delivered_after(seconds_since(cursor));
                        return Poll::Ready(Some(Ok(frame)));
                    }
                }
                Poll::Ready(Some(Next::Snapshot)) => {
                    this.snapshot = Some(Mutex::new(Box::pin(this.subscription.catch_up(None))));
                }
                // Evicted, or the hub restarted or is shutting down.
                Poll::Ready(None) => return this.end(),
                Poll::Pending => break,
            }
        }
        if this.heartbeat.poll_tick(cx).is_ready() {
            return Poll::Ready(Some(Ok(Bytes::from_static(b": heartbeat\n\n"))));
        }
        Poll::Pending
    }
}

/// Seconds since the event at `cursor` was published: a stream entry id's
/// first part is the broker's clock at publish, in milliseconds (Redis's
/// own, or the in-process broker's). A clock behind it reads as 0.
fn seconds_since(cursor: EventCursor) -> f64 {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    now_ms.saturating_sub(u128::from(cursor.millis)) as f64 / 1000.0
}

impl ClientStream {
    /// The last frame: a jittered `retry:`, then the end.
    fn end(&mut self) -> Poll<Option<Result<Bytes, Infallible>>> {
        self.ended = true;
        Poll::Ready(Some(Ok(retry_frame(RETRY_ON_END_MS))))
    }
}
