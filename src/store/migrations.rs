//! The schema's migrations, embedded in the binary.
//!
//! `build.rs` lists `migrations/<backend>/*.sql` as `include_str!`s; this
//! module turns that list into the `Migrator` that `sqlx::migrate!` would have
//! built, the way sqlx's own resolver does: version and description from the
//! file name, the checksum of the text (`Migration::new`, SHA-384, so the
//! rows earlier builds wrote in `_sqlx_migrations` still match), and no
//! transaction for a file that starts with `-- no-transaction`.
//!
//! Why not the macro: `sqlx::migrate!` lives in sqlx's proc-macro crate, and
//! that crate compiles sqlx's core, both drivers and bundled SQLite's C a
//! second time, for the build host, in every cold release build. The test
//! below holds this list to sqlx's runtime resolver over the same folders.

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AssertSqlSafe, SqlSafeStr};

/// One file of `migrations/<backend>/`, as `build.rs` embedded it.
pub(super) struct Embedded {
    version: i64,
    description: &'static str,
    sql: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/migrations.rs"));

/// The Postgres backend's migrations (`migrations/postgres/`).
pub(super) fn postgres() -> Migrator {
    migrator(POSTGRES)
}

/// The SQLite backend's migrations (`migrations/sqlite/`).
pub(super) fn sqlite() -> Migrator {
    migrator(SQLITE)
}

fn migrator(files: &'static [Embedded]) -> Migrator {
    Migrator::with_migrations(
        files
            .iter()
            .map(|file| {
                Migration::new(
                    file.version,
                    Cow::Borrowed(file.description),
                    MigrationType::Simple,
                    AssertSqlSafe(file.sql).into_sql_str(),
                    file.sql.starts_with("-- no-transaction"),
                )
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What sqlx's resolver reads from a folder at run time, and what the
    /// embedded list says, field by field.
    fn same_as_sqlx_reads(embedded: &Migrator, folder: &str) {
        let read = sqlx::migrate::resolve_blocking(std::path::Path::new(folder))
            .expect("the migrations folder resolves");
        // The checksum is the SHA-384 of the text: equal checksums, equal SQL.
        let shape = |m: &Migration| {
            let checksum: String = m.checksum.iter().map(|b| format!("{b:02x}")).collect();
            (
                m.version,
                m.description.to_string(),
                m.migration_type,
                checksum,
                m.no_tx,
            )
        };
        let read: Vec<_> = read.iter().map(|(m, _)| shape(m)).collect();
        let embedded: Vec<_> = embedded.iter().map(shape).collect();
        assert!(!read.is_empty(), "{folder} holds migrations");
        assert_eq!(
            embedded, read,
            "{folder}: embedded differs from sqlx's reading"
        );
    }

    #[test]
    fn the_embedded_migrations_are_what_sqlx_reads_from_the_folders() {
        same_as_sqlx_reads(&postgres(), "migrations/postgres");
        same_as_sqlx_reads(&sqlite(), "migrations/sqlite");
        let defaults = Migrator::DEFAULT;
        for migrator in [postgres(), sqlite()] {
            assert_eq!(migrator.table_name, defaults.table_name);
            assert_eq!(migrator.locking, defaults.locking);
            assert!(!migrator.ignore_missing && !migrator.no_tx);
        }
    }
}
