//! `GET /api/jobs/stream` on Herald's own HTTP/1.1 path, beside hyper.
//!
//! A stream client holds its connection for hours and is sent a few bytes a
//! minute. hyper's HTTP/1 server keeps a read and a write buffer of 8 KiB
//! for every connection (`INIT_BUFFER_SIZE`; its builder has no setting
//! below that), two thirds of what a stream client cost. So the accept loop
//! reads a connection's first bytes itself ([`read_opening`]): a head that
//! opens `GET /api/jobs/stream` is parsed here (with `httparse`, hyper's own
//! parser), handed to the same warp filter as an `http::Request`, and the
//! answer is written straight to the socket ([`Answer`]): the head, then
//! each frame of the body as one HTTP/1.1 chunk. Nothing is buffered
//! between frames, so an idle client costs its task, its queue and its
//! socket. Anything else (another path, a method or version other than GET
//! over HTTP/1.1, a request with a body or an `Expect`, pipelined bytes, a
//! head that is too long or malformed) goes to hyper with the bytes read
//! so far replayed in front of the socket ([`Rewound`]), so hyper answers it
//! exactly as it always has (`431`, `400`, keep-alive).
//!
//! A connection answered here is closed after its response (`connection:
//! close`): a stream ends only when its client has to reconnect anyway. The
//! connection's watchdog still times the head and every write, and while the
//! body waits for its next frame the socket is watched for the client's
//! close, as hyper does, so a client that left frees its place at once.

use std::io::Write as _;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::FutureExt;
use http_body::Body as _;
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// The start of every head this path serves: the method, a space, the path.
const OPENING: &[u8] = b"GET /api/jobs/stream";

/// What a connection's first bytes say.
pub(super) enum Opening {
    /// A whole head of a stream request, and nothing after it.
    Stream(http::Request<Empty<Bytes>>),
    /// Anything else: hyper serves it, these bytes first.
    Other(Vec<u8>),
}

/// Reads a connection's first bytes until they say which path serves it:
/// as soon as they stop matching `GET /api/jobs/stream`, or once a whole
/// head of that request is here. At most about `max_head_bytes` are read.
pub(super) async fn read_opening<R>(
    io: &mut R,
    max_head_bytes: usize,
    max_headers: usize,
) -> Opening
where
    R: AsyncRead + Unpin,
{
    let mut bytes = Vec::with_capacity(256);
    loop {
        let seen = bytes.len().min(OPENING.len());
        if bytes[..seen] != OPENING[..seen] {
            return Opening::Other(bytes);
        }
        if let Some(&after) = bytes.get(OPENING.len()) {
            if after != b'?' && after != b' ' {
                return Opening::Other(bytes);
            }
            if ends_a_head(&bytes) {
                return match stream_request(&bytes, max_headers) {
                    Some(request) => Opening::Stream(request),
                    None => Opening::Other(bytes),
                };
            }
        }
        if bytes.len() >= max_head_bytes {
            return Opening::Other(bytes);
        }
        // A read of a few hundred bytes at a time: a head is small, and
        // hyper gets whatever was read past it.
        bytes.reserve(512);
        match io.read_buf(&mut bytes).await {
            Ok(0) | Err(_) => return Opening::Other(bytes),
            Ok(_) => {}
        }
    }
}

/// Whether `bytes` hold a blank line (`\r\n\r\n`, or the `\n\n` httparse
/// also takes): a head's end.
fn ends_a_head(bytes: &[u8]) -> bool {
    bytes.windows(4).any(|w| w == b"\r\n\r\n") || bytes.windows(2).any(|w| w == b"\n\n")
}

/// The request in `head` if this path serves it: a complete GET over
/// HTTP/1.1 for the stream, without a body, an `Expect` or an `Upgrade`,
/// and with nothing after the head. `None` leaves it to hyper.
fn stream_request(head: &[u8], max_headers: usize) -> Option<http::Request<Empty<Bytes>>> {
    let mut slots = vec![httparse::EMPTY_HEADER; max_headers];
    let mut parsed = httparse::Request::new(&mut slots);
    let httparse::Status::Complete(length) = parsed.parse(head).ok()? else {
        return None;
    };
    if length != head.len() || parsed.method != Some("GET") || parsed.version != Some(1) {
        return None;
    }
    let path = parsed.path?;
    if path != "/api/jobs/stream" && !path.starts_with("/api/jobs/stream?") {
        return None;
    }
    let mut request = http::Request::builder()
        .method(http::Method::GET)
        .uri(path)
        .version(http::Version::HTTP_11)
        .body(Empty::new())
        .ok()?;
    let headers = request.headers_mut();
    for header in parsed.headers.iter() {
        let name = http::HeaderName::from_bytes(header.name.as_bytes()).ok()?;
        let value = http::HeaderValue::from_bytes(header.value).ok()?;
        let has_body = (name == http::header::CONTENT_LENGTH && value != "0")
            || name == http::header::TRANSFER_ENCODING;
        if has_body || name == http::header::EXPECT || name == http::header::UPGRADE {
            return None;
        }
        headers.append(name, value);
    }
    Some(request)
}

