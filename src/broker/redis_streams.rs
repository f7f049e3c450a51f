//! Redis Streams broker (fred): one stream per topic, one consumer group per
//! consuming actor, one consumer name per process.
//!
//! - `publish`: `XADD herald:stream:<topic> MAXLEN ~ <n> * event <json>`, all
//!   envelopes of a relay batch in one pipeline. The relay marks rows
//!   published only after every XADD of the batch succeeded.
//! - `read`: `XREADGROUP GROUP <group> <consumer> COUNT n BLOCK ms STREAMS
//!   <stream> >` on a connection of its own (a blocking read would stall the
//!   idempotency fast path on a shared one).
//! - `reclaim`: `XAUTOCLAIM` moves entries another consumer read but never
//!   acknowledged (it died) to this one once they have been idle long enough.
//! - A stream or group that vanished (FLUSHALL, a restart without
//!   persistence) is recreated on the `NOGROUP` error. What it held is not
//!   lost: those events are still unsettled outbox rows; the relay's check
//!   ([`StreamPublisher::holds`]) finds their entries gone and publishes them
//!   again.
//! - `MAXLEN ~` bounds a stream's memory; an entry trimmed before it was read
//!   is likewise republished from the outbox.
//! - [`StreamTail`]: fan-out without a group. Every process's SseHub reads
//!   all of the `jobs` stream with plain `XREAD` from its own cursor, so a job
//!   posted on any process reaches the stream clients of every process, and
//!   the entry id is the event's global cursor.

use std::time::Duration;

use std::sync::Arc;

use async_trait::async_trait;
use fred::prelude::*;
use fred::types::streams::{XCap, XCapKind, XCapTrim, XReadResponse, XReadValue};

use crate::domain::topics;

use super::{
    Broker, BrokerError, Delivery, Envelope, EventCursor, GroupReader, Holding, Received, Tail,
    Tailed,
};

/// Upper bound on a stream's length (approximate trimming).
const STREAM_MAXLEN: i64 = 1_000_000;

/// The stream that carries `topic` (a job's events share one: [`topics::stream`]).
pub fn stream_key(topic: &str) -> String {
    format!("herald:stream:{}", topics::stream(topic))
}

fn unavailable(e: fred::error::Error) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

fn is_nogroup(e: &fred::error::Error) -> bool {
    e.details().contains("NOGROUP")
}

/// Builds a client of its own (own connection) for the broker.
fn client(url: &str, timeout: Duration) -> Result<Client, BrokerError> {
    crate::redis_client::client(url, timeout).map_err(unavailable)
}

/// The publishing side, used by the OutboxRelay.
#[derive(Clone)]
pub struct StreamPublisher {
    client: Client,
}

impl StreamPublisher {
    pub fn connect(url: &str) -> Result<StreamPublisher, BrokerError> {
        Ok(StreamPublisher {
            client: client(url, Duration::from_secs(2))?,
        })
    }

    /// Appends every envelope to its topic's stream; `Ok` only if all were
    /// accepted, with each entry's id.
    pub async fn publish(&self, envelopes: &[Envelope]) -> Result<Vec<String>, BrokerError> {
        if envelopes.is_empty() {
            return Ok(Vec::new());
        }
        let pipeline = self.client.pipeline();
        for envelope in envelopes {
            let body = serde_json::to_string(envelope).map_err(|e| BrokerError::Malformed {
                receipt: envelope.event_id.to_string(),
                reason: e.to_string(),
            })?;
            let cap = XCap::try_from((XCapKind::MaxLen, XCapTrim::AlmostExact, STREAM_MAXLEN))
                .map_err(unavailable)?;
            let _: () = pipeline
                .xadd(
                    stream_key(&envelope.topic),
                    false,
                    cap,
                    "*",
                    ("event", body),
                )
                .await
                .map_err(unavailable)?;
        }
        let replies: Vec<Result<Value, fred::error::Error>> = pipeline.try_all().await;
        let mut ids = Vec::with_capacity(replies.len());
        for reply in replies {
            let id = reply.map_err(unavailable)?;
            ids.push(id.as_string().ok_or_else(|| {
                BrokerError::Unavailable(format!("XADD answered {id:?}, not an entry id"))
            })?);
        }
        Ok(ids)
    }

