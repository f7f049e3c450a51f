//! Each actor in process (the supervisor and the SseHub too), unchanged,
//! behind [`testable::Testable`] (which reports every message it handled):
//! no daemon and no HTTP, but real parts around it — a
//! real Redis for the KeyRegistry, a real SQLite store and the in-process
//! broker for the pipeline. Outcomes are read where they land: the store,
//! the broker, the process's metrics.

use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::actors::auditor::{Auditor, AuditorArgs};
use herald::actors::consumer::{ConsumerActor, ConsumerArgs, PoolArgs};
use herald::actors::dlq_monitor::{DlqMonitor, DlqMonitorArgs};
use herald::actors::email_sender::{EmailSender, EmailSenderArgs};
use herald::actors::janitor::{Janitor, JanitorArgs};
use herald::actors::key_registry::{KeyRegistry, KeyRegistryArgs};
use herald::actors::ledger::LedgerConsumer;
use herald::actors::outbox_relay::{OutboxRelay, OutboxRelayArgs};
use herald::actors::periodic::Tick;
use herald::actors::retry_budget::{
    RetryBudget, RetryBudgetArgs, RetryBudgetHandle, RetryBudgetMsg, TokensView,
};
use herald::actors::sse_hub::{
    BoardSize, CatchUp, ClientQueue, Next, SseHub, SseHubArgs, SseHubMsg,
};
use herald::actors::supervisor::{Child, HeraldSupervisor, SlotChild, MAX_RESTARTS_PER_MINUTE};
use herald::actors::ActorSlot;
use herald::broker::in_process::InProcessBroker;
use herald::broker::{Broker, Envelope};
use herald::config::{Config, RedisConfig};
use herald::domain::{
    topics, Application, Charge, EmailStatus, Job, JobFilter, JobStatus, LedgerStatus,
};
use herald::email::file::FileTransport;
use herald::email::SendPacer;
use herald::idempotency::hot_tier::{HotTier, RedisMode};
use herald::idempotency::{Fingerprint, IdempotencyKey, KeyScope, StoredResponse};
use herald::retry::RetryPolicy;
use herald::store::sqlite::SqliteStore;
use herald::store::{KeyClaim, KeyClaimRequest, Store};
use herald::use_cases;
use support::testable;
use support::{eventually, Redis};
use uuid::Uuid;

/// A migrated SQLite store in a temp dir (kept alive by the guard).
async fn sqlite() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::from_toml(&format!(
        "database_url = \"sqlite://{}\"\nstate_dir = \"{}\"\n",
        dir.path().join("herald.db").display(),
        dir.path().display()
    ))
    .expect("config");
    let store = SqliteStore::connect(&config).await.expect("connect");
    store.migrate().await.expect("migrate");
    (Arc::new(store), dir)
}

/// A charge written as the intake writes it: claimed key, row, event, key
/// completed, one transaction.
async fn charge(store: &Arc<dyn Store>, user: &str, amount_cents: i64) -> Charge {
    let claim = KeyClaimRequest {
        scope: KeyScope {
            principal: format!("user:{user}"),
            method: "POST",
            route: "/api/charges",
        },
        key: IdempotencyKey::parse(format!("charge-{user}").as_bytes()).unwrap(),
        fingerprint: Fingerprint::of_request("POST", "/api/charges", &serde_json::json!({})),
        lease: Duration::from_secs(30),
        ttl: Duration::from_secs(3600),
        sent_at: std::time::Instant::now(),
    };
    let KeyClaim::New(lease) = store.claim_key(&claim).await.unwrap() else {
        panic!("a new key");
    };
    let charge = Charge {
        id: Uuid::now_v7(),
        user_id: user.to_string(),
        amount_cents,
        currency: "EUR".into(),
        description: "Featured listing".into(),
        ledger_status: LedgerStatus::Pending,
        created_at: chrono::Utc::now(),
    };
    let response = StoredResponse {
        status: 201,
        body: "{}".into(),
    };
    let written = charge.clone();
    support::in_unit(store, Some(lease), &response, |tx| {
        Box::pin(async move { use_cases::create_charge(tx, &written).await })
    })
    .await
    .unwrap();
    charge
}

