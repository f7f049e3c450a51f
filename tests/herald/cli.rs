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
    assert!(!out.status.success(), "the second process must not run");
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
    let (code, _, stderr) = herald(&[("HERALD_MODE", "production")], &["config"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("HERALD_DATABASE_URL"), "{stderr}");
}

#[test]
fn a_database_that_refuses_connections_is_reported_with_its_cause_at_once() {
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
        ],
        &["serve"],
    );
    let took = started.elapsed();
    assert_ne!(code, 0);
    assert!(
        stderr.contains("cannot connect to the database") && stderr.contains("refused"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("pw@"),
        "no password in the message: {stderr}"
    );
    assert!(!stdout.contains("listening"), "never ready: {stdout}");
    assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
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
