//! The `Idempotency-Key` header is untrusted input: `IdempotencyKey::parse`
//! must never panic, must accept exactly 1–255 visible ASCII bytes, and a
//! parsed key must be those bytes unchanged.
#![no_main]

#[path = "../../src/keys.rs"]
#[allow(dead_code)]
mod keys;

use keys::IdempotencyKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let valid = !data.is_empty() && data.len() <= 255 && data.iter().all(u8::is_ascii_graphic);
    match IdempotencyKey::parse(data) {
        Ok(key) => {
            assert!(valid, "accepted an invalid key: {data:?}");
            assert_eq!(key.as_str().as_bytes(), data);
        }
        Err(_) => assert!(!valid, "refused a valid key: {data:?}"),
    }
});
