//! VP8 payload descriptor rewriting for a downtrack whose source changes
//! (the active speaker's video to a classic client; later, simulcast layers).
//!
//! A receiver's VP8 decoder (and Chromium's frame assembler before it)
//! tracks the picture id, TL0PICIDX and KEYIDX of the stream: a jump back,
//! or a gap it cannot explain, makes it wait for a keyframe or drop frames.
//! When the forwarder switches from one source to another (always at a
//! keyframe of the new source), the new source's counters are shifted so
//! that the output continues where the old one stopped:
//!
//! - picture id (7 or 15 bits, RFC 7741 §4.2): the first picture of the new
//!   source gets `last_out + 1`; later ones keep their distance to it. The
//!   field keeps its width: a 7-bit id is rewritten modulo 128.
//! - TL0PICIDX (8 bits): likewise, `last_out + 1` at the switch.
//! - KEYIDX (5 bits): likewise.
//!
//! Within one source the offsets are constant, so reordering comes through,
//! except for pictures the forwarder leaves out (a temporal layer above
//! the subscriber's, [`Vp8Munger::drop_picture`]): the pictures after one
//! are numbered one lower, so the picture ids the subscriber sees have no
//! gap (Chromium's frame reference finder takes a gap for a missing frame
//! that later ones may depend on).
//! Everything is written in place into the descriptor's bytes; a payload
//! whose descriptor does not parse is refused ([`Vp8MungeError`]) and must not
//! be forwarded.

use super::codec::{CodecError, Vp8Descriptor};
use super::removed::Removed;
use super::Ssrc;

/// Why a packet's descriptor was not rewritten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Vp8MungeError {
    #[error("VP8 descriptor: {0}")]
    Descriptor(#[from] CodecError),
    /// A late packet from before pictures left out that are no longer
    /// remembered: its picture id cannot be placed.
    #[error("VP8 picture id older than the pictures left out that are remembered")]
    TooOld,
}

/// Extended picture ids start here, so that ids older than the first
/// (reordered packets) stay positive.
const PID_BASE: u64 = 1 << 32;

/// Offsets applied to one source's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Offsets {
    picture_id: u16,
    tl0: u8,
    key_idx: u8,
}

/// Rewrites the VP8 descriptors of one outgoing stream.
#[derive(Debug, Clone, Default)]
pub struct Vp8Munger {
    source: Option<Ssrc>,
    offsets: Offsets,
    /// The newest values written, as a continuation point.
    last_picture_id: Option<u16>,
    last_tl0: Option<u8>,
    last_key_idx: Option<u8>,
    /// Whether the next packet of `source` is the first after a switch.
    fresh: bool,
    /// The newest picture id of `source` (extended), forwarded or left out.
    newest_pid: Option<u64>,
    /// `source`'s pictures left out.
    removed: Removed,
}

impl Vp8Munger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rewrites `payload` (a VP8 RTP payload from `ssrc`) in place. The
    /// first packet from a new SSRC starts a new source whose counters
    /// continue the output.
    pub fn munge(
        &mut self,
        ssrc: impl Into<Ssrc>,
        payload: &mut [u8],
    ) -> Result<(), Vp8MungeError> {
        let ssrc = ssrc.into();
        let d = Vp8Descriptor::parse(payload)?;
        if self.source != Some(ssrc) {
            self.source = Some(ssrc);
            self.fresh = true;
        }
        if self.fresh {
            self.fresh = false;
            self.newest_pid = None;
            self.removed = Removed::new();
            self.offsets = Offsets {
                picture_id: match (d.picture_id, self.last_picture_id) {
                    (Some(p), Some(last)) => last.wrapping_add(1).wrapping_sub(p),
                    _ => 0,
                },
                tl0: match (d.tl0_pic_idx, self.last_tl0) {
                    (Some(t), Some(last)) => last.wrapping_add(1).wrapping_sub(t),
                    _ => 0,
                },
                key_idx: match (d.key_idx, self.last_key_idx) {
                    (Some(k), Some(last)) => last.wrapping_add(1).wrapping_sub(k) & 0x1f,
                    _ => 0,
                },
            };
        }
        // Positions: byte 0 is the descriptor's first byte; with X set byte
        // 1 holds I/L/T/K and the optional fields follow in that order.
        if payload[0] & 0x80 == 0 {
            return Ok(());
        }
        let x = payload[1];
        let mut pos = 2;
        if x & 0x80 != 0 {
            let wide = payload[pos] & 0x80 != 0;
            let Some(p) = d.picture_id else {
                return Ok(());
            };
            let ext = self.extend_pid(p, wide);
            // Bounded by the pictures of one source: fits in 16 bits
            // modulo the id's width, which is all that is kept.
            let removed = self.removed.before(ext).ok_or(Vp8MungeError::TooOld)? as u16;
            self.newest_pid = Some(self.newest_pid.map_or(ext, |n| n.max(ext)));
            let p = p.wrapping_sub(removed);
            if wide {
                let out = p.wrapping_add(self.offsets.picture_id) & 0x7fff;
                payload[pos] = 0x80 | (out >> 8) as u8;
                payload[pos + 1] = (out & 0xff) as u8;
                self.last_picture_id = Some(newer_15(self.last_picture_id, out));
                pos += 2;
            } else {
                let out = p.wrapping_add(self.offsets.picture_id) & 0x7f;
                payload[pos] = out as u8;
                self.last_picture_id = Some(newer_15(self.last_picture_id, out));
                pos += 1;
            }
        }
        if x & 0x40 != 0 {
            let out = payload[pos].wrapping_add(self.offsets.tl0);
            payload[pos] = out;
            self.last_tl0 = Some(match self.last_tl0 {
                Some(last) if (out.wrapping_sub(last) as i8) < 0 => last,
                _ => out,
            });
            pos += 1;
        }
        if x & 0x10 != 0 {
            let b = payload[pos];
            let out = (b & 0x1f).wrapping_add(self.offsets.key_idx) & 0x1f;
            payload[pos] = (b & 0xe0) | out;
            self.last_key_idx = Some(out);
        }
        Ok(())
    }
}

