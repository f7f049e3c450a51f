//! The in-process broker of the embedded mode (no `redis_url`): Redis
//! Streams' semantics in memory, for one process.
//!
//! Each topic is a log of entries numbered like stream ids
//! (`<milliseconds>-<sequence>`, increasing). A consumer group keeps the
//! next entry to hand out and a pending list of entries handed out but not
//! acknowledged; `reclaim` gives a pending entry that stayed idle too long to
//! another reader (its worker died with a crashed actor). A tail reads the
//! whole log from a cursor. Readers wait on a [`Notify`] instead of polling.
//!
//! Nothing here is durable, and nothing needs to be: every entry comes from
//! an outbox row that stays unsettled until a consumer settles it. A kill -9
//! loses the log; after the restart the relay publishes those rows again
//! (its check finds the broker no longer holds them), and the inbox
//! absorbs any copy that was in fact delivered. The same holds for an entry
//! trimmed from a full log before anyone read it.
//!
//! Memory is bounded: an entry every group has acknowledged is dropped, and a
//! topic never holds more than [`MAX_ENTRIES`] entries, or
//! [`MAX_GROUP_ENTRIES`] when consumer groups read it (the oldest go first).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::domain::topics;

use super::{
    Broker, BrokerError, Delivery, Envelope, EventCursor, GroupReader, Holding, Received, Tail,
    Tailed,
};

/// Upper bound on the log of a fan-out topic (read only by tails): the
/// in-memory `MAXLEN`.
pub const MAX_ENTRIES: usize = 10_000;
/// Upper bound on the log of a topic consumer groups read, as Redis's
/// `MAXLEN` (entries every group acknowledged are dropped long before): a
/// backlog the provider's rate holds up waits here instead of being trimmed
/// and published again.
pub const MAX_GROUP_ENTRIES: usize = 1_000_000;

/// One published envelope.
struct Entry {
    cursor: EventCursor,
    envelope: Arc<Envelope>,
}

/// An entry handed to a group member and not yet acknowledged.
struct Pending {
    delivered_at: Instant,
}

#[derive(Default)]
struct Group {
    /// The next cursor to hand out: everything before it was read.
    next: EventCursor,
    /// Read, not acknowledged, by cursor.
    pending: BTreeMap<EventCursor, Pending>,
}

#[derive(Default)]
struct Topic {
    entries: VecDeque<Entry>,
    groups: HashMap<String, Group>,
    /// The newest cursor ever issued on this topic.
    last: EventCursor,
    /// Woken on every publish.
    published: Arc<Notify>,
}

impl Topic {
    /// The position of the first entry at or after `cursor`.
    fn index_from(&self, cursor: EventCursor) -> usize {
        self.entries.partition_point(|e| e.cursor < cursor)
    }

    fn get(&self, cursor: EventCursor) -> Option<&Entry> {
        let i = self.index_from(cursor);
        self.entries.get(i).filter(|e| e.cursor == cursor)
    }

    /// Drops entries every group has read and acknowledged, then the oldest
    /// beyond [`MAX_ENTRIES`]. A topic without groups (fan-out, read only by
    /// tails) keeps its last entries up to the bound.
    fn trim(&mut self) {
        if !self.groups.is_empty() {
            let keep_from = self
                .groups
                .values()
                .map(|g| {
                    g.pending
                        .keys()
                        .next()
                        .copied()
                        .unwrap_or(g.next)
                        .min(g.next)
                })
                .min()
                .unwrap_or(EventCursor::ZERO);
            let drop = self.index_from(keep_from);
            self.entries.drain(..drop);
        }
        let bound = if self.groups.is_empty() {
            MAX_ENTRIES
        } else {
            MAX_GROUP_ENTRIES
        };
        if self.entries.len() > bound {
            let excess = self.entries.len() - bound;
            self.entries.drain(..excess);
        }
    }
}

#[derive(Default)]
struct Log {
    topics: HashMap<String, Topic>,
}

/// The broker: shared by the relay, the consumers and the SseHub of one
/// process (cheap to clone).
#[derive(Clone, Default)]
pub struct InProcessBroker {
    log: Arc<Mutex<Log>>,
}

