//! Abuse limits of the public listener: who a client is, how fast it may
//! apply, charge, log in and connect streams, and how many streams it may
//! hold open.
//!
//! A client is its IP address — the TCP peer's, or, only when the operator
//! names one (`limits.trusted_proxy_header`), the last address in the header
//! their own reverse proxy writes. IPv6 clients are counted per /64 (one
//! host usually holds the whole prefix). Each limited action has its own
//! GCRA token bucket per client (`governor`'s keyed limiter): a client over
//! its bucket gets 429 `rate_limited` with `Retry-After`, and nobody else is
//! affected. Stream connects over the rate, and connects past
//! `limits.streams_per_ip` open streams, are turned away the way SPEC 5
//! sheds load — HTTP 200 carrying only a jittered `retry:` — because a
//! browser's EventSource stops reconnecting for good on any other status.
//!
//! These limits sit in front of the per-process ones (`sse.admit_per_sec`,
//! the database pool): they stop one address from using up what all share.
//! `limits.per_ip = false` turns them off (load tests from one address).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use http::HeaderMap;

use super::problem::ApiError;
use crate::config::LimitsConfig;

/// The per-client actions with a bucket of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Apply,
    Charge,
    DevLogin,
    StreamConnect,
}

/// One action's per-client bucket.
struct Bucket {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
}

impl Bucket {
    fn new(per_sec: f64, burst: u32) -> Bucket {
        // Validated in `Config`: per_sec > 0 and burst ≥ 1.
        let period = Duration::from_secs_f64(1.0 / per_sec.max(1e-6)).max(Duration::from_nanos(1));
        let quota = Quota::with_period(period)
            .unwrap_or(Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        Bucket {
            limiter: DefaultKeyedRateLimiter::keyed(quota),
        }
    }

    /// `Ok`, or how long until this client has a token again.
    fn take(&self, client: &IpAddr) -> Result<(), Duration> {
        self.limiter
            .check_key(client)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// The public listener's per-client limits (shared by every request).
pub struct AbuseLimits {
    /// Off: every check passes (`limits.per_ip = false`).
    per_ip: bool,
    /// Header holding the client address, set by the operator's own proxy.
    trusted_proxy_header: Option<http::HeaderName>,
    apply: Bucket,
    charge: Bucket,
    dev_login: Bucket,
    stream_connect: Bucket,
    /// Most streams one client may hold open at once.
    streams_per_ip: usize,
    /// Open streams per client; an entry leaves when its count reaches 0.
    open_streams: Mutex<HashMap<IpAddr, usize>>,
}

/// One open stream's place in its client's count, given back on drop.
pub struct StreamSlot {
    limits: Arc<AbuseLimits>,
    client: IpAddr,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.limits.open_streams.lock() {
            if let Some(count) = open.get_mut(&self.client) {
                *count -= 1;
                if *count == 0 {
                    open.remove(&self.client);
                }
            }
        }
    }
}

/// Why a stream connect was turned away.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamRefused {
    /// This client connects faster than `limits.stream_connects_per_sec`.
    OverRate,
    /// This client already holds `limits.streams_per_ip` open streams.
    TooManyOpen,
}

impl AbuseLimits {
    pub fn new(config: &LimitsConfig) -> AbuseLimits {
        AbuseLimits {
            per_ip: config.per_ip,
            trusted_proxy_header: config
                .trusted_proxy_header
                .as_deref()
                .and_then(|h| http::HeaderName::from_bytes(h.trim().as_bytes()).ok()),
            apply: Bucket::new(config.apply_per_sec, config.apply_burst),
            charge: Bucket::new(config.charges_per_sec, config.charges_burst),
            dev_login: Bucket::new(config.dev_login_per_sec, config.dev_login_burst),
            stream_connect: Bucket::new(
                config.stream_connects_per_sec,
                config.stream_connect_burst,
            ),
            streams_per_ip: config.streams_per_ip,
            open_streams: Mutex::new(HashMap::new()),
        }
    }

