//! The broker between the OutboxRelay and the consumers.
//!
//! The relay publishes [`Envelope`]s; each consumer reads the topics it
//! handles as one member of a consumer group and acknowledges what it has
//! finished. Delivery is at-least-once: the same envelope may arrive twice
//! (a relay that crashed between publish and mark, a reclaimed pending entry,
//! a redelivery after Redis lost its data), and consumers absorb that with
//! their inbox. The broker is never the only copy of anything: every envelope
//! comes from an outbox row that stays unsettled until a consumer settles it.
//!
//! Two implementations of [`Broker`]: Redis Streams ([`redis_streams`]) in
//! production, shared by every process, and the in-process broker
//! ([`in_process`]) when no `redis_url` is configured (the embedded mode).
//! Both give the actors the same three roles:
//!
//! - publish (the OutboxRelay), Ok only once the broker holds the batch;
//! - a consumer group per consuming actor ([`GroupReader`]): read, ack, and
//!   reclaim what a dead reader left unacknowledged;
//! - a tail ([`Tail`]) per SseHub: every entry of a topic, from a cursor.

mod cursor;
pub mod in_process;
pub mod redis_streams;

pub use cursor::EventCursor;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Where events go between the relay and the consumers.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// `redis` or `in-process`, for `/admin/status` and the log.
    fn name(&self) -> &'static str;

    /// Appends every envelope to its topic; `Ok` only if all were accepted,
    /// with the broker's id of each copy, in order (a stream entry id).
    async fn publish(&self, envelopes: &[Envelope]) -> Result<Vec<String>, BrokerError>;

    /// Whether the broker still holds each copy published to `topic` under
    /// the given ids, for consumer `group`: waiting to be read, or read and
    /// pending (a worker has it). What it no longer holds (flushed, lost in a
    /// restart or failover, trimmed, acknowledged without being settled) is
    /// [`Holding::Lost`]; a copy pending on a reader that has left it idle
    /// for `unclaimed_after` is [`Holding::Unclaimed`].
    async fn holds(
        &self,
        topic: &str,
        group: &str,
        receipts: &[String],
        unclaimed_after: Duration,
    ) -> Result<Vec<Holding>, BrokerError>;

    /// This process's member `consumer` of `group`, reading `topic`; a read
    /// waits up to `block` for new entries.
    fn group(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        block: Duration,
    ) -> Result<Arc<dyn GroupReader>, BrokerError>;

    /// Every entry of `topic` from a cursor; a read waits up to `block`.
    fn tail(&self, topic: &str, block: Duration) -> Result<Box<dyn Tail>, BrokerError>;
}

/// What the broker says of one published copy ([`Broker::holds`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// Still there for the group: a consumer will get (or has) it.
    Held,
    /// Gone: only a new publish brings the event to its consumer.
    Lost,
    /// Pending on a reader that left it idle too long: nobody reclaimed it.
    Unclaimed,
}

/// One entry read by a group member: a delivery, or an unreadable entry
/// (with its receipt, to acknowledge and drop).
pub type Received = Result<Delivery, BrokerError>;

/// One entry read by a [`Tail`]: its cursor, and its envelope unless it was
/// unreadable.
pub type Tailed = (EventCursor, Result<Envelope, BrokerError>);

/// The consuming side of one consumer group, for one topic.
#[async_trait]
pub trait GroupReader: Send + Sync {
    /// Creates the topic and the group if missing (idempotent).
    async fn ensure_group(&self) -> Result<(), BrokerError>;
    /// New entries for this member, waiting up to the block time.
    async fn read(&self, count: u64) -> Result<Vec<Received>, BrokerError>;
    /// Entries members read and left unacknowledged for `min_idle`.
    async fn reclaim(&self, min_idle: Duration, count: u64) -> Result<Vec<Received>, BrokerError>;
    /// Acknowledges finished entries.
    async fn ack(&self, receipts: &[String]) -> Result<(), BrokerError>;
}

/// Every entry of one topic, read without a group (each reader sees all).
#[async_trait]
pub trait Tail: Send + Sync {
    /// The newest entry's cursor ([`EventCursor::ZERO`] when empty): reading
    /// after it yields only what comes next.
    async fn newest(&self) -> Result<EventCursor, BrokerError>;
    /// Entries after `cursor`, waiting up to the block time for one.
    async fn read_after(&self, cursor: EventCursor, count: u64)
        -> Result<Vec<Tailed>, BrokerError>;
}

/// One outbox event on its way to a consumer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The outbox row's id; consumers dedupe on it (inbox, Resend key).
    pub event_id: Uuid,
    pub topic: String,
    /// Delivery attempts spent when this copy was published; a consumer
    /// ignores a copy whose count no longer matches the row (a stale copy).
    pub attempts: i32,
    /// The W3C trace context the event was committed in, when traces are
    /// exported (a consumer's span links to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    pub payload: serde_json::Value,
}

/// A message read from the broker: the envelope plus the broker's own id,
/// used to acknowledge it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub envelope: Envelope,
    /// The broker's id of this copy (a stream entry id for Redis).
    pub receipt: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("unreadable message {receipt}: {reason}")]
    Malformed { receipt: String, reason: String },
}
