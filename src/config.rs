//! Layered configuration.
//!
//! The built-in `config/default.toml` (compiled into the binary so the daemon
//! runs from any directory) is overlaid by the TOML file named in
//! `HERALD_CONFIG`, then by `HERALD_*` environment variables, nested keys joined
//! with `__` (`HERALD_RELAY__MAX_PUBLISH_PER_SEC=500` sets
//! `relay.max_publish_per_sec`). People also write a section's keys with a
//! single `_` (`HERALD_EMAIL_FROM`), so that form is read too: a name that
//! is not a top-level key and starts with a section's name and `_` sets that
//! section's key ([`env_key`]). A few third-party names are honoured as they
//! are spelled by their vendors: `RESEND_API_KEY`, `RESEND_BASE_URL`,
//! `SENTRY_DSN`.
//!
//! Loading fails with a message that names the offending key: unknown keys,
//! wrong types and out-of-range values are all refused at start. Secrets are
//! wrapped in [`Secret`], whose `Debug` output never shows the value.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// The defaults, as shipped in `config/default.toml`.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// The top-level keys that are not sections. `redis_url` and `database_url`
/// start like the `redis` and `database` sections, so these are matched
/// first. A unit test keeps this list equal to [`Config`]'s fields.
pub const TOP_LEVEL_KEYS: [&str; 10] = [
    "database_url",
    "redis_url",
    "listen",
    "admin_listen",
    "admin_token",
    "jwt_secret",
    "state_dir",
    "shutdown_deadline_ms",
    "sentry_dsn",
    "mode",
];

/// The sections (`[email]`, …); a unit test keeps the list equal to
/// [`Config`]'s table fields.
pub const SECTIONS: [&str; 16] = [
    "admin",
    "auth",
    "database",
    "redis",
    "idempotency",
    "relay",
    "email",
    "retry",
    "sse",
    "dlq",
    "janitor",
    "audit",
    "limits",
    "connections",
    "log",
    "telemetry",
];

/// The configuration key an environment variable sets, from its name
/// without the `HERALD_` prefix, in any case: `RELAY__MAX_PUBLISH_PER_SEC`
/// and `RELAY_MAX_PUBLISH_PER_SEC` both give `relay.max_publish_per_sec`,
/// `DATABASE_URL` gives `database_url`. A name that matches nothing is
/// returned as it is and refused by name when the configuration is read.
pub fn env_key(name: &str) -> String {
    let name = name.to_ascii_lowercase();
    if name.contains("__") {
        return name.replace("__", ".");
    }
    if TOP_LEVEL_KEYS.contains(&name.as_str()) {
        return name;
    }
    for section in SECTIONS {
        if let Some(field) = name
            .strip_prefix(section)
            .and_then(|rest| rest.strip_prefix('_'))
        {
            if !field.is_empty() {
                return format!("{section}.{field}");
            }
        }
    }
    name
}

/// Whether `url` may carry sign-in traffic: `https://`, or `http://` to a
/// loopback host (a provider on the same machine, as in tests). A token or
/// an authorization code must never cross a network in the clear.
pub fn is_sign_in_url(url: &str) -> bool {
    let Ok(url) = url::Url::parse(url) else {
        return false;
    };
    match (url.scheme(), url.host()) {
        ("https", Some(_)) => true,
        ("http", Some(url::Host::Ipv4(ip))) => ip.is_loopback(),
        ("http", Some(url::Host::Ipv6(ip))) => ip.is_loopback(),
        ("http", Some(url::Host::Domain(name))) => name == "localhost",
        _ => false,
    }
}

/// An absolute `http://` or `https://` URL with a host.
fn is_http_url(url: &str) -> bool {
    url.parse::<http::Uri>().is_ok_and(|u| {
        matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some_and(|h| !h.is_empty())
    })
}

/// Whether `name` and `hash` make a named operator credential
/// (`admin.tokens`): a name of 1-64 characters of `a-z0-9._-`, and
/// `sha256:` with 64 hex digits.
pub fn valid_operator(name: &str, hash: &str) -> bool {
    let name_ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    let hash_ok = hash
        .strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
    name_ok && hash_ok
}

/// A configuration problem, always naming the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Parse(String),
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

/// A secret string (token, password, API key). `Debug` and `Display` redact it.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself; call only where it is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Serialised as `[redacted]`: a rendered configuration never carries a secret.
impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("[redacted]")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// A database URL; it may carry a password, so `Debug` hides everything after the scheme.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn scheme(&self) -> &str {
        self.0.split("://").next().unwrap_or("")
    }

    /// What `herald config` shows: a SQLite path whole (a path is not a
    /// secret, and which file is in use is the question), a Postgres URL with
    /// its password (and any `…password=` parameter) redacted. A URL that
    /// does not parse shows its scheme alone.
    pub fn shown(&self) -> String {
        if self.scheme() == "sqlite" {
            return self.0.clone();
        }
        let Ok(mut url) = url::Url::parse(&self.0) else {
            return format!("{}://[redacted]", self.scheme());
        };
        if url.password().is_some() && url.set_password(Some("[redacted]")).is_err() {
            return format!("{}://[redacted]", self.scheme());
        }
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if k.contains("password") {
                    "[redacted]".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        if !pairs.is_empty() {
            url.query_pairs_mut().clear().extend_pairs(pairs);
        }
        url.to_string().replace("%5Bredacted%5D", "[redacted]")
    }
}

