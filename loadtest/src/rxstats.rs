//! Receive-side accounting for one remote track, usable by any adapter:
//!
//! - [`RtpStats`]: what RFC 3550 receivers compute from the RTP header
//!   alone: extended sequence numbers (16-bit wrap-around), packets
//!   expected/received/lost, duplicates, reordering, and the interarrival
//!   jitter (RFC 3550 section 6.4.1 / appendix A.8). This is all there is
//!   for a track whose payload carries no stamp (mixed audio).
//! - [`StampFlow`]: what the generator's stamp adds: distinct packets by the
//!   publisher's own sequence number, the ones sent inside the measurement
//!   window, and the end-to-end latency of each.

use std::time::{Duration, Instant};

/// Receiver statistics from RTP headers (sequence number, timestamp) and
/// arrival times.
#[derive(Debug, Clone)]
pub struct RtpStats {
    clock_rate: u32,
    /// Extended sequence number of the first packet, and the highest.
    first_ext: Option<u64>,
    max_ext: u64,
    /// Bit i set: extended sequence `origin + i` seen.
    origin: u64,
    seen: Vec<u64>,
    /// Distinct packets (duplicates excluded).
    pub received: u64,
    pub bytes: u64,
    pub duplicates: u64,
    /// Arrived after a higher sequence number.
    pub reordered: u64,
    /// Older than anything we can still place (far out of order).
    pub too_old: u64,
    /// RFC 3550 jitter estimate, in timestamp units.
    jitter: f64,
    /// (arrival in seconds since `epoch`, RTP timestamp) of the previous packet.
    last: Option<(f64, u32)>,
    epoch: Option<Instant>,
    pub first_at: Option<Instant>,
    pub last_at: Option<Instant>,
}

/// How far before the first packet a late packet may still be placed.
const BACKLOG: u64 = 1024;

impl RtpStats {
    pub fn new(clock_rate: u32) -> RtpStats {
        RtpStats {
            clock_rate: clock_rate.max(1),
            first_ext: None,
            max_ext: 0,
            origin: 0,
            seen: Vec::new(),
            received: 0,
            bytes: 0,
            duplicates: 0,
            reordered: 0,
            too_old: 0,
            jitter: 0.0,
            last: None,
            epoch: None,
            first_at: None,
            last_at: None,
        }
    }

    /// The extended sequence number closest to the highest seen so far.
    fn extend(&self, seq: u16) -> u64 {
        let cycle = self.max_ext & !0xffff;
        let candidates = [
            cycle.wrapping_sub(0x1_0000) | u64::from(seq),
            cycle | u64::from(seq),
            (cycle + 0x1_0000) | u64::from(seq),
        ];
        // `max_ext` starts in cycle 1, so `cycle - 0x1_0000` cannot underflow.
        candidates
            .into_iter()
            .min_by_key(|c| c.abs_diff(self.max_ext))
            .unwrap_or(cycle | u64::from(seq))
    }

    /// One packet: its RTP sequence number and timestamp, payload size and
    /// arrival time.
    pub fn record(&mut self, seq: u16, timestamp: u32, bytes: usize, at: Instant) {
        let ext = match self.first_ext {
            None => {
                // Start in cycle 1 so that a late packet from "cycle -1"
                // still has a place.
                let ext = 0x1_0000 | u64::from(seq);
                self.first_ext = Some(ext);
                self.max_ext = ext;
                self.origin = ext - BACKLOG;
                ext
            }
            Some(_) => self.extend(seq),
        };
        if ext < self.origin {
            self.too_old += 1;
            return;
        }
        let i = ext - self.origin;
        let (word, bit) = ((i / 64) as usize, i % 64);
        if self.seen.len() <= word {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return;
        }
        self.seen[word] |= 1 << bit;
        self.received += 1;
        self.bytes += bytes as u64;
        if ext < self.max_ext {
            self.reordered += 1;
        }
        self.max_ext = self.max_ext.max(ext);
        if let Some(first) = self.first_ext.as_mut() {
            *first = (*first).min(ext);
        }
        self.first_at.get_or_insert(at);
        self.last_at = Some(at);
        // Jitter: D = (Rj - Ri) - (Sj - Si) in timestamp units, J += (|D| - J)/16.
        let epoch = *self.epoch.get_or_insert(at);
        let arrival = at.saturating_duration_since(epoch).as_secs_f64();
        if let Some((prev_arrival, prev_ts)) = self.last {
            let dr = (arrival - prev_arrival) * f64::from(self.clock_rate);
            let ds = f64::from(timestamp.wrapping_sub(prev_ts) as i32);
            let d = dr - ds;
            self.jitter += (d.abs() - self.jitter) / 16.0;
        }
        self.last = Some((arrival, timestamp));
    }

