//! Idempotent intake, end to end: a real Herald process against a real
//! PostgreSQL and a real Redis, started by the harness for each test.
//!
//! Every outcome is read from outside the code under test: HTTP responses,
//! rows in the database, `/metrics`.

use crate::support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{count, eventually, user_token, Backend, Backing, Daemon, Db, ADMIN_TOKEN};

struct World {
    b: Backing,
    herald: Daemon,
    db: Db,
}

/// A daemon on Postgres + Redis (the tests that need those servers).
async fn world(extra: &[(&str, &str)]) -> World {
    world_on(Backend::Postgres, extra).await
}

async fn world_on(backend: Backend, extra: &[(&str, &str)]) -> World {
    let b = Backing::start(backend).await;
    let herald = b.daemon(extra).await;
    let db = b.db().await;
    World { b, herald, db }
}

fn job_id(job: &Value) -> String {
    job["id"].as_str().expect("job id").to_string()
}

async fn applications(db: &Db) -> i64 {
    count(db, "SELECT count(*) FROM applications").await
}

async fn application_events(db: &Db) -> i64 {
    count(
        db,
        "SELECT count(*) FROM outbox_events WHERE topic = 'application.submitted'",
    )
    .await
}

async fn problem(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status(), status, "status");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "problem content type"
    );
    let body: Value = response.json().await.expect("problem body");
    assert_eq!(body["code"], code, "problem code in {body}");
    assert_eq!(body["status"], status);
    assert!(body["title"].is_string() && body["type"].is_string() && body["detail"].is_string());
    body
}

// ---------------------------------------------------------------- outcome table

async fn a_new_key_and_a_new_application_answer_201_with_the_application(backend: Backend) {
    let w = world_on(backend, &[]).await;
    let job = w.herald.post_job("Rust engineer").await;
    let token = user_token("alice");
    let r = w
        .herald
        .apply(&token, Some("key-1"), &json!({"job_id": job_id(&job)}))
        .await;
    assert_eq!(r.status(), 201);
    assert!(r.headers().get("idempotent-replayed").is_none());
    let app: Value = r.json().await.unwrap();
    assert_eq!(app["job_id"], job["id"]);
    assert_eq!(app["email_status"], "pending");
    assert_eq!(app["already_applied"], false);
    assert!(app["id"].is_string() && app["created_at"].is_string());
    assert_eq!(applications(&w.db).await, 1);
    assert_eq!(application_events(&w.db).await, 1);
    let completed = count(
        &w.db,
        "SELECT count(*) FROM idempotency_keys WHERE state = 'completed' AND response_status = 201",
    )
    .await;
    assert_eq!(completed, 1, "the key's outcome committed with the rows");
}

