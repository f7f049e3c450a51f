//! Packaging: the systemd unit passes `systemd-analyze verify` and keeps its
//! readiness protocol and hardening; the Dockerfile passes hadolint; the
//! daemon speaks systemd's notify protocol (READY=1 once serving,
//! STOPPING=1 on SIGTERM); `herald healthcheck` (the Docker HEALTHCHECK)
//! tells a ready daemon from a missing one. `scripts/test` installs
//! systemd-analyze and hadolint.

mod support;

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
