//! The store conformance suite: named cases, one per store operation and
//! rule (as River's `riverdrivertest` runs its driver's), each run on both
//! backends directly (no daemon, no HTTP, no actors), against a real
//! PostgreSQL and a real SQLite file: keys, the unit of work and the use
//! cases over it (with Postgres' declared fast path of an application run
//! beside the general path on the same cases), the relay, delivery, dead
//! letters, the audit, the provider's reports and the janitor. What one
//! backend answers, the other must answer too.

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
    Admission, ApplyOutcome, AuditEntry, BatchDecision, BatchToSend, Consumer, DeliveryDecision,
    DeliveryResult, DlqAction, Effect, Invariant, KeyClaim, KeyClaimRequest, KeyLease,
    MemberOutcome, Relayed, Store, StoreError,
};
use herald::use_cases;
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

fn job(title: &str) -> Job {
    // To the microsecond, as both backends keep instants.
    let now = chrono::SubsecRound::trunc_subsecs(chrono::Utc::now(), 6);
    Job {
        id: Uuid::now_v7(),
        title: title.into(),
        company: "Acme".into(),
        location: "Remote".into(),
        description: "Effectively once".into(),
        posted_at: now,
        status: JobStatus::Open,
        version: 1,
        updated_at: now,
    }
}

/// Posts `job` as the use case does, in a unit of its own.
async fn post(store: &Arc<dyn Store>, job: &Job) {
    let posted = job.clone();
    support::in_unit(store, None, &answer(201, "{}"), |tx| {
        Box::pin(async move { use_cases::post_job(tx, &posted).await })
    })
    .await
    .expect("job posted");
}

/// The two ways an application is written: the use case as the daemon runs
/// it (Postgres' declared one-statement fast path; SQLite has none), and
/// its general path, one unit-of-work operation at a time.
#[derive(Debug, Clone, Copy)]
enum ApplyPath {
    AsTheDaemonDoes,
    InSteps,
}

const PATHS: [ApplyPath; 2] = [ApplyPath::AsTheDaemonDoes, ApplyPath::InSteps];

/// Applies `application` by `path` in a unit opened for `key`; commits it
/// as the idempotency protocol does: with the 201 when it was created,
/// with the existing application when it was not.
async fn apply(
    store: &Arc<dyn Store>,
    path: ApplyPath,
    application: &Application,
    key: Option<KeyLease>,
) -> Result<ApplyOutcome, StoreError> {
    let created = answer(201, &application.id.to_string());
    let mut unit = store.begin(key).await?;
    let outcome = match path {
        ApplyPath::AsTheDaemonDoes => {
            use_cases::submit_application(&mut *unit, application, &created).await?
        }
        ApplyPath::InSteps => {
            use_cases::submit_application_in_steps(&mut *unit, application).await?
        }
    };
    let answered = match &outcome {
        ApplyOutcome::Created(_) => created,
        ApplyOutcome::AlreadyApplied(existing) => answer(200, &existing.id.to_string()),
    };
    unit.commit(&answered).await?;
    Ok(outcome)
}

/// Claims `key` for `user` (a new claim, or the test fails).
async fn lease(store: &Arc<dyn Store>, user: &str, key: &str) -> KeyLease {
    let body = serde_json::json!({"key": key});
    match store
        .claim_key(&claim(user, key, &body, Duration::from_secs(30)))
        .await
        .unwrap()
    {
        KeyClaim::New(lease) => lease,
        other => panic!("a free key is the caller's: {other:?}"),
    }
}

/// What the database answers for `user`'s `key` now.
async fn replay_of(store: &Arc<dyn Store>, user: &str, key: &str) -> KeyClaim {
    let body = serde_json::json!({"key": key});
    store
        .claim_key(&claim(user, key, &body, Duration::from_secs(30)))
        .await
        .unwrap()
}

/// Two applications to a job, ada's and bob's, with their events (and
/// the job's).
struct Seeded {
    ada: Application,
    bob: Application,
}

