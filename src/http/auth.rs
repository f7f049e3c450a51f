//! Authentication of the two principals.
//!
//! - **user**: `Authorization: Bearer <JWT>`, HS256 only, claims `sub`, `email`,
//!   `exp`, signed with `HERALD_JWT_SECRET` by the job board's login (or by
//!   `POST /api/dev/login` in dev mode).
//! - **admin**: `Authorization: Bearer <HERALD_ADMIN_TOKEN>`, compared in
//!   constant time (over SHA-256 digests, so the length leaks nothing either).
//!
//! Every failure is the same 401 `unauthorized`; the detail says what was
//! wrong with the credential, never anything about the secret.

use http::header::AUTHORIZATION;
use http::HeaderMap;
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::problem::ApiError;
use crate::config::Secret;
use crate::domain::{valid_email, User};

/// The claims Herald reads from a user JWT.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    email: String,
    exp: u64,
}

/// Verifier (and, in dev mode, issuer) of credentials.
#[derive(Clone)]
pub struct Auth {
    /// SHA-256 of the admin token; the token itself is not kept.
    admin_digest: [u8; 32],
    /// HS256 verification key.
    decoding: DecodingKey,
    /// HS256 signing key, used by dev login only.
    encoding: EncodingKey,
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

impl Auth {
    pub fn new(admin_token: &Secret, jwt_secret: &Secret) -> Auth {
        Auth {
            admin_digest: Sha256::digest(admin_token.expose().as_bytes()).into(),
            decoding: DecodingKey::from_secret(jwt_secret.expose().as_bytes()),
            encoding: EncodingKey::from_secret(jwt_secret.expose().as_bytes()),
        }
    }

    /// Checks the admin bearer token.
    pub fn admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let token = bearer(headers)?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if bool::from(digest.ct_eq(&self.admin_digest)) {
            Ok(())
        } else {
            Err(ApiError::Unauthorized("invalid admin token"))
        }
    }

    /// Verifies a user JWT and returns who it names.
    pub fn user(&self, headers: &HeaderMap) -> Result<User, ApiError> {
        let token = bearer(headers)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data = decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|_| ApiError::Unauthorized("invalid, forged or expired token"))?;
        let claims = data.claims;
        if claims.sub.is_empty() || claims.sub.len() > 255 || !valid_email(&claims.email) {
            return Err(ApiError::Unauthorized("token lacks a usable sub or email"));
        }
        Ok(User {
            id: claims.sub,
            email: claims.email,
        })
    }

    /// Issues a user JWT (dev login, tests, benchmarks).
    pub fn issue(&self, sub: &str, email: &str, ttl_secs: u64) -> Result<String, ApiError> {
        let exp = chrono::Utc::now().timestamp().max(0) as u64 + ttl_secs;
        let claims = Claims {
            sub: sub.to_string(),
            email: email.to_string(),
            exp,
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|_| ApiError::Internal)
    }
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

    #[test]
    fn an_issued_token_verifies() {
        let a = auth();
        let t = a.issue("u1", "u1@example.com", 60).unwrap();
        assert_eq!(a.user(&with_bearer(&t)).unwrap().id, "u1");
    }

    #[test]
    fn a_token_signed_with_another_secret_is_refused() {
        let other = Auth::new(
            &Secret::new("admin-token-0123456789"),
            &Secret::new("another-secret-0123456789-0123456789"),
        );
        let t = other.issue("u1", "u1@example.com", 60).unwrap();
        assert!(auth().user(&with_bearer(&t)).is_err());
    }

    #[test]
    fn an_unsigned_token_is_refused() {
        // {"alg":"none","typ":"JWT"} . {"sub":"u","email":"u@x.io","exp":9999999999} .
        let t = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1IiwiZW1haWwiOiJ1QHguaW8iLCJleHAiOjk5OTk5OTk5OTl9.";
        assert!(auth().user(&with_bearer(t)).is_err());
    }

    #[test]
    fn the_admin_token_must_match_exactly() {
        let a = auth();
        assert!(a.admin(&with_bearer("admin-token-0123456789")).is_ok());
        assert!(a.admin(&with_bearer("admin-token-012345678")).is_err());
        assert!(a.admin(&HeaderMap::new()).is_err());
    }
}
