//! The `herald` command line: `serve` (the default), `migrate`, `config`,
//! `audit`, `healthcheck`, `bench` and `attack`.
//!
//! It lives in the library, not in src/main.rs, so that the daemon's whole
//! async call tree is compiled once, here: `server::run` is generic over its
//! shutdown signal and ready callback, and the runtime's `block_on` over the
//! future it drives, so whatever crate names the concrete types compiles
//! that tree. Named from the binary, it was compiled a second time there
//! (45 s of a release build on two cores).
//!
//! How a command ends is its exit status, one meaning each (docs/DEPLOY.md,
//! "Exit codes"): 0 done; 2 the configuration is bad or incomplete; 3 a
//! resource is busy or unreachable at start (the database, after
//! `database.connect_timeout_ms` of retries; an embedded file another
//! process holds; a listen address in use; the identity provider's JWKS
//! URL); 4 `herald audit` found a broken invariant; 1 anything else. The
//! unit file keeps systemd from restarting a daemon that exited 2: the same
//! settings would fail the same way.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError};
use crate::http::jwks::IdentityProviderError;
use crate::server::{self, Listeners};
use crate::store::{AtStart, StoreError};

/// `herald audit` found rows that break an invariant (exit 4).
#[derive(Debug, thiserror::Error)]
#[error("{0} invariant(s) broken")]
struct BrokenInvariants(usize);

/// The exit status a failed command ends with: what the first cause in the
/// error's chain that has a meaning of its own says, else 1.
fn exit_status(error: &anyhow::Error) -> u8 {
    for cause in error.chain() {
        if cause.is::<ConfigError>() || matches!(cause.downcast_ref(), Some(StoreError::Refused(_)))
        {
            return 2;
        }
        if matches!(cause.downcast_ref(), Some(StoreError::Unavailable(_))) {
            return 3;
        }
        if cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::AddrInUse)
        {
            return 3;
        }
        if matches!(
            cause.downcast_ref(),
            Some(IdentityProviderError::Unreachable(_))
        ) {
            return 3;
        }
        if cause.is::<BrokenInvariants>() {
            return 4;
        }
    }
    1
}

#[derive(Parser)]
#[command(
    name = "herald",
    version,
    about = "Real-time job board daemon that never does a side effect twice"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default): applies pending migrations, then serves.
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Print the configuration this environment gives, as JSON (secrets
    /// redacted), and exit: 0 if `serve` would accept it, 2 naming the bad
    /// key or the missing setting if not.
    Config,
    /// Check the effectively-once invariants in the database once (what the
    /// auditor does on a schedule); print each, exit 4 if any is broken.
    Audit,
    /// Exit 0 if the daemon on this configuration's `listen` address answers
    /// `/readyz` (the Docker HEALTHCHECK; no curl needed in the image).
    Healthcheck,
    /// Benchmarks that print ratios against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
    /// Drive duplicated, concurrent operations through a lossy proxy at a
    /// live daemon and check that side effects equal operations (exit 1 if not).
    Attack(crate::client::attack::AttackArgs),
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn serve(mut config: Config) -> anyhow::Result<()> {
    // Before anything is created: the database, secrets, directories.
    server::preflight(&config)?;
    let new_admin_token = crate::secrets::ensure_embedded_secrets(&mut config)?;
    let listeners = Listeners::bind(&config).await?;
    let (public, admin) = listeners.addresses()?;
    if config.dev_login() && !config.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %config.listen,
            "auth.dev_login is on and the public listener is not loopback: anyone who \
             reaches it can sign in as any email address"
        );
    }
    let broker = if config.redis_url.is_some() {
        "Redis"
    } else {
        "in-process"
    };
    let dev_login = if config.dev_login() { "on" } else { "off" };
    // Printed once the daemon is ready (migrated, actors running), never
    // before: the first line is the machine-readable one tests and scripts
    // read the ports from.
    let mut banner = format!("herald listening public=http://{public} admin=http://{admin}\n");
    if config.is_embedded() {
        banner.push_str(&format!(
            "\n  Herald is running (embedded: {}, {broker} broker, {} email, dev login {dev_login}).\n",
            config.database_url.expose(),
            config.email.transport
        ));
        banner.push_str(&format!("  Job board:  http://{public}/\n"));
        banner.push_str(&format!(
            "  Admin API:  http://{admin}/admin/status   (Authorization: Bearer <admin token>)\n"
        ));
        banner.push_str(&format!(
            "  Operators:  http://{admin}/admin/   (sign in with the admin token)\n"
        ));
        match &new_admin_token {
            Some(token) => banner.push_str(&format!(
                "  Admin token (shown once; kept in {}): {}\n",
                config.state_dir.join("admin_token").display(),
                token.expose()
            )),
            None if config.admin_token.is_some() => banner.push_str(&format!(
                "  Admin token: as configured, or in {}\n",
                config.state_dir.join("admin_token").display()
            )),
            None => {}
        }
    } else {
        banner.push_str(&format!(
            "  Herald is running (production: {}, {broker} broker, {} email, dev login {dev_login}).\n",
            config.database_url.scheme(),
            config.email.transport
        ));
    }
    // Written, not `println!`: a reader that took the first line and closed
    // the pipe (a supervisor, `herald bench`) must not kill the daemon.
    let ready = move || {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{banner}").and_then(|()| out.flush());
    };
    server::run(config, listeners, shutdown_signal(), ready).await
}

