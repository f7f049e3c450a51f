//! Test harness: real, throwaway PostgreSQL and Redis servers and real Herald
//! processes, each on a free port on 127.0.0.1, each in its own temp dir.
//!
//! - [`Postgres`]: `initdb` once per test binary into a template, copied per
//!   test (fast); `postgres` started directly (as the `postgres` user when the
//!   tests run as root, through `setpriv`, so the PID we hold is the server's).
//!   A test can stop, kill -9 and restart it on the same port and data.
//! - [`Redis`]: `redis-server` without persistence; kill, restart, FLUSHALL.
//! - [`Daemon`]: the `herald` binary built by cargo, configured through the
//!   environment; it prints its bound ports on stdout. Kill -9 or restart it.
//!
//! - [`Backend`] / [`Backing`]: the behaviour suites run on both backends —
//!   Postgres + Redis, and the embedded SQLite file with the in-process
//!   broker — through [`on_both_backends!`]; [`Db`] reads rows from either.
//!
//! Nothing here sleeps to synchronise: [`eventually`] polls with a deadline.
//! Every process is ended by PID when its handle drops.

// Without the `failpoints` feature the crash-point suites (which use the
// Redis Cluster, restarts, ...) are not built, and part of this is unused.
#![cfg_attr(not(feature = "failpoints"), allow(dead_code))]

pub mod browser;
pub mod clean_env;
pub mod fake_resend;
pub mod fake_sentry;
pub mod nginx;
pub mod oidc;
pub mod otlp;
pub mod prometheus;
pub mod resend_webhooks;
pub mod sse;
pub mod testable;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use herald::config::Secret;
use herald::http::auth::Auth;
use serde_json::Value;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
pub const JWT_SECRET: &str = "test-jwt-secret-0123456789-0123456789";

/// A file of the repository, as text.
pub fn repo_file(path: &str) -> String {
    let full = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// A port that was free a moment ago.
/// Runs `cmd` (stdout and stderr piped) to its end and returns its output;
/// past `within` it is killed by its PID and the test fails with `what`.
/// The wait runs on a thread of its own, so it has a deadline.
pub fn output_within(mut cmd: Command, within: Duration, what: &str) -> std::process::Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command starts");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(within) {
        Ok(out) => out.expect("the command's output"),
        Err(_) => {
            // SAFETY: signals the child this test started, by its PID.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{what}: still running after {within:?}");
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// Polls `check` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    // The poll rate: a check every 20 ms (a slow check is not followed by
    // a burst of catch-up checks).
    let mut every = tokio::time::interval(Duration::from_millis(20));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
    }
}

fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
    })
}

/// Runs `program` as the `postgres` user when we are root (postgres refuses root).
fn pg_command(program: &str) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--clear-groups",
            "--",
            program,
        ]);
        c
    } else {
        Command::new(program)
    }
}

fn pg_bin(name: &str) -> String {
    for dir in [
        "/usr/lib/postgresql/17/bin",
        "/usr/lib/postgresql/16/bin",
        "/usr/lib/postgresql/15/bin",
    ] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p.to_string_lossy().into_owned();
        }
    }
    name.to_string()
}

fn chown_to_postgres(path: &Path) {
    if is_root() {
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path)
            .status()
            .expect("chown");
        assert!(status.success(), "chown {path:?} failed");
    }
}

