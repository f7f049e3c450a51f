//! Packaging: the systemd unit passes `systemd-analyze verify` and keeps its
//! readiness protocol and hardening; the Dockerfile passes hadolint; the
//! daemon speaks systemd's notify protocol (READY=1 once serving,
//! STOPPING=1 on SIGTERM); `herald healthcheck` (the Docker HEALTHCHECK)
//! tells a ready daemon from a missing one. `scripts/test` installs
//! systemd-analyze and hadolint.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{Backend, Backing};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify_and_keeps_its_hardening() {
    let unit = std::fs::read_to_string(repo("deploy/herald.service")).unwrap();
    for line in [
        "Type=notify",
        "Restart=on-failure",
        "ExecStart=/usr/local/bin/herald serve",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=herald",
        "DynamicUser=yes",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks `{line}`");
    }
    // verify checks that ExecStart's program exists: point it at this build.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("herald.service");
    let unit = unit.replace("/usr/local/bin/herald", env!("CARGO_BIN_EXE_herald"));
    std::fs::write(&copy, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze (scripts/test installs the systemd package)");
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "systemd-analyze verify: {said}");
    assert!(said.trim().is_empty(), "no warnings: {said}");
}

#[test]
fn the_dockerfile_passes_hadolint() {
    let installed = repo("target/tools/hadolint/bin/hadolint");
    let hadolint = if installed.exists() {
        installed
    } else {
        PathBuf::from("hadolint")
    };
    let out = Command::new(&hadolint)
        .arg(repo("Dockerfile"))
        .output()
        .unwrap_or_else(|e| panic!("{hadolint:?}: {e} (scripts/test installs hadolint)"));
    assert!(
        out.status.success(),
        "hadolint: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    for needed in [
        "AS build",
        "USER 10001:10001",
        "HEALTHCHECK",
        "\"herald\", \"healthcheck\"",
    ] {
        assert!(dockerfile.contains(needed), "Dockerfile lacks {needed}");
    }
}

/// The next datagram on the notify socket, as text.
async fn next_notification(socket: &tokio::net::UnixDatagram) -> String {
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), socket.recv(&mut buf))
        .await
        .expect("a notification within 10 s")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_daemon_notifies_systemd_when_ready_and_when_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&path).unwrap();
    let b = Backing::start(Backend::Sqlite).await;
    let mut herald = b.daemon(&[("NOTIFY_SOCKET", path.to_str().unwrap())]).await;
    let ready = next_notification(&socket).await;
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    herald.terminate();
    let stopping = next_notification(&socket).await;
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let status = herald.wait_for_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn healthcheck_exits_zero_for_a_ready_daemon_and_non_zero_without_one() {
    let b = Backing::start(Backend::Sqlite).await;
    let mut herald = b.daemon(&[]).await;
    let listen = herald.public.trim_start_matches("http://").to_string();
    let check = || {
        Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("healthcheck")
            .env("HERALD_LISTEN", &listen)
            .env("HERALD_DATABASE_URL", b.database_url())
            .output()
            .unwrap()
            .status
    };
    assert!(check().success());
    herald.kill();
    assert!(!check().success());
}