/// A response as this path writes it: its head already on the wire's
/// terms, its body, and the body's length if known. The header map is not
/// kept for the life of a stream.
pub(super) struct Answer {
    head: Vec<u8>,
    body: WarpBody,
    length: Option<u64>,
}

/// The body of warp's responses (warp 0.4 does not export its name).
type WarpBody = <warp::reply::Response as BodyOf>::Body;

/// The body type of a response.
trait BodyOf {
    type Body;
}

impl<B> BodyOf for http::Response<B> {
    type Body = B;
}

impl Answer {
    pub(super) fn new(response: warp::reply::Response) -> Answer {
        let (parts, body) = response.into_parts();
        let length = body.size_hint().exact();
        Answer {
            head: response_head(&parts, length),
            body,
            length,
        }
    }

    /// Writes the answer to the client and closes: the head, then the body
    /// (one chunk per frame when its length is not known), then the end. It
    /// returns early when the client closes its side or a write fails. Each
    /// write goes through `io`, so the connection's watchdog times it; its
    /// socket is watched for the client's close.
    pub(super) async fn write_to<W>(self, io: &mut W) -> std::io::Result<()>
    where
        W: AsyncWrite + AsRef<TcpStream> + Unpin,
    {
        let Answer {
            head,
            mut body,
            length,
        } = self;
        io.write_all(&head).await?;
        drop(head);
        let mut ended = false;
        let mut dropped = 0;
        while !ended {
            // The next frame, unless the client leaves first.
            let frame = std::future::poll_fn(|cx| {
                if let Poll::Ready(closed) = poll_client_closed((*io).as_ref(), cx, &mut dropped) {
                    return Poll::Ready(Err(closed));
                }
                Pin::new(&mut body).poll_frame(cx).map(Ok)
            })
            .await;
            let frame = match frame {
                Ok(frame) => frame,
                // Gone: closed, or the socket failed (the kernel's write
                // timeout among others).
                Err(closed) => return closed,
            };
            // This frame and every one already waiting behind it go out in one
            // write (a burst of events is one syscall, as with hyper); the
            // buffer lives only for that write.
            let mut out = Vec::new();
            let mut next = frame;
            loop {
                match next {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            put_data(&mut out, &data, length.is_none());
                        }
                    }
                    Some(Err(_)) | None => {
                        ended = true;
                        break;
                    }
                }
                if out.len() >= COALESCE_BYTES {
                    break;
                }
                match body.frame().now_or_never() {
                    Some(frame) => next = frame,
                    None => break,
                }
            }
            if !out.is_empty() {
                io.write_all(&out).await?;
            }
        }
        if length.is_none() {
            io.write_all(b"0\r\n\r\n").await?;
        }
        io.flush().await?;
        io.shutdown().await
    }
}

/// Most bytes of ready frames gathered into one write.
const COALESCE_BYTES: usize = 64 * 1024;

/// Appends one frame's data to `out`: as it is, or as one chunk.
fn put_data(out: &mut Vec<u8>, data: &[u8], chunked: bool) {
    if data.is_empty() {
        return;
    }
    if chunked {
        // Into the buffer itself: no string per chunk.
        let _ = write!(out, "{:x}\r\n", data.len());
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(data);
    }
}