async fn the_same_key_and_request_replay_the_stored_status_and_body(backend: Backend) {
    let w = world_on(backend, &[]).await;
    let job = w.herald.post_job("Rust engineer").await;
    let token = user_token("alice");
    let body = json!({"job_id": job_id(&job), "cover_letter": "Hello"});
    let first = w.herald.apply(&token, Some("key-1"), &body).await;
    assert_eq!(first.status(), 201);
    let first_body = first.text().await.unwrap();
    for _ in 0..3 {
        let again = w.herald.apply(&token, Some("key-1"), &body).await;
        assert_eq!(again.status(), 201, "the stored status");
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        assert_eq!(again.text().await.unwrap(), first_body, "the stored body");
    }
    // Key order and whitespace are not part of the request's identity.
    let reordered = w
        .herald
        .http
        .post(w.herald.url("/api/applications"))
        .bearer_auth(&token)
        .header("Idempotency-Key", "key-1")
        .header("content-type", "application/json")
        .body(format!(
            "{{ \"cover_letter\" : \"Hello\",\n \"job_id\": \"{}\" }}",
            job_id(&job)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(reordered.headers()["idempotent-replayed"], "true");
    assert_eq!(applications(&w.db).await, 1);
    assert_eq!(application_events(&w.db).await, 1);
    assert_eq!(
        w.herald
            .metric("herald_idempotency_requests_total{outcome=\"replay\"}")
            .await,
        4.0
    );
    assert_eq!(
        w.herald
            .metric("herald_idempotency_requests_total{outcome=\"new\"}")
            .await,
        1.0,
        "the first application was new (the job was posted without a key)"
    );
}

async fn in_flight_duplicate_gets_409(backend: Backend, kill_redis: bool) {
    // The first keyed request holds its claim for 3 s after taking it.
    let mut w = world_on(
        backend,
        &[("FAILPOINTS", "intake-after-claim=1*return(3000)")],
    )
    .await;
    let job = w.herald.post_job("Rust engineer").await;
    if kill_redis {
        w.b.redis_mut().kill();
        w.herald.wait_for_metric("herald_redis_fallback", 1.0).await;
    }
    let token = user_token("alice");
    let body = json!({"job_id": job_id(&job)});
    let first = {
        let (herald_url, token, body) = (
            w.herald.url("/api/applications"),
            token.clone(),
            body.clone(),
        );
        let http = w.herald.http.clone();
        tokio::spawn(async move {
            http.post(herald_url)
                .bearer_auth(token)
                .header("Idempotency-Key", "key-1")
                .json(&body)
                .send()
                .await
                .unwrap()
        })
    };
    eventually(
        "the first request to hold its claim",
        Duration::from_secs(10),
        || async {
            let held = "SELECT count(*) FROM idempotency_keys WHERE state = 'in_progress'";
            (count(&w.db, held).await == 1).then_some(())
        },
    )
    .await;
    let second = w.herald.apply(&token, Some("key-1"), &body).await;
    assert_eq!(second.headers()["retry-after"], "1");
    problem(second, 409, "idempotency_in_flight").await;
    let first = first.await.unwrap();
    assert_eq!(first.status(), 201);
    let retry = w.herald.apply(&token, Some("key-1"), &body).await;
    assert_eq!(retry.status(), 201);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(applications(&w.db).await, 1);
    assert_eq!(
        w.herald
            .metric("herald_idempotency_requests_total{outcome=\"in_flight\"}")
            .await,
        1.0
    );
}

async fn the_same_key_while_the_first_request_runs_answers_409_with_retry_after(backend: Backend) {
    in_flight_duplicate_gets_409(backend, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_key_while_the_first_request_runs_answers_409_without_redis_too() {
    in_flight_duplicate_gets_409(Backend::Postgres, true).await;
}

async fn the_same_key_with_a_different_request_answers_422_and_nothing_of_the_first(
    backend: Backend,
) {
    let w = world_on(backend, &[]).await;
    let job_a = w.herald.post_job("A").await;
    let job_b = w.herald.post_job("B").await;
    let token = user_token("alice");
    let first = w
        .herald
        .apply(&token, Some("key-1"), &json!({"job_id": job_id(&job_a)}))
        .await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let first_id = first["id"].as_str().unwrap().to_string();
    // From the Redis cache, then from the database after Redis forgot it.
    for round in 0..2 {
        let other = w
            .herald
            .apply(&token, Some("key-1"), &json!({"job_id": job_id(&job_b)}))
            .await;
        let body = problem(other, 422, "idempotency_key_reused").await;
        assert!(
            !body.to_string().contains(&first_id),
            "round {round}: {body}"
        );
        if let Some(redis) = &w.b.redis {
            redis.cli(&["FLUSHALL"]).expect("flushall");
        }
    }
    assert_eq!(applications(&w.db).await, 1);
    assert_eq!(
        w.herald
            .metric("herald_idempotency_requests_total{outcome=\"mismatch\"}")
            .await,
        2.0
    );
}

async fn a_malformed_key_answers_400_and_writes_nothing(backend: Backend) {
    let w = world_on(backend, &[]).await;
    let job = w.herald.post_job("A").await;
    let token = user_token("alice");
    let long = "k".repeat(256);
    for key in ["", "has space", long.as_str(), "tab\tkey"] {
        let r = w
            .herald
            .http
            .post(w.herald.url("/api/applications"))
            .bearer_auth(&token)
            .header("Idempotency-Key", key)
            .json(&json!({"job_id": job_id(&job)}))
            .send()
            .await
            .unwrap();
        problem(r, 400, "idempotency_key_invalid").await;
    }
    let r = w
        .herald
        .http
        .post(w.herald.url("/api/applications"))
        .bearer_auth(&token)
        .header(
            "Idempotency-Key",
            reqwest::header::HeaderValue::from_bytes("clé".as_bytes()).unwrap(),
        )
        .json(&json!({"job_id": job_id(&job)}))
        .send()
        .await
        .unwrap();
    problem(r, 400, "idempotency_key_invalid").await;
    assert_eq!(applications(&w.db).await, 0);
    assert_eq!(
        count(
            &w.db,
            "SELECT count(*) FROM idempotency_keys WHERE route = '/api/applications'"
        )
        .await,
        0
    );
}

async fn applying_again_without_a_key_or_with_a_new_key_returns_the_existing_application_with_200(
    backend: Backend,
) {
    let w = world_on(backend, &[]).await;
    let job = w.herald.post_job("A").await;
    let token = user_token("alice");
    let body = json!({"job_id": job_id(&job)});
    let first = w.herald.apply(&token, None, &body).await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    for key in [None, Some("fresh-key"), None] {
        let again = w.herald.apply(&token, key, &body).await;
        assert_eq!(again.status(), 200);
        assert!(again.headers().get("idempotent-replayed").is_none());
        let again: Value = again.json().await.unwrap();
        assert_eq!(again["id"], first["id"]);
        assert_eq!(again["already_applied"], true);
    }
    assert_eq!(applications(&w.db).await, 1);
    assert_eq!(application_events(&w.db).await, 1, "no second email event");
}

async fn applying_to_an_unknown_job_answers_404_job_not_found(backend: Backend) {
    let w = world_on(backend, &[]).await;
    let token = user_token("alice");
    let body = json!({"job_id": "01900000-0000-7000-8000-000000000000"});
    problem(
        w.herald.apply(&token, None, &body).await,
        404,
        "job_not_found",
    )
    .await;
    problem(
        w.herald.apply(&token, Some("k"), &body).await,
        404,
        "job_not_found",
    )
    .await;
    let replay = w.herald.apply(&token, Some("k"), &body).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    problem(replay, 404, "job_not_found").await;
    assert_eq!(applications(&w.db).await, 0);
    assert_eq!(count(&w.db, "SELECT count(*) FROM outbox_events").await, 0);
}

// ---------------------------------------------------------------- concurrency

async fn fifty_rounds_of_two_simultaneous_requests_with_one_key_create_one_application_each(
    backend: Backend,
) {
    let w = world_on(backend, &[]).await;
    let job = w.herald.post_job("A").await;
    let body = json!({"job_id": job_id(&job)});
    for round in 0..50 {
        let token = user_token(&format!("user-{round}"));
        let key = format!("round-{round}");
        let (a, b) = tokio::join!(
            w.herald.apply(&token, Some(&key), &body),
            w.herald.apply(&token, Some(&key), &body)
        );
        let mut created = 0;
        for r in [a, b] {
            match r.status().as_u16() {
                201 if r.headers().get("idempotent-replayed").is_none() => created += 1,
                201 => {}
                409 => assert_eq!(r.headers()["retry-after"], "1"),
                other => panic!("round {round}: unexpected {other}"),
            }
        }
        assert_eq!(
            created, 1,
            "round {round}: exactly one 201 that is not a replay"
        );
        let (apps, events): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM applications WHERE user_id = $1),
                    (SELECT count(*) FROM outbox_events e JOIN applications a
                        ON a.id = e.aggregate_id WHERE a.user_id = $1)",
        )
        .bind(format!("user-{round}"))
        .fetch_one(&w.db)
        .await
        .unwrap();
        assert_eq!((apps, events), (1, 1), "round {round}");
    }
    assert_eq!(applications(&w.db).await, 50);
    assert_eq!(application_events(&w.db).await, 50);
}

async fn another_user_sending_the_same_key_gets_their_own_new_result(backend: Backend) {
    let w = world_on(backend, &[]).await;
    let job = w.herald.post_job("A").await;
    let body = json!({"job_id": job_id(&job)});
    let alice = w
        .herald
        .apply(&user_token("alice"), Some("shared"), &body)
        .await;
    assert_eq!(alice.status(), 201);
    let alice: Value = alice.json().await.unwrap();
    let bob = w
        .herald
        .apply(&user_token("bob"), Some("shared"), &body)
        .await;
    assert_eq!(bob.status(), 201);
    assert!(bob.headers().get("idempotent-replayed").is_none());
    let bob: Value = bob.json().await.unwrap();
    assert_ne!(alice["id"], bob["id"]);
    assert_eq!(applications(&w.db).await, 2);
    // And Bob cannot read Alice's application: 404, not 403.
    let peek = w
        .herald
        .http
        .get(w.herald.url(&format!(
            "/api/applications/{}",
            alice["id"].as_str().unwrap()
        )))
        .bearer_auth(user_token("bob"))
        .send()
        .await
        .unwrap();
    problem(peek, 404, "not_found").await;
    let own = w
        .herald
        .http
        .get(w.herald.url(&format!(
            "/api/applications/{}",
            alice["id"].as_str().unwrap()
        )))
        .bearer_auth(user_token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200);
    let own: Value = own.json().await.unwrap();
    let status = own["email_status"].as_str().unwrap_or_default();
    assert!(["pending", "sent"].contains(&status), "{own}");
}

// ---------------------------------------------------------------- Redis loss

/// The milliseconds Redis keeps each hot-tier key (not the probe's own).
fn hot_tier_ttls_ms(w: &World) -> Vec<i64> {
    let keys = w.b.redis().cli(&["KEYS", "herald:idem:*"]).unwrap();
    keys.lines()
        .filter(|k| !k.is_empty() && *k != "herald:idem:probe")
        .map(|k| {
            w.b.redis()
                .cli(&["PTTL", k])
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_hot_tier_never_outlives_the_database_copy_of_a_key() {
    let w = world(&[]).await;
    let job = w.herald.post_job("A").await;
    let token = user_token("alice");
    let body = json!({"job_id": job_id(&job)});
    assert_eq!(w.herald.apply(&token, Some("k"), &body).await.status(), 201);
    // Completed: cached for (no more than) the key's TTL, one day.
    let ttls = hot_tier_ttls_ms(&w);
    assert_eq!(ttls.len(), 1, "{ttls:?}");
    assert!((1..=86_400_000).contains(&ttls[0]), "{ttls:?}");
    // The database copy has ten seconds left; Redis is flushed and the key
    // replayed from the database: the cache gets those ten seconds, not a
    // fresh day (which would answer for a key the database has forgotten).
    sqlx::query("UPDATE idempotency_keys SET expires_at = now() + interval '10 seconds'")
        .execute(&w.db)
        .await
        .unwrap();
    assert_eq!(w.b.redis().cli(&["FLUSHALL"]).as_deref(), Some("OK"));
    let replay = w.herald.apply(&token, Some("k"), &body).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let ttls = hot_tier_ttls_ms(&w);
    assert_eq!(ttls.len(), 1, "{ttls:?}");
    assert!((1..=10_000).contains(&ttls[0]), "cached for {ttls:?} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flushall_between_a_request_and_its_retry_still_replays() {
    let w = world(&[]).await;
    let job = w.herald.post_job("A").await;
    let token = user_token("alice");
    let body = json!({"job_id": job_id(&job)});
    let first = w.herald.apply(&token, Some("k"), &body).await;
    assert_eq!(first.status(), 201);
    let first = first.text().await.unwrap();
    assert_eq!(w.b.redis().cli(&["FLUSHALL"]).as_deref(), Some("OK"));
    let retry = w.herald.apply(&token, Some("k"), &body).await;
    assert_eq!(retry.status(), 201);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.text().await.unwrap(), first);
    // A deleted single key is the same story.
    let keys = w.b.redis().cli(&["KEYS", "herald:idem:*"]).unwrap();
    for key in keys.lines() {
        w.b.redis().cli(&["DEL", key]);
    }
    let again = w.herald.apply(&token, Some("k"), &body).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(applications(&w.db).await, 1);
    assert_eq!(application_events(&w.db).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_redis_killed_requests_stay_correct_and_ready_and_the_fallback_gauge_tracks_it() {
    let mut w = world(&[]).await;
    let job_a = w.herald.post_job("A").await;
    let job_b = w.herald.post_job("B").await;
    assert_eq!(w.herald.metric("herald_redis_fallback").await, 0.0);
    w.b.redis_mut().kill();
    w.herald.wait_for_metric("herald_redis_fallback", 1.0).await;
    let ready = w.herald.get("/readyz").await;
    assert_eq!(ready.status(), 200, "Redis loss is degraded, still ready");
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["redis"], "fallback");
    assert_eq!(ready["stream"], "ready", "the hub keeps its board");

    let token = user_token("alice");
    let body = json!({"job_id": job_id(&job_a)});
    assert_eq!(w.herald.apply(&token, Some("k"), &body).await.status(), 201);
    let replay = w.herald.apply(&token, Some("k"), &body).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let other = w
        .herald
        .apply(&token, Some("k"), &json!({"job_id": job_id(&job_b)}))
        .await;
    problem(other, 422, "idempotency_key_reused").await;
    assert_eq!(w.herald.apply(&token, None, &body).await.status(), 200);

    w.b.redis_mut().restart().await;
    w.herald.wait_for_metric("herald_redis_fallback", 0.0).await;
    let replay = w.herald.apply(&token, Some("k"), &body).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(applications(&w.db).await, 1);
    assert_eq!(application_events(&w.db).await, 1);
    let log = w.herald.log();
    assert!(log.contains("fallback"), "the switch is logged");
    assert!(
        log.contains("leaving fallback"),
        "the switch back is logged"
    );
}

// ---------------------------------------------------------------- Postgres loss

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_postgres_stopped_requests_get_503_and_their_retries_succeed_once_after_restart() {
    let mut w = world(&[("HERALD_IDEMPOTENCY__LEASE_SECS", "2")]).await;
    let job = w.herald.post_job("A").await;
    let body = json!({"job_id": job_id(&job)});
    // Three clients each send distinct keyed operations, one after another,
    // until three of theirs have met the outage (bounded in count and time).
    // Postgres is stopped once 8 operations have been answered.
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = Vec::new();
    for client in 0..3 {
        let (http, url, body, answered) = (
            w.herald.http.clone(),
            w.herald.url("/api/applications"),
            body.clone(),
            answered.clone(),
        );
        clients.push(tokio::spawn(async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let mut ops = Vec::new();
            let mut unavailable = 0;
            for i in 0..2000 {
                if unavailable >= 3 || std::time::Instant::now() > deadline {
                    break;
                }
                let (user, key) = (format!("c{client}-user-{i}"), format!("c{client}-op-{i}"));
                let r = http
                    .post(&url)
                    .bearer_auth(user_token(&user))
                    .header("Idempotency-Key", &key)
                    .json(&body)
                    .send()
                    .await
                    .expect("response");
                let status = r.status().as_u16();
                assert!([201, 503].contains(&status), "unexpected {status}");
                if status == 503 {
                    assert!(
                        r.headers().get("retry-after").is_some(),
                        "503 carries Retry-After"
                    );
                    problem(r, 503, "unavailable").await;
                    unavailable += 1;
                }
                ops.push((user, key, status));
                answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            ops
        }));
    }
    let counter = answered.clone();
    eventually("8 answers before the stop", Duration::from_secs(30), || {
        let counter = counter.clone();
        async move { (counter.load(std::sync::atomic::Ordering::SeqCst) >= 8).then_some(()) }
    })
    .await;
    w.b.pg_mut().stop();
    let mut ops = Vec::new();
    for client in clients {
        ops.extend(client.await.unwrap());
    }
    let met_outage = ops.iter().filter(|(_, _, s)| *s == 503).count();
    assert!(
        met_outage >= 3,
        "the clients met the outage: {met_outage} 503s"
    );
    // While it is down: 503 with Retry-After, for unkeyed requests and readiness too.
    problem(
        w.herald.apply(&user_token("late"), None, &body).await,
        503,
        "unavailable",
    )
    .await;
    let ready = w.herald.get("/readyz").await;
    assert_eq!(ready.status(), 503);

    w.b.pg_mut().restart().await;
    // Nothing half-written: every application has its event, and vice versa.
    let orphans = count(
        &w.db,
        "SELECT count(*) FROM applications a FULL JOIN outbox_events e ON e.aggregate_id = a.id
          WHERE e.topic IS DISTINCT FROM 'job.posted' AND (a.id IS NULL OR e.event_id IS NULL)",
    )
    .await;
    assert_eq!(orphans, 0);
    // The clients retry every operation with its key until it is done.
    let (herald, body) = (&w.herald, &body);
    for (user, key, _) in &ops {
        let token = user_token(user);
        let token = &token;
        eventually(
            "the retry to succeed",
            Duration::from_secs(30),
            || async move {
                let r = herald.apply(token, Some(key), body).await;
                match r.status().as_u16() {
                    201 | 200 => Some(()),
                    409 | 503 => None,
                    other => panic!("unexpected {other}"),
                }
            },
        )
        .await;
    }
    let operations = ops.len() as i64;
    assert_eq!(
        applications(&w.db).await,
        operations,
        "every operation applied once"
    );
    assert_eq!(application_events(&w.db).await, operations);
}

// ---------------------------------------------------------------- crashed holder

async fn a_key_left_in_progress_by_a_crashed_holder_is_taken_over_after_its_lease(
    backend: Backend,
) {
    // The first keyed request stops right after claiming its key…
    let mut w = world_on(
        backend,
        &[
            ("HERALD_IDEMPOTENCY__LEASE_SECS", "2"),
            ("FAILPOINTS", "intake-after-claim=1*return(60000)"),
        ],
    )
    .await;
    let job = w.herald.post_job("A").await;
    let token = user_token("alice");
    let body = json!({"job_id": job_id(&job)});
    let stuck = {
        let (url, token, body) = (
            w.herald.url("/api/applications"),
            token.clone(),
            body.clone(),
        );
        let http = w.herald.http.clone();
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(token)
                .header("Idempotency-Key", "k")
                .json(&body)
                .send()
                .await
        })
    };
    let held = "SELECT count(*) FROM idempotency_keys WHERE state = 'in_progress'";
    eventually("the claim", Duration::from_secs(10), || async {
        (count(&w.db, held).await == 1).then_some(())
    })
    .await;
    // …and the process dies with it: kill -9 while it holds the key.
    w.herald.kill();
    assert!(
        stuck.await.unwrap().is_err(),
        "the holder's client saw no response"
    );
    assert_eq!(
        count(&w.db, held).await,
        1,
        "the crashed holder left its claim behind"
    );
    w.herald.set_env("FAILPOINTS", None);
    w.herald.restart().await;
    let saw_409 = std::sync::atomic::AtomicBool::new(false);
    let (herald, token, body, seen) = (&w.herald, &token, &body, &saw_409);
    let response = eventually("the takeover", Duration::from_secs(20), || async move {
        let r = herald.apply(token, Some("k"), body).await;
        match r.status().as_u16() {
            409 => {
                seen.store(true, std::sync::atomic::Ordering::Relaxed);
                None
            }
            201 => Some(r),
            other => panic!("unexpected {other}"),
        }
    })
    .await;
    assert!(response.headers().get("idempotent-replayed").is_none());
    assert!(
        saw_409.load(std::sync::atomic::Ordering::Relaxed),
        "within the lease the key was still held"
    );
    assert_eq!(applications(&w.db).await, 1);
    assert_eq!(application_events(&w.db).await, 1);
}

// ---------------------------------------------------------------- two processes

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_daemons_share_keys_a_retry_on_the_other_process_replays() {
    let w = world(&[]).await;
    let other = Daemon::start(&w.b.pg().url(), Some(&w.b.redis().url()), &[]).await;
    let job = w.herald.post_job("A").await;
    let token = user_token("alice");
    let body = json!({"job_id": job_id(&job)});
    let first = w.herald.apply(&token, Some("k"), &body).await;
    assert_eq!(first.status(), 201);
    let first = first.text().await.unwrap();
    let retry = other.apply(&token, Some("k"), &body).await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.text().await.unwrap(), first);
    // Also when the retry must go to the database.
    w.b.redis().cli(&["FLUSHALL"]);
    let retry = other.apply(&token, Some("k"), &body).await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");

    for round in 0..30 {
        let token = user_token(&format!("split-{round}"));
        let key = format!("split-{round}");
        let (a, b) = tokio::join!(
            w.herald.apply(&token, Some(&key), &body),
            other.apply(&token, Some(&key), &body)
        );
        let fresh = [a, b]
            .iter()
            .filter(|r| r.status() == 201 && r.headers().get("idempotent-replayed").is_none())
            .count();
        assert_eq!(fresh, 1, "round {round}");
    }
    assert_eq!(applications(&w.db).await, 31);
    assert_eq!(application_events(&w.db).await, 31);
}

// ---------------------------------------------------------------- bad input

async fn bad_input_gets_a_4xx_problem_with_a_stable_code_and_never_a_5xx(backend: Backend) {
    let w = world_on(backend, &[]).await;
    let job = w.herald.post_job("A").await;
    let token = user_token("alice");
    let url = w.herald.url("/api/applications");
    let http = &w.herald.http;
    let send_raw = |body: &'static str| {
        http.post(&url)
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    problem(send_raw("{not json").await.unwrap(), 400, "invalid_body").await;
    problem(send_raw("").await.unwrap(), 400, "invalid_body").await;
    problem(send_raw("[]").await.unwrap(), 400, "invalid_body").await;
    problem(
        send_raw(r#"{"job_id": 42}"#).await.unwrap(),
        400,
        "invalid_body",
    )
    .await;
    problem(
        send_raw(r#"{"job_id": "nope"}"#).await.unwrap(),
        400,
        "invalid_body",
    )
    .await;
    let unknown = w
        .herald
        .apply(&token, None, &json!({"job_id": job_id(&job), "salary": 1}))
        .await;
    problem(unknown, 400, "invalid_body").await;

    // Over 64 KiB: declared, and streamed without a length.
    let big = json!({"job_id": job_id(&job), "cover_letter": "x".repeat(70 * 1024)});
    problem(
        w.herald.apply(&token, None, &big).await,
        413,
        "body_too_large",
    )
    .await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..80).map(|_| Ok(vec![b' '; 1024])).collect();
    let streamed = http
        .post(&url)
        .bearer_auth(&token)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    problem(streamed, 413, "body_too_large").await;

    // Credentials.
    let body = json!({"job_id": job_id(&job)});
    let no_auth = http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(no_auth.headers()["www-authenticate"], "Bearer");
    problem(no_auth, 401, "unauthorized").await;
    let expired = herald::http::auth::Auth::new(
        &herald::config::Secret::new(ADMIN_TOKEN),
        &herald::config::Secret::new(support::JWT_SECRET),
    );
    let expired = {
        // exp one hour ago, signed correctly.
        let claims = json!({"sub": "alice", "email": "a@example.com", "exp": chrono::Utc::now().timestamp() - 3600});
        let _ = expired;
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(support::JWT_SECRET.as_bytes()),
        )
        .unwrap()
    };
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "alice", "email": "a@example.com", "exp": chrono::Utc::now().timestamp() + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(b"someone-elses-secret-0123456789-abcdef"),
    )
    .unwrap();
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &json!({"sub": "alice", "email": "a@example.com", "exp": chrono::Utc::now().timestamp() + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(support::JWT_SECRET.as_bytes()),
    )
    .unwrap();
    for bad in [
        expired.as_str(),
        forged.as_str(),
        hs512.as_str(),
        "garbage",
        ADMIN_TOKEN,
    ] {
        problem(w.herald.apply(bad, None, &body).await, 401, "unauthorized").await;
    }
    let basic = http
        .post(&url)
        .header("authorization", "Basic YWxpY2U6cHc=")
        .json(&body)
        .send()
        .await
        .unwrap();
    problem(basic, 401, "unauthorized").await;

    // Admin token.
    let job_body = json!({"title": "t", "company": "c", "location": "l", "description": "d"});
    for bad in ["wrong-admin-token-0123456789", &token] {
        let r = http
            .post(w.herald.url("/api/jobs"))
            .bearer_auth(bad)
            .json(&job_body)
            .send()
            .await
            .unwrap();
        problem(r, 401, "unauthorized").await;
    }
    let r = http
        .get(w.herald.admin_url("/admin/status"))
        .send()
        .await
        .unwrap();
    problem(r, 401, "unauthorized").await;
    let r = http
        .post(w.herald.url("/api/jobs"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"title": "t", "company": "c", "location": "l"}))
        .send()
        .await
        .unwrap();
    problem(r, 400, "invalid_body").await;
    // A line break in a title would add headers to the confirmation email.
    let r = http
        .post(w.herald.url("/api/jobs"))
        .bearer_auth(ADMIN_TOKEN)
        .json(
            &json!({"title": "Rust\r\nBcc: everyone@example.com", "company": "c",
                      "location": "l", "description": "d"}),
        )
        .send()
        .await
        .unwrap();
    let body = problem(r, 400, "invalid_body").await;
    assert!(
        body["detail"].as_str().unwrap().contains("one line"),
        "{body}"
    );

    // Routing and parameters.
    problem(
        http.get(w.herald.url("/nope")).send().await.unwrap(),
        404,
        "not_found",
    )
    .await;
    problem(
        http.get(w.herald.url("/api/jobs/not-a-uuid"))
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
    let r = http.delete(w.herald.url("/api/jobs")).send().await.unwrap();
    assert_eq!(r.headers()["allow"], "GET, POST");
    problem(r, 405, "method_not_allowed").await;
    // The admin listener names its methods too (schemathesis found it did not).
    for (method, path, allow) in [
        (reqwest::Method::POST, "/metrics", "GET"),
        (reqwest::Method::DELETE, "/admin/dlq", "GET"),
        (reqwest::Method::GET, "/admin/dlq/replay", "POST"),
        (
            reqwest::Method::PUT,
            "/admin/dlq/00000000-0000-0000-0000-000000000000",
            "DELETE",
        ),
    ] {
        let r = http
            .request(method, w.herald.admin_url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["allow"], allow, "{path}");
        problem(r, 405, "method_not_allowed").await;
    }
    for q in ["limit=0", "limit=101", "limit=x", "before=zzz"] {
        let r = http
            .get(w.herald.url(&format!("/api/jobs?{q}")))
            .send()
            .await
            .unwrap();
        problem(r, 400, "invalid_query").await;
    }
    assert_eq!(applications(&w.db).await, 0, "nothing written by bad input");
}

// ---------------------------------------------------------------- the rest of the API

async fn jobs_are_listed_newest_first_with_a_before_cursor(backend: Backend) {
    let w = world_on(backend, &[]).await;
    for i in 0..5 {
        w.herald.post_job(&format!("Job {i}")).await;
    }
    let page: Value = w
        .herald
        .http
        .get(w.herald.url("/api/jobs?limit=3"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let titles: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["Job 4", "Job 3", "Job 2"]);
    let cursor = page["next_before"].as_str().unwrap();
    let rest: Value = w
        .herald
        .http
        .get(w.herald.url(&format!("/api/jobs?limit=3&before={cursor}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let titles: Vec<&str> = rest["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["Job 1", "Job 0"]);
    assert!(rest["next_before"].is_null());
    let one = &page["items"][0];
    let fetched: Value = w
        .herald
        .http
        .get(
            w.herald
                .url(&format!("/api/jobs/{}", one["id"].as_str().unwrap())),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(&fetched, one);
    for field in [
        "id",
        "title",
        "company",
        "location",
        "description",
        "posted_at",
    ] {
        assert!(fetched[field].is_string(), "{field}");
    }
    assert_eq!(
        count(
            &w.db,
            "SELECT count(*) FROM outbox_events WHERE topic = 'job.posted'"
        )
        .await,
        5
    );
}

async fn dev_login_issues_a_token_that_applies_and_admin_status_shows_the_tree(backend: Backend) {
    let w = world_on(backend, &[]).await;
    let job = w.herald.post_job("A").await;
    let login: Value = w
        .herald
        .http
        .post(w.herald.url("/api/dev/login"))
        .json(&json!({"email": "Carol@Example.com"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["token"].as_str().unwrap();
    let r = w
        .herald
        .apply(token, None, &json!({"job_id": job_id(&job)}))
        .await;
    assert_eq!(r.status(), 201);
    let email: String = sqlx::query_scalar("SELECT email FROM applications")
        .fetch_one(&w.db)
        .await
        .unwrap();
    assert_eq!(
        email, "carol@example.com",
        "the recipient comes from the token"
    );

    let status = w.herald.admin_status().await;
    let actors: Vec<(String, bool)> = status["actors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap().to_string(),
                a["running"] == true,
            )
        })
        .collect();
    let expected = [
        "key_registry",
        "retry_budget",
        "outbox_relay",
        "email_sender",
        "ledger",
        "dlq_monitor",
        "janitor",
        "auditor",
        "sse_hub",
    ];
    assert_eq!(
        actors,
        expected.map(|n| (n.to_string(), true)).to_vec(),
        "{status}"
    );
    let (backend, broker, redis) = match backend {
        Backend::Postgres => ("postgres", "redis", "healthy"),
        Backend::Sqlite => ("sqlite", "in-process", "disabled"),
    };
    assert_eq!(status["backend"], backend);
    assert_eq!(status["broker"], broker);
    assert_eq!(status["redis"], redis);
    // The dev transport writes the confirmation as an .eml file, and the
    // outbox drains: the job's event and the application's are settled.
    let mail = w.herald.state_dir().join("mail");
    let eml = eventually("a confirmation .eml", Duration::from_secs(20), || {
        let mail = mail.clone();
        async move {
            let entry = std::fs::read_dir(&mail)
                .ok()?
                .flatten()
                .find(|e| e.path().extension().is_some_and(|x| x == "eml"))?;
            std::fs::read_to_string(entry.path()).ok()
        }
    })
    .await;
    assert!(eml.contains("To: carol@example.com"), "{eml}");
    // A well-formed message: dated, with an id of its own.
    let date = eml
        .lines()
        .find_map(|l| l.strip_prefix("Date: "))
        .unwrap_or_else(|| panic!("no Date header: {eml}"));
    chrono::DateTime::parse_from_rfc2822(date.trim()).expect("an RFC 2822 date");
    assert!(eml.contains("\r\nMessage-ID: <"), "{eml}");
    w.herald
        .wait_for_metric("herald_emails_sent_total", 1.0)
        .await;
    eventually("outbox drained", Duration::from_secs(10), || {
        let http = w.herald.http.clone();
        let url = w.herald.admin_url("/admin/status");
        async move {
            let status: Value = http
                .get(url)
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (status["outbox"]["pending"] == 0).then_some(())
        }
    })
    .await;
}

async fn dev_login_does_not_exist_when_it_is_off(backend: Backend) {
    let w = world_on(backend, &[("HERALD_AUTH__DEV_LOGIN", "false")]).await;
    let r = w
        .herald
        .http
        .post(w.herald.url("/api/dev/login"))
        .json(&json!({"email": "a@example.com"}))
        .send()
        .await
        .unwrap();
    problem(r, 404, "not_found").await;
}

// ---------------------------------------------------------------- charges

async fn charge(
    herald: &Daemon,
    token: &str,
    key: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    herald.post("/api/charges", token, key, body).await
}

async fn a_charge_without_a_key_answers_400_idempotency_key_missing_and_writes_nothing(
    backend: Backend,
) {
    let w = world_on(backend, &[]).await;
    let body = json!({"amount_cents": 1500, "currency": "EUR", "description": "Featured post"});
    let r = charge(&w.herald, &user_token("alice"), None, &body).await;
    problem(r, 400, "idempotency_key_missing").await;
    assert_eq!(count(&w.db, "SELECT count(*) FROM charges").await, 0);
    assert_eq!(count(&w.db, "SELECT count(*) FROM outbox_events").await, 0);
}

async fn a_charge_is_created_once_replayed_on_retry_and_refused_on_key_reuse(backend: Backend) {
    let w = world_on(backend, &[]).await;
    let token = user_token("alice");
    let body = json!({"amount_cents": 1500, "currency": "EUR", "description": "Featured post"});
    let first = charge(&w.herald, &token, Some("c-1"), &body).await;
    assert_eq!(first.status(), 201);
    let created: Value = first.json().await.unwrap();
    assert_eq!(created["amount_cents"], 1500);
    assert_eq!(created["currency"], "EUR");
    assert_eq!(created["ledger_status"], "pending");
    let again = charge(&w.herald, &token, Some("c-1"), &body).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again, created);
    let changed = json!({"amount_cents": 9900, "currency": "EUR", "description": "Featured post"});
    problem(
        charge(&w.herald, &token, Some("c-1"), &changed).await,
        422,
        "idempotency_key_reused",
    )
    .await;
    for bad in [
        json!({"amount_cents": 0, "currency": "EUR", "description": "x"}),
        json!({"amount_cents": 1_000_000_001u64, "currency": "EUR", "description": "x"}),
        json!({"amount_cents": 12.5, "currency": "EUR", "description": "x"}),
        json!({"amount_cents": 100, "currency": "eur", "description": "x"}),
        json!({"amount_cents": 100, "currency": "EUR", "description": "x", "tip": 1}),
    ] {
        problem(
            charge(&w.herald, &token, Some("c-bad"), &bad).await,
            400,
            "invalid_body",
        )
        .await;
    }
    let id = created["id"].as_str().unwrap();
    let own = w
        .herald
        .http
        .get(w.herald.url(&format!("/api/charges/{id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200);
    let theirs = w
        .herald
        .http
        .get(w.herald.url(&format!("/api/charges/{id}")))
        .bearer_auth(user_token("mallory"))
        .send()
        .await
        .unwrap();
    problem(theirs, 404, "not_found").await;
    assert_eq!(count(&w.db, "SELECT count(*) FROM charges").await, 1);
    assert_eq!(
        count(
            &w.db,
            "SELECT count(*) FROM outbox_events WHERE topic = 'charge.created'"
        )
        .await,
        1
    );
}

on_both_backends!(
    a_key_left_in_progress_by_a_crashed_holder_is_taken_over_after_its_lease,
    the_same_key_while_the_first_request_runs_answers_409_with_retry_after,
    a_new_key_and_a_new_application_answer_201_with_the_application,
    the_same_key_and_request_replay_the_stored_status_and_body,
    the_same_key_with_a_different_request_answers_422_and_nothing_of_the_first,
    a_malformed_key_answers_400_and_writes_nothing,
    applying_again_without_a_key_or_with_a_new_key_returns_the_existing_application_with_200,
    applying_to_an_unknown_job_answers_404_job_not_found,
    fifty_rounds_of_two_simultaneous_requests_with_one_key_create_one_application_each,
    another_user_sending_the_same_key_gets_their_own_new_result,
    bad_input_gets_a_4xx_problem_with_a_stable_code_and_never_a_5xx,
    jobs_are_listed_newest_first_with_a_before_cursor,
    dev_login_issues_a_token_that_applies_and_admin_status_shows_the_tree,
    dev_login_does_not_exist_when_it_is_off,
    a_charge_without_a_key_answers_400_idempotency_key_missing_and_writes_nothing,
    a_charge_is_created_once_replayed_on_retry_and_refused_on_key_reuse,
);
