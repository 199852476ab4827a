//! `media::offer::{inspect, check, limit_sending}` and the engine's SDP parser on any text: see `checks::sdp_offer`.
#![no_main]

#[path = "../../tests/props/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        checks::sdp_offer(text);
    }
});
