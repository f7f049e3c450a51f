//! docs/RUNBOOK.md works as written: every command marked
//! `<!-- call: NAME -->` is taken from the document itself and run with `sh`
//! (curl) against a live daemon whose Resend refuses three recipients, so
//! there are dead letters to list, replay and discard, and reports one
//! email bounced, so there is a suppression to find and lift.

use crate::support;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use support::{count, eventually, user_token, Daemon, Stack, ADMIN_TOKEN};

/// The runbook's calls: name -> the command of the `sh` block after its marker.
fn runbook_calls() -> HashMap<String, String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/RUNBOOK.md"))
        .expect("docs/RUNBOOK.md");
    let mut calls = HashMap::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line
            .strip_prefix("<!-- call: ")
            .and_then(|rest| rest.strip_suffix(" -->"))
        else {
            continue;
        };
        assert_eq!(
            lines.next(),
            Some("```sh"),
            "call {name} is followed by a sh block"
        );
        let command: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        calls.insert(name.to_string(), command.join("\n"));
    }
    calls
}

/// A `journalctl` for the test: the daemon's log is its stderr file, so
/// this stand-in prints that file whatever it is asked; the rest of the
/// runbook's pipeline runs as written.
fn journal_shim(herald: &Daemon) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("journalctl");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh
cat '{}'
",
            herald.log_path().display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Runs one call as the on-call would: `sh -c`, with the documented variables.
fn run(calls: &HashMap<String, String>, name: &str, herald: &Daemon, id: Option<&str>) -> String {
    run_with(calls, name, herald, id, "")
}

