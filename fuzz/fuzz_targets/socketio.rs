//! Socket.IO packets through socketioxide's parser as `/socket.io/` configures it, and the endpoint's room argument: see `checks::socketio`.
#![no_main]

#[path = "../../tests/props/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::socketio(data));
