//! Sequence number and timestamp rewriting for one forwarded track to one
//! subscriber (a downtrack).
//!
//! The subscriber must see one continuous RTP stream on the downtrack's own
//! SSRC, while what feeds it can change: the publisher renegotiates or
//! switches camera (new SSRC), or the forwarder switches source. Within one
//! source the mapping is a pair of constant offsets, so reordering and
//! gaps come through unchanged (the subscriber can NACK the gaps). On a
//! switch the offsets are chosen so the output continues at
//! `last_out_seq + 1` and `last_out_ts + elapsed wall time` (at least one
//! tick).
//!
//! Decisions:
//! - a packet older than the switch point of its source (reordered from
//!   before the switch): dropped, its output slot belongs to the old source;
//! - more than `max_reorder` (default 1000) behind the newest of its source:
//!   dropped as too old;
//! - a packet from the source we just switched away from that is not newer
//!   than anything seen from it: dropped as a straggler (a newer one means
//!   that source is back: switch to it);
//! - [`RESYNC_AFTER`] too-old / before-switch drops in a row: the source has
//!   restarted its sequence numbers on the same SSRC; treated as a switch.
//!
//! Timestamps are never judged: a jump in the source's timestamps comes
//! through as the same jump. The first source is forwarded with its own
//! sequence numbers and timestamps (offsets 0).

use std::time::Instant;

use super::removed::Removed;
use super::rtp::{self, RtpError, RtpHeader};
use super::seqno::SeqUnwrapper;
use super::{PayloadType, SeqNo, Ssrc};

/// Default reordering window, in packets.
pub const DEFAULT_MAX_REORDER: u64 = 1000;

/// Old packets in a row after which the current source is taken to have
/// restarted its sequence numbers.
pub const RESYNC_AFTER: u32 = 16;

/// Why a packet is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewriteDrop {
    /// Older than the first packet forwarded from its source.
    BeforeSwitch,
    /// More than the reordering window behind its source's newest packet.
    TooOld,
    /// A late packet from the source forwarding already switched away from.
    StaleSource,
}

impl RewriteDrop {
    /// Label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RewriteDrop::BeforeSwitch => "before-switch",
            RewriteDrop::TooOld => "too-old",
            RewriteDrop::StaleSource => "stale-source",
        }
    }
}

/// What to do with one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewrite {
    /// Send it with this sequence number and timestamp.
    Forward { seq: u16, ts: u32 },
    /// Do not send it.
    Drop(RewriteDrop),
}

#[derive(Debug, Clone)]
struct Source {
    ssrc: Ssrc,
    unwrapper: SeqUnwrapper,
    /// Extended input sequence number of the first packet forwarded.
    start: SeqNo,
    /// `out = in + seq_offset` (extended, wrapping).
    seq_offset: u64,
    /// `out = in + ts_offset` (wrapping).
    ts_offset: u32,
    /// Packets left out on purpose (a temporal layer dropped): each moves
    /// the packets after it down by one, so the output has no gap.
    removed: Removed,
}

#[derive(Debug, Clone, Copy)]
struct LastOut {
    /// Highest extended output sequence number sent.
    seq: u64,
    /// Its timestamp.
    ts: u32,
    /// When it was sent.
    at: Instant,
}

/// Maps (ssrc, seq, ts) of incoming packets onto one continuous outgoing
/// stream. One per downtrack.
#[derive(Debug, Clone)]
pub struct SeqRewriter {
    clock_rate: u32,
    max_reorder: u64,
    current: Option<Source>,
    /// The source before the current one, to recognise its stragglers.
    previous: Option<Source>,
    last: Option<LastOut>,
    old_in_a_row: u32,
}

impl SeqRewriter {
    /// A rewriter for a track with this RTP clock rate (Hz; 0 is taken as
    /// 90 000).
    pub fn new(clock_rate: u32) -> Self {
        SeqRewriter {
            clock_rate: if clock_rate == 0 { 90_000 } else { clock_rate },
            max_reorder: DEFAULT_MAX_REORDER,
            current: None,
            previous: None,
            last: None,
            old_in_a_row: 0,
        }
    }

