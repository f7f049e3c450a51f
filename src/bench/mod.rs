//! `herald bench …`: measurements against a baseline taken in the same run.
//!
//! `herald bench intake` measures the apply path against the database doing
//! the same work without Herald: first `pgbench` runs, at the same
//! concurrency, a script with the very statements Herald executes per keyed
//! application (key claim, then one transaction with the job lookup,
//! application insert, outbox insert and key completion); then a Herald
//! process (a child, so the load generator is its own process) serves
//! `POST /api/applications` with a fresh user and key per request. It prints
//! both rates, Herald's p50/p99 latency and the ratio. Nothing here asserts a
//! speed: it reports one.
//!
//! The daemon under test runs with `relay.enabled = false`: the benchmark
//! measures intake, and pgbench does no delivery work either.
//!
//! Two choices keep the comparison about Herald when everything shares one
//! small machine. The load generator is a minimal keep-alive HTTP/1.1 client
//! ([`LoadConnection`], the role `wrk` plays), so the client side costs about
//! what pgbench costs on the database side. And Herald runs with one tokio
//! worker thread by default (`BENCH_WORKERS=n` to change it): its share of a
//! host that also runs PostgreSQL and Redis is under one core, and a second
//! worker mostly adds cross-thread wake-ups (on the 2-core reference machine,
//! 125 µs of Herald CPU per request with two workers against 106 µs with one).
//!
//! `herald bench stream` ([`stream`]) holds thousands of live job streams on
//! one process and reports delivery latency and peak memory.
//!
//! Point it at a disposable database: `benches/intake.sh` starts throwaway
//! PostgreSQL and Redis servers and runs it.

mod filters;
mod stream;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;

use crate::config::{Config, Secret};
use crate::http::auth::Auth;
use crate::store::postgres::{CLAIM_KEY, SUBMIT_APPLICATION};

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// POST /api/applications against pgbench running the same SQL.
    /// Uses HERALD_DATABASE_URL (and HERALD_REDIS_URL when set).
    Intake {
        /// Concurrent clients, for both pgbench and Herald.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Seconds each side runs per round.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Alternating rounds (pgbench, then Herald).
        #[arg(long, default_value_t = 4)]
        rounds: usize,
        /// The pgbench binary.
        #[arg(long, default_value = "pgbench")]
        pgbench: String,
    },
    /// End-to-end delivery (outbox insert -> email accepted by a zero-latency
    /// fake Resend) against BullMQ moving the same jobs through the same call.
    /// Uses HERALD_DATABASE_URL and HERALD_REDIS_URL (both required).
    Delivery {
        /// Events (and BullMQ jobs).
        #[arg(long, default_value_t = 20_000)]
        events: u32,
        /// Consumer concurrency: Herald's email.workers and BullMQ's Worker.
        #[arg(long, default_value_t = 16)]
        concurrency: u32,
        /// Alternating rounds (Herald, then BullMQ).
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// The BullMQ peer script (its node_modules installed beside it).
        #[arg(long, default_value = "benches/bullmq/peer.mjs")]
        peer: String,
        /// The node binary.
        #[arg(long, default_value = "node")]
        node: String,
        /// Limit the fake Resend to this many requests per second (429 past
        /// it), as Resend does (2 by default); both sides run at that rate:
        /// Herald's `email.max_per_sec`, BullMQ's Worker limiter. Unset: no
        /// limit, zero latency.
        #[arg(long)]
        provider_rps: Option<u32>,
        /// The fake Resend's time per request when `--provider-rps` is set.
        #[arg(long, default_value_t = 20)]
        provider_latency_ms: u64,
    },
    /// Delivery latency of job events to many concurrent stream clients
    /// on one process (unfiltered, then with `--filters`), and that
    /// process's peak memory.
    /// Uses HERALD_DATABASE_URL and HERALD_REDIS_URL.
    Stream {
        /// Concurrent stream clients.
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
        /// Jobs posted once every client has its snapshot.
        #[arg(long, default_value_t = 100)]
        jobs: usize,
        /// Pause between two posts.
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
        /// Then again with the clients spread over this many filters (a
        /// multiple of 10), jobs edited as well as posted; 0: skip.
        #[arg(long, default_value_t = 0)]
        filters: usize,
    },
    /// `GET /api/jobs` filtered by a random word (`q`) and by location, on
    /// a board of `--jobs` open jobs, against the unfiltered list; on the
    /// configured Postgres, then on a fresh SQLite file.
    /// Uses HERALD_DATABASE_URL (Postgres).
    Filters {
        /// Open jobs on the board.
        #[arg(long, default_value_t = 100_000)]
        jobs: usize,
        /// Requests per round (unfiltered, `q`, `location`).
        #[arg(long, default_value_t = 4_000)]
        requests: usize,
        /// Concurrent keep-alive clients.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
}

