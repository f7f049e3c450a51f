//! The listeners' accept loops: every TCP connection Herald holds is
//! admitted, bounded in time and owned here.
//!
//! warp's own server builds hyper without a timer, so hyper's header read
//! timeout is off and a connection that sends half a request head (or
//! nothing) is held forever; nothing caps how many are open, and a few
//! thousand of them exhaust the process's file descriptors. So Herald runs
//! the accept loop itself and hands each connection to hyper with its warp
//! filter as the service (`warp::service`):
//!
//! - **a cap on connections**: the listener's global cap
//!   (`connections.max`, `connections.admin_max`) and, on the public
//!   listener, one per client address (`connections.per_ip`; per /64 for
//!   IPv6; off with `limits.per_ip = false` and when a trusted proxy header
//!   says every connection is the proxy's). Past a cap a new connection is
//!   answered `503` with `Connection: close` and closed at once, never
//!   queued; `herald_connections_refused_total{listener,reason}` counts it;
//! - **a header read timeout** (`connections.header_read_timeout_ms`): a
//!   request head must be complete within this long of the server starting
//!   to wait for it — from the connect, or from the first byte after the
//!   previous response. A connection watchdog ([`Activity`]) sees the bytes
//!   arrive and the handler start; an overdue head closes the connection;
//! - **a keep-alive idle timeout** (`connections.idle_timeout_ms`): hyper's
//!   own header timer, given a tokio timer here, closes a connection that
//!   waits this long for its next request;
//! - **graceful shutdown**: on the stop signal the loop stops accepting and
//!   every connection is told to finish its request in progress and close
//!   (hyper-util's `GracefulShutdown`); [`serve`] returns when all are gone,
//!   and the caller bounds that wait.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use warp::Filter;

use super::limits::{ClientSlot, OpenPerClient};
use crate::telemetry::metrics;

/// The TCP peer of a request, put into its extensions for the filters
/// (warp's own `addr::remote` only works under warp's server).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// How one listener bounds its connections.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// `public` or `admin`: the metrics label and the log field.
    pub listener: &'static str,
    /// Most connections open at once.
    pub max: usize,
    /// Most connections open at once from one client address; `None` off.
    pub per_ip: Option<usize>,
    /// See the module documentation.
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}

impl ConnectionLimits {
    /// One listener's limits from the `[connections]` settings.
    pub fn new(
        listener: &'static str,
        max: usize,
        per_ip: Option<usize>,
        config: &crate::config::ConnectionsConfig,
    ) -> ConnectionLimits {
        ConnectionLimits {
            listener,
            max,
            per_ip,
            header_read_timeout: Duration::from_millis(config.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(config.idle_timeout_ms),
        }
    }
}

/// The problem body a refused connection is told before it is closed.
const REFUSAL_BODY: &str = r#"{"type":"about:blank","title":"Service Unavailable","status":503,"code":"unavailable","detail":"too many connections; retry later"}"#;

/// The whole 503 response of a refused connection.
fn refusal() -> String {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{REFUSAL_BODY}",
        REFUSAL_BODY.len()
    )
}

/// What the watchdog of one connection knows: when the request head it is
/// waiting for started, and whether a handler is running.
struct Activity {
    /// The connection's start; the clock below counts from it.
    start: Instant,
    /// Milliseconds after `start` (plus one, so 0 means none) since which a
    /// request head is awaited and incomplete.
    head_since: AtomicU64,
    /// A handler is running: bytes now are its body, not a head.
    busy: AtomicBool,
    /// Wakes the watchdog when a new head starts.
    head_started: tokio::sync::Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            // The first head is awaited from the connect.
            head_since: AtomicU64::new(1),
            busy: AtomicBool::new(false),
            head_started: tokio::sync::Notify::new(),
        }
    }

    fn now_mark(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    /// Bytes arrived: between requests they are a new head.
    fn bytes_read(&self) {
        if !self.busy.load(Ordering::Acquire) && self.head_since.load(Ordering::Acquire) == 0 {
            self.head_since.store(self.now_mark(), Ordering::Release);
            self.head_started.notify_one();
        }
    }

    /// hyper parsed a head and called the service.
    fn request_started(&self) {
        self.busy.store(true, Ordering::Release);
        self.head_since.store(0, Ordering::Release);
    }

    /// The handler answered; the next bytes start the next head.
    fn request_answered(&self) {
        self.busy.store(false, Ordering::Release);
    }

    /// Resolves when a head has been awaited for longer than `timeout`.
    async fn head_overdue(&self, timeout: Duration) {
        loop {
            let since = self.head_since.load(Ordering::Acquire);
            if since == 0 {
                // `notify_one` keeps a permit if nobody waits yet, so a head
                // that starts between the load and here is not missed.
                self.head_started.notified().await;
                continue;
            }
            let deadline = self.start + Duration::from_millis(since - 1) + timeout;
            tokio::time::sleep_until(deadline).await;
            if self.head_since.load(Ordering::Acquire) == since {
                return;
            }
        }
    }
}

