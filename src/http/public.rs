//! The public listener: the job board API.
//!
//! | method, path                  | who    |
//! |-------------------------------|--------|
//! | GET  /, /app.js, /style.css   | anyone (the web page, `web/`) |
//! | GET  /api/jobs                | anyone |
//! | POST /api/jobs                | admin  |
//! | GET  /api/jobs/stream         | anyone (SSE, [`super::stream`]) |
//! | GET  /api/jobs/{id}           | anyone (open or closed) |
//! | PATCH /api/jobs/{id}          | admin  |
//! | POST /api/jobs/{id}/close     | admin  |
//! | GET  /api/applications        | user (own, newest first) |
//! | POST /api/applications        | user   |
//! | GET  /api/applications/{id}   | user (own only; others get 404) |
//! | POST /api/charges             | user, Idempotency-Key required |
//! | GET  /api/charges/{id}        | user (own only; others get 404) |
//! | POST /api/dev/login           | anyone, dev mode only |
//! | POST /webhooks/resend         | Resend (signed, [`super::webhooks`]) |
//! | GET  /healthz, /readyz        | anyone |

use std::time::Duration;

use chrono::Utc;
use http::{HeaderValue, Method, StatusCode};
use tracing::{info_span, Instrument};
use uuid::Uuid;
use warp::reply::Response;

use super::limits::Action;
use super::problem::{answer_response, json_response, ApiError};
use super::{stored, AppState, Request};
use crate::domain::{
    parse_json, Application, DevLogin, EmailStatus, Job, JobChange, JobPatch, NewApplication,
    NewCharge, NewJob, Page,
};
use crate::idempotency::protocol::Outcome;
use crate::idempotency::KeyScope;
use crate::store::{ApplyOutcome, AuditEntry};
use crate::telemetry::metrics as m;
use crate::use_cases;

/// Routes one request of the public listener.
pub async fn dispatch(state: AppState, request: Request) -> Response {
    let request_id = Uuid::new_v4();
    let span = info_span!(
        "request",
        %request_id,
        method = %request.method,
        path = %request.path,
        otel.kind = "server",
        http.route = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
    );
    // A caller's W3C `traceparent` makes this request part of its trace.
    crate::telemetry::traces::continue_request(&span, &request.headers);
    let current = span.clone();
    async move {
        let segments: Vec<&str> = request.path.trim_matches('/').split('/').collect();
        let (route, result) = match (segments.as_slice(), &request.method) {
            ([""], &Method::GET) => (
                "/",
                Ok(asset(&state, INDEX_HTML, "text/html; charset=utf-8")),
            ),
            (["app.js"], &Method::GET) => (
                "/app.js",
                Ok(asset(&state, APP_JS, "text/javascript; charset=utf-8")),
            ),
            (["style.css"], &Method::GET) => (
                "/style.css",
                Ok(asset(&state, STYLE_CSS, "text/css; charset=utf-8")),
            ),
            (["api", "sign-in"], &Method::GET) => ("/api/sign-in", Ok(sign_in_settings(&state))),
            (["healthz"], &Method::GET) => ("/healthz", Ok(healthz())),
            (["readyz"], &Method::GET) => ("/readyz", readyz(&state).await),
            (["api", "jobs"], &Method::GET) => ("/api/jobs", list_jobs(&state, &request).await),
            (["api", "jobs"], &Method::POST) => ("/api/jobs", post_job(&state, &request).await),
            (["api", "jobs", "stream"], &Method::GET) => (
                "/api/jobs/stream",
                Ok(super::stream::job_stream(&state, &request).await),
            ),
            (["api", "jobs", id], &Method::GET) => ("/api/jobs/{id}", get_job(&state, id).await),
            (["api", "jobs", id], &Method::PATCH) => {
                (EDIT_JOB, change_job(&state, &request, id, EDIT_JOB).await)
            }
            (["api", "jobs", id, "close"], &Method::POST) => {
                (CLOSE_JOB, change_job(&state, &request, id, CLOSE_JOB).await)
            }
            (["api", "applications"], &Method::POST) => (
                "/api/applications",
                submit_application(&state, &request).await,
            ),
            (["api", "applications"], &Method::GET) => (
                "/api/applications",
                list_applications(&state, &request).await,
            ),
            (["api", "applications", id], &Method::GET) => (
                "/api/applications/{id}",
                get_application(&state, &request, id).await,
            ),
            (["api", "charges"], &Method::POST) => {
                ("/api/charges", create_charge(&state, &request).await)
            }
            (["api", "charges", id], &Method::GET) => {
                ("/api/charges/{id}", get_charge(&state, &request, id).await)
            }
            (["api", "dev", "login"], &Method::POST) => {
                ("/api/dev/login", dev_login(&state, &request))
            }
            (["webhooks", "resend"], &Method::POST) => (
                "/webhooks/resend",
                super::webhooks::resend(&state, &request).await,
            ),
            (path, _) => ("other", Err(ApiError::unrouted(allowed_methods(path)))),
        };
        let mut response = result.unwrap_or_else(ApiError::into_response);
        if let Ok(v) = HeaderValue::from_str(&request_id.to_string()) {
            response.headers_mut().insert("x-request-id", v);
        }
        m::http_request(
            route,
            response.status().as_u16(),
            request.received.elapsed(),
        );
        crate::telemetry::traces::rename(&current, format!("{} {route}", request.method));
        current.record("http.route", route);
        current.record("http.response.status_code", response.status().as_u16());
        super::log_request("public", route, &request, request_id, &response);
        response
    }
    .instrument(span)
    .await
}

