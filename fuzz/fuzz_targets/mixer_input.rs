//! The mixer's Opus input path (`RoomMixer::push`/`tick`, `JitterBuffer`) on packet streams: see `checks::mixer_input`.
#![no_main]

#[path = "../../tests/props/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::mixer_input(data));
