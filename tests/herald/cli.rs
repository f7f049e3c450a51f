//! The `herald` command itself: version, and configuration mistakes refused at
//! start with a message that names the key.

use crate::support::clean_env;

use clean_env::herald_command;

use std::time::Duration;

fn herald(env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let out = herald_command()
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("run herald");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_prints_the_package_version() {
    let (code, stdout, _) = herald(&[], &["--version"]);
    assert_eq!(code, 0);
    assert!(stdout.contains(env!("CARGO_PKG_VERSION")), "{stdout}");
}

#[test]
fn a_tunable_of_the_wrong_type_fails_at_start_naming_the_key() {
    let (code, _, stderr) = herald(&[("HERALD_RELAY__MAX_PUBLISH_PER_SEC", "fast")], &["serve"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("relay.max_publish_per_sec"), "{stderr}");
}

#[test]
fn a_misspelt_key_fails_at_start_naming_it() {
    let (code, _, stderr) = herald(&[("HERALD_RELAY__MAX_PUBLSH_PER_SEC", "5")], &["serve"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("max_publsh_per_sec"), "{stderr}");
}

#[test]
fn a_bad_listen_address_fails_at_start_naming_the_key() {
    let (code, _, stderr) = herald(&[("HERALD_LISTEN", "localhost:http")], &["serve"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("listen"), "{stderr}");
}

#[test]
fn a_missing_admin_token_fails_at_start_naming_the_key_and_its_variable() {
    let (code, _, stderr) = herald(
        &[
            ("HERALD_DATABASE_URL", "postgres://127.0.0.1:1/none"),
            ("HERALD_LISTEN", "127.0.0.1:0"),
            ("HERALD_ADMIN_LISTEN", "127.0.0.1:0"),
            ("HERALD_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
        ],
        &["serve"],
    );
    assert_ne!(code, 0);
    assert!(
        stderr.contains("admin_token") && stderr.contains("HERALD_ADMIN_TOKEN"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("0123456789abcdef"),
        "no secret in the message: {stderr}"
    );
}

/// `herald serve` on an embedded database under `dir`, reading the line that
/// says it is ready; returns the child (killed on drop by the caller).
fn serve_embedded(dir: &std::path::Path, database: &str) -> std::process::Child {
    herald_command()
        .arg("serve")
        .env("HERALD_DATABASE_URL", format!("sqlite://{database}"))
        .env("HERALD_STATE_DIR", dir.join("var"))
        .env("HERALD_LISTEN", "127.0.0.1:0")
        .env("HERALD_ADMIN_LISTEN", "127.0.0.1:0")
        .env("HERALD_DATABASE__CONNECT_TIMEOUT_MS", "500")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run herald")
}

/// Waits for `child` to print its ready line (true) or exit (false).
fn wait_ready(child: &mut std::process::Child) -> bool {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.starts_with("herald listening") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(std::time::Duration::from_secs(60)).is_ok()
}

#[test]
fn embedded_files_are_private_and_a_second_process_on_the_same_file_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("var/herald.db");
    let mut first = serve_embedded(dir.path(), &database.display().to_string());
    assert!(wait_ready(&mut first), "the first process starts");

    let mode = |p: &std::path::Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    let var = dir.path().join("var");
    assert_eq!(mode(&var), 0o700, "state dir");
    for file in ["herald.db", "herald.db-wal", "admin_token", "jwt_secret"] {
        assert_eq!(mode(&var.join(file)), 0o600, "{file}");
    }
    assert_eq!(mode(&var.join("mail")), 0o700, "mail dir");

    let second = serve_embedded(dir.path(), &database.display().to_string());
    let out = second.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Busy at start, after database.connect_timeout_ms of retries: exit 3.
    assert_eq!(
        out.status.code(),
        Some(3),
        "the second process must not run: {stderr}"
    );
    assert!(
        stderr.contains("another Herald process is using") && stderr.contains("herald.db.lock"),
        "{stderr}"
    );
    let _ = first.kill();
    let _ = first.wait();
}

#[test]
fn a_database_in_a_directory_that_does_not_exist_is_an_error_not_a_new_database() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("hreald/herald.db");
    let child = serve_embedded(dir.path(), &typo.display().to_string());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("does not exist") && stderr.contains("hreald"),
        "{stderr}"
    );
    assert!(!typo.exists() && !dir.path().join("hreald").exists());
}

#[test]
fn config_prints_the_effective_configuration_without_secrets() {
    let (code, stdout, stderr) = herald(
        &[
            ("HERALD_EMAIL_FROM", "Acme Jobs <jobs@acme.example>"),
            ("HERALD_ADMIN_TOKEN", "super-secret-admin-token"),
        ],
        &["config"],
    );
    assert_eq!(code, 0, "{stderr}");
    let config: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(config["email"]["from"], "Acme Jobs <jobs@acme.example>");
    assert_eq!(config["admin_token"], "[redacted]");
    assert!(!stdout.contains("super-secret"));
    // The values in effect: the file in use, and dev login as decided.
    assert_eq!(config["database_url"], "sqlite://var/herald.db");
    assert_eq!(config["auth"]["dev_login"], true);
    let (code, _, stderr) = herald(&[("HERALD_MODE", "production")], &["config"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("HERALD_DATABASE_URL"), "{stderr}");
}

/// An unreachable Postgres at start is retried for
/// `database.connect_timeout_ms`, then named with its cause: exit 3.
#[test]
fn a_database_that_refuses_connections_is_retried_then_reported_with_its_cause() {
    let started = std::time::Instant::now();
    let (code, stdout, stderr) = herald(
        &[
            (
                "HERALD_DATABASE_URL",
                "postgres://herald:pw@127.0.0.1:1/herald",
            ),
            ("HERALD_LISTEN", "127.0.0.1:0"),
            ("HERALD_ADMIN_LISTEN", "127.0.0.1:0"),
            ("HERALD_ADMIN_TOKEN", "0123456789abcdef-admin"),
            ("HERALD_JWT_SECRET", "0123456789abcdef0123456789abcdef-jwt"),
            ("HERALD_DATABASE__ACQUIRE_TIMEOUT_MS", "1000"),
            ("HERALD_DATABASE__CONNECT_TIMEOUT_MS", "1500"),
        ],
        &["serve"],
    );
    let took = started.elapsed();
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("retrying"),
        "retried, and said so: {stderr}"
    );
    assert!(
        stderr.contains("cannot connect to the database") && stderr.contains("refused"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("pw@"),
        "no password in the message: {stderr}"
    );
    assert!(!stdout.contains("listening"), "never ready: {stdout}");
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_secs(6),
        "retried about 1.5 s, took {took:?}"
    );
}

/// `herald <args>` with `env` (and a state directory) from a clean
/// environment, run in `dir`; a panic if it is still running after 30 s.
pub(crate) fn herald_in(
    dir: &std::path::Path,
    env: &[(&str, String)],
    args: &[&str],
) -> (i32, String) {
    let mut cmd = herald_command();
    cmd.current_dir(dir)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .args(args);
    let out = crate::support::output_within(
        cmd,
        Duration::from_secs(30),
        &format!("herald {args:?} with {env:?}"),
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// An embedded daemon's settings with everything under `dir`, listening on
/// free ports (a later `HERALD_LISTEN` wins).
pub(crate) fn embedded_in(dir: &std::path::Path) -> Vec<(&'static str, String)> {
    vec![
        (
            "HERALD_DATABASE_URL",
            format!("sqlite://{}", dir.join("herald.db").display()),
        ),
        ("HERALD_STATE_DIR", dir.join("var").display().to_string()),
        ("HERALD_LISTEN", "127.0.0.1:0".into()),
        ("HERALD_ADMIN_LISTEN", "127.0.0.1:0".into()),
    ]
}

/// The line a refused command ends with (`herald: …`).
pub(crate) fn refusal(output: &str) -> String {
    output
        .lines()
        .find(|l| l.starts_with("herald: "))
        .unwrap_or_else(|| panic!("no `herald: ` line in {output}"))
        .to_string()
}

/// Each setting a mode requires is refused by `herald config` and by
/// `herald serve` alike (exit 2, the same line), and `serve` refuses before
/// it creates anything: no state directory, no database file, and no
/// attempt at an unreachable Postgres (that would be a 3, after retries).
#[test]
fn config_and_serve_refuse_each_required_setting_alike_and_serve_creates_nothing() {
    let postgres = "postgres://herald:pw@127.0.0.1:1/herald".to_string();
    let admin = ("HERALD_ADMIN_TOKEN", "0123456789abcdef-admin".to_string());
    let jwt = (
        "HERALD_JWT_SECRET",
        "0123456789abcdef0123456789abcdef-jwt".to_string(),
    );
    // What is missing, the settings given, and what the refusal names.
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "production without an admin token",
            vec![("HERALD_DATABASE_URL", postgres.clone()), jwt.clone()],
            "HERALD_ADMIN_TOKEN",
        ),
        (
            "production without a JWT secret",
            vec![("HERALD_DATABASE_URL", postgres.clone()), admin.clone()],
            "HERALD_JWT_SECRET",
        ),
        (
            "production, resend without its key",
            vec![
                ("HERALD_DATABASE_URL", postgres.clone()),
                admin.clone(),
                jwt.clone(),
                ("HERALD_EMAIL__TRANSPORT", "resend".into()),
            ],
            "RESEND_API_KEY",
        ),
        (
            "embedded, resend without its key",
            vec![("HERALD_EMAIL__TRANSPORT", "resend".into())],
            "RESEND_API_KEY",
        ),
        (
            "embedded, a webhook secret that is not one",
            vec![("HERALD_EMAIL__WEBHOOK_SECRET", "not-a-secret".into())],
            "email.webhook_secret",
        ),
    ];
    for (what, settings, named) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut env = settings.clone();
        env.push((
            "HERALD_STATE_DIR",
            dir.path().join("state").display().to_string(),
        ));
        env.push(("HERALD_LISTEN", "127.0.0.1:0".into()));
        env.push(("HERALD_ADMIN_LISTEN", "127.0.0.1:0".into()));
        let mut made_here = Vec::new();
        if !settings.iter().any(|(k, _)| *k == "HERALD_DATABASE_URL") {
            let db = dir.path().join("db/herald.db");
            std::fs::create_dir_all(db.parent().unwrap()).unwrap();
            made_here.push(dir.path().join("db"));
            env.push(("HERALD_DATABASE_URL", format!("sqlite://{}", db.display())));
        }
        let (config_code, config_said) = herald_in(dir.path(), &env, &["config"]);
        let (serve_code, serve_said) = herald_in(dir.path(), &env, &["serve"]);
        assert_eq!(config_code, 2, "{what}: config said {config_said}");
        assert_eq!(serve_code, 2, "{what}: serve said {serve_said}");
        let refused = refusal(&config_said);
        assert!(refused.contains(named), "{what}: {refused}");
        assert_eq!(refusal(&serve_said), refused, "{what}: the same words");
        assert!(
            !config_said.contains("0123456789abcdef"),
            "{what}: a secret shown"
        );
        let left: Vec<_> = walk(dir.path());
        assert_eq!(left, made_here, "{what}: serve created {left:?}");
    }
    // And a complete configuration is printed, exit 0.
    let dir = tempfile::tempdir().unwrap();
    let (code, said) = herald_in(
        dir.path(),
        &[("HERALD_DATABASE_URL", postgres), admin, jwt],
        &["config"],
    );
    assert_eq!(code, 0, "{said}");
}

/// Everything under `dir`, depth first.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        found.push(entry.path());
        if entry.path().is_dir() {
            found.extend(walk(&entry.path()));
        }
    }
    found
}