/// The copy of `application`'s `application.submitted` event among `envelopes`.
fn copy_of(envelopes: &[Envelope], application: &Application) -> Envelope {
    envelopes
        .iter()
        .find(|e| e.payload["application_id"] == application.id.to_string())
        .cloned()
        .unwrap_or_else(|| panic!("an event for {}: {envelopes:?}", application.id))
}

/// An audit (an hour's age allowed) that finds every invariant holding.
async fn every_invariant_holds(store: &Arc<dyn Store>) {
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
}

async fn seed(store: &Arc<dyn Store>) -> Seeded {
    let job = job("Rust engineer");
    post(store, &job).await;
    let (ada, bob) = (application(&job, "ada"), application(&job, "bob"));
    for app in [&ada, &bob] {
        apply(store, ApplyPath::AsTheDaemonDoes, app, None)
            .await
            .expect("applied");
    }
    Seeded { ada, bob }
}

async fn a_free_key_is_claimed_then_in_flight_then_replayed_and_another_body_is_refused(
    backend: Backend,
) {
    let (store, _storage) = open(backend).await;
    let body = serde_json::json!({"job_id": "x"});
    let first = claim("ada", "key-1", &body, Duration::from_secs(30));
    let KeyClaim::New(lease) = store.claim_key(&first).await.unwrap() else {
        panic!("a free key is the caller's");
    };
    assert!(matches!(
        store.claim_key(&first).await.unwrap(),
        KeyClaim::InFlight
    ));
    // A unit that wrote nothing completes the key with its answer (a 4xx).
    let unit = store.begin(Some(lease)).await.unwrap();
    unit.commit(&answer(422, "{\"code\":\"x\"}")).await.unwrap();
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
}

async fn a_released_key_is_free_again_at_once(backend: Backend) {
    let (store, _storage) = open(backend).await;
    let lease = lease(&store, "ada", "key-2").await;
    store.release_key(&lease).await.unwrap();
    assert!(matches!(
        replay_of(&store, "ada", "key-2").await,
        KeyClaim::New(_)
    ));
}

async fn a_lapsed_lease_is_taken_over_and_its_old_holder_writes_nothing(backend: Backend) {
    let (store, _storage) = open(backend).await;
    let body = serde_json::json!({"key": "key-3"});
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
    // The old holder's unit: its commit is fenced off, and its job and
    // event are rolled back with it.
    let late = job("Written too late");
    let posted = late.clone();
    let result = support::in_unit(&store, Some(crashed), &answer(201, "{}"), |tx| {
        Box::pin(async move { use_cases::post_job(tx, &posted).await })
    })
    .await;
    assert!(matches!(result, Err(StoreError::LeaseLost)), "{result:?}");
    assert_eq!(store.get_job(late.id).await.unwrap(), None);
    assert_eq!(store.outbox_stats().await.unwrap().pending, 0);
}

async fn a_unit_dropped_without_commit_writes_nothing(backend: Backend) {
    let (store, _storage) = open(backend).await;
    let dropped = job("Never committed");
    let mut unit = store.begin(None).await.unwrap();
    use_cases::post_job(&mut *unit, &dropped).await.unwrap();
    drop(unit);
    // The next unit finds its connection clean (its rollback ran first).
    let kept = job("Committed");
    post(&store, &kept).await;
    assert_eq!(store.get_job(dropped.id).await.unwrap(), None);
    assert_eq!(
        store.get_job(kept.id).await.unwrap().map(|j| j.id),
        Some(kept.id)
    );
    assert_eq!(store.outbox_stats().await.unwrap().pending, 1);
}

