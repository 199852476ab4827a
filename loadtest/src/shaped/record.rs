//! What one viewer of `loadtest shaped` saw of each publisher, and the
//! figures drawn from it once the run is over. The same code serves the
//! unshaped viewer (in the generator's process) and the shaped one (the
//! `shaped-viewer` child in the namespace), each on its own clock.
//!
//! Every packet is told apart by its stamp ([`crate::publish::read_stamp`],
//! [`crate::publish::split_layer`]): which publisher sent it and on which
//! simulcast layer (`q`, `h` or the top layer `f`). What is measured:
//!
//! - **Complete frames.** A frame is complete when every packet of it has
//!   arrived: the packets are grouped by (layer, send time in the stamp),
//!   the first is the one whose VP8 descriptor starts partition 0, the last
//!   the one with the RTP marker bit, and the stamp's per-layer sequence
//!   numbers from the first to the last must all be there (retransmissions
//!   count; duplicates do not). Its time is the arrival of the packet that
//!   completed it. A frame that completes after a newer one (by the send
//!   time in the stamp; the layers of one frame share it) is late: a
//!   renderer would drop it, so it is counted apart and not as a frame.
//! - **Freezes.** The longest time within a phase without a new complete
//!   frame of that publisher (any layer), the phase's edges included: a
//!   phase with no frame at all is one freeze of its whole length. The
//!   `before` phase is counted from the publisher's first complete frame.
//! - **Loss.** RTP sequence gaps of the forwarded stream (the server's
//!   numbering, what a receiver would NACK) among the packets that arrived
//!   within the phase, after retransmissions ([`RtpStats`]).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use switchboard_client::{Kind, RtpPacket};

use crate::media;
use crate::publish::{check_sender, read_stamp, split_layer};
use crate::rxstats::{percent, RtpStats};

/// Layer names, lowest first (the publishers' rids).
pub const LAYERS: [&str; 3] = ["q", "h", "f"];
/// Index of the top layer in [`LAYERS`].
pub const TOP: usize = 2;
/// Frames being put together at once per publisher; older ones are given up.
const PENDING: usize = 64;
/// A frame of more packets than this is taken for damage.
const MAX_FRAME_PACKETS: u32 = 512;
/// Layer switches kept per publisher for the report.
const MAX_SWITCHES: usize = 200;

/// The phase boundaries, on the viewer's clock: publishing starts, the cap
/// goes on, comes off, the run ends.
#[derive(Debug, Clone, Copy)]
pub struct Phases {
    pub start: Instant,
    pub cap: Instant,
    pub uncap: Instant,
    pub end: Instant,
}

/// One frame being put together.
#[derive(Debug)]
struct Assembly {
    layer: usize,
    sent_ns: u64,
    /// Stamp sequence numbers of the first packet (start of partition 0)
    /// and of the last (marker bit).
    first: Option<u32>,
    last: Option<u32>,
    seqs: Vec<u32>,
    done: bool,
}

/// Everything one viewer received from one publisher.
#[derive(Debug, Default)]
pub struct PublisherLog {
    /// Complete frames: when, and the layer.
    frames: Vec<(Instant, usize)>,
    /// Send time (stamp) of the newest complete frame.
    newest: Option<u64>,
    /// Frames completed after a newer one: when.
    late: Vec<Instant>,
    pending: VecDeque<Assembly>,
    /// Every video and audio packet: arrival, RTP sequence number and
    /// timestamp, payload bytes.
    video: Vec<(Instant, u16, u32, usize)>,
    audio: Vec<(Instant, u16, u32, usize)>,
}