    /// Sets the reordering window (packets; at least 1).
    pub fn with_max_reorder(mut self, packets: u64) -> Self {
        self.max_reorder = packets.max(1);
        self
    }

    /// The SSRC currently forwarded, if any.
    pub fn current_ssrc(&self) -> Option<Ssrc> {
        self.current.as_ref().map(|s| s.ssrc)
    }

    /// The highest output sequence number sent so far (extended).
    pub fn last_out_seq(&self) -> Option<SeqNo> {
        self.last.map(|l| SeqNo(l.seq))
    }

    /// Decides what to do with a packet from `ssrc` with wire sequence
    /// number `seq` and timestamp `ts`, arriving at `now`.
    pub fn rewrite(&mut self, ssrc: impl Into<Ssrc>, seq: u16, ts: u32, now: Instant) -> Rewrite {
        let ssrc = ssrc.into();
        let Some(src) = self.current.as_mut().filter(|s| s.ssrc == ssrc) else {
            if let Some(prev) = self.previous.as_ref().filter(|p| p.ssrc == ssrc) {
                if prev
                    .unwrapper
                    .highest()
                    .is_none_or(|h| prev.unwrapper.peek(seq) <= h)
                {
                    return Rewrite::Drop(RewriteDrop::StaleSource);
                }
            }
            return self.switch(ssrc, seq, ts, now);
        };
        let ext = src.unwrapper.extend(seq);
        let drop = if ext < src.start {
            Some(RewriteDrop::BeforeSwitch)
        } else if src
            .unwrapper
            .highest()
            .is_some_and(|h| ext.0.saturating_add(self.max_reorder) < h.0)
        {
            Some(RewriteDrop::TooOld)
        } else {
            None
        };
        if let Some(reason) = drop {
            self.old_in_a_row += 1;
            if self.old_in_a_row >= RESYNC_AFTER {
                // The source restarted its numbering: start over with it.
                self.current = None;
                return self.switch(ssrc, seq, ts, now);
            }
            return Rewrite::Drop(reason);
        }
        let Some(removed) = src.removed.before(ext.0) else {
            // Older than what is remembered of the packets left out.
            return Rewrite::Drop(RewriteDrop::TooOld);
        };
        self.old_in_a_row = 0;
        let out_seq = ext.0.wrapping_add(src.seq_offset).wrapping_sub(removed);
        let out_ts = ts.wrapping_add(src.ts_offset);
        if self.last.is_none_or(|l| out_seq > l.seq) {
            self.last = Some(LastOut {
                seq: out_seq,
                ts: out_ts,
                at: now,
            });
        }
        Rewrite::Forward {
            seq: out_seq as u16,
            ts: out_ts,
        }
    }

    /// Starts forwarding `ssrc` with this packet as its first.
    fn switch(&mut self, ssrc: Ssrc, seq: u16, ts: u32, now: Instant) -> Rewrite {
        let mut unwrapper = SeqUnwrapper::new();
        let ext = unwrapper.extend(seq);
        let (out_seq, out_ts) = match self.last {
            None => (ext.0, ts),
            Some(l) => {
                let elapsed = now.saturating_duration_since(l.at);
                let ticks = elapsed.as_nanos() * u128::from(self.clock_rate) / 1_000_000_000;
                // Wraps like every RTP timestamp; at least one tick so the
                // new source's first frame is not taken for the old last one.
                let ticks = (ticks as u32).max(1);
                (l.seq.wrapping_add(1), l.ts.wrapping_add(ticks))
            }
        };
        let source = Source {
            ssrc,
            unwrapper,
            start: ext,
            seq_offset: out_seq.wrapping_sub(ext.0),
            ts_offset: out_ts.wrapping_sub(ts),
            removed: Removed::new(),
        };
        let old = self.current.replace(source);
        if old.is_some() {
            self.previous = old;
        }
        self.old_in_a_row = 0;
        self.last = Some(LastOut {
            seq: out_seq,
            ts: out_ts,
            at: now,
        });
        Rewrite::Forward {
            seq: out_seq as u16,
            ts: out_ts,
        }
    }

