//! The public listener against peers that misbehave the way real ones do: a
//! few addresses opening connections as fast as they can, a stream client
//! that stops reading, heads that never end, a pipelined head left half
//! sent. Clients are other loopback addresses (127.0.0.x), as in
//! tests/herald/abuse.rs.

use crate::abuse::{client_at, closed_by, connect_from, from, limited, public_addr};
use crate::support;

use std::time::{Duration, Instant};

use support::eventually;
use support::sse::SseClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn two_addresses_opening_all_they_can_leave_room_for_a_third_and_a_nat() {
    // Heads may take a minute: the attackers' silent connections stay open
    // for the whole test, the worst case.
    let (_b, herald) = limited(&[
        ("HERALD_CONNECTIONS__MAX", "400"),
        ("HERALD_CONNECTIONS__HEADER_READ_TIMEOUT_MS", "60000"),
    ])
    .await;
    let addr = public_addr(&herald);
    // Two addresses open up to 400 connections each, all at once, and start
    // a head on each. (A burst this size overflows the kernel's accept queue:
    // it then completes connections with SYN cookies, which reach Herald only
    // when the client sends something.)
    let attackers = futures::future::join_all((0..800).map(|i| {
        let addr = addr.clone();
        async move {
            let mut s = connect_from(&addr, 31 + (i % 2) as u8).await;
            let _ = s.write_all(b"GET /api/jobs HTTP/1.1\r\n").await;
            s
        }
    }))
    .await;
    // Every attacking connection was accepted (and kept or refused) by the
    // time 640 are refused.
    let refused_metric = r#"herald_connections_refused_total{listener="public",reason="per_ip"}"#;
    let refused = eventually(
        "640 of the attackers' connections refused",
        Duration::from_secs(20),
        || {
            let herald = &herald;
            async move {
                let refused = herald.metric(refused_metric).await;
                (refused >= 640.0).then_some(refused)
            }
        },
    )
    .await;
    let open = herald
        .metric(r#"herald_connections_open{listener="public"}"#)
        .await;
    println!("of 800 attacking connections {refused} refused; {open} open on the listener");
    assert!(
        open <= 170.0,
        "two addresses hold at most a fifth of 400 each: {open} open"
    );

    // A third address: 20 of 20 health checks, all within 2 s.
    let started = Instant::now();
    let checks = futures::future::join_all((0..20).map(|_| {
        let url = herald.url("/healthz");
        async move {
            client_at(33)
                .get(url)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .ok()
        }
    }))
    .await;
    let took = started.elapsed();
    assert_eq!(
        checks.iter().filter(|s| **s == Some(200)).count(),
        20,
        "{checks:?}"
    );
    assert!(
        took < Duration::from_secs(2),
        "20 health checks took {took:?}"
    );

    // A NAT's 60 streams, connecting at once: 60 of 60 snapshots. (The
    // hub admits 40 connects at once and tells the rest to come back, as
    // it would any burst: they do, as a browser would.)
    let url = herald.url("/api/jobs/stream");
    let streams = futures::future::join_all((0..60).map(|_| browser_stream(&url, 34))).await;
    assert_eq!(streams.len(), 60);
    drop(attackers);
}

/// A stream from 127.0.0.`octet`, connected the way a browser's
/// EventSource does: told to come back later, it comes back; it returns
/// once it holds a snapshot. Never refused by the listener (a 503 fails
/// the connect's assertion).
async fn browser_stream(url: &str, octet: u8) -> SseClient {
    eventually("a stream served", Duration::from_secs(15), || async move {
        let mut s = SseClient::connect_once_from(url, None, Some(from(octet))).await;
        let opening = s
            .next(Duration::from_secs(10))
            .await
            .expect("opening retry");
        assert_eq!(opening.event, "retry");
        let first = s.next(Duration::from_secs(10)).await?;
        assert_eq!(first.event, "snapshot");
        Some(s)
    })
    .await
}

/// The kernel's view of one TCP connection, from /proc/net/tcp: its send
/// queue, or `None` when it no longer exists.
fn send_queue(local_port: u16, remote_port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let (local, remote) = (
        format!("0100007F:{local_port:04X}"),
        format!("0100007F:{remote_port:04X}"),
    );
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&local.as_str()) || fields.get(2) != Some(&remote.as_str()) {
            return None;
        }
        let queues = fields.get(4)?;
        let tx = queues.split(':').next()?;
        u64::from_str_radix(tx, 16).ok()
    })
}