impl InProcessBroker {
    pub fn new() -> InProcessBroker {
        InProcessBroker::default()
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        // A panic while holding the lock cannot leave the log half-updated
        // in a way that matters (every entry is also an outbox row).
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The topic's notifier, to wait on for the next publish.
    fn notifier(&self, topic: &str) -> Arc<Notify> {
        self.lock()
            .topics
            .entry(topic.to_string())
            .or_default()
            .published
            .clone()
    }

    /// Runs `read` until it yields something or `block` elapses, waking on
    /// every publish to `topic`.
    async fn wait_for<T>(
        &self,
        topic: &str,
        block: Duration,
        mut read: impl FnMut(&mut Topic) -> Vec<T>,
    ) -> Vec<T> {
        let deadline = tokio::time::Instant::now() + block;
        let notify = self.notifier(topic);
        loop {
            // Registered before reading, so a publish in between wakes us.
            let published = notify.notified();
            tokio::pin!(published);
            published.as_mut().enable();
            let found = {
                let mut log = self.lock();
                read(log.topics.entry(topic.to_string()).or_default())
            };
            if !found.is_empty() {
                return found;
            }
            if tokio::time::timeout_at(deadline, published).await.is_err() {
                return Vec::new();
            }
        }
    }
}

/// The cursor after `last` at wall-clock `millis`, as Redis numbers ids.
fn next_cursor(last: EventCursor, millis: u64) -> EventCursor {
    if millis > last.millis {
        EventCursor { millis, seq: 0 }
    } else {
        EventCursor {
            millis: last.millis,
            seq: last.seq + 1,
        }
    }
}

fn now_millis() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

fn delivery(entry: &Entry) -> Received {
    Ok(Delivery {
        envelope: (*entry.envelope).clone(),
        receipt: entry.cursor.to_string(),
    })
}

#[async_trait]
impl Broker for InProcessBroker {
    fn name(&self) -> &'static str {
        "in-process"
    }

    async fn publish(&self, envelopes: &[Envelope]) -> Result<Vec<String>, BrokerError> {
        let mut woken = Vec::new();
        let mut receipts = Vec::with_capacity(envelopes.len());
        {
            let mut log = self.lock();
            let millis = now_millis();
            for envelope in envelopes {
                let topic = log
                    .topics
                    .entry(topics::stream(&envelope.topic).to_string())
                    .or_default();
                let cursor = next_cursor(topic.last, millis);
                topic.last = cursor;
                receipts.push(cursor.to_string());
                topic.entries.push_back(Entry {
                    cursor,
                    envelope: Arc::new(envelope.clone()),
                });
                topic.trim();
                woken.push(topic.published.clone());
            }
        }
        for notify in woken {
            notify.notify_waiters();
        }
        Ok(receipts)
    }

    async fn holds(
        &self,
        topic: &str,
        group: &str,
        receipts: &[String],
        unclaimed_after: Duration,
    ) -> Result<Vec<Holding>, BrokerError> {
        let log = self.lock();
        let now = Instant::now();
        Ok(receipts
            .iter()
            .map(|receipt| {
                let (Some(topic), Some(cursor)) = (
                    log.topics.get(topics::stream(topic)),
                    EventCursor::parse(receipt),
                ) else {
                    // A log from before a restart: nothing of it is here.
                    return Holding::Lost;
                };
                if topic.get(cursor).is_none() {
                    return Holding::Lost;
                }
                let Some(group) = topic.groups.get(group) else {
                    // The group, once made, reads from the oldest entry.
                    return Holding::Held;
                };
                match group.pending.get(&cursor) {
                    Some(p) if now.duration_since(p.delivered_at) >= unclaimed_after => {
                        Holding::Unclaimed
                    }
                    Some(_) => Holding::Held,
                    None if cursor >= group.next => Holding::Held,
                    // Read and acknowledged, yet its row is unsettled.
                    None => Holding::Lost,
                }
            })
            .collect())
    }

    fn group(
        &self,
        topic: &str,
        group: &str,
        _consumer: &str,
        block: Duration,
    ) -> Result<Arc<dyn GroupReader>, BrokerError> {
        Ok(Arc::new(InProcessGroup {
            broker: self.clone(),
            topic: topics::stream(topic).to_string(),
            group: group.to_string(),
            block,
        }))
    }

    fn tail(&self, topic: &str, block: Duration) -> Result<Box<dyn Tail>, BrokerError> {
        Ok(Box::new(InProcessTail {
            broker: self.clone(),
            topic: topics::stream(topic).to_string(),
            block,
        }))
    }
}

/// A member of one group on one topic.
struct InProcessGroup {
    broker: InProcessBroker,
    topic: String,
    group: String,
    block: Duration,
}

#[async_trait]
impl GroupReader for InProcessGroup {
    async fn ensure_group(&self) -> Result<(), BrokerError> {
        let mut log = self.broker.lock();
        let topic = log.topics.entry(self.topic.clone()).or_default();
        // A new group starts at the oldest entry still held (Redis: id 0).
        topic.groups.entry(self.group.clone()).or_default();
        Ok(())
    }

