//! `herald bench stream`: how fast a posted job reaches ten thousand open
//! streams on one process, and what holding them costs in memory.
//!
//! A Herald child (its own process, as in production) serves the stream;
//! this process is the load generator: it opens `--clients` connections to
//! `GET /api/jobs/stream` (minimal HTTP/1.1 clients, no EventSource
//! machinery), waits until every one has its snapshot, then posts `--jobs`
//! jobs through the admin API, one every `--interval-ms`. Each client notes
//! when each job's `job.posted` event arrives; the latency of a delivery is
//! that instant minus the instant the POST was sent, over every (client, job)
//! pair. It prints p50/p99/max, deliveries missing, and the child's peak RSS
//! (VmHWM), against the targets of issue 4 (p99 <= 250 ms, RSS <= 300 MB).
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

/// Peak resident set of a process, from /proc (kB).
fn peak_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
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

/// One stream client: connects, reads the snapshot, then records the
/// arrival of each benchmark job until it has all of them (or the stream
/// ends). Returns (job index, arrival ns) pairs.
async fn stream_client(
    addr: String,
    jobs: usize,
    clock: Arc<Clock>,
    connecting: Arc<tokio::sync::Semaphore>,
) -> anyhow::Result<Vec<(usize, u64)>> {
    let permit = connecting.acquire().await?;
    // Like an EventSource, come back when only told `retry:` (the hub was
    // still starting); a few hundred ms is enough here.
    let mut attempts = 0;
    let (mut stream, mut buf) = loop {
        attempts += 1;
        let mut stream = tokio::net::TcpStream::connect(&addr).await?;
        stream
            .write_all(b"GET /api/jobs/stream HTTP/1.1\r\nhost: bench\r\naccept: text/event-stream\r\n\r\n")
            .await?;
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
            break (stream, buf);
        }
        if attempts >= 50 {
            bail!("turned away {attempts} times");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut chunk = vec![0u8; 8192];
    let mut arrivals = Vec::with_capacity(jobs);
    let mut seen = vec![false; jobs];
    let mut permit = Some(permit);
    let mut pending_frames = true; // `buf` may already hold frames
    while arrivals.len() < jobs {
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
            if permit.is_some() && text.contains("event: snapshot") {
                permit = None;
                clock.ready.fetch_add(1, Ordering::Relaxed);
            }
            if !text.contains("event: job.posted") {
                continue;
            }
            let index = text
                .split(TITLE_PREFIX)
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .and_then(|n| n.parse::<usize>().ok());
            if let Some(i) = index.filter(|i| *i < jobs) {
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

async fn post_job(http: &reqwest::Client, herald: &Child, index: usize) -> anyhow::Result<()> {
    http.post(format!("{}/api/jobs", herald.public))
        .bearer_auth(&herald.admin_token)
        .json(&serde_json::json!({
            "title": format!("{TITLE_PREFIX}{index}"), "company": "Herald",
            "location": "Loopback", "description": "Stream benchmark job",
        }))
        .send()
        .await?
        .error_for_status()?;
    Ok(())
}

pub async fn stream(
    config: Config,
    clients: usize,
    jobs: usize,
    interval: Duration,
) -> anyhow::Result<()> {
    if config.redis_url.is_none() {
        bail!("bench stream needs HERALD_REDIS_URL (jobs reach the hub through Redis)");
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
        ],
    )?;
    let pid = herald.process.id();
    let addr = herald.public.trim_start_matches("http://").to_string();
    let clock = Arc::new(Clock {
        start: Instant::now(),
        sent: (0..jobs).map(|_| AtomicU64::new(0)).collect(),
        ready: AtomicUsize::new(0),
    });

    // Connect everyone (at most 500 connects in progress at once).
    let connecting = Arc::new(tokio::sync::Semaphore::new(500));
    let connect_start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        tasks.spawn(stream_client(
            addr.clone(),
            jobs,
            clock.clone(),
            connecting.clone(),
        ));
    }
    let connect_deadline = Instant::now() + Duration::from_secs(120);
    while clock.ready.load(Ordering::Relaxed) < clients {
        if Instant::now() > connect_deadline || tasks.try_join_next().is_some() {
            bail!(
                "only {} of {clients} clients got their snapshot",
                clock.ready.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connected_in = connect_start.elapsed();
    let rss_connected = peak_rss_kib(pid).unwrap_or(0);

    // Post the jobs, noting when each POST left.
    let http = reqwest::Client::new();
    for index in 0..jobs {
        clock.sent[index].store(clock.now(), Ordering::Relaxed);
        post_job(&http, &herald, index)
            .await
            .with_context(|| format!("posting job {index}"))?;
        tokio::time::sleep(interval).await;
    }

    // Collect, giving stragglers up to 30 s.
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut missing = 0usize;
    let mut failed = 0usize;
    let collect_deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for _ in 0..clients {
        match tokio::time::timeout_at(collect_deadline, tasks.join_next()).await {
            Ok(Some(Ok(Ok(arrivals)))) => {
                missing += jobs - arrivals.len();
                for (index, at) in arrivals {
                    let sent = clock.sent[index].load(Ordering::Relaxed);
                    histogram.saturating_record(at.saturating_sub(sent) / 1_000);
                }
            }
            _ => {
                failed += 1;
                missing += jobs;
            }
        }
    }
    let rss_peak = peak_rss_kib(pid).unwrap_or(0);
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "bench stream: {clients} clients on one process, {jobs} jobs posted every {} ms",
        interval.as_millis()
    );
    println!(
        "  clients connected (snapshot received) : {clients} in {:.1} s",
        connected_in.as_secs_f64()
    );
    println!(
        "  deliveries                            : {} of {} ({missing} missing, {failed} clients failed)",
        histogram.len(),
        clients * jobs
    );
    println!(
        "  latency POST -> event, all clients    : p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms   (target p99 <= 250 ms)",
        ms(0.5),
        ms(0.99),
        histogram.max() as f64 / 1000.0
    );
    println!(
        "  herald peak RSS                       : {:.1} MB ({:.1} MB once all were connected)   (target <= 300 MB)",
        rss_peak as f64 / 1024.0,
        rss_connected as f64 / 1024.0
    );
    if missing > 0 {
        bail!("{missing} deliveries never arrived");
    }
    Ok(())
}
