//! `media::demux` (classify, STUN USERNAME and integrity, `Demux::route`) on datagram sequences: see `checks::demux`.
#![no_main]

#[path = "../../tests/props/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::demux(data));