/// Runs `herald <args>` with only `env` as its configuration; exit code and
/// stderr, or a panic if it neither exits nor fails within 20 s.
fn herald_with(env: &[(String, String)], args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = support::clean_env::herald_command();
    let state = tempfile::tempdir().unwrap();
    cmd.current_dir(state.path())
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let out = support::output_within(
        cmd,
        Duration::from_secs(20),
        &format!("herald {args:?} with {env:?} must refuse to start"),
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `Environment=` settings of the unit file.
fn unit_environment() -> Vec<(String, String)> {
    std::fs::read_to_string(repo("deploy/herald.service"))
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The `ENV` settings of the Dockerfile's runtime stage.
fn image_environment() -> Vec<(String, String)> {
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    let block = dockerfile
        .split("\nENV ")
        .nth(1)
        .expect("an ENV instruction")
        .split("\n\n")
        .next()
        .unwrap();
    let mut env = Vec::new();
    for line in block.lines() {
        if line.trim_start().starts_with('#') {
            break;
        }
        let kv = line.trim().trim_end_matches('\\').trim();
        if let Some((k, v)) = kv.split_once('=') {
            env.push((k.to_string(), v.to_string()));
        }
    }
    env
}

#[test]
fn the_unit_and_the_image_without_their_production_settings_refuse_to_start() {
    let unit = std::fs::read_to_string(repo("deploy/herald.service")).unwrap();
    assert!(
        unit.lines()
            .any(|l| l == "EnvironmentFile=/etc/herald/herald.env"),
        "the settings file must be required (no leading -)"
    );
    for (what, env) in [("unit", unit_environment()), ("image", image_environment())] {
        assert!(
            env.iter()
                .any(|(k, v)| k == "HERALD_MODE" && v == "production"),
            "{what}: {env:?}"
        );
        let (code, stdout, stderr) = herald_with(&env, &["serve"]);
        assert_eq!(code, Some(2), "{what}: {stdout}{stderr}");
        assert!(
            stderr.contains("HERALD_DATABASE_URL") && stderr.contains("production"),
            "{what}: {stderr}"
        );
        assert!(
            !stdout.contains("listening"),
            "{what} must not serve: {stdout}"
        );
    }
}

/// The production settings block of docs/DEPLOY.md, read the way systemd's
/// `EnvironmentFile=` and Docker's `--env-file` read a file.
fn deploy_env_file() -> Vec<(String, String)> {
    let deploy = std::fs::read_to_string(repo("docs/DEPLOY.md")).unwrap();
    let block = deploy
        .split("Put these in the environment file")
        .nth(1)
        .and_then(|rest| rest.split("```sh\n").nth(1))
        .and_then(|rest| rest.split("```").next())
        .expect("DEPLOY.md's production settings block");
    let mut env = Vec::new();
    for line in block.lines() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not NAME=value: {line}"));
        // Both readers keep the rest of the line: a comment or quotes there
        // would become part of the value.
        assert!(!v.contains(" #"), "inline comment in `{line}`");
        assert!(
            !v.starts_with('\'') && !v.starts_with('"'),
            "quoted: `{line}`"
        );
        env.push((k.to_string(), v.to_string()));
    }
    env
}

#[test]
fn the_deploy_settings_block_is_a_valid_env_file_that_herald_accepts_as_written() {
    let mut env = deploy_env_file();
    assert!(env.len() >= 10, "{env:?}");
    // Only the placeholders (…) are filled in; every other value as written.
    for (k, v) in env.iter_mut() {
        if v.contains('…') {
            *v = match k.as_str() {
                "HERALD_DATABASE_URL" => "postgres://herald:pw@127.0.0.1:1/herald".into(),
                "HERALD_ADMIN_TOKEN" => "0123456789abcdef-admin".into(),
                "HERALD_JWT_SECRET" => "0123456789abcdef0123456789abcdef-jwt".into(),
                "RESEND_API_KEY" => "re_placeholder".into(),
                "HERALD_EMAIL__WEBHOOK_SECRET" => "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
                "SENTRY_DSN" => "https://key@127.0.0.1:1/0".into(),
                other => panic!("no stand-in for the placeholder of {other}"),
            };
        }
    }
    let (code, stdout, stderr) = herald_with(&env, &["config"]);
    assert_eq!(code, Some(0), "{stderr}");
    let config: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(config["mode"], "production");
    assert_eq!(config["email"]["transport"], "resend");
    assert_eq!(config["email"]["from"], "Acme Jobs <jobs@acme.example>");
    assert_eq!(config["log"]["format"], "json");
    assert_eq!(config["email"]["webhook_secret"], "[redacted]");
    assert_eq!(config["listen"], "0.0.0.0:8080");
    // Dev login is off there, unasked; the database shown less its password.
    assert_eq!(config["auth"]["dev_login"], false);
    assert_eq!(
        config["database_url"],
        "postgres://herald:[redacted]@127.0.0.1:1/herald"
    );
}

/// A copy of `benches/` in a fresh directory (no `node_modules`), as a
/// fresh clone has it.
fn fresh_benches() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let benches = dir.path().join("benches");
    std::fs::create_dir_all(benches.join("bullmq")).unwrap();
    for file in [
        "bullmq/package.json",
        "bullmq/package-lock.json",
        "bullmq/peer.mjs",
    ] {
        std::fs::copy(repo(&format!("benches/{file}")), benches.join(file)).unwrap();
    }
    std::fs::copy(repo("benches/intake.sh"), benches.join("intake.sh")).unwrap();
    std::os::unix::fs::symlink("intake.sh", benches.join("delivery.sh")).unwrap();
    dir
}

#[test]
fn the_bullmq_peer_installs_from_its_lock_file_on_a_fresh_machine() {
    let dir = fresh_benches();
    let bullmq = dir.path().join("benches/bullmq");
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&bullmq)
        .output()
        .expect("npm (Debian's nodejs package)");
    assert!(
        out.status.success(),
        "npm ci: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(bullmq.join("node_modules/bullmq/package.json").exists());
}

#[test]
fn the_delivery_bench_fails_loudly_when_its_install_fails() {
    let dir = fresh_benches();
    // An npm that fails, first on PATH.
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(
        bin.join("npm"),
        "#!/bin/sh\necho 'npm error code E404 (test stand-in)' >&2\nexit 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin.join("npm"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(dir.path().join("benches/delivery.sh"))
        .env("PATH", path)
        .output()
        .expect("run benches/delivery.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("npm error code E404"),
        "npm's own error is shown: {stderr}"
    );
    assert!(stderr.contains("npm ci failed"), "{stderr}");
    assert!(!dir.path().join("benches/bullmq/node_modules").exists());
}

#[tokio::test]
async fn a_database_migrated_before_the_comment_only_migration_edits_still_migrates() {
    use sha2::Digest;
    let pg = support::Postgres::start().await;
    let env = vec![("HERALD_DATABASE_URL".to_string(), pg.url())];
    let (code, _, stderr) = herald_with(&env, &["migrate"]);
    assert_eq!(code, Some(0), "{stderr}");
    // As a database migrated by the release before migrations 3 and 4 had
    // their comments edited records them.
    let db = support::any_pool(&pg.url()).await;
    for (version, shipped) in [
        (3, "bb4342b9e0efe9b64582649ef26a319ee24e3e1f8af8b250eeb10d6f6ad1289d86623e18d6d6d3517b56f9718f889e04"),
        (4, "13b17f6e44dc11a4ae738428501d1f9fb205dcce9037320921ed9a287566e72b0e6946a38dc45fe657f12dd040f07800"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE _sqlx_migrations SET checksum = decode('{shipped}', 'hex') WHERE version = {version}"
        )))
        .execute(&db)
        .await
        .unwrap();
    }
    let (code, _, stderr) = herald_with(&env, &["migrate"]);
    assert_eq!(code, Some(0), "an older database still migrates: {stderr}");
    // … and now records the files as they are.
    for (version, file) in [(3, "0003_delivery.sql"), (4, "0004_ledger.sql")] {
        let text = std::fs::read(repo(&format!("migrations/postgres/{file}"))).unwrap();
        let want = hex::encode(sha2::Sha384::digest(&text));
        let got: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT encode(checksum, 'hex') FROM _sqlx_migrations WHERE version = {version}"
        )))
        .fetch_one(&db)
        .await
        .unwrap();
        assert_eq!(got, want, "migration {version}");
    }
}

