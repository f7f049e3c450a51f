//! Herald's integration tests, one test binary: each suite is a module, and
//! the harness in [`support`] (throwaway PostgreSQL, Redis, Herald processes,
//! the fake Resend and Sentry) is compiled once for all of them.
//!
//! The suites that arm crash points (`FAILPOINTS`) build only with the
//! `failpoints` feature, as `scripts/test` runs them; `cargo test` without it
//! runs the rest.

#[macro_use]
mod support;

mod abuse;
mod actors;
mod attack;
mod cli;
mod client;
mod config_docs;
mod contract;
#[cfg(feature = "failpoints")]
mod delivery;
mod deploy;
#[cfg(feature = "failpoints")]
mod embedded;
#[cfg(feature = "failpoints")]
mod failure_matrix;
mod fleet;
mod harness;
mod identity;
#[cfg(feature = "failpoints")]
mod intake;
mod listener;
mod live_list;
mod live_stream;
mod operators;
#[cfg(feature = "failpoints")]
mod provider;
mod proxy;
mod runbook;
mod store;
#[cfg(feature = "failpoints")]
mod stream;
#[cfg(feature = "failpoints")]
mod supervision;
mod web;
