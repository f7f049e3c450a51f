//! The retrying client (`herald::client`) against a real Herald: key reuse
//! is a 422 it does not retry; while the database is down it honours the
//! server's Retry-After and spreads its retries (full jitter), and the
//! transcript it writes shows both.

use crate::support;

use std::collections::HashMap;
use std::time::Duration;

use herald::client::{ClientPolicy, Operation, RetryingClient};
use herald::retry::RetryPolicy;
use serde_json::json;
use support::{count, eventually, user_token, Daemon, Postgres, Redis};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reusing_a_key_with_a_changed_body_is_answered_422_and_not_retried() {
    let pg = Postgres::start().await;
    let redis = Redis::start().await;
    let herald = Daemon::start(&pg.url(), Some(&redis.url()), &[]).await;
    let client = RetryingClient::new(&herald.public, ClientPolicy::default()).unwrap();
    let token = user_token("ada");
    let first = Operation::post(
        "/api/charges",
        &token,
        json!({"amount_cents": 500, "currency": "EUR", "description": "Listing"}),
    );
    let answer = client.execute(&first).await.expect("first charge");
    assert_eq!(answer.status, 201);
    // Same operation again: a replay of the same answer.
    let again = client.execute(&first).await.expect("replay");
    assert_eq!((again.status, again.replayed), (201, true));
    assert_eq!(again.body, answer.body);
    // Same key, another body: 422, answered once.
    let reused = Operation {
        body: json!({"amount_cents": 900, "currency": "EUR", "description": "Listing"}),
        ..first.clone()
    };
    let refused = client.execute(&reused).await.expect("an answer");
    assert_eq!(refused.status, 422);
    assert_eq!(refused.body["code"], "idempotency_key_reused");
    assert_eq!(refused.attempts, 1, "a 422 is not retried");
    let db = support::any_pool(&pg.url()).await;
    assert_eq!(count(&db, "SELECT count(*) FROM charges").await, 1);
    let records = client.transcript().records();
    assert_eq!(records.len(), 3, "{records:?}");
    assert_eq!(
        records.iter().map(|r| r.status).collect::<Vec<_>>(),
        [Some(201), Some(201), Some(422)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn while_the_database_is_down_the_client_honours_retry_after_and_spreads_its_retries() {
    let mut pg = Postgres::start().await;
    let redis = Redis::start().await;
    let herald = Daemon::start(&pg.url(), Some(&redis.url()), &[]).await;
    let job = herald.post_job("Patient").await;
    // A retry window (4 s, then 8 s) wider than Retry-After (1 s): a delay
    // is max(1 s, uniform over the window), so about three in four land
    // above the floor, spread across the window.
    let policy = ClientPolicy {
        retry: RetryPolicy {
            base: Duration::from_secs(4),
            cap: Duration::from_secs(8),
            max_attempts: 10,
            max_delay: Duration::from_secs(60),
        },
        ..ClientPolicy::default()
    };
    let client = RetryingClient::new(&herald.public, policy).unwrap();
    pg.stop();

    let operations: Vec<Operation> = (0..20)
        .map(|i| {
            Operation::post(
                "/api/applications",
                &user_token(&format!("waiter{i}")),
                json!({"job_id": job["id"]}),
            )
        })
        .collect();
    let running: Vec<_> = operations
        .iter()
        .cloned()
        .map(|op| {
            let client = client.clone();
            tokio::spawn(async move { client.execute(&op).await })
        })
        .collect();
    // Every operation has been refused and has retried at least once.
    eventually("every operation retried", Duration::from_secs(30), || {
        let records = client.transcript().records();
        async move {
            let mut per_key: HashMap<String, u32> = HashMap::new();
            for r in &records {
                let n = per_key.entry(r.key.clone()).or_default();
                *n = (*n).max(r.attempt);
            }
            (per_key.len() == 20 && per_key.values().all(|n| *n >= 2)).then_some(())
        }
    })
    .await;
    pg.restart().await;
    for task in running {
        let answer = task
            .await
            .unwrap()
            .expect("an answer after the database returned");
        assert_eq!(answer.status, 201, "{:?}", answer.body);
        assert!(answer.attempts >= 2);
    }
    let db = support::any_pool(&pg.url()).await;
    assert_eq!(count(&db, "SELECT count(*) FROM applications").await, 20);

    let records = client.transcript().records();
    let path = std::env::temp_dir().join(format!("herald-transcript-{}.jsonl", std::process::id()));
    client.transcript().write_jsonl(&path).unwrap();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap().lines().count(),
        records.len()
    );
    let _ = std::fs::remove_file(&path);
    // Each retry waited at least the Retry-After of the answer before it,
    // and every key stayed the same across its attempts (one per operation).
    let mut by_key: HashMap<&str, Vec<_>> = HashMap::new();
    for r in &records {
        by_key.entry(r.key.as_str()).or_default().push(r);
    }
    assert_eq!(by_key.len(), 20);
    for attempts in by_key.values_mut() {
        attempts.sort_by_key(|r| r.attempt);
        for pair in attempts.windows(2) {
            if let Some(secs) = pair[0].retry_after_secs {
                assert!(
                    pair[1].delay_ms >= secs * 1000,
                    "retry after {} ms despite Retry-After {secs}: {pair:?}",
                    pair[1].delay_ms
                );
            }
        }
    }
    assert!(
        records
            .iter()
            .any(|r| r.status == Some(503) && r.retry_after_secs == Some(1)),
        "the database outage answered 503 with Retry-After: 1"
    );
    // The second attempts' delays: never below the 1 s floor, inside the 4 s
    // window, and spread across it rather than synchronised.
    let second: Vec<u64> = records
        .iter()
        .filter(|r| r.attempt == 2)
        .map(|r| r.delay_ms)
        .collect();
    assert_eq!(second.len(), 20);
    assert!(
        second.iter().all(|d| (1_000..=4_000).contains(d)),
        "{second:?}"
    );
    let above: std::collections::HashSet<_> = second.iter().filter(|d| **d > 1_000).collect();
    assert!(
        above.len() >= 8,
        "most land above the floor, each its own: {second:?}"
    );
    let (min, max) = (above.iter().min().unwrap(), above.iter().max().unwrap());
    assert!(**max - **min >= 1_000, "spread, not one wave: {second:?}");
}
