//! `herald attack` against a live daemon (SPEC 10.1): 1,000 logical
//! operations, 30 % sent twice concurrently, 15 % of responses lost by the
//! attack's proxy. The count is checked where the effects land — the fake
//! Resend and the ledger table — as well as by the command's own verdict
//! (read from `/metrics`).

mod support;

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use rand::Rng;
use support::fake_resend::{FakeResend, API_KEY};
use support::{count, eventually, free_port, Daemon, Postgres, Redis, ADMIN_TOKEN, JWT_SECRET};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_duplicated_operations_with_lost_responses_have_exactly_a_thousand_effects() {
    let pg = Postgres::start().await;
    let redis = Redis::start().await;
    let resend = FakeResend::start().await;
    let base = resend.base_url();
    let herald = Daemon::start(
        &pg.url(),
        Some(&redis.url()),
        &[
            ("HERALD_EMAIL__TRANSPORT", "resend"),
            ("RESEND_API_KEY", API_KEY),
            ("RESEND_BASE_URL", &base),
            ("HERALD_EMAIL__MAX_PER_SEC", "1000"),
            ("HERALD_EMAIL__WORKERS", "8"),
            ("HERALD_RELAY__MAX_PUBLISH_PER_SEC", "5000"),
        ],
    )
    .await;
    let transcript = tempfile::NamedTempFile::new().unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "attack",
            "--target",
            &herald.public,
            "--admin",
            &herald.admin,
        ])
        .args(["--ops", "1000", "--dup-rate", "0.3", "--concurrency", "32"])
        .args(["--drop-response-rate", "0.15", "--drain-secs", "120"])
        .arg("--transcript")
        .arg(transcript.path())
        .env("HERALD_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("HERALD_JWT_SECRET", JWT_SECRET)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .expect("run herald attack");
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the verdict passed");
    assert!(stdout.contains("PASS"), "{stdout}");

    // Where the effects land: 500 applications -> 500 distinct emails, 500
    // charges -> 500 ledger entries; nothing more arrives once all settled.
    let db = pg.pool().await;
    assert_eq!(count(&db, "SELECT count(*) FROM applications").await, 500);
    assert_eq!(count(&db, "SELECT count(*) FROM charges").await, 500);
    eventually("every event settled", Duration::from_secs(60), || {
        let db = db.clone();
        async move {
            (count(
                &db,
                "SELECT count(*) FROM outbox_events WHERE settled_at IS NULL",
            )
            .await
                == 0)
                .then_some(())
        }
    })
    .await;
    assert_eq!(count(&db, "SELECT count(*) FROM ledger_entries").await, 500);
    let sent = resend.sent();
    let recipients: HashSet<&str> = sent.iter().map(|s| s.to.as_str()).collect();
    assert_eq!(sent.len(), 500, "one email per application");
    assert_eq!(recipients.len(), 500);

    // The losses and duplicates really happened: more attempts than
    // operations, retries that reused their operation's key.
    let lines = std::fs::read_to_string(transcript.path()).unwrap();
    let records: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let keys: HashSet<&str> = records.iter().filter_map(|r| r["key"].as_str()).collect();
    assert_eq!(keys.len(), 1000, "one key per logical operation");
    let first = records
        .iter()
        .filter(|r| r["attempt"].as_u64() == Some(1))
        .count();
    let retries = records.len() - first;
    // 1,000 operations plus about 300 second sends (binomial, sd ~15).
    assert!((1_200..=1_400).contains(&first), "{first} first attempts");
    assert!(retries >= 100, "lost responses were retried: {retries}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_attack_stays_exact_when_the_daemon_is_killed_three_times() {
    let pg = Postgres::start().await;
    let redis = Redis::start().await;
    let resend = FakeResend::start().await;
    let base = resend.base_url();
    // Fixed ports, so the restarted daemon answers where the attack points.
    let public = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let mut herald = Daemon::start(
        &pg.url(),
        Some(&redis.url()),
        &[
            ("HERALD_LISTEN", &public),
            ("HERALD_ADMIN_LISTEN", &admin),
            ("HERALD_EMAIL__TRANSPORT", "resend"),
            ("RESEND_API_KEY", API_KEY),
            ("RESEND_BASE_URL", &base),
            ("HERALD_EMAIL__MAX_PER_SEC", "1000"),
            ("HERALD_EMAIL__WORKERS", "8"),
            ("HERALD_RELAY__MAX_PUBLISH_PER_SEC", "5000"),
            // A killed process's claims and published events come back soon.
            ("HERALD_RELAY__REDELIVER_AFTER_SECS", "2"),
            ("HERALD_IDEMPOTENCY__LEASE_SECS", "3"),
        ],
    )
    .await;
    let attack = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "attack",
            "--target",
            &herald.public,
            "--admin",
            &herald.admin,
        ])
        .args(["--ops", "1000", "--dup-rate", "0.3", "--concurrency", "32"])
        .args(["--drop-response-rate", "0.15", "--drain-secs", "120"])
        .env("HERALD_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("HERALD_JWT_SECRET", JWT_SECRET)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start herald attack");

    // Three SIGKILLs at random points of progress (rows committed so far),
    // each followed by a restart on the same ports.
    let db = pg.pool().await;
    let mut at: Vec<i64> = (0..3).map(|_| rand::rng().random_range(50..900)).collect();
    at.sort_unstable();
    for threshold in at {
        eventually(&format!("{threshold} operations committed"), Duration::from_secs(120), || {
            let db = db.clone();
            async move {
                let done = count(&db, "SELECT (SELECT count(*) FROM applications) + (SELECT count(*) FROM charges)").await;
                (done >= threshold).then_some(())
            }
        })
        .await;
        herald.kill();
        eprintln!("killed at {threshold} committed operations");
        herald.restart().await;
    }
    let output = attack.wait_with_output().await.expect("attack output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success(),
        "the verdict passed across the kills"
    );
    assert!(stdout.contains("PASS"), "{stdout}");

    assert_eq!(count(&db, "SELECT count(*) FROM applications").await, 500);
    assert_eq!(count(&db, "SELECT count(*) FROM charges").await, 500);
    eventually("every event settled", Duration::from_secs(60), || {
        let db = db.clone();
        async move {
            (count(
                &db,
                "SELECT count(*) FROM outbox_events WHERE settled_at IS NULL",
            )
            .await
                == 0)
                .then_some(())
        }
    })
    .await;
    assert_eq!(count(&db, "SELECT count(*) FROM ledger_entries").await, 500);
    let sent = resend.sent();
    let recipients: HashSet<&str> = sent.iter().map(|s| s.to.as_str()).collect();
    assert_eq!(recipients.len(), 500, "every applicant got an email");
    assert_eq!(sent.len(), 500, "and only one");
}
