//! The provider's request rate, kept by the whole fleet: [`SendPacer`].
//!
//! `email.max_per_sec` is the provider *account's* limit (Resend's is per
//! API key), and every process sending with that key shares it. So in
//! production the processes take their slots from one limiter in Redis: a
//! GCRA whose whole state is one key, the time the next request may leave
//! (its "theoretical arrival time"), moved on by `1/rate` per request in one
//! atomic script call ([`FLEET_SCRIPT`]), with Redis's own clock, so the
//! processes' clocks never matter. Each request takes the next free slot
//! and waits for it: no burst, so the fleet together never exceeds the rate.
//!
//! The rate itself is the lower of `email.max_per_sec` and what the provider
//! says on every answer (`ratelimit-limit`, [`super::reply::advertised_rate`]):
//! a provider that allows less than configured is believed at once, and
//! when it allows as much again the configured rate comes back.
//!
//! Requests are spaced [`JITTER_MARGIN`] wider than `1/rate`: a provider
//! counts requests per sliding second *as they arrive*, and two requests
//! that left exactly one window apart can arrive a millisecond closer.
//!
//! With Redis unreachable a process does not stop sending: it falls back to
//! a limiter of its own at a conservative share of the rate — the rate
//! divided by the number of processes that took slots from Redis in the
//! last minute as it last saw it (two, if it never reached Redis) — and
//! tries Redis again a second later. A 429's `retry-after` holds off the
//! whole fleet (in Redis) and this process (locally). The embedded mode is
//! one process: the local limiter alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use fred::prelude::{Client, LuaInterface};
use tokio::time::Instant;

use crate::rate::Pacer;
use crate::telemetry::metrics;

