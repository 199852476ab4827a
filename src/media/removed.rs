//! Positions taken out of a numbered stream, so that what remains can be
//! renumbered without gaps.
//!
//! When the forwarder drops a temporal layer, the packets (and pictures) it
//! leaves out must not show as gaps on the subscriber's side: a gap in the
//! sequence numbers is a loss it NACKs, a gap in the VP8 picture ids a
//! frame its decoder waits for. Every packet forwarded is moved down by the
//! number of positions removed before it. Packets usually arrive in order,
//! so that is the running total; a late packet is moved down by the number
//! removed before its own position, found among the recent removals.
//!
//! Positions are extended (unwrapped) numbers. Only a position newer than
//! every one seen so far can be removed: an older one was already counted
//! as present by the packets after it, so its slot stays (as a gap).
//! Memory is bounded ([`MAX_REMEMBERED`]); a packet older than a forgotten
//! removal cannot be placed and is refused.

use std::collections::VecDeque;

/// How many recent removals are remembered for late packets.
pub const MAX_REMEMBERED: usize = 256;

/// The removed positions of one stream.
#[derive(Debug, Clone, Default)]
pub struct Removed {
    /// Recent removals, ascending.
    recent: VecDeque<u64>,
    /// All removals, the forgotten ones included.
    total: u64,
    /// The newest removal no longer remembered.
    forgotten: Option<u64>,
}

impl Removed {
    pub fn new() -> Self {
        Removed::default()
    }

    /// Takes out `pos`, which must be newer than every position seen
    /// (`newest_seen`: the newest before it, removed or not). Returns
    /// whether it was taken out; an older one is left as a gap.
    pub fn remove(&mut self, pos: u64, newest_seen: Option<u64>) -> bool {
        if newest_seen.is_some_and(|n| pos <= n) {
            return false;
        }
        if self.recent.len() == MAX_REMEMBERED {
            self.forgotten = self.recent.pop_front();
        }
        self.recent.push_back(pos);
        self.total += 1;
        true
    }

    /// How many positions before `pos` were removed, or `None` when that
    /// is no longer known (`pos` is older than a forgotten removal).
    pub fn before(&self, pos: u64) -> Option<u64> {
        if self.recent.back().is_none_or(|&b| b < pos) {
            return Some(self.total);
        }
        if self.forgotten.is_some_and(|f| pos < f) {
            return None;
        }
        let after = self.recent.len() - self.recent.partition_point(|&r| r < pos);
        Some(self.total - after as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_removals_shift_what_follows() {
        let mut r = Removed::new();
        assert_eq!(r.before(10), Some(0));
        assert!(r.remove(11, Some(10)));
        assert!(r.remove(12, Some(11)));
        assert_eq!(r.before(13), Some(2));
        assert!(r.remove(15, Some(14)));
        assert_eq!(r.before(16), Some(3));
        assert_eq!(r.total, 3);
    }

    #[test]
    fn a_late_packet_is_shifted_by_the_removals_before_it_only() {
        let mut r = Removed::new();
        // 10 forwarded, 12 and 13 removed (11 not yet arrived), 14 forwarded.
        assert!(r.remove(12, Some(10)));
        assert!(r.remove(13, Some(12)));
        assert_eq!(r.before(14), Some(2));
        // 11 arrives late: nothing before it was removed.
        assert_eq!(r.before(11), Some(0));
        // Output: 10, 11, 12 (was 14): contiguous.
    }

    #[test]
    fn a_late_removal_is_refused_and_stays_a_gap() {
        let mut r = Removed::new();
        assert!(!r.remove(11, Some(14)));
        assert_eq!(r.before(15), Some(0));
        assert_eq!(r.total, 0);
    }

    #[test]
    fn memory_is_bounded_and_a_packet_before_a_forgotten_removal_is_refused() {
        let mut r = Removed::new();
        let n = MAX_REMEMBERED as u64 + 10;
        for i in 0..n {
            // Every other position removed: 1, 3, 5, ...
            assert!(r.remove(2 * i + 1, Some(2 * i)));
        }
        assert_eq!(r.recent.len(), MAX_REMEMBERED);
        assert_eq!(r.total, n);
        // The newest remembered ones still place late packets...
        assert_eq!(r.before(2 * (n - 1)), Some(n - 1));
        // ...one older than a forgotten removal cannot be placed.
        assert_eq!(r.before(2), None);
    }
}
