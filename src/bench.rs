//! `herald bench …`: measurements against a baseline taken in the same run.

use crate::config::Config;

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// POST /api/applications against pgbench running the same SQL.
    Intake,
}

pub async fn run(command: BenchCommand, _config: Config) -> anyhow::Result<()> {
    match command {
        BenchCommand::Intake => anyhow::bail!("not yet"),
    }
}
