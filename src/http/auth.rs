//! Authentication of the two principals.
//!
//! - **user**: `Authorization: Bearer <JWT>` with claims `sub`, `email`,
//!   `exp` (and `iat`), either HS256-signed with `HERALD_JWT_SECRET` (the
//!   simple setup, and `POST /api/dev/login`), or RS256/ES256-signed by the
//!   board's identity provider, whose keys come from `auth.jwks_url` or
//!   `auth.jwks_file`, or the `jwks_uri` of `auth.oidc_issuer`'s discovery
//!   document ([`super::jwks`], [`super::oidc`]). `auth.issuer` (else
//!   `auth.oidc_issuer`) is checked on the provider's tokens when set, and
//!   `aud` must name `auth.audience` or `auth.oidc_client_id` when either
//!   is set (the page's ID tokens name the client); a token living longer than
//!   `auth.max_token_lifetime_secs` is refused whoever signed it. Any other
//!   algorithm (`none`, HS384, PS256…) is refused.
//! - **operator** (admin): `Authorization: Bearer <token>` of one of the
//!   named credentials of `admin.tokens`/`admin.tokens_file` (SHA-256
//!   digests; the tokens themselves are never stored), or `admin_token` as
//!   the operator `admin`. Every digest is compared, in constant time, so
//!   neither which operator nor the length leaks. The name is who the audit
//!   trail records.
//!
//! Every failure is the same 401 `unauthorized`; the detail says what was
//! wrong with the credential, never anything about the secret.

use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::HeaderMap;
use jsonwebtoken::{
    decode, decode_header, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::jwks::KeySet;
use super::oidc::SignInProvider;
use super::problem::ApiError;
use crate::config::{AuthConfig, Secret};
use crate::domain::{valid_email, User};

/// Seconds of clock difference allowed on `exp` (and lifetimes).
const LEEWAY_SECS: u64 = 5;

/// The claims Herald reads from a user JWT.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    email: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
}

/// What a user token must say besides its signature.
#[derive(Debug, Clone)]
struct TokenRules {
    issuer: Option<String>,
    /// One of these must be an `aud` of the token (none: `aud` unchecked):
    /// `auth.audience` (the board's API), and the page's OpenID client id
    /// (its ID tokens name the client).
    audiences: Vec<String>,
    max_lifetime_secs: u64,
}

/// HS256 with the shared secret: verification, and issuing for dev login.
#[derive(Clone)]
struct SharedSecret {
    decoding: Arc<DecodingKey>,
    encoding: EncodingKey,
}

/// Verifier (and, in dev mode, issuer) of credentials.
#[derive(Clone)]
pub struct Auth {
    /// Operators: each name with the SHA-256 of its token.
    operators: Arc<Vec<(String, [u8; 32])>>,
    /// HS256, when `jwt_secret` is set.
    shared: Option<SharedSecret>,
    /// The identity provider's keys, when `auth.jwks_url`/`jwks_file` is set.
    provider: Option<Arc<KeySet>>,
    /// Where the page signs users in, when `auth.oidc_issuer` is set.
    sign_in: Option<Arc<SignInProvider>>,
    rules: Arc<TokenRules>,
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(AUTHORIZATION)
        .ok_or(ApiError::Unauthorized("missing Authorization header"))?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthorized("malformed Authorization header"))?;
    let (scheme, token) = value.split_once(' ').ok_or(ApiError::Unauthorized(
        "expected `Authorization: Bearer <token>`",
    ))?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(ApiError::Unauthorized(
            "expected `Authorization: Bearer <token>`",
        ));
    }
    Ok(token.trim())
}

fn now_secs() -> u64 {
    chrono::Utc::now().timestamp().max(0) as u64
}

impl Auth {
    /// HS256 with `jwt_secret` alone, no issuer or audience, tokens of at
    /// most a day (tests, benchmarks, `herald attack`).
    pub fn new(admin_token: &Secret, jwt_secret: &Secret) -> Auth {
        Auth {
            operators: Arc::new(vec![(
                "admin".to_string(),
                Sha256::digest(admin_token.expose().as_bytes()).into(),
            )]),
            shared: Some(SharedSecret {
                decoding: Arc::new(DecodingKey::from_secret(jwt_secret.expose().as_bytes())),
                encoding: EncodingKey::from_secret(jwt_secret.expose().as_bytes()),
            }),
            provider: None,
            sign_in: None,
            rules: Arc::new(TokenRules {
                issuer: None,
                audiences: Vec::new(),
                max_lifetime_secs: 86_400,
            }),
        }
    }