    /// [`Broker::holds`] for Redis Streams: per entry `XRANGE id id` (does
    /// the stream still have it?), the group's `last-delivered-id` (was it
    /// read?) and `XPENDING id id` (is a reader holding it, and for how
    /// long?), in one pipeline.
    pub async fn holds(
        &self,
        topic: &str,
        group: &str,
        receipts: &[String],
        unclaimed_after: Duration,
    ) -> Result<Vec<Holding>, BrokerError> {
        if receipts.is_empty() {
            return Ok(Vec::new());
        }
        let key = stream_key(topic);
        let groups: Result<Value, _> = self.client.xinfo_groups(&key).await;
        let last_delivered = match groups {
            Ok(groups) => last_delivered_id(&groups, group),
            // No stream at all: flushed, or a restart without persistence.
            Err(e) if e.details().contains("no such key") => {
                return Ok(vec![Holding::Lost; receipts.len()])
            }
            Err(e) => return Err(unavailable(e)),
        };
        let pipeline = self.client.pipeline();
        for receipt in receipts {
            let _: () = pipeline
                .xrange(&key, receipt.as_str(), receipt.as_str(), Some(1))
                .await
                .map_err(unavailable)?;
            if last_delivered.is_some() {
                let _: () = pipeline
                    .xpending(&key, group, (receipt.as_str(), receipt.as_str(), 1))
                    .await
                    .map_err(unavailable)?;
            }
        }
        let mut replies = pipeline.try_all::<Value>().await.into_iter();
        let mut held = Vec::with_capacity(receipts.len());
        for receipt in receipts {
            let exists = match replies.next() {
                Some(Ok(Value::Array(entries))) => !entries.is_empty(),
                Some(Ok(_)) => false,
                Some(Err(e)) => return Err(unavailable(e)),
                None => return Err(BrokerError::Unavailable("short pipeline reply".into())),
            };
            let Some(last) = &last_delivered else {
                // No group yet (or it vanished): the consumer makes it from
                // id 0 and reads whatever the stream has.
                held.push(if exists { Holding::Held } else { Holding::Lost });
                continue;
            };
            let pending_idle = match replies.next() {
                Some(Ok(Value::Array(entries))) => entries.first().map(pending_idle_ms),
                Some(Ok(_)) => None,
                Some(Err(e)) => return Err(unavailable(e)),
                None => return Err(BrokerError::Unavailable("short pipeline reply".into())),
            };
            held.push(match (exists, pending_idle) {
                (false, _) => Holding::Lost,
                (true, Some(idle)) if idle >= unclaimed_after.as_millis() as u64 => {
                    Holding::Unclaimed
                }
                (true, Some(_)) => Holding::Held,
                (true, None) => {
                    let unread = match (EventCursor::parse(receipt), EventCursor::parse(last)) {
                        (Some(entry), Some(last)) => entry > last,
                        _ => true,
                    };
                    if unread {
                        Holding::Held
                    } else {
                        // Read and acknowledged, yet its row is unsettled.
                        Holding::Lost
                    }
                }
            });
        }
        Ok(held)
    }
}

/// The `last-delivered-id` of `group` in an `XINFO GROUPS` answer (a list
/// of maps, or of flat key/value lists under RESP2).
fn last_delivered_id(groups: &Value, group: &str) -> Option<String> {
    let Value::Array(groups) = groups else {
        return None;
    };
    groups.iter().find_map(|info| {
        let pairs: Vec<(String, &Value)> = match info {
            Value::Map(map) => map
                .iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v)))
                .collect(),
            Value::Array(flat) => flat
                .chunks(2)
                .filter_map(|kv| match kv {
                    [k, v] => Some((k.as_string()?, v)),
                    _ => None,
                })
                .collect(),
            _ => return None,
        };
        let field = |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| v.as_string())
        };
        (field("name").as_deref() == Some(group)).then(|| field("last-delivered-id"))?
    })
}

/// The idle time in an `XPENDING` extended-form entry: `[id, consumer, idle, deliveries]`.
fn pending_idle_ms(entry: &Value) -> u64 {
    match entry {
        Value::Array(fields) => fields.get(2).and_then(|v| v.as_u64()).unwrap_or(u64::MAX),
        _ => u64::MAX,
    }
}

/// `XAUTOCLAIM`'s answer: the next cursor and the claimed entries.
type Autoclaimed = (String, Vec<XReadValue<String, String, String>>);

/// The consuming side of one consumer group, for one topic.
pub struct StreamConsumer {
    client: Client,
    stream: String,
    group: String,
    /// This process's name within the group (unique per process).
    consumer: String,
    /// How long one read waits for new entries.
    block: Duration,
}

impl StreamConsumer {
    pub fn connect(
        url: &str,
        topic: &str,
        group: &str,
        consumer: &str,
        block: Duration,
    ) -> Result<StreamConsumer, BrokerError> {
        Ok(StreamConsumer {
            client: client(url, block + Duration::from_secs(2))?,
            stream: stream_key(topic),
            group: group.to_string(),
            consumer: consumer.to_string(),
            block,
        })
    }
}

