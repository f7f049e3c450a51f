//! The delivery pipeline, end to end: outbox -> relay -> Redis Streams ->
//! EmailSender -> a fake Resend, with the failures a provider shows. Counts are
//! read where the effect lands (the fake Resend) and from `/metrics` and the
//! database, never from Herald's own idea of what it did.

use crate::support;

use std::time::Duration;

use herald::store::Invariant;
use serde_json::{json, Value};
use support::fake_resend::{FakeResend, Mode, API_KEY};
use support::fake_sentry::FakeSentry;
use support::sse::SseClient;
use support::{
    apply_as as apply, count, eventually, herald_audit, user_token, Backend, Backing, Daemon, Db,
    ADMIN_TOKEN,
};

struct World {
    b: Backing,
    resend: FakeResend,
    sentry: FakeSentry,
    herald: Daemon,
    db: Db,
}

/// Postgres + Redis + fake Resend + one daemon sending through it quickly.
async fn world(extra: &[(&str, &str)]) -> World {
    world_on(Backend::Postgres, extra).await
}

/// The same on `backend`.
async fn world_on(backend: Backend, extra: &[(&str, &str)]) -> World {
    let b = Backing::start(backend).await;
    let resend = FakeResend::start().await;
    let sentry = FakeSentry::start().await;
    let base = resend.base_url();
    let dsn = sentry.dsn();
    let mut env: Vec<(&str, &str)> = vec![
        ("HERALD_EMAIL__TRANSPORT", "resend"),
        ("RESEND_API_KEY", API_KEY),
        ("RESEND_BASE_URL", &base),
        ("HERALD_EMAIL__MAX_PER_SEC", "1000"),
        ("HERALD_RELAY__REDELIVER_AFTER_SECS", "2"),
        ("HERALD_RELAY__POLL_INTERVAL_MS", "200"),
        ("HERALD_RETRY__BASE_MS", "100"),
        ("HERALD_RETRY__CAP_MS", "1000"),
        ("SENTRY_DSN", &dsn),
        ("HERALD_DLQ__CHECK_INTERVAL_MS", "200"),
    ];
    env.extend_from_slice(extra);
    let herald = b.daemon(&env).await;
    let db = b.db().await;
    World {
        b,
        resend,
        sentry,
        herald,
        db,
    }
}

/// After a relay crash between publish and mark, on Redis: the stream holds
/// the event twice and `group` has handled both copies (none pending), so a
/// duplicate had every chance to show up. (The in-process broker's first
/// copy died with the process.)
async fn both_copies_handled_on_redis(w: &World, stream: &str, group: &str) {
    let Some(redis) = &w.b.redis else { return };
    assert_eq!(
        redis.cli(&["XLEN", stream]).as_deref(),
        Some("2"),
        "the event was published twice"
    );
    eventually("both copies handled", Duration::from_secs(20), || {
        let pending = redis.cli(&["XPENDING", stream, group]);
        async move { pending.filter(|p| p.starts_with('0')).map(|_| ()) }
    })
    .await;
}

async fn wait_for_emails(resend: &FakeResend, n: usize, timeout: Duration) {
    eventually(&format!("{n} emails at the fake Resend"), timeout, || {
        let sent = resend.sent().len();
        async move { (sent >= n).then_some(()) }
    })
    .await;
}

/// Waits until the `SELECT count(*) …` `sql` answers `expected`.
async fn wait_for_count(db: &Db, sql: &'static str, expected: i64, timeout: Duration) {
    eventually(&format!("{sql} = {expected}"), timeout, || {
        let db = db.clone();
        async move { (count(&db, sql).await == expected).then_some(()) }
    })
    .await;
}

/// Waits until every outbox event is settled (delivered, dead or fanned out).
async fn wait_until_settled(db: &Db, timeout: Duration) {
    let open = "SELECT count(*) FROM outbox_events WHERE settled_at IS NULL";
    wait_for_count(db, open, 0, timeout).await;
}

async fn email_status(db: &Db, application_id: &str) -> String {
    sqlx::query_scalar("SELECT email_status FROM applications WHERE CAST(id AS TEXT) = $1")
        .bind(application_id.to_string())
        .fetch_one(db)
        .await
        .expect("status")
}

async fn a_hundred_applications_send_exactly_a_hundred_emails(backend: Backend) {
    let w = world_on(backend, &[]).await;
    let job = w.herald.post_job("Rust engineer").await;
    let mut ids = Vec::new();
    for i in 0..100 {
        ids.push(apply(&w.herald, &format!("user{i}"), &job).await);
    }
    wait_for_emails(&w.resend, 100, Duration::from_secs(60)).await;
    w.herald
        .wait_for_metric("herald_emails_sent_total", 100.0)
        .await;
    let sent = w.resend.sent();
    assert_eq!(sent.len(), 100);
    let recipients: std::collections::HashSet<_> = sent.iter().map(|s| s.to.clone()).collect();
    assert_eq!(recipients.len(), 100, "one email per applicant");
    assert!(
        sent[0].subject.contains("Rust engineer"),
        "{}",
        sent[0].subject
    );
    for id in &ids {
        assert_eq!(email_status(&w.db, id).await, "sent");
    }
    // Nothing more arrives once everything has settled.
    wait_until_settled(&w.db, Duration::from_secs(10)).await;
    assert_eq!(w.resend.sent().len(), 100);
    assert_eq!(
        w.herald
            .metric(r#"herald_deliveries_total{consumer="email",result="ok"}"#)
            .await,
        100.0
    );
}

async fn a_relay_crash_between_publish_and_mark_republishes_and_still_sends_one_email(
    backend: Backend,
) {
    let mut w = world_on(backend, &[]).await;
    let job = w.herald.post_job("Backend").await;
    // The job's own event is relayed first, so the crash hits the application's.
    wait_until_settled(&w.db, Duration::from_secs(10)).await;
    w.herald
        .set_env("FAILPOINTS", Some("relay-after-publish=1*return"));
    w.herald.restart().await;
    // The relay may crash the process before the answer is written: the
    // client retries with its key after the restart (below) and gets it.
    let _ = w
        .herald
        .try_post(
            "/api/applications",
            &user_token("ada"),
            Some("apply-ada"),
            &json!({"job_id": job["id"]}),
        )
        .await;
    let status = w.herald.wait_for_exit(Duration::from_secs(20)).await;
    assert!(!status.success(), "the failpoint aborted the daemon");
    let stream = "herald:stream:application.submitted";
    if let Some(redis) = &w.b.redis {
        assert_eq!(redis.cli(&["XLEN", stream]).as_deref(), Some("1"));
    }
    let published: i64 = count(
        &w.db,
        "SELECT count(*) FROM outbox_events WHERE published_at IS NOT NULL AND topic = 'application.submitted'",
    )
    .await;
    assert_eq!(published, 0, "the mark was rolled back with the crash");

    w.herald.set_env("FAILPOINTS", None);
    w.herald.restart().await;
    let id = apply(&w.herald, "ada", &job).await;
    wait_for_emails(&w.resend, 1, Duration::from_secs(30)).await;
    eventually("application sent", Duration::from_secs(10), || {
        let (db, id) = (w.db.clone(), id.clone());
        async move { (email_status(&db, &id).await == "sent").then_some(()) }
    })
    .await;
    // The restarted process published it again (the first copy died with
    // the in-process broker, or sits in the Redis stream).
    assert!(w.herald.metric("herald_relay_published_total").await >= 1.0);
    both_copies_handled_on_redis(&w, stream, "email").await;
    assert_eq!(w.resend.sent_to("ada@example.com"), 1);
}

/// A kill -9 at `failpoint` while a batch of three is in hand, then a
/// restart: every email exactly once, under one Idempotency-Key, nothing dead.
async fn a_crash_around_a_batch_still_sends_each_email_once(backend: Backend, failpoint: &str) {
    let mut w = world_on(backend, &[("HERALD_EMAIL__BATCH_LINGER_MS", "1000")]).await;
    let job = w.herald.post_job("Frontend").await;
    w.herald
        .set_env("FAILPOINTS", Some(&format!("{failpoint}=1*return")));
    w.herald.restart().await;
    let users = ["grace", "edsger", "barbara"];
    let mut ids = Vec::new();
    for user in users {
        ids.push(apply(&w.herald, user, &job).await);
    }
    let status = w.herald.wait_for_exit(Duration::from_secs(20)).await;
    assert!(!status.success(), "the failpoint aborted the daemon");
    let sent_before = w.resend.sent().len();
    if failpoint == "batch-after-form" {
        assert_eq!(sent_before, 0, "formed, not sent");
    } else {
        assert_eq!(sent_before, 3, "Resend accepted the batch before the crash");
    }
    for id in &ids {
        assert_eq!(
            email_status(&w.db, id).await,
            "pending",
            "nothing committed"
        );
    }
    assert_eq!(
        count(
            &w.db,
            "SELECT count(*) FROM send_batches WHERE settled_at IS NULL"
        )
        .await,
        1,
        "the batch and its membership survived the crash"
    );

    w.herald.set_env("FAILPOINTS", None);
    w.herald.restart().await;
    for id in &ids {
        eventually("application sent", Duration::from_secs(30), || {
            let (db, id) = (w.db.clone(), id.clone());
            async move { (email_status(&db, &id).await == "sent").then_some(()) }
        })
        .await;
    }
    let calls: Vec<_> = w.resend.calls().into_iter().filter(|c| c.batch).collect();
    let keys: std::collections::HashSet<_> = calls.iter().map(|c| c.key.clone()).collect();
    assert_eq!(
        keys.len(),
        1,
        "every send carried the batch's key: {calls:?}"
    );
    assert!(keys.iter().all(|k| k.is_some()));
    assert!(
        calls.iter().all(|c| c.emails == 3),
        "the same three each time: {calls:?}"
    );
    if failpoint != "batch-after-form" {
        assert!(calls.len() >= 2, "the batch was sent again: {calls:?}");
    }
    for user in users {
        assert_eq!(
            w.resend.sent_to(&format!("{user}@example.com")),
            1,
            "{user}: Resend deduplicated the repeat"
        );
    }
    assert_eq!(count(&w.db, "SELECT count(*) FROM dead_letters").await, 0);
    assert_eq!(
        count(&w.db, "SELECT count(*) FROM inbox WHERE consumer = 'email'").await,
        3
    );
}

async fn a_crash_after_the_batch_is_formed_sends_it_once_after_the_restart(backend: Backend) {
    a_crash_around_a_batch_still_sends_each_email_once(backend, "batch-after-form").await;
}

async fn a_crash_after_resend_accepted_the_batch_resends_it_under_the_same_key(backend: Backend) {
    a_crash_around_a_batch_still_sends_each_email_once(backend, "batch-after-send").await;
}

async fn a_crash_before_the_inbox_commit_resends_the_batch_under_the_same_key(backend: Backend) {
    a_crash_around_a_batch_still_sends_each_email_once(backend, "batch-before-commit").await;
}

async fn a_rate_limit_s_retry_after_is_a_floor_for_the_next_attempt(backend: Backend) {
    let w = world_on(backend, &[]).await;
    let job = w.herald.post_job("SRE").await;
    w.resend.set_mode(Mode::RateLimited {
        n: 1,
        retry_after: 2,
    });
    apply(&w.herald, "linus", &job).await;
    wait_for_emails(&w.resend, 1, Duration::from_secs(30)).await;
    let calls = w.resend.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0].status, 429);
    assert_eq!(calls[1].status, 200);
    let gap = calls[1].at.duration_since(calls[0].at);
    assert!(gap >= Duration::from_secs(2), "retried after {gap:?}");
    assert_eq!(
        w.herald
            .metric(r#"herald_delivery_attempts_total{consumer="email",attempt="2"}"#)
            .await,
        1.0
    );
    // The retry went through the RetryBudget, which /admin/status shows.
    let (status, body) = admin(&w, reqwest::Method::GET, "/admin/status").await;
    assert_eq!(status, 200);
    let tokens = body["retry_budget_tokens"]["email_api"].as_f64();
    assert!(tokens.is_some_and(|t| (0.0..=10.0).contains(&t)), "{body}");
}

