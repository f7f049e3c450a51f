//! `POST /webhooks/resend`: what Resend reports after it accepted an email
//! (delivered, delayed, bounced, complained, failed, suppressed), signed the
//! Svix way.
//!
//! A delivery is believed only once its signature verifies against the raw
//! body: `svix-signature` is a space-separated list of `v1,<base64>`, one of
//! which must be the HMAC-SHA256 of `{svix-id}.{svix-timestamp}.{body}` under
//! the key in `email.webhook_secret` (any one is enough: during a secret
//! rotation both are sent), and `svix-timestamp` must be within 5 minutes.
//! The check is Svix's own verifier, as the Standard Webhooks reference
//! implementation they publish (`standardwebhooks`), not a copy of it. (The
//! `svix` crate carries the same verifier inside its API client, whose build
//! needs a TLS stack of its own: aws-lc-rs, the slowest crate of a fresh
//! build, for a client Herald never calls.) Standard Webhooks names the
//! headers `webhook-*`; Resend sends them as `svix-*`: either is read.
//! Anything else is 401 and changes nothing.
//!
//! A verified delivery is recorded by its `svix-id` in the same transaction
//! as its effect ([`crate::store::ProviderEventStore`]), so a redelivery
//! (Resend retries anything not answered 2xx within its timeout) is 2xx and
//! changes nothing, and a report for an email Herald did not send is 2xx and
//! counted, not an error that would make Resend retry it for a day.

use http::StatusCode;
use serde::Deserialize;
use warp::reply::Response;

use super::problem::{json_response, ApiError};
use super::{AppState, Request};
use crate::domain::EmailEvent;
use crate::store::{ProviderEvent, MAX_EVENT_TEXT};
use crate::telemetry::metrics as m;

/// The verifier of `email.webhook_secret`.
pub type WebhookVerifier = standardwebhooks::Webhook;

/// The verifier for a configured secret (checked at load:
/// [`crate::config::is_webhook_secret`]).
pub fn verifier(secret: &str) -> Result<WebhookVerifier, String> {
    standardwebhooks::Webhook::new(secret.trim()).map_err(|e| e.to_string())
}

/// The three signature headers under their Standard Webhooks names, from
/// Resend's `svix-*` (or, failing that, from `webhook-*` as sent).
fn signature_headers(headers: &http::HeaderMap) -> http::HeaderMap {
    let mut named = http::HeaderMap::new();
    for (svix, standard) in [
        ("svix-id", standardwebhooks::HEADER_WEBHOOK_ID),
        ("svix-timestamp", standardwebhooks::HEADER_WEBHOOK_TIMESTAMP),
        ("svix-signature", standardwebhooks::HEADER_WEBHOOK_SIGNATURE),
    ] {
        if let Some(value) = headers.get(svix).or_else(|| headers.get(standard)) {
            named.insert(standard, value.clone());
        }
    }
    named
}

/// What of a Resend webhook body Herald reads: its `type` and its `data`.
#[derive(Deserialize)]
struct Incoming {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: serde_json::Value,
}

/// The `type` label of `herald_webhook_events_total`: one of the types
/// Herald acts on, or `other`.
fn type_label(kind: &str) -> &'static str {
    const KNOWN: [&str; 6] = [
        "email.delivered",
        "email.delivery_delayed",
        "email.bounced",
        "email.complained",
        "email.failed",
        "email.suppressed",
    ];
    KNOWN.into_iter().find(|k| *k == kind).unwrap_or("other")
}

/// Why a delivery did not verify, in words that do not help a forger.
fn unverified(error: standardwebhooks::WebhookError) -> ApiError {
    use standardwebhooks::WebhookError as E;
    ApiError::WebhookUnverified(match error {
        E::MissingHeader(_) => "svix-id, svix-timestamp and svix-signature are required",
        E::InvalidTimestamp | E::TimestampTooOldError | E::FutureTimestampError => {
            "svix-timestamp is more than 5 minutes from now"
        }
        _ => "no signature in svix-signature matches",
    })
}

