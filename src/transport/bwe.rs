//! The downlink bandwidth estimate of one subscriber connection: send-side,
//! from the transport-wide congestion control (TWCC) feedback its browser
//! sends about what the server forwarded.
//!
//! rtc 0.21 carries the feedback to a [`BandwidthEstimator`] in its
//! congestion-control interceptor; this one is built from rtc's GCC parts
//! (arrival-group delay slope, Kalman filter, adaptive overuse threshold
//! compared, as in libwebrtc, with the gradient times the number of deltas,
//! and our own loss and rate control, because rtc's `Gcc` climbs
//! 8 % per second: from a 300 kbit/s start, 3 Mbit/s takes half a minute,
//! and a subscriber whose link was just freed would wait that long for
//! its high layers. Here:
//!
//! - **overuse** (queueing delay growing) or loss: back off to 85 % of what
//!   the far end received, and remember that rate as the ceiling;
//! - **normal**: at least what arrived (a probe's padding that got through
//!   without the queue growing raises the estimate at once);
//! - **normal**, far from a recent ceiling: climb 25 % per second, but never
//!   past twice what is being received plus [`HEADROOM`] (an estimate that
//!   nothing has tested is worth little: with an idle downlink it would
//!   grow without bound);
//! - **normal** near a ceiling learnt in the last [`CEILING_MEMORY`]: climb
//!   [`ADDITIVE`] per second, so a known limit is approached, not hit (a
//!   ceiling is forgotten once more than it arrives);
//! - **underuse** (queue draining): hold.
//!
//! The estimator runs inside the connection's interceptor chain; the
//! engine reads the result through a shared atomic ([`Estimate`]), once per
//! allocation round, so nothing is locked on the media path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::VecDeque;

use rtc::interceptor::{
    BandwidthEstimator, EstimatorStats, OveruseDetector, PacketReport, SlopeEstimator, Usage,
};

/// Where an estimate starts: enough for the lowest layers of a few
/// publishers, below any one 720p layer.
pub const INITIAL: f64 = 1_000_000.0;
pub const MIN: f64 = 100_000.0;
pub const MAX: f64 = 50_000_000.0;

/// The delay gradient is compared with the overuse threshold scaled by
/// the number of deltas it rests on, up to this many (libwebrtc's
/// `kMinNumDeltas`).
const MAX_DELTAS: u32 = 60;
/// The estimate backs off for overuse once the queue was read growing
/// for packets sent over this long (until then it holds). A queue behind
/// a real bottleneck keeps growing (a 1 Mbit/s probe into a 600 kbit/s
/// token bucket: half a second before its first drop); a receiver on a
/// busy machine that falls behind for a moment reads as overuse too, and
/// cut an unshaped viewer's estimate from 4.8 to 0.8 Mbit/s.
const OVERUSE_PERSIST: Duration = Duration::from_millis(250);
/// Multiplicative climb per second, far from a known ceiling.
const CLIMB_PER_SECOND: f64 = 1.25;
/// How far above 1.5 times the received rate the estimate may go untested.
/// Small: a higher layer is reached after a probe's padding got through
/// (the estimate is then what arrived), not by switching to it on trust.
/// A switch that does not fit costs a keyframe lost in the queue and a
/// frozen tile; a failed probe costs a few repaired packets. (It was
/// 400 kbit/s, room for a 360p layer on trust: under a 600 kbit/s cap the
/// estimate crept to ~1 Mbit/s and every such switch froze the picture.)
pub const HEADROOM: f64 = 150_000.0;
/// Loss above which the path is taken to be full (GCC's threshold): a
/// lossy but uncongested link (5 % random loss, which NACK repairs) is
/// left alone.
const LOSS_FULL: f64 = 0.10;
/// Loss under which a sample counts as clean (GCC uses 2 %; with samples
/// of 200 packets, a link losing 5 % at random would rarely show that, and
/// the limit would only ever ratchet down).
const LOSS_CLEAN: f64 = 0.05;
/// Loss is judged over this many reported packets.
const LOSS_SAMPLE: usize = 200;
/// Additive climb per second near a ceiling.
const ADDITIVE: f64 = 50_000.0;
/// How long a ceiling (the rate at the last back-off) is remembered.
const CEILING_MEMORY: Duration = Duration::from_secs(15);
/// A ceiling is forgotten once this much more than it arrived (the link
/// grew: a probe got through).
const CEILING_PASSED: f64 = 1.15;
/// Back-off: to this fraction of the received rate.
const BACK_OFF: f64 = 0.85;
/// At most one change per this interval (one is seen before the next).
const INTERVAL: Duration = Duration::from_millis(200);
/// At most one loss back-off per this interval (libwebrtc: 300 ms plus the
/// round trip): the loss of one congested moment is reported in several
/// samples, and each must not cut again.
const LOSS_CUT_INTERVAL: Duration = Duration::from_millis(300);

/// The engine's view of one connection's estimate and of the most it was
/// seen to carry lately (bit/s; 0 until the first feedback).
#[derive(Debug, Clone)]
pub struct Estimate {
    /// Indexed by the slots below.
    values: Arc<[AtomicU64; 6]>,
    /// What the overuse reading's time ([`Self::OVERUSE_AT`], in ms)
    /// counts from.
    epoch: Instant,
}