async fn a_posted_job_is_listed_with_its_event(backend: Backend) {
    let (store, _storage) = open(backend).await;
    let job = job("Rust engineer");
    post(&store, &job).await;
    let listed = store
        .list_jobs(10, None, &JobFilter::default())
        .await
        .unwrap();
    assert_eq!(listed.iter().map(|j| j.id).collect::<Vec<_>>(), [job.id]);
    assert_eq!(store.get_job(job.id).await.unwrap(), Some(job.clone()));
    let posted = relay(&store, topics::JOB_POSTED).await;
    assert_eq!(posted.len(), 1);
    assert_eq!(
        serde_json::from_value::<Job>(posted[0].payload.clone()).unwrap(),
        job
    );
}

async fn an_application_is_written_once_with_its_event_and_its_key_on_either_path(
    backend: Backend,
) {
    let (store, _storage) = open(backend).await;
    let mut seen = Vec::new();
    for (n, path) in PATHS.into_iter().enumerate() {
        let job = job(&format!("Job {n}"));
        post(&store, &job).await;
        let ada = application(&job, "ada");
        let key = format!("apply-{n}");
        let outcome = apply(&store, path, &ada, Some(lease(&store, "ada", &key).await))
            .await
            .unwrap();
        assert!(matches!(outcome, ApplyOutcome::Created(_)), "{path:?}");
        match replay_of(&store, "ada", &key).await {
            KeyClaim::Replay(replayed, _) => {
                assert_eq!(replayed, answer(201, &ada.id.to_string()), "{path:?}")
            }
            other => panic!("{path:?}: the key replays the 201: {other:?}"),
        }
        // The same user and job under a new key: the existing application,
        // nothing written, the key completed with that answer.
        let again_key = format!("again-{n}");
        let again = application(&job, "ada");
        let again_lease = lease(&store, "ada", &again_key).await;
        match apply(&store, path, &again, Some(again_lease))
            .await
            .unwrap()
        {
            ApplyOutcome::AlreadyApplied(existing) => assert_eq!(existing.id, ada.id),
            other => panic!("{path:?}: one application per user and job: {other:?}"),
        }
        match replay_of(&store, "ada", &again_key).await {
            KeyClaim::Replay(replayed, _) => {
                assert_eq!(replayed, answer(200, &ada.id.to_string()), "{path:?}")
            }
            other => panic!("{path:?}: the existing application is the key's: {other:?}"),
        }
        let events = relay(&store, topics::APPLICATION_SUBMITTED).await;
        assert_eq!(events.len(), 1, "{path:?}: one event, for the new one");
        let payload: ApplicationSubmitted =
            serde_json::from_value(events[0].payload.clone()).unwrap();
        assert_eq!(
            payload,
            ApplicationSubmitted::of(&ada, &job.title, &job.company)
        );
        let stored = store.get_application(ada.id, "ada").await.unwrap().unwrap();
        seen.push((
            stored.email_status,
            events[0].payload["application_id"] == ada.id.to_string(),
        ));
    }
    // Both paths leave the same rows behind.
    assert_eq!(seen[0], seen[1]);
    assert_eq!(seen[0], (EmailStatus::Pending, true));
}

async fn an_application_to_a_missing_or_closed_job_or_under_a_lost_key_writes_nothing(
    backend: Backend,
) {
    let (store, _storage) = open(backend).await;
    let job = job("Closing soon");
    post(&store, &job).await;
    let before = store.outbox_stats().await.unwrap().pending;
    for path in PATHS {
        let missing = application(&self::job("Never posted"), "ada");
        assert!(
            matches!(
                apply(&store, path, &missing, None).await,
                Err(StoreError::JobNotFound)
            ),
            "{path:?}"
        );
        // A key released (or taken over) before the write: nothing lands.
        let lost = lease(&store, "ada", &format!("lost-{path:?}")).await;
        store.release_key(&lost).await.unwrap();
        let result = apply(&store, path, &application(&job, "ada"), Some(lost)).await;
        assert!(
            matches!(result, Err(StoreError::LeaseLost)),
            "{path:?}: {result:?}"
        );
        assert!(store
            .list_applications("ada", 10, None)
            .await
            .unwrap()
            .is_empty());
    }
    let closed = job.id;
    support::in_unit(&store, None, &answer(200, "{}"), |tx| {
        Box::pin(async move { use_cases::change_job(tx, closed, &JobChange::Close).await })
    })
    .await
    .unwrap();
    for path in PATHS {
        assert!(
            matches!(
                apply(&store, path, &application(&job, "carol"), None).await,
                Err(StoreError::JobClosed)
            ),
            "{path:?}"
        );
    }
    // Only the close's event was added.
    assert_eq!(store.outbox_stats().await.unwrap().pending, before + 1);
}