/// A connection's socket, telling [`Activity`] when bytes arrive.
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Refuses one connection: a 503 if the socket takes it at once, then close.
fn refuse(
    tasks: &mut JoinSet<()>,
    listener: &'static str,
    reason: &'static str,
    stream: TcpStream,
) {
    metrics::connection_refused(listener, reason);
    tasks.spawn(async move {
        let mut stream = stream;
        // Bounded: a peer that does not read gets the close without the 503.
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            stream.write_all(refusal().as_bytes()).await?;
            stream.shutdown().await
        })
        .await;
    });
}

/// Serves `filter` on `listener` within `limits` until `stop` resolves,
/// then lets open connections finish and returns when they are all closed.
/// `client_of` says which client address a peer counts against. Every
/// connection is a task of this call's own set: dropping the call (the
/// daemon's shutdown grace ran out) closes whatever is still open.
pub async fn serve<F>(
    listener: TcpListener,
    filter: F,
    limits: ConnectionLimits,
    client_of: impl Fn(SocketAddr) -> IpAddr,
    stop: impl Future<Output = ()>,
) where
    F: Filter<Extract = (warp::reply::Response,), Error = std::convert::Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max));
    let per_client = Arc::new(OpenPerClient::default());
    let graceful = GracefulShutdown::new();
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut stop = std::pin::pin!(stop);
    let mut tasks: JoinSet<()> = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: the caps above should keep us off
                    // this path; if not, back off instead of spinning.
                    tracing::error!(listener = limits.listener, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            refuse(&mut tasks, limits.listener, "max", stream);
            continue;
        };
        let slot = match limits.per_ip {
            Some(cap) => match per_client.admit(client_of(peer), cap) {
                Some(slot) => Some(slot),
                None => {
                    refuse(&mut tasks, limits.listener, "per_ip", stream);
                    continue;
                }
            },
            None => None,
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            filter: filter.clone(),
            limits: limits.clone(),
            peer,
            open: open.clone(),
        };
        let watcher = graceful.watcher();
        tasks.spawn(connection.run(stream, watcher, permit, slot));
    }
    drop(listener);
    graceful.shutdown().await;
    while tasks.join_next().await.is_some() {}
}

/// One accepted connection and what it needs to be served.
struct Connection<F> {
    filter: F,
    limits: ConnectionLimits,
    peer: SocketAddr,
    open: Arc<std::sync::atomic::AtomicUsize>,
}

impl<F> Connection<F>
where
    F: Filter<Extract = (warp::reply::Response,), Error = std::convert::Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
{
    async fn run(
        self,
        stream: TcpStream,
        watcher: hyper_util::server::graceful::Watcher,
        _permit: OwnedSemaphorePermit,
        _slot: Option<ClientSlot>,
    ) {
        let now_open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::connections_open(self.limits.listener, now_open);
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Watched {
            stream,
            activity: activity.clone(),
        });
        let service = warp::service(self.filter);
        let peer = self.peer;
        let on_request = activity.clone();
        let service = hyper::service::service_fn(move |mut request: http::Request<_>| {
            request.extensions_mut().insert(Peer(peer));
            on_request.request_started();
            let answered = on_request.clone();
            let mut service = service.clone();
            async move {
                let response = tower_service::Service::call(&mut service, request).await;
                answered.request_answered();
                response
            }
        });
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.idle_timeout)
            .keep_alive(true);
        // Pinned out here rather than inside `select!` so that an overdue head
        // is counted while the socket is still open: `select!` drops its
        // losing futures before running the winner's arm, and a client that
        // sees its connection closed must already find it in the metric.
        // The connection (and its socket) is dropped when `run` returns.
        let mut connection = std::pin::pin!(watcher.watch(http1.serve_connection(io, service)));
        tokio::select! {
            result = &mut connection => {
                if let Err(e) = result {
                    tracing::debug!(listener = self.limits.listener, %peer, error = %e, "connection ended");
                }
            }
            () = activity.head_overdue(self.limits.header_read_timeout) => {
                metrics::connection_timed_out(self.limits.listener);
                tracing::debug!(listener = self.limits.listener, %peer, "request head not complete in time; closed");
            }
        }
        let now_open = self.open.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::connections_open(self.limits.listener, now_open);
    }
}
