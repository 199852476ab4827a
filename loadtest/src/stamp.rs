//! The stamp every generated RTP packet carries (sender, sequence number,
//! send time), and where it goes in real VP8 and Opus payloads so that it
//! survives the SFU and the media stays decodable.
//!
//! Why in the payload: the SFU strips RTP header extensions it did not
//! negotiate (`strip_extensions` in `src/transport.rs`) and rewrites SSRC,
//! sequence numbers and timestamps per subscriber, so the payload is the only
//! part of a packet that reaches the subscriber as sent.
//!
//! - **VP8**: a [`STAMP_LEN`]-byte trailer after the frame data of *every*
//!   packet (RFC 7741 payload descriptor, then a slice of the frame, then the
//!   stamp). A receiver must strip it ([`split_trailer`]) before
//!   reassembling or decoding the frame. Every packet carries one, so loss
//!   and latency are per packet, not per frame.
//! - **Opus**: the encoder's single-frame (code 0) packet is rewritten as a
//!   code 3 packet with one frame and padding (RFC 6716 section 3.2.5), and
//!   the stamp *is* the padding. Decoders skip padding ("the decoder MUST
//!   accept any value for the padding bytes"), so the packet still decodes
//!   to exactly the same audio (the unit test checks this with libopus);
//!   the server's mixer can decode it too. The RFC asks encoders to zero
//!   padding; this is a measuring tool's deliberate exception.
//!
//! Layout of the stamp (big-endian): sender `u32`, sequence `u32` (per
//! publisher and kind, counting packets from 0), send time `u64`
//! (nanoseconds since the generator's base `Instant`), then the magic `SB`.

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes of a stamp.
pub const STAMP_LEN: usize = 4 + 4 + 8 + 2;
const MAGIC: [u8; 2] = *b"SB";

/// What a packet says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub sender: u32,
    pub seq: u32,
    pub sent_ns: u64,
}

/// Why a payload's stamp could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// Shorter than a stamp (plus what must precede it).
    Short,
    /// No stamp where one should be (wrong magic, or Opus without padding).
    NoStamp,
    /// Not the framing we send (e.g. an Opus code other than 0 or 3).
    Framing,
}

impl Bad {
    pub fn as_str(self) -> &'static str {
        match self {
            Bad::Short => "short",
            Bad::NoStamp => "no-stamp",
            Bad::Framing => "bad-framing",
        }
    }
}

impl Stamp {
    pub fn put(&self, buf: &mut BytesMut) {
        buf.put_u32(self.sender);
        buf.put_u32(self.seq);
        buf.put_u64(self.sent_ns);
        buf.put_slice(&MAGIC);
    }

    /// Reads a stamp from exactly [`STAMP_LEN`] bytes.
    pub fn read(b: &[u8]) -> Result<Stamp, Bad> {
        if b.len() != STAMP_LEN {
            return Err(Bad::Short);
        }
        if b[16..] != MAGIC {
            return Err(Bad::NoStamp);
        }
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut ns = [0u8; 8];
        ns.copy_from_slice(&b[8..16]);
        Ok(Stamp {
            sender: u32_at(0),
            seq: u32_at(4),
            sent_ns: u64::from_be_bytes(ns),
        })
    }
}

/// Appends the stamp as a trailer (VP8 packets).
pub fn append_trailer(buf: &mut BytesMut, stamp: Stamp) {
    stamp.put(buf);
}

/// Splits a trailer-stamped payload into the media part and the stamp.
pub fn split_trailer(payload: &[u8]) -> Result<(&[u8], Stamp), Bad> {
    let at = payload.len().checked_sub(STAMP_LEN).ok_or(Bad::Short)?;
    let (media, stamp) = payload.split_at(at);
    Ok((media, Stamp::read(stamp)?))
}

/// An Opus code 0 packet (one frame) rewritten as code 3 (one frame, CBR)
/// whose padding is the stamp. `None` if `packet` is not code 0.
pub fn opus_stamped(packet: &[u8], stamp: Stamp) -> Option<Bytes> {
    let (&toc, frame) = packet.split_first()?;
    if toc & 0x03 != 0 {
        return None;
    }
    let mut p = BytesMut::with_capacity(packet.len() + 3 + STAMP_LEN);
    p.put_u8(toc | 0x03);
    // Frame count byte: v=0 (CBR), p=1 (padding), M=1.
    p.put_u8(0x41);
    // Padding length (< 255, so one byte).
    p.put_u8(STAMP_LEN as u8);
    p.put_slice(frame);
    stamp.put(&mut p);
    Some(p.freeze())
}