async fn each_user_lists_only_their_own_applications(backend: Backend) {
    let (store, _storage) = open(backend).await;
    let Seeded { ada, .. } = seed(&store).await;
    let listed = store.list_applications("ada", 10, None).await.unwrap();
    assert_eq!(listed.iter().map(|a| a.id).collect::<Vec<_>>(), [ada.id]);
    assert!(store
        .list_applications("ada", 10, Some(ada.id))
        .await
        .unwrap()
        .is_empty());
    assert!(
        store
            .get_application(ada.id, "bob")
            .await
            .unwrap()
            .is_none(),
        "only its user's"
    );
}

async fn the_relay_hands_over_each_due_event_once(backend: Backend) {
    let (store, _storage) = open(backend).await;
    seed(&store).await;
    assert_eq!(relay(&store, topics::JOB_POSTED).await.len(), 1);
    assert_eq!(relay(&store, topics::APPLICATION_SUBMITTED).await.len(), 2);
    assert!(relay(&store, topics::APPLICATION_SUBMITTED)
        .await
        .is_empty());
}

async fn a_delivery_is_done_once_and_its_copy_is_a_duplicate(backend: Backend) {
    let (store, _storage) = open(backend).await;
    let Seeded { ada, .. } = seed(&store).await;
    let envelopes = relay(&store, topics::APPLICATION_SUBMITTED).await;
    let copy = copy_of(&envelopes, &ada);
    assert!(matches!(
        deliver(&store, &copy, DeliveryDecision::Done).await,
        DeliveryResult::Attempted {
            attempt: 1,
            decision: DeliveryDecision::Done
        }
    ));
    assert_eq!(
        deliver(&store, &copy, DeliveryDecision::Done).await,
        DeliveryResult::Duplicate
    );
    let now = store.get_application(ada.id, "ada").await.unwrap().unwrap();
    assert_eq!(now.email_status, EmailStatus::Sent);
}

async fn a_dead_letter_is_replayed_once_and_then_closed_to_discarding(backend: Backend) {
    let (store, _storage) = open(backend).await;
    let Seeded { bob, .. } = seed(&store).await;
    let envelopes = relay(&store, topics::APPLICATION_SUBMITTED).await;
    let copy = copy_of(&envelopes, &bob);
    deliver(
        &store,
        &copy,
        DeliveryDecision::Dead {
            error: "refused".into(),
        },
    )
    .await;
    let email_status = || {
        let store = store.clone();
        async move {
            let application = store.get_application(bob.id, "bob").await.unwrap();
            application.expect("the application").email_status
        }
    };
    assert_eq!(email_status().await, EmailStatus::Dead);
    let letters = store.list_dead_letters(None, 10, None).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].event_id, copy.event_id);
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
    // The letter's effect is undone, and its event is due again with a
    // fresh attempt count.
    assert_eq!(email_status().await, EmailStatus::Pending);
    let replayed = relay(&store, topics::APPLICATION_SUBMITTED).await;
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0].event_id, copy.event_id);
    assert!(matches!(
        deliver(&store, &replayed[0], DeliveryDecision::Done).await,
        DeliveryResult::Attempted {
            decision: DeliveryDecision::Done,
            ..
        }
    ));
    assert_eq!(email_status().await, EmailStatus::Sent);
}