/// A data directory made by `initdb` once and kept in cargo's test temp dir
/// (`target/tmp/pg-template-<initdb path hash>`), copied per test. Made in a
/// staging directory and renamed into place, so concurrent test binaries
/// never see half a template; earlier versions leaked one per binary run
/// into /tmp.
fn template_cluster() -> PathBuf {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    TEMPLATE
        .get_or_init(|| {
            let initdb = pg_bin("initdb");
            let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
            let name: String = initdb
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            let data = root.join(format!("pg-template{name}"));
            if data.join("PG_VERSION").exists() {
                return data;
            }
            let staging = tempfile::Builder::new()
                .prefix("pg-template-staging")
                .tempdir_in(root)
                .expect("tempdir");
            chown_to_postgres(staging.path());
            let made = staging.path().join("data");
            let out = pg_command(&initdb)
                .arg("-D")
                .arg(&made)
                .args(["-U", "herald", "--auth=trust", "-E", "UTF8", "--no-sync"])
                .output()
                .expect("initdb: is postgresql installed? (scripts/test installs it)");
            assert!(
                out.status.success(),
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            // Another binary may have won the race; its template is as good.
            if std::fs::rename(&made, &data).is_err() {
                assert!(data.join("PG_VERSION").exists(), "template at {data:?}");
            }
            data
        })
        .clone()
}

/// A throwaway PostgreSQL server.
pub struct Postgres {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl Postgres {
    pub async fn start() -> Postgres {
        let template = template_cluster();
        let dir = tempfile::Builder::new()
            .prefix("herald-pg")
            .tempdir()
            .expect("tempdir");
        let status = Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(dir.path().join("data"))
            .status()
            .expect("cp");
        assert!(status.success());
        std::fs::create_dir_all(dir.path().join("sock")).expect("sock dir");
        chown_to_postgres(dir.path());
        let mut pg = Postgres {
            dir,
            port: free_port(),
            child: None,
        };
        // A port free when asked may be taken by another test's server
        // before this one binds it: then try another.
        for _ in 0..5 {
            if pg.spawn().await {
                return pg;
            }
            pg.port = free_port();
        }
        panic!("five free ports were each taken by another postgres first");
    }

    /// Starts the server and waits for it; false if the server that
    /// answers on the port is not this one (ours could not bind it).
    async fn spawn(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))
            .expect("log");
        let child = pg_command(&pg_bin("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path().join("sock"))
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
                "-c",
                "shared_buffers=32MB",
                // Lets a test count the statements a code path ran.
                "-c",
                "shared_preload_libraries=pg_stat_statements",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let url = self.url();
        let data_directory: String = eventually(
            "postgres to accept connections",
            Duration::from_secs(30),
            || {
                let url = url.clone();
                async move {
                    let mut conn = sqlx::postgres::PgConnection::connect(&url).await.ok()?;
                    sqlx::query_scalar("SHOW data_directory")
                        .fetch_one(&mut conn)
                        .await
                        .ok()
                }
            },
        )
        .await;
        let canonical = |p: &std::path::Path| std::fs::canonicalize(p).ok();
        let ours = canonical(std::path::Path::new(&data_directory))
            == canonical(&self.dir.path().join("data"));
        if !ours {
            self.stop();
        }
        ours
    }

    pub fn url(&self) -> String {
        format!("postgres://herald@127.0.0.1:{}/postgres", self.port)
    }

    /// Fast shutdown (SIGINT), waiting for the server to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "INT");
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and data directory.
    pub async fn restart(&mut self) {
        self.stop();
        let port = self.port;
        assert!(
            self.spawn().await,
            "port {port} was taken by another postgres while ours was down"
        );
    }

    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&self.url())
            .await
            .expect("connect to test postgres")
    }
}

use sqlx::Connection;

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "KILL");
            let _ = child.wait();
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// A throwaway Redis server without persistence.
pub struct Redis {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    /// Arguments after the common ones (cluster mode, `--replicaof`).
    extra: Vec<String>,
}

impl Redis {
    pub async fn start() -> Redis {
        Redis::start_on_a_free_port(&[]).await
    }

    /// A server with `extra` arguments on a port nobody else serves: a port
    /// free when asked may be taken by another test's server before this
    /// one binds it, so a port served by another server is given up for a
    /// new one (a few times).
    pub async fn start_on_a_free_port(extra: &[&str]) -> Redis {
        for _ in 0..5 {
            let mut r = Redis::unstarted(free_port(), extra);
            if r.spawn().await {
                return r;
            }
        }
        panic!("five free ports were each taken by another redis-server first");
    }

    /// A server on `port` with `extra` arguments.
    pub async fn start_with(port: u16, extra: &[&str]) -> Redis {
        let mut r = Redis::unstarted(port, extra);
        assert!(
            r.spawn().await,
            "port {port} is served by another redis-server"
        );
        r
    }

