//! A Server-Sent Events client for the stream tests: reads `GET
//! /api/jobs/stream` on a task of its own and hands over every parsed event,
//! so a test awaits events (with a deadline) instead of sleeping.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;

/// One dispatched event (or a `retry:`-only block).
#[derive(Debug, Clone)]
pub struct Event {
    pub id: Option<String>,
    /// `message` when the block named none; `retry` for a bare `retry:`.
    pub event: String,
    pub data: String,
    pub retry: Option<u64>,
}

impl Event {
    /// The job titles this event shows: every job of a snapshot, or the one
    /// job of a `job.posted`.
    pub fn titles(&self) -> Vec<String> {
        let data: Value = match serde_json::from_str(&self.data) {
            Ok(v) => v,
            Err(_) => return Vec::new(),
        };
        let title = |job: &Value| job["title"].as_str().map(str::to_string);
        match self.event.as_str() {
            "snapshot" => data["jobs"]
                .as_array()
                .map(|jobs| jobs.iter().filter_map(title).collect())
                .unwrap_or_default(),
            "job.posted" | "job.updated" => title(&data).into_iter().collect(),
            _ => Vec::new(),
        }
    }
}

/// A connected stream client.
pub struct SseClient {
    events: mpsc::UnboundedReceiver<Event>,
    /// Everything received so far, in order.
    pub seen: Vec<Event>,
    /// Whether the server ended the stream.
    pub closed: bool,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SseClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Splits an SSE byte stream into events (the WHATWG parsing rules, minus
/// the parts Herald never sends).
#[derive(Default)]
struct Parser {
    buffer: String,
    id: Option<String>,
    event: Option<String>,
    data: Vec<String>,
    retry: Option<u64>,
}

impl Parser {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<Event>) {
        self.buffer.push_str(&String::from_utf8_lossy(chunk));
        while let Some(end) = self.buffer.find('\n') {
            let line: String = self.buffer.drain(..=end).collect();
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() || self.retry.is_some() {
                    out.push(Event {
                        id: self.id.take(),
                        event: self.event.take().unwrap_or_else(|| {
                            if self.data.is_empty() {
                                "retry".into()
                            } else {
                                "message".into()
                            }
                        }),
                        data: self.data.join("\n"),
                        retry: self.retry.take(),
                    });
                }
                self.data.clear();
                self.id = None;
                self.event = None;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value).to_string();
            match field {
                "id" => self.id = Some(value),
                "event" => self.event = Some(value),
                "data" => self.data.push(value),
                "retry" => self.retry = value.parse().ok(),
                _ => {}
            }
        }
    }
}

impl SseClient {
    /// Connects to `url` (the full stream URL), optionally resuming, and
    /// waits for the first event after the opening `retry:`. Like a browser's
    /// EventSource, it connects again when it was only told to come back
    /// later (a hub still starting), for up to 15 s.
    pub async fn connect(url: &str, last_event_id: Option<&str>) -> SseClient {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mut client = SseClient::connect_once(url, last_event_id).await;
            let opening = client.next(Duration::from_secs(10)).await;
            assert!(
                opening
                    .as_ref()
                    .is_some_and(|e| e.event == "retry" && e.retry.is_some()),
                "a stream opens with a retry: field, got {opening:?}"
            );
            if client.next(Duration::from_secs(10)).await.is_some() || !client.closed {
                return client;
            }
            assert!(
                Instant::now() < deadline,
                "the stream kept turning this client away"
            );
        }
    }

    /// One connect, as it comes.
    pub async fn connect_once(url: &str, last_event_id: Option<&str>) -> SseClient {
        SseClient::connect_once_from(url, last_event_id, None).await
    }

    /// One connect from the local address `from` (127.0.0.x stands for
    /// another client to the per-client limits).
    pub async fn connect_once_from(
        url: &str,
        last_event_id: Option<&str>,
        from: Option<std::net::IpAddr>,
    ) -> SseClient {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .local_address(from)
            .build()
            .expect("client");
        let mut request = http.get(url).header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.expect("stream connect");
        assert_eq!(response.status(), 200, "a stream is always answered 200");
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut body = response.bytes_stream();
            let mut parser = Parser::default();
            let mut out = Vec::new();
            while let Some(Ok(chunk)) = body.next().await {
                parser.feed(&chunk, &mut out);
                for event in out.drain(..) {
                    if tx.send(event).is_err() {
                        return;
                    }
                }
            }
        });
        SseClient {
            events: rx,
            seen: Vec::new(),
            closed: false,
            task,
        }
    }

    /// The next event, or `None` when the stream ended or `within` passed.
    pub async fn next(&mut self, within: Duration) -> Option<Event> {
        match tokio::time::timeout(within, self.events.recv()).await {
            Ok(Some(event)) => {
                self.seen.push(event.clone());
                Some(event)
            }
            Ok(None) => {
                self.closed = true;
                None
            }
            Err(_) => None,
        }
    }

    /// Reads until `done(seen)` holds; panics with what was seen if it does
    /// not within `within`.
    pub async fn read_until(
        &mut self,
        what: &str,
        within: Duration,
        done: impl Fn(&[Event]) -> bool,
    ) {
        let deadline = Instant::now() + within;
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || (self.next(left).await.is_none() && self.closed) {
                break;
            }
        }
        assert!(
            done(&self.seen),
            "{what}: not reached within {within:?}; saw {:?}",
            self.seen
                .iter()
                .map(|e| (&e.event, e.id.as_deref()))
                .collect::<Vec<_>>()
        );
    }

    /// Reads until the server ends the stream (or `within` passes).
    pub async fn read_to_end(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            self.next(left).await;
        }
    }

    /// How many times each title was shown (snapshot or delta).
    pub fn title_counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for event in &self.seen {
            for title in event.titles() {
                *counts.entry(title).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Titles with `prefix`, and how often each was shown.
    pub fn counts_with_prefix(&self, prefix: &str) -> HashMap<String, usize> {
        self.title_counts()
            .into_iter()
            .filter(|(t, _)| t.starts_with(prefix))
            .collect()
    }

    /// The client's list of jobs, built only by the stream's rules from
    /// what it received ([`list`]).
    pub fn list(&self) -> HashMap<String, (i64, Value)> {
        list(&self.seen)
    }

    /// The id of the last event with one.
    pub fn last_id(&self) -> Option<String> {
        self.seen.iter().rev().find_map(|e| e.id.clone())
    }
}

/// A list of jobs built only by the stream's rules from `events`, in order:
/// a `snapshot` replaces it; `job.posted` and `job.updated` insert or
/// replace by id; `job.closed` and `job.removed` delete by id; an event
/// older (by `version`) than the job held is ignored. Job id → (version, job).
pub fn list(events: &[Event]) -> HashMap<String, (i64, Value)> {
    let mut list: HashMap<String, (i64, Value)> = HashMap::new();
    let id_version = |job: &Value| {
        Some((
            job["id"].as_str()?.to_string(),
            job["version"].as_i64().unwrap_or(1),
        ))
    };
    for event in events {
        let Ok(data) = serde_json::from_str::<Value>(&event.data) else {
            continue;
        };
        match event.event.as_str() {
            "snapshot" => {
                list = data["jobs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|job| {
                        let (id, version) = id_version(job)?;
                        Some((id, (version, job.clone())))
                    })
                    .collect();
            }
            kind @ ("job.posted" | "job.updated" | "job.closed" | "job.removed") => {
                let Some((id, version)) = id_version(&data) else {
                    continue;
                };
                if list.get(&id).is_some_and(|(held, _)| *held > version) {
                    continue;
                }
                if kind == "job.posted" || kind == "job.updated" {
                    list.insert(id, (version, data));
                } else {
                    list.remove(&id);
                }
            }
            _ => {}
        }
    }
    list
}