impl PublisherLog {
    fn video_packet(
        &mut self,
        at: Instant,
        layer: usize,
        stamp_seq: u32,
        sent_ns: u64,
        start: bool,
        marker: bool,
    ) {
        let i = match self
            .pending
            .iter()
            .position(|a| a.layer == layer && a.sent_ns == sent_ns)
        {
            Some(i) => i,
            None => {
                if self.pending.len() >= PENDING {
                    self.pending.pop_front();
                }
                self.pending.push_back(Assembly {
                    layer,
                    sent_ns,
                    first: None,
                    last: None,
                    seqs: Vec::new(),
                    done: false,
                });
                self.pending.len() - 1
            }
        };
        let Some(a) = self.pending.get_mut(i) else {
            return;
        };
        if a.done || a.seqs.contains(&stamp_seq) {
            return;
        }
        a.seqs.push(stamp_seq);
        if start {
            a.first = Some(stamp_seq);
        }
        if marker {
            a.last = Some(stamp_seq);
        }
        if let (Some(first), Some(last)) = (a.first, a.last) {
            let Some(span) = last.checked_sub(first).filter(|s| *s < MAX_FRAME_PACKETS) else {
                return;
            };
            let inside = a
                .seqs
                .iter()
                .filter(|s| (first..=last).contains(*s))
                .count();
            if inside == span as usize + 1 {
                a.done = true;
                a.seqs = Vec::new();
                if self.newest.is_some_and(|n| sent_ns <= n) {
                    self.late.push(at);
                } else {
                    self.newest = Some(sent_ns);
                    self.frames.push((at, layer));
                }
            }
        }
    }
}

/// Everything one viewer received, by publisher (the stamp's sender).
#[derive(Debug)]
pub struct Recording {
    /// This viewer's participant index (its own packets are refused).
    me: usize,
    participants: usize,
    pub publishers: Vec<PublisherLog>,
    /// Payloads that could not be counted, by reason.
    pub bad: BTreeMap<&'static str, u64>,
}

impl Recording {
    /// A viewer with participant index `me` among `participants`, of which
    /// the first `publishers` publish.
    pub fn new(me: usize, participants: usize, publishers: usize) -> Recording {
        Recording {
            me,
            participants,
            publishers: (0..publishers).map(|_| PublisherLog::default()).collect(),
            bad: BTreeMap::new(),
        }
    }

    /// One received RTP packet.
    pub fn absorb(&mut self, kind: Kind, packet: &RtpPacket, at: Instant) {
        if packet.payload.is_empty() {
            *self.bad.entry("padding").or_default() += 1;
            return;
        }
        let (stamp, lower) = match read_stamp(kind, &packet.payload) {
            Ok(s) => split_layer(s),
            Err(bad) => {
                *self.bad.entry(bad.as_str()).or_default() += 1;
                return;
            }
        };
        if let Some(reason) = check_sender(&stamp, self.me, self.participants, self.participants) {
            *self.bad.entry(reason).or_default() += 1;
            return;
        }
        let Some(log) = self.publishers.get_mut(stamp.sender as usize) else {
            *self.bad.entry("not-a-publisher").or_default() += 1;
            return;
        };
        let (seq, ts, len) = (
            packet.header.sequence_number,
            packet.header.timestamp,
            packet.payload.len(),
        );
        match kind {
            Kind::Audio => log.audio.push((at, seq, ts, len)),
            Kind::Video => {
                let layer = lower.unwrap_or(TOP);
                if layer > TOP {
                    *self.bad.entry("unknown-layer").or_default() += 1;
                    return;
                }
                let start = crate::stamp::split_trailer(&packet.payload)
                    .ok()
                    .and_then(|(m, _)| media::vp8_descriptor(m))
                    .is_some_and(|d| d.start && d.partition == 0);
                log.video.push((at, seq, ts, len));
                log.video_packet(
                    at,
                    layer,
                    stamp.seq,
                    stamp.sent_ns,
                    start,
                    packet.header.marker,
                );
            }
        }
    }

    /// The figures per publisher for these phase boundaries.
    pub fn figures(&self, phases: &Phases) -> Vec<PublisherFigures> {
        self.publishers
            .iter()
            .enumerate()
            .map(|(i, log)| figures(i, log, phases))
            .collect()
    }
}

/// RTP loss of one stream within one phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Loss {
    pub received: u64,
    pub expected: u64,
    pub lost: u64,
    pub percent: f64,
}