    fn unstarted(port: u16, extra: &[&str]) -> Redis {
        let dir = tempfile::Builder::new()
            .prefix("herald-redis")
            .tempdir()
            .expect("tempdir");
        Redis {
            dir,
            port,
            child: None,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// Starts the server and waits for it; false if the server that
    /// answers on the port is not this one (ours could not bind it).
    async fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.extra)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (scripts/test installs it)");
        let pid = child.id();
        self.child = Some(child);
        let port = self.port;
        eventually(
            "redis to answer PING",
            Duration::from_secs(10),
            || async move { redis_cli(port, &["PING"]).filter(|r| r == "PONG") },
        )
        .await;
        let info = redis_cli(port, &["INFO", "server"]).unwrap_or_default();
        if info
            .lines()
            .any(|l| l.trim() == format!("process_id:{pid}"))
        {
            return true;
        }
        self.kill();
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "KILL");
            let _ = child.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.kill();
        let port = self.port;
        assert!(
            self.spawn().await,
            "port {port} was taken by another redis-server while ours was down"
        );
    }

    pub fn cli(&self, args: &[&str]) -> Option<String> {
        redis_cli(self.port, args)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A port for a Cluster node: its bus port (port + 10000) must be free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// A throwaway Redis Cluster of three masters (no replicas), slots spread
/// by `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let port = free_cluster_port();
            let conf = format!("nodes-{port}.conf");
            nodes.push(
                Redis::start_with(
                    port,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &conf,
                        "--cluster-node-timeout",
                        "2000",
                    ],
                )
                .await,
            );
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli --cluster create");
        assert!(created.success(), "cluster create failed");
        let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
        eventually("the cluster to be ok", Duration::from_secs(30), || {
            let ports = ports.clone();
            async move {
                ports
                    .iter()
                    .all(|p| {
                        redis_cli(*p, &["CLUSTER", "INFO"])
                            .is_some_and(|i| i.contains("cluster_state:ok"))
                    })
                    .then_some(())
            }
        })
        .await;
        RedisCluster { nodes }
    }

    /// `redis-cluster://` with every node.
    pub fn url(&self) -> String {
        let others: Vec<String> = self.nodes[1..]
            .iter()
            .map(|n| format!("node=127.0.0.1:{}", n.port))
            .collect();
        format!(
            "redis-cluster://127.0.0.1:{}?{}",
            self.nodes[0].port,
            others.join("&")
        )
    }

    /// `redis-cli -c` (follows redirections) against the first node.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let mut all = vec!["-c"];
        all.extend_from_slice(args);
        redis_cli(self.nodes[0].port, &all)
    }
}

/// A throwaway primary, one replica and one Sentinel watching them
/// (service `herald`, quorum 1, down after 1 s).
pub struct RedisSentinel {
    /// Held so the primary lives as long as the Sentinel that watches it.
    #[allow(dead_code)]
    pub primary: Redis,
    pub replica: Redis,
    pub sentinel: Redis,
}

impl RedisSentinel {
    pub const SERVICE: &'static str = "herald";

    pub async fn start() -> RedisSentinel {
        let primary = Redis::start().await;
        let primary_port = primary.port.to_string();
        let replica =
            Redis::start_on_a_free_port(&["--replicaof", "127.0.0.1", &primary_port]).await;
        eventually("the replica in sync", Duration::from_secs(20), || {
            let info = primary.cli(&["INFO", "replication"]).unwrap_or_default();
            async move { info.contains("state=online").then_some(()) }
        })
        .await;
        // Sentinel rewrites its configuration file: it must be writable.
        let port = free_port();
        let dir = tempfile::Builder::new()
            .prefix("herald-sentinel")
            .tempdir()
            .expect("tempdir");
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {service} 127.0.0.1 {primary_port} 1\n\
                 sentinel down-after-milliseconds {service} 1000\n\
                 sentinel failover-timeout {service} 5000\n",
                dir.path().display(),
                service = Self::SERVICE,
            ),
        )
        .expect("sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server --sentinel");
        eventually(
            "Sentinel to know the primary",
            Duration::from_secs(20),
            || {
                let master = redis_cli(
                    port,
                    &["SENTINEL", "get-master-addr-by-name", Self::SERVICE],
                )
                .unwrap_or_default();
                let primary_port = primary_port.clone();
                async move { master.contains(&primary_port).then_some(()) }
            },
        )
        .await;
        let sentinel = Redis {
            dir,
            port,
            child: Some(child),
            extra: Vec::new(),
        };
        RedisSentinel {
            primary,
            replica,
            sentinel,
        }
    }

    /// `redis-sentinel://` naming the Sentinel and the service.
    pub fn url(&self) -> String {
        format!(
            "redis-sentinel://127.0.0.1:{}?sentinelServiceName={}",
            self.sentinel.port,
            Self::SERVICE
        )
    }

    /// The port of the server Sentinel names primary now.
    pub fn primary_port(&self) -> Option<u16> {
        let answer = self
            .sentinel
            .cli(&["SENTINEL", "get-master-addr-by-name", Self::SERVICE])?;
        answer.lines().nth(1)?.trim().parse().ok()
    }
}