/// The status line and headers of a response closed after its body:
/// `content-length` when the body's length is known, else chunked, and a
/// `date` as hyper writes it.
fn response_head(parts: &http::response::Parts, length: Option<u64>) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(parts.status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        // Framing is this writer's to say.
        if name == http::header::CONNECTION
            || name == http::header::CONTENT_LENGTH
            || name == http::header::TRANSFER_ENCODING
        {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if !parts.headers.contains_key(http::header::DATE) {
        head.extend_from_slice(b"date: ");
        head.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    match length {
        Some(length) => {
            let _ = write!(head, "content-length: {length}\r\n");
        }
        None => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    head.extend_from_slice(b"connection: close\r\n\r\n");
    head
}

/// Most bytes a stream client may send after its head (it has nothing more
/// to say) before it is treated as gone.
const MOST_BYTES_AFTER_HEAD: usize = 16 * 1024;

/// Whether the client closed its side (`Ok`), its socket failed (`Err`:
/// the kernel's `TCP_USER_TIMEOUT` is the write timeout too), or it kept
/// sending after its head (`Ok`; what it sends meanwhile is dropped,
/// `dropped` counts it). Polled, not awaited as `readable()`: the socket's
/// one reader waker is all it takes, with no waiter list to join and leave
/// per frame.
fn poll_client_closed(
    socket: &TcpStream,
    cx: &mut Context<'_>,
    dropped: &mut usize,
) -> Poll<std::io::Result<()>> {
    loop {
        match socket.poll_read_ready(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {}
        }
        let mut scratch = [0u8; 64];
        match socket.try_read(&mut scratch) {
            Ok(0) => return Poll::Ready(Ok(())),
            Ok(n) => {
                *dropped += n;
                if *dropped > MOST_BYTES_AFTER_HEAD {
                    return Poll::Ready(Ok(()));
                }
            }
            // Readiness is cleared: the next poll waits for news.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// A socket with bytes already read from it put back in front: hyper reads
/// `prefix` first, then the socket.
pub(super) struct Rewound<T> {
    prefix: Vec<u8>,
    /// How much of `prefix` hyper has read.
    taken: usize,
    pub(super) inner: T,
}

impl<T> Rewound<T> {
    pub(super) fn new(prefix: Vec<u8>, inner: T) -> Rewound<T> {
        Rewound {
            prefix,
            taken: 0,
            inner,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewound<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.taken < self.prefix.len() {
            let rest = &self.prefix[self.taken..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.taken += n;
            if self.taken == self.prefix.len() {
                // Given back: hyper keeps the connection for its lifetime.
                self.prefix = Vec::new();
                self.taken = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewound<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn opening(bytes: &[u8]) -> Opening {
        let mut reader = bytes;
        read_opening(&mut reader, 8192, 32).await
    }

    #[tokio::test]
    async fn only_a_whole_bodiless_get_of_the_stream_is_served_here() {
        let served = |o: &Opening| matches!(o, Opening::Stream(_));
        let head = b"GET /api/jobs/stream?q=rust HTTP/1.1\r\nhost: a\r\nlast-event-id: 1-0\r\n\r\n";
        let Opening::Stream(request) = opening(head).await else {
            panic!("a stream head goes to hyper");
        };
        assert_eq!(request.uri().query(), Some("q=rust"));
        assert_eq!(request.headers()["last-event-id"], "1-0");
        assert!(served(&opening(b"GET /api/jobs/stream HTTP/1.1\n\n").await));
        for other in [
            &b"GET /api/jobs HTTP/1.1\r\n\r\n"[..],
            b"GET /api/jobs/streams HTTP/1.1\r\n\r\n",
            b"POST /api/jobs/stream HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi",
            b"GET /api/jobs/stream HTTP/1.0\r\n\r\n",
            b"GET /api/jobs/stream HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            b"GET /api/jobs/stream HTTP/1.1\r\nexpect: 100-continue\r\n\r\n",
            b"GET /api/jobs/stream HTTP/1.1\r\n\r\nGET /api/jobs HTTP/1.1\r\n\r\n",
            b"GET /api/jobs/stream HTTP/1.1\r\nbad header\r\n\r\n",
            b"GET /api/jobs/stream HTTP/1.1\r\nhost: a\r\n", // the peer closed mid-head
        ] {
            let Opening::Other(bytes) = opening(other).await else {
                panic!("served here: {}", String::from_utf8_lossy(other));
            };
            assert!(other.starts_with(&bytes), "hyper is given what was read");
        }
    }

    #[tokio::test]
    async fn hyper_reads_the_bytes_read_so_far_then_the_socket() {
        let mut rewound = Rewound::new(b"GET /a".to_vec(), &b" HTTP/1.1\r\n\r\n"[..]);
        let mut all = String::new();
        rewound.read_to_string(&mut all).await.expect("read");
        assert_eq!(all, "GET /a HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn a_stream_head_is_chunked_and_closed_and_a_known_length_is_said() {
        let response = http::Response::builder()
            .status(200)
            .header("content-type", "text/event-stream")
            .header("content-length", "9")
            .body(())
            .expect("response");
        let (parts, ()) = response.into_parts();
        let chunked = String::from_utf8(response_head(&parts, None)).expect("ascii");
        assert!(chunked.starts_with("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"));
        assert!(chunked.contains("\r\ndate: ") && chunked.contains("transfer-encoding: chunked"));
        assert!(chunked.ends_with("connection: close\r\n\r\n"));
        assert!(!chunked.contains("content-length"));
        let sized = String::from_utf8(response_head(&parts, Some(12))).expect("ascii");
        assert!(sized.contains("content-length: 12\r\n") && !sized.contains("chunked"));
    }
}