async fn admin(w: &World, method: reqwest::Method, path: &str) -> (u16, Value) {
    let r = w
        .herald
        .http
        .request(method, w.herald.admin_url(path))
        .bearer_auth(ADMIN_TOKEN)
        .header("x-herald-actor", "on-call")
        .send()
        .await
        .expect("admin request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn poison_alerts_sentry_once_and_an_admin_replay_delivers_exactly_one_email(
    backend: Backend,
) {
    let w = world_on(backend, &[]).await;
    let job = w.herald.post_job("Data").await;
    w.resend.poison("eve@example.com", true);
    w.resend.poison("trent@example.com", true);
    let first = apply(&w.herald, "eve", &job).await;
    let alert = eventually("one Sentry alert", Duration::from_secs(30), || {
        let events = w.sentry.events();
        async move { events.first().cloned() }
    })
    .await;
    let message = alert["message"].to_string() + &alert["logentry"].to_string();
    assert!(message.contains("dead letter"), "{alert}");
    // The protocol leaves out the default level, which is `error`.
    assert!(
        matches!(alert["level"].as_str(), None | Some("error")),
        "{alert}"
    );
    assert_eq!(alert["extra"]["topic"], "application.submitted");
    assert_eq!(alert["extra"]["depth"], 1);
    let text = alert.to_string();
    assert!(
        !text.contains("eve@example.com"),
        "no address leaves: {text}"
    );
    assert!(!text.contains(ADMIN_TOKEN));

    // A second poison message while the alert is open raises nothing new.
    let second = apply(&w.herald, "trent", &job).await;
    eventually("second letter dead", Duration::from_secs(30), || {
        let (db, id) = (w.db.clone(), second.clone());
        async move { (email_status(&db, &id).await == "dead").then_some(()) }
    })
    .await;
    w.herald.wait_for_metric("herald_dlq_depth", 2.0).await;
    assert_eq!(w.sentry.events().len(), 1, "one alert per rising edge");

    let (status, list) = admin(
        &w,
        reqwest::Method::GET,
        "/admin/dlq?topic=application.submitted",
    )
    .await;
    assert_eq!(status, 200);
    let items = list["items"].as_array().expect("items").clone();
    assert_eq!(items.len(), 2);
    let letter = items
        .iter()
        .find(|l| sqlx::types::Uuid::parse_str(l["event_id"].as_str().unwrap()).is_ok())
        .expect("a letter");
    for field in [
        "id",
        "event_id",
        "topic",
        "consumer",
        "attempts",
        "last_error",
        "first_failed_at",
        "dead_at",
    ] {
        assert!(!letter[field].is_null(), "{field} in {letter}");
    }

    // The cause is removed; replay every letter of the topic (the first by
    // id, twice, to show a replay is idempotent).
    w.resend.poison("eve@example.com", false);
    w.resend.poison("trent@example.com", false);
    let first_letter: String = sqlx::query_scalar(
        "SELECT CAST(d.id AS TEXT) FROM dead_letters d JOIN outbox_events o USING (event_id)
          WHERE CAST(o.aggregate_id AS TEXT) = $1",
    )
    .bind(&first)
    .fetch_one(&w.db)
    .await
    .unwrap();
    let path = format!("/admin/dlq/{first_letter}/replay");
    let (status, body) = admin(&w, reqwest::Method::POST, &path).await;
    assert_eq!((status, body["result"].as_str()), (200, Some("replayed")));
    let (status, body) = admin(&w, reqwest::Method::POST, &path).await;
    assert_eq!(
        (status, body["result"].as_str()),
        (200, Some("already_replayed"))
    );
    let (status, body) = admin(
        &w,
        reqwest::Method::POST,
        "/admin/dlq/replay?topic=application.submitted",
    )
    .await;
    assert_eq!((status, body["replayed"].as_u64()), (200, Some(1)));

    wait_for_emails(&w.resend, 2, Duration::from_secs(30)).await;
    for id in [&first, &second] {
        eventually("replayed application sent", Duration::from_secs(10), || {
            let (db, id) = (w.db.clone(), id.to_string());
            async move { (email_status(&db, &id).await == "sent").then_some(()) }
        })
        .await;
    }
    eventually(
        "the monitor logs the resolution",
        Duration::from_secs(10),
        || {
            let log = w.herald.log();
            async move { log.contains("dead letter alert resolved").then_some(()) }
        },
    )
    .await;
    w.herald.wait_for_metric("herald_dlq_depth", 0.0).await;
    assert_eq!(w.resend.sent_to("eve@example.com"), 1);
    assert_eq!(w.resend.sent_to("trent@example.com"), 1);
    assert_eq!(w.sentry.events().len(), 1);
    let audit = count(
        &w.db,
        "SELECT count(*) FROM dlq_audit WHERE action = 'replay' AND actor = 'admin (note: on-call)'",
    )
    .await;
    assert_eq!(audit, 2);
}

async fn a_discarded_dead_letter_is_audited_and_can_no_longer_be_replayed(backend: Backend) {
    let w = world_on(backend, &[]).await;
    let job = w.herald.post_job("Ops").await;
    w.resend.poison("oscar@example.com", true);
    apply(&w.herald, "oscar", &job).await;
    w.herald.wait_for_metric("herald_dlq_depth", 1.0).await;
    let id: String = sqlx::query_scalar("SELECT CAST(id AS TEXT) FROM dead_letters")
        .fetch_one(&w.db)
        .await
        .unwrap();
    let (status, body) = admin(&w, reqwest::Method::DELETE, &format!("/admin/dlq/{id}")).await;
    assert_eq!((status, body["result"].as_str()), (200, Some("discarded")));
    let (status, body) = admin(
        &w,
        reqwest::Method::POST,
        &format!("/admin/dlq/{id}/replay"),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("dead_letter_closed"))
    );
    let (status, body) = admin(&w, reqwest::Method::GET, "/admin/dlq").await;
    assert_eq!(
        (status, body["items"].as_array().map(Vec::len)),
        (200, Some(0))
    );
    let (status, body) = admin(&w, reqwest::Method::GET, "/admin/dlq?topic=nope").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_query"))
    );
    let (status, _) = admin(&w, reqwest::Method::POST, "/admin/dlq/not-a-uuid/replay").await;
    assert_eq!(status, 404);
    assert_eq!(
        count(
            &w.db,
            "SELECT count(*) FROM dlq_audit WHERE action = 'discard' AND actor = 'admin (note: on-call)'"
        )
        .await,
        1
    );
    assert_eq!(w.resend.sent().len(), 0);
}