/// The relay as the daemon runs it, on `store` and `broker`, woken by `wake`.
fn relay_args(
    store: &Arc<dyn Store>,
    broker: &Arc<dyn Broker>,
    wake: &Arc<tokio::sync::Notify>,
) -> OutboxRelayArgs {
    OutboxRelayArgs {
        store: store.clone(),
        publisher: broker.clone(),
        wake: wake.clone(),
        max_publish_per_sec: 500,
        redeliver_after: Duration::from_secs(60),
        unclaimed_after: Duration::from_secs(180),
        poll_interval: Duration::from_millis(100),
    }
}

/// The value of `name` (a line `name{…} value` or `name value`) in this
/// process's metrics.
fn metric(name_and_labels: &str) -> Option<f64> {
    herald::telemetry::prometheus()
        .render()
        .lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn the_retry_budget_grants_its_capacity_refills_on_success_and_shows_its_tokens() {
    let view = TokensView::default();
    let args = RetryBudgetArgs {
        capacity: 2.0,
        refill_per_success: 1.0,
        refill_per_sec: 0.001,
        view: view.clone(),
    };
    let (budget, mut handled) = testable::spawn(RetryBudget, args).await;
    let mut granted = Vec::new();
    for _ in 0..3 {
        let answer = ractor::call!(budget, RetryBudgetMsg::TryRetry, "resend").unwrap();
        handled.next().await.unwrap();
        granted.push(answer);
    }
    assert_eq!(granted, [true, true, false]);
    budget.cast(RetryBudgetMsg::Succeeded("resend")).unwrap();
    handled.next().await.unwrap();
    assert!(ractor::call!(budget, RetryBudgetMsg::TryRetry, "resend").unwrap());
    handled.next().await.unwrap();
    let tokens = view.lock().unwrap().get("resend").copied().unwrap();
    assert!(tokens < 0.1, "the view follows the bucket: {tokens}");
    // Another call site has a bucket of its own.
    assert!(ractor::call!(budget, RetryBudgetMsg::TryRetry, "other").unwrap());
    budget.stop(None);
}

#[tokio::test]
async fn the_key_registry_leaves_fallback_when_redis_answers_and_enters_it_when_it_does_not() {
    let mut redis = Redis::start().await;
    let config = RedisConfig {
        command_timeout_ms: 250,
        ..Config::from_toml("").unwrap().redis
    };
    let hot = HotTier::connect(&redis.url(), &config).unwrap();
    let mode = RedisMode::configured(false);
    let args = KeyRegistryArgs {
        hot: Some(hot),
        mode: mode.clone(),
        // Probes are sent by the test; the timer's first is an hour away.
        probe_interval: Duration::from_secs(3600),
    };
    let (registry, mut handled) = testable::spawn(KeyRegistry::new(), args).await;
    // pre_start probes once at once.
    handled.next().await.unwrap();
    assert_eq!(mode.label(), "healthy");
    redis.kill();
    registry.cast(Tick).unwrap();
    handled.next().await.unwrap();
    assert_eq!(mode.label(), "fallback");
    redis.restart().await;
    // The client reconnects on its own; probe (ten a second) until it answers.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    while mode.label() != "healthy" {
        assert!(
            Instant::now() < deadline,
            "the hot tier healthy again within 20 s"
        );
        pace.tick().await;
        registry.cast(Tick).unwrap();
        handled.next().await.unwrap();
    }
    registry.stop(None);
}

