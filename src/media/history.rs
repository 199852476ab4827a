//! Answering NACKs from one history per published stream.
//!
//! A publisher's video packet is kept once, in the [`History`] of the
//! stream it arrived on (one per simulcast encoding), for [`SPAN`]. Every
//! subscriber's outgoing stream keeps only a [`SentLog`]: for each
//! sequence number it sent, which publisher packet that was and how its
//! header was rewritten (a few dozen bytes). A NACK from any subscriber is
//! answered by looking its sequence number up in its log, then the packet
//! in the shared history, and rewriting the header again.
//!
//! Both are sized by time: a retransmission later than about a second
//! reaches a decoder that has given up on the frame and asked for a
//! keyframe, so older packets are not worth keeping.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long a published packet is kept for retransmission.
pub const SPAN: Duration = Duration::from_secs(1);

/// The most packets one history holds, whatever their age: 1 s of
/// 10 Mbit/s video in 1,200-byte packets.
pub const MAX_PACKETS: usize = 1_024;

/// The largest log one outgoing stream keeps (a power of two).
pub const MAX_SENT: usize = 1_024;

/// The smallest log (a power of two): 64 packets is ~1 s of a
/// 500 kbit/s stream.
const MIN_SENT: usize = 64;

/// A packet is sent again at most this many times for NACKs...
pub const MAX_RESENDS: u8 = 4;

/// ...and not again within this long of the last time: a receiver that
/// NACKs every cycle until the repair arrives (as rtc's generator does, it
/// does not see RTX repairs) would otherwise get a copy per cycle.
pub const RESEND_GAP: Duration = Duration::from_millis(40);

/// The recent packets of one published stream, oldest first, by the
/// publisher's sequence number.
#[derive(Debug)]
pub struct History<P> {
    entries: VecDeque<Kept<P>>,
}

#[derive(Debug)]
struct Kept<P> {
    seq: u16,
    at: Instant,
    packet: P,
}

impl<P> Default for History<P> {
    fn default() -> Self {
        History {
            entries: VecDeque::new(),
        }
    }
}

impl<P> History<P> {
    /// Keeps `packet` (sequence number `seq`, arrived `at`), forgetting
    /// what is older than [`SPAN`] and, past [`MAX_PACKETS`], the oldest.
    pub fn push(&mut self, seq: u16, at: Instant, packet: P) {
        self.prune(at);
        if self.entries.len() >= MAX_PACKETS {
            self.entries.pop_front();
        }
        self.entries.push_back(Kept { seq, at, packet });
    }

    /// Forgets the packets older than [`SPAN`] at `now`.
    pub fn prune(&mut self, now: Instant) {
        while self
            .entries
            .front()
            .is_some_and(|k| now.saturating_duration_since(k.at) > SPAN)
        {
            self.entries.pop_front();
        }
    }

    /// The kept packet numbered `seq`. Packets mostly arrive in order, so
    /// its place is guessed from the oldest one's number first.
    pub fn get(&self, seq: u16) -> Option<&P> {
        let front = self.entries.front()?;
        let guess = usize::from(seq.wrapping_sub(front.seq));
        if let Some(k) = self.entries.get(guess).filter(|k| k.seq == seq) {
            return Some(&k.packet);
        }
        // Out of order: looked for, newest first.
        self.entries
            .iter()
            .rev()
            .find(|k| k.seq == seq)
            .map(|k| &k.packet)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// When the newest packet arrived.
    pub fn newest(&self) -> Option<Instant> {
        self.entries.back().map(|k| k.at)
    }
}

/// What one outgoing stream sent, by its own sequence number: a ring that
/// starts at 64 entries and doubles (up to [`MAX_SENT`]) whenever it would
/// overwrite an entry younger than [`SPAN`].
#[derive(Debug)]
pub struct SentLog<S> {
    slots: Vec<Option<Sent<S>>>,
    /// Times are kept as milliseconds since this instant (4 bytes a slot).
    origin: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Sent<S> {
    seq: u16,
    /// Times sent again for a NACK.
    resends: u8,
    at_ms: u32,
    /// When last sent again (ms since the origin).
    resent_ms: u32,
    what: S,
}

impl<S: Copy> SentLog<S> {
    pub fn new(now: Instant) -> Self {
        SentLog {
            slots: Vec::new(),
            origin: now,
        }
    }