#[async_trait]
impl GroupReader for StreamConsumer {
    async fn ensure_group(&self) -> Result<(), BrokerError> {
        let created: Result<Value, _> = self
            .client
            .xgroup_create(&self.stream, &self.group, "0", true)
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(e) if e.details().contains("BUSYGROUP") => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn read(&self, count: u64) -> Result<Vec<Received>, BrokerError> {
        // A read that times out answers nil, which fred cannot turn into a
        // map: take the raw value and convert only a non-nil one.
        let read: Result<Value, _> = self
            .client
            .xreadgroup(
                &self.group,
                &self.consumer,
                Some(count),
                Some(self.block.as_millis() as u64),
                false,
                &self.stream,
                ">",
            )
            .await;
        let read = read.and_then(|value| {
            if value.is_null() {
                Ok(XReadResponse::new())
            } else {
                value.into_xread_response::<String, String, String, String>()
            }
        });
        match read {
            Ok(mut streams) => Ok(streams
                .remove(&self.stream)
                .unwrap_or_default()
                .into_iter()
                .map(decode)
                .collect()),
            Err(e) if is_nogroup(&e) => {
                self.ensure_group().await?;
                Ok(Vec::new())
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn reclaim(&self, min_idle: Duration, count: u64) -> Result<Vec<Received>, BrokerError> {
        let claimed: Result<Autoclaimed, _> = self
            .client
            .xautoclaim_values(
                &self.stream,
                &self.group,
                &self.consumer,
                min_idle.as_millis() as u64,
                "0-0",
                Some(count),
                false,
            )
            .await;
        match claimed {
            Ok((_, entries)) => Ok(entries.into_iter().map(decode).collect()),
            Err(e) if is_nogroup(&e) => {
                self.ensure_group().await?;
                Ok(Vec::new())
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn ack(&self, receipts: &[String]) -> Result<(), BrokerError> {
        if receipts.is_empty() {
            return Ok(());
        }
        let acked: Result<i64, _> = self
            .client
            .xack(&self.stream, &self.group, receipts.to_vec())
            .await;
        match acked {
            Ok(_) => Ok(()),
            // The group is gone, and with it the pending entry: nothing to ack.
            Err(e) if is_nogroup(&e) => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }
}

/// A stream entry as a [`Delivery`]; an unreadable one keeps its receipt so
/// it can be acknowledged and dropped (its outbox row is the real record).
fn decode((receipt, mut fields): XReadValue<String, String, String>) -> Received {
    let body = fields
        .remove("event")
        .ok_or_else(|| BrokerError::Malformed {
            receipt: receipt.clone(),
            reason: "no `event` field".into(),
        })?;
    let envelope = serde_json::from_str(&body).map_err(|e| BrokerError::Malformed {
        receipt: receipt.clone(),
        reason: e.to_string(),
    })?;
    Ok(Delivery { envelope, receipt })
}

/// Every entry of one topic's stream, read without a consumer group (each
/// reader sees everything), from a cursor the reader keeps.
pub struct StreamTail {
    client: Client,
    stream: String,
    /// How long one read waits for new entries.
    block: Duration,
}

impl StreamTail {
    pub fn connect(url: &str, topic: &str, block: Duration) -> Result<StreamTail, BrokerError> {
        Ok(StreamTail {
            client: client(url, block + Duration::from_secs(2))?,
            stream: stream_key(topic),
            block,
        })
    }
}

#[async_trait]
impl Tail for StreamTail {
    async fn newest(&self) -> Result<EventCursor, BrokerError> {
        let newest: Vec<XReadValue<String, String, String>> = self
            .client
            .xrevrange_values(&self.stream, "+", "-", Some(1))
            .await
            .map_err(unavailable)?;
        Ok(newest
            .first()
            .and_then(|(id, _)| EventCursor::parse(id))
            .unwrap_or(EventCursor::ZERO))
    }

    async fn read_after(
        &self,
        cursor: EventCursor,
        count: u64,
    ) -> Result<Vec<Tailed>, BrokerError> {
        let read: Value = self
            .client
            .xread(
                Some(count),
                Some(self.block.as_millis() as u64),
                &self.stream,
                cursor.to_string(),
            )
            .await
            .map_err(unavailable)?;
        if read.is_null() {
            return Ok(Vec::new());
        }
        let mut streams = read
            .into_xread_response::<String, String, String, String>()
            .map_err(unavailable)?;
        Ok(streams
            .remove(&self.stream)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|entry| {
                let cursor = EventCursor::parse(&entry.0)?;
                Some((cursor, decode(entry).map(|d| d.envelope)))
            })
            .collect())
    }
}

/// The Redis Streams [`Broker`]: the publisher's connection, and the URL
/// from which each group member and tail opens its own (blocking reads must
/// not stall anyone else's commands).
pub struct RedisBroker {
    url: String,
    publisher: StreamPublisher,
}

impl RedisBroker {
    pub fn connect(url: &str) -> Result<RedisBroker, BrokerError> {
        Ok(RedisBroker {
            url: url.to_string(),
            publisher: StreamPublisher::connect(url)?,
        })
    }
}

#[async_trait]
impl Broker for RedisBroker {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn publish(&self, envelopes: &[Envelope]) -> Result<Vec<String>, BrokerError> {
        self.publisher.publish(envelopes).await
    }

    async fn holds(
        &self,
        topic: &str,
        group: &str,
        receipts: &[String],
        unclaimed_after: Duration,
    ) -> Result<Vec<Holding>, BrokerError> {
        self.publisher
            .holds(topic, group, receipts, unclaimed_after)
            .await
    }

    fn group(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        block: Duration,
    ) -> Result<Arc<dyn GroupReader>, BrokerError> {
        Ok(Arc::new(StreamConsumer::connect(
            &self.url, topic, group, consumer, block,
        )?))
    }

    fn tail(&self, topic: &str, block: Duration) -> Result<Box<dyn Tail>, BrokerError> {
        Ok(Box::new(StreamTail::connect(&self.url, topic, block)?))
    }
}