    async fn read(&self, count: u64) -> Result<Vec<Received>, BrokerError> {
        let group_name = self.group.clone();
        let limit = usize::try_from(count.max(1)).unwrap_or(usize::MAX);
        Ok(self
            .broker
            .wait_for(&self.topic, self.block, |topic| {
                let start = {
                    let group = topic.groups.entry(group_name.clone()).or_default();
                    group.next
                };
                let from = topic.index_from(start);
                let taken: Vec<(EventCursor, Received)> = topic
                    .entries
                    .iter()
                    .skip(from)
                    .take(limit)
                    .map(|e| (e.cursor, delivery(e)))
                    .collect();
                let group = topic.groups.entry(group_name.clone()).or_default();
                let now = Instant::now();
                for (cursor, _) in &taken {
                    group.pending.insert(*cursor, Pending { delivered_at: now });
                    group.next = next_cursor(*cursor, 0);
                }
                taken.into_iter().map(|(_, r)| r).collect()
            })
            .await)
    }

    async fn reclaim(&self, min_idle: Duration, count: u64) -> Result<Vec<Received>, BrokerError> {
        let mut log = self.broker.lock();
        let topic = log.topics.entry(self.topic.clone()).or_default();
        let now = Instant::now();
        let limit = usize::try_from(count.max(1)).unwrap_or(usize::MAX);
        let Some(group) = topic.groups.get(&self.group) else {
            return Ok(Vec::new());
        };
        let idle: Vec<EventCursor> = group
            .pending
            .iter()
            .filter(|(_, p)| now.duration_since(p.delivered_at) >= min_idle)
            .map(|(c, _)| *c)
            .take(limit)
            .collect();
        let mut reclaimed = Vec::new();
        let mut gone = Vec::new();
        for cursor in idle {
            match topic.get(cursor) {
                Some(entry) => reclaimed.push(delivery(entry)),
                // Trimmed: its outbox row is republished when it comes due.
                None => gone.push(cursor),
            }
        }
        if let Some(group) = topic.groups.get_mut(&self.group) {
            for received in &reclaimed {
                if let Some(cursor) = received
                    .as_ref()
                    .ok()
                    .and_then(|d| EventCursor::parse(&d.receipt))
                {
                    group.pending.insert(cursor, Pending { delivered_at: now });
                }
            }
            for cursor in gone {
                group.pending.remove(&cursor);
            }
        }
        Ok(reclaimed)
    }

    async fn ack(&self, receipts: &[String]) -> Result<(), BrokerError> {
        let mut log = self.broker.lock();
        let topic = log.topics.entry(self.topic.clone()).or_default();
        if let Some(group) = topic.groups.get_mut(&self.group) {
            for receipt in receipts {
                if let Some(cursor) = EventCursor::parse(receipt) {
                    group.pending.remove(&cursor);
                }
            }
        }
        topic.trim();
        Ok(())
    }
}

/// A reader of one topic's whole log.
struct InProcessTail {
    broker: InProcessBroker,
    topic: String,
    block: Duration,
}

#[async_trait]
impl Tail for InProcessTail {
    async fn newest(&self) -> Result<EventCursor, BrokerError> {
        let mut log = self.broker.lock();
        Ok(log.topics.entry(self.topic.clone()).or_default().last)
    }

