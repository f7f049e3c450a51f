//! The `resend` transport: Resend's `POST /emails/batch` (up to 100 emails
//! per request; Resend counts requests, not emails, against its rate)
//! through the `resend-rs` SDK, with `Idempotency-Key: <batch id>` so that a
//! repeat of a call whose answer was lost (a crash after the send, before
//! the inbox commit) sends nothing new. Batches go in permissive validation
//! mode: an email Resend refuses is reported by its index and dead-lettered
//! alone, while the rest of the batch is sent. `POST /emails` (one email,
//! keyed by its event id) remains for [`Transport::send`]. `email.resend_base_url` (or `RESEND_BASE_URL`) points it at
//! another server, which is how the tests reach their fake Resend.
//!
//! Two things of the SDK are kept out of Herald's way:
//! - its client-side limiter (a burst of `RESEND_RATE_LIMIT` then one send
//!   per 1.1 s) is opened wide by [`open_sdk_rate_limit`] before any thread
//!   starts; Herald's own `email.max_per_sec` decides the rate;
//! - its retry helpers are not used; a failure is classified here and
//!   retried, deferred or dead-lettered by Herald's pipeline.

use std::time::Duration;

use resend_rs::idempotent::{Idempotent, IdempotentTrait};
use resend_rs::types::{BatchValidation, CreateEmailBaseOptions};
use resend_rs::Resend;
use uuid::Uuid;

use super::{Email, SendError, Transport};

/// Burst size handed to resend-rs's limiter: with a bucket this deep it
/// never waits (four billion sends), so only Herald's limiter paces sends.
const SDK_BURST: &str = "4294967295";

/// Opens resend-rs's own limiter unless the operator set
/// `RESEND_RATE_LIMIT` themselves. The SDK reads that variable when a client
/// is built and offers no other way to configure it.
///
/// # Safety
/// Call before the process starts any other thread (it sets an environment
/// variable); `main` does, before building the runtime.
pub unsafe fn open_sdk_rate_limit() {
    if std::env::var_os("RESEND_RATE_LIMIT").is_none() {
        // SAFETY: the caller guarantees no other thread exists yet.
        unsafe { std::env::set_var("RESEND_RATE_LIMIT", SDK_BURST) };
    }
}

pub struct ResendTransport {
    /// The SDK client (clones share its connection pool).
    client: Resend,
}

impl ResendTransport {
    pub fn new(api_key: &str, base_url: Option<&str>, timeout: Duration) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        let mut config = resend_rs::ConfigBuilder::new(api_key).client(http);
        if let Some(url) = base_url {
            let url = url
                .parse()
                .map_err(|e| format!("email.resend_base_url `{url}`: {e}"))?;
            config = config.base_url(url);
        }
        Ok(ResendTransport {
            client: Resend::with_config(config.build()),
        })
    }
}

/// The retry classification of what Resend (or the way to it) answered.
fn classify(error: resend_rs::Error) -> SendError {
    use resend_rs::Error as E;
    match error {
        E::RateLimit {
            ratelimit_reset, ..
        } => SendError::Transient {
            reason: "429 rate_limit_exceeded".into(),
            retry_after: ratelimit_reset.map(Duration::from_secs),
        },
        E::Resend(response) => {
            let status = response.status_code;
            let reason = format!("{status} {}", response.name);
            if status == 429 || status >= 500 || response.name == "concurrent_idempotent_requests" {
                SendError::Transient {
                    reason,
                    retry_after: None,
                }
            } else {
                SendError::Permanent(format!("{reason}: {}", response.message))
            }
        }
        // Timeouts, refused connections, a proxy's HTML error page: the
        // request may not have reached Resend; the idempotency key makes a
        // retry safe.
        E::Http(e) => SendError::Transient {
            reason: format!("http: {e}"),
            retry_after: None,
        },
        E::Parse { .. } => SendError::Transient {
            reason: "unreadable response".into(),
            retry_after: None,
        },
        E::Other(reason) => SendError::Permanent(reason),
    }
}

#[async_trait::async_trait]
impl Transport for ResendTransport {
    async fn send(&self, email: &Email, idempotency_key: Uuid) -> Result<(), SendError> {
        let options = CreateEmailBaseOptions::new(&email.from, [email.to.as_str()], &email.subject)
            .with_text(&email.text);
        let request: Idempotent<CreateEmailBaseOptions> =
            options.with_idempotency_key(&idempotency_key.to_string());
        self.client
            .emails
            .send(request)
            .await
            .map(|_| ())
            .map_err(classify)
    }

    async fn send_batch(
        &self,
        batch_key: Uuid,
        emails: &[(Uuid, Email)],
    ) -> Result<Vec<super::BatchAnswer>, SendError> {
        let options: Vec<CreateEmailBaseOptions> = emails
            .iter()
            .map(|(_, email)| {
                CreateEmailBaseOptions::new(&email.from, [email.to.as_str()], &email.subject)
                    .with_text(&email.text)
            })
            .collect();
        let request: Idempotent<Vec<CreateEmailBaseOptions>> =
            options.with_idempotency_key(&batch_key.to_string());
        let response = match self
            .client
            .batch
            .send_with_batch_validation(request, BatchValidation::Permissive)
            .await
        {
            Ok(response) => response,
            // Resend keeps a key only after a request with it succeeded, and
            // Herald reuses a batch's key only for that batch: the batch was
            // accepted before (its answer was lost), and its body differs
            // now only because `email.from` changed since. Sending it again
            // under a new key would mail everyone twice.
            Err(resend_rs::Error::Resend(r)) if r.name == "invalid_idempotent_request" => {
                tracing::warn!(batch = %batch_key,
                    "Resend already accepted this batch (409 invalid_idempotent_request): recorded as sent");
                return Ok(vec![Ok(()); emails.len()]);
            }
            Err(e) => return Err(classify(e)),
        };
        let mut answers: Vec<super::BatchAnswer> = vec![Ok(()); emails.len()];
        for refused in response.errors {
            if let Some(answer) = usize::try_from(refused.index)
                .ok()
                .and_then(|i| answers.get_mut(i))
            {
                *answer = Err(format!("refused by Resend: {}", refused.message));
            }
        }
        Ok(answers)
    }
}