impl Default for Estimate {
    fn default() -> Self {
        Self {
            values: Arc::default(),
            epoch: Instant::now(),
        }
    }
}

/// An overuse reading older than this is not believed: the feedback that
/// would end it stopped coming (a subscriber that went quiet while its
/// queue grew must not keep its probes off for good).
pub const OVERUSE_STALE: Duration = Duration::from_secs(1);

impl Estimate {
    /// The slots of `values`: the estimate, the tested peak (bit/s), the
    /// packets reported and lost (running totals), when overuse was last
    /// read and since which packet's departure it reads so (both ms since
    /// `epoch`, plus one; 0 when not overusing).
    const TARGET: usize = 0;
    const TESTED: usize = 1;
    const REPORTED: usize = 2;
    const LOST: usize = 3;
    const OVERUSE_AT: usize = 4;
    const OVERUSE_SINCE: usize = 5;

    /// The estimate in bit/s, or `None` before any feedback arrived (the
    /// subscriber may not send TWCC at all: aiortc, older clients).
    pub fn get(&self) -> Option<u64> {
        match self.values[Self::TARGET].load(Ordering::Relaxed) {
            0 => None,
            v => Some(v),
        }
    }

    /// The highest rate that arrived at the far end within about the last
    /// [`TESTED_MEMORY`] (a probe's padding included), or `None` before one
    /// was measured: what the link is known to carry.
    pub fn tested(&self) -> Option<u64> {
        match self.values[Self::TESTED].load(Ordering::Relaxed) {
            0 => None,
            v => Some(v),
        }
    }

    /// Packets the far end has reported on so far, and how many of them
    /// it reported lost (running totals: a probe reads what changed while
    /// it padded, [`crate::router::probe::Prober::on_losses`]).
    pub fn losses(&self) -> (u64, u64) {
        (
            self.values[Self::REPORTED].load(Ordering::Relaxed),
            self.values[Self::LOST].load(Ordering::Relaxed),
        )
    }

    /// Whether the last feedback read the queue growing (overuse), before
    /// the estimate backs off for it ([`OVERUSE_PERSIST`]): a probe ends
    /// at the first sign ([`crate::router::probe::Prober::on_feedback`]).
    /// A reading older than [`OVERUSE_STALE`] at `now` counts as none.
    pub fn overusing(&self, now: Instant) -> bool {
        self.overuse(now).is_some()
    }

    /// When overuse is read at `now` ([`Self::overusing`]): the departure
    /// of the first packets it was read on. A queue that began to grow on
    /// packets sent before a probe started is not the probe's doing.
    pub fn overuse(&self, now: Instant) -> Option<Instant> {
        let ms = |slot: usize| match self.values[slot].load(Ordering::Relaxed) {
            0 => None,
            v => Some(self.epoch + Duration::from_millis(v - 1)),
        };
        let read = ms(Self::OVERUSE_AT)?;
        if now.saturating_duration_since(read) >= OVERUSE_STALE {
            return None;
        }
        Some(ms(Self::OVERUSE_SINCE).unwrap_or(read))
    }

    /// Notes the detector's reading at `now`: overuse on the packets sent
    /// since `since`, or none ([`Self::overuse`]).
    fn set_overuse(&self, now: Instant, since: Option<Instant>) {
        // Milliseconds since the epoch, plus one: 0 means "not over".
        let ms = |t: Instant| t.saturating_duration_since(self.epoch).as_millis() as u64 + 1;
        let (at, since) = since.map_or((0, 0), |s| (ms(now), ms(s)));
        self.values[Self::OVERUSE_SINCE].store(since, Ordering::Relaxed);
        self.values[Self::OVERUSE_AT].store(at, Ordering::Relaxed);
    }
}

/// How long a received rate counts as what the link carries.
pub const TESTED_MEMORY: Duration = Duration::from_secs(5);

/// What the far end received, by its own arrival times (feedback comes in
/// bursts: rated by when it was read here, two reports read a millisecond
/// apart would look like a link of many Gbit/s).
#[derive(Debug, Default)]
struct ArrivalRate {
    /// (arrival on the receiver's clock, bytes), oldest first.
    samples: VecDeque<(Duration, usize)>,
    bytes: usize,
}

impl ArrivalRate {
    /// Over this much of the receiver's time: long enough that a token
    /// bucket's burst (a 20 KB bucket lets 160 kbit through at line rate)
    /// does not read as a faster link.
    const WINDOW: Duration = Duration::from_millis(1000);
    /// A rate needs at least this span of arrivals.
    const MIN_SPAN: Duration = Duration::from_millis(500);
    /// Reports are bounded: a window holds at most this many.
    const MAX_SAMPLES: usize = 8192;

