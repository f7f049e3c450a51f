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
//!   listener, one per client address (`connections.per_ip`, but never more
//!   than a fifth of `connections.max`, so a few addresses cannot hold the
//!   whole listener; per /64 for IPv6; off with `limits.per_ip = false`).
//!   A connection from one of the operator's proxies (`limits.trusted_proxies`)
//!   is not counted against the proxy at the accept: each request head names
//!   its client, and the connection counts against that client from then
//!   on (a client past its cap gets `503` and the close). Past a cap a new
//!   connection is answered `503` with `Connection: close` and closed at
//!   once, never queued; `herald_connections_refused_total{listener,reason}`
//!   counts it;
//! - **bounded heads** (`connections.max_head_bytes`,
//!   `connections.max_headers`): hyper answers `431` and closes past either,
//!   and its read buffer never grows much past the head limit;
//! - **a header read timeout** (`connections.header_read_timeout_ms`): a
//!   request head must be complete within this long of the server starting
//!   to wait for it — from the connect, from the first byte after the
//!   previous response, or from the first byte of a pipelined head that came
//!   while a bodiless request was being answered. A connection watchdog
//!   ([`Activity`]) sees the bytes arrive and the handler start; an overdue
//!   head closes the connection;
//! - **write progress** (`connections.write_timeout_ms`): a connection that
//!   takes no byte of what Herald has to write for this long (a stream
//!   client that stopped reading, a peer holding its window at zero) is
//!   closed with a reset, so the kernel drops its unsent data at once; the
//!   socket's `TCP_USER_TIMEOUT` is the same, and its send buffer is small
//!   ([`SEND_BUFFER_BYTES`]), so what one stalled peer pins in the kernel is
//!   bounded;
//! - **a keep-alive idle timeout** (`connections.idle_timeout_ms`): hyper's
//!   own header timer, given a tokio timer here, closes a connection that
//!   waits this long for its next request;
//! - **a lean path for streams**: a connection whose first request is
//!   `GET /api/jobs/stream` is answered by [`stream_http1`] and not by hyper,
//!   whose two 8 KiB buffers per connection would be most of what a stream
//!   client costs; the filter, the limits and the watchdog are the same.
//!   The task a connection keeps is small: what routing needs (the filter,
//!   the limits) is boxed and freed once the connection is routed;
//! - **graceful shutdown**: on the stop signal the loop stops accepting and
//!   every connection is told to finish its request in progress and close
//!   (hyper-util's `GracefulShutdown`); a stream ends when the hub ends it
//!   (the daemon ends every stream at the stop); [`serve`] returns when all
//!   are gone, and the caller bounds that wait.

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

use super::limits::{per_host, ClientSlot, OpenPerClient, TrustedProxies};
use super::stream_http1;
use crate::telemetry::metrics;

/// The kernel send buffer of an accepted socket (Linux doubles it): enough
/// for a stream's events and a page, not for megabytes a stalled peer would
/// pin in the kernel.
pub const SEND_BUFFER_BYTES: usize = 64 * 1024;

/// No client address holds more than this share of a listener's
/// connections (`1/SHARE_DIVISOR` of `connections.max`).
pub const SHARE_DIVISOR: usize = 5;

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
    pub write_timeout: Duration,
    pub max_head_bytes: usize,
    pub max_headers: usize,
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
            // A few addresses never hold the whole listener.
            per_ip: per_ip.map(|cap| cap.min((max / SHARE_DIVISOR).max(1))),
            header_read_timeout: Duration::from_millis(config.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(config.idle_timeout_ms),
            write_timeout: Duration::from_millis(config.write_timeout_ms),
            max_head_bytes: config.max_head_bytes,
            max_headers: config.max_headers,
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

/// The `503` a request gets when its client (named by a trusted proxy)
/// already holds its share of connections; the connection closes after it.
fn refused_response() -> warp::reply::Response {
    let mut response = warp::reply::Response::new(REFUSAL_BODY.into());
    *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/problem+json"),
    );
    headers.insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("1"),
    );
    headers.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    response
}

/// One wait the watchdog times (a head, a write): since when it runs, in
/// milliseconds after the connection's start plus one (0: not running).
struct Stopwatch {
    since: AtomicU64,
    /// Wakes the watchdog when the wait starts. `notify_one` keeps a permit
    /// if nobody waits yet, so a start between a load and the wait is not
    /// missed.
    started: tokio::sync::Notify,
}