    async fn read_after(
        &self,
        cursor: EventCursor,
        count: u64,
    ) -> Result<Vec<Tailed>, BrokerError> {
        let limit = usize::try_from(count.max(1)).unwrap_or(usize::MAX);
        let after = next_cursor(cursor, 0);
        Ok(self
            .broker
            .wait_for(&self.topic, self.block, |topic| {
                let from = topic.index_from(after);
                topic
                    .entries
                    .iter()
                    .skip(from)
                    .take(limit)
                    .map(|e| (e.cursor, Ok((*e.envelope).clone())))
                    .collect()
            })
            .await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn envelope(topic: &str, n: i64) -> Envelope {
        Envelope {
            event_id: Uuid::now_v7(),
            topic: topic.to_string(),
            attempts: 0,
            traceparent: None,
            payload: serde_json::json!({ "n": n }),
        }
    }

    fn n(received: &Received) -> i64 {
        received.as_ref().unwrap().envelope.payload["n"]
            .as_i64()
            .unwrap()
    }

    #[tokio::test]
    async fn the_broker_says_which_copies_it_still_holds_for_a_group() {
        let broker = InProcessBroker::new();
        let group = broker
            .group("t", "email", "me", Duration::from_millis(10))
            .unwrap();
        group.ensure_group().await.unwrap();
        let receipts = broker
            .publish(&[envelope("t", 0), envelope("t", 1), envelope("t", 2)])
            .await
            .unwrap();
        let held = |r: &[String], idle: Duration| {
            let broker = broker.clone();
            let r = r.to_vec();
            async move { broker.holds("t", "email", &r, idle).await.unwrap() }
        };
        let long = Duration::from_secs(60);
        // Unread: held.
        assert_eq!(held(&receipts, long).await, [Holding::Held; 3]);
        // Read, pending: held, until idle past `unclaimed_after`.
        let read = group.read(2).await.unwrap();
        assert_eq!(held(&receipts, long).await, [Holding::Held; 3]);
        assert_eq!(
            held(&receipts, Duration::ZERO).await,
            [Holding::Unclaimed, Holding::Unclaimed, Holding::Held]
        );
        // Acknowledged with its row unsettled: lost.
        group
            .ack(&[read[0].as_ref().unwrap().receipt.clone()])
            .await
            .unwrap();
        assert_eq!(held(&receipts, long).await[0], Holding::Lost);
        // A copy from before a restart (another broker's log): lost.
        let restarted = InProcessBroker::new();
        assert_eq!(
            restarted
                .holds("t", "email", &receipts, long)
                .await
                .unwrap(),
            [Holding::Lost; 3]
        );
    }

    #[tokio::test]
    async fn a_group_reads_each_entry_once_and_an_unacknowledged_one_is_reclaimed_when_idle() {
        let broker = InProcessBroker::new();
        let group = broker
            .group("t", "email", "me", Duration::from_millis(10))
            .unwrap();
        group.ensure_group().await.unwrap();
        let batch: Vec<_> = (0..5).map(|i| envelope("t", i)).collect();
        broker.publish(&batch).await.unwrap();
        let first = group.read(3).await.unwrap();
        let rest = group.read(10).await.unwrap();
        assert_eq!(first.iter().map(n).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(rest.iter().map(n).collect::<Vec<_>>(), [3, 4]);
        assert!(group.read(10).await.unwrap().is_empty());
        let receipts: Vec<String> = first
            .iter()
            .chain(&rest)
            .filter(|r| n(r) != 2)
            .map(|r| r.as_ref().unwrap().receipt.clone())
            .collect();
        group.ack(&receipts).await.unwrap();
        // Only entry 2 is pending; reclaim it once it has been idle.
        assert!(group
            .reclaim(Duration::from_secs(60), 10)
            .await
            .unwrap()
            .is_empty());
        let reclaimed = group.reclaim(Duration::ZERO, 10).await.unwrap();
        assert_eq!(reclaimed.iter().map(n).collect::<Vec<_>>(), [2]);
    }

    #[tokio::test]
    async fn a_blocked_reader_wakes_on_publish_and_tails_see_everything_in_cursor_order() {
        let broker = InProcessBroker::new();
        let tail = broker.tail("jobs", Duration::from_secs(5)).unwrap();
        let start = tail.newest().await.unwrap();
        let publisher = broker.clone();
        let mut waiting = tokio::task::JoinSet::new();
        waiting.spawn(async move { tail.read_after(start, 10).await.unwrap() });
        tokio::task::yield_now().await;
        publisher
            .publish(&[envelope("jobs", 1), envelope("jobs", 2)])
            .await
            .unwrap();
        let read = waiting.join_next().await.unwrap().unwrap();
        assert_eq!(read.len(), 2);
        assert!(read[0].0 < read[1].0 && read[0].0 > start);
        let tail = broker.tail("jobs", Duration::from_millis(10)).unwrap();
        assert!(tail.read_after(read[1].0, 10).await.unwrap().is_empty());
        assert_eq!(tail.read_after(read[0].0, 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn acknowledged_entries_are_dropped_and_a_topic_never_exceeds_its_bound() {
        let broker = InProcessBroker::new();
        let group = broker
            .group("t", "g", "me", Duration::from_millis(1))
            .unwrap();
        group.ensure_group().await.unwrap();
        broker.publish(&[envelope("t", 1)]).await.unwrap();
        let read = group.read(1).await.unwrap();
        group
            .ack(&[read[0].as_ref().unwrap().receipt.clone()])
            .await
            .unwrap();
        assert_eq!(broker.lock().topics["t"].entries.len(), 0);
        let many: Vec<_> = (0..(MAX_ENTRIES as i64 + 5))
            .map(|i| envelope("fan", i))
            .collect();
        broker.publish(&many).await.unwrap();
        assert_eq!(broker.lock().topics["fan"].entries.len(), MAX_ENTRIES);
    }
}
