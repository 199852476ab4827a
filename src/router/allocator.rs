//! The simulcast layer allocator for one subscriber connection: which
//! encoding of each video track it receives, given its downlink estimate
//! (after LiveKit's StreamAllocator and Jitsi's BandwidthAllocator).
//!
//! Pure: the estimate, the tracks' layers and the subscriber's wishes, and
//! `now`, in; one [`Target`] per track out, into the caller's buffer. No
//! sockets, no clock, no logging; after warm-up nothing allocates.
//!
//! # Policy
//!
//! - Audio is never cut: the video budget is the estimate less the audio.
//! - A track without simulcast has nothing to step down to: it is always
//!   sent (as mediasoup's simple consumers are), unless its subscriber
//!   paused it, and its cost comes off the budget like audio's. Pausing it
//!   would trade a degraded picture (which NACK and keyframes repair) for a
//!   frozen one.
//! - Everyone first: every track gets its lowest live layer, most important
//!   first (the active speaker, then the rest), before any track goes
//!   higher, so two tracks at the lowest layer beat one high and one paused.
//!   The least important pause first when even that does not fit. A track
//!   paused for bandwidth comes back at its lowest layer, after
//!   [`HOLD_MIN`], as soon as every track's lowest layer fits the headroom,
//!   even if that brings more important tracks down from higher layers
//!   (one high and one paused is never kept where two low would fit).
//! - Then, most important first, each track goes as high as its wish
//!   (`max_height`) and the budget allow.
//! - Hysteresis, so a noisy estimate does not flip layers (each switch costs
//!   a keyframe and a visible jump): a track goes down at once when the
//!   current choice no longer fits, but up only within [`UP_HEADROOM`] of
//!   the budget and not within a hold time of its last down-switch. An
//!   up-switch that is followed by a down-switch within [`PROBE_WINDOW`]
//!   was a failed probe, and doubles the hold.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// An up-switch must leave the new total within this share of the budget:
/// the estimate is noisy, and a choice right at its edge would go down
/// again at its next dip.
pub const UP_HEADROOM: f64 = 0.85;

/// A track that went down waits this long before going up again.
pub const HOLD_MIN: Duration = Duration::from_secs(4);

/// The hold doubles after each failed probe, up to this. (It was 32 s,
/// when layers went up on an untested estimate; they now go up only past
/// what the link was seen to carry, and a long hold kept a viewer on its
/// lowest layer long after a congested link was freed.)
pub const HOLD_MAX: Duration = Duration::from_secs(8);

/// A down-switch this soon after an up-switch means the up-switch was a
/// failed probe: the link could not carry the higher layer.
pub const PROBE_WINDOW: Duration = Duration::from_secs(20);

/// The hold goes back to [`HOLD_MIN`] once this long has passed after it
/// ran out without a down-switch (the link settled).
pub const HOLD_RESET: Duration = Duration::from_secs(30);

/// Nominal costs (bit/s) of a layer not measured yet: a small (≤ 200 px)
/// one, a medium (≤ 400 px) one and a large one.
pub const NOMINAL_LOW: u64 = 150_000;
pub const NOMINAL_MID: u64 = 500_000;
pub const NOMINAL_HIGH: u64 = 1_500_000;

/// Layers past this many are ignored (so an index always fits a `u8`).
const MAX_LAYERS: usize = u8::MAX as usize + 1;

/// One encoding of a published video track as the subscriber could receive
/// it, lowest first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerInfo {
    /// Picture height seen in its keyframes; 0 = not known yet.
    pub height: u16,
    /// Measured bitrate in bit/s over the last second or so; 0 = not
    /// measured yet.
    pub bitrate: u32,
    /// Packets arrived recently (a layer that stopped, or that the publisher
    /// paused, is not live).
    pub live: bool,
}

/// One video track this subscriber receives.
#[derive(Debug, Clone, Copy)]
pub struct TrackDemand<'a> {
    /// The caller's key for the track (stable across calls; unique within
    /// one call).
    pub key: u64,
    /// Lower is more important: 0 = the active speaker, then the rest.
    pub priority: u32,
    /// Layers ordered lowest to highest quality (1 to 3 entries; 1 = not
    /// simulcast).
    pub layers: &'a [LayerInfo],
    /// The subscriber's wish (`track-settings`): largest height worth
    /// sending; None = no limit.
    pub max_height: Option<u32>,
    /// The subscriber's wish: off-screen, send nothing.
    pub paused: bool,
}

/// What a subscriber receives of one track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// This layer (an index into [`TrackDemand::layers`]).
    Layer(u8),
    /// Nothing.
    Paused(PauseCause),
}

/// Why a track is not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseCause {
    /// The subscriber asked (`paused`).
    Wish,
    /// Not even its lowest layer fits what the more important tracks left.
    Bandwidth,
    /// None of its layers is live.
    NoLiveLayer,
}

/// One track's target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    pub key: u64,
    pub target: Target,
}

