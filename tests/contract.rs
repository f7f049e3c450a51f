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
//! Every check and the coverage, fuzzing and stateful phases run, with a
//! fixed seed and a bounded number of examples per operation, so a run is
//! reproducible (`st replay` prints the failing case). Schemathesis itself is
//! installed by `scripts/test` into `target/tools/schemathesis`; its settings
//! (credentials per security scheme, the statuses a valid request may get,
//! the never-ending stream read up to its first event) are in
//! `tests/contract/schemathesis.toml`.

#[macro_use]
mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use support::{apply_as, eventually, user_token, Backend, Stack, ADMIN_TOKEN};

/// The same cases on every run (`HERALD_CONTRACT_SEED` overrides it, to explore).
const SEED: &str = "20261124";
/// Examples per operation and phase, the coverage phase adding its own
/// (`HERALD_CONTRACT_EXAMPLES` overrides it for a longer run).
const EXAMPLES_PER_OPERATION: &str = "80";
/// Acceptance floor: generated test cases over both runs on one backend.
const AT_LEAST_CASES: u64 = 2_000;
/// Upper bound on one schemathesis run (a run takes well under a minute here).
const RUN_LIMIT: Duration = Duration::from_secs(600);
/// Recipients the fake Resend refuses for good: their letters end in the DLQ.
const DEAD_LETTER_USERS: [&str; 3] = ["dl-ada", "dl-bob", "dl-cy"];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `name` from the environment when set, else `default`.
fn setting(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// One schemathesis run's JSON report (`--report json`).
struct Report {
    listener: &'static str,
    json: Value,
    output: String,
}

impl Report {
    fn count(&self, pointer: &str) -> u64 {
        self.json
            .pointer(pointer)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("{}: no {pointer} in report", self.listener))
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
            "schemathesis found problems on the {} listener:\n{}\nreport: {:#}",
            self.listener, self.output, self.json
        );
        for phase in ["coverage", "fuzzing", "stateful"] {
            assert_eq!(
                self.json["phases"][phase]["status"], "success",
                "{} listener: {phase} phase did not run clean\n{}",
                self.listener, self.output
            );
        }
    }
}

/// Runs schemathesis on the operations `filter` selects, against `base_url`.
async fn run_schemathesis(
    dir: &Path,
    listener: &'static str,
    base_url: &str,
    filter: [&str; 2],
) -> Report {
    let st = repo("target/tools/schemathesis/bin/st");
    assert!(
        st.exists(),
        "{} is missing: scripts/test installs schemathesis",
        st.display()
    );
    let report_path = dir.join(format!("{listener}.json"));
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
        .args(filter)
        .args(["--checks", "all"])
        .args(["--phases", "coverage,fuzzing,stateful"])
        .args([
            "--max-examples",
            &setting("HERALD_CONTRACT_EXAMPLES", EXAMPLES_PER_OPERATION),
        ])
        .args(["--seed", &setting("HERALD_CONTRACT_SEED", SEED)])
        .args(["--generation-database", "none"])
        .args(["--no-color", "--report", "json"])
        .arg("--report-json-path")
        .arg(&report_path)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(RUN_LIMIT, command.output())
        .await
        .unwrap_or_else(|_| {
            panic!("schemathesis on the {listener} listener ran past {RUN_LIMIT:?}")
        })
        .unwrap_or_else(|e| panic!("{}: {e}", st.display()));
    let output =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let text = std::fs::read_to_string(&report_path)
        .unwrap_or_else(|e| panic!("no report from the {listener} run ({e}):\n{output}"));
    let json = serde_json::from_str(&text).expect("schemathesis report is JSON");
    let report = Report {
        listener,
        json,
        output,
    };
    assert!(
        out.status.success(),
        "schemathesis exited {} on the {listener} listener:\n{}",
        out.status,
        report.output
    );
    report
}

/// Sum of `herald_http_requests_total` over 5xx statuses (public listener).
fn server_errors(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("herald_http_requests_total{") && l.contains("status=\"5"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

async fn schemathesis_finds_no_5xx_and_no_response_outside_the_openapi_document(backend: Backend) {
    let w = Stack::start_on(backend, &[]).await;
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

    let dir = tempfile::Builder::new()
        .prefix("herald-contract")
        .tempdir()
        .expect("tempdir");
    // The admin listener serves /admin/* and /metrics; the public one the rest.
    let admin_paths = "^/(admin|metrics)";
    let mut runs = Vec::new();
    for (listener, base_url, filter) in [
        ("public", &w.herald.public, "--exclude-path-regex"),
        ("admin", &w.herald.admin, "--include-path-regex"),
    ] {
        let run = run_schemathesis(dir.path(), listener, base_url, [filter, admin_paths]).await;
        run.assert_clean();
        runs.push(run);
    }
    let operations = runs[0].count("/operations/total");
    let tested: u64 = runs.iter().map(|r| r.count("/operations/tested")).sum();
    assert_eq!(tested, operations, "every operation of the document is run");
    let cases: u64 = runs.iter().map(|r| r.count("/test_cases/generated")).sum();
    assert!(
        cases >= AT_LEAST_CASES,
        "only {cases} generated cases (want at least {AT_LEAST_CASES})"
    );
    eprintln!("{backend:?}: {cases} cases over {operations} operations, no failures");

    // The daemon's own account agrees: it never answered a 5xx, and it is
    // still up and ready.
    let metrics = w.herald.metrics_text().await;
    assert!(
        metrics.contains("herald_http_requests_total{"),
        "requests are counted"
    );
    assert_eq!(server_errors(&metrics), 0.0, "{metrics}");
    let ready = w.herald.get("/readyz").await;
    assert_eq!(ready.status(), 200);
}

on_both_backends!(schemathesis_finds_no_5xx_and_no_response_outside_the_openapi_document);