    /// The client a request is counted against: the trusted header's last
    /// address when one is configured and present, else the TCP peer.
    pub fn client_of(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> IpAddr {
        let from_header = self.trusted_proxy_header.as_ref().and_then(|name| {
            // The last entry is the one the operator's proxy appended; the
            // ones before it are whatever the client claimed.
            let value = headers.get_all(name).iter().next_back()?.to_str().ok()?;
            value.rsplit(',').next()?.trim().parse::<IpAddr>().ok()
        });
        let ip = from_header
            .or(peer.map(|p| p.ip()))
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        per_host(ip)
    }

    /// Takes a token from `client`'s bucket for `action`, or says 429.
    pub fn check(&self, action: Action, client: IpAddr) -> Result<(), ApiError> {
        if !self.per_ip {
            return Ok(());
        }
        let bucket = match action {
            Action::Apply => &self.apply,
            Action::Charge => &self.charge,
            Action::DevLogin => &self.dev_login,
            Action::StreamConnect => &self.stream_connect,
        };
        bucket.take(&client).map_err(|wait| {
            crate::telemetry::metrics::rate_limited(action.name());
            ApiError::RateLimited {
                // Whole seconds, rounded up: never earlier than a token.
                retry_after_secs: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
            }
        })
    }

    /// Admits one more stream for `client`: over the connect rate or at the
    /// open-stream cap it is refused; otherwise the slot is held until the
    /// stream ends.
    pub fn open_stream(
        self: &Arc<Self>,
        client: IpAddr,
    ) -> Result<Option<StreamSlot>, StreamRefused> {
        if !self.per_ip {
            return Ok(None);
        }
        if self.check(Action::StreamConnect, client).is_err() {
            return Err(StreamRefused::OverRate);
        }
        let mut open = self
            .open_streams
            .lock()
            .map_err(|_| StreamRefused::TooManyOpen)?;
        let count = open.entry(client).or_insert(0);
        if *count >= self.streams_per_ip {
            if *count == 0 {
                open.remove(&client);
            }
            crate::telemetry::metrics::rate_limited("streams_open");
            return Err(StreamRefused::TooManyOpen);
        }
        *count += 1;
        Ok(Some(StreamSlot {
            limits: self.clone(),
            client,
        }))
    }

    /// Forgets clients whose buckets are full again, so the tables hold only
    /// recent clients (called periodically by the server).
    pub fn forget_idle_clients(&self) {
        for bucket in [
            &self.apply,
            &self.charge,
            &self.dev_login,
            &self.stream_connect,
        ] {
            bucket.limiter.retain_recent();
            bucket.limiter.shrink_to_fit();
        }
    }
}

impl Action {
    /// The metric label.
    fn name(self) -> &'static str {
        match self {
            Action::Apply => "apply",
            Action::Charge => "charge",
            Action::DevLogin => "dev_login",
            Action::StreamConnect => "stream_connect",
        }
    }
}

/// An IPv6 client is its /64; an IPv4 client (or IPv4-mapped) its address.
fn per_host(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Refuses a JSON body nested deeper than `max_depth` arrays/objects before
/// it is parsed (serde_json's own limit is 128 and recursive). Strings are
/// skipped, escapes included; malformed JSON is left to the parser.
pub fn check_json_depth(body: &[u8], max_depth: usize) -> Result<(), ApiError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(ApiError::InvalidBody(format!(
                        "JSON nested deeper than {max_depth} levels"
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_sec: f64, burst: u32, streams: usize, header: Option<&str>) -> Arc<AbuseLimits> {
        Arc::new(AbuseLimits::new(&LimitsConfig {
            per_ip: true,
            trusted_proxy_header: header.map(str::to_string),
            apply_per_sec: per_sec,
            apply_burst: burst,
            charges_per_sec: per_sec,
            charges_burst: burst,
            dev_login_per_sec: per_sec,
            dev_login_burst: burst,
            stream_connects_per_sec: 1000.0,
            stream_connect_burst: 1000,
            streams_per_ip: streams,
            request_timeout_ms: 1000,
            json_max_depth: 4,
        }))
    }

    #[test]
    fn a_burst_is_allowed_then_refused_with_a_whole_second_retry_after() {
        let l = limits(0.5, 3, 1, None);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(l.check(Action::Apply, a).is_ok());
        }
        match l.check(Action::Apply, a) {
            Err(ApiError::RateLimited { retry_after_secs }) => {
                assert!((1..=2).contains(&retry_after_secs), "{retry_after_secs}")
            }
            other => panic!("expected 429, got {other:?}"),
        }
        // Another client, and another action of the same client, are apart.
        assert!(l.check(Action::Apply, b).is_ok());
        assert!(l.check(Action::Charge, a).is_ok());
    }

    #[test]
    fn open_streams_are_capped_per_client_and_given_back_on_drop() {
        let l = limits(1.0, 1, 2, None);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let s1 = l.open_stream(a).unwrap();
        let _s2 = l.open_stream(a).unwrap();
        assert_eq!(l.open_stream(a).err(), Some(StreamRefused::TooManyOpen));
        assert!(l.open_stream("10.0.0.2".parse().unwrap()).is_ok());
        drop(s1);
        assert!(l.open_stream(a).is_ok());
    }

    #[test]
    fn the_proxy_header_is_ignored_unless_configured_and_its_last_entry_counts() {
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "6.6.6.6, 203.0.113.9".parse().unwrap());
        let off = limits(1.0, 1, 1, None);
        assert_eq!(off.client_of(Some(peer), &headers), peer.ip());
        let on = limits(1.0, 1, 1, Some("X-Forwarded-For"));
        assert_eq!(
            on.client_of(Some(peer), &headers),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        // A garbled header falls back to the peer, never to a claimed address.
        headers.insert("x-forwarded-for", "not-an-ip".parse().unwrap());
        assert_eq!(on.client_of(Some(peer), &headers), peer.ip());
    }

    #[test]
    fn ipv6_clients_are_counted_per_64() {
        let l = limits(1.0, 1, 1, None);
        let a: SocketAddr = "[2001:db8:1:2:aaaa::1]:1".parse().unwrap();
        let b: SocketAddr = "[2001:db8:1:2:bbbb::9]:1".parse().unwrap();
        let h = HeaderMap::new();
        assert_eq!(l.client_of(Some(a), &h), l.client_of(Some(b), &h));
    }

    #[test]
    fn nesting_past_the_limit_is_refused_but_brackets_in_strings_are_not_counted() {
        assert!(check_json_depth(br#"{"a":[[1]]}"#, 4).is_ok());
        assert!(check_json_depth(br#"{"a":"[[[[[[[[\"[[[["}"#, 4).is_ok());
        assert!(matches!(
            check_json_depth(br#"{"a":[[[[1]]]]}"#, 4),
            Err(ApiError::InvalidBody(_))
        ));
    }
}
