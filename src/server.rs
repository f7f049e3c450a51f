//! Wiring: configuration in, a running daemon out.
//!
//! [`run`] connects the store (applying migrations), starts the actor tree,
//! and serves the public and admin listeners until `shutdown` resolves. The
//! listeners are bound by the caller, so tests and benchmarks can bind port 0
//! and read the address back.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{info, warn};
use uuid::Uuid;

use crate::actors::auditor::AuditorArgs;
use crate::actors::consumer::{ConsumerArgs, PoolArgs};
use crate::actors::dlq_monitor::DlqMonitorArgs;
use crate::actors::email_sender::{EmailSender, EmailSenderArgs};
use crate::actors::janitor::JanitorArgs;
use crate::actors::key_registry::KeyRegistryArgs;
use crate::actors::ledger::LedgerConsumer;
use crate::actors::outbox_relay::OutboxRelayArgs;
use crate::actors::retry_budget::{RetryBudgetArgs, RetryBudgetHandle};
use crate::actors::sse_hub::{Admission, BoardSize, ResumeWindow, SseHubArgs, SseHubHandle};
use crate::actors::supervisor::{ActorTree, Slots, TreeArgs};
use crate::broker::in_process::InProcessBroker;
use crate::broker::redis_streams::RedisBroker;
use crate::broker::Broker;
use crate::config::{Config, ConfigError, Secret};
use crate::email::file::FileTransport;
use crate::email::resend::ResendTransport;
use crate::email::{SendPacer, Transport};
use crate::http::auth::Auth;
use crate::http::connections::{self, ConnectionLimits};
use crate::http::jwks::IdentityProviderError;
use crate::http::limits::AbuseLimits;
use crate::http::{admin, listener_filter, public, AppState};
use crate::idempotency::hot_tier::HotTier;
use crate::idempotency::hot_tier::RedisMode;
use crate::idempotency::protocol::Idempotency;
use crate::retry::RetryPolicy;
use crate::store;
use crate::store::Store;

/// The two bound listeners.
pub struct Listeners {
    pub public: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the addresses of the configuration, naming the key on failure.
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let public = TcpListener::bind(config.listen).await.with_context(|| {
            format!("configuration key `listen`: cannot bind {}", config.listen)
        })?;
        let admin = TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| {
                format!(
                    "configuration key `admin_listen`: cannot bind {}",
                    config.admin_listen
                )
            })?;
        Ok(Listeners { public, admin })
    }

    pub fn addresses(&self) -> std::io::Result<(SocketAddr, SocketAddr)> {
        Ok((self.public.local_addr()?, self.admin.local_addr()?))
    }
}

fn required<'a>(
    value: &'a Option<Secret>,
    key: &'static str,
    env: &str,
) -> Result<&'a Secret, ConfigError> {
    value.as_ref().ok_or_else(|| ConfigError::Invalid {
        key,
        message: format!("is required (set {env})"),
    })
}

/// What `serve` checks of its configuration before it creates anything (the
/// database, the embedded mode's generated secrets, the mail directory), and
/// all that `herald config` checks: the same functions [`run`] builds its
/// parts with, so both refuse a setting alike (exit 2, the same message).
/// The embedded mode generates a missing admin token and JWT secret at
/// start: here they count as set, and nothing is written. (The identity
/// provider's keys are fetched at start, not here: that is a neighbour, not
/// a setting.)
pub fn preflight(config: &Config) -> Result<(), ConfigError> {
    let mut config = config.clone();
    if config.is_embedded() {
        let generated = || Some(Secret::new("generated at start"));
        config.admin_token = config.admin_token.or_else(generated);
        config.jwt_secret = config.jwt_secret.or_else(generated);
    }
    operators(&config)?;
    user_token_secret(&config)?;
    if config.relay.enabled {
        email_choice(&config)?;
    }
    webhook_verifier(&config)?;
    Ok(())
}

/// Every operator's credential (`admin_token`, `admin.tokens`, the tokens file).
fn operators(config: &Config) -> Result<Vec<(String, [u8; 32])>, ConfigError> {
    crate::http::auth::operators(config).map_err(|message| ConfigError::Invalid {
        key: "admin_token",
        message,
    })
}

