//! A local stand-in for Resend's `POST /emails` and `POST /emails/batch`,
//! behaving like the real API where Herald depends on it:
//!
//! - `Authorization: Bearer <key>` required (401 `missing_api_key`, 403
//!   `invalid_api_key`); JSON body with `from`, `to`, `subject` (422
//!   `validation_error` otherwise);
//! - `Idempotency-Key` kept after a success (for the life of the server,
//!   standing in for Resend's 24 h): the same key with the same body returns
//!   the first response and sends nothing; with another body 409
//!   `invalid_idempotent_request`; while the first is still being handled
//!   409 `concurrent_idempotent_requests`;
//! - `ratelimit-limit/-remaining/-reset` on every answer; a scripted 429
//!   carries `retry-after` and `ratelimit-reset`;
//! - scripted 5xx outages, poison recipients (422), latency;
//! - `/emails/batch`: a JSON array of up to 100 emails under one
//!   `Idempotency-Key` (same key and body: the same ids, nothing sent; same
//!   key, other body: 409 `invalid_idempotent_request`); strict validation by
//!   default (one invalid email, or a poison recipient, fails the whole batch
//!   with 422 and sends nothing); `x-batch-validation: permissive` sends the
//!   valid ones and lists the rest under `errors` by index;
//! - an optional request-rate limit ([`FakeResend::limit_rate`]), as Resend
//!   counts it: N requests (not emails) in any one second, each request
//!   counted whatever it carries; over it, 429 `rate_limit_exceeded` with
//!   `retry-after` and `ratelimit-*` headers.
//!
//! Every call is recorded with its time, key and status, and every email
//! actually "sent" is kept: tests count there, never in Herald.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use warp::http::{Response, StatusCode};
use warp::hyper::body::Bytes;
use warp::Filter;

pub const API_KEY: &str = "re_test_0123456789";

/// One call as the server saw it.
#[derive(Debug, Clone)]
pub struct Call {
    pub at: Instant,
    pub key: Option<String>,
    pub status: u16,
    /// Emails the request carried (1 for `/emails`).
    pub emails: usize,
    /// A `/emails/batch` request.
    pub batch: bool,
}

/// An email the server accepted (and would have sent).
#[derive(Debug, Clone)]
pub struct Sent {
    pub to: String,
    pub subject: String,
}

/// What the server does with the next calls.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    Normal,
    /// Answer every call with this 5xx.
    Down(u16),
    /// Answer every call with this 5xx until the instant, then normally: an
    /// outage of a fixed length that ends on its own, as a real one would.
    DownUntil(u16, Instant),
    /// Answer the next `n` calls 429 with `retry-after` seconds, then normal.
    RateLimited {
        n: u32,
        retry_after: u64,
    },
}

#[derive(Default)]
struct State {
    mode: Option<Mode>,
    /// Requests accepted per second, if limited.
    rate_limit: Option<u32>,
    /// When the requests of the current window were accepted.
    window: std::collections::VecDeque<Instant>,
    /// Recipients answered 422 (a poison message).
    poison: HashSet<String>,
    latency: Duration,
    /// Requests received, counted before their latency (a send in flight).
    arrived: usize,
    calls: Vec<Call>,
    sent: Vec<Sent>,
    /// Idempotency key -> (body, status, response body), or in progress.
    keys: HashMap<String, KeyState>,
}

enum KeyState {
    InProgress,
    Done {
        body: Value,
        status: u16,
        response: Value,
    },
}

#[derive(Clone)]
pub struct FakeResend {
    state: Arc<Mutex<State>>,
    pub addr: SocketAddr,
}