/// The methods a known path accepts (for 405 and `Allow`).
fn allowed_methods(segments: &[&str]) -> Option<&'static str> {
    match segments {
        [""] | ["app.js"] | ["style.css"] | ["healthz"] | ["readyz"] | ["api", "sign-in"] => {
            Some("GET")
        }
        ["api", "jobs"] => Some("GET, POST"),
        ["api", "jobs", "stream"] => Some("GET"),
        ["api", "jobs", _] => Some("GET, PATCH"),
        ["api", "applications", _] | ["api", "charges", _] => Some("GET"),
        ["api", "applications"] => Some("GET, POST"),
        ["api", "charges"]
        | ["api", "dev", "login"]
        | ["api", "jobs", _, "close"]
        | ["webhooks", "resend"] => Some("POST"),
        _ => None,
    }
}

pub(super) fn ok_json<T: serde::Serialize>(value: &T) -> Response {
    json_response(
        StatusCode::OK,
        serde_json::to_string(value).unwrap_or_default(),
    )
}

/// The web page's three files, compiled into the binary (no build step, no
/// files to deploy beside it).
const INDEX_HTML: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const STYLE_CSS: &str = include_str!("../../web/style.css");

/// The page's Content-Security-Policy: everything from this origin only, no
/// inline script or style, no framing, no plugins.
const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

/// [`PAGE_CSP`], and with an OpenID provider (`auth.oidc_issuer`) the origin
/// of its token endpoint too, where the page exchanges the sign-in code.
fn page_csp(state: &AppState) -> HeaderValue {
    let strict = HeaderValue::from_static(PAGE_CSP);
    match state.auth.sign_in() {
        None => strict,
        // An origin is printable ASCII; were it not, the strict policy
        // stands (and sign-in cannot reach the provider).
        Some(provider) => HeaderValue::from_str(&PAGE_CSP.replacen(
            "connect-src 'self'",
            &format!("connect-src 'self' {}", provider.token_origin),
            1,
        ))
        .unwrap_or(strict),
    }
}

fn asset(state: &AppState, body: &'static str, content_type: &'static str) -> Response {
    page_asset(body, content_type, page_csp(state))
}

/// `GET /api/sign-in`: how the page may sign a user in: dev login (an email
/// alone) when it is on, the OpenID provider when `auth.oidc_issuer` is set.
fn sign_in_settings(state: &AppState) -> Response {
    ok_json(&serde_json::json!({
        "dev_login": state.config.dev_login(),
        "provider": state.auth.sign_in(),
    }))
}

/// A file of a page (this one's, or the admin page's), with `csp`.
pub(super) fn page_asset(
    body: &'static str,
    content_type: &'static str,
    csp: HeaderValue,
) -> Response {
    let mut response = Response::new(body.into());
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    // The page loads only its own script, style and API, and no other site
    // may frame it (clickjacking an Apply button): a CSP with
    // `frame-ancestors 'none'`, and X-Frame-Options for older browsers.
    headers.insert(http::header::CONTENT_SECURITY_POLICY, csp);
    headers.insert(
        http::header::X_FRAME_OPTIONS,
        HeaderValue::from_static("DENY"),
    );
    headers.insert(
        http::header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

fn healthz() -> Response {
    ok_json(&serde_json::json!({"status": "ok"}))
}

async fn readyz(state: &AppState) -> Result<Response, ApiError> {
    match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => Ok(ok_json(&serde_json::json!({
            "status": "ready",
            "database": "ok",
            // Redis loss degrades speed, not correctness: still ready.
            "redis": state.redis_mode.label(),
            // Until the stream hub has read its board, stream connects get
            // `retry:` alone. Still ready: every other route works, and a
            // Redis down at start must not hold a whole deploy back.
            "stream": if state.sse.resume_window.board_loaded() { "ready" } else { "starting" },
        }))),
        _ => Err(ApiError::Unavailable),
    }
}

/// Parses `?limit=&before=` of a list (jobs, dead letters); other names are
/// left to the caller.
pub(super) fn list_params(query: &str) -> Result<(u32, Option<Uuid>), ApiError> {
    let mut limit = 20;
    let mut before = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "limit" => {
                limit = value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| {
                        ApiError::InvalidQuery("`limit` must be an integer from 1 to 100".into())
                    })?;
            }
            "before" => {
                before = Some(Uuid::parse_str(value).map_err(|_| {
                    ApiError::InvalidQuery("`before` must be a cursor from `next_before`".into())
                })?);
            }
            _ => {}
        }
    }
    Ok((limit, before))
}