async fn a_poison_message_is_dead_lettered_on_its_first_attempt(backend: Backend) {
    let w = world_on(backend, &[]).await;
    let job = w.herald.post_job("QA").await;
    w.resend.poison("mallory@example.com", true);
    let id = apply(&w.herald, "mallory", &job).await;
    eventually("application dead", Duration::from_secs(30), || {
        let (db, id) = (w.db.clone(), id.clone());
        async move { (email_status(&db, &id).await == "dead").then_some(()) }
    })
    .await;
    assert_eq!(count(&w.db, "SELECT count(*) FROM dead_letters").await, 1);
    let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM dead_letters")
        .fetch_one(&w.db)
        .await
        .unwrap();
    assert_eq!(attempts, 1, "permanent errors are not retried");
    assert_eq!(w.resend.calls().len(), 1);
    assert_eq!(w.resend.sent().len(), 0);
}

/// Applies as `users` concurrently (a few at a time) through `daemons` in turn.
async fn apply_many(daemons: &[&Daemon], job: &Value, users: Vec<String>) -> Vec<String> {
    let mut ids = Vec::new();
    for (chunk_no, chunk) in users.chunks(16).enumerate() {
        let requests = chunk.iter().enumerate().map(|(i, user)| {
            let daemon = daemons[(chunk_no * 16 + i) % daemons.len()];
            apply(daemon, user, job)
        });
        ids.extend(futures::future::join_all(requests).await);
    }
    ids
}

fn distinct_recipients(resend: &FakeResend) -> usize {
    let sent = resend.sent();
    sent.iter()
        .map(|s| s.to.clone())
        .collect::<std::collections::HashSet<_>>()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_daemons_on_one_database_send_one_email_per_application() {
    let w = world(&[]).await;
    let base = w.resend.base_url();
    let second = Daemon::start(
        &w.b.pg().url(),
        Some(&w.b.redis().url()),
        &[
            ("HERALD_EMAIL__TRANSPORT", "resend"),
            ("RESEND_API_KEY", API_KEY),
            ("RESEND_BASE_URL", &base),
            ("HERALD_EMAIL__MAX_PER_SEC", "1000"),
            ("HERALD_RELAY__REDELIVER_AFTER_SECS", "2"),
            ("HERALD_RELAY__POLL_INTERVAL_MS", "200"),
        ],
    )
    .await;
    let job = w.herald.post_job("Platform").await;
    let users: Vec<String> = (0..500).map(|i| format!("pair{i}")).collect();
    apply_many(&[&w.herald, &second], &job, users).await;
    wait_for_emails(&w.resend, 500, Duration::from_secs(90)).await;
    wait_until_settled(&w.db, Duration::from_secs(20)).await;
    assert_eq!(w.resend.sent().len(), 500);
    assert_eq!(distinct_recipients(&w.resend), 500);
    let sent_by_both = w.herald.metric("herald_emails_sent_total").await
        + second.metric("herald_emails_sent_total").await;
    assert_eq!(sent_by_both, 500.0);
    assert_eq!(count(&w.db, "SELECT count(*) FROM inbox").await, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_losing_everything_twice_mid_batched_drain_still_delivers_every_email_once() {
    // The provider at 2 requests/s, Herald at its rate: 3,000 queued
    // confirmations take ~15 s in batches of 100, so both losses land
    // mid-drain, with events in the stream, in pending lists and in batches.
    let mut w = world(&[("HERALD_EMAIL__MAX_PER_SEC", "2")]).await;
    w.resend.limit_rate(Some(2));
    let job = w.herald.post_job("Infra").await;
    queue_confirmations(&w.db, Backend::Postgres, &job, 3_000, "flush").await;
    let stream = "herald:stream:application.submitted";
    let sent_at_least = |n: usize| {
        let resend = w.resend.clone();
        move || {
            let resend = resend.clone();
            async move { (resend.sent().len() >= n).then_some(()) }
        }
    };
    eventually(
        "a third sent",
        Duration::from_secs(30),
        sent_at_least(1_000),
    )
    .await;
    assert_eq!(w.b.redis().cli(&["FLUSHALL"]).as_deref(), Some("OK"));
    let after_flush = w.resend.sent().len();
    eventually(
        "two thirds sent",
        Duration::from_secs(60),
        sent_at_least(2_000),
    )
    .await;
    // A restart without persistence: the server comes back empty.
    w.b.redis_mut().restart().await;
    let after_restart = w.resend.sent().len();
    assert!(
        after_flush < 3_000 && after_restart < 3_000,
        "both losses landed mid-drain ({after_flush}, {after_restart} sent)"
    );
    wait_for_emails(&w.resend, 3_000, Duration::from_secs(90)).await;
    wait_until_settled(&w.db, Duration::from_secs(20)).await;
    assert_eq!(w.resend.sent().len(), 3_000, "each email exactly once");
    assert_eq!(distinct_recipients(&w.resend), 3_000);
    assert_eq!(count(&w.db, SENT_APPLICATIONS).await, 3_000);
    assert_eq!(count(&w.db, "SELECT count(*) FROM dead_letters").await, 0);
    // The stream and the group were made again.
    let groups =
        w.b.redis()
            .cli(&["XINFO", "GROUPS", stream])
            .unwrap_or_default();
    assert!(groups.contains("email"), "group recreated: {groups}");
    let lost = w
        .herald
        .metric(r#"herald_relay_republished_total{reason="lost"}"#)
        .await;
    eprintln!(
        "flush at {after_flush} sent, restart at {after_restart}; {lost} republished as lost"
    );
    assert!(lost > 0.0, "what the broker lost was published again");
}

async fn a_twenty_second_resend_outage_causes_no_retry_storm_and_loses_nothing(backend: Backend) {
    // The default schedule (base 1 s, cap 300 s, 10 attempts).
    let w = world_on(
        backend,
        &[
            ("HERALD_RETRY__BASE_MS", "1000"),
            ("HERALD_RETRY__CAP_MS", "300000"),
            ("HERALD_EMAIL__MAX_BATCH", "1"),
        ],
    )
    .await;
    let job = w.herald.post_job("Support").await;
    // Resend is down for 20 s from now and then recovers on its own.
    let outage_ends = std::time::Instant::now() + Duration::from_secs(20);
    w.resend.set_mode(Mode::DownUntil(503, outage_ends));
    let users: Vec<String> = (0..200).map(|i| format!("outage{i}")).collect();
    apply_many(&[&w.herald], &job, users).await;
    wait_for_emails(&w.resend, 200, Duration::from_secs(140)).await;
    assert!(std::time::Instant::now() >= outage_ends);
    let during_outage = w.resend.calls().iter().filter(|c| c.status == 503).count();
    // One email per request here, so every email is its own batch and its
    // own retry schedule.
    let batches = count(&w.db, "SELECT count(*) FROM send_batches").await as usize;
    eprintln!("outage: {during_outage} calls to the down API for {batches} due batches");
    assert_eq!(batches, 200);
    assert!(
        during_outage <= 300,
        "{during_outage} calls to a down API for 200 due batches"
    );
    assert!(
        during_outage >= 200,
        "every first attempt was made: {during_outage}"
    );
    assert_eq!(distinct_recipients(&w.resend), 200);
    assert_eq!(count(&w.db, "SELECT count(*) FROM dead_letters").await, 0);
    assert!(
        w.herald
            .metric(r#"herald_deliveries_total{consumer="email",result="deferred"}"#)
            .await
            > 0.0,
        "the budget deferred retries"
    );
}

async fn the_janitor_deletes_what_expired_in_small_batches_and_keeps_what_is_still_needed(
    backend: Backend,
) {
    let w = world_on(
        backend,
        &[
            ("HERALD_JANITOR__INTERVAL_MS", "100"),
            ("HERALD_JANITOR__BATCH", "7"),
            ("HERALD_JANITOR__RETENTION_SECS", "0"),
        ],
    )
    .await;
    let job = w.herald.post_job("Cleanup").await;
    w.resend.poison("dead0@example.com", true);
    let users: Vec<String> = (0..20).map(|i| format!("clean{i}")).collect();
    apply_many(&[&w.herald], &job, users).await;
    apply(&w.herald, "dead0", &job).await;
    wait_for_emails(&w.resend, 20, Duration::from_secs(30)).await;
    // The poison address's letter first: until it is written, its event is
    // an unsettled row like any other, and counting rows would race it.
    wait_for_count(
        &w.db,
        "SELECT count(*) FROM dead_letters",
        1,
        Duration::from_secs(20),
    )
    .await;
    // Every settled event and inbox row goes (in batches of 7); the dead
    // letter's event stays, a replay needs it.
    wait_for_count(
        &w.db,
        "SELECT count(*) FROM inbox",
        0,
        Duration::from_secs(20),
    )
    .await;
    let outbox = "SELECT count(*) FROM outbox_events";
    wait_for_count(&w.db, outbox, 1, Duration::from_secs(20)).await;
    assert_eq!(
        count(
            &w.db,
            "SELECT count(*) FROM outbox_events o JOIN dead_letters d USING (event_id)"
        )
        .await,
        1
    );
    assert_eq!(
        w.herald
            .metric(r#"herald_janitor_deleted_total{table="inbox"}"#)
            .await,
        20.0
    );
    // Expired keys go, unless a request still holds one.
    // Instants: timestamptz on Postgres, integer microseconds on SQLite.
    let (past, in_an_hour) = match backend {
        Backend::Postgres => ("now() - interval '1 second'", "now() + interval '1 hour'"),
        Backend::Sqlite => ("0", "9000000000000000"),
    };
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE idempotency_keys SET expires_at = {past}
          WHERE key IN ('apply-clean0', 'apply-clean1')"
    )))
    .execute(&w.db)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE idempotency_keys SET state = 'in_progress', lease_expires_at = {in_an_hour}
          WHERE key = 'apply-clean1'"
    )))
    .execute(&w.db)
    .await
    .unwrap();
    let both =
        "SELECT count(*) FROM idempotency_keys WHERE key IN ('apply-clean0', 'apply-clean1')";
    wait_for_count(&w.db, both, 1, Duration::from_secs(10)).await;
    let kept: String =
        sqlx::query_scalar("SELECT key FROM idempotency_keys WHERE key LIKE 'apply-clean_'")
            .fetch_all(&w.db)
            .await
            .unwrap()
            .into_iter()
            .find(|k: &String| k == "apply-clean1" || k == "apply-clean0")
            .unwrap();
    assert_eq!(kept, "apply-clean1", "a held key is never purged");
    // A key abandoned in progress (its holder died: lease and TTL both
    // passed) goes too.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE idempotency_keys SET state = 'in_progress', lease_expires_at = {past},
                expires_at = {past}
          WHERE key = 'apply-clean2'"
    )))
    .execute(&w.db)
    .await
    .unwrap();
    wait_for_count(
        &w.db,
        "SELECT count(*) FROM idempotency_keys WHERE key = 'apply-clean2'",
        0,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        count(
            &w.db,
            "SELECT count(*) FROM idempotency_keys WHERE key = 'apply-clean1'"
        )
        .await,
        1,
        "the held key is still there"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_left_by_a_redis_outage_drains_at_the_relay_rate_with_bounded_concurrency() {
    const ROWS: i64 = 18_000;
    const RATE: f64 = 600.0;
    let mut w = world(&[
        ("HERALD_RELAY__MAX_PUBLISH_PER_SEC", "600"),
        ("HERALD_RELAY__REDELIVER_AFTER_SECS", "120"),
        ("HERALD_EMAIL__MAX_PER_SEC", "5000"),
        ("HERALD_EMAIL__WORKERS", "4"),
    ])
    .await;
    let job = w.herald.post_job("Backlog").await;
    wait_until_settled(&w.db, Duration::from_secs(10)).await;
    w.b.redis_mut().kill();
    // The backlog: 18,000 committed applications and their events, written
    // while the broker is down (in SQL, for speed; the rows are exactly what
    // the apply path writes).
    let job_id: uuid::Uuid = job["id"].as_str().unwrap().parse().unwrap();
    sqlx::query(herald::bench::COMMITTED_APPLICATIONS)
        .bind(job_id)
        .bind(ROWS)
        .bind("backlog")
        .bind("Backlog")
        .execute(&w.b.pg().pool().await)
        .await
        .expect("backlog");
    w.herald
        .wait_for_metric_above("herald_relay_publish_failures_total", 0.0)
        .await;
    assert_eq!(w.herald.metric("herald_outbox_pending").await, ROWS as f64);
    w.b.redis_mut().restart().await;

    wait_for_emails(&w.resend, ROWS as usize, Duration::from_secs(180)).await;
    wait_until_settled(&w.db, Duration::from_secs(30)).await;
    assert_eq!(w.resend.sent().len(), ROWS as usize);
    assert_eq!(distinct_recipients(&w.resend), ROWS as usize);
    let span: f64 = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM max(published_at) - min(published_at))::float8
           FROM outbox_events WHERE topic = 'application.submitted'",
    )
    .fetch_one(&w.db)
    .await
    .unwrap();
    let rate = (ROWS - 1) as f64 / span;
    eprintln!("backlog drained at {rate:.1} events/s (relay.max_publish_per_sec {RATE})");
    assert!(
        (rate - RATE).abs() <= RATE * 0.15,
        "drained at {rate:.1}/s, configured {RATE}/s"
    );
    let max_in_flight = w.herald.metric("herald_email_in_flight_max").await;
    assert!(
        (1.0..=4.0).contains(&max_in_flight),
        "concurrency peaked at {max_in_flight} with 4 workers"
    );
}