impl Stopwatch {
    fn new(since: u64) -> Stopwatch {
        Stopwatch {
            since: AtomicU64::new(since),
            started: tokio::sync::Notify::new(),
        }
    }

    /// Starts it at `mark`, unless it runs already.
    fn start(&self, mark: u64) {
        if self.since.load(Ordering::Acquire) == 0 {
            self.since.store(mark, Ordering::Release);
            self.started.notify_one();
        }
    }

    fn stop(&self) {
        self.since.store(0, Ordering::Release);
    }

    /// Resolves when one wait has run for longer than `timeout` (counted
    /// from `origin`, the connection's start).
    async fn overdue(&self, origin: Instant, timeout: Duration) {
        loop {
            let since = self.since.load(Ordering::Acquire);
            if since == 0 {
                self.started.notified().await;
                continue;
            }
            let deadline = origin + Duration::from_millis(since - 1) + timeout;
            tokio::time::sleep_until(deadline).await;
            if self.since.load(Ordering::Acquire) == since {
                return;
            }
        }
    }
}

/// What the watchdog of one connection knows: since when a request head has
/// been awaited, whether a handler is running, and since when a write has
/// been waiting for the peer.
struct Activity {
    /// The connection's start; the stopwatches count from it.
    start: Instant,
    /// A request head is awaited and incomplete.
    head: Stopwatch,
    /// A write waits for the peer to take bytes.
    write: Stopwatch,
    /// A handler is running: bytes now are its body, not a head.
    busy: AtomicBool,
    /// The running request has a body (bytes while it runs may be it).
    expects_body: AtomicBool,
    /// The bytes read so far end after the last head terminator: a head
    /// (or a body) is partly here.
    partial: AtomicBool,
    /// The watchdog gave up on the peer: close with a reset, dropping what
    /// the kernel still holds for it.
    abort: AtomicBool,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            // The first head is awaited from the connect.
            head: Stopwatch::new(1),
            write: Stopwatch::new(0),
            busy: AtomicBool::new(false),
            expects_body: AtomicBool::new(false),
            partial: AtomicBool::new(false),
            abort: AtomicBool::new(false),
        }
    }

    fn now_mark(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    /// Bytes arrived: between requests, or while a request without a body
    /// is answered (pipelining), they are a new head.
    fn bytes_read(&self) {
        if !self.busy.load(Ordering::Acquire) || !self.expects_body.load(Ordering::Acquire) {
            self.head.start(self.now_mark());
        }
    }

    /// hyper parsed a head and called the service. Bytes already read past
    /// a bodiless request's head are the next head, and its clock starts.
    fn request_started(&self, expects_body: bool) {
        self.expects_body.store(expects_body, Ordering::Release);
        self.busy.store(true, Ordering::Release);
        self.head.stop();
        if !expects_body && self.partial.load(Ordering::Acquire) {
            self.head.start(self.now_mark());
        }
    }

    /// The handler answered; the next bytes start the next head.
    fn request_answered(&self) {
        self.busy.store(false, Ordering::Release);
    }

    /// A write is waiting for the peer (`true`) or went through.
    fn write_waiting(&self, waiting: bool) {
        if waiting {
            self.write.start(self.now_mark());
        } else {
            self.write.stop();
        }
    }

    /// Resolves when a head has been awaited for longer than `timeout`.
    async fn head_overdue(&self, timeout: Duration) {
        self.head.overdue(self.start, timeout).await
    }

    /// Resolves when a write has waited for the peer longer than `timeout`.
    async fn write_stalled(&self, timeout: Duration) {
        self.write.overdue(self.start, timeout).await
    }
}

/// A connection's socket, telling [`Activity`] when bytes arrive and when
/// a write waits for the peer.
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
    /// The last bytes read (newest lowest), to see a head's end go by.
    tail: u32,
}

impl Watched {
    /// Whether `tail` ends a head: `\r\n\r\n`, or the `\n\n` httparse also takes.
    fn at_head_end(tail: u32) -> bool {
        tail == u32::from_be_bytes(*b"\r\n\r\n") || tail & 0xffff == 0x0a0a
    }

    fn wrote<T>(&self, result: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        self.activity.write_waiting(result.is_pending());
        result
    }
}

