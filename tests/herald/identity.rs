//! The board's own identity provider: user tokens signed RS256 or ES256 with
//! keys published as a JWKS (a file, or a URL served by a double that
//! counts its fetches), checked for issuer, audience, expiry and lifetime;
//! the forgeries a verifier must refuse (`alg: none`, HS256 "signed" with
//! the public key) are 401. Keys are made by openssl for each run.

use crate::support;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::{repo_file, Backend, Backing, Daemon};
use warp::Filter;

const ISSUER: &str = "https://id.example.test/";
const AUDIENCE: &str = "https://jobs.example.test/api";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn openssl(args: &[&str]) -> Vec<u8> {
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
struct Key {
    alg: Algorithm,
    kid: String,
    encoding: EncodingKey,
    public_pem: Vec<u8>,
    jwk: Value,
}

impl Key {
    fn rsa(dir: &Path, kid: &str) -> Key {
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

    fn ec(dir: &Path, kid: &str) -> Key {
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

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        encode(&header, claims, &self.encoding).unwrap()
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims as the provider would write them for `sub`, living `ttl` seconds.
fn claims(sub: &str, ttl: u64) -> Value {
    json!({"sub": sub, "email": format!("{sub}@example.com"), "iss": ISSUER,
           "aud": [AUDIENCE, "https://id.example.test/userinfo"],
           "iat": now(), "exp": now() + ttl})
}

fn jwks(keys: &[&Key]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

/// The status of `GET /api/applications` with `token`.
async fn status_with(herald: &Daemon, token: &str) -> u16 {
    herald
        .http
        .get(herald.url("/api/applications"))
        .bearer_auth(token)
        .send()
        .await
        .expect("request")
        .status()
        .as_u16()
}

#[tokio::test]
async fn rs256_and_es256_tokens_from_a_jwks_file_are_accepted_and_every_forgery_is_401() {
    let dir = tempfile::tempdir().unwrap();
    let rsa = Key::rsa(dir.path(), "rsa-1");
    let ec = Key::ec(dir.path(), "ec-1");
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, jwks(&[&rsa, &ec])).unwrap();
    let backing = Backing::start(Backend::Sqlite).await;
    let herald = backing
        .daemon(&[
            ("HERALD_AUTH__JWKS_FILE", jwks_file.to_str().unwrap()),
            ("HERALD_AUTH__ISSUER", ISSUER),
            ("HERALD_AUTH__AUDIENCE", AUDIENCE),
            ("HERALD_AUTH__MAX_TOKEN_LIFETIME_SECS", "3600"),
        ])
        .await;

    assert_eq!(
        status_with(&herald, &rsa.sign(&claims("ada", 600))).await,
        200,
        "RS256"
    );
    assert_eq!(
        status_with(&herald, &ec.sign(&claims("bo", 600))).await,
        200,
        "ES256"
    );
    // The shared secret's HS256 tokens still work beside them.
    assert_eq!(
        status_with(&herald, &support::user_token("cy")).await,
        200,
        "HS256"
    );

    let mut refused = Vec::new();
    let mut wrong_iss = claims("ada", 600);
    wrong_iss["iss"] = json!("https://evil.example.test/");
    refused.push(("another issuer", rsa.sign(&wrong_iss)));
    let mut no_iss = claims("ada", 600);
    no_iss.as_object_mut().unwrap().remove("iss");
    refused.push(("no issuer", rsa.sign(&no_iss)));
    let mut wrong_aud = claims("ada", 600);
    wrong_aud["aud"] = json!("https://other.example.test/api");
    refused.push(("another audience", ec.sign(&wrong_aud)));
    let mut expired = claims("ada", 600);
    expired["iat"] = json!(now() - 1200);
    expired["exp"] = json!(now() - 600);
    refused.push(("expired", rsa.sign(&expired)));
    refused.push(("living two hours", rsa.sign(&claims("ada", 7200))));
    let mut backdated = claims("ada", 600);
    backdated["iat"] = json!(now() - 7000);
    refused.push(("iat two hours before exp", ec.sign(&backdated)));
    // alg none: the claims with no signature at all.
    let unsigned = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims("ada", 600).to_string().as_bytes())
    );
    refused.push(("alg none", unsigned));
    // HS256 "signed" with the provider's public key as the HMAC secret.
    for key in [&rsa, &ec] {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(key.kid.clone());
        let forged = encode(
            &header,
            &claims("ada", 600),
            &EncodingKey::from_secret(&key.public_pem),
        )
        .unwrap();
        refused.push(("HS256 with the public key", forged));
    }
    // A key of the set used for the other algorithm's header.
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(rsa.kid.clone());
    refused.push((
        "ES256 naming the RSA key",
        encode(&header, &claims("ada", 600), &ec.encoding).unwrap(),
    ));
    // Signed by a key the provider never published.
    let stranger = Key::rsa(dir.path(), "rsa-1-impostor");
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    refused.push((
        "another key under a known kid",
        encode(&header, &claims("ada", 600), &stranger.encoding).unwrap(),
    ));
    for (what, token) in &refused {
        let response = herald
            .http
            .get(herald.url("/api/applications"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{what}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "unauthorized", "{what}: {problem}");
    }
}

/// A JWKS endpoint double: serves the current document, counts fetches.
struct JwksServer {
    document: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
    url: String,
}

impl JwksServer {
    async fn start(document: String) -> JwksServer {
        let document = Arc::new(Mutex::new(document));
        let fetches = Arc::new(AtomicUsize::new(0));
        let route = warp::get()
            .and(warp::path!(".well-known" / "jwks.json"))
            .map({
                let (document, fetches) = (document.clone(), fetches.clone());
                move || {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    warp::http::Response::builder()
                        .header("content-type", "application/json")
                        .body(document.lock().unwrap().clone())
                        .unwrap()
                }
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        tokio::spawn(warp::serve(route).incoming(listener).run());
        JwksServer {
            document,
            fetches,
            url,
        }
    }
}

/// DEPLOY.md's identity-provider block, as written, with the provider's
/// URL pointed at the double.
fn deploy_block(jwks_url: &str) -> Vec<(String, String)> {
    let deploy = repo_file("docs/DEPLOY.md");
    let block = deploy
        .split("## The board's identity provider")
        .nth(1)
        .and_then(|rest| rest.split("```sh\n").nth(1))
        .and_then(|rest| rest.split("```").next())
        .expect("DEPLOY.md's identity provider block");
    block
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("NAME=value");
            let v = if k == "HERALD_AUTH__JWKS_URL" {
                jwks_url.to_string()
            } else {
                v.to_string()
            };
            (k.to_string(), v)
        })
        .collect()
}

// Multi-threaded: the JWKS double answers while the daemon's start blocks a thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_kid_fetches_the_keys_again_at_most_once_a_minute() {
    let dir = tempfile::tempdir().unwrap();
    let old = Key::rsa(dir.path(), "2026-11");
    let new = Key::ec(dir.path(), "2026-12");
    let provider = JwksServer::start(jwks(&[&old])).await;
    let settings = deploy_block(&provider.url);
    let iss = settings
        .iter()
        .find(|(k, _)| k == "HERALD_AUTH__ISSUER")
        .map(|(_, v)| v.clone())
        .expect("the block sets an issuer");
    let aud = settings
        .iter()
        .find(|(k, _)| k == "HERALD_AUTH__AUDIENCE")
        .map(|(_, v)| v.clone())
        .expect("the block sets an audience");
    let extra: Vec<(&str, &str)> = settings
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let backing = Backing::start(Backend::Sqlite).await;
    let herald = backing.daemon(&extra).await;
    assert_eq!(
        provider.fetches.load(Ordering::SeqCst),
        1,
        "read once at start"
    );
    let token = |key: &Key, sub: &str| {
        let mut c = claims(sub, 600);
        c["iss"] = json!(iss);
        c["aud"] = json!(aud);
        key.sign(&c)
    };
    assert_eq!(status_with(&herald, &token(&old, "ada")).await, 200);
    assert_eq!(
        provider.fetches.load(Ordering::SeqCst),
        1,
        "a held key: no fetch"
    );

    // The provider rotates: the new key is published, then used.
    *provider.document.lock().unwrap() = jwks(&[&old, &new]);
    assert_eq!(
        status_with(&herald, &token(&new, "bo")).await,
        200,
        "after one refresh"
    );
    assert_eq!(provider.fetches.load(Ordering::SeqCst), 2, "one refresh");
    // Tokens naming keys nobody published, many: no further fetch within a minute.
    for n in 0..20 {
        let mut stranger = Key::ec(dir.path(), &format!("random-{n}"));
        stranger.kid = format!("random-{n}");
        assert_eq!(status_with(&herald, &token(&stranger, "cy")).await, 401);
    }
    assert_eq!(
        provider.fetches.load(Ordering::SeqCst),
        2,
        "at most once a minute"
    );
    // The keys held still verify.
    assert_eq!(status_with(&herald, &token(&new, "bo")).await, 200);
    let metrics = herald.metrics_text().await;
    assert_eq!(
        support::parse_metric(
            &metrics,
            "herald_jwks_fetches_total{reason=\"unknown_kid\",outcome=\"ok\"}"
        ),
        1.0,
        "{metrics}"
    );
}
