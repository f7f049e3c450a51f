//! The HTTP layer's one error type, [`ApiError`], and its mapping to RFC 9457
//! `application/problem+json` responses — in this one place.
//!
//! Every variant has a stable `code` member clients can branch on. Errors
//! from other layers ([`StoreError`], [`InvalidBody`], [`InvalidKey`]) convert
//! with `?`.

use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::StatusCode;
use serde::Serialize;
use warp::reply::Response;

use crate::domain::InvalidBody;
use crate::idempotency::protocol::{Answer, IdempotencyError};
use crate::idempotency::{InvalidKey, StoredResponse};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("{0}")]
    InvalidBody(String),
    #[error("{0}")]
    InvalidQuery(String),
    #[error("Idempotency-Key must be 1 to 255 visible ASCII characters")]
    IdempotencyKeyInvalid,
    #[error("this endpoint requires an Idempotency-Key header")]
    IdempotencyKeyMissing,
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("no such resource")]
    NotFound,
    #[error("no such job")]
    JobNotFound,
    #[error("this job is closed: it takes no applications and no edits")]
    JobClosed,
    /// 405; `allow` is the path's methods, sent as `Allow` (RFC 9110 15.5.6).
    #[error("method not allowed; this path accepts {allow}")]
    MethodNotAllowed { allow: &'static str },
    #[error("a request with this Idempotency-Key is still being processed; retry later")]
    InFlight,
    #[error("this Idempotency-Key was used for a different request")]
    KeyReused,
    #[error("dev login is disabled")]
    DevLoginDisabled,
    #[error("this dead letter was {0}; it can no longer be {1}")]
    DeadLetterClosed(&'static str, &'static str),
    #[error("too many requests from this client; retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("the request was not received within {0} ms")]
    RequestTimeout(u64),
    #[error("the webhook's signature does not verify: {0}")]
    WebhookUnverified(&'static str),
    #[error(
        "webhooks are not configured here: set email.webhook_secret (HERALD_EMAIL__WEBHOOK_SECRET)"
    )]
    WebhooksNotConfigured,
    #[error("service temporarily unavailable; retry later")]
    Unavailable,
    #[error("internal error")]
    Internal,
}

/// The RFC 9457 body.
#[derive(Debug, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    pub code: &'static str,
}