pub async fn run(command: BenchCommand, config: Config) -> anyhow::Result<()> {
    match command {
        BenchCommand::Intake {
            concurrency,
            seconds,
            rounds,
            pgbench,
        } => {
            let duration = Duration::from_secs(seconds.max(1));
            intake(config, concurrency, duration, rounds.max(1), &pgbench).await
        }
        BenchCommand::Filters {
            jobs,
            requests,
            concurrency,
        } => filters::filters(config, jobs.max(1), requests.max(1), concurrency.max(1)).await,
        BenchCommand::Stream {
            clients,
            jobs,
            interval_ms,
            filters,
        } => {
            stream::stream(
                config,
                clients.max(1),
                jobs.max(1),
                Duration::from_millis(interval_ms),
                filters,
            )
            .await
        }
        BenchCommand::Delivery {
            events,
            concurrency,
            rounds,
            peer,
            node,
            provider_rps,
            provider_latency_ms,
        } => {
            let provider = provider_rps.map(|rps| Provider {
                rps: rps.max(1),
                latency: Duration::from_millis(provider_latency_ms),
            });
            delivery(
                config,
                provider,
                events.max(1),
                concurrency.max(1),
                rounds.max(1),
                &peer,
                &node,
            )
            .await
        }
    }
}

/// The pgbench script: the very statements Herald runs per keyed application
/// ([`CLAIM_KEY`], then [`SUBMIT_APPLICATION`]), with their parameters replaced
/// by pgbench expressions. A fresh random user and key per transaction.
fn pgbench_script() -> String {
    let principal = "('user' || chr(58) || 'pg-' || CAST(:uid AS text))";
    let key = "('key-' || CAST(:uid AS text))";
    let user = "('pg-' || CAST(:uid AS text))";
    let claim = substitute(
        CLAIM_KEY,
        &[
            principal,
            "'POST'",
            "'/api/applications'",
            key,
            "sha256(CAST('fp' || CAST(:uid AS text) AS bytea))",
            "gen_random_uuid()",
            "CAST(30 AS float8)",
            "CAST(86400 AS float8)",
        ],
    );
    let body = format!("'{}'", "x".repeat(250));
    // The payload Herald builds in Rust, less the job's two fields.
    let payload = format!(
        "jsonb_build_object('application_id', gen_random_uuid(), 'job_id', CAST(:job AS uuid), \
         'user_id', {user}, 'email', ('pg-' || CAST(:uid AS text) || '@example.com'))"
    );
    let submit = substitute(
        SUBMIT_APPLICATION,
        &[
            "gen_random_uuid()",
            "CAST(:job AS uuid)",
            user,
            "('pg-' || CAST(:uid AS text) || '@example.com')",
            "CAST(NULL AS text)",
            "CAST(NULL AS text)",
            "now()",
            principal,
            "'POST'",
            "'/api/applications'",
            key,
            "CAST(:holder AS uuid)",
            "gen_random_uuid()",
            "CAST(201 AS int2)",
            &body,
            "'application.submitted'",
            &payload,
            "'job_title'",
            "'company'",
            "'open'",
            "CAST(NULL AS text)",
        ],
    );
    format!("\\set uid random(1, 9000000000000000000)\n{claim} \\gset\n{submit};\n")
}

/// Replaces each whole `$n` with `values[n - 1]`. A parameter with no value
/// is left as it is, so the statement fails loudly (and the unit test below
/// sees it) instead of `$20` silently becoming the first value and a `0`.
fn substitute(sql: &str, values: &[&str]) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let digits = rest[at + 1..]
            .bytes()
            .take_while(u8::is_ascii_digit)
            .count();
        let number = rest[at + 1..at + 1 + digits].parse::<usize>().ok();
        match number.and_then(|n| values.get(n.checked_sub(1)?)) {
            Some(value) => out.push_str(value),
            None => out.push_str(&rest[at..at + 1 + digits]),
        }
        rest = &rest[at + 1 + digits..];
    }
    out.push_str(rest);
    out
}