impl FakeResend {
    pub async fn start() -> FakeResend {
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let batch_state = state.clone();
        let single = warp::post()
            .and(warp::path("emails"))
            .and(warp::path::end())
            .and(warp::header::optional::<String>("authorization"))
            .and(warp::header::optional::<String>("idempotency-key"))
            .and(warp::body::bytes())
            .then(move |auth, key, body| handle(shared.clone(), auth, key, body));
        let batch = warp::post()
            .and(warp::path!("emails" / "batch"))
            .and(warp::header::optional::<String>("authorization"))
            .and(warp::header::optional::<String>("idempotency-key"))
            .and(warp::header::optional::<String>("x-batch-validation"))
            .and(warp::body::bytes())
            .then(move |auth, key, validation, body| {
                handle_batch(batch_state.clone(), auth, key, validation, body)
            });
        let route = batch.or(single);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake resend");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(warp::serve(route).incoming(listener).run());
        FakeResend { state, addr }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = Some(mode);
    }

    pub fn poison(&self, recipient: &str, on: bool) {
        let mut state = self.state.lock().unwrap();
        if on {
            state.poison.insert(recipient.to_string());
        } else {
            state.poison.remove(recipient);
        }
    }

    /// Accepts at most `per_sec` requests in any one second (Resend's
    /// default is 2); `None` lifts the limit.
    pub fn limit_rate(&self, per_sec: Option<u32>) {
        let mut state = self.state.lock().unwrap();
        state.rate_limit = per_sec;
        state.window.clear();
    }

