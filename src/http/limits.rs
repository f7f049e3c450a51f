//! Abuse limits of the public listener: who a client is, how fast it may
//! apply, charge, log in and connect streams, and how many streams it may
//! hold open.
//!
//! Authenticated actions (apply, charges) are limited **per principal**: a
//! campus, office or carrier NAT puts hundreds of people behind one address,
//! and one of them applying fast must not refuse the others. Their address
//! only meets a generous ceiling shared by all its authenticated requests
//! (`limits.authenticated_per_ip_per_sec`, `…_burst`), there to stop one
//! host minting users to get around the per-user bucket. Anonymous actions
//! (dev login, stream connects) can only be counted per address.
//!
//! A client is its IP address — the TCP peer's, or, when the peer is one of
//! the operator's own reverse proxies (`limits.trusted_proxies`), the
//! right-most address of the header they append to
//! (`limits.trusted_proxy_header`) that is not itself a trusted proxy
//! ([`TrustedProxies::client_of`]): the entries left of it are whatever the
//! client claimed, and a peer outside the list is never believed, so nobody
//! who reaches the port directly can pick an address. IPv6 clients are
//! counted per /64 (one host usually holds the whole prefix). Each limited action has its own
//! token bucket per client ([`KeyedBuckets`], Herald's one rate primitive): a client over
//! its bucket gets 429 `rate_limited` with `Retry-After`, and nobody else is
//! affected. Stream connects over the rate, and connects past
//! `limits.streams_per_ip` open streams, are turned away the way the stream
//! sheds load — HTTP 200 carrying only a jittered `retry:` — because a
//! browser's EventSource stops reconnecting for good on any other status.
//!
//! These limits sit in front of the per-process ones (`sse.admit_per_sec`,
//! the database pool): they stop one address from using up what all share.
//! `limits.per_ip = false` turns them off (load tests from one address).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderMap;

use super::problem::ApiError;
use crate::config::{AdminConfig, LimitsConfig};
use crate::rate::KeyedBuckets;

/// The per-client actions with a bucket of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Apply,
    Charge,
    DevLogin,
    StreamConnect,
    /// An anonymous `GET /api/jobs`.
    JobList,
}

/// One action's bucket per client (an address, or a principal).
type Bucket<K = IpAddr> = KeyedBuckets<K>;

fn bucket<K: std::hash::Hash + Eq + Clone>(per_sec: f64, burst: u32) -> Bucket<K> {
    // Validated in `Config`: per_sec > 0 and burst ≥ 1.
    KeyedBuckets::new(per_sec, f64::from(burst.max(1)))
}

/// The operator's reverse proxies and the header they write: who may say
/// which address a request comes from.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    header: Option<http::HeaderName>,
    nets: Vec<ipnet::IpNet>,
}

impl TrustedProxies {
    /// From the `[limits]` settings (validated at start).
    pub fn new(config: &LimitsConfig) -> TrustedProxies {
        TrustedProxies {
            header: config
                .trusted_proxy_header
                .as_deref()
                .and_then(|h| http::HeaderName::from_bytes(h.trim().as_bytes()).ok()),
            nets: crate::config::trusted_proxy_nets(&config.trusted_proxies).unwrap_or_default(),
        }
    }

    /// Whether `ip` is one of the operator's proxies (an IPv4-mapped IPv6
    /// peer is its IPv4 address).
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.header.is_some() && self.nets.iter().any(|net| net.contains(&ip))
    }

    /// The address a request from `peer` with `headers` comes from: a
    /// trusted peer's header, read right to left past the trusted proxies
    /// (every header line, in order, as one list), else the peer itself. A
    /// garbled entry ends the walk at the last address known good, so a
    /// client can never name someone else by writing nonsense.
    pub fn client_of(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        let Some(name) = self.header.as_ref().filter(|_| self.is_trusted(peer)) else {
            return peer;
        };
        let mut client = peer;
        let lines: Vec<&http::HeaderValue> = headers.get_all(name).iter().collect();
        for line in lines.into_iter().rev() {
            let Ok(line) = line.to_str() else {
                return client;
            };
            for entry in line.rsplit(',') {
                match parse_forwarded_entry(entry) {
                    Some(ip) => {
                        client = ip;
                        if !self.is_trusted(ip) {
                            return client;
                        }
                    }
                    None => return client,
                }
            }
        }
        client
    }

    pub fn is_empty(&self) -> bool {
        self.header.is_none() || self.nets.is_empty()
    }
}

