//! `herald attack`: the promise checked on a live daemon.
//!
//! It drives `--ops` logical operations (applications and charges, half
//! each, every one by a fresh user so each should cause exactly one side
//! effect) through the [retrying client](super) and a built-in
//! [lossy proxy](super::lossy_proxy) that forwards every request but loses
//! `--drop-response-rate` of the responses after Herald acted on them.
//! `--dup-rate` of the operations are also sent a second time, concurrently,
//! as a double click would (same key, same body). `--kill-cmd`, when given, is
//! run `--kills` times at random moments (it is expected to kill the daemon
//! and start it again; the client's retries carry the operations across).
//!
//! Afterwards it waits for the pipeline to drain, reads `/metrics` on the
//! admin listener and prints operations, HTTP attempts, lost responses and
//! side effects with the verdict; it fails unless side effects equal
//! operations. The side effects are the increases over the run of
//! `herald_emails_delivered` and `herald_ledger_entries`, which the daemon
//! reads from its database at each scrape: exact whichever process answered
//! and across restarts. The per-process counters (`herald_emails_sent_total`,
//! `herald_ledger_entries_total`) are printed beside them; a `--kill-cmd`
//! restart starts those from zero.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use rand::Rng;
use serde_json::json;

use super::lossy_proxy::LossyProxy;
use super::{ClientPolicy, Operation, RetryingClient};
use crate::actors::retry_budget::RetryBudgetArgs;
use crate::config::Config;
use crate::http::auth::Auth;
use crate::retry::RetryPolicy;

#[derive(Debug, Clone, clap::Args)]
pub struct AttackArgs {
    /// The daemon's public URL.
    #[arg(long)]
    pub target: String,
    /// The daemon's admin URL (for /metrics).
    #[arg(long)]
    pub admin: String,
    /// Logical operations (half applications, half charges).
    #[arg(long, default_value_t = 1000)]
    pub ops: usize,
    /// Share of operations also sent a second time, concurrently.
    #[arg(long, default_value_t = 0.3)]
    pub dup_rate: f64,
    /// Operations in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Share of responses the proxy loses after Herald acted.
    #[arg(long, default_value_t = 0.15)]
    pub drop_response_rate: f64,
    /// Shell command run at random moments (e.g. kill -9 and restart the daemon).
    #[arg(long)]
    pub kill_cmd: Option<String>,
    /// How many times to run --kill-cmd.
    #[arg(long, default_value_t = 3)]
    pub kills: usize,
    /// Write every attempt as JSON lines here.
    #[arg(long)]
    pub transcript: Option<std::path::PathBuf>,
    /// Longest wait for the pipeline to drain, in seconds.
    #[arg(long, default_value_t = 120)]
    pub drain_secs: u64,
}

/// What the verdict compares: the durable gauges (read from the database
/// at each scrape, so exact across restarts and processes), and the
/// process's own counters, shown beside them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Effects {
    emails: f64,
    ledger: f64,
    emails_counter: f64,
    ledger_counter: f64,
}

async fn effects(http: &reqwest::Client, admin: &str) -> anyhow::Result<Effects> {
    let text = http
        .get(format!("{}/metrics", admin.trim_end_matches('/')))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let value = |name: &str| {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (metric, number) = l.rsplit_once(' ')?;
                (metric == name.trim()).then(|| number.parse::<f64>().ok())?
            })
            .unwrap_or(0.0)
    };
    Ok(Effects {
        emails: value("herald_emails_delivered"),
        ledger: value("herald_ledger_entries"),
        emails_counter: value("herald_emails_sent_total"),
        ledger_counter: value("herald_ledger_entries_total"),
    })
}

/// A user's bearer token: signed with `jwt_secret` when this process has it,
/// else from the daemon's dev login.
async fn user_token(
    auth: Option<&Auth>,
    http: &reqwest::Client,
    target: &str,
    user: &str,
) -> anyhow::Result<String> {
    let email = format!("{user}@attack.example");
    if let Some(auth) = auth {
        return auth
            .issue(user, &email, 3600)
            .map_err(|e| anyhow::anyhow!("{e:?}"));
    }
    let body: serde_json::Value = http
        .post(format!("{target}/api/dev/login"))
        .json(&json!({ "email": email }))
        .send()
        .await?
        .error_for_status()
        .context("dev login (set HERALD_JWT_SECRET to sign tokens instead)")?
        .json()
        .await?;
    Ok(body["token"].as_str().context("token")?.to_string())
}

