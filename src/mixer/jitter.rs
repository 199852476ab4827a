//! A per-input jitter buffer for 20 ms Opus frames.
//!
//! Packets are keyed by their extended RTP sequence number (one Opus frame
//! per packet) and held in a fixed ring of preallocated slots. The mixer
//! pops one frame per 20 ms tick; the buffer answers with the packet due,
//! with [`Frame::Lost`] when it is missing but later packets exist (the
//! caller runs Opus PLC, or FEC from the next packet when that is already
//! here), or with [`Frame::Empty`] when there is nothing to play.
//!
//! Playout starts (and restarts after an underrun) once `target` frames are
//! buffered, so the buffer absorbs that much arrival jitter. Late packets
//! (their frame was already played or declared lost) and duplicates are
//! dropped and counted. A packet too far ahead of the playout point moves
//! the playout point forward (the skipped frames count as overflow), so the
//! delay stays bounded by the ring size; a jump larger than
//! [`RESET_DISTANCE`] is taken as a new stream and resets the buffer.
//!
//! The RTP timestamp and the arrival time feed an RFC 3550 interarrival
//! jitter estimate ([`JitterStats::jitter_ms`]) for a future adaptive
//! target.

use std::time::Instant;

use super::level::AudioLevel;
use super::SAMPLE_RATE;
use crate::media::seqno::{SeqUnwrapper, TsUnwrapper};

/// The largest payload a slot holds (an Opus packet is at most 1275 bytes
/// per frame; this leaves room for odd senders).
pub const MAX_PAYLOAD: usize = 1500;

/// A sequence-number jump at least this large restarts the stream.
pub const RESET_DISTANCE: u64 = 1000;

/// What [`JitterBuffer::push`] did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Stored for playout.
    Stored,
    /// Its frame was already played (or declared lost).
    Late,
    /// The same sequence number is already buffered.
    Duplicate,
    /// Larger than [`MAX_PAYLOAD`] (or empty): dropped.
    Invalid,
    /// So far from the playout point that the buffer restarted with it.
    Reset,
}

/// One 20 ms playout decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// The frame's packet; decode it.
    Packet {
        payload: &'a [u8],
        /// Its RFC 6464 level, if the sender attached one.
        level: Option<AudioLevel>,
    },
    /// The frame is missing but later ones are here: conceal it. `fec` is
    /// the next frame's packet when buffered (decode it with FEC on).
    Lost { fec: Option<&'a [u8]> },
    /// Nothing to play (not started, underrun, or the sender went quiet).
    Empty,
}

/// Counters, monotonically increasing.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct JitterStats {
    pub received: u64,
    pub played: u64,
    pub late: u64,
    pub duplicates: u64,
    pub lost: u64,
    pub invalid: u64,
    /// Frames skipped because a packet arrived too far ahead.
    pub overflow: u64,
    pub resets: u64,
    pub underruns: u64,
    /// RFC 3550 interarrival jitter estimate, in milliseconds.
    pub jitter_ms: f32,
}

#[derive(Debug)]
struct Slot {
    seq: Option<u64>,
    level: Option<AudioLevel>,
    len: usize,
    data: Box<[u8]>,
}

/// The jitter buffer of one input.
#[derive(Debug)]
pub struct JitterBuffer {
    slots: Vec<Slot>,
    target: u64,
    seqs: SeqUnwrapper,
    stamps: TsUnwrapper,
    /// The next sequence number to play, once the stream started.
    next: Option<u64>,
    /// Waiting for `target` frames before playing.
    buffering: bool,
    /// The highest sequence number stored since the last (re)start.
    highest: Option<u64>,
    /// (arrival, extended timestamp) of the previous packet, for jitter.
    last_arrival: Option<(Instant, u64)>,
    stats: JitterStats,
}

impl JitterBuffer {
    /// A buffer of `capacity` frames (at least `target + 1`) that starts
    /// playing once `target` frames are buffered.
    pub fn new(capacity: usize, target: usize) -> Self {
        let target = target.max(1);
        let capacity = capacity.max(target + 1);
        let slots = (0..capacity)
            .map(|_| Slot {
                seq: None,
                level: None,
                len: 0,
                data: vec![0u8; MAX_PAYLOAD].into_boxed_slice(),
            })
            .collect();
        JitterBuffer {
            slots,
            target: target as u64,
            seqs: SeqUnwrapper::new(),
            stamps: TsUnwrapper::new(),
            next: None,
            buffering: true,
            highest: None,
            last_arrival: None,
            stats: JitterStats::default(),
        }
    }

    pub fn stats(&self) -> &JitterStats {
        &self.stats
    }

    /// How many frames lie between the playout point and the newest
    /// buffered packet, inclusive (missing ones count).
    pub fn depth(&self) -> u64 {
        match (self.next, self.highest) {
            (Some(next), Some(high)) if high >= next => high - next + 1,
            _ => 0,
        }
    }

    fn index(&self, seq: u64) -> usize {
        (seq % self.slots.len() as u64) as usize
    }