/// Serialised as [`DatabaseUrl::shown`]: no password.
impl Serialize for DatabaseUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.shown())
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({}://[redacted])", self.scheme())
    }
}

/// The whole configuration of one Herald process.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `postgres://…` (production) or `sqlite://…` (embedded); chooses the store backend.
    pub database_url: DatabaseUrl,
    /// Redis for the hot idempotency tier and the broker; absent means in-process.
    #[serde(default)]
    pub redis_url: Option<Secret>,
    /// Public listener (web page, `/api`).
    pub listen: SocketAddr,
    /// Admin listener (`/admin`, `/metrics`).
    pub admin_listen: SocketAddr,
    /// Bearer token for the admin listener.
    #[serde(default)]
    pub admin_token: Option<Secret>,
    /// HS256 secret shared with the job board's login, used to verify user JWTs.
    #[serde(default)]
    pub jwt_secret: Option<Secret>,
    /// Directory for generated secrets and embedded state.
    pub state_dir: PathBuf,
    /// After SIGTERM, the process exits within this long, finished or not.
    pub shutdown_deadline_ms: u64,
    /// Sentry DSN (`SENTRY_DSN`); absent disables error reporting.
    #[serde(default)]
    pub sentry_dsn: Option<Secret>,
    /// What this deployment must be: `production` refuses to start unless
    /// `database_url` is Postgres (so a unit or image whose settings did not
    /// load fails loudly instead of running embedded); `embedded` is the
    /// one-file try-out; unset, `database_url` decides.
    #[serde(default)]
    pub mode: Option<Mode>,
    pub admin: AdminConfig,
    pub auth: AuthConfig,
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub idempotency: IdempotencyConfig,
    pub relay: RelayConfig,
    pub email: EmailConfig,
    pub retry: RetryConfig,
    pub sse: SseConfig,
    pub dlq: DlqConfig,
    pub janitor: JanitorConfig,
    pub audit: AuditConfig,
    pub limits: LimitsConfig,
    pub connections: ConnectionsConfig,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
}

/// The two shapes of a deployment (`mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One process, one SQLite file, nothing else to run.
    Embedded,
    /// Postgres (and usually Redis, Resend, Sentry); several processes.
    Production,
}

/// Bounds on the TCP connections both listeners hold
/// ([`crate::http::connections`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionsConfig {
    /// A request head must be complete within this long of the server
    /// starting to wait for it (from the connect, or from the first byte
    /// after the previous response); past it the connection is closed.
    pub header_read_timeout_ms: u64,
    /// A keep-alive connection with no request in progress is closed after
    /// this long (above a load balancer's own idle timeout, 60 s on most).
    pub idle_timeout_ms: u64,
    /// Most connections the public listener holds at once; past it a new
    /// connection is answered 503 and closed at once.
    pub max: usize,
    /// Most connections one client address holds on the public listener
    /// (off with `limits.per_ip = false`).
    pub per_ip: usize,
    /// Most connections the admin listener holds at once.
    pub admin_max: usize,
    /// A connection that takes no byte of what Herald has to write for this
    /// long is closed (its unsent data discarded); also the sockets'
    /// `TCP_USER_TIMEOUT`.
    pub write_timeout_ms: u64,
    /// Longest request head (request line and headers); past it 431 and close.
    pub max_head_bytes: usize,
    /// Most header fields in one request head; past it 431 and close.
    pub max_headers: usize,
}
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Whether `POST /api/dev/login` exists. Absent: on in the embedded mode
    /// (a `sqlite://` database), off otherwise. Never on in production.
    #[serde(default)]
    pub dev_login: Option<bool>,
    /// Lifetime of a dev-login token.
    pub dev_token_ttl_secs: u64,
    /// The board's identity provider's public keys (RS256, ES256) as a JWKS
    /// document at this URL (`https://…/.well-known/jwks.json`).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// The same from a file (read at start and when a token names a key
    /// it does not hold).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Required `iss` of every user token, when set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Required `aud` of every user token (one of its audiences), when set.
    #[serde(default)]
    pub audience: Option<String>,
    /// A user token living longer than this (`exp` - `iat`, or `exp` - now)
    /// is refused, whoever signed it.
    pub max_token_lifetime_secs: u64,
    /// The board's OpenID Connect provider (its issuer URL): the page signs
    /// users in there (authorization code with PKCE) and uses the ID token
    /// as its Bearer. Its discovery document is read at start; its
    /// `jwks_uri` verifies the tokens unless `jwks_url`/`jwks_file` is set.
    #[serde(default)]
    pub oidc_issuer: Option<String>,
    /// The page's client id at that provider (a public client: no secret).
    /// ID tokens must name it in `aud`.
    #[serde(default)]
    pub oidc_client_id: Option<String>,
}