/// The fleet's limiter: `KEYS[1]` holds the next free slot (microseconds of
/// Redis's clock), `KEYS[2]` the processes that took a slot in the last
/// minute (a sorted set, scored by when). `ARGV`: the operation (`take`,
/// `hold`), the interval in microseconds, this process's name, and for
/// `hold` the pause. Returns `{wait_us, processes}`: how long the caller
/// waits for the slot it took (0 for `hold`), and how many processes share
/// the limiter. The hash tag keeps both keys in one Redis Cluster slot.
pub const FLEET_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = 0
if ARGV[1] == 'take' then
  wait = tat - now
  tat = tat + interval
  redis.call('ZADD', KEYS[2], now, ARGV[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60000000)
  redis.call('PEXPIRE', KEYS[2], 120000)
else
  local hold = now + tonumber(ARGV[4])
  if hold > tat then tat = hold end
end
redis.call('SET', KEYS[1], tat, 'PX', math.floor((tat - now) / 1000) + 60000)
return {wait, redis.call('ZCARD', KEYS[2])}
"#;

/// How much wider than `1/rate` requests are spaced (5 %): network jitter
/// must not put one more request into a provider's window than it allows.
pub const JITTER_MARGIN: f64 = 1.05;

/// The limiter's keys.
pub const SLOT_KEY: &str = "herald:{email-rate}:next-slot";
pub const SENDERS_KEY: &str = "herald:{email-rate}:senders";

/// How long a process keeps to its own limiter after Redis failed it.
const FLEET_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The limiter in Redis, and what this process last learned from it.
struct Fleet {
    client: Client,
    /// This process's name in the senders set.
    name: String,
    /// Processes sharing the limiter, as last seen (0: never reached).
    processes: AtomicU64,
    /// Until when Redis is not asked again (it failed).
    down_until: Mutex<Option<Instant>>,
    /// The fleet's next free slot as this process last saw it.
    next_free: Mutex<Instant>,
}

/// Herald's outbound rate to the provider, shared by every sender of the
/// process and, with Redis, by every process of the fleet.
pub struct SendPacer {
    configured: f64,
    /// The provider's last `ratelimit-limit` (f64 bits; 0: none seen).
    advertised: AtomicU64,
    /// This process's own limiter: the embedded mode's, and the fallback.
    local: Pacer,
    fleet: Option<Fleet>,
}

impl SendPacer {
    /// A pacer of this process alone, `per_sec` requests a second.
    pub fn new(per_sec: f64) -> SendPacer {
        let pacer = SendPacer {
            configured: per_sec,
            advertised: AtomicU64::new(0),
            local: Pacer::new(per_sec / JITTER_MARGIN),
            fleet: None,
        };
        pacer.publish();
        pacer
    }

    /// A pacer sharing `per_sec` with every process using the same Redis
    /// (`client`); `name` tells this process apart.
    pub fn shared(per_sec: f64, client: Client, name: String) -> SendPacer {
        let pacer = SendPacer {
            fleet: Some(Fleet {
                client,
                name,
                processes: AtomicU64::new(0),
                down_until: Mutex::new(None),
                next_free: Mutex::new(Instant::now()),
            }),
            ..SendPacer::new(per_sec)
        };
        // Until Redis first answers, the fallback is a share.
        pacer.local.set_rate(pacer.local_rate());
        pacer.publish();
        pacer
    }

    /// The rate paced to now: the configured one, or less if the provider
    /// says so.
    pub fn rate(&self) -> f64 {
        let advertised = f64::from_bits(self.advertised.load(Ordering::Acquire));
        if advertised > 0.0 {
            self.configured.min(advertised)
        } else {
            self.configured
        }
    }

    /// The provider's answer said it allows `per_sec` (its
    /// `ratelimit-limit`); `None` leaves the rate as it is.
    pub fn advertised(&self, per_sec: Option<f64>) {
        let Some(per_sec) = per_sec.filter(|r| r.is_finite() && *r > 0.0) else {
            return;
        };
        let before = self.rate();
        self.advertised.store(per_sec.to_bits(), Ordering::Release);
        let now = self.rate();
        if (now - before).abs() > f64::EPSILON {
            tracing::info!(
                configured = self.configured,
                advertised = per_sec,
                pacing = now,
                "the provider's advertised limit changed the pace"
            );
        }
        self.local.set_rate(self.local_rate());
        self.publish();
    }

    /// How many processes the rate is shared by when this one paces alone:
    /// one without a fleet; in a fleet, those it last saw (two if none).
    fn share(&self) -> f64 {
        match &self.fleet {
            None => 1.0,
            Some(fleet) => match fleet.processes.load(Ordering::Acquire) {
                0 => 2.0,
                seen => seen as f64,
            },
        }
    }

    /// The local limiter's rate: all of it alone, a share in a fleet (the
    /// margin taken off either way).
    fn local_rate(&self) -> f64 {
        self.rate() / JITTER_MARGIN / self.share()
    }

    /// `herald_email_pace_per_sec`: the rate and the limiter in use.
    fn publish(&self) {
        match (&self.fleet, self.fleet_usable()) {
            (Some(_), Some(_)) => metrics::email_pace("fleet", self.rate()),
            _ => metrics::email_pace("local", self.rate() / self.share()),
        }
    }

    /// The fleet limiter, unless Redis failed within the last second.
    fn fleet_usable(&self) -> Option<&Fleet> {
        let fleet = self.fleet.as_ref()?;
        let down = fleet.down_until.lock().map(|d| *d).unwrap_or(None);
        match down {
            Some(until) if Instant::now() < until => None,
            _ => Some(fleet),
        }
    }

    /// One call of [`FLEET_SCRIPT`]; on failure the process keeps to its
    /// own limiter for a while.
    async fn call_fleet(&self, fleet: &Fleet, op: &str, extra: u64) -> Option<(u64, u64)> {
        let interval_us = (1e6 * JITTER_MARGIN / self.rate()).round().max(1.0) as u64;
        let args: Vec<String> = vec![
            op.to_string(),
            interval_us.to_string(),
            fleet.name.clone(),
            extra.to_string(),
        ];
        // EVAL, not EVALSHA: fred's script cache needs its `sha-1` feature,
        // and the script is a few hundred bytes once per request.
        let answer: Result<Vec<i64>, _> = fleet
            .client
            .eval(FLEET_SCRIPT, vec![SLOT_KEY, SENDERS_KEY], args)
            .await;
        match answer.as_deref() {
            Ok([wait, processes]) => {
                if let Ok(mut down) = fleet.down_until.lock() {
                    if down.take().is_some() {
                        tracing::info!("the email rate is the fleet's again (Redis answers)");
                    }
                }
                let processes = u64::try_from(*processes).unwrap_or(1).max(1);
                fleet.processes.store(processes, Ordering::Release);
                self.local.set_rate(self.local_rate());
                self.publish();
                Some((u64::try_from(*wait).unwrap_or(0), interval_us))
            }
            other => {
                let error = match other {
                    Err(e) => e.to_string(),
                    Ok(reply) => format!("unexpected reply {reply:?}"),
                };
                if let Ok(mut down) = fleet.down_until.lock() {
                    if down.is_none() {
                        tracing::warn!(
                            %error,
                            share = self.local_rate(),
                            "the fleet's email rate limiter in Redis failed; sending at this \
                             process's share alone"
                        );
                    }
                    *down = Some(Instant::now() + FLEET_RETRY_AFTER);
                }
                self.local.set_rate(self.local_rate());
                self.publish();
                None
            }
        }
    }

    /// Waits for this caller's slot.
    pub async fn until_ready(&self) {
        if let Some(fleet) = self.fleet_usable() {
            if let Some((wait_us, interval_us)) = self.call_fleet(fleet, "take", 0).await {
                let wait = Duration::from_micros(wait_us);
                if let Ok(mut next) = fleet.next_free.lock() {
                    *next = Instant::now() + wait + Duration::from_micros(interval_us);
                }
                tokio::time::sleep(wait).await;
                return;
            }
        }
        self.local.until_ready().await;
    }

    /// Waits until the next slot is free, as far as this process knows,
    /// without taking it (no Redis call: the slot's owner asks when it
    /// takes it).
    pub async fn until_free(&self) {
        if let Some(fleet) = self.fleet_usable() {
            let next = fleet.next_free.lock().map(|n| *n).ok();
            if let Some(next) = next {
                tokio::time::sleep_until(next).await;
            }
            return;
        }
        self.local.until_free().await;
    }

    /// No slot before `pause` from now, for the whole fleet (the provider
    /// said 429).
    pub async fn hold_off(&self, pause: Duration) {
        self.local.hold_off(pause);
        if let Some(fleet) = self.fleet_usable() {
            if let Ok(mut next) = fleet.next_free.lock() {
                *next = (*next).max(Instant::now() + pause);
            }
            let pause_us = u64::try_from(pause.as_micros()).unwrap_or(u64::MAX / 2);
            let _ = self.call_fleet(fleet, "hold", pause_us).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_follows_the_provider_down_at_once_and_back_up_to_the_configured_rate() {
        let pacer = SendPacer::new(2.0);
        assert_eq!(pacer.rate(), 2.0);
        pacer.advertised(Some(1.0));
        assert_eq!(pacer.rate(), 1.0, "down at once");
        pacer.advertised(None);
        assert_eq!(
            pacer.rate(),
            1.0,
            "an answer without the header changes nothing"
        );
        pacer.advertised(Some(10.0));
        assert_eq!(pacer.rate(), 2.0, "never above the configured rate");
        pacer.advertised(Some(f64::NAN));
        assert_eq!(pacer.rate(), 2.0);
    }

    #[tokio::test(start_paused = true)]
    async fn alone_it_spaces_requests_by_the_advertised_rate_and_the_margin() {
        let pacer = SendPacer::new(4.0);
        pacer.advertised(Some(1.0));
        let start = Instant::now();
        for _ in 0..3 {
            pacer.until_ready().await;
        }
        let took = start.elapsed().as_secs_f64();
        assert!(
            (took - 2.0 * JITTER_MARGIN).abs() < 0.01,
            "1/s with the margin, not 4/s: {took}"
        );
    }
}
