//! The harness's own promise: a throwaway server a test starts is the one it
//! talks to. A port that was free when asked can be bound by another test's
//! server first; the new server then fails to bind, and without a check the
//! test would use (and, when the other test ends, lose) a stranger's server.

use crate::support;

use futures::FutureExt;
use support::Redis;

#[tokio::test]
async fn a_port_another_redis_serves_is_refused_not_shared() {
    let first = Redis::start().await;
    let second = std::panic::AssertUnwindSafe(Redis::start_with(first.port, &[]))
        .catch_unwind()
        .await;
    assert!(
        second.is_err(),
        "a second server on a served port must not pass for started"
    );
    // The first one is untouched.
    assert_eq!(first.cli(&["PING"]).as_deref(), Some("PONG"));
}