    fn clear_slots(&mut self) {
        for slot in &mut self.slots {
            slot.seq = None;
        }
    }

    /// Stores one packet (`seq` and `ts` as on the wire).
    pub fn push(
        &mut self,
        seq: u16,
        ts: u32,
        payload: &[u8],
        level: Option<AudioLevel>,
        now: Instant,
    ) -> Push {
        if payload.is_empty() || payload.len() > MAX_PAYLOAD {
            self.stats.invalid += 1;
            return Push::Invalid;
        }
        let seq = self.seqs.extend(seq).0;
        let ts = self.stamps.extend(ts);
        self.stats.received += 1;
        self.update_jitter(ts, now);

        let mut result = Push::Stored;
        match self.next {
            None => self.next = Some(seq),
            Some(next) if seq < next => {
                if next - seq >= RESET_DISTANCE {
                    result = self.reset(seq);
                } else {
                    self.stats.late += 1;
                    return Push::Late;
                }
            }
            Some(next) => {
                let ahead = seq - next;
                if ahead >= RESET_DISTANCE {
                    result = self.reset(seq);
                } else if ahead >= self.slots.len() as u64 {
                    // Keep the newest `capacity` frames: move the playout
                    // point forward, dropping what lies before it.
                    let new_next = seq + 1 - self.slots.len() as u64;
                    for s in next..new_next {
                        let i = self.index(s);
                        if self.slots[i].seq == Some(s) {
                            self.slots[i].seq = None;
                        }
                    }
                    self.stats.overflow += new_next - next;
                    self.next = Some(new_next);
                }
            }
        }
        let i = self.index(seq);
        let slot = &mut self.slots[i];
        if slot.seq == Some(seq) {
            self.stats.duplicates += 1;
            return Push::Duplicate;
        }
        slot.seq = Some(seq);
        slot.level = level;
        slot.len = payload.len();
        slot.data[..payload.len()].copy_from_slice(payload);
        if self.highest.is_none_or(|h| seq > h) {
            self.highest = Some(seq);
        }
        result
    }

    fn reset(&mut self, seq: u64) -> Push {
        self.clear_slots();
        self.stats.resets += 1;
        self.next = Some(seq);
        self.highest = None;
        self.buffering = true;
        Push::Reset
    }

    fn update_jitter(&mut self, ts: u64, now: Instant) {
        if let Some((prev_at, prev_ts)) = self.last_arrival {
            let arrival_ms = now.saturating_duration_since(prev_at).as_secs_f32() * 1000.0;
            let media_ms = (ts as f64 - prev_ts as f64) as f32 * 1000.0 / SAMPLE_RATE as f32;
            let d = (arrival_ms - media_ms).abs();
            self.stats.jitter_ms += (d - self.stats.jitter_ms) / 16.0;
        }
        self.last_arrival = Some((now, ts));
    }

    /// The frame due now; call once per 20 ms tick.
    pub fn pop(&mut self) -> Frame<'_> {
        let (Some(next), Some(high)) = (self.next, self.highest) else {
            return Frame::Empty;
        };
        if high < next {
            // Everything buffered was played: underrun (or a pause).
            if !self.buffering {
                self.stats.underruns += 1;
                self.buffering = true;
            }
            return Frame::Empty;
        }
        if self.buffering {
            if high - next + 1 < self.target {
                return Frame::Empty;
            }
            self.buffering = false;
        }
        self.next = Some(next + 1);
        let i = self.index(next);
        if self.slots[i].seq == Some(next) {
            self.slots[i].seq = None;
            self.stats.played += 1;
            let slot = &self.slots[i];
            return Frame::Packet {
                payload: &slot.data[..slot.len],
                level: slot.level,
            };
        }
        self.stats.lost += 1;
        let j = self.index(next + 1);
        let fec = (self.slots[j].seq == Some(next + 1)).then(|| {
            let slot = &self.slots[j];
            &slot.data[..slot.len]
        });
        Frame::Lost { fec }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn push(jb: &mut JitterBuffer, seq: u16, now: Instant) -> Push {
        let ts = u32::from(seq).wrapping_mul(960);
        jb.push(seq, ts, &[seq as u8, 0xAA], None, now)
    }

    fn pop_id(jb: &mut JitterBuffer) -> Option<Result<u8, bool>> {
        // Some(Ok(first byte)) for a packet, Some(Err(has_fec)) for lost,
        // None for empty.
        match jb.pop() {
            Frame::Packet { payload, .. } => Some(Ok(payload[0])),
            Frame::Lost { fec } => Some(Err(fec.is_some())),
            Frame::Empty => None,
        }
    }