    fn add(&mut self, at: Duration, size: usize) {
        // Reports can arrive out of order; the newest sets the window.
        let newest = self.samples.back().map_or(at, |&(t, _)| t.max(at));
        self.samples.push_back((at, size));
        self.bytes += size;
        while let Some(&(t, size)) = self.samples.front() {
            if newest.saturating_sub(t) <= Self::WINDOW && self.samples.len() <= Self::MAX_SAMPLES {
                break;
            }
            self.samples.pop_front();
            self.bytes -= size;
        }
    }

    /// bit/s, or `None` while the window spans too little: the lower of
    /// the rates of the window's two halves. A token bucket that refilled
    /// while little was sent lets its burst through at line rate: a second
    /// that starts with a 20 KB burst carries 160 kbit more than the link
    /// sustains (a 600 kbit/s cap read as 760 kbit/s, and a probe "passed"
    /// into a switch up that froze). The burst falls in one half; the other
    /// shows the sustained rate.
    fn rate(&self) -> Option<f64> {
        let (first, last) = (self.samples.front()?.0, self.samples.back()?.0);
        let span = last.saturating_sub(first);
        if span < Self::MIN_SPAN {
            return None;
        }
        let mid = first + span / 2;
        let early: usize = self
            .samples
            .iter()
            .filter(|&&(t, _)| t < mid)
            .map(|&(_, size)| size)
            .sum();
        let late = self.bytes - early;
        let half = (span / 2).as_secs_f64();
        Some((early.min(late) * 8) as f64 / half)
    }

    /// bit/s a back-off starts from, or `None` while the window spans too
    /// little: halfway between the lower half's rate
    /// ([`ArrivalRate::rate`], what the link is credited with) and the
    /// mean over the whole window. The lower half alone cut too deep when
    /// the receiver read its packets in bursts (a browser on a busy
    /// machine: an unshaped viewer's estimate fell from 4.8 to 0.8 Mbit/s
    /// on one overuse, and took 15 s to climb back; a stall that straddles
    /// the window's middle shortens one half); the mean alone
    /// counts a token bucket's burst and backs off to above the bucket's
    /// rate.
    fn back_off_from(&self) -> Option<f64> {
        let (first, last) = (self.samples.front()?.0, self.samples.back()?.0);
        let span = last.saturating_sub(first);
        if span < Self::MIN_SPAN {
            return None;
        }
        let mean = (self.bytes * 8) as f64 / span.as_secs_f64();
        Some((mean + self.rate()?) / 2.0)
    }
}

/// The estimator in the interceptor chain.
pub struct Bwe {
    slope: SlopeEstimator,
    detector: OveruseDetector,
    /// Delay deltas seen, up to [`MAX_DELTAS`].
    deltas: u32,
    /// When the packets of the current run of overuse readings began to
    /// be sent (see [`OVERUSE_PERSIST`]).
    over_since: Option<Instant>,
    /// What the rate control acts on: the detector's reading, with
    /// overuse held (as `Under`) until it persisted.
    usage: Usage,
    received: ArrivalRate,
    /// Fraction of packets reported lost in the last full sample, and the
    /// sample being filled (packets reported, lost).
    loss: f64,
    loss_seen: usize,
    loss_lost: usize,
    /// The loss-based limit (GCC's second half): cut while loss is over
    /// [`LOSS_FULL`], held between, lifted by a sample under [`LOSS_CLEAN`].
    loss_target: f64,
    delay_target: f64,
    target: f64,
    last_change: Option<Instant>,
    /// (when, received rate) at the last back-off.
    ceiling: Option<(Instant, f64)>,
    /// The last loss back-off.
    last_loss_cut: Option<Instant>,
    /// The highest received rate since `tested.0`: a peak is kept for
    /// [`TESTED_MEMORY`], then the current rate starts the next.
    tested: Option<(Instant, f64)>,
    shared: Estimate,
}

impl Bwe {
    /// An estimator and the handle the engine reads it through.
    pub fn new() -> (Bwe, Estimate) {
        let shared = Estimate::default();
        let bwe = Bwe {
            slope: SlopeEstimator::new(),
            detector: OveruseDetector::new(),
            deltas: 0,
            over_since: None,
            usage: Usage::Normal,
            received: ArrivalRate::default(),
            loss: 0.0,
            loss_seen: 0,
            loss_lost: 0,
            loss_target: MAX,
            delay_target: INITIAL,
            target: INITIAL,
            last_change: None,
            ceiling: None,
            last_loss_cut: None,
            tested: None,
            shared: shared.clone(),
        };
        (bwe, shared)
    }

    /// A back-off at `now` with `received` arriving: the ceiling is the
    /// highest rate of the back-offs in the last [`CEILING_MEMORY`] (one
    /// that came while the queue starved the link must not lower it, or
    /// the next good second would look like the link grew).
    fn learn_ceiling(&mut self, now: Instant, received: f64) {
        let kept = self
            .ceiling
            .filter(|&(at, _)| now.saturating_duration_since(at) < CEILING_MEMORY)
            .map_or(0.0, |(_, rate)| rate);
        self.ceiling = Some((now, received.max(kept)));
    }

