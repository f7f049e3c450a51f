//! The store conformance suite: one story, told to each backend's `Store`
//! directly (no daemon, no HTTP, no actors), against a real PostgreSQL and a
//! real SQLite file. Keys (claim, in flight, replay, mismatch, release,
//! takeover of a lapsed lease), intake (a job, an application with its key,
//! the same application again), the relay's claim/publish/mark, a delivery
//! and its duplicate, a dead letter replayed and discarded, the audit and
//! the janitor: what one backend answers, the other must answer too.

use crate::support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use herald::broker::Envelope;
use herald::config::Config;
use herald::domain::{
    topics, Application, ApplicationSubmitted, EmailStatus, Job, JobChange, JobFilter, JobPatch,
    JobStatus,
};
use herald::idempotency::{Fingerprint, IdempotencyKey, KeyScope, StoredResponse};
use herald::store::postgres::PgStore;
use herald::store::sqlite::SqliteStore;
use herald::store::{
    ApplyOutcome, Consumer, DeliveryDecision, DeliveryResult, DlqAction, Effect, Invariant,
    KeyClaim, KeyClaimRequest, Relayed, Store,
};
use support::{eventually, Backend};
use uuid::Uuid;

/// A store of `backend` on throwaway storage, migrated; the guard keeps
/// the storage alive.
async fn open(backend: Backend) -> (Arc<dyn Store>, Box<dyn std::any::Any>) {
    match backend {
        Backend::Postgres => {
            let pg = support::Postgres::start().await;
            let config = Config::from_toml(&format!(
                "database_url = \"{}\"\nadmin_token = \"{}\"\njwt_secret = \"{}\"\n",
                pg.url(),
                support::ADMIN_TOKEN,
                support::JWT_SECRET
            ))
            .expect("config");
            let store = PgStore::connect(&config).await.expect("connect");
            store.migrate().await.expect("migrate");
            (Arc::new(store), Box::new(pg))
        }
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("tempdir");
            let config = Config::from_toml(&format!(
                "database_url = \"sqlite://{}\"\nstate_dir = \"{}\"\n",
                dir.path().join("herald.db").display(),
                dir.path().display()
            ))
            .expect("config");
            let store = SqliteStore::connect(&config).await.expect("connect");
            store.migrate().await.expect("migrate");
            (Arc::new(store), Box::new(dir))
        }
    }
}

fn claim(user: &str, key: &str, body: &serde_json::Value, lease: Duration) -> KeyClaimRequest {
    KeyClaimRequest {
        scope: KeyScope {
            principal: format!("user:{user}"),
            method: "POST",
            route: "/api/applications",
        },
        key: IdempotencyKey::parse(key.as_bytes()).expect("a valid key"),
        fingerprint: Fingerprint::of_request("POST", "/api/applications", body),
        lease,
        ttl: Duration::from_secs(3600),
        sent_at: Instant::now(),
    }
}

fn answer(status: u16, body: &str) -> StoredResponse {
    StoredResponse {
        status,
        body: body.to_string(),
    }
}

fn application(job: &Job, user: &str) -> Application {
    Application {
        id: Uuid::now_v7(),
        job_id: job.id,
        user_id: user.to_string(),
        email: format!("{user}@example.com"),
        resume_url: None,
        cover_letter: None,
        email_status: EmailStatus::Pending,
        created_at: chrono::Utc::now(),
    }
}

/// One relay step over `topic` (a fan-out topic for `job.posted`, as the
/// relay runs it) that publishes every row it is handed and returns their
/// envelopes.
async fn relay(store: &Arc<dyn Store>, topic: &str) -> Vec<Envelope> {
    let seen: Arc<Mutex<Vec<Envelope>>> = Arc::default();
    let keep = seen.clone();
    let publish = move |due: Vec<herald::store::DueEvent>| {
        let mut seen = keep.lock().unwrap();
        let answers = due
            .into_iter()
            .map(|d| {
                seen.push(d.envelope);
                Relayed::Published(format!("{}-0", seen.len()))
            })
            .collect();
        async move { Ok(answers) }.boxed()
    };
    let step = store
        .relay_due_events(
            topic,
            100,
            Duration::from_secs(60),
            topic == topics::JOB_POSTED,
            &publish,
        )
        .await
        .expect("relay step");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(step.claimed, seen.len());
    assert_eq!(step.published, seen.len());
    seen
}

