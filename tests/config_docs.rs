//! The README's configuration table is checked against the configuration
//! itself: every key of `config/default.toml` (the compiled-in defaults,
//! which `Config` deserialises with `deny_unknown_fields`) is documented,
//! every documented key exists, and every field of the `Config` struct (as it
//! serialises, optional fields included) is a documented key.

use std::collections::BTreeSet;

use figment::providers::{Format, Toml};
use figment::value::Dict;
use figment::Figment;

/// Keys that have no default (absent unless configured), documented too.
const OPTIONAL_KEYS: [&str; 8] = [
    "redis_url",
    "admin_token",
    "jwt_secret",
    "sentry_dsn",
    "email.resend_api_key",
    "email.resend_base_url",
    "auth.dev_login",
    "limits.trusted_proxy_header",
];

/// Every leaf key of a configuration tree, `table.field` style.
fn leaf_keys(prefix: &str, value: &serde_json::Value, out: &mut BTreeSet<String>) {
    match value {
        serde_json::Value::Object(fields) => {
            for (key, inner) in fields {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                leaf_keys(&path, inner, out);
            }
        }
        _ => {
            out.insert(prefix.to_string());
        }
    }
}

/// The keys of `value` (a configuration tree, as JSON).
fn keys_of(value: &serde_json::Value) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    leaf_keys("", value, &mut keys);
    keys
}

fn default_keys() -> BTreeSet<String> {
    let dict: Dict = Figment::from(Toml::string(herald::config::DEFAULT_TOML))
        .extract()
        .expect("config/default.toml parses");
    keys_of(&serde_json::to_value(dict).expect("defaults as JSON"))
}

/// Panics with `what` and the offenders unless every key of `keys` is in `within`.
fn assert_all_in(keys: &BTreeSet<String>, within: &BTreeSet<String>, what: &str) {
    let outside: Vec<_> = keys.difference(within).collect();
    assert!(outside.is_empty(), "{what}: {outside:?}");
}

/// Every `backticked` key in the first column of the README's
/// `## Configuration` table.
fn documented_keys() -> BTreeSet<String> {
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let section = readme
        .split("## Configuration")
        .nth(1)
        .expect("a Configuration section");
    section
        .lines()
        .skip_while(|l| !l.starts_with("| key"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .flat_map(|l| {
            let first = l.trim_matches('|').split('|').next().unwrap_or("");
            first
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn every_configuration_key_is_documented_and_every_documented_key_exists() {
    let defaults = default_keys();
    let documented = documented_keys();
    assert!(defaults.len() > 30, "{defaults:?}");
    assert_all_in(
        &defaults,
        &documented,
        "keys missing from the README's configuration table",
    );
    let known: BTreeSet<String> = defaults
        .iter()
        .cloned()
        .chain(OPTIONAL_KEYS.iter().map(|k| k.to_string()))
        .collect();
    assert_all_in(
        &documented,
        &known,
        "the README documents keys that do not exist",
    );
}

#[test]
fn every_optional_key_is_accepted_by_the_configuration() {
    // `deny_unknown_fields` refuses a key that does not exist.
    let values = [
        ("redis_url", "\"redis://127.0.0.1:6379\""),
        ("admin_token", "\"0123456789abcdef\""),
        ("jwt_secret", "\"0123456789abcdef0123456789abcdef\""),
        ("sentry_dsn", "\"https://key@o0.ingest.sentry.io/0\""),
        ("email.resend_api_key", "\"re_test\""),
        ("email.resend_base_url", "\"http://127.0.0.1:1\""),
        ("auth.dev_login", "true"),
        ("limits.trusted_proxy_header", "\"X-Forwarded-For\""),
    ];
    assert_eq!(values.len(), OPTIONAL_KEYS.len());
    for (key, value) in values {
        let toml = match key.split_once('.') {
            Some((table, field)) => format!("[{table}]\n{field} = {value}\n"),
            None => format!("{key} = {value}\n"),
        };
        herald::config::Config::from_toml(&toml)
            .unwrap_or_else(|e| panic!("{key} is not accepted: {e}"));
    }
}

#[test]
fn every_field_of_the_config_struct_is_a_documented_key_and_no_secret_is_rendered() {
    let config = herald::config::Config::from_toml(
        "admin_token = \"0123456789abcdef\"\njwt_secret = \"sekrit-0123456789abcdef0123456789\"\n",
    )
    .expect("defaults parse");
    let rendered = serde_json::to_value(&config).expect("config serialises");
    let fields = keys_of(&rendered);
    let documented = documented_keys();
    assert!(fields.len() > 30, "{fields:?}");
    assert_all_in(
        &fields,
        &documented,
        "Config fields missing from the README's configuration table",
    );
    assert_all_in(
        &documented,
        &fields,
        "the README documents keys that are not Config fields",
    );
    let text = rendered.to_string();
    assert!(
        !text.contains("sekrit") && !text.contains("0123456789abcdef"),
        "{text}"
    );
    assert_eq!(rendered["admin_token"], "[redacted]");
}
