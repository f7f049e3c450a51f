//! The broker between the OutboxRelay and the consumers (SPEC 4).
//!
//! The relay publishes [`Envelope`]s; each consumer reads the topics it
//! handles as one member of a consumer group and acknowledges what it has
//! finished. Delivery is at-least-once: the same envelope may arrive twice
//! (a relay that crashed between publish and mark, a reclaimed pending entry,
//! a redelivery after Redis lost its data), and consumers absorb that with
//! their inbox. The broker is never the only copy of anything: every envelope
//! comes from an outbox row that stays unsettled until a consumer settles it.
//!
//! Production uses Redis Streams ([`redis_streams`]); the embedded mode's
//! in-process broker arrives with the SQLite backend (issue 6).

pub mod redis_streams;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One outbox event on its way to a consumer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The outbox row's id; consumers dedupe on it (inbox, Resend key).
    pub event_id: Uuid,
    pub topic: String,
    /// Delivery attempts spent when this copy was published; a consumer
    /// ignores a copy whose count no longer matches the row (a stale copy).
    pub attempts: i32,
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