#[tokio::test]
async fn the_relay_and_the_ledger_consumer_apply_a_committed_charge_once() {
    let (store, _dir) = sqlite().await;
    let broker: Arc<dyn Broker> = Arc::new(InProcessBroker::new());
    let wake = Arc::new(tokio::sync::Notify::new());
    let relay = relay_args(&store, &broker, &wake);
    let ledger_args = ConsumerArgs {
        pool: PoolArgs {
            broker: broker.clone(),
            consumer_name: "test".into(),
            workers: 2,
            reclaim_after: Duration::from_secs(30),
        },
        handler: Arc::new(LedgerConsumer::new(store.clone())),
    };
    let (relay, mut relay_handled) = testable::spawn(OutboxRelay, relay).await;
    let (ledger, mut ledger_handled) =
        testable::spawn(ConsumerActor::<LedgerConsumer>::new(), ledger_args).await;
    let charges = [
        charge(&store, "ada", 1200).await,
        charge(&store, "bob", 300).await,
    ];
    wake.notify_one();
    for charge in &charges {
        eventually("the charge applied", Duration::from_secs(10), || {
            let store = store.clone();
            let (id, user) = (charge.id, charge.user_id.clone());
            async move {
                let now = store.get_charge(id, &user).await.unwrap()?;
                (now.ledger_status == LedgerStatus::Applied).then_some(())
            }
        })
        .await;
    }
    assert_eq!(store.outbox_stats().await.unwrap().ledger_entries, 2);
    relay.stop(None);
    ledger.stop(None);
    // Neither loop ended while they worked: no message reached either.
    relay_handled.assert_stopped_without_a_message().await;
    ledger_handled.assert_stopped_without_a_message().await;
}

#[tokio::test]
async fn the_janitor_deletes_settled_rows_past_their_retention() {
    let (store, dir) = sqlite().await;
    let broker: Arc<dyn Broker> = Arc::new(InProcessBroker::new());
    let charged = charge(&store, "ada", 100).await;
    // Settle it by hand: the ledger's delivery, as the consumer records it.
    let wake = Arc::new(tokio::sync::Notify::new());
    let (relay, _) = testable::spawn(OutboxRelay, relay_args(&store, &broker, &wake)).await;
    let (ledger, _) = testable::spawn(
        ConsumerActor::<LedgerConsumer>::new(),
        ConsumerArgs {
            pool: PoolArgs {
                broker,
                consumer_name: "test".into(),
                workers: 1,
                reclaim_after: Duration::from_secs(30),
            },
            handler: Arc::new(LedgerConsumer::new(store.clone())),
        },
    )
    .await;
    wake.notify_one();
    eventually("the charge applied", Duration::from_secs(10), || {
        let store = store.clone();
        async move {
            let now = store.get_charge(charged.id, "ada").await.unwrap()?;
            (now.ledger_status == LedgerStatus::Applied).then_some(())
        }
    })
    .await;
    relay.stop(None);
    ledger.stop(None);
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        dir.path().join("herald.db").display()
    ))
    .await
    .unwrap();
    let rows = |table: &'static str| {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM {table}"
            )))
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };
    assert_eq!((rows("outbox_events").await, rows("inbox").await), (1, 1));
    // A long retention keeps them; none keeps nothing settled.
    let (janitor, mut handled) = testable::spawn(
        Janitor::new(),
        JanitorArgs {
            store: store.clone(),
            interval: Duration::from_secs(3600),
            batch: 100,
            retention: Duration::from_secs(3600),
        },
    )
    .await;
    janitor.cast(Tick).unwrap();
    handled.next().await.unwrap();
    assert_eq!((rows("outbox_events").await, rows("inbox").await), (1, 1));
    janitor.stop(None);
    let (janitor, mut handled) = testable::spawn(
        Janitor::new(),
        JanitorArgs {
            store: store.clone(),
            interval: Duration::from_secs(3600),
            batch: 100,
            retention: Duration::ZERO,
        },
    )
    .await;
    janitor.cast(Tick).unwrap();
    handled.next().await.unwrap();
    assert_eq!((rows("outbox_events").await, rows("inbox").await), (0, 0));
    // The ledger entry is the effect: it stays.
    assert_eq!(rows("ledger_entries").await, 1);
    janitor.stop(None);
}