    fn ms(&self, now: Instant) -> u32 {
        u32::try_from(now.saturating_duration_since(self.origin).as_millis()).unwrap_or(u32::MAX)
    }

    /// Records that sequence number `seq` was `what`, sent at `now`.
    pub fn record(&mut self, seq: u16, now: Instant, what: S) {
        let at_ms = self.ms(now);
        if self.slots.is_empty() {
            self.slots = vec![None; MIN_SENT];
        }
        let span = SPAN.as_millis() as u32;
        let mask = self.slots.len() - 1;
        if let Some(old) = &self.slots[usize::from(seq) & mask] {
            if old.seq != seq && at_ms.saturating_sub(old.at_ms) <= span {
                self.grow(at_ms);
            }
        }
        let mask = self.slots.len() - 1;
        self.slots[usize::from(seq) & mask] = Some(Sent {
            seq,
            resends: 0,
            at_ms,
            resent_ms: 0,
            what,
        });
    }

    /// Doubles the ring (up to [`MAX_SENT`]), keeping what is younger
    /// than [`SPAN`].
    fn grow(&mut self, now_ms: u32) {
        let len = self.slots.len();
        if len >= MAX_SENT {
            return;
        }
        let span = SPAN.as_millis() as u32;
        let mut bigger = vec![None; len * 2];
        let mask = bigger.len() - 1;
        for s in self.slots.drain(..).flatten() {
            if now_ms.saturating_sub(s.at_ms) <= span {
                bigger[usize::from(s.seq) & mask] = Some(s);
            }
        }
        self.slots = bigger;
    }

    /// What sequence number `seq` was, if it was sent within [`SPAN`] of
    /// `now`.
    pub fn get(&self, seq: u16, now: Instant) -> Option<S> {
        if self.slots.is_empty() {
            return None;
        }
        let span = SPAN.as_millis() as u32;
        let now_ms = self.ms(now);
        self.slots[usize::from(seq) & (self.slots.len() - 1)]
            .filter(|s| s.seq == seq && now_ms.saturating_sub(s.at_ms) <= span)
            .map(|s| s.what)
    }

    /// What `seq` was, if it may be sent again for a NACK at `now`: sent
    /// within [`SPAN`], sent again fewer than [`MAX_RESENDS`] times and not
    /// within [`RESEND_GAP`]. Counts the resend.
    pub fn resend(&mut self, seq: u16, now: Instant) -> Option<S> {
        if self.slots.is_empty() {
            return None;
        }
        let span = SPAN.as_millis() as u32;
        let gap = RESEND_GAP.as_millis() as u32;
        let now_ms = self.ms(now);
        let mask = self.slots.len() - 1;
        let s = self.slots[usize::from(seq) & mask].as_mut()?;
        let fresh = s.seq == seq && now_ms.saturating_sub(s.at_ms) <= span;
        let allowed = s.resends == 0
            || (s.resends < MAX_RESENDS && now_ms.saturating_sub(s.resent_ms) >= gap);
        if !(fresh && allowed) {
            return None;
        }
        s.resends += 1;
        s.resent_ms = now_ms;
        Some(s.what)
    }

    /// Entries the ring has room for.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_history_finds_packets_in_and_out_of_order_and_forgets_by_age() {
        let t0 = Instant::now();
        let mut h = History::default();
        for seq in 65_530u16..=65_535 {
            h.push(seq, t0, seq);
        }
        for seq in [0u16, 1, 3] {
            h.push(seq, t0 + ms(10), seq);
        }
        // 2 arrives late (repaired by a retransmission).
        h.push(2, t0 + ms(20), 1002);
        assert_eq!(h.get(65_531), Some(&65_531));
        assert_eq!(h.get(1), Some(&1));
        assert_eq!(h.get(2), Some(&1002));
        assert_eq!(h.get(4), None);
        // Past the span, the first six go; the rest stay.
        h.prune(t0 + SPAN + ms(5));
        assert_eq!((h.get(65_531), h.get(3), h.len()), (None, Some(&3), 4));
        h.prune(t0 + SPAN + ms(30));
        assert!(h.is_empty());
    }