/// `herald audit`: 0 when every invariant holds, 4 when one is broken, 3
/// when the database cannot be had at start (another process holds the
/// embedded file, after `database.connect_timeout_ms`).
#[tokio::test]
async fn audit_exits_0_when_the_invariants_hold_4_when_one_is_broken_and_3_when_the_file_is_held() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("herald.db");
    let env = vec![
        ("HERALD_DATABASE_URL", format!("sqlite://{}", db.display())),
        (
            "HERALD_STATE_DIR",
            dir.path().join("var").display().to_string(),
        ),
        ("HERALD_DATABASE__CONNECT_TIMEOUT_MS", "600".to_string()),
    ];
    let (code, said) = herald_in(dir.path(), &env, &["migrate"]);
    assert_eq!(code, 0, "{said}");
    let (code, said) = herald_in(dir.path(), &env, &["audit"]);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("invariants hold"), "{said}");

    // An event nobody settled, written long ago: the audit's oldest limit.
    let mut conn = sqlx::sqlite::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO outbox_events (event_id, topic, aggregate_id, payload, created_at, due_at)
         VALUES ('00000000-0000-7000-8000-000000000001', 'charge.created',
                 '00000000-0000-7000-8000-000000000002', '{}', 0, 0)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    let (code, said) = herald_in(dir.path(), &env, &["audit"]);
    assert_eq!(code, 4, "{said}");
    assert!(
        said.contains("no_event_unsettled_too_long") && said.contains("BROKEN"),
        "{said}"
    );

    let mut daemon = serve_embedded(dir.path(), &db.display().to_string());
    assert!(wait_ready(&mut daemon), "the daemon starts");
    let started = std::time::Instant::now();
    let (code, said) = herald_in(dir.path(), &env, &["audit"]);
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert_eq!(code, 3, "{said}");
    assert!(said.contains("another Herald process is using"), "{said}");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "retried first"
    );
}