async fn the_recorded_retry_schedule_of_200_failures_spreads_as_full_jitter(backend: Backend) {
    // Window of a first retry: base = 60 s, so the schedule stays readable:
    // a row whose retry came due before the last of the 200 first failed (it
    // would be retried, and its first delay lost) is one of the few delays
    // shorter than the second or two the 200 take to fail, which is <= 3 %
    // of the window and cannot empty the first quarter.
    let w = world_on(
        backend,
        &[
            ("HERALD_RETRY__BASE_MS", "60000"),
            ("HERALD_RETRY__CAP_MS", "300000"),
            // One email per request: 200 batches, 200 retry schedules.
            ("HERALD_EMAIL__MAX_BATCH", "1"),
        ],
    )
    .await;
    let job = w.herald.post_job("Jitter").await;
    w.resend.set_mode(Mode::Down(503));
    let users: Vec<String> = (0..200).map(|i| format!("jitter{i}")).collect();
    apply_many(&[&w.herald], &job, users).await;
    let failed = "SELECT count(*) FROM send_batches WHERE attempts >= 1";
    wait_for_count(&w.db, failed, 200, Duration::from_secs(30)).await;
    // The delay each failure scheduled: due_at - the failure's time.
    let delays: Vec<f64> = sqlx::query_scalar(match backend {
        Backend::Postgres => {
            "SELECT EXTRACT(EPOCH FROM due_at - first_failed_at)::float8 FROM send_batches
              WHERE attempts = 1"
        }
        // Instants are integer microseconds there.
        Backend::Sqlite => {
            "SELECT (due_at - first_failed_at) / 1e6 FROM send_batches WHERE attempts = 1"
        }
    })
    .fetch_all(&w.db)
    .await
    .unwrap();
    assert!(
        delays.len() >= 190,
        "{} schedules still readable",
        delays.len()
    );
    assert!(
        delays.iter().all(|d| (-0.05..=60.05).contains(d)),
        "{delays:?}"
    );
    // Uniform over [0, 60 s]: each 15 s quarter holds about a quarter of them
    // (binomial, +-4 sigma: at 3 sigma the eight quarters of a CI run fail an
    // honest uniform about once in fifty runs, seen as 30 of 198; a fixed or
    // "equal jitter" delay still empties a quarter), and the spread is a
    // uniform's (sd 60/sqrt 12, whose standard error for 200 samples is about
    // 0.55 s).
    let n = delays.len() as f64;
    for quarter in 0..4 {
        let (lo, hi) = (quarter as f64 * 15.0, quarter as f64 * 15.0 + 15.0);
        let share = delays.iter().filter(|d| **d >= lo && **d < hi).count() as f64;
        let sigma = (n * 0.25 * 0.75).sqrt();
        assert!(
            (share - n / 4.0).abs() <= 4.0 * sigma,
            "quarter {quarter}: {share} of {n}"
        );
    }
    let mean = delays.iter().sum::<f64>() / n;
    let sd = (delays.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!((sd - 60.0 / 12f64.sqrt()).abs() < 2.0, "sd {sd:.2} s");
}

/// Creates a charge as `user`; returns its id.
async fn charge(herald: &Daemon, user: &str, amount_cents: i64) -> String {
    let r = herald
        .post(
            "/api/charges",
            &user_token(user),
            Some(&format!("charge-{user}-{amount_cents}")),
            &json!({"amount_cents": amount_cents, "currency": "EUR", "description": "Featured listing"}),
        )
        .await;
    assert_eq!(r.status(), 201, "charge");
    let body: Value = r.json().await.unwrap();
    body["id"].as_str().unwrap().to_string()
}

async fn fifty_charges_make_exactly_fifty_ledger_entries(backend: Backend) {
    let w = world_on(backend, &[]).await;
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(charge(&w.herald, &format!("payer{i}"), 100 + i).await);
    }
    wait_for_count(
        &w.db,
        "SELECT count(*) FROM ledger_entries",
        50,
        Duration::from_secs(30),
    )
    .await;
    wait_until_settled(&w.db, Duration::from_secs(30)).await;
    assert_eq!(
        count(&w.db, "SELECT count(*) FROM ledger_entries").await,
        50
    );
    assert_eq!(
        count(
            &w.db,
            "SELECT count(*) FROM charges WHERE ledger_status = 'applied'"
        )
        .await,
        50
    );
    assert_eq!(w.herald.metric("herald_ledger_entries_total").await, 50.0);
    // The amounts went in as charged.
    let total: i64 =
        sqlx::query_scalar("SELECT CAST(sum(amount_cents) AS BIGINT) FROM ledger_entries")
            .fetch_one(&w.db)
            .await
            .unwrap();
    assert_eq!(total, (0..50).map(|i| 100 + i).sum::<i64>());
    let r = w
        .herald
        .http
        .get(w.herald.url(&format!("/api/charges/{}", ids[0])))
        .bearer_auth(user_token("payer0"))
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["ledger_status"], "applied", "{body}");
}