pub(super) async fn list_jobs(state: &AppState, request: &Request) -> Result<Response, ApiError> {
    let (limit, before) = list_params(&request.query)?;
    let filter = super::job_filter(&request.query)?;
    state.limits.check(Action::JobList, request.client)?;
    let jobs = state.store.list_jobs(limit, before, &filter).await?;
    let next_before = if jobs.len() == limit as usize {
        jobs.last().map(|j| j.id.to_string())
    } else {
        None
    };
    Ok(ok_json(&Page {
        items: jobs,
        next_before,
    }))
}

async fn get_job(state: &AppState, id: &str) -> Result<Response, ApiError> {
    let id = Uuid::parse_str(id).map_err(|_| ApiError::NotFound)?;
    let job = state.store.get_job(id).await?.ok_or(ApiError::NotFound)?;
    Ok(ok_json(&job))
}

/// `PATCH /api/jobs/{id}` and `POST /api/jobs/{id}/close`: 200 with the job
/// as it now is (also when the change changed nothing).
pub(super) async fn change_job(
    state: &AppState,
    request: &Request,
    id: &str,
    route: &'static str,
) -> Result<Response, ApiError> {
    let operator = super::operator(state, request)?;
    let key = super::idempotency_key(&request.headers)?;
    let id = Uuid::parse_str(id).map_err(|_| ApiError::JobNotFound)?;
    let (change, json) = if route == CLOSE_JOB {
        (JobChange::Close, serde_json::Value::Null)
    } else {
        let body = request.body_bytes()?;
        (JobChange::Edit(JobPatch::parse(body)?), body_json(request)?)
    };
    let scope = KeyScope {
        principal: "admin".into(),
        method: if route == CLOSE_JOB { "POST" } else { "PATCH" },
        route,
    };
    // The key's scope is the route; the job is part of what it fingerprints.
    let fingerprinted = serde_json::json!({ "job": id, "change": json });
    let entry = AuditEntry {
        action: if route == CLOSE_JOB {
            "job.close"
        } else {
            "job.update"
        }
        .into(),
        subject: id.to_string(),
        detail: json.to_string(),
        actor: operator.actor(),
    };
    let answer = state
        .idempotency
        .run(scope, key, &fingerprinted, |tx| {
            Box::pin(async move {
                let job = use_cases::change_job(tx, id, &change).await?;
                tx.audit(&entry).await?;
                Ok(Outcome::Written(stored(200, &job)))
            })
        })
        .await?;
    Ok(answer_response(answer))
}

/// The routes of [`change_job`].
pub(super) const EDIT_JOB: &str = "/api/jobs/{id}";
pub(super) const CLOSE_JOB: &str = "/api/jobs/{id}/close";

fn body_json(request: &Request) -> Result<serde_json::Value, ApiError> {
    let body = request.body_bytes()?;
    Ok(parse_json(body)?)
}

async fn post_job(state: &AppState, request: &Request) -> Result<Response, ApiError> {
    let operator = super::operator(state, request)?;
    let key = super::idempotency_key(&request.headers)?;
    let json = body_json(request)?;
    let new_job = NewJob::parse(request.body_bytes()?)?;
    let job: Job = new_job.into_job(Uuid::now_v7(), Utc::now());
    let scope = KeyScope {
        principal: "admin".into(),
        method: "POST",
        route: "/api/jobs",
    };
    let entry = AuditEntry {
        action: "job.post".into(),
        subject: job.id.to_string(),
        detail: json.to_string(),
        actor: operator.actor(),
    };
    let answer = state
        .idempotency
        .run(scope, key, &json, |tx| {
            Box::pin(async move {
                use_cases::post_job(tx, &job).await?;
                tx.audit(&entry).await?;
                Ok(Outcome::Written(stored(201, &job)))
            })
        })
        .await?;
    Ok(answer_response(answer))
}

