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
//! - `ratelimit-limit/-remaining/-reset` on every answer, the limit being
//!   the one it enforces ([`FakeResend::limit_rate`]; 10,000 unlimited); a
//!   scripted 429 carries `retry-after` and `ratelimit-reset`;
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
//! - replies that lie ([`Mode::Lie`]): 200 with ids that do not name every
//!   email (`{"data": []}`, an id too few, an `errors[].index` out of range
//!   or named twice), keeping nothing and sending nothing, as a provider
//!   having a bad day would; a 429 whose headers ask for any delay at all
//!   ([`Mode::RateLimitedBy`]);
//! - webhooks ([`super::resend_webhooks`]): what became of an accepted email
//!   (`email.delivered`, `email.bounced`, …), signed the Svix way and posted
//!   to Herald, retried on anything but 2xx; on request every accepted email
//!   is reported delivered ([`FakeResend::auto_deliver`]).
//!
//! Every call is recorded with its time, key and status, and every email
//! actually "sent" is kept: tests count there, never in Herald.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use warp::http::{Response, StatusCode};

use super::resend_webhooks::{deliver, event_body, Message, Sender};
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
    /// Answered 200 with a lie ([`Mode::Lie`]).
    pub lied: bool,
    /// The W3C `traceparent` the request carried.
    pub traceparent: Option<String>,
}

/// An email the server accepted (and would have sent).
#[derive(Debug, Clone)]
pub struct Sent {
    /// The id the reply named for it, which its webhooks carry.
    pub id: String,
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
    /// Answer the next `n` calls 429 with these header values (either may
    /// be left out), then normal.
    RateLimitedBy {
        n: u32,
        retry_after: Option<String>,
        ratelimit_reset: Option<String>,
    },
    /// Answer every batch 200 with this lie, keeping and sending nothing.
    Lie(Lie),
}

/// A success reply that does not say which emails were accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lie {
    /// `{"data": []}`.
    NoIds,
    /// One id fewer than the emails.
    IdTooFew,
    /// An `errors[].index` past the last email.
    IndexOutOfRange,
    /// One `errors[].index` named twice.
    IndexRepeated,
}

impl Lie {
    pub const ALL: [Lie; 4] = [
        Lie::NoIds,
        Lie::IdTooFew,
        Lie::IndexOutOfRange,
        Lie::IndexRepeated,
    ];

    /// The reply to a batch of `n` emails.
    fn reply(self, n: usize) -> Value {
        let ids = |k: usize| -> Vec<Value> {
            (0..k)
                .map(|_| json!({ "id": uuid::Uuid::new_v4().to_string() }))
                .collect()
        };
        let refused = |i: usize| json!({ "index": i, "message": "Invalid `to` field" });
        match self {
            Lie::NoIds => json!({ "data": [] }),
            Lie::IdTooFew => json!({ "data": ids(n.saturating_sub(1)), "errors": [] }),
            Lie::IndexOutOfRange => {
                json!({ "data": ids(n.saturating_sub(1)), "errors": [refused(n)] })
            }
            Lie::IndexRepeated => json!({
                "data": ids(n.saturating_sub(2)),
                "errors": [refused(0), refused(0)],
            }),
        }
    }
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
    /// Report every accepted email delivered, by webhook.
    auto_deliver: bool,
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
    webhooks: Arc<Mutex<Sender>>,
    pub addr: SocketAddr,
}

impl FakeResend {
    pub async fn start() -> FakeResend {
        let state = Arc::new(Mutex::new(State::default()));
        let webhooks = Arc::new(Mutex::new(Sender::default()));
        let shared = state.clone();
        let batch_state = state.clone();
        let batch_webhooks = webhooks.clone();
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
            .and(warp::header::optional::<String>("traceparent"))
            .and(warp::body::bytes())
            .then(move |auth, key, validation, traceparent, body| {
                handle_batch(
                    batch_state.clone(),
                    batch_webhooks.clone(),
                    auth,
                    key,
                    (validation, traceparent),
                    body,
                )
            });
        let route = batch.or(single);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake resend");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(warp::serve(route).incoming(listener).run());
        FakeResend {
            state,
            webhooks,
            addr,
        }
    }

    /// Posts this fake's webhooks to `url` (Herald's `/webhooks/resend`).
    pub fn webhooks_to(&self, url: &str) {
        self.webhooks.lock().unwrap().target = Some(url.to_string());
    }

    /// Signs each webhook with every one of `secrets` (two while a secret
    /// rotates).
    pub fn sign_with(&self, secrets: &[&str]) {
        self.webhooks.lock().unwrap().secrets = secrets.iter().map(|s| s.to_string()).collect();
    }

    /// Reports every email accepted from now on `email.delivered`.
    pub fn auto_deliver(&self, on: bool) {
        self.state.lock().unwrap().auto_deliver = on;
    }

