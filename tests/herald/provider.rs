//! The seam to the email provider, tested with a provider that misbehaves
//! the way real ones do: replies that name no email, an absurd `retry-after`,
//! webhooks that are forged, stale, repeated, late or about mail Herald
//! never sent; and what follows a bounce or a complaint (suppression).
//! Counts are read where effects land: the fake Resend, the database, the
//! API's answers and `/metrics`.

use crate::support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};
use support::fake_resend::{Lie, Mode};
use support::resend_webhooks::{
    event_body, now_secs, signature_header, OTHER_SECRET, WEBHOOK_SECRET,
};
use support::{count, eventually, user_token, Backend, Daemon, Stack, ADMIN_TOKEN};

/// Fast retries (a lie is retried within a second), many attempts.
const FAST: [(&str, &str); 4] = [
    ("HERALD_RETRY__BASE_MS", "100"),
    ("HERALD_RETRY__CAP_MS", "500"),
    ("HERALD_RELAY__REDELIVER_AFTER_SECS", "2"),
    ("HERALD_RELAY__POLL_INTERVAL_MS", "200"),
];

fn settings(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut all = FAST.to_vec();
    all.extend_from_slice(extra);
    all
}

fn address(user: &str) -> String {
    format!("{user}@example.com")
}

/// Applies as `user` to `job` under a key of its own; the application's id.
async fn apply(herald: &Daemon, user: &str, job: &Value) -> String {
    let key = format!("apply-{user}-{}", job["id"].as_str().unwrap_or_default());
    let r = herald
        .apply(
            &user_token(user),
            Some(&key),
            &json!({ "job_id": job["id"] }),
        )
        .await;
    assert_eq!(r.status(), 201, "apply as {user}");
    let body: Value = r.json().await.expect("json");
    body["id"].as_str().expect("id").to_string()
}

