//! Jobs that change and close, against a real Herald on both backends: the
//! HTTP contract of `PATCH /api/jobs/{id}` and `POST /api/jobs/{id}/close`,
//! the list's filters, applying to a closed job, and a stream client's list
//! (built only by the stream's rules) converging to `GET /api/jobs`.

use crate::support;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use support::sse::SseClient;
use support::{user_token, Backend, Backing, ADMIN_TOKEN};

fn id(job: &Value) -> String {
    job["id"].as_str().expect("a job id").to_string()
}

async fn problem(r: reqwest::Response, status: u16, code: &str) {
    assert_eq!(r.status(), status);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
}

async fn editing_and_closing_follow_the_contract(backend: Backend) {
    let b = Backing::start(backend).await;
    let herald = b.daemon(&[]).await;
    let berlin = herald.post_job_at("Rust engineer", "Acme", "Berlin").await;
    let other = herald.post_job_at("Gardener", "Initech", "Paris").await;
    assert_eq!(
        (berlin["status"].as_str(), berlin["version"].as_i64()),
        (Some("open"), Some(1))
    );
    assert_eq!(berlin["updated_at"], berlin["posted_at"]);
    let path = format!("/api/jobs/{}", id(&berlin));

    // An edit: 200 with the job, one version on; replayed under its key.
    let edit = json!({"location": "Paris", "title": "Senior Rust engineer"});
    let r = herald
        .patch(&path, ADMIN_TOKEN, Some("edit-1"), &edit)
        .await;
    assert_eq!(r.status(), 200);
    let edited: Value = r.json().await.unwrap();
    assert_eq!(edited["version"], 2);
    assert_eq!(edited["location"], "Paris");
    assert_eq!(edited["company"], "Acme", "fields not named stay");
    let r = herald
        .patch(&path, ADMIN_TOKEN, Some("edit-1"), &edit)
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(r.json::<Value>().await.unwrap(), edited);
    // The same key for another edit is a reused key.
    let r = herald
        .patch(
            &path,
            ADMIN_TOKEN,
            Some("edit-1"),
            &json!({"location": "Rome"}),
        )
        .await;
    problem(r, 422, "idempotency_key_reused").await;
    // An edit to what it is already changes nothing: no version spent.
    let r = herald
        .patch(&path, ADMIN_TOKEN, None, &json!({"location": "Paris"}))
        .await;
    assert_eq!(r.json::<Value>().await.unwrap()["version"], 2);

    // Bad edits: a clear 4xx each, nothing changed.
    for (body, code) in [
        (json!({}), "invalid_body"),
        (json!({"salary": 1}), "invalid_body"),
        (json!({"title": "two\nlines"}), "invalid_body"),
        (json!({"location": ""}), "invalid_body"),
        (json!({"title": "t", "description": null}), "invalid_body"),
    ] {
        problem(
            herald.patch(&path, ADMIN_TOKEN, None, &body).await,
            400,
            code,
        )
        .await;
    }
    problem(
        herald
            .patch(&path, &user_token("mallory"), None, &edit)
            .await,
        401,
        "unauthorized",
    )
    .await;
    problem(
        herald
            .patch(
                &format!("/api/jobs/{}", uuid::Uuid::now_v7()),
                ADMIN_TOKEN,
                None,
                &edit,
            )
            .await,
        404,
        "job_not_found",
    )
    .await;
    let r = reqwest::Client::new()
        .delete(herald.url(&path))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, PATCH");

    // Filters, on the list: any case, AND-ed, q a substring.
    let both = HashMap::from([(id(&berlin), 2), (id(&other), 1)]);
    assert_eq!(herald.listed("location=PARIS").await, both);
    assert_eq!(
        herald.listed("location=paris&company=acme").await,
        HashMap::from([(id(&berlin), 2)])
    );
    assert_eq!(
        herald.listed("q=senior+RUST").await,
        HashMap::from([(id(&berlin), 2)])
    );
    assert_eq!(
        herald.listed("q=gardener%20at%20initech").await,
        HashMap::from([(id(&other), 1)])
    );
    assert!(herald.listed("location=Berlin").await.is_empty());
    assert_eq!(
        herald.listed("q=").await,
        both,
        "an empty q filters nothing"
    );
    problem(herald.get("/api/jobs?q=%01").await, 400, "invalid_query").await;

    // A close: 200 with the job; again: 200, unchanged.
    let close = format!("{path}/close");
    let r = herald
        .post(&close, ADMIN_TOKEN, Some("close-1"), &json!(null))
        .await;
    assert_eq!(r.status(), 200);
    let closed: Value = r.json().await.unwrap();
    assert_eq!(
        (closed["status"].as_str(), closed["version"].as_i64()),
        (Some("closed"), Some(3))
    );
    let r = herald.post(&close, ADMIN_TOKEN, None, &json!(null)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), closed);
    // Closed: off the list, still there by id; no edits, no applications.
    assert_eq!(herald.listed("").await, HashMap::from([(id(&other), 1)]));
    let r = herald.get(&path).await;
    assert_eq!(r.json::<Value>().await.unwrap(), closed);
    problem(
        herald.patch(&path, ADMIN_TOKEN, None, &edit).await,
        409,
        "job_closed",
    )
    .await;
    let applied = herald
        .apply(&user_token("ada"), None, &json!({"job_id": id(&berlin)}))
        .await;
    problem(applied, 409, "job_closed").await;
    let applied = herald
        .apply(&user_token("ada"), None, &json!({"job_id": id(&other)}))
        .await;
    assert_eq!(
        applied.status(),
        201,
        "the open job still takes applications"
    );
}