async fn the_audit_sees_unsettled_events_and_then_that_every_invariant_holds(backend: Backend) {
    let (store, _storage) = open(backend).await;
    seed(&store).await;
    // With no age allowed, all three events are unsettled too long (and,
    // so far, nothing else is wrong).
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
    relay(&store, topics::JOB_POSTED).await;
    for copy in relay(&store, topics::APPLICATION_SUBMITTED).await {
        deliver(&store, &copy, DeliveryDecision::Done).await;
    }
    every_invariant_holds(&store).await;
}

async fn a_provider_report_is_recorded_once_and_the_janitor_lets_it_go(backend: Backend) {
    let (store, _storage) = open(backend).await;
    let Seeded { ada, .. } = seed(&store).await;
    relay(&store, topics::JOB_POSTED).await;
    let envelopes = relay(&store, topics::APPLICATION_SUBMITTED).await;
    for copy in &envelopes {
        deliver(&store, copy, DeliveryDecision::Done).await;
    }
    // Recorded once by its id; one about an email no send has named waits
    // as unknown.
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
    let ada_copy = &copy_of(&envelopes, &ada);
    assert_eq!(
        deliver(&store, ada_copy, DeliveryDecision::Done).await,
        DeliveryResult::Gone
    );
}

/// Changes job `id` as the use case does, in a unit of its own.
async fn change(store: &Arc<dyn Store>, id: Uuid, change: JobChange) -> Result<Job, StoreError> {
    support::in_unit(store, None, &answer(200, "{}"), |tx| {
        Box::pin(async move { use_cases::change_job(tx, id, &change).await })
    })
    .await
}

async fn a_job_edit_spends_a_version_and_a_close_is_final(backend: Backend) {
    let (store, _storage) = open(backend).await;
    let job = job("Rust engineer");
    post(&store, &job).await;
    let edit = |patch: JobPatch| JobChange::Edit(patch);
    let moved = change(
        &store,
        job.id,
        edit(JobPatch {
            location: Some("Berlin".into()),
            ..JobPatch::default()
        }),
    )
    .await
    .unwrap();
    assert_eq!((moved.location.as_str(), moved.version), ("Berlin", 2));
    assert!(moved.updated_at >= job.updated_at);
    let unchanged = change(
        &store,
        job.id,
        edit(JobPatch {
            title: Some(job.title.clone()),
            ..JobPatch::default()
        }),
    )
    .await
    .unwrap();
    assert_eq!(unchanged, moved, "an edit that changes nothing");
    let closed = change(&store, job.id, JobChange::Close).await.unwrap();
    assert_eq!((closed.status, closed.version), (JobStatus::Closed, 3));
    assert_eq!(
        change(&store, job.id, JobChange::Close).await.unwrap(),
        closed,
        "closing a closed job changes nothing"
    );
    assert!(matches!(
        change(
            &store,
            job.id,
            edit(JobPatch {
                title: Some("Reopened?".into()),
                ..JobPatch::default()
            }),
        )
        .await,
        Err(StoreError::JobClosed)
    ));
    assert!(matches!(
        change(&store, Uuid::now_v7(), JobChange::Close).await,
        Err(StoreError::JobNotFound)
    ));
    assert!(
        store
            .list_jobs(10, None, &JobFilter::default())
            .await
            .unwrap()
            .is_empty(),
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
}

async fn the_job_filters_match_text_location_and_company_in_any_case(backend: Backend) {
    let (store, _storage) = open(backend).await;
    let job = job("Rust engineer");
    post(&store, &job).await;
    let moved = change(
        &store,
        job.id,
        JobChange::Edit(JobPatch {
            location: Some("Berlin".into()),
            ..JobPatch::default()
        }),
    )
    .await
    .unwrap();
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
    assert_eq!(filtered(Some("EFFECTIVELY"), None, None).await, [moved.id]);
    assert_eq!(
        filtered(None, Some("berlin"), Some("acme")).await,
        [moved.id]
    );
    assert!(filtered(None, Some("Remote"), None).await.is_empty());
    assert!(filtered(None, Some("berl"), None).await.is_empty());
    assert!(filtered(Some("engineeracme"), None, None).await.is_empty());
}

async fn a_keyed_close_completes_its_key_with_the_job_as_it_now_is(backend: Backend) {
    let (store, _storage) = open(backend).await;
    let job = job("Closing");
    post(&store, &job).await;
    let close_lease = lease(&store, "admin", "close-1").await;
    let id = job.id;
    let mut unit = store.begin(Some(close_lease)).await.unwrap();
    let closed = use_cases::change_job(&mut *unit, id, &JobChange::Close)
        .await
        .unwrap();
    unit.commit(&StoredResponse::json(200, &closed))
        .await
        .unwrap();
    match replay_of(&store, "admin", "close-1").await {
        KeyClaim::Replay(replayed, _) => {
            assert_eq!(replayed.status, 200);
            assert_eq!(serde_json::from_str::<Job>(&replayed.body).unwrap(), closed);
        }
        other => panic!("the close's key replays the job: {other:?}"),
    }
}

async fn a_charge_is_written_with_its_event_and_its_key(backend: Backend) {
    let (store, _storage) = open(backend).await;
    let charge = herald::domain::Charge {
        id: Uuid::now_v7(),
        user_id: "ada".into(),
        amount_cents: 4_900,
        currency: "EUR".into(),
        description: "Featured listing".into(),
        ledger_status: herald::domain::LedgerStatus::Pending,
        created_at: chrono::Utc::now(),
    };
    let key = lease(&store, "ada", "charge-1").await;
    let written = charge.clone();
    let created = StoredResponse::json(201, &charge);
    support::in_unit(&store, Some(key), &created, |tx| {
        Box::pin(async move { use_cases::create_charge(tx, &written).await })
    })
    .await
    .unwrap();
    let stored = store.get_charge(charge.id, "ada").await.unwrap().unwrap();
    assert_eq!((stored.id, stored.amount_cents), (charge.id, 4_900));
    assert!(store.get_charge(charge.id, "bob").await.unwrap().is_none());
    let events = relay(&store, topics::CHARGE_CREATED).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].payload["user_id"], "ada");
    assert!(matches!(
        replay_of(&store, "ada", "charge-1").await,
        KeyClaim::Replay(replayed, _) if replayed == created
    ));
}

