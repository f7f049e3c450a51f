//! The admin listener: `/metrics` (no auth, for the scraper) and `/admin/*`
//! (admin token on every route).

use std::time::Duration;

use http::{HeaderValue, Method, StatusCode};
use warp::reply::Response;

use super::problem::{json_response, ApiError};
use super::{AppState, Request};
use crate::telemetry::metrics as m;

/// Routes one request of the admin listener.
pub async fn dispatch(state: AppState, request: Request) -> Response {
    let segments: Vec<&str> = request.path.trim_matches('/').split('/').collect();
    let result = match (segments.as_slice(), &request.method) {
        (["metrics"], &Method::GET) => Ok(metrics(&state).await),
        (["admin", "status"], &Method::GET) => status(&state, &request).await,
        (["metrics"], _) | (["admin", "status"], _) => Err(ApiError::MethodNotAllowed),
        _ => Err(ApiError::NotFound),
    };
    result.unwrap_or_else(ApiError::into_response)
}

/// Refreshes the gauges that are read from the database, then renders.
async fn refresh_outbox_gauges(state: &AppState) -> Option<crate::store::OutboxStats> {
    match tokio::time::timeout(Duration::from_secs(1), state.store.outbox_stats()).await {
        Ok(Ok(stats)) => {
            m::outbox(stats.pending, stats.lag_seconds);
            Some(stats)
        }
        _ => None,
    }
}

async fn metrics(state: &AppState) -> Response {
    refresh_outbox_gauges(state).await;
    let mut response = Response::new(state.prometheus.render().into());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

async fn status(state: &AppState, request: &Request) -> Result<Response, ApiError> {
    state.auth.admin(&request.headers)?;
    let outbox = refresh_outbox_gauges(state).await;
    let body = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "backend": state.store.backend(),
        "actors": state.actors.status(),
        "redis": state.redis_mode.label(),
        "outbox": outbox,
    });
    Ok(json_response(
        StatusCode::OK,
        serde_json::to_string(&body).unwrap_or_default(),
    ))
}