impl AsRef<TcpStream> for Watched {
    fn as_ref(&self) -> &TcpStream {
        &self.stream
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if self.activity.abort.load(Ordering::Acquire) {
            // SO_LINGER 0: the close sends a reset and the kernel frees the
            // unsent data now, instead of probing a zero window for minutes.
            let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
        }
    }
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
            let mut tail = self.tail;
            for &byte in &buf.filled()[before..] {
                tail = (tail << 8) | u32::from(byte);
            }
            self.tail = tail;
            self.activity
                .partial
                .store(!Watched::at_head_end(tail), Ordering::Release);
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
        let result = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.wrote(result)
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
        let result = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.wrote(result)
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

/// Sets an accepted socket's options: no Nagle delay, a small send buffer,
/// and `TCP_USER_TIMEOUT` (unacknowledged data, zero-window probes
/// included, gives up after the write timeout).
fn tune(stream: &TcpStream, limits: &ConnectionLimits) {
    let _ = stream.set_nodelay(true);
    let socket = socket2::SockRef::from(stream);
    let _ = socket.set_send_buffer_size(SEND_BUFFER_BYTES);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = socket.set_tcp_user_timeout(Some(limits.write_timeout));
}

/// Which client a connection counts against, and who may say otherwise.
#[derive(Clone, Default)]
pub struct ClientCount {
    /// Open connections per client.
    table: Arc<OpenPerClient>,
    /// A peer in here is counted by the client its request heads name.
    proxies: TrustedProxies,
}

impl ClientCount {
    pub fn new(proxies: TrustedProxies) -> ClientCount {
        ClientCount {
            table: Arc::default(),
            proxies,
        }
    }
}

/// Serves `filter` on `listener` within `limits` until `stop` resolves,
/// then lets open connections finish and returns when they are all closed.
/// `clients` says which client address a connection counts against. Every
/// connection is a task of this call's own set: dropping the call (the
/// daemon's shutdown grace ran out) closes whatever is still open.
pub async fn serve<F>(
    listener: TcpListener,
    filter: F,
    limits: ConnectionLimits,
    clients: ClientCount,
    stop: impl Future<Output = ()>,
) where
    F: Filter<Extract = (warp::reply::Response,), Error = std::convert::Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max));
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
        // A trusted proxy's connection is counted once a head names its client.
        let via_proxy = clients.proxies.is_trusted(peer.ip());
        let slot = match limits.per_ip {
            Some(cap) if !via_proxy => match clients.table.admit(per_host(peer.ip()), cap) {
                Some(slot) => Some(slot),
                None => {
                    refuse(&mut tasks, limits.listener, "per_ip", stream);
                    continue;
                }
            },
            _ => None,
        };
        tune(&stream, &limits);
        let connection = Connection {
            filter: filter.clone(),
            limits: limits.clone(),
            peer,
            open: open.clone(),
            clients: via_proxy.then(|| clients.clone()),
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
    /// Set for a trusted proxy's connection: each request counts it
    /// against the client its head names.
    clients: Option<ClientCount>,
}

/// A proxied connection's place in its current client's count.
type ProxiedSlot = Arc<std::sync::Mutex<Option<ClientSlot>>>;

/// Counts a proxied connection against `client` (keeping its place when it
/// already counts there); `false` when `client` is at its cap.
fn count_against(slot: &ProxiedSlot, clients: &ClientCount, client: IpAddr, cap: usize) -> bool {
    let Ok(mut held) = slot.lock() else {
        return true;
    };
    if held.as_ref().is_some_and(|s| s.client() == client) {
        return true;
    }
    // Give the old place back first: a connection never counts twice.
    *held = None;
    *held = clients.table.admit(client, cap);
    held.is_some()
}

