//! Abuse limits: per-user token buckets on apply and charges, per-address
//! ones on dev login, answer 429 `rate_limited` with `Retry-After` and leave
//! every other client alone; many people behind one address (a NAT) are all
//! served; connections are capped and bounded in time (half-sent heads,
//! silent sockets); a client's open streams are capped (turned away with a
//! `retry:`, never a non-200); deep JSON and slow bodies are refused with a
//! clear 4xx; a proxy header is believed only from a proxy the operator
//! names (tests/herald/proxy.rs puts a real nginx in front).
//!
//! Other clients are other loopback addresses: the test's requests leave
//! from 127.0.0.2, 127.0.0.3, … (`local_address`), so the daemon sees
//! distinct peers without any header trickery.

use crate::support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::sse::SseClient;
use support::{eventually, user_token, Backend, Backing, Daemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub(crate) fn from(last_octet: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last_octet])
}

/// An HTTP client whose connections leave from 127.0.0.`last_octet`.
pub(crate) fn client_at(last_octet: u8) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(from(last_octet))
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// An embedded daemon with the per-client limits on and `extra` settings.
pub(crate) async fn limited(extra: &[(&str, &str)]) -> (Backing, Daemon) {
    let b = Backing::start(Backend::Sqlite).await;
    let mut settings = vec![("HERALD_LIMITS__PER_IP", "true")];
    settings.extend_from_slice(extra);
    let herald = b.daemon(&settings).await;
    (b, herald)
}

async fn post_as(
    http: &reqwest::Client,
    herald: &Daemon,
    path: &str,
    token: &str,
    key: &str,
    body: &Value,
) -> reqwest::Response {
    http.post(herald.url(path))
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .expect("POST")
}