/// Runs the attack; `Ok(true)` when side effects equal operations.
pub async fn attack(args: AttackArgs, config: &Config) -> anyhow::Result<bool> {
    let target = args.target.trim_end_matches('/').to_string();
    let admin_token = config
        .admin_token
        .as_ref()
        .context("herald attack posts its job as admin: set HERALD_ADMIN_TOKEN")?;
    let auth = match (&config.admin_token, &config.jwt_secret) {
        (Some(admin), Some(secret)) => Some(Auth::new(admin, secret)),
        _ => None,
    };
    let http = reqwest::Client::new();
    let policy = ClientPolicy {
        retry: RetryPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(3),
            max_attempts: 30,
            max_delay: Duration::from_secs(60),
        },
        // The attack's losses are the point: budget a few retries per operation.
        budget: RetryBudgetArgs {
            capacity: (args.ops * 4) as f64,
            refill_per_success: 1.0,
            refill_per_sec: 10.0,
            view: Default::default(),
        },
        attempt_timeout: Duration::from_secs(10),
    };
    // The job everyone applies to, posted directly (not through the proxy).
    let direct = RetryingClient::new(&target, policy.clone())?;
    let job = direct
        .execute(&Operation::post(
            "/api/jobs",
            admin_token.expose(),
            json!({"title": "Attack target", "company": "Herald", "location": "Loopback",
                   "description": "The job of a herald attack run"}),
        ))
        .await?;
    if job.status != 201 {
        bail!("posting the job: HTTP {} {}", job.status, job.body);
    }
    let job_id = job.body["id"].clone();
    let before = effects(&http, &args.admin).await?;

    let drop_rate = args.drop_response_rate.clamp(0.0, 1.0);
    let proxy = LossyProxy::start(
        &target,
        Box::new(move |method, _path| {
            method == hyper::Method::POST && rand::rng().random_bool(drop_rate)
        }),
    )
    .await?;
    let client = RetryingClient::new(&proxy.url, policy)?;

    // The operations, each with its key fixed now; some sent twice.
    let run = uuid::Uuid::new_v4().simple().to_string();
    let run = &run[..8];
    let mut sends = Vec::new();
    let (mut applications, mut charges, mut duplicated) = (0usize, 0usize, 0usize);
    for i in 0..args.ops {
        let user = format!("attack-{run}-{i}");
        let token = user_token(auth.as_ref(), &http, &target, &user).await?;
        let op = if i % 2 == 0 {
            applications += 1;
            Operation::post("/api/applications", &token, json!({ "job_id": job_id }))
        } else {
            charges += 1;
            Operation::post(
                "/api/charges",
                &token,
                json!({"amount_cents": 100 + i as i64, "currency": "EUR", "description": "attack"}),
            )
        };
        if rand::rng().random_bool(args.dup_rate.clamp(0.0, 1.0)) {
            duplicated += 1;
            sends.push(op.clone());
        }
        sends.push(op);
    }
    // Neighbours in the list run together: a duplicate races its original.
    let started = Instant::now();
    let mut kills = tokio::task::JoinSet::new();
    if let Some(cmd) = &args.kill_cmd {
        kills.spawn(run_kills(
            cmd.clone(),
            args.kills,
            Duration::from_millis(500 + (args.ops as u64) * 5),
        ));
    }
    let failed = Arc::new(AtomicUsize::new(0));
    let unexpected = Arc::new(AtomicUsize::new(0));
    futures::stream::iter(sends.iter())
        .map(|op| {
            let (client, failed, unexpected) = (client.clone(), failed.clone(), unexpected.clone());
            async move {
                match client.execute(op).await {
                    Ok(answer) if answer.status == 201 => {}
                    Ok(answer) => {
                        unexpected.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(status = answer.status, body = %answer.body, "unexpected answer");
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "operation failed");
                    }
                }
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect::<Vec<()>>()
        .await;
    let sent_in = started.elapsed();
    while let Some(killed) = kills.join_next().await {
        killed??;
    }

    // Drain: until the effects reach the operations, or stop moving.
    let deadline = Instant::now() + Duration::from_secs(args.drain_secs);
    let mut last = effects(&http, &args.admin).await.unwrap_or_default();
    let mut still_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = effects(&http, &args.admin).await.unwrap_or(last);
        let done = now.emails - before.emails >= applications as f64
            && now.ledger - before.ledger >= charges as f64;
        if now != last {
            still_since = Instant::now();
        }
        last = now;
        if done && still_since.elapsed() > Duration::from_secs(2) {
            break;
        }
        if Instant::now() > deadline {
            break;
        }
    }
    let emails = (last.emails - before.emails).max(0.0) as usize;
    let ledger = (last.ledger - before.ledger).max(0.0) as usize;
    let counted = (
        (last.emails_counter - before.emails_counter).max(0.0) as usize,
        (last.ledger_counter - before.ledger_counter).max(0.0) as usize,
    );
    let records = client.transcript().records();
    if let Some(path) = &args.transcript {
        client
            .transcript()
            .write_jsonl(path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let lost = proxy.seen().iter().filter(|s| s.dropped).count();
    let failed = failed.load(Ordering::Relaxed);
    let unexpected = unexpected.load(Ordering::Relaxed);
    let pass = emails == applications && ledger == charges && failed == 0 && unexpected == 0;
    println!(
        "herald attack: {} operations through a lossy proxy in {:.1} s",
        args.ops,
        sent_in.as_secs_f64()
    );
    println!("  operations          : {applications} applications, {charges} charges");
    println!("  duplicated          : {duplicated} sent twice, concurrently (same key)");
    println!(
        "  HTTP attempts       : {} ({} responses lost by the proxy)",
        records.len(),
        lost
    );
    println!("  client failures     : {failed} gave up, {unexpected} unexpected answers");
    if let Some(cmd) = &args.kill_cmd {
        println!("  kills               : {} x `{cmd}`", args.kills);
    }
    println!("  side effects        : {emails} emails (herald_emails_delivered), {ledger} ledger entries (herald_ledger_entries)");
    println!(
        "  process counters    : {} emails sent, {} ledger entries (reset by a restart)",
        counted.0, counted.1
    );
    println!(
        "  verdict             : {}",
        if pass {
            "PASS — side effects == operations"
        } else {
            "FAIL — side effects != operations"
        }
    );
    Ok(pass)
}

/// Runs `cmd` `kills` times at random moments within `span`.
async fn run_kills(cmd: String, kills: usize, span: Duration) -> anyhow::Result<()> {
    let mut moments: Vec<u64> = (0..kills)
        .map(|_| rand::rng().random_range(0..=span.as_millis() as u64))
        .collect();
    moments.sort_unstable();
    let start = tokio::time::Instant::now();
    for at in moments {
        tokio::time::sleep_until(start + Duration::from_millis(at)).await;
        let status = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .status()
            .await
            .with_context(|| format!("running --kill-cmd `{cmd}`"))?;
        if !status.success() {
            bail!("--kill-cmd `{cmd}` failed: {status}");
        }
    }
    Ok(())
}