async fn a_relay_crash_between_publish_and_mark_for_a_charge_republishes_and_applies_it_once(
    backend: Backend,
) {
    let mut w = world_on(backend, &[]).await;
    w.herald
        .set_env("FAILPOINTS", Some("relay-after-publish=1*return"));
    w.herald.restart().await;
    // The relay may crash the process before the answer is written: the
    // client retries with its key after the restart (below) and gets it.
    let _ = w
        .herald
        .try_post(
            "/api/charges",
            &user_token("lin"),
            Some("charge-lin-4200"),
            &json!({"amount_cents": 4_200, "currency": "EUR", "description": "Featured listing"}),
        )
        .await;
    let status = w.herald.wait_for_exit(Duration::from_secs(20)).await;
    assert!(!status.success(), "the failpoint aborted the daemon");
    let stream = "herald:stream:charge.created";
    if let Some(redis) = &w.b.redis {
        assert_eq!(redis.cli(&["XLEN", stream]).as_deref(), Some("1"));
    }
    assert_eq!(
        count(
            &w.db,
            "SELECT count(*) FROM outbox_events WHERE published_at IS NOT NULL"
        )
        .await,
        0,
        "the mark was rolled back with the crash"
    );

    w.herald.set_env("FAILPOINTS", None);
    w.herald.restart().await;
    let id = charge(&w.herald, "lin", 4_200).await;
    wait_for_count(
        &w.db,
        "SELECT count(*) FROM ledger_entries",
        1,
        Duration::from_secs(30),
    )
    .await;
    assert!(w.herald.metric("herald_relay_published_total").await >= 1.0);
    both_copies_handled_on_redis(&w, stream, "ledger").await;
    wait_until_settled(&w.db, Duration::from_secs(10)).await;
    assert_eq!(count(&w.db, "SELECT count(*) FROM ledger_entries").await, 1);
    let status: String =
        sqlx::query_scalar("SELECT ledger_status FROM charges WHERE CAST(id AS TEXT) = $1")
            .bind(id.clone())
            .fetch_one(&w.db)
            .await
            .unwrap();
    assert_eq!(status, "applied");
    // The restarted process applied one copy and recognised the other.
    assert_eq!(w.herald.metric("herald_ledger_entries_total").await, 1.0);
    if w.b.redis.is_some() {
        // Redis kept the first copy too: it found the inbox row.
        assert!(
            w.herald
                .metric("herald_deliveries_total{consumer=\"ledger\",result=\"deduped\"}")
                .await
                >= 1.0,
            "the second copy found its inbox row"
        );
    }
}

/// A random UUID in its canonical text form, from the hex column `h`
/// (SQLite has no UUID type; Herald stores UUIDs as this text).
const UUID_TEXT: &str = "substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-' || substr(h, 13, 4) \
     || '-' || substr(h, 17, 4) || '-' || substr(h, 21, 12)";

/// `n` applications to `job` with their `application.submitted` events,
/// committed straight into the database: the queued confirmations of an
/// incident's backlog, made in a second instead of through 18,000 requests.
async fn queue_confirmations(db: &Db, backend: Backend, job: &Value, n: u32, prefix: &str) {
    let job_id = job["id"].as_str().unwrap().to_string();
    let title = job["title"].as_str().unwrap().to_string();
    match backend {
        Backend::Postgres => {
            sqlx::query(
                "WITH apps AS (
                     INSERT INTO applications (id, job_id, user_id, email, created_at)
                     SELECT gen_random_uuid(), $1::uuid, $3 || n, $3 || n || '@example.com', now()
                       FROM generate_series(1, $2::int) AS n
                     RETURNING id, user_id, email
                 )
                 INSERT INTO outbox_events (event_id, topic, aggregate_id, payload)
                 SELECT gen_random_uuid(), 'application.submitted', a.id,
                        jsonb_build_object('application_id', a.id, 'job_id', $1::uuid,
                                           'user_id', a.user_id, 'email', a.email,
                                           'job_title', $4::text, 'company', 'Acme')
                   FROM apps a",
            )
            .bind(job_id)
            .bind(n as i32)
            .bind(prefix.to_string())
            .bind(title)
            .execute(db)
            .await
            .unwrap();
        }
        Backend::Sqlite => {
            let now = chrono::Utc::now().timestamp_micros();
            let mut tx = db.begin().await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?),
                          r(i, h) AS (SELECT i, lower(hex(randomblob(16))) FROM n)
                     INSERT INTO applications (id, job_id, user_id, email, created_at)
                     SELECT {UUID_TEXT}, ?, ? || i, ? || i || '@example.com', ? FROM r"
            )))
            .bind(n as i32)
            .bind(job_id.clone())
            .bind(prefix.to_string())
            .bind(prefix.to_string())
            .bind(now)
            .execute(&mut *tx)
            .await
            .unwrap();
            sqlx::query(sqlx::AssertSqlSafe(
                format!("INSERT INTO outbox_events (event_id, topic, aggregate_id, payload, created_at, due_at)
                 SELECT {UUID_TEXT}, 'application.submitted', a.id,
                        json_object('application_id', a.id, 'job_id', a.job_id,
                                    'user_id', a.user_id, 'email', a.email,
                                    'job_title', ?, 'company', 'Acme'),
                        ?, ?
                   FROM (SELECT *, lower(hex(randomblob(16))) AS h FROM applications) a
                  WHERE a.job_id = ? AND a.user_id LIKE ? || '%'"),
            ))
            .bind(title)
            .bind(now)
            .bind(now)
            .bind(job_id)
            .bind(prefix.to_string())
            .execute(&mut *tx)
            .await
            .unwrap();
            tx.commit().await.unwrap();
        }
    }
}

/// The p99 of `samples` (nearest rank).
fn p99(samples: &mut [Duration]) -> Duration {
    samples.sort();
    let rank = ((samples.len() as f64) * 0.99).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

/// Production's provider: Resend at 2 requests a second (the fake answers
/// 429 past it), Herald at its default rate. A lone email goes at once;
/// 1,000 at once and an 18,000-email backlog drain in batches; the relay
/// publishes each event about once; jobs and charges never queue behind the
/// emails; each email exactly once.
async fn a_provider_at_two_requests_a_second_drains_every_backlog_in_time(backend: Backend) {
    let b = Backing::start(backend).await;
    let resend = FakeResend::start().await;
    resend.limit_rate(Some(2));
    let base = resend.base_url();
    // Herald's defaults for the email rate and the batch; the transport
    // points at the fake. The relay looks at unsettled events after 10 s
    // instead of 60: the backlog waits longer than that, so republishing on
    // a timer (what it did before) would show in the publish count.
    let herald = b
        .daemon(&[
            ("HERALD_EMAIL__TRANSPORT", "resend"),
            ("RESEND_API_KEY", API_KEY),
            ("RESEND_BASE_URL", &base),
            ("HERALD_RELAY__REDELIVER_AFTER_SECS", "10"),
            ("HERALD_AUDIT__INTERVAL_MS", "500"),
        ])
        .await;
    let db = b.db().await;
    let job = herald.post_job("Backlog").await;

    // 1. A lone application is mailed at once.
    let start = std::time::Instant::now();
    apply(&herald, "lone", &job).await;
    eventually("the lone email", Duration::from_secs(2), || {
        let resend = resend.clone();
        async move { (resend.sent_to("lone@example.com") == 1).then_some(()) }
    })
    .await;
    eprintln!("lone application mailed in {:?}", start.elapsed());

    // 2. A thousand at once.
    let start = std::time::Instant::now();
    let users: Vec<String> = (0..1000).map(|i| format!("wave{i}")).collect();
    apply_many(&[&herald], &job, users).await;
    wait_for_emails(
        &resend,
        1001,
        Duration::from_secs(90).saturating_sub(start.elapsed()),
    )
    .await;
    eprintln!("1,000 applications mailed in {:?}", start.elapsed());

    // 3. An 18,000-email backlog, with jobs and charges made while it drains.
    let published_before = herald.metric("herald_relay_published_total").await;
    let mut stream = SseClient::connect(&herald.url("/api/jobs/stream"), None).await;
    let start = std::time::Instant::now();
    queue_confirmations(&db, backend, &job, 18_000, "backlog").await;
    let (mut job_delays, mut charge_delays) = (Vec::new(), Vec::new());
    for i in 0..20 {
        let title = format!("Probe {i}");
        let posted = std::time::Instant::now();
        herald.post_job(&title).await;
        stream
            .read_until("the probe job", Duration::from_secs(10), |seen| {
                seen.iter()
                    .any(|e| e.event == "job.posted" && e.titles().contains(&title))
            })
            .await;
        job_delays.push(posted.elapsed());
        let charged = std::time::Instant::now();
        let id = charge(&herald, &format!("probe{i}"), 500).await;
        eventually("the probe charge applied", Duration::from_secs(10), || {
            let (db, id) = (db.clone(), id.clone());
            async move {
                // The id is Herald's own answer, a UUID.
                let status: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT ledger_status FROM charges WHERE id = '{id}'"
                )))
                .fetch_one(&db)
                .await
                .ok()?;
                (status == "applied").then_some(())
            }
        })
        .await;
        charge_delays.push(charged.elapsed());
        if resend.sent().len() >= 19_001 {
            break;
        }
    }
    wait_for_emails(
        &resend,
        19_001,
        Duration::from_secs(200).saturating_sub(start.elapsed()),
    )
    .await;
    let drained = start.elapsed();
    wait_until_settled(&db, Duration::from_secs(20)).await;
    let published = herald.metric("herald_relay_published_total").await - published_before;
    let events = 18_000 + 2 * job_delays.len();
    let calls = resend.calls();
    let limited = calls.iter().filter(|c| c.status == 429).count();
    let (job_p99, charge_p99) = (p99(&mut job_delays), p99(&mut charge_delays));
    let mut republished = Vec::new();
    for reason in ["lost", "unclaimed", "rescheduled"] {
        let n = herald
            .metric(&format!(
                r#"herald_relay_republished_total{{reason="{reason}"}}"#
            ))
            .await;
        republished.push(format!("{reason}={n}"));
    }
    eprintln!(
        "18,000 drained in {drained:?}; {} requests, {limited} answered 429; \
         {published} publishes for {events} events ({}); job p99 {job_p99:?}, \
         charge p99 {charge_p99:?} over {} probes",
        calls.len(),
        republished.join(" "),
        job_delays.len()
    );
    assert!(
        drained <= Duration::from_secs(200),
        "drained in {drained:?}"
    );
    assert_eq!(resend.sent().len(), 19_001, "each email exactly once");
    assert_eq!(distinct_recipients(&resend), 19_001);
    assert_eq!(count(&db, SENT_APPLICATIONS).await, 19_001);
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letters").await, 0);
    assert!(
        limited * 100 <= calls.len() * 5,
        "{limited} of {} requests met 429",
        calls.len()
    );
    assert!(
        published <= 1.05 * events as f64,
        "{published} publishes for {events} events"
    );
    assert!(
        job_delays.len() >= 10,
        "{} probes during the drain",
        job_delays.len()
    );
    assert!(job_p99 <= Duration::from_secs(1), "job p99 {job_p99:?}");
    assert!(
        charge_p99 <= Duration::from_secs(2),
        "charge p99 {charge_p99:?}"
    );
    // The auditor agrees: every invariant holds after the drain.
    let audits = herald.metric("herald_audit_runs_total").await;
    herald
        .wait_for_metric_above("herald_audit_runs_total", audits + 1.0)
        .await;
    for invariant in Invariant::ALL {
        let gauge = format!(
            r#"herald_audit_violations{{invariant="{}"}}"#,
            invariant.name()
        );
        assert_eq!(herald.metric(&gauge).await, 0.0, "{gauge}");
    }
}

