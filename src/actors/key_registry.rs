//! KeyRegistry: watches the Redis hot tier of the idempotency protocol
//! ([`crate::idempotency::protocol`]) and brings it back.
//!
//! Keys are resolved on the requesting task ([`Idempotency`](crate::idempotency::protocol::Idempotency)),
//! never through this actor's mailbox (routing every request through a
//! mailbox cost about a fifth of the intake throughput in `herald bench
//! intake`). A Redis call that fails there switches the shared
//! [`RedisMode`] to fallback (database only) at once. This actor probes
//! Redis every `redis.probe_interval_ms` and switches back when it
//! answers; it is the only place that leaves fallback.

use std::time::Duration;

use async_trait::async_trait;

use super::periodic::{Every, Periodic};

use crate::idempotency::hot_tier::{HotTier, RedisMode};
use crate::telemetry::metrics as m;

/// Everything a KeyRegistry needs; cloned into each restart.
#[derive(Clone)]
pub struct KeyRegistryArgs {
    pub hot: Option<HotTier>,
    pub mode: RedisMode,
    pub probe_interval: Duration,
}

/// The KeyRegistry: a [`Probe`] of Redis every `redis.probe_interval_ms`
/// (and at start); without a hot tier, nothing.
pub type KeyRegistry = Every<Probe>;

/// One probe of the hot tier.
pub struct Probe {
    args: KeyRegistryArgs,
}

#[async_trait]
impl Periodic for Probe {
    type Args = KeyRegistryArgs;
    const AT_START: bool = true;

    fn period(args: &KeyRegistryArgs) -> Option<Duration> {
        args.hot.is_some().then_some(args.probe_interval)
    }

    fn start(args: KeyRegistryArgs) -> Self {
        m::redis_fallback(!args.mode.is_healthy() && args.hot.is_some());
        Probe { args }
    }

    async fn run(&mut self) {
        let args = &self.args;
        // Bounded by Redis's command timeout; only probes queue here.
        if let Some(hot) = &args.hot {
            match hot.probe().await {
                Ok(()) => args.mode.recovered(),
                Err(e) => args.mode.lost(&e),
            }
        }
    }
}
