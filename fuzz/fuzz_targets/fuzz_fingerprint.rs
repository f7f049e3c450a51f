//! The request fingerprint is computed from untrusted JSON bodies. For any
//! JSON the parser accepts: canonicalisation never panics, its output is
//! JSON that means the same value, canonicalising it again changes nothing,
//! and the fingerprint ignores formatting (whitespace, key order).
#![no_main]

#[path = "../../src/keys.rs"]
#[allow(dead_code)]
mod keys;

use keys::{canonical_json, Fingerprint};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let canonical = canonical_json(&value);
    let reparsed: serde_json::Value =
        serde_json::from_str(&canonical).expect("canonical JSON is JSON");
    assert_eq!(reparsed, value, "canonical form changed the value");
    assert_eq!(canonical_json(&reparsed), canonical, "not a fixed point");
    let pretty = serde_json::to_string_pretty(&value).expect("serialise");
    let from_pretty: serde_json::Value = serde_json::from_str(&pretty).expect("reparse");
    assert_eq!(
        Fingerprint::of_request("POST", "/api/applications", &value),
        Fingerprint::of_request("POST", "/api/applications", &from_pretty),
        "formatting changed the fingerprint"
    );
});
