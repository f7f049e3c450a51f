//! The values an `Idempotency-Key` is made of, and what the database keeps
//! for one.
//!
//! A request carrying an `Idempotency-Key` is identified by its [`KeyScope`]
//! (principal, method, route) plus the [`IdempotencyKey`] itself, and described
//! by a [`Fingerprint`] (SHA-256 over method, route and the canonical JSON body);
//! a completed key keeps its [`StoredResponse`]. Plain values, below both the
//! store (which keeps them) and the protocol (`crate::idempotency`, which
//! follows them).

use sha2::{Digest, Sha256};

/// Why an `Idempotency-Key` header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Idempotency-Key must be 1 to 255 visible ASCII characters")]
pub struct InvalidKey;

/// An `Idempotency-Key` header value: 1–255 visible ASCII characters. Cannot be
/// constructed otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(raw: &[u8]) -> Result<IdempotencyKey, InvalidKey> {
        if raw.is_empty() || raw.len() > 255 || !raw.iter().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidKey);
        }
        // All bytes are ASCII, so this cannot fail.
        String::from_utf8(raw.to_vec())
            .map(IdempotencyKey)
            .map_err(|_| InvalidKey)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Who may replay a key: a key is unique per (principal, method, route).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyScope {
    /// `user:<sub>` or `admin`: another principal never sees this key's response.
    pub principal: String,
    /// HTTP method, upper case.
    pub method: &'static str,
    /// Route template, e.g. `/api/applications`.
    pub route: &'static str,
}

impl KeyScope {
    /// A short, stable name for (scope, key), used as the Redis key suffix.
    pub fn digest(&self, key: &IdempotencyKey) -> String {
        let mut h = Sha256::new();
        for part in [
            self.principal.as_str(),
            self.method,
            self.route,
            key.as_str(),
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        hex::encode(h.finalize())
    }
}

/// SHA-256 of method, route and the canonical JSON body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Fingerprints a request whose body is valid JSON. Keys are sorted and
    /// insignificant whitespace removed, so `{"a":1, "b":2}` and `{"b":2,"a":1}`
    /// are the same request.
    pub fn of_request(method: &str, route: &str, body: &serde_json::Value) -> Fingerprint {
        let mut h = Sha256::new();
        h.update(method.as_bytes());
        h.update(b"\n");
        h.update(route.as_bytes());
        h.update(b"\n");
        h.update(canonical_json(body).as_bytes());
        Fingerprint(h.finalize().into())
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Fingerprint> {
        <[u8; 32]>::try_from(bytes).ok().map(Fingerprint)
    }
}

/// Canonical JSON: object keys sorted at every depth, no insignificant
/// whitespace. Written out explicitly rather than relying on serde_json's map
/// order, which a `preserve_order` feature anywhere in the build would change.
pub fn canonical_json(value: &serde_json::Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// A response stored as a key's outcome, replayed byte for byte.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredResponse {
    pub status: u16,
    pub body: String,
}

impl StoredResponse {
    /// A resource as a stored response: `status` and its JSON.
    pub fn json<T: serde::Serialize>(status: u16, value: &T) -> StoredResponse {
        StoredResponse {
            status,
            body: serde_json::to_string(value).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_must_be_visible_ascii_of_sane_length() {
        assert!(IdempotencyKey::parse(b"abc-123").is_ok());
        assert!(IdempotencyKey::parse(&[b'a'; 255]).is_ok());
        assert_eq!(IdempotencyKey::parse(&[b'a'; 256]), Err(InvalidKey));
        assert_eq!(IdempotencyKey::parse(b""), Err(InvalidKey));
        assert_eq!(IdempotencyKey::parse(b"has space"), Err(InvalidKey));
        assert_eq!(IdempotencyKey::parse("clé".as_bytes()), Err(InvalidKey));
        assert_eq!(IdempotencyKey::parse(b"tab\there"), Err(InvalidKey));
    }

    #[test]
    fn key_order_and_whitespace_do_not_change_the_fingerprint() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"b": [1, {"y":2,"x":1}], "a": "s"}"#).unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{"a":"s","b":[1,{"x":1,"y":2}]}"#).unwrap();
        assert_eq!(
            Fingerprint::of_request("POST", "/r", &a),
            Fingerprint::of_request("POST", "/r", &b)
        );
        assert_eq!(canonical_json(&a), r#"{"a":"s","b":[1,{"x":1,"y":2}]}"#);
    }

    #[test]
    fn a_body_s_canonical_form_is_a_fixed_point_even_for_long_decimals() {
        // Found by fuzz_fingerprint: without correctly rounded float parsing
        // (serde_json's `float_roundtrip`), this number re-parsed from its
        // canonical text was one ulp away, so the canonical form drifted.
        let body: serde_json::Value =
            serde_json::from_str("[1e308,-1.0,1234576.901234567890]").unwrap();
        let canonical = canonical_json(&body);
        let again: serde_json::Value = serde_json::from_str(&canonical).unwrap();
        assert_eq!(again, body);
        assert_eq!(canonical_json(&again), canonical);
    }

    #[test]
    fn a_changed_body_or_route_changes_the_fingerprint() {
        let a = json!({"job_id": "1"});
        let b = json!({"job_id": "2"});
        assert_ne!(
            Fingerprint::of_request("POST", "/r", &a),
            Fingerprint::of_request("POST", "/r", &b)
        );
        assert_ne!(
            Fingerprint::of_request("POST", "/r", &a),
            Fingerprint::of_request("POST", "/s", &a)
        );
    }

    #[test]
    fn scopes_of_different_principals_never_share_a_digest() {
        let key = IdempotencyKey::parse(b"k").unwrap();
        let a = KeyScope {
            principal: "user:a".into(),
            method: "POST",
            route: "/r",
        };
        let b = KeyScope {
            principal: "user:b".into(),
            method: "POST",
            route: "/r",
        };
        assert_ne!(a.digest(&key), b.digest(&key));
    }
}
