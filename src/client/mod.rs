//! Herald's retrying client: what a well-behaved caller of the
//! API does, used by `herald attack` and by the tests.
//!
//! - One [`Operation`] is one logical action. Its `Idempotency-Key` is made
//!   when the operation is, before the first attempt, and every retry sends
//!   the same key and the same body, so the server replays instead of acting
//!   twice.
//! - Only what may succeed later is retried: network errors (including a
//!   response cut off mid-body), 409 (the first attempt is still running),
//!   429 and 5xx. Anything else is the answer.
//! - The pause before a retry is full jitter ([`RetryPolicy`]: anywhere in
//!   `[0, min(cap, base·2^n)]`), never shorter than the server's
//!   `Retry-After`, so many clients retrying at once spread out instead of
//!   coming back in waves.
//! - A client-side retry budget (the bucket the daemon's RetryBudget
//!   uses, [`RetryBudgetArgs::bucket`]): every retry takes a token, a success puts some back; with none
//!   left the operation fails at once rather than adding to a storm.
//! - Each attempt can be written to a [`Transcript`] (operation key, attempt,
//!   delay before it, status or network error, Retry-After), the evidence
//!   that the schedule above is what actually happened.

pub mod attack;
pub mod lossy_proxy;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::actors::retry_budget::RetryBudgetArgs;
use crate::idempotency::IdempotencyKey;
use crate::rate::TokenBucket;
use crate::retry::RetryPolicy;

/// How the client retries.
#[derive(Debug, Clone)]
pub struct ClientPolicy {
    pub retry: RetryPolicy,
    /// The client-side retry budget's shape.
    pub budget: RetryBudgetArgs,
    /// Bound on one attempt, response body included.
    pub attempt_timeout: Duration,
}

impl Default for ClientPolicy {
    fn default() -> Self {
        ClientPolicy {
            retry: RetryPolicy {
                base: Duration::from_millis(100),
                cap: Duration::from_secs(5),
                max_attempts: 8,
                max_delay: Duration::from_secs(60),
            },
            // Generous for a single caller; each success earns a retry back.
            budget: RetryBudgetArgs {
                capacity: 100.0,
                refill_per_success: 0.5,
                refill_per_sec: 5.0,
                view: Default::default(),
            },
            attempt_timeout: Duration::from_secs(10),
        }
    }
}

/// One logical action: its key is fixed before the first attempt.
#[derive(Debug, Clone)]
pub struct Operation {
    pub key: IdempotencyKey,
    pub path: String,
    /// Bearer token (a user's JWT or the admin token).
    pub token: String,
    pub body: serde_json::Value,
}

impl Operation {
    /// A `POST path` with a fresh key.
    pub fn post(path: &str, token: &str, body: serde_json::Value) -> Operation {
        let key = IdempotencyKey::parse(uuid::Uuid::new_v4().to_string().as_bytes())
            .expect("a UUID is a valid key");
        Operation {
            key,
            path: path.to_string(),
            token: token.to_string(),
            body,
        }
    }
}

/// One attempt, as the transcript records it.
#[derive(Debug, Clone, Serialize)]
pub struct AttemptRecord {
    /// The operation's Idempotency-Key.
    pub key: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The pause taken before this attempt (0 for the first).
    pub delay_ms: u64,
    /// Milliseconds since the client was made, when the attempt started.
    pub at_ms: u64,
    /// The HTTP status, or `None` for a network error.
    pub status: Option<u16>,
    /// The server's `Retry-After`, in seconds, when it sent one.
    pub retry_after_secs: Option<u64>,
}

/// Every attempt of every operation, in the order they started.
#[derive(Debug, Clone, Default)]
pub struct Transcript(Arc<Mutex<Vec<AttemptRecord>>>);

impl Transcript {
    pub fn records(&self) -> Vec<AttemptRecord> {
        self.0.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Writes the records as JSON lines.
    pub fn write_jsonl(&self, path: &std::path::Path) -> std::io::Result<()> {
        let mut out = String::new();
        for record in self.records() {
            out.push_str(&serde_json::to_string(&record).map_err(std::io::Error::other)?);
            out.push('\n');
        }
        std::fs::write(path, out)
    }

    fn push(&self, record: AttemptRecord) {
        if let Ok(mut records) = self.0.lock() {
            records.push(record);
        }
    }
}

/// The final answer to an operation.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: serde_json::Value,
    /// `Idempotent-Replayed: true`: the server answered from the stored outcome.
    pub replayed: bool,
    pub attempts: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("gave up after {attempts} attempts (last: {last})")]
    Exhausted { attempts: u32, last: String },
    #[error("retry budget exhausted after {attempts} attempts (last: {last})")]
    NoBudget { attempts: u32, last: String },
    #[error("client setup: {0}")]
    Setup(String),
}