    #[test]
    fn a_history_holds_at_most_max_packets() {
        let t0 = Instant::now();
        let mut h = History::default();
        for i in 0..(MAX_PACKETS + 10) {
            h.push(i as u16, t0, i);
        }
        assert_eq!(h.len(), MAX_PACKETS);
        assert_eq!(h.get(9), None);
        assert_eq!(h.get(10), Some(&10));
    }

    #[test]
    fn a_log_grows_to_keep_a_span_and_forgets_what_is_older() {
        let t0 = Instant::now();
        let mut log = SentLog::new(t0);
        // 200 packets within 400 ms: the ring grows from 64 to 256.
        for i in 0..200u16 {
            log.record(i, t0 + ms(u64::from(i) * 2), i * 10);
        }
        assert_eq!(log.capacity(), 256);
        let now = t0 + ms(400);
        assert!((0..200u16).all(|i| log.get(i, now) == Some(i * 10)));
        assert_eq!(log.get(200, now), None);
        // A second later, what was sent at the start is too old.
        assert_eq!(log.get(0, t0 + SPAN + ms(1)), None);
        assert_eq!(log.get(199, t0 + SPAN + ms(1)), Some(1990));
        // Slowly sent packets (one per 20 ms) do not grow it.
        let mut slow = SentLog::new(t0);
        for i in 0..500u16 {
            slow.record(i, t0 + ms(u64::from(i) * 20), i);
        }
        assert_eq!(slow.capacity(), 64);
        assert_eq!(slow.get(499, t0 + ms(9_990)), Some(499));
        assert_eq!(slow.get(400, t0 + ms(9_990)), None, "overwritten");
    }

    #[test]
    fn a_packet_is_resent_a_few_times_and_not_twice_in_a_row() {
        let t0 = Instant::now();
        let mut log = SentLog::new(t0);
        log.record(7, t0, 'x');
        assert_eq!(log.resend(7, t0 + ms(10)), Some('x'));
        assert_eq!(log.resend(7, t0 + ms(20)), None, "within the gap");
        assert_eq!(log.resend(7, t0 + ms(60)), Some('x'));
        assert_eq!(log.resend(7, t0 + ms(110)), Some('x'));
        assert_eq!(log.resend(7, t0 + ms(160)), Some('x'));
        assert_eq!(log.resend(7, t0 + ms(300)), None, "four times at most");
        assert_eq!(log.resend(8, t0 + ms(300)), None, "never sent");
        // Padding reads without counting.
        assert_eq!(log.get(7, t0 + ms(300)), Some('x'));
    }

    #[test]
    fn a_log_never_grows_past_its_maximum() {
        let t0 = Instant::now();
        let mut log = SentLog::new(t0);
        for i in 0..5_000u32 {
            log.record(i as u16, t0, i);
        }
        assert_eq!(log.capacity(), MAX_SENT);
        assert_eq!(log.get(4_999, t0), Some(4_999));
        assert_eq!(log.get(0, t0), None);
    }

    /// The point of the module: two subscribers' streams, numbered
    /// differently, answer their NACKs from the same stored packet.
    #[test]
    fn one_history_answers_every_subscriber() {
        let t0 = Instant::now();
        let mut history: History<Arc<[u8]>> = History::default();
        let mut bob: SentLog<u16> = SentLog::new(t0);
        let mut carol: SentLog<u16> = SentLog::new(t0);
        for (i, publisher_seq) in (40_000u16..40_050).enumerate() {
            let at = t0 + ms(i as u64 * 20);
            history.push(publisher_seq, at, Arc::from(publisher_seq.to_be_bytes()));
            // bob's stream started earlier, carol's wraps.
            bob.record(1_000 + i as u16, at, publisher_seq);
            carol.record(65_520u16.wrapping_add(i as u16), at, publisher_seq);
        }
        let now = t0 + ms(1_000);
        let from_bob = history.get(bob.get(1_030, now).unwrap()).unwrap();
        let from_carol = history.get(carol.get(14, now).unwrap()).unwrap();
        assert_eq!(&from_bob[..], &40_030u16.to_be_bytes());
        assert!(Arc::ptr_eq(from_bob, from_carol), "the very same packet");
        // Kept once: the history's reference and the test's two borrows.
        assert_eq!(Arc::strong_count(from_bob), 1);
    }
}
