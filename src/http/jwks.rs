//! The board's identity provider's public keys: a JWKS document (RFC 7517)
//! from `auth.jwks_url` or `auth.jwks_file`, as Auth0, Clerk, Cognito or
//! Keycloak publish it.
//!
//! Only RS256 and ES256 (P-256) signing keys are kept; each key verifies
//! tokens of its own algorithm only, so a token that names HS256 can never
//! be checked against a public key (the "public key as HMAC secret" forgery).
//! The keys are read at start (a start with unreadable keys fails), and
//! again when a token names a key not held: a provider rotates by
//! publishing the new key first. Such a refresh happens at most once a
//! minute ([`MIN_REFRESH`]), whatever tokens arrive, so random
//! `kid`s cannot make Herald hammer the provider; until then an unknown key
//! is a 401.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

use crate::telemetry::metrics as m;

/// The least time between two refreshes a token's unknown `kid` causes.
pub const MIN_REFRESH: Duration = Duration::from_secs(60);

/// The largest JWKS document read (a provider's has a handful of keys).
const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// Where the keys come from.
enum Source {
    File(PathBuf),
    /// The client, the URL, and the setting that named it (`auth.jwks_url`,
    /// or `auth.oidc_issuer` whose discovery document gave it).
    Url(reqwest::Client, reqwest::Url, &'static str),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(path) => write!(f, "auth.jwks_file {}", path.display()),
            Source::Url(_, url, setting) if *setting == "auth.jwks_url" => {
                write!(f, "auth.jwks_url {url}")
            }
            Source::Url(_, url, setting) => write!(f, "{setting}: its jwks_uri {url}"),
        }
    }
}

/// A signing key: the algorithm it verifies, and the key.
type Key = (Algorithm, Arc<DecodingKey>);

pub struct KeySet {
    source: Source,
    /// By `kid` (a key without one is kept under "").
    keys: RwLock<Arc<HashMap<String, Key>>>,
    /// When a token's unknown `kid` last made Herald read the keys again.
    last_refresh: tokio::sync::Mutex<Option<Instant>>,
    min_refresh: Duration,
}

