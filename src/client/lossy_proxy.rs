//! A lossy HTTP proxy in front of Herald, for `herald attack` and the
//! browser tests: it forwards every request (streams included) and loses the
//! responses its [`DropRule`] picks *after* Herald has acted on them — the
//! status line, the headers and half the body go out, then the connection
//! is cut, as when a network drops mid-response. (Cutting before any byte
//! would let an HTTP client such as Chromium resend the request on its own,
//! hiding the loss from the caller.) It records what passed through, so a
//! caller can see the retries and the keys they carried. It can also stall
//! the requests a second rule picks, never answering them, like a corporate
//! proxy that holds event streams back ([`LossyProxy::start_stalling`]).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::task::JoinSet;

/// One request that passed through.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub idempotency_key: Option<String>,
    /// Whether its response was cut.
    pub dropped: bool,
}

/// Decides, per request (method, path), whether to lose its response.
pub type DropRule = Box<dyn Fn(&hyper::Method, &str) -> bool + Send + Sync>;

struct Shared {
    upstream: String,
    http: reqwest::Client,
    drop: DropRule,
    /// Requests never answered (held open until the proxy is dropped).
    stall: Option<DropRule>,
    seen: Mutex<Vec<Seen>>,
}

pub struct LossyProxy {
    pub url: String,
    shared: Arc<Shared>,
    /// The accept loop, which owns each connection's task: dropping the
    /// proxy ends them all.
    _task: JoinSet<()>,
}

type Body = BoxBody<Bytes, std::io::Error>;

impl LossyProxy {
    /// Listens on a free port of 127.0.0.1, forwarding to `upstream`.
    pub async fn start(upstream: &str, drop: DropRule) -> std::io::Result<LossyProxy> {
        Self::start_with(upstream, drop, None).await
    }

    /// The same, and the requests `stall` picks are never answered.
    pub async fn start_stalling(
        upstream: &str,
        drop: DropRule,
        stall: DropRule,
    ) -> std::io::Result<LossyProxy> {
        Self::start_with(upstream, drop, Some(stall)).await
    }

    async fn start_with(
        upstream: &str,
        drop: DropRule,
        stall: Option<DropRule>,
    ) -> std::io::Result<LossyProxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
            drop,
            stall,
            seen: Mutex::new(Vec::new()),
        });
        let accept_shared = shared.clone();
        let mut task = JoinSet::new();
        task.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                while connections.try_join_next().is_some() {}
                let shared = accept_shared.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| forward(shared.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(LossyProxy {
            url,
            shared,
            _task: task,
        })
    }

    /// Every request so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared
            .seen
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }
}

async fn forward(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let dropped = (shared.drop)(&parts.method, parts.uri.path());
    if let Ok(mut seen) = shared.seen.lock() {
        seen.push(Seen {
            method: parts.method.to_string(),
            path: path.clone(),
            idempotency_key: parts
                .headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            dropped,
        });
    }
    if shared
        .stall
        .as_ref()
        .is_some_and(|stall| stall(&parts.method, parts.uri.path()))
    {
        futures::future::pending::<()>().await;
    }
    let mut upstream = shared
        .http
        .request(parts.method.clone(), format!("{}{}", shared.upstream, path))
        .body(body);
    for (name, value) in &parts.headers {
        if name != hyper::header::HOST && name != hyper::header::CONTENT_LENGTH {
            upstream = upstream.header(name, value);
        }
    }
    let answer = match upstream.send().await {
        Ok(answer) => answer,
        Err(_) => {
            let mut bad = Response::new(empty());
            *bad.status_mut() = hyper::StatusCode::BAD_GATEWAY;
            return Ok(bad);
        }
    };
    let mut response = Response::builder().status(answer.status());
    for (name, value) in answer.headers() {
        if name != hyper::header::TRANSFER_ENCODING && name != hyper::header::CONNECTION {
            response = response.header(name, value);
        }
    }
    let body: Body = if dropped {
        // Herald has committed; the client gets the head and half the body,
        // then a cut. (Cutting before any byte would let Chromium resend the
        // request by itself on a fresh connection, hiding the loss from the
        // page.) The pause lets the first half leave before the cut.
        let full = answer.bytes().await.unwrap_or_default();
        let half = full.slice(..full.len() / 2);
        let frames =
            futures::stream::iter([Ok(Frame::data(half))]).chain(futures::stream::once(async {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                Err::<Frame<Bytes>, _>(std::io::Error::other("response lost in transit"))
            }));
        BodyExt::boxed(StreamBody::new(frames))
    } else {
        BodyExt::boxed(StreamBody::new(
            answer
                .bytes_stream()
                .map(|chunk| chunk.map(Frame::data).map_err(std::io::Error::other)),
        ))
    };
    Ok(response.body(body).unwrap_or_else(|_| {
        let mut bad = Response::new(empty());
        *bad.status_mut() = hyper::StatusCode::BAD_GATEWAY;
        bad
    }))
}

fn empty() -> Body {
    BodyExt::boxed(http_body_util::Empty::new().map_err(|never| match never {}))
}
