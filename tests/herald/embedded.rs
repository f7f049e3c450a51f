//! The embedded mode and restarts under load:
//!
//! - the README's run command on a machine with nothing configured — no
//!   Postgres, no Redis, no config file, no environment — serves a working
//!   board: post a job, see it on the stream, apply, find the `.eml`;
//! - 300 applications through the retrying client while the daemon is killed
//!   with SIGKILL twice, or stopped with SIGTERM twice, and started again:
//!   exactly 300 emails reach the fake Resend. Both backends.

use crate::support;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::sse::SseClient;
use support::{
    count, eventually, patient_client, send_applications, wait_answered, Backend, Stack,
};

/// Ends the child when dropped (by PID, as every test process here).
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_run_command_with_nothing_configured_serves_a_board_that_posts_streams_applies_and_mails(
) {
    // `cargo run --release` runs this binary with no arguments: `serve`.
    let cwd = tempfile::tempdir().unwrap();
    let mut child = support::clean_env::herald_command()
        .current_dir(cwd.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start herald");
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // What it prints: the page's URL, the admin listener, the new admin token.
    let mut printed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !printed.iter().any(|l: &String| l.contains("Admin token")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => printed.push(line),
            Err(_) => panic!("herald printed no admin token: {printed:?}"),
        }
    }
    let text = printed.join("\n");
    assert!(
        text.contains("Job board:  http://127.0.0.1:8080/"),
        "{text}"
    );
    assert!(
        text.contains("Admin API:  http://127.0.0.1:9091/"),
        "{text}"
    );
    assert!(
        text.contains("Operators:  http://127.0.0.1:9091/admin/"),
        "{text}"
    );
    // The banner says what really runs, and only once it is ready.
    assert!(
        text.contains("in-process broker, file email, dev login on"),
        "{text}"
    );
    assert!(
        text.starts_with("herald listening public=http://127.0.0.1:8080"),
        "{text}"
    );
    let token = text
        .lines()
        .find_map(|l| l.contains("Admin token").then(|| l.rsplit(' ').next()))
        .flatten()
        .unwrap()
        .to_string();
    let stored = std::fs::read_to_string(cwd.path().join("var/admin_token")).unwrap();
    assert_eq!(token, stored.trim(), "the printed token is the stored one");

    // The README's first session, pasted as written into a shell in the
    // directory the daemon runs in: a job posted, a sign-in, the same
    // application sent twice under one key, the one .eml.
    let demo = readme_block_after("## A first session");
    for placeholder in ["…", "<job id>", "<"] {
        assert!(
            !demo.contains(placeholder),
            "a placeholder in the README's demo: {demo}"
        );
    }
    paste_the_readme_session(&demo, cwd.path(), "var/mail").await;

    let http = reqwest::Client::new();
    let base = "http://127.0.0.1:8080";
    let page = http.get(base).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("app.js"), "the web page: {page}");
    let mut stream = SseClient::connect(&format!("{base}/api/jobs/stream"), None).await;
    stream
        .read_until("snapshot", Duration::from_secs(10), |seen| {
            seen.iter().any(|e| e.event == "snapshot")
        })
        .await;
    let job: Value = http
        .post(format!("{base}/api/jobs"))
        .bearer_auth(&token)
        .json(&json!({"title": "Embedded engineer", "company": "Acme",
                      "location": "Remote", "description": "Nothing to install."}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    stream
        .read_until("the job on the stream", Duration::from_secs(10), |seen| {
            seen.iter().any(|e| e.data.contains("Embedded engineer"))
        })
        .await;
    assert_eq!(
        stream
            .seen
            .iter()
            .filter(|e| e.data.contains("Embedded engineer"))
            .count(),
        1
    );
    let login: Value = http
        .post(format!("{base}/api/dev/login"))
        .json(&json!({"email": "newcomer@example.com"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let applied = http
        .post(format!("{base}/api/applications"))
        .bearer_auth(login["token"].as_str().unwrap())
        .header("Idempotency-Key", "first-application")
        .json(&json!({"job_id": job["id"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(applied.status(), 201);
    let mail = cwd.path().join("var/mail");
    let eml = eventually("the confirmation .eml", Duration::from_secs(20), || {
        let mail = mail.clone();
        async move {
            std::fs::read_dir(&mail)
                .ok()?
                .flatten()
                .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
                .find(|eml| eml.contains("newcomer@example.com"))
        }
    })
    .await;
    assert!(eml.contains("newcomer@example.com"), "{eml}");
    // The confirmation is the applicant's data: private to the daemon.
    for entry in std::fs::read_dir(&mail).unwrap().flatten() {
        use std::os::unix::fs::PermissionsExt;
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", entry.path().display());
    }
    assert!(eml.contains("Embedded engineer"), "{eml}");
    // The README's one and this one: no copy of either.
    assert_eq!(std::fs::read_dir(&mail).unwrap().count(), 2);
    assert!(
        cwd.path().join("var/herald.db").exists(),
        "embedded SQLite file"
    );

    // Then the README's production session: the embedded daemon stopped
    // (var/ stays 0700, as `cargo run --release` leaves it), scripts/dev
    // started in the same directory (as root here: Postgres runs as the
    // postgres user, who cannot enter var/), and the same session pasted
    // with STATE=var/dev, as the block's first line says.
    drop(running);
    let dev = DevScript::start(&cwd.path().join("var/dev")).await;
    let demo = demo.replacen("STATE=var ", "STATE=var/dev ", 1);
    assert!(demo.starts_with("STATE=var/dev "), "{demo}");
    paste_the_readme_session(&demo, cwd.path(), "var/dev/mail").await;
    assert_eq!(
        std::fs::read_dir(&mail).unwrap().count(),
        2,
        "scripts/dev mails into var/dev/mail, not the embedded mode's var/mail"
    );
    dev.stop().await;

    // And not as root: the same, by the unprivileged user `nobody` in a
    // checkout of their own, where Postgres's data stays in var/dev/pg.
    if unsafe { libc::geteuid() } == 0 {
        use std::os::unix::fs::PermissionsExt;
        let home = cwd.path().join("nobody");
        std::fs::create_dir_all(home.join("var")).unwrap();
        std::fs::set_permissions(cwd.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let chown = std::process::Command::new("chown")
            .args(["-R", "nobody:nogroup", home.to_str().unwrap()])
            .status()
            .expect("chown");
        assert!(chown.success());
        let dev = DevScript::start_as_nobody(&home.join("var/dev")).await;
        assert_eq!(
            dev.pgdata,
            home.join("var/dev/pg"),
            "its data in its own checkout"
        );
        paste_the_readme_session(&demo, &home, "var/dev/mail").await;
        dev.stop().await;
    } else {
        eprintln!("not root: scripts/dev ran as this user above");
    }
}

const DEV_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/dev");

/// `scripts/dev` running with its state in `dir`, on free ports, serving
/// this build's binary (DEV_HERALD_BIN); stopped with Ctrl-C's signal.
struct DevScript {
    child: std::process::Child,
    /// Where its Postgres keeps its data (removed at the end).
    pgdata: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl DevScript {
    /// As this test's user; [`DevScript::start_as_nobody`] for another.
    async fn start(dir: &std::path::Path) -> DevScript {
        DevScript::start_with(dir, std::process::Command::new(DEV_SCRIPT)).await
    }

    /// As the unprivileged user `nobody` (through setpriv, so the PID held
    /// is the script's), when this test runs as root.
    async fn start_as_nobody(dir: &std::path::Path) -> DevScript {
        let mut setpriv = std::process::Command::new("setpriv");
        setpriv.args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--",
            DEV_SCRIPT,
        ]);
        DevScript::start_with(dir, setpriv).await
    }

    async fn start_with(dir: &std::path::Path, mut script: std::process::Command) -> DevScript {
        use std::os::unix::process::CommandExt;
        let log = dir.with_file_name("dev-script.log");
        let err = std::fs::File::create(&log).unwrap();
        // Nothing of the caller's environment but PATH: the script states
        // every setting the daemon runs with.
        let child = script
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DEV_DIR", dir)
            .env("DEV_HERALD_BIN", env!("CARGO_BIN_EXE_herald"))
            .env("DEV_PG_PORT", support::free_port().to_string())
            .env("DEV_REDIS_PORT", support::free_port().to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .process_group(0)
            .spawn()
            .expect("run scripts/dev");
        let mut dev = DevScript {
            child,
            pgdata: std::path::PathBuf::new(),
            log,
        };
        let stdout = dev.child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("postgres data: ") => {
                    dev.pgdata = line["postgres data: ".len()..].into();
                }
                Ok(line) if line.starts_with("herald listening") => return dev,
                Ok(_) => {}
                Err(_) => panic!(
                    "scripts/dev did not serve within 90 s; it said:\n{}",
                    std::fs::read_to_string(&dev.log).unwrap_or_default()
                ),
            }
        }
    }

    /// Ctrl-C's SIGINT to the script's process group (the script, Herald,
    /// Postgres, Redis); waits for the script to end.
    async fn stop(mut self) {
        let group = self.child.id() as i32;
        // SAFETY: signals the process group of the script this test started.
        unsafe { libc::kill(-group, libc::SIGINT) };
        eventually("scripts/dev to stop", Duration::from_secs(30), || {
            let done = self.child.try_wait().ok().flatten();
            async move { done }
        })
        .await;
    }
}

impl Drop for DevScript {
    fn drop(&mut self) {
        let group = self.child.id() as i32;
        // SAFETY: signals the process group of the script this test started.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        let _ = self.child.wait();
        // As root, Postgres's data is outside the test's directory.
        if self.pgdata.starts_with("/var/tmp/") {
            if let Some(root) = self.pgdata.parent() {
                let _ = std::fs::remove_dir_all(root);
            }
        }
    }
}

/// Pastes the README's session `demo` into bash in `dir` and checks what it
/// printed: 201, then 201 replayed, then the one `.eml` in `mail`.
async fn paste_the_readme_session(demo: &str, dir: &std::path::Path, mail: &str) {
    let pasted = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(demo)
        .current_dir(dir)
        .kill_on_drop(true)
        .output();
    let pasted = tokio::time::timeout(Duration::from_secs(30), pasted)
        .await
        .expect("the README's first session ends within 30 s")
        .expect("bash runs");
    let printed = String::from_utf8_lossy(&pasted.stdout);
    let said: Vec<String> = printed.lines().map(|l| l.trim().to_lowercase()).collect();
    assert_eq!(
        said.get(..3),
        Some(
            &[
                "http/1.1 201 created".to_string(),
                "http/1.1 201 created".to_string(),
                "idempotent-replayed: true".to_string(),
            ][..]
        ),
        "the README's demo printed:\n{printed}{}",
        String::from_utf8_lossy(&pasted.stderr)
    );
    assert_eq!(said.len(), 4, "one .eml listed: {printed}");
    assert!(said[3].ends_with(".eml"), "{printed}");
    let eml = std::fs::read_to_string(
        dir.join(mail)
            .join(printed.lines().nth(3).unwrap_or_default().trim()),
    )
    .unwrap();
    assert!(
        eml.contains("ada@example.com") && eml.contains("Rust engineer"),
        "{eml}"
    );
}

/// The first `sh` block after `heading` in README.md.
fn readme_block_after(heading: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = &readme[readme.find(heading).expect("the README's heading")..];
    let start = section
        .find("```sh\n")
        .expect("a sh block under the heading")
        + "```sh\n".len();
    let end = section[start..].find("\n```").expect("the block's end");
    section[start..start + end].to_string()
}

/// How the daemon is interrupted under load.
#[derive(Clone, Copy, Debug)]
enum Interruption {
    /// kill -9: nothing gets to finish.
    Kill,
    /// SIGTERM: graceful, within `shutdown_deadline_ms`.
    Terminate,
}

const DEADLINE_MS: u64 = 5000;

/// 300 applications (one user each, one key each, retried by the client
/// until answered) while the daemon is interrupted twice and started again
/// on the same ports: every application is answered 201 and exactly 300
/// emails arrive.
async fn three_hundred_applications_survive_two_interruptions(backend: Backend, how: Interruption) {
    const N: usize = 300;
    let deadline = DEADLINE_MS.to_string();
    let mut s = Stack::start_on(
        backend,
        &[
            ("HERALD_RELAY__REDELIVER_AFTER_SECS", "2"),
            ("HERALD_RELAY__POLL_INTERVAL_MS", "200"),
            ("HERALD_SHUTDOWN_DEADLINE_MS", &deadline),
            ("HERALD_SSE__SHUTDOWN_GRACE_MS", "1000"),
            // A request killed after claiming its key leaves it in progress;
            // its retry takes it over once this lease lapses.
            ("HERALD_IDEMPOTENCY__LEASE_SECS", "3"),
        ],
    )
    .await;
    // Restarts come back on the same ports, so the client keeps its URL.
    s.herald.keep_ports();
    let job = s.herald.post_job("Under fire").await;
    let client = patient_client(&s.herald.public);
    let answered = Arc::new(AtomicUsize::new(0));
    let users = (0..N).map(|i| format!("load{i}")).collect();
    let load = send_applications(&client, &job, users, 16, answered.clone());
    for threshold in [N / 3, 2 * N / 3] {
        wait_answered(&answered, threshold).await;
        match how {
            Interruption::Kill => s.herald.kill(),
            Interruption::Terminate => {
                let asked = Instant::now();
                s.herald.terminate();
                let status = s
                    .herald
                    .wait_for_exit(Duration::from_millis(DEADLINE_MS + 5000))
                    .await;
                let took = asked.elapsed();
                assert!(
                    status.success(),
                    "a graceful exit, not the deadline's: {status}"
                );
                assert!(
                    took <= Duration::from_millis(DEADLINE_MS),
                    "exited within the deadline: {took:?}"
                );
                eprintln!("{backend:?}: SIGTERM under load, exited 0 after {took:?}");
            }
        }
        s.herald.restart().await;
    }
    let statuses = load.await.unwrap();
    // The interruptions hit traffic: attempts failed and were retried.
    let records = client.transcript().records();
    let failed = records.iter().filter(|r| r.status.is_none()).count();
    let retried = records.iter().filter(|r| r.attempt > 1).count();
    assert!(
        failed > 0 && retried > 0,
        "{failed} failed, {retried} retried"
    );
    eprintln!(
        "{how:?}: {} attempts, {failed} without an answer, {retried} retries",
        records.len()
    );
    let created = statuses.iter().filter(|r| r == &&Ok(201)).count();
    assert_eq!(created, N, "every application answered 201: {statuses:?}");
    eventually(&format!("{N} emails"), Duration::from_secs(120), || {
        let sent = s.resend.sent().len();
        async move { (sent >= N).then_some(()) }
    })
    .await;
    s.herald
        .wait_for_metric("herald_emails_delivered", N as f64)
        .await;
    s.wait_until_settled(Duration::from_secs(30)).await;
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM applications").await,
        N as i64
    );
    assert_eq!(
        s.resend.sent().len(),
        N,
        "exactly one email per application"
    );
    for i in 0..N {
        assert_eq!(
            s.resend.sent_to(&format!("load{i}@example.com")),
            1,
            "load{i}"
        );
    }
}

async fn three_hundred_applications_with_two_sigkills_send_exactly_three_hundred_emails(
    backend: Backend,
) {
    three_hundred_applications_survive_two_interruptions(backend, Interruption::Kill).await;
}

async fn sigterm_under_load_exits_within_the_deadline_and_the_retries_land_after_restart(
    backend: Backend,
) {
    three_hundred_applications_survive_two_interruptions(backend, Interruption::Terminate).await;
}

on_both_backends!(
    three_hundred_applications_with_two_sigkills_send_exactly_three_hundred_emails,
    sigterm_under_load_exits_within_the_deadline_and_the_retries_land_after_restart,
);
