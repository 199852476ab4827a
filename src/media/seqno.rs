//! Widening RTP's wrapping counters to 64 bits.
//!
//! A 16-bit sequence number (or 32-bit timestamp) is placed at the 64-bit
//! value closest to a reference: the highest value seen so far (RFC 3550
//! appendix A.1 does the same). A value up to half the range ahead of the
//! reference counts as newer, anything else as older, so reordering and
//! wrap-around both come out right as long as packets are less than half the
//! range (32768 packets) out of place.
//!
//! The first value gets roll-over count 1, not 0, so a packet that arrives
//! just before the first one seen (reordered across a wrap) still lands
//! below it instead of underflowing.

use super::SeqNo;

/// Places `value` (the low `bits` bits of a counter) at the 64-bit value
/// closest to `reference`. Exactly half the range away counts as older.
fn extend(reference: u64, value: u64, bits: u32) -> u64 {
    let modulus = 1u64 << bits;
    let mask = modulus - 1;
    let half = modulus >> 1;
    let forward = value.wrapping_sub(reference) & mask;
    if forward < half {
        reference.saturating_add(forward)
    } else {
        reference.saturating_sub(modulus - forward)
    }
}

/// Extends `seq` to the [`SeqNo`] closest to `reference`.
pub fn extend_seq(reference: SeqNo, seq: u16) -> SeqNo {
    SeqNo(extend(reference.0, u64::from(seq), 16))
}

/// Extends `ts` to the 64-bit timestamp closest to `reference`.
pub fn extend_ts(reference: u64, ts: u32) -> u64 {
    extend(reference, u64::from(ts), 32)
}

/// Extends one stream's 16-bit sequence numbers. One per (source, SSRC).
#[derive(Debug, Clone, Default)]
pub struct SeqUnwrapper {
    highest: Option<SeqNo>,
}

impl SeqUnwrapper {
    pub fn new() -> Self {
        Self::default()
    }

    /// The extended value of `seq`; remembers it if it is the highest yet.
    pub fn extend(&mut self, seq: u16) -> SeqNo {
        let ext = self.peek(seq);
        if self.highest.is_none_or(|h| ext > h) {
            self.highest = Some(ext);
        }
        ext
    }

    /// The extended value `seq` would get, without remembering it.
    pub fn peek(&self, seq: u16) -> SeqNo {
        match self.highest {
            Some(h) => extend_seq(h, seq),
            None => SeqNo((1 << 16) | u64::from(seq)),
        }
    }

    /// The highest extended sequence number seen.
    pub fn highest(&self) -> Option<SeqNo> {
        self.highest
    }
}

/// Extends one stream's 32-bit RTP timestamps.
#[derive(Debug, Clone, Default)]
pub struct TsUnwrapper {
    highest: Option<u64>,
}

impl TsUnwrapper {
    pub fn new() -> Self {
        Self::default()
    }

    /// The extended value of `ts`; remembers it if it is the highest yet.
    pub fn extend(&mut self, ts: u32) -> u64 {
        let ext = self.peek(ts);
        if self.highest.is_none_or(|h| ext > h) {
            self.highest = Some(ext);
        }
        ext
    }

    /// The extended value `ts` would get, without remembering it.
    pub fn peek(&self, ts: u32) -> u64 {
        match self.highest {
            Some(h) => extend_ts(h, ts),
            None => (1 << 32) | u64::from(ts),
        }
    }

    /// The highest extended timestamp seen.
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::XorShift;

    #[test]
    fn in_order_and_wrap() {
        let mut u = SeqUnwrapper::new();
        let a = u.extend(65534);
        assert_eq!(a.wire(), 65534);
        assert_eq!(u.extend(65535), SeqNo(a.0 + 1));
        assert_eq!(u.extend(0), SeqNo(a.0 + 2));
        assert_eq!(u.extend(1), SeqNo(a.0 + 3));
        assert_eq!(u.highest(), Some(SeqNo(a.0 + 3)));
    }