impl<F> Connection<F>
where
    F: Filter<Extract = (warp::reply::Response,), Error = std::convert::Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
{
    /// The connection's task. Not an `async fn`: what routing needs (the
    /// filter, the limits) goes into a boxed future built here, so the task a
    /// stream client keeps for hours holds only the socket, the body and the
    /// watchdog.
    fn run(
        self,
        stream: TcpStream,
        watcher: hyper_util::server::graceful::Watcher,
        permit: OwnedSemaphorePermit,
        slot: Option<ClientSlot>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let open = self.open.clone();
        let (listener, peer) = (self.limits.listener, self.peer);
        let (head_timeout, write_timeout) =
            (self.limits.header_read_timeout, self.limits.write_timeout);
        let activity = Arc::new(Activity::new());
        let watched = Watched {
            stream,
            activity: activity.clone(),
            tail: 0,
        };
        let routing = Box::pin(self.route(watched, watcher));
        async move {
            let _held = (permit, slot);
            let now_open = open.fetch_add(1, Ordering::Relaxed) + 1;
            metrics::connections_open(listener, now_open);
            // Pinned out here rather than inside `select!` so that an overdue
            // head is counted while the socket is still open: `select!` drops
            // its losing futures before running the winner's arm, and a
            // client that sees its connection closed must already find it in
            // the metric. The socket is dropped when this future ends.
            let served = std::pin::pin!(async move {
                match routing.await {
                    Routed::Stream(mut watched, answer, _place) => {
                        answer.write_to(&mut watched).await?;
                        Ok(())
                    }
                    Routed::Hyper(connection) => connection.await.map_err(Into::into),
                }
            });
            tokio::select! {
                result = served => {
                    let result: Result<(), Box<dyn std::error::Error + Send + Sync>> = result;
                    if let Err(e) = result {
                        // The socket's TCP_USER_TIMEOUT is the write timeout
                        // too; whichever notices first, it is counted once.
                        if timed_out(&*e) {
                            activity.abort.store(true, Ordering::Release);
                            metrics::connection_write_timed_out(listener);
                        }
                        tracing::debug!(listener, %peer, error = %e, "connection ended");
                    }
                }
                () = activity.head_overdue(head_timeout) => {
                    metrics::connection_timed_out(listener);
                    tracing::debug!(listener, %peer, "request head not complete in time; closed");
                }
                () = activity.write_stalled(write_timeout) => {
                    activity.abort.store(true, Ordering::Release);
                    metrics::connection_write_timed_out(listener);
                    tracing::debug!(listener, %peer, "peer took no bytes in time; reset");
                }
            }
            let now_open = open.fetch_sub(1, Ordering::Relaxed) - 1;
            metrics::connections_open(listener, now_open);
        }
    }

    /// Reads the connection's first bytes and routes it: a stream request
    /// is answered by the filter here and its response handed back to be
    /// written on Herald's own path ([`stream_http1`]); anything else is
    /// hyper's, with the bytes read so far in front.
    async fn route(
        self,
        mut watched: Watched,
        watcher: hyper_util::server::graceful::Watcher,
    ) -> Routed {
        let limits = &self.limits;
        let opening =
            stream_http1::read_opening(&mut watched, limits.max_head_bytes, limits.max_headers)
                .await;
        match opening {
            stream_http1::Opening::Stream(mut request) => {
                // A stream outlives the graceful shutdown's wait: it ends
                // when the hub ends it, and the accept loop joins its task.
                drop(watcher);
                watched.activity.request_started(false);
                let admission = self.admission();
                let response = if admission.admit(&mut request) {
                    let mut service = warp::service(self.filter);
                    match tower_service::Service::call(&mut service, request).await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    }
                } else {
                    refused_response()
                };
                let place = admission.into_place();
                Routed::Stream(watched, stream_http1::Answer::new(response), place)
            }
            stream_http1::Opening::Other(read) => Routed::Hyper(Box::pin(
                self.serve_with_hyper(stream_http1::Rewound::new(read, watched), watcher),
            )),
        }
    }

    /// Serves the connection with hyper, `io` carrying the bytes already read.
    async fn serve_with_hyper(
        self,
        io: stream_http1::Rewound<Watched>,
        watcher: hyper_util::server::graceful::Watcher,
    ) -> Result<(), hyper::Error> {
        let activity = io.inner.activity.clone();
        let io = TokioIo::new(io);
        let admission = self.admission();
        let service = warp::service(self.filter);
        let service = hyper::service::service_fn(move |mut request: http::Request<_>| {
            let expects_body = request
                .headers()
                .contains_key(http::header::TRANSFER_ENCODING)
                || request
                    .headers()
                    .get(http::header::CONTENT_LENGTH)
                    .is_some_and(|v| v.as_bytes() != b"0");
            activity.request_started(expects_body);
            let answered = activity.clone();
            let mut service = service.clone();
            let admitted = admission.admit(&mut request);
            async move {
                let response = if admitted {
                    tower_service::Service::call(&mut service, request).await
                } else {
                    Ok(refused_response())
                };
                answered.request_answered();
                response
            }
        });
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.idle_timeout)
            .max_header_size(self.limits.max_head_bytes)
            .max_headers(self.limits.max_headers)
            // hyper's floor is 8 KiB; the head limit acts before this does.
            .max_buf_size((self.limits.max_head_bytes + 8192).max(16 * 1024))
            .keep_alive(true);
        watcher.watch(http1.serve_connection(io, service)).await
    }

    fn admission(&self) -> Admission {
        Admission {
            peer: self.peer,
            clients: self.clients.clone(),
            cap: self.limits.per_ip,
            listener: self.limits.listener,
            proxied: ProxiedSlot::default(),
        }
    }
}