/// The totals of one allocation, for metrics and for the bandwidth
/// estimator (a deficit is a reason to probe).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// bit/s of the chosen layers.
    pub allocated: u64,
    /// bit/s if every wish were met.
    pub wanted: u64,
    /// `wanted - allocated`, when positive.
    pub deficit: u64,
    /// Tracks paused for lack of bandwidth.
    pub paused_for_bandwidth: u32,
}

/// What the allocator remembers of a track between calls.
#[derive(Debug, Clone, Copy)]
struct TrackState {
    target: Target,
    hold: Duration,
    last_down: Option<Instant>,
    /// The last up-switch not yet judged by a down-switch.
    last_up: Option<Instant>,
}

impl TrackState {
    fn may_rise(&self, now: Instant) -> bool {
        self.last_down
            .is_none_or(|d| now.saturating_duration_since(d) >= self.hold)
    }

    /// Whether a track paused for bandwidth may come back at its lowest
    /// layer: [`HOLD_MIN`] after the pause, whatever failed probes did to
    /// the hold of its up-switches (a frozen tile costs more than a
    /// keyframe at the lowest layer).
    fn may_resume(&self, now: Instant) -> bool {
        self.last_down
            .is_none_or(|d| now.saturating_duration_since(d) >= HOLD_MIN.min(self.hold))
    }

    /// A down-switch for bandwidth at `now`. The hold is reset lazily, here:
    /// until the next down-switch only its end (`last_down + hold`) matters.
    fn went_down(&mut self, now: Instant) {
        let since = |t: Instant| now.saturating_duration_since(t);
        if self
            .last_down
            .is_some_and(|d| since(d) >= self.hold + HOLD_RESET)
        {
            self.hold = HOLD_MIN;
        }
        // Each up-switch is judged once.
        if self.last_up.take().is_some_and(|u| since(u) < PROBE_WINDOW) {
            self.hold = (self.hold * 2).min(HOLD_MAX);
        }
        self.last_down = Some(now);
    }
}

/// One track during a call (same index as in `tracks`).
#[derive(Debug, Clone, Copy)]
struct Work {
    /// Its lowest live layer, and the highest its wish allows.
    lo: u8,
    cap: u8,
    /// Its target before this call's switches (after its wishes and its
    /// layers' liveness applied, which they do at once).
    base: Target,
    target: Target,
    /// No earlier target to switch from (new, or back from a wish pause
    /// or dead layers): its first placement is no up- or down-switch.
    fresh: bool,
    /// Not within its hold time.
    may_rise: bool,
    /// Paused for bandwidth, and may come back ([`TrackState::may_resume`]).
    may_resume: bool,
    /// One layer only (no simulcast): sent as it is, never adjusted.
    single: bool,
}

impl Work {
    fn new(t: &TrackDemand<'_>, prior: Option<&TrackState>, now: Instant) -> Work {
        let fixed = |target| Work {
            lo: 0,
            cap: 0,
            base: target,
            target,
            fresh: false,
            may_rise: false,
            may_resume: false,
            single: false,
        };
        let layers = usable(t.layers);
        if t.paused {
            return fixed(Target::Paused(PauseCause::Wish));
        }
        let Some(lo) = layers.iter().position(|l| l.live) else {
            return fixed(Target::Paused(PauseCause::NoLiveLayer));
        };
        if layers.len() == 1 {
            return Work {
                single: true,
                ..fixed(Target::Layer(0))
            };
        }
        // Within MAX_LAYERS, so every index fits.
        let lo = lo as u8;
        // The wish's cap: the highest live layer no taller than it, where an
        // unknown height fits only as the lowest live layer, and the lowest
        // live layer when none fits (a wish never pauses a track by size).
        let fits = |(i, l): &(usize, &LayerInfo)| {
            *i == usize::from(lo)
                || t.max_height
                    .is_none_or(|max| l.height != 0 && u32::from(l.height) <= max)
        };
        let cap = layers
            .iter()
            .enumerate()
            .filter(|(_, l)| l.live)
            .rfind(fits)
            .map_or(lo, |(i, _)| i as u8);
        let (base, fresh, fell_through) = match prior.map(|s| s.target) {
            Some(Target::Layer(l)) => {
                // The highest live layer at or below its target and cap.
                match (0..=l.min(cap)).rev().find(|&i| live(layers, i)) {
                    Some(settled) => (Target::Layer(settled), false, false),
                    // Everything at and below its layer stopped: the lowest
                    // live layer is above it. Going there is a rise like any
                    // other, placed by `fill` as a resume within the headroom
                    // or paused for bandwidth (seen under a 600 kbit/s cap:
                    // a publisher's 180p went silent for 1.2 s, the track
                    // fell through to 360p, and its keyframe froze the
                    // picture for 3.6 s).
                    None => (Target::Paused(PauseCause::Bandwidth), false, true),
                }
            }
            Some(bw @ Target::Paused(PauseCause::Bandwidth)) => (bw, false, false),
            _ => (Target::Layer(lo), true, false),
        };
        Work {
            lo,
            cap,
            base,
            target: base,
            fresh,
            may_rise: prior.is_none_or(|s| s.may_rise(now)),
            may_resume: fell_through
                || (base == Target::Paused(PauseCause::Bandwidth)
                    && prior.is_none_or(|s| s.may_resume(now))),
            single: false,
        }
    }

