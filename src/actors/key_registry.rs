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

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::idempotency::hot_tier::{HotTier, RedisMode};
use crate::telemetry::metrics as m;

/// Messages the KeyRegistry actor handles.
pub enum KeyRegistryMsg {
    /// Time to probe Redis.
    Probe,
}

/// Everything a KeyRegistry needs; cloned into each restart.
#[derive(Clone)]
pub struct KeyRegistryArgs {
    pub hot: Option<HotTier>,
    pub mode: RedisMode,
    pub probe_interval: Duration,
}

pub struct KeyRegistry;

pub struct KeyRegistryState {
    args: KeyRegistryArgs,
    /// The probe schedule (none without a hot tier), stopped with the actor.
    _ticker: Option<super::Ticker>,
}

impl Actor for KeyRegistry {
    type Msg = KeyRegistryMsg;
    type State = KeyRegistryState;
    type Arguments = KeyRegistryArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: KeyRegistryArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let ticker = args.hot.is_some().then(|| {
            let ticker =
                super::Ticker::every(&myself, args.probe_interval, || KeyRegistryMsg::Probe);
            let _ = myself.cast(KeyRegistryMsg::Probe);
            ticker
        });
        m::redis_fallback(!args.mode.is_healthy() && args.hot.is_some());
        Ok(KeyRegistryState {
            args,
            _ticker: ticker,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let KeyRegistryMsg::Probe = message;
        let args = &state.args;
        // Bounded by Redis's command timeout; only probes queue here.
        if let Some(hot) = &args.hot {
            match hot.probe().await {
                Ok(()) => args.mode.recovered(),
                Err(e) => args.mode.lost(&e),
            }
        }
        Ok(())
    }
}
