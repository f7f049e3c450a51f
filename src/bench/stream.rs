//! `herald bench stream`: how fast a posted job reaches ten thousand open
//! streams on one process, and what holding them costs in memory; with
//! `--filters N`, the same again with the clients spread over N filters
//! and jobs edited as well as posted, as a ratio to the first.
//!
//! A Herald child (its own process, as in production) serves the stream;
//! this process is the load generator: it opens `--clients` connections to
//! `GET /api/jobs/stream` (minimal HTTP/1.1 clients, no EventSource
//! machinery), waits until every one has its snapshot, then posts `--jobs`
//! jobs through the admin API, one every `--interval-ms`. Each client notes
//! when each job's event arrives; the latency of a delivery is that instant
//! minus the instant the POST (or PATCH) was sent, over every (client, job)
//! pair. It prints p50/p99/max, deliveries missing, and the child's peak RSS
//! (VmHWM), against the targets (p99 <= 250 ms, RSS <= 300 MB).
//!
//! The filtered phase (`--filters N`, after the unfiltered one, on the same
//! child, with fresh clients): client k asks for `location=loc-{k % 10}&q=tag-{k % N / 10}`
//! (N distinct filters; every job's description carries every tag), so each
//! job is for a tenth of the clients; after the posts, every job is edited
//! to the next location, which removes it from a tenth of the clients and
//! adds it to another tenth. Its p99 over the unfiltered p99 of the same run
//! is the figure to watch (target <= 1.5).
//!
//! Both processes raise their open-files soft limit to the hard limit; the
//! machine must allow `clients` + a few hundred descriptors per process.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{spawn_herald, Child};
use crate::config::Config;

/// Title prefix of the benchmark's jobs; the index follows it.
const TITLE_PREFIX: &str = "stream-bench-";

/// A process's memory figure `field` (`VmHWM:` the peak resident set,
/// `VmRSS:` the current one), from /proc (kB).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Peak resident set of a process (kB).
fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// What the run shares between the poster and the clients.
struct Clock {
    start: Instant,
    /// Per job: nanoseconds after `start` when its POST was sent (0: not yet).
    sent: Vec<AtomicU64>,
    /// Clients that have their snapshot.
    ready: AtomicUsize,
}