/// A running `herald serve` process.
pub struct Daemon {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    child: Option<Child>,
    pub public: String,
    pub admin: String,
    pub http: reqwest::Client,
    /// Whether a start waits for the stream hub's board and the hot tier too
    /// (`/readyz` `"stream": "ready"`, `"redis"` not `"fallback"`), so a job
    /// posted next is announced, and counted, as new and a key is cached:
    /// off only for a start while Redis is down on purpose.
    wait_for_stream: bool,
}

impl Daemon {
    /// Starts Herald on `database_url` (and Redis when given) with test secrets,
    /// dev login on, and the extra `HERALD_*` settings in `extra`.
    pub async fn start(
        database_url: &str,
        redis_url: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Daemon {
        let mut daemon = Daemon::start_unspawned(database_url, redis_url, extra);
        daemon.spawn().await;
        daemon
    }

    fn start_unspawned(
        database_url: &str,
        redis_url: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("herald-daemon")
            .tempdir()
            .expect("tempdir");
        let mut env: Vec<(String, String)> = vec![
            ("HERALD_DATABASE_URL".into(), database_url.into()),
            ("HERALD_LISTEN".into(), "127.0.0.1:0".into()),
            ("HERALD_ADMIN_LISTEN".into(), "127.0.0.1:0".into()),
            ("HERALD_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
            ("HERALD_JWT_SECRET".into(), JWT_SECRET.into()),
            ("HERALD_AUTH__DEV_LOGIN".into(), "true".into()),
            ("HERALD_REDIS__PROBE_INTERVAL_MS".into(), "100".into()),
            // The suites drive thousands of requests from 127.0.0.1; the
            // per-client limits are tested on their own (tests/herald/abuse.rs).
            ("HERALD_LIMITS__PER_IP".into(), "false".into()),
            (
                "HERALD_STATE_DIR".into(),
                dir.path().join("var").to_string_lossy().into(),
            ),
            ("RUST_LOG".into(), "herald=debug,info".into()),
        ];
        if let Some(url) = redis_url {
            env.push(("HERALD_REDIS_URL".into(), url.into()));
        }
        for (k, v) in extra {
            env.push((k.to_string(), v.to_string()));
        }
        Daemon {
            dir,
            env,
            child: None,
            public: String::new(),
            admin: String::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            wait_for_stream: true,
        }
    }

    /// [`Daemon::start`] for a Redis that is down on purpose: ready means
    /// the database answers; the stream hub may still be starting.
    pub async fn start_while_redis_is_down(
        database_url: &str,
        redis_url: &str,
        extra: &[(&str, &str)],
    ) -> Daemon {
        let mut daemon = Daemon::start_unspawned(database_url, Some(redis_url), extra);
        daemon.wait_for_stream = false;
        daemon.spawn().await;
        daemon
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log");
        let mut cmd = clean_env::herald_command();
        cmd.arg("serve");
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = cmd.spawn().expect("start herald");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("herald listening") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "herald did not start; log:\n{}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
        };
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(&format!("{name}=")))
                .expect("address in listening line")
                .to_string()
        };
        self.public = field("public");
        self.admin = field("admin");
        self.child = Some(child);
        // Ready once the database answers through the daemon, and (unless
        // Redis is down on purpose) its stream hub has read its board and
        // its hot tier is using Redis.
        let http = self.http.clone();
        let url = format!("{}/readyz", self.public);
        let wait_for_stream = self.wait_for_stream;
        eventually("herald /readyz", Duration::from_secs(30), || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let r = http.get(url).send().await.ok()?;
                if !r.status().is_success() {
                    return None;
                }
                let ready: serde_json::Value = r.json().await.ok()?;
                let settled = ready["stream"] == "ready" && ready["redis"] != "fallback";
                (!wait_for_stream || settled).then_some(())
            }
        })
        .await;
    }

    /// Waits until `/readyz` says the stream hub has read its board (before
    /// that, every stream connect is turned away with `retry:` alone).
    pub async fn wait_for_stream_ready(&self) {
        eventually(
            "/readyz stream = ready",
            Duration::from_secs(30),
            || async {
                let ready: serde_json::Value = self.get("/readyz").await.json().await.ok()?;
                (ready["stream"] == "ready").then_some(())
            },
        )
        .await;
    }

    /// The value the daemon was started with for `key`, if any.
    pub fn env_value(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The daemon's `state_dir` (mail of the `file` transport lands under it).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("var")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("herald.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "KILL");
            let _ = child.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// SIGTERM: asks for a graceful shutdown.
    pub fn terminate(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, "TERM");
        }
    }

    /// Sets (or, with `None`, removes) an environment variable for the next
    /// (re)start.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(value) = value {
            self.env.push((key.to_string(), value.to_string()));
        }
    }

    /// Waits for the process to exit on its own (a failpoint abort); its status.
    pub async fn wait_for_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("daemon running");
        let status = eventually("herald to exit", timeout, || {
            let status = child.try_wait().ok().flatten();
            async move { status }
        })
        .await;
        self.child = None;
        status
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.public, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("{}{}", self.admin, path)
    }

    /// Posts a job as admin; returns it.
    pub async fn post_job(&self, title: &str) -> Value {
        self.post_job_described(title, "Build things.").await
    }

    /// Posts a job with its description as admin; returns it.
    pub async fn post_job_described(&self, title: &str, description: &str) -> Value {
        let r = self
            .http
            .post(self.url("/api/jobs"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&serde_json::json!({
                "title": title, "company": "Acme", "location": "Remote",
                "description": description
            }))
            .send()
            .await
            .expect("post job");
        assert_eq!(r.status(), 201, "post job");
        r.json().await.expect("job json")
    }

    /// Posts a job as admin at `company` and `location` (described as
    /// "{title} at {company}, {location}"); returns it.
    pub async fn post_job_at(&self, title: &str, company: &str, location: &str) -> Value {
        let r = self
            .post(
                "/api/jobs",
                ADMIN_TOKEN,
                None,
                &serde_json::json!({"title": title, "company": company, "location": location,
                                    "description": format!("{title} at {company}, {location}")}),
            )
            .await;
        assert_eq!(r.status(), 201, "post job");
        r.json().await.expect("job json")
    }

    /// Edits job `id` as admin (`PATCH /api/jobs/{id}`, expecting 200); the job.
    pub async fn edit_job(&self, id: &str, body: &Value) -> Value {
        let r = self
            .patch(&format!("/api/jobs/{id}"), ADMIN_TOKEN, None, body)
            .await;
        assert_eq!(r.status(), 200, "PATCH /api/jobs/{id}");
        r.json().await.expect("job json")
    }

    /// Closes job `id` as admin (expecting 200); the job.
    pub async fn close_job(&self, id: &str) -> Value {
        let r = self
            .post(
                &format!("/api/jobs/{id}/close"),
                ADMIN_TOKEN,
                None,
                &Value::Null,
            )
            .await;
        assert_eq!(r.status(), 200, "close {id}");
        r.json().await.expect("job json")
    }

    /// `POST path` as `token`, with an optional Idempotency-Key and a JSON body.
    pub async fn post(
        &self,
        path: &str,
        token: &str,
        key: Option<&str>,
        body: &Value,
    ) -> reqwest::Response {
        let mut req = self.http.post(self.url(path)).bearer_auth(token).json(body);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        req.send().await.expect("POST request")
    }

    /// `PATCH path` as `token`, with an optional Idempotency-Key and a JSON body.
    pub async fn patch(
        &self,
        path: &str,
        token: &str,
        key: Option<&str>,
        body: &Value,
    ) -> reqwest::Response {
        let mut req = self
            .http
            .patch(self.url(path))
            .bearer_auth(token)
            .json(body);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        req.send().await.expect("PATCH request")
    }

    /// The same POST, for a request the daemon may die in the middle of
    /// (a crash failpoint): the answer, or `None` if it never came.
    pub async fn try_post(
        &self,
        path: &str,
        token: &str,
        key: Option<&str>,
        body: &Value,
    ) -> Option<reqwest::Response> {
        let mut req = self.http.post(self.url(path)).bearer_auth(token).json(body);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        req.send().await.ok()
    }

    /// `POST /api/applications`.
    pub async fn apply(&self, token: &str, key: Option<&str>, body: &Value) -> reqwest::Response {
        self.post("/api/applications", token, key, body).await
    }

    /// `GET path` (public listener), the status and the body.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .send()
            .await
            .expect("GET request")
    }

    /// `GET /api/jobs?{query}`, every page, as job id → version: the list
    /// a stream client's must equal.
    pub async fn listed(&self, query: &str) -> std::collections::HashMap<String, i64> {
        let mut out = std::collections::HashMap::new();
        let mut before = String::new();
        loop {
            let r = self
                .get(&format!("/api/jobs?limit=100&{query}{before}"))
                .await;
            assert_eq!(r.status(), 200, "GET /api/jobs?{query}");
            let page: Value = r.json().await.expect("a page");
            for job in page["items"].as_array().expect("items") {
                let id = job["id"].as_str().expect("an id").to_string();
                out.insert(id, job["version"].as_i64().expect("a version"));
            }
            match page["next_before"].as_str() {
                Some(next) => before = format!("&before={next}"),
                None => return out,
            }
        }
    }

    /// `GET /admin/status` as admin.
    pub async fn admin_status(&self) -> Value {
        self.http
            .get(self.admin_url("/admin/status"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("admin status")
            .json()
            .await
            .expect("admin status json")
    }

    /// `(restarts, running)` of the named actor, from `/admin/status`.
    pub async fn actor_status(&self, name: &str) -> (u64, bool) {
        let status = self.admin_status().await;
        let actor = status["actors"]
            .as_array()
            .expect("actors")
            .iter()
            .find(|a| a["name"] == name)
            .unwrap_or_else(|| panic!("no actor {name} in {status}"))
            .clone();
        (
            actor["restarts"].as_u64().expect("restarts"),
            actor["running"].as_bool().expect("running"),
        )
    }

    /// Makes later restarts bind the ports this process has now, so a client
    /// keeps its URL across a kill and restart.
    pub fn keep_ports(&mut self) {
        let public = self.public.trim_start_matches("http://").to_string();
        let admin = self.admin.trim_start_matches("http://").to_string();
        self.set_env("HERALD_LISTEN", Some(&public));
        self.set_env("HERALD_ADMIN_LISTEN", Some(&admin));
    }

    /// Waits until a metric has `value`.
    pub async fn wait_for_metric(&self, name_with_labels: &str, value: f64) {
        eventually(
            &format!("{name_with_labels} == {value}"),
            Duration::from_secs(10),
            || async move { (self.metric(name_with_labels).await == value).then_some(()) },
        )
        .await;
    }

    /// The value of a metric line (exact labels as rendered), 0 when absent.
    /// Waits until a metric exceeds `value`.
    pub async fn wait_for_metric_above(&self, name_with_labels: &str, value: f64) {
        eventually(
            &format!("{name_with_labels} > {value}"),
            Duration::from_secs(30),
            || async move { (self.metric(name_with_labels).await > value).then_some(()) },
        )
        .await;
    }

    pub async fn metric(&self, name_with_labels: &str) -> f64 {
        parse_metric(&self.metrics_text().await, name_with_labels)
    }

    /// The whole Prometheus exposition of the admin listener.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body")
    }
}