/// The secret user tokens are signed with (HS256). User tokens need a way to
/// be verified: the shared secret, the identity provider's keys, or both;
/// dev login signs with the secret.
fn user_token_secret(config: &Config) -> Result<Option<&Secret>, ConfigError> {
    if config.auth.has_identity_provider() && !config.dev_login() {
        Ok(config.jwt_secret.as_ref())
    } else {
        required(&config.jwt_secret, "jwt_secret", "HERALD_JWT_SECRET").map(Some)
    }
}

/// The email transport `email.transport` names, as settings: nothing is
/// created until [`email_transport`] builds it.
enum EmailChoice {
    /// `.eml` files in this directory.
    File(std::path::PathBuf),
    Resend(ResendTransport),
}

/// The email transport `email.transport` names.
fn email_transport(config: &Config, pacer: &Arc<SendPacer>) -> anyhow::Result<Arc<dyn Transport>> {
    match email_choice(config)? {
        EmailChoice::File(dir) => {
            let transport = FileTransport::new(dir.clone())
                .with_context(|| format!("creating the mail directory {}", dir.display()))?;
            Ok(Arc::new(transport))
        }
        EmailChoice::Resend(transport) => Ok(Arc::new(transport.advertising_to(pacer.clone()))),
    }
}

fn email_choice(config: &Config) -> Result<EmailChoice, ConfigError> {
    match config.email.transport.as_str() {
        "file" => Ok(EmailChoice::File(config.state_dir.join("mail"))),
        "resend" => {
            let key = required(
                &config.email.resend_api_key,
                "email.resend_api_key",
                "RESEND_API_KEY",
            )?;
            let transport = ResendTransport::new(
                key.expose(),
                config.email.resend_base_url.as_deref(),
                Duration::from_secs(10),
                Duration::from_millis(config.retry.max_delay_ms),
            )
            .map_err(|message| ConfigError::Invalid {
                key: "email.resend_base_url",
                message: format!("{message} (RESEND_BASE_URL)"),
            })?;
            Ok(EmailChoice::Resend(transport))
        }
        other => Err(ConfigError::Invalid {
            key: "email.transport",
            message: format!(
                "`{other}` is not a transport (HERALD_EMAIL_TRANSPORT: `resend` or `file`)"
            ),
        }),
    }
}

/// The verifier of the provider's webhooks, when `email.webhook_secret` is set.
fn webhook_verifier(
    config: &Config,
) -> Result<Option<Arc<crate::http::webhooks::WebhookVerifier>>, ConfigError> {
    let Some(secret) = &config.email.webhook_secret else {
        return Ok(None);
    };
    let verifier = crate::http::webhooks::verifier(secret.expose()).map_err(|message| {
        ConfigError::Invalid {
            key: "email.webhook_secret",
            message,
        }
    })?;
    Ok(Some(Arc::new(verifier)))
}

/// The delivery pipeline's actors: relay and consumers.
#[derive(Default)]
struct Pipeline {
    relay: Option<OutboxRelayArgs>,
    email_sender: Option<ConsumerArgs<EmailSender>>,
    ledger: Option<ConsumerArgs<LedgerConsumer>>,
}

