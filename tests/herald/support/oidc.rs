//! A small OpenID Connect provider for the tests, standing in for the
//! board's Auth0 or Keycloak the way [`super::fake_resend`] stands in for
//! Resend: what a browser and Herald see of it is the real protocol.
//!
//! - `GET /.well-known/openid-configuration`: the discovery document
//!   (its `issuer` can be made to lie, as a mix-up would).
//! - `GET /authorize`: checks the client, the registered redirect URI, an
//!   `S256` code challenge and the `openid` scope, then shows a sign-in form
//!   (`#login-email`, `#login-submit`); a wrong request gets a 400 page, not
//!   a redirect (RFC 6749 4.1.2.1).
//! - `POST /authorize`: the form; redirects to the client with `code`,
//!   `state` and `iss` (RFC 9207).
//! - `POST /token`: exchanges a code once, for the same client and redirect
//!   URI, only with the verifier whose SHA-256 is the challenge; answers an
//!   RS256 ID token (`aud` = the client, `nonce`, 5 minutes), with CORS so
//!   a page may call it. Every exchange is recorded.
//! - `GET /jwks`: the signing key.
//!
//! Keys are made by openssl for each run ([`Key`]).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use warp::Filter;

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl (scripts/test installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A signing key made by openssl, and its public JWK.
pub struct Key {
    pub alg: Algorithm,
    pub kid: String,
    pub encoding: EncodingKey,
    pub public_pem: Vec<u8>,
    pub jwk: Value,
}

impl Key {
    pub fn rsa(dir: &Path, kid: &str) -> Key {
        let path = dir.join(format!("{kid}.pem"));
        let p = path.to_str().unwrap();
        openssl(&["genrsa", "-traditional", "-out", p, "2048"]);
        let modulus = String::from_utf8(openssl(&["rsa", "-in", p, "-noout", "-modulus"])).unwrap();
        let n = hex::decode(modulus.trim().trim_start_matches("Modulus=")).unwrap();
        Key {
            alg: Algorithm::RS256,
            kid: kid.into(),
            encoding: EncodingKey::from_rsa_pem(&std::fs::read(&path).unwrap()).unwrap(),
            public_pem: openssl(&["rsa", "-in", p, "-pubout"]),
            jwk: json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
                        "n": b64(&n), "e": "AQAB"}),
        }
    }

    pub fn ec(dir: &Path, kid: &str) -> Key {
        let path = dir.join(format!("{kid}.pem"));
        let p = path.to_str().unwrap();
        let sec1 = openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout"]);
        std::fs::write(dir.join(format!("{kid}.sec1")), &sec1).unwrap();
        let sec1_path = dir.join(format!("{kid}.sec1"));
        // jsonwebtoken reads an EC private key as PKCS#8.
        let pkcs8 = openssl(&[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            sec1_path.to_str().unwrap(),
        ]);
        std::fs::write(&path, &pkcs8).unwrap();
        let der = openssl(&["ec", "-in", p, "-pubout", "-outform", "DER"]);
        // The uncompressed point ends the DER: 0x04 || X || Y.
        let point = &der[der.len() - 65..];
        assert_eq!(point[0], 4);
        Key {
            alg: Algorithm::ES256,
            kid: kid.into(),
            encoding: EncodingKey::from_ec_pem(&pkcs8).unwrap(),
            public_pem: openssl(&["ec", "-in", p, "-pubout"]),
            jwk: json!({"kty": "EC", "use": "sig", "alg": "ES256", "kid": kid, "crv": "P-256",
                        "x": b64(&point[1..33]), "y": b64(&point[33..65])}),
        }
    }

    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        encode(&header, claims, &self.encoding).unwrap()
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A code handed out at the form, until it is exchanged.
struct Grant {
    redirect_uri: String,
    challenge: String,
    nonce: Option<String>,
    email: String,
}

/// One `POST /token` as the provider saw it, and what it answered.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub status: u16,
    pub error: Option<String>,
}

#[derive(Default)]
struct Held {
    redirect_uris: Vec<String>,
    codes: HashMap<String, Grant>,
    exchanges: Vec<Exchange>,
    /// What the discovery document says the issuer is (a lie, when set).
    claimed_issuer: Option<String>,
}

pub struct OidcProvider {
    /// `http://127.0.0.1:<port>`: the issuer, and the base of every endpoint.
    pub issuer: String,
    pub client_id: String,
    pub key: Arc<Key>,
    held: Arc<Mutex<Held>>,
}

type Reply = warp::http::Response<String>;

fn reply(status: u16, content_type: &str, body: String) -> Reply {
    warp::http::Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .body(body)
        .unwrap()
}