pub fn parse_metric(text: &str, name_with_labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == name_with_labels).then(|| value.parse::<f64>().ok())?
        })
        .unwrap_or(0.0)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- herald log ----\n{}", self.log());
        }
        self.kill();
    }
}

/// A user token, signed with the shared secret as the job board's login would.
pub fn user_token(sub: &str) -> String {
    Auth::new(&Secret::new(ADMIN_TOKEN), &Secret::new(JWT_SECRET))
        .issue(sub, &format!("{sub}@example.com"), 3600)
        .expect("issue token")
}

/// Applies as `user` (key `apply-<user>`) for `job`, expecting 201; returns
/// the application id.
pub async fn apply_as(herald: &Daemon, user: &str, job: &Value) -> String {
    let r = herald
        .apply(
            &user_token(user),
            Some(&format!("apply-{user}")),
            &serde_json::json!({"job_id": job["id"]}),
        )
        .await;
    assert_eq!(r.status(), 201, "apply as {user}");
    let body: Value = r.json().await.expect("json");
    body["id"].as_str().expect("id").to_string()
}

/// A retrying client patient enough for restarts, outages and lapsed
/// leases: up to 60 attempts, full jitter capped at 2 s, a large budget.
pub fn patient_client(base_url: &str) -> herald::client::RetryingClient {
    let policy = herald::client::ClientPolicy {
        retry: herald::retry::RetryPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
            max_attempts: 60,
            max_delay: Duration::from_secs(60),
        },
        budget: herald::actors::retry_budget::RetryBudgetArgs {
            capacity: 5000.0,
            refill_per_success: 1.0,
            refill_per_sec: 100.0,
            view: Default::default(),
        },
        ..herald::client::ClientPolicy::default()
    };
    herald::client::RetryingClient::new(base_url, policy).expect("client")
}

