//! `Last-Event-ID` is untrusted input: `EventCursor::parse` must never
//! panic, and whatever it accepts must print back to text that parses to
//! the same cursor.
#![no_main]

#[path = "../../src/broker/cursor.rs"]
#[allow(dead_code)]
mod cursor;

use cursor::EventCursor;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(cursor) = EventCursor::parse(text) {
        let printed = cursor.to_string();
        assert_eq!(EventCursor::parse(&printed), Some(cursor), "{printed}");
    }
});
