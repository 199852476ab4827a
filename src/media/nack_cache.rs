//! The last N packets of a track, to answer subscribers' NACKs.
//!
//! A ring of N fixed-size slots allocated once (N × slot size bytes, by
//! default 1024 × 1500). Packet `seq` lives in slot `seq % N`, so a lookup is
//! one index and one comparison, and storing never allocates. The buffer is
//! zero-initialised in one allocation, which the OS maps lazily: a track's
//! resident memory grows with the slots it has actually written.
//!
//! A lookup misses when the packet was never stored, was overwritten by a
//! newer one in its slot, or is stale (N or more behind the newest
//! sequence number stored, or ahead of it). Packets larger than a slot are
//! not stored, and counted.

use super::SeqNo;

/// Default number of slots.
pub const DEFAULT_CAPACITY: usize = 1024;
/// Default slot size: a typical Ethernet MTU.
pub const DEFAULT_SLOT_SIZE: usize = 1500;

/// What [`PacketCache::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheInsert {
    /// Stored in a free slot (or over the same sequence number).
    Stored,
    /// Stored, overwriting this older packet.
    Evicted(SeqNo),
    /// Larger than a slot: not stored.
    Oversize,
    /// N or more behind the newest packet: not stored.
    TooOld,
}

/// Counters since the cache was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub stored: u64,
    pub hits: u64,
    pub misses: u64,
    /// Stored packets overwritten by newer ones.
    pub evictions: u64,
    /// Packets too large for a slot.
    pub oversize: u64,
    /// Inserts refused because the packet was older than the window.
    pub too_old: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    seq: Option<SeqNo>,
    len: usize,
}

/// A bounded packet cache keyed by extended sequence number.
#[derive(Debug)]
pub struct PacketCache {
    slot_size: usize,
    data: Box<[u8]>,
    slots: Box<[Slot]>,
    newest: Option<SeqNo>,
    stats: CacheStats,
}

impl Default for PacketCache {
    fn default() -> Self {
        PacketCache::new(DEFAULT_CAPACITY)
    }
}

impl PacketCache {
    /// A cache of `capacity` packets (at least 1) of up to 1500 bytes.
    pub fn new(capacity: usize) -> Self {
        PacketCache::with_slot_size(capacity, DEFAULT_SLOT_SIZE)
    }