/// The identity provider's keys at start: a provider that does not answer
/// is a neighbour down (exit 3), a document that is no key set a setting
/// (exit 2); each names the key.
#[test]
fn an_identity_provider_that_does_not_answer_exits_3_and_a_document_that_is_no_key_set_2() {
    let dir = tempfile::tempdir().unwrap();
    let closed = crate::support::free_port();
    let not_keys = dir.path().join("jwks.json");
    std::fs::write(&not_keys, "not a key set").unwrap();
    for (setting, value, code) in [
        (
            "HERALD_AUTH__JWKS_URL",
            format!("http://127.0.0.1:{closed}/.well-known/jwks.json"),
            3,
        ),
        ("HERALD_AUTH__JWKS_FILE", not_keys.display().to_string(), 2),
    ] {
        let mut env = embedded_in(dir.path());
        env.push((setting, value));
        let (got, said) = herald_in(dir.path(), &env, &["serve"]);
        assert_eq!(got, code, "{setting}: {said}");
        assert!(refusal(&said).contains("auth.jwks_"), "{setting}: {said}");
    }
}

/// A listen address another process holds: busy at start, exit 3.
#[test]
fn a_listen_address_in_use_exits_3_naming_the_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut env = embedded_in(dir.path());
    env.push(("HERALD_LISTEN", taken.local_addr().unwrap().to_string()));
    let (code, said) = herald_in(dir.path(), &env, &["serve"]);
    assert_eq!(code, 3, "{said}");
    assert!(refusal(&said).contains("`listen`"), "{said}");
}

