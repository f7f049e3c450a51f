//! The OpenAPI contract, machine-checked (issue 7): schemathesis generates
//! requests from `docs/openapi.yaml` and sends them to a live daemon; every
//! response must be one the document allows, no request may get a 5xx, and a
//! request the schema calls valid may only be refused the way the contract
//! says (404 unknown id, 409 key in flight, 422 key reused).
//!
//! Each backend gets one daemon (with a fake Resend that refuses a few
//! recipients, so the dead-letter queue holds letters the admin operations'
//! links can reach) and two schemathesis runs: the public operations against
//! the public listener, the admin operations against the admin listener.
//! Then the same daemon restarts with tight per-client limits and the public
//! operations run again, so the 429s (and streams turned away) are held to
//! the document too. Every check and the coverage, fuzzing and stateful
//! phases run, with a fixed seed and a bounded number of examples per
//! operation, so a run is reproducible (`st replay` prints the failing
//! case). Schemathesis itself is installed by `scripts/test` into
//! `target/tools/schemathesis`; its settings (credentials per security
//! scheme, the statuses a valid request may get, the never-ending stream read
//! up to its first event) are in `tests/contract/schemathesis.toml`.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use support::{apply_as, eventually, user_token, Backend, Daemon, Stack, ADMIN_TOKEN};

/// The same cases on every run (`HERALD_CONTRACT_SEED` overrides it, to explore).
const SEED: &str = "20261124";
/// Examples per operation and phase, the coverage phase adding its own
/// (`HERALD_CONTRACT_EXAMPLES` overrides it for a longer run).
const EXAMPLES_PER_OPERATION: &str = "80";
/// Examples per operation for the run under tight limits (mostly 429s).
const LIMITED_EXAMPLES_PER_OPERATION: &str = "30";
/// Acceptance floor: generated test cases over the runs on one backend.
const AT_LEAST_CASES: u64 = 2_000;
/// Upper bound on one schemathesis run (a run takes well under a minute here).
const RUN_LIMIT: Duration = Duration::from_secs(600);
/// Recipients the fake Resend refuses for good: their letters end in the DLQ.
const DEAD_LETTER_USERS: [&str; 3] = ["dl-ada", "dl-bob", "dl-cy"];
/// The admin listener serves these paths; the public listener the rest.
const ADMIN_PATHS: &str = "^/(admin|metrics)";
/// Per-client limits tight enough that schemathesis meets every refusal.
const TIGHT_LIMITS: [(&str, &str); 10] = [
    ("HERALD_LIMITS__PER_IP", "true"),
    ("HERALD_LIMITS__APPLY_PER_SEC", "1"),
    ("HERALD_LIMITS__APPLY_BURST", "3"),
    ("HERALD_LIMITS__CHARGES_PER_SEC", "1"),
    ("HERALD_LIMITS__CHARGES_BURST", "3"),
    ("HERALD_LIMITS__DEV_LOGIN_PER_SEC", "1"),
    ("HERALD_LIMITS__DEV_LOGIN_BURST", "3"),
    ("HERALD_LIMITS__STREAM_CONNECTS_PER_SEC", "1"),
    ("HERALD_LIMITS__STREAM_CONNECT_BURST", "3"),
    ("HERALD_LIMITS__STREAMS_PER_IP", "2"),
];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `name` from the environment when set, else `default`.
fn setting(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// One schemathesis run's JSON report (`--report json`).
struct Report {
    /// Which run (public, admin, limited), for messages.
    run: &'static str,
    json: Value,
    /// What schemathesis printed: its account of any failure, with `st replay`.
    output: String,
}

impl Report {
    fn count(&self, pointer: &str) -> u64 {
        self.json
            .pointer(pointer)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("{} run: no {pointer} in report", self.run))
    }

    /// Panics with schemathesis' own account unless the run found nothing.
    fn assert_clean(&self) {
        let clean = self.json["exit_code"] == 0
            && self.json["complete"] == true
            && self.json["failures"].as_array().is_some_and(Vec::is_empty)
            && self.json["errors"].as_array().is_some_and(Vec::is_empty)
            && self.count("/test_cases/with_failures") == 0
            && self.count("/operations/errored") == 0
            && self.count("/operations/tested") == self.count("/operations/selected");
        assert!(
            clean,
            "schemathesis found problems in the {} run:\n{}\nreport: {:#}",
            self.run, self.output, self.json
        );
        for phase in ["coverage", "fuzzing", "stateful"] {
            assert_eq!(
                self.json["phases"][phase]["status"], "success",
                "{} run: the {phase} phase did not run clean\n{}",
                self.run, self.output
            );
        }
    }
}

/// Runs schemathesis against `base_url` with every check and phase, then
/// `args` (which operations, which checks to leave out); `run` names it.
/// Returns its report once it is known to be clean.
async fn run_schemathesis(
    dir: &Path,
    run: &'static str,
    base_url: &str,
    examples: &str,
    args: &[&str],
) -> Report {
    let st = repo("target/tools/schemathesis/bin/st");
    assert!(
        st.exists(),
        "{} is missing: scripts/test installs schemathesis",
        st.display()
    );
    let report_path = dir.join(format!("{run}.json"));
    let mut command = tokio::process::Command::new(&st);
    command
        .current_dir(dir)
        .env("HERALD_CONTRACT_USER_TOKEN", user_token("schemathesis"))
        .env("HERALD_CONTRACT_ADMIN_TOKEN", ADMIN_TOKEN)
        .arg("--config-file")
        .arg(repo("tests/contract/schemathesis.toml"))
        .arg("run")
        .arg(repo("docs/openapi.yaml"))
        .args(["--url", base_url])
        .args(["--checks", "all"])
        .args(args)
        .args(["--phases", "coverage,fuzzing,stateful"])
        .args(["--max-examples", examples])
        .args(["--seed", &setting("HERALD_CONTRACT_SEED", SEED)])
        .args(["--generation-database", "none"])
        .args(["--no-color", "--report", "json"])
        .arg("--report-json-path")
        .arg(&report_path)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(RUN_LIMIT, command.output())
        .await
        .unwrap_or_else(|_| panic!("schemathesis ({run} run) ran past {RUN_LIMIT:?}"))
        .unwrap_or_else(|e| panic!("{}: {e}", st.display()));
    let output =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let text = std::fs::read_to_string(&report_path)
        .unwrap_or_else(|e| panic!("no report from the {run} run ({e}):\n{output}"));
    let json = serde_json::from_str(&text).expect("schemathesis report is JSON");
    let report = Report { run, json, output };
    assert!(
        out.status.success(),
        "schemathesis exited {} in the {run} run:\n{}",
        out.status,
        report.output
    );
    report.assert_clean();
    report
}