/// Sends one application to `job` per user, `concurrency` at a time, each
/// one operation (one key) retried by `client` until answered, in the
/// background; counts answered ones in `answered`. The final statuses (or
/// why the client gave up).
pub fn send_applications(
    client: &herald::client::RetryingClient,
    job: &Value,
    users: Vec<String>,
    concurrency: usize,
    answered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> tokio::task::JoinHandle<Vec<Result<u16, String>>> {
    use futures::StreamExt;
    let (client, job_id) = (client.clone(), job["id"].clone());
    tokio::spawn(async move {
        futures::stream::iter(users)
            .map(|user| {
                let (client, answered) = (client.clone(), answered.clone());
                let op = herald::client::Operation::post(
                    "/api/applications",
                    &user_token(&user),
                    serde_json::json!({ "job_id": job_id }),
                );
                async move {
                    let answer = client.execute(&op).await;
                    answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    answer.map(|a| a.status).map_err(|e| e.to_string())
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await
    })
}

/// Waits until `answered` reaches `at_least`.
pub async fn wait_answered(answered: &std::sync::atomic::AtomicUsize, at_least: usize) {
    eventually(
        &format!("{at_least} answered"),
        Duration::from_secs(120),
        || {
            let n = answered.load(std::sync::atomic::Ordering::Relaxed);
            async move { (n >= at_least).then_some(()) }
        },
    )
    .await;
}

/// A pool on either backend's database, for reading rows from outside the
/// daemon. Statements must be portable: `$1` placeholders, no Postgres-only
/// functions; compare ids as text (`CAST(id AS TEXT) = $1`).
pub type Db = sqlx::AnyPool;

/// Runs a `SELECT count(*) …` and returns the number.
pub async fn count(pool: &Db, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .expect("count query")
}

/// A [`Db`] on `url` (either backend).
pub async fn any_pool(url: &str) -> Db {
    sqlx::any::install_default_drivers();
    sqlx::any::AnyPoolOptions::new()
        .max_connections(4)
        .connect(url)
        .await
        .expect("connect to the test database")
}

/// Which store (and broker) a behaviour test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Postgres + Redis: the production mode.
    Postgres,
    /// One SQLite file and the in-process broker: the embedded mode.
    Sqlite,
}

/// What a daemon on one backend needs: Postgres and Redis servers, or a
/// directory for the SQLite file.
pub struct Backing {
    pub pg: Option<Postgres>,
    pub redis: Option<Redis>,
    /// Holds the SQLite file.
    dir: Option<tempfile::TempDir>,
}

impl Backing {
    pub async fn start(backend: Backend) -> Backing {
        match backend {
            Backend::Postgres => Backing {
                pg: Some(Postgres::start().await),
                redis: Some(Redis::start().await),
                dir: None,
            },
            Backend::Sqlite => Backing {
                pg: None,
                redis: None,
                dir: Some(
                    tempfile::Builder::new()
                        .prefix("herald-sqlite")
                        .tempdir()
                        .expect("tempdir"),
                ),
            },
        }
    }

    /// `HERALD_DATABASE_URL` for the daemon.
    pub fn database_url(&self) -> String {
        match (&self.pg, &self.dir) {
            (Some(pg), _) => pg.url(),
            (None, Some(dir)) => format!("sqlite://{}", dir.path().join("herald.db").display()),
            (None, None) => unreachable!("a backing has a database"),
        }
    }

    /// `HERALD_REDIS_URL`, if this backend has Redis.
    pub fn redis_url(&self) -> Option<String> {
        self.redis.as_ref().map(|r| r.url())
    }

    /// Starts a daemon on this backing.
    pub async fn daemon(&self, extra: &[(&str, &str)]) -> Daemon {
        Daemon::start(&self.database_url(), self.redis_url().as_deref(), extra).await
    }

    /// A pool reading the daemon's database (after the daemon migrated it).
    pub async fn db(&self) -> Db {
        any_pool(&self.database_url()).await
    }

    /// The Postgres server (Postgres-only tests).
    pub fn pg(&self) -> &Postgres {
        self.pg
            .as_ref()
            .expect("a Postgres-only test on the Postgres backend")
    }

    pub fn pg_mut(&mut self) -> &mut Postgres {
        self.pg
            .as_mut()
            .expect("a Postgres-only test on the Postgres backend")
    }

    /// The Redis server (Postgres + Redis-only tests).
    pub fn redis(&self) -> &Redis {
        self.redis
            .as_ref()
            .expect("a Redis test on the Postgres backend")
    }

    pub fn redis_mut(&mut self) -> &mut Redis {
        self.redis
            .as_mut()
            .expect("a Redis test on the Postgres backend")
    }
}

/// Declares each named `async fn name(backend: Backend)` as two tests,
/// `postgres::name` and `sqlite::name`: one behaviour suite, both backends.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::support::Backend::Postgres).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::support::Backend::Sqlite).await
                }
            )*
        }
    };
}