#[tokio::test]
async fn the_auditor_and_the_dlq_monitor_report_what_the_database_holds() {
    let (store, _dir) = sqlite().await;
    let started = Instant::now();
    let runs_before = metric("herald_audit_runs_total").unwrap_or(0.0);
    let (auditor, mut handled) = testable::spawn(
        Auditor::new(),
        AuditorArgs {
            store: store.clone(),
            interval: Duration::from_secs(3600),
            max_unsettled_age: Duration::from_secs(3600),
            retention: Duration::from_secs(3600),
            last: Default::default(),
        },
    )
    .await;
    // pre_start audits once at once; then one on demand.
    handled.next().await.unwrap();
    auditor.cast(Tick).unwrap();
    handled.next().await.unwrap();
    assert_eq!(
        metric("herald_audit_runs_total").unwrap_or(0.0) - runs_before,
        2.0
    );
    assert_eq!(
        metric("herald_audit_violations{invariant=\"one_email_per_application\"}"),
        Some(0.0)
    );
    auditor.stop(None);

    let (monitor, mut handled) = testable::spawn(
        DlqMonitor::new(),
        DlqMonitorArgs {
            store: store.clone(),
            threshold: 0,
            max_age: Duration::from_secs(3600),
            interval: Duration::from_secs(3600),
        },
    )
    .await;
    monitor.cast(Tick).unwrap();
    handled.next().await.unwrap();
    assert_eq!(metric("herald_dlq_depth "), Some(0.0));
    monitor.stop(None);
    assert!(started.elapsed() < Duration::from_secs(10));

    // Each stops its ticker when it stops.
    let hour = Duration::from_secs(3600);
    assert_its_ticker_stops_with_it(
        Auditor::new(),
        AuditorArgs {
            store: store.clone(),
            interval: hour,
            max_unsettled_age: hour,
            retention: hour,
            last: Default::default(),
        },
        "the auditor",
    )
    .await;
    assert_its_ticker_stops_with_it(
        DlqMonitor::new(),
        DlqMonitorArgs {
            store: store.clone(),
            threshold: 0,
            max_age: hour,
            interval: hour,
        },
        "the DLQ monitor",
    )
    .await;
}

#[tokio::test]
async fn the_email_sender_sends_each_confirmation_once_in_a_batch() {
    let (store, dir) = sqlite().await;
    let mail = dir.path().join("mail");
    let broker: Arc<dyn Broker> = Arc::new(InProcessBroker::new());
    let wake = Arc::new(tokio::sync::Notify::new());
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
    let created = StoredResponse {
        status: 201,
        body: "{}".into(),
    };
    let posted = job.clone();
    support::in_unit(&store, None, &created, |tx| {
        Box::pin(async move { use_cases::post_job(tx, &posted).await })
    })
    .await
    .unwrap();
    let mut applications = Vec::new();
    for user in ["ada", "bob", "cy"] {
        let application = Application {
            id: Uuid::now_v7(),
            job_id: job.id,
            user_id: user.into(),
            email: format!("{user}@example.com"),
            resume_url: None,
            cover_letter: None,
            email_status: EmailStatus::Pending,
            created_at: chrono::Utc::now(),
        };
        let submitted = application.clone();
        let answer = created.clone();
        support::in_unit(&store, None, &created, |tx| {
            Box::pin(async move { use_cases::submit_application(tx, &submitted, &answer).await })
        })
        .await
        .unwrap();
        applications.push(application);
    }
    let config = Config::from_toml("").unwrap();
    let sender = EmailSender::new(EmailSenderArgs {
        store: store.clone(),
        transport: Arc::new(FileTransport::new(mail.clone()).unwrap()),
        from: "jobs@herald.test".into(),
        pacer: Arc::new(SendPacer::new(100.0)),
        policy: RetryPolicy::from(&config.retry),
        // No budget actor: a retry would be deferred (none is needed here).
        budget: RetryBudgetHandle::new(ActorSlot::new("retry_budget"), TokensView::default()),
        max_batch: 100,
        linger: Duration::from_millis(20),
        workers: 2,
    });
    let (relay, mut relay_handled) =
        testable::spawn(OutboxRelay, relay_args(&store, &broker, &wake)).await;
    let (email, mut email_handled) = testable::spawn(
        ConsumerActor::<EmailSender>::new(),
        ConsumerArgs {
            pool: PoolArgs {
                broker,
                consumer_name: "test".into(),
                workers: EmailSender::reading_width(100, 2),
                reclaim_after: Duration::from_secs(30),
            },
            handler: Arc::new(sender),
        },
    )
    .await;
    wake.notify_one();
    for application in &applications {
        eventually(
            "the confirmation recorded as sent",
            Duration::from_secs(10),
            || {
                let store = store.clone();
                let (id, user) = (application.id, application.user_id.clone());
                async move {
                    let now = store.get_application(id, &user).await.unwrap()?;
                    (now.email_status == EmailStatus::Sent).then_some(())
                }
            },
        )
        .await;
    }
    let files: Vec<String> = std::fs::read_dir(&mail)
        .unwrap()
        .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
        .collect();
    assert_eq!(files.len(), 3, "one email per application");
    for user in ["ada", "bob", "cy"] {
        let to = format!("To: {user}@example.com");
        assert_eq!(files.iter().filter(|f| f.contains(&to)).count(), 1, "{to}");
    }
    relay.stop(None);
    email.stop(None);
    relay_handled.assert_stopped_without_a_message().await;
    email_handled.assert_stopped_without_a_message().await;
}