/// The unit file and DEPLOY.md say what the codes mean: the unit does not
/// restart a configuration refusal.
#[test]
fn the_unit_keeps_systemd_from_restarting_a_configuration_refusal() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("deploy/herald.service")).unwrap();
    assert!(
        unit.lines().any(|l| l == "RestartPreventExitStatus=2"),
        "{unit}"
    );
    let deploy = std::fs::read_to_string(root.join("docs/DEPLOY.md")).unwrap();
    for row in ["| 0 |", "| 1 |", "| 2 |", "| 3 |", "| 4 |"] {
        assert!(deploy.contains(row), "DEPLOY.md's exit codes lack {row}");
    }
}

/// A daemon whose stdout nobody reads any more (a supervisor that took the
/// ready line and closed the pipe, `herald bench`) keeps serving: printing
/// its banner to a closed pipe is not a reason to die.
#[tokio::test]
async fn a_daemon_whose_stdout_is_closed_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::support::free_port();
    let mut child = herald_command()
        .arg("serve")
        .env(
            "HERALD_DATABASE_URL",
            format!("sqlite://{}", dir.path().join("herald.db").display()),
        )
        .env("HERALD_STATE_DIR", dir.path().join("var"))
        .env("HERALD_LISTEN", format!("127.0.0.1:{port}"))
        .env("HERALD_ADMIN_LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run herald");
    // Closed before the daemon writes a byte: every write to it fails.
    drop(child.stdout.take());
    let url = format!("http://127.0.0.1:{port}/healthz");
    crate::support::eventually("the daemon serving", Duration::from_secs(60), || {
        let url = url.clone();
        async move {
            let answer = reqwest::get(&url).await.ok()?;
            (answer.status() == 200).then_some(())
        }
    })
    .await;
    assert!(child.try_wait().unwrap().is_none(), "still running");
    let _ = child.kill();
    let _ = child.wait();
}

/// A Postgres that answers and refuses the settings (a role it does not
/// have, a database it does not have) is a configuration error: exit 2 at
/// once, naming `database_url`, not 3 after `database.connect_timeout_ms`
/// of retries that cannot help.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_refuses_the_settings_exits_2_at_once() {
    let pg = crate::support::Postgres::start().await;
    let port = pg.port;
    for (what, url) in [
        (
            "a role it does not have",
            format!("postgres://nobody_here@127.0.0.1:{port}/postgres"),
        ),
        (
            "a database it does not have",
            format!("postgres://herald@127.0.0.1:{port}/no_such_db"),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let env = vec![
            ("HERALD_DATABASE_URL", url.clone()),
            ("HERALD_LISTEN", "127.0.0.1:0".into()),
            ("HERALD_ADMIN_LISTEN", "127.0.0.1:0".into()),
            ("HERALD_ADMIN_TOKEN", "0123456789abcdef-admin".into()),
            (
                "HERALD_JWT_SECRET",
                "0123456789abcdef0123456789abcdef-jwt".into(),
            ),
            ("HERALD_DATABASE__CONNECT_TIMEOUT_MS", "10000".into()),
        ];
        for args in [&["serve"][..], &["audit"][..]] {
            let started = std::time::Instant::now();
            let env = env.clone();
            let path = dir.path().to_path_buf();
            let (code, said) = tokio::task::spawn_blocking(move || herald_in(&path, &env, args))
                .await
                .unwrap();
            let took = started.elapsed();
            assert_eq!(code, 2, "{what}, {args:?}: {said}");
            let line = refusal(&said);
            assert!(line.contains("database_url"), "{what}, {args:?}: {line}");
            assert!(
                took < Duration::from_secs(5),
                "{what}, {args:?}: not retried for 10 s, took {took:?}"
            );
        }
    }
}