/// The pipeline's arguments, around `broker`.
fn pipeline_args(
    config: &Config,
    broker: &Arc<dyn Broker>,
    store: &Arc<dyn Store>,
    budget: RetryBudgetHandle,
    wake: Arc<tokio::sync::Notify>,
) -> anyhow::Result<Pipeline> {
    let redeliver_after = Duration::from_secs(config.relay.redeliver_after_secs);
    let reclaim_after = redeliver_after
        .min(Duration::from_secs(30))
        .max(Duration::from_secs(1));
    let relay = OutboxRelayArgs {
        store: store.clone(),
        publisher: broker.clone(),
        wake,
        max_publish_per_sec: config.relay.max_publish_per_sec,
        redeliver_after,
        // Well past the consumers' own reclaim: only a copy nobody is left to
        // reclaim (every reader gone) is published again.
        unclaimed_after: (reclaim_after * 3).max(redeliver_after),
        poll_interval: Duration::from_millis(config.relay.poll_interval_ms),
    };
    let pool = PoolArgs {
        broker: broker.clone(),
        consumer_name: format!("herald-{}-{}", std::process::id(), Uuid::new_v4().simple()),
        workers: config.email.workers as usize,
        reclaim_after,
    };
    let (max_batch, workers) = (
        config.email.max_batch as usize,
        config.email.workers as usize,
    );
    // `email.max_per_sec` is the provider account's: with Redis, every
    // process takes its slots from one limiter there.
    let pacer = Arc::new(match &config.redis_url {
        Some(url) => SendPacer::shared(
            config.email.max_per_sec,
            crate::redis_client::client(
                url.expose(),
                Duration::from_millis(config.redis.command_timeout_ms),
            )
            .context("configuration key `redis_url`")?,
            pool.consumer_name.clone(),
        ),
        None => SendPacer::new(config.email.max_per_sec),
    });
    let sender = ConsumerArgs {
        pool: PoolArgs {
            // The reader keeps up to two batches' worth of copies in hand.
            workers: EmailSender::reading_width(max_batch, workers),
            ..pool.clone()
        },
        handler: Arc::new(EmailSender::new(EmailSenderArgs {
            store: store.clone(),
            transport: email_transport(config, &pacer)?,
            from: config.email.from.clone(),
            pacer,
            policy: RetryPolicy::from(&config.retry),
            budget,
            max_batch,
            linger: Duration::from_millis(config.email.batch_linger_ms),
            workers,
        })),
    };
    // Ledger writes are short local transactions: a small pool suffices.
    let ledger = ConsumerArgs {
        pool: PoolArgs { workers: 4, ..pool },
        handler: Arc::new(LedgerConsumer::new(store.clone())),
    };
    Ok(Pipeline {
        relay: Some(relay),
        email_sender: Some(sender),
        ledger: Some(ledger),
    })
}