async fn migrate(config: Config) -> anyhow::Result<()> {
    let store = crate::store::open_at_start(&config, AtStart::Migrated).await?;
    println!("migrations applied ({})", store.backend());
    Ok(())
}

async fn audit(config: &Config) -> anyhow::Result<()> {
    let store = crate::store::open_at_start(config, AtStart::Reachable).await?;
    // The same checks the Auditor runs on its schedule.
    let found = store
        .audit(
            &crate::actors::CONSUMERS,
            std::time::Duration::from_secs(config.audit.max_unsettled_age_secs),
            std::time::Duration::from_secs(config.janitor.retention_secs),
        )
        .await?;
    let mut broken = 0;
    for (invariant, rows) in &found {
        let verdict = if *rows == 0 { "ok" } else { "BROKEN" };
        println!("{:<34} {rows:>8}  {verdict}", invariant.name());
        broken += usize::from(*rows > 0);
    }
    if broken > 0 {
        return Err(BrokenInvariants(broken).into());
    }
    println!("all {} invariants hold ({})", found.len(), store.backend());
    Ok(())
}

/// `herald config`: refuses what `serve` would refuse (the same checks,
/// the same message, exit 2), else prints the configuration in effect.
fn print_config(config: &Config) -> anyhow::Result<()> {
    server::preflight(config)?;
    let mut shown = serde_json::to_value(config)?;
    // The value in effect, not the setting: unset means "decided by mode".
    shown["auth"]["dev_login"] = config.dev_login().into();
    println!("{}", serde_json::to_string_pretty(&shown)?);
    Ok(())
}

async fn healthcheck(config: &Config) -> anyhow::Result<()> {
    let mut address = config.listen;
    if address.ip().is_unspecified() {
        // Bound to every interface: ask on loopback.
        address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let url = format!("http://{address}/readyz");
    let response = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(3))
        .build()?
        .get(&url)
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "{url} answered {}",
        response.status()
    );
    Ok(())
}

/// The `herald` command: parses its arguments and configuration, runs the
/// subcommand on a multi-threaded runtime, and says how it ended. The binary
/// (src/main.rs) only chooses the allocator and calls this.
pub fn main() -> ExitCode {
    // Everything Herald creates (the SQLite file and its WAL, generated
    // secrets, `.eml` files, their directories) is its own: 0600 and 0700.
    // SAFETY: umask only swaps the process's file-creation mask.
    unsafe { libc::umask(0o077) };
    // Several TLS users (sqlx, fred, reqwest, sentry) link rustls; reqwest
    // and sentry are built with no provider of their own (Cargo.toml), so
    // this is the one they use: ring, as sqlx and fred do.
    let _ = rustls::crypto::ring::default_provider().install_default();
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("herald: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run_cli())
}

async fn run_cli() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("herald: {e}");
            return ExitCode::from(2);
        }
    };
    let _traces = crate::telemetry::init_logging(&config.log, &config.telemetry);
    // Errors, panics and DLQ alerts go to Sentry when SENTRY_DSN is set; the
    // guard flushes queued events when the command returns.
    let dsn = match config
        .sentry_dsn
        .as_ref()
        .map(|d| d.expose().parse::<sentry::types::Dsn>())
    {
        None => None,
        Some(Ok(dsn)) => Some(dsn),
        Some(Err(e)) => {
            eprintln!("herald: configuration key `sentry_dsn` (SENTRY_DSN): {e}");
            return ExitCode::from(2);
        }
    };
    let _sentry = dsn.map(|dsn| {
        let mut options = sentry::ClientOptions::default();
        options.dsn = Some(dsn);
        options.release = sentry::release_name!();
        options.send_default_pii = false;
        sentry::init(options)
    });
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config).await,
        Command::Migrate => migrate(config).await,
        Command::Config => print_config(&config),
        Command::Audit => audit(&config).await,
        Command::Healthcheck => healthcheck(&config).await,
        Command::Bench(cmd) => crate::bench::run(cmd, config).await,
        Command::Attack(args) => match crate::client::attack::attack(args, &config).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(anyhow::anyhow!("side effects differ from operations")),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: {e:#}");
            ExitCode::from(exit_status(&e))
        }
    }
}