/// One `X-Forwarded-For` entry: an address, an IPv6 one possibly in
/// brackets, either possibly with a port.
fn parse_forwarded_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    entry
        .parse::<SocketAddr>()
        .ok()
        .map(|s| s.ip().to_canonical())
        .or_else(|| {
            let inner = entry.strip_prefix('[')?.split(']').next()?;
            inner.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
        })
}

/// The public listener's per-client limits (shared by every request).
pub struct AbuseLimits {
    /// Off: every check passes (`limits.per_ip = false`).
    per_ip: bool,
    /// Who may say which address a request comes from.
    proxies: TrustedProxies,
    /// Per principal.
    apply: Bucket<String>,
    charge: Bucket<String>,
    /// Per address: every authenticated request's ceiling.
    authenticated: Bucket,
    dev_login: Bucket,
    stream_connect: Bucket,
    job_list: Bucket,
    /// Most streams one client may hold open at once.
    streams_per_ip: usize,
    /// Open streams per client.
    open_streams: Arc<OpenPerClient>,
    /// Wrong admin credentials per address (both listeners): never off.
    admin_failures: Bucket,
}

/// How many of something (streams, connections) each client holds open; an
/// entry leaves when its count reaches 0.
#[derive(Default)]
pub struct OpenPerClient {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open thing's place in its client's count, given back on drop.
pub struct ClientSlot {
    table: Arc<OpenPerClient>,
    client: IpAddr,
}

/// An open stream's place in its client's count.
pub type StreamSlot = ClientSlot;

impl OpenPerClient {
    /// One more for `client`, unless it already holds `cap`.
    pub fn admit(self: &Arc<Self>, client: IpAddr, cap: usize) -> Option<ClientSlot> {
        let mut open = self.open.lock().ok()?;
        let count = open.entry(client).or_insert(0);
        if *count >= cap {
            if *count == 0 {
                open.remove(&client);
            }
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            table: self.clone(),
            client,
        })
    }
}