async fn an_operator_s_change_is_audited_with_it_and_dead_letter_actions_too(backend: Backend) {
    let (store, _storage) = open(backend).await;
    let entry = |action: &str, subject: Uuid, actor: &str| AuditEntry {
        action: action.into(),
        subject: subject.to_string(),
        detail: "{}".into(),
        actor: actor.into(),
    };
    // A change and its audit line commit together...
    let posted = job("Audited");
    let line = entry("job.post", posted.id, "ada");
    let (job_in_unit, line_in_unit) = (posted.clone(), line.clone());
    support::in_unit(&store, None, &answer(201, "{}"), |tx| {
        Box::pin(async move {
            use_cases::post_job(tx, &job_in_unit).await?;
            tx.audit(&line_in_unit).await
        })
    })
    .await
    .expect("posted and audited");
    // ... and a unit dropped without commit leaves neither.
    let dropped = job("Never posted");
    let mut unit = store.begin(None).await.unwrap();
    use_cases::post_job(&mut *unit, &dropped).await.unwrap();
    unit.audit(&entry("job.post", dropped.id, "grace"))
        .await
        .unwrap();
    drop(unit);
    // A dead letter's replay is on the same trail, newest first.
    let Seeded { bob, .. } = seed(&store).await;
    let envelopes = relay(&store, topics::APPLICATION_SUBMITTED).await;
    let copy = copy_of(&envelopes, &bob);
    let dead = DeliveryDecision::Dead {
        error: "refused".into(),
    };
    deliver(&store, &copy, dead).await;
    let letter = store.list_dead_letters(None, 10, None).await.unwrap()[0].id;
    store
        .replay_dead_letter(letter, "ada (note: on call)")
        .await
        .unwrap();
    let trail: Vec<AuditEntry> = store
        .recent_audit(10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.entry)
        .collect();
    assert_eq!(
        trail,
        [entry("dlq.replay", letter, "ada (note: on call)"), line],
        "{trail:?}"
    );
    assert_eq!(store.recent_audit(1).await.unwrap().len(), 1);
}