    /// As configured: the operators, HS256 when `jwt_secret` is set, the
    /// OpenID provider's discovery document when `auth.oidc_issuer` is set,
    /// the identity provider's keys from `auth.jwks_url`/`jwks_file` or else
    /// the discovered `jwks_uri` (read now: an unreadable key set is an
    /// error), and the token rules of `auth`.
    pub async fn from_config(
        operators: Vec<(String, [u8; 32])>,
        jwt_secret: Option<&Secret>,
        auth: &AuthConfig,
    ) -> Result<Auth, super::jwks::IdentityProviderError> {
        let sign_in = match (&auth.oidc_issuer, &auth.oidc_client_id) {
            (Some(issuer), Some(client_id)) => {
                Some(Arc::new(SignInProvider::discover(issuer, client_id).await?))
            }
            _ => None,
        };
        let jwks_url = match (&auth.jwks_url, &auth.jwks_file, &sign_in) {
            (None, None, Some(sign_in)) => Some(("auth.oidc_issuer", sign_in.jwks_uri.as_str())),
            _ => auth.jwks_url.as_deref().map(|url| ("auth.jwks_url", url)),
        };
        let provider =
            KeySet::load(jwks_url, auth.jwks_file.as_ref(), super::jwks::MIN_REFRESH).await?;
        let audiences = auth
            .audience
            .iter()
            .chain(&auth.oidc_client_id)
            .cloned()
            .collect();
        Ok(Auth {
            operators: Arc::new(operators),
            shared: jwt_secret.map(|secret| SharedSecret {
                decoding: Arc::new(DecodingKey::from_secret(secret.expose().as_bytes())),
                encoding: EncodingKey::from_secret(secret.expose().as_bytes()),
            }),
            provider,
            sign_in,
            rules: Arc::new(TokenRules {
                issuer: auth.issuer.clone().or_else(|| auth.oidc_issuer.clone()),
                audiences,
                max_lifetime_secs: auth.max_token_lifetime_secs,
            }),
        })
    }

    /// Where the page signs users in (`auth.oidc_issuer`), if anywhere.
    pub fn sign_in(&self) -> Option<&SignInProvider> {
        self.sign_in.as_deref()
    }

    /// The operator an admin bearer token belongs to (their name).
    pub fn admin(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        let token = bearer(headers)?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Every digest is compared, matching or not: the time taken says
        // nothing of which operator (if any) matched.
        let mut found: Option<&str> = None;
        for (name, held) in self.operators.iter() {
            if bool::from(digest.ct_eq(held)) {
                found = Some(name);
            }
        }
        found
            .map(str::to_string)
            .ok_or(ApiError::Unauthorized("invalid admin token"))
    }

    /// The key that verifies a token of this header: the shared secret for
    /// HS256, the identity provider's key of that `kid` for RS256/ES256.
    async fn key_for(&self, header: &Header) -> Result<Arc<DecodingKey>, ApiError> {
        match header.alg {
            Algorithm::HS256 => self
                .shared
                .as_ref()
                .map(|s| s.decoding.clone())
                .ok_or(ApiError::Unauthorized("HS256 tokens are not accepted here")),
            Algorithm::RS256 | Algorithm::ES256 => match &self.provider {
                Some(keys) => keys
                    .key(header.kid.as_deref(), header.alg)
                    .await
                    .ok_or(ApiError::Unauthorized("token signed with an unknown key")),
                None => Err(ApiError::Unauthorized(
                    "RS256/ES256 tokens are not accepted here",
                )),
            },
            _ => Err(ApiError::Unauthorized("unsupported token algorithm")),
        }
    }

    /// Verifies a user JWT and returns who it names.
    pub async fn user(&self, headers: &HeaderMap) -> Result<User, ApiError> {
        let token = bearer(headers)?;
        // `alg: none` and unknown algorithms fail here already.
        let header = decode_header(token).map_err(|_| ApiError::Unauthorized("malformed token"))?;
        let key = self.key_for(&header).await?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECS;
        let mut required = vec!["exp", "sub"];
        // The issuer and audience are the identity provider's; the shared
        // secret's tokens (the board's own login, dev login) carry neither.
        let from_provider = header.alg != Algorithm::HS256;
        let issuer = self.rules.issuer.as_ref().filter(|_| from_provider);
        let audiences = Some(&self.rules.audiences).filter(|a| from_provider && !a.is_empty());
        match issuer {
            Some(issuer) => {
                validation.set_issuer(&[issuer]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match audiences {
            Some(audiences) => {
                validation.set_audience(audiences);
                required.push("aud");
            }
            // A provider's tokens carry an `aud`; unchecked unless asked.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let claims = decode::<Claims>(token, &key, &validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                ApiError::Unauthorized(match e.kind() {
                    ErrorKind::ExpiredSignature => "expired token",
                    ErrorKind::InvalidIssuer => "token from another issuer",
                    ErrorKind::InvalidAudience => "token for another audience",
                    _ => "invalid, forged or expired token",
                })
            })?
            .claims;
        let max = self.rules.max_lifetime_secs + LEEWAY_SECS;
        let too_long = claims.exp.saturating_sub(now_secs()) > max
            || claims
                .iat
                .is_some_and(|iat| claims.exp.saturating_sub(iat) > max);
        if too_long {
            return Err(ApiError::Unauthorized(
                "token lives longer than auth.max_token_lifetime_secs",
            ));
        }
        if claims.sub.is_empty() || claims.sub.len() > 255 || !valid_email(&claims.email) {
            return Err(ApiError::Unauthorized("token lacks a usable sub or email"));
        }
        Ok(User {
            id: claims.sub,
            email: claims.email,
        })
    }