/// SIGTERM while Resend is still answering a send: the daemon waits for the
/// answer and records it before it exits (within its shutdown deadline), so
/// the email is sent once, its inbox row is there with the process gone, and
/// the next process sends nothing again.
async fn a_sigterm_during_a_slow_send_records_it_before_the_process_exits(backend: Backend) {
    let mut w = world_on(backend, &[("HERALD_SHUTDOWN_DEADLINE_MS", "20000")]).await;
    let job = w.herald.post_job("Rust engineer").await;
    w.resend.set_latency(Duration::from_secs(3));
    let id = apply(&w.herald, "slow-send", &job).await;
    eventually(
        "the send in flight at Resend",
        Duration::from_secs(20),
        || {
            let arrived = w.resend.arrived();
            async move { (arrived >= 1).then_some(()) }
        },
    )
    .await;
    assert!(w.resend.sent().is_empty(), "the send is still in flight");
    w.herald.terminate();
    let status = w.herald.wait_for_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "graceful exit: {status}");
    // Read with the process gone: whatever is here was committed before exit.
    assert_eq!(w.resend.sent_to("slow-send@example.com"), 1);
    assert_eq!(
        count(&w.db, "SELECT count(*) FROM inbox WHERE consumer = 'email'").await,
        1,
        "the inbox row was committed before the exit"
    );
    assert_eq!(email_status(&w.db, &id).await, "sent");
    // The next process has nothing left to send for it.
    w.resend.set_latency(Duration::ZERO);
    w.herald.restart().await;
    apply(&w.herald, "after-restart", &job).await;
    wait_for_emails(&w.resend, 2, Duration::from_secs(30)).await;
    wait_until_settled(&w.db, Duration::from_secs(30)).await;
    assert_eq!(w.resend.sent_to("slow-send@example.com"), 1);
    assert_eq!(w.resend.sent().len(), 2);
}

/// A consumer worker that panics with a charge in hand: the pool's actor
/// fails once its other workers are done, the supervisor restarts and
/// reports it like any actor, and the charge (left unacknowledged) is
/// reclaimed and applied once.
async fn a_panicking_consumer_worker_is_reported_restarted_and_its_entry_applied_once(
    backend: Backend,
) {
    let w = world_on(
        backend,
        &[("FAILPOINTS", "consumer-worker=1*panic(worker exploded)")],
    )
    .await;
    for i in 0..5 {
        charge(&w.herald, &format!("payer{i}"), 100 + i).await;
    }
    eventually(
        "the ledger pool restarted",
        Duration::from_secs(20),
        || async { (w.herald.actor_status("ledger").await == (1, true)).then_some(()) },
    )
    .await;
    wait_for_count(
        &w.db,
        "SELECT count(*) FROM ledger_entries",
        5,
        Duration::from_secs(30),
    )
    .await;
    wait_until_settled(&w.db, Duration::from_secs(30)).await;
    let events = eventually("the report in Sentry", Duration::from_secs(10), || {
        let events: Vec<String> = w.sentry.events().iter().map(|e| e.to_string()).collect();
        async move {
            (events.iter().any(|e| e.contains("worker exploded"))
                && events.iter().any(|e| e.contains("actor ledger died")))
            .then_some(events)
        }
    })
    .await;
    assert!(
        !events.iter().any(|e| e.contains("escalating")),
        "{events:?}"
    );
    assert_eq!(count(&w.db, "SELECT count(*) FROM ledger_entries").await, 5);
    assert_eq!(w.herald.actor_status("ledger").await, (1, true));
}

on_both_backends!(
    a_panicking_consumer_worker_is_reported_restarted_and_its_entry_applied_once,
    a_sigterm_during_a_slow_send_records_it_before_the_process_exits,
    a_provider_at_two_requests_a_second_drains_every_backlog_in_time,
    a_batch_with_refused_addresses_sends_the_rest_and_dead_letters_each_refused_one,
    a_409_for_a_batch_resend_accepted_before_records_it_as_sent,
    a_hundred_applications_send_exactly_a_hundred_emails,
    a_relay_crash_between_publish_and_mark_republishes_and_still_sends_one_email,
    a_crash_after_the_batch_is_formed_sends_it_once_after_the_restart,
    a_crash_after_resend_accepted_the_batch_resends_it_under_the_same_key,
    a_crash_before_the_inbox_commit_resends_the_batch_under_the_same_key,
    a_rate_limit_s_retry_after_is_a_floor_for_the_next_attempt,
    poison_alerts_sentry_once_and_an_admin_replay_delivers_exactly_one_email,
    a_discarded_dead_letter_is_audited_and_can_no_longer_be_replayed,
    a_poison_message_is_dead_lettered_on_its_first_attempt,
    a_twenty_second_resend_outage_causes_no_retry_storm_and_loses_nothing,
    the_janitor_deletes_what_expired_in_small_batches_and_keeps_what_is_still_needed,
    the_recorded_retry_schedule_of_200_failures_spreads_as_full_jitter,
    fifty_charges_make_exactly_fifty_ledger_entries,
    a_relay_crash_between_publish_and_mark_for_a_charge_republishes_and_applies_it_once,
);

const SENT_APPLICATIONS: &str = "SELECT count(*) FROM applications WHERE email_status = 'sent'";

/// Sessions of the test database that sat `idle in transaction` for over
/// three seconds: a transaction nobody is running. (A live one is idle
/// between its statements for microseconds; the longest legitimate pause is
/// the relay's publish to a Redis that is down, bounded by 2 s.)
async fn abandoned_transactions(db: &Db) -> i64 {
    count(
        db,
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND state = 'idle in transaction'
            AND state_change < now() - interval '3 seconds'",
    )
    .await
}

/// Asserts that no session stays idle in a transaction, sampled for `how_long`.
async fn assert_no_abandoned_transaction_for(db: &Db, how_long: Duration, during: &str) {
    let until = std::time::Instant::now() + how_long;
    // Sampled ten times a second over the window: the absence over time is
    // what is checked, so this is a sampling rate, not a wait for an event.
    let mut samples = tokio::time::interval(Duration::from_millis(100));
    while std::time::Instant::now() < until {
        samples.tick().await;
        let n = abandoned_transactions(db).await;
        if n > 0 {
            let last: Vec<String> = sqlx::query_scalar(
                "SELECT query || ' (' || CAST(now() - state_change AS TEXT) || ')'
                   FROM pg_stat_activity
                  WHERE datname = current_database() AND state = 'idle in transaction'",
            )
            .fetch_all(db)
            .await
            .unwrap_or_default();
            panic!("{n} session(s) idle in transaction for over 3 s {during}; last statements: {last:?}");
        }
    }
}