/// Runs the daemon until `shutdown` resolves.
/// `ready` is called once, when the daemon serves: migrated, actors
/// running, listeners bound.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(),
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let operators = operators(&config)?;
    let jwt_secret = user_token_secret(&config)?;
    let webhooks = webhook_verifier(&config)?;
    if webhooks.is_none() && config.email.transport == "resend" {
        warn!(
            "email.webhook_secret is not set: POST /webhooks/resend answers 404, so \
             bounces and complaints are not seen and bouncing addresses keep being \
             mailed (docs/DEPLOY.md, \"Resend's webhooks\")"
        );
    }
    let auth = match Auth::from_config(operators, jwt_secret, &config.auth).await {
        Ok(auth) => auth,
        Err(IdentityProviderError::Settings { key, message }) => {
            return Err(ConfigError::Invalid { key, message }.into());
        }
        Err(e @ IdentityProviderError::Unreachable(_)) => {
            return Err(e).context("the identity provider at start")
        }
    };
    let prometheus = crate::telemetry::prometheus();
    // Every connection is a file: the caps must fit under the process's
    // open-files limit, with room for the database and Redis pools.
    match raise_open_files_limit() {
        Ok(files) => {
            let wanted = (config.connections.max + config.connections.admin_max) as u64 + 512;
            if files < wanted {
                warn!(
                    open_files_limit = files,
                    connections_max = config.connections.max,
                    "the open-files limit is below connections.max + connections.admin_max + 512: \
                     raise it (systemd LimitNOFILE, docker --ulimit nofile) or lower connections.max"
                );
            }
        }
        Err(e) => warn!(error = %e, "cannot raise the open-files limit"),
    }

    let store = store::open_at_start(&config, store::AtStart::Migrated)
        .await
        .context("applying database migrations")?;

    let hot = config
        .redis_url
        .as_ref()
        .map(|url| HotTier::connect(url.expose(), &config.redis))
        .transpose()
        .context("configuration key `redis_url`")?;
    // Start in fallback until the first probe answers.
    let redis_mode = if hot.is_some() {
        RedisMode::configured(false)
    } else {
        RedisMode::default()
    };
    let outbox_wake = Arc::new(tokio::sync::Notify::new());
    let last_audit = crate::actors::auditor::LastAudit::default();
    let slots = Slots::new();
    let resume_window = Arc::new(ResumeWindow::default());
    let admission = Arc::new(Admission::new(config.sse.admit_per_sec));
    let sse = SseHubHandle {
        slot: slots.sse_hub.clone(),
        admission: admission.clone(),
        client_queue: config.sse.client_queue,
        stall_timeout: Duration::from_millis(config.sse.stall_timeout_ms),
        resume_window: resume_window.clone(),
        heartbeat: Duration::from_millis(config.sse.heartbeat_ms),
    };
    let budget_args = RetryBudgetArgs::default();
    let budget = RetryBudgetHandle::new(slots.retry_budget.clone(), budget_args.view.clone());
    // Redis Streams when configured (shared by every process); otherwise
    // the in-process broker of the embedded mode.
    let broker: Arc<dyn Broker> = match &config.redis_url {
        Some(url) => {
            Arc::new(RedisBroker::connect(url.expose()).context("configuration key `redis_url`")?)
        }
        None => Arc::new(InProcessBroker::new()),
    };
    let pipeline = if config.relay.enabled {
        pipeline_args(
            &config,
            &broker,
            &store,
            budget.clone(),
            outbox_wake.clone(),
        )?
    } else {
        info!("relay.enabled = false: this process does not deliver outbox events");
        Pipeline::default()
    };
    // Without Redis and without a relay, nothing would ever reach the
    // in-process broker: the stream then serves snapshots only.
    let stream_broker =
        (config.redis_url.is_some() || config.relay.enabled).then(|| broker.clone());
    let (actors, mut tree) = ActorTree::start(
        TreeArgs {
            key_registry: KeyRegistryArgs {
                hot: hot.clone(),
                mode: redis_mode.clone(),
                probe_interval: Duration::from_millis(config.redis.probe_interval_ms),
            },
            retry_budget: budget_args,
            outbox_relay: pipeline.relay,
            email_sender: pipeline.email_sender,
            ledger: pipeline.ledger,
            dlq_monitor: DlqMonitorArgs {
                store: store.clone(),
                threshold: i64::try_from(config.dlq.alert_threshold).unwrap_or(i64::MAX),
                max_age: Duration::from_secs(config.dlq.alert_max_age_secs),
                interval: Duration::from_millis(config.dlq.check_interval_ms),
            },
            janitor: JanitorArgs {
                store: store.clone(),
                interval: Duration::from_millis(config.janitor.interval_ms),
                batch: config.janitor.batch,
                retention: Duration::from_secs(config.janitor.retention_secs),
            },
            auditor: AuditorArgs {
                store: store.clone(),
                interval: Duration::from_millis(config.audit.interval_ms),
                max_unsettled_age: Duration::from_secs(config.audit.max_unsettled_age_secs),
                retention: Duration::from_secs(config.janitor.retention_secs),
                last: last_audit.clone(),
            },
            sse_hub: SseHubArgs {
                store: store.clone(),
                broker: stream_broker,
                size: BoardSize {
                    jobs: config.sse.index_jobs,
                    snapshot: config.sse.snapshot_jobs,
                    history: config.sse.history,
                },
                resume_window,
                admission,
            },
        },
        slots,
    )
    .await?;

    let state = AppState {
        config: config.clone(),
        store: store.clone(),
        idempotency: Idempotency::new(
            store.clone(),
            store,
            crate::http::problem::refusal,
            hot,
            redis_mode.clone(),
            Duration::from_secs(config.idempotency.lease_secs),
            Duration::from_secs(config.idempotency.ttl_secs),
        )
        .waking(outbox_wake.clone()),
        actors: actors.clone(),
        auth,
        redis_mode,
        prometheus,
        outbox_wake,
        budget,
        sse: sse.clone(),
        broker: broker.name(),
        limits: Arc::new(AbuseLimits::new(&config.limits, &config.admin)),
        last_audit,
        webhooks,
    };
    // The daemon's own tasks beside the servers and the actor tree; this
    // function owns them (dropped, aborted, when it returns).
    let mut housekeeping: JoinSet<()> = JoinSet::new();
    // Clients whose buckets are full again are forgotten, so the limit
    // tables hold only recent clients however many addresses come by.
    let limits = state.limits.clone();
    housekeeping.spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            every.tick().await;
            limits.forget_idle_clients();
        }
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let deadline = Duration::from_millis(config.shutdown_deadline_ms);
    housekeeping.spawn(async move {
        shutdown.await;
        info!(
            ?deadline,
            "shutting down: no new connections; streams end with a retry"
        );
        notify_service_manager(&[sd_notify::NotifyState::Stopping]);
        // The hard stop: whatever still runs at the deadline is cut off
        // (nothing is lost: unsettled work is redone after the restart).
        std::thread::spawn(move || {
            std::thread::sleep(deadline);
            eprintln!("herald: shutdown deadline ({deadline:?}) passed; exiting now");
            std::process::exit(1);
        });
        // Streams never end by themselves: end them (each with a jittered
        // `retry:`) so the servers' graceful shutdown can complete.
        sse.close_all();
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let stop_rx_deadline = stop_rx.clone();
    let (public_addr, admin_addr) = listeners.addresses()?;
    info!(%public_addr, %admin_addr, backend = state.store.backend(), broker = broker.name(), "herald serving");
    // systemd `Type=notify`: ready once the store is migrated, the actor
    // tree runs and the listeners are bound (a no-op without NOTIFY_SOCKET).
    notify_service_manager(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("serving"),
    ]);
    ready();
    let limits = &config.limits;
    // A trusted proxy's connections count against the clients it names.
    let per_ip_connections = limits.per_ip.then_some(config.connections.per_ip);
    let public_server = connections::serve(
        listeners.public,
        listener_filter(state.clone(), public::dispatch),
        ConnectionLimits::new(
            "public",
            config.connections.max,
            per_ip_connections,
            &config.connections,
        ),
        connections::ClientCount::new(state.limits.proxies().clone()),
        stopped(stop_rx.clone()),
    );
    let admin_server = connections::serve(
        listeners.admin,
        listener_filter(state.clone(), admin::dispatch),
        ConnectionLimits::new(
            "admin",
            config.connections.admin_max,
            None,
            &config.connections,
        ),
        connections::ClientCount::default(),
        stopped(stop_rx),
    );
    // Graceful, but bounded: a client that stops reading must not hold the
    // process (warp waits for every open connection).
    let grace = Duration::from_millis(config.sse.shutdown_grace_ms);
    let deadline = async move {
        stopped(stop_rx_deadline).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        _ = async { tokio::join!(public_server, admin_server) } => {}
        _ = deadline => warn!(?grace, "shutdown grace elapsed; closing the remaining connections"),
        _ = &mut tree => {
            // The supervisor escalated (an actor kept crashing): exit with an
            // error so the service manager restarts the process.
            anyhow::bail!("the actor tree stopped: an actor kept crashing (see the log)");
        }
    }
    // In-flight deliveries get the rest of the deadline to record their
    // outcome (the supervisor stops each actor and waits for it); anything
    // cut off stays unsettled and is redone after restart.
    actors.stop();
    let _ = tree.await;
    housekeeping.shutdown().await;
    state.store.close().await;
    info!("herald stopped");
    Ok(())
}

/// Raises this process's soft open-files limit to its hard limit (children
/// inherit it) and returns the new soft limit: every connection is a file,
/// and the default soft limit (1024) is far below `connections.max`.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

/// Tells the service manager (systemd's `NOTIFY_SOCKET`) about a state
/// change; without one it does nothing. A failure is logged, never fatal.
fn notify_service_manager(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "cannot notify the service manager");
    }
}