impl ClientSlot {
    /// The client this place counts for.
    pub fn client(&self) -> IpAddr {
        self.client
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.table.open.lock() {
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
    pub fn new(config: &LimitsConfig, admin: &AdminConfig) -> AbuseLimits {
        AbuseLimits {
            per_ip: config.per_ip,
            proxies: TrustedProxies::new(config),
            apply: bucket(config.apply_per_sec, config.apply_burst),
            charge: bucket(config.charges_per_sec, config.charges_burst),
            authenticated: bucket(
                config.authenticated_per_ip_per_sec,
                config.authenticated_per_ip_burst,
            ),
            dev_login: bucket(config.dev_login_per_sec, config.dev_login_burst),
            stream_connect: bucket(config.stream_connects_per_sec, config.stream_connect_burst),
            job_list: bucket(config.job_lists_per_sec, config.job_list_burst),
            streams_per_ip: config.streams_per_ip,
            open_streams: Arc::default(),
            admin_failures: bucket(
                f64::from(admin.failed_auth_per_min) / 60.0,
                admin.failed_auth_per_min,
            ),
        }
    }

    /// 429 while `client` has presented more wrong admin credentials than
    /// `admin.failed_auth_per_min` allows (a right one is not even checked:
    /// a guesser learns nothing until the minute is over).
    pub fn admin_locked(&self, client: IpAddr) -> Result<(), ApiError> {
        self.admin_failures
            .peek(&client)
            .map_err(|wait| refused("admin_auth", wait))
    }

    /// Counts a wrong admin credential `client` presented.
    pub fn admin_failed(&self, client: IpAddr) {
        let _ = self.admin_failures.try_take(&client);
    }

    /// The client a request is counted against (per host: an IPv6 client
    /// is its /64): see [`TrustedProxies::client_of`].
    pub fn client_of(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> IpAddr {
        let peer = peer.map_or(IpAddr::from([0, 0, 0, 0]), |p| p.ip());
        per_host(self.proxies.client_of(peer, headers))
    }

    /// Who may say which address a request comes from.
    pub fn proxies(&self) -> &TrustedProxies {
        &self.proxies
    }

    /// Takes a token for an anonymous `action` from `client`'s bucket, or
    /// says 429.
    pub fn check(&self, action: Action, client: IpAddr) -> Result<(), ApiError> {
        if !self.per_ip {
            return Ok(());
        }
        let bucket = match action {
            Action::DevLogin => &self.dev_login,
            Action::StreamConnect => &self.stream_connect,
            Action::JobList => &self.job_list,
            // Authenticated actions go through `check_user`; asked here, the
            // address's ceiling is what applies.
            Action::Apply | Action::Charge => &self.authenticated,
        };
        bucket
            .try_take(&client)
            .map_err(|wait| refused(action.name(), wait))
    }

    /// Takes a token for an authenticated `action` from `principal`'s own
    /// bucket, then one from the ceiling of the address it came from; 429 if
    /// either is empty. The principal's bucket goes first, so one user over
    /// their limit does not spend the address's ceiling that others share.
    pub fn check_user(
        &self,
        action: Action,
        principal: &str,
        client: IpAddr,
    ) -> Result<(), ApiError> {
        if !self.per_ip {
            return Ok(());
        }
        let bucket = match action {
            Action::Apply => &self.apply,
            Action::Charge => &self.charge,
            Action::DevLogin | Action::StreamConnect | Action::JobList => {
                return self.check(action, client)
            }
        };
        bucket
            .try_take(&principal.to_string())
            .map_err(|wait| refused(action.name(), wait))?;
        self.authenticated
            .try_take(&client)
            .map_err(|wait| refused("authenticated_per_ip", wait))
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
        match self.open_streams.admit(client, self.streams_per_ip) {
            Some(slot) => Ok(Some(slot)),
            None => {
                crate::telemetry::metrics::rate_limited("streams_open");
                Err(StreamRefused::TooManyOpen)
            }
        }
    }

    /// Forgets clients whose buckets are full again, so the tables hold only
    /// recent clients (called periodically by the server).
    pub fn forget_idle_clients(&self) {
        for bucket in [&self.apply, &self.charge] {
            bucket.forget_full();
        }
        for bucket in [
            &self.authenticated,
            &self.dev_login,
            &self.stream_connect,
            &self.job_list,
            &self.admin_failures,
        ] {
            bucket.forget_full();
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
            Action::JobList => "job_list",
        }
    }
}

/// The 429 for a bucket that is empty for `wait` more, counted by `label`.
fn refused(label: &'static str, wait: Duration) -> ApiError {
    crate::telemetry::metrics::rate_limited(label);
    ApiError::RateLimited {
        // Whole seconds, rounded up: never earlier than a token.
        retry_after_secs: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
    }
}

/// An IPv6 client is its /64; an IPv4 client (or IPv4-mapped) its address.
pub fn per_host(ip: IpAddr) -> IpAddr {
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
        Arc::new(AbuseLimits::new(
            &LimitsConfig {
                per_ip: true,
                trusted_proxy_header: header.map(str::to_string),
                trusted_proxies: "127.0.0.1, 10.0.0.0/8".into(),
                apply_per_sec: per_sec,
                apply_burst: burst,
                charges_per_sec: per_sec,
                charges_burst: burst,
                authenticated_per_ip_per_sec: 1.0,
                authenticated_per_ip_burst: 100,
                dev_login_per_sec: per_sec,
                dev_login_burst: burst,
                stream_connects_per_sec: 1000.0,
                stream_connect_burst: 1000,
                job_lists_per_sec: 1000.0,
                job_list_burst: 1000,
                streams_per_ip: streams,
                request_timeout_ms: 1000,
                json_max_depth: 4,
            },
            &AdminConfig {
                tokens: Default::default(),
                tokens_file: None,
                failed_auth_per_min: 3,
            },
        ))
    }

    #[test]
    fn wrong_admin_credentials_lock_the_address_out_not_others() {
        let l = limits(1.0, 3, 1, None);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..3 {
            assert!(l.admin_locked(a).is_ok());
            l.admin_failed(a);
        }
        assert!(matches!(
            l.admin_locked(a),
            Err(ApiError::RateLimited {
                retry_after_secs: 20
            })
        ));
        assert!(l.admin_locked(b).is_ok());
    }

    #[test]
    fn a_burst_is_allowed_then_refused_with_a_whole_second_retry_after() {
        let l = limits(0.5, 3, 1, None);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..3 {
            assert!(l.check_user(Action::Apply, "ada", a).is_ok());
        }
        match l.check_user(Action::Apply, "ada", a) {
            Err(ApiError::RateLimited { retry_after_secs }) => {
                assert!((1..=2).contains(&retry_after_secs), "{retry_after_secs}")
            }
            other => panic!("expected 429, got {other:?}"),
        }
        // Another user behind the same address, and another action of the
        // same user, are apart.
        assert!(l.check_user(Action::Apply, "bob", a).is_ok());
        assert!(l.check_user(Action::Charge, "ada", a).is_ok());
    }

    #[test]
    fn an_address_meets_only_its_ceiling_however_many_users_it_carries() {
        let l = limits(0.01, 1, 1, None);
        let nat: IpAddr = "10.0.0.1".parse().unwrap();
        // Ceiling burst 100: a hundred users at once are all let through …
        for user in 0..100 {
            assert!(l
                .check_user(Action::Apply, &format!("u{user}"), nat)
                .is_ok());
        }
        // … the next one meets the address's ceiling, another address not.
        assert!(l.check_user(Action::Apply, "u100", nat).is_err());
        assert!(l
            .check_user(Action::Apply, "u101", "10.0.0.2".parse().unwrap())
            .is_ok());
    }

    #[test]
    fn anonymous_actions_are_counted_per_address() {
        let l = limits(0.5, 2, 1, None);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(l.check(Action::DevLogin, a).is_ok());
        assert!(l.check(Action::DevLogin, a).is_ok());
        assert!(l.check(Action::DevLogin, a).is_err());
        assert!(l
            .check(Action::DevLogin, "10.0.0.2".parse().unwrap())
            .is_ok());
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_proxy_header_is_ignored_unless_configured_and_its_last_entry_counts() {
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "6.6.6.6, 203.0.113.9".parse().unwrap());
        let off = limits(1.0, 1, 1, None);
        assert_eq!(off.client_of(Some(peer), &headers), peer.ip());
        let on = limits(1.0, 1, 1, Some("X-Forwarded-For"));
        assert_eq!(on.client_of(Some(peer), &headers), ip("203.0.113.9"));
        // A garbled header falls back to the peer, never to a claimed address.
        headers.insert("x-forwarded-for", "not-an-ip".parse().unwrap());
        assert_eq!(on.client_of(Some(peer), &headers), peer.ip());
    }

    #[test]
    fn only_a_trusted_peer_is_believed_and_trusted_hops_are_skipped_from_the_right() {
        let on = limits(1.0, 1, 1, Some("X-Forwarded-For"));
        let mut headers = HeaderMap::new();
        // A client claimed 6.6.6.6; the edge proxy appended the client, the
        // inner one (10.0.0.7, trusted) the edge's address.
        headers.append("x-forwarded-for", "6.6.6.6, 198.51.100.4".parse().unwrap());
        headers.append("x-forwarded-for", "10.0.0.7".parse().unwrap());
        let proxy: SocketAddr = "10.0.0.9:4000".parse().unwrap();
        assert_eq!(on.client_of(Some(proxy), &headers), ip("198.51.100.4"));
        // The same header straight from an untrusted peer is ignored.
        let direct: SocketAddr = "192.0.2.50:4000".parse().unwrap();
        assert_eq!(on.client_of(Some(direct), &headers), ip("192.0.2.50"));
        // Only trusted hops: the left-most of them is the client.
        headers.insert("x-forwarded-for", "10.1.2.3, 10.0.0.7".parse().unwrap());
        assert_eq!(on.client_of(Some(proxy), &headers), ip("10.1.2.3"));
        // Ports and brackets are taken off; a garbled entry stops the walk.
        headers.insert("x-forwarded-for", "[2001:db8::1]:443".parse().unwrap());
        assert_eq!(on.client_of(Some(proxy), &headers), ip("2001:db8::"));
        headers.insert(
            "x-forwarded-for",
            "6.6.6.6, junk, 10.0.0.7".parse().unwrap(),
        );
        assert_eq!(on.client_of(Some(proxy), &headers), ip("10.0.0.7"));
        // An IPv4-mapped peer is its IPv4 address.
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:1".parse().unwrap();
        headers.insert("x-forwarded-for", "198.51.100.4".parse().unwrap());
        assert_eq!(on.client_of(Some(mapped), &headers), ip("198.51.100.4"));
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
