//! The `herald` command itself: version, and configuration mistakes refused at
//! start with a message that names the key.

use std::process::Command;

fn herald(env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    for (k, _) in std::env::vars() {
        if k.starts_with("HERALD_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
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
