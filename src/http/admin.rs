//! The admin listener: `/metrics` (no auth, for the scraper) and `/admin/*`
//! (admin token on every route): status, the dead-letter queue (list,
//! replay one, replay many, discard) and the suppressed addresses (list,
//! lift one), the audit trail; every action audited with the operator
//! whose credential made it (`X-Herald-Actor` only as their note) and when.

use std::time::Duration;

use http::{HeaderValue, Method, StatusCode};
use warp::reply::Response;

use uuid::Uuid;

use super::problem::{json_response, ApiError};
use super::public::{self, list_params, ok_json};
use super::{AppState, Request};
use crate::domain::topics;
use crate::store::DlqAction;
use crate::telemetry::metrics as m;

/// Routes one request of the admin listener.
pub async fn dispatch(state: AppState, request: Request) -> Response {
    let request_id = uuid::Uuid::new_v4();
    let (route, response) = route(&state, &request).await;
    m::http_request(
        route,
        response.status().as_u16(),
        request.received.elapsed(),
    );
    // `/metrics` is scraped every few seconds: debug, not the request log.
    if route != "/metrics" {
        // An id or address in a path is not a route: the log names the template.
        super::log_request("admin", route, &request, request_id, &response);
    }
    response
}

/// Answers one admin request, and names its route as a template (a label
/// of `herald_http_requests_total`: an id or an address in it would make
/// a series per request, and an address is personal data).
async fn route(state: &AppState, request: &Request) -> (&'static str, Response) {
    let segments: Vec<&str> = request.path.trim_matches('/').split('/').collect();
    let (route, result) = match (segments.as_slice(), &request.method) {
        (["metrics"], &Method::GET) => ("/metrics", Ok(metrics(state).await)),
        // The operator page: its files need no credential, everything it
        // shows and does goes through the routes below with the operator's.
        (["admin"], &Method::GET) => ("/admin/", Ok(page(PAGE_HTML, "text/html; charset=utf-8"))),
        (["admin", "app.js"], &Method::GET) => (
            "/admin/app.js",
            Ok(page(PAGE_JS, "text/javascript; charset=utf-8")),
        ),
        (["admin", "style.css"], &Method::GET) => (
            "/admin/style.css",
            Ok(page(PAGE_CSS, "text/css; charset=utf-8")),
        ),
        (["admin", "jobs"], &Method::GET) => ("/admin/jobs", jobs(state, request).await),
        (["admin", "jobs", id], &Method::PATCH) => (
            "/admin/jobs/{id}",
            public::change_job(state, request, id, public::EDIT_JOB).await,
        ),
        (["admin", "jobs", id, "close"], &Method::POST) => (
            "/admin/jobs/{id}/close",
            public::change_job(state, request, id, public::CLOSE_JOB).await,
        ),
        (["admin", "status"], &Method::GET) => ("/admin/status", status(state, request).await),
        (["admin", "dlq"], &Method::GET) => ("/admin/dlq", list_dlq(state, request).await),
        (["admin", "dlq", "replay"], &Method::POST) => {
            ("/admin/dlq/replay", replay_many(state, request).await)
        }
        (["admin", "dlq", id, "replay"], &Method::POST) => (
            "/admin/dlq/{id}/replay",
            replay_one(state, request, id).await,
        ),
        (["admin", "dlq", id], &Method::DELETE) if *id != "replay" => {
            ("/admin/dlq/{id}", discard(state, request, id).await)
        }
        (["admin", "audit"], &Method::GET) => ("/admin/audit", audit_trail(state, request).await),
        (["admin", "suppressions"], &Method::GET) => (
            "/admin/suppressions",
            list_suppressions(state, request).await,
        ),
        (["admin", "suppressions", email], &Method::DELETE) => (
            "/admin/suppressions/{email}",
            lift_suppression(state, request, email).await,
        ),
        (path, _) => ("other", Err(ApiError::unrouted(allowed_methods(path)))),
    };
    (route, result.unwrap_or_else(ApiError::into_response))
}