    pub fn set_latency(&self, latency: Duration) {
        self.state.lock().unwrap().latency = latency;
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    /// Requests received so far, answered or still in their latency.
    pub fn arrived(&self) -> usize {
        self.state.lock().unwrap().arrived
    }

    pub fn sent(&self) -> Vec<Sent> {
        self.state.lock().unwrap().sent.clone()
    }

    /// Emails sent to `to`.
    pub fn sent_to(&self, to: &str) -> usize {
        self.sent().iter().filter(|s| s.to == to).count()
    }
}

fn reply(status: u16, body: Value, extra: &[(&str, String)]) -> Response<String> {
    let mut headers: Vec<(&str, String)> = vec![
        ("content-type", "application/json".into()),
        ("ratelimit-limit", "2".into()),
        ("ratelimit-remaining", "1".into()),
        ("ratelimit-reset", "1".into()),
    ];
    for (name, value) in extra {
        headers.retain(|(n, _)| n != name);
        headers.push((name, value.clone()));
    }
    let mut builder = Response::builder().status(StatusCode::from_u16(status).expect("status"));
    for (name, value) in headers {
        builder = builder.header(name, value);
    }
    builder.body(body.to_string()).expect("response")
}

fn error(status: u16, name: &str, message: &str) -> Value {
    json!({ "statusCode": status, "name": name, "message": message })
}

/// The scripted response time of both endpoints ([`FakeResend::set_latency`]):
/// the behaviour this double offers, not a synchronisation.
async fn respond_after_latency(state: &Mutex<State>) {
    let latency = {
        let mut state = state.lock().unwrap();
        state.arrived += 1;
        state.latency
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
}

async fn handle(
    state: Arc<Mutex<State>>,
    auth: Option<String>,
    key: Option<String>,
    body: Bytes,
) -> Response<String> {
    respond_after_latency(&state).await;
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let to = parsed
        .as_ref()
        .and_then(|b| b.get("to"))
        .and_then(|t| t.get(0).or(Some(t)))
        .and_then(|t| t.as_str())
        .map(str::to_string);
    let (status, response, extra) = decide(&state, auth, key.clone(), parsed, to.clone());
    let mut state = state.lock().unwrap();
    state.calls.push(Call {
        at: Instant::now(),
        key,
        status,
        emails: 1,
        batch: false,
    });
    drop(state);
    reply(status, response, &extra)
}

async fn handle_batch(
    state: Arc<Mutex<State>>,
    auth: Option<String>,
    key: Option<String>,
    validation: Option<String>,
    body: Bytes,
) -> Response<String> {
    respond_after_latency(&state).await;
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let emails = parsed
        .as_ref()
        .and_then(|b| b.as_array())
        .map(|a| a.len())
        .unwrap_or(0);
    let permissive = validation.as_deref() == Some("permissive");
    let (status, response, extra) = decide_batch(&state, auth, key.clone(), parsed, permissive);
    state.lock().unwrap().calls.push(Call {
        at: Instant::now(),
        key,
        status,
        emails,
        batch: true,
    });
    reply(status, response, &extra)
}

/// A status, a JSON body and extra headers.
type Answer = (u16, Value, Vec<(&'static str, String)>);

fn recipient(email: &Value) -> Option<String> {
    email
        .get("to")
        .and_then(|t| t.get(0).or(Some(t)))
        .and_then(|t| t.as_str())
        .map(str::to_string)
}

/// Authentication, scripted outages and the request-rate limit, common to
/// both endpoints: `Some(answer)` ends the request there.
fn gate(st: &mut State, auth: Option<&str>) -> Option<Answer> {
    match auth {
        None => {
            return Some((
                401,
                error(401, "missing_api_key", "Missing API key"),
                vec![],
            ))
        }
        Some(a) if a != format!("Bearer {API_KEY}") => {
            return Some((
                403,
                error(403, "invalid_api_key", "API key is invalid"),
                vec![],
            ))
        }
        Some(_) => {}
    }
    match st.mode.clone().unwrap_or(Mode::Normal) {
        Mode::DownUntil(_, until) if Instant::now() >= until => {
            st.mode = Some(Mode::Normal);
        }
        Mode::Down(status) | Mode::DownUntil(status, _) => {
            return Some((
                status,
                error(status, "internal_server_error", "down"),
                vec![],
            ));
        }
        Mode::RateLimited { n, retry_after } if n > 0 => {
            st.mode = Some(if n > 1 {
                Mode::RateLimited {
                    n: n - 1,
                    retry_after,
                }
            } else {
                Mode::Normal
            });
            return Some((
                429,
                error(429, "rate_limit_exceeded", "Too many requests"),
                vec![
                    ("retry-after", retry_after.to_string()),
                    ("ratelimit-reset", retry_after.to_string()),
                ],
            ));
        }
        _ => {}
    }
    if let Some(limit) = st.rate_limit {
        let now = Instant::now();
        while st
            .window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            st.window.pop_front();
        }
        if st.window.len() >= limit as usize {
            let reset = st
                .window
                .front()
                .map(|t| Duration::from_secs(1).saturating_sub(now.duration_since(*t)))
                .unwrap_or_default();
            // Whole seconds, rounded up, as Resend's headers give them.
            let secs = reset.as_secs() + u64::from(reset.subsec_nanos() > 0);
            return Some((
                429,
                error(429, "rate_limit_exceeded", "Too many requests"),
                vec![
                    ("retry-after", secs.to_string()),
                    ("ratelimit-limit", limit.to_string()),
                    ("ratelimit-remaining", "0".into()),
                    ("ratelimit-reset", secs.to_string()),
                ],
            ));
        }
        st.window.push_back(now);
    }
    None
}

/// The answer for a key seen before: 409 while its first request runs; the
/// first response for the same body; 409 `invalid_idempotent_request` for
/// another. `None` for a new key.
fn known_key(st: &State, key: &str, body: &Value) -> Option<Answer> {
    match st.keys.get(key)? {
        KeyState::InProgress => Some((
            409,
            error(
                409,
                "concurrent_idempotent_requests",
                "Same key in progress",
            ),
            vec![],
        )),
        KeyState::Done {
            body: first,
            status,
            response,
        } if first == body => Some((*status, response.clone(), vec![])),
        KeyState::Done { .. } => Some((
            409,
            error(
                409,
                "invalid_idempotent_request",
                "Key used with another body",
            ),
            vec![],
        )),
    }
}

/// Why one email of a batch is invalid, if it is.
fn invalid(email: &Value, poison: &HashSet<String>) -> Option<String> {
    let Some(to) = recipient(email) else {
        return Some("`to` is required".into());
    };
    if email.get("subject").and_then(|s| s.as_str()).is_none() {
        return Some("`subject` is required".into());
    }
    if email.get("from").and_then(|s| s.as_str()).is_none() {
        return Some("`from` is required".into());
    }
    poison
        .contains(&to)
        .then(|| "Invalid `to` field".to_string())
}

fn decide_batch(
    state: &Arc<Mutex<State>>,
    auth: Option<String>,
    key: Option<String>,
    body: Option<Value>,
    permissive: bool,
) -> Answer {
    let mut st = state.lock().unwrap();
    if let Some(answer) = gate(&mut st, auth.as_deref()) {
        return answer;
    }
    let Some(emails) = body.as_ref().and_then(|b| b.as_array()).cloned() else {
        return (
            422,
            error(
                422,
                "validation_error",
                "The body must be an array of emails",
            ),
            vec![],
        );
    };
    if emails.is_empty() || emails.len() > 100 {
        return (
            422,
            error(422, "validation_error", "A batch holds 1 to 100 emails"),
            vec![],
        );
    }
    let body = Value::Array(emails.clone());
    // The validation mode is part of what the key was used for.
    let keyed = json!({ "permissive": permissive, "emails": body });
    if let Some(answer) = key.as_ref().and_then(|k| known_key(&st, k, &keyed)) {
        return answer;
    }
    let problems: Vec<(usize, String)> = emails
        .iter()
        .enumerate()
        .filter_map(|(i, e)| Some((i, invalid(e, &st.poison)?)))
        .collect();
    if !permissive {
        if let Some((index, message)) = problems.first() {
            // Strict: nothing is sent, and the key is not kept.
            return (
                422,
                error(
                    422,
                    "validation_error",
                    &format!("emails[{index}]: {message}"),
                ),
                vec![],
            );
        }
    }
    let mut data = Vec::new();
    for (i, email) in emails.iter().enumerate() {
        if problems.iter().any(|(p, _)| *p == i) {
            continue;
        }
        let id = uuid::Uuid::new_v4().to_string();
        st.sent.push(Sent {
            to: recipient(email).unwrap_or_default(),
            subject: email
                .get("subject")
                .and_then(|s| s.as_str())
                .unwrap_or_default()
                .to_string(),
        });
        data.push(json!({ "id": id }));
    }
    let mut response = json!({ "data": data });
    if permissive {
        response["errors"] = problems
            .iter()
            .map(|(index, message)| json!({ "index": index, "message": message }))
            .collect();
    }
    if let Some(key) = key {
        st.keys.insert(
            key,
            KeyState::Done {
                body: keyed,
                status: 200,
                response: response.clone(),
            },
        );
    }
    (200, response, vec![])
}

fn decide(
    state: &Arc<Mutex<State>>,
    auth: Option<String>,
    key: Option<String>,
    body: Option<Value>,
    to: Option<String>,
) -> (u16, Value, Vec<(&'static str, String)>) {
    let mut st = state.lock().unwrap();
    if let Some(answer) = gate(&mut st, auth.as_deref()) {
        return answer;
    }
    let Some(body) = body else {
        return (422, error(422, "validation_error", "Invalid JSON"), vec![]);
    };
    let (Some(to), Some(subject)) = (to, body.get("subject").and_then(|s| s.as_str())) else {
        return (
            422,
            error(
                422,
                "missing_required_field",
                "`to` and `subject` are required",
            ),
            vec![],
        );
    };
    if body.get("from").and_then(|f| f.as_str()).is_none() {
        return (
            422,
            error(422, "missing_required_field", "`from` is required"),
            vec![],
        );
    }
    if let Some(answer) = key.as_ref().and_then(|k| known_key(&st, k, &body)) {
        return answer;
    }
    if let Some(key) = &key {
        st.keys.insert(key.clone(), KeyState::InProgress);
    }
    let (status, response) = if st.poison.contains(&to) {
        (422, error(422, "validation_error", "Invalid `to` field"))
    } else {
        let id = uuid::Uuid::new_v4().to_string();
        st.sent.push(Sent {
            to,
            subject: subject.to_string(),
        });
        (200, json!({ "id": id }))
    };
    if let Some(key) = key {
        // Only a success is kept for the key; a rejected request may be
        // sent again under the same key once its cause is fixed.
        if status == 200 {
            st.keys.insert(
                key,
                KeyState::Done {
                    body,
                    status,
                    response: response.clone(),
                },
            );
        } else {
            st.keys.remove(&key);
        }
    }
    (status, response, vec![])
}