    /// A cache of `capacity` packets (at least 1) of up to `slot_size`
    /// bytes (at least 1).
    pub fn with_slot_size(capacity: usize, slot_size: usize) -> Self {
        let capacity = capacity.max(1);
        let slot_size = slot_size.max(1);
        PacketCache {
            slot_size,
            data: vec![0u8; capacity * slot_size].into_boxed_slice(),
            slots: vec![Slot::default(); capacity].into_boxed_slice(),
            newest: None,
            stats: CacheStats::default(),
        }
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Largest packet stored.
    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// The newest sequence number stored.
    pub fn newest(&self) -> Option<SeqNo> {
        self.newest
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    fn index(&self, seq: SeqNo) -> usize {
        // The remainder is below `capacity`, a usize.
        (seq.0 % self.slots.len() as u64) as usize
    }

    /// Whether `seq` is inside the window ending at the newest packet.
    fn in_window(&self, seq: SeqNo) -> bool {
        match self.newest {
            Some(newest) => seq <= newest && newest.0 - seq.0 < self.slots.len() as u64,
            None => false,
        }
    }

    /// Stores a copy of `packet` under `seq`.
    pub fn insert(&mut self, seq: SeqNo, packet: &[u8]) -> CacheInsert {
        if packet.len() > self.slot_size {
            self.stats.oversize += 1;
            return CacheInsert::Oversize;
        }
        if self.newest.is_some_and(|n| seq < n) && !self.in_window(seq) {
            self.stats.too_old += 1;
            return CacheInsert::TooOld;
        }
        let i = self.index(seq);
        let outcome = match self.slots[i].seq {
            // A stale occupant (outside the window) is not an eviction.
            Some(old) if old != seq && self.in_window(old) => {
                self.stats.evictions += 1;
                CacheInsert::Evicted(old)
            }
            _ => CacheInsert::Stored,
        };
        let slot = &mut self.slots[i];
        slot.seq = Some(seq);
        slot.len = packet.len();
        let start = i * self.slot_size;
        self.data[start..start + packet.len()].copy_from_slice(packet);
        if self.newest.is_none_or(|n| seq > n) {
            self.newest = Some(seq);
        }
        self.stats.stored += 1;
        outcome
    }

    /// The packet stored under `seq`, if it is still there and fresh.
    pub fn get(&mut self, seq: SeqNo) -> Option<&[u8]> {
        let i = self.index(seq);
        let slot = self.slots[i];
        if slot.seq != Some(seq) || !self.in_window(seq) {
            self.stats.misses += 1;
            return None;
        }
        self.stats.hits += 1;
        let start = i * self.slot_size;
        Some(&self.data[start..start + slot.len])
    }

    /// Forgets every packet (keeps the counters and the memory).
    pub fn clear(&mut self) {
        self.slots.fill(Slot::default());
        self.newest = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::seqno::SeqUnwrapper;

    fn pkt(seq: u64) -> Vec<u8> {
        let n = 20 + (seq % 50) as usize;
        (0..n).map(|i| (seq as u8).wrapping_add(i as u8)).collect()
    }

    #[test]
    fn hit_and_miss() {
        let mut c = PacketCache::new(8);
        assert_eq!(c.get(SeqNo(1)), None);
        assert_eq!(c.insert(SeqNo(1), &pkt(1)), CacheInsert::Stored);
        assert_eq!(c.insert(SeqNo(2), &pkt(2)), CacheInsert::Stored);
        assert_eq!(c.get(SeqNo(1)), Some(&pkt(1)[..]));
        assert_eq!(c.get(SeqNo(2)), Some(&pkt(2)[..]));
        assert_eq!(c.get(SeqNo(3)), None, "never stored");
        assert_eq!(c.get(SeqNo(0)), None);
        let s = c.stats();
        assert_eq!((s.stored, s.hits, s.misses, s.evictions), (2, 2, 3, 0));
    }

    #[test]
    fn eviction_and_staleness() {
        let mut c = PacketCache::new(4);
        for s in 10..14 {
            assert_eq!(c.insert(SeqNo(s), &pkt(s)), CacheInsert::Stored);
        }
        assert_eq!(
            c.insert(SeqNo(14), &pkt(14)),
            CacheInsert::Evicted(SeqNo(10))
        );
        assert_eq!(c.get(SeqNo(10)), None, "overwritten");
        assert_eq!(c.get(SeqNo(11)), Some(&pkt(11)[..]));
        // Jump ahead past 16 and 17 (lost): slot of 12 still holds 12, but
        // it is now 6 behind the newest, outside a 4-slot window.
        c.insert(SeqNo(18), &pkt(18));
        assert_eq!(c.get(SeqNo(13)), None, "stale");
        assert_eq!(c.get(SeqNo(15)), None, "never stored");
        assert_eq!(c.get(SeqNo(18)), Some(&pkt(18)[..]));
        // Too old to store now.
        assert_eq!(c.insert(SeqNo(12), &pkt(12)), CacheInsert::TooOld);
        // A late packet inside the window is stored.
        assert_eq!(c.insert(SeqNo(16), &pkt(16)), CacheInsert::Stored);
        assert_eq!(c.get(SeqNo(16)), Some(&pkt(16)[..]));
        // 16's slot held 12, already stale: not counted as an eviction.
        assert_eq!(c.stats().evictions, 2, "10 by 14, 14 by 18");
        assert_eq!(c.stats().too_old, 1);
    }

    #[test]
    fn same_seq_overwrites_without_eviction() {
        let mut c = PacketCache::new(4);
        c.insert(SeqNo(5), &[1, 2, 3]);
        assert_eq!(c.insert(SeqNo(5), &[9]), CacheInsert::Stored);
        assert_eq!(c.get(SeqNo(5)), Some(&[9][..]));
        assert_eq!(c.stats().evictions, 0);
    }

    #[test]
    fn oversize_is_counted_not_stored() {
        let mut c = PacketCache::with_slot_size(4, 100);
        assert_eq!(c.insert(SeqNo(1), &[0; 101]), CacheInsert::Oversize);
        assert_eq!(c.insert(SeqNo(2), &[7; 100]), CacheInsert::Stored);
        assert_eq!(c.get(SeqNo(1)), None);
        assert_eq!(c.get(SeqNo(2)), Some(&[7; 100][..]));
        assert_eq!(c.stats().oversize, 1);
        // Default slots take a 1500-byte packet, not 1501.
        let mut c = PacketCache::new(2);
        assert_eq!(c.insert(SeqNo(1), &[0; 1500]), CacheInsert::Stored);
        assert_eq!(c.insert(SeqNo(2), &[0; 1501]), CacheInsert::Oversize);
        assert_eq!(c.get(SeqNo(1)).map(<[u8]>::len), Some(1500));
    }

    #[test]
    fn works_across_sequence_wrap() {
        let mut c = PacketCache::new(16);
        let mut u = SeqUnwrapper::new();
        let wire: Vec<u16> = (65_530..=65_535).chain(0..10).collect();
        for &w in &wire {
            let s = u.extend(w);
            c.insert(s, &pkt(u64::from(w)));
        }
        let mut u2 = SeqUnwrapper::new();
        for &w in &wire {
            let s = u2.extend(w);
            assert_eq!(c.get(s), Some(&pkt(u64::from(w))[..]), "wire {w}");
        }
        // The wire value alone from the previous cycle is a different key.
        let before_wrap = u.peek(65_532);
        assert_eq!(c.get(SeqNo(before_wrap.0 + (1 << 16))), None);
        assert_eq!(c.stats().misses, 1);
    }

    #[test]
    fn zero_capacity_is_one_slot_and_clear_forgets() {
        let mut c = PacketCache::with_slot_size(0, 0);
        assert_eq!((c.capacity(), c.slot_size()), (1, 1));
        c.insert(SeqNo(3), &[1]);
        assert_eq!(c.get(SeqNo(3)), Some(&[1][..]));
        c.clear();
        assert_eq!(c.get(SeqNo(3)), None);
        assert_eq!(c.newest(), None);
    }
}
