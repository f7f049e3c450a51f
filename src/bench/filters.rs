//! `herald bench filters`: what a filtered job list costs on a big board.
//!
//! Each backend in turn (the configured Postgres, then a fresh SQLite file)
//! is migrated and filled with `--jobs` open jobs (titles, companies,
//! places and ~1 KB descriptions drawn from a fixed vocabulary, written in
//! one transaction straight into `jobs`: no events, nothing for the relay).
//! A Herald child then serves `GET /api/jobs` to `--concurrency` keep-alive
//! clients, in three rounds of `--requests` each, measured in the same run:
//! the unfiltered first page (the baseline), `q` set to a random word of the
//! vocabulary (each word is in about 3 % of the jobs, and may be a part of
//! others), and `location` set to
//! a random place. It prints p50/p99 of each and the `q` p99 over the
//! baseline's.

use std::time::Instant;

use anyhow::Context;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use sqlx::Connection;
use uuid::Uuid;

use super::{spawn_herald, LoadConnection};
use crate::config::Config;
use crate::domain::{Job, JobStatus};
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{bind_job, Binds, Store, INSERT_JOB};

/// Words in the vocabulary; a description holds [`DESCRIPTION_WORDS`] of
/// them, so each word is in about 3 % of the jobs.
const VOCABULARY: usize = 5_000;
const DESCRIPTION_WORDS: usize = 150;
const PLACES: usize = 50;
const COMPANIES: usize = 500;

/// A fixed vocabulary of words of five to nine letters, each letter drawn
/// with its frequency in English text, so the texts hold about as many
/// distinct trigrams, as unevenly, as prose does.
fn vocabulary() -> Vec<String> {
    // a-z, per mille in English text.
    const FREQUENCY: [u32; 26] = [
        82, 15, 28, 43, 127, 22, 20, 61, 70, 2, 8, 40, 24, 67, 75, 19, 1, 60, 63, 91, 28, 10, 24,
        2, 20, 1,
    ];
    let total: u32 = FREQUENCY.iter().sum();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let letter = move |rng: &mut rand::rngs::StdRng| {
        let mut pick = rng.random_range(0..total);
        for (i, f) in FREQUENCY.iter().enumerate() {
            if pick < *f {
                return (b'a' + i as u8) as char;
            }
            pick -= f;
        }
        'e'
    };
    let mut words = std::collections::BTreeSet::new();
    while words.len() < VOCABULARY {
        let n = rng.random_range(5..=9);
        let word: String = (0..n).map(|_| letter(&mut rng)).collect();
        words.insert(word);
    }
    words.into_iter().collect()
}

fn bench_jobs(count: usize, words: &[String]) -> Vec<Job> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let now = chrono::SubsecRound::trunc_subsecs(chrono::Utc::now(), 6);
    (0..count)
        .map(|_| {
            let mut pick = || words[rng.random_range(0..words.len())].as_str();
            let title = format!("{} {} engineer", pick(), pick());
            let description: Vec<&str> = (0..DESCRIPTION_WORDS).map(|_| pick()).collect();
            Job {
                id: Uuid::now_v7(),
                title,
                company: format!("company-{}", rng.random_range(0..COMPANIES)),
                location: format!("place-{}", rng.random_range(0..PLACES)),
                description: description.join(" "),
                posted_at: now,
                status: JobStatus::Open,
                version: 1,
                updated_at: now,
            }
        })
        .collect()
}

