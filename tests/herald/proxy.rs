//! Herald behind a real reverse proxy: Debian's nginx, configured with
//! docs/DEPLOY.md's own block ([`support::nginx`]), in front of a daemon
//! that trusts it (`limits.trusted_proxies = 127.0.0.1`). Clients are other
//! loopback addresses (127.0.0.x), so nginx appends a distinct address for
//! each, and a client reaching Herald directly from 127.0.0.x is a peer
//! outside the trusted list.

use crate::abuse::client_at;
use crate::support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::nginx::Nginx;
use support::sse::SseClient;
use support::{Backend, Backing, Daemon};

/// Herald with the per-client limits on and nginx (127.0.0.1) trusted, and
/// the nginx in front of it.
async fn behind_nginx(extra: &[(&str, &str)]) -> (Backing, Daemon, Nginx) {
    let b = Backing::start(Backend::Sqlite).await;
    let mut settings = vec![
        ("HERALD_LIMITS__PER_IP", "true"),
        ("HERALD_LIMITS__TRUSTED_PROXY_HEADER", "X-Forwarded-For"),
        ("HERALD_LIMITS__TRUSTED_PROXIES", "127.0.0.1"),
    ];
    settings.extend_from_slice(extra);
    let herald = b.daemon(&settings).await;
    let upstream = herald
        .url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let nginx = Nginx::start_in_front_of(&upstream).await;
    (b, herald, nginx)
}

/// `n` dev logins by `client` at `url` (Herald's or nginx's), each with
/// `forwarded` as its own `X-Forwarded-For` if given: how many got 200
/// and how many 429.
async fn dev_logins(
    client: &reqwest::Client,
    url: &str,
    n: usize,
    forwarded: impl Fn(usize) -> Option<String>,
) -> (usize, usize) {
    let (mut ok, mut limited) = (0, 0);
    for i in 0..n {
        let mut request = client
            .post(format!("{url}/api/dev/login"))
            .json(&json!({ "email": format!("p{i}@example.com") }));
        if let Some(value) = forwarded(i) {
            request = request.header("x-forwarded-for", value);
        }
        match request.send().await.expect("dev login").status().as_u16() {
            200 => ok += 1,
            429 => limited += 1,
            other => panic!("a dev login answered {other}"),
        }
    }
    (ok, limited)
}

#[tokio::test]
async fn behind_nginx_each_client_is_itself_and_nobody_can_pick_an_address() {
    // The defaults: a dev-login burst of 10 per client.
    let (_b, herald, nginx) = behind_nginx(&[]).await;
    let proxy = nginx.url("");
    let direct = herald.url("");
    let direct = direct.trim_end_matches('/');

    // 40 clients through nginx, 2 logins each: 40 buckets, all served (one
    // shared bucket would have refused 70 of the 80).
    let served = futures::future::join_all((0..40u8).map(|i| {
        let proxy = proxy.clone();
        async move { dev_logins(&client_at(100 + i), &proxy, 2, |_| None).await }
    }))
    .await;
    let ok: usize = served.iter().map(|(ok, _)| ok).sum();
    assert_eq!(ok, 80, "every one of 40 clients has a bucket of its own");

    // A client forging the left-hand entries through nginx, a new address
    // each time: counted by the entry nginx appended, so its burst of 10.
    let (ok, limited) = dev_logins(&client_at(150), &proxy, 30, |i| {
        Some(format!("203.0.113.{}", i + 1))
    })
    .await;
    assert_eq!(
        (ok, limited),
        (10, 20),
        "rotating forged entries through nginx"
    );

    // A peer outside trusted_proxies, straight to Herald's port: counted by
    // its own address whatever the header says, rotating …
    let (ok, limited) = dev_logins(&client_at(152), direct, 30, |i| {
        Some(format!("198.51.100.{}", i + 1))
    })
    .await;
    assert_eq!(
        (ok, limited),
        (10, 20),
        "rotating header from an untrusted peer"
    );
    // … or naming an innocent client (127.0.0.151), through nginx or not.
    let innocent = "127.0.0.151".to_string();
    let (ok, _) = dev_logins(&client_at(153), direct, 15, |_| Some(innocent.clone())).await;
    assert_eq!(ok, 10);
    let (ok, _) = dev_logins(&client_at(154), &proxy, 15, |_| Some(innocent.clone())).await;
    assert_eq!(ok, 10);
    let (ok, limited) = dev_logins(&client_at(151), &proxy, 10, |_| None).await;
    assert_eq!(
        (ok, limited),
        (10, 0),
        "the innocent client keeps its whole bucket"
    );

    // The request log names the client each request was counted as.
    let log = herald.log();
    for client in ["127.0.0.100", "127.0.0.139", "127.0.0.150", "127.0.0.152"] {
        assert!(
            log.contains(&format!("client={client}"))
                || log.contains(&format!("\"client\":\"{client}\"")),
            "the request log shows client {client}"
        );
    }
}

#[tokio::test]
async fn the_page_and_the_stream_work_through_nginx_unbuffered() {
    let (_b, herald, nginx) = behind_nginx(&[]).await;
    let page = client_at(120)
        .get(nginx.url("/"))
        .send()
        .await
        .expect("page");
    assert_eq!(page.status(), 200);
    assert!(page.text().await.expect("html").contains("<html"));

    let mut stream = SseClient::connect(&nginx.url("/api/jobs/stream"), None).await;
    for n in 0..3 {
        let title = format!("Proxied {n}");
        let posted = Instant::now();
        herald.post_job(&title).await;
        let event = loop {
            let event = stream
                .next(Duration::from_secs(5))
                .await
                .expect("an event through nginx");
            if event.data.contains(&title) {
                break event;
            }
        };
        let took = posted.elapsed();
        assert_eq!(event.event, "job.posted");
        assert!(
            took < Duration::from_secs(1),
            "an event crossed nginx in {took:?}: buffered?"
        );
    }
}

#[tokio::test]
async fn behind_nginx_a_connection_counts_against_the_client_its_request_names() {
    // A fifth of the default 16384 is far above 4: per_ip is the cap here.
    let (_b, _herald, nginx) = behind_nginx(&[("HERALD_CONNECTIONS__PER_IP", "4")]).await;
    let url = nginx.url("/api/jobs/stream");
    // One client holds 4 streams: 4 connections from nginx, each naming it.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = SseClient::connect_once_from(&url, None, Some(crate::abuse::from(160))).await;
        s.next(Duration::from_secs(5)).await.expect("opening retry");
        let snapshot = s.next(Duration::from_secs(5)).await.expect("snapshot");
        assert_eq!(snapshot.event, "snapshot");
        held.push(s);
    }
    // Its fifth is refused, though all come from nginx's one address …
    let fifth = client_at(160).get(&url).send().await.expect("fifth");
    assert_eq!(fifth.status(), 503);
    // … and another client behind the same nginx is served.
    let mut other = SseClient::connect_once_from(&url, None, Some(crate::abuse::from(161))).await;
    other
        .next(Duration::from_secs(5))
        .await
        .expect("opening retry");
    assert_eq!(
        other
            .next(Duration::from_secs(5))
            .await
            .expect("snapshot")
            .event,
        "snapshot"
    );
}
