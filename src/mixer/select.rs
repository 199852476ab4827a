//! Which inputs are mixed: the loudest K active ones, with hysteresis.
//!
//! Every 20 ms tick the caller passes each input slot's loudness (dB
//! relative to full scale, higher is louder; `None` for silent, muted or
//! empty slots). The selector keeps up to K speakers:
//!
//! - a free seat goes to the loudest active candidate;
//! - a candidate takes an occupied seat only if it is louder than the
//!   weakest speaker by more than the hysteresis margin (a silent speaker
//!   is always the weakest), so two similar voices don't flap;
//! - a speaker that falls silent keeps its seat for `hold` ticks unless a
//!   candidate needs it.
//!
//! The resulting [`Plan`]: every listener that is not selected hears the
//! ONE shared mix of all speakers (encoded once); each speaker hears its
//! own mix of the other speakers (N−1). Buffers are reused across ticks.

/// Selector tuning.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SelectConfig {
    /// How many inputs are mixed at most (K).
    pub k: usize,
    /// How much louder (dB) a candidate must be to take an occupied seat.
    pub hysteresis_db: f32,
    /// Ticks a silent speaker keeps its seat when no one needs it.
    pub hold: u32,
}

impl Default for SelectConfig {
    fn default() -> Self {
        SelectConfig {
            k: 3,
            hysteresis_db: 6.0,
            hold: 25,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Seat {
    slot: usize,
    /// This tick's loudness, `None` when silent.
    loudness: Option<f32>,
    silent_ticks: u32,
}

impl Seat {
    fn strength(&self) -> f32 {
        self.loudness.unwrap_or(f32::NEG_INFINITY)
    }
}

/// One tick's mixing plan. Slots are the caller's input indices.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// The selected speakers, loudest first (silent ones held last).
    selected: Vec<usize>,
}

impl Plan {
    /// The inputs in the shared mix (every selected speaker), loudest
    /// first.
    pub fn shared(&self) -> &[usize] {
        &self.selected
    }

    /// Whether `slot` is among the K (and so gets its own mix).
    pub fn is_selected(&self, slot: usize) -> bool {
        self.selected.contains(&slot)
    }

    /// The inputs in `listener`'s own mix: everyone selected but itself.
    pub fn own(&self, listener: usize) -> impl Iterator<Item = usize> + '_ {
        self.selected
            .iter()
            .copied()
            .filter(move |s| *s != listener)
    }
}

/// Top-K selection with hysteresis.
#[derive(Debug, Clone)]
pub struct Selector {
    config: SelectConfig,
    seats: Vec<Seat>,
    candidates: Vec<(usize, f32)>,
    plan: Plan,
}

impl Selector {
    pub fn new(config: SelectConfig) -> Self {
        Selector {
            config,
            seats: Vec::with_capacity(config.k),
            candidates: Vec::new(),
            plan: Plan {
                selected: Vec::with_capacity(config.k),
            },
        }
    }

    pub fn config(&self) -> &SelectConfig {
        &self.config
    }

    /// The last plan.
    pub fn current(&self) -> &Plan {
        &self.plan
    }

    /// Forgets `slot` (its input left).
    pub fn remove(&mut self, slot: usize) {
        self.seats.retain(|s| s.slot != slot);
        self.plan.selected.retain(|s| *s != slot);
    }

    /// Selects this tick's speakers from `levels[slot]` (dB re full scale,
    /// higher is louder; `None` = not eligible).
    pub fn plan(&mut self, levels: &[Option<f32>]) -> &Plan {
        let hold = self.config.hold;
        // Refresh the seated speakers; release those silent too long.
        self.seats.retain_mut(|seat| {
            seat.loudness = levels.get(seat.slot).copied().flatten();
            if seat.loudness.is_some() {
                seat.silent_ticks = 0;
                true
            } else {
                seat.silent_ticks += 1;
                seat.silent_ticks <= hold
            }
        });

        // Candidates, loudest first.
        self.candidates.clear();
        for (slot, level) in levels.iter().enumerate() {
            if let Some(l) = level {
                if !self.seats.iter().any(|s| s.slot == slot) {
                    self.candidates.push((slot, *l));
                }
            }
        }
        self.candidates
            .sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));