    /// Sends a webhook of `kind` about the email `email_id` (with `data`'s
    /// extra fields, e.g. `{"bounce": {"type": "Permanent"}}`), retried until
    /// answered 2xx; its message id.
    pub fn emit(&self, kind: &str, email_id: &str, data: Value) -> String {
        let to = self
            .sent()
            .into_iter()
            .find(|s| s.id == email_id)
            .map(|s| s.to)
            .unwrap_or_default();
        emit(
            &self.webhooks,
            kind,
            email_id,
            event_body(kind, email_id, &to, data),
        )
    }

    /// Sends message `id` again, as a new delivery of the same message
    /// (same id and body, new timestamp and signature).
    pub fn redeliver(&self, id: &str) {
        let index = {
            let mut w = self.webhooks.lock().unwrap();
            let Some(m) = w.messages.iter().find(|m| m.id == id).cloned() else {
                panic!("no webhook message {id}");
            };
            w.messages.push(Message {
                attempts: Vec::new(),
                delivered: false,
                given_up: false,
                ..m
            });
            w.messages.len() - 1
        };
        tokio::spawn(deliver(self.webhooks.clone(), index));
    }

    /// Every webhook message so far (a redelivery is a message of its own).
    pub fn messages(&self) -> Vec<Message> {
        self.webhooks.lock().unwrap().messages.clone()
    }

    /// The id of the last email accepted for `to`.
    pub fn email_id_of(&self, to: &str) -> Option<String> {
        self.sent()
            .into_iter()
            .rev()
            .find(|s| s.to == to)
            .map(|s| s.id)
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

/// What `ratelimit-limit` says while no limit is set: more than any test
/// paces to, as a real account's limit is always there.
const UNLIMITED_ADVERTISED: u32 = 10_000;

fn reply(
    status: u16,
    body: Value,
    extra: &[(&str, String)],
    limit: Option<u32>,
) -> Response<String> {
    let mut headers: Vec<(&str, String)> = vec![
        ("content-type", "application/json".into()),
        (
            "ratelimit-limit",
            limit.unwrap_or(UNLIMITED_ADVERTISED).to_string(),
        ),
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
        lied: false,
        traceparent: None,
    });
    let limit = state.rate_limit;
    drop(state);
    reply(status, response, &extra, limit)
}

/// Queues a webhook message and starts its delivery; its id.
fn emit(webhooks: &Arc<Mutex<Sender>>, kind: &str, email_id: &str, body: Vec<u8>) -> String {
    let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
    let index = {
        let mut w = webhooks.lock().unwrap();
        w.messages.push(Message {
            id: id.clone(),
            kind: kind.to_string(),
            email_id: email_id.to_string(),
            body,
            attempts: Vec::new(),
            delivered: false,
            given_up: false,
        });
        w.messages.len() - 1
    };
    tokio::spawn(deliver(webhooks.clone(), index));
    id
}

async fn handle_batch(
    state: Arc<Mutex<State>>,
    webhooks: Arc<Mutex<Sender>>,
    auth: Option<String>,
    key: Option<String>,
    (validation, traceparent): (Option<String>, Option<String>),
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
    let sent_before = state.lock().unwrap().sent.len();
    let (status, response, extra) = decide_batch(&state, auth, key.clone(), parsed, permissive);
    let (auto, accepted, limit) = {
        let mut st = state.lock().unwrap();
        let lied = matches!(st.mode, Some(Mode::Lie(_))) && status == 200;
        st.calls.push(Call {
            at: Instant::now(),
            key,
            status,
            emails,
            batch: true,
            lied,
            traceparent,
        });
        (
            st.auto_deliver,
            st.sent[sent_before..].to_vec(),
            st.rate_limit,
        )
    };
    if auto {
        for email in accepted {
            emit(
                &webhooks,
                "email.delivered",
                &email.id,
                event_body("email.delivered", &email.id, &email.to, json!({})),
            );
        }
    }
    reply(status, response, &extra, limit)
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
        Mode::RateLimitedBy {
            n,
            retry_after,
            ratelimit_reset,
        } if n > 0 => {
            st.mode = Some(if n > 1 {
                Mode::RateLimitedBy {
                    n: n - 1,
                    retry_after: retry_after.clone(),
                    ratelimit_reset: ratelimit_reset.clone(),
                }
            } else {
                Mode::Normal
            });
            let mut headers = vec![];
            if let Some(v) = retry_after {
                headers.push(("retry-after", v));
            }
            // Without one of its own, the answer's default `ratelimit-reset`
            // (1) is left out, so only the header under test asks for a delay.
            headers.push(("ratelimit-reset", ratelimit_reset.unwrap_or_default()));
            return Some((
                429,
                error(429, "rate_limit_exceeded", "Too many requests"),
                headers,
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
    if let Some(Mode::Lie(lie)) = st.mode {
        // A success that names no outcome: nothing kept, nothing sent.
        return (200, lie.reply(emails.len()), vec![]);
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
            id: id.clone(),
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
            id: id.clone(),
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