/// Postgres, Redis, a fake Resend and one daemon sending email through it,
/// the fake's webhooks pointed back at the daemon: the world of the tests
/// that count emails where they land.
pub struct Stack {
    pub backing: Backing,
    pub resend: fake_resend::FakeResend,
    pub herald: Daemon,
    pub db: Db,
}

impl Stack {
    /// Starts it all on Postgres + Redis; `extra` settings go to the daemon
    /// after the email ones.
    pub async fn start(extra: &[(&str, &str)]) -> Stack {
        Stack::start_on(Backend::Postgres, extra).await
    }

    /// Starts it all on `backend`.
    pub async fn start_on(backend: Backend, extra: &[(&str, &str)]) -> Stack {
        let backing = Backing::start(backend).await;
        let resend = fake_resend::FakeResend::start().await;
        let base = resend.base_url();
        let mut env: Vec<(&str, &str)> = vec![
            ("HERALD_EMAIL__TRANSPORT", "resend"),
            ("RESEND_API_KEY", fake_resend::API_KEY),
            ("RESEND_BASE_URL", &base),
            ("HERALD_EMAIL__MAX_PER_SEC", "1000"),
            (
                "HERALD_EMAIL__WEBHOOK_SECRET",
                resend_webhooks::WEBHOOK_SECRET,
            ),
        ];
        env.extend_from_slice(extra);
        let herald = backing.daemon(&env).await;
        resend.webhooks_to(&herald.url("/webhooks/resend"));
        let db = backing.db().await;
        Stack {
            backing,
            resend,
            herald,
            db,
        }
    }

