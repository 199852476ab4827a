//! The synthetic media payloads the SFU tests publish: each names its
//! sender and sequence, so a receiver can check every byte.

use std::time::Instant;

use bytes::Bytes;
use switchboard_client::{Client, Event, Kind};

use super::WAIT;

/// A payload that names its sender and sequence: `<kind><name:8><seq:4><filler>`.
pub fn payload(kind: Kind, name: &str, seq: u32) -> Bytes {
    let mut p = Vec::with_capacity(200);
    match kind {
        // VP8 payload descriptor: S=1, partition 0; then a VP8 header whose
        // P bit says keyframe every 30th packet.
        Kind::Video => {
            p.push(0x10);
            p.push(if seq.is_multiple_of(30) { 0x00 } else { 0x01 });
            p.extend_from_slice(b"V");
        }
        Kind::Audio => p.extend_from_slice(b"A"),
    }
    let mut n = [b'_'; 8];
    for (i, b) in name.bytes().take(8).enumerate() {
        n[i] = b;
    }
    p.extend_from_slice(&n);
    p.extend_from_slice(&seq.to_be_bytes());
    let filler = if kind == Kind::Video { 900 } else { 100 };
    p.extend((0..filler).map(|i| (i as u8) ^ (seq as u8)));
    Bytes::from(p)
}

/// Parses a payload back into (name, seq) after checking every byte.
pub fn parse(kind: Kind, data: &[u8]) -> Option<(String, u32)> {
    let body = match kind {
        Kind::Video => data.get(3..)?,
        Kind::Audio => data.get(1..)?,
    };
    let name = String::from_utf8(body.get(..8)?.to_vec()).ok()?;
    let seq = u32::from_be_bytes(body.get(8..12)?.try_into().ok()?);
    let filler = &body[12..];
    let expected = if kind == Kind::Video { 900 } else { 100 };
    if filler.len() != expected
        || filler
            .iter()
            .enumerate()
            .any(|(i, b)| *b != (i as u8) ^ (seq as u8))
    {
        return None;
    }
    Some((name.trim_end_matches('_').to_owned(), seq))
}

/// Waits until `client` has negotiated and is connected to the server.
pub async fn until_connected(client: &mut Client) {
    let deadline = Instant::now() + WAIT;
    let mut connected = false;
    let mut negotiated = false;
    while !(connected && negotiated) {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_event_within(left).await {
            Some(Event::Connection(s)) if s == "connected" => connected = true,
            Some(Event::Negotiated) => negotiated = true,
            Some(Event::Closed) | None => panic!("{}: not connected within {WAIT:?}", client.id),
            Some(_) => {}
        }
    }
}