/// Why the identity provider's keys could not be had at start.
#[derive(Debug, thiserror::Error)]
pub enum IdentityProviderError {
    /// The settings name no usable document: a URL that does not parse, a
    /// file that cannot be read, a document that is not a JWKS or holds no
    /// signing key. The daemon exits 2, naming `key`, the setting at fault
    /// (`auth.jwks_url`, `auth.jwks_file`, `auth.oidc_issuer`).
    #[error("{message}")]
    Settings { key: &'static str, message: String },
    /// The identity provider did not answer with the document (no
    /// connection, a timeout, an error status): a neighbour that is down,
    /// not a setting. The daemon exits 3.
    #[error("{0}")]
    Unreachable(String),
}

impl KeySet {
    /// Reads the keys of a URL (with the setting that named it) or
    /// `auth.jwks_file` (`None` when neither is set). An unreadable
    /// document, or one without a single RS256/ES256 key, is an error: the
    /// daemon does not start.
    pub async fn load(
        url: Option<(&'static str, &str)>,
        file: Option<&PathBuf>,
        min_refresh: Duration,
    ) -> Result<Option<Arc<KeySet>>, IdentityProviderError> {
        let source = match (url, file) {
            (Some((setting, url)), _) => {
                let url =
                    reqwest::Url::parse(url).map_err(|e| IdentityProviderError::Settings {
                        key: setting,
                        message: format!("{setting}: {e}"),
                    })?;
                Source::Url(provider_client(setting)?, url, setting)
            }
            (None, Some(path)) => Source::File(path.clone()),
            (None, None) => return Ok(None),
        };
        let set = KeySet {
            source,
            keys: RwLock::new(Arc::new(HashMap::new())),
            last_refresh: tokio::sync::Mutex::new(None),
            min_refresh,
        };
        let keys = set.fetch("start").await?;
        if keys.is_empty() {
            return Err(
                set.settings_error(format!("{}: no RS256 or ES256 signing key", set.source))
            );
        }
        set.replace(keys);
        Ok(Some(Arc::new(set)))
    }

    fn held(&self) -> Arc<HashMap<String, Key>> {
        // Plain data behind the lock: a poisoned one is still usable.
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn replace(&self, keys: HashMap<String, Key>) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
    }

    /// The key that verifies a token of `alg` naming `kid`: held, or held
    /// after one refresh (when none ran for `min_refresh`).
    pub async fn key(&self, kid: Option<&str>, alg: Algorithm) -> Option<Arc<DecodingKey>> {
        if let Some(key) = pick(&self.held(), kid, alg) {
            return Some(key);
        }
        let mut last = self.last_refresh.lock().await;
        // Another request may have refreshed while this one waited.
        if let Some(key) = pick(&self.held(), kid, alg) {
            return Some(key);
        }
        if last.is_some_and(|at| at.elapsed() < self.min_refresh) {
            return None;
        }
        *last = Some(Instant::now());
        match self.fetch("unknown_kid").await {
            Ok(keys) if !keys.is_empty() => self.replace(keys),
            Ok(_) => {
                tracing::warn!(source = %self.source, "the identity provider's key set has no usable key; keeping the keys held")
            }
            Err(error) => {
                tracing::warn!(%error, "refreshing the identity provider's keys failed; keeping the keys held")
            }
        }
        pick(&self.held(), kid, alg)
    }

    /// A settings error naming the setting the keys come from.
    fn settings_error(&self, message: String) -> IdentityProviderError {
        let key = match &self.source {
            Source::File(_) => "auth.jwks_file",
            Source::Url(_, _, setting) => setting,
        };
        IdentityProviderError::Settings { key, message }
    }

    /// Reads and parses the document.
    async fn fetch(
        &self,
        reason: &'static str,
    ) -> Result<HashMap<String, Key>, IdentityProviderError> {
        let read = match &self.source {
            Source::File(path) => tokio::fs::read(path)
                .await
                .map_err(|e| self.settings_error(format!("{}: {e}", self.source))),
            Source::Url(client, url, _) => fetch_url(client, url)
                .await
                .map_err(|e| IdentityProviderError::Unreachable(format!("{}: {e}", self.source))),
        };
        let parsed = read.and_then(|bytes| {
            serde_json::from_slice::<JwkSet>(&bytes).map_err(|e| {
                self.settings_error(format!("{}: not a JWKS document: {e}", self.source))
            })
        });
        m::jwks_fetch(reason, if parsed.is_ok() { "ok" } else { "error" });
        Ok(signing_keys(&parsed?))
    }
}

/// The HTTP client for the identity provider's documents: a 5 s bound on
/// each read, Herald's name as the user agent (`key`: the setting it serves).
pub(super) fn provider_client(key: &'static str) -> Result<reqwest::Client, IdentityProviderError> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| IdentityProviderError::Settings {
            key,
            message: format!("{key}: building the HTTP client: {e}"),
        })
}

/// The body of a GET, if it is a success and at most 1 MiB.
pub(super) async fn fetch_url(
    client: &reqwest::Client,
    url: &reqwest::Url,
) -> Result<Vec<u8>, String> {
    let mut response = client
        .get(url.clone())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("answered {}", response.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(format!("a document over {MAX_DOCUMENT_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The RS256 and ES256 signing keys of a set, by `kid`.
fn signing_keys(set: &JwkSet) -> HashMap<String, Key> {
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let alg = match (&jwk.common.key_algorithm, &jwk.algorithm) {
            (Some(KeyAlgorithm::RS256), AlgorithmParameters::RSA(_)) => Algorithm::RS256,
            (Some(KeyAlgorithm::ES256), AlgorithmParameters::EllipticCurve(ec))
                if ec.curve == EllipticCurve::P256 =>
            {
                Algorithm::ES256
            }
            (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
            (None, AlgorithmParameters::EllipticCurve(ec)) if ec.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            // Another algorithm, or a symmetric key: never a user token's.
            _ => continue,
        };
        if let Ok(key) = DecodingKey::from_jwk(jwk) {
            let kid = jwk.common.key_id.clone().unwrap_or_default();
            keys.insert(kid, (alg, Arc::new(key)));
        }
    }
    keys
}

/// The held key for `kid` (a token without `kid`: the one key of its
/// algorithm, if there is exactly one), only if it verifies `alg`.
fn pick(
    keys: &HashMap<String, Key>,
    kid: Option<&str>,
    alg: Algorithm,
) -> Option<Arc<DecodingKey>> {
    match kid {
        Some(kid) => keys
            .get(kid)
            .filter(|(held, _)| *held == alg)
            .map(|(_, key)| key.clone()),
        None => {
            let mut of_alg = keys.values().filter(|(held, _)| *held == alg);
            match (of_alg.next(), of_alg.next()) {
                (Some((_, key)), None) => Some(key.clone()),
                _ => None,
            }
        }
    }
}
