//! Upstream loss detection: which packets to NACK to a publisher, and when.
//!
//! [`NackGenerator::on_packet`] is fed every received (extended) sequence
//! number. A jump past `highest + 1` puts the numbers in between on a
//! missing list; [`NackGenerator::poll`] hands out the ones due: first at
//! once (or after `first_delay`), then again every RTT, at most
//! `max_retries` times. A missing packet that arrives (late, or repaired by
//! RTX) is forgotten. One that stays missing is given up after its last
//! retry has had an RTT to arrive, or when it is older than `max_age` or
//! more than `max_age_packets` behind the newest packet. A gap larger than
//! the list (`max_missing`) is not worth repairing packet by packet: the
//! list is cleared and [`Received::GapTooLarge`] tells the caller to ask
//! for a keyframe instead.
//!
//! [`pack_nack_pairs`] and [`write_generic_nack`] turn sequence numbers
//! into an RTCP transport-layer feedback message (RFC 4585 section 6.2.1).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{SeqNo, Ssrc};

/// Shortest retry interval, whatever the RTT estimate says.
pub const MIN_RETRY_INTERVAL: Duration = Duration::from_millis(5);

/// Tuning of a [`NackGenerator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NackConfig {
    /// NACKs per missing packet.
    pub max_retries: u8,
    /// Initial RTT estimate: the interval between retries.
    pub rtt: Duration,
    /// Wait this long after detecting a gap before the first NACK (to let
    /// reordered packets arrive). 0 = NACK at the next poll.
    pub first_delay: Duration,
    /// Give up on a packet missing for longer than this.
    pub max_age: Duration,
    /// Give up on a packet this many packets behind the newest.
    pub max_age_packets: u64,
    /// Most packets tracked at once (preallocated; 1 to 32 768).
    pub max_missing: usize,
}

impl Default for NackConfig {
    fn default() -> Self {
        NackConfig {
            max_retries: 3,
            rtt: Duration::from_millis(100),
            first_delay: Duration::ZERO,
            max_age: Duration::from_secs(1),
            max_age_packets: 1000,
            max_missing: 512,
        }
    }
}

/// What a received packet meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// The first packet of the stream.
    First,
    /// The next one after the highest.
    InOrder,
    /// Newer than `highest + 1`: this many packets are now missing.
    Gap { missing: u64 },
    /// A gap larger than the missing list: nothing is tracked; ask for a
    /// keyframe.
    GapTooLarge { missing: u64 },
    /// A packet on the missing list arrived (late, or via RTX).
    Recovered,
    /// Not newer and not missing: a duplicate, or one already given up.
    Duplicate,
}

/// Counters since the generator was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NackStats {
    /// Sequence numbers handed out by `poll` (retries included).
    pub nacked: u64,
    /// Missing packets that arrived.
    pub recovered: u64,
    /// Missing packets given up (retries spent, too old, or pushed out of
    /// a full list).
    pub gave_up: u64,
    /// Gaps too large to track.
    pub resets: u64,
}

#[derive(Debug, Clone, Copy)]
struct Missing {
    seq: SeqNo,
    since: Instant,
    sent_at: Option<Instant>,
    retries: u8,
}

/// Loss detection and NACK scheduling for one received stream.
#[derive(Debug, Clone)]
pub struct NackGenerator {
    config: NackConfig,
    interval: Duration,
    highest: Option<SeqNo>,
    /// Ascending by sequence number.
    missing: VecDeque<Missing>,
    stats: NackStats,
}

impl Default for NackGenerator {
    fn default() -> Self {
        NackGenerator::new(NackConfig::default())
    }
}

impl NackGenerator {
    pub fn new(config: NackConfig) -> Self {
        // Beyond half the sequence space a gap cannot be told from a wrap.
        let max_missing = config.max_missing.clamp(1, 1 << 15);
        let interval = config.rtt.max(MIN_RETRY_INTERVAL);
        NackGenerator {
            config: NackConfig {
                max_missing,
                ..config
            },
            interval,
            highest: None,
            missing: VecDeque::with_capacity(max_missing),
            stats: NackStats::default(),
        }
    }