        for &(slot, loudness) in &self.candidates {
            let newcomer = Seat {
                slot,
                loudness: Some(loudness),
                silent_ticks: 0,
            };
            if self.seats.len() < self.config.k {
                self.seats.push(newcomer);
                continue;
            }
            // The weakest seated speaker (silent ones first).
            let Some((weakest, seat)) = self
                .seats
                .iter()
                .enumerate()
                .min_by(|a, b| a.1.strength().total_cmp(&b.1.strength()))
            else {
                break; // k == 0
            };
            let beats = match seat.loudness {
                None => true,
                Some(l) => loudness > l + self.config.hysteresis_db,
            };
            if !beats {
                // Candidates are sorted: no quieter one will beat it either.
                break;
            }
            self.seats[weakest] = newcomer;
        }

        self.seats.sort_by(|a, b| {
            b.strength()
                .total_cmp(&a.strength())
                .then(a.slot.cmp(&b.slot))
        });
        self.plan.selected.clear();
        self.plan.selected.extend(self.seats.iter().map(|s| s.slot));
        &self.plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(k: usize) -> Selector {
        Selector::new(SelectConfig {
            k,
            hysteresis_db: 6.0,
            hold: 3,
        })
    }

    #[test]
    fn picks_the_loudest_k_loudest_first() {
        let mut sel = selector(3);
        let levels = [
            Some(-30.0),
            None,
            Some(-10.0),
            Some(-40.0),
            Some(-20.0),
            None,
        ];
        let plan = sel.plan(&levels);
        assert_eq!(plan.shared(), &[2, 4, 0]);
        assert!(plan.is_selected(0));
        assert!(!plan.is_selected(3));
        assert_eq!(plan.own(4).collect::<Vec<_>>(), vec![2, 0]);
        assert_eq!(plan.own(3).collect::<Vec<_>>(), vec![2, 4, 0]);
    }

    #[test]
    fn fewer_than_k_and_k_zero() {
        let mut sel = selector(3);
        assert_eq!(sel.plan(&[None, Some(-20.0)]).shared(), &[1]);
        assert!(sel.plan(&[]).shared().len() <= 1);
        let mut none = selector(0);
        assert!(none.plan(&[Some(0.0), Some(-1.0)]).shared().is_empty());
    }

    #[test]
    fn hysteresis_prevents_flapping() {
        let mut sel = selector(2);
        assert_eq!(
            sel.plan(&[Some(-20.0), Some(-22.0), Some(-30.0)]).shared(),
            &[0, 1]
        );
        // Input 2 becomes a bit louder than 1: not by the margin, no swap.
        for _ in 0..10 {
            let plan = sel.plan(&[Some(-20.0), Some(-22.0), Some(-19.0)]);
            assert!(!plan.is_selected(2));
        }
        // Alternating small differences never swap.
        for i in 0..10 {
            let (a, b) = if i % 2 == 0 {
                (-21.0, -24.0)
            } else {
                (-24.0, -21.0)
            };
            let plan = sel.plan(&[Some(-20.0), Some(a), Some(b)]);
            assert_eq!(plan.shared(), &[0, 1]);
        }
        // Clearly louder (by more than 6 dB): it takes the weakest seat.
        let plan = sel.plan(&[Some(-20.0), Some(-22.0), Some(-10.0)]);
        assert_eq!(plan.shared(), &[2, 0]);
    }

    #[test]
    fn silent_speakers_are_held_then_released() {
        let mut sel = selector(2);
        sel.plan(&[Some(-20.0), Some(-25.0), None]);
        // Input 1 pauses: it keeps its seat for `hold` ticks.
        for _ in 0..3 {
            assert_eq!(sel.plan(&[Some(-20.0), None, None]).shared(), &[0, 1]);
        }
        assert_eq!(sel.plan(&[Some(-20.0), None, None]).shared(), &[0]);

        // A held seat goes to any active candidate at once.
        sel.plan(&[Some(-20.0), Some(-25.0), None]);
        let plan = sel.plan(&[Some(-20.0), None, Some(-60.0)]);
        assert_eq!(plan.shared(), &[0, 2]);
    }

    #[test]
    fn remove_frees_the_seat() {
        let mut sel = selector(1);
        sel.plan(&[Some(-20.0), Some(-22.0)]);
        sel.remove(0);
        assert!(sel.current().shared().is_empty());
        assert_eq!(sel.plan(&[None, Some(-22.0)]).shared(), &[1]);
    }
}