    /// Packets from the lowest to the highest sequence number seen.
    pub fn expected(&self) -> u64 {
        self.first_ext.map_or(0, |f| self.max_ext - f + 1)
    }

    /// Expected − received (never negative: duplicates are not counted).
    pub fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.received)
    }

    /// The jitter estimate in milliseconds.
    pub fn jitter_ms(&self) -> f64 {
        self.jitter * 1e3 / f64::from(self.clock_rate)
    }
}

/// A share in percent (0 for an empty whole).
pub fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

/// What one subscriber got from one (publisher, kind), by the stamp's
/// sequence number (the publisher's own count, from 0).
#[derive(Debug, Default, Clone)]
pub struct StampFlow {
    pub first_at: Option<Instant>,
    pub total: u64,
    /// Distinct packets sent inside the window.
    pub window: u64,
    pub duplicates: u64,
    /// Arrived after a higher sequence number.
    pub reordered: u64,
    max_seq: Option<u32>,
    seen: Vec<u64>,
    /// End-to-end latency of each distinct in-window packet.
    pub latencies: Vec<Duration>,
}

impl StampFlow {
    /// One packet: stamp sequence, arrival, whether it was sent in the
    /// window, and its latency (arrival − send time). Sequence numbers must
    /// be bounded by the caller (the bitmap grows to the highest).
    pub fn record(&mut self, seq: u32, at: Instant, in_window: bool, latency: Duration) -> bool {
        self.first_at.get_or_insert(at);
        self.total += 1;
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if self.seen.len() <= word {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return false;
        }
        self.seen[word] |= 1 << bit;
        if self.max_seq.is_some_and(|m| seq < m) {
            self.reordered += 1;
        }
        self.max_seq = Some(self.max_seq.map_or(seq, |m| m.max(seq)));
        if in_window {
            self.window += 1;
            self.latencies.push(latency);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn in_order_no_loss_no_jitter() {
        let t = Instant::now();
        let mut s = RtpStats::new(48_000);
        for i in 0..100u16 {
            // Exactly 20 ms apart, timestamps 960 apart: transit is constant.
            s.record(
                1000 + i,
                5000 + u32::from(i) * 960,
                80,
                t + ms(20 * u64::from(i)),
            );
        }
        assert_eq!((s.received, s.expected(), s.lost()), (100, 100, 0));
        assert_eq!((s.duplicates, s.reordered), (0, 0));
        assert_eq!(s.bytes, 8000);
        assert!(s.jitter_ms() < 1e-6, "{}", s.jitter_ms());
    }

    #[test]
    fn loss_duplicates_and_reordering() {
        let t = Instant::now();
        let mut s = RtpStats::new(90_000);
        // 1 2 4 3 3 6 (5 lost; 3 late, then duplicated).
        for (k, seq) in [1u16, 2, 4, 3, 3, 6].into_iter().enumerate() {
            s.record(seq, u32::from(seq) * 3000, 100, t + ms(k as u64 * 33));
        }
        assert_eq!(s.expected(), 6);
        assert_eq!(s.received, 5);
        assert_eq!(s.lost(), 1);
        assert_eq!(s.duplicates, 1);
        assert_eq!(s.reordered, 1);
        assert!((percent(s.lost(), s.expected()) - 100.0 / 6.0).abs() < 1e-9);
    }

    #[test]
    fn sequence_wrap_around() {
        let t = Instant::now();
        let mut s = RtpStats::new(48_000);
        let seqs = [65533u16, 65534, 65535, 0, 2, 1, 3];
        for (k, seq) in seqs.into_iter().enumerate() {
            s.record(seq, (k as u32) * 960, 10, t + ms(k as u64 * 20));
        }
        // 65533..=3 across the wrap is 7 packets, all received once.
        assert_eq!(s.expected(), 7);
        assert_eq!((s.received, s.lost(), s.duplicates), (7, 0, 0));
        assert_eq!(s.reordered, 1, "1 after 2");
        // A late packet from before the wrap is placed, not a new cycle.
        let mut late = RtpStats::new(48_000);
        for (k, seq) in [0u16, 1, 65535, 2].into_iter().enumerate() {
            late.record(seq, k as u32 * 960, 10, t + ms(k as u64 * 20));
        }
        assert_eq!((late.expected(), late.received, late.reordered), (4, 4, 1));
        // Wrapping twice (over 131072 packets) keeps counting.
        let mut long = RtpStats::new(48_000);
        for i in 0..140_000u32 {
            long.record(i as u16, i * 960, 1, t + ms(u64::from(i) * 20));
        }
        assert_eq!((long.expected(), long.lost()), (140_000, 0));
    }

    #[test]
    fn jitter_follows_rfc3550() {
        let t = Instant::now();
        let mut s = RtpStats::new(90_000);
        // Every other packet arrives 10 ms late: |D| alternates 900 ticks
        // (10 ms) from the second packet on; J converges towards it.
        let mut expect = 0.0f64;
        for i in 0..200u64 {
            let late = if i % 2 == 1 { 10 } else { 0 };
            s.record(
                i as u16,
                (i * 3000) as u32,
                1,
                t + ms(i * 33 + late) + Duration::from_micros(i * 333),
            );
            if i > 0 {
                expect += (900.0 - expect) / 16.0;
            }
        }
        // 33.333 ms packet spacing vs 3000 ticks: arrival spacing is exact
        // (33 ms + 333 us), so only the 10 ms offset counts.
        assert!(
            (s.jitter_ms() - expect / 90.0).abs() < 0.05,
            "{} vs {}",
            s.jitter_ms(),
            expect / 90.0
        );
        assert!(s.jitter_ms() > 9.0 && s.jitter_ms() <= 10.01);
        // Timestamps that wrap do not spike the estimate.
        let mut w = RtpStats::new(48_000);
        for i in 0..10u32 {
            w.record(
                i as u16,
                (u32::MAX - 2000).wrapping_add(i * 960),
                1,
                t + ms(u64::from(i) * 20),
            );
        }
        assert!(w.jitter_ms() < 1e-6);
    }

    #[test]
    fn stamp_flow_counts_duplicates_reorders_window_and_latency() {
        let mut f = StampFlow::default();
        let t = Instant::now();
        assert!(f.record(0, t, false, ms(1)));
        assert!(f.record(2, t, true, ms(2)));
        assert!(f.record(1, t, true, ms(3)));
        assert!(!f.record(2, t, true, ms(4)), "duplicate");
        assert!(f.record(200, t, true, ms(5)));
        assert_eq!(f.total, 5);
        assert_eq!(f.window, 3);
        assert_eq!(f.duplicates, 1);
        assert_eq!(f.reordered, 1);
        assert_eq!(f.latencies, vec![ms(2), ms(3), ms(5)]);
        assert_eq!(f.first_at, Some(t));
    }
}
