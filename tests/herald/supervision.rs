//! Supervision: an actor that panics is reported to Sentry and
//! restarted by the root supervisor while requests keep being served and no
//! event is lost; an actor that keeps crashing makes the daemon escalate
//! (exit with an error, for its service manager to restart) instead of
//! looping hot. The panics are real, armed through failpoints.

use crate::support;

use std::time::Duration;

use support::fake_resend::{FakeResend, API_KEY};
use support::fake_sentry::FakeSentry;
use support::{apply_as, eventually, Backend, Backing, Daemon};

/// A daemon on `backend` sending through a fake Resend and reporting to a
/// fake Sentry, with the failpoints `failpoints` armed.
async fn start(backend: Backend, failpoints: &str) -> (Backing, FakeResend, FakeSentry, Daemon) {
    let b = Backing::start(backend).await;
    let resend = FakeResend::start().await;
    let sentry = FakeSentry::start().await;
    let (base, dsn) = (resend.base_url(), sentry.dsn());
    let herald = b
        .daemon(&[
            ("HERALD_EMAIL__TRANSPORT", "resend"),
            ("RESEND_API_KEY", API_KEY),
            ("RESEND_BASE_URL", &base),
            ("HERALD_EMAIL__MAX_PER_SEC", "1000"),
            ("HERALD_RELAY__POLL_INTERVAL_MS", "200"),
            ("SENTRY_DSN", &dsn),
            ("FAILPOINTS", failpoints),
        ])
        .await;
    (b, resend, sentry, herald)
}

fn messages(sentry: &FakeSentry) -> Vec<String> {
    sentry
        .events()
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
}

async fn a_panicking_actor_is_reported_and_restarted_and_nothing_is_lost(backend: Backend) {
    // The relay's fifth step panics: after start, while requests arrive.
    let (_b, resend, sentry, herald) = start(
        backend,
        "outbox-relay-step=4*off->1*panic(relay step exploded)",
    )
    .await;
    let job = herald.post_job("Supervised").await;
    for i in 0..10 {
        apply_as(&herald, &format!("before{i}"), &job).await;
    }
    eventually(
        "the relay to be restarted",
        Duration::from_secs(20),
        || async { (herald.actor_status("outbox_relay").await == (1, true)).then_some(()) },
    )
    .await;
    for i in 0..10 {
        apply_as(&herald, &format!("after{i}"), &job).await;
    }
    eventually("20 emails", Duration::from_secs(30), || {
        let sent = resend.sent().len();
        async move { (sent >= 20).then_some(()) }
    })
    .await;
    for i in 0..10 {
        assert_eq!(resend.sent_to(&format!("before{i}@example.com")), 1);
        assert_eq!(resend.sent_to(&format!("after{i}@example.com")), 1);
    }
    herald
        .wait_for_metric("herald_emails_delivered", 20.0)
        .await;
    // The panic itself (the panic hook) and the supervisor's report.
    let reported = eventually("the panic in Sentry", Duration::from_secs(10), || {
        let m = messages(&sentry);
        async move {
            (m.iter().any(|e| e.contains("relay step exploded"))
                && m.iter().any(|e| e.contains("actor outbox_relay died")))
            .then_some(m)
        }
    })
    .await;
    assert!(
        !reported.iter().any(|e| e.contains("escalating")),
        "{reported:?}"
    );
    assert_eq!(herald.actor_status("outbox_relay").await, (1, true));
}

async fn an_actor_that_keeps_crashing_escalates_and_the_daemon_exits(backend: Backend) {
    let (_b, _resend, sentry, mut herald) =
        start(backend, "outbox-relay-step=panic(relay always explodes)").await;
    // Restarts back off (0.1 s, 0.2 s, … 1.6 s); the sixth death escalates.
    let status = herald.wait_for_exit(Duration::from_secs(30)).await;
    assert!(!status.success(), "escalation is an error exit: {status}");
    let log = herald.log();
    assert_eq!(
        log.matches("actor died; restarting").count(),
        5,
        "five restarts, then escalation"
    );
    assert!(log.contains("escalating"));
    let events = messages(&sentry);
    assert!(
        events
            .iter()
            .any(|e| e.contains("escalating") && e.contains("fatal")),
        "{events:?}"
    );
}

on_both_backends!(
    a_panicking_actor_is_reported_and_restarted_and_nothing_is_lost,
    an_actor_that_keeps_crashing_escalates_and_the_daemon_exits,
);
