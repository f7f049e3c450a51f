//! The configuration table of docs/CONFIGURATION.md is checked against the configuration
//! itself: every key of `config/default.toml` (the compiled-in defaults,
//! which `Config` deserialises with `deny_unknown_fields`) is documented,
//! every documented key exists, and every field of the `Config` struct (as it
//! serialises, optional fields included) is a documented key.

use crate::support::{self, clean_env};

use std::collections::BTreeSet;

use figment::providers::{Format, Toml};
use figment::value::Dict;
use figment::Figment;

/// Keys that have no default (absent unless configured), documented too.
const OPTIONAL_KEYS: [&str; 19] = [
    "mode",
    "redis_url",
    "admin_token",
    "jwt_secret",
    "sentry_dsn",
    "email.resend_api_key",
    "email.resend_base_url",
    "auth.dev_login",
    "limits.trusted_proxy_header",
    "email.webhook_secret",
    "auth.jwks_url",
    "auth.jwks_file",
    "auth.issuer",
    "auth.audience",
    "auth.oidc_issuer",
    "auth.oidc_client_id",
    "admin.tokens",
    "admin.tokens_file",
    "telemetry.otlp_endpoint",
];

/// Every leaf key of a configuration tree, `table.field` style.
fn leaf_keys(prefix: &str, value: &serde_json::Value, out: &mut BTreeSet<String>) {
    match value {
        // An empty table (a map with nothing in it, `admin.tokens`) is a key.
        serde_json::Value::Object(fields) if !fields.is_empty() => {
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

/// Every `backticked` key in the first column of the configuration table
/// of docs/CONFIGURATION.md.
fn documented_keys() -> BTreeSet<String> {
    let section = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/CONFIGURATION.md"),
    )
    .unwrap();
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
        "keys missing from docs/CONFIGURATION.md",
    );
    let known: BTreeSet<String> = defaults
        .iter()
        .cloned()
        .chain(OPTIONAL_KEYS.iter().map(|k| k.to_string()))
        .collect();
    assert_all_in(
        &documented,
        &known,
        "docs/CONFIGURATION.md documents keys that do not exist",
    );
}

#[test]
fn every_optional_key_is_accepted_by_the_configuration() {
    // `deny_unknown_fields` refuses a key that does not exist.
    let values = [
        ("mode", "\"embedded\""),
        ("redis_url", "\"redis://127.0.0.1:6379\""),
        ("admin_token", "\"0123456789abcdef\""),
        ("jwt_secret", "\"0123456789abcdef0123456789abcdef\""),
        ("sentry_dsn", "\"https://key@o0.ingest.sentry.io/0\""),
        ("email.resend_api_key", "\"re_test\""),
        ("email.resend_base_url", "\"http://127.0.0.1:1\""),
        ("auth.dev_login", "true"),
        // Only with the proxies it is believed from (else refused at start).
        (
            "limits.trusted_proxy_header",
            "\"X-Forwarded-For\"\ntrusted_proxies = \"10.0.0.5\"",
        ),
        (
            "email.webhook_secret",
            "\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"",
        ),
        (
            "auth.jwks_url",
            "\"https://id.example.test/.well-known/jwks.json\"",
        ),
        ("auth.jwks_file", "\"/etc/herald/jwks.json\""),
        ("auth.issuer", "\"https://id.example.test/\""),
        ("auth.audience", "\"https://jobs.example.test/api\""),
        // The pair: one alone is refused at start.
        (
            "auth.oidc_issuer",
            "\"https://id.example.test/\"\noidc_client_id = \"herald-page\"",
        ),
        (
            "auth.oidc_client_id",
            "\"herald-page\"\noidc_issuer = \"https://id.example.test/\"",
        ),
        (
            "admin.tokens",
            "{ ada = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\" }",
        ),
        ("admin.tokens_file", "\"/etc/herald/admin-tokens\""),
        ("telemetry.otlp_endpoint", "\"http://127.0.0.1:4318\""),
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
        "Config fields missing from docs/CONFIGURATION.md",
    );
    assert_all_in(
        &documented,
        &fields,
        "docs/CONFIGURATION.md documents keys that are not Config fields",
    );
    let text = rendered.to_string();
    assert!(
        !text.contains("sekrit") && !text.contains("0123456789abcdef"),
        "{text}"
    );
    assert_eq!(rendered["admin_token"], "[redacted]");
}

/// The files a person copies environment names from.
const DOCUMENTS: [&str; 4] = ["README.md", "docs", "Dockerfile", "deploy/herald.service"];

/// Names in those files that are not the daemon's configuration, and the
/// file that does read each (checked, so an entry cannot outlive its use).
const NOT_DAEMON_NAMES: [(&str, &str); 6] = [
    ("HERALD_CONTRACT_ADMIN_TOKEN", "tests/herald/contract.rs"),
    ("HERALD_CONTRACT_USER_TOKEN", "tests/herald/contract.rs"),
    ("HERALD_CONTRACT_EXAMPLES", "tests/herald/contract.rs"),
    ("HERALD_CONTRACT_SEED", "tests/herald/contract.rs"),
    ("HERALD_REQUIRE_ADVISORIES", "scripts/deny"),
    ("HERALD_ADVISORY_DB_BUNDLE", "scripts/deny"),
];

/// Every `HERALD_*`, `RESEND_*` and `SENTRY_DSN` name the documents show,
/// with the values they show it with (`NAME=value`, `NAME: value`).
fn documented_names() -> std::collections::BTreeMap<String, Vec<String>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for doc in DOCUMENTS {
        let path = root.join(doc);
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                let entry = entry.unwrap().path();
                if entry.extension().is_some_and(|e| e == "md") {
                    files.push(entry);
                }
            }
        } else {
            files.push(path);
        }
    }
    let mut names: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if !text.is_char_boundary(i) {
                i += 1;
                continue;
            }
            let rest = &text[i..];
            let starts = ["HERALD_", "RESEND_", "SENTRY_DSN"]
                .iter()
                .any(|p| rest.starts_with(p));
            let boundary =
                i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
            if !(starts && boundary) {
                i += 1;
                continue;
            }
            let len = rest
                .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(rest.len());
            let name = rest[..len].trim_end_matches('_').to_string();
            if !name.contains('_') {
                // `HERALD_*` and the like: a family, not a name.
                i += len.max(1);
                continue;
            }
            let after = &rest[len..];
            let value = after
                .strip_prefix('=')
                .or_else(|| {
                    // `NAME: value` only as a YAML mapping (a compose file's
                    // `environment:`), not in prose.
                    let line_start = text[..i].rfind('\n').map_or(0, |n| n + 1);
                    text[line_start..i]
                        .trim()
                        .is_empty()
                        .then(|| after.strip_prefix(": "))
                        .flatten()
                })
                .map(|v| {
                    // A quoted value runs to its closing quote.
                    let quoted = ['\'', '"']
                        .into_iter()
                        .find(|q| v.starts_with(*q))
                        .and_then(|q| v[1..].split(q).next());
                    let v = quoted.unwrap_or_else(|| v.split_whitespace().next().unwrap_or(""));
                    // Prose around a value (`…=production, so …`) is not part of it.
                    v.trim_end_matches([',', ';', ')', ':', '.', '`', '\\'])
                        .trim_start_matches('`')
                        .to_string()
                });
            let entry = names.entry(name).or_default();
            if let Some(v) = value {
                entry.push(v);
            }
            i += len.max(1);
        }
    }
    names
}