impl AuthConfig {
    /// Whether user tokens may be verified against an identity provider's keys.
    pub fn has_identity_provider(&self) -> bool {
        self.jwks_url.is_some() || self.jwks_file.is_some() || self.oidc_issuer.is_some()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Pool size; bounds the database work one process can have in flight.
    pub max_connections: u32,
    /// How long a request waits for a connection before it is answered 503.
    pub acquire_timeout_ms: u64,
    /// At start (`serve`, `migrate`, `audit`): how long an unreachable or
    /// busy database is retried before the command exits 3.
    pub connect_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Upper bound of every Redis command; past it the database answers alone.
    pub command_timeout_ms: u64,
    /// How often Redis is probed to notice loss and recovery.
    pub probe_interval_ms: u64,
}

/// Operators: named admin credentials, and how many wrong ones an address
/// may present.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Operator name → `sha256:<hex>` of their token. `admin_token`, when
    /// set, is the operator `admin`.
    #[serde(default)]
    pub tokens: std::collections::BTreeMap<String, String>,
    /// The same as lines `<name> sha256:<hex>` in a file (`#` comments).
    #[serde(default)]
    pub tokens_file: Option<PathBuf>,
    /// Wrong admin credentials one address may present per minute (on
    /// either listener) before its admin requests are answered 429.
    pub failed_auth_per_min: u32,
}

/// Traces: where spans go.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// An OTLP/HTTP collector's base URL (`http://collector:4318`); spans
    /// are posted to `<it>/v1/traces`. Unset: no traces.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the spans.
    pub service_name: String,
}

/// The janitor: what it deletes, how much at a time, how often.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JanitorConfig {
    /// Pause between two sweeps.
    pub interval_ms: u64,
    /// Rows per delete statement (keeps every lock short).
    pub batch: u32,
    /// How long settled outbox rows and inbox rows are kept.
    pub retention_secs: u64,
}

/// The auditor: how often it checks the effectively-once invariants.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Pause between two audits.
    pub interval_ms: u64,
    /// An event still unsettled this long after it was written is a violation.
    pub max_unsettled_age_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// Retention of a key and its stored response.
    pub ttl_secs: u64,
    /// How long an in-progress key is held before a retry may take it over.
    pub lease_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Whether this process runs the delivery pipeline (relay and consumers).
    /// Off for an intake-only process, e.g. `herald bench intake`'s daemon.
    pub enabled: bool,
    /// Catch-up publish rate of the outbox relay.
    pub max_publish_per_sec: u32,
    /// An event published but unconsumed for this long is published again.
    pub redeliver_after_secs: u64,
    /// Poll interval of the relay besides LISTEN/NOTIFY wake-ups.
    pub poll_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// `resend` or `file`.
    pub transport: String,
    /// Sender address of confirmation emails.
    pub from: String,
    /// Herald's own outbound rate to the email API, in requests per second
    /// (each request carries up to `max_batch` emails).
    pub max_per_sec: f64,
    /// Most emails in one request (`POST /emails/batch` takes up to 100).
    pub max_batch: u32,
    /// Longest a due email waits for others to share its request, when a
    /// request could go at once; under a backlog, the wait for the rate's
    /// next slot gathers the batch instead.
    pub batch_linger_ms: u64,
    /// Most requests to the email API in flight at once.
    pub workers: u32,
    /// `RESEND_API_KEY`.
    #[serde(default)]
    pub resend_api_key: Option<Secret>,
    /// `RESEND_BASE_URL`, so tests can point the transport at a local server.
    #[serde(default)]
    pub resend_base_url: Option<String>,
    /// The signing secret of the Resend webhook that posts to
    /// `/webhooks/resend` (`whsec_` and base64, as Resend shows it); unset,
    /// that route answers 404 and Herald never hears of bounces.
    #[serde(default)]
    pub webhook_secret: Option<Secret>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    pub base_ms: u64,
    pub cap_ms: u64,
    pub max_attempts: u32,
    /// The longest wait a downstream may impose (`retry-after`,
    /// `ratelimit-reset`); a longer one is cut to this.
    pub max_delay_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SseConfig {
    /// New stream connections admitted per second (a fifth of a second's
    /// worth may come at once); the rest get a jittered `retry:`.
    pub admit_per_sec: f64,
    /// Distinct jobs a client may fall behind before its queue becomes one
    /// snapshot (a job's newer event replaces its older one).
    pub client_queue: usize,
    /// Events kept for `Last-Event-ID` resume.
    pub history: usize,
    /// Jobs in the snapshot a new client receives.
    pub snapshot_jobs: usize,
    /// Open jobs the hub holds in memory, newest first, for snapshots of
    /// any filter.
    pub index_jobs: usize,
    /// How long a client may leave the snapshot its overflowing queue owes
    /// it untaken, while the queue keeps overflowing, before it is
    /// disconnected (it is not reading at all; it resumes).
    pub stall_timeout_ms: u64,
    /// Heartbeat comment interval on an open stream.
    pub heartbeat_ms: u64,
    /// Longest wait, after SIGTERM, for open connections before exiting.
    pub shutdown_grace_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DlqConfig {
    /// Alert when a topic holds more open dead letters than this.
    pub alert_threshold: u64,
    /// Alert when a topic's oldest open dead letter is older than this.
    pub alert_max_age_secs: u64,
    /// How often the DlqMonitor looks.
    pub check_interval_ms: u64,
}

/// The public listener's abuse limits ([`crate::http::limits`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// The per-client buckets and stream caps; off only for load tests
    /// that come from one address.
    pub per_ip: bool,
    /// Header the operator's own reverse proxy sets to the client address
    /// (e.g. `X-Forwarded-For`); believed only from a peer in
    /// `trusted_proxies`. Unset, the TCP peer is the client.
    #[serde(default)]
    pub trusted_proxy_header: Option<String>,
    /// The operator's reverse proxies, comma-separated addresses or CIDRs
    /// (`10.0.0.0/8, 2001:db8::/32`): only a TCP peer in this list is
    /// believed about the client, and the client is the right-most address
    /// of `trusted_proxy_header` that is not itself one of them. Empty: none.
    #[serde(default)]
    pub trusted_proxies: String,
    /// `POST /api/applications` per user: sustained rate and burst.
    pub apply_per_sec: f64,
    pub apply_burst: u32,
    /// `POST /api/charges` per user.
    pub charges_per_sec: f64,
    pub charges_burst: u32,
    /// Every authenticated action of one client address together: a
    /// ceiling generous enough for a NAT full of people.
    pub authenticated_per_ip_per_sec: f64,
    pub authenticated_per_ip_burst: u32,
    /// `POST /api/dev/login` per client.
    pub dev_login_per_sec: f64,
    pub dev_login_burst: u32,
    /// `GET /api/jobs/stream` connects per client.
    pub stream_connects_per_sec: f64,
    pub stream_connect_burst: u32,
    /// Anonymous `GET /api/jobs` per client.
    pub job_lists_per_sec: f64,
    pub job_list_burst: u32,
    /// Streams one client may hold open at once.
    pub streams_per_ip: usize,
    /// Longest a request may take to arrive and be answered (a stream's
    /// body is exempt once it started); past it 408 or 503.
    pub request_timeout_ms: u64,
    /// Deepest nesting of arrays/objects a JSON body may have.
    pub json_max_depth: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `pretty` or `json`.
    pub format: String,
    /// Default `tracing` filter; `RUST_LOG` overrides it.
    pub filter: String,
}