/// The application's `email_status` as its user sees it.
async fn status(herald: &Daemon, user: &str, application: &str) -> String {
    let r = herald
        .http
        .get(herald.url(&format!("/api/applications/{application}")))
        .bearer_auth(user_token(user))
        .send()
        .await
        .expect("get application");
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    body["email_status"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn wait_status(herald: &Daemon, user: &str, application: &str, want: &str) {
    eventually(
        &format!("{user}'s email {want}"),
        Duration::from_secs(30),
        || async { (status(herald, user, application).await == want).then_some(()) },
    )
    .await;
}

async fn admin(herald: &Daemon, method: reqwest::Method, path: &str) -> (u16, Value) {
    let r = herald
        .http
        .request(method, herald.admin_url(path))
        .bearer_auth(ADMIN_TOKEN)
        .header("x-herald-actor", "postmaster")
        .send()
        .await
        .expect("admin request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The provider's id Herald keeps for `application`.
async fn kept_email_id(s: &Stack, application: &str) -> Option<String> {
    sqlx::query_scalar("SELECT email_id FROM applications WHERE CAST(id AS TEXT) = $1")
        .bind(application)
        .fetch_one(&s.db)
        .await
        .expect("email_id")
}

// ---------------------------------------------------------------------------
// Replies are checked.
// ---------------------------------------------------------------------------

/// For each way a success can fail to name its emails: applications made
/// while the provider answers so are never shown `sent` (nor given an id);
/// once it answers properly, each is mailed exactly once, under the key its
/// batch lied under, and shown `sent` with the id the provider named.
async fn a_success_that_names_no_email_is_never_recorded_sent(backend: Backend) {
    let s = Stack::start_on(backend, &settings(&[("HERALD_RETRY__MAX_ATTEMPTS", "100")])).await;
    let job = s.herald.post_job("Lying provider").await;
    for lie in Lie::ALL {
        let phase_start = s.resend.calls().len();
        s.resend.set_mode(Mode::Lie(lie));
        let users: Vec<String> = (0..3)
            .map(|i| format!("{lie:?}-{i}").to_lowercase())
            .collect();
        let mut applications = Vec::new();
        for user in &users {
            applications.push(apply(&s.herald, user, &job).await);
        }
        // The batches were answered with the lie, and retried under it.
        eventually(
            &format!("{lie:?}: three lying replies"),
            Duration::from_secs(30),
            || async {
                let lies = s.resend.calls()[phase_start..]
                    .iter()
                    .filter(|c| c.lied)
                    .count();
                (lies >= 3).then_some(())
            },
        )
        .await;
        for (user, application) in users.iter().zip(&applications) {
            assert_eq!(
                status(&s.herald, user, application).await,
                "pending",
                "{lie:?}: {user}'s email is not sent"
            );
            assert_eq!(kept_email_id(&s, application).await, None);
            assert_eq!(s.resend.sent_to(&address(user)), 0);
        }
        let lying_keys: HashSet<String> = s.resend.calls()[phase_start..]
            .iter()
            .filter(|c| c.lied)
            .filter_map(|c| c.key.clone())
            .collect();
        let honest_from = s.resend.calls().len();
        s.resend.set_mode(Mode::Normal);
        for (user, application) in users.iter().zip(&applications) {
            wait_status(&s.herald, user, application, "sent").await;
            assert_eq!(
                kept_email_id(&s, application).await,
                s.resend.email_id_of(&address(user)),
                "{lie:?}: the id the provider named is kept"
            );
        }
        let honest = s.resend.calls()[honest_from..].to_vec();
        assert!(!honest.is_empty());
        for call in &honest {
            assert!(
                call.key.as_ref().is_some_and(|k| lying_keys.contains(k)),
                "{lie:?}: a batch is sent again under the key it lied under: {call:?} / {lying_keys:?}"
            );
        }
    }
    s.wait_until_settled(Duration::from_secs(30)).await;
    for lie in Lie::ALL {
        for i in 0..3 {
            let to = address(&format!("{lie:?}-{i}").to_lowercase());
            assert_eq!(s.resend.sent_to(&to), 1, "{to}: exactly one email");
        }
    }
    assert_eq!(s.resend.sent().len(), 12);
}

/// A provider that never names its emails: the batch is retried under one
/// key until the attempts run out, then each member is a dead letter
/// `provider_reply_invalid`, `dead` to its user, and nothing was sent.
async fn a_provider_that_never_names_its_emails_ends_in_dead_letters(backend: Backend) {
    let s = Stack::start_on(backend, &settings(&[("HERALD_RETRY__MAX_ATTEMPTS", "3")])).await;
    let job = s.herald.post_job("Never honest").await;
    s.resend.set_mode(Mode::Lie(Lie::NoIds));
    let users = ["nell", "nemo"];
    let mut applications = Vec::new();
    for user in users {
        applications.push(apply(&s.herald, user, &job).await);
    }
    for (user, application) in users.iter().zip(&applications) {
        wait_status(&s.herald, user, application, "dead").await;
    }
    let (code, letters) = admin(&s.herald, reqwest::Method::GET, "/admin/dlq").await;
    assert_eq!(code, 200);
    let items = letters["items"].as_array().expect("items");
    assert_eq!(items.len(), 2, "{letters}");
    for letter in items {
        let error = letter["last_error"].as_str().unwrap_or_default();
        assert!(error.starts_with("provider_reply_invalid"), "{letter}");
    }
    assert!(s.resend.sent().is_empty(), "nothing was sent");
    // Every batch went out exactly max_attempts times, all under its one key.
    let calls = s.resend.calls();
    let keys: HashSet<&str> = calls.iter().filter_map(|c| c.key.as_deref()).collect();
    for key in &keys {
        let sends = calls
            .iter()
            .filter(|c| c.key.as_deref() == Some(key))
            .count();
        assert_eq!(sends, 3, "batch {key}: {calls:?}");
    }
    assert!(calls.iter().all(|c| c.lied));
}

// ---------------------------------------------------------------------------
// Delays are bounded.
// ---------------------------------------------------------------------------

/// A 429 asking for 2^64-1 seconds, by `retry-after` and then by
/// `ratelimit-reset`: the process keeps running and ready, the sender is
/// never restarted, and the email goes out after `retry.max_delay_ms`.
async fn an_absurd_retry_header_waits_max_delay_and_stops_nothing(backend: Backend) {
    let max_delay = Duration::from_millis(1500);
    let s = Stack::start_on(
        backend,
        &settings(&[("HERALD_RETRY__MAX_DELAY_MS", "1500")]),
    )
    .await;
    let job = s.herald.post_job("Absurd headers").await;
    let absurd = u64::MAX.to_string();
    for (user, retry_after, reset) in [
        ("rita", Some(absurd.clone()), None),
        ("reese", None, Some(absurd.clone())),
    ] {
        let from = s.resend.calls().len();
        s.resend.set_mode(Mode::RateLimitedBy {
            n: 1,
            retry_after,
            ratelimit_reset: reset,
        });
        let application = apply(&s.herald, user, &job).await;
        wait_status(&s.herald, user, &application, "sent").await;
        let calls = s.resend.calls()[from..].to_vec();
        assert_eq!(calls.len(), 2, "{user}: a 429, then the send: {calls:?}");
        assert_eq!((calls[0].status, calls[1].status), (429, 200));
        let gap = calls[1].at.duration_since(calls[0].at);
        assert!(
            gap >= max_delay - Duration::from_millis(100),
            "{user}: the header was honoured up to the cap: {gap:?}"
        );
        assert!(
            gap < max_delay + Duration::from_secs(5),
            "{user}: and no further: {gap:?}"
        );
        assert_eq!(s.resend.sent_to(&address(user)), 1);
    }
    let ready = s.herald.get("/readyz").await;
    assert_eq!(ready.status(), 200, "still ready");
    let (restarts, running) = s.herald.actor_status("email_sender").await;
    assert_eq!((restarts, running), (0, true), "the sender never died");
}

// ---------------------------------------------------------------------------
// Webhooks.
// ---------------------------------------------------------------------------

/// Posts a webhook body to Herald with the given headers, as a forger (or a
/// stale sender) would; the status.
async fn post_webhook(herald: &Daemon, body: &[u8], headers: &[(&str, String)]) -> u16 {
    let mut request = herald
        .http
        .post(herald.url("/webhooks/resend"))
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    request
        .send()
        .await
        .expect("post webhook")
        .status()
        .as_u16()
}

/// Svix headers for `body` signed by `secrets` at `timestamp`.
fn signed(id: &str, timestamp: i64, secrets: &[&str], body: &[u8]) -> Vec<(&'static str, String)> {
    vec![
        ("svix-id", id.to_string()),
        ("svix-timestamp", timestamp.to_string()),
        (
            "svix-signature",
            signature_header(secrets, id, timestamp, body),
        ),
    ]
}

async fn wait_webhook_answered(s: &Stack, id: &str) {
    eventually(
        &format!("webhook {id} answered 2xx"),
        Duration::from_secs(30),
        || async {
            s.resend
                .messages()
                .iter()
                .any(|m| m.id == id && m.delivered)
                .then_some(())
        },
    )
    .await;
}

async fn webhook_events(s: &Stack, kind: &str, outcome: &str) -> f64 {
    s.herald
        .metric(&format!(
            r#"herald_webhook_events_total{{type="{kind}",outcome="{outcome}"}}"#
        ))
        .await
}

/// Delivered, bounced and complained move an email's status; a late
/// `delivered` does not undo a bounce; a redelivery and an unknown email are
/// 2xx and change nothing; a forged signature, missing headers and a
/// timestamp 10 minutes old are 401 and change nothing; a rotated secret
/// (two signatures, one good) is accepted.
async fn webhooks_move_the_status_and_forgeries_change_nothing(backend: Backend) {
    let s = Stack::start_on(backend, &settings(&[])).await;
    let job = s.herald.post_job("Webhooks").await;
    let users = ["dora", "bert", "cora", "rosa"];
    let mut apps = Vec::new();
    for user in users {
        let application = apply(&s.herald, user, &job).await;
        wait_status(&s.herald, user, &application, "sent").await;
        apps.push(application);
    }
    let id = |user: &str| s.resend.email_id_of(&address(user)).expect("sent");

    let delivered = s.resend.emit("email.delivered", &id("dora"), json!({}));
    let bounced = s.resend.emit(
        "email.bounced",
        &id("bert"),
        json!({ "bounce": { "type": "Permanent", "subType": "General",
                             "message": "550 5.1.1 user unknown" } }),
    );
    let complained = s.resend.emit("email.complained", &id("cora"), json!({}));
    for message in [&delivered, &bounced, &complained] {
        wait_webhook_answered(&s, message).await;
    }
    assert_eq!(status(&s.herald, "dora", &apps[0]).await, "delivered");
    assert_eq!(status(&s.herald, "bert", &apps[1]).await, "bounced");
    assert_eq!(status(&s.herald, "cora", &apps[2]).await, "complained");
    assert_eq!(status(&s.herald, "rosa", &apps[3]).await, "sent");

    // Late and out of order: a `delivered` after the bounce keeps `bounced`;
    // a `delivery_delayed` keeps `delivered`.
    let late = s.resend.emit("email.delivered", &id("bert"), json!({}));
    let delayed = s
        .resend
        .emit("email.delivery_delayed", &id("dora"), json!({}));
    wait_webhook_answered(&s, &late).await;
    wait_webhook_answered(&s, &delayed).await;
    assert_eq!(status(&s.herald, "bert", &apps[1]).await, "bounced");
    assert_eq!(status(&s.herald, "dora", &apps[0]).await, "delivered");
    assert_eq!(
        webhook_events(&s, "email.delivered", "unchanged").await,
        1.0
    );

    // A redelivery of the complaint: 2xx, nothing more recorded.
    let events_before = count(&s.db, "SELECT count(*) FROM provider_events").await;
    s.resend.redeliver(&complained);
    eventually(
        "the redelivery answered",
        Duration::from_secs(30),
        || async {
            (s.resend
                .messages()
                .iter()
                .filter(|m| m.id == complained && m.delivered)
                .count()
                == 2)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        webhook_events(&s, "email.complained", "duplicate").await,
        1.0
    );
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM provider_events").await,
        events_before
    );

    // An email Herald never sent: 2xx and counted.
    let stranger = s.resend.emit(
        "email.bounced",
        "not-ours-0001",
        json!({ "bounce": { "type": "Permanent" } }),
    );
    wait_webhook_answered(&s, &stranger).await;
    assert_eq!(
        webhook_events(&s, "email.bounced", "unknown_email").await,
        1.0
    );

    // Forgeries and stale copies: 401, and rosa's email stays `sent`.
    let rosa = id("rosa");
    let body = event_body(
        "email.bounced",
        &rosa,
        &address("rosa"),
        json!({ "bounce": { "type": "Permanent" } }),
    );
    let now = now_secs();
    let forged = signed("msg_forged", now, &[OTHER_SECRET], &body);
    assert_eq!(
        post_webhook(&s.herald, &body, &forged).await,
        401,
        "wrong secret"
    );
    let mut tampered = signed("msg_tampered", now, &[WEBHOOK_SECRET], &body);
    let other_body = event_body("email.complained", &rosa, &address("rosa"), json!({}));
    tampered[2].1 = signature_header(&[WEBHOOK_SECRET], "msg_tampered", now, &other_body);
    assert_eq!(
        post_webhook(&s.herald, &body, &tampered).await,
        401,
        "another body's signature"
    );
    let unsigned: Vec<(&str, String)> = signed("msg_unsigned", now, &[WEBHOOK_SECRET], &body)
        .into_iter()
        .filter(|(name, _)| *name != "svix-signature")
        .collect();
    assert_eq!(
        post_webhook(&s.herald, &body, &unsigned).await,
        401,
        "no signature"
    );
    assert_eq!(post_webhook(&s.herald, &body, &[]).await, 401, "no headers");
    let stale = signed("msg_stale", now - 600, &[WEBHOOK_SECRET], &body);
    assert_eq!(
        post_webhook(&s.herald, &body, &stale).await,
        401,
        "10 minutes old"
    );
    assert_eq!(status(&s.herald, "rosa", &apps[3]).await, "sent");
    assert_eq!(webhook_events(&s, "unverified", "rejected").await, 5.0);
    let (_, listed) = admin(
        &s.herald,
        reqwest::Method::GET,
        "/admin/suppressions?email=rosa@example.com",
    )
    .await;
    assert_eq!(
        listed["items"],
        json!([]),
        "a forged bounce suppresses nothing"
    );

    // A secret being rotated: two signatures, the old (unknown here) first.
    s.resend.sign_with(&[OTHER_SECRET, WEBHOOK_SECRET]);
    let rotated = s.resend.emit("email.delivered", &rosa, json!({}));
    wait_webhook_answered(&s, &rotated).await;
    assert_eq!(status(&s.herald, "rosa", &apps[3]).await, "delivered");
    let attempts: Vec<u16> = s
        .resend
        .messages()
        .iter()
        .find(|m| m.id == rotated)
        .map(|m| m.attempts.clone())
        .unwrap_or_default();
    assert_eq!(attempts, [200], "accepted at the first attempt");
}

/// Resend retries a webhook Herald could not take (here: Herald down), and
/// the retry lands once Herald is back; nothing is lost in between.
async fn a_webhook_refused_while_herald_is_down_lands_on_a_retry(backend: Backend) {
    let mut s = Stack::start_on(backend, &settings(&[])).await;
    s.herald.keep_ports();
    let job = s.herald.post_job("Retried webhook").await;
    let application = apply(&s.herald, "wendy", &job).await;
    wait_status(&s.herald, "wendy", &application, "sent").await;
    s.herald.kill();
    let id = s.resend.email_id_of(&address("wendy")).expect("sent");
    let message = s.resend.emit("email.delivered", &id, json!({}));
    eventually("a refused attempt", Duration::from_secs(10), || async {
        s.resend
            .messages()
            .iter()
            .any(|m| m.id == message && !m.attempts.is_empty())
            .then_some(())
    })
    .await;
    s.herald.restart().await;
    wait_webhook_answered(&s, &message).await;
    wait_status(&s.herald, "wendy", &application, "delivered").await;
    let attempts = s
        .resend
        .messages()
        .into_iter()
        .find(|m| m.id == message)
        .map(|m| m.attempts)
        .unwrap_or_default();
    assert!(attempts.len() >= 2 && attempts[0] != 200, "{attempts:?}");
}

/// A report can outrun the record of the send it is about: here a crash
/// falls between the provider's acceptance and Herald's commit, and the
/// restarted Herald cannot resend at once (the provider is down for sends),
/// so the provider's retried report lands first. It waits as
/// `unknown_email`, and the send's record, when the same batch finally goes
/// under its key, applies it.
async fn a_report_that_outruns_the_send_s_record_is_applied_with_it(backend: Backend) {
    let mut s = Stack::start_on(backend, &settings(&[("HERALD_RETRY__MAX_ATTEMPTS", "100")])).await;
    s.herald.keep_ports();
    s.resend.auto_deliver(true);
    let job = s.herald.post_job("Early report").await;
    s.herald
        .set_env("FAILPOINTS", Some("batch-after-send=1*return"));
    s.herald.restart().await;
    let application = apply(&s.herald, "early", &job).await;
    let exit = s.herald.wait_for_exit(Duration::from_secs(20)).await;
    assert!(
        !exit.success(),
        "the failpoint aborted the daemon after the send"
    );
    assert_eq!(
        s.resend.sent_to(&address("early")),
        1,
        "accepted before the crash"
    );
    assert_eq!(kept_email_id(&s, &application).await, None, "not recorded");

    s.resend.set_mode(Mode::Down(503));
    s.herald.set_env("FAILPOINTS", None);
    s.herald.restart().await;
    eventually(
        "the retried report lands before the send is recorded",
        Duration::from_secs(60),
        || async {
            let waiting = "SELECT count(*) FROM provider_events WHERE outcome = 'unknown_email'";
            (count(&s.db, waiting).await == 1).then_some(())
        },
    )
    .await;
    assert_eq!(status(&s.herald, "early", &application).await, "pending");

    s.resend.set_mode(Mode::Normal);
    wait_status(&s.herald, "early", &application, "delivered").await;
    assert_eq!(
        s.resend.sent_to(&address("early")),
        1,
        "the same batch, its key replayed"
    );
    assert_eq!(
        count(
            &s.db,
            "SELECT count(*) FROM provider_events WHERE outcome = 'applied'"
        )
        .await,
        1
    );
}

// ---------------------------------------------------------------------------
// Suppression.
// ---------------------------------------------------------------------------

/// After a permanent bounce and a complaint, the next confirmations to those
/// two addresses make no provider request and show `suppressed`, while
/// another user's goes out; lifting one (audited) mails the next one again.
async fn suppressed_addresses_are_not_mailed_until_lifted(backend: Backend) {
    let s = Stack::start_on(backend, &settings(&[])).await;
    let jobs = [
        s.herald.post_job("First").await,
        s.herald.post_job("Second").await,
        s.herald.post_job("Third").await,
    ];
    for user in ["bob", "cat"] {
        let application = apply(&s.herald, user, &jobs[0]).await;
        wait_status(&s.herald, user, &application, "sent").await;
    }
    let bob = s.resend.email_id_of(&address("bob")).expect("sent");
    let cat = s.resend.email_id_of(&address("cat")).expect("sent");
    let bounce = s.resend.emit(
        "email.bounced",
        &bob,
        json!({ "bounce": { "type": "Permanent", "message": "mailbox does not exist" } }),
    );
    let complaint = s.resend.emit("email.complained", &cat, json!({}));
    wait_webhook_answered(&s, &bounce).await;
    wait_webhook_answered(&s, &complaint).await;
    let (code, listed) = admin(&s.herald, reqwest::Method::GET, "/admin/suppressions").await;
    assert_eq!(code, 200);
    let reasons: Vec<(String, String)> = listed["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            assert!(
                i["email_id"].is_string() && i["application_id"].is_string(),
                "{i}"
            );
            (
                i["address"].as_str().unwrap_or_default().to_string(),
                i["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(reasons.len(), 2, "{listed}");
    assert!(reasons.contains(&(address("bob"), "bounced".into())));
    assert!(reasons.contains(&(address("cat"), "complained".into())));

    // The next confirmations: bob and cat suppressed without a request,
    // dan's mailed.
    let calls_before = s.resend.calls().len();
    let bob2 = apply(&s.herald, "bob", &jobs[1]).await;
    let cat2 = apply(&s.herald, "cat", &jobs[1]).await;
    let dan = apply(&s.herald, "dan", &jobs[1]).await;
    wait_status(&s.herald, "dan", &dan, "sent").await;
    wait_status(&s.herald, "bob", &bob2, "suppressed").await;
    wait_status(&s.herald, "cat", &cat2, "suppressed").await;
    s.wait_until_settled(Duration::from_secs(30)).await;
    let carried: usize = s.resend.calls()[calls_before..]
        .iter()
        .map(|c| c.emails)
        .sum();
    assert_eq!(carried, 1, "only dan's email went to the provider");
    assert_eq!(s.resend.sent_to(&address("bob")), 1);
    assert_eq!(s.resend.sent_to(&address("cat")), 1);
    assert_eq!(
        s.herald
            .metric(r#"herald_deliveries_total{consumer="email",result="suppressed"}"#)
            .await,
        2.0
    );

    // Lifted (the address compared case-insensitively, `@` encoded or not),
    // audited; the next confirmation to bob is mailed.
    let (code, lifted) = admin(
        &s.herald,
        reqwest::Method::DELETE,
        "/admin/suppressions/Bob%40Example.com",
    )
    .await;
    assert_eq!(code, 200, "{lifted}");
    assert_eq!(lifted["lifted"]["reason"], "bounced");
    let (code, _) = admin(
        &s.herald,
        reqwest::Method::DELETE,
        "/admin/suppressions/bob@example.com",
    )
    .await;
    assert_eq!(code, 404, "lifted once");
    assert_eq!(
        count(
            &s.db,
            "SELECT count(*) FROM admin_audit
              WHERE action = 'suppression.lift' AND subject = 'bob@example.com'
                AND actor = 'admin (note: postmaster)'"
        )
        .await,
        1
    );
    let bob3 = apply(&s.herald, "bob", &jobs[2]).await;
    wait_status(&s.herald, "bob", &bob3, "sent").await;
    assert_eq!(s.resend.sent_to(&address("bob")), 2);
    let cat3 = apply(&s.herald, "cat", &jobs[2]).await;
    wait_status(&s.herald, "cat", &cat3, "suppressed").await;
    assert_eq!(
        s.resend.sent_to(&address("cat")),
        1,
        "cat is still suppressed"
    );
    let (_, listed) = admin(&s.herald, reqwest::Method::GET, "/admin/suppressions").await;
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
}

on_both_backends!(
    a_success_that_names_no_email_is_never_recorded_sent,
    a_provider_that_never_names_its_emails_ends_in_dead_letters,
    an_absurd_retry_header_waits_max_delay_and_stops_nothing,
    webhooks_move_the_status_and_forgeries_change_nothing,
    a_webhook_refused_while_herald_is_down_lands_on_a_retry,
    a_report_that_outruns_the_send_s_record_is_applied_with_it,
    suppressed_addresses_are_not_mailed_until_lifted,
);

/// Without `email.webhook_secret` the route does not exist: 404 with a
/// problem naming the setting, whatever the request carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_secret_the_webhook_route_answers_404_naming_the_setting() {
    let b = support::Backing::start(Backend::Sqlite).await;
    let herald = b.daemon(&[]).await;
    let body = event_body("email.delivered", "x", "x@example.com", json!({}));
    let r = herald
        .http
        .post(herald.url("/webhooks/resend"))
        .headers(
            signed("msg_1", now_secs(), &[WEBHOOK_SECRET], &body)
                .into_iter()
                .map(|(n, v)| (http::HeaderName::from_static(n), v.parse().expect("value")))
                .collect(),
        )
        .body(body)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 404);
    let problem: Value = r.json().await.expect("problem");
    assert_eq!(problem["code"], "webhooks_not_configured");
    assert!(problem["detail"]
        .as_str()
        .unwrap_or_default()
        .contains("email.webhook_secret"));
}