/// Four batches of ten, sent at once (each send waits until all four are
/// in flight, so their settles overlap): every member settles with its own
/// outcome in its batch's few statements, one member of each batch is
/// dead-lettered alone, and the effect counters `/metrics` reads equal the
/// rows they count.
async fn batches_settling_at_once_each_write_their_members_and_the_counters_stay_exact(
    backend: Backend,
) {
    let (store, _storage) = open(backend).await;
    let job = job("Rust engineer");
    post(&store, &job).await;
    let mut applications = Vec::new();
    for i in 0..40 {
        let app = application(&job, &format!("user-{i}"));
        apply(&store, ApplyPath::AsTheDaemonDoes, &app, None)
            .await
            .expect("applied");
        applications.push(app);
    }
    let envelopes = relay(&store, topics::APPLICATION_SUBMITTED).await;
    assert_eq!(envelopes.len(), 40);
    for chunk in envelopes.chunks(10) {
        let admitted = store
            .form_batch(EMAIL, Uuid::now_v7(), chunk)
            .await
            .expect("formed");
        assert!(
            admitted.iter().all(|a| *a == Admission::Member),
            "{admitted:?}"
        );
    }
    let in_flight = Arc::new(tokio::sync::Barrier::new(4));
    let send = move |batch: BatchToSend| {
        let in_flight = in_flight.clone();
        async move {
            in_flight.wait().await;
            // The first member of each batch is refused; the rest are sent.
            let answers = batch
                .members
                .iter()
                .enumerate()
                .map(|(i, member)| match i {
                    0 => MemberOutcome::Dead {
                        error: "422 invalid recipient".into(),
                    },
                    _ => MemberOutcome::Done {
                        provider_id: Some(format!("re_{}", member.event_id)),
                    },
                })
                .collect();
            BatchDecision::Answered(answers)
        }
        .boxed()
    };
    let settles = (0..4).map(|_| store.send_due_batch(EMAIL, &send));
    let results = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(settles))
        .await
        .expect("four batches settle at once, none waits for another");
    for result in results {
        let result = result.expect("settled").expect("a batch was due");
        assert_eq!(result.members, 10);
    }
    let mut sent = 0;
    for app in &applications {
        let now = store
            .get_application(app.id, &app.user_id)
            .await
            .unwrap()
            .unwrap();
        match now.email_status {
            EmailStatus::Sent => sent += 1,
            EmailStatus::Dead => {}
            other => panic!("{} is {other:?}", app.id),
        }
    }
    assert_eq!(sent, 36);
    assert_eq!(
        store
            .list_dead_letters(None, 100, None)
            .await
            .unwrap()
            .len(),
        4
    );
    assert_eq!(store.outbox_stats().await.unwrap().emails_delivered, 36);
    // A replayed letter that is then delivered moves the counter by one.
    let letter = store.list_dead_letters(None, 1, None).await.unwrap()[0].id;
    store.replay_dead_letter(letter, "test").await.unwrap();
    let replayed = relay(&store, topics::APPLICATION_SUBMITTED).await;
    deliver(&store, &replayed[0], DeliveryDecision::Done).await;
    assert_eq!(store.outbox_stats().await.unwrap().emails_delivered, 37);
    every_invariant_holds(&store).await;
}