    /// Neither wish-paused nor without live layers.
    fn adjustable(&self) -> bool {
        !matches!(
            self.base,
            Target::Paused(PauseCause::Wish | PauseCause::NoLiveLayer)
        )
    }
}

fn live(layers: &[LayerInfo], i: u8) -> bool {
    layers.get(usize::from(i)).is_some_and(|l| l.live)
}

fn usable(layers: &[LayerInfo]) -> &[LayerInfo] {
    &layers[..layers.len().min(MAX_LAYERS)]
}

/// bit/s of layer `i`: measured, or nominal by its height, or by its
/// position when its height is not known either.
fn layer_cost(layers: &[LayerInfo], i: u8) -> u64 {
    let Some(l) = layers.get(usize::from(i)) else {
        return 0;
    };
    match (l.bitrate, l.height, i) {
        (0, 0, 0) => NOMINAL_LOW,
        (0, 0, 1) => NOMINAL_MID,
        (0, 0, _) => NOMINAL_HIGH,
        (0, ..=200, _) => NOMINAL_LOW,
        (0, ..=400, _) => NOMINAL_MID,
        (0, _, _) => NOMINAL_HIGH,
        (b, _, _) => u64::from(b),
    }
}

fn cost(layers: &[LayerInfo], target: Target) -> u64 {
    match target {
        Target::Layer(l) => layer_cost(layers, l),
        Target::Paused(_) => 0,
    }
}

/// Orders targets: paused below every layer.
fn rank(target: Target) -> u16 {
    match target {
        Target::Layer(l) => u16::from(l) + 1,
        Target::Paused(_) => 0,
    }
}

/// How far a round may raise layers above the lowest
/// ([`Allocator::allocate_tested`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rise {
    /// As far as the estimate allows (a connection that cannot be probed:
    /// nothing better to go by).
    Estimate,
    /// No further than the link was seen to carry lately, in bit/s (what
    /// arrived, a probe's padding included). An estimate that climbed on
    /// trust above it buys no higher layer until a probe has shown the
    /// link carries it: a switch that does not fit costs a keyframe lost
    /// in the queue and a frozen tile. (Not for a paused track's lowest
    /// layer: with everything paused little arrives and a probe has no
    /// video to repeat, so that limit would keep the connection paused for
    /// good.)
    Tested(u64),
    /// Not at all this round: a probe is padding the link on purpose, and
    /// a new layer's keyframe would be lost in the padding (seen under a
    /// 600 kbit/s cap: a switch to 360p half a second into a probe, its
    /// keyframe lost, a 2.4-s freeze). The probe's outcome decides the
    /// next round.
    Hold,
}

/// The layer allocator of one subscriber connection. It remembers each
/// track's target (by [`TrackDemand::key`]) between calls for hysteresis.
#[derive(Debug, Default)]
pub struct Allocator {
    states: HashMap<u64, TrackState>,
    /// Reused per call: one entry per track, and their priority order.
    work: Vec<Work>,
    order: Vec<usize>,
}

impl Allocator {
    pub fn new() -> Self {
        Allocator::default()
    }

