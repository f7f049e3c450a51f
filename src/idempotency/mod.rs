//! Idempotency: the protocol ([`protocol`]) every keyed route follows and
//! its Redis hot tier ([`hot_tier`]); the values keys are made of are
//! [`crate::keys`], re-exported here.
//!
//! A request carrying an `Idempotency-Key` is identified by its [`KeyScope`]
//! (principal, method, route) plus the [`IdempotencyKey`] itself, and described
//! by a [`Fingerprint`] (SHA-256 over method, route and the canonical JSON body).
//! The database's `idempotency_keys` table is the truth; [`hot_tier`] is a
//! Redis cache in front of it that may vanish at any moment.

pub mod hot_tier;
pub mod protocol;

pub use crate::keys::*;
