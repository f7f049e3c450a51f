//! A config file is operator input: any TOML text, however wrong, must give
//! either a configuration or an error naming the problem, never a panic.
#![no_main]

#[path = "../../src/config.rs"]
#[allow(dead_code)]
mod config;

use config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Config::from_toml(text) {
        assert!(!e.to_string().is_empty());
    }
});
