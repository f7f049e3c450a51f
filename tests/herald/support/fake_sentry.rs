//! A local stand-in for Sentry's ingestion endpoint: accepts envelopes at
//! `POST /api/<project>/envelope/` (as the `sentry` crate sends them) and
//! records every `event` item's JSON, so tests can count alerts and check
//! what they carry.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use warp::hyper::body::Bytes;
use warp::Filter;

#[derive(Clone)]
pub struct FakeSentry {
    events: Arc<Mutex<Vec<Value>>>,
    pub addr: SocketAddr,
}

/// The `event` payloads of an envelope: a header line, then pairs of an
/// item header line and its payload (length-prefixed or one line).
fn events_of(envelope: &[u8]) -> Vec<Value> {
    let mut events = Vec::new();
    let mut rest = envelope;
    let next_line = |rest: &mut &[u8]| -> Option<Vec<u8>> {
        if rest.is_empty() {
            return None;
        }
        let end = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
        let line = rest[..end].to_vec();
        *rest = &rest[(end + 1).min(rest.len())..];
        Some(line)
    };
    let _header = next_line(&mut rest);
    while let Some(item_header) = next_line(&mut rest) {
        let Ok(item) = serde_json::from_slice::<Value>(&item_header) else {
            continue;
        };
        let payload = match item.get("length").and_then(|l| l.as_u64()) {
            Some(len) => {
                let len = (len as usize).min(rest.len());
                let payload = rest[..len].to_vec();
                rest = &rest[len..];
                if rest.first() == Some(&b'\n') {
                    rest = &rest[1..];
                }
                payload
            }
            None => next_line(&mut rest).unwrap_or_default(),
        };
        if item.get("type").and_then(|t| t.as_str()) == Some("event") {
            if let Ok(event) = serde_json::from_slice(&payload) {
                events.push(event);
            }
        }
    }
    events
}

impl FakeSentry {
    pub async fn start() -> FakeSentry {
        let events = Arc::new(Mutex::new(Vec::new()));
        let shared = events.clone();
        let route = warp::post()
            .and(warp::path!("api" / String / "envelope"))
            .and(warp::body::bytes())
            .map(move |_project: String, body: Bytes| {
                shared.lock().unwrap().extend(events_of(&body));
                warp::reply::json(
                    &serde_json::json!({"id": uuid::Uuid::new_v4().simple().to_string()}),
                )
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake sentry");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(warp::serve(route).incoming(listener).run());
        FakeSentry { events, addr }
    }

    /// The DSN that points the `sentry` crate here.
    pub fn dsn(&self) -> String {
        format!("http://0123456789abcdef@{}/42", self.addr)
    }

    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }
}