/// Sum of a counter over all its label sets, optionally only those whose
/// labels contain `labels_with`.
fn counter_sum(metrics: &str, name: &str, labels_with: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(labels_with))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The daemon's own account agrees with schemathesis': it counted requests,
/// answered none of them with a 5xx, and is still up and ready.
async fn assert_no_server_error_and_ready(herald: &Daemon) -> String {
    let metrics = herald.metrics_text().await;
    let requests = counter_sum(&metrics, "herald_http_requests_total", "");
    assert!(requests > 0.0, "requests are counted:\n{metrics}");
    let server_errors = counter_sum(&metrics, "herald_http_requests_total", "status=\"5");
    assert_eq!(server_errors, 0.0, "{metrics}");
    assert_eq!(herald.get("/readyz").await.status(), 200);
    metrics
}

async fn schemathesis_finds_no_5xx_and_no_response_outside_the_openapi_document(backend: Backend) {
    // Schemathesis tries wrong credentials on purpose; the lockout that
    // follows (tested in operators.rs) would turn its valid requests into
    // 429s. Here the document is under test, not the lockout.
    let mut w = Stack::start_on(backend, &[("HERALD_ADMIN__FAILED_AUTH_PER_MIN", "100000")]).await;
    let job = w.herald.post_job("Contract engineer").await;
    for user in DEAD_LETTER_USERS {
        w.resend.poison(&format!("{user}@example.com"), true);
        apply_as(&w.herald, user, &job).await;
    }
    let dead = DEAD_LETTER_USERS.len() as f64;
    eventually("the dead letters", Duration::from_secs(60), || async {
        (w.herald.metric("herald_dlq_depth").await >= dead).then_some(())
    })
    .await;
    // A suppressed address, so the suppression routes have data: an email
    // sent, then bounced for good by webhook.
    apply_as(&w.herald, "bouncer", &job).await;
    let bounced = eventually("the email sent", Duration::from_secs(60), || async {
        w.resend.email_id_of("bouncer@example.com")
    })
    .await;
    w.resend.emit(
        "email.bounced",
        &bounced,
        serde_json::json!({ "bounce": { "type": "Permanent" } }),
    );
    eventually(
        "the address suppressed",
        Duration::from_secs(60),
        || async {
            (w.herald
                .metric(r#"herald_webhook_events_total{type="email.bounced",outcome="applied"}"#)
                .await
                >= 1.0)
                .then_some(())
        },
    )
    .await;

    let dir = tempfile::Builder::new()
        .prefix("herald-contract")
        .tempdir()
        .expect("tempdir");
    let examples = setting("HERALD_CONTRACT_EXAMPLES", EXAMPLES_PER_OPERATION);
    let public = ["--exclude-path-regex", ADMIN_PATHS];
    let mut runs = vec![
        run_schemathesis(dir.path(), "public", &w.herald.public, &examples, &public).await,
        run_schemathesis(
            dir.path(),
            "admin",
            &w.herald.admin,
            &examples,
            &["--include-path-regex", ADMIN_PATHS],
        )
        .await,
    ];
    let operations = runs[0].count("/operations/total");
    let tested: u64 = runs.iter().map(|r| r.count("/operations/tested")).sum();
    assert_eq!(tested, operations, "every operation of the document is run");
    assert_no_server_error_and_ready(&w.herald).await;

    // Under tight limits most valid requests get 429 (so that check is left
    // out); every answer must still be one the document allows.
    for (key, value) in TIGHT_LIMITS {
        w.herald.set_env(key, Some(value));
    }
    w.herald.restart().await;
    let limited = [
        &public[..],
        &["--exclude-checks", "positive_data_acceptance"],
    ]
    .concat();
    runs.push(
        run_schemathesis(
            dir.path(),
            "limited",
            &w.herald.public,
            LIMITED_EXAMPLES_PER_OPERATION,
            &limited,
        )
        .await,
    );
    let metrics = assert_no_server_error_and_ready(&w.herald).await;
    for action in ["apply", "charge", "dev_login", "stream_connect"] {
        let refused = counter_sum(
            &metrics,
            "herald_rate_limited_total",
            &format!("action=\"{action}\""),
        );
        assert!(refused > 0.0, "no {action} was refused:\n{metrics}");
    }

    let cases: u64 = runs.iter().map(|r| r.count("/test_cases/generated")).sum();
    assert!(
        cases >= AT_LEAST_CASES,
        "only {cases} generated cases (want at least {AT_LEAST_CASES})"
    );
    eprintln!("{backend:?}: {cases} cases over {operations} operations, no failures");
}

on_both_backends!(schemathesis_finds_no_5xx_and_no_response_outside_the_openapi_document);
