//! Bandwidth probing for one subscriber connection: when its wishes want
//! more than its estimate allows, send extra bytes (retransmissions of
//! recent video packets on the RTX stream, which its browser discards as
//! duplicates but reports in its congestion feedback) to find out whether
//! the link can carry more, instead of waiting for an estimate that only
//! ever follows what was sent.
//!
//! Pure: the estimate, the allocation's totals and `now` in; how many
//! padding bytes are due out. The driver turns bytes into retransmissions.
//!
//! # Policy (after LiveKit's prober and libwebrtc's probe controller)
//!
//! - Probe only with congestion feedback (an estimate), not within
//!   [`QUIET`] of the estimate falling, and only when the
//!   allocator has a deficit the estimate cannot cover: the goal is the
//!   rate the wishes want, over [`UP_HEADROOM`](super::allocator::UP_HEADROOM).
//! - Test one step at a time, as libwebrtc's probe controller does: the
//!   probe rate is [`STEP`] times the estimate (at least [`MIN_STEP`]
//!   above it; [`STEP_GROWTH`] times more after each success in a row,
//!   that tested above the estimate, up to [`STEP_MAX`]; a failure or a
//!   fall of the estimate starts again at [`STEP`]), never past the goal
//!   by more than [`PAST_GOAL`]; the padding fills what is sent up to
//!   that rate (at most [`PAD_MAX`]) for [`PROBE_TIME`], in steps of
//!   [`TICK`]. The rate is above the estimate, or the probe would test
//!   nothing: padding only up to what the wishes still lack, from a
//!   connection sending less than its estimate, could never raise it.
//! - A probe succeeds when the estimate rose [`SUCCESS_SHARE`] of the way
//!   from where it started to the probe rate; the next may follow soon. It
//!   fails when the estimate fell or the estimator reads the queue
//!   growing (the probe is filling a queue: stop at the next padding tick)
//!   or did not rise enough, and at once when the far end reports more
//!   than [`LOSS_ABORT`] of what was sent since it started lost (a link
//!   already full drops the padding and the media with it: the estimate
//!   reacts after a second, a loss report within a round trip); the wait
//!   before the next one doubles from
//!   [`BACKOFF_MIN`] to [`BACKOFF_MAX`] (short enough that a link freed
//!   after a long congested spell is found again within seconds).
//! - A probe that ran its time on a clean link (no stretch lost more than
//!   [`LOSS_CLEAN`], the estimate did not fall) without the estimate rising
//!   enough is inconclusive: what was sent may have been less than
//!   planned. The next follows as after a success, with the same step (seen
//!   after a cap lifted: two such probes at 4 Mbit/s counted as failures,
//!   3 and 6 s of back-off, and the climb back took over 20 s).

use std::time::{Duration, Instant};

use super::allocator::{Summary, UP_HEADROOM};

/// How long one probe pads.
pub const PROBE_TIME: Duration = Duration::from_millis(1500);
/// Padding is released in steps this long apart.
pub const TICK: Duration = Duration::from_millis(20);
/// Deficits smaller than this are not worth probing for.
pub const MIN_DEFICIT: u64 = 100_000;
/// A probe tests this many times the estimate...
pub const STEP: f64 = 1.5;
/// ...this many times more after each success in a row, up to
/// [`STEP_MAX`] (libwebrtc's probe controller doubles): a link freed after
/// a long congested spell is found again in a few probes, not one
/// 1.5-times step every two seconds (seen: 805 kbit/s to 2 Mbit/s took
/// 12 s after a 600 kbit/s cap lifted). A failure starts again at
/// [`STEP`], so a capped link is never tested harder than that.
pub const STEP_GROWTH: f64 = 1.5;
pub const STEP_MAX: f64 = 3.0;
/// ...and at least this much above it.
pub const MIN_STEP: u64 = 200_000;
/// Padding never adds more than this.
pub const PAD_MAX: u64 = 3_000_000;
/// A probe tests up to this much past the goal. The allocator raises a
/// layer only once what arrived covers it within
/// [`UP_HEADROOM`](super::allocator::UP_HEADROOM), and a probe aimed at the
/// goal itself arrives a little short of it (the rate's window starts
/// before the padding did, and the layers' costs are their recent
/// highs): seen after a cap lifted, a probe to the goal succeeded, the
/// next round raised nothing, and the same probe ran again 2 s later.
pub const PAST_GOAL: f64 = 1.1;
/// A probe succeeds when the estimate rose this share of the way to the
/// probe rate (the link carried it: an estimate that only crept up did not
/// test it).
pub const SUCCESS_SHARE: f64 = 0.5;
/// An estimate this far below where the probe started ends it as failed.
pub const ABORT_DROP: f64 = 0.90;
/// A probe ends as failed once the far end reports more than this share
/// of the packets sent since it started lost (GCC's "path is full"
/// threshold)...
pub const LOSS_ABORT: f64 = 0.10;
/// ...out of at least this many reported (a handful with one lost is no
/// 10 % loss). Seen under a 600 kbit/s cap: a probe padding 810 kbit/s
/// over 330 kbit/s of media ran its full 1.5 s, the token bucket dropped
/// media with the padding, and the picture froze for 3.4 s.
pub const LOSS_ABORT_MIN: u64 = 30;
/// A probe whose every stretch lost at most this share was clean.
pub const LOSS_CLEAN: f64 = 0.02;
/// Wait after a successful probe before the next.
pub const AFTER_SUCCESS: Duration = Duration::from_millis(500);
/// No probe starts until the estimate has not fallen for this long (a
/// link that just showed congestion is not tested again at once: the
/// padding would only fill its queue).
pub const QUIET: Duration = Duration::from_secs(5);
/// A fall of the estimate by more than this share counts as congestion.
const FALL: f64 = 0.95;
/// Wait after a failed probe: doubles each time, within these bounds.
pub const BACKOFF_MIN: Duration = Duration::from_secs(3);
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// How a probe ended, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeEvent {
    Started {
        pad_bps: u64,
    },
    Succeeded,
    Failed,
    /// It ran its time on a clean link (no stretch lost more than
    /// [`LOSS_CLEAN`], the estimate did not fall) but the estimate did
    /// not rise enough: the link carried what was sent, which may have
    /// been less than planned (an encoder sending below its layer's
    /// cost). Neither a success nor a failure: the next probe comes as
    /// soon as after a success, with the same step.
    Inconclusive,
    /// The estimator read the queue growing on packets sent before the
    /// probe began: the media alone fills the link, the padding stops, but
    /// the probe showed nothing about its rate. Not a failure: the back-off
    /// does not grow, the next probe may come [`BACKOFF_MIN`] later (seen:
    /// a probe that ended 82 ms after it began, counted as failed, pushed
    /// the back-off to 10 s just as a cap lifted; the climb back took
    /// 19.98 s).
    Interrupted,
}

