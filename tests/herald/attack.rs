//! `herald attack` against a live daemon: 1,000 logical
//! operations, 30 % sent twice concurrently, 15 % of responses lost by the
//! attack's proxy, while the fake Resend reports every email it accepted
//! `delivered` by webhook. The count is checked where the effects land —
//! the fake Resend, the ledger table, the reports applied — as well as by
//! the command's own verdict (read from `/metrics`) and `herald audit`.

use crate::support;

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use rand::Rng;
use support::{count, eventually, free_port, herald_audit, Daemon, Stack, ADMIN_TOKEN, JWT_SECRET};

/// The daemon settings of both runs: fast email and relay, and a killed
/// process's claims and published events back soon.
const FAST: [(&str, &str); 4] = [
    ("HERALD_EMAIL__WORKERS", "8"),
    ("HERALD_RELAY__MAX_PUBLISH_PER_SEC", "5000"),
    ("HERALD_RELAY__REDELIVER_AFTER_SECS", "2"),
    ("HERALD_IDEMPOTENCY__LEASE_SECS", "3"),
];

/// `herald attack` with the figures against `herald`.
fn attack(herald: &Daemon, transcript: &std::path::Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"));
    command
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
        .arg(transcript)
        .env("HERALD_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("HERALD_JWT_SECRET", JWT_SECRET)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// The verdict passed, and the effects are exact where they land: 500
/// applications -> 500 distinct emails at the fake Resend, 500 charges ->
/// 500 ledger entries, nothing more once every event has settled. The
/// transcript shows one key per operation and that responses were lost.
async fn assert_exact(stack: &Stack, output: std::process::Output, transcript: &std::path::Path) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the verdict passed");
    assert!(stdout.contains("PASS"), "{stdout}");
    let db = &stack.db;
    assert_eq!(count(db, "SELECT count(*) FROM applications").await, 500);
    assert_eq!(count(db, "SELECT count(*) FROM charges").await, 500);
    stack.wait_until_settled(Duration::from_secs(60)).await;
    assert_eq!(count(db, "SELECT count(*) FROM ledger_entries").await, 500);
    let sent = stack.resend.sent();
    let recipients: HashSet<&str> = sent.iter().map(|s| s.to.as_str()).collect();
    assert_eq!(recipients.len(), 500, "every applicant got an email");
    assert_eq!(sent.len(), 500, "and only one");
    // Webhooks arrived throughout (through the kills too): each applied once.
    stack
        .wait_until_reports_applied(500, Duration::from_secs(120))
        .await;
    let (code, audit) = herald_audit(&stack.backing.database_url());
    assert_eq!(code, 0, "the auditor finds every invariant held: {audit}");

    let lines = std::fs::read_to_string(transcript).unwrap();
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
async fn a_thousand_duplicated_operations_with_lost_responses_have_exactly_a_thousand_effects() {
    let stack = Stack::start(&FAST).await;
    stack.resend.auto_deliver(true);
    let transcript = tempfile::NamedTempFile::new().unwrap();
    let output = attack(&stack.herald, transcript.path())
        .output()
        .await
        .expect("run herald attack");
    assert_exact(&stack, output, transcript.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_attack_stays_exact_when_the_daemon_is_killed_three_times() {
    // Fixed ports, so the restarted daemon answers where the attack points.
    let public = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let mut settings = FAST.to_vec();
    settings.extend([
        ("HERALD_LISTEN", public.as_str()),
        ("HERALD_ADMIN_LISTEN", admin.as_str()),
    ]);
    let mut stack = Stack::start(&settings).await;
    stack.resend.auto_deliver(true);
    let transcript = tempfile::NamedTempFile::new().unwrap();
    let running = attack(&stack.herald, transcript.path())
        .spawn()
        .expect("start herald attack");

    // Three SIGKILLs at random points of progress (rows committed so far),
    // each followed by a restart on the same ports.
    let mut at: Vec<i64> = (0..3).map(|_| rand::rng().random_range(50..900)).collect();
    at.sort_unstable();
    for threshold in at {
        let db = stack.db.clone();
        eventually(&format!("{threshold} operations committed"), Duration::from_secs(120), || {
            let db = db.clone();
            async move {
                let done = count(&db, "SELECT (SELECT count(*) FROM applications) + (SELECT count(*) FROM charges)").await;
                (done >= threshold).then_some(())
            }
        })
        .await;
        stack.herald.kill();
        eprintln!("killed at {threshold} committed operations");
        stack.herald.restart().await;
    }
    let output = running.wait_with_output().await.expect("attack output");
    assert_exact(&stack, output, transcript.path()).await;
}