/// [`run`] with `EMAIL` set to an applicant's address.
fn run_with(
    calls: &HashMap<String, String>,
    name: &str,
    herald: &Daemon,
    id: Option<&str>,
    email: &str,
) -> String {
    let shim = journal_shim(herald);
    // `herald` itself is on the on-call's PATH, as the package installs it.
    let herald_bin = std::path::Path::new(env!("CARGO_BIN_EXE_herald"));
    let path = format!(
        "{}:{}:{}",
        shim.path().display(),
        herald_bin
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
        std::env::var("PATH").unwrap_or_default()
    );
    let command = calls
        .get(name)
        .unwrap_or_else(|| panic!("no call {name} in the runbook"));
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("ADMIN", &herald.admin)
        .env("HERALD_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("USER", "oncall-test")
        .env("ID", id.unwrap_or(""))
        .env("EMAIL", email)
        .env(
            "HERALD_DATABASE_URL",
            herald.env_value("HERALD_DATABASE_URL").unwrap_or_default(),
        )
        .env("PATH", path)
        .output()
        .expect("sh (and curl: scripts/test installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "runbook call {name} failed: {command}\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_admin_call_in_the_runbook_works_as_written() {
    let calls = runbook_calls();
    let expected = [
        "status",
        "signals",
        "deliveries",
        "outbox",
        "dlq-list",
        "dlq-replay-one",
        "dlq-replay-topic",
        "dlq-discard",
        "mismatches",
        "audit",
        "suppression-check",
        "suppression-lift",
        "webhooks",
    ];
    for name in expected {
        assert!(calls.contains_key(name), "the runbook documents {name}");
    }
    assert_eq!(calls.len(), expected.len(), "every call is exercised here");

    let stack = Stack::start(&[
        ("HERALD_DLQ__CHECK_INTERVAL_MS", "200"),
        ("HERALD_LOG__FORMAT", "json"),
    ])
    .await;
    let (herald, resend, db) = (&stack.herald, &stack.resend, stack.db.clone());
    let job = herald.post_job("Runbook").await;
    let users = ["replayme", "discardme", "bytopic"];
    for user in users {
        resend.poison(&format!("{user}@example.com"), true);
        let r = herald
            .apply(
                &user_token(user),
                Some(&format!("apply-{user}")),
                &json!({"job_id": job["id"]}),
            )
            .await;
        assert_eq!(r.status(), 201);
    }
    eventually("three dead letters", Duration::from_secs(30), || {
        let db = db.clone();
        async move { (count(&db, "SELECT count(*) FROM dead_letters").await == 3).then_some(()) }
    })
    .await;

    herald.wait_for_metric("herald_dlq_depth", 3.0).await;

    // Triage.
    let status: Value = serde_json::from_str(&run(&calls, "status", herald, None)).unwrap();
    assert!(
        status["actors"].as_array().is_some_and(|a| !a.is_empty()),
        "{status}"
    );
    assert_eq!(status["redis"], "healthy");
    let signals = run(&calls, "signals", herald, None);
    for metric in [
        "herald_idempotency_requests_total",
        "herald_delivery_attempts_total",
        "herald_outbox_lag_seconds",
        "herald_dlq_depth 3",
    ] {
        assert!(signals.contains(metric), "{metric} in:\n{signals}");
    }
    let deliveries = run(&calls, "deliveries", herald, None);
    assert!(deliveries.contains("result=\"dead\""));
    assert!(deliveries.contains("herald_email_pace_per_sec{limiter="));

    // A 422 spike: the request log finds the caller by its request id.
    let reused = herald
        .apply(
            &user_token("replayme"),
            Some("apply-replayme"),
            &json!({"job_id": job["id"], "cover_letter": "another body"}),
        )
        .await;
    assert_eq!(reused.status(), 422);
    let request_id = reused.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let found = eventually(
        "the mismatch in the request log",
        Duration::from_secs(10),
        || {
            let found = run(&calls, "mismatches", herald, None);
            let present = found.contains(&request_id);
            async move { present.then_some(found) }
        },
    )
    .await;
    for line in found.lines() {
        let entry: Value = serde_json::from_str(line).expect("a JSON log line");
        assert_eq!(entry["idempotency"], "mismatch", "{line}");
        assert_eq!(entry["code"], "idempotency_key_reused", "{line}");
        assert_eq!(entry["route"], "/api/applications", "{line}");
        assert!(
            !line.contains("Bearer") && !line.contains("@example.com"),
            "{line}"
        );
    }
    assert!(run(&calls, "outbox", herald, None).contains("herald_outbox_pending"));

    // The DLQ: list, fix the cause, replay one, discard one, replay the topic.
    let list: Value = serde_json::from_str(&run(&calls, "dlq-list", herald, None)).unwrap();
    let letters = list["items"].as_array().expect("items");
    assert_eq!(letters.len(), 3, "{list}");
    // Which letter is whose, through its event's payload.
    let mut by_user: HashMap<String, String> = HashMap::new();
    for letter in letters {
        let event_id = letter["event_id"].as_str().unwrap().to_string();
        let email: String = sqlx::query_scalar(
            "SELECT payload->>'email' FROM outbox_events WHERE CAST(event_id AS TEXT) = $1",
        )
        .bind(event_id)
        .fetch_one(&db)
        .await
        .unwrap();
        by_user.insert(email, letter["id"].as_str().unwrap().to_string());
    }
    for user in users {
        resend.poison(&format!("{user}@example.com"), false);
    }
    let replayed: Value = serde_json::from_str(&run(
        &calls,
        "dlq-replay-one",
        herald,
        Some(&by_user["replayme@example.com"]),
    ))
    .unwrap();
    assert_eq!(replayed["result"], "replayed", "{replayed}");
    let discarded: Value = serde_json::from_str(&run(
        &calls,
        "dlq-discard",
        herald,
        Some(&by_user["discardme@example.com"]),
    ))
    .unwrap();
    assert_eq!(discarded["result"], "discarded", "{discarded}");
    let by_topic: Value =
        serde_json::from_str(&run(&calls, "dlq-replay-topic", herald, None)).unwrap();
    assert_eq!(
        by_topic["replayed"], 1,
        "only the one still open: {by_topic}"
    );

    eventually(
        "the replayed applicants' emails",
        Duration::from_secs(30),
        || async {
            (resend.sent_to("replayme@example.com") == 1
                && resend.sent_to("bytopic@example.com") == 1)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        resend.sent_to("discardme@example.com"),
        0,
        "a discarded letter stays undelivered"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM dlq_audit WHERE actor = 'admin (note: oncall-test)'"
        )
        .await,
        3,
        "every action audited with who did it"
    );
    herald.wait_for_metric("herald_dlq_depth", 0.0).await;

    // Section 6: the audit, as written (dead letters and replays break nothing).
    let audit = run(&calls, "audit", herald, None);
    assert!(audit.contains("all 4 invariants hold"), "{audit}");

    // Section 7: an applicant whose confirmation bounced.
    let r = herald
        .apply(
            &user_token("Bouncy"),
            Some("apply-bouncy"),
            &json!({"job_id": job["id"]}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let email_id = eventually("bouncy's email sent", Duration::from_secs(30), || async {
        resend.email_id_of("Bouncy@example.com")
    })
    .await;
    resend.emit(
        "email.bounced",
        &email_id,
        json!({ "bounce": { "type": "Permanent", "message": "no such user" } }),
    );
    let email = "Bouncy@example.com";
    let found = eventually(
        "the address suppressed",
        Duration::from_secs(30),
        || async {
            let listed: Value =
                serde_json::from_str(&run_with(&calls, "suppression-check", herald, None, email))
                    .unwrap();
            let item = listed["items"][0].clone();
            (!item.is_null()).then_some(item)
        },
    )
    .await;
    assert_eq!(found["address"], "bouncy@example.com");
    assert_eq!(found["reason"], "bounced");
    assert_eq!(found["email_id"], email_id.as_str());
    let webhooks = run(&calls, "webhooks", herald, None);
    assert!(
        webhooks
            .contains(r#"herald_webhook_events_total{type="email.bounced",outcome="applied"} 1"#),
        "{webhooks}"
    );
    let lifted: Value =
        serde_json::from_str(&run_with(&calls, "suppression-lift", herald, None, email)).unwrap();
    assert_eq!(lifted["lifted"]["reason"], "bounced", "{lifted}");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM admin_audit WHERE actor = 'admin (note: oncall-test)' AND action = 'suppression.lift'"
        )
        .await,
        1,
        "the lift audited with who did it"
    );
}
