//! Rebuilds Herald when a migration is added or changed: `sqlx::migrate!`
//! embeds the files of `migrations/` at compile time, and on stable Rust a
//! proc macro cannot tell Cargo which files it read (the build script
//! `sqlx migrate build-script` would write is this one).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