/// The problem `code` of an error response, kept on the response for the
/// request log.
#[derive(Debug, Clone, Copy)]
pub struct ProblemCode(pub &'static str);

/// How the request's Idempotency-Key was resolved (`new`, `replay`,
/// `in_flight`, `mismatch`), kept on the response for the request log.
#[derive(Debug, Clone, Copy)]
pub struct IdempotencyOutcome(pub &'static str);

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::InvalidBody(_)
            | ApiError::InvalidQuery(_)
            | ApiError::IdempotencyKeyInvalid
            | ApiError::IdempotencyKeyMissing => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) | ApiError::WebhookUnverified(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound
            | ApiError::JobNotFound
            | ApiError::DevLoginDisabled
            | ApiError::WebhooksNotConfigured => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::InFlight | ApiError::DeadLetterClosed(..) | ApiError::JobClosed => {
                StatusCode::CONFLICT
            }
            ApiError::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::InvalidBody(_) => "invalid_body",
            ApiError::InvalidQuery(_) => "invalid_query",
            ApiError::IdempotencyKeyInvalid => "idempotency_key_invalid",
            ApiError::IdempotencyKeyMissing => "idempotency_key_missing",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::NotFound | ApiError::DevLoginDisabled => "not_found",
            ApiError::JobNotFound => "job_not_found",
            ApiError::JobClosed => "job_closed",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::InFlight => "idempotency_in_flight",
            ApiError::DeadLetterClosed(..) => "dead_letter_closed",
            ApiError::KeyReused => "idempotency_key_reused",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::WebhookUnverified(_) => "webhook_unverified",
            ApiError::WebhooksNotConfigured => "webhooks_not_configured",
            ApiError::Unavailable => "unavailable",
            ApiError::Internal => "internal",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            ApiError::BodyTooLarge { .. } => "Request body too large",
            ApiError::InvalidBody(_) => "Invalid request body",
            ApiError::InvalidQuery(_) => "Invalid query string",
            ApiError::IdempotencyKeyInvalid => "Invalid Idempotency-Key",
            ApiError::IdempotencyKeyMissing => "Idempotency-Key required",
            ApiError::Unauthorized(_) => "Unauthorized",
            ApiError::NotFound | ApiError::DevLoginDisabled => "Not found",
            ApiError::JobNotFound => "Job not found",
            ApiError::JobClosed => "Job closed",
            ApiError::MethodNotAllowed { .. } => "Method not allowed",
            ApiError::InFlight => "Request in progress",
            ApiError::DeadLetterClosed(..) => "Dead letter closed",
            ApiError::KeyReused => "Idempotency-Key reused",
            ApiError::RateLimited { .. } => "Too many requests",
            ApiError::RequestTimeout(_) => "Request timeout",
            ApiError::WebhookUnverified(_) => "Webhook not verified",
            ApiError::WebhooksNotConfigured => "Webhooks not configured",
            ApiError::Unavailable => "Service unavailable",
            ApiError::Internal => "Internal error",
        }
    }

    pub fn problem(&self) -> Problem {
        Problem {
            kind: format!("urn:herald:problem:{}", self.code()),
            title: self.title(),
            status: self.status().as_u16(),
            detail: self.to_string(),
            code: self.code(),
        }
    }

    /// The response body as it is stored with an idempotency key (4xx outcomes).
    pub fn stored(&self) -> StoredResponse {
        StoredResponse {
            status: self.status().as_u16(),
            body: serde_json::to_string(&self.problem()).unwrap_or_default(),
        }
    }

    /// What a request that matched no route gets: 405 with `Allow` when the
    /// path exists (`allow` is its methods), else 404.
    pub fn unrouted(allow: Option<&'static str>) -> ApiError {
        match allow {
            Some(allow) => ApiError::MethodNotAllowed { allow },
            None => ApiError::NotFound,
        }
    }

    pub fn into_response(self) -> Response {
        let mut response = json_response(
            self.status(),
            serde_json::to_string(&self.problem()).unwrap_or_default(),
        );
        // For the request log (never sent to the client).
        response.extensions_mut().insert(ProblemCode(self.code()));
        match self {
            ApiError::InFlight => {
                response
                    .extensions_mut()
                    .insert(IdempotencyOutcome("in_flight"));
            }
            ApiError::KeyReused => {
                response
                    .extensions_mut()
                    .insert(IdempotencyOutcome("mismatch"));
            }
            _ => {}
        }
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match self {
            ApiError::InFlight | ApiError::Unavailable => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::RateLimited { retry_after_secs } => {
                headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs.max(1)));
            }
            ApiError::RequestTimeout(_) => {
                headers.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            ApiError::MethodNotAllowed { allow } => {
                headers.insert(http::header::ALLOW, HeaderValue::from_static(allow));
            }
            ApiError::Unauthorized(_) => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

/// The HTTP response of a write's [`Answer`]: a replay says so, and the
/// request log learns what the key did.
pub fn answer_response(answer: Answer) -> Response {
    let mut response = stored_response(answer.response, answer.replayed);
    let outcome = match (answer.replayed, answer.keyed) {
        (true, _) => Some("replay"),
        (false, true) => Some("new"),
        (false, false) => None,
    };
    if let Some(outcome) = outcome {
        response
            .extensions_mut()
            .insert(IdempotencyOutcome(outcome));
    }
    response
}

/// Builds the HTTP response for a stored (or fresh) outcome.
fn stored_response(stored: StoredResponse, replayed: bool) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json_response(status, stored.body);
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// The idempotency protocol's [`Refusal`](crate::idempotency::protocol::Refusal):
/// a store error that is the request's own fault (a 4xx: the job is
/// missing or closed) is stored as its key's outcome, with its problem
/// body; any other (a 5xx) is not.
pub fn refusal(e: &StoreError) -> Option<StoredResponse> {
    let refused = match e {
        StoreError::JobNotFound => ApiError::JobNotFound,
        StoreError::JobClosed => ApiError::JobClosed,
        StoreError::Unavailable(_)
        | StoreError::Refused(_)
        | StoreError::LeaseLost
        | StoreError::Internal(_) => return None,
    };
    Some(refused.stored())
}

/// A JSON response with `status` and an already serialised body. Error
/// statuses get the problem content type, so replayed problems keep it.
pub fn json_response(status: StatusCode, body: String) -> Response {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    let content_type = if status.is_client_error() || status.is_server_error() {
        "application/problem+json"
    } else {
        "application/json"
    };
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

impl From<InvalidBody> for ApiError {
    fn from(e: InvalidBody) -> Self {
        ApiError::InvalidBody(e.0)
    }
}

impl From<InvalidKey> for ApiError {
    fn from(_: InvalidKey) -> Self {
        ApiError::IdempotencyKeyInvalid
    }
}

impl From<IdempotencyError> for ApiError {
    fn from(e: IdempotencyError) -> Self {
        match e {
            IdempotencyError::InFlight => ApiError::InFlight,
            IdempotencyError::Mismatch => ApiError::KeyReused,
            IdempotencyError::Store(e) => ApiError::from(e),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(detail) => {
                tracing::warn!(%detail, "database unavailable");
                ApiError::Unavailable
            }
            StoreError::Refused(detail) => {
                tracing::error!(%detail, "the database refuses Herald's database_url");
                ApiError::Unavailable
            }
            StoreError::JobNotFound => ApiError::JobNotFound,
            StoreError::JobClosed => ApiError::JobClosed,
            StoreError::LeaseLost => ApiError::InFlight,
            StoreError::Internal(detail) => {
                tracing::error!(%detail, "store error");
                ApiError::Internal
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::ApiError;

    /// One error of every kind.
    fn one_of_each() -> Vec<ApiError> {
        let all = vec![
            ApiError::BodyTooLarge { limit: 1 },
            ApiError::InvalidBody(String::new()),
            ApiError::InvalidQuery(String::new()),
            ApiError::IdempotencyKeyInvalid,
            ApiError::IdempotencyKeyMissing,
            ApiError::Unauthorized(""),
            ApiError::NotFound,
            ApiError::JobNotFound,
            ApiError::JobClosed,
            ApiError::MethodNotAllowed { allow: "GET" },
            ApiError::InFlight,
            ApiError::KeyReused,
            ApiError::DevLoginDisabled,
            ApiError::DeadLetterClosed("", ""),
            ApiError::RateLimited {
                retry_after_secs: 1,
            },
            ApiError::RequestTimeout(1),
            ApiError::WebhookUnverified(""),
            ApiError::WebhooksNotConfigured,
            ApiError::Unavailable,
            ApiError::Internal,
        ];
        // A new variant stops this match compiling: add it here and to the list above.
        for error in &all {
            match error {
                ApiError::BodyTooLarge { .. }
                | ApiError::InvalidBody(_)
                | ApiError::InvalidQuery(_)
                | ApiError::IdempotencyKeyInvalid
                | ApiError::IdempotencyKeyMissing
                | ApiError::Unauthorized(_)
                | ApiError::NotFound
                | ApiError::JobNotFound
                | ApiError::JobClosed
                | ApiError::MethodNotAllowed { .. }
                | ApiError::InFlight
                | ApiError::KeyReused
                | ApiError::DevLoginDisabled
                | ApiError::DeadLetterClosed(..)
                | ApiError::RateLimited { .. }
                | ApiError::RequestTimeout(_)
                | ApiError::WebhookUnverified(_)
                | ApiError::WebhooksNotConfigured
                | ApiError::Unavailable
                | ApiError::Internal => {}
            }
        }
        all
    }

    /// The `code` values the daemon can send.
    fn codes() -> BTreeSet<String> {
        one_of_each().iter().map(|e| e.code().to_string()).collect()
    }

    fn words(list: &str) -> BTreeSet<String> {
        list.split(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn the_openapi_problem_schema_lists_exactly_the_codes_the_daemon_sends() {
        let spec = include_str!("../../docs/openapi.yaml");
        let schema = spec.split("    Problem:\n").nth(1).expect("Problem schema");
        let list = schema
            .split("enum: [")
            .nth(1)
            .and_then(|rest| rest.split(']').next())
            .expect("the code enum");
        assert_eq!(words(list), codes());
    }

    #[test]
    fn the_http_reference_lists_exactly_the_codes_the_daemon_sends() {
        let reference = include_str!("../../docs/HTTP.md");
        let list = reference
            .split("with a stable `code`\n(")
            .nth(1)
            .and_then(|rest| rest.split(';').next())
            .expect("docs/HTTP.md's list of codes");
        let listed: BTreeSet<String> = list
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect();
        assert_eq!(listed, codes());
    }

    #[test]
    fn every_problem_names_its_code_in_its_type_and_its_status_is_an_error() {
        for error in one_of_each() {
            let problem = error.problem();
            assert_eq!(problem.kind, format!("urn:herald:problem:{}", problem.code));
            assert!((400..600).contains(&problem.status), "{problem:?}");
        }
    }
}
