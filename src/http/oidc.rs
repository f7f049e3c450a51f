//! Sign-in on Herald's own page through the board's OpenID Connect provider
//! (`auth.oidc_issuer`, `auth.oidc_client_id`).
//!
//! The page is a public client: it runs the authorization-code flow with
//! PKCE (RFC 7636, `S256`) in the browser, exchanges the code at the
//! provider's token endpoint itself, and sends the ID token it gets as its
//! `Authorization: Bearer`. No client secret exists anywhere, and Herald
//! never sees a code or a password: it verifies the ID token like any token
//! of the provider ([`super::auth`]): signature by the provider's keys,
//! `iss` = the issuer, `aud` naming the client id, `exp`.
//!
//! What Herald does here is read the provider's discovery document
//! (`<issuer>/.well-known/openid-configuration`) once at start and hold the
//! parts the page needs: where to send the user, where to exchange the code,
//! and where the keys are. The document must name exactly the configured
//! issuer (OpenID Connect Discovery 1.0, 4.3: a document that names another
//! issuer is how a mix-up starts), and its endpoints must be `https://`
//! (`http://` only on a loopback host), so a code or a token never crosses
//! a network in the clear. A provider that does not answer fails the start
//! with exit 3; a document that is not usable, with exit 2.

use serde::{Deserialize, Serialize};

use super::jwks::{fetch_url, provider_client, IdentityProviderError};
use crate::config::is_sign_in_url;

/// The scopes the page asks for: an ID token (`openid`) naming the user's
/// `email`, which is where confirmations go.
pub const SCOPE: &str = "openid email";

/// What the page needs to sign a user in at the provider (served as
/// `provider` by `GET /api/sign-in`).
#[derive(Debug, Clone, Serialize)]
pub struct SignInProvider {
    pub issuer: String,
    pub client_id: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub scope: &'static str,
    /// Where the provider's keys are (`auth.jwks_url` is used instead when set).
    #[serde(skip)]
    pub jwks_uri: String,
    /// The origin the page's code exchange talks to (`token_endpoint`'s),
    /// for the page's Content-Security-Policy `connect-src`.
    #[serde(skip)]
    pub token_origin: String,
}

/// The fields of a discovery document Herald reads (the rest are ignored).
#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    #[serde(default)]
    code_challenge_methods_supported: Option<Vec<String>>,
}

impl SignInProvider {
    /// Reads `<issuer>/.well-known/openid-configuration` and checks it.
    pub async fn discover(
        issuer: &str,
        client_id: &str,
    ) -> Result<SignInProvider, IdentityProviderError> {
        const KEY: &str = "auth.oidc_issuer";
        let settings = |message: String| IdentityProviderError::Settings {
            key: KEY,
            message: format!("{KEY} {issuer}: {message}"),
        };
        let address = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let url = reqwest::Url::parse(&address).map_err(|e| settings(e.to_string()))?;
        let body = fetch_url(&provider_client(KEY)?, &url).await.map_err(|e| {
            IdentityProviderError::Unreachable(format!(
                "{KEY} {issuer}: the discovery document {address}: {e}"
            ))
        })?;
        let document: Discovery = serde_json::from_slice(&body).map_err(|e| {
            settings(format!(
                "{address} is not an OpenID Connect discovery document: {e}"
            ))
        })?;
        if document.issuer != issuer {
            return Err(settings(format!(
                "the provider names its issuer {:?}: set auth.oidc_issuer to exactly that",
                document.issuer
            )));
        }
        for (name, endpoint) in [
            ("authorization_endpoint", &document.authorization_endpoint),
            ("token_endpoint", &document.token_endpoint),
            ("jwks_uri", &document.jwks_uri),
        ] {
            if !is_sign_in_url(endpoint) {
                return Err(settings(format!(
                    "its {name} {endpoint:?} is not https:// (http:// only on a loopback host)"
                )));
            }
        }
        // An https or loopback URL with a host (checked above): its origin is
        // a scheme, an ASCII host and a port.
        let token_origin = url::Url::parse(&document.token_endpoint)
            .map(|url| url.origin().ascii_serialization())
            .map_err(|e| settings(format!("its token_endpoint: {e}")))?;
        if let Some(methods) = &document.code_challenge_methods_supported {
            if !methods.iter().any(|m| m == "S256") {
                return Err(settings(format!(
                    "it does not support PKCE with S256 (code_challenge_methods_supported: {methods:?}), \
                     which a page without a client secret needs"
                )));
            }
        }
        Ok(SignInProvider {
            issuer: document.issuer,
            client_id: client_id.to_string(),
            authorization_endpoint: document.authorization_endpoint,
            token_endpoint: document.token_endpoint,
            scope: SCOPE,
            jwks_uri: document.jwks_uri,
            token_origin,
        })
    }
}