/// A text from the body, on one line and bounded.
fn text(value: &serde_json::Value) -> Option<String> {
    let text = value.as_str()?;
    Some(
        text.chars()
            .take(MAX_EVENT_TEXT)
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect(),
    )
}

pub async fn resend(state: &AppState, request: &Request) -> Result<Response, ApiError> {
    let Some(verifier) = state.webhooks.as_deref() else {
        return Err(ApiError::WebhooksNotConfigured);
    };
    let body = request.body_bytes()?;
    if let Err(error) = verifier.verify(body, &signature_headers(&request.headers)) {
        m::webhook_event("unverified", "rejected");
        tracing::warn!(%error, "a webhook to /webhooks/resend did not verify; refused");
        return Err(unverified(error));
    }
    // Verified: the id is there and is Resend's.
    let id = request
        .headers
        .get("svix-id")
        .or_else(|| request.headers.get("webhook-id"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if id.is_empty() || id.len() > 256 {
        return Err(ApiError::InvalidBody(
            "svix-id must be 1 to 256 characters".into(),
        ));
    }
    let incoming: Incoming = serde_json::from_slice(body).map_err(|e| {
        m::webhook_event("other", "invalid");
        ApiError::InvalidBody(format!("a webhook body is `{{\"type\", \"data\"}}`: {e}"))
    })?;
    let data = &incoming.data;
    let bounce_type = data.pointer("/bounce/type").and_then(|t| t.as_str());
    let event = EmailEvent::of_resend(&incoming.kind, bounce_type);
    let detail = ["/bounce/message", "/failed/reason", "/suppressed/message"]
        .iter()
        .find_map(|p| data.pointer(p).and_then(text));
    let email_id = data
        .get("email_id")
        .and_then(text)
        .filter(|id| !id.is_empty());
    let report = ProviderEvent {
        id: id.to_string(),
        kind: incoming.kind.chars().take(MAX_EVENT_TEXT).collect(),
        event,
        email_id,
        detail,
    };
    let recorded = state.store.record_provider_event(&report).await?;
    let label = type_label(&incoming.kind);
    m::webhook_event(label, recorded.outcome());
    tracing::info!(
        kind = label,
        outcome = recorded.outcome(),
        email_id = report.email_id.as_deref().unwrap_or(""),
        "webhook recorded"
    );
    Ok(json_response(
        StatusCode::OK,
        serde_json::json!({ "outcome": recorded.outcome() }).to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_under_resend_s_svix_names_or_the_standard_ones() {
        // whsec_ + base64 of a 24-byte key.
        let verifier = verifier("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"type":"email.delivered","data":{}}"#;
        let now = chrono::Utc::now().timestamp();
        let signature = verifier.sign("msg_1", now, body).unwrap();
        let headers = |prefix: &str, signature: &str| {
            let mut headers = http::HeaderMap::new();
            for (name, value) in [
                ("id", "msg_1".to_string()),
                ("timestamp", now.to_string()),
                ("signature", format!("v1,bm90IGl0 {signature}")),
            ] {
                let name = http::HeaderName::from_bytes(format!("{prefix}-{name}").as_bytes());
                headers.insert(name.unwrap(), value.parse().unwrap());
            }
            headers
        };
        for prefix in ["svix", "webhook"] {
            let named = signature_headers(&headers(prefix, &signature));
            assert!(verifier.verify(body, &named).is_ok(), "{prefix}-*");
            let forged = signature_headers(&headers(prefix, "v1,Zm9yZ2Vk"));
            assert!(verifier.verify(body, &forged).is_err(), "{prefix}-* forged");
        }
        assert!(matches!(
            verifier.verify(body, &signature_headers(&http::HeaderMap::new())),
            Err(standardwebhooks::WebhookError::MissingHeader(_))
        ));
    }

    #[test]
    fn the_type_label_is_one_of_a_fixed_set() {
        assert_eq!(type_label("email.bounced"), "email.bounced");
        assert_eq!(type_label("email.opened"), "other");
        assert_eq!(type_label(&"x".repeat(10_000)), "other");
    }
}