#[tokio::test]
async fn no_connection_goes_back_to_the_pool_inside_a_transaction() {
    // The relay's pace in production (a poll a second) and a pool grown by a
    // burst of requests: a connection given back with its transaction open
    // then waits many seconds for its next use, as it would in production.
    let mut w = world(&[("HERALD_RELAY__POLL_INTERVAL_MS", "1000")]).await;
    let job = w.herald.post_job("Locks").await;
    futures::future::join_all((0..40).map(|_| w.herald.get("/api/jobs?limit=100"))).await;
    // Intake: new, replayed (same key) and already-applied (another key).
    for i in 0..10 {
        let user = format!("locker{i}");
        apply(&w.herald, &user, &job).await;
        apply(&w.herald, &user, &job).await;
        let again = w
            .herald
            .apply(
                &user_token(&user),
                Some(&format!("again-{user}")),
                &json!({"job_id": job["id"]}),
            )
            .await;
        assert_eq!(again.status(), 200, "already applied");
    }
    wait_for_count(&w.db, SENT_APPLICATIONS, 10, Duration::from_secs(30)).await;
    // Empty relay polls, one a second.
    assert_no_abandoned_transaction_for(&w.db, Duration::from_secs(5), "after empty relay polls")
        .await;

    // A duplicate delivery: one event's stream entry, added again.
    let stream = "herald:stream:application.submitted";
    let redis = w.b.redis();
    let entry = redis
        .cli(&["XRANGE", stream, "-", "+", "COUNT", "1"])
        .unwrap();
    let event = entry
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("an event body")
        .to_string();
    redis.cli(&["XADD", stream, "*", "event", &event]).unwrap();
    eventually(
        "the duplicate deduplicated",
        Duration::from_secs(20),
        || {
            let herald = &w.herald;
            async move {
                let deduped = herald
                    .metric("herald_deliveries_total{consumer=\"email\",result=\"deduped\"}")
                    .await;
                (deduped >= 1.0).then_some(())
            }
        },
    )
    .await;
    assert_no_abandoned_transaction_for(
        &w.db,
        Duration::from_secs(4),
        "after a duplicate delivery",
    )
    .await;

    // Relay publish failures: Redis gone while events are due.
    w.b.redis_mut().kill();
    let job2 = w.herald.post_job("Locks while Redis is down").await;
    apply(&w.herald, "late-locker", &job2).await;
    eventually("publish failures", Duration::from_secs(20), || {
        let herald = &w.herald;
        async move {
            (herald.metric("herald_relay_publish_failures_total").await >= 3.0).then_some(())
        }
    })
    .await;
    assert_no_abandoned_transaction_for(&w.db, Duration::from_secs(4), "after publish failures")
        .await;
    w.b.redis_mut().restart().await;
    wait_for_count(&w.db, SENT_APPLICATIONS, 11, Duration::from_secs(30)).await;
    assert_no_abandoned_transaction_for(&w.db, Duration::from_secs(4), "at the end").await;
    // Every row the daemon touched can be locked at once.
    let mut tx = w.db.begin().await.unwrap();
    for table in ["outbox_events", "idempotency_keys", "applications", "inbox"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT 1 FROM {table} FOR UPDATE NOWAIT"
        )))
        .fetch_all(&mut *tx)
        .await
        .unwrap_or_else(|e| panic!("{table} rows are locked: {e}"));
    }
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn a_request_cut_off_by_its_timeout_inside_its_transaction_leaves_no_lock_behind() {
    // The business transaction pauses 3 s before its commit; the request
    // timeout (500 ms) cuts the handler off in the middle of it.
    let w = world(&[
        ("HERALD_LIMITS__REQUEST_TIMEOUT_MS", "500"),
        ("FAILPOINTS", "business-before-commit=return(3000)"),
    ])
    .await;
    // A pool grown by a burst, so a connection given back inside its
    // transaction would wait a long time for its next use.
    futures::future::join_all((0..40).map(|_| w.herald.get("/api/jobs?limit=100"))).await;
    let r = w
        .herald
        .http
        .post(w.herald.url("/api/charges"))
        .bearer_auth(user_token("cutoff"))
        .header("Idempotency-Key", "cut-off-charge")
        .json(&json!({"amount_cents": 1200, "currency": "EUR", "description": "Listing"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 503, "cut off by the request timeout");
    // At once (well inside the 3 s the transaction would have lasted): no
    // session is left idle in a transaction, and the key's row, the only
    // row the transaction had updated, can be locked without waiting.
    eventually(
        "no session idle in a transaction",
        Duration::from_millis(1500),
        || {
            let db = &w.db;
            async move {
                let n = count(
                    db,
                    "SELECT count(*) FROM pg_stat_activity
                      WHERE datname = current_database() AND state = 'idle in transaction'",
                )
                .await;
                (n == 0).then_some(())
            }
        },
    )
    .await;
    let mut tx = w.db.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM idempotency_keys WHERE key = 'cut-off-charge' FOR UPDATE NOWAIT")
        .fetch_all(&mut *tx)
        .await
        .expect("the key's row is not locked");
    tx.rollback().await.unwrap();
    // Nothing of the cut-off request was kept.
    assert_eq!(count(&w.db, "SELECT count(*) FROM charges").await, 0);
}

/// Sentry events the auditor raised for `invariant`.
fn audit_alerts(sentry: &FakeSentry, invariant: &str) -> usize {
    sentry
        .events()
        .iter()
        .filter(|e| e["tags"]["invariant"] == invariant)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_auditor_sees_each_broken_invariant_once_and_herald_audit_exits_non_zero() {
    let w = world(&[("HERALD_AUDIT__INTERVAL_MS", "200")]).await;
    let url = w.b.database_url();
    // A healthy board: applications mailed, a charge applied.
    let job = w.herald.post_job("Audit").await;
    apply_many(
        &[&w.herald],
        &job,
        (0..5).map(|i| format!("audit{i}")).collect(),
    )
    .await;
    charge(&w.herald, "payer", 900).await;
    wait_for_emails(&w.resend, 5, Duration::from_secs(30)).await;
    wait_until_settled(&w.db, Duration::from_secs(20)).await;
    let (code, out) = herald_audit(&url);
    assert_eq!(code, 0, "a healthy database passes: {out}");
    assert!(out.contains("all 4 invariants hold"), "{out}");
    for invariant in Invariant::ALL {
        let gauge = format!(
            r#"herald_audit_violations{{invariant="{}"}}"#,
            invariant.name()
        );
        assert_eq!(w.herald.metric(&gauge).await, 0.0, "{gauge}");
    }

    // Each invariant broken directly in the database, one after another.
    let breaks: [(Invariant, &[&str]); 4] = [
        (
            Invariant::OneEmailPerApplication,
            &["WITH e AS (
                  INSERT INTO outbox_events (event_id, topic, aggregate_id, payload, settled_at)
                  SELECT gen_random_uuid(), 'application.submitted', id, '{}'::jsonb, now()
                    FROM applications LIMIT 1
                  RETURNING event_id)
              INSERT INTO inbox (consumer, event_id) SELECT 'email', event_id FROM e"],
        ),
        (
            Invariant::OneLedgerEntryPerCharge,
            &[
                "ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_pkey",
                "INSERT INTO ledger_entries SELECT * FROM ledger_entries LIMIT 1",
            ],
        ),
        (
            Invariant::NoSettledEventWithoutEffect,
            &[
                "INSERT INTO outbox_events (event_id, topic, aggregate_id, payload, settled_at)
               SELECT gen_random_uuid(), 'charge.created', id, '{}'::jsonb, now()
                 FROM charges LIMIT 1",
            ],
        ),
        (
            Invariant::NoEventUnsettledTooLong,
            // Written two hours ago and not due for a day: never delivered.
            &["INSERT INTO outbox_events
                   (event_id, topic, aggregate_id, payload, created_at, due_at, batch_id)
               SELECT gen_random_uuid(), 'charge.created', id, '{}'::jsonb,
                      now() - interval '2 hours', now() + interval '1 day', gen_random_uuid()
                 FROM charges LIMIT 1"],
        ),
    ];
    for (invariant, statements) in breaks {
        let name = invariant.name();
        for statement in statements {
            sqlx::query(*statement).execute(&w.db).await.unwrap();
        }
        let gauge = format!(r#"herald_audit_violations{{invariant="{name}"}}"#);
        w.herald.wait_for_metric(&gauge, 1.0).await;
        eventually(
            &format!("a Sentry alert for {name}"),
            Duration::from_secs(10),
            || {
                let n = audit_alerts(&w.sentry, name);
                async move { (n > 0).then_some(()) }
            },
        )
        .await;
        let (code, out) = herald_audit(&url);
        assert_ne!(code, 0, "{name} broken: {out}");
        assert!(out.contains(name) && out.contains("BROKEN"), "{out}");
    }
    // Several audits later: still one alert per invariant (a rising edge),
    // and each gauge still shows its row.
    let audits = w.herald.metric("herald_audit_runs_total").await;
    w.herald
        .wait_for_metric_above("herald_audit_runs_total", audits + 5.0)
        .await;
    for invariant in Invariant::ALL {
        assert_eq!(
            audit_alerts(&w.sentry, invariant.name()),
            1,
            "{}",
            invariant.name()
        );
        let gauge = format!(
            r#"herald_audit_violations{{invariant="{}"}}"#,
            invariant.name()
        );
        assert_eq!(w.herald.metric(&gauge).await, 1.0, "{gauge}");
    }
}

/// A daemon on `b`'s Postgres and the Redis at `redis_url`, sending through
/// `resend` (limited to 2 requests/s) at Herald's default email rate.
async fn daemon_on_redis(b: &Backing, redis_url: &str, resend: &FakeResend) -> Daemon {
    resend.limit_rate(Some(2));
    let base = resend.base_url();
    Daemon::start(
        &b.pg().url(),
        Some(redis_url),
        &[
            ("HERALD_EMAIL__TRANSPORT", "resend"),
            ("RESEND_API_KEY", API_KEY),
            ("RESEND_BASE_URL", &base),
            ("HERALD_RELAY__REDELIVER_AFTER_SECS", "2"),
            ("HERALD_RELAY__POLL_INTERVAL_MS", "200"),
        ],
    )
    .await
}

/// A keyed application sent again with its key: the stored answer, replayed.
async fn assert_replays(herald: &Daemon, user: &str, job: &Value) {
    let r = herald
        .apply(
            &user_token(user),
            Some(&format!("apply-{user}")),
            &json!({"job_id": job["id"]}),
        )
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        r.headers()
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true"),
        "{user}'s retry replayed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_three_master_redis_cluster_every_email_goes_once_and_the_stream_and_ledger_work() {
    let b = Backing::start(Backend::Postgres).await;
    let cluster = support::RedisCluster::start().await;
    let resend = FakeResend::start().await;
    let herald = daemon_on_redis(&b, &cluster.url(), &resend).await;
    let db = b.db().await;
    let mut stream = SseClient::connect(&herald.url("/api/jobs/stream"), None).await;
    let job = herald.post_job("Cluster").await;
    stream
        .read_until("the job on the stream", Duration::from_secs(10), |seen| {
            seen.iter()
                .any(|e| e.event == "job.posted" && e.titles().contains(&"Cluster".to_string()))
        })
        .await;
    // Keys, streams and the hot tier live on whichever master owns their slot.
    apply_many(
        &[&herald],
        &job,
        (0..300).map(|i| format!("slot{i}")).collect(),
    )
    .await;
    assert_replays(&herald, "slot7", &job).await;
    for i in 0..5 {
        charge(&herald, &format!("clusterpayer{i}"), 700).await;
    }
    queue_confirmations(&db, Backend::Postgres, &job, 2_000, "clustered").await;
    wait_for_emails(&resend, 2_300, Duration::from_secs(60)).await;
    wait_until_settled(&db, Duration::from_secs(20)).await;
    assert_eq!(resend.sent().len(), 2_300, "each email exactly once");
    assert_eq!(distinct_recipients(&resend), 2_300);
    assert_eq!(count(&db, "SELECT count(*) FROM ledger_entries").await, 5);
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letters").await, 0);
    assert_eq!(
        herald.metric("herald_redis_fallback").await,
        0.0,
        "the hot tier served"
    );
    let groups = cluster
        .cli(&["XINFO", "GROUPS", "herald:stream:application.submitted"])
        .unwrap_or_default();
    assert!(
        groups.contains("email"),
        "the stream lives in the cluster: {groups}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sentinel_failover_mid_batched_drain_still_sends_every_email_once() {
    let b = Backing::start(Backend::Postgres).await;
    let sentinel = support::RedisSentinel::start().await;
    let resend = FakeResend::start().await;
    let herald = daemon_on_redis(&b, &sentinel.url(), &resend).await;
    let db = b.db().await;
    let job = herald.post_job("Failover").await;
    apply_many(
        &[&herald],
        &job,
        (0..20).map(|i| format!("before{i}")).collect(),
    )
    .await;
    queue_confirmations(&db, Backend::Postgres, &job, 3_000, "failover").await;
    eventually("a third sent", Duration::from_secs(30), || {
        let resend = resend.clone();
        async move { (resend.sent().len() >= 1_000).then_some(()) }
    })
    .await;
    assert_eq!(
        sentinel
            .sentinel
            .cli(&["SENTINEL", "FAILOVER", support::RedisSentinel::SERVICE])
            .as_deref(),
        Some("OK")
    );
    let replica = sentinel.replica.port;
    eventually("the replica promoted", Duration::from_secs(30), || {
        let now = sentinel.primary_port();
        async move { (now == Some(replica)).then_some(()) }
    })
    .await;
    let at_failover = resend.sent().len();
    // After the failover: new keyed applications and a replay, through the new primary.
    apply_many(
        &[&herald],
        &job,
        (0..20).map(|i| format!("after{i}")).collect(),
    )
    .await;
    assert_replays(&herald, "after3", &job).await;
    wait_for_emails(&resend, 3_040, Duration::from_secs(90)).await;
    wait_until_settled(&db, Duration::from_secs(20)).await;
    eprintln!("failover at {at_failover} sent");
    assert!(at_failover < 3_000, "the failover landed mid-drain");
    assert_eq!(resend.sent().len(), 3_040, "each email exactly once");
    assert_eq!(distinct_recipients(&resend), 3_040);
    assert_eq!(count(&db, "SELECT count(*) FROM dead_letters").await, 0);
    let groups = sentinel
        .replica
        .cli(&["XINFO", "GROUPS", "herald:stream:application.submitted"])
        .unwrap_or_default();
    assert!(
        groups.contains("email"),
        "the new primary holds the stream: {groups}"
    );
}

/// One batch of five, two of them to addresses the provider refuses:
/// permissive validation sends three and reports two; each refused email gets
/// its own dead letter, the rest are sent, in one request.
async fn a_batch_with_refused_addresses_sends_the_rest_and_dead_letters_each_refused_one(
    backend: Backend,
) {
    let w = world_on(backend, &[("HERALD_EMAIL__BATCH_LINGER_MS", "1000")]).await;
    let job = w.herald.post_job("Mixed").await;
    w.resend.poison("bad1@example.com", true);
    w.resend.poison("bad2@example.com", true);
    let users = ["good1", "bad1", "good2", "bad2", "good3"];
    let mut ids = Vec::new();
    for user in users {
        ids.push(apply(&w.herald, user, &job).await);
    }
    wait_until_settled(&w.db, Duration::from_secs(30)).await;
    let batch_calls: Vec<_> = w.resend.calls().into_iter().filter(|c| c.batch).collect();
    assert_eq!(batch_calls.len(), 1, "one request: {batch_calls:?}");
    assert_eq!(batch_calls[0].emails, 5);
    for (user, id) in users.iter().zip(&ids) {
        let (sent, status) = if user.starts_with("good") {
            (1, "sent")
        } else {
            (0, "dead")
        };
        assert_eq!(
            w.resend.sent_to(&format!("{user}@example.com")),
            sent,
            "{user}"
        );
        assert_eq!(email_status(&w.db, id).await, status, "{user}");
    }
    assert_eq!(count(&w.db, "SELECT count(*) FROM dead_letters").await, 2);
    assert_eq!(
        count(&w.db, "SELECT count(*) FROM inbox WHERE consumer = 'email'").await,
        3
    );
}

/// A batch Resend accepted, whose answer was lost (a crash), sent again after
/// `email.from` changed: Resend answers 409 `invalid_idempotent_request` (the
/// key was used with another body). The batch was sent: recorded as sent,
/// never sent twice, nothing dead.
async fn a_409_for_a_batch_resend_accepted_before_records_it_as_sent(backend: Backend) {
    let mut w = world_on(
        backend,
        &[
            ("HERALD_EMAIL__BATCH_LINGER_MS", "1000"),
            ("FAILPOINTS", "batch-after-send=1*return"),
        ],
    )
    .await;
    let job = w.herald.post_job("Renamed").await;
    let mut ids = Vec::new();
    for user in ["ren1", "ren2"] {
        ids.push(apply(&w.herald, user, &job).await);
    }
    let status = w.herald.wait_for_exit(Duration::from_secs(20)).await;
    assert!(!status.success(), "the failpoint aborted the daemon");
    assert_eq!(w.resend.sent().len(), 2, "Resend accepted the batch");
    w.herald.set_env("FAILPOINTS", None);
    w.herald.set_env(
        "HERALD_EMAIL__FROM",
        Some("Renamed Jobs <jobs@renamed.test>"),
    );
    w.herald.restart().await;
    for id in &ids {
        eventually("recorded as sent", Duration::from_secs(30), || {
            let (db, id) = (w.db.clone(), id.clone());
            async move { (email_status(&db, &id).await == "sent").then_some(()) }
        })
        .await;
    }
    let answers: Vec<u16> = w
        .resend
        .calls()
        .iter()
        .filter(|c| c.batch)
        .map(|c| c.status)
        .collect();
    assert_eq!(answers, [200, 409], "the repeat met the changed body");
    assert_eq!(w.resend.sent().len(), 2, "nothing sent twice");
    assert_eq!(count(&w.db, "SELECT count(*) FROM dead_letters").await, 0);
}