#[tokio::test]
async fn dead_letters_written_before_effects_were_stored_are_given_theirs_on_migrating() {
    // A database as the release before migration 7 left it, holding one
    // dead letter of each consumer …
    let pg = support::Postgres::start().await;
    let before = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(repo("migrations/postgres")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.as_str() < "0007" {
            std::fs::copy(&path, before.path().join(&name)).unwrap();
        }
    }
    let db = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    sqlx::migrate::Migrator::new(before.path())
        .await
        .unwrap()
        .run(&db)
        .await
        .unwrap();
    for (consumer, topic) in [
        ("email", "application.submitted"),
        ("ledger", "charge.created"),
    ] {
        sqlx::query(
            "INSERT INTO dead_letters (id, event_id, consumer, topic, attempts, last_error,
                                       first_failed_at)
             VALUES (gen_random_uuid(), gen_random_uuid(), $1, $2, 5, 'refused', now())",
        )
        .bind(consumer)
        .bind(topic)
        .execute(&db)
        .await
        .unwrap();
    }
    // … is migrated by this release, and each letter names its effect, so a
    // replay puts its aggregate back to pending.
    let env = vec![("HERALD_DATABASE_URL".to_string(), pg.url())];
    let (code, _, stderr) = herald_with(&env, &["migrate"]);
    assert_eq!(code, Some(0), "{stderr}");
    let effects: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT consumer, effect FROM dead_letters ORDER BY consumer")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(
        effects,
        [
            ("email".into(), Some("application_email".into())),
            ("ledger".into(), Some("charge_ledger".into()))
        ]
    );
}