/// Writes `$jobs` on the connection `$conn` in one transaction, then has
/// the planner look at them (`$analyze`): the same on both backends, whose
/// connection types differ.
macro_rules! write_jobs {
    ($conn:expr, $jobs:expr, $analyze:expr) => {{
        let mut tx = $conn.begin().await?;
        for job in $jobs {
            let keys = job.search_keys();
            bind_job(sqlx::query(INSERT_JOB), job, &keys)
                .instant(job.posted_at)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        sqlx::query($analyze).execute(&mut $conn).await?;
    }};
}

/// Migrates the backend at `url` and writes `jobs` in one transaction.
async fn seed(config: &Config, jobs: &[Job]) -> anyhow::Result<()> {
    let url = config.database_url.expose();
    if url.starts_with("sqlite:") {
        SqliteStore::connect(config).await?.migrate().await?;
        let mut conn = sqlx::SqliteConnection::connect(url).await?;
        write_jobs!(conn, jobs, "ANALYZE");
    } else {
        PgStore::connect(config).await?.migrate().await?;
        let mut conn = sqlx::PgConnection::connect(url).await?;
        write_jobs!(conn, jobs, "ANALYZE jobs");
    }
    Ok(())
}

/// `requests` GETs of the paths `path` makes, over `concurrency`
/// keep-alive connections: their latency, in microseconds.
async fn round(
    addr: &str,
    requests: usize,
    concurrency: usize,
    path: impl Fn(&mut rand::rngs::StdRng) -> String + Clone + Send + 'static,
) -> anyhow::Result<Histogram<u64>> {
    let per_client = requests.div_ceil(concurrency);
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..concurrency {
        let (addr, path) = (addr.to_string(), path.clone());
        clients.spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(100 + c as u64);
            let mut conn = LoadConnection::open(&addr).await?;
            let mut latencies = Histogram::<u64>::new(3)?;
            for _ in 0..per_client {
                let request = format!("GET {} HTTP/1.1\r\nhost: {addr}\r\n\r\n", path(&mut rng));
                let start = Instant::now();
                let status = conn.exchange(request.as_bytes()).await?;
                anyhow::ensure!(status == 200, "GET answered {status}");
                latencies.record(start.elapsed().as_micros() as u64)?;
            }
            anyhow::Ok(latencies)
        });
    }
    let mut all = Histogram::<u64>::new(3)?;
    while let Some(done) = clients.join_next().await {
        all.add(done??)?;
    }
    Ok(all)
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

pub async fn filters(
    config: Config,
    jobs: usize,
    requests: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let words = vocabulary();
    let board = bench_jobs(jobs, &words);
    let sqlite_dir = tempfile_dir()?;
    let sqlite = Config::from_toml(&format!(
        "database_url = \"sqlite://{}\"\nstate_dir = \"{}\"\n",
        sqlite_dir.join("herald.db").display(),
        sqlite_dir.display()
    ))?;
    println!(
        "filters: {jobs} open jobs, {requests} requests per round, {concurrency} clients, first page of 20"
    );
    let mut worst_q = 0.0f64;
    for (name, config) in [("postgres", config), ("sqlite", sqlite)] {
        let started = Instant::now();
        seed(&config, &board)
            .await
            .with_context(|| format!("filling {name}"))?;
        let filled = started.elapsed();
        let herald = spawn_herald(&config, &[])?;
        let addr = herald.public.trim_start_matches("http://").to_string();
        // Warm: the first requests of each kind (connections, plans, pages).
        round(&addr, 50, 1, |_| "/api/jobs".to_string()).await?;
        let unfiltered = round(&addr, requests, concurrency, |_| "/api/jobs".to_string()).await?;
        let q_words = words.clone();
        let q = round(&addr, requests, concurrency, move |rng| {
            format!(
                "/api/jobs?q={}",
                q_words[rng.random_range(0..q_words.len())]
            )
        })
        .await?;
        let location = round(&addr, requests, concurrency, |rng| {
            format!("/api/jobs?location=place-{}", rng.random_range(0..PLACES))
        })
        .await?;
        drop(herald);
        println!("  {name} (filled in {:.1} s):", filled.as_secs_f64());
        for (kind, h) in [
            ("unfiltered", &unfiltered),
            ("q=<random word>", &q),
            ("location=<random>", &location),
        ] {
            println!(
                "    {kind:<18} p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>6.2} ms",
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.99)),
                ms(h.max())
            );
        }
        let q_p99 = ms(q.value_at_quantile(0.99));
        worst_q = worst_q.max(q_p99);
        println!(
            "    q p99 / unfiltered p99: {:.2}",
            q_p99 / ms(unfiltered.value_at_quantile(0.99)).max(0.001)
        );
    }
    let _ = std::fs::remove_dir_all(&sqlite_dir);
    println!("worst q p99 over both backends: {worst_q:.2} ms (target <= 20 ms at 100,000 jobs)");
    Ok(())
}

/// A fresh directory for the SQLite file (removed at the end).
fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("herald-bench-filters-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
