//! `switchboard_proto::parse_client` on any UTF-8 text: see `checks::signaling`.
#![no_main]

#[path = "../../tests/props/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        checks::signaling(text);
    }
});