#[tokio::test]
async fn a_stream_client_that_stops_reading_is_let_go_and_the_kernel_lets_go_of_it_too() {
    let (stall_ms, write_ms) = (2_000u64, 2_000u64);
    let (_b, herald) = limited(&[
        ("HERALD_SSE__STALL_TIMEOUT_MS", "2000"),
        ("HERALD_CONNECTIONS__WRITE_TIMEOUT_MS", "2000"),
    ])
    .await;
    herald.post_job("Warm-up").await;
    let open_before = herald
        .metric(r#"herald_connections_open{listener="public"}"#)
        .await;
    let addr = public_addr(&herald);
    let herald_port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();

    // A client with a tiny receive buffer reads the stream's opening and
    // snapshot, then never reads again.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut stalled = socket
        .connect(addr.parse().unwrap())
        .await
        .expect("connect");
    let client_port = stalled.local_addr().unwrap().port();
    stalled
        .write_all(
            b"GET /api/jobs/stream HTTP/1.1\r\nHost: herald\r\nAccept: text/event-stream\r\n\r\n",
        )
        .await
        .expect("request");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("event: snapshot") {
        let n = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut buf))
            .await
            .expect("the stream opens")
            .expect("read");
        assert!(n > 0, "stream closed early");
        seen.extend_from_slice(&buf[..n]);
    }
    herald
        .wait_for_metric(
            r#"herald_connections_open{listener="public"}"#,
            open_before + 1.0,
        )
        .await;

    // 16 KB jobs, posted one after another, until Herald lets go.
    let description = "x".repeat(16_000);
    let started = Instant::now();
    let limit = Duration::from_millis(stall_ms + write_ms) + Duration::from_secs(5);
    let mut most_queued = 0u64;
    let mut posted = 0;
    let closed_after = loop {
        match send_queue(herald_port, client_port) {
            None => break started.elapsed(),
            Some(queued) => most_queued = most_queued.max(queued),
        }
        assert!(
            started.elapsed() < limit + Duration::from_secs(30),
            "the stalled stream is still open after {posted} jobs; {most_queued} bytes queued"
        );
        herald
            .post_job_described(&format!("Big {posted}"), &description)
            .await;
        posted += 1;
    };
    println!(
        "stalled stream closed {closed_after:?} after the first of {posted} 16 KB jobs; \
         the kernel held up to {most_queued} bytes for it"
    );
    assert!(
        most_queued > 16_000,
        "the client really stalled: the kernel queued {most_queued} bytes for it"
    );
    assert!(
        closed_after <= limit,
        "closed after {closed_after:?}, not within stall + write timeout (+5 s)"
    );
    // Its place on the listener is given back, and nothing is queued for it.
    herald
        .wait_for_metric(r#"herald_connections_open{listener="public"}"#, open_before)
        .await;
    assert_eq!(send_queue(herald_port, client_port), None);
    let reset = herald
        .metric(r#"herald_connections_write_timeout_total{listener="public"}"#)
        .await;
    assert!(reset >= 1.0, "counted as a write timeout: {reset}");
    drop(stalled);
}

/// The resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

#[tokio::test]
async fn eight_hundred_endless_heads_are_refused_431_and_cost_little_memory() {
    let (_b, herald) = limited(&[]).await;
    let addr = public_addr(&herald);
    let pid = herald.pid().expect("pid");
    let before = rss(pid);
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampling = {
        let peak = peak.clone();
        // A sampler (every 20 ms), not a wait for anything.
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(20));
            loop {
                every.tick().await;
                peak.fetch_max(rss(pid), std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    // 800 connections from one address, each sending a 400 KB head that
    // never ends.
    let chunk = vec![b'a'; 16 * 1024];
    let answers = futures::future::join_all((0..800).map(|_| {
        let (addr, chunk) = (addr.clone(), chunk.clone());
        async move {
            let mut s = connect_from(&addr, 41).await;
            let mut sent = 0usize;
            if s.write_all(b"GET /api/jobs HTTP/1.1\r\nHost: herald\r\nX-Big: ")
                .await
                .is_ok()
            {
                while sent < 400 * 1024 && s.write_all(&chunk).await.is_ok() {
                    sent += chunk.len();
                }
            }
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut answer)).await;
            String::from_utf8_lossy(&answer).to_string()
        }
    }))
    .await;
    sampling.abort();
    let refused_431 = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 431"))
        .count();
    let other: Vec<&String> = answers
        .iter()
        .filter(|a| !a.is_empty() && !a.starts_with("HTTP/1.1 431"))
        .collect();
    assert!(other.is_empty(), "answered otherwise: {:?}", other.first());
    let grew = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(before);
    println!(
        "800 endless heads: {refused_431} answered 431, the rest closed; \
         Herald grew {} MB at most (from {} MB)",
        grew / 1_000_000,
        before / 1_000_000
    );
    assert!(refused_431 > 0, "hyper answers 431 past the head limit");
    assert!(grew < 50_000_000, "the process grew {grew} bytes");

    // Too many header fields: 431 too.
    let mut s = connect_from(&addr, 42).await;
    let mut head = String::from("GET /healthz HTTP/1.1\r\nHost: herald\r\n");
    for i in 0..70 {
        head.push_str(&format!("X-H{i}: v\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // And the listener still serves.
    let r = client_at(43)
        .get(herald.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_pipelined_partial_head_is_closed_at_the_header_timeout() {
    let (_b, herald) = limited(&[("HERALD_CONNECTIONS__HEADER_READ_TIMEOUT_MS", "1000")]).await;
    let addr = public_addr(&herald);
    let before = herald
        .metric(r#"herald_connections_header_timeout_total{listener="public"}"#)
        .await;
    let mut s = connect_from(&addr, 51).await;
    let sent = Instant::now();
    s.write_all(
        b"GET /healthz HTTP/1.1\r\nHost: herald\r\n\r\nGET /healthz HTTP/1.1\r\nHost: herald\r\nX-Half: ",
    )
    .await
    .expect("write");
    let mut first = [0u8; 12];
    s.read_exact(&mut first).await.expect("the first answer");
    assert_eq!(&first, b"HTTP/1.1 200");
    // The idle timeout is 75 s: only the header timeout closes it this soon.
    assert!(
        closed_by(s, sent + Duration::from_secs(5)).await,
        "the half-sent second head is still open after 5 s"
    );
    assert!(sent.elapsed() >= Duration::from_millis(900));
    let after = herald
        .metric(r#"herald_connections_header_timeout_total{listener="public"}"#)
        .await;
    assert_eq!(after, before + 1.0);
}

/// Sends `request` on a new connection from 127.0.0.`octet` and reads until
/// `enough` holds for what came back or the connection closes (10 s at
/// most); what came back, and whether the server closed.
async fn exchange(
    addr: &str,
    octet: u8,
    request: &[u8],
    enough: impl Fn(&str) -> bool,
) -> (String, bool) {
    let mut s = connect_from(addr, octet).await;
    s.write_all(request).await.expect("request");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no answer: {}", String::from_utf8_lossy(&seen)))
            .expect("read");
        if n == 0 {
            return (String::from_utf8_lossy(&seen).to_string(), true);
        }
        seen.extend_from_slice(&buf[..n]);
        if enough(&String::from_utf8_lossy(&seen)) {
            return (String::from_utf8_lossy(&seen).to_string(), false);
        }
    }
}

#[tokio::test]
async fn a_stream_is_written_chunk_by_chunk_and_odd_stream_requests_are_still_answered() {
    let (_b, herald) = limited(&[]).await;
    herald.post_job("Chunked").await;
    let addr = public_addr(&herald);
    let has_snapshot = |s: &str| s.contains("event: snapshot") && s.contains("Chunked");

    // A plain connect: Herald's own path writes the head itself.
    let (answer, _) = exchange(
        &addr,
        61,
        b"GET /api/jobs/stream HTTP/1.1\r\nHost: herald\r\nAccept: text/event-stream\r\n\r\n",
        has_snapshot,
    )
    .await;
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    for line in [
        "content-type: text/event-stream",
        "transfer-encoding: chunked",
        "connection: close",
        "x-accel-buffering: no",
    ] {
        assert!(head.contains(line), "{line} missing from {head}");
    }
    assert!(head.contains("\r\ndate: "), "{head}");
    // The first chunk is the opening `retry:`, framed by its hex length.
    let (size, rest) = body.split_once("\r\n").expect("a chunk size");
    let size = usize::from_str_radix(size, 16).expect("hex chunk size");
    assert!(rest[..size].starts_with("retry: "), "{body}");
    assert_eq!(&rest[size..size + 2], "\r\n");

    // A filter the client got wrong: a problem, then the close.
    let long = "x".repeat(201);
    let (answer, closed) = exchange(
        &addr,
        62,
        format!("GET /api/jobs/stream?q={long} HTTP/1.1\r\nHost: herald\r\n\r\n").as_bytes(),
        |_| false,
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(answer.contains("content-type: application/problem+json"));
    assert!(answer.contains("at most 200 characters") && closed);

    // What Herald's own path leaves to hyper is still served: HTTP/1.0 (no
    // chunks), a stream asked for after another request on a kept-alive
    // connection, a head with a body.
    let (answer, _) = exchange(
        &addr,
        63,
        b"GET /api/jobs/stream HTTP/1.0\r\nHost: herald\r\n\r\n",
        has_snapshot,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
    assert!(!answer.contains("transfer-encoding"), "{answer}");
    let (answer, _) = exchange(
        &addr,
        64,
        b"GET /healthz HTTP/1.1\r\nHost: herald\r\n\r\n\
          GET /api/jobs/stream HTTP/1.1\r\nHost: herald\r\n\r\n",
        has_snapshot,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
    let (answer, _) = exchange(
        &addr,
        65,
        b"GET /api/jobs/stream HTTP/1.1\r\nHost: herald\r\nContent-Length: 2\r\n\r\nhi",
        has_snapshot,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
}
