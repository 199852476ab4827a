//! The RTP payload every generated packet carries, so a receiver knows who
//! sent it, which one it is, and when it was sent.
//!
//! Layout (big-endian):
//! - video only: a VP8 payload descriptor `0x10` (S=1, partition 0) and the
//!   first byte of a VP8 header, `0x00` (keyframe) every
//!   [`KEYFRAME_EVERY`] packets, else `0x01`, so the server's keyframe
//!   detection sees a plausible stream;
//! - a tag byte, `A` or `V`;
//! - sender index `u32`, sequence number `u32`, send time `u64` (nanoseconds
//!   since the generator's shared base `Instant`);
//! - filler up to the requested size: `i ^ seq ^ sender` for the i-th
//!   filler byte, checked on receipt so a mangled payload is counted.

use bytes::{BufMut, Bytes, BytesMut};
use switchboard_client::Kind;

/// A video keyframe every this many video packets (the first is one).
pub const KEYFRAME_EVERY: u32 = 30;

/// What a payload says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub sender: u32,
    pub seq: u32,
    pub sent_ns: u64,
}

/// Why a payload was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// Shorter than the header.
    Short,
    /// The tag byte (or VP8 descriptor) does not match the track's kind.
    Kind,
    /// A filler byte differs.
    Filler,
}

/// Bytes before the filler.
pub fn header_len(kind: Kind) -> usize {
    prefix_len(kind) + 1 + 4 + 4 + 8
}

fn prefix_len(kind: Kind) -> usize {
    match kind {
        Kind::Video => 2,
        Kind::Audio => 0,
    }
}

fn tag(kind: Kind) -> u8 {
    match kind {
        Kind::Video => b'V',
        Kind::Audio => b'A',
    }
}

fn filler(i: usize, stamp: &Stamp) -> u8 {
    (i as u8) ^ (stamp.seq as u8) ^ (stamp.sender as u8)
}

/// Whether the video packet with this sequence number is a keyframe.
pub fn is_keyframe(seq: u32) -> bool {
    seq % KEYFRAME_EVERY == 0
}

/// A payload of `size` bytes (at least [`header_len`]).
pub fn build(kind: Kind, stamp: Stamp, size: usize) -> Bytes {
    let size = size.max(header_len(kind));
    let mut p = BytesMut::with_capacity(size);
    if kind == Kind::Video {
        p.put_u8(0x10);
        p.put_u8(if is_keyframe(stamp.seq) { 0x00 } else { 0x01 });
    }
    p.put_u8(tag(kind));
    p.put_u32(stamp.sender);
    p.put_u32(stamp.seq);
    p.put_u64(stamp.sent_ns);
    let fill = size - p.len();
    p.extend((0..fill).map(|i| filler(i, &stamp)));
    p.freeze()
}

/// Reads a payload back, checking every byte.
pub fn parse(kind: Kind, data: &[u8]) -> Result<Stamp, Bad> {
    if data.len() < header_len(kind) {
        return Err(Bad::Short);
    }
    let prefix = prefix_len(kind);
    if (kind == Kind::Video && data[0] != 0x10) || data[prefix] != tag(kind) {
        return Err(Bad::Kind);
    }
    let at = prefix + 1;
    let u32_at = |i: usize| u32::from_be_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
    let mut ns = [0u8; 8];
    ns.copy_from_slice(&data[at + 8..at + 16]);
    let stamp = Stamp {
        sender: u32_at(at),
        seq: u32_at(at + 4),
        sent_ns: u64::from_be_bytes(ns),
    };
    let body = &data[header_len(kind)..];
    if body
        .iter()
        .enumerate()
        .any(|(i, b)| *b != filler(i, &stamp))
    {
        return Err(Bad::Filler);
    }
    Ok(stamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_both_kinds() {
        let stamp = Stamp {
            sender: 7,
            seq: 31,
            sent_ns: 123_456_789_012,
        };
        for (kind, size) in [(Kind::Audio, 100), (Kind::Video, 1100)] {
            let p = build(kind, stamp, size);
            assert_eq!(p.len(), size);
            assert_eq!(parse(kind, &p), Ok(stamp));
        }
        // Too small a size still carries the header.
        let p = build(Kind::Audio, stamp, 3);
        assert_eq!(p.len(), header_len(Kind::Audio));
        assert_eq!(parse(Kind::Audio, &p), Ok(stamp));
    }

    #[test]
    fn vp8_descriptor_and_keyframes() {
        let s = |seq| Stamp {
            sender: 1,
            seq,
            sent_ns: 0,
        };
        let key = build(Kind::Video, s(0), 200);
        assert_eq!(&key[..3], &[0x10, 0x00, b'V']);
        let delta = build(Kind::Video, s(1), 200);
        assert_eq!(&delta[..3], &[0x10, 0x01, b'V']);
        assert_eq!(build(Kind::Video, s(60), 200)[1], 0x00);
    }

    #[test]
    fn rejects_damage() {
        let stamp = Stamp {
            sender: 2,
            seq: 9,
            sent_ns: 5,
        };
        let p = build(Kind::Video, stamp, 300);
        let mut bad = p.to_vec();
        bad[250] ^= 0xff;
        assert_eq!(parse(Kind::Video, &bad), Err(Bad::Filler));
        assert_eq!(parse(Kind::Video, &p[..10]), Err(Bad::Short));
        assert_eq!(parse(Kind::Audio, &p), Err(Bad::Kind));
        let a = build(Kind::Audio, stamp, 100);
        assert_eq!(parse(Kind::Video, &a), Err(Bad::Kind));
    }
}
