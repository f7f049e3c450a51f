//! Embeds the schema's migrations: lists `migrations/<backend>/*.sql` into
//! `$OUT_DIR/migrations.rs`, one `include_str!` per file, for
//! `src/store/migrations.rs` to build sqlx's `Migrator` from.
//!
//! This replaces `sqlx::migrate!`, whose proc macro needs sqlx's macro crate:
//! that compiles sqlx's core, both drivers and bundled SQLite's C a second
//! time, for the build host, in every cold release build (see "Build time"
//! in docs/DEVELOPMENT.md). The file names are read as sqlx's resolver reads
//! them (`<version>_<description>.sql`); a reversible pair (`.up.sql` /
//! `.down.sql`) or a name sqlx would skip stops the build instead, so that
//! nothing is embedded differently from what sqlx would have embedded.
use std::fmt::Write as _;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    let root = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let mut out =
        String::from("// Written by build.rs: the files of migrations/, in version order.\n");
    for (constant, backend) in [("POSTGRES", "postgres"), ("SQLITE", "sqlite")] {
        let dir = Path::new(&root).join("migrations").join(backend);
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("a readable migrations directory").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            let Some((version, rest)) = name.split_once('_') else {
                panic!("{}: not <version>_<description>.sql", path.display());
            };
            let version: i64 = version
                .parse()
                .unwrap_or_else(|_| panic!("{}: the version is not an integer", path.display()));
            if rest.ends_with(".up.sql") || rest.ends_with(".down.sql") || !rest.ends_with(".sql") {
                panic!(
                    "{}: only simple <version>_<description>.sql migrations are embedded",
                    path.display()
                );
            }
            let description = rest.trim_end_matches(".sql").replace('_', " ");
            files.push((version, description, path));
        }
        files.sort_by_key(|(version, _, _)| *version);
        writeln!(out, "pub(super) const {constant}: &[Embedded] = &[")
            .expect("a String takes writes");
        for (version, description, path) in files {
            writeln!(
                out,
                "    Embedded {{ version: {version}, description: {description:?}, sql: include_str!({:?}) }},",
                path.display().to_string()
            )
            .expect("a String takes writes");
        }
        out.push_str("];\n");
    }
    let target =
        Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("migrations.rs");
    std::fs::write(&target, out).unwrap_or_else(|e| panic!("{}: {e}", target.display()));
}
