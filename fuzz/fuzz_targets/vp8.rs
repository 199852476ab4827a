//! VP8/VP9 descriptors and H.264 keyframe detection (`media::codec`) on any payload: see `checks::codecs`.
#![no_main]

#[path = "../../tests/props/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::codecs(data));
