//! Active speakers of a room whose audio is forwarded, not mixed: no
//! decoding, only the RFC 6464 levels publishers put in their packets.
//!
//! Each audio packet's level feeds that participant's [`LevelMeter`]; every
//! 20 ms [`SpeakerTracker::tick`] decays the meters that got nothing (a muted
//! or DTX sender stops sending), ranks the active ones loudest first, keeps
//! the top K, and says when that ordered list should be reported (at most
//! every `interval`, via [`SpeakerNotifier`]).

use std::time::{Duration, Instant};

use super::level::{AudioLevel, LevelMeter, SILENT_DBOV};
use super::{InputId, Speaker, SpeakerNotifier};

struct Meter {
    id: InputId,
    meter: LevelMeter,
    /// A level arrived since the last tick.
    fed: bool,
}

/// Active-speaker detection from audio levels alone.
pub struct SpeakerTracker {
    k: usize,
    threshold_dbov: u8,
    meters: Vec<Meter>,
    notifier: SpeakerNotifier,
    ranked: Vec<Speaker>,
    ids: Vec<InputId>,
}

impl SpeakerTracker {
    /// Reports the `k` loudest inputs louder than `threshold_dbov`, at most
    /// every `interval`.
    pub fn new(k: usize, threshold_dbov: u8, interval: Duration) -> Self {
        SpeakerTracker {
            k: k.max(1),
            threshold_dbov,
            meters: Vec::new(),
            notifier: SpeakerNotifier::new(interval),
            ranked: Vec::with_capacity(k),
            ids: Vec::with_capacity(k),
        }
    }

    pub fn add(&mut self, id: InputId) {
        if !self.meters.iter().any(|m| m.id == id) {
            self.meters.push(Meter {
                id,
                meter: LevelMeter::new(self.threshold_dbov),
                fed: false,
            });
        }
    }

    pub fn remove(&mut self, id: InputId) {
        self.meters.retain(|m| m.id != id);
    }

    /// One packet's level from `id` (unknown ids are ignored).
    pub fn level(&mut self, id: InputId, level: AudioLevel) {
        if let Some(m) = self.meters.iter_mut().find(|m| m.id == id) {
            m.meter.update(level.dbov);
            m.fed = true;
        }
    }

    /// Runs every 20 ms. `Some(list)` (loudest first, possibly empty) when
    /// the list changed and may be reported now.
    pub fn tick(&mut self, now: Instant) -> Option<&[Speaker]> {
        self.ranked.clear();
        for m in &mut self.meters {
            if !m.fed {
                m.meter.update(SILENT_DBOV);
            }
            m.fed = false;
            if m.meter.is_active() {
                self.ranked.push(Speaker {
                    id: m.id,
                    level: m.meter.protocol_level(),
                });
            }
        }
        // Loudest first; ties by id so the order is stable.
        self.ranked
            .sort_unstable_by(|a, b| b.level.total_cmp(&a.level).then(a.id.cmp(&b.id)));
        self.ranked.truncate(self.k);
        self.ids.clear();
        self.ids.extend(self.ranked.iter().map(|s| s.id));
        self.notifier
            .update(&self.ids, now)
            .then_some(self.ranked.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(20);

    fn lvl(dbov: u8) -> AudioLevel {
        AudioLevel { voice: true, dbov }
    }

    #[test]
    fn the_loudest_come_first_and_silence_drops_out() {
        let t0 = Instant::now();
        let mut t = SpeakerTracker::new(2, 50, Duration::from_millis(200));
        let (a, b, c) = (InputId(1), InputId(2), InputId(3));
        for id in [a, b, c] {
            t.add(id);
        }
        let mut reports: Vec<Vec<InputId>> = Vec::new();
        let mut now = t0;
        // 1 s: a at -30 dBov, b at -20 dBov, c at -40 dBov (only two are kept).
        for _ in 0..50 {
            t.level(a, lvl(30));
            t.level(b, lvl(20));
            t.level(c, lvl(40));
            now += TICK;
            if let Some(list) = t.tick(now) {
                reports.push(list.iter().map(|s| s.id).collect());
            }
        }
        assert_eq!(
            reports.last(),
            Some(&vec![b, a]),
            "b is louder; c is not in the top 2: {reports:?}"
        );
        // b stops sending (muted): it decays out, and c moves up.
        for _ in 0..100 {
            t.level(a, lvl(30));
            t.level(c, lvl(40));
            now += TICK;
            if let Some(list) = t.tick(now) {
                reports.push(list.iter().map(|s| s.id).collect());
            }
        }
        assert_eq!(reports.last(), Some(&vec![a, c]), "{reports:?}");
        // Everyone silent: an empty list is reported.
        for _ in 0..100 {
            now += TICK;
            if let Some(list) = t.tick(now) {
                reports.push(list.iter().map(|s| s.id).collect());
            }
        }
        assert_eq!(reports.last(), Some(&Vec::new()));
        // Reports never come closer than 200 ms.
        assert!(reports.len() <= 3 * 50 * 20 / 200 + 1);
    }

    #[test]
    fn removed_or_unknown_inputs_are_never_named() {
        let mut t = SpeakerTracker::new(3, 50, Duration::ZERO);
        let now = Instant::now();
        t.add(InputId(1));
        let mut named = Vec::new();
        for i in 0..3 {
            t.level(InputId(9), lvl(10)); // unknown: ignored
            t.level(InputId(1), lvl(10));
            if let Some(list) = t.tick(now + TICK * i) {
                named = list.iter().map(|s| s.id).collect();
            }
        }
        assert_eq!(named, [InputId(1)]);
        t.remove(InputId(1));
        let named: Option<Vec<InputId>> = t
            .tick(now + TICK * 3)
            .map(|l| l.iter().map(|s| s.id).collect());
        assert_eq!(named, Some(vec![]), "gone, so the list empties at once");
    }
}