/// The longest retry window and provider-imposed delay allowed: a day.
const MAX_RETRY_DELAY_MS: u64 = 86_400_000;

/// The comma-separated addresses and CIDRs of `limits.trusted_proxies` (an
/// address alone is one host), or what is wrong with an entry.
pub fn trusted_proxy_nets(list: &str) -> Result<Vec<ipnet::IpNet>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            entry
                .parse::<ipnet::IpNet>()
                .map(|net| net.trunc())
                .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| format!("`{entry}` is not an IP address or CIDR (e.g. 10.0.0.0/8)"))
        })
        .collect()
}

/// Whether `secret` is a Svix-style signing secret: `whsec_` and the
/// base64 of a key that is not empty.
pub fn is_webhook_secret(secret: &str) -> bool {
    use base64::Engine;
    secret.trim().strip_prefix("whsec_").is_some_and(|encoded| {
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .is_ok_and(|key| !key.is_empty())
    })
}

/// Turns figment's errors into one message naming each key as it is written
/// in a file (`relay.max_publish_per_sec`) and, when it came from the
/// environment, the variable to fix (`HERALD_RELAY__MAX_PUBLISH_PER_SEC`).
fn describe(errors: figment::Error) -> ConfigError {
    let messages: Vec<String> = errors
        .into_iter()
        .map(|e| {
            let key = e.path.join(".").to_ascii_lowercase();
            let from_env = e
                .metadata
                .as_ref()
                .is_some_and(|m| m.name.contains("environment"));
            let source = match (&e.metadata, from_env) {
                (_, true) if !key.is_empty() => {
                    format!(
                        " (environment variable HERALD_{})",
                        key.to_ascii_uppercase().replace('.', "__")
                    )
                }
                (Some(m), _) => format!(" (from {})", m.name),
                (None, _) => String::new(),
            };
            if key.is_empty() {
                format!("{}{source}", e.kind)
            } else {
                format!("key `{key}`{source}: {}", e.kind)
            }
        })
        .collect();
    ConfigError::Parse(messages.join("; "))
}

impl Config {
    /// The embedded mode: a `sqlite://` database.
    pub fn is_embedded(&self) -> bool {
        self.database_url.scheme() == "sqlite"
    }

    /// Whether `POST /api/dev/login` exists: as `auth.dev_login` says, else
    /// only in the embedded mode on a loopback `listen` address — dev login
    /// hands a token for any email to whoever can reach the port, so it is
    /// never on unasked where others can.
    pub fn dev_login(&self) -> bool {
        self.auth
            .dev_login
            .unwrap_or_else(|| self.is_embedded() && self.listen.ip().is_loopback())
    }

    /// Loads defaults, the `HERALD_CONFIG` file and the process environment.
    pub fn load() -> Result<Config, ConfigError> {
        Self::from_figment(Self::figment())
    }