impl Loss {
    fn of(packets: &[(Instant, u16, u32, usize)], from: Instant, to: Instant, clock: u32) -> Loss {
        let mut s = RtpStats::new(clock);
        for (at, seq, ts, len) in packets.iter().filter(|p| (from..to).contains(&p.0)) {
            s.record(*seq, *ts, *len, *at);
        }
        Loss {
            received: s.received,
            expected: s.expected(),
            lost: s.lost(),
            percent: percent(s.lost(), s.expected()),
        }
    }
}

/// What one viewer saw of one publisher (durations in ms; `None`: did not
/// happen within the run).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PublisherFigures {
    pub publisher: usize,
    /// Complete frames per layer (q, h, f) in each phase.
    pub frames_before: [u64; 3],
    pub frames_capped: [u64; 3],
    pub frames_after: [u64; 3],
    /// Frames completed after a newer one (not counted above), per phase.
    pub late_frames: [u64; 3],
    /// Layer (index into q, h, f) of the last complete frame before the
    /// cap, before the uncap, and before the end.
    pub layer_at_cap: Option<usize>,
    pub layer_at_uncap: Option<usize>,
    pub layer_at_end: Option<usize>,
    /// From the cap to the first complete frame of a layer below
    /// `layer_at_cap`, if one came before the uncap.
    pub cap_to_lower_ms: Option<f64>,
    /// Longest time without a new complete frame in each phase.
    pub freeze_before_ms: Option<f64>,
    pub freeze_capped_ms: Option<f64>,
    pub freeze_after_ms: Option<f64>,
    /// From the uncap to the first complete top-layer frame after it, if
    /// one came before the end.
    pub uncap_to_top_ms: Option<f64>,
    /// RTP loss under the cap (and before it, for comparison).
    pub video_loss_before: Loss,
    pub video_loss_capped: Loss,
    pub audio_loss_before: Loss,
    pub audio_loss_capped: Loss,
    /// Longest gap between audio packets under the cap.
    pub audio_gap_capped_ms: Option<f64>,
    /// Layer switches: (ms since publishing started, new layer), by
    /// complete frames; at most the first 200.
    pub switches: Vec<(u64, usize)>,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The longest time within `[from, to)` without an instant of `times`
/// (sorted), the edges included; `None` for an empty or reversed phase.
pub fn longest_gap(times: &[Instant], from: Instant, to: Instant) -> Option<Duration> {
    if to <= from {
        return None;
    }
    let mut prev = from;
    let mut longest = Duration::ZERO;
    for t in times.iter().filter(|t| (from..to).contains(*t)) {
        longest = longest.max(t.saturating_duration_since(prev));
        prev = *t;
    }
    Some(longest.max(to.saturating_duration_since(prev)))
}

fn count_layers(frames: &[(Instant, usize)], from: Instant, to: Instant) -> [u64; 3] {
    let mut n = [0; 3];
    for (_, layer) in frames.iter().filter(|f| (from..to).contains(&f.0)) {
        if let Some(c) = n.get_mut(*layer) {
            *c += 1;
        }
    }
    n
}