impl Vp8Munger {
    /// A packet of `ssrc` that is not forwarded because its picture is
    /// left out (a temporal layer above the subscriber's). The pictures
    /// after it are numbered as if it had never been: the first packet of
    /// a picture newer than every one seen takes it out of the numbering;
    /// a late one cannot be (its id stays a gap). Packets of a source not
    /// forwarded yet change nothing.
    pub fn drop_picture(
        &mut self,
        ssrc: impl Into<Ssrc>,
        payload: &[u8],
    ) -> Result<(), Vp8MungeError> {
        if self.source != Some(ssrc.into()) || self.fresh {
            return Ok(());
        }
        let d = Vp8Descriptor::parse(payload)?;
        let Some(p) = d.picture_id else {
            return Ok(());
        };
        // Only with I set is there a picture id: byte 2 holds M.
        let wide = payload.get(2).is_some_and(|b| b & 0x80 != 0);
        let ext = self.extend_pid(p, wide);
        self.removed.remove(ext, self.newest_pid);
        self.newest_pid = Some(self.newest_pid.map_or(ext, |n| n.max(ext)));
        Ok(())
    }

    /// `p` (15 or 7 bits) extended around the newest id of the source.
    fn extend_pid(&self, p: u16, wide: bool) -> u64 {
        let modulus: u64 = if wide { 1 << 15 } else { 1 << 7 };
        let Some(newest) = self.newest_pid else {
            return PID_BASE + u64::from(p);
        };
        let delta = (u64::from(p) + modulus - newest % modulus) % modulus;
        if delta < modulus / 2 {
            newest + delta
        } else {
            newest - (modulus - delta)
        }
    }
}