/// A client's list as id → version.
fn versions(client: &SseClient) -> HashMap<String, i64> {
    client
        .list()
        .into_iter()
        .map(|(id, (version, _))| (id, version))
        .collect()
}

/// Reads `client` until its list is `truth` (20 s at most), then asserts it.
async fn converge(client: &mut SseClient, truth: &HashMap<String, i64>, who: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while versions(client) != *truth && std::time::Instant::now() < deadline {
        client.next(Duration::from_millis(500)).await;
    }
    assert_eq!(versions(client), *truth, "{who}'s list");
}

/// Posts, edits and closes while one client watches from the start and
/// another resumes from before the changes: both lists, built by the
/// stream's rules alone, end equal to `GET /api/jobs` (ids and versions).
async fn a_stream_client_list_converges_to_the_list(backend: Backend) {
    let b = Backing::start(backend).await;
    let herald = b.daemon(&[]).await;
    let stream = herald.url("/api/jobs/stream");
    let first = herald.post_job_at("first", "Acme", "Berlin").await;
    let mut watcher = SseClient::connect(&stream, None).await;
    watcher
        .read_until("the first job", Duration::from_secs(15), |seen| {
            seen.iter()
                .any(|e| e.titles().contains(&"first".to_string()))
        })
        .await;
    let cursor = watcher.last_id().expect("an id");

    let mut jobs = vec![first];
    for n in 0..6 {
        jobs.push(
            herald
                .post_job_at(&format!("job-{n}"), "Acme", "Berlin")
                .await,
        );
    }
    for job in jobs.iter().step_by(2) {
        herald
            .edit_job(&id(job), &json!({"location": "Paris"}))
            .await;
    }
    for job in jobs.iter().skip(1).step_by(3) {
        herald.close_job(&id(job)).await;
    }
    let truth = herald.listed("").await;
    assert_eq!(truth.len(), 5, "7 posted, 2 closed: {truth:?}");
    assert!(truth.values().any(|v| *v == 2), "some edited: {truth:?}");

    // The late client connects once the watcher has every change: its
    // snapshot alone must then be the list.
    let mut resumed = SseClient::connect(&stream, Some(&cursor)).await;
    converge(&mut watcher, &truth, "watcher").await;
    converge(&mut resumed, &truth, "resumed").await;
    let mut late = SseClient::connect(&stream, None).await;
    converge(&mut late, &truth, "late").await;
    assert_eq!(
        late.seen
            .iter()
            .map(|e| e.event.as_str())
            .filter(|e| *e != "retry")
            .collect::<Vec<_>>(),
        ["snapshot"],
        "the late client needed nothing but its snapshot"
    );
    assert!(
        resumed.seen.iter().all(|e| e.event != "snapshot"),
        "the resume was within the history"
    );
    // (It is sent what its list needs only: a job posted and closed while
    // it was away need not reach it at all.)
    // The late client's snapshot already is the list: newest first.
    let snapshot = late
        .seen
        .iter()
        .find(|e| e.event == "snapshot")
        .expect("a snapshot");
    let data: Value = serde_json::from_str(&snapshot.data).unwrap();
    let ids: Vec<String> = data["jobs"].as_array().unwrap().iter().map(id).collect();
    let mut newest_first = ids.clone();
    newest_first.sort_by(|a, b| b.cmp(a));
    assert_eq!(ids, newest_first);
    // Nothing was sent twice: each (job, version) at most once per client.
    for (who, client) in [("watcher", &watcher), ("resumed", &resumed)] {
        let mut sent = std::collections::HashSet::new();
        for event in client.seen.iter().filter(|e| e.event.starts_with("job.")) {
            let data: Value = serde_json::from_str(&event.data).unwrap();
            let key = (id(&data), data["version"].as_i64().unwrap());
            assert!(sent.insert(key.clone()), "{who} got {key:?} twice");
        }
    }
}

/// docs/HTTP.md's filter example, run as written (with this daemon's
/// address for the README's): it finds exactly the Rust job in Berlin.
#[tokio::test]
async fn the_filter_example_in_the_http_reference_works_as_written() {
    let reference =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/HTTP.md")).unwrap();
    let command = reference
        .split("## Jobs that change")
        .nth(1)
        .and_then(|section| section.split("```sh\n").nth(1))
        .and_then(|block| block.split("```").next())
        .expect("the example in docs/HTTP.md");
    let b = Backing::start(Backend::Sqlite).await;
    let herald = b.daemon(&[]).await;
    let wanted = herald.post_job_at("Rust engineer", "Acme", "Berlin").await;
    herald.post_job_at("Go engineer", "Acme", "Berlin").await;
    herald.post_job_at("Rust engineer", "Acme", "Paris").await;
    let command = command.replace("http://127.0.0.1:8080", &herald.url(""));
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(&command)
        .output()
        .expect("run sh");
    assert!(out.status.success(), "{command}: {out:?}");
    let page: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<String> = page["items"].as_array().unwrap().iter().map(id).collect();
    assert_eq!(ids, [id(&wanted)]);
}

on_both_backends!(
    editing_and_closing_follow_the_contract,
    a_stream_client_list_converges_to_the_list
);