impl ProbeEvent {
    /// Its `outcome` label in `switchboard_layers_probes_total`.
    pub fn label(self) -> &'static str {
        match self {
            ProbeEvent::Started { .. } => "started",
            ProbeEvent::Succeeded => "succeeded",
            ProbeEvent::Failed => "failed",
            ProbeEvent::Inconclusive => "inconclusive",
            ProbeEvent::Interrupted => "interrupted",
        }
    }
}

/// What a connection's congestion feedback says, read at each padding
/// tick ([`Prober::on_feedback`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Feedback {
    /// The estimate (bit/s), if any.
    pub estimate: Option<u64>,
    /// Whether the estimator reads the queue growing, and if so since the
    /// departure of which packets.
    pub overuse: Option<Instant>,
    /// The far end's running totals: packets reported on, and lost.
    pub reported: u64,
    pub lost: u64,
}

#[derive(Debug, Clone, Copy)]
struct Probe {
    started: Instant,
    until: Instant,
    /// The rate it tests: the media sent to the connection while it runs
    /// ([`Prober::sent`]) plus the padding, which fills what the media
    /// leaves up to it.
    rate: u64,
    /// Media bytes sent since the last padding tick.
    media: u64,
    /// What it started from (the estimate, or less: see
    /// [`Prober::on_round_tested`]), and the estimate itself.
    start_estimate: u64,
    start_real: u64,
    /// The far end's running totals (reported, lost) at the start of the
    /// stretch being judged (see [`Prober::on_feedback`]).
    loss_base: Option<(u64, u64)>,
    /// Whether every stretch judged so far was clean ([`LOSS_CLEAN`]),
    /// and whether any was judged.
    clean: bool,
    judged: bool,
}

/// The prober of one connection.
#[derive(Debug)]
pub struct Prober {
    probe: Option<Probe>,
    next_allowed: Option<Instant>,
    backoff: Duration,
    /// The next probe's multiple of the estimate.
    step: f64,
    /// Padding bytes owed (fractions carried between ticks; below zero
    /// while the media sent more than the probe's rate).
    owed: f64,
    /// What the last tick released.
    last_due: usize,
    last_tick: Option<Instant>,
    /// The estimate at the last round, and when it last fell.
    last_estimate: Option<u64>,
    last_fall: Option<Instant>,
    /// Padding bytes due and sent during the current probe, and those of
    /// the last one that ended ([`Prober::padding_of_last`]).
    padding: Padding,
    last_padding: Padding,
    /// The last probe that ended failed: no layer goes up during its
    /// back-off ([`Prober::holds_rises`]).
    failed_last: bool,
}

/// Padding bytes a probe owed and what the driver sent of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Padding {
    pub due: u64,
    pub sent: u64,
}

impl Default for Prober {
    fn default() -> Self {
        Prober {
            probe: None,
            next_allowed: None,
            backoff: BACKOFF_MIN,
            step: STEP,
            owed: 0.0,
            last_due: 0,
            last_tick: None,
            last_estimate: None,
            last_fall: None,
            padding: Padding::default(),
            last_padding: Padding::default(),
            failed_last: false,
        }
    }
}

impl Prober {
    pub fn new() -> Self {
        Prober::default()
    }

    /// Whether padding is being sent.
    pub fn active(&self) -> bool {
        self.probe.is_some()
    }

    /// After each allocation round: `estimate` (None without feedback) and
    /// the round's totals. Starts, ends or aborts a probe.
    pub fn on_round(
        &mut self,
        now: Instant,
        estimate: Option<u64>,
        summary: &Summary,
    ) -> Option<ProbeEvent> {
        self.on_round_tested(now, estimate, None, false, summary)
    }

    /// The first half of a round, before the allocation: notes a fall of
    /// `estimate` and ends a probe that ran its time (or whose estimate
    /// fell), judged by the lower of `estimate` and `tested` (see
    /// [`Prober::on_round_tested`]). Called before the layers are chosen,
    /// a success lets them rise in the same round, not half a second
    /// later; [`Prober::on_round_tested`] calls it too.
    pub fn end_round(
        &mut self,
        now: Instant,
        estimate: Option<u64>,
        tested: Option<u64>,
    ) -> Option<ProbeEvent> {
        let Some(real) = estimate else {
            self.probe = None;
            return None;
        };
        let estimate = tested.map_or(real, |t| real.min(t));
        if self
            .last_estimate
            .replace(real)
            .is_some_and(|last| (real as f64) < last as f64 * FALL)
        {
            self.last_fall = Some(now);
            // Congestion starts the steps again, as a failed probe does: a
            // link that just filled is not tested at three times its
            // estimate (seen: steps grown to 3 before a 600 kbit/s cap,
            // the first probe under it padded 1.3 Mbit/s and froze the
            // picture for 3.6 s).
            self.step = STEP;
        }
        let p = self.probe?;
        let fell = (real as f64) < p.start_real as f64 * ABORT_DROP;
        if !fell && now < p.until {
            return None;
        }
        let start = p.start_estimate as f64;
        let rose = estimate as f64 >= start + (p.rate as f64 - start) * SUCCESS_SHARE;
        let outcome = if rose && !fell {
            ProbeEvent::Succeeded
        } else if !fell && p.judged && p.clean {
            ProbeEvent::Inconclusive
        } else {
            ProbeEvent::Failed
        };
        // Only a probe that tested more than the estimate already claimed
        // is evidence for a larger step.
        Some(self.end(now, outcome, p.rate > p.start_real))
    }