    #[test]
    fn reordered_across_wrap_both_ways() {
        let mut u = SeqUnwrapper::new();
        let first = u.extend(2);
        // Arrives after 2 but belongs before the wrap.
        assert_eq!(u.extend(65535), SeqNo(first.0 - 3));
        assert_eq!(u.extend(1), SeqNo(first.0 - 1));
        // Highest is unchanged by older packets.
        assert_eq!(u.highest(), Some(first));

        let mut u = SeqUnwrapper::new();
        let first = u.extend(65535);
        assert_eq!(u.extend(3), SeqNo(first.0 + 4));
        // 65534 after the wrap is still before it.
        assert_eq!(u.extend(65534), SeqNo(first.0 - 1));
    }

    #[test]
    fn half_range_boundary() {
        let r = SeqNo(5 << 16);
        assert_eq!(extend_seq(r, 32767), SeqNo(r.0 + 32767));
        assert_eq!(extend_seq(r, 32768), SeqNo(r.0 - 32768));
        assert_eq!(extend_seq(r, 0), r);
    }

    #[test]
    fn peek_does_not_remember() {
        let mut u = SeqUnwrapper::new();
        assert_eq!(u.peek(10).wire(), 10);
        assert_eq!(u.highest(), None);
        u.extend(10);
        let _ = u.peek(20);
        assert_eq!(u.highest().map(SeqNo::wire), Some(10));
    }

    #[test]
    fn timestamps_wrap() {
        let mut u = TsUnwrapper::new();
        let a = u.extend(u32::MAX - 1000);
        assert_eq!(u.extend(2000), a + 3001);
        assert_eq!(u.extend(u32::MAX - 5000), a - 4000);
        assert_eq!(u.highest(), Some(a + 3001));
        assert_eq!(extend_ts(1 << 40, 0x8000_0000), (1 << 40) - 0x8000_0000);
    }

    /// A stream with random steps forward (including big jumps) and local
    /// reordering: every extended value must equal the ground truth.
    #[test]
    fn property_random_streams_match_ground_truth() {
        for seed in 1..=40u64 {
            let mut rng = XorShift::new(seed);
            let mut truth: u64 = (1 << 16) + rng.below(65536);
            let mut u = SeqUnwrapper::new();
            let base = u.extend(truth as u16);
            assert_eq!(base.0, truth);
            let mut window: Vec<u64> = Vec::new();
            for _ in 0..5000 {
                // Mostly +1, sometimes a loss burst, rarely a big jump.
                let step = match rng.below(100) {
                    0 => 1 + rng.below(20_000),
                    1..=10 => 1 + rng.below(50),
                    _ => 1,
                };
                // Release packets out of order (shuffle the window), and
                // always before a big jump so that no two packets in flight
                // are half the range apart.
                if step > 50 || window.len() >= 8 || rng.below(4) == 0 {
                    for i in (1..window.len()).rev() {
                        let j = rng.below(i as u64 + 1) as usize;
                        window.swap(i, j);
                    }
                    for v in window.drain(..) {
                        assert_eq!(u.extend(v as u16).0, v, "seed {seed}");
                    }
                }
                truth += step;
                window.push(truth);
            }
        }
    }

    #[test]
    fn property_random_timestamps() {
        let mut rng = XorShift::new(7);
        let mut truth: u64 = (1 << 32) + rng.below(1 << 32);
        let mut u = TsUnwrapper::new();
        assert_eq!(u.extend(truth as u32), truth);
        for _ in 0..20_000 {
            truth += rng.below(200_000_000);
            // An older value within a few hundred thousand ticks.
            let back = truth.saturating_sub(rng.below(300_000));
            assert_eq!(u.extend(truth as u32), truth);
            assert_eq!(u.extend(back as u32), back);
        }
    }
}
