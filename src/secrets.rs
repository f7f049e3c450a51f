//! Generated secrets of the embedded mode.
//!
//! `cargo run --release` must work with no configuration at all, yet the
//! admin listener and user tokens still need secrets. So, in the embedded
//! mode only, a missing `admin_token` or `jwt_secret` is read from
//! `<state_dir>/admin_token` / `<state_dir>/jwt_secret`, or generated there on
//! first start (random, 0600, created exclusively so two starts cannot race
//! to different values). The admin token is shown once, when it is created.
//! In production (Postgres) both stay required: a generated secret on one of
//! several processes would lock the others out.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use rand::distr::{Alphanumeric, SampleString};

use crate::config::{Config, Secret};

/// Fills in the embedded mode's missing secrets. Returns the admin token if
/// it was generated just now (to be printed once).
pub fn ensure_embedded_secrets(config: &mut Config) -> anyhow::Result<Option<Secret>> {
    if !config.is_embedded() {
        return Ok(None);
    }
    let mut created_admin = None;
    if config.admin_token.is_none() {
        let (token, created) = load_or_create(&config.state_dir.join("admin_token"))?;
        if created {
            created_admin = Some(token.clone());
        }
        config.admin_token = Some(token);
    }
    if config.jwt_secret.is_none() {
        let (secret, _) = load_or_create(&config.state_dir.join("jwt_secret"))?;
        config.jwt_secret = Some(secret);
    }
    Ok(created_admin)
}

/// The secret stored at `path`, or a new random one written there (0600).
fn load_or_create(path: &Path) -> anyhow::Result<(Secret, bool)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let value = Alphanumeric.sample_string(&mut rand::rng(), 48);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(mut file) => {
            file.write_all(value.as_bytes())
                .and_then(|()| file.sync_all())
                .with_context(|| format!("writing {}", path.display()))?;
            Ok((Secret::new(value), true))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let stored = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let stored = stored.trim();
            anyhow::ensure!(
                stored.len() >= 32,
                "{} holds a secret shorter than 32 characters; delete it to generate a new one",
                path.display()
            );
            Ok((Secret::new(stored), false))
        }
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::load_or_create;

    #[test]
    fn a_secret_is_generated_once_private_and_read_back_on_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("var").join("admin_token");
        let (first, created) = load_or_create(&path).unwrap();
        assert!(created);
        assert_eq!(first.expose().len(), 48);
        let (again, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(again.expose(), first.expose());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