/// CPU seconds (user + system) a process has used so far, from /proc.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// A `herald serve` child process, ended when dropped.
struct Child {
    process: std::process::Child,
    public: String,
    /// Fresh per run: the child's admin token and JWT secret.
    admin_token: String,
    jwt_secret: String,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn spawn_herald(config: &Config, extra: &[(&str, String)]) -> anyhow::Result<Child> {
    let admin_token = format!("bench-admin-{}", uuid::Uuid::new_v4());
    let jwt_secret = format!("bench-jwt-secret-{}", uuid::Uuid::new_v4());
    let exe = std::env::current_exe().context("locating the herald binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve")
        .env("HERALD_DATABASE_URL", config.database_url.expose())
        .env("HERALD_LISTEN", "127.0.0.1:0")
        .env("HERALD_ADMIN_LISTEN", "127.0.0.1:0")
        .env("HERALD_ADMIN_TOKEN", &admin_token)
        .env("HERALD_JWT_SECRET", &jwt_secret)
        // The load comes from one address; per-client limits would measure
        // themselves instead of the daemon.
        .env("HERALD_LIMITS__PER_IP", "false")
        .env("RUST_LOG", "warn")
        .env(
            "HERALD_STATE_DIR",
            std::env::temp_dir().join("herald-bench-state"),
        )
        .env(
            "TOKIO_WORKER_THREADS",
            std::env::var("BENCH_WORKERS").unwrap_or_else(|_| "1".into()),
        )
        .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    match &config.redis_url {
        Some(url) => cmd.env("HERALD_REDIS_URL", url.expose()),
        None => cmd.env_remove("HERALD_REDIS_URL"),
    };
    let mut process = cmd.spawn().context("starting herald serve")?;
    let stdout = process.stdout.take().context("herald stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("reading herald's listening line")?;
    let public = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("public="))
        .context("herald did not print its address")?
        .to_string();
    Ok(Child {
        process,
        public,
        admin_token,
        jwt_secret,
    })
}

fn run_pgbench(
    pgbench: &str,
    url: &str,
    job_id: &str,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let script = std::env::temp_dir().join(format!("herald-intake-{}.sql", uuid::Uuid::new_v4()));
    std::fs::write(&script, pgbench_script())?;
    let output = Command::new(pgbench)
        .args(["-n", "-M", "prepared"])
        .args(["-c", &concurrency.to_string()])
        .args(["-j", &concurrency.min(4).to_string()])
        .args(["-T", &duration.as_secs().to_string()])
        .arg("-f")
        .arg(&script)
        .args(["-D", &format!("job={job_id}")])
        .arg(url)
        .output()
        .with_context(|| format!("running {pgbench} (apt-get install postgresql)"))?;
    let _ = std::fs::remove_file(&script);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "pgbench failed: {}{}",
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("tps = ")
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse::<f64>().ok())
        })
        .with_context(|| format!("no tps in pgbench output:\n{stdout}"))
}

