//! The `herald` binary with none of the caller's Herald settings
//! (`HERALD_*`, `RESEND_*`, `SENTRY_DSN`): every test states the
//! configuration it runs with. Included with `#[path]` by the tests that do
//! not need the rest of the harness.

use std::process::Command;

/// A `Command` for this build's `herald`, its configuration cleared.
pub fn herald_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    for (name, _) in std::env::vars() {
        if name.starts_with("HERALD_") || name.starts_with("RESEND_") || name == "SENTRY_DSN" {
            cmd.env_remove(name);
        }
    }
    cmd
}