    /// `received`: the link's rate as credited ([`ArrivalRate::rate`]);
    /// `from`: what a back-off starts from ([`ArrivalRate::back_off_from`]).
    fn rate_control(
        &mut self,
        now: Instant,
        usage: Usage,
        received: Option<f64>,
        from: Option<f64>,
    ) {
        let since = self
            .last_change
            .map_or(INTERVAL, |t| now.saturating_duration_since(t));
        match usage {
            Usage::Over => {
                // Back off at once (but once per interval: the queue needs
                // time to drain before it shows).
                if let (Some(from), true) = (from, since >= INTERVAL) {
                    self.delay_target = (from * BACK_OFF).clamp(MIN, MAX);
                    self.learn_ceiling(now, from);
                    self.last_change = Some(now);
                }
            }
            Usage::Under => {}
            Usage::Normal => {
                if since < INTERVAL {
                    return;
                }
                let Some(received) = received else {
                    return;
                };
                let secs = since.as_secs_f64().min(1.0);
                // What arrived without the queue growing (a probe's
                // padding, or more layers) is what the link carries at
                // least; past the ceiling by a margin, the link changed.
                if received > self.delay_target {
                    self.delay_target = received.min(MAX);
                }
                if self
                    .ceiling
                    .is_some_and(|(_, rate)| received > rate * CEILING_PASSED)
                {
                    self.ceiling = None;
                }
                let near = self.ceiling.is_some_and(|(at, rate)| {
                    now.saturating_duration_since(at) < CEILING_MEMORY
                        && self.delay_target > rate * BACK_OFF
                });
                let next = if near {
                    self.delay_target + ADDITIVE * secs
                } else {
                    self.delay_target * CLIMB_PER_SECOND.powf(secs)
                };
                let untested = 1.5 * received + HEADROOM;
                // Never lowered by the cap: a sender that sends little
                // keeps the estimate it had.
                self.delay_target = next.min(untested.max(self.delay_target)).clamp(MIN, MAX);
                self.last_change = Some(now);
            }
        }
    }
}

impl BandwidthEstimator for Bwe {
    fn on_reports(&mut self, now: Instant, reports: &[PacketReport]) {
        if reports.is_empty() {
            return;
        }
        let mut usage = self.usage;
        for report in reports {
            if let (true, Some(at)) = (report.arrived, report.arrival) {
                self.received.add(at, report.size);
            }
            if let Some(trend) = self.slope.accumulate(report) {
                // The filtered delay gradient per group, scaled by how many
                // deltas it rests on (at most 60), as libwebrtc's and
                // pion's detectors compare it with the threshold: rtc's
                // compares the bare gradient, so only a queue growing
                // 12.5 ms per group (a link at well under half of what is
                // sent) ever read as overuse. A 600 kbit/s token bucket
                // fed 1 Mbit/s (7 ms per group) filled and dropped while
                // the estimate kept climbing.
                self.deltas = (self.deltas + 1).min(MAX_DELTAS);
                let read = self
                    .detector
                    .update(trend.at, trend.estimate_ms * f64::from(self.deltas));
                // Overuse counts once it persisted; until then, hold.
                usage = match (read, self.over_since) {
                    (Usage::Over, None) => {
                        self.over_since = Some(trend.at);
                        Usage::Under
                    }
                    (Usage::Over, Some(since))
                        if trend.at.saturating_duration_since(since) < OVERUSE_PERSIST =>
                    {
                        Usage::Under
                    }
                    (Usage::Over, Some(_)) => Usage::Over,
                    (other, _) => {
                        self.over_since = None;
                        other
                    }
                };
            }
        }
        self.usage = usage;
        // Overuse since the departure of the group where the run of
        // overuse readings began (`over_since` is set whenever the
        // detector reads overuse, and cleared by any other reading).
        let over = self.detector.usage() == Usage::Over;
        self.shared
            .set_overuse(now, self.over_since.filter(|_| over));
        let received = self.received.rate();
        if let Some(r) = received {
            self.tested = match self.tested {
                Some((since, peak))
                    if now.saturating_duration_since(since) < TESTED_MEMORY && peak >= r =>
                {
                    Some((since, peak))
                }
                _ => Some((now, r)),
            };
        }
        self.rate_control(now, usage, received, self.received.back_off_from());
        // Loss, judged over at least LOSS_SAMPLE packets (one feedback
        // batch of ten with two lost is no 20 % loss): above LOSS_FULL the
        // path drops what we send; back off as GCC's loss half does, from
        // the estimate, by half the loss, and remember the ceiling.
        let lost = reports.iter().filter(|r| !r.arrived).count();
        self.loss_seen += reports.len();
        self.loss_lost += lost;
        self.shared.values[Estimate::REPORTED].fetch_add(reports.len() as u64, Ordering::Relaxed);
        self.shared.values[Estimate::LOST].fetch_add(lost as u64, Ordering::Relaxed);
        if self.loss_seen >= LOSS_SAMPLE {
            self.loss = self.loss_lost as f64 / self.loss_seen as f64;
            (self.loss_seen, self.loss_lost) = (0, 0);
            let may_cut = self
                .last_loss_cut
                .is_none_or(|t| now.saturating_duration_since(t) >= LOSS_CUT_INTERVAL);
            if self.loss > LOSS_FULL && may_cut {
                self.last_loss_cut = Some(now);
                let from = self.loss_target.min(self.delay_target);
                // Not below what arrives: a full link still carries that
                // (a token bucket drops the excess and delivers its rate).
                // Cut after cut from the estimate alone, a second of 70 %
                // loss took a 600 kbit/s link's estimate to 124 kbit/s,
                // below both publishers' lowest layers.
                let floor = received.map_or(MIN, |r| r * BACK_OFF);
                self.loss_target = (from * (1.0 - 0.5 * self.loss)).max(floor).clamp(MIN, MAX);
                // The delay-based target comes down with it: a queue that
                // drops its tail (a token bucket) may never show a delay
                // trend, and the first clean sample, which lifts the loss
                // limit, would bring back a stale multi-Mbit/s target at
                // once (seen under a 600 kbit/s cap: the estimate sawed
                // between 0.5 and 2.7 Mbit/s, each rise a switch up and a
                // burst of loss). From here the delay half climbs by its
                // own rules, near the ceiling learnt below.
                self.delay_target = self.delay_target.min(self.loss_target);
                if let Some(received) = received {
                    self.learn_ceiling(now, received);
                }
            } else if self.loss < LOSS_CLEAN {
                // A clean sample: the loss has gone, and its limit with it.
                self.loss_target = MAX;
            }
        }
        self.target = self.delay_target.min(self.loss_target).clamp(MIN, MAX);
        self.shared.values[Estimate::TARGET].store(self.target as u64, Ordering::Relaxed);
        if let Some((_, peak)) = self.tested {
            self.shared.values[Estimate::TESTED].store(peak.max(1.0) as u64, Ordering::Relaxed);
        }
    }