/// The methods a known admin path accepts (for 405 and `Allow`).
fn allowed_methods(segments: &[&str]) -> Option<&'static str> {
    match segments {
        ["admin"] | ["admin", "app.js"] | ["admin", "style.css"] | ["admin", "jobs"] => Some("GET"),
        ["admin", "jobs", _] => Some("PATCH"),
        ["admin", "jobs", _, "close"] => Some("POST"),
        ["metrics"]
        | ["admin", "status"]
        | ["admin", "dlq"]
        | ["admin", "suppressions"]
        | ["admin", "audit"] => Some("GET"),
        ["admin", "suppressions", _] => Some("DELETE"),
        ["admin", "dlq", "replay"] | ["admin", "dlq", _, "replay"] => Some("POST"),
        ["admin", "dlq", _] => Some("DELETE"),
        _ => None,
    }
}

/// Refreshes the gauges that are read from the database, then renders.
async fn refresh_outbox_gauges(state: &AppState) -> Option<crate::store::OutboxStats> {
    match tokio::time::timeout(Duration::from_secs(1), state.store.outbox_stats()).await {
        Ok(Ok(stats)) => {
            m::outbox(stats.pending, stats.lag_seconds);
            m::durable_effects(stats.emails_delivered, stats.ledger_entries);
            Some(stats)
        }
        _ => None,
    }
}

async fn metrics(state: &AppState) -> Response {
    m::ready(refresh_outbox_gauges(state).await.is_some());
    let mut response = Response::new(state.prometheus.render().into());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

async fn status(state: &AppState, request: &Request) -> Result<Response, ApiError> {
    let operator = super::operator(state, request)?;
    let outbox = refresh_outbox_gauges(state).await;
    let body = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "operator": operator.name,
        "backend": state.store.backend(),
        "broker": state.broker,
        "actors": state.actors.status(),
        "redis": state.redis_mode.label(),
        "outbox": outbox,
        "dlq": state.store.dlq_stats().await.ok(),
        "retry_budget_tokens": state.budget.tokens(),
        "audit": *state.last_audit.lock().unwrap_or_else(|p| p.into_inner()),
    });
    Ok(json_response(
        StatusCode::OK,
        serde_json::to_string(&body).unwrap_or_default(),
    ))
}

/// `?topic=`: one of Herald's topics.
fn topic_param(query: &str) -> Result<Option<&'static str>, ApiError> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        if let Some(("topic", value)) = pair.split_once('=') {
            return topics::ALL
                .iter()
                .find(|t| **t == value)
                .copied()
                .map(Some)
                .ok_or_else(|| {
                    ApiError::InvalidQuery(format!(
                        "`topic` must be one of {}",
                        topics::ALL.join(", ")
                    ))
                });
        }
    }
    Ok(None)
}

fn letter_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::NotFound)
}

async fn list_dlq(state: &AppState, request: &Request) -> Result<Response, ApiError> {
    super::operator(state, request)?;
    let topic = topic_param(&request.query)?;
    let (limit, before) = list_params(&request.query)?;
    let items = state.store.list_dead_letters(topic, limit, before).await?;
    let next_before = (items.len() == limit as usize)
        .then(|| items.last().map(|l| l.id.to_string()))
        .flatten();
    Ok(ok_json(&serde_json::json!({
        "items": items,
        "next_before": next_before,
    })))
}

async fn replay_one(state: &AppState, request: &Request, id: &str) -> Result<Response, ApiError> {
    let operator = super::operator(state, request)?;
    let id = letter_id(id)?;
    let who = operator.actor();
    let action = state.store.replay_dead_letter(id, &who).await?;
    match action {
        DlqAction::NotFound => Err(ApiError::NotFound),
        DlqAction::AlreadyDiscarded => Err(ApiError::DeadLetterClosed("discarded", "replayed")),
        action => {
            if action == DlqAction::Replayed {
                tracing::info!(dead_letter = %id, actor = %who, "dead letter replayed");
                state.outbox_wake.notify_one();
            }
            Ok(ok_json(&serde_json::json!({ "id": id, "result": action })))
        }
    }
}

async fn replay_many(state: &AppState, request: &Request) -> Result<Response, ApiError> {
    let operator = super::operator(state, request)?;
    let topic = topic_param(&request.query)?;
    let who = operator.actor();
    let replayed = state.store.replay_dead_letters(topic, &who).await?;
    tracing::info!(replayed, topic = topic.unwrap_or("*"), actor = %who, "dead letters replayed");
    state.outbox_wake.notify_one();
    Ok(ok_json(&serde_json::json!({ "replayed": replayed })))
}

