//! Herald: a daemon that makes a live job board real-time and notifying without
//! ever doing a side effect twice.
//!
//! Requests arrive at a [`warp`] front ([`http`]) that validates and
//! authenticates, then follows the idempotency protocol
//! ([`idempotency::protocol`]): an `Idempotency-Key` resolves into new /
//! in-flight / replay / mismatch; the handler builds its response, and the
//! business row, its outbox event and the key's outcome commit in one
//! transaction through the [`store`]. A supervised tree of [`ractor`] actors
//! ([`actors`]) does the work after the commit.
//! Committed events leave through the outbox relay and the broker to their
//! consumers (email) and to every process's [`actors::sse_hub`], which feeds
//! the live job stream of the web page (`web/`, compiled in).
//!
//! # Layout
//!
//! - [`config`]: layered configuration (built-in defaults, `HERALD_CONFIG` file,
//!   `HERALD_*` environment) validated at start.
//! - [`domain`]: typed request and resource values that validate on construction.
//! - [`keys`]: the values an `Idempotency-Key` is made of (key, scope,
//!   canonical-JSON fingerprint, stored response).
//! - [`idempotency`]: the protocol every keyed route follows, and the Redis hot
//!   tier in front of the database's key table.
//! - [`use_cases`]: every state change a request makes (post, edit and close
//!   a job, apply, charge), written once over the store's unit of work.
//! - [`store`]: the storage traits, one per concern, the unit of work, and
//!   their backends, Postgres and SQLite (a folder each, a file per concern,
//!   their own migrations folder), chosen by `database_url`'s scheme.
//! - [`rate`]: the one rate-limiting primitive (a token bucket) every limit uses.
//! - [`failpoints`]: the tests' crash and pause points (feature `failpoints`).
//! - [`secrets`]: the embedded mode's generated admin token and JWT secret.
//! - [`actors`]: the root supervisor and its children (KeyRegistry,
//!   OutboxRelay, EmailSender pool, RetryBudget, DlqMonitor, Janitor, SseHub).
//! - [`broker`]: at-least-once transport of outbox events (Redis Streams, or
//!   in-process without Redis), and the event cursor the stream's `id:` carries.
//! - [`email`]: the confirmation email and its transports (Resend, `.eml` files).
//! - [`retry`]: the full-jitter retry schedule.
//! - [`http`]: routes, authentication, RFC 9457 problem errors, listeners, the
//!   SSE stream, the web page's files.
//! - [`telemetry`]: logging and the Prometheus metrics of the contract.
//! - [`server`]: wires everything together: `server::run(config, listeners, shutdown)`.
//! - [`bench`]: `herald bench …`, measurements against a baseline taken in the same run.
//! - [`client`]: the retrying client (one key per operation, full jitter,
//!   Retry-After, a retry budget, a transcript) used by tools and tests.

pub mod actors;
pub mod bench;
pub mod broker;
pub mod cli;
pub mod client;
pub mod config;
pub mod domain;
pub mod email;
pub mod failpoints;
pub mod http;
pub mod idempotency;
pub mod keys;
pub mod rate;
pub mod redis_client;
pub mod retry;
pub mod secrets;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod use_cases;