/// A `q` page reads the newest thousand open jobs first, then as many more
/// as their rate of matches promises, and the text index below them: across
/// those lines, pages (a cursor each) list every match once, newest first,
/// as a full reading would; short terms and characters LIKE would read as
/// wildcards match only themselves.
async fn a_text_search_pages_through_the_newest_jobs_and_the_index_alike(backend: Backend) {
    let (store, _storage) = open(backend).await;
    let mut posted = Vec::new();
    // 5,100 jobs, one unit. Needles: two in the first window (the newest
    // 1,000), one in the further window (the 4,000 below it), two below
    // both, for the index.
    let mut unit = store.begin(None).await.unwrap();
    for i in 0..5100 {
        let mut job = job(&format!("Job {i}"));
        job.description = match i {
            7 | 50 | 2000 | 4500 | 5000 => format!("needle 100%_ off #{i}"),
            _ => format!("hay #{i}"),
        };
        use_cases::post_job(&mut *unit, &job).await.unwrap();
        posted.push(job.id);
    }
    unit.commit(&answer(201, "{}")).await.unwrap();
    let pages = |q: &'static str, limit: u32| {
        let store = store.clone();
        async move {
            let filter = JobFilter::from_pairs([("q", q.to_string())]).unwrap();
            let (mut all, mut before, mut pages) = (Vec::new(), None, 0);
            loop {
                let page = store.list_jobs(limit, before, &filter).await.unwrap();
                pages += 1;
                all.extend(page.iter().map(|j| j.id));
                if page.len() < limit as usize {
                    return (all, pages);
                }
                before = page.last().map(|j| j.id);
            }
        }
    };
    let expected = [
        posted[5000],
        posted[4500],
        posted[2000],
        posted[50],
        posted[7],
    ];
    // Three a page: two from the first window and one from the further
    // window, then (below #2000 the next window holds none) two from the
    // index.
    let (found, pages_read) = pages("needle", 3).await;
    assert_eq!(found, expected);
    assert_eq!(pages_read, 2);
    // Four: the further window holds only one, the index gives the fourth.
    let (found, pages_read) = pages("needle", 4).await;
    assert_eq!(found, expected);
    assert_eq!(pages_read, 2);
    let (found, pages_read) = pages("needle", 1).await;
    assert_eq!(found, expected);
    assert_eq!(pages_read, 6);
    assert_eq!(
        pages("100%_", 10).await.0,
        expected,
        "% and _ are themselves"
    );
    assert!(pages("100%x", 10).await.0.is_empty());
    assert_eq!(
        pages("#7", 10).await.0.len(),
        1 + 10 + 100,
        "a short term, by reading"
    );
}

on_both_backends!(
    a_free_key_is_claimed_then_in_flight_then_replayed_and_another_body_is_refused,
    a_released_key_is_free_again_at_once,
    a_lapsed_lease_is_taken_over_and_its_old_holder_writes_nothing,
    a_unit_dropped_without_commit_writes_nothing,
    a_posted_job_is_listed_with_its_event,
    an_application_is_written_once_with_its_event_and_its_key_on_either_path,
    an_application_to_a_missing_or_closed_job_or_under_a_lost_key_writes_nothing,
    each_user_lists_only_their_own_applications,
    the_relay_hands_over_each_due_event_once,
    a_delivery_is_done_once_and_its_copy_is_a_duplicate,
    a_dead_letter_is_replayed_once_and_then_closed_to_discarding,
    the_audit_sees_unsettled_events_and_then_that_every_invariant_holds,
    a_provider_report_is_recorded_once_and_the_janitor_lets_it_go,
    a_job_edit_spends_a_version_and_a_close_is_final,
    the_job_filters_match_text_location_and_company_in_any_case,
    a_keyed_close_completes_its_key_with_the_job_as_it_now_is,
    a_charge_is_written_with_its_event_and_its_key,
    an_operator_s_change_is_audited_with_it_and_dead_letter_actions_too,
    batches_settling_at_once_each_write_their_members_and_the_counters_stay_exact,
    a_text_search_pages_through_the_newest_jobs_and_the_index_alike,
);