    /// Updates the RTT estimate (the retry interval; at least
    /// [`MIN_RETRY_INTERVAL`]).
    pub fn set_rtt(&mut self, rtt: Duration) {
        self.interval = rtt.max(MIN_RETRY_INTERVAL);
    }

    pub fn stats(&self) -> NackStats {
        self.stats
    }

    /// The highest sequence number received.
    pub fn highest(&self) -> Option<SeqNo> {
        self.highest
    }

    /// Number of packets currently missing.
    pub fn missing_len(&self) -> usize {
        self.missing.len()
    }

    /// Records a received packet.
    pub fn on_packet(&mut self, seq: SeqNo, now: Instant) -> Received {
        let Some(highest) = self.highest else {
            self.highest = Some(seq);
            return Received::First;
        };
        if seq > highest {
            self.highest = Some(seq);
            let gap = seq.0 - highest.0 - 1;
            if gap == 0 {
                return Received::InOrder;
            }
            if gap > self.config.max_missing as u64 {
                self.stats.gave_up += self.missing.len() as u64;
                self.stats.resets += 1;
                self.missing.clear();
                return Received::GapTooLarge { missing: gap };
            }
            for s in highest.0 + 1..seq.0 {
                if self.missing.len() >= self.config.max_missing {
                    self.missing.pop_front();
                    self.stats.gave_up += 1;
                }
                self.missing.push_back(Missing {
                    seq: SeqNo(s),
                    since: now,
                    sent_at: None,
                    retries: 0,
                });
            }
            return Received::Gap { missing: gap };
        }
        match self.missing.binary_search_by_key(&seq, |m| m.seq) {
            Ok(i) => {
                self.missing.remove(i);
                self.stats.recovered += 1;
                Received::Recovered
            }
            Err(_) => Received::Duplicate,
        }
    }

    /// Appends to `out` the sequence numbers to NACK now (ascending), and
    /// gives up on the ones past their limits. Returns how many were
    /// appended. Reuse `out` between calls to avoid allocating.
    pub fn poll(&mut self, now: Instant, out: &mut Vec<SeqNo>) -> usize {
        let before = out.len();
        let config = &self.config;
        let interval = self.interval;
        let highest = self.highest;
        let stats = &mut self.stats;
        self.missing.retain_mut(|m| {
            let behind = highest.map_or(0, |h| h.0.saturating_sub(m.seq.0));
            let too_old = behind > config.max_age_packets
                || now.saturating_duration_since(m.since) > config.max_age;
            let last_due = m.sent_at.is_none_or(|t| now >= t + interval);
            if too_old || (m.retries >= config.max_retries && last_due) {
                stats.gave_up += 1;
                return false;
            }
            let due = match m.sent_at {
                None => now >= m.since + config.first_delay,
                Some(t) => now >= t + interval,
            };
            if due && m.retries < config.max_retries {
                out.push(m.seq);
                m.sent_at = Some(now);
                m.retries += 1;
                stats.nacked += 1;
            }
            true
        });
        out.len() - before
    }

    /// When the next NACK is due, if any packet still has retries left.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.missing
            .iter()
            .filter(|m| m.retries < self.config.max_retries)
            .map(|m| match m.sent_at {
                None => m.since + self.config.first_delay,
                Some(t) => t + self.interval,
            })
            .min()
    }
}

/// One FCI entry of an RTCP generic NACK: packet `pid` and, in bit `i` of
/// `blp`, packet `pid + i + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NackPair {
    pub pid: u16,
    pub blp: u16,
}

impl NackPair {
    /// The sequence numbers this pair asks for, ascending (wrapping).
    pub fn seqs(self) -> impl Iterator<Item = u16> {
        std::iter::once(self.pid).chain(
            (0..16u16)
                .filter(move |i| self.blp & (1 << i) != 0)
                .map(move |i| self.pid.wrapping_add(i + 1)),
        )
    }
}