/// The email consumer, as it hands itself to the store.
const EMAIL: Consumer = Consumer {
    name: "email",
    topic: topics::APPLICATION_SUBMITTED,
    effect: Effect::ApplicationEmail,
};

async fn deliver(
    store: &Arc<dyn Store>,
    envelope: &Envelope,
    decision: DeliveryDecision,
) -> DeliveryResult {
    let decide = move |_attempt: i32| {
        let decision = decision.clone();
        async move { decision }.boxed()
    };
    store
        .deliver_event(EMAIL, envelope, &decide)
        .await
        .expect("delivery recorded")
}

async fn the_store_tells_the_same_story(backend: Backend) {
    let (store, _storage) = open(backend).await;
    let body = serde_json::json!({"job_id": "x"});

    // Keys: new, in flight, completed -> replay, another body -> mismatch.
    let first = claim("ada", "key-1", &body, Duration::from_secs(30));
    let KeyClaim::New(lease) = store.claim_key(&first).await.unwrap() else {
        panic!("a free key is the caller's");
    };
    assert!(matches!(
        store.claim_key(&first).await.unwrap(),
        KeyClaim::InFlight
    ));
    store
        .complete_key(&lease, &answer(422, "{\"code\":\"x\"}"))
        .await
        .unwrap();
    match store.claim_key(&first).await.unwrap() {
        KeyClaim::Replay(response, _) => assert_eq!(response, answer(422, "{\"code\":\"x\"}")),
        other => panic!("a completed key replays: {other:?}"),
    }
    let other_body = claim(
        "ada",
        "key-1",
        &serde_json::json!({"job_id": "y"}),
        Duration::from_secs(30),
    );
    assert!(matches!(
        store.claim_key(&other_body).await.unwrap(),
        KeyClaim::Mismatch
    ));
    // Another principal's key of the same name is its own.
    assert!(matches!(
        store
            .claim_key(&claim("bob", "key-1", &body, Duration::from_secs(30)))
            .await
            .unwrap(),
        KeyClaim::New(_)
    ));

    // Release: a released key is free again at once.
    let released = claim("ada", "key-2", &body, Duration::from_secs(30));
    let KeyClaim::New(lease) = store.claim_key(&released).await.unwrap() else {
        panic!("new");
    };
    store.release_key(&lease).await.unwrap();
    assert!(matches!(
        store.claim_key(&released).await.unwrap(),
        KeyClaim::New(_)
    ));

    // Takeover: a holder whose lease lapsed loses the key to the next claim,
    // and can no longer complete it.
    let lapsing = claim("ada", "key-3", &body, Duration::from_millis(200));
    let KeyClaim::New(crashed) = store.claim_key(&lapsing).await.unwrap() else {
        panic!("new");
    };
    let taker = claim("ada", "key-3", &body, Duration::from_secs(30));
    eventually(
        "the lapsed lease taken over",
        Duration::from_secs(10),
        || {
            let store = store.clone();
            let taker = taker.clone();
            async move {
                match store.claim_key(&taker).await.unwrap() {
                    KeyClaim::New(_) => Some(()),
                    _ => None,
                }
            }
        },
    )
    .await;
    assert!(
        store
            .complete_key(&crashed, &answer(400, "{}"))
            .await
            .is_err(),
        "the old holder is fenced off"
    );

    // Intake: a job, then an application with its key in one transaction.
    let job = Job {
        id: Uuid::now_v7(),
        title: "Rust engineer".into(),
        company: "Acme".into(),
        location: "Remote".into(),
        description: "Effectively once".into(),
        posted_at: chrono::Utc::now(),
        status: JobStatus::Open,
        version: 1,
        updated_at: chrono::Utc::now(),
    };
    store
        .post_job(&job, None, &answer(201, "{}"))
        .await
        .unwrap();
    let listed = store
        .list_jobs(10, None, &JobFilter::default())
        .await
        .unwrap();
    assert_eq!(listed.iter().map(|j| j.id).collect::<Vec<_>>(), [job.id]);
    assert_eq!(
        store.get_job(job.id).await.unwrap().map(|j| j.title),
        Some(job.title.clone())
    );

    let keyed = claim("ada", "apply-1", &body, Duration::from_secs(30));
    let KeyClaim::New(lease) = store.claim_key(&keyed).await.unwrap() else {
        panic!("new");
    };
    let ada = application(&job, "ada");
    let response = answer(201, &ada.id.to_string());
    let outcome = store
        .submit_application(&ada, Some(&lease), &response)
        .await
        .unwrap();
    assert!(matches!(outcome, ApplyOutcome::Created(_)));
    match store.claim_key(&keyed).await.unwrap() {
        KeyClaim::Replay(replayed, _) => assert_eq!(replayed, response),
        other => panic!("the application's key replays its response: {other:?}"),
    }
    // The same user and job again, under a new key: the existing
    // application, nothing written, the key left to the caller.
    let again_key = claim("ada", "apply-2", &body, Duration::from_secs(30));
    let KeyClaim::New(again_lease) = store.claim_key(&again_key).await.unwrap() else {
        panic!("new");
    };
    let again = store
        .submit_application(
            &application(&job, "ada"),
            Some(&again_lease),
            &answer(201, "unused"),
        )
        .await
        .unwrap();
    match again {
        ApplyOutcome::AlreadyApplied(existing) => assert_eq!(existing.id, ada.id),
        other => panic!("one application per user and job: {other:?}"),
    }
    assert!(
        matches!(
            store.claim_key(&again_key).await.unwrap(),
            KeyClaim::InFlight
        ),
        "the key is still the caller's to complete"
    );
    let bob = application(&job, "bob");
    store
        .submit_application(&bob, None, &answer(201, "{}"))
        .await
        .unwrap();
    assert_eq!(
        store.outbox_stats().await.unwrap().pending,
        3,
        "job + 2 applications"
    );
    // Each user lists their own applications only.
    let listed = store.list_applications("ada", 10, None).await.unwrap();
    assert_eq!(listed.iter().map(|a| a.id).collect::<Vec<_>>(), [ada.id]);
    assert!(store
        .list_applications("ada", 10, Some(ada.id))
        .await
        .unwrap()
        .is_empty());
    // The audit's horizon reaches them: with no age allowed, all three are
    // unsettled too long (and, so far, nothing else is wrong).
    let audit = store
        .audit(
            &herald::actors::CONSUMERS,
            Duration::ZERO,
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
    assert!(
        audit.contains(&(Invariant::NoEventUnsettledTooLong, 3)),
        "{audit:?}"
    );
    assert_eq!(audit.iter().map(|(_, n)| n).sum::<i64>(), 3, "{audit:?}");

    // Relay: each due row once; published rows are not due again before
    // they are checked.
    assert_eq!(relay(&store, topics::JOB_POSTED).await.len(), 1);
    let envelopes = relay(&store, topics::APPLICATION_SUBMITTED).await;
    assert_eq!(envelopes.len(), 2);
    assert!(relay(&store, topics::APPLICATION_SUBMITTED)
        .await
        .is_empty());
    let copy_of = |id: Uuid| {
        envelopes
            .iter()
            .find(|e| e.payload["application_id"].as_str() == Some(&id.to_string()))
            .cloned()
            .unwrap_or_else(|| panic!("an event for {id}: {envelopes:?}"))
    };
    // Each backend stores the one payload shape, with the job's title and
    // company as they were when the user applied.
    for app in [&ada, &bob] {
        assert_eq!(
            serde_json::from_value::<ApplicationSubmitted>(copy_of(app.id).payload).unwrap(),
            ApplicationSubmitted::of(app, &job.title, &job.company)
        );
    }

    // Delivery: done once, a second copy is a duplicate.
    let ada_copy = copy_of(ada.id);
    assert!(matches!(
        deliver(&store, &ada_copy, DeliveryDecision::Done).await,
        DeliveryResult::Attempted {
            attempt: 1,
            decision: DeliveryDecision::Done
        }
    ));
    assert_eq!(
        deliver(&store, &ada_copy, DeliveryDecision::Done).await,
        DeliveryResult::Duplicate
    );
    let ada_now = store.get_application(ada.id, "ada").await.unwrap().unwrap();
    assert_eq!(ada_now.email_status, EmailStatus::Sent);
    assert!(
        store
            .get_application(ada.id, "bob")
            .await
            .unwrap()
            .is_none(),
        "only its user's"
    );

    // A dead letter: listed, replayed once, then closed to discarding.
    let bob_copy = copy_of(bob.id);
    deliver(
        &store,
        &bob_copy,
        DeliveryDecision::Dead {
            error: "refused".into(),
        },
    )
    .await;
    let email_status = |id: Uuid, user: &'static str| {
        let store = store.clone();
        async move {
            let application = store.get_application(id, user).await.unwrap();
            application.expect("the application").email_status
        }
    };
    assert_eq!(email_status(bob.id, "bob").await, EmailStatus::Dead);
    let letters = store.list_dead_letters(None, 10, None).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].event_id, bob_copy.event_id);
    let letter = letters[0].id;
    assert_eq!(store.dlq_stats().await.unwrap().len(), 1);
    assert_eq!(
        store.replay_dead_letter(letter, "test").await.unwrap(),
        DlqAction::Replayed
    );
    assert_eq!(
        store.replay_dead_letter(letter, "test").await.unwrap(),
        DlqAction::AlreadyReplayed
    );
    assert_eq!(
        store.discard_dead_letter(letter, "test").await.unwrap(),
        DlqAction::AlreadyReplayed
    );
    assert_eq!(
        store
            .discard_dead_letter(Uuid::now_v7(), "test")
            .await
            .unwrap(),
        DlqAction::NotFound
    );
    // The letter's effect is undone: the application waits again.
    assert_eq!(email_status(bob.id, "bob").await, EmailStatus::Pending);
    // The replayed event is due again, with a fresh attempt count.
    let replayed = relay(&store, topics::APPLICATION_SUBMITTED).await;
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0].event_id, bob_copy.event_id);
    assert!(matches!(
        deliver(&store, &replayed[0], DeliveryDecision::Done).await,
        DeliveryResult::Attempted {
            decision: DeliveryDecision::Done,
            ..
        }
    ));
    assert_eq!(email_status(bob.id, "bob").await, EmailStatus::Sent);

    // The audit: every invariant holds.
    let audit = store
        .audit(
            &herald::actors::CONSUMERS,
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
    assert_eq!(audit.len(), Invariant::ALL.len());
    assert!(audit.iter().all(|(_, n)| *n == 0), "{audit:?}");

    // The provider's reports: recorded once by their id; one about an email
    // no send has named waits as unknown.
    let report = herald::store::ProviderEvent {
        id: "msg_story".into(),
        kind: "email.delivered".into(),
        event: Some(herald::domain::EmailEvent::Delivered),
        email_id: Some("not-sent-yet".into()),
        detail: None,
    };
    assert_eq!(
        store.record_provider_event(&report).await.unwrap(),
        herald::store::Recorded::UnknownEmail
    );
    assert_eq!(
        store.record_provider_event(&report).await.unwrap(),
        herald::store::Recorded::Duplicate
    );

    // The janitor: with no retention, the settled rows and their inbox rows go.
    let purged = store.purge_expired(100, Duration::ZERO).await.unwrap();
    assert_eq!(purged.outbox, 3, "{purged:?}");
    assert_eq!(purged.inbox, 2, "{purged:?}");
    assert_eq!(store.outbox_stats().await.unwrap().pending, 0);
    // Reports too: the same id is new again once its row is gone.
    assert_eq!(
        store.record_provider_event(&report).await.unwrap(),
        herald::store::Recorded::UnknownEmail,
        "the janitor let the old report go"
    );
    // A copy of a purged event is gone, and nothing is delivered twice.
    assert_eq!(
        deliver(&store, &ada_copy, DeliveryDecision::Done).await,
        DeliveryResult::Gone
    );

    // A job's life: an edit spends a version and emits job.updated with the
    // whole job; an edit to what it already is changes nothing; a close
    // emits job.closed; a closed job takes no edit and no application and
    // leaves the list, but is still there by id. Filters: q a substring of
    // title, company or description; location and company equal; any case.
    let edit = |patch: JobPatch| JobChange::Edit(patch);
    let moved = store
        .change_job(
            job.id,
            &edit(JobPatch {
                location: Some("Berlin".into()),
                ..JobPatch::default()
            }),
            None,
            200,
        )
        .await
        .unwrap();
    assert_eq!((moved.location.as_str(), moved.version), ("Berlin", 2));
    assert!(moved.updated_at >= job.updated_at);
    let unchanged = store
        .change_job(
            job.id,
            &edit(JobPatch {
                title: Some(job.title.clone()),
                ..JobPatch::default()
            }),
            None,
            200,
        )
        .await
        .unwrap();
    assert_eq!(unchanged, moved, "an edit that changes nothing");
    let filtered = |q: Option<&str>, location: Option<&str>, company: Option<&str>| {
        let store = store.clone();
        let filter = JobFilter::from_pairs(
            [("q", q), ("location", location), ("company", company)]
                .into_iter()
                .filter_map(|(n, v)| v.map(|v| (n, v.to_string()))),
        )
        .unwrap();
        async move {
            store
                .list_jobs(10, None, &filter)
                .await
                .unwrap()
                .into_iter()
                .map(|j| j.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(filtered(Some("EFFECTIVELY"), None, None).await, [job.id]);
    assert_eq!(filtered(None, Some("berlin"), Some("acme")).await, [job.id]);
    assert!(filtered(None, Some("Remote"), None).await.is_empty());
    assert!(filtered(None, Some("berl"), None).await.is_empty());
    assert!(filtered(Some("engineeracme"), None, None).await.is_empty());
    let closed = store
        .change_job(job.id, &JobChange::Close, None, 200)
        .await
        .unwrap();
    assert_eq!((closed.status, closed.version), (JobStatus::Closed, 3));
    assert_eq!(
        store
            .change_job(job.id, &JobChange::Close, None, 200)
            .await
            .unwrap(),
        closed,
        "closing a closed job changes nothing"
    );
    assert!(matches!(
        store
            .change_job(
                job.id,
                &edit(JobPatch {
                    title: Some("Reopened?".into()),
                    ..JobPatch::default()
                }),
                None,
                200,
            )
            .await,
        Err(herald::store::StoreError::JobClosed)
    ));
    assert!(matches!(
        store
            .submit_application(&application(&job, "carol"), None, &answer(201, "{}"))
            .await,
        Err(herald::store::StoreError::JobClosed)
    ));
    assert!(
        filtered(None, None, None).await.is_empty(),
        "closed jobs leave the list"
    );
    assert_eq!(store.get_job(job.id).await.unwrap(), Some(closed.clone()));
    // Two changes, two events, in order, each carrying its version.
    let updated = relay(&store, topics::JOB_UPDATED).await;
    assert_eq!(updated.len(), 1);
    assert_eq!(updated[0].payload["before"]["location"], "Remote");
    assert_eq!(
        serde_json::from_value::<Job>(updated[0].payload.clone()).unwrap(),
        moved
    );
    let closings = relay(&store, topics::JOB_CLOSED).await;
    assert_eq!(closings.len(), 1);
    assert_eq!(
        serde_json::from_value::<Job>(closings[0].payload.clone()).unwrap(),
        closed
    );
    assert!(updated[0].event_id < closings[0].event_id);
    // A keyed close completes its key with the job as it now is.
    let close_key = claim("admin", "close-1", &body, Duration::from_secs(30));
    let KeyClaim::New(close_lease) = store.claim_key(&close_key).await.unwrap() else {
        panic!("new");
    };
    store
        .change_job(job.id, &JobChange::Close, Some(&close_lease), 200)
        .await
        .unwrap();
    match store.claim_key(&close_key).await.unwrap() {
        KeyClaim::Replay(replayed, _) => {
            assert_eq!(replayed.status, 200);
            assert_eq!(serde_json::from_str::<Job>(&replayed.body).unwrap(), closed);
        }
        other => panic!("the close's key replays the job: {other:?}"),
    }
}

on_both_backends!(the_store_tells_the_same_story);