/// The token endpoint's answers carry CORS headers: a page on another
/// origin (Herald's) calls it.
fn cors(mut response: Reply) -> Reply {
    let headers = response.headers_mut();
    headers.insert("access-control-allow-origin", "*".parse().unwrap());
    headers.insert(
        "access-control-allow-headers",
        "content-type".parse().unwrap(),
    );
    headers.insert(
        "access-control-allow-methods",
        "POST, OPTIONS".parse().unwrap(),
    );
    response
}

fn token_error(held: &Mutex<Held>, error: &str, description: &str) -> Reply {
    held.lock().unwrap().exchanges.push(Exchange {
        status: 400,
        error: Some(error.to_string()),
    });
    cors(reply(
        400,
        "application/json",
        json!({"error": error, "error_description": description}).to_string(),
    ))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl OidcProvider {
    /// A provider on a free port of 127.0.0.1 with one public client.
    pub async fn start(client_id: &str) -> OidcProvider {
        let dir = tempfile::tempdir().unwrap();
        let key = Arc::new(Key::rsa(dir.path(), "oidc-1"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}", listener.local_addr().unwrap());
        let held = Arc::new(Mutex::new(Held::default()));
        let client = client_id.to_string();

        let discovery = warp::get()
            .and(warp::path!(".well-known" / "openid-configuration"))
            .map({
                let (issuer, held) = (issuer.clone(), held.clone());
                move || {
                    let named = held
                        .lock()
                        .unwrap()
                        .claimed_issuer
                        .clone()
                        .unwrap_or_else(|| issuer.clone());
                    reply(
                        200,
                        "application/json",
                        json!({
                            "issuer": named,
                            "authorization_endpoint": format!("{issuer}/authorize"),
                            "token_endpoint": format!("{issuer}/token"),
                            "jwks_uri": format!("{issuer}/jwks"),
                            "response_types_supported": ["code"],
                            "subject_types_supported": ["public"],
                            "id_token_signing_alg_values_supported": ["RS256"],
                            "code_challenge_methods_supported": ["S256"],
                            "scopes_supported": ["openid", "email"],
                        })
                        .to_string(),
                    )
                }
            });
        let jwks = warp::get().and(warp::path!("jwks")).map({
            let key = key.clone();
            move || {
                reply(
                    200,
                    "application/json",
                    json!({"keys": [key.jwk.clone()]}).to_string(),
                )
            }
        });
        let authorize_page = warp::get()
            .and(warp::path!("authorize"))
            .and(warp::query::<HashMap<String, String>>())
            .map({
                let (client, held) = (client.clone(), held.clone());
                move |q: HashMap<String, String>| {
                    let get = |name: &str| q.get(name).cloned().unwrap_or_default();
                    let registered = held
                        .lock()
                        .unwrap()
                        .redirect_uris
                        .contains(&get("redirect_uri"));
                    let problem = if get("client_id") != client {
                        Some("unknown client_id")
                    } else if !registered {
                        Some("redirect_uri is not registered for this client")
                    } else if get("response_type") != "code" {
                        Some("response_type must be code")
                    } else if get("code_challenge_method") != "S256"
                        || get("code_challenge").len() < 43
                    {
                        Some("a public client must send a S256 code_challenge")
                    } else if !get("scope").split(' ').any(|s| s == "openid") {
                        Some("scope must include openid")
                    } else {
                        None
                    };
                    if let Some(problem) = problem {
                        return reply(
                            400,
                            "text/html; charset=utf-8",
                            format!(
                                "<!doctype html><title>Error</title><p id=\"error\">{problem}</p>"
                            ),
                        );
                    }
                    let hidden: String = ["redirect_uri", "state", "nonce", "code_challenge"]
                        .iter()
                        .map(|name| {
                            format!(
                                "<input type=\"hidden\" name=\"{name}\" value=\"{}\">",
                                escape(&get(name))
                            )
                        })
                        .collect();
                    reply(
                        200,
                        "text/html; charset=utf-8",
                        format!(
                            "<!doctype html><title>Board ID: sign in</title>\
                             <h1>Sign in to the board</h1>\
                             <form method=\"post\" action=\"/authorize\">{hidden}\
                             <label for=\"login-email\">Email</label>\
                             <input id=\"login-email\" name=\"email\" type=\"email\">\
                             <button id=\"login-submit\" type=\"submit\">Continue</button></form>"
                        ),
                    )
                }
            });
        let authorize_form = warp::post()
            .and(warp::path!("authorize"))
            .and(warp::body::form::<HashMap<String, String>>())
            .map({
                let (issuer, held) = (issuer.clone(), held.clone());
                move |form: HashMap<String, String>| {
                    let get = |name: &str| form.get(name).cloned().unwrap_or_default();
                    let mut held = held.lock().unwrap();
                    if !held.redirect_uris.contains(&get("redirect_uri")) {
                        return reply(400, "text/plain", "redirect_uri".into());
                    }
                    let code = b64(&rand::random::<[u8; 24]>());
                    held.codes.insert(
                        code.clone(),
                        Grant {
                            redirect_uri: get("redirect_uri"),
                            challenge: get("code_challenge"),
                            nonce: form.get("nonce").cloned().filter(|n| !n.is_empty()),
                            email: get("email"),
                        },
                    );
                    let mut to = url::Url::parse(&get("redirect_uri")).unwrap();
                    to.query_pairs_mut()
                        .append_pair("code", &code)
                        .append_pair("state", &get("state"))
                        .append_pair("iss", &issuer);
                    warp::http::Response::builder()
                        .status(302)
                        .header("location", to.as_str())
                        .body(String::new())
                        .unwrap()
                }
            });
        let token_preflight = warp::options()
            .and(warp::path!("token"))
            .map(|| cors(reply(204, "text/plain", String::new())));
        let token = warp::post()
            .and(warp::path!("token"))
            .and(warp::body::form::<HashMap<String, String>>())
            .map({
                let (issuer, client, held, key) =
                    (issuer.clone(), client.clone(), held.clone(), key.clone());
                move |form: HashMap<String, String>| {
                    let get = |name: &str| form.get(name).cloned().unwrap_or_default();
                    if get("grant_type") != "authorization_code" {
                        return token_error(
                            &held,
                            "unsupported_grant_type",
                            "authorization_code only",
                        );
                    }
                    if get("client_id") != client {
                        return token_error(&held, "invalid_client", "unknown client");
                    }
                    // A code is good once, whatever the outcome.
                    let grant = held.lock().unwrap().codes.remove(&get("code"));
                    let Some(grant) = grant else {
                        return token_error(&held, "invalid_grant", "unknown or used code");
                    };
                    if grant.redirect_uri != get("redirect_uri") {
                        return token_error(&held, "invalid_grant", "redirect_uri differs");
                    }
                    if b64(&Sha256::digest(get("code_verifier").as_bytes())) != grant.challenge {
                        return token_error(&held, "invalid_grant", "PKCE verification failed");
                    }
                    let mut claims = json!({
                        "iss": issuer, "sub": format!("board|{}", grant.email),
                        "aud": client, "email": grant.email, "email_verified": true,
                        "iat": now(), "exp": now() + 300,
                    });
                    if let Some(nonce) = grant.nonce {
                        claims["nonce"] = json!(nonce);
                    }
                    held.lock().unwrap().exchanges.push(Exchange {
                        status: 200,
                        error: None,
                    });
                    cors(reply(
                        200,
                        "application/json",
                        json!({
                            "access_token": b64(&rand::random::<[u8; 24]>()),
                            "token_type": "Bearer",
                            "expires_in": 300,
                            "id_token": key.sign(&claims),
                        })
                        .to_string(),
                    ))
                }
            });
        let routes = discovery
            .or(jwks)
            .unify()
            .or(authorize_page)
            .unify()
            .or(authorize_form)
            .unify()
            .or(token_preflight)
            .unify()
            .or(token)
            .unify();
        tokio::spawn(warp::serve(routes).incoming(listener).run());
        drop(dir);
        OidcProvider {
            issuer,
            client_id: client,
            key,
            held,
        }
    }

    /// Registers a redirect URI of the client (Herald's origin and `/`).
    pub fn register_redirect(&self, uri: &str) {
        self.held
            .lock()
            .unwrap()
            .redirect_uris
            .push(uri.to_string());
    }

    /// Makes the discovery document name `issuer` instead of its own.
    pub fn claim_issuer(&self, issuer: &str) {
        self.held.lock().unwrap().claimed_issuer = Some(issuer.to_string());
    }

    /// Every code exchange so far.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.held.lock().unwrap().exchanges.clone()
    }

    /// An ID token as this provider would issue it to `client`, for `email`.
    pub fn id_token(&self, client: &str, email: &str) -> String {
        self.key.sign(&json!({
            "iss": self.issuer, "sub": format!("board|{email}"), "aud": client,
            "email": email, "iat": now(), "exp": now() + 300,
        }))
    }

    /// The daemon's settings that point Herald's page at this provider.
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        vec![
            ("HERALD_AUTH__OIDC_ISSUER", self.issuer.clone()),
            ("HERALD_AUTH__OIDC_CLIENT_ID", self.client_id.clone()),
        ]
    }
}