/// Jobs written by the release before jobs could change (Postgres migration
/// 0008, SQLite 0005) are, after `herald migrate`: open, at version 1,
/// updated when posted, and found by the filters, with their non-ASCII
/// letters lowercased as new jobs' are.
async fn jobs_written_before_jobs_could_change_are_open_and_filterable_after_migrating(
    backend: Backend,
) {
    let b = Backing::start(backend).await;
    let url = b.database_url();
    let (dir, first_new) = match backend {
        Backend::Postgres => ("migrations/postgres", "0008"),
        Backend::Sqlite => ("migrations/sqlite", "0005"),
    };
    let before = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(repo(dir)).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.as_str() < first_new {
            std::fs::copy(&path, before.path().join(&name)).unwrap();
        }
    }
    let old_release = sqlx::migrate::Migrator::new(before.path()).await.unwrap();
    let id = uuid::Uuid::now_v7();
    let posted_at = chrono::Utc::now() - chrono::Duration::hours(1);
    let insert = "INSERT INTO jobs (id, title, company, location, description, posted_at)
                  VALUES ($1, 'Ingénieur Rust', 'Ünited', 'São Paulo', 'Écrire du Rust', $2)";
    match backend {
        Backend::Postgres => {
            let db = sqlx::PgPool::connect(&url).await.unwrap();
            old_release.run(&db).await.unwrap();
            sqlx::query(insert)
                .bind(id)
                .bind(posted_at)
                .execute(&db)
                .await
                .unwrap();
            db.close().await;
        }
        Backend::Sqlite => {
            let options = url
                .parse::<sqlx::sqlite::SqliteConnectOptions>()
                .unwrap()
                .create_if_missing(true);
            let db = sqlx::SqlitePool::connect_with(options).await.unwrap();
            old_release.run(&db).await.unwrap();
            sqlx::query(insert)
                .bind(id.to_string())
                .bind(posted_at.timestamp_micros())
                .execute(&db)
                .await
                .unwrap();
            db.close().await;
        }
    }
    let env = vec![("HERALD_DATABASE_URL".to_string(), url.clone())];
    let (code, _, stderr) = herald_with(&env, &["migrate"]);
    assert_eq!(code, Some(0), "{stderr}");

    let herald = b.daemon(&[]).await;
    let job: serde_json::Value = herald
        .get(&format!("/api/jobs/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(job["status"], "open");
    assert_eq!(job["version"], 1);
    assert_eq!(job["updated_at"], job["posted_at"]);
    for query in [
        "location=S%C3%83O%20PAULO",
        "company=%C3%BCNITED",
        "q=ING%C3%89NIEUR",
        "q=%C3%A9crire",
    ] {
        let page: serde_json::Value = herald
            .get(&format!("/api/jobs?{query}"))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(page["items"][0]["id"], id.to_string(), "?{query}");
    }
}

on_both_backends!(jobs_written_before_jobs_could_change_are_open_and_filterable_after_migrating);