impl Clock {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

/// One stream client: connects to `path`, reads the snapshot, then records
/// the arrival of each benchmark event (a `job.posted` or `job.updated`
/// whose title carries an index) until it has `expected` of them (or the
/// stream ends). Returns (index, arrival ns) pairs.
async fn stream_client(
    addr: String,
    path: String,
    expected: usize,
    clock: Arc<Clock>,
    connecting: Arc<tokio::sync::Semaphore>,
) -> anyhow::Result<Vec<(usize, u64)>> {
    let permit = connecting.acquire().await?;
    let request =
        format!("GET {path} HTTP/1.1\r\nhost: bench\r\naccept: text/event-stream\r\n\r\n");
    // Like an EventSource, come back when only told `retry:` (the hub was
    // still starting); a few hundred ms is enough here.
    let mut attempts = 0;
    let (mut stream, mut buf) = loop {
        attempts += 1;
        let mut stream = tokio::net::TcpStream::connect(&addr).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::with_capacity(8192);
        let mut chunk = [0u8; 4096];
        while !contains(&buf, b"event: snapshot") {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        if contains(&buf, b"event: snapshot") {
            // It has its snapshot: counted, and its connect slot freed.
            clock.ready.fetch_add(1, Ordering::Relaxed);
            drop(permit);
            break (stream, buf);
        }
        if attempts >= 50 {
            bail!("turned away {attempts} times");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let indices = clock.sent.len();
    let mut chunk = vec![0u8; 8192];
    let mut arrivals = Vec::with_capacity(expected);
    let mut seen = vec![false; indices];
    let mut pending_frames = true; // `buf` may already hold frames
    while arrivals.len() < expected {
        if !pending_frames {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        pending_frames = false;
        let at = clock.now();
        // Whole frames only; the rest waits for the next read.
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let frame: Vec<u8> = buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&frame);
            if !text.contains("event: job.posted") && !text.contains("event: job.updated") {
                continue;
            }
            let index = text
                .split(TITLE_PREFIX)
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .and_then(|n| n.parse::<usize>().ok());
            if let Some(i) = index.filter(|i| *i < indices) {
                if !seen[i] {
                    seen[i] = true;
                    arrivals.push((i, at));
                }
            }
        }
    }
    Ok(arrivals)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The filtered phase's layout (see the module doc): `filters` distinct
/// filters, a multiple of 10.
#[derive(Clone, Copy)]
struct Filtered {
    filters: usize,
}

impl Filtered {
    fn path(self, client: usize) -> String {
        format!(
            "/api/jobs/stream?location=loc-{}&q=tag-{}",
            client % 10,
            client % self.filters / 10
        )
    }

    /// Job `index`'s location when posted (edited: the next one).
    fn location(index: usize) -> usize {
        index % 10
    }

    /// What client `client` receives of `jobs` posts and their edits.
    fn expected(client: usize, jobs: usize) -> usize {
        let posts = (0..jobs)
            .filter(|i| Self::location(*i) == client % 10)
            .count();
        let edits = (0..jobs)
            .filter(|i| (Self::location(*i) + 1) % 10 == client % 10)
            .count();
        posts + edits
    }

    fn description(self) -> String {
        let tags: Vec<String> = (0..self.filters / 10).map(|t| format!("tag-{t}")).collect();
        format!("Stream benchmark job {}", tags.join(" "))
    }
}

/// Posts job `index` (at `location`); its id.
async fn post_job(
    http: &reqwest::Client,
    herald: &Child,
    index: usize,
    location: &str,
    description: &str,
) -> anyhow::Result<String> {
    let job: serde_json::Value = http
        .post(format!("{}/api/jobs", herald.public))
        .bearer_auth(&herald.admin_token)
        .json(&serde_json::json!({
            "title": format!("{TITLE_PREFIX}{index}"), "company": "Herald",
            "location": location, "description": description,
        }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    job["id"]
        .as_str()
        .map(str::to_string)
        .context("a posted job has an id")
}

/// What one phase measured.
struct Measured {
    histogram: Histogram<u64>,
    expected: usize,
    missing: usize,
    failed: usize,
    connected_in: Duration,
    rss_connected: u64,
    /// Resident memory grown from before the first connect to all
    /// connected, per client (kB).
    per_client_kib: f64,
}

/// One phase: `clients` connect (all of the stream, or `filtered`), then
/// `jobs` posts (and, filtered, their edits) one every `interval`.
async fn phase(
    herald: &Child,
    clients: usize,
    jobs: usize,
    interval: Duration,
    filtered: Option<Filtered>,
) -> anyhow::Result<Measured> {
    let addr = herald.public.trim_start_matches("http://").to_string();
    let indices = if filtered.is_some() { 2 * jobs } else { jobs };
    let clock = Arc::new(Clock {
        start: Instant::now(),
        sent: (0..indices).map(|_| AtomicU64::new(0)).collect(),
        ready: AtomicUsize::new(0),
    });
    // Connect everyone (at most 500 connects in progress at once).
    let connecting = Arc::new(tokio::sync::Semaphore::new(500));
    let rss_before = status_kib(herald.process.id(), "VmRSS:").unwrap_or(0);
    let connect_start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut expected_total = 0;
    for client in 0..clients {
        let (path, expected) = match filtered {
            None => ("/api/jobs/stream".to_string(), jobs),
            Some(f) => (f.path(client), Filtered::expected(client, jobs)),
        };
        expected_total += expected;
        tasks.spawn(stream_client(
            addr.clone(),
            path,
            expected,
            clock.clone(),
            connecting.clone(),
        ));
    }
    let connect_deadline = Instant::now() + Duration::from_secs(120);
    // A filtered client no job is for (few jobs, many filters) is done
    // once it has its snapshot; any other client that ends here failed.
    let mut done_early = 0;
    while clock.ready.load(Ordering::Relaxed) < clients {
        let ended = match tasks.try_join_next() {
            Some(Ok(Ok(arrivals))) if arrivals.is_empty() => {
                done_early += 1;
                false
            }
            Some(_) => true,
            None => false,
        };
        if Instant::now() > connect_deadline || ended {
            bail!(
                "only {} of {clients} clients got their snapshot",
                clock.ready.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connected_in = connect_start.elapsed();
    let rss_connected = peak_rss_kib(herald.process.id()).unwrap_or(0);
    let rss_now = status_kib(herald.process.id(), "VmRSS:").unwrap_or(0);
    let per_client_kib = rss_now.saturating_sub(rss_before) as f64 / clients.max(1) as f64;

    // Post the jobs (then, filtered, edit each to the next location),
    // noting when each request left.
    let http = reqwest::Client::new();
    let description =
        filtered.map_or_else(|| "Stream benchmark job".to_string(), |f| f.description());
    let mut ids = Vec::with_capacity(jobs);
    for index in 0..jobs {
        let location = match filtered {
            None => "Loopback".to_string(),
            Some(_) => format!("loc-{}", Filtered::location(index)),
        };
        clock.sent[index].store(clock.now(), Ordering::Relaxed);
        ids.push(
            post_job(&http, herald, index, &location, &description)
                .await
                .with_context(|| format!("posting job {index}"))?,
        );
        tokio::time::sleep(interval).await;
    }
    if filtered.is_some() {
        for (index, id) in ids.iter().enumerate() {
            clock.sent[jobs + index].store(clock.now(), Ordering::Relaxed);
            http.patch(format!("{}/api/jobs/{id}", herald.public))
                .bearer_auth(&herald.admin_token)
                .json(&serde_json::json!({
                    "title": format!("{TITLE_PREFIX}{}", jobs + index),
                    "location": format!("loc-{}", (Filtered::location(index) + 1) % 10),
                }))
                .send()
                .await?
                .error_for_status()
                .with_context(|| format!("editing job {index}"))?;
            tokio::time::sleep(interval).await;
        }
    }

    // Collect, giving stragglers up to 30 s.
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut received = 0usize;
    let mut failed = 0usize;
    let collect_deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for _ in done_early..clients {
        match tokio::time::timeout_at(collect_deadline, tasks.join_next()).await {
            Ok(Some(Ok(Ok(arrivals)))) => {
                received += arrivals.len();
                for (index, at) in arrivals {
                    let sent = clock.sent[index].load(Ordering::Relaxed);
                    histogram.saturating_record(at.saturating_sub(sent) / 1_000);
                }
            }
            _ => failed += 1,
        }
    }
    Ok(Measured {
        histogram,
        expected: expected_total,
        missing: expected_total.saturating_sub(received),
        failed,
        connected_in,
        rss_connected,
        per_client_kib,
    })
}

fn report(name: &str, clients: usize, measured: &Measured) -> f64 {
    let ms = |q: f64| measured.histogram.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "  {name}: {clients} clients connected (snapshot received) in {:.1} s, RSS then {:.1} MB",
        measured.connected_in.as_secs_f64(),
        measured.rss_connected as f64 / 1024.0
    );
    println!(
        "    memory per client : {:.1} kB (resident growth from 0 to {clients} connected, over {clients}; target <= 8 kB)",
        measured.per_client_kib
    );
    println!(
        "    deliveries : {} of {} ({} missing, {} clients failed)",
        measured.histogram.len(),
        measured.expected,
        measured.missing,
        measured.failed
    );
    println!(
        "    latency request -> event : p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        ms(0.5),
        ms(0.99),
        measured.histogram.max() as f64 / 1000.0
    );
    ms(0.99)
}

pub async fn stream(
    config: Config,
    clients: usize,
    jobs: usize,
    interval: Duration,
    filters: usize,
) -> anyhow::Result<()> {
    if config.redis_url.is_none() {
        bail!("bench stream needs HERALD_REDIS_URL (jobs reach the hub through Redis)");
    }
    if !filters.is_multiple_of(10) {
        bail!("--filters must be a multiple of 10 (10 locations by filters/10 tags)");
    }
    let open_files = crate::server::raise_open_files_limit()?;
    if (open_files as usize) < clients + 256 {
        bail!("open-files limit {open_files} is too low for {clients} clients (ulimit -Hn)");
    }
    let herald = spawn_herald(
        &config,
        &[
            // The benchmark measures fan-out, not the reconnect-storm guard.
            ("HERALD_SSE__ADMIT_PER_SEC", "1000000".into()),
            ("HERALD_RELAY__MAX_PUBLISH_PER_SEC", "1000000".into()),
            // Room in the snapshot for every job of both phases.
            ("HERALD_SSE__SNAPSHOT_JOBS", "1000".into()),
        ],
    )?;
    let unfiltered = phase(&herald, clients, jobs, interval, None).await?;
    let filtered = match filters {
        0 => None,
        filters => Some(phase(&herald, clients, jobs, interval, Some(Filtered { filters })).await?),
    };
    let rss_peak = peak_rss_kib(herald.process.id()).unwrap_or(0);
    println!(
        "bench stream: {clients} clients on one process, {jobs} jobs posted every {} ms",
        interval.as_millis()
    );
    let p99 = report("all jobs", clients, &unfiltered);
    let mut missing = unfiltered.missing;
    if let Some(filtered) = &filtered {
        let filtered_p99 = report(
            &format!("{filters} filters, posts and edits"),
            clients,
            filtered,
        );
        println!(
            "  filtered p99 / unfiltered p99 : {:.2}   (target <= 1.5; p99 target <= 250 ms)",
            filtered_p99 / p99.max(0.001)
        );
        missing += filtered.missing;
    }
    println!(
        "  herald peak RSS : {:.1} MB   (target <= 300 MB)",
        rss_peak as f64 / 1024.0
    );
    if missing > 0 {
        bail!("{missing} deliveries never arrived");
    }
    Ok(())
}