/// How fast a [`SseClient::connect_throttled`] client reads: `None`, not
/// at all (its socket and the server's buffers fill up); `Some(pause)`, up
/// to 1 kB then `pause`. Dropping it closes the client's connection.
pub type Pace = tokio::sync::watch::Sender<Option<Duration>>;

impl SseClient {
    /// A client on a raw socket with a 4 kB receive buffer that reads as
    /// `pace` says, so the server's buffers fill and its queue for this
    /// client backs up: a slow browser on a bad link. `path` includes the
    /// query; `base` is `http://host:port`.
    pub async fn connect_throttled(
        base: &str,
        path: &str,
        last_event_id: Option<&str>,
        pace: &Pace,
    ) -> SseClient {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr: std::net::SocketAddr = base
            .trim_start_matches("http://")
            .parse()
            .expect("a host:port base");
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("rcvbuf");
        let mut stream = socket.connect(addr).await.expect("connect");
        let resume = last_event_id
            .map(|id| format!("last-event-id: {id}\r\n"))
            .unwrap_or_default();
        stream
            .write_all(
                format!(
                    "GET {path} HTTP/1.1\r\nhost: herald\r\naccept: text/event-stream\r\n{resume}\r\n"
                )
                .as_bytes(),
            )
            .await
            .expect("request");
        let mut pace = pace.subscribe();
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut raw: Vec<u8> = Vec::new();
            let mut head_done = false;
            let mut parser = Parser::default();
            let mut out = Vec::new();
            let mut chunk = [0u8; 1024];
            let mut pacer: Option<(Duration, tokio::time::Interval)> = None;
            loop {
                let pause = loop {
                    if pace.has_changed().is_err() {
                        return; // the test let go of this client
                    }
                    if let Some(pause) = *pace.borrow_and_update() {
                        break pause;
                    }
                    if pace.changed().await.is_err() {
                        return;
                    }
                };
                let n = match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                raw.extend_from_slice(&chunk[..n]);
                if !head_done {
                    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    assert!(raw.starts_with(b"HTTP/1.1 200"), "a stream is answered 200");
                    raw.drain(..end + 4);
                    head_done = true;
                }
                // Chunked transfer encoding: `size\r\n data \r\n`.
                while let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") {
                    let size = usize::from_str_radix(
                        std::str::from_utf8(&raw[..line_end]).unwrap_or("0").trim(),
                        16,
                    )
                    .unwrap_or(0);
                    if size == 0 || raw.len() < line_end + 2 + size + 2 {
                        if size == 0 && line_end > 0 {
                            return; // the last chunk
                        }
                        break;
                    }
                    let data: Vec<u8> = raw.drain(..line_end + 2 + size + 2).collect();
                    parser.feed(&data[line_end + 2..line_end + 2 + size], &mut out);
                }
                for event in out.drain(..) {
                    if tx.send(event).is_err() {
                        return;
                    }
                }
                // The slow link under test: reads paced at one per `pause`
                // (a pacer, not a wait for something to happen).
                if !pause.is_zero() {
                    let ticker = match &mut pacer {
                        Some((period, ticker)) if *period == pause => ticker,
                        _ => {
                            let mut ticker = tokio::time::interval(pause);
                            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                            &mut pacer.insert((pause, ticker)).1
                        }
                    };
                    ticker.tick().await;
                }
            }
        });
        SseClient {
            events: rx,
            seen: Vec::new(),
            closed: false,
            task,
        }
    }
}