    /// [`Prober::on_round`] where the allocator raises nothing past
    /// `tested` (what the link was seen to carry): a probe then starts
    /// from, pads above and is judged by the lower of the two. Congestion
    /// (the estimate falling) is still read from `estimate` alone: `tested`
    /// also falls when an old peak is forgotten. No probe starts while
    /// the estimator reads the queue growing (`overusing`): it would end
    /// at its first tick and cost a back-off (seen: a probe that lasted
    /// 4 ms, and the next came 10 s later, after the cap had lifted).
    pub fn on_round_tested(
        &mut self,
        now: Instant,
        estimate: Option<u64>,
        tested: Option<u64>,
        overusing: bool,
        summary: &Summary,
    ) -> Option<ProbeEvent> {
        if let Some(ended) = self.end_round(now, estimate, tested) {
            return Some(ended);
        }
        let (Some(real), None) = (estimate, self.probe) else {
            return None;
        };
        let estimate = tested.map_or(real, |t| real.min(t));
        if summary.deficit < MIN_DEFICIT
            || overusing
            || self.next_allowed.is_some_and(|t| now < t)
            || self
                .last_fall
                .is_some_and(|t| now.saturating_duration_since(t) < QUIET)
        {
            return None;
        }
        let goal = ((summary.allocated + summary.deficit) as f64 / UP_HEADROOM) as u64;
        if estimate >= goal {
            // The estimate already allows it (a hold keeps the layers down).
            return None;
        }
        let sent = summary.allocated;
        let step = ((estimate as f64 * self.step) as u64).max(estimate + MIN_STEP);
        let goal = (goal as f64 * PAST_GOAL) as u64;
        let pad_bps = step.min(goal).saturating_sub(sent).min(PAD_MAX);
        if pad_bps == 0 || sent + pad_bps <= estimate {
            // Nothing above the estimate to test (the padding is capped).
            return None;
        }
        self.probe = Some(Probe {
            started: now,
            until: now + PROBE_TIME,
            rate: sent + pad_bps,
            media: 0,
            start_estimate: estimate,
            start_real: real,
            loss_base: None,
            clean: true,
            judged: false,
        });
        self.owed = 0.0;
        self.last_tick = Some(now);
        Some(ProbeEvent::Started { pad_bps })
    }

    /// At each padding tick, what the connection's feedback says: ends
    /// the probe as failed at the first sign that the padding is filling
    /// a queue (the estimator reads overuse, or the estimate fell: read
    /// each tick, not at the next allocation round up to half a second
    /// later), or when more than [`LOSS_ABORT`] of a stretch of at least
    /// [`LOSS_ABORT_MIN`] packets reported were lost. Stretches follow
    /// each other (the first starts at the probe's first reading), so the
    /// loss that begins once a queue is full is not diluted by the clean
    /// start of the probe. Overuse read on packets sent before the probe
    /// began ends it as [`ProbeEvent::Interrupted`]: the queue was growing
    /// without its padding.
    pub fn on_feedback(&mut self, now: Instant, f: Feedback) -> Option<ProbeEvent> {
        let Probe {
            start_real,
            started,
            ..
        } = self.probe?;
        let fell = f
            .estimate
            .is_some_and(|r| (r as f64) < start_real as f64 * ABORT_DROP);
        if fell || f.overuse.is_some() {
            let outcome = if f.overuse.is_some_and(|since| since < started) {
                ProbeEvent::Interrupted
            } else {
                ProbeEvent::Failed
            };
            return Some(self.end(now, outcome, false));
        }
        let (reported, lost) = (f.reported, f.lost);
        let p = self.probe.as_mut()?;
        let (r0, l0) = *p.loss_base.get_or_insert((reported, lost));
        let (seen, gone) = (reported.saturating_sub(r0), lost.saturating_sub(l0));
        if seen < LOSS_ABORT_MIN {
            return None;
        }
        if gone as f64 > seen as f64 * LOSS_ABORT {
            return Some(self.end(now, ProbeEvent::Failed, false));
        }
        p.judged = true;
        p.clean &= gone as f64 <= seen as f64 * LOSS_CLEAN;
        p.loss_base = Some((reported, lost));
        None
    }

    /// Ends the probe with `outcome` (succeeded, failed or inconclusive);
    /// a success that tested `beyond` the estimate at its start makes the
    /// next step larger.
    fn end(&mut self, now: Instant, outcome: ProbeEvent, beyond: bool) -> ProbeEvent {
        self.probe = None;
        self.last_padding = std::mem::take(&mut self.padding);
        self.owed = 0.0;
        match outcome {
            ProbeEvent::Succeeded => {
                self.failed_last = false;
                self.backoff = BACKOFF_MIN;
                self.next_allowed = Some(now + AFTER_SUCCESS);
                if beyond {
                    self.step = (self.step * STEP_GROWTH).min(STEP_MAX);
                }
            }
            ProbeEvent::Inconclusive => self.next_allowed = Some(now + AFTER_SUCCESS),
            ProbeEvent::Interrupted => {
                self.failed_last = false;
                self.next_allowed = Some(now + BACKOFF_MIN);
                self.step = STEP;
            }
            ProbeEvent::Failed | ProbeEvent::Started { .. } => {
                self.failed_last = true;
                self.next_allowed = Some(now + self.backoff);
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                self.step = STEP;
            }
        }
        outcome
    }

    /// Padding bytes due by `now` (0 when not probing).
    pub fn padding_due(&mut self, now: Instant) -> usize {
        self.accrue(now);
        let due = self.owed.floor().max(0.0);
        self.owed -= due;
        self.padding.due += due as u64;
        self.last_due = due as usize;
        due as usize
    }