async fn submit_application(state: &AppState, request: &Request) -> Result<Response, ApiError> {
    let user = state.auth.user(&request.headers).await?;
    // Right after authentication (a 401 is the truer answer to a bad token
    // than "retry later") and before the key is claimed: a refused request
    // leaves no trace a retry would trip over.
    state
        .limits
        .check_user(Action::Apply, &user.id, request.client)?;
    let key = super::idempotency_key(&request.headers)?;
    let json = body_json(request)?;
    let new = NewApplication::parse(request.body_bytes()?)?;
    let application = Application {
        id: Uuid::now_v7(),
        job_id: new.job_id,
        user_id: user.id.clone(),
        email: user.email.clone(),
        resume_url: new.resume_url,
        cover_letter: new.cover_letter,
        email_status: EmailStatus::Pending,
        created_at: Utc::now(),
    };
    let scope = KeyScope {
        principal: user.principal(),
        method: "POST",
        route: "/api/applications",
    };
    // Built before the unit of work: it is the key's outcome, committed
    // with the application.
    let created = stored(201, &application.view(false));
    let answer = state
        .idempotency
        .run(scope, key, &json, |tx| {
            Box::pin(async move {
                match use_cases::submit_application(tx, &application, &created).await? {
                    ApplyOutcome::Created(_) => {
                        m::application_created();
                        Ok(Outcome::Written(created))
                    }
                    // Nothing written: the existing application is the answer.
                    ApplyOutcome::AlreadyApplied(existing) => {
                        Ok(Outcome::Unwritten(stored(200, &existing.view(true))))
                    }
                }
            })
        })
        .await?;
    Ok(answer_response(answer))
}

/// The signed-in user's applications, newest first, with their email status.
async fn list_applications(state: &AppState, request: &Request) -> Result<Response, ApiError> {
    let user = state.auth.user(&request.headers).await?;
    let (limit, before) = list_params(&request.query)?;
    let applications = state
        .store
        .list_applications(&user.id, limit, before)
        .await?;
    let next_before = if applications.len() == limit as usize {
        applications.last().map(|a| a.id.to_string())
    } else {
        None
    };
    Ok(ok_json(&Page {
        items: applications
            .iter()
            .map(|a| a.view(false))
            .collect::<Vec<_>>(),
        next_before,
    }))
}

async fn get_application(
    state: &AppState,
    request: &Request,
    id: &str,
) -> Result<Response, ApiError> {
    let user = state.auth.user(&request.headers).await?;
    let id = Uuid::parse_str(id).map_err(|_| ApiError::NotFound)?;
    let application = state
        .store
        .get_application(id, &user.id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(ok_json(&application.view(false)))
}

async fn create_charge(state: &AppState, request: &Request) -> Result<Response, ApiError> {
    let user = state.auth.user(&request.headers).await?;
    state
        .limits
        .check_user(Action::Charge, &user.id, request.client)?;
    let key = super::idempotency_key(&request.headers)?.ok_or(ApiError::IdempotencyKeyMissing)?;
    let json = body_json(request)?;
    let new = NewCharge::parse(request.body_bytes()?)?;
    let charge = new.into_charge(Uuid::now_v7(), user.id.clone(), Utc::now());
    let scope = KeyScope {
        principal: user.principal(),
        method: "POST",
        route: "/api/charges",
    };
    let answer = state
        .idempotency
        .run(scope, Some(key), &json, |tx| {
            Box::pin(async move {
                use_cases::create_charge(tx, &charge).await?;
                Ok(Outcome::Written(stored(201, &charge)))
            })
        })
        .await?;
    Ok(answer_response(answer))
}

async fn get_charge(state: &AppState, request: &Request, id: &str) -> Result<Response, ApiError> {
    let user = state.auth.user(&request.headers).await?;
    let id = Uuid::parse_str(id).map_err(|_| ApiError::NotFound)?;
    let charge = state
        .store
        .get_charge(id, &user.id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(ok_json(&charge))
}

fn dev_login(state: &AppState, request: &Request) -> Result<Response, ApiError> {
    if !state.config.dev_login() {
        return Err(ApiError::DevLoginDisabled);
    }
    state.limits.check(Action::DevLogin, request.client)?;
    let body = request.body_bytes()?;
    let login: DevLogin = parse_json(body)?;
    let email = login.email.trim().to_ascii_lowercase();
    if !crate::domain::valid_email(&email) {
        return Err(ApiError::InvalidBody(
            "`email` must be an email address".into(),
        ));
    }
    let token = state.auth.issue(
        &format!("dev:{email}"),
        &email,
        // Never longer than a token may live.
        state
            .config
            .auth
            .dev_token_ttl_secs
            .min(state.config.auth.max_token_lifetime_secs),
    )?;
    Ok(ok_json(&serde_json::json!({ "token": token })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_parameters_are_bounded() {
        assert_eq!(list_params("").unwrap(), (20, None));
        assert_eq!(list_params("limit=100").unwrap().0, 100);
        assert!(list_params("limit=0").is_err());
        assert!(list_params("limit=101").is_err());
        assert!(list_params("limit=abc").is_err());
        assert!(list_params("before=nope").is_err());
    }
}