/// Asserts a 429 problem with a whole-second `Retry-After`; returns it.
async fn assert_rate_limited(response: reqwest::Response) -> u64 {
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("429 carries Retry-After in whole seconds");
    assert!(
        (1..=1000).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = response.json().await.expect("problem body");
    assert_eq!(problem["code"], "rate_limited");
    assert_eq!(problem["status"], 429);
    retry_after
}

#[tokio::test]
async fn a_burst_of_applications_over_the_per_user_limit_gets_429_and_other_users_are_unaffected() {
    let (b, herald) = limited(&[
        ("HERALD_LIMITS__APPLY_PER_SEC", "0.5"),
        ("HERALD_LIMITS__APPLY_BURST", "5"),
    ])
    .await;
    let noisy = client_at(1);
    let quiet = client_at(2);

    // The noisy user's burst (five jobs): 5 go through, the 6th is refused.
    let mut jobs = Vec::new();
    for i in 0..6 {
        jobs.push(herald.post_job(&format!("Rate limited {i}")).await);
    }
    let noisy_token = user_token("noisy");
    for (i, job) in jobs.iter().take(5).enumerate() {
        let r = post_as(
            &noisy,
            &herald,
            "/api/applications",
            &noisy_token,
            &format!("k{i}"),
            &json!({ "job_id": job["id"] }),
        )
        .await;
        assert_eq!(r.status(), 201, "within the burst");
    }
    let body = json!({ "job_id": jobs[5]["id"] });
    let refused_token = noisy_token.clone();
    let r = post_as(
        &noisy,
        &herald,
        "/api/applications",
        &refused_token,
        "k5",
        &body,
    )
    .await;
    assert_rate_limited(r).await;
    // Over its bucket, a request without a valid token still learns that
    // first: 401, not "retry later".
    let r = post_as(
        &noisy,
        &herald,
        "/api/applications",
        "not-a-token",
        "k-bad-token",
        &body,
    )
    .await;
    assert_eq!(r.status(), 401, "authentication comes before the bucket");

    // Meanwhile other users have their own full buckets, on the same
    // address as the noisy one and on another.
    for i in 0..5 {
        let r = post_as(
            if i % 2 == 0 { &noisy } else { &quiet },
            &herald,
            "/api/applications",
            &user_token(&format!("quiet{i}")),
            &format!("q{i}"),
            &body,
        )
        .await;
        assert_eq!(
            r.status(),
            201,
            "another user is not limited by the noisy one"
        );
    }

    // The refused request left nothing behind: retried with the same key
    // once a token is back, it is created (not replayed, not 409).
    let started = Instant::now();
    let created = eventually(
        "the refused application to go through",
        Duration::from_secs(15),
        || {
            let (noisy, herald, token, body) = (&noisy, &herald, &refused_token, &body);
            async move {
                let r = post_as(noisy, herald, "/api/applications", token, "k5", body).await;
                match r.status().as_u16() {
                    429 => None,
                    status => Some((status, r.headers().contains_key("idempotent-replayed"))),
                }
            }
        },
    )
    .await;
    assert_eq!(created, (201, false), "after {:?}", started.elapsed());

    let db = b.db().await;
    assert_eq!(
        support::count(&db, "SELECT COUNT(*) FROM applications").await,
        11
    );
    assert!(
        herald
            .metric("herald_rate_limited_total{action=\"apply\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn charges_and_dev_logins_have_buckets_of_their_own() {
    let (_b, herald) = limited(&[
        ("HERALD_LIMITS__CHARGES_PER_SEC", "0.01"),
        ("HERALD_LIMITS__CHARGES_BURST", "3"),
        ("HERALD_LIMITS__DEV_LOGIN_PER_SEC", "0.01"),
        ("HERALD_LIMITS__DEV_LOGIN_BURST", "2"),
    ])
    .await;
    let here = client_at(1);
    let token = user_token("payer");
    let charge =
        |n: u32| json!({ "amount_cents": 100 + n, "currency": "EUR", "description": "Listing" });
    for n in 0..3 {
        let r = post_as(
            &here,
            &herald,
            "/api/charges",
            &token,
            &format!("c{n}"),
            &charge(n),
        )
        .await;
        assert_eq!(r.status(), 201);
    }
    let r = post_as(&here, &herald, "/api/charges", &token, "c3", &charge(3)).await;
    let retry_after = assert_rate_limited(r).await;
    // 0.01 tokens a second: the next one is about 100 s away.
    assert!(retry_after >= 60, "Retry-After {retry_after}");

    let login = |email: &str| {
        here.post(herald.url("/api/dev/login"))
            .json(&json!({ "email": email }))
            .send()
    };
    // Charges used up their bucket, not the dev-login one.
    for n in 0..2 {
        let r = login(&format!("dev{n}@example.com")).await.expect("login");
        assert_eq!(r.status(), 200);
    }
    assert_rate_limited(login("dev2@example.com").await.expect("login")).await;
    // Another client logs in and pays.
    let elsewhere = client_at(3);
    let r = elsewhere
        .post(herald.url("/api/dev/login"))
        .json(&json!({ "email": "other@example.com" }))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 200);
    let r = post_as(
        &elsewhere,
        &herald,
        "/api/charges",
        &user_token("other"),
        "o1",
        &charge(9),
    )
    .await;
    assert_eq!(r.status(), 201);
}

/// A stream from 127.0.0.`octet` that is served: the opening `retry:`,
/// then a snapshot.
pub(crate) async fn served_stream(url: &str, octet: u8) -> SseClient {
    let mut s = SseClient::connect_once_from(url, None, Some(from(octet))).await;
    s.next(Duration::from_secs(10))
        .await
        .expect("opening retry");
    let snapshot = s.next(Duration::from_secs(10)).await.expect("snapshot");
    assert_eq!(snapshot.event, "snapshot");
    s
}

/// A stream from 127.0.0.`octet` that is turned away: HTTP 200 (asserted by
/// the client) carrying only a `retry:` of at least a second, then closed.
async fn assert_turned_away(url: &str, octet: u8) {
    let mut s = SseClient::connect_once_from(url, None, Some(from(octet))).await;
    let only = s.next(Duration::from_secs(10)).await.expect("a retry");
    assert_eq!(only.event, "retry");
    assert!(only.retry.is_some_and(|ms| ms >= 1000));
    assert!(s.next(Duration::from_secs(10)).await.is_none());
    assert!(s.closed, "a turned-away stream is closed");
}

/// Waits (up to `within`) until a stream from 127.0.0.`octet` is served
/// again: the place a closed stream held has come back.
async fn place_comes_back(url: &str, octet: u8, within: Duration) {
    eventually("a freed stream place to be reused", within, || async move {
        let mut s = SseClient::connect_once_from(url, None, Some(from(octet))).await;
        s.next(Duration::from_secs(5)).await?;
        let next = s.next(Duration::from_secs(5)).await?;
        (next.event == "snapshot").then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_open_stream_limit_per_client_holds_and_a_closed_stream_gives_its_place_back() {
    let (_b, herald) = limited(&[
        ("HERALD_LIMITS__STREAMS_PER_IP", "3"),
        ("HERALD_SSE__HEARTBEAT_MS", "200"),
    ])
    .await;
    herald.post_job("Streamed").await;
    let url = herald.url("/api/jobs/stream");
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(served_stream(&url, 1).await);
    }
    // The fourth from the same client is turned away; another client is not.
    assert_turned_away(&url, 1).await;
    let _other = served_stream(&url, 2).await;

    // One of the three hangs up; its place comes back (the server notices
    // on its next heartbeat write).
    drop(open.pop());
    place_comes_back(&url, 1, Duration::from_secs(10)).await;
    assert!(
        herald
            .metric("herald_rate_limited_total{action=\"streams_open\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn stream_connects_over_the_per_client_rate_are_told_to_come_back_later() {
    let (_b, herald) = limited(&[
        ("HERALD_LIMITS__STREAM_CONNECTS_PER_SEC", "0.01"),
        ("HERALD_LIMITS__STREAM_CONNECT_BURST", "2"),
    ])
    .await;
    let url = herald.url("/api/jobs/stream");
    let _kept = [served_stream(&url, 1).await, served_stream(&url, 1).await];
    assert_turned_away(&url, 1).await;
    let _other = served_stream(&url, 4).await;
    assert!(
        herald
            .metric("herald_rate_limited_total{action=\"stream_connect\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn deeply_nested_json_is_refused_with_400_before_it_is_parsed() {
    let (_b, herald) = limited(&[("HERALD_LIMITS__JSON_MAX_DEPTH", "8")]).await;
    let token = user_token("nester");
    let nested =
        |depth: usize| format!("{{\"job_id\":{}1{}}}", "[".repeat(depth), "]".repeat(depth));
    for depth in [8, 30_000] {
        let r = herald
            .http
            .post(herald.url("/api/applications"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(nested(depth))
            .send()
            .await
            .expect("POST");
        assert_eq!(r.status(), 400, "depth {depth}");
        let problem: Value = r.json().await.expect("problem");
        assert_eq!(problem["code"], "invalid_body");
        assert!(
            problem["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("nested deeper than 8"),
            "{problem}"
        );
    }
    // Depth 7 (the object plus 6 arrays) reaches the parser, which refuses
    // the type, not the depth.
    let r = herald
        .http
        .post(herald.url("/api/applications"))
        .bearer_auth(&token)
        .body(nested(6))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 400);
    let problem: Value = r.json().await.expect("problem");
    assert!(
        !problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("nested"),
        "{problem}"
    );
}

#[tokio::test]
async fn a_body_that_arrives_too_slowly_gets_408_and_the_connection_is_closed() {
    let (b, herald) = limited(&[("HERALD_LIMITS__REQUEST_TIMEOUT_MS", "500")]).await;
    let address = herald
        .url("/")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let mut socket = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    let head = format!(
        "POST /api/applications HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"job_id\":",
        user_token("slow")
    );
    socket.write_all(head.as_bytes()).await.expect("write");
    // ... and nothing more. The daemon answers by itself.
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut answer))
        .await
        .expect("the daemon answers and closes within its timeout")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    let db = b.db().await;
    assert_eq!(
        support::count(&db, "SELECT COUNT(*) FROM applications").await,
        0
    );
    // The daemon is fine for everyone else.
    assert_eq!(herald.get("/api/jobs").await.status(), 200);
}

#[tokio::test]
async fn a_forwarded_for_header_is_believed_only_when_the_operator_names_it() {
    let body = |job: &Value| json!({ "job_id": job["id"] });
    let spoofer = client_at(1);
    let send = |herald: &Daemon, user: &str, forwarded: &str, job: &Value| {
        spoofer
            .post(herald.url("/api/applications"))
            .bearer_auth(user_token(user))
            .header("x-forwarded-for", forwarded)
            .json(&body(job))
            .send()
    };

    // Off by default: a client cannot escape its bucket by claiming to be
    // somebody else.
    // (The address's ceiling is what a proxy header decides; each request
    // is another user, so only that ceiling applies.)
    let (_b, direct) = limited(&[
        ("HERALD_LIMITS__AUTHENTICATED_PER_IP_PER_SEC", "0.01"),
        ("HERALD_LIMITS__AUTHENTICATED_PER_IP_BURST", "2"),
    ])
    .await;
    let job = direct.post_job("Direct").await;
    for (i, forwarded) in ["198.51.100.1", "198.51.100.2"].iter().enumerate() {
        let r = send(&direct, &format!("d{i}"), forwarded, &job)
            .await
            .expect("POST");
        assert_eq!(r.status(), 201);
    }
    assert_rate_limited(
        send(&direct, "d2", "198.51.100.3", &job)
            .await
            .expect("POST"),
    )
    .await;

    // Behind the operator's proxy (127.0.0.1, where `spoofer` sends from):
    // the header's last address is the client.
    let (_b2, proxied) = limited(&[
        ("HERALD_LIMITS__AUTHENTICATED_PER_IP_PER_SEC", "0.01"),
        ("HERALD_LIMITS__AUTHENTICATED_PER_IP_BURST", "2"),
        ("HERALD_LIMITS__TRUSTED_PROXY_HEADER", "X-Forwarded-For"),
        ("HERALD_LIMITS__TRUSTED_PROXIES", "127.0.0.1"),
    ])
    .await;
    let job = proxied.post_job("Proxied").await;
    for i in 0..2 {
        let r = send(&proxied, &format!("p{i}"), "10.9.9.9, 203.0.113.7", &job)
            .await
            .expect("POST");
        assert_eq!(r.status(), 201);
    }
    assert_rate_limited(
        send(&proxied, "p2", "10.9.9.9, 203.0.113.7", &job)
            .await
            .expect("POST"),
    )
    .await;
    // A claimed first hop does not matter; another real client does.
    let r = send(&proxied, "p3", "203.0.113.7, 203.0.113.8", &job)
        .await
        .expect("POST");
    assert_eq!(
        r.status(),
        201,
        "another client behind the proxy has its own bucket"
    );
    // The same header from a peer that is not a trusted proxy is ignored:
    // that peer is one client, whatever it claims.
    let outsider = client_at(2);
    for (i, forwarded) in ["198.51.100.21", "198.51.100.22", "198.51.100.23"]
        .iter()
        .enumerate()
    {
        let r = outsider
            .post(proxied.url("/api/applications"))
            .bearer_auth(user_token(&format!("o{i}")))
            .header("x-forwarded-for", *forwarded)
            .json(&body(&job))
            .send()
            .await
            .expect("POST");
        if i < 2 {
            assert_eq!(r.status(), 201);
        } else {
            assert_rate_limited(r).await;
        }
    }
}

#[tokio::test]
async fn a_hundred_and_twenty_people_behind_one_address_all_apply_at_the_first_attempt() {
    // The defaults, limits on: a campus NAT is one address.
    let (b, herald) = limited(&[]).await;
    let job = herald.post_job("Campus job").await;
    let nat = client_at(7);
    let body = json!({ "job_id": job["id"] });
    let started = Instant::now();
    let statuses: Vec<u16> = futures::future::join_all((0..120).map(|i| {
        let (nat, herald, body) = (&nat, &herald, &body);
        async move {
            let token = user_token(&format!("student{i}"));
            post_as(
                nat,
                herald,
                "/api/applications",
                &token,
                &format!("s{i}"),
                body,
            )
            .await
            .status()
            .as_u16()
        }
    }))
    .await;
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    let refused = statuses.iter().filter(|s| **s != 201).count();
    assert_eq!(refused, 0, "statuses: {statuses:?}");
    let db = b.db().await;
    assert_eq!(
        support::count(&db, "SELECT COUNT(*) FROM applications").await,
        120
    );
}

/// Opens a TCP connection to `addr` from 127.0.0.`octet`.
pub(crate) async fn connect_from(addr: &str, octet: u8) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::new(from(octet), 0))
        .expect("bind");
    socket
        .connect(addr.parse().expect("address"))
        .await
        .expect("connect")
}

/// Reads `stream` until the server closes it; false if it is still open at
/// `deadline`.
pub(crate) async fn closed_by(mut stream: tokio::net::TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// The public listener's `host:port`.
pub(crate) fn public_addr(herald: &Daemon) -> String {
    herald
        .public
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

#[tokio::test]
async fn half_sent_heads_and_silent_connections_neither_delay_others_nor_stay_open() {
    let (_b, herald) = limited(&[]).await;
    let addr = public_addr(&herald);
    let started = Instant::now();
    let mut held = Vec::new();
    // 300 connections that send half a request head and stop …
    for i in 0..300 {
        let mut s = connect_from(&addr, 10 + (i % 50) as u8).await;
        s.write_all(b"GET /api/jobs HTTP/1.1\r\nHost: herald\r\nX-Slow: ")
            .await
            .expect("write");
        held.push(s);
    }
    // … and 100 that send nothing at all.
    for i in 0..100 {
        held.push(connect_from(&addr, 60 + (i % 50) as u8).await);
    }
    // A new client is served at once.
    let asked = Instant::now();
    let r = client_at(200)
        .get(herald.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(r.status(), 200);
    let waited = asked.elapsed();
    // Were the stalled connections in its way, it would wait out their
    // 10 s header timeout; 5 s leaves room for a loaded CI machine.
    assert!(waited < Duration::from_secs(5), "healthz took {waited:?}");
    // Every one of the 400 is closed by the server within 40 s.
    let deadline = started + Duration::from_secs(40);
    let closed = futures::future::join_all(held.into_iter().map(|s| closed_by(s, deadline))).await;
    let still_open = closed.iter().filter(|c| !**c).count();
    assert_eq!(
        still_open, 0,
        "{still_open} of 400 connections still open after 40 s"
    );
    println!(
        "400 stalled connections closed within {:?}; healthz answered in {waited:?}",
        started.elapsed()
    );
    // Counted before the socket closes, so one read after the last close sees all.
    let timed_out = herald
        .metric("herald_connections_header_timeout_total{listener=\"public\"}")
        .await;
    assert!(timed_out >= 400.0, "{timed_out} header timeouts counted");
}

#[tokio::test]
async fn past_the_connection_caps_new_connections_are_refused_at_once_and_counted() {
    let (_b, herald) = limited(&[
        // A fifth of 50 is 10: per_ip is the cap that binds.
        ("HERALD_CONNECTIONS__MAX", "50"),
        ("HERALD_CONNECTIONS__PER_IP", "10"),
        ("HERALD_CONNECTIONS__HEADER_READ_TIMEOUT_MS", "60000"),
    ])
    .await;
    let addr = public_addr(&herald);
    // One address holds its 10; the 11th from it is refused, another
    // address is still served.
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(connect_from(&addr, 21).await);
    }
    let refused_at = Instant::now();
    let mut eleventh = connect_from(&addr, 21).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), eleventh.read_to_end(&mut answer))
        .await
        .expect("refused at once, not queued");
    assert!(refused_at.elapsed() < Duration::from_secs(2));
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let r = client_at(22)
        .get(herald.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(r.status(), 200);
    // Fill the listener to its global cap from many addresses: refused too.
    for i in 0..40 {
        held.push(connect_from(&addr, 30 + i).await);
    }
    let refused_at = Instant::now();
    let mut over = connect_from(&addr, 99).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), over.read_to_end(&mut answer))
        .await
        .expect("refused at once, not queued");
    assert!(refused_at.elapsed() < Duration::from_secs(2));
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 503"));
    assert!(
        herald
            .metric("herald_connections_refused_total{listener=\"public\",reason=\"per_ip\"}")
            .await
            >= 1.0
    );
    assert!(
        herald
            .metric("herald_connections_refused_total{listener=\"public\",reason=\"max\"}")
            .await
            >= 1.0
    );
    // Places come back when connections close.
    drop(held);
    let served = eventually(
        "a connection to be served again",
        Duration::from_secs(10),
        || {
            let herald = &herald;
            async move {
                let r = client_at(99)
                    .get(herald.url("/healthz"))
                    .send()
                    .await
                    .ok()?;
                (r.status() == 200).then_some(())
            }
        },
    )
    .await;
    assert_eq!(served, ());
}

#[tokio::test]
async fn a_stream_client_that_hangs_up_gives_its_place_back_before_anything_is_written_to_it() {
    // One stream per client, and no heartbeat for a minute: only the
    // client's close can tell Herald that the first stream is gone.
    let (_b, herald) = limited(&[
        ("HERALD_LIMITS__STREAMS_PER_IP", "1"),
        ("HERALD_SSE__HEARTBEAT_MS", "60000"),
    ])
    .await;
    herald.post_job("Quiet").await;
    let url = herald.url("/api/jobs/stream");
    let first = served_stream(&url, 9).await;
    assert_turned_away(&url, 9).await;
    let hung_up = Instant::now();
    drop(first);
    place_comes_back(&url, 9, Duration::from_secs(5)).await;
    println!(
        "a hung-up stream's place came back after {:?}",
        hung_up.elapsed()
    );
}
