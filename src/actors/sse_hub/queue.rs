//! One stream client's queue: what the hub has routed to it and it has not
//! written yet, bounded without cutting a slow client off.
//!
//! - **Conflation.** The queue holds at most one event per job, the newest:
//!   a job's older event still waiting is dropped when a newer one comes
//!   (it would be replaced on the client anyway), and the newer one goes to
//!   the back, so what is written stays in stream order (`herald_sse_conflated_total`).
//! - **Resnapshot.** When `sse.client_queue` distinct jobs wait and another
//!   comes, the waiting events are dropped and the queue owes the client one
//!   `snapshot` (`herald_sse_resnapshots_total`). It is rendered by the hub
//!   when the client's stream takes it, at the hub's cursor then, so it
//!   shows everything dropped before it *and* everything that overflowed
//!   while the client was still busy: a queue that fills again before the
//!   snapshot is taken just drops its events again. However busy the board,
//!   a slow client holds at most `sse.client_queue` frames and one snapshot
//!   owed, and loses nothing.
//! - **Last resort.** A client that leaves its owed snapshot untaken for
//!   `sse.stall_timeout_ms` while events keep overflowing its queue is not
//!   reading at all; it is disconnected (`herald_sse_evicted_total`) and
//!   comes back with `Last-Event-ID`. Eviction depends on time, not on how
//!   many events a busy board sends meanwhile.
//!
//! The hub pushes (never waiting); the client's stream takes, woken through
//! an `AtomicWaker`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

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
    /// The queue was full: its events were dropped for a snapshot owed.
    Resnapshot,
    /// Full again while a snapshot was already owed: dropped too (that
    /// snapshot, rendered when taken, shows them).
    Covered,
    /// Full again with the owed snapshot untaken for the stall timeout:
    /// the client is let go.
    Evicted,
    /// The stream has ended; nothing is queued.
    Closed,
}

/// What the client's stream takes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// A snapshot is owed: ask the hub for one (it replaces the client's
    /// list), then go on with the events after its cursor.
    Snapshot,
    /// One event's frame, at its cursor.
    Event(EventCursor, Bytes),
}

struct State {
    capacity: usize,
    /// How long an owed snapshot may stay untaken while the queue keeps
    /// overflowing before the client is let go.
    stall_timeout: Duration,
    /// Since when a snapshot is owed (it goes before the events).
    snapshot_owed: Option<Instant>,
    /// Events, at most one per job, in stream order.
    events: VecDeque<(EventCursor, Uuid, Bytes)>,
    closed: bool,
}

pub struct ClientQueue {
    state: Mutex<State>,
    waker: AtomicWaker,
}

impl ClientQueue {
    /// A queue of at most `capacity` distinct jobs (at least one) whose
    /// client is let go after leaving a snapshot untaken for `stall_timeout`.
    pub fn new(capacity: usize, stall_timeout: Duration) -> Arc<ClientQueue> {
        Arc::new(ClientQueue {
            state: Mutex::new(State {
                capacity: capacity.max(1),
                stall_timeout,
                snapshot_owed: None,
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

    /// Queues `frame`, job `job`'s event at `cursor`, at `now`.
    pub fn push(&self, cursor: EventCursor, job: Uuid, frame: &Bytes, now: Instant) -> Pushed {
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
            } else {
                state.events.clear();
                match state.snapshot_owed {
                    None => {
                        state.snapshot_owed = Some(now);
                        Pushed::Resnapshot
                    }
                    Some(since) if now.saturating_duration_since(since) < state.stall_timeout => {
                        Pushed::Covered
                    }
                    Some(_) => {
                        state.snapshot_owed = None;
                        state.closed = true;
                        Pushed::Evicted
                    }
                }
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

    /// What to write next; `Ready(None)` once closed and drained.
    pub fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<Next>> {
        self.waker.register(cx.waker());
        let mut state = self.lock();
        if state.snapshot_owed.take().is_some() {
            return Poll::Ready(Some(Next::Snapshot));
        }
        if let Some((cursor, _, frame)) = state.events.pop_front() {
            return Poll::Ready(Some(Next::Event(cursor, frame)));
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

    fn drain(queue: &ClientQueue) -> Vec<String> {
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut out = Vec::new();
        while let Poll::Ready(Some(next)) = queue.poll_next(&mut cx) {
            out.push(match next {
                Next::Snapshot => "snapshot".to_string(),
                Next::Event(_, frame) => String::from_utf8(frame.to_vec()).unwrap(),
            });
        }
        out
    }

    const STALL: Duration = Duration::from_secs(30);

    #[test]
    fn a_job_s_newer_event_replaces_its_waiting_one_and_goes_to_the_back() {
        let queue = ClientQueue::new(4, STALL);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let frame = |s: &'static str| Bytes::from_static(s.as_bytes());
        let now = Instant::now();
        assert_eq!(queue.push(cursor(1), a, &frame("a1"), now), Pushed::Queued);
        assert_eq!(queue.push(cursor(2), b, &frame("b1"), now), Pushed::Queued);
        assert_eq!(
            queue.push(cursor(3), a, &frame("a2"), now),
            Pushed::Conflated
        );
        assert_eq!(drain(&queue), ["b1", "a2"]);
    }

    #[test]
    fn overflow_owes_one_snapshot_however_often_it_overflows_until_the_stall_timeout() {
        let queue = ClientQueue::new(2, STALL);
        let frame = Bytes::from_static(b"e");
        let start = Instant::now();
        let push = |n: u64, at: Duration| queue.push(cursor(n), Uuid::now_v7(), &frame, start + at);
        assert_eq!(push(1, Duration::ZERO), Pushed::Queued);
        assert_eq!(push(2, Duration::ZERO), Pushed::Queued);
        assert_eq!(push(3, Duration::ZERO), Pushed::Resnapshot);
        // A busy board overflows it again and again within the timeout:
        // the one snapshot owed covers it all, nobody is let go.
        for n in 4..100 {
            let pushed = push(n, Duration::from_millis(n));
            assert!(
                matches!(pushed, Pushed::Queued | Pushed::Covered),
                "{n}: {pushed:?}"
            );
        }
        assert_eq!(drain(&queue), ["snapshot"]);
        // Taken: the next overflow owes a new snapshot, from then on.
        let later = STALL * 2;
        for n in 100..102 {
            assert_eq!(push(n, later), Pushed::Queued);
        }
        assert_eq!(push(102, later), Pushed::Resnapshot);
        for n in 103..105 {
            assert_eq!(push(n, later + STALL / 2), Pushed::Queued);
        }
        assert_eq!(push(105, later + STALL / 2), Pushed::Covered);
        for n in 106..108 {
            assert_eq!(push(n, later + STALL), Pushed::Queued);
        }
        // Untaken for the stall timeout, and overflowing: let go.
        assert_eq!(push(108, later + STALL), Pushed::Evicted);
        assert_eq!(push(109, later + STALL), Pushed::Closed);
        assert!(drain(&queue).is_empty());
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(matches!(queue.poll_next(&mut cx), Poll::Ready(None)));
    }
}