/// `POST /api/applications` as HTTP/1.1 bytes, for [`LoadConnection`].
fn apply_request(host: &str, token: &str, key: &str, body: &str) -> Vec<u8> {
    format!(
        "POST /api/applications HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {token}\r\n\
         idempotency-key: {key}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The load generator's side of one keep-alive HTTP/1.1 connection: writes a
/// request, reads the status line, the headers and a `content-length` body.
/// Deliberately minimal (like `wrk`, or pgbench on the database side), so the
/// client's own CPU — on the same two cores as the server — stays small and
/// the ratio measures Herald, not an HTTP client library.
struct LoadConnection {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl LoadConnection {
    async fn open(addr: &str) -> std::io::Result<LoadConnection> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(LoadConnection {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends one request and returns the response's status code.
    async fn exchange(&mut self, request: &[u8]) -> std::io::Result<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
        self.stream.write_all(request).await?;
        self.buf.clear();
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).map_err(|_| bad("head"))?;
                let status = head
                    .get(9..12)
                    .and_then(|s| s.parse::<u16>().ok())
                    .ok_or_else(|| bad("status line"))?;
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .ok_or_else(|| bad("no content-length"))?;
                let total = end + 4 + length;
                while self.buf.len() < total {
                    if self.stream.read_buf(&mut self.buf).await? == 0 {
                        return Err(bad("closed mid-body"));
                    }
                }
                return Ok(status);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(bad("closed"));
            }
        }
    }
}

async fn intake(
    config: Config,
    concurrency: usize,
    duration: Duration,
    rounds: usize,
    pgbench: &str,
) -> anyhow::Result<()> {
    if config.database_url.scheme() == "sqlite" {
        bail!(
            "bench intake compares against pgbench: set HERALD_DATABASE_URL to a postgres:// URL"
        );
    }
    // Intake only: pgbench does no delivery work either.
    let herald = spawn_herald(&config, &[("HERALD_RELAY__ENABLED", "false".into())])?;

    let job_id = post_bench_job(&herald).await?;

    // Tokens are signed before any clock starts, so the load generator
    // spends its CPU on requests, not on HMACs. One fresh user per request.
    let auth = Auth::new(
        &Secret::new(&herald.admin_token),
        &Secret::new(&herald.jwt_secret),
    );
    let per_worker = (duration.as_secs() as usize * rounds * 4000 / concurrency).max(100);
    let mut users = Vec::new();
    for worker in 0..concurrency {
        let mut tokens = Vec::with_capacity(per_worker);
        for n in 0..per_worker {
            let user = format!("bench-{worker}-{n}");
            let token = auth
                .issue(&user, &format!("{user}@example.com"), 3600)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            tokens.push((user, token));
        }
        users.push(std::sync::Mutex::new(tokens.into_iter()));
    }
    let users = Arc::new(users);
    let body = Arc::new(serde_json::to_string(
        &serde_json::json!({ "job_id": job_id }),
    )?);
    let addr = herald
        .public
        .strip_prefix("http://")
        .context("herald's public address is not http://")?
        .to_string();
    let url = config.database_url.expose().to_string();

    // Rounds alternate the two sides, so drift in what else the machine is
    // doing touches both alike; the ratio is over the totals.
    let (mut pg_tx, mut pg_secs, mut herald_ok, mut herald_secs) = (0.0, 0.0, 0u64, 0.0);
    let mut hist = Histogram::<u64>::new(3)?;
    let mut errors = 0;
    let mut herald_cpu = 0.0;
    for round in 1..=rounds {
        let (pgbench, job, url) = (pgbench.to_string(), job_id.clone(), url.clone());
        let tps = tokio::task::spawn_blocking(move || {
            run_pgbench(&pgbench, &url, &job, concurrency, duration)
        })
        .await??;
        pg_tx += tps * duration.as_secs_f64();
        pg_secs += duration.as_secs_f64();

        let cpu_before = cpu_seconds(herald.process.id());
        let start = Instant::now();
        let deadline = start + duration;
        let mut workers = tokio::task::JoinSet::new();
        for worker in 0..concurrency {
            let (addr, body, users) = (addr.clone(), body.clone(), users.clone());
            let mut hist = Histogram::<u64>::new(3)?;
            workers.spawn(async move {
                let mut errors = 0u64;
                let mut conn: Option<LoadConnection> = None;
                while Instant::now() < deadline {
                    let next = users[worker].lock().ok().and_then(|mut it| it.next());
                    let Some((user, token)) = next else { break };
                    let request = apply_request(&addr, &token, &user, &body);
                    let sent = Instant::now();
                    let status = match conn.as_mut() {
                        Some(c) => c.exchange(&request).await,
                        None => match LoadConnection::open(&addr).await {
                            Ok(c) => conn.insert(c).exchange(&request).await,
                            Err(e) => Err(e),
                        },
                    };
                    let elapsed = sent.elapsed();
                    match status {
                        Ok(201) => {
                            hist.record(elapsed.as_micros() as u64).ok();
                        }
                        Ok(_) => errors += 1,
                        Err(_) => {
                            errors += 1;
                            conn = None;
                        }
                    }
                }
                (hist, errors)
            });
        }
        let mut round_ok = 0;
        while let Some(done) = workers.join_next().await {
            let (h, e) = done?;
            round_ok += h.len();
            hist.add(h)?;
            errors += e;
        }
        let secs = start.elapsed().as_secs_f64();
        if let (Some(a), Some(b)) = (cpu_before, cpu_seconds(herald.process.id())) {
            herald_cpu += b - a;
        }
        herald_ok += round_ok;
        herald_secs += secs;
        eprintln!(
            "  round {round}/{rounds}: pgbench {tps:.1} tx/s, herald {:.1} req/s",
            round_ok as f64 / secs
        );
    }
    let pg_tps = pg_tx / pg_secs;
    let herald_rps = herald_ok as f64 / herald_secs;
    let p50 = hist.value_at_quantile(0.50) as f64 / 1000.0;
    let p99 = hist.value_at_quantile(0.99) as f64 / 1000.0;
    let ratio = herald_rps / pg_tps;
    println!(
        "bench intake: {concurrency} concurrent clients, {rounds} alternating rounds of {}s per side",
        duration.as_secs()
    );
    println!("  pgbench, same SQL per application : {pg_tps:>9.1} tx/s");
    println!(
        "  herald POST /api/applications     : {herald_rps:>9.1} req/s  p50 {p50:.2} ms  p99 {p99:.2} ms  ({herald_ok} ok, {errors} failed)"
    );
    println!(
        "  ratio herald / pgbench            : {ratio:>9.2}   (target >= 0.70; p99 target <= 25 ms)"
    );
    println!(
        "  herald process CPU per request    : {:>9.0} us (user + system)",
        herald_cpu / herald_ok.max(1) as f64 * 1e6
    );
    Ok(())
}

/// `$2` committed applications to job `$1` and their `application.submitted`
/// events, in one statement: what the apply path writes, for a backlog or a
/// delivery benchmark. Users are `$3` + n (address `$3` + n `@example.com`);
/// `$4` is the job title the emails name.
pub const COMMITTED_APPLICATIONS: &str = "
WITH apps AS (
    INSERT INTO applications (id, job_id, user_id, email, created_at)
    SELECT gen_random_uuid(), $1, $3 || n, $3 || n || '@example.com', now()
      FROM generate_series(1, $2) AS n
    RETURNING id, user_id, email
)
INSERT INTO outbox_events (event_id, topic, aggregate_id, payload)
SELECT gen_random_uuid(), 'application.submitted', a.id,
       jsonb_build_object('application_id', a.id, 'job_id', $1::uuid,
                          'user_id', a.user_id, 'email', a.email,
                          'job_title', $4::text, 'company', 'Herald')
  FROM apps a";

/// Posts the benchmark's job through Herald's admin API; its id.
async fn post_bench_job(herald: &Child) -> anyhow::Result<String> {
    let job: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/api/jobs", herald.public))
        .bearer_auth(&herald.admin_token)
        .json(&serde_json::json!({
            "title": "Bench", "company": "Herald", "location": "Loopback",
            "description": "Benchmark job"
        }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(job["id"].as_str().context("job id")?.to_string())
}

/// A zero-latency stand-in for Resend's `POST /emails`: answers 200 with an
/// id and counts distinct idempotency keys (an email per key).
struct BenchResend {
    base_url: String,
    /// Emails accepted, once per key and address.
    accepted: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    calls: Arc<std::sync::atomic::AtomicU64>,
    limited: Arc<std::sync::atomic::AtomicU64>,
    /// The server's task, ended when the fake is dropped.
    _server: tokio::task::JoinSet<()>,
}

/// The provider's limits in a `--provider-rps` run.
#[derive(Clone, Copy)]
struct Provider {
    rps: u32,
    latency: Duration,
}

/// The fake Resend's state for a limited run: accepted requests of the last second.
type Window = Arc<std::sync::Mutex<std::collections::VecDeque<Instant>>>;

impl BenchResend {
    /// Answers `POST /emails` (one email) and `POST /emails/batch` (an array)
    /// at once, or, given a `provider`, after its latency and with 429 past
    /// its request rate (a sliding one-second window, as the test suite's
    /// fake Resend).
    async fn start(provider: Option<Provider>) -> anyhow::Result<BenchResend> {
        use warp::Filter;
        let accepted = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let limited = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let window: Window = Arc::default();
        let (a, c, l) = (accepted.clone(), calls.clone(), limited.clone());
        let route = warp::post()
            .and(warp::path("emails"))
            .and(warp::path::tail())
            .and(warp::header::optional::<String>("idempotency-key"))
            .and(warp::body::bytes())
            .then(move |tail: warp::path::Tail, key: Option<String>, body: bytes::Bytes| {
                let (a, c, l, window) = (a.clone(), c.clone(), l.clone(), window.clone());
                async move {
                    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Some(p) = provider {
                        tokio::time::sleep(p.latency).await;
                        if !admit(&window, p.rps) {
                            l.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            return warp::http::Response::builder()
                                .status(429)
                                .header("retry-after", "1")
                                .header("ratelimit-limit", p.rps.to_string())
                                .header("ratelimit-remaining", "0")
                                .header("ratelimit-reset", "1")
                                .body(r#"{"statusCode":429,"name":"rate_limit_exceeded","message":"Too many requests"}"#.to_string())
                                .unwrap_or_default();
                        }
                    }
                    let parsed: serde_json::Value =
                        serde_json::from_slice(&body).unwrap_or_default();
                    let emails: Vec<serde_json::Value> = if tail.as_str() == "batch" {
                        parsed.as_array().cloned().unwrap_or_default()
                    } else {
                        vec![parsed]
                    };
                    let key = key.unwrap_or_default();
                    if let Ok(mut accepted) = a.lock() {
                        for email in &emails {
                            accepted.insert(format!("{key}/{}", email["to"]));
                        }
                    }
                    let ids: Vec<serde_json::Value> = emails
                        .iter()
                        .map(|_| serde_json::json!({"id": uuid::Uuid::new_v4().to_string()}))
                        .collect();
                    let body = if tail.as_str() == "batch" {
                        serde_json::json!({ "data": ids })
                    } else {
                        ids.into_iter().next().unwrap_or_default()
                    };
                    warp::http::Response::builder()
                        .header("content-type", "application/json")
                        .body(body.to_string())
                        .unwrap_or_default()
                }
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut server = tokio::task::JoinSet::new();
        server.spawn(warp::serve(route).incoming(listener).run());
        Ok(BenchResend {
            _server: server,
            base_url: format!("http://{addr}"),
            accepted,
            calls,
            limited,
        })
    }

    fn emails(&self) -> usize {
        self.accepted.lock().map(|k| k.len()).unwrap_or(0)
    }
}

/// Whether one more request fits in the last second's `rps`.
fn admit(window: &Window, rps: u32) -> bool {
    let Ok(mut window) = window.lock() else {
        return false;
    };
    let now = Instant::now();
    while window
        .front()
        .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
    {
        window.pop_front();
    }
    if window.len() >= rps as usize {
        return false;
    }
    window.push_back(now);
    true
}

/// One Herald round: `events` applications committed with their outbox
/// events in one statement, timed until the fake Resend holds every email.
async fn delivery_round_herald(
    db: &sqlx::PgPool,
    job_id: uuid::Uuid,
    round: usize,
    events: u32,
    resend: &BenchResend,
) -> anyhow::Result<f64> {
    let before = resend.emails();
    let start = Instant::now();
    sqlx::query(COMMITTED_APPLICATIONS)
        .bind(job_id)
        .bind(i64::from(events))
        .bind(format!("bench-{round}-"))
        .bind("Bench")
        .execute(db)
        .await?;
    // What the committing process's own signal does in production (its
    // request handlers wake its relay at commit): without it, rows written
    // from outside wait for the relay's poll (`relay.poll_interval_ms`,
    // 1 s), which BullMQ's peer, woken by Redis, never does.
    sqlx::query("SELECT pg_notify('herald_outbox', '')")
        .execute(db)
        .await?;
    let deadline = start + Duration::from_secs(600);
    while resend.emails() < before + events as usize {
        if Instant::now() > deadline {
            bail!(
                "herald delivered {} of {events} in 600 s",
                resend.emails() - before
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(f64::from(events) / start.elapsed().as_secs_f64())
}

/// One BullMQ round, by the peer script; its rate.
fn delivery_round_bullmq(
    node: &str,
    peer: &str,
    redis_url: &str,
    resend_url: &str,
    events: u32,
    concurrency: u32,
    rps: Option<u32>,
) -> anyhow::Result<f64> {
    let output = Command::new(node)
        .arg(peer)
        .args([
            redis_url,
            resend_url,
            &events.to_string(),
            &concurrency.to_string(),
            &rps.map(|r| r.to_string()).unwrap_or_default(),
        ])
        .output()
        .with_context(|| format!("running {node} {peer} (benches/delivery.sh installs it)"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "the BullMQ peer failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let report: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("no report from the BullMQ peer:\n{stdout}"))?;
    report["rate"]
        .as_f64()
        .context("no rate in the peer's report")
}

async fn delivery(
    config: Config,
    provider: Option<Provider>,
    events: u32,
    concurrency: u32,
    rounds: usize,
    peer: &str,
    node: &str,
) -> anyhow::Result<()> {
    if !config.database_url.scheme().starts_with("postgres") {
        bail!("bench delivery needs HERALD_DATABASE_URL=postgres://…");
    }
    let redis_url = config
        .redis_url
        .as_ref()
        .context("bench delivery needs HERALD_REDIS_URL (both sides use that Redis)")?
        .expose()
        .to_string();
    let resend = BenchResend::start(provider).await?;
    let rps = provider.map(|p| p.rps);
    // Unlimited: both sides as fast as they go. Limited: both at the
    // provider's rate, Herald with its defaults otherwise.
    let herald_rate = rps.map_or("1000000".to_string(), |r| r.to_string());
    let herald = spawn_herald(
        &config,
        &[
            ("HERALD_EMAIL__TRANSPORT", "resend".into()),
            ("RESEND_API_KEY", "re_bench".into()),
            ("RESEND_BASE_URL", resend.base_url.clone()),
            ("HERALD_EMAIL__WORKERS", concurrency.to_string()),
            ("HERALD_EMAIL__MAX_PER_SEC", herald_rate),
            ("HERALD_RELAY__MAX_PUBLISH_PER_SEC", "1000000".into()),
        ],
    )?;
    let job_id: uuid::Uuid = post_bench_job(&herald).await?.parse()?;
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(config.database_url.expose())
        .await?;
    // At the provider's rate BullMQ sends one email per request: ten
    // seconds' worth measures its rate; Herald moves `events`.
    let bullmq_jobs = rps.map_or(events, |r| (r * 10).max(2));

    let (mut herald_rates, mut bullmq_rates) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let h = delivery_round_herald(&db, job_id, round, events, &resend).await?;
        let (node, peer, redis, url) = (
            node.to_string(),
            peer.to_string(),
            redis_url.clone(),
            resend.base_url.clone(),
        );
        let b = tokio::task::spawn_blocking(move || {
            delivery_round_bullmq(&node, &peer, &redis, &url, bullmq_jobs, concurrency, rps)
        })
        .await??;
        eprintln!("  round {round}/{rounds}: herald {h:.1} emails/s, bullmq {b:.1} emails/s");
        herald_rates.push(h);
        bullmq_rates.push(b);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (h, b) = (mean(&herald_rates), mean(&bullmq_rates));
    let calls = resend.calls.load(std::sync::atomic::Ordering::Relaxed);
    let limited = resend.limited.load(std::sync::atomic::Ordering::Relaxed);
    match provider {
        None => println!(
            "bench delivery: {events} events per side per round, consumer concurrency {concurrency}, {rounds} alternating rounds, unlimited zero-latency provider"
        ),
        Some(p) => println!(
            "bench delivery: provider limited to {} requests/s, {} ms per request; herald {events} emails, bullmq {bullmq_jobs} jobs per round; {rounds} alternating rounds",
            p.rps,
            p.latency.as_millis()
        ),
    }
    println!("  herald  outbox insert -> email accepted : {h:>9.1} emails/s (batched requests, inbox dedupe)");
    println!(
        "  bullmq  addBulk -> job completed        : {b:>9.1} emails/s (one request per email)"
    );
    let target = if provider.is_some() { 100.0 } else { 3.0 };
    println!(
        "  ratio herald / bullmq                   : {:>9.2}   (target >= {target:.1})",
        h / b
    );
    println!(
        "  fake Resend: {} emails from {calls} requests, {limited} answered 429 (both sides)",
        resend.emails()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pgbench_script_binds_every_parameter_of_herald_s_statements() {
        let script = pgbench_script();
        assert!(!script.contains('$'), "{script}");
        assert!(script.contains("ON CONFLICT (principal, method, route, key) DO NOTHING"));
        assert!(script.contains("INSERT INTO outbox_events"));
        let twelve: Vec<String> = (1..=12).map(|i| format!("v{i}")).collect();
        let refs: Vec<&str> = twelve.iter().map(String::as_str).collect();
        assert_eq!(substitute("$1 $12 $2", &refs), "v1 v12 v2");
        assert_eq!(
            substitute("$13 $1", &refs),
            "$13 v1",
            "a parameter without a value stays"
        );
    }
}