fn figures(publisher: usize, log: &PublisherLog, p: &Phases) -> PublisherFigures {
    let frames = &log.frames;
    let times: Vec<Instant> = frames.iter().map(|f| f.0).collect();
    let layer_before = |t: Instant| frames.iter().rev().find(|f| f.0 < t).map(|f| f.1);
    let layer_at_cap = layer_before(p.cap);
    // From `from` to the first frame of a layer `pred` accepts before `to`.
    let since = |from: Instant, to: Instant, pred: &dyn Fn(usize) -> bool| {
        frames
            .iter()
            .find(|f| (from..to).contains(&f.0) && pred(f.1))
            .map(|f| ms(f.0 - from))
    };
    let first_frame = times.iter().copied().find(|t| *t >= p.start);
    let audio_times: Vec<Instant> = log.audio.iter().map(|a| a.0).collect();
    let mut switches = Vec::new();
    let mut current = None;
    for (at, layer) in frames {
        if current != Some(*layer) && switches.len() < MAX_SWITCHES {
            let t = at.saturating_duration_since(p.start).as_millis();
            switches.push((u64::try_from(t).unwrap_or(u64::MAX), *layer));
        }
        current = Some(*layer);
    }
    PublisherFigures {
        publisher,
        frames_before: count_layers(frames, p.start, p.cap),
        frames_capped: count_layers(frames, p.cap, p.uncap),
        frames_after: count_layers(frames, p.uncap, p.end),
        late_frames: [(p.start, p.cap), (p.cap, p.uncap), (p.uncap, p.end)]
            .map(|(a, b)| log.late.iter().filter(|t| (a..b).contains(*t)).count() as u64),
        layer_at_cap,
        layer_at_uncap: layer_before(p.uncap),
        layer_at_end: layer_before(p.end),
        cap_to_lower_ms: layer_at_cap.and_then(|top| since(p.cap, p.uncap, &|l| l < top)),
        freeze_before_ms: first_frame.and_then(|f| longest_gap(&times, f, p.cap).map(ms)),
        freeze_capped_ms: longest_gap(&times, p.cap, p.uncap).map(ms),
        freeze_after_ms: longest_gap(&times, p.uncap, p.end).map(ms),
        uncap_to_top_ms: since(p.uncap, p.end, &|l| l == TOP),
        video_loss_before: Loss::of(&log.video, p.start, p.cap, media::VP8_CLOCK),
        video_loss_capped: Loss::of(&log.video, p.cap, p.uncap, media::VP8_CLOCK),
        audio_loss_before: Loss::of(&log.audio, p.start, p.cap, media::OPUS_CLOCK),
        audio_loss_capped: Loss::of(&log.audio, p.cap, p.uncap, media::OPUS_CLOCK),
        audio_gap_capped_ms: longest_gap(&audio_times, p.cap, p.uncap).map(ms),
        switches,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stamp::{self, Stamp};
    use bytes::Bytes;

    fn rtp(seq: u16, marker: bool, payload: Bytes) -> RtpPacket {
        let mut p = RtpPacket::default();
        p.header.sequence_number = seq;
        p.header.timestamp = u32::from(seq) * 3000;
        p.header.marker = marker;
        p.payload = payload;
        p
    }

    /// The packets of one VP8 frame of `len` bytes from `sender` on `layer`
    /// (None: top), stamped from stamp sequence `seq`.
    fn frame(sender: u32, layer: Option<u32>, seq: u32, sent_ns: u64, len: usize) -> Vec<Bytes> {
        let data = vec![0x10u8; len];
        let parts = media::vp8_packets(&data, 1, 1200, stamp::STAMP_LEN);
        parts
            .into_iter()
            .enumerate()
            .map(|(i, mut p)| {
                let tag = layer.map_or(0, |l| (l + 1) << crate::publish::LAYER_TAG_SHIFT);
                stamp::append_trailer(
                    &mut p,
                    Stamp {
                        sender: sender | tag,
                        seq: seq + i as u32,
                        sent_ns,
                    },
                );
                p.freeze()
            })
            .collect()
    }

    #[test]
    fn gaps_include_the_edges() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let times = [at(100), at(150), at(900)];
        assert_eq!(
            longest_gap(&times, at(0), at(1000)),
            Some(Duration::from_millis(750))
        );
        assert_eq!(
            longest_gap(&times, at(200), at(400)),
            Some(Duration::from_millis(200)),
            "no frame at all: the whole phase"
        );
        assert_eq!(
            longest_gap(&times, at(120), at(2000)),
            Some(Duration::from_millis(1100))
        );
        assert_eq!(longest_gap(&times, at(5), at(5)), None);
    }

    /// Frames complete only with every packet; a lost middle packet keeps
    /// a frame incomplete until it is retransmitted; duplicates, other
    /// rooms' and our own packets are not counted; the figures follow the
    /// phases.
    #[test]
    fn frames_layers_and_phases() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut r = Recording::new(2, 3, 2);
        let mut rtp_seq = 0u16;
        let mut send = |r: &mut Recording, parts: &[Bytes], skip: Option<usize>, t: Instant| {
            for (i, p) in parts.iter().enumerate() {
                rtp_seq += 1;
                if Some(i) != skip {
                    r.absorb(
                        Kind::Video,
                        &rtp(rtp_seq, i + 1 == parts.len(), p.clone()),
                        t,
                    );
                }
            }
        };
        // Top layer from publisher 0 at 100 ms: 3 packets, complete.
        let a = frame(0, None, 0, 1, 3000);
        assert_eq!(a.len(), 3);
        send(&mut r, &a, None, at(100));
        // At 200 ms, the next frame's middle packet lost: incomplete...
        let b = frame(0, None, 3, 2, 3000);
        send(&mut r, &b, Some(1), at(200));
        // ...until its retransmission at 260 ms; a duplicate changes nothing.
        r.absorb(Kind::Video, &rtp(5, false, b[1].clone()), at(260));
        r.absorb(Kind::Video, &rtp(5, false, b[1].clone()), at(270));
        // Under the cap (from 1000 ms): layer q at 1300 ms, then nothing
        // but the top layer of the same frame, late.
        let c = frame(0, Some(0), 0, 3, 500);
        send(&mut r, &c, None, at(1300));
        send(&mut r, &frame(0, None, 100, 3, 500), None, at(1400));
        // After the uncap (2000 ms): the top layer again at 2500 ms.
        let d = frame(0, None, 6, 4, 1000);
        send(&mut r, &d, None, at(2500));
        // Not counted: our own packet, an unknown sender, audio without a stamp.
        r.absorb(
            Kind::Video,
            &rtp(99, true, frame(2, None, 0, 5, 10)[0].clone()),
            at(2600),
        );
        r.absorb(
            Kind::Video,
            &rtp(98, true, frame(7, None, 0, 5, 10)[0].clone()),
            at(2600),
        );
        r.absorb(
            Kind::Audio,
            &rtp(1, false, Bytes::from_static(&[0xf8, 1, 2])),
            at(2600),
        );
        assert_eq!(r.bad.get("own-packet"), Some(&1));
        assert_eq!(r.bad.get("unknown-sender"), Some(&1));
        assert_eq!(r.publishers[0].frames.len(), 4);

        let phases = Phases {
            start: at(0),
            cap: at(1000),
            uncap: at(2000),
            end: at(3000),
        };
        let f = &r.figures(&phases)[0];
        assert_eq!(f.frames_before, [0, 0, 2]);
        assert_eq!(f.frames_capped, [1, 0, 0]);
        assert_eq!(f.frames_after, [0, 0, 1]);
        assert_eq!(f.late_frames, [0, 1, 0]);
        assert_eq!(f.layer_at_cap, Some(TOP));
        assert_eq!(f.layer_at_uncap, Some(0));
        assert_eq!(f.cap_to_lower_ms, Some(300.0));
        assert_eq!(f.freeze_before_ms, Some(740.0), "260 ms to the cap at 1000");
        assert_eq!(f.freeze_capped_ms, Some(700.0));
        assert_eq!(f.freeze_after_ms, Some(500.0));
        assert_eq!(f.uncap_to_top_ms, Some(500.0));
        assert_eq!(f.switches, vec![(100, TOP), (1300, 0), (2500, TOP)]);
        // The lost packet came back: no RTP loss before the cap.
        assert_eq!(f.video_loss_before.lost, 0);
        assert_eq!(f.video_loss_before.received, 6);
        // Publisher 1 sent nothing: the whole capped phase is a freeze.
        let g = &r.figures(&phases)[1];
        assert_eq!(g.freeze_capped_ms, Some(1000.0));
        assert_eq!(g.layer_at_cap, None);
        assert_eq!(g.cap_to_lower_ms, None);
        assert_eq!(g.audio_gap_capped_ms, Some(1000.0));
    }

    #[test]
    fn loss_counts_sequence_gaps_in_the_phase() {
        let t0 = Instant::now();
        let p: Vec<_> = [1u16, 2, 4, 5, 9]
            .iter()
            .map(|s| (t0 + Duration::from_millis(u64::from(*s)), *s, 0, 10))
            .collect();
        let l = Loss::of(&p, t0, t0 + Duration::from_millis(6), 90_000);
        assert_eq!((l.received, l.expected, l.lost), (4, 5, 1));
        assert_eq!(l.percent, 20.0);
        assert_eq!(Loss::of(&p, t0, t0, 90_000), Loss::default());
    }
}