/// What one attempt came to.
enum Tried {
    Answer(Answer),
    Retry {
        last: String,
        retry_after: Option<Duration>,
    },
}

/// The retrying client.
#[derive(Clone)]
pub struct RetryingClient {
    http: reqwest::Client,
    base_url: String,
    policy: ClientPolicy,
    budget: Arc<Mutex<TokenBucket>>,
    transcript: Transcript,
    started: Instant,
}

impl RetryingClient {
    pub fn new(base_url: &str, policy: ClientPolicy) -> Result<RetryingClient, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(policy.attempt_timeout)
            .build()
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        let budget = policy.budget.bucket(tokio::time::Instant::now());
        Ok(RetryingClient {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
            policy,
            budget: Arc::new(Mutex::new(budget)),
            transcript: Transcript::default(),
            started: Instant::now(),
        })
    }

    pub fn transcript(&self) -> &Transcript {
        &self.transcript
    }

    /// Runs `op` to its answer, retrying as the module doc says.
    pub async fn execute(&self, op: &Operation) -> Result<Answer, ClientError> {
        let mut delay = Duration::ZERO;
        let mut attempt = 1;
        loop {
            tokio::time::sleep(delay).await;
            let tried = self.attempt(op, attempt, delay).await;
            let (last, retry_after) = match tried {
                Tried::Answer(answer) => {
                    if let Ok(mut bucket) = self.budget.lock() {
                        bucket.deposit(
                            self.policy.budget.refill_per_success,
                            tokio::time::Instant::now(),
                        );
                    }
                    return Ok(answer);
                }
                Tried::Retry { last, retry_after } => (last, retry_after),
            };
            if self.policy.retry.exhausted(attempt) {
                return Err(ClientError::Exhausted {
                    attempts: attempt,
                    last,
                });
            }
            let granted = self
                .budget
                .lock()
                .map(|mut b| b.try_take(1.0, tokio::time::Instant::now()).is_ok())
                .unwrap_or(false);
            if !granted {
                return Err(ClientError::NoBudget {
                    attempts: attempt,
                    last,
                });
            }
            delay = self
                .policy
                .retry
                .delay(attempt, retry_after, &mut rand::rng());
            attempt += 1;
        }
    }

    async fn attempt(&self, op: &Operation, attempt: u32, delay: Duration) -> Tried {
        let mut record = AttemptRecord {
            key: op.key.as_str().to_string(),
            attempt,
            delay_ms: delay.as_millis() as u64,
            at_ms: self.started.elapsed().as_millis() as u64,
            status: None,
            retry_after_secs: None,
        };
        let sent = self
            .http
            .post(format!("{}{}", self.base_url, op.path))
            .bearer_auth(&op.token)
            .header("idempotency-key", op.key.as_str())
            .json(&op.body)
            .send()
            .await;
        let tried = match sent {
            Err(e) => Tried::Retry {
                last: format!("network: {e}"),
                retry_after: None,
            },
            Ok(response) => {
                let status = response.status().as_u16();
                record.status = Some(status);
                let retry_after = response
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok());
                record.retry_after_secs = retry_after;
                let replayed = response
                    .headers()
                    .get("idempotent-replayed")
                    .is_some_and(|v| v == "true");
                let retryable = status == 409 || status == 429 || status >= 500;
                match response.bytes().await {
                    // A cut-off body: the outcome is unknown, ask again.
                    Err(e) => {
                        record.status = None;
                        Tried::Retry {
                            last: format!("network (body): {e}"),
                            retry_after: None,
                        }
                    }
                    Ok(_) if retryable => Tried::Retry {
                        last: format!("HTTP {status}"),
                        retry_after: retry_after.map(Duration::from_secs),
                    },
                    Ok(bytes) => Tried::Answer(Answer {
                        status,
                        body: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
                        replayed,
                        attempts: attempt,
                    }),
                }
            }
        };
        self.transcript.push(record);
        tried
    }
}
