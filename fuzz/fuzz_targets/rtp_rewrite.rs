//! `media::rtp` header view and writers, `media::rewrite::SeqRewriter` on packet streams: see `checks::rtp_rewrite`.
#![no_main]

#[path = "../../tests/props/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::rtp_rewrite(data));
