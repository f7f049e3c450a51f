//! The board's own identity provider: user tokens signed RS256 or ES256 with
//! keys published as a JWKS (a file, or a URL served by a double that
//! counts its fetches), checked for issuer, audience, expiry and lifetime;
//! the forgeries a verifier must refuse (`alg: none`, HS256 "signed" with
//! the public key) are 401. Keys are made by openssl for each run.

use crate::support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::oidc::{b64, now, Key, OidcProvider};
use support::{repo_file, Backend, Backing, Daemon};
use warp::Filter;

const ISSUER: &str = "https://id.example.test/";
const AUDIENCE: &str = "https://jobs.example.test/api";

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

/// The settings block of DEPLOY.md's `section`, as written, with the
/// setting `pointed` (the provider's address) pointed at the double.
fn deploy_block(section: &str, pointed: (&str, &str)) -> Vec<(String, String)> {
    let deploy = repo_file("docs/DEPLOY.md");
    let block = deploy
        .split(&format!("## {section}\n"))
        .nth(1)
        .and_then(|rest| rest.split("```sh\n").nth(1))
        .and_then(|rest| rest.split("```").next())
        .unwrap_or_else(|| panic!("DEPLOY.md's {section} block"));
    block
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("NAME=value");
            let v = if k == pointed.0 { pointed.1 } else { v };
            (k.to_string(), v.to_string())
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
    let settings = deploy_block(
        "The board's identity provider",
        ("HERALD_AUTH__JWKS_URL", &provider.url),
    );
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

/// With `auth.oidc_issuer` and `auth.oidc_client_id` Herald reads the
/// provider's discovery document at start, tells the page where to sign in
/// (`GET /api/sign-in`), lets the page talk to the token endpoint's origin
/// and nothing else new (CSP), and takes the provider's ID tokens for this
/// client only: another client's, or another issuer's, are 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openid_provider_is_discovered_and_only_id_tokens_for_the_page_are_taken() {
    // DEPLOY.md's block, its issuer pointed at the local provider.
    let client_id = deploy_block("Sign-in on Herald's page", ("HERALD_AUTH__OIDC_ISSUER", ""))
        .into_iter()
        .find(|(k, _)| k == "HERALD_AUTH__OIDC_CLIENT_ID")
        .expect("the block names the client id")
        .1;
    let provider = OidcProvider::start(&client_id).await;
    let settings = deploy_block(
        "Sign-in on Herald's page",
        ("HERALD_AUTH__OIDC_ISSUER", &provider.issuer),
    );
    assert_eq!(settings.len(), 2, "{settings:?}");
    let backing = Backing::start(Backend::Sqlite).await;
    let mut extra: Vec<(&str, &str)> = settings
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    extra.push(("HERALD_AUTH__DEV_LOGIN", "false"));
    let herald = backing.daemon(&extra).await;

    let how: Value = herald.get("/api/sign-in").await.json().await.unwrap();
    let issuer = &provider.issuer;
    assert_eq!(
        how,
        json!({"dev_login": false, "provider": {
            "issuer": issuer, "client_id": client_id,
            "authorization_endpoint": format!("{issuer}/authorize"),
            "token_endpoint": format!("{issuer}/token"),
            "scope": "openid email"}})
    );
    let page = herald.get("/").await;
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains(&format!("connect-src 'self' {issuer};")),
        "{csp}"
    );

    assert_eq!(
        status_with(&herald, &provider.id_token(&client_id, "ada@example.com")).await,
        200,
        "the page's ID token"
    );
    let mut refused = vec![(
        "another client's ID token",
        provider.id_token("another-app", "ada@example.com"),
    )];
    refused.push(("another issuer", {
        provider.key.sign(&json!({
            "iss": "http://127.0.0.1:1", "sub": "board|ada", "aud": client_id,
            "email": "ada@example.com", "iat": now(), "exp": now() + 300}))
    }));
    for (what, token) in refused {
        assert_eq!(status_with(&herald, &token).await, 401, "{what}");
    }

    // Without a provider: the page offers dev login only, talks to itself only.
    drop(herald); // one process per embedded file
    let plain = backing.daemon(&[]).await;
    let how: Value = plain.get("/api/sign-in").await.json().await.unwrap();
    assert_eq!(how, json!({"dev_login": true, "provider": null}));
    let page = plain.get("/").await;
    assert!(page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("connect-src 'self';"));
}

/// The provider at start: one that does not answer is a neighbour down
/// (exit 3); a discovery document naming another issuer (a mix-up) and an
/// issuer without its client id are settings (exit 2, `config` alike);
/// each names `auth.oidc_*`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openid_provider_that_is_down_exits_3_and_one_naming_another_issuer_2() {
    let provider = OidcProvider::start("herald-page").await;
    provider.claim_issuer("https://id.example.test/");
    let closed = format!("http://127.0.0.1:{}", support::free_port());
    // What, the settings, the command, its exit code, what its refusal names.
    type Case<'a> = (
        &'a str,
        Vec<(&'static str, String)>,
        &'a [&'a str],
        i32,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "down",
            vec![
                ("HERALD_AUTH__OIDC_ISSUER", closed.clone()),
                ("HERALD_AUTH__OIDC_CLIENT_ID", "herald-page".into()),
            ],
            &["serve"],
            3,
            "auth.oidc_issuer",
        ),
        (
            "another issuer",
            provider.settings(),
            &["serve"],
            2,
            "set auth.oidc_issuer to exactly that",
        ),
        (
            "no client id, serve",
            vec![("HERALD_AUTH__OIDC_ISSUER", provider.issuer.clone())],
            &["serve"],
            2,
            "auth.oidc_client_id",
        ),
        (
            "no client id, config",
            vec![("HERALD_AUTH__OIDC_ISSUER", provider.issuer.clone())],
            &["config"],
            2,
            "auth.oidc_client_id",
        ),
        (
            "cleartext to another host",
            vec![
                ("HERALD_AUTH__OIDC_ISSUER", "http://id.example.test".into()),
                ("HERALD_AUTH__OIDC_CLIENT_ID", "herald-page".into()),
            ],
            &["config"],
            2,
            "must be an https:// URL",
        ),
    ];
    for (what, settings, args, code, named) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut env = crate::cli::embedded_in(dir.path());
        env.extend(settings);
        let (got, said) = tokio::task::spawn_blocking(move || {
            let out = crate::cli::herald_in(dir.path(), &env, args);
            drop(dir);
            out
        })
        .await
        .unwrap();
        assert_eq!(got, code, "{what}: {said}");
        let line = crate::cli::refusal(&said);
        assert!(line.contains(named), "{what}: {line}");
    }
}