    /// Adds what the probe's rate would send since the last tick (at most
    /// 5 ticks: a late tick does not release a burst), less the media
    /// sent meanwhile, to what is owed; at most [`PAD_MAX`] over that
    /// time is owed, and media above the rate (a keyframe) holds the
    /// padding back for at most [`TICK`] times 25. Padding a planned rate
    /// over the media's planned cost instead, a probe sent less than it
    /// claimed whenever the encoders sent below their layers' cost.
    fn accrue(&mut self, now: Instant) {
        let Some(p) = self.probe.as_mut() else {
            return;
        };
        let since = self
            .last_tick
            .map_or(TICK, |t| now.saturating_duration_since(t))
            .min(TICK * 5);
        self.last_tick = Some(now);
        let per_second = p.rate as f64 / 8.0;
        let media = std::mem::take(&mut p.media) as f64;
        let most = PAD_MAX as f64 / 8.0 * since.as_secs_f64();
        let least = -per_second * (TICK * 25).as_secs_f64();
        self.owed = (self.owed + per_second * since.as_secs_f64() - media).clamp(least, most);
    }

    /// Media bytes (RTP header and payload) the driver sent to the
    /// connection: while a probe runs, its padding fills only what they
    /// leave of its rate.
    pub fn sent(&mut self, bytes: usize) {
        if let Some(p) = self.probe.as_mut() {
            p.media += bytes as u64;
        }
    }

    /// Whether the allocator must raise nothing at `now`: a probe is
    /// padding, or the last one failed and its back-off has not run out.
    /// A failed probe showed the link does not carry more than it carries
    /// now, whatever the estimate says after it (seen under a 600 kbit/s
    /// cap: the estimate crept to 778 kbit/s while a probe failed, a 360p
    /// layer went up 1.1 s later, and the picture froze for 4 s). Held
    /// until a later probe succeeded, a link freed at the end of a cap
    /// waited the back-off and then every probe step: the climb back took
    /// over 20 s in 3 of 10 runs.
    pub fn holds_rises(&self, now: Instant) -> bool {
        self.probe.is_some() || (self.failed_last && self.next_allowed.is_some_and(|t| now < t))
    }

    /// Padding bytes the driver sent for the probe.
    pub fn padded(&mut self, bytes: usize) {
        if self.probe.is_some() {
            self.padding.sent += bytes as u64;
            // Whole packets ran past what was due: the excess is taken
            // from what comes next.
            self.owed -= bytes.saturating_sub(self.last_due) as f64;
        }
    }

    /// What the last probe that ended owed and sent (for its log line: a
    /// probe that sent less than planned tested less than it claims).
    pub fn padding_of_last(&self) -> Padding {
        self.last_padding
    }