    /// A packet of `ssrc` the forwarder leaves out on purpose (a temporal
    /// layer above the subscriber's): the packets after it are numbered as
    /// if it had never been sent, so the subscriber sees no loss. Returns
    /// whether it was taken out of the numbering; a packet older than one
    /// already forwarded cannot be (its slot stays a gap, which the
    /// subscriber NACKs in vain), nor one of another source than the
    /// current one (nothing of it is forwarded yet).
    pub fn skip(&mut self, ssrc: impl Into<Ssrc>, seq: u16) -> bool {
        let ssrc = ssrc.into();
        let Some(src) = self.current.as_mut().filter(|s| s.ssrc == ssrc) else {
            return false;
        };
        let newest = src.unwrapper.highest();
        let ext = src.unwrapper.extend(seq);
        ext >= src.start && src.removed.remove(ext.0, newest.map(|n| n.0))
    }

    /// Parses the RTP packet in `buf`, decides, and on `Forward` rewrites
    /// its SSRC, payload type, sequence number and timestamp in place.
    pub fn rewrite_packet(
        &mut self,
        buf: &mut [u8],
        out_ssrc: Ssrc,
        out_pt: PayloadType,
        now: Instant,
    ) -> Result<Rewrite, RtpError> {
        let h = RtpHeader::parse(buf)?;
        if out_pt.0 > 0x7f {
            return Err(RtpError::BadPayloadType(out_pt.0));
        }
        let decision = self.rewrite(h.ssrc, h.seq, h.timestamp, now);
        if let Rewrite::Forward { seq, ts } = decision {
            rtp::set_ssrc(buf, out_ssrc)?;
            rtp::set_payload_type(buf, out_pt)?;
            rtp::set_seq(buf, seq)?;
            rtp::set_timestamp(buf, ts)?;
        }
        Ok(decision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::seqno::extend_seq;
    use crate::media::XorShift;
    use std::time::Duration;

    const A: u32 = 0xaaaa;
    const B: u32 = 0xbbbb;

    fn fwd(r: Rewrite) -> (u16, u32) {
        match r {
            Rewrite::Forward { seq, ts } => (seq, ts),
            Rewrite::Drop(reason) => panic!("dropped: {reason:?}"),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn first_source_passes_through() {
        let t0 = Instant::now();
        let mut r = SeqRewriter::new(90_000);
        assert_eq!(fwd(r.rewrite(A, 100, 5000, t0)), (100, 5000));
        assert_eq!(fwd(r.rewrite(A, 101, 5000, t0)), (101, 5000));
        assert_eq!(fwd(r.rewrite(A, 103, 8000, t0 + ms(33))), (103, 8000));
        assert_eq!(r.current_ssrc(), Some(Ssrc(A)));
    }

    #[test]
    fn ssrc_change_continues_seq_and_timestamp() {
        let t0 = Instant::now();
        let mut r = SeqRewriter::new(90_000);
        fwd(r.rewrite(A, 500, 90_000, t0));
        assert_eq!(fwd(r.rewrite(A, 501, 93_000, t0 + ms(33))), (501, 93_000));
        // Camera switch 100 ms later: new SSRC, unrelated numbers.
        let t1 = t0 + ms(133);
        assert_eq!(fwd(r.rewrite(B, 40_000, 7, t1)), (502, 93_000 + 9_000));
        // Same frame, same timestamp; next frame keeps B's spacing.
        assert_eq!(fwd(r.rewrite(B, 40_001, 7, t1)), (503, 102_000));
        assert_eq!(fwd(r.rewrite(B, 40_002, 3007, t1 + ms(33))), (504, 105_000));
        assert_eq!(r.current_ssrc(), Some(Ssrc(B)));
    }

    #[test]
    fn switch_at_same_instant_advances_one_tick() {
        let t0 = Instant::now();
        let mut r = SeqRewriter::new(48_000);
        fwd(r.rewrite(A, 1, 960, t0));
        assert_eq!(fwd(r.rewrite(B, 9, 123, t0)), (2, 961));
        // A clock that goes backwards is treated as no time passing.
        let mut r = SeqRewriter::new(48_000);
        fwd(r.rewrite(A, 1, 960, t0 + ms(10)));
        assert_eq!(fwd(r.rewrite(B, 9, 123, t0)), (2, 961));
    }

    #[test]
    fn audio_clock_rate_converts_elapsed_time() {
        let t0 = Instant::now();
        let mut r = SeqRewriter::new(48_000);
        fwd(r.rewrite(A, 1, 0, t0));
        // 20 ms at 48 kHz = 960 ticks.
        assert_eq!(fwd(r.rewrite(B, 77, 5, t0 + ms(20))), (2, 960));
    }

    #[test]
    fn reordering_within_a_source_maps_by_offset() {
        let t0 = Instant::now();
        let mut r = SeqRewriter::new(90_000);
        fwd(r.rewrite(A, 10, 0, t0));
        fwd(r.rewrite(B, 1000, 0, t0 + ms(10))); // out 11
        assert_eq!(fwd(r.rewrite(B, 1003, 0, t0)).0, 14);
        assert_eq!(fwd(r.rewrite(B, 1001, 0, t0)).0, 12);
        assert_eq!(fwd(r.rewrite(B, 1002, 0, t0)).0, 13);
        assert_eq!(fwd(r.rewrite(B, 1004, 0, t0)).0, 15);
        // Before B's first packet: that output slot belongs to A.
        assert_eq!(
            r.rewrite(B, 999, 0, t0),
            Rewrite::Drop(RewriteDrop::BeforeSwitch)
        );
        assert_eq!(r.last_out_seq().map(SeqNo::wire), Some(15));
    }

    #[test]
    fn too_old_is_dropped() {
        let t0 = Instant::now();
        let mut r = SeqRewriter::new(90_000).with_max_reorder(100);
        fwd(r.rewrite(A, 0, 0, t0));
        fwd(r.rewrite(A, 300, 0, t0));
        // 199 behind the newest: too old, though after the start.
        assert_eq!(r.rewrite(A, 101, 0, t0), Rewrite::Drop(RewriteDrop::TooOld));
        assert_eq!(fwd(r.rewrite(A, 200, 0, t0)).0, 200);
    }

    #[test]
    fn input_wrap_is_seamless() {
        let t0 = Instant::now();
        let mut r = SeqRewriter::new(90_000);
        fwd(r.rewrite(A, 7, 0, t0));
        fwd(r.rewrite(B, 65_533, 0, t0)); // out 8
        let outs: Vec<u16> = [65_534, 65_535, 0, 2, 1, 3]
            .iter()
            .map(|&s| fwd(r.rewrite(B, s, 0, t0)).0)
            .collect();
        assert_eq!(outs, vec![9, 10, 11, 13, 12, 14]);
    }

    #[test]
    fn output_wrap_is_seamless() {
        let t0 = Instant::now();
        let mut r = SeqRewriter::new(90_000);
        fwd(r.rewrite(A, 65_534, u32::MAX - 10, t0));
        // Switch right at the output wrap, and timestamp wrap too.
        let (seq, ts) = fwd(r.rewrite(B, 100, 0, t0 + ms(1)));
        assert_eq!((seq, ts), (65_535, 79), "u32::MAX - 10 + 90, wrapped");
        let (seq, ts) = fwd(r.rewrite(B, 101, 3000, t0 + ms(2)));
        assert_eq!((seq, ts), (0, 79 + 3000));
        assert_eq!(fwd(r.rewrite(B, 103, 3000, t0)).0, 2);
        assert_eq!(fwd(r.rewrite(B, 102, 3000, t0)).0, 1);
    }

    #[test]
    fn stragglers_from_the_old_source_are_dropped_but_it_can_come_back() {
        let t0 = Instant::now();
        let mut r = SeqRewriter::new(90_000);
        fwd(r.rewrite(A, 10, 0, t0));
        fwd(r.rewrite(A, 12, 0, t0));
        fwd(r.rewrite(B, 500, 0, t0)); // out 13
                                       // A's late 11: not newer than A's newest, a straggler.
        assert_eq!(
            r.rewrite(A, 11, 0, t0),
            Rewrite::Drop(RewriteDrop::StaleSource)
        );
        assert_eq!(
            r.rewrite(A, 12, 0, t0),
            Rewrite::Drop(RewriteDrop::StaleSource)
        );
        // A resumes with newer numbers: switch back.
        assert_eq!(fwd(r.rewrite(A, 13, 0, t0)).0, 14);
        assert_eq!(r.current_ssrc(), Some(Ssrc(A)));
        // Now B's stragglers are the stale ones.
        assert_eq!(
            r.rewrite(B, 500, 0, t0),
            Rewrite::Drop(RewriteDrop::StaleSource)
        );
    }

    #[test]
    fn restarted_numbering_on_same_ssrc_resyncs() {
        let t0 = Instant::now();
        let mut r = SeqRewriter::new(90_000);
        fwd(r.rewrite(A, 40_000, 0, t0));
        fwd(r.rewrite(A, 40_001, 0, t0));
        // Source restarts at 10 000 (looks 30 000 behind).
        for i in 0..RESYNC_AFTER - 1 {
            assert!(matches!(
                r.rewrite(A, 10_000 + i as u16, 0, t0),
                Rewrite::Drop(_)
            ));
        }
        let restart = 10_000 + RESYNC_AFTER as u16;
        let (seq, _) = fwd(r.rewrite(A, restart, 0, t0 + ms(300)));
        assert_eq!(seq, 40_002);
        assert_eq!(fwd(r.rewrite(A, restart + 1, 0, t0)).0, 40_003);
        // One old packet among new ones does not trigger a resync.
        assert!(matches!(r.rewrite(A, 5, 0, t0), Rewrite::Drop(_)));
        assert_eq!(fwd(r.rewrite(A, restart + 2, 0, t0)).0, 40_004);
    }

    #[test]
    fn rewrites_packets_in_place() {
        let t0 = Instant::now();
        let mut r = SeqRewriter::new(90_000);
        let mut p = vec![
            0x80, 0xe0, 0x00, 0x05, 0, 0, 0x10, 0, 0, 0, 0, 0xaa, 1, 2, 3,
        ];
        let d = r
            .rewrite_packet(&mut p, Ssrc(0x1234_5678), PayloadType(102), t0)
            .unwrap();
        assert_eq!(d, Rewrite::Forward { seq: 5, ts: 0x1000 });
        let h = RtpHeader::parse(&p).unwrap();
        assert_eq!(h.ssrc, Ssrc(0x1234_5678));
        assert_eq!(h.payload_type, PayloadType(102));
        assert!(h.marker);
        assert_eq!(h.payload(&p), &[1, 2, 3]);
        // A dropped packet is left untouched.
        let mut late = vec![0x80, 0x60, 0x00, 0x04, 0, 0, 0, 0, 0, 0, 0, 0xaa];
        let before = late.clone();
        assert_eq!(
            r.rewrite_packet(&mut late, Ssrc(1), PayloadType(102), t0),
            Ok(Rewrite::Drop(RewriteDrop::BeforeSwitch))
        );
        assert_eq!(late, before);
        assert_eq!(
            r.rewrite_packet(&mut [0x80, 0], Ssrc(1), PayloadType(1), t0),
            Err(RtpError::TooShort { len: 2 })
        );
    }

    /// Random streams from several sources with loss, reordering and SSRC
    /// switches. Invariants: output sequence numbers never repeat, every
    /// switch continues at last+1, and within a source output differences
    /// equal input differences.
    #[test]
    fn skipped_packets_leave_no_gap_in_order_or_late() {
        let t0 = Instant::now();
        let mut r = SeqRewriter::new(90_000);
        assert_eq!(fwd(r.rewrite(A, 100, 0, t0)).0, 100);
        // 101 and 102 are a dropped temporal layer's frame.
        assert!(r.skip(A, 101));
        assert!(r.skip(A, 102));
        assert_eq!(fwd(r.rewrite(A, 103, 3000, t0)).0, 101);
        // 105 skipped before 104 arrived; 104 comes late: still in place.
        assert!(r.skip(A, 105));
        assert_eq!(fwd(r.rewrite(A, 106, 6000, t0)).0, 103);
        assert_eq!(fwd(r.rewrite(A, 104, 6000, t0)).0, 102);
        // A late packet of a dropped frame cannot be taken out any more:
        // 106 was already numbered counting it. Its slot stays a gap.
        let mut q = SeqRewriter::new(90_000);
        fwd(q.rewrite(A, 10, 0, t0));
        fwd(q.rewrite(A, 12, 0, t0));
        assert!(!q.skip(A, 11));
        assert_eq!(fwd(q.rewrite(A, 13, 0, t0)).0, 13);
        // Nothing of another source is numbered: nothing to take out.
        assert!(!q.skip(B, 5));
    }

    #[test]
    fn skips_carry_across_a_wrap_and_a_switch_continues_after_them() {
        let t0 = Instant::now();
        let mut r = SeqRewriter::new(90_000);
        fwd(r.rewrite(A, 65_534, 0, t0));
        assert!(r.skip(A, 65_535));
        assert!(r.skip(A, 0));
        assert_eq!(fwd(r.rewrite(A, 1, 0, t0)).0, 65_535);
        assert_eq!(fwd(r.rewrite(A, 2, 0, t0)).0, 0);
        // A switch continues from the last number sent, skips included.
        assert_eq!(fwd(r.rewrite(B, 500, 0, t0 + ms(5))).0, 1);
        assert_eq!(fwd(r.rewrite(B, 501, 0, t0 + ms(5))).0, 2);
    }

    #[test]
    fn property_random_switching_streams() {
        for seed in 1..=30u64 {
            let mut rng = XorShift::new(seed);
            let t0 = Instant::now();
            let mut r = SeqRewriter::new(90_000);
            let mut seen_out = std::collections::HashSet::new();
            let mut seen_in = std::collections::HashSet::new();
            let mut out_ext_highest: Option<u64> = None;
            let mut ssrc = 1u32;
            let mut next_in: u16 = rng.below(65536) as u16;
            let mut ts: u32 = rng.next_u64() as u32;
            let mut clock = t0;
            // (input seq, output ext seq) of the current source's first packet.
            let mut anchor: Option<(u64, u64)> = None;
            let mut in_unwrap = SeqUnwrapper::new();
            for step in 0..20_000 {
                clock += Duration::from_micros(rng.below(5000));
                if rng.below(1000) == 0 {
                    // Switch source: new SSRC and unrelated numbering.
                    ssrc += 1;
                    next_in = rng.below(65536) as u16;
                    ts = rng.next_u64() as u32;
                    anchor = None;
                    in_unwrap = SeqUnwrapper::new();
                }
                // Loss: skip a few input numbers.
                if rng.below(20) == 0 {
                    next_in = next_in.wrapping_add(rng.below(5) as u16);
                }
                // Mostly in order, sometimes a slightly older one.
                let seq = if anchor.is_some() && rng.below(10) == 0 {
                    next_in.wrapping_sub(1 + rng.below(5) as u16)
                } else {
                    let s = next_in;
                    next_in = next_in.wrapping_add(1);
                    s
                };
                ts = ts.wrapping_add(rng.below(3000) as u32);
                let in_ext = in_unwrap.extend(seq).0;
                match r.rewrite(ssrc, seq, ts, clock) {
                    Rewrite::Forward { seq: out, .. } => {
                        let reference = SeqNo(out_ext_highest.unwrap_or(1 << 16));
                        let out_ext = extend_seq(reference, out).0;
                        match anchor {
                            None => {
                                if let Some(h) = out_ext_highest {
                                    assert_eq!(out_ext, h + 1, "seed {seed} step {step}");
                                }
                                anchor = Some((in_ext, out_ext));
                            }
                            Some((ai, ao)) => {
                                assert_eq!(
                                    out_ext as i64 - ao as i64,
                                    in_ext as i64 - ai as i64,
                                    "seed {seed} step {step}"
                                );
                            }
                        }
                        // An output number repeats only for a repeated input.
                        assert_eq!(
                            seen_out.insert(out_ext),
                            seen_in.insert((ssrc, in_ext)),
                            "seed {seed} step {step}"
                        );
                        out_ext_highest = Some(out_ext_highest.map_or(out_ext, |h| h.max(out_ext)));
                    }
                    Rewrite::Drop(reason) => {
                        // Only older-than-start packets are dropped here.
                        assert_eq!(reason, RewriteDrop::BeforeSwitch, "seed {seed} step {step}");
                        let (ai, _) = anchor.expect("a drop needs a started source");
                        assert!(in_ext < ai);
                    }
                }
            }
        }
    }
}