    /// Issues a user JWT with the shared secret (dev login, tests, benchmarks).
    pub fn issue(&self, sub: &str, email: &str, ttl_secs: u64) -> Result<String, ApiError> {
        let shared = self.shared.as_ref().ok_or(ApiError::Internal)?;
        let iat = now_secs();
        let claims = Claims {
            sub: sub.to_string(),
            email: email.to_string(),
            exp: iat + ttl_secs,
            iat: Some(iat),
        };
        encode(&Header::new(Algorithm::HS256), &claims, &shared.encoding)
            .map_err(|_| ApiError::Internal)
    }
}

fn digest_of(hash: &str) -> Option<[u8; 32]> {
    let hex = hash.strip_prefix("sha256:")?;
    let bytes = hex::decode(hex.to_ascii_lowercase()).ok()?;
    bytes.try_into().ok()
}

/// Every operator of the configuration, by name: `admin.tokens`, the lines
/// of `admin.tokens_file`, and `admin_token` as `admin`. At least one.
pub fn operators(config: &crate::config::Config) -> Result<Vec<(String, [u8; 32])>, String> {
    let mut named: std::collections::BTreeMap<String, [u8; 32]> = Default::default();
    let mut add = |name: &str, hash: &str, from: &str| -> Result<(), String> {
        let digest = digest_of(hash)
            .filter(|_| crate::config::valid_operator(name, hash))
            .ok_or_else(|| {
                format!("{from}: `{name}` needs a name of a-z0-9._- and `sha256:<64 hex digits>`")
            })?;
        if named.insert(name.to_string(), digest).is_some() {
            return Err(format!("{from}: the operator `{name}` is named twice"));
        }
        Ok(())
    };
    for (name, hash) in &config.admin.tokens {
        add(name, hash, "admin.tokens")?;
    }
    if let Some(path) = &config.admin.tokens_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("admin.tokens_file {}: {e}", path.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let from = format!("admin.tokens_file {} line {}", path.display(), n + 1);
            let mut fields = line.split_whitespace();
            match (fields.next(), fields.next(), fields.next()) {
                (Some(name), Some(hash), None) => add(name, hash, &from)?,
                _ => return Err(format!("{from}: expected `<name> sha256:<hex>`")),
            }
        }
    }
    if let Some(token) = &config.admin_token {
        let hash = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(token.expose().as_bytes()))
        );
        add("admin", &hash, "admin_token")?;
    }
    if named.is_empty() {
        return Err(
            "is required (set HERALD_ADMIN_TOKEN, or name operators in admin.tokens)".into(),
        );
    }
    Ok(named.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn auth() -> Auth {
        Auth::new(
            &Secret::new("admin-token-0123456789"),
            &Secret::new("jwt-secret-0123456789-0123456789-xx"),
        )
    }

    fn with_bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        h
    }

    #[tokio::test]
    async fn an_issued_token_verifies() {
        let a = auth();
        let t = a.issue("u1", "u1@example.com", 60).unwrap();
        assert_eq!(a.user(&with_bearer(&t)).await.unwrap().id, "u1");
    }

    #[tokio::test]
    async fn a_token_signed_with_another_secret_is_refused() {
        let other = Auth::new(
            &Secret::new("admin-token-0123456789"),
            &Secret::new("another-secret-0123456789-0123456789"),
        );
        let t = other.issue("u1", "u1@example.com", 60).unwrap();
        assert!(auth().user(&with_bearer(&t)).await.is_err());
    }

    #[tokio::test]
    async fn an_unsigned_token_is_refused() {
        // {"alg":"none","typ":"JWT"} . {"sub":"u","email":"u@x.io","exp":9999999999} .
        let t = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1IiwiZW1haWwiOiJ1QHguaW8iLCJleHAiOjk5OTk5OTk5OTl9.";
        assert!(auth().user(&with_bearer(t)).await.is_err());
    }

    #[tokio::test]
    async fn a_token_living_longer_than_the_maximum_is_refused() {
        let a = auth();
        let t = a.issue("u1", "u1@example.com", 2 * 86_400).unwrap();
        assert!(a.user(&with_bearer(&t)).await.is_err());
    }

    #[test]
    fn the_admin_token_must_match_exactly() {
        let a = auth();
        assert_eq!(
            a.admin(&with_bearer("admin-token-0123456789")).unwrap(),
            "admin"
        );
        assert!(a.admin(&with_bearer("admin-token-012345678")).is_err());
        assert!(a.admin(&HeaderMap::new()).is_err());
    }
}
