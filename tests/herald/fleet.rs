//! Several processes on one Postgres and one Redis, as DEPLOY.md runs them:
//! one provider limit for all of them (the fake Resend enforcing its rate,
//! and saying it in `ratelimit-limit`), and what a keyed write leaves in the
//! Redis the broker depends on.

use crate::support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::fake_resend::{FakeResend, API_KEY};
use support::{count, eventually, user_token, Backend, Backing, Daemon};

/// Applies to `job` once per user, 32 at a time, spread over `daemons`.
async fn apply_through(daemons: &[&Daemon], job: &Value, users: usize, prefix: &str) {
    use futures::StreamExt;
    let statuses: Vec<u16> = futures::stream::iter(0..users)
        .map(|i| {
            let daemon = daemons[i % daemons.len()];
            let user = format!("{prefix}{i}");
            async move {
                daemon
                    .apply(
                        &user_token(&user),
                        Some(&format!("apply-{user}")),
                        &json!({ "job_id": job["id"] }),
                    )
                    .await
                    .status()
                    .as_u16()
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(
        statuses.iter().all(|s| *s == 201),
        "every application taken"
    );
}

/// Sends `users` applications through `daemons` and waits until the fake
/// has each one's email, within `within` of the first; then checks each
/// was sent once and returns (requests, of them answered 429).
async fn mail_everyone(
    b: &Backing,
    resend: &FakeResend,
    daemons: &[&Daemon],
    users: usize,
    within: Duration,
) -> (usize, usize) {
    let job = daemons[0].post_job("Fleet").await;
    let started = Instant::now();
    apply_through(daemons, &job, users, "fleet").await;
    eventually(
        &format!("{users} emails at the fake Resend"),
        within.saturating_sub(started.elapsed()),
        || {
            let sent = resend.sent().len();
            async move { (sent >= users).then_some(()) }
        },
    )
    .await;
    let took = started.elapsed();
    let sent = resend.sent();
    let recipients: HashSet<&str> = sent.iter().map(|s| s.to.as_str()).collect();
    assert_eq!(sent.len(), users, "each email exactly once");
    assert_eq!(recipients.len(), users);
    let db = b.db().await;
    eventually(
        "every application marked sent",
        Duration::from_secs(20),
        || {
            let db = db.clone();
            async move {
                let n = count(
                    &db,
                    "SELECT count(*) FROM applications WHERE email_status = 'sent'",
                )
                .await;
                (n == users as i64).then_some(())
            }
        },
    )
    .await;
    let calls: Vec<_> = resend.calls().into_iter().filter(|c| c.batch).collect();
    let refused = calls.iter().filter(|c| c.status == 429).count();
    println!(
        "{users} applications through {} processes mailed in {took:?}: {} requests, {refused} answered 429",
        daemons.len(),
        calls.len()
    );
    (calls.len(), refused)
}

fn sending_to(resend: &FakeResend, per_sec: &'static str) -> Vec<(&'static str, String)> {
    vec![
        ("HERALD_EMAIL__TRANSPORT", "resend".into()),
        ("RESEND_API_KEY", API_KEY.into()),
        ("RESEND_BASE_URL", resend.base_url()),
        ("HERALD_EMAIL__MAX_PER_SEC", per_sec.into()),
    ]
}

async fn daemon(b: &Backing, env: &[(&'static str, String)]) -> Daemon {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    b.daemon(&env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_at_the_accounts_two_requests_a_second_send_two_together() {
    let b = Backing::start(Backend::Postgres).await;
    let resend = FakeResend::start().await;
    resend.limit_rate(Some(2));
    let env = sending_to(&resend, "2");
    let (first, second) = (daemon(&b, &env).await, daemon(&b, &env).await);
    let (requests, refused) = mail_everyone(
        &b,
        &resend,
        &[&first, &second],
        2_000,
        Duration::from_secs(60),
    )
    .await;
    assert!(
        refused * 100 <= requests * 5,
        "{refused} of {requests} requests answered 429 (at most 5 %)"
    );
    // Both took their slots from the one limiter in Redis.
    for d in [&first, &second] {
        assert_eq!(
            d.metric(r#"herald_email_pace_per_sec{limiter="fleet"}"#)
                .await,
            2.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_process_configured_above_what_the_provider_advertises_paces_to_the_provider() {
    let b = Backing::start(Backend::Postgres).await;
    let resend = FakeResend::start().await;
    // Allows, and says on every answer, 1 request a second.
    resend.limit_rate(Some(1));
    let herald = daemon(&b, &sending_to(&resend, "2")).await;
    let (requests, refused) =
        mail_everyone(&b, &resend, &[&herald], 2_000, Duration::from_secs(60)).await;
    assert!(
        refused * 100 <= requests * 10,
        "{refused} of {requests} requests answered 429 (at most 10 %)"
    );
    assert_eq!(
        herald
            .metric(r#"herald_email_pace_per_sec{limiter="fleet"}"#)
            .await,
        1.0,
        "paced to the advertised 1/s"
    );
    // The provider allows 2 again, and says so: back up to the configured rate.
    resend.limit_rate(Some(2));
    let job = herald.post_job("Again").await;
    support::apply_as(&herald, "again", &job).await;
    herald
        .wait_for_metric(r#"herald_email_pace_per_sec{limiter="fleet"}"#, 2.0)
        .await;
}

#[tokio::test]
async fn the_largest_keyed_write_keeps_a_few_hundred_bytes_in_redis_and_replays_byte_for_byte() {
    let b = Backing::start(Backend::Postgres).await;
    let herald = b.daemon(&[]).await;
    let job = herald.post_job("Letters").await;
    // The longest cover letter allowed, in 4-byte characters: a 40 KB body.
    let body = json!({ "job_id": job["id"], "cover_letter": "𝄞".repeat(10_000) });
    let token = user_token("writer");
    let first = herald.apply(&token, Some("long-letter"), &body).await;
    assert_eq!(first.status(), 201);
    let first_body = first.bytes().await.expect("body");
    assert!(first_body.len() > 40_000, "{} bytes", first_body.len());

    let keys = b
        .redis()
        .cli(&["--scan", "--pattern", "herald:idem:*"])
        .unwrap_or_default();
    let usages: Vec<u64> = keys
        .lines()
        .filter(|k| !k.ends_with(":probe"))
        .map(|k| {
            b.redis()
                .cli(&["MEMORY", "USAGE", k])
                .and_then(|u| u.parse().ok())
                .expect("MEMORY USAGE")
        })
        .collect();
    assert_eq!(usages.len(), 1, "one key for the write: {keys}");
    println!("a 40 KB response keeps {} bytes in Redis", usages[0]);
    assert!(usages[0] <= 4_096, "{} bytes in Redis", usages[0]);

    // The replay is the same response, byte for byte (read from Postgres).
    let replay = herald.apply(&token, Some("long-letter"), &body).await;
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.bytes().await.expect("body"), first_body);
}
