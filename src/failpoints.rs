//! Crash and pause points for the tests, armed through the `FAILPOINTS`
//! environment variable (the `fail` crate); compiled in only with the
//! `failpoints` feature. Here, below every layer, so that the store and the
//! HTTP front alike can pause where a test asks.

use std::time::Duration;

/// A pause armed through the failpoint `name` (`name=return(<ms>)`); always
/// `None` unless built with the `failpoints` feature and armed.
pub fn pause(name: &str) -> Option<Duration> {
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
    fail::fail_point!(name, |ms| ms
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis));
    None
}