/// Reads the stamp from the padding of an Opus code 3 packet built by
/// [`opus_stamped`]; also returns the frame data.
pub fn opus_split(payload: &[u8]) -> Result<(&[u8], Stamp), Bad> {
    let (&toc, rest) = payload.split_first().ok_or(Bad::Short)?;
    if toc & 0x03 != 3 {
        return Err(if toc & 0x03 == 0 {
            Bad::NoStamp
        } else {
            Bad::Framing
        });
    }
    let (&count, mut rest) = rest.split_first().ok_or(Bad::Short)?;
    if count & 0x40 == 0 {
        return Err(Bad::NoStamp);
    }
    if count & 0x80 != 0 || count & 0x3f != 1 {
        return Err(Bad::Framing);
    }
    let mut padding = 0usize;
    loop {
        let (&b, r) = rest.split_first().ok_or(Bad::Short)?;
        rest = r;
        if b == 255 {
            padding += 254;
        } else {
            padding += usize::from(b);
            break;
        }
    }
    if padding < STAMP_LEN || rest.len() < padding {
        return Err(Bad::Short);
    }
    let (frame, pad) = rest.split_at(rest.len() - padding);
    let stamp = Stamp::read(&pad[pad.len() - STAMP_LEN..])?;
    Ok((frame, stamp))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Stamp = Stamp {
        sender: 7,
        seq: 0x0102_0304,
        sent_ns: 123_456_789_012,
    };

    #[test]
    fn trailer_round_trip() {
        let mut b = BytesMut::from(&b"frame data"[..]);
        append_trailer(&mut b, S);
        assert_eq!(b.len(), 10 + STAMP_LEN);
        let (media, stamp) = split_trailer(&b).expect("stamped");
        assert_eq!(media, b"frame data");
        assert_eq!(stamp, S);
        assert_eq!(split_trailer(&b[..10]), Err(Bad::Short));
        let mut bad = b.to_vec();
        let last = bad.len() - 1;
        bad[last] = b'x';
        assert_eq!(split_trailer(&bad), Err(Bad::NoStamp));
    }

    #[test]
    fn opus_padding_round_trip_and_rejects() {
        let code0 = [0x78u8, 1, 2, 3, 4, 5];
        let p = opus_stamped(&code0, S).expect("code 0");
        assert_eq!(p[0], 0x7b);
        let (frame, stamp) = opus_split(&p).expect("stamped");
        assert_eq!(frame, &code0[1..]);
        assert_eq!(stamp, S);
        assert!(opus_stamped(&[0x79, 1, 2], S).is_none(), "code 1 refused");
        assert_eq!(opus_split(&code0), Err(Bad::NoStamp));
        assert_eq!(opus_split(&[0x79, 1, 2]), Err(Bad::Framing));
        assert_eq!(opus_split(&p[..5]), Err(Bad::Short));
    }

    /// The stamped packet decodes (libopus) to exactly the samples of the
    /// encoder's own packet: the stamp costs the audio nothing.
    #[test]
    fn stamped_opus_decodes_like_the_original() {
        let clip = crate::media::OpusClip::tone(440.0, 10).expect("encodes");
        let mut plain = opus::Decoder::new(48_000, opus::Channels::Mono).expect("decoder");
        let mut stamped = opus::Decoder::new(48_000, opus::Channels::Mono).expect("decoder");
        let (mut a, mut b) = (vec![0i16; 960], vec![0i16; 960]);
        for (i, frame) in clip.frames.iter().enumerate() {
            let p = opus_stamped(frame, Stamp { seq: i as u32, ..S }).expect("code 0");
            assert_eq!(plain.decode(frame, &mut a, false).expect("decodes"), 960);
            assert_eq!(stamped.decode(&p, &mut b, false).expect("decodes"), 960);
            assert_eq!(a, b, "frame {i}");
            assert_eq!(opus_split(&p).expect("stamp").1.seq, i as u32);
        }
        // And it is real audio, not silence.
        assert!(a.iter().any(|s| s.unsigned_abs() > 1000));
    }
}