/// A job as the intake writes it.
fn job(title: &str) -> Job {
    Job {
        id: Uuid::now_v7(),
        title: title.into(),
        company: "Acme".into(),
        location: "Remote".into(),
        description: "Effectively once".into(),
        posted_at: chrono::Utc::now(),
        status: JobStatus::Open,
        version: 1,
        updated_at: chrono::Utc::now(),
    }
}

/// The next frame on `queue` (within 10 s), as text; `None` once it closed.
async fn next_frame(queue: &ClientQueue) -> Option<String> {
    tokio::time::timeout(
        Duration::from_secs(10),
        futures::future::poll_fn(|cx| queue.poll_next(cx)),
    )
    .await
    .expect("a frame or the end within 10 s")
    .map(|next| match next {
        Next::Event(_, frame) => String::from_utf8_lossy(&frame).into_owned(),
        Next::Snapshot => SNAPSHOT_OWED.to_string(),
    })
}

/// What `next_frame` reads when the queue owes its client a snapshot.
const SNAPSHOT_OWED: &str = "(a snapshot is owed)";

/// A job event as the relay puts it on the jobs stream.
async fn publish(broker: &Arc<dyn Broker>, topic: &str, payload: serde_json::Value) {
    broker
        .publish(&[Envelope {
            event_id: Uuid::now_v7(),
            topic: topic.into(),
            attempts: 0,
            traceparent: None,
            payload,
        }])
        .await
        .unwrap();
}

