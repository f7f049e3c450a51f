//! The live list under production conditions, against real Herald
//! processes on both backends: churn while clients come, go and resume,
//! filtered and not; jobs edited in and out of filters; slow readers on a
//! 4 kB socket; a reconnect storm. Every client's list is built only by
//! the stream's rules (`support::sse::list`) and compared with `GET
//! /api/jobs` under its filter: ids and versions alike.

use crate::support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use support::sse::{list, Event, Pace, SseClient};
use support::{Backend, Backing};

fn id(job: &Value) -> String {
    job["id"].as_str().expect("a job id").to_string()
}

fn versions(events: &[Event]) -> HashMap<String, i64> {
    list(events)
        .into_iter()
        .map(|(id, (version, _))| (id, version))
        .collect()
}

/// Reads `client` until the list built from `earlier` and what it reads
/// equals `truth` (within 30 s), then asserts it.
async fn converge(
    client: &mut SseClient,
    earlier: &[Event],
    truth: &HashMap<String, i64>,
    who: &str,
) {
    let all = |client: &SseClient| {
        let mut events = earlier.to_vec();
        events.extend(client.seen.iter().cloned());
        versions(&events)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while all(client) != *truth && Instant::now() < deadline {
        client.next(Duration::from_millis(500)).await;
    }
    let mine = all(client);
    let missing: Vec<_> = truth
        .iter()
        .filter(|(k, v)| mine.get(*k) != Some(v))
        .collect();
    let extra: Vec<_> = mine
        .iter()
        .filter(|(k, _)| !truth.contains_key(*k))
        .collect();
    assert!(
        mine == *truth,
        "{who}'s list: {} jobs, truth {}; missing or stale {missing:?}; extra {extra:?}",
        mine.len(),
        truth.len()
    );
}

/// One watching client: its filter, and what it saw on connections it has
/// left (a client that resumes keeps its list).
struct Watcher {
    query: &'static str,
    earlier: Vec<Event>,
    live: Option<SseClient>,
}

const FILTERS: [&str; 4] = ["", "location=Berlin", "q=rust", "company=initech"];

/// 150 random posts, edits and closes at ~20/s on `processes` daemons
/// (sharing the database, and Redis on Postgres) while 10 clients connect
/// at random moments (3 filtered, 2 leaving and resuming with
/// Last-Event-ID), each to a random daemon: afterwards every client's list
/// equals the API's under its filter.
async fn churn(backend: Backend, processes: usize, seed: u64) {
    let b = Backing::start(backend).await;
    let settings = [("HERALD_SSE__SNAPSHOT_JOBS", "1000")];
    let mut daemons = Vec::new();
    for _ in 0..processes {
        daemons.push(b.daemon(&settings).await);
    }
    eprintln!("churn seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let locations = ["Berlin", "Paris", "Remote"];
    let companies = ["Acme", "Initech"];
    let titles = ["Rust engineer", "Go developer", "Data analyst"];
    // Who connects when (op index), and who leaves and resumes when.
    let mut watchers: Vec<Watcher> = (0..10)
        .map(|n| Watcher {
            query: if n < 3 { FILTERS[n + 1] } else { FILTERS[0] },
            earlier: Vec::new(),
            live: None,
        })
        .collect();
    let connect_at: Vec<usize> = (0..10).map(|_| rng.random_range(0..140)).collect();
    let leave_at: Vec<usize> = connect_at.iter().map(|c| (c + 5).min(145)).collect();
    let resume_at: Vec<usize> = leave_at.iter().map(|l| (l + 5).min(149)).collect();
    let mut open: Vec<String> = Vec::new();
    let mut pace = tokio::time::interval(Duration::from_millis(50));
    for op in 0..150 {
        pace.tick().await;
        for n in 0..watchers.len() {
            let daemon = &daemons[n % processes];
            let url = format!("{}?{}", daemon.url("/api/jobs/stream"), watchers[n].query);
            if op == connect_at[n] {
                watchers[n].live = Some(SseClient::connect(&url, None).await);
            }
            // Watchers 3 and 4 leave, and come back with Last-Event-ID.
            if n == 3 || n == 4 {
                if op == leave_at[n] && op > connect_at[n] {
                    if let Some(mut gone) = watchers[n].live.take() {
                        while gone.next(Duration::from_millis(1)).await.is_some() {}
                        watchers[n].earlier.extend(gone.seen.iter().cloned());
                    }
                }
                if op == resume_at[n] && watchers[n].live.is_none() && op > connect_at[n] {
                    let last = watchers[n].earlier.iter().rev().find_map(|e| e.id.clone());
                    watchers[n].live = Some(SseClient::connect(&url, last.as_deref()).await);
                }
            }
        }
        let daemon = &daemons[rng.random_range(0..processes)];
        let roll = rng.random_range(0..10);
        if open.is_empty() || roll < 4 {
            let job = daemon
                .post_job_at(
                    &format!("{} {op}", titles[rng.random_range(0..3)]),
                    companies[rng.random_range(0..2)],
                    locations[rng.random_range(0..3)],
                )
                .await;
            open.push(id(&job));
        } else if roll < 8 {
            let job = open[rng.random_range(0..open.len())].clone();
            let body = match rng.random_range(0..3) {
                0 => json!({"location": locations[rng.random_range(0..3)]}),
                1 => json!({"company": companies[rng.random_range(0..2)]}),
                _ => json!({"title": format!("{} {op}", titles[rng.random_range(0..3)])}),
            };
            daemon.edit_job(&job, &body).await;
        } else {
            let job = open.swap_remove(rng.random_range(0..open.len()));
            daemon.close_job(&job).await;
        }
    }
    for (n, watcher) in watchers.iter_mut().enumerate() {
        let daemon = &daemons[n % processes];
        let truth = daemon.listed(watcher.query).await;
        let client = match watcher.live.as_mut() {
            Some(client) => client,
            None => {
                let url = format!("{}?{}", daemon.url("/api/jobs/stream"), watcher.query);
                let last = watcher.earlier.iter().rev().find_map(|e| e.id.clone());
                watcher
                    .live
                    .insert(SseClient::connect(&url, last.as_deref()).await)
            }
        };
        converge(
            client,
            &watcher.earlier,
            &truth,
            &format!("watcher {n} ({:?}, seed {seed})", watcher.query),
        )
        .await;
    }
    // The resumed watchers were caught up from the history, not a snapshot.
    for n in [3, 4] {
        let resumed = watchers[n].live.as_ref().expect("resumed");
        if !watchers[n].earlier.is_empty() {
            assert!(
                resumed.seen.iter().all(|e| e.event != "snapshot"),
                "watcher {n} resumed within the history"
            );
        }
    }
    for daemon in &daemons {
        assert_eq!(daemon.metric("herald_sse_evicted_total").await, 0.0);
    }
}

async fn lists_converge_under_churn(backend: Backend) {
    churn(backend, 1, 18).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lists_converge_under_churn_across_two_processes() {
    churn(Backend::Postgres, 2, 1818).await;
}

/// A job edited from Berlin to Paris leaves the Berlin client's list and
/// joins the Paris client's; closing it leaves the Paris one; an edit of a
/// job neither shows reaches neither; and nothing else is sent to either.
async fn a_job_edited_across_filters_leaves_one_list_and_joins_another(backend: Backend) {
    let b = Backing::start(backend).await;
    let herald = b.daemon(&[]).await;
    let job = herald.post_job_at("Rust engineer", "Acme", "Berlin").await;
    let elsewhere = herald.post_job_at("Gardener", "Initech", "Rome").await;
    // The hub has both jobs before anyone connects: each snapshot is then
    // exactly what the assertions below say.
    herald.wait_for_metric("herald_sse_events_total", 2.0).await;
    let stream = herald.url("/api/jobs/stream");
    let mut berlin = SseClient::connect(&format!("{stream}?location=berlin"), None).await;
    let mut paris = SseClient::connect(&format!("{stream}?location=PARIS"), None).await;
    let saw = |client: &SseClient| -> Vec<(String, String)> {
        client
            .seen
            .iter()
            .filter(|e| e.event != "retry")
            .map(|e| {
                let data: Value = serde_json::from_str(&e.data).unwrap();
                let what = match e.event.as_str() {
                    "snapshot" => data["jobs"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|j| format!("{}@{}", j["title"], j["version"]))
                        .collect::<Vec<_>>()
                        .join(","),
                    _ => format!("{}@{}", data["title"], data["version"]),
                };
                (e.event.clone(), what)
            })
            .collect()
    };
    let until =
        |n: usize| move |seen: &[Event]| seen.iter().filter(|e| e.event != "retry").count() >= n;

    herald
        .edit_job(&id(&job), &json!({"location": "Paris"}))
        .await;
    berlin
        .read_until("the removal", Duration::from_secs(15), until(2))
        .await;
    paris
        .read_until("the entry", Duration::from_secs(15), until(2))
        .await;
    herald
        .edit_job(&id(&elsewhere), &json!({"title": "Head gardener"}))
        .await;
    herald.close_job(&id(&job)).await;
    paris
        .read_until("the close", Duration::from_secs(15), until(3))
        .await;
    // Sentinels, one per list, mark the end of what each was sent.
    herald
        .post_job_at("Berlin sentinel", "Acme", "Berlin")
        .await;
    herald.post_job_at("Paris sentinel", "Acme", "Paris").await;
    berlin
        .read_until("its sentinel", Duration::from_secs(15), until(3))
        .await;
    paris
        .read_until("its sentinel", Duration::from_secs(15), until(4))
        .await;
    let pair = |event: &str, what: &str| (event.to_string(), what.to_string());
    assert_eq!(
        saw(&berlin),
        [
            pair("snapshot", "\"Rust engineer\"@1"),
            pair("job.removed", "null@2"),
            pair("job.posted", "\"Berlin sentinel\"@1"),
        ]
    );
    assert_eq!(
        saw(&paris),
        [
            pair("snapshot", ""),
            pair("job.updated", "\"Rust engineer\"@2"),
            pair("job.closed", "null@3"),
            pair("job.posted", "\"Paris sentinel\"@1"),
        ]
    );
}

/// One client reads slowly (a 4 kB socket, 1 kB every 5 ms) through 500
/// edits of 10 jobs: its queue keeps the newest edit per job, it ends with
/// the right list and is never cut off. Another stops reading while jobs
/// keep coming: its queue is dropped for one snapshot owed, however many
/// more overflow it meanwhile, and when it reads again it too ends with the
/// right list. Nobody is disconnected.
async fn slow_readers_catch_up_by_conflation_then_by_resnapshot(backend: Backend) {
    let b = Backing::start(backend).await;
    let herald = b
        .daemon(&[
            ("HERALD_SSE__CLIENT_QUEUE", "16"),
            ("HERALD_SSE__SNAPSHOT_JOBS", "1000"),
        ])
        .await;
    let description = "d".repeat(2_000);
    let mut jobs = Vec::new();
    for n in 0..10 {
        jobs.push(id(&herald
            .post_job_described(&format!("job {n}"), &description)
            .await));
    }
    let path = "/api/jobs/stream";
    let (slow_pace, mut slow) = {
        let pace = Pace::new(Some(Duration::from_millis(5)));
        let client = SseClient::connect_throttled(&herald.url(""), path, None, &pace).await;
        (pace, client)
    };
    let stalled_pace = Pace::new(None);
    let mut stalled =
        SseClient::connect_throttled(&herald.url(""), path, None, &stalled_pace).await;
    herald.wait_for_metric("herald_sse_clients", 2.0).await;

    // 500 edits, 8 at a time.
    let edits: Vec<(String, Value)> = (0..500)
        .map(|n| (jobs[n % 10].clone(), json!({"title": format!("edit {n}")})))
        .collect();
    for batch in edits.chunks(8) {
        futures::future::join_all(batch.iter().map(|(job, body)| herald.edit_job(job, body))).await;
    }
    let truth = herald.listed("").await;
    converge(&mut slow, &[], &truth, "the slow reader").await;
    assert!(
        herald.metric("herald_sse_conflated_total").await > 0.0,
        "the slow reader's queue conflated"
    );
    assert_eq!(herald.metric("herald_sse_resnapshots_total").await, 0.0);
    drop(slow_pace);
    drop(slow);
    herald.wait_for_metric("herald_sse_clients", 1.0).await;

    // The stalled client: new (16 kB) jobs until its socket, the server's
    // buffers (the kernel grows a loopback send buffer to megabytes) and
    // then its queue are full, and the queue overflows into a snapshot.
    let large = "d".repeat(16_000);
    let mut posted = 0;
    let started = Instant::now();
    while herald.metric("herald_sse_resnapshots_total").await < 1.0 {
        assert!(
            posted < 2_000 && started.elapsed() < Duration::from_secs(120),
            "no resnapshot after {posted} jobs"
        );
        herald
            .post_job_described(&format!("more {posted}"), &large)
            .await;
        posted += 1;
    }
    // A busy board goes on: four queues' worth more while it still reads
    // nothing. Each overflow is covered by the one snapshot it is owed;
    // nothing is let go before `sse.stall_timeout_ms` (30 s).
    for more in 0..64 {
        herald
            .post_job_described(&format!("still more {more}"), &large)
            .await;
    }
    herald
        .wait_for_metric(
            "herald_sse_events_total",
            10.0 + 500.0 + posted as f64 + 64.0,
        )
        .await;
    assert_eq!(
        herald.metric("herald_sse_clients").await,
        1.0,
        "still connected"
    );
    stalled_pace.send_replace(Some(Duration::ZERO));
    let truth = herald.listed("").await;
    converge(&mut stalled, &[], &truth, "the stalled reader").await;
    assert!(
        stalled
            .seen
            .iter()
            .filter(|e| e.event == "snapshot")
            .count()
            >= 2,
        "its connect snapshot, then the resnapshot"
    );
    assert_eq!(herald.metric("herald_sse_evicted_total").await, 0.0);
}

/// With admission at 1/s, 20 clients resuming within the history and 20
/// needing a snapshot connect at once, each from its own address: every
/// resuming client is admitted (and gets the next job); the snapshot ones
/// beyond the burst are turned away with `retry:`, and only they.
async fn a_reconnect_storm_admits_every_cheap_resume_before_any_snapshot(backend: Backend) {
    let b = Backing::start(backend).await;
    let herald = b
        .daemon(&[
            ("HERALD_SSE__ADMIT_PER_SEC", "1"),
            ("HERALD_LIMITS__STREAM_CONNECTS_PER_SEC", "100"),
        ])
        .await;
    herald.post_job_at("listed", "Acme", "Berlin").await;
    let stream = herald.url("/api/jobs/stream");
    let cursor = {
        let mut first = SseClient::connect(&stream, None).await;
        herald.post_job_at("seen", "Acme", "Berlin").await;
        first
            .read_until("the second job", Duration::from_secs(15), |seen| {
                seen.iter().any(|e| e.event == "job.posted")
            })
            .await;
        first.last_id().expect("an id")
    };
    let rejected_before = herald.metric("herald_sse_rejected_total").await;
    let from = |n: u8| Some(std::net::IpAddr::from([127, 0, 1, n]));
    let storm = futures::future::join_all((0..40u8).map(|n| {
        let (stream, cursor) = (stream.clone(), cursor.clone());
        async move {
            let resume = (n % 2 == 0).then_some(cursor.as_str());
            (
                resume.is_some(),
                SseClient::connect_once_from(&stream, resume, from(n + 2)).await,
            )
        }
    }))
    .await;
    herald
        .post_job_at("after the storm", "Acme", "Berlin")
        .await;
    let mut turned_away = 0;
    for (resuming, mut client) in storm {
        let deadline = Instant::now() + Duration::from_secs(10);
        let admitted = loop {
            if client
                .seen
                .iter()
                .any(|e| e.data.contains("after the storm"))
            {
                break true;
            }
            if client.closed || Instant::now() > deadline {
                break false;
            }
            client.next(Duration::from_millis(200)).await;
        };
        if resuming {
            assert!(admitted, "a resume within the history is always admitted");
        } else if !admitted {
            turned_away += 1;
            assert!(client.closed, "turned away: retry, then closed");
        }
    }
    assert!(
        turned_away >= 15,
        "the storm was over the rate: {turned_away} turned away"
    );
    assert_eq!(
        herald.metric("herald_sse_rejected_total").await - rejected_before,
        f64::from(turned_away)
    );
}

on_both_backends!(
    lists_converge_under_churn,
    a_job_edited_across_filters_leaves_one_list_and_joins_another,
    slow_readers_catch_up_by_conflation_then_by_resnapshot,
    a_reconnect_storm_admits_every_cheap_resume_before_any_snapshot
);