/// The newer of two 15-bit picture ids (serial-number arithmetic).
fn newer_15(last: Option<u16>, out: u16) -> u16 {
    match last {
        Some(l) if (out.wrapping_sub(l) & 0x7fff) >= 0x4000 => l,
        _ => out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A descriptor with X, I (15-bit M), L, T and K, then a payload byte.
    fn packet(pid: u16, tl0: u8, keyidx: u8, start: bool) -> Vec<u8> {
        vec![
            0x80 | if start { 0x10 } else { 0 },
            0xf0,
            0x80 | (pid >> 8) as u8,
            (pid & 0xff) as u8,
            tl0,
            0x20 | keyidx,
            0x00,
        ]
    }

    fn fields(p: &[u8]) -> (u16, u8, u8) {
        let d = Vp8Descriptor::parse(p).expect("parses");
        (
            d.picture_id.expect("pid"),
            d.tl0_pic_idx.expect("tl0"),
            d.key_idx.expect("keyidx"),
        )
    }

    #[test]
    fn the_first_source_passes_unchanged() {
        let mut m = Vp8Munger::new();
        for i in 0..5u16 {
            let mut p = packet(1000 + i, 7 + i as u8, 3, true);
            m.munge(1u32, &mut p).expect("munged");
            assert_eq!(fields(&p), (1000 + i, 7 + i as u8, 3));
        }
    }

    #[test]
    fn a_switch_continues_every_counter_and_keeps_distances_and_the_layer_bits() {
        let mut m = Vp8Munger::new();
        for i in 0..3u16 {
            let mut p = packet(500 + i, 10 + i as u8, 4, true);
            m.munge(1u32, &mut p).expect("munged");
        }
        // Output so far ends at pid 502, tl0 12, keyidx 4.
        let mut first = packet(32_000, 250, 30, true);
        m.munge(2u32, &mut first).expect("munged");
        assert_eq!(fields(&first), (503, 13, 5));
        // The T byte's TID/Y bits are kept.
        assert_eq!(first[5] & 0xe0, 0x20);
        let mut later = packet(32_005, 252, 30, false);
        m.munge(2u32, &mut later).expect("munged");
        assert_eq!(fields(&later), (508, 15, 5));
        // Reordered (older) packet of the same source keeps its distance.
        let mut old = packet(32_002, 251, 30, false);
        m.munge(2u32, &mut old).expect("munged");
        assert_eq!(fields(&old), (505, 14, 5));
    }

    #[test]
    fn picture_ids_wrap_at_15_bits() {
        let mut m = Vp8Munger::new();
        let mut p = packet(0x7ffe, 0, 0, true);
        m.munge(1u32, &mut p).expect("munged");
        let mut q = packet(100, 0, 0, true);
        m.munge(2u32, &mut q).expect("munged");
        assert_eq!(fields(&q).0, 0x7fff);
        let mut r = packet(101, 0, 0, true);
        m.munge(2u32, &mut r).expect("munged");
        assert_eq!(fields(&r).0, 0);
    }

    #[test]
    fn a_7_bit_picture_id_stays_7_bits() {
        let mut m = Vp8Munger::new();
        let mut a = vec![0x90, 0x80, 0x7f, 0x00];
        m.munge(1u32, &mut a).expect("munged");
        let mut b = vec![0x90, 0x80, 0x05, 0x00];
        m.munge(2u32, &mut b).expect("munged");
        assert_eq!(b[2], 0x00, "127 + 1 wraps to 0 in 7 bits");
        assert_eq!(b.len(), 4);
    }

    #[test]
    fn switching_back_to_a_source_continues_instead_of_jumping_back() {
        let mut m = Vp8Munger::new();
        let mut a = packet(100, 1, 0, true);
        m.munge(1u32, &mut a).expect("munged");
        let mut b = packet(9000, 50, 0, true);
        m.munge(2u32, &mut b).expect("munged");
        assert_eq!(fields(&b).0, 101);
        let mut c = packet(105, 2, 0, true);
        m.munge(1u32, &mut c).expect("munged");
        assert_eq!(fields(&c).0, 102);
    }

    /// A 15-bit picture id packet with a TID.
    fn layered(pid: u16, tid: u8, start: bool) -> Vec<u8> {
        vec![
            0x80 | if start { 0x10 } else { 0 },
            0xe0,
            0x80 | (pid >> 8) as u8,
            (pid & 0xff) as u8,
            0,
            tid << 6,
            0x00,
        ]
    }

    fn pid(p: &[u8]) -> u16 {
        Vp8Descriptor::parse(p)
            .expect("parses")
            .picture_id
            .expect("pid")
    }

    #[test]
    fn pictures_left_out_leave_no_gap_in_the_picture_ids() {
        let mut m = Vp8Munger::new();
        let mut out = Vec::new();
        // L1T3: tids 0 2 1 2 0 2 1 2 ..., TL2 left out, two packets per
        // picture; ids wrap at 15 bits on the way.
        for i in 0..12u16 {
            let id = (0x7ffa + i) & 0x7fff;
            let tid = [0, 2, 1, 2][usize::from(i % 4)];
            for start in [true, false] {
                let mut p = layered(id, tid, start);
                if tid == 2 {
                    m.drop_picture(1u32, &p).expect("parses");
                } else {
                    m.munge(1u32, &mut p).expect("munged");
                    if start {
                        out.push(pid(&p));
                    }
                }
            }
        }
        assert_eq!(out, vec![0x7ffa, 0x7ffb, 0x7ffc, 0x7ffd, 0x7ffe, 0x7fff]);
        // A late packet of a forwarded picture from before the last left
        // out keeps its place: picture 0x7ffa + 8 went out as 0x7ffe.
        let mut late = layered((0x7ffa + 8) & 0x7fff, 0, false);
        m.munge(1u32, &mut late).expect("munged");
        assert_eq!(pid(&late), 0x7ffe);
        // A switch continues after the last id sent.
        let mut k = layered(40, 0, true);
        m.munge(2u32, &mut k).expect("munged");
        assert_eq!(pid(&k), 0);
    }

    #[test]
    fn malformed_descriptors_are_refused_not_panicked_on() {
        let mut m = Vp8Munger::new();
        for bad in [
            &[][..],
            &[0x80][..],
            &[0x80, 0x80][..],
            &[0x80, 0x80, 0x80][..],
        ] {
            let mut b = bad.to_vec();
            assert!(m.munge(1u32, &mut b).is_err(), "{bad:?}");
        }
        // No extension: nothing to rewrite, accepted.
        let mut plain = vec![0x10, 0x00];
        m.munge(1u32, &mut plain).expect("accepted");
        assert_eq!(plain, vec![0x10, 0x00]);
    }
}