    #[test]
    fn waits_for_target_then_plays_in_order() {
        let now = Instant::now();
        let mut jb = JitterBuffer::new(8, 2);
        assert_eq!(pop_id(&mut jb), None);
        assert_eq!(push(&mut jb, 10, now), Push::Stored);
        assert_eq!(pop_id(&mut jb), None, "one frame is below the target");
        assert_eq!(push(&mut jb, 11, now), Push::Stored);
        assert_eq!(pop_id(&mut jb), Some(Ok(10)));
        assert_eq!(push(&mut jb, 12, now), Push::Stored);
        assert_eq!(pop_id(&mut jb), Some(Ok(11)));
        assert_eq!(pop_id(&mut jb), Some(Ok(12)));
        assert_eq!(pop_id(&mut jb), None);
        assert_eq!(jb.stats().underruns, 1);
        assert_eq!(jb.stats().played, 3);
    }

    #[test]
    fn reordered_late_duplicate_and_missing() {
        let now = Instant::now();
        let mut jb = JitterBuffer::new(8, 2);
        // 1, 3, 2 (reordered), 2 again (duplicate), 5 (4 missing), 6.
        assert_eq!(push(&mut jb, 1, now), Push::Stored);
        assert_eq!(push(&mut jb, 3, now), Push::Stored);
        assert_eq!(push(&mut jb, 2, now), Push::Stored);
        assert_eq!(push(&mut jb, 2, now), Push::Duplicate);
        assert_eq!(push(&mut jb, 5, now), Push::Stored);
        assert_eq!(push(&mut jb, 6, now), Push::Stored);
        assert_eq!(pop_id(&mut jb), Some(Ok(1)));
        assert_eq!(pop_id(&mut jb), Some(Ok(2)));
        assert_eq!(pop_id(&mut jb), Some(Ok(3)));
        // 4 is lost; 5 is here, so FEC is offered.
        assert_eq!(pop_id(&mut jb), Some(Err(true)));
        // 4 shows up after its slot was played: late.
        assert_eq!(push(&mut jb, 4, now), Push::Late);
        assert_eq!(pop_id(&mut jb), Some(Ok(5)));
        // 1 again, long after: late, not a duplicate.
        assert_eq!(push(&mut jb, 1, now), Push::Late);
        assert_eq!(pop_id(&mut jb), Some(Ok(6)));
        assert_eq!(pop_id(&mut jb), None);

        let s = jb.stats();
        assert_eq!((s.late, s.duplicates, s.lost, s.played), (2, 1, 1, 5));
    }

    #[test]
    fn loss_without_fec_source() {
        let now = Instant::now();
        let mut jb = JitterBuffer::new(8, 1);
        push(&mut jb, 100, now);
        push(&mut jb, 103, now);
        assert_eq!(pop_id(&mut jb), Some(Ok(100)));
        assert_eq!(pop_id(&mut jb), Some(Err(false)));
        assert_eq!(pop_id(&mut jb), Some(Err(true)));
        assert_eq!(pop_id(&mut jb), Some(Ok(103)));
        assert_eq!(jb.stats().lost, 2);
    }

    #[test]
    fn bounded_by_capacity() {
        let now = Instant::now();
        let mut jb = JitterBuffer::new(4, 2);
        for seq in 0..10u16 {
            push(&mut jb, seq, now);
        }
        assert!(jb.depth() <= 4);
        assert_eq!(jb.stats().overflow, 6);
        assert_eq!(pop_id(&mut jb), Some(Ok(6)));
        assert_eq!(push(&mut jb, 3, now), Push::Late);
    }

    #[test]
    fn wraps_and_resets() {
        let now = Instant::now();
        let mut jb = JitterBuffer::new(8, 1);
        push(&mut jb, 65535, now);
        push(&mut jb, 0, now);
        assert_eq!(pop_id(&mut jb), Some(Ok(255)));
        assert_eq!(pop_id(&mut jb), Some(Ok(0)));
        // A new stream far away.
        assert_eq!(push(&mut jb, 30_000, now), Push::Reset);
        assert_eq!(pop_id(&mut jb), Some(Ok(30_000u16 as u8)));
        assert_eq!(jb.stats().resets, 1);
    }

    #[test]
    fn rejects_empty_and_oversized() {
        let now = Instant::now();
        let mut jb = JitterBuffer::new(8, 1);
        assert_eq!(jb.push(1, 0, &[], None, now), Push::Invalid);
        let big = vec![0u8; MAX_PAYLOAD + 1];
        assert_eq!(jb.push(1, 0, &big, None, now), Push::Invalid);
        assert_eq!(jb.stats().invalid, 2);
        assert_eq!(pop_id(&mut jb), None);
    }

    #[test]
    fn jitter_estimate_grows_with_uneven_arrival() {
        let start = Instant::now();
        let mut steady = JitterBuffer::new(8, 2);
        let mut bumpy = JitterBuffer::new(8, 2);
        for seq in 0..50u16 {
            let t = start + Duration::from_millis(20 * u64::from(seq));
            push(&mut steady, seq, t);
            let wobble = if seq % 2 == 0 { 0 } else { 15 };
            push(&mut bumpy, seq, t + Duration::from_millis(wobble));
        }
        assert!(steady.stats().jitter_ms < 0.5);
        assert!(bumpy.stats().jitter_ms > 5.0);
    }
}