    /// Bytes the driver could not send (no packet to repeat): not owed
    /// later, so a stalled probe does not burst.
    pub fn forgive(&mut self) {
        self.owed = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn losses(reported: u64, lost: u64) -> Feedback {
        Feedback {
            reported,
            lost,
            ..Feedback::default()
        }
    }

    /// A prober whose probe started at `t0` from a 690 kbit/s estimate
    /// over 330 kbit/s of media, and the summary it started from.
    fn probing(t0: Instant) -> (Prober, Summary) {
        let mut p = Prober::new();
        let s = summary(330_000, 3_000_000);
        assert!(matches!(
            p.on_round(t0, Some(690_000), &s),
            Some(ProbeEvent::Started { .. })
        ));
        (p, s)
    }

    fn summary(allocated: u64, deficit: u64) -> Summary {
        Summary {
            allocated,
            wanted: allocated + deficit,
            deficit,
            paused_for_bandwidth: 0,
        }
    }

    #[test]
    fn no_probe_soon_after_the_estimate_fell() {
        let (mut p, t0) = (Prober::new(), Instant::now());
        let s = summary(300_000, 1_000_000);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Congestion: the estimate fell. Nothing for 5 s after.
        p.backoff = BACKOFF_MIN;
        p.next_allowed = Some(at(0));
        assert_eq!(p.last_fall, None);
        p.last_estimate = Some(800_000);
        assert_eq!(p.on_round(at(0), Some(500_000), &s), None);
        assert_eq!(p.on_round(at(4900), Some(520_000), &s), None);
        assert!(matches!(
            p.on_round(at(5000), Some(540_000), &s),
            Some(ProbeEvent::Started { .. })
        ));
    }

    #[test]
    fn no_feedback_or_no_deficit_no_probe() {
        let (mut p, t0) = (Prober::new(), Instant::now());
        assert_eq!(p.on_round(t0, None, &summary(300_000, 2_000_000)), None);
        assert_eq!(
            p.on_round(t0, Some(500_000), &summary(300_000, 50_000)),
            None
        );
        // The estimate already covers the wishes: the allocator's hold is
        // what keeps the layers down, not the link.
        assert_eq!(
            p.on_round(t0, Some(4_000_000), &summary(300_000, 2_000_000)),
            None
        );
        assert!(!p.active());
        assert_eq!(p.padding_due(t0 + TICK), 0);
    }

    #[test]
    fn pads_up_to_half_again_the_estimate_within_the_goal() {
        let (mut p, t0) = (Prober::new(), Instant::now());
        // Wants 1.3 Mbit/s more over 700 kbit/s sent: the goal is
        // 2.0 / 0.85 = 2.35 Mbit/s; one step tests 1.5 x 900 kbit/s.
        let e = p.on_round(t0, Some(900_000), &summary(700_000, 1_300_000));
        assert_eq!(e, Some(ProbeEvent::Started { pad_bps: 650_000 }));
        // A small goal (450 / 0.85 = 529 kbit/s) pads only up to a tenth
        // past it.
        let mut q = Prober::new();
        let e = q.on_round(t0, Some(400_000), &summary(300_000, 150_000));
        assert_eq!(e, Some(ProbeEvent::Started { pad_bps: 282_352 }));
        // A connection sending far less than its estimate (its next layer
        // does not fit): the padding lifts what is sent above the
        // estimate, or the probe could not raise it (seen after a cap
        // lifted: 278 kbit/s sent, 737 kbit/s estimated, 500 kbit/s of
        // padding, every probe failed on a free link).
        let mut r = Prober::new();
        let e = r.on_round(t0, Some(736_000), &summary(278_000, 2_662_000));
        assert_eq!(e, Some(ProbeEvent::Started { pad_bps: 826_000 }));
        // At least MIN_STEP above a small estimate.
        let mut r = Prober::new();
        let e = r.on_round(t0, Some(200_000), &summary(150_000, 500_000));
        assert_eq!(e, Some(ProbeEvent::Started { pad_bps: 250_000 }));
        // The media sends its 700 kbit/s (1,750 bytes a tick): the padding
        // fills the rest of 1.35 Mbit/s, 650 kbit/s for 1 s, released in
        // ticks: 81,250 bytes.
        let mut bytes = 0;
        for i in 1..=50 {
            p.sent(1_750);
            bytes += p.padding_due(t0 + TICK * i);
        }
        assert!((81_150..=81_250).contains(&bytes), "{bytes}");
        // A late tick is owed at most 5 ticks' worth (of the whole rate: no
        // media came either).
        let t = t0 + Duration::from_secs(3);
        assert_eq!(p.padding_due(t), 16_875);
        // Then a tick's worth again (1,625 bytes).
        p.sent(1_750);
        assert_eq!(p.padding_due(t + TICK), 1_625);
    }

    #[test]
    fn the_padding_fills_what_the_media_leaves_of_the_rate() {
        let (mut p, t0) = (Prober::new(), Instant::now());
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Tests 1.35 Mbit/s over 700 kbit/s allocated (3,375 bytes a tick).
        let e = p.on_round(at(0), Some(900_000), &summary(700_000, 1_300_000));
        assert_eq!(e, Some(ProbeEvent::Started { pad_bps: 650_000 }));
        // The encoders send half their layers' cost: the padding makes up
        // the difference, and the probe still sends 1.35 Mbit/s.
        p.sent(875);
        assert_eq!(p.padding_due(at(20)), 2_500);
        // A keyframe: 9,000 bytes in one tick, 5,625 past the rate. No
        // padding until the rate has caught up with it (two ticks).
        p.sent(9_000);
        assert_eq!(p.padding_due(at(40)), 0);
        assert_eq!(p.padding_due(at(60)), 0);
        assert_eq!(p.padding_due(at(80)), 1_125);
        // Whole packets ran past what was due: the next tick owes less.
        p.padded(2_000);
        assert_eq!(p.padding_due(at(100)), 2_500);
        // Media far above the rate holds the padding back for at most half
        // a second, not for as long as it lasted.
        p.sent(1_000_000);
        assert_eq!(p.padding_due(at(120)), 0);
        let released: usize = (7..=31).map(|i| p.padding_due(at(i * 20))).sum();
        assert_eq!(released, 0, "within half a second of the burst");
        assert!(p.padding_due(at(640)) + p.padding_due(at(660)) > 0);
    }

    #[test]
    fn success_allows_the_next_soon_failure_backs_off() {
        let (mut p, t0) = (Prober::new(), Instant::now());
        let s = summary(700_000, 1_300_000);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Tests 1.35 Mbit/s from 900 kbit/s: success needs the estimate
        // half way there, at 1.125 Mbit/s.
        assert!(p.on_round(at(0), Some(900_000), &s).is_some());
        // Mid-probe: nothing changes.
        assert_eq!(p.on_round(at(500), Some(1_000_000), &s), None);
        assert_eq!(
            p.on_round(at(1500), Some(1_300_000), &s),
            Some(ProbeEvent::Succeeded)
        );
        assert!(!p.active());
        assert_eq!(p.on_round(at(1900), Some(1_300_000), &s), None);
        assert!(matches!(
            p.on_round(at(2000), Some(1_300_000), &s),
            Some(ProbeEvent::Started { .. })
        ));
        // Tests 2.25 times 1.3 Mbit/s after a success, within the goal
        // (2.35 Mbit/s): crept up 15 %, not half way: failed, 3 s before
        // the next.
        assert_eq!(
            p.on_round(at(3500), Some(1_500_000), &s),
            Some(ProbeEvent::Failed)
        );
        assert_eq!(p.on_round(at(6400), Some(1_500_000), &s), None);
        assert!(p.on_round(at(6500), Some(1_500_000), &s).is_some());
        // The estimate falls mid-probe: aborted at once, 6 s this time.
        assert_eq!(
            p.on_round(at(7000), Some(900_000), &s),
            Some(ProbeEvent::Failed)
        );
        assert_eq!(p.padding_due(at(7020)), 0);
        assert_eq!(p.on_round(at(12_900), Some(900_000), &s), None);
        assert!(p.on_round(at(13_000), Some(900_000), &s).is_some());
        // A success resets the backoff.
        assert_eq!(
            p.on_round(at(14_500), Some(1_300_000), &s),
            Some(ProbeEvent::Succeeded)
        );
        assert!(p.on_round(at(15_000), Some(1_300_000), &s).is_some());
        assert_eq!(
            p.on_round(at(16_500), Some(1_300_000), &s),
            Some(ProbeEvent::Failed)
        );
        assert_eq!(p.on_round(at(19_400), Some(1_300_000), &s), None);
        assert!(p.on_round(at(19_500), Some(1_300_000), &s).is_some());
    }

    #[test]
    fn steps_grow_with_successes_in_a_row_and_a_failure_starts_again() {
        let (mut p, t0) = (Prober::new(), Instant::now());
        // A freed link: the wishes want 6 Mbit/s, 100 kbit/s is sent.
        let s = summary(100_000, 5_900_000);
        let mut t = t0;
        let mut rates = Vec::new();
        let mut estimate = 400_000u64;
        for outcome in [true, false, true, true] {
            let Some(ProbeEvent::Started { pad_bps }) = p.on_round(t, Some(estimate), &s) else {
                panic!("no probe at {estimate}");
            };
            rates.push((100_000 + pad_bps) as f64 / estimate as f64);
            t += PROBE_TIME;
            estimate = if outcome { 100_000 + pad_bps } else { estimate };
            let event = p.on_round(t, Some(estimate), &s);
            assert_eq!(
                event,
                Some(if outcome {
                    ProbeEvent::Succeeded
                } else {
                    ProbeEvent::Failed
                })
            );
            t += BACKOFF_MIN;
        }
        let rounded: Vec<f64> = rates.iter().map(|r| (r * 100.0).round() / 100.0).collect();
        assert_eq!(rounded, [1.5, 2.25, 1.5, 2.25]);
    }

    #[test]
    fn steps_stop_growing_at_the_most() {
        let (mut p, t0) = (Prober::new(), Instant::now());
        let s = summary(100_000, 5_900_000);
        let mut t = t0;
        let mut rates = Vec::new();
        // Each probe from 400 kbit/s (what the link was seen to carry; the
        // estimate itself never falls, so nothing starts the steps again),
        // each a success.
        let mut high = 400_000;
        for _ in 0..5 {
            let Some(ProbeEvent::Started { pad_bps }) =
                p.on_round_tested(t, Some(high), Some(400_000), false, &s)
            else {
                panic!("no probe at {t:?}");
            };
            rates.push((100_000 + pad_bps) as f64 / 400_000.0);
            t += PROBE_TIME;
            let reached = 100_000 + pad_bps;
            high = high.max(reached);
            assert_eq!(
                p.on_round_tested(t, Some(high), Some(reached), false, &s),
                Some(ProbeEvent::Succeeded)
            );
            t += AFTER_SUCCESS;
        }
        let rounded: Vec<f64> = rates
            .iter()
            .map(|r| (r * 1000.0).round() / 1000.0)
            .collect();
        assert_eq!(rounded, [1.5, 2.25, STEP_MAX, STEP_MAX, STEP_MAX]);
    }

    #[test]
    fn a_fall_of_the_estimate_starts_the_steps_again() {
        let (mut p, t0) = (Prober::new(), Instant::now());
        let s = summary(100_000, 5_900_000);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Two successes, each raising the estimate to the rate it tested:
        // the next step would be 3 times.
        for (start, end, from, to) in [
            (0, 1_500, 400_000, 600_000),
            (2_000, 3_500, 600_000, 1_350_000),
        ] {
            let Some(ProbeEvent::Started { pad_bps }) = p.on_round(at(start), Some(from), &s)
            else {
                panic!("no probe at {start} ms");
            };
            assert_eq!(100_000 + pad_bps, to);
            assert_eq!(
                p.on_round(at(end), Some(to), &s),
                Some(ProbeEvent::Succeeded)
            );
        }
        assert_eq!(p.step, STEP_MAX);
        // The link filled (a cap came): the estimate fell.
        assert_eq!(p.on_round(at(4_000), Some(500_000), &s), None);
        let later = at(4_000) + QUIET;
        let Some(ProbeEvent::Started { pad_bps }) = p.on_round(later, Some(500_000), &s) else {
            panic!("no probe after the quiet time");
        };
        // 1.5 times 500 kbit/s, not 3 times.
        assert_eq!(100_000 + pad_bps, 750_000);
    }

    #[test]
    fn a_success_that_tested_less_than_the_estimate_does_not_grow_the_steps() {
        // Under a 600 kbit/s cap: 329 kbit/s of media arrives, the estimate
        // (663 kbit/s) climbed on trust above what arrived (373 kbit/s).
        let (mut p, t0) = (Prober::new(), Instant::now());
        let s = summary(329_000, 2_858_000);
        let Some(ProbeEvent::Started { pad_bps }) =
            p.on_round_tested(t0, Some(663_000), Some(373_000), false, &s)
        else {
            panic!("no probe");
        };
        assert_eq!(329_000 + pad_bps, 573_000, "200 kbit/s above what arrived");
        // It got through: a success, but it tested less than the estimate
        // claimed, so it says nothing about more room.
        let end = t0 + PROBE_TIME;
        assert_eq!(
            p.on_round_tested(end, Some(700_000), Some(560_000), false, &s),
            Some(ProbeEvent::Succeeded)
        );
        assert_eq!(p.step, STEP);
        // The next tests 1.5 times what arrived (840 kbit/s), not 2.25
        // times (1.26 Mbit/s: seen padding 1.1 Mbit/s into the cap, a 3.5-s
        // freeze).
        let Some(ProbeEvent::Started { pad_bps }) =
            p.on_round_tested(end + AFTER_SUCCESS, Some(700_000), Some(560_000), false, &s)
        else {
            panic!("no second probe");
        };
        assert_eq!(329_000 + pad_bps, 840_000);
    }

    #[test]
    fn a_clean_probe_that_did_not_raise_the_estimate_is_inconclusive_not_failed() {
        let (mut p, t0) = (Prober::new(), Instant::now());
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let s = summary(2_600_000, 1_500_000);
        assert!(p.on_round(at(0), Some(2_600_000), &s).is_some());
        assert_eq!(p.step, STEP);
        // Every stretch clean (1 of 100 lost).
        assert_eq!(p.on_feedback(at(20), losses(1_000, 10)), None);
        assert_eq!(p.on_feedback(at(500), losses(1_100, 11)), None);
        assert_eq!(p.on_feedback(at(1_000), losses(1_200, 12)), None);
        // The estimate rose from 2.6 to 2.7 Mbit/s, not half way to the
        // 3.9 Mbit/s tested: inconclusive, and the next comes at once.
        let end = at(0) + PROBE_TIME;
        assert_eq!(
            p.on_round(end, Some(2_700_000), &s),
            Some(ProbeEvent::Inconclusive)
        );
        assert!(!p.active());
        assert_eq!(p.backoff, BACKOFF_MIN);
        assert!(p
            .on_round(end + AFTER_SUCCESS, Some(2_700_000), &s)
            .is_some());

        // The same with a stretch that lost 5 %: a failure, with back-off.
        let mut q = Prober::new();
        assert!(q.on_round(at(0), Some(2_600_000), &s).is_some());
        assert_eq!(q.on_feedback(at(20), losses(1_000, 10)), None);
        assert_eq!(q.on_feedback(at(500), losses(1_100, 15)), None);
        assert_eq!(
            q.on_round(end, Some(2_700_000), &s),
            Some(ProbeEvent::Failed)
        );
        assert_eq!(q.on_round(end + AFTER_SUCCESS, Some(2_700_000), &s), None);
        // And with no loss report at all (nothing judged): a failure.
        let mut r = Prober::new();
        assert!(r.on_round(at(0), Some(2_600_000), &s).is_some());
        assert_eq!(
            r.on_round(end, Some(2_700_000), &s),
            Some(ProbeEvent::Failed)
        );
    }

    #[test]
    fn a_probe_that_would_test_nothing_does_not_start() {
        // 300 kbit/s sent and 3.3 Mbit/s estimated: the most padding
        // (PAD_MAX, 3 Mbit/s) brings what is sent only to the estimate.
        let (mut p, t0) = (Prober::new(), Instant::now());
        assert_eq!(
            p.on_round(t0, Some(3_300_000), &summary(300_000, 5_700_000)),
            None
        );
        assert!(!p.active());
    }

    #[test]
    fn failures_back_off_to_ten_seconds_at_most() {
        let (mut p, t0) = (Prober::new(), Instant::now());
        let s = summary(300_000, 1_000_000);
        let mut t = t0;
        let mut waits = Vec::new();
        for _ in 0..5 {
            // The next probe starts at the first 100 ms round allowed.
            let mut start = t;
            while p.on_round(start, Some(500_000), &s).is_none() {
                start += Duration::from_millis(100);
                assert!(start < t + Duration::from_secs(60), "no probe");
            }
            waits.push((start - t).as_secs());
            t = start + PROBE_TIME;
            assert_eq!(p.on_round(t, Some(500_000), &s), Some(ProbeEvent::Failed));
        }
        assert_eq!(waits, [0, 3, 6, 10, 10]);
    }

    #[test]
    fn with_a_tested_rate_below_the_estimate_the_probe_tests_above_it() {
        let (mut p, t0) = (Prober::new(), Instant::now());
        let s = summary(400_000, 2_000_000);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // The estimate climbed to 2 Mbit/s on trust; the link was seen to
        // carry 600 kbit/s: the probe tests 900 kbit/s.
        let e = p.on_round_tested(at(0), Some(2_000_000), Some(600_000), false, &s);
        assert_eq!(e, Some(ProbeEvent::Started { pad_bps: 500_000 }));
        // The padding arrived: what was carried rose past half way.
        assert_eq!(
            p.on_round_tested(at(1500), Some(2_000_000), Some(880_000), false, &s),
            Some(ProbeEvent::Succeeded)
        );
        // An old peak forgotten (the tested rate falls) is no congestion:
        // the next probe follows without the 5 s quiet time.
        assert!(p
            .on_round_tested(at(2000), Some(2_000_000), Some(500_000), false, &s)
            .is_some());
        // The estimate itself falling mid-probe aborts it.
        assert_eq!(
            p.on_round_tested(at(2500), Some(1_500_000), Some(500_000), false, &s),
            Some(ProbeEvent::Failed)
        );
    }

    #[test]
    fn a_probe_whose_packets_are_lost_ends_at_once_and_backs_off() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let (mut p, s) = probing(t0);
        // The first reading is the start: earlier losses do not count.
        assert_eq!(p.on_feedback(at(20), losses(5_000, 900)), None);
        // Too few reported to judge, though most of them were lost.
        assert_eq!(p.on_feedback(at(40), losses(5_020, 915)), None);
        assert!(p.active());

        let mut p = Prober::new();
        assert!(p.on_round(at(0), Some(690_000), &s).is_some());
        assert_eq!(p.on_feedback(at(20), losses(5_000, 900)), None);
        // 3 of 100 lost: clean; the next stretch starts here.
        assert_eq!(p.on_feedback(at(200), losses(5_100, 903)), None);
        assert_eq!(
            p.on_feedback(at(220), losses(5_120, 905)),
            None,
            "too few yet"
        );
        // 3 of 40 lost (7.5 %): a lossy link, not a full one.
        assert_eq!(p.on_feedback(at(240), losses(5_140, 906)), None);
        assert!(p.active());
        // The queue is full: 5 of the next 40 lost (12.5 %; 11 of 180
        // since the start, 6.1 %, would not have told). The probe ends
        // now, not at its 1.5 s, and the next waits the back-off.
        assert_eq!(
            p.on_feedback(at(260), losses(5_180, 911)),
            Some(ProbeEvent::Failed)
        );
        assert!(!p.active());
        assert_eq!(p.padding_due(at(280)), 0);
        assert_eq!(
            p.on_feedback(at(280), losses(6_000, 2_000)),
            None,
            "no probe, nothing to end"
        );
        assert_eq!(p.on_round(at(500), Some(690_000), &s), None);
        assert!(matches!(
            p.on_round(at(260) + BACKOFF_MIN, Some(690_000), &s),
            Some(ProbeEvent::Started { .. })
        ));
        assert_eq!(p.step, STEP, "a failure starts the steps again");
    }