#[tokio::test]
async fn the_sse_hub_serves_each_filter_its_list_and_lets_a_slow_client_catch_up_by_snapshot() {
    let (store, _dir) = sqlite().await;
    let broker: Arc<dyn Broker> = Arc::new(InProcessBroker::new());
    let earlier = job("Posted before the hub started");
    let created = StoredResponse {
        status: 201,
        body: "{}".into(),
    };
    let posted = earlier.clone();
    support::in_unit(&store, None, &created, |tx| {
        Box::pin(async move { use_cases::post_job(tx, &posted).await })
    })
    .await
    .unwrap();
    let args = SseHubArgs {
        store: store.clone(),
        broker: Some(broker.clone()),
        size: BoardSize {
            jobs: 100,
            snapshot: 10,
            history: 100,
        },
        resume_window: Arc::default(),
        admission: Arc::new(herald::actors::sse_hub::Admission::new(1000.0)),
    };
    let (hub, mut handled) = testable::spawn(SseHub, args).await;
    // Its reader loads the board first.
    handled.next().await.unwrap();
    let all = JobFilter::default();
    let remote = JobFilter::from_pairs([("location", "remote".to_string())]).unwrap();
    let catch_up = ractor::call!(hub, |reply| SseHubMsg::CatchUp {
        after: None,
        filter: all.clone(),
        reply
    })
    .unwrap();
    handled.next().await.unwrap();
    let CatchUp::Snapshot {
        cursor: start,
        frame,
    } = catch_up
    else {
        panic!("a new client gets the snapshot");
    };
    let frame = String::from_utf8_lossy(&frame).into_owned();
    assert!(frame.contains("event: snapshot"), "{frame}");
    assert!(frame.contains(&earlier.id.to_string()), "{frame}");

    // Three clients: one reads everything, one reads `location=remote`, and
    // one (room for one job) is never read.
    let stall = Duration::from_secs(30);
    let reader = ClientQueue::new(8, stall);
    let filtered = ClientQueue::new(8, stall);
    let stuck = ClientQueue::new(1, stall);
    for (queue, filter) in [(&reader, &all), (&filtered, &remote), (&stuck, &all)] {
        let (queue, filter) = (queue.clone(), filter.clone());
        let id = ractor::call!(hub, |reply| SseHubMsg::Subscribe {
            filter,
            queue,
            reply
        })
        .unwrap();
        handled.next().await.unwrap();
        assert!(id.is_some(), "subscribed");
    }
    // Two jobs posted, then the first moved to Berlin: out of `remote`.
    let posted = [job("First"), job("Second")];
    for job in &posted {
        publish(
            &broker,
            topics::JOB_POSTED,
            serde_json::to_value(job).unwrap(),
        )
        .await;
    }
    for (n, job) in posted.iter().enumerate() {
        let frame = next_frame(&reader).await.expect("a delta");
        assert!(frame.contains("event: job.posted"), "{frame}");
        assert!(frame.contains(&job.id.to_string()), "{frame}");
        let frame = next_frame(&filtered).await.expect("a delta");
        assert!(frame.contains(&posted[n].id.to_string()), "{frame}");
    }
    // Read, each client's queue is empty: a newer event of a job whose
    // older one still waits would replace it (conflation).
    let mut moved = serde_json::to_value(&posted[0]).unwrap();
    moved["location"] = "Berlin".into();
    moved["version"] = 2.into();
    moved["before"] = serde_json::to_value(&posted[0]).unwrap();
    publish(&broker, topics::JOB_UPDATED, moved).await;
    let edit = next_frame(&reader).await.expect("the edit");
    assert!(
        edit.contains("event: job.updated") && edit.contains("Berlin"),
        "{edit}"
    );
    assert!(
        !edit.contains("before"),
        "the stream sends the job alone: {edit}"
    );
    let left = next_frame(&filtered).await.expect("the removal");
    assert!(left.starts_with("id: "), "{left}");
    assert!(left.contains("event: job.removed"), "{left}");
    assert!(
        left.contains(&format!("{{\"id\":\"{}\",\"version\":2}}", posted[0].id)),
        "{left}"
    );
    // The stuck client overflowed at its second job: it is owed one
    // snapshot, then the edit is queued. The hub renders the snapshot when
    // asked (as the client's stream does, when it comes to it), so it
    // already shows the edit, and the queued edit is at or before its
    // cursor (the stream skips it). Nothing else; still connected.
    assert_eq!(next_frame(&stuck).await.as_deref(), Some(SNAPSHOT_OWED));
    let catch_up = ractor::call!(hub, |reply| SseHubMsg::CatchUp {
        after: None,
        filter: all.clone(),
        reply
    })
    .unwrap();
    let CatchUp::Snapshot { frame, cursor } = catch_up else {
        panic!("the snapshot owed");
    };
    let snapshot = String::from_utf8_lossy(&frame).into_owned();
    assert!(snapshot.contains("event: snapshot"), "{snapshot}");
    for job in &posted {
        assert!(snapshot.contains(&job.id.to_string()), "{snapshot}");
    }
    assert!(snapshot.contains("Berlin"), "it shows the edit: {snapshot}");
    let queued = futures::future::poll_fn(|cx| stuck.poll_next(cx)).await;
    let Some(Next::Event(edit_at, edit)) = queued else {
        panic!("the edit, queued after the overflow: {queued:?}");
    };
    assert!(String::from_utf8_lossy(&edit).contains("event: job.updated"));
    assert!(edit_at <= cursor, "the snapshot covers it");
    // A client resuming from the first snapshot's cursor with the filter
    // misses one job (the second; the first left its filter).
    let catch_up = ractor::call!(hub, |reply| SseHubMsg::CatchUp {
        after: Some(start),
        filter: remote.clone(),
        reply
    })
    .unwrap();
    let CatchUp::Missed { frames, .. } = catch_up else {
        panic!("a cursor within the history is caught up from it");
    };
    assert_eq!(
        frames.len(),
        2,
        "the second job, and the first one's removal"
    );
    // Closing every stream ends the queues.
    hub.cast(SseHubMsg::CloseAll).unwrap();
    assert_eq!(next_frame(&reader).await, None);
    assert_eq!(next_frame(&stuck).await, None);
    hub.stop(None);
}