    /// Chooses a target for each of `tracks`. `estimate`: the subscriber's
    /// downlink bandwidth estimate (bit/s); `audio`: bit/s of the audio it
    /// receives (never cut, subtracted first). Appends one [`Allocation`]
    /// per track, in the order of `tracks`, to `out` (cleared first).
    pub fn allocate(
        &mut self,
        estimate: u64,
        audio: u64,
        tracks: &[TrackDemand<'_>],
        now: Instant,
        out: &mut Vec<Allocation>,
    ) -> Summary {
        self.allocate_tested(estimate, Rise::Estimate, audio, tracks, now, out)
    }

    /// [`Allocator::allocate`], where layers above the lowest go up no
    /// further than `rise` allows (see [`Rise`]). What is there stays
    /// while the estimate allows it, whatever `rise` says.
    pub fn allocate_tested(
        &mut self,
        estimate: u64,
        rise: Rise,
        audio: u64,
        tracks: &[TrackDemand<'_>],
        now: Instant,
        out: &mut Vec<Allocation>,
    ) -> Summary {
        self.work.clear();
        self.work.extend(
            tracks
                .iter()
                .map(|t| Work::new(t, self.states.get(&t.key), now)),
        );
        let single: u64 = tracks
            .iter()
            .zip(&self.work)
            .filter(|(_, w)| w.single)
            .map(|(t, w)| cost(usable(t.layers), w.base))
            .sum();
        let budget = estimate.saturating_sub(audio).saturating_sub(single);
        let headroom = (budget as f64 * UP_HEADROOM) as u64;
        // Above the lowest layers, only what the link was seen to carry.
        // (Not for a paused track's lowest layer: with everything paused
        // little arrives and a probe has no video to repeat, so that limit
        // would keep the connection paused for good.)
        let rise = match rise {
            Rise::Estimate => headroom,
            Rise::Tested(t) => {
                let carried = t.saturating_sub(audio).saturating_sub(single);
                headroom.min((carried as f64 * UP_HEADROOM) as u64)
            }
            Rise::Hold => 0,
        };
        self.order.clear();
        self.order.extend(0..tracks.len());
        self.order
            .sort_unstable_by_key(|&i| (tracks[i].priority, tracks[i].key, i));

        let current: u64 = tracks
            .iter()
            .zip(&self.work)
            .filter(|(_, w)| !w.single)
            .map(|(t, w)| cost(usable(t.layers), w.base))
            .sum();
        // Tracks paused for bandwidth that may come back: what their lowest
        // layers cost, and what everyone's lowest layers cost.
        let lowest = |(t, w): (&TrackDemand<'_>, &Work)| layer_cost(usable(t.layers), w.lo);
        let resuming: u64 = tracks
            .iter()
            .zip(&self.work)
            .filter(|(_, w)| w.may_resume)
            .map(lowest)
            .sum();
        let all_lowest: u64 = tracks
            .iter()
            .zip(&self.work)
            .filter(|(_, w)| !w.single && (w.may_resume || matches!(w.base, Target::Layer(_))))
            .map(lowest)
            .sum();
        // Raising would leave a paused track out (the others' higher layers
        // fill the headroom) where everyone's lowest fits: rebalance, from
        // the lowest layers up, as when lowering.
        let rebalance = resuming > 0 && current + resuming > headroom && all_lowest <= headroom;
        let (work, order) = (&mut self.work[..], &self.order[..]);
        if current <= budget && !rebalance {
            fill(work, order, tracks, rise, headroom, false, current);
        } else {
            fill(work, order, tracks, budget, headroom, true, 0);
        }

        out.clear();
        let mut summary = Summary::default();
        for (t, w) in tracks.iter().zip(&self.work) {
            let layers = usable(t.layers);
            summary.allocated += cost(layers, w.target);
            if w.adjustable() {
                summary.wanted += layer_cost(layers, w.cap);
            }
            if w.target == Target::Paused(PauseCause::Bandwidth) {
                summary.paused_for_bandwidth += 1;
            }
            let state = self.states.entry(t.key).or_insert(TrackState {
                target: w.target,
                hold: HOLD_MIN,
                last_down: None,
                last_up: None,
            });
            if !w.fresh && rank(w.target) < rank(w.base) {
                state.went_down(now);
            } else if !w.fresh && rank(w.target) > rank(w.base) {
                state.last_up = Some(now);
            }
            state.target = w.target;
            let (key, target) = (t.key, w.target);
            out.push(Allocation { key, target });
        }
        summary.deficit = summary.wanted.saturating_sub(summary.allocated);
        summary
    }

    /// Forget a track that went away.
    pub fn remove(&mut self, key: u64) {
        self.states.remove(&key);
    }
}

/// The two passes of an allocation, most important track first: tracks get
/// their lowest layer, then each goes as high as `limit` allows.
///
/// Raising (the current targets fit, `total`): tracks paused for bandwidth
/// that may resume come back within `resume_limit` (the headroom), then
/// tracks past their hold go up to their cap within `limit` (the headroom,
/// or less: what the link was seen to carry). Lowering (they do not fit, or a
/// paused track is rebalanced in): every track restarts from its lowest
/// layer (or pauses, the least important first; a paused track that may
/// resume restarts too) and goes back up to at most its current target,
/// within `limit` = the budget; no track goes up while another goes down.
/// A paused track comes back only within `resume_limit` (the headroom).
fn fill(
    work: &mut [Work],
    order: &[usize],
    tracks: &[TrackDemand<'_>],
    limit: u64,
    resume_limit: u64,
    lowering: bool,
    mut total: u64,
) {
    for &i in order {
        let w = &mut work[i];
        if w.single {
            continue;
        }
        let restart = match w.base {
            Target::Layer(_) => lowering,
            Target::Paused(PauseCause::Bandwidth) => w.may_resume,
            Target::Paused(_) => false,
        };
        if restart {
            let c = layer_cost(usable(tracks[i].layers), w.lo);
            let within = if w.may_resume { resume_limit } else { limit };
            if total + c <= within {
                w.target = Target::Layer(w.lo);
                total += c;
            } else if lowering {
                w.target = Target::Paused(PauseCause::Bandwidth);
            }
        }
    }
    for &i in order {
        let w = &mut work[i];
        let Target::Layer(l) = w.target else {
            continue;
        };
        if w.single {
            continue;
        }
        let top = match w.base {
            Target::Layer(current) if lowering => current,
            _ if !lowering && w.may_rise => w.cap,
            _ => continue,
        };
        let layers = usable(tracks[i].layers);
        let rest = total - layer_cost(layers, l);
        let up = (l.saturating_add(1)..=top)
            .rev()
            .find(|&j| live(layers, j) && rest + layer_cost(layers, j) <= limit);
        if let Some(j) = up {
            w.target = Target::Layer(j);
            total = rest + layer_cost(layers, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIM: [LayerInfo; 3] = [
        layer(180, 150_000),
        layer(360, 500_000),
        layer(720, 1_500_000),
    ];
    const L0: Target = Target::Layer(0);
    const L1: Target = Target::Layer(1);
    const L2: Target = Target::Layer(2);
    const BW: Target = Target::Paused(PauseCause::Bandwidth);
    const WISH: Target = Target::Paused(PauseCause::Wish);

    const fn layer(height: u16, bitrate: u32) -> LayerInfo {
        let live = true;
        LayerInfo {
            height,
            bitrate,
            live,
        }
    }

    fn track(key: u64, priority: u32, layers: &[LayerInfo]) -> TrackDemand<'_> {
        let (max_height, paused) = (None, false);
        TrackDemand {
            key,
            priority,
            layers,
            max_height,
            paused,
        }
    }

    fn capped(max_height: u32, mut t: TrackDemand<'_>) -> TrackDemand<'_> {
        t.max_height = Some(max_height);
        t
    }

    fn paused(mut t: TrackDemand<'_>) -> TrackDemand<'_> {
        t.paused = true;
        t
    }

    /// One subscriber's allocator and clock.
    struct Sub {
        a: Allocator,
        t0: Instant,
        out: Vec<Allocation>,
    }

    impl Sub {
        fn new() -> Sub {
            Sub {
                a: Allocator::new(),
                t0: Instant::now(),
                out: Vec::new(),
            }
        }

        /// Allocates at `s` seconds (no audio): the targets, in track order.
        fn at(
            &mut self,
            s: f64,
            estimate: u64,
            tracks: &[TrackDemand<'_>],
        ) -> (Vec<Target>, Summary) {
            let now = self.t0 + Duration::from_secs_f64(s);
            let summary = self.a.allocate(estimate, 0, tracks, now, &mut self.out);
            let keys = self.out.iter().map(|o| o.key);
            assert!(keys.eq(tracks.iter().map(|t| t.key)), "in track order");
            (self.out.iter().map(|o| o.target).collect(), summary)
        }

        /// The target of a single track.
        fn one(&mut self, s: f64, estimate: u64, track: TrackDemand<'_>) -> Target {
            self.at(s, estimate, &[track]).0[0]
        }
    }

    #[test]
    fn plenty_of_budget_meets_every_wish() {
        let (speaker, off) = (track(1, 0, &SIM), paused(track(4, 1, &SIM)));
        let tracks = [
            speaker,
            capped(180, track(2, 1, &SIM)),
            capped(90, track(3, 1, &SIM)),
            off,
        ];
        let (t, s) = Sub::new().at(0.0, 20_000_000, &tracks);
        // 90 px: shorter than every layer, still the lowest.
        assert_eq!(t, [L2, L0, L0, WISH]);
        let totals = (s.allocated, s.wanted, s.deficit, s.paused_for_bandwidth);
        assert_eq!(totals, (1_800_000, 1_800_000, 0, 0));
    }

    #[test]
    fn everyone_lowest_before_anyone_higher() {
        let (mut a, mut out) = (Allocator::new(), Vec::new());
        // Two tracks, the second the speaker.
        let tracks = [track(1, 1, &SIM), track(2, 0, &SIM)];
        let s = a.allocate(600_000, 64_000, &tracks, Instant::now(), &mut out);
        // Both the lowest, not one high and one paused.
        assert_eq!((out[0].target, out[1].target), (L0, L0));
        let totals = (s.allocated, s.wanted, s.deficit);
        assert_eq!(totals, (300_000, 3_000_000, 2_700_000));
        // Room (within the headroom) for exactly one upgrade: the speaker's.
        let mut a = Allocator::new();
        a.allocate(900_000, 64_000, &tracks, Instant::now(), &mut out);
        assert_eq!((out[0].target, out[1].target), (L0, L1));
    }

    #[test]
    fn least_important_pause_first() {
        let tracks = [track(7, 1, &SIM), track(3, 0, &SIM), track(5, 1, &SIM)];
        // Room for one lowest layer: the speaker's.
        let (t, s) = Sub::new().at(0.0, 200_000, &tracks);
        assert_eq!(t, [BW, L0, BW]);
        assert_eq!((s.paused_for_bandwidth, s.allocated), (2, 150_000));
        // Room for two: the tie goes to the lower key.
        assert_eq!(Sub::new().at(0.0, 340_000, &tracks).0, [BW, L0, L0]);
        // Below one lowest layer nothing fits, the speaker's neither.
        let (t, s) = Sub::new().at(0.0, 100_000, &tracks);
        assert_eq!((t, s.allocated, s.deficit), (vec![BW; 3], 0, 4_500_000));
        // A paused track comes back only within the headroom.
        let mut sub = Sub::new();
        sub.at(0.0, 200_000, &tracks);
        assert_eq!(sub.at(1.0, 340_000, &tracks).0, [BW, L0, BW]);
        assert_eq!(sub.at(2.0, 360_000, &tracks).0, [BW, L0, L0]);
    }

    #[test]
    fn a_track_without_simulcast_is_sent_and_its_cost_comes_first() {
        let plain = [layer(720, 1_000_000)];
        let tracks = [track(1, 1, &plain), track(2, 0, &SIM)];
        // Far below the plain track's rate: it is still sent (nothing to
        // step down to); the simulcast speaker gets what is left: nothing.
        let (t, s) = Sub::new().at(0.0, 500_000, &tracks);
        assert_eq!(t, [L0, BW]);
        assert_eq!((s.allocated, s.paused_for_bandwidth), (1_000_000, 1));
        // 1.2 Mbit/s leaves 200 kbit/s: the speaker's lowest layer.
        assert_eq!(Sub::new().at(0.0, 1_200_000, &tracks).0, [L0, L0]);
        // Only its subscriber's wish pauses it; a height cap does not.
        let (t, s) = Sub::new().at(0.0, 500_000, &[paused(track(1, 1, &plain))]);
        assert_eq!((t[0], s.allocated), (WISH, 0));
        assert_eq!(
            Sub::new().one(0.0, 500_000, capped(90, track(1, 1, &plain))),
            L0
        );
    }

    #[test]
    fn noisy_estimate_does_not_flap() {
        let switches = |low: u64, high: u64| {
            let mut sub = Sub::new();
            let mut last = sub.one(0.0, 3_000_000, track(1, 0, &SIM));
            let mut switches = 0;
            for i in 1..40 {
                let estimate = if i % 2 == 1 { low } else { high };
                let t = sub.one(f64::from(i), estimate, track(1, 0, &SIM));
                switches += u32::from(t != last);
                last = t;
            }
            (switches, last)
        };
        // ±10 % around 1.6 Mbit/s: 720p fits at the top but not the
        // bottom; once down it needs 1.77 Mbit/s to go up again.
        assert_eq!(switches(1_440_000, 1_760_000), (1, L1));
        // ±10 % around 1.72 Mbit/s: 720p still fits at the bottom: kept.
        assert_eq!(switches(1_548_000, 1_892_000), (0, L2));
    }

    #[test]
    fn up_needs_headroom() {
        let mut sub = Sub::new();
        // 720p would fit 1.7 Mbit/s, but not 85 % of it.
        assert_eq!(sub.one(0.0, 1_700_000, track(1, 0, &SIM)), L1);
        assert_eq!(sub.one(10.0, 1_760_000, track(1, 0, &SIM)), L1);
        assert_eq!(sub.one(11.0, 1_770_000, track(1, 0, &SIM)), L2);
    }

    #[test]
    fn hold_after_down_doubles_after_a_failed_probe() {
        let mut sub = Sub::new();
        let mut check = |script: &[(f64, u64, Target)]| {
            for &(s, estimate, want) in script {
                assert_eq!(sub.one(s, estimate, track(1, 0, &SIM)), want, "at {s} s");
            }
        };
        let (lo, hi) = (1_000_000, 3_000_000);
        // Down at once; the hold is 4 s; up once it is over.
        check(&[(0.0, hi, L2), (1.0, lo, L1), (2.0, hi, L1)]);
        check(&[(4.9, hi, L1), (5.0, hi, L2)]);
        // Down 5 s after that up-switch: a failed probe, the hold is 8 s.
        check(&[(10.0, lo, L1), (17.9, hi, L1), (18.0, hi, L2)]);
        // Again: 8 s is the cap.
        check(&[(19.0, lo, L1), (26.9, hi, L1), (27.0, hi, L2)]);
        // A down 39 s after the up is no failed probe, and 30 s past the
        // end of the hold: back to 4 s.
        check(&[(66.0, lo, L1), (69.9, hi, L1), (70.0, hi, L2)]);
        // A failed probe doubles it from there; 30 s past that hold it is
        // 4 s again.
        check(&[(71.0, lo, L1), (78.9, hi, L1), (79.0, hi, L2)]);
        check(&[(130.0, lo, L1), (134.0, hi, L2)]);
    }

    /// Seen under a capped downlink: the speaker held its middle layer and
    /// the other track stayed paused (its hold doubled by a failed probe)
    /// at an estimate where both lowest layers fit.
    #[test]
    fn a_paused_track_comes_back_at_the_lowest_layer_when_everyone_lowest_fits() {
        let tracks = [track(1, 0, &SIM), track(2, 1, &SIM)];
        let mut sub = Sub::new();
        assert_eq!(sub.at(0.0, 400_000, &tracks).0, [L0, L0]);
        // Under 300 kbit/s the other track pauses; the speaker, which did
        // not go down, climbs to its middle layer as the estimate recovers,
        // while the other is within its hold.
        assert_eq!(sub.at(1.0, 250_000, &tracks).0, [L0, BW]);
        assert_eq!(sub.at(2.0, 1_000_000, &tracks).0, [L1, BW]);
        assert_eq!(sub.at(3.0, 504_000, &tracks).0, [L1, BW]);
        // 504 kbit/s: the speaker's 500 kbit/s fits, but not with the
        // other's lowest beside it, while both lowest (300 kbit/s) fit the
        // headroom: once its hold is over, the other comes back and the
        // speaker steps down to make room.
        assert_eq!(sub.at(5.5, 504_000, &tracks).0, [L0, L0]);
        assert_eq!(sub.at(6.5, 504_000, &tracks).0, [L0, L0]);
        // Where both lowest do not fit the headroom, the speaker's lowest
        // is kept and the other stays paused.
        let mut sub = Sub::new();
        sub.at(0.0, 400_000, &tracks);
        assert_eq!(sub.at(1.0, 250_000, &tracks).0, [L0, BW]);
        assert_eq!(sub.at(2.0, 600_000, &tracks).0, [L1, BW]);
        assert_eq!(sub.at(6.0, 340_000, &tracks).0, [L0, BW]);
        assert_eq!(sub.at(12.0, 340_000, &tracks).0, [L0, BW]);
    }

    /// One round of `a` over two simulcast tracks (the speaker's first)
    /// at `secs` after `t0`: the targets.
    fn round(a: &mut Allocator, t0: Instant, secs: u64, estimate: u64, rise: Rise) -> Vec<Target> {
        let tracks = [track(1, 0, &SIM), track(2, 1, &SIM)];
        let mut out = Vec::new();
        let now = t0 + Duration::from_secs(secs);
        a.allocate_tested(estimate, rise, 0, &tracks, now, &mut out);
        out.iter().map(|o| o.target).collect()
    }

    #[test]
    fn nothing_goes_up_past_what_the_link_was_seen_to_carry() {
        let t0 = Instant::now();
        let mut a = Allocator::new();
        // Both at the lowest layers (300 kbit/s), an estimate of 1 Mbit/s
        // that only climbed on trust: the link carried 400 kbit/s.
        let tested = Rise::Tested(400_000);
        assert_eq!(round(&mut a, t0, 0, 1_000_000, tested), [L0, L0]);
        assert_eq!(
            round(&mut a, t0, 5, 1_000_000, tested),
            [L0, L0],
            "no 360p on trust"
        );
        // A probe's padding got through at 1.1 Mbit/s: the speaker goes up.
        let got = round(&mut a, t0, 6, 1_100_000, Rise::Tested(1_100_000));
        assert_eq!(got, [L1, L0]);
        // What is there stays while the estimate allows it, tested or not.
        assert_eq!(round(&mut a, t0, 7, 1_100_000, tested), [L1, L0]);
        // A paused track's lowest layer is not held to it: with everything
        // paused only audio arrives, and nothing would ever come back.
        let mut c = Allocator::new();
        round(&mut c, t0, 0, 1_000_000, Rise::Tested(150_000));
        round(&mut c, t0, 1, 250_000, Rise::Tested(150_000));
        assert_eq!(
            round(&mut c, t0, 2, 100_000, Rise::Tested(60_000)),
            [BW, BW]
        );
        assert_eq!(
            round(&mut c, t0, 7, 450_000, Rise::Tested(60_000)),
            [L0, L0]
        );
        // Without a limit (no probing possible) the estimate is trusted.
        let mut b = Allocator::new();
        assert_eq!(round(&mut b, t0, 0, 1_000_000, Rise::Estimate), [L1, L0]);
    }

    #[test]
    fn nothing_goes_up_while_held_and_what_is_there_stays() {
        let t0 = Instant::now();
        let mut a = Allocator::new();
        assert_eq!(round(&mut a, t0, 0, 1_000_000, Rise::Estimate), [L1, L0]);
        // A probe pads: an estimate of 5 Mbit/s raises nothing, and nothing
        // comes down either.
        assert_eq!(round(&mut a, t0, 5, 5_000_000, Rise::Hold), [L1, L0]);
        assert_eq!(round(&mut a, t0, 10, 5_000_000, Rise::Hold), [L1, L0]);
        // The hold does not keep a layer the estimate no longer allows.
        assert_eq!(round(&mut a, t0, 11, 400_000, Rise::Hold), [L0, L0]);
        // The probe over, the same estimate raises them.
        assert_ne!(round(&mut a, t0, 20, 5_000_000, Rise::Estimate), [L0, L0]);
    }

    #[test]
    fn wishes_apply_at_once() {
        let mut sub = Sub::new();
        let demand = track(1, 0, &SIM);
        assert_eq!(sub.one(0.0, 3_000_000, demand), L2);
        assert_eq!(sub.one(0.1, 3_000_000, capped(360, demand)), L1);
        let (t, s) = sub.at(0.2, 3_000_000, &[paused(demand)]);
        assert_eq!((t[0], s.wanted, s.paused_for_bandwidth), (WISH, 0, 0));
        assert_eq!(sub.one(0.3, 3_000_000, capped(360, demand)), L1);
        // A lifted cap: no hold (the wish, not the link, lowered it), but
        // still the headroom.
        assert_eq!(sub.one(0.4, 1_700_000, demand), L1);
        assert_eq!(sub.one(0.5, 1_800_000, demand), L2);
    }

    #[test]
    fn going_down_raises_no_track() {
        let mut sub = Sub::new();
        let tracks = [capped(360, track(1, 0, &SIM)), track(2, 1, &SIM)];
        assert_eq!(sub.at(0.0, 10_000_000, &tracks).0, [L1, L2]);
        // The speaker's cap lifts as the estimate falls: the other track
        // goes down, and the speaker does not take its place (that would
        // be an up-switch without headroom).
        let (t, s) = sub.at(1.0, 1_800_000, &[track(1, 0, &SIM), track(2, 1, &SIM)]);
        assert_eq!((t, s.allocated), (vec![L1, L1], 1_000_000));
    }

    #[test]
    fn dead_layers_are_never_chosen() {
        let mut sub = Sub::new();
        let mut layers = SIM;
        assert_eq!(sub.one(0.0, 3_000_000, track(1, 0, &layers)), L2);
        // The top stops: the best live one at once; then the middle.
        layers[2].live = false;
        assert_eq!(sub.one(0.1, 3_000_000, track(1, 0, &layers)), L1);
        layers[1].live = false;
        assert_eq!(sub.one(0.2, 3_000_000, track(1, 0, &layers)), L0);
        layers[0].live = false;
        let (t, s) = sub.at(0.3, 3_000_000, &[track(1, 0, &layers)]);
        assert_eq!(t[0], Target::Paused(PauseCause::NoLiveLayer));
        assert_eq!(s, Summary::default());
        // Only the top comes back: it is the lowest live layer.
        layers[2].live = true;
        assert_eq!(sub.one(0.4, 3_000_000, track(1, 0, &layers)), L2);
        // A dead middle layer is skipped going up.
        let mut sub = Sub::new();
        layers = SIM;
        layers[1].live = false;
        assert_eq!(sub.one(0.0, 1_000_000, track(1, 0, &layers)), L0);
        assert_eq!(sub.one(0.1, 3_000_000, track(1, 0, &layers)), L2);
    }

    #[test]
    fn a_fall_through_to_a_higher_layer_is_a_rise_within_the_headroom() {
        let mut sub = Sub::new();
        let mut layers = SIM;
        assert_eq!(sub.one(0.0, 550_000, track(1, 0, &layers)), L0);
        // The lowest stops. The next live layer (500 kbit/s) fits the
        // 550 kbit/s estimate only without the headroom an up-switch must
        // leave: paused for bandwidth, not switched up to the edge of a
        // link that may not carry it.
        layers[0].live = false;
        let (t, s) = sub.at(0.5, 550_000, &[track(1, 0, &layers)]);
        assert_eq!((t[0], s.paused_for_bandwidth), (BW, 1));
        // It comes back: at once, at its layer.
        layers[0].live = true;
        assert_eq!(sub.one(1.0, 550_000, track(1, 0, &layers)), L0);
        // With room for it, the fall-through is the working layer at once.
        layers[0].live = false;
        assert_eq!(sub.one(1.5, 700_000, track(1, 0, &layers)), L1);
    }

    #[test]
    fn unknown_heights_and_bitrates_cost_nominal() {
        let by_height = [layer(180, 0), layer(360, 0), layer(720, 0)];
        let by_position = [layer(0, 0); 3];
        let measured = [layer(0, 90_000), layer(0, 300_000), layer(0, 900_000)];
        let cases = [
            (&by_height, 1_500_000),
            (&by_position, 1_500_000),
            (&measured, 900_000),
        ];
        for (layers, top) in cases {
            let (t, s) = Sub::new().at(0.0, 10_000_000, &[track(1, 0, layers)]);
            assert_eq!((t[0], s.allocated, s.wanted), (L2, top, top));
            // Headroom 935 kbit/s: only the measured top layer fits.
            let want = if top <= 935_000 { L2 } else { L1 };
            assert_eq!(Sub::new().one(0.0, 1_100_000, track(1, 0, layers)), want);
        }
        // An unknown height fits a wish only as the lowest layer.
        let wish = capped(360, track(1, 0, &by_position));
        let (t, s) = Sub::new().at(0.0, 10_000_000, &[wish]);
        assert_eq!((t[0], s.wanted), (L0, 150_000));
    }

    #[test]
    fn remove_forgets_and_out_is_reused() {
        let mut sub = Sub::new();
        sub.out.reserve_exact(8);
        let (capacity, ptr) = (sub.out.capacity(), sub.out.as_ptr());
        let tracks = [track(1, 0, &SIM), track(2, 1, &SIM)];
        assert_eq!(sub.at(0.0, 10_000_000, &tracks).0, [L2, L2]);
        assert_eq!(sub.at(1.0, 900_000, &tracks).0, [L1, L0]);
        // Within the hold it stays down, unless forgotten: then it is new.
        assert_eq!(sub.at(2.0, 10_000_000, &tracks).0, [L1, L0]);
        sub.a.remove(1);
        assert_eq!(sub.at(2.0, 10_000_000, &tracks[..1]).0, [L2]);
        assert_eq!(sub.out, [Allocation { key: 1, target: L2 }]);
        assert_eq!((sub.out.capacity(), sub.out.as_ptr()), (capacity, ptr));
        assert_eq!(sub.a.states.len(), 2);
        sub.a.remove(2);
        sub.a.remove(3);
        assert_eq!(sub.a.states.len(), 1);
    }
}
