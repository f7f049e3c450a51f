//! The one way Herald builds a Redis client (fred), for the broker's streams
//! and the idempotency hot tier alike.
//!
//! Redis is never waited for: a client is built and connects in the
//! background, and reconnects (at most 200 ms apart) for as long as it takes —
//! *including when its very first connect fails*. fred's `fail_fast`, on by
//! default, ends the connection task at a failed first connect instead, so
//! a process started while Redis was down would never use it, even long
//! after Redis came back: its hot tier stuck in fallback, its relay unable
//! to publish, its stream hub unable to start. Every command is bounded by
//! `command_timeout` and tried once (the callers own their retries), and
//! the queue to the connection task is bounded, so a stalled Redis cannot
//! pile commands up in memory.

use std::time::Duration;

use fred::prelude::{Builder, Client, ClientLike, Config, ReconnectPolicy};

/// How a client (re)connects, for ever: after 5 ms, then twice as long
/// each time up to 200 ms apart, plus up to 20 ms of jitter. fred waits a
/// policy's first delay even before the very first connect, so it is small:
/// a healthy Redis is in use at once, a returning one is noticed within a
/// fifth of a second.
fn reconnect_policy() -> ReconnectPolicy {
    ReconnectPolicy::Exponential {
        attempts: 0,
        max_attempts: 0,
        min_delay: 5,
        max_delay: 200,
        base: 2,
        jitter: 20,
    }
}

/// A client for `url` (`redis://`, `rediss://`, `redis-sentinel://`,
/// `redis-cluster://`), already connecting in the background.
pub fn client(url: &str, command_timeout: Duration) -> Result<Client, fred::error::Error> {
    let mut config = Config::from_url(url)?;
    config.fail_fast = false;
    let client = Builder::from_config(config)
        .with_performance_config(|p| p.default_command_timeout = command_timeout)
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(1);
            c.internal_command_timeout = command_timeout;
            c.max_command_attempts = 1;
            c.max_command_buffer_len = 10_000;
        })
        .set_policy(reconnect_policy())
        .build()?;
    client.connect();
    Ok(client)
}
