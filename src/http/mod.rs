//! The warp front: two listeners, one routing table each.
//!
//! The front owns no state. It reads and bounds the body, authenticates,
//! validates, and asks the actors and the store for answers. Every error is an
//! [`ApiError`] rendered as RFC 9457 problem+json in [`problem`]; nothing a
//! client sends can make a handler panic or answer 5xx.
//!
//! Routing is a single `match` on (method, path segments) per listener
//! ([`public::dispatch`], [`admin::dispatch`]): one table to read, a 405 with
//! `Allow` for a known path with the wrong method, and no warp rejection
//! reaching the client unmapped.

pub mod admin;
pub mod auth;
pub mod connections;
pub mod jwks;
pub mod limits;
pub mod oidc;
pub mod problem;
pub mod public;
pub mod stream;
mod stream_http1;
pub mod webhooks;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http::{HeaderMap, Method};
use metrics_exporter_prometheus::PrometheusHandle;
use warp::reply::Response;
use warp::Filter;

use crate::actors::supervisor::ActorTree;
use crate::config::Config;
use crate::idempotency::hot_tier::RedisMode;
use crate::idempotency::protocol::Idempotency;
use crate::idempotency::IdempotencyKey;
use crate::store::Store;
use auth::Auth;
use problem::ApiError;

/// Largest request body accepted; larger gets 413 `body_too_large`.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// How much of an oversized body is read and dropped before answering 413
/// (at most 2 s of it); past that the connection is simply closed.
const MAX_DRAIN_BYTES: usize = 1024 * 1024;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub actors: ActorTree,
    /// The idempotency protocol, run on the request's own task: every
    /// write's unit of work is opened, committed or refused there.
    pub idempotency: Idempotency,
    pub auth: Auth,
    /// Hot-tier mode, for `/readyz` and `/admin/status`.
    pub redis_mode: RedisMode,
    pub prometheus: PrometheusHandle,
    /// Wakes this process's OutboxRelay after a write outside the
    /// idempotency protocol made rows due (a dead letter replayed).
    pub outbox_wake: Arc<tokio::sync::Notify>,
    /// The RetryBudget's token counts, for `/admin/status`.
    pub budget: crate::actors::retry_budget::RetryBudgetHandle,
    /// The live job stream's hub: admission, subscribe, snapshot.
    pub sse: crate::actors::sse_hub::SseHubHandle,
    /// The broker's name (`redis` or `in-process`), for `/admin/status`.
    pub broker: &'static str,
    /// Per-client rate buckets and open-stream counts of the public listener.
    pub limits: Arc<limits::AbuseLimits>,
    /// The verifier of the provider's webhooks (`email.webhook_secret`);
    /// `None`: `/webhooks/resend` answers 404.
    pub webhooks: Option<Arc<webhooks::WebhookVerifier>>,
    /// The auditor's last result, for `/admin/status`.
    pub last_audit: crate::actors::auditor::LastAudit,
}

/// The operator behind an admin request (on either listener): who the
/// audit trail names, and what they said of it.
pub struct Operator {
    /// The credential's name (`admin` for `admin_token`).
    pub name: String,
    /// `X-Herald-Actor`, when given: a self-declared note, never the actor.
    pub note: Option<String>,
}

impl Operator {
    /// The audit trail's actor: the credential's name, then the note
    /// (`ada (note: on behalf of grace)`). A name has no space, so the
    /// first word is always the credential's.
    pub fn actor(&self) -> String {
        match &self.note {
            Some(note) => format!("{} (note: {note})", self.name),
            None => self.name.clone(),
        }
    }
}

/// Authenticates an admin request: 429 while its address has presented
/// more wrong credentials than `admin.failed_auth_per_min` allows, 401 for
/// a wrong one (counted; a missing one is not a guess and is not).
pub fn operator(state: &AppState, request: &Request) -> Result<Operator, ApiError> {
    state.limits.admin_locked(request.client)?;
    match state.auth.admin(&request.headers) {
        Ok(name) => Ok(Operator {
            name,
            note: request
                .headers
                .get("x-herald-actor")
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| {
                    !v.is_empty()
                        && v.len() <= 64
                        && v.chars().all(|c| c.is_ascii_graphic() || c == ' ')
                })
                .map(str::to_string),
        }),
        Err(refused) => {
            if request.headers.contains_key(http::header::AUTHORIZATION) {
                state.limits.admin_failed(request.client);
            }
            Err(refused)
        }
    }
}

/// One incoming request, as the dispatchers see it.
pub struct Request {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    /// Who the request is counted against by the abuse limits (the peer's
    /// address, or the trusted proxy header's).
    pub client: IpAddr,
    /// The body, already bounded by [`MAX_BODY_BYTES`]; the error is the 413
    /// (or unreadable body) to answer if a handler wants the body.
    pub body: Result<Bytes, ApiError>,
    /// When the request head was handed over (the request log's duration).
    pub received: tokio::time::Instant,
}

