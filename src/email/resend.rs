//! The `resend` transport: Resend's `POST /emails/batch` (up to 100 emails
//! per request; Resend counts requests, not emails, against its rate), with
//! `Idempotency-Key: <batch id>` so that a repeat of a call whose answer was
//! lost (a crash after the send, before the inbox commit) sends nothing new.
//! Batches go in permissive validation mode: an email Resend refuses is
//! reported by its index and dead-lettered alone, while the rest of the
//! batch is sent. `email.resend_base_url` (or `RESEND_BASE_URL`) points it
//! at another server, which is how the tests reach their fake Resend.
//!
//! The request body is built from `resend-rs`'s own types
//! ([`CreateEmailBaseOptions`]), so the wire format of an email is the
//! SDK's. The request itself is made here with `reqwest` (already the SDK's
//! HTTP client) instead of through the SDK's `batch` service, because Herald
//! must check the raw reply and the SDK hands back only its parse of it:
//! - it reads `{"data": []}` as a success that names no email, and it has
//!   no notion of a reply that names too few or repeats an `errors[].index`;
//! - on a 429 it keeps `ratelimit-reset` and drops `retry-after`, and on
//!   other statuses it keeps no header at all;
//! - it paces every client at about 0.9 requests/s of its own (a limiter
//!   that had to be opened through an environment variable), where Herald's
//!   `email.max_per_sec` decides the rate.
//!
//! [`super::reply`] turns status, headers and body into one answer per
//! email, or into the reason the batch is sent again or dead-lettered.

use std::time::Duration;

use resend_rs::types::{BatchValidation, CreateEmailBaseOptions};
use uuid::Uuid;

use super::reply::{advertised_rate, classify_batch_reply, SendError};
use super::{BatchAnswers, Email, SendPacer, Transport};

/// Resend's API, unless `email.resend_base_url` says otherwise.
pub const DEFAULT_BASE_URL: &str = "https://api.resend.com";

/// Most of a reply body read: a batch of 100 ids is about 5 KB; a provider
/// (or something posing as it) that sends more is not answering the request.
const MAX_REPLY_BYTES: usize = 1024 * 1024;

pub struct ResendTransport {
    http: reqwest::Client,
    batch_url: reqwest::Url,
    api_key: String,
    /// The longest delay any reply may impose (`retry.max_delay_ms`).
    max_delay: Duration,
    /// Told the provider's `ratelimit-limit` of every answer.
    pacer: Option<std::sync::Arc<SendPacer>>,
}

impl ResendTransport {
    /// `timeout` bounds each request from connect to the last byte of the
    /// reply: a provider that stalls is a transient failure, retried under
    /// the same key.
    pub fn new(
        api_key: &str,
        base_url: Option<&str>,
        timeout: Duration,
        max_delay: Duration,
    ) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            // A redirect is not Resend answering; never re-send a POST elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        let base = base_url.unwrap_or(DEFAULT_BASE_URL);
        let mut batch_url: reqwest::Url = base
            .parse()
            .map_err(|e| format!("email.resend_base_url `{base}`: {e}"))?;
        if !matches!(batch_url.scheme(), "http" | "https") {
            return Err(format!(
                "email.resend_base_url `{base}`: must be an http(s) URL"
            ));
        }
        let path = format!("{}/emails/batch", batch_url.path().trim_end_matches('/'));
        batch_url.set_path(&path);
        Ok(ResendTransport {
            http,
            batch_url,
            api_key: api_key.to_string(),
            max_delay,
            pacer: None,
        })
    }

    /// Tells `pacer` the rate the provider advertises on every answer.
    pub fn advertising_to(mut self, pacer: std::sync::Arc<SendPacer>) -> Self {
        self.pacer = Some(pacer);
        self
    }
}

/// A failure on the way to the provider or back: the request may or may
/// not have reached it; the idempotency key makes a retry safe.
fn unreached(e: reqwest::Error) -> SendError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    SendError::Transient {
        reason: format!("request {what}: {e}"),
        retry_after: None,
    }
}

#[async_trait::async_trait]
impl Transport for ResendTransport {
    async fn send_batch(&self, batch_key: Uuid, emails: &[(Uuid, Email)]) -> BatchAnswers {
        let body: Vec<CreateEmailBaseOptions> = emails
            .iter()
            .map(|(_, email)| {
                CreateEmailBaseOptions::new(&email.from, [email.to.as_str()], &email.subject)
                    .with_text(&email.text)
            })
            .collect();
        let mut request = self.http.post(self.batch_url.clone());
        // The provider request's own trace context, when traces are on.
        if let Some(traceparent) = crate::telemetry::traces::current() {
            request = request.header("traceparent", traceparent);
        }
        let mut response = request
            .bearer_auth(&self.api_key)
            .header("Idempotency-Key", batch_key.to_string())
            .header(
                "x-batch-validation",
                BatchValidation::Permissive.to_string(),
            )
            .json(&body)
            .send()
            .await
            .map_err(unreached)?;
        let status = response.status().as_u16();
        let headers: Vec<(String, String)> = response
            .headers()
            .iter()
            .filter_map(|(name, value)| {
                Some((name.as_str().to_string(), value.to_str().ok()?.to_string()))
            })
            .collect();
        let mut reply = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(unreached)? {
            if reply.len() + chunk.len() > MAX_REPLY_BYTES {
                return Err(SendError::ReplyInvalid(format!(
                    "a reply body over {MAX_REPLY_BYTES} bytes"
                )));
            }
            reply.extend_from_slice(&chunk);
        }
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        if let Some(pacer) = &self.pacer {
            pacer.advertised(advertised_rate(&headers));
        }
        classify_batch_reply(status, &headers, &reply, emails.len(), self.max_delay)
    }
}