/// A value the documents show literally (not a placeholder), if any.
fn literal(values: &[String]) -> Option<String> {
    values
        .iter()
        .find(|v| {
            !v.is_empty()
                && !v.contains('…')
                && !v.contains("...")
                && !v.contains('$')
                && !v.contains('<')
        })
        .cloned()
}

/// What `herald config` prints under this environment: the configuration
/// as JSON, or the error it exits 2 with.
fn herald_config(env: &[(String, String)]) -> Result<serde_json::Value, String> {
    let mut cmd = clean_env::herald_command();
    cmd.arg("config");
    for (name, value) in env {
        cmd.env(name, value);
    }
    let output = cmd.output().expect("herald runs");
    if output.status.success() {
        serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())
    } else {
        Err(format!(
            "exit {:?}: {}",
            output.status.code(),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// The configuration key a documented name sets, and its other spelling
/// (`HERALD_EMAIL_FROM` ⇄ `HERALD_EMAIL__FROM`) when it has one.
fn key_and_other_form(name: &str) -> (String, Option<String>) {
    match name {
        "SENTRY_DSN" => ("sentry_dsn".into(), None),
        "RESEND_API_KEY" => ("email.resend_api_key".into(), None),
        "RESEND_BASE_URL" => ("email.resend_base_url".into(), None),
        _ => {
            let bare = name.strip_prefix("HERALD_").unwrap();
            let key = herald::config::env_key(bare);
            let other = key.split_once('.').map(|(section, field)| {
                let field = field.to_ascii_uppercase();
                let section = section.to_ascii_uppercase();
                if bare.contains("__") {
                    format!("HERALD_{section}_{field}")
                } else {
                    format!("HERALD_{section}__{field}")
                }
            });
            (key, other)
        }
    }
}

/// A valid value for `key` where the documents show only a placeholder.
fn stand_in(key: &str) -> String {
    // A production run's database, not the embedded default.
    if key == "database_url" {
        return "postgres://herald:pw@127.0.0.1:1/herald".into();
    }
    if let Some(default) = default_value(key) {
        return default;
    }
    match key {
        "database_url" => "postgres://herald:pw@127.0.0.1:1/herald",
        "redis_url" => "redis://127.0.0.1:1",
        "admin_token" => "0123456789abcdef-admin",
        "jwt_secret" => "0123456789abcdef0123456789abcdef-jwt",
        "sentry_dsn" => "https://key@127.0.0.1:1/0",
        "email.resend_api_key" => "re_stand_in",
        "email.resend_base_url" => "http://127.0.0.1:1",
        "email.webhook_secret" => "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "auth.dev_login" => "true",
        "auth.jwks_file" => "/etc/herald/jwks.json",
        "admin.tokens_file" => "/etc/herald/admin-tokens",
        "telemetry.otlp_endpoint" => "http://127.0.0.1:4318",
        "mode" => "embedded",
        other => panic!(
            "no stand-in value for `{other}`: show a literal value in the docs or add one here"
        ),
    }
    .to_string()
}

/// The default of `key` as `herald config` prints it, unless it has none.
fn default_value(key: &str) -> Option<String> {
    let config = herald::config::Config::from_toml("").ok()?;
    let json = serde_json::to_value(config).ok()?;
    match at(&json, key) {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) if s.contains("[redacted]") => None,
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// The value at a dotted key of the printed configuration.
fn at<'a>(config: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
    key.split('.').fold(config, |v, part| &v[part])
}

#[test]
fn every_environment_name_the_documents_show_is_accepted_by_the_daemon_in_both_forms() {
    let names = documented_names();
    assert!(names.len() >= 15, "too few names found: {names:?}");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, reader) in NOT_DAEMON_NAMES {
        let text = std::fs::read_to_string(root.join(reader)).unwrap();
        assert!(text.contains(name), "{name} is not read by {reader}");
    }
    let mut checked = 0;
    for (name, values) in &names {
        if name == "HERALD_CONFIG" || NOT_DAEMON_NAMES.iter().any(|(n, _)| n == name) {
            continue;
        }
        let (key, other) = key_and_other_form(name);
        // Every literal value the documents show, or a stand-in.
        let mut shown_values: Vec<String> = values
            .iter()
            .filter(|v| literal(std::slice::from_ref(*v)).is_some())
            .cloned()
            .collect();
        shown_values.sort();
        shown_values.dedup();
        if shown_values.is_empty() {
            shown_values.push(stand_in(&key));
        }
        // The tokens file is read by the checks `herald config` shares with
        // `serve`: the documents' path stands for a file that exists here.
        let tokens = (key == "admin.tokens_file").then(|| {
            let file = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(file.path(), format!("ada sha256:{}\n", "ab".repeat(32))).unwrap();
            file
        });
        if let Some(file) = &tokens {
            shown_values = vec![file.path().display().to_string()];
        }
        for value in shown_values {
            // What a production run needs besides (Postgres, secrets).
            let mut base: Vec<(String, String)> = Vec::new();
            if key != "database_url" && !(key == "mode" && value == "embedded") {
                base.push(("HERALD_DATABASE_URL".into(), stand_in("database_url")));
            }
            if key != "admin_token" {
                base.push(("HERALD_ADMIN_TOKEN".into(), stand_in("admin_token")));
            }
            if key != "jwt_secret" {
                base.push(("HERALD_JWT_SECRET".into(), stand_in("jwt_secret")));
            }
            // The proxy settings, and the OpenID provider's, come in pairs:
            // start refuses one alone;
            // the resend transport needs its key.
            match key.as_str() {
                "email.transport" if value == "resend" => {
                    base.push(("RESEND_API_KEY".into(), stand_in("email.resend_api_key")))
                }
                "limits.trusted_proxies" => base.push((
                    "HERALD_LIMITS__TRUSTED_PROXY_HEADER".into(),
                    "X-Forwarded-For".into(),
                )),
                "limits.trusted_proxy_header" => {
                    base.push(("HERALD_LIMITS__TRUSTED_PROXIES".into(), "10.0.0.5".into()))
                }
                // The page's OpenID provider: an issuer and a client id.
                "auth.oidc_issuer" => base.push((
                    "HERALD_AUTH__OIDC_CLIENT_ID".into(),
                    "hErAlDpAgE0123456789".into(),
                )),
                "auth.oidc_client_id" => base.push((
                    "HERALD_AUTH__OIDC_ISSUER".into(),
                    "https://acme.eu.auth0.com/".into(),
                )),
                _ => {}
            }
            for form in std::iter::once(name.clone()).chain(other.clone()) {
                let mut env = base.clone();
                env.push((form.clone(), value.clone()));
                let config = herald_config(&env).unwrap_or_else(|e| {
                    panic!("the docs show {name}; `{form}={value}` is refused: {e}")
                });
                let got = at(&config, &key);
                let shown = match got {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let secret = shown.contains("[redacted]");
                let same_number = matches!(
                    (shown.parse::<f64>(), value.parse::<f64>()),
                    (Ok(a), Ok(b)) if a == b
                );
                assert!(
                    secret || shown == value || same_number,
                    "`{form}={value}` set `{key}` to {got}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "only {checked} names checked");
    // And a name nobody documents is refused by name, not ignored.
    let err = herald_config(&[("HERALD_EMAIL_FORM".into(), "x".into())]).unwrap_err();
    assert!(
        err.contains("exit Some(2)") && err.contains("form"),
        "{err}"
    );
}

/// The layout block of docs/DEVELOPMENT.md: the first word of each line.
fn development_layout() -> (String, Vec<String>) {
    let doc = support::repo_file("docs/DEVELOPMENT.md");
    let block = doc
        .split("## Layout")
        .nth(1)
        .and_then(|rest| rest.split("```\n").nth(1))
        .expect("DEVELOPMENT.md's layout block")
        .to_string();
    let listed = block
        .lines()
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    (block, listed)
}

#[test]
fn the_development_layout_lists_what_is_there_and_names_every_source_file() {
    let (block, listed) = development_layout();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for path in &listed {
        assert!(
            root.join(path).exists(),
            "DEVELOPMENT.md lists {path}, which does not exist"
        );
    }
    // Every file under src/ is listed, or named under a listed directory
    // (its file name, or its subdirectory's name with a slash).
    let mut unnamed = Vec::new();
    let mut dirs = vec![root.join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .to_string();
            let named = listed.contains(&rel)
                || listed.iter().any(|dir| {
                    dir.ends_with('/')
                        && rel.strip_prefix(dir.as_str()).is_some_and(|under| {
                            match under.split_once('/') {
                                Some((sub, _)) => block.contains(&format!("{sub}/")),
                                None => block.contains(under),
                            }
                        })
                });
            if !named {
                unnamed.push(rel);
            }
        }
    }
    unnamed.sort();
    assert!(
        unnamed.is_empty(),
        "docs/DEVELOPMENT.md's layout does not name {unnamed:?}"
    );
}

/// A fenced `sh` block of README.md or docs/*.md, and the line above it.
struct ShellBlock {
    /// `README.md`, `docs/DEPLOY.md`, …
    doc: String,
    /// The line of its opening fence (1-based).
    line: usize,
    /// The line before the fence: the block's marker, if it has one.
    marker: String,
    text: String,
}

fn shell_blocks() -> Vec<ShellBlock> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut docs = vec!["README.md".to_string()];
    let mut more: Vec<String> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .collect();
    more.sort();
    docs.extend(more);
    let mut blocks = Vec::new();
    for doc in docs {
        let text = support::repo_file(&doc);
        let lines: Vec<&str> = text.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            let fence = lines[i];
            if fence.starts_with("```") && fence.len() > 3 {
                let shell = matches!(fence[3..].trim(), "sh" | "bash" | "shell" | "console");
                let body: Vec<&str> = lines[i + 1..]
                    .iter()
                    .take_while(|l| !l.starts_with("```"))
                    .copied()
                    .collect();
                if shell {
                    blocks.push(ShellBlock {
                        doc: doc.clone(),
                        line: i + 1,
                        marker: if i > 0 {
                            lines[i - 1].to_string()
                        } else {
                            String::new()
                        },
                        text: body.join("\n"),
                    });
                }
                i += body.len() + 2;
            } else {
                i += 1;
            }
        }
    }
    blocks
}

/// What stands for a value the reader has to supply: `…`, `=...`, `<admin token>`.
fn placeholder_in(text: &str) -> Option<String> {
    if text.contains('…') {
        return Some("…".into());
    }
    if text.contains("=...") {
        return Some("=...".into());
    }
    let bytes = text.as_bytes();
    for (at, _) in text.match_indices('<') {
        let rest = &text[at + 1..];
        let word: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == ' ' || *c == '_')
            .collect();
        if !word.is_empty() && rest[word.len()..].starts_with('>') && at + 1 < bytes.len() {
            return Some(format!("<{word}>"));
        }
    }
    None
}

/// Every shell block of README.md and docs/ says above it how it is kept
/// true: `<!-- run: here -->` (this test runs it with bash from the
/// repository's root), `<!-- run: tests/herald/<suite>.rs -->` (that suite
/// reads it from the document and runs it), `<!-- call: NAME -->` (the
/// runbook's, run by runbook.rs), `<!-- settings: tests/herald/<suite>.rs -->`
/// (an environment file, `NAME=value` lines only, which that suite starts
/// Herald with; `…` marks a secret of the reader's own, which the suite
/// fills), or `<!-- not run: why -->`. Run blocks hold no placeholder. The blocks not run are listed, with why, in this
/// test's output and in target/test-artifacts/docs-blocks-not-run.txt.
#[test]
fn every_shell_block_of_the_docs_is_run_by_a_test_or_says_why_not() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let blocks = shell_blocks();
    assert!(blocks.len() >= 25, "{} blocks found", blocks.len());
    let mut problems = Vec::new();
    let mut not_run = Vec::new();
    let (mut here, mut by_suite, mut settings) = (0, 0, 0);
    for block in &blocks {
        let at = format!("{}:{}", block.doc, block.line);
        let marker = block.marker.trim();
        if let Some(why) = marker
            .strip_prefix("<!-- not run: ")
            .and_then(|rest| rest.strip_suffix(" -->"))
        {
            not_run.push(format!("{at}: {why}"));
            continue;
        }
        let read_by = |suite: &str, problems: &mut Vec<String>| {
            let name = block.doc.rsplit('/').next().unwrap_or_default();
            match std::fs::read_to_string(root.join(suite)) {
                Ok(source) if source.contains(name) => {}
                Ok(_) => problems.push(format!("{at}: {suite} does not read {name}")),
                Err(e) => problems.push(format!("{at}: {suite}: {e}")),
            }
        };
        if let Some(suite) = marker
            .strip_prefix("<!-- settings: ")
            .and_then(|rest| rest.strip_suffix(" -->"))
        {
            settings += 1;
            read_by(suite, &mut problems);
            let stray = block.text.lines().find(|l| {
                let l = l.trim();
                !(l.is_empty()
                    || l.starts_with('#')
                    || l.split_once('=').is_some_and(|(k, _)| {
                        !k.is_empty()
                            && k.chars()
                                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                    }))
            });
            if let Some(line) = stray {
                problems.push(format!(
                    "{at}: a settings block holds `{line}`, not NAME=value"
                ));
            }
            continue;
        }
        if let Some(found) = placeholder_in(&block.text) {
            problems.push(format!("{at}: a run block holds the placeholder {found}"));
        }
        if marker == "<!-- run: here -->" {
            here += 1;
            let mut bash = std::process::Command::new("bash");
            bash.args(["-euo", "pipefail", "-c", &block.text])
                .current_dir(root);
            let out = support::output_within(bash, std::time::Duration::from_secs(120), &at);
            if !out.status.success() {
                problems.push(format!(
                    "{at}: exit {:?}\n{}{}",
                    out.status.code(),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        } else if let Some(suite) = marker
            .strip_prefix("<!-- run: ")
            .and_then(|rest| rest.strip_suffix(" -->"))
        {
            by_suite += 1;
            read_by(suite, &mut problems);
        } else if let Some(call) = marker
            .strip_prefix("<!-- call: ")
            .and_then(|rest| rest.strip_suffix(" -->"))
        {
            by_suite += 1;
            let runbook = support::repo_file("tests/herald/runbook.rs");
            if block.doc != "docs/RUNBOOK.md" || !runbook.contains(&format!("\"{call}\"")) {
                problems.push(format!("{at}: the call {call} is not one runbook.rs runs"));
            }
        } else {
            problems.push(format!(
                "{at}: no marker above the block (`<!-- run: … -->` or `<!-- not run: why -->`)"
            ));
        }
    }
    let listing = not_run.join("\n");
    eprintln!(
        "{} shell blocks: {here} run here, {by_suite} run by their suites, {settings} \
         environment files started with by their suites, {} not run:\n{listing}",
        blocks.len(),
        not_run.len()
    );
    let dir = root.join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("docs-blocks-not-run.txt"), listing + "\n").unwrap();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
