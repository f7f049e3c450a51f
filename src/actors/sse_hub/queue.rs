//! One stream client's queue: what the hub has routed to it and it has not
//! written yet, bounded without cutting the client off.
//!
//! - **Conflation.** The queue holds at most one event per job, the newest:
//!   a job's older event still waiting is dropped when a newer one comes
//!   (it would be replaced on the client anyway), and the newer one goes to
//!   the back, so what is written stays in stream order (`herald_sse_conflated_total`).
//! - **Resnapshot.** When `sse.client_queue` distinct jobs wait and another
//!   comes, the waiting events are replaced by one `snapshot` at the hub's
//!   cursor, which already reflects them all (`herald_sse_resnapshots_total`).
//! - **Last resort.** Only a client that overflows again before it has even
//!   taken that snapshot is disconnected (`herald_sse_evicted_total`); it
//!   comes back with `Last-Event-ID`.
//!
//! The hub pushes (never waiting); the client's stream takes, woken through
//! an `AtomicWaker`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::task::AtomicWaker;
use uuid::Uuid;

use crate::broker::EventCursor;

/// What became of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// An older event of the same job was dropped for it.
    Conflated,
    /// The queue was full: replaced by a snapshot.
    Resnapshot,
    /// Full again before the snapshot was taken: the client is let go.
    Evicted,
    /// The stream has ended; nothing is queued.
    Closed,
}

struct State {
    capacity: usize,
    /// A snapshot that replaces everything before it; written first.
    snapshot: Option<(EventCursor, Bytes)>,
    /// Events after it, at most one per job, in stream order.
    events: VecDeque<(EventCursor, Uuid, Bytes)>,
    closed: bool,
}

pub struct ClientQueue {
    state: Mutex<State>,
    waker: AtomicWaker,
}

impl ClientQueue {
    /// A queue of at most `capacity` distinct jobs (at least one).
    pub fn new(capacity: usize) -> Arc<ClientQueue> {
        Arc::new(ClientQueue {
            state: Mutex::new(State {
                capacity: capacity.max(1),
                snapshot: None,
                events: VecDeque::new(),
                closed: false,
            }),
            waker: AtomicWaker::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind: use it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `frame`, job `job`'s event at `cursor`; `snapshot` renders
    /// the client's snapshot at that cursor, asked only on overflow.
    pub fn push(
        &self,
        cursor: EventCursor,
        job: Uuid,
        frame: &Bytes,
        snapshot: impl FnOnce() -> Bytes,
    ) -> Pushed {
        let pushed = {
            let mut state = self.lock();
            if state.closed {
                return Pushed::Closed;
            }
            if let Some(at) = state.events.iter().position(|(_, held, _)| *held == job) {
                state.events.remove(at);
                state.events.push_back((cursor, job, frame.clone()));
                Pushed::Conflated
            } else if state.events.len() < state.capacity {
                state.events.push_back((cursor, job, frame.clone()));
                Pushed::Queued
            } else if state.snapshot.is_some() {
                state.events.clear();
                state.snapshot = None;
                state.closed = true;
                Pushed::Evicted
            } else {
                state.events.clear();
                state.snapshot = Some((cursor, snapshot()));
                Pushed::Resnapshot
            }
        };
        self.waker.wake();
        pushed
    }

    /// Ends the stream once what is queued has been written.
    pub fn close(&self) {
        self.lock().closed = true;
        self.waker.wake();
    }

    /// The next frame and its cursor, and whether it is a snapshot;
    /// `Ready(None)` once closed and drained.
    pub fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<(EventCursor, Bytes, bool)>> {
        self.waker.register(cx.waker());
        let mut state = self.lock();
        if let Some((cursor, frame)) = state.snapshot.take() {
            return Poll::Ready(Some((cursor, frame, true)));
        }
        if let Some((cursor, _, frame)) = state.events.pop_front() {
            return Poll::Ready(Some((cursor, frame, false)));
        }
        if state.closed {
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker_ref;

    fn cursor(n: u64) -> EventCursor {
        EventCursor::parse(&format!("{n}-0")).unwrap()
    }

    fn drain(queue: &ClientQueue) -> Vec<(String, bool)> {
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut out = Vec::new();
        while let Poll::Ready(Some((_, frame, snapshot))) = queue.poll_next(&mut cx) {
            out.push((String::from_utf8(frame.to_vec()).unwrap(), snapshot));
        }
        out
    }

    #[test]
    fn a_job_s_newer_event_replaces_its_waiting_one_and_goes_to_the_back() {
        let queue = ClientQueue::new(4);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let frame = |s: &'static str| Bytes::from_static(s.as_bytes());
        let never = || -> Bytes { panic!("no snapshot while it fits") };
        assert_eq!(
            queue.push(cursor(1), a, &frame("a1"), never),
            Pushed::Queued
        );
        assert_eq!(
            queue.push(cursor(2), b, &frame("b1"), never),
            Pushed::Queued
        );
        assert_eq!(
            queue.push(cursor(3), a, &frame("a2"), never),
            Pushed::Conflated
        );
        assert_eq!(
            drain(&queue),
            [("b1".to_string(), false), ("a2".to_string(), false)]
        );
    }

    #[test]
    fn overflow_becomes_a_snapshot_and_overflowing_it_unread_ends_the_stream() {
        let queue = ClientQueue::new(2);
        let frame = Bytes::from_static(b"e");
        let snap = || Bytes::from_static(b"snapshot");
        for n in 0..2 {
            assert_eq!(
                queue.push(cursor(n), Uuid::now_v7(), &frame, snap),
                Pushed::Queued
            );
        }
        assert_eq!(
            queue.push(cursor(3), Uuid::now_v7(), &frame, snap),
            Pushed::Resnapshot
        );
        for n in 4..6 {
            assert_eq!(
                queue.push(cursor(n), Uuid::now_v7(), &frame, snap),
                Pushed::Queued
            );
        }
        // Taken: the next overflow is a snapshot again, not an eviction.
        assert_eq!(drain(&queue).first(), Some(&("snapshot".to_string(), true)));
        for n in 6..8 {
            queue.push(cursor(n), Uuid::now_v7(), &frame, snap);
        }
        assert_eq!(
            queue.push(cursor(9), Uuid::now_v7(), &frame, snap),
            Pushed::Resnapshot
        );
        for n in 10..12 {
            queue.push(cursor(n), Uuid::now_v7(), &frame, snap);
        }
        assert_eq!(
            queue.push(cursor(12), Uuid::now_v7(), &frame, snap),
            Pushed::Evicted
        );
        assert!(drain(&queue).is_empty());
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(matches!(queue.poll_next(&mut cx), Poll::Ready(None)));
    }
}
