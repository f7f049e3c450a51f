//! The failure matrix of `docs/ARCHITECTURE.md`, walked row by row against
//! one production stack (Postgres, Redis, fake Resend, one daemon): for each
//! row, applications are sent through the retrying client while that row's
//! component is killed or cut off, then it recovers. The matrix's "what is
//! lost" column says "nothing" for every row; this test holds it to that:
//! every application is answered 201 and gets exactly one email. Meanwhile
//! the fake Resend reports each email it accepted `delivered` by webhook,
//! retrying while Herald (or its database) is down: every report lands
//! once, and `herald audit` finds every invariant held at the end.
//!
//! The rows are read from the document itself, so a row added there without
//! a scenario here (or the reverse) fails the test.

use crate::support;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use herald::client::lossy_proxy::LossyProxy;
use herald::client::RetryingClient;
use support::fake_resend::Mode;
use support::{count, eventually, patient_client, send_applications, wait_answered, Stack};

/// Applications per row.
const N: usize = 30;

/// `(component, what is lost)` of every row of the document's failure matrix.
fn matrix_rows() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/ARCHITECTURE.md"),
    )
    .expect("docs/ARCHITECTURE.md");
    let table = doc
        .split("## Failure matrix")
        .nth(1)
        .expect("a `## Failure matrix` section");
    table
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2) // header and separator
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            (cells[0].to_string(), cells[2].to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_row_of_the_failure_matrix_loses_nothing() {
    let rows = matrix_rows();
    assert!(rows.len() >= 7, "the matrix has its rows: {rows:?}");
    let mut s = Stack::start(&[
        ("HERALD_RELAY__REDELIVER_AFTER_SECS", "2"),
        ("HERALD_RELAY__POLL_INTERVAL_MS", "200"),
        ("HERALD_RETRY__BASE_MS", "100"),
        ("HERALD_RETRY__CAP_MS", "1000"),
        ("HERALD_IDEMPOTENCY__LEASE_SECS", "3"),
        ("HERALD_SHUTDOWN_DEADLINE_MS", "5000"),
        ("HERALD_SSE__SHUTDOWN_GRACE_MS", "1000"),
    ])
    .await;
    // Restarts come back on the same ports (the webhooks' too).
    s.herald.keep_ports();
    s.resend.auto_deliver(true);
    let job = s.herald.post_job("Failure matrix").await;
    let client = patient_client(&s.herald.public);
    let mut expected = 0;

    for (row, (component, lost)) in rows.iter().enumerate() {
        assert!(
            lost.starts_with("nothing"),
            "{component}: the matrix promises nothing is lost, not `{lost}`"
        );
        let users: Vec<String> = (0..N).map(|i| format!("row{row}user{i}")).collect();
        let answered = Arc::new(AtomicUsize::new(0));
        let statuses = match component.as_str() {
            "Herald process (kill -9)" => {
                let load = send_applications(&client, &job, users.clone(), 8, answered.clone());
                wait_answered(&answered, N / 4).await;
                s.herald.kill();
                s.herald.restart().await;
                load.await.unwrap()
            }
            "Herald process (SIGTERM)" => {
                let load = send_applications(&client, &job, users.clone(), 8, answered.clone());
                wait_answered(&answered, N / 4).await;
                s.herald.terminate();
                let status = s.herald.wait_for_exit(Duration::from_secs(10)).await;
                assert!(status.success(), "graceful exit: {status}");
                s.herald.restart().await;
                load.await.unwrap()
            }
            "one actor (panic)" => {
                s.herald.set_env(
                    "FAILPOINTS",
                    Some("outbox-relay-step=3*off->1*panic(failure matrix)"),
                );
                s.herald.restart().await;
                s.herald.set_env("FAILPOINTS", None);
                let load = send_applications(&client, &job, users.clone(), 8, answered.clone());
                let statuses = load.await.unwrap();
                // A restarted process counts its restarts from zero.
                eventually("the relay restarted", Duration::from_secs(20), || async {
                    (s.herald.actor_status("outbox_relay").await.0 > 0).then_some(())
                })
                .await;
                statuses
            }
            "Redis" => {
                s.backing.redis_mut().kill();
                s.herald.wait_for_metric("herald_redis_fallback", 1.0).await;
                let statuses = send_applications(&client, &job, users.clone(), 8, answered.clone())
                    .await
                    .unwrap();
                s.backing.redis_mut().restart().await;
                s.herald.wait_for_metric("herald_redis_fallback", 0.0).await;
                statuses
            }
            "Postgres" => {
                let unavailable = |client: &RetryingClient| {
                    client
                        .transcript()
                        .records()
                        .iter()
                        .filter(|r| r.status == Some(503))
                        .count()
                };
                let seen_before = unavailable(&client);
                s.backing.pg_mut().stop();
                let load = send_applications(&client, &job, users.clone(), 8, answered.clone());
                eventually(
                    "503 while Postgres is down",
                    Duration::from_secs(30),
                    || {
                        let n = unavailable(&client);
                        async move { (n > seen_before).then_some(()) }
                    },
                )
                .await;
                s.backing.pg_mut().restart().await;
                load.await.unwrap()
            }
            "Resend" => {
                s.resend.set_mode(Mode::Down(503));
                let statuses = send_applications(&client, &job, users.clone(), 8, answered.clone())
                    .await
                    .unwrap();
                eventually("sends failing", Duration::from_secs(30), || {
                    let failed = s.resend.calls().iter().filter(|c| c.status == 503).count();
                    async move { (failed >= 3).then_some(()) }
                })
                .await;
                s.resend.set_mode(Mode::Normal);
                statuses
            }
            "the network to a client" => {
                let proxy = LossyProxy::start(
                    &s.herald.public,
                    Box::new(|method, _| method == hyper::Method::POST && rand::random_bool(0.3)),
                )
                .await
                .unwrap();
                let via_proxy = patient_client(&proxy.url);
                let statuses =
                    send_applications(&via_proxy, &job, users.clone(), 8, answered.clone())
                        .await
                        .unwrap();
                let dropped = proxy.seen().iter().filter(|r| r.dropped).count();
                assert!(dropped > 0, "responses were lost on the way back");
                statuses
            }
            other => panic!("the failure matrix has a row this test does not walk: {other}"),
        };
        let created = statuses.iter().filter(|r| r == &&Ok(201)).count();
        assert_eq!(
            created, N,
            "{component}: every application answered 201: {statuses:?}"
        );
        expected += N;
        eventually(
            &format!("{component}: one email per application"),
            Duration::from_secs(60),
            || {
                let all = users
                    .iter()
                    .all(|u| s.resend.sent_to(&format!("{u}@example.com")) >= 1);
                async move { all.then_some(()) }
            },
        )
        .await;
        eprintln!("{component}: {N} applications, {N} emails");
    }
    s.wait_until_settled(Duration::from_secs(30)).await;
    assert_eq!(s.resend.sent().len(), expected, "exactly one email each");
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM applications").await,
        expected as i64
    );
    s.herald
        .wait_for_metric("herald_emails_delivered", expected as f64)
        .await;
    s.wait_until_reports_applied(expected, Duration::from_secs(120))
        .await;
    let (code, audit) = support::herald_audit(&s.backing.database_url());
    assert_eq!(code, 0, "the auditor finds every invariant held: {audit}");
}