/// Whether `error`, or one of its sources, is the kernel giving up on the
/// peer (`ETIMEDOUT`: `TCP_USER_TIMEOUT` ran out).
fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        next = error.source();
    }
    false
}

/// Where a connection's first bytes sent it ([`Connection::route`]).
enum Routed {
    /// Herald's own path: this answer, to be written to this socket, and
    /// behind a trusted proxy the connection's place in its client's count
    /// (held until the stream ends).
    Stream(Watched, stream_http1::Answer, Option<ClientSlot>),
    /// hyper serves the connection until it closes.
    Hyper(Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>>),
}

/// What every request of one connection is admitted by: its TCP peer, and
/// behind a trusted proxy the count of the client its head names.
struct Admission {
    peer: SocketAddr,
    clients: Option<ClientCount>,
    cap: Option<usize>,
    listener: &'static str,
    /// The connection's place in its current client's count.
    proxied: ProxiedSlot,
}

impl Admission {
    /// Puts the peer into the request's extensions and, behind a trusted
    /// proxy, counts the connection against the client this head names;
    /// `false` (counted as a refusal) when that client is at its cap.
    fn admit<B>(&self, request: &mut http::Request<B>) -> bool {
        request.extensions_mut().insert(Peer(self.peer));
        let admitted = match (&self.clients, self.cap) {
            (Some(clients), Some(cap)) => {
                let client = per_host(clients.proxies.client_of(self.peer.ip(), request.headers()));
                count_against(&self.proxied, clients, client, cap)
            }
            _ => true,
        };
        if !admitted {
            metrics::connection_refused(self.listener, "per_ip");
        }
        admitted
    }

    /// The place a trusted proxy's connection holds in its client's count,
    /// for a connection that makes no further requests to keep.
    fn into_place(self) -> Option<ClientSlot> {
        self.proxied.lock().ok()?.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_ip: usize) -> ConnectionLimits {
        let mut config = crate::config::Config::from_toml("")
            .expect("defaults")
            .connections;
        config.max = max;
        ConnectionLimits::new("public", max, Some(per_ip), &config)
    }

    #[test]
    fn an_address_gets_at_most_a_fifth_of_the_listener_and_the_defaults_fit_a_nat() {
        let defaults = crate::config::Config::from_toml("").expect("defaults");
        let c = &defaults.connections;
        let public = ConnectionLimits::new("public", c.max, Some(c.per_ip), c);
        // 120 people behind one NAT, a page and a stream each.
        assert!(
            public.per_ip.is_some_and(|cap| cap >= 240),
            "{:?}",
            public.per_ip
        );
        assert_eq!(limits(400, 1024).per_ip, Some(80));
        assert_eq!(limits(400, 10).per_ip, Some(10), "per_ip still binds");
        assert_eq!(limits(3, 1024).per_ip, Some(1), "never none at all");
    }

    #[test]
    fn a_head_ends_at_a_blank_line_of_either_kind() {
        let tail = |bytes: &[u8]| bytes.iter().fold(0u32, |t, b| (t << 8) | u32::from(*b));
        assert!(Watched::at_head_end(tail(b"Host: a\r\n\r\n")));
        assert!(Watched::at_head_end(tail(b"Host: a\n\n")));
        assert!(!Watched::at_head_end(tail(b"Host: a\r\n")));
        assert!(!Watched::at_head_end(tail(b"X-Half: ")));
    }
}