    /// The layered sources, exposed so tests can add their own on top.
    pub fn figment() -> Figment {
        let mut figment = Figment::new().merge(Toml::string(DEFAULT_TOML));
        if let Ok(path) = std::env::var("HERALD_CONFIG") {
            figment = figment.merge(Toml::file_exact(path));
        }
        figment
            .merge(
                Env::prefixed("HERALD_")
                    .ignore(&["CONFIG"])
                    .map(|name| env_key(name.as_str()).into()),
            )
            .merge(
                Env::raw()
                    .only(&["RESEND_API_KEY", "RESEND_BASE_URL"])
                    .map(|k| format!("email.{}", k.as_str().to_ascii_lowercase()).into()),
            )
            .merge(Env::raw().only(&["SENTRY_DSN"]))
    }

    /// The built-in defaults overlaid with one TOML document (no file, no
    /// environment): what a `HERALD_CONFIG` file alone would give. Used by
    /// the config fuzz target.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::from_figment(
            Figment::new()
                .merge(Toml::string(DEFAULT_TOML))
                .merge(Toml::string(text)),
        )
    }

    /// Extracts and validates a configuration from layered sources.
    pub fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(describe)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        fn check(ok: bool, key: &'static str, message: &str) -> Result<(), ConfigError> {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    key,
                    message: message.to_string(),
                })
            }
        }
        let scheme = self.database_url.scheme();
        check(
            matches!(scheme, "postgres" | "postgresql" | "sqlite"),
            "database_url",
            "must start with postgres:// or sqlite://",
        )?;
        match self.mode {
            Some(Mode::Production) => check(
                !self.is_embedded(),
                "database_url",
                "mode = production needs a Postgres database_url (HERALD_DATABASE_URL=postgres://…), \
                 but it is the embedded sqlite:// one: were the production settings (the \
                 environment file) loaded? For a one-file try-out set HERALD_MODE=embedded",
            )?,
            Some(Mode::Embedded) => check(
                self.is_embedded(),
                "database_url",
                "mode = embedded runs on a sqlite:// database_url; unset mode for Postgres",
            )?,
            None => {}
        }
        if let Some(url) = &self.redis_url {
            // One server, a Sentinel-watched primary, or a Cluster (fred's
            // URL forms: `?sentinelServiceName=…`, `?node=host:port`).
            const SCHEMES: [&str; 6] = [
                "redis://",
                "rediss://",
                "redis-sentinel://",
                "rediss-sentinel://",
                "redis-cluster://",
                "rediss-cluster://",
            ];
            check(
                SCHEMES.iter().any(|s| url.expose().starts_with(s)),
                "redis_url",
                "must start with redis://, rediss://, redis-sentinel:// or redis-cluster://",
            )?;
            check(
                fred::types::config::Config::from_url(url.expose()).is_ok(),
                "redis_url",
                "is not a Redis URL (a Sentinel URL needs ?sentinelServiceName=<name>)",
            )?;
        }
        check(
            self.admin_token
                .as_ref()
                .is_none_or(|t| t.expose().len() >= 16),
            "admin_token",
            "must be at least 16 characters",
        )?;
        check(
            self.jwt_secret
                .as_ref()
                .is_none_or(|t| t.expose().len() >= 32),
            "jwt_secret",
            "must be at least 32 bytes for HS256",
        )?;
        check(
            self.telemetry
                .otlp_endpoint
                .as_deref()
                .is_none_or(is_http_url),
            "telemetry.otlp_endpoint",
            "must be an http(s) URL (an OTLP/HTTP collector, e.g. http://127.0.0.1:4318)",
        )?;
        check(
            self.admin.failed_auth_per_min >= 1,
            "admin.failed_auth_per_min",
            "must be at least 1",
        )?;
        for (name, hash) in &self.admin.tokens {
            check(
                valid_operator(name, hash),
                "admin.tokens",
                "each name is 1-64 of a-z, 0-9, `.`, `_`, `-`, and each value `sha256:` and 64 hex digits",
            )?;
        }
        check(
            !(self.auth.jwks_url.is_some() && self.auth.jwks_file.is_some()),
            "auth.jwks_url",
            "and auth.jwks_file are alternatives: set one",
        )?;
        check(
            self.auth.jwks_url.as_deref().is_none_or(is_http_url),
            "auth.jwks_url",
            "must be an http(s) URL",
        )?;
        check(
            self.auth.oidc_issuer.is_some() == self.auth.oidc_client_id.is_some(),
            if self.auth.oidc_issuer.is_some() {
                "auth.oidc_client_id"
            } else {
                "auth.oidc_issuer"
            },
            "is required with the other: the page signs in with the provider's issuer \
             and the client id the page is registered under there",
        )?;
        check(
            self.auth.oidc_issuer.as_deref().is_none_or(is_sign_in_url),
            "auth.oidc_issuer",
            "must be an https:// URL (http:// only to a loopback host)",
        )?;
        check(
            self.auth
                .oidc_client_id
                .as_deref()
                .is_none_or(|id| !id.trim().is_empty() && id.len() <= 255),
            "auth.oidc_client_id",
            "must be 1-255 characters",
        )?;
        check(
            match (&self.auth.oidc_issuer, &self.auth.issuer) {
                (Some(oidc), Some(issuer)) => oidc == issuer,
                _ => true,
            },
            "auth.issuer",
            "differs from auth.oidc_issuer: the page's ID tokens carry the OpenID \
             provider's issuer and would all be refused (leave auth.issuer unset)",
        )?;
        check(
            self.auth.max_token_lifetime_secs >= 60,
            "auth.max_token_lifetime_secs",
            "must be at least 60",
        )?;

        check(
            self.database.max_connections >= 1,
            "database.max_connections",
            "must be at least 1",
        )?;
        check(
            self.shutdown_deadline_ms >= 1000,
            "shutdown_deadline_ms",
            "must be at least 1000 (a SIGTERM shutdown needs time to drain)",
        )?;
        check(
            self.idempotency.ttl_secs >= 1,
            "idempotency.ttl_secs",
            "must be at least 1",
        )?;
        check(
            self.idempotency.lease_secs >= 1,
            "idempotency.lease_secs",
            "must be at least 1",
        )?;
        check(
            self.redis.command_timeout_ms >= 1,
            "redis.command_timeout_ms",
            "must be at least 1",
        )?;
        check(
            self.redis.probe_interval_ms >= 10,
            "redis.probe_interval_ms",
            "must be at least 10",
        )?;
        check(
            self.janitor.batch >= 1 && self.janitor.batch <= 100_000,
            "janitor.batch",
            "must be from 1 to 100000",
        )?;
        check(
            self.janitor.interval_ms >= 10,
            "janitor.interval_ms",
            "must be at least 10",
        )?;
        check(
            self.dlq.check_interval_ms >= 10,
            "dlq.check_interval_ms",
            "must be at least 10",
        )?;
        let l = &self.limits;
        for (rate, burst, rate_key, burst_key) in [
            (
                l.apply_per_sec,
                l.apply_burst,
                "limits.apply_per_sec",
                "limits.apply_burst",
            ),
            (
                l.charges_per_sec,
                l.charges_burst,
                "limits.charges_per_sec",
                "limits.charges_burst",
            ),
            (
                l.authenticated_per_ip_per_sec,
                l.authenticated_per_ip_burst,
                "limits.authenticated_per_ip_per_sec",
                "limits.authenticated_per_ip_burst",
            ),
            (
                l.dev_login_per_sec,
                l.dev_login_burst,
                "limits.dev_login_per_sec",
                "limits.dev_login_burst",
            ),
            (
                l.stream_connects_per_sec,
                l.stream_connect_burst,
                "limits.stream_connects_per_sec",
                "limits.stream_connect_burst",
            ),
            (
                l.job_lists_per_sec,
                l.job_list_burst,
                "limits.job_lists_per_sec",
                "limits.job_list_burst",
            ),
        ] {
            check(
                rate.is_finite() && rate >= 0.001,
                rate_key,
                "must be at least 0.001 (turn every limit off with limits.per_ip = false)",
            )?;
            check(burst >= 1, burst_key, "must be at least 1")?;
        }
        check(
            l.streams_per_ip >= 1,
            "limits.streams_per_ip",
            "must be at least 1",
        )?;
        check(
            l.request_timeout_ms >= 100,
            "limits.request_timeout_ms",
            "must be at least 100",
        )?;
        check(
            (2..=128).contains(&l.json_max_depth),
            "limits.json_max_depth",
            "must be from 2 to 128",
        )?;
        check(
            l.trusted_proxy_header
                .as_deref()
                .is_none_or(|h| http::HeaderName::from_bytes(h.trim().as_bytes()).is_ok()),
            "limits.trusted_proxy_header",
            "must be an HTTP header name, e.g. X-Forwarded-For",
        )?;
        let proxies =
            trusted_proxy_nets(&l.trusted_proxies).map_err(|message| ConfigError::Invalid {
                key: "limits.trusted_proxies",
                message,
            })?;
        check(
            l.trusted_proxy_header.is_none() || !proxies.is_empty(),
            "limits.trusted_proxies",
            "is empty, so limits.trusted_proxy_header would never be believed: name your \
             reverse proxies' addresses (HERALD_LIMITS__TRUSTED_PROXIES=10.0.0.5,10.1.0.0/16)",
        )?;
        check(
            l.trusted_proxy_header.is_some() || proxies.is_empty(),
            "limits.trusted_proxy_header",
            "is unset, so limits.trusted_proxies has no header to believe: name the header \
             your proxy writes (HERALD_LIMITS__TRUSTED_PROXY_HEADER=X-Forwarded-For)",
        )?;
        let c = &self.connections;
        check(
            c.header_read_timeout_ms >= 100,
            "connections.header_read_timeout_ms",
            "must be at least 100",
        )?;
        check(
            c.idle_timeout_ms >= 100,
            "connections.idle_timeout_ms",
            "must be at least 100",
        )?;
        check(c.max >= 1, "connections.max", "must be at least 1")?;
        check(
            c.write_timeout_ms >= 100,
            "connections.write_timeout_ms",
            "must be at least 100",
        )?;
        check(
            (1024..=1_048_576).contains(&c.max_head_bytes),
            "connections.max_head_bytes",
            "must be from 1024 to 1048576",
        )?;
        check(
            (8..=1024).contains(&c.max_headers),
            "connections.max_headers",
            "must be from 8 to 1024",
        )?;
        check(c.per_ip >= 1, "connections.per_ip", "must be at least 1")?;
        check(
            c.admin_max >= 1,
            "connections.admin_max",
            "must be at least 1",
        )?;
        check(
            self.relay.max_publish_per_sec >= 1,
            "relay.max_publish_per_sec",
            "must be at least 1",
        )?;
        check(
            matches!(self.email.transport.as_str(), "resend" | "file"),
            "email.transport",
            "must be `resend` or `file`",
        )?;
        check(
            !self.email.from.contains(['\r', '\n']),
            "email.from",
            "must be one line (it is the From header)",
        )?;
        check(
            self.email.max_per_sec > 0.0,
            "email.max_per_sec",
            "must be positive",
        )?;
        check(
            (1..=100).contains(&self.email.max_batch),
            "email.max_batch",
            "must be between 1 and 100 (Resend's most emails per batch request)",
        )?;
        check(
            self.email.workers >= 1,
            "email.workers",
            "must be at least 1",
        )?;
        check(
            self.retry.base_ms >= 1 && self.retry.cap_ms >= self.retry.base_ms,
            "retry.cap_ms",
            "must be at least retry.base_ms, which must be at least 1",
        )?;
        check(
            self.retry.max_attempts >= 1,
            "retry.max_attempts",
            "must be at least 1",
        )?;
        check(
            self.retry.cap_ms <= MAX_RETRY_DELAY_MS,
            "retry.cap_ms",
            "must be at most 86400000 (a day)",
        )?;
        check(
            (1..=MAX_RETRY_DELAY_MS).contains(&self.retry.max_delay_ms),
            "retry.max_delay_ms",
            "must be from 1 to 86400000 (a day)",
        )?;
        check(
            self.email
                .webhook_secret
                .as_ref()
                .is_none_or(|s| is_webhook_secret(s.expose())),
            "email.webhook_secret",
            "must be the signing secret Resend shows for the webhook: `whsec_` and base64",
        )?;
        check(
            self.sse.admit_per_sec > 0.0,
            "sse.admit_per_sec",
            "must be positive",
        )?;
        check(
            self.sse.client_queue >= 1,
            "sse.client_queue",
            "must be at least 1",
        )?;
        check(self.sse.history >= 1, "sse.history", "must be at least 1")?;
        check(
            self.sse.stall_timeout_ms >= 100,
            "sse.stall_timeout_ms",
            "must be at least 100",
        )?;
        check(
            self.sse.heartbeat_ms >= 100,
            "sse.heartbeat_ms",
            "must be at least 100",
        )?;
        check(
            (1..=1000).contains(&self.sse.snapshot_jobs),
            "sse.snapshot_jobs",
            "must be between 1 and 1000",
        )?;
        check(
            (self.sse.snapshot_jobs..=1_000_000).contains(&self.sse.index_jobs),
            "sse.index_jobs",
            "must be at least sse.snapshot_jobs and at most 1000000",
        )?;
        check(
            matches!(self.log.format.as_str(), "pretty" | "json"),
            "log.format",
            "must be `pretty` or `json`",
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Serialized;

    #[test]
    fn herald_config_shows_a_sqlite_path_whole_and_a_postgres_url_less_its_password() {
        let shown = |url: &str| DatabaseUrl(url.to_string()).shown();
        assert_eq!(shown("sqlite://var/herald.db"), "sqlite://var/herald.db");
        assert_eq!(
            shown("postgres://herald:s3cret@db.internal:5432/herald"),
            "postgres://herald:[redacted]@db.internal:5432/herald"
        );
        assert_eq!(
            shown("postgres://herald@db/herald?sslmode=require&password=s3cret"),
            "postgres://herald@db/herald?sslmode=require&password=[redacted]"
        );
        assert_eq!(shown("postgres://db/herald"), "postgres://db/herald");
        assert_eq!(
            shown("postgres://herald:s3 cret@[bad"),
            "postgres://[redacted]"
        );
    }

    fn with(key: &str, value: impl serde::Serialize) -> Result<Config, ConfigError> {
        Config::from_figment(
            Figment::new()
                .merge(Toml::string(DEFAULT_TOML))
                .merge(Serialized::default(key, value)),
        )
    }

    #[test]
    fn defaults_load() {
        let config = with("listen", "127.0.0.1:8080").expect("defaults are valid");
        assert_eq!(config.relay.max_publish_per_sec, 500);
        assert_eq!(config.idempotency.ttl_secs, 86_400);
    }

    /// The default configuration as JSON (optional fields as `null`).
    fn default_json() -> serde_json::Value {
        serde_json::to_value(with("listen", "127.0.0.1:8080").unwrap()).unwrap()
    }

    #[test]
    fn the_key_lists_name_every_field_of_config() {
        let json = default_json();
        let fields = json.as_object().unwrap();
        let mut sections: Vec<&str> = fields
            .iter()
            .filter(|(_, v)| v.is_object())
            .map(|(k, _)| k.as_str())
            .collect();
        let mut top: Vec<&str> = fields
            .iter()
            .filter(|(_, v)| !v.is_object())
            .map(|(k, _)| k.as_str())
            .collect();
        let (mut want_sections, mut want_top) = (SECTIONS.to_vec(), TOP_LEVEL_KEYS.to_vec());
        for list in [&mut sections, &mut top, &mut want_sections, &mut want_top] {
            list.sort_unstable();
        }
        assert_eq!(sections, want_sections);
        assert_eq!(top, want_top);
    }

    #[test]
    fn trusted_proxies_parse_addresses_and_cidrs_and_name_a_bad_entry() {
        let nets = trusted_proxy_nets(" 10.0.0.5, 10.1.0.0/16,2001:db8::/32 ,").unwrap();
        assert_eq!(nets.len(), 3);
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(nets[0].contains(&ip("10.0.0.5")) && !nets[0].contains(&ip("10.0.0.6")));
        assert!(nets[1].contains(&ip("10.1.255.1")));
        let err = trusted_proxy_nets("10.0.0.0/8, proxy.internal").unwrap_err();
        assert!(err.contains("proxy.internal"), "{err}");
        assert!(trusted_proxy_nets("").unwrap().is_empty());
        // One without the other is refused at start, naming the missing key.
        let err = with("limits.trusted_proxies", "10.0.0.5").unwrap_err();
        assert!(err.to_string().contains("trusted_proxy_header"), "{err}");
        let err = with("limits.trusted_proxy_header", "X-Forwarded-For").unwrap_err();
        assert!(err.to_string().contains("trusted_proxies"), "{err}");
    }

    #[test]
    fn environment_names_map_to_keys_in_both_forms() {
        for (name, key) in [
            ("EMAIL_FROM", "email.from"),
            ("EMAIL__FROM", "email.from"),
            ("email_transport", "email.transport"),
            ("RELAY_MAX_PUBLISH_PER_SEC", "relay.max_publish_per_sec"),
            ("RELAY__MAX_PUBLISH_PER_SEC", "relay.max_publish_per_sec"),
            ("DATABASE_URL", "database_url"),
            ("REDIS_URL", "redis_url"),
            ("DATABASE_MAX_CONNECTIONS", "database.max_connections"),
            ("REDIS_COMMAND_TIMEOUT_MS", "redis.command_timeout_ms"),
            ("LIMITS_PER_IP", "limits.per_ip"),
            ("ADMIN_LISTEN", "admin_listen"),
            ("EMAILFROM", "emailfrom"),
        ] {
            assert_eq!(env_key(name), key, "{name}");
        }
    }

    #[test]
    fn dev_login_is_off_unasked_on_a_reachable_address() {
        let loopback = with("listen", "127.0.0.1:8080").unwrap();
        assert!(loopback.dev_login());
        let public = with("listen", "0.0.0.0:8080").unwrap();
        assert!(!public.dev_login());
        let asked = Config::from_figment(
            Figment::new()
                .merge(Toml::string(DEFAULT_TOML))
                .merge(Serialized::default("listen", "0.0.0.0:8080"))
                .merge(Serialized::default("auth.dev_login", true)),
        )
        .unwrap();
        assert!(asked.dev_login());
    }

    #[test]
    fn production_mode_refuses_the_embedded_database() {
        let err = with("mode", "production").unwrap_err();
        assert!(err.to_string().contains("HERALD_DATABASE_URL"), "{err}");
        let ok = Config::from_figment(
            Figment::new()
                .merge(Toml::string(DEFAULT_TOML))
                .merge(Serialized::default("mode", "production"))
                .merge(Serialized::default("database_url", "postgres://h@db/h")),
        );
        assert!(ok.is_ok());
    }

    #[test]
    fn a_wrong_type_names_the_key() {
        let err = with("relay.max_publish_per_sec", "fast").unwrap_err();
        assert!(
            err.to_string().contains("relay.max_publish_per_sec"),
            "{err}"
        );
    }

    #[test]
    fn an_unknown_key_is_refused_by_name() {
        let err = with("relay.max_publsh_per_sec", 5).unwrap_err();
        assert!(err.to_string().contains("max_publsh_per_sec"), "{err}");
    }

    #[test]
    fn an_out_of_range_value_names_the_key() {
        let err = with("email.transport", "pigeon").unwrap_err();
        assert!(err.to_string().contains("email.transport"), "{err}");
    }

    #[test]
    fn a_shutdown_deadline_too_short_to_drain_names_the_key() {
        let err = with("shutdown_deadline_ms", 0).unwrap_err();
        assert!(err.to_string().contains("shutdown_deadline_ms"), "{err}");
    }

    #[test]
    fn secrets_never_appear_in_debug_output() {
        let config = Config::from_figment(
            Figment::new()
                .merge(Toml::string(DEFAULT_TOML))
                .merge(Serialized::default(
                    "admin_token",
                    "super-secret-admin-token-value",
                ))
                .merge(Serialized::default(
                    "database_url",
                    "postgres://u:hunter2@localhost/db",
                )),
        )
        .unwrap();
        let printed = format!("{config:?}");
        assert!(!printed.contains("super-secret"), "{printed}");
        assert!(!printed.contains("hunter2"), "{printed}");
    }
}