impl Request {
    /// The body, or the error to answer for it (413, or an unreadable body).
    pub fn body_bytes(&self) -> Result<&Bytes, ApiError> {
        self.body.as_ref().map_err(|e| match e {
            ApiError::BodyTooLarge { limit } => ApiError::BodyTooLarge { limit: *limit },
            other => ApiError::InvalidBody(other.to_string()),
        })
    }
}

/// The request log: one `info` line per request (target `herald::request`),
/// JSON with `log.format = "json"`. It names the route as a template, never
/// the query, a token or an address, so it can be kept and shared.
pub fn log_request(
    listener: &'static str,
    route: &str,
    request: &Request,
    request_id: uuid::Uuid,
    response: &Response,
) {
    let idempotency = response
        .extensions()
        .get::<problem::IdempotencyOutcome>()
        .map_or("none", |o| o.0);
    let code = response
        .extensions()
        .get::<problem::ProblemCode>()
        .map_or("", |c| c.0);
    let duration_ms = request.received.elapsed().as_secs_f64() * 1000.0;
    tracing::info!(
        target: "herald::request",
        listener,
        method = %request.method,
        route,
        // The address the per-client limits counted (a trusted proxy's
        // client, or the TCP peer).
        client = %request.client,
        status = response.status().as_u16(),
        duration_ms = (duration_ms * 1000.0).round() / 1000.0,
        request_id = %request_id,
        idempotency,
        code,
        "request"
    );
}

/// The warp filter that feeds a dispatcher. Never rejects: every request
/// ends as a response from the dispatcher.
pub fn listener_filter<D, Fut>(
    state: AppState,
    dispatch: D,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone
where
    D: Fn(AppState, Request) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response> + Send,
{
    warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(
            warp::ext::optional::<connections::Peer>()
                .map(|p: Option<connections::Peer>| p.map(|p| p.0)),
        )
        .and(warp::body::stream())
        .then(
            move |method,
                  path: warp::path::FullPath,
                  query,
                  headers: HeaderMap,
                  peer: Option<SocketAddr>,
                  body| {
                let state = state.clone();
                let dispatch = dispatch.clone();
                async move {
                    let received = tokio::time::Instant::now();
                    // One deadline for the body to arrive and the answer to
                    // be ready (a stream's body, once started, is exempt):
                    // a slow sender gets 408, a stuck handler 503.
                    let timeout_ms = state.config.limits.request_timeout_ms;
                    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
                    let body =
                        match tokio::time::timeout_at(deadline, read_body(body, MAX_BODY_BYTES))
                            .await
                        {
                            // The depth check runs before any parser sees the body.
                            Ok(body) => body.and_then(|bytes| {
                                limits::check_json_depth(&bytes, state.config.limits.json_max_depth)
                                    .map(|()| bytes)
                            }),
                            Err(_) => return ApiError::RequestTimeout(timeout_ms).into_response(),
                        };
                    let request = Request {
                        client: state.limits.client_of(peer, &headers),
                        method,
                        path: path.as_str().to_string(),
                        query,
                        headers,
                        body,
                        received,
                    };
                    // Boxed: the handler's state machine is large, and warp
                    // and hyper move the future they are given a few times.
                    match tokio::time::timeout_at(deadline, Box::pin(dispatch(state, request)))
                        .await
                    {
                        Ok(response) => response,
                        Err(_) => {
                            tracing::warn!(timeout_ms, "request timed out in its handler");
                            ApiError::Unavailable.into_response()
                        }
                    }
                }
            },
        )
        .recover(|_| async { Ok::<Response, Infallible>(ApiError::Internal.into_response()) })
        .unify()
}

/// Reads a request body, refusing more than `limit` bytes without buffering them.
pub async fn read_body<S, B>(body: S, limit: usize) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut body = std::pin::pin!(body);
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk
            .map_err(|_| ApiError::InvalidBody("the request body could not be read".into()))?;
        if buf.len() + chunk.remaining() > limit {
            // Read (and drop) a bounded remainder first, so a client still
            // sending gets to read the 413 instead of a reset connection.
            let drain = async {
                let mut drained = buf.len() + chunk.remaining();
                while drained < MAX_DRAIN_BYTES {
                    match body.next().await {
                        Some(Ok(c)) => drained += c.remaining(),
                        _ => break,
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
            return Err(ApiError::BodyTooLarge { limit });
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            let n = part.len();
            buf.put_slice(part);
            chunk.advance(n);
        }
    }
    Ok(buf.freeze())
}

/// The job filter of a list or stream query (400 `invalid_query`).
pub fn job_filter(query: &str) -> Result<crate::domain::JobFilter, ApiError> {
    crate::domain::JobFilter::from_query(query).map_err(|e| ApiError::InvalidQuery(e.0))
}

/// The `Idempotency-Key` header, validated; `None` when absent.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    headers
        .get("idempotency-key")
        .map(|v| IdempotencyKey::parse(v.as_bytes()))
        .transpose()
        .map_err(ApiError::from)
}

/// Serialises a resource as a stored response.
pub fn stored<T: serde::Serialize>(status: u16, value: &T) -> crate::idempotency::StoredResponse {
    crate::idempotency::StoredResponse::json(status, value)
}