async fn discard(state: &AppState, request: &Request, id: &str) -> Result<Response, ApiError> {
    let operator = super::operator(state, request)?;
    let id = letter_id(id)?;
    let who = operator.actor();
    match state.store.discard_dead_letter(id, &who).await? {
        DlqAction::NotFound => Err(ApiError::NotFound),
        DlqAction::AlreadyReplayed => Err(ApiError::DeadLetterClosed("replayed", "discarded")),
        action => {
            if action == DlqAction::Discarded {
                tracing::info!(dead_letter = %id, actor = %who, "dead letter discarded");
            }
            Ok(ok_json(&serde_json::json!({ "id": id, "result": action })))
        }
    }
}

/// A percent-encoded address, decoded (`+` stays `+`: addresses have none
/// of the form encoding's spaces) and compared as suppressions are.
fn address_param(encoded: &str) -> Result<String, ApiError> {
    let decoded = percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .map_err(|_| ApiError::InvalidQuery("an address must be UTF-8".into()))?;
    let key = crate::domain::address_key(&decoded);
    if key.is_empty() || decoded.chars().count() > 320 || decoded.chars().any(char::is_control) {
        return Err(ApiError::InvalidQuery(
            "an address is 1 to 320 printable characters".into(),
        ));
    }
    Ok(key)
}

/// The operator page's files (`web/admin/`), compiled into the binary.
const PAGE_HTML: &str = include_str!("../../web/admin/index.html");
const PAGE_JS: &str = include_str!("../../web/admin/app.js");
const PAGE_CSS: &str = include_str!("../../web/admin/style.css");

/// The operator page's Content-Security-Policy: its own script, style and
/// API only; no inline code, no images or fonts from anywhere, no form
/// posts (it uses fetch), no framing, no `<base>`.
pub const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn page(body: &'static str, content_type: &'static str) -> Response {
    public::page_asset(body, content_type, HeaderValue::from_static(PAGE_CSP))
}

/// `GET /admin/jobs`: the open jobs, as `GET /api/jobs` lists them, for
/// an operator (the page's Edit and Close).
async fn jobs(state: &AppState, request: &Request) -> Result<Response, ApiError> {
    super::operator(state, request)?;
    public::list_jobs(state, request).await
}

/// An admin list's `limit`: 1 to 500.
fn admin_limit(value: &str) -> Result<u32, ApiError> {
    value
        .parse::<u32>()
        .ok()
        .filter(|n| (1..=500).contains(n))
        .ok_or_else(|| ApiError::InvalidQuery("`limit` must be an integer from 1 to 500".into()))
}

/// `GET /admin/audit?limit=`: the newest lines of the operators' audit trail.
async fn audit_trail(state: &AppState, request: &Request) -> Result<Response, ApiError> {
    super::operator(state, request)?;
    let mut limit = 50u32;
    for pair in request.query.split('&').filter(|p| !p.is_empty()) {
        if let Some(("limit", value)) = pair.split_once('=') {
            limit = admin_limit(value)?;
        }
    }
    let items = state.store.recent_audit(limit).await?;
    Ok(ok_json(&serde_json::json!({ "items": items })))
}

/// `GET /admin/suppressions?email=&limit=&before=`: newest first.
async fn list_suppressions(state: &AppState, request: &Request) -> Result<Response, ApiError> {
    super::operator(state, request)?;
    let (mut email, mut before, mut limit) = (None, None, 50u32);
    for pair in request.query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "email" => email = Some(address_param(value)?),
            "before" => before = Some(address_param(value)?),
            "limit" => limit = admin_limit(value)?,
            _ => {}
        }
    }
    let items = state
        .store
        .list_suppressions(email.as_deref(), limit, before.as_deref())
        .await?;
    let next_before = (items.len() == limit as usize)
        .then(|| items.last().map(|s| s.address.clone()))
        .flatten();
    Ok(ok_json(&serde_json::json!({
        "items": items,
        "next_before": next_before,
    })))
}

/// `DELETE /admin/suppressions/{email}`: the next confirmation to it is
/// mailed again. Audited (`admin_audit`).
async fn lift_suppression(
    state: &AppState,
    request: &Request,
    email: &str,
) -> Result<Response, ApiError> {
    let operator = super::operator(state, request)?;
    let address = address_param(email)?;
    let who = operator.actor();
    match state.store.lift_suppression(&address, &who).await? {
        None => Err(ApiError::NotFound),
        Some(lifted) => {
            tracing::info!(actor = %who, reason = lifted.reason.as_str(), "suppression lifted");
            Ok(ok_json(&serde_json::json!({
                "lifted": lifted,
            })))
        }
    }
}