#[tokio::test]
async fn the_supervisor_restarts_a_dead_child_into_its_slot_and_escalates_past_its_limit() {
    let slot = ActorSlot::new("retry_budget");
    let args = RetryBudgetArgs {
        capacity: 2.0,
        refill_per_success: 1.0,
        refill_per_sec: 0.001,
        view: TokensView::default(),
    };
    let child: Arc<dyn Child> = SlotChild::new(|| RetryBudget, args, slot.clone());
    let (supervisor, mut handled) = testable::spawn(HeraldSupervisor, Arc::new(vec![child])).await;
    let first = slot.get().expect("the child started");
    assert!(ractor::call!(first, RetryBudgetMsg::TryRetry, "resend").unwrap());
    // Killed, it is restarted (a Restart message after the backoff) into
    // its slot, and the restart is counted.
    first.kill();
    handled.next().await.unwrap();
    let second = slot.get().expect("restarted into the slot");
    assert_ne!(second.get_id(), first.get_id());
    assert_eq!(slot.status().restarts, 1);
    assert!(ractor::call!(second, RetryBudgetMsg::TryRetry, "resend").unwrap());
    // Dying more than MAX_RESTARTS_PER_MINUTE times in a minute escalates:
    // the supervisor stops instead of restarting it again.
    for _ in 1..MAX_RESTARTS_PER_MINUTE {
        slot.get().expect("running").kill();
        handled.next().await.unwrap();
    }
    assert_eq!(slot.status().restarts, MAX_RESTARTS_PER_MINUTE as u64);
    slot.get().expect("running").kill();
    handled.assert_stopped_without_a_message().await;
    assert_eq!(supervisor.get_status(), ractor::ActorStatus::Stopped);
}

/// Spawns `actor` (its schedule an hour apart), stops it, and shows its
/// ticker task gone with it: before the tickers were held in the actors'
/// state, an hourly one ran on for up to the hour.
async fn assert_its_ticker_stops_with_it<A: ractor::Actor>(
    actor: A,
    args: A::Arguments,
    what: &str,
) {
    let (actor, handle) = ractor::Actor::spawn(None, actor, args)
        .await
        .expect("spawn");
    let id = actor.get_id();
    // Let the ticker reach its wait for the next period (one poll on this
    // single-threaded runtime): stopped before, it would see the actor gone
    // and end by itself, and the check below would prove nothing.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(herald::actors::is_ticking(id), "{what}: its ticker runs");
    actor.stop(None);
    handle.await.expect("stopped");
    eventually(
        &format!("{what}'s ticker to stop with it"),
        Duration::from_secs(5),
        || {
            let ticking = herald::actors::is_ticking(id);
            async move { (!ticking).then_some(()) }
        },
    )
    .await;
}

// The auditor's and the DLQ monitor's are checked at the end of their own
// test: each run moves the metrics that test counts.
#[tokio::test]
async fn the_janitor_and_the_key_registry_stop_their_tickers_when_they_stop() {
    let (store, _dir) = sqlite().await;
    let hour = Duration::from_secs(3600);
    assert_its_ticker_stops_with_it(
        Janitor::new(),
        JanitorArgs {
            store: store.clone(),
            interval: hour,
            batch: 100,
            retention: hour,
        },
        "the janitor",
    )
    .await;
    let redis = Redis::start().await;
    let config = RedisConfig {
        command_timeout_ms: 250,
        ..Config::from_toml("").unwrap().redis
    };
    let hot = HotTier::connect(&redis.url(), &config).unwrap();
    assert_its_ticker_stops_with_it(
        KeyRegistry::new(),
        KeyRegistryArgs {
            hot: Some(hot),
            mode: RedisMode::configured(false),
            probe_interval: hour,
        },
        "the key registry",
    )
    .await;
}