    #[test]
    fn the_estimate_falling_ends_a_probe_at_the_next_tick() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let (mut p, s) = probing(t0);
        assert_eq!(
            p.on_feedback(
                at(20),
                Feedback {
                    estimate: Some(690_000),
                    ..losses(5_000, 0)
                }
            ),
            None
        );
        // Less than ABORT_DROP below: the estimate wobbles, the probe goes on.
        assert_eq!(
            p.on_feedback(
                at(40),
                Feedback {
                    estimate: Some(650_000),
                    ..losses(5_000, 0)
                }
            ),
            None
        );
        assert!(p.active());
        // The padding filled a queue: the estimate backed off. The probe
        // ends at this tick, not at the next allocation round.
        assert_eq!(
            p.on_feedback(
                at(60),
                Feedback {
                    estimate: Some(600_000),
                    ..losses(5_000, 0)
                }
            ),
            Some(ProbeEvent::Failed)
        );
        assert!(!p.active());
        assert_eq!(p.padding_due(at(80)), 0);
        assert_eq!(p.step, STEP);
        // The next waits the back-off.
        assert_eq!(p.on_round(at(500), Some(690_000), &s), None);
    }

    #[test]
    fn overuse_ends_a_probe_at_the_next_tick() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let (mut p, _) = probing(t0);
        assert_eq!(p.on_feedback(at(20), losses(5_000, 0)), None);
        // The queue grows: the estimate has not moved yet, nothing is lost.
        let growing = Feedback {
            estimate: Some(690_000),
            overuse: Some(at(10)),
            ..losses(5_010, 0)
        };
        assert_eq!(p.on_feedback(at(40), growing), Some(ProbeEvent::Failed));
        assert!(!p.active());
    }

    #[test]
    fn overuse_that_began_before_the_probe_interrupts_it_without_a_longer_back_off() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let s = summary(330_000, 3_000_000);
        // A probe failed: the back-off is now 6 s.
        let (mut p, _) = probing(t0);
        let own = Feedback {
            overuse: Some(at(10)),
            ..losses(5_000, 0)
        };
        assert_eq!(p.on_feedback(at(40), own), Some(ProbeEvent::Failed));
        assert_eq!(p.backoff, BACKOFF_MIN * 2);
        let t1 = at(40) + BACKOFF_MIN;
        assert!(matches!(
            p.on_round(t1, Some(690_000), &s),
            Some(ProbeEvent::Started { .. })
        ));
        // 80 ms in, overuse is read on packets sent 60 ms before the probe
        // began: the padding stops, the probe is not counted as failed.
        let before = Feedback {
            overuse: Some(t1 - Duration::from_millis(60)),
            ..losses(5_100, 0)
        };
        let t2 = t1 + Duration::from_millis(80);
        assert_eq!(p.on_feedback(t2, before), Some(ProbeEvent::Interrupted));
        assert!(!p.active());
        assert_eq!(p.padding_due(t2 + TICK), 0);
        // The back-off did not grow, and nothing holds the layers.
        assert_eq!(p.backoff, BACKOFF_MIN * 2);
        assert!(!p.holds_rises(t2 + TICK));
        assert_eq!(p.step, STEP);
        // The next probe may come BACKOFF_MIN later, not 6 s.
        let almost = t2 + BACKOFF_MIN - Duration::from_millis(1);
        assert_eq!(p.on_round(almost, Some(690_000), &s), None);
        assert!(matches!(
            p.on_round(t2 + BACKOFF_MIN, Some(690_000), &s),
            Some(ProbeEvent::Started { .. })
        ));
        // The estimate falling for that earlier queue is no failure of the
        // probe either; falling with no overuse read (loss) is.
        let t3 = t2 + BACKOFF_MIN + Duration::from_millis(40);
        let fell = Feedback {
            estimate: Some(500_000),
            overuse: Some(t2),
            ..losses(5_200, 0)
        };
        assert_eq!(p.on_feedback(t3, fell), Some(ProbeEvent::Interrupted));
        let t4 = t3 + BACKOFF_MIN;
        assert!(p.on_round(t4, Some(690_000), &s).is_some());
        let fell_alone = Feedback {
            estimate: Some(500_000),
            ..losses(5_300, 0)
        };
        let t5 = t4 + Duration::from_millis(40);
        assert_eq!(p.on_feedback(t5, fell_alone), Some(ProbeEvent::Failed));
        assert_eq!(p.backoff, BACKOFF_MAX);
    }

    #[test]
    fn a_probe_keeps_what_it_owed_and_what_was_sent() {
        let (mut p, t0) = (Prober::new(), Instant::now());
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let s = summary(330_000, 3_000_000);
        let Some(ProbeEvent::Started { pad_bps }) = p.on_round(at(0), Some(690_000), &s) else {
            panic!("no probe");
        };
        // The media sends its 330 kbit/s (825 bytes a tick).
        let owed: usize = [20, 40, 60]
            .iter()
            .map(|&ms| {
                p.sent(825);
                p.padding_due(at(ms))
            })
            .sum();
        // 60 ms of padding at pad_bps, within a byte per tick.
        let expected = pad_bps as f64 / 8.0 * 0.06;
        assert!(
            (owed as f64 - expected).abs() <= 3.0,
            "{owed} vs {expected}"
        );
        p.padded(owed / 2);
        // No probe has ended yet.
        assert_eq!(p.padding_of_last(), Padding::default());
        let growing = Feedback {
            overuse: Some(at(50)),
            ..losses(5_000, 0)
        };
        assert_eq!(p.on_feedback(at(80), growing), Some(ProbeEvent::Failed));
        // Padding sent with no probe running is not counted.
        p.padded(1_000);
        assert_eq!(
            p.padding_of_last(),
            Padding {
                due: owed as u64,
                sent: (owed / 2) as u64
            }
        );
    }

    #[test]
    fn after_a_failed_probe_nothing_goes_up_during_its_back_off() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let (mut p, _) = probing(t0);
        assert!(p.holds_rises(at(20)), "while it pads");
        let growing = Feedback {
            overuse: Some(at(10)),
            ..losses(5_000, 0)
        };
        assert_eq!(p.on_feedback(at(40), growing), Some(ProbeEvent::Failed));
        assert!(p.holds_rises(at(1_200)), "1.2 s after it failed");
        assert!(p.holds_rises(at(40) + BACKOFF_MIN - Duration::from_millis(1)));
        // The back-off ran out: the estimate may raise layers again.
        assert!(!p.holds_rises(at(40) + BACKOFF_MIN));
        // A success clears it too.
        let mut q = Prober::new();
        let s = summary(330_000, 3_000_000);
        assert!(q.on_round(t0, Some(690_000), &s).is_some());
        assert_eq!(
            q.on_round(t0 + PROBE_TIME, Some(1_100_000), &s),
            Some(ProbeEvent::Succeeded)
        );
        assert!(!q.holds_rises(t0 + PROBE_TIME));
    }

    #[test]
    fn no_probe_starts_while_the_queue_grows() {
        let (mut p, t0) = (Prober::new(), Instant::now());
        let s = summary(330_000, 3_000_000);
        assert_eq!(p.on_round_tested(t0, Some(690_000), None, true, &s), None);
        assert!(!p.active());
        // The queue stopped growing: the probe starts, with no back-off.
        let next = t0 + Duration::from_millis(500);
        assert!(matches!(
            p.on_round_tested(next, Some(690_000), None, false, &s),
            Some(ProbeEvent::Started { .. })
        ));
    }
}