    /// Waits until every webhook the fake Resend sent was answered 2xx (none
    /// given up), then checks that each of the `emails` accepted emails was
    /// reported delivered exactly once and shows it: a report lost or
    /// applied twice on the way would show here.
    pub async fn wait_until_reports_applied(&self, emails: usize, within: Duration) {
        eventually("every webhook answered 2xx", within, || async {
            let messages = self.resend.messages();
            if let Some(lost) = messages.iter().find(|m| m.given_up) {
                panic!("a webhook was given up: {lost:?}");
            }
            (messages.len() >= emails && messages.iter().all(|m| m.delivered)).then_some(())
        })
        .await;
        let reported: std::collections::HashSet<String> = self
            .resend
            .messages()
            .into_iter()
            .filter(|m| m.kind == "email.delivered")
            .map(|m| m.email_id)
            .collect();
        assert_eq!(reported.len(), emails, "one report per accepted email");
        assert_eq!(
            count(
                &self.db,
                "SELECT count(*) FROM applications WHERE email_report = 'delivered'"
            )
            .await,
            emails as i64,
            "every report applied"
        );
    }

    /// Waits until every outbox event is settled (delivered, dead or fanned out).
    pub async fn wait_until_settled(&self, within: Duration) {
        eventually("every outbox event settled", within, || async {
            let open = "SELECT count(*) FROM outbox_events WHERE settled_at IS NULL";
            (count(&self.db, open).await == 0).then_some(())
        })
        .await;
    }
}

/// Runs `herald audit` against `database_url`; its exit code and output.
pub fn herald_audit(database_url: &str) -> (i32, String) {
    let out = clean_env::herald_command()
        .arg("audit")
        .env("HERALD_DATABASE_URL", database_url)
        .output()
        .expect("run herald audit");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// Runs `work` (a use case) in a unit of work of `store`, opened for `key`
/// if any, and commits it with `answer`: the idempotency protocol's step 3,
/// for tests that drive the store without the daemon.
pub async fn in_unit<T>(
    store: &std::sync::Arc<dyn herald::store::Store>,
    key: Option<herald::store::KeyLease>,
    answer: &herald::idempotency::StoredResponse,
    work: impl for<'t> FnOnce(
        &'t mut dyn herald::store::UnitOfWork,
    )
        -> futures::future::BoxFuture<'t, Result<T, herald::store::StoreError>>,
) -> Result<T, herald::store::StoreError> {
    let mut unit = store.begin(key).await?;
    let value = work(&mut *unit).await?;
    unit.commit(answer).await?;
    Ok(value)
}