    fn target_bitrate(&self) -> f64 {
        self.target
    }

    fn stats(&self) -> EstimatorStats {
        let mut stats = EstimatorStats::default();
        stats.delay_based_bitrate = Some(self.delay_target);
        stats.packet_loss = Some(self.loss);
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overuse_reading_goes_stale_when_feedback_stops() {
        let estimate = Estimate::default();
        let t0 = Instant::now() + Duration::from_secs(1);
        let sent = t0 - Duration::from_millis(120);
        assert!(!estimate.overusing(t0), "no reading yet");
        estimate.set_overuse(t0, Some(sent));
        assert!(estimate.overusing(t0));
        // It says since which packets the queue grows (ms precision).
        let since = estimate.overuse(t0).expect("overusing");
        assert!(since <= sent && sent - since < Duration::from_millis(1));
        assert!(estimate.overusing(t0 + OVERUSE_STALE - Duration::from_millis(10)));
        // No feedback since: the reading is no longer believed.
        assert!(!estimate.overusing(t0 + OVERUSE_STALE + Duration::from_millis(10)));
        assert_eq!(estimate.overuse(t0 + OVERUSE_STALE), None);
        // A fresh reading counts again, and "normal" clears it at once.
        let t1 = t0 + Duration::from_secs(3);
        estimate.set_overuse(t1, Some(t1));
        assert!(estimate.overusing(t1 + Duration::from_millis(100)));
        estimate.set_overuse(t1 + Duration::from_millis(200), None);
        assert!(!estimate.overusing(t1 + Duration::from_millis(200)));
    }

    fn report(id: u64, epoch: Instant, sent: Instant, arrived: Option<Instant>) -> PacketReport {
        PacketReport {
            ssrc: 1,
            id,
            rtp_sequence_number: id as u16,
            is_twcc: true,
            twcc_sequence_number: id as u16,
            size: 1200,
            arrived: arrived.is_some(),
            departure: sent,
            // The receiver's clock: its own epoch.
            arrival: arrived.map(|a| a.saturating_duration_since(epoch)),
            ecn: rtc::rtcp::transport_feedbacks::cc_feedback_report::Ecn::default(),
        }
    }

    /// Feeds `secs` of 1200-byte packets at `rate_bps`, delivered after a
    /// queueing delay that grows by `queue_growth_ms` per packet, and
    /// returns the estimate.
    fn run(
        bwe: &mut Bwe,
        epoch: Instant,
        start: Instant,
        secs: f64,
        rate_bps: f64,
        queue_growth_ms: f64,
    ) -> f64 {
        let gap = 1200.0 * 8.0 / rate_bps;
        let n = (secs / gap) as u64;
        let first = (start - epoch).as_millis() as u64 * 1000;
        let mut batch = Vec::new();
        for (id, i) in (first..).zip(0..n) {
            let sent = start + Duration::from_secs_f64(i as f64 * gap);
            let arrived = sent
                + Duration::from_millis(20)
                + Duration::from_secs_f64(i as f64 * queue_growth_ms / 1000.0);
            batch.push(report(id, epoch, sent, Some(arrived)));
            // Feedback every 50 ms, as browsers send it.
            if batch.len() as f64 * gap >= 0.05 {
                bwe.on_reports(arrived + Duration::from_millis(20), &batch);
                batch.clear();
            }
        }
        bwe.target_bitrate()
    }

    #[test]
    fn a_clear_path_lets_the_estimate_climb_but_not_past_what_was_tested() {
        let (mut bwe, shared) = Bwe::new();
        assert_eq!(shared.get(), None);
        let t0 = Instant::now();
        let after = run(&mut bwe, t0, t0, 5.0, 1_500_000.0, 0.0);
        assert!(after > INITIAL * 1.5, "climbed: {after}");
        // The received rate is measured over a window that lags: some slack.
        assert!(
            after <= 1.5 * 1_500_000.0 * 1.3 + HEADROOM,
            "untested cap: {after}"
        );
        assert_eq!(shared.get(), Some(after as u64));
        // What the link carried: about the 1.5 Mbit/s sent, below the
        // estimate that climbed on trust.
        let tested = shared.tested().expect("measured") as f64;
        assert!((1_300_000.0..=1_700_000.0).contains(&tested), "{tested}");
    }

    #[test]
    fn a_growing_queue_backs_off_below_what_arrives() {
        let (mut bwe, _) = Bwe::new();
        let t0 = Instant::now();
        run(&mut bwe, t0, t0, 2.0, 1_000_000.0, 0.0);
        // Sent at 1.2 Mbit/s through a 400 kbit/s bottleneck: each packet
        // waits 16 ms longer than the one before.
        let after = run(
            &mut bwe,
            t0,
            t0 + Duration::from_secs(2),
            2.0,
            1_200_000.0,
            16.0,
        );
        assert!(after < 1_000_000.0, "backed off: {after}");
    }

    #[test]
    fn what_arrives_without_queueing_raises_the_estimate_at_once() {
        let (mut bwe, _) = Bwe::new();
        let t0 = Instant::now();
        // A bottleneck: backed off, with a ceiling learnt.
        let low = run(&mut bwe, t0, t0, 2.0, 1_200_000.0, 16.0);
        assert!(low < 1_000_000.0, "backed off: {low}");
        // The queue drains (the estimate holds while it does).
        run(
            &mut bwe,
            t0,
            t0 + Duration::from_secs(3),
            2.0,
            500_000.0,
            0.0,
        );
        // The link was freed and a probe's padding goes through at
        // 2.4 Mbit/s without any queueing: within a second the estimate
        // is what arrived, not a slow additive climb from the ceiling.
        let after = run(
            &mut bwe,
            t0,
            t0 + Duration::from_secs(5),
            1.0,
            2_400_000.0,
            0.0,
        );
        assert!(after >= 2_000_000.0, "raised: {after} (from {low})");
    }

    /// 600 kbit/s through a bucket that refilled: 20 KB at line rate
    /// (within 2 ms), then 1,200-byte packets at the bucket's rate, for a
    /// second.
    fn bucket_burst_then_rate() -> ArrivalRate {
        let mut r = ArrivalRate::default();
        let mut at = Duration::ZERO;
        for _ in 0..17 {
            r.add(at, 1200);
            at += Duration::from_micros(100);
        }
        let gap = Duration::from_secs_f64(1200.0 * 8.0 / 600_000.0);
        while at < Duration::from_millis(1000) {
            at += gap;
            r.add(at, 1200);
        }
        r
    }

    #[test]
    fn a_token_buckets_burst_does_not_read_as_a_faster_link() {
        let rate = bucket_burst_then_rate()
            .rate()
            .expect("a second of arrivals");
        assert!((560_000.0..=640_000.0).contains(&rate), "{rate}");
        // Steady arrivals read as their rate.
        let gap = Duration::from_secs_f64(1200.0 * 8.0 / 600_000.0);
        let mut s = ArrivalRate::default();
        let mut at = Duration::ZERO;
        while at < Duration::from_millis(1000) {
            s.add(at, 1200);
            at += gap;
        }
        let rate = s.rate().expect("a second of arrivals");
        assert!((560_000.0..=640_000.0).contains(&rate), "{rate}");
    }

    #[test]
    fn feedback_read_in_a_burst_is_rated_by_its_arrival_times() {
        let (mut bwe, _) = Bwe::new();
        let t0 = Instant::now();
        run(&mut bwe, t0, t0, 2.0, 1_000_000.0, 0.0);
        // The server stalled: a second of feedback (1 Mbit/s arriving) is
        // read within a millisecond.
        let read_at = t0 + Duration::from_secs(3);
        let gap = 1200.0 * 8.0 / 1_000_000.0;
        let start = t0 + Duration::from_secs(2);
        for batch in 0..20u64 {
            let reports: Vec<PacketReport> = (0..5u64)
                .map(|i| {
                    let n = batch * 5 + i;
                    let sent = start + Duration::from_secs_f64(n as f64 * gap);
                    report(10_000 + n, t0, sent, Some(sent + Duration::from_millis(20)))
                })
                .collect();
            bwe.on_reports(read_at + Duration::from_micros(batch * 50), &reports);
        }
        let after = bwe.target_bitrate();
        assert!(
            after <= 1.5 * 1_000_000.0 * 1.3 + HEADROOM,
            "not a burst's rate: {after}"
        );
    }

    /// `secs` of 1 Mbit/s with every `nth` packet lost; the estimate after.
    fn lossy(nth: u64, secs: f64) -> f64 {
        let (mut bwe, _) = Bwe::new();
        let t0 = Instant::now();
        let gap = 1200.0 * 8.0 / 1_000_000.0;
        let mut batch = Vec::new();
        for id in 0..(secs / gap) as u64 {
            let sent = t0 + Duration::from_secs_f64(id as f64 * gap);
            let arrived = (id % nth != 0).then(|| sent + Duration::from_millis(20));
            batch.push(report(id, t0, sent, arrived));
            if batch.len() == 5 {
                bwe.on_reports(sent + Duration::from_millis(40), &batch);
                batch.clear();
            }
        }
        bwe.target_bitrate()
    }

    /// `secs` of `rate_bps` from `start`, every `nth` packet lost (0: none),
    /// no queueing; ids from `first`. The estimate after.
    fn phase(
        bwe: &mut Bwe,
        t0: Instant,
        start: Instant,
        first: u64,
        secs: f64,
        rate_bps: f64,
        nth: u64,
    ) -> f64 {
        let gap = 1200.0 * 8.0 / rate_bps;
        let mut batch = Vec::new();
        for i in 0..(secs / gap) as u64 {
            let sent = start + Duration::from_secs_f64(i as f64 * gap);
            let lost = nth != 0 && i % nth == 0;
            let arrived = (!lost).then(|| sent + Duration::from_millis(20));
            batch.push(report(first + i, t0, sent, arrived));
            if batch.len() as f64 * gap >= 0.05 {
                bwe.on_reports(sent + Duration::from_millis(40), &batch);
                batch.clear();
            }
        }
        bwe.target_bitrate()
    }

    #[test]
    fn a_clean_sample_after_heavy_loss_does_not_bring_back_the_old_estimate() {
        let (mut bwe, _) = Bwe::new();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let high = phase(&mut bwe, t0, t0, 0, 6.0, 2_000_000.0, 0);
        assert!(high > 2_000_000.0, "climbed: {high}");
        // A token bucket drops half of what is sent, with no delay trend at
        // all.
        let cut = phase(&mut bwe, t0, t0 + s(6), 100_000, 4.0, 2_000_000.0, 2);
        assert!(cut < high * 0.6, "cut: {cut} (from {high})");
        // The sender keeps within the limit: what it sends arrives whole.
        // The loss limit lifts, and the estimate climbs from where it was
        // cut, not back to the old figure at the first clean sample.
        let first_clean = phase(&mut bwe, t0, t0 + s(10), 200_000, 6.0, 400_000.0, 0);
        assert!(
            first_clean <= (cut * 1.3 + HEADROOM).max(1.5 * 400_000.0 * 1.3 + HEADROOM),
            "a clean sample: {first_clean} (cut to {cut}, was {high})"
        );
    }

    #[test]
    fn heavy_loss_cuts_to_what_arrives_not_below() {
        let (mut bwe, _) = Bwe::new();
        let t0 = Instant::now();
        let high = phase(&mut bwe, t0, t0, 0, 6.0, 3_000_000.0, 0);
        assert!(high > 3_000_000.0, "climbed: {high}");
        // A 600 kbit/s token bucket: four packets in five dropped, the
        // fifth delivered, for four seconds.
        let gap = 1200.0 * 8.0 / 3_000_000.0;
        let start = t0 + Duration::from_secs(6);
        let mut batch = Vec::new();
        for i in 0..(4.0 / gap) as u64 {
            let sent = start + Duration::from_secs_f64(i as f64 * gap);
            let arrived = (i % 5 == 0).then(|| sent + Duration::from_millis(20));
            batch.push(report(100_000 + i, t0, sent, arrived));
            if batch.len() as f64 * gap >= 0.05 {
                bwe.on_reports(sent + Duration::from_millis(40), &batch);
                batch.clear();
            }
        }
        let after = bwe.target_bitrate();
        assert!(after < 1_000_000.0, "cut: {after}");
        assert!(
            after >= 600_000.0 * BACK_OFF * 0.9,
            "not below what arrives less the back-off: {after}"
        );
    }

    #[test]
    fn random_loss_below_ten_percent_is_no_congestion_above_it_is() {
        // 5 %: NACK repairs it; the estimate holds (or climbs).
        let lossy_link = lossy(20, 5.0);
        assert!(lossy_link >= INITIAL, "{lossy_link}");
        // 20 %: the path is full; cut by half the loss every 200 packets,
        // however fast the delay-based half would climb, down to what
        // arrives (800 kbit/s) less the back-off.
        let full = lossy(5, 20.0);
        assert!(full <= 800_000.0 * BACK_OFF * 1.05, "{full}");
    }

    /// A token bucket as `tc tbf` shapes a link (`rate`, `burst`,
    /// `latency`): packets wait while the bucket is empty and are dropped
    /// when the queue holds `latency` worth of the rate past the burst.
    struct Tbf {
        rate: f64,
        burst: f64,
        limit: f64,
        tokens: f64,
        last: Instant,
        queue: VecDeque<(u64, Instant)>,
    }

    impl Tbf {
        const SIZE: f64 = 1200.0;

        fn new(bps: f64, burst: f64, latency: Duration, now: Instant) -> Tbf {
            let rate = bps / 8.0;
            Tbf {
                rate,
                burst,
                limit: rate * latency.as_secs_f64() + burst,
                tokens: burst,
                last: now,
                queue: VecDeque::new(),
            }
        }

        /// Offers a packet; false when the queue is full (dropped).
        fn send(&mut self, id: u64, now: Instant) -> bool {
            if (self.queue.len() as f64 + 1.0) * Self::SIZE > self.limit {
                return false;
            }
            self.queue.push_back((id, now));
            true
        }

        /// The packets that leave by `now`: (id, sent).
        fn release(&mut self, now: Instant, out: &mut Vec<(u64, Instant)>) {
            let since = now.saturating_duration_since(self.last).as_secs_f64();
            self.tokens = (self.tokens + self.rate * since).min(self.burst);
            self.last = now;
            while self.tokens >= Self::SIZE {
                let Some(p) = self.queue.pop_front() else {
                    break;
                };
                self.tokens -= Self::SIZE;
                out.push(p);
            }
        }
    }

    #[test]
    fn a_probe_past_a_token_buckets_rate_reads_as_overuse_before_it_drops() {
        // The simulcast test's cap: 600 kbit/s, burst 20 KB, latency
        // 200 ms. 300 kbit/s of media for 6 s, then a probe at 1 Mbit/s.
        let (mut bwe, shared) = Bwe::new();
        let t0 = Instant::now();
        let mut tbf = Tbf::new(600_000.0, 20_000.0, Duration::from_millis(200), t0);
        let (mut left, mut reports) = (Vec::new(), Vec::new());
        let (mut next_send, mut next_feedback, mut id) = (t0, t0, 0u64);
        let (mut at_first_loss, mut overuse_read) = (None, None);
        let mut now = t0;
        while now < t0 + Duration::from_millis(7500) && at_first_loss.is_none() {
            let probing = now >= t0 + Duration::from_secs(6);
            let bps = if probing { 1_000_000.0 } else { 300_000.0 };
            if now >= next_send {
                if !tbf.send(id, now) {
                    reports.push(report(id, t0, now, None));
                }
                id += 1;
                next_send += Duration::from_secs_f64(Tbf::SIZE * 8.0 / bps);
            }
            tbf.release(now, &mut left);
            for (id, sent) in left.drain(..) {
                reports.push(report(id, t0, sent, Some(now + Duration::from_millis(10))));
            }
            // Feedback every 100 ms, 10 ms on the way back.
            if now >= next_feedback {
                next_feedback += Duration::from_millis(100);
                reports.sort_by_key(|r| r.id);
                bwe.on_reports(now + Duration::from_millis(20), &reports);
                reports.clear();
                if let (Some(since), None) = (shared.overuse(now), overuse_read) {
                    overuse_read = Some((now, since));
                }
                if shared.losses().1 > 0 {
                    at_first_loss = shared.get();
                }
            }
            now += Duration::from_micros(500);
        }
        let at_first_loss = at_first_loss.expect("the bucket overflowed");
        // The queue grew for ~0.5 s before the bucket dropped: by then the
        // estimate is below the link's rate, not still climbing at 1 Mbit/s.
        assert!(at_first_loss < 600_000, "{at_first_loss}");
        // A probe reads the overuse earlier still, before the estimate
        // backs off for it (OVERUSE_PERSIST), and before the media the
        // estimate carried was dropped.
        let (read, since) = overuse_read.expect("overuse read");
        assert!(read > t0 + Duration::from_secs(6), "not before the probe");
        // And it says the queue grew on the probe's packets, not before.
        assert!(
            since >= t0 + Duration::from_secs(6) && since < read,
            "since {:?} after the probe's start",
            since.saturating_duration_since(t0)
        );
    }

    #[test]
    fn a_back_off_starts_between_the_sustained_rate_and_the_mean() {
        let gap = Duration::from_secs_f64(1200.0 * 8.0 / 3_000_000.0);
        // 3 Mbit/s for a second, but the receiver stalled from 350 to
        // 650 ms and stamped that stretch's packets at 650 ms.
        let mut stalled = ArrivalRate::default();
        let mut at = Duration::ZERO;
        while at < Duration::from_millis(1000) {
            let stamp = if (350..650).contains(&at.as_millis()) {
                Duration::from_millis(650)
            } else {
                at
            };
            stalled.add(stamp, 1200);
            at += gap;
        }
        let (low, from) = (stalled.rate().unwrap(), stalled.back_off_from().unwrap());
        assert!(low < 2_600_000.0, "the lower half understates: {low}");
        assert!(
            from > low && from <= 3_100_000.0,
            "{from} (lower half {low})"
        );
        // A 600 kbit/s token bucket's burst, then its rate.
        let from = bucket_burst_then_rate().back_off_from().unwrap();
        assert!(
            from * BACK_OFF < 600_000.0,
            "backs off below the bucket: {from}"
        );
    }
}
