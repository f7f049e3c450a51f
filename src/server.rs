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
use tracing::info;

use crate::actors::key_registry::{KeyRegistryArgs, RedisMode};
use crate::actors::supervisor::ActorTree;
use crate::config::{Config, ConfigError, Secret};
use crate::http::auth::Auth;
use crate::http::{admin, listener_filter, public, AppState};
use crate::idempotency::hot_tier::HotTier;
use crate::store;

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

/// Runs the daemon until `shutdown` resolves.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let auth = Auth::new(
        required(&config.admin_token, "admin_token", "HERALD_ADMIN_TOKEN")?,
        required(&config.jwt_secret, "jwt_secret", "HERALD_JWT_SECRET")?,
    );
    let prometheus = crate::telemetry::prometheus();

    let store = store::connect(&config).await?;
    store
        .migrate()
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
    let actors = ActorTree::start(KeyRegistryArgs {
        store: store.clone(),
        hot,
        mode: redis_mode.clone(),
        ttl: Duration::from_secs(config.idempotency.ttl_secs),
        probe_interval: Duration::from_millis(config.redis.probe_interval_ms),
    })
    .await?;

    let state = AppState {
        config: config.clone(),
        store,
        keys: actors.keys.clone(),
        actors: actors.clone(),
        auth,
        redis_mode,
        prometheus,
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let (public_addr, admin_addr) = listeners.addresses()?;
    info!(%public_addr, %admin_addr, backend = state.store.backend(), "herald serving");
    let public_server = warp::serve(listener_filter(state.clone(), public::dispatch))
        .incoming(listeners.public)
        .graceful(stopped(stop_rx.clone()))
        .run();
    let admin_server = warp::serve(listener_filter(state.clone(), admin::dispatch))
        .incoming(listeners.admin)
        .graceful(stopped(stop_rx))
        .run();
    tokio::join!(public_server, admin_server);
    actors.stop();
    info!("herald stopped");
    Ok(())
}