/// Appends to `out` the fewest (PID, BLP) pairs covering `seqs`, which
/// should be ascending (they come out of [`NackGenerator::poll`] that way);
/// unsorted input is still covered, with more pairs.
pub fn pack_nack_pairs(seqs: &[SeqNo], out: &mut Vec<NackPair>) {
    let mut current: Option<(SeqNo, NackPair)> = None;
    for &seq in seqs {
        if let Some((base, pair)) = current.as_mut() {
            if let Some(d @ 0..=16) = seq.since(*base) {
                if d > 0 {
                    pair.blp |= 1 << (d - 1);
                }
                continue;
            }
            out.push(*pair);
        }
        current = Some((
            seq,
            NackPair {
                pid: seq.wire(),
                blp: 0,
            },
        ));
    }
    if let Some((_, pair)) = current {
        out.push(pair);
    }
}

/// Why a generic NACK could not be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NackWriteError {
    #[error("a generic NACK needs at least one (PID, BLP) pair")]
    Empty,
    #[error("{pairs} pairs do not fit one RTCP packet")]
    TooManyPairs { pairs: usize },
    #[error("needs {needed} bytes, buffer has {len}")]
    BufferTooSmall { needed: usize, len: usize },
}

/// Writes an RTCP transport-layer feedback message, generic NACK (PT 205,
/// FMT 1), from `sender` about `media` into `buf`; returns its length.
pub fn write_generic_nack(
    sender: Ssrc,
    media: Ssrc,
    pairs: &[NackPair],
    buf: &mut [u8],
) -> Result<usize, NackWriteError> {
    if pairs.is_empty() {
        return Err(NackWriteError::Empty);
    }
    // The length field counts 32-bit words minus one: 2 SSRCs + pairs.
    let words = u16::try_from(pairs.len() + 2)
        .map_err(|_| NackWriteError::TooManyPairs { pairs: pairs.len() })?;
    let needed = 12 + 4 * pairs.len();
    let len = buf.len();
    let Some(out) = buf.get_mut(..needed) else {
        return Err(NackWriteError::BufferTooSmall { needed, len });
    };
    out[0] = 0x80 | 1; // V=2, P=0, FMT=1
    out[1] = 205;
    out[2..4].copy_from_slice(&words.to_be_bytes());
    out[4..8].copy_from_slice(&sender.0.to_be_bytes());
    out[8..12].copy_from_slice(&media.0.to_be_bytes());
    for (chunk, pair) in out[12..].chunks_exact_mut(4).zip(pairs) {
        chunk[..2].copy_from_slice(&pair.pid.to_be_bytes());
        chunk[2..].copy_from_slice(&pair.blp.to_be_bytes());
    }
    Ok(needed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::seqno::SeqUnwrapper;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn polled(g: &mut NackGenerator, now: Instant) -> Vec<u64> {
        let mut out = Vec::new();
        g.poll(now, &mut out);
        out.iter().map(|s| s.0).collect()
    }

    #[test]
    fn detects_gaps_and_nacks_at_once() {
        let t0 = Instant::now();
        let mut g = NackGenerator::default();
        assert_eq!(g.on_packet(SeqNo(100), t0), Received::First);
        assert_eq!(g.on_packet(SeqNo(101), t0), Received::InOrder);
        assert_eq!(g.next_timeout(), None);
        assert_eq!(g.on_packet(SeqNo(104), t0), Received::Gap { missing: 2 });
        assert_eq!(g.next_timeout(), Some(t0));
        assert_eq!(polled(&mut g, t0), vec![102, 103]);
        // Not again until an RTT has passed.
        assert_eq!(polled(&mut g, t0 + ms(50)), Vec::<u64>::new());
        assert_eq!(g.next_timeout(), Some(t0 + ms(100)));
    }

    #[test]
    fn retries_then_gives_up() {
        let t0 = Instant::now();
        let mut g = NackGenerator::default();
        g.on_packet(SeqNo(1), t0);
        g.on_packet(SeqNo(3), t0);
        assert_eq!(polled(&mut g, t0), vec![2]);
        assert_eq!(polled(&mut g, t0 + ms(100)), vec![2]);
        assert_eq!(polled(&mut g, t0 + ms(200)), vec![2]);
        // Three NACKs sent: nothing more is due.
        assert_eq!(g.next_timeout(), None);
        assert_eq!(polled(&mut g, t0 + ms(250)), Vec::<u64>::new());
        assert_eq!(g.missing_len(), 1, "still waiting for the last retry");
        assert_eq!(polled(&mut g, t0 + ms(300)), Vec::<u64>::new());
        assert_eq!(g.missing_len(), 0);
        let s = g.stats();
        assert_eq!((s.nacked, s.gave_up, s.recovered), (3, 1, 0));
        // Arriving after giving up is just a duplicate.
        assert_eq!(g.on_packet(SeqNo(2), t0 + ms(400)), Received::Duplicate);
    }

    #[test]
    fn rtt_sets_the_retry_interval() {
        let t0 = Instant::now();
        let mut g = NackGenerator::default();
        g.set_rtt(ms(30));
        g.on_packet(SeqNo(1), t0);
        g.on_packet(SeqNo(3), t0);
        assert_eq!(polled(&mut g, t0), vec![2]);
        assert_eq!(g.next_timeout(), Some(t0 + ms(30)));
        assert_eq!(polled(&mut g, t0 + ms(30)), vec![2]);
        g.set_rtt(Duration::ZERO);
        assert_eq!(g.next_timeout(), Some(t0 + ms(30) + MIN_RETRY_INTERVAL));
    }

    #[test]
    fn late_arrival_and_rtx_are_forgotten() {
        let t0 = Instant::now();
        let mut g = NackGenerator::default();
        g.on_packet(SeqNo(10), t0);
        assert_eq!(g.on_packet(SeqNo(15), t0), Received::Gap { missing: 4 });
        assert_eq!(g.on_packet(SeqNo(12), t0), Received::Recovered);
        assert_eq!(polled(&mut g, t0), vec![11, 13, 14]);
        assert_eq!(g.on_packet(SeqNo(13), t0 + ms(20)), Received::Recovered);
        assert_eq!(g.on_packet(SeqNo(13), t0 + ms(21)), Received::Duplicate);
        assert_eq!(polled(&mut g, t0 + ms(100)), vec![11, 14]);
        assert_eq!(g.stats().recovered, 2);
    }

    #[test]
    fn first_delay_absorbs_reordering() {
        let t0 = Instant::now();
        let mut g = NackGenerator::new(NackConfig {
            first_delay: ms(10),
            ..NackConfig::default()
        });
        g.on_packet(SeqNo(1), t0);
        g.on_packet(SeqNo(3), t0);
        assert_eq!(polled(&mut g, t0), Vec::<u64>::new());
        assert_eq!(g.next_timeout(), Some(t0 + ms(10)));
        g.on_packet(SeqNo(2), t0 + ms(5));
        assert_eq!(polled(&mut g, t0 + ms(10)), Vec::<u64>::new());
        assert_eq!(g.next_timeout(), None);
    }

    #[test]
    fn gives_up_on_old_packets() {
        let t0 = Instant::now();
        let mut g = NackGenerator::new(NackConfig {
            max_age_packets: 100,
            max_retries: 10,
            ..NackConfig::default()
        });
        g.on_packet(SeqNo(1), t0);
        g.on_packet(SeqNo(3), t0);
        assert_eq!(polled(&mut g, t0), vec![2]);
        // 101 behind the newest now.
        for s in 4..=103 {
            g.on_packet(SeqNo(s), t0 + ms(10));
        }
        assert_eq!(polled(&mut g, t0 + ms(100)), Vec::<u64>::new());
        assert_eq!(g.missing_len(), 0);
        // And by time: missing for more than max_age (1 s).
        g.on_packet(SeqNo(105), t0 + ms(200));
        assert_eq!(polled(&mut g, t0 + ms(200)), vec![104]);
        assert_eq!(polled(&mut g, t0 + ms(1201)), Vec::<u64>::new());
        assert_eq!(g.missing_len(), 0);
    }

    #[test]
    fn huge_gap_resets_and_full_list_drops_oldest() {
        let t0 = Instant::now();
        let mut g = NackGenerator::new(NackConfig {
            max_missing: 8,
            ..NackConfig::default()
        });
        g.on_packet(SeqNo(0), t0);
        assert_eq!(g.on_packet(SeqNo(6), t0), Received::Gap { missing: 5 });
        assert_eq!(g.on_packet(SeqNo(11), t0), Received::Gap { missing: 4 });
        // 9 missing, 8 tracked: 1 pushed out.
        assert_eq!(polled(&mut g, t0), vec![2, 3, 4, 5, 7, 8, 9, 10]);
        assert_eq!(
            g.on_packet(SeqNo(100), t0),
            Received::GapTooLarge { missing: 88 }
        );
        assert_eq!(g.missing_len(), 0);
        assert_eq!(g.stats().resets, 1);
        assert_eq!(g.stats().gave_up, 9);
        assert_eq!(g.on_packet(SeqNo(101), t0), Received::InOrder);
    }

    #[test]
    fn across_sequence_wrap() {
        let t0 = Instant::now();
        let mut u = SeqUnwrapper::new();
        let mut g = NackGenerator::default();
        for w in [65_533u16, 65_534, 1, 2] {
            g.on_packet(u.extend(w), t0);
        }
        let mut out = Vec::new();
        g.poll(t0, &mut out);
        let wires: Vec<u16> = out.iter().map(|s| s.wire()).collect();
        assert_eq!(wires, vec![65_535, 0]);
        let mut pairs = Vec::new();
        pack_nack_pairs(&out, &mut pairs);
        assert_eq!(
            pairs,
            vec![NackPair {
                pid: 65_535,
                blp: 1
            }]
        );
        assert_eq!(pairs[0].seqs().collect::<Vec<_>>(), vec![65_535, 0]);
    }

    #[test]
    fn poll_reuses_the_callers_vec() {
        let t0 = Instant::now();
        let mut g = NackGenerator::default();
        g.on_packet(SeqNo(0), t0);
        g.on_packet(SeqNo(100), t0);
        let mut out = Vec::with_capacity(128);
        let cap = out.capacity();
        assert_eq!(g.poll(t0, &mut out), 99);
        out.clear();
        assert_eq!(g.poll(t0 + ms(100), &mut out), 99);
        assert_eq!(out.capacity(), cap);
    }

    #[test]
    fn packs_pairs_per_rfc4585() {
        let seqs: Vec<SeqNo> = [10u64, 11, 13, 26, 27, 28, 100]
            .iter()
            .map(|&s| SeqNo(s))
            .collect();
        let mut pairs = Vec::new();
        pack_nack_pairs(&seqs, &mut pairs);
        assert_eq!(
            pairs,
            vec![
                // 11 → bit 0, 13 → bit 2, 26 → bit 15.
                NackPair {
                    pid: 10,
                    blp: 0b1000_0000_0000_0101
                },
                // 27 is 17 after 10: a new pair.
                NackPair { pid: 27, blp: 1 },
                NackPair { pid: 100, blp: 0 },
            ]
        );
        let back: Vec<u16> = pairs.iter().flat_map(|p| p.seqs()).collect();
        assert_eq!(back, vec![10, 11, 13, 26, 27, 28, 100]);

        // Unsorted and duplicate input is still covered.
        let mut pairs = Vec::new();
        pack_nack_pairs(&[SeqNo(5), SeqNo(5), SeqNo(3), SeqNo(4)], &mut pairs);
        let mut back: Vec<u16> = pairs.iter().flat_map(|p| p.seqs()).collect();
        back.sort_unstable();
        back.dedup();
        assert_eq!(back, vec![3, 4, 5]);

        let mut pairs = Vec::new();
        pack_nack_pairs(&[], &mut pairs);
        assert!(pairs.is_empty());
    }

    #[test]
    fn writes_generic_nack() {
        let pairs = [
            NackPair {
                pid: 0x1234,
                blp: 0x8001,
            },
            NackPair { pid: 7, blp: 0 },
        ];
        let mut buf = [0u8; 64];
        let n = write_generic_nack(Ssrc(1), Ssrc(0xdead_beef), &pairs, &mut buf).unwrap();
        assert_eq!(n, 20);
        assert_eq!(
            &buf[..n],
            &[
                0x81, 205, 0, 4, // V=2 FMT=1, PT=RTPFB, length 4 words
                0, 0, 0, 1, // sender SSRC
                0xde, 0xad, 0xbe, 0xef, // media SSRC
                0x12, 0x34, 0x80, 0x01, // pair 1
                0, 7, 0, 0, // pair 2
            ]
        );
        assert_eq!(
            write_generic_nack(Ssrc(1), Ssrc(2), &pairs, &mut buf[..19]),
            Err(NackWriteError::BufferTooSmall {
                needed: 20,
                len: 19
            })
        );
        assert_eq!(
            write_generic_nack(Ssrc(1), Ssrc(2), &[], &mut buf),
            Err(NackWriteError::Empty)
        );
        let many = vec![NackPair { pid: 0, blp: 0 }; 70_000];
        assert_eq!(
            write_generic_nack(Ssrc(1), Ssrc(2), &many, &mut buf),
            Err(NackWriteError::TooManyPairs { pairs: 70_000 })
        );
    }

    /// Random loss and reordering: every packet that never arrives is
    /// NACKed exactly `max_retries` times, and every packet that arrives is
    /// not NACKed after it arrived.
    #[test]
    fn property_random_loss() {
        use crate::media::XorShift;
        for seed in 1..=20u64 {
            let mut rng = XorShift::new(seed);
            let t0 = Instant::now();
            let mut g = NackGenerator::new(NackConfig {
                max_age_packets: 100_000,
                max_age: Duration::from_secs(100),
                ..NackConfig::default()
            });
            let mut arrived = std::collections::HashSet::new();
            let mut nacks: std::collections::HashMap<u64, u32> = Default::default();
            let mut delayed: Vec<u64> = Vec::new();
            let mut out = Vec::new();
            let mut now = t0;
            g.on_packet(SeqNo(999), now);
            for s in 1000..3000u64 {
                now += ms(2);
                match rng.below(20) {
                    0 => {}               // lost for good
                    1 => delayed.push(s), // arrives later
                    _ => {
                        arrived.insert(s);
                        g.on_packet(SeqNo(s), now);
                    }
                }
                if rng.below(10) == 0 {
                    if let Some(d) = delayed.pop() {
                        arrived.insert(d);
                        g.on_packet(SeqNo(d), now);
                    }
                }
                out.clear();
                g.poll(now, &mut out);
                for n in &out {
                    assert!(
                        !arrived.contains(&n.0),
                        "seed {seed}: NACK for {n} after arrival"
                    );
                    *nacks.entry(n.0).or_default() += 1;
                }
            }
            // One last packet reveals any loss at the end; drain the retries.
            g.on_packet(SeqNo(3000), now);
            for _ in 0..10 {
                now += ms(100);
                out.clear();
                g.poll(now, &mut out);
                for n in &out {
                    *nacks.entry(n.0).or_default() += 1;
                }
            }
            for s in 1000..3000u64 {
                if !arrived.contains(&s) {
                    assert_eq!(nacks.get(&s), Some(&3), "seed {seed} seq {s}");
                }
            }
            assert_eq!(g.missing_len(), 0);
        }
    }
}
