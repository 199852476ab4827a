//! The publishing side of a media load, shared by every adapter (`run`
//! against Switchboard, `janus` against Janus) so that both send byte for
//! byte the same media: what a publisher sends ([`MediaPlan`]: the VP8 clip
//! at the frame rate of `--video-kbps`, the Opus tone), one paced stream of
//! it ([`Publisher`], [`send_next`], on the run's [`Schedule`]: frames in a
//! loop, RFC 7741 packetized, every packet stamped with sender, sequence and
//! send time), what a participant sent ([`Sent`]), and on the receiving side the stamp check ([`read_stamp`],
//! [`check_sender`]) and the per-(publisher, kind) accounting ([`Flow`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng;
use serde::Serialize;
use switchboard_client::Kind;
use tokio::time::MissedTickBehavior;

use crate::media::{self, OpusClip, Vp8Clip};
use crate::rxstats::{RtpStats, StampFlow};
use crate::stamp::{self, Stamp};

/// Stamp sequence numbers above this are treated as damage (a run sends far
/// fewer).
pub const MAX_SEQ: u32 = 1 << 24;
/// Opus frame interval of the published audio.
pub const AUDIO_FRAME: Duration = Duration::from_millis(20);

/// When the media phase happens, on the generator's clock.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Publishing starts (each stream at a random phase within its period).
    pub warmup_start: Instant,
    /// The measurement window `[t0, t1)`; publishing stops at `t1`.
    pub t0: Instant,
    pub t1: Instant,
    /// Receivers stop reading and leave.
    pub end: Instant,
    t0_ns: u64,
    t1_ns: u64,
}

impl Schedule {
    /// Warm-up from `warmup_start`, then the window, then the drain; `base`
    /// is the run's origin, on which stamps carry their send time.
    pub fn new(
        base: Instant,
        warmup_start: Instant,
        warmup: Duration,
        duration: Duration,
        drain: Duration,
    ) -> Schedule {
        let t0 = warmup_start + warmup;
        let t1 = t0 + duration;
        Schedule {
            warmup_start,
            t0,
            t1,
            end: t1 + drain,
            t0_ns: ns_since(base, t0),
            t1_ns: ns_since(base, t1),
        }
    }

    /// Whether a packet sent at `sent_ns` belongs to the window.
    pub fn in_window(&self, sent_ns: u64) -> bool {
        (self.t0_ns..self.t1_ns).contains(&sent_ns)
    }
}

/// Nanoseconds from `base` to `t` (0 before it).
pub fn ns_since(base: Instant, t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX)
}

/// What every publisher sends.
#[derive(Debug, Clone)]
pub struct MediaPlan {
    pub audio: Option<Arc<OpusClip>>,
    /// The clip and the interval between its frames.
    pub video: Option<(Arc<Vp8Clip>, Duration)>,
}

impl MediaPlan {
    pub fn kinds(&self) -> Vec<Kind> {
        let mut k = Vec::new();
        if self.audio.is_some() {
            k.push(Kind::Audio);
        }
        if self.video.is_some() {
            k.push(Kind::Video);
        }
        k
    }
}

/// Loads and encodes the media every publisher sends.
pub fn media_plan(video_kbps: u32, audio: bool) -> Result<MediaPlan, String> {
    let audio = if audio {
        Some(Arc::new(OpusClip::default_tone()?))
    } else {
        None
    };
    let video = if video_kbps > 0 {
        let clip = Vp8Clip::builtin()?;
        let fps = clip.fps_for(f64::from(video_kbps));
        if !(1.0..=120.0).contains(&fps) {
            return Err(format!(
                "--video-kbps {video_kbps} needs {fps:.1} frames/s of a {:.0} kbit/s clip at \
                 {} fps; keep it within 1-120 frames/s ({:.0}-{:.0} kbit/s)",
                clip.natural_kbps(),
                clip.fps,
                clip.natural_kbps() / clip.fps,
                clip.natural_kbps() * 120.0 / clip.fps
            ));
        }
        Some((Arc::new(clip), Duration::from_secs_f64(1.0 / fps)))
    } else {
        None
    };
    if audio.is_none() && video.is_none() {
        return Err("nothing to publish: --video-kbps is 0 and no --audio".into());
    }
    Ok(MediaPlan { audio, video })
}

#[derive(Debug, Serialize)]
pub struct MediaSource {
    pub video: Option<VideoSource>,
    pub audio: Option<AudioSource>,
    /// Where the sender/sequence/send-time stamp travels.
    pub stamp: &'static str,
}

#[derive(Debug, Serialize)]
pub struct VideoSource {
    pub codec: &'static str,
    pub clip: &'static str,
    pub width: u16,
    pub height: u16,
    pub clip_fps: f64,
    pub clip_frames: usize,
    pub clip_keyframes: usize,
    /// The clip's frame data rate at its own frame rate.
    pub clip_kbps: f64,
    /// Frames per second sent: the clip's rate scaled to `--video-kbps`.
    pub sent_fps: f64,
    pub pacing: &'static str,
}

#[derive(Debug, Serialize)]
pub struct AudioSource {
    pub codec: &'static str,
    pub source: &'static str,
    pub frame_ms: u32,
    pub encoder_bitrate_bps: i32,
    pub loop_frames: usize,
}

impl MediaPlan {
    /// What this plan sends, for a report.
    pub fn source(&self) -> MediaSource {
        let plan = self;
        MediaSource {
            video: plan.video.as_ref().map(|(clip, period)| VideoSource {
                codec: "VP8 (RFC 7741, 15-bit picture ID, <= 1200-byte payloads)",
                clip: "loadtest/media/clip.ivf",
                width: clip.width,
                height: clip.height,
                clip_fps: clip.fps,
                clip_frames: clip.frames.len(),
                clip_keyframes: clip.keyframes(),
                clip_kbps: clip.natural_kbps(),
                sent_fps: 1.0 / period.as_secs_f64(),
                pacing: "the clip in a loop, frames as encoded, at its frame rate scaled to \
                     --video-kbps; a frame's packets back to back",
            }),
            audio: plan.audio.as_ref().map(|clip| AudioSource {
                codec: "Opus 48 kHz mono",
                source: "440 Hz tone encoded with libopus at start-up",
                frame_ms: 20,
                encoder_bitrate_bps: clip.bitrate,
                loop_frames: clip.frames.len(),
            }),
            stamp: "VP8: an 18-byte trailer after the frame data of every packet; \
                Opus: the padding of a code 3 packet (decodes unchanged)",
        }
    }
}

impl MediaSource {
    /// The report table's lines about the media.
    pub fn write_lines(&self, t: &mut String, video_kbps: u32) -> std::fmt::Result {
        use std::fmt::Write as _;
        if let Some(v) = &self.video {
            writeln!(
                t,
                "  video        VP8 {}x{} clip ({} frames, {} keyframes, {:.0} kbit/s at {} fps) looped at {:.1} fps for {} kbit/s",
                v.width, v.height, v.clip_frames, v.clip_keyframes, v.clip_kbps, v.clip_fps, v.sent_fps, video_kbps
            )?;
        }
        if let Some(a) = &self.audio {
            writeln!(
                t,
                "  audio        {}, {} ms frames, {} kbit/s encoder ({})",
                a.codec,
                a.frame_ms,
                a.encoder_bitrate_bps / 1000,
                a.source
            )?;
        }
        Ok(())
    }
}

/// What a participant sent on one stream.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sent {
    /// RTP packets over the whole media phase.
    pub total: u64,
    /// RTP packets sent inside the measurement window.
    pub window: u64,
    /// RTP payload bytes (media + descriptor + stamp) inside the window.
    pub window_bytes: u64,
    /// Media frames (VP8 frames, Opus frames) inside the window, and keyframes.
    pub window_frames: u64,
    pub window_keyframes: u64,
    /// `send_rtp` refused (the client task had stopped).
    pub errors: u64,
}

/// What one subscriber got from one (publisher, kind).
#[derive(Debug)]
pub struct Flow {
    /// By the stamp: window accounting and latency.
    pub stamp: StampFlow,
    /// By the RTP header, for the packets sent inside the window.
    pub rtp: RtpStats,
}

impl Flow {
    pub fn new(kind: Kind) -> Flow {
        Flow {
            stamp: StampFlow::default(),
            rtp: RtpStats::new(clock_rate(kind)),
        }
    }
}

pub fn clock_rate(kind: Kind) -> u32 {
    match kind {
        Kind::Audio => media::OPUS_CLOCK,
        Kind::Video => media::VP8_CLOCK,
    }
}

pub fn kind_index(kind: Kind) -> usize {
    match kind {
        Kind::Audio => 0,
        Kind::Video => 1,
    }
}

pub const KIND_NAMES: [&str; 2] = ["audio", "video"];

impl Sent {
    /// One frame built, sent (or not) in the window.
    pub fn frame(&mut self, in_window: bool, keyframe: bool) {
        if in_window {
            self.window_frames += 1;
            self.window_keyframes += u64::from(keyframe);
        }
    }

    /// One RTP packet handed to the transport (`ok`) or refused.
    pub fn packet(&mut self, ok: bool, in_window: bool, bytes: usize) {
        if !ok {
            self.errors += 1;
            return;
        }
        self.total += 1;
        if in_window {
            self.window += 1;
            self.window_bytes += bytes as u64;
        }
    }
}

/// One frame's RTP packets (payload, marker), all with one timestamp.
#[derive(Debug)]
pub struct Frame {
    pub packets: Vec<(Bytes, bool)>,
    pub timestamp: u32,
    pub keyframe: bool,
    /// Send time stamped in every packet, ns since the run's base.
    pub sent_ns: u64,
    /// Packets that could not be built (an Opus frame that is not code 0).
    pub errors: u64,
}

/// One stream a participant publishes: frames of a clip in a loop, paced by
/// its own timer.
#[derive(Debug)]
pub struct Publisher {
    pub kind: Kind,
    /// Stamp sequence: packets sent on this stream so far.
    seq: u32,
    /// Frames sent so far (drives the RTP timestamp).
    frame: u64,
    /// Added to `frame` to index the looping clip: a keyframe request moves
    /// it so that the next frame sent is one of the clip's keyframes, as an
    /// encoder answers a PLI with a keyframe.
    clip_shift: u64,
    /// Keyframe requests answered.
    pub keyframes_requested: u64,
    period: Duration,
    interval: Option<tokio::time::Interval>,
}

impl Publisher {
    /// Starts at a random phase of the first period after `warmup_start`.
    pub fn start(kind: Kind, period: Duration, warmup_start: Instant) -> Publisher {
        let phase = period.mul_f64(rand::rng().random::<f64>());
        let mut interval = tokio::time::interval_at((warmup_start + phase).into(), period);
        // Late ticks are skipped, not sent in a burst: the rate may fall under
        // load (the report shows what was sent), the pacing stays.
        interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
        Publisher {
            kind,
            seq: 0,
            frame: 0,
            clip_shift: 0,
            keyframes_requested: 0,
            period,
            interval: Some(interval),
        }
    }

    /// The publishers of `plan`, indexed like [`kind_index`].
    pub fn all(plan: &MediaPlan, warmup_start: Instant) -> [Option<Publisher>; 2] {
        [
            plan.audio
                .as_ref()
                .map(|_| Publisher::start(Kind::Audio, AUDIO_FRAME, warmup_start)),
            plan.video
                .as_ref()
                .map(|(_, period)| Publisher::start(Kind::Video, *period, warmup_start)),
        ]
    }

    /// The next frame (one Opus packet, or the RTP packets of one VP8 frame,
    /// to be sent back to back as an encoder would), stamped `sender` and the
    /// time now; `None` (and the stream stops) from `end` on.
    pub fn next_frame(
        &mut self,
        plan: &MediaPlan,
        sender: usize,
        base: Instant,
        end: Instant,
    ) -> Option<Frame> {
        let now = Instant::now();
        if now >= end {
            self.interval = None;
            return None;
        }
        let sent_ns = ns_since(base, now);
        // RTP timestamp: the frame's nominal capture time on the media clock.
        // In integers: frame × period × clock, rounded (wraps like RTP).
        let timestamp =
            ((u128::from(self.frame) * self.period.as_nanos() * u128::from(clock_rate(self.kind))
                + 500_000_000)
                / 1_000_000_000) as u32;
        let mut out = Frame {
            packets: Vec::new(),
            timestamp,
            keyframe: false,
            sent_ns,
            errors: 0,
        };
        let sender = sender as u32;
        match self.kind {
            Kind::Audio => {
                let clip = plan.audio.as_ref()?;
                let frame = &clip.frames[(self.frame % clip.frames.len() as u64) as usize];
                // (Audio has no keyframes: `clip_shift` stays 0.)
                let stamp = Stamp {
                    sender,
                    seq: self.seq,
                    sent_ns,
                };
                match stamp::opus_stamped(frame, stamp) {
                    Some(p) => {
                        out.packets.push((p, self.frame == 0));
                        self.seq += 1;
                    }
                    None => out.errors += 1,
                }
            }
            Kind::Video => {
                let (clip, _) = plan.video.as_ref()?;
                let at =
                    (self.frame.wrapping_add(self.clip_shift) % clip.frames.len() as u64) as usize;
                let f = &clip.frames[at];
                out.keyframe = f.keyframe;
                let parts = media::vp8_packets(
                    &f.data,
                    (self.frame & 0x7fff) as u16,
                    media::MAX_RTP_PAYLOAD,
                    stamp::STAMP_LEN,
                );
                let n = parts.len();
                for (i, mut p) in parts.into_iter().enumerate() {
                    let stamp = Stamp {
                        sender,
                        seq: self.seq,
                        sent_ns,
                    };
                    self.seq += 1;
                    stamp::append_trailer(&mut p, stamp);
                    out.packets.push((p.freeze(), i + 1 == n));
                }
            }
        }
        self.frame += 1;
        Some(out)
    }
}

impl Publisher {
    /// The server asked for a keyframe (a PLI): the next video frame sent is
    /// the clip's next keyframe (at or after the current position, looping),
    /// unless it already is one. The RTP timestamp runs on unchanged.
    pub fn keyframe_requested(&mut self, plan: &MediaPlan) {
        let Some((clip, _)) = plan.video.as_ref().filter(|_| self.kind == Kind::Video) else {
            return;
        };
        let len = clip.frames.len() as u64;
        if len == 0 {
            return;
        }
        let at = self.frame.wrapping_add(self.clip_shift) % len;
        let ahead = (0..len)
            .find(|d| clip.frames[((at + d) % len) as usize].keyframe)
            .unwrap_or(0);
        self.clip_shift = self.clip_shift.wrapping_add(ahead) % len;
        self.keyframes_requested += 1;
    }
}

/// Sends the next frame of `p` from participant `sender` through `send_rtp`
/// (kind, payload, marker, RTP timestamp → handed over), counting it in
/// `sent`; stops the stream at the end of the window. Returns the packets
/// handed over.
pub fn send_next(
    p: &mut Publisher,
    plan: &MediaPlan,
    sender: usize,
    base: Instant,
    schedule: &Schedule,
    sent: &mut [Sent; 2],
    mut send_rtp: impl FnMut(Kind, Bytes, bool, u32) -> bool,
) -> u64 {
    let Some(frame) = p.next_frame(plan, sender, base, schedule.t1) else {
        return 0;
    };
    let in_window = schedule.in_window(frame.sent_ns);
    let sent = &mut sent[kind_index(p.kind)];
    sent.errors += frame.errors;
    sent.frame(in_window, frame.keyframe);
    let mut handed = 0;
    for (payload, marker) in frame.packets {
        let len = payload.len();
        let ok = send_rtp(p.kind, payload, marker, frame.timestamp);
        sent.packet(ok, in_window, len);
        handed += u64::from(ok);
    }
    handed
}

/// Waits for the next tick of `p`; never resolves for a stopped stream.
pub async fn tick(p: &mut Option<Publisher>) {
    match p.as_mut().and_then(|p| p.interval.as_mut()) {
        Some(iv) => {
            iv.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The stamp of a received payload of `kind`: in the Opus padding, or the
/// trailer after a VP8 payload descriptor.
pub fn read_stamp(kind: Kind, payload: &[u8]) -> Result<Stamp, stamp::Bad> {
    match kind {
        Kind::Audio => stamp::opus_split(payload).map(|(_, s)| s),
        Kind::Video => stamp::split_trailer(payload).and_then(|(m, s)| {
            media::vp8_descriptor(m)
                .map(|_| s)
                .ok_or(stamp::Bad::Framing)
        }),
    }
}

/// Why a stamped packet cannot be counted by subscriber `me` in rooms of
/// `per_room` out of `total` participants, if it cannot.
pub fn check_sender(
    stamp: &Stamp,
    me: usize,
    per_room: usize,
    total: usize,
) -> Option<&'static str> {
    let sender = stamp.sender as usize;
    if sender >= total || stamp.seq > MAX_SEQ {
        Some("unknown-sender")
    } else if sender == me {
        Some("own-packet")
    } else if sender / per_room != me / per_room {
        Some("other-room")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_plans() {
        let p = media_plan(500, true).expect("plan");
        assert_eq!(p.kinds(), vec![Kind::Audio, Kind::Video]);
        let (clip, period) = p.video.as_ref().expect("video");
        // The frame interval that makes the clip's frame data 500 kbit/s.
        let kbps =
            clip.bytes() as f64 * 8.0 / 1e3 / clip.frames.len() as f64 / period.as_secs_f64();
        assert!((kbps - 500.0).abs() < 1.0, "{kbps}");
        assert_eq!(
            media_plan(0, true).expect("audio only").kinds(),
            vec![Kind::Audio]
        );
        assert_eq!(
            media_plan(300, false).expect("video only").kinds(),
            vec![Kind::Video]
        );
        assert!(media_plan(0, false).is_err());
        assert!(media_plan(100_000, false).is_err(), "beyond 120 fps");
    }

    #[tokio::test]
    async fn frames_are_stamped_packetized_and_counted() {
        let plan = media_plan(500, true).expect("plan");
        let base = Instant::now();
        // The window is open from now on for a minute.
        let s = Schedule::new(
            base,
            base,
            Duration::ZERO,
            Duration::from_secs(60),
            Duration::ZERO,
        );
        let [audio, video] = Publisher::all(&plan, s.warmup_start);
        let (mut audio, mut video) = (audio.expect("audio"), video.expect("video"));
        let mut sent = [Sent::default(); 2];
        let mut got: Vec<(Kind, Bytes, bool, u32)> = Vec::new();
        for _ in 0..3 {
            send_next(&mut audio, &plan, 7, base, &s, &mut sent, |k, p, m, t| {
                got.push((k, p, m, t));
                true
            });
        }
        let audio_pkts = std::mem::take(&mut got);
        assert_eq!(audio_pkts.len(), 3);
        for (i, (k, p, _, ts)) in audio_pkts.iter().enumerate() {
            assert_eq!(*k, Kind::Audio);
            // 20 ms frames on the 48 kHz clock.
            assert_eq!(*ts, 960 * i as u32);
            let st = read_stamp(Kind::Audio, p).expect("stamped Opus");
            assert_eq!((st.sender, st.seq), (7, i as u32));
        }
        // A refused packet is an error, not a sent packet.
        let handed = send_next(&mut video, &plan, 7, base, &s, &mut sent, |k, p, m, t| {
            got.push((k, p, m, t));
            false
        });
        assert_eq!(handed, 0);
        let refused = got.len() as u64;
        assert!(refused > 0);
        got.clear();
        let handed = send_next(&mut video, &plan, 7, base, &s, &mut sent, |k, p, m, t| {
            got.push((k, p, m, t));
            true
        });
        assert_eq!(handed, got.len() as u64);
        // One frame: every packet but the last without the marker, one
        // timestamp, stamps numbered on from the refused frame's.
        let last = got.len() - 1;
        for (i, (k, p, m, ts)) in got.iter().enumerate() {
            assert_eq!(*k, Kind::Video);
            assert_eq!(*m, i == last);
            assert_eq!(*ts, got[0].3);
            assert!(p.len() <= media::MAX_RTP_PAYLOAD);
            let st = read_stamp(Kind::Video, p).expect("stamped VP8");
            assert_eq!(st.seq as u64, refused + i as u64);
        }
        assert_eq!(sent[0].window, 3);
        assert_eq!(sent[1].errors, refused);
        assert_eq!(sent[1].window, got.len() as u64);
        assert_eq!(sent[1].window_frames, 2);
        // The clip starts with a keyframe.
        assert_eq!(sent[1].window_keyframes, 1);
        // Nothing after the window.
        let over = Schedule::new(base, base, Duration::ZERO, Duration::ZERO, Duration::ZERO);
        assert_eq!(
            send_next(
                &mut audio,
                &plan,
                7,
                base,
                &over,
                &mut sent,
                |_, _, _, _| true
            ),
            0
        );
    }

    #[tokio::test]
    async fn a_keyframe_request_makes_the_next_frame_a_keyframe_and_time_runs_on() {
        let plan = media_plan(500, false).expect("plan");
        let base = Instant::now();
        let s = Schedule::new(
            base,
            base,
            Duration::ZERO,
            Duration::from_secs(60),
            Duration::ZERO,
        );
        let [_, video] = Publisher::all(&plan, s.warmup_start);
        let mut video = video.expect("video");
        let mut sent = [Sent::default(); 2];
        let mut frame = |v: &mut Publisher| {
            let mut ts = None;
            let before = sent[1].window_keyframes;
            send_next(v, &plan, 0, base, &s, &mut sent, |_, _, _, t| {
                ts = Some(t);
                true
            });
            (sent[1].window_keyframes > before, ts.expect("a frame"))
        };
        let (key, ts0) = frame(&mut video);
        assert!(key, "the clip starts with a keyframe");
        let (key, ts1) = frame(&mut video);
        assert!(!key);
        for _ in 0..3 {
            video.keyframe_requested(&plan);
            let (key, ts) = frame(&mut video);
            assert!(key, "a requested keyframe comes next");
            let (key, ts_next) = frame(&mut video);
            assert!(!key, "and then deltas again");
            // (Frame times are rounded to the 90 kHz clock: ±1.)
            let step = i64::from(ts_next.wrapping_sub(ts)) - i64::from(ts1.wrapping_sub(ts0));
            assert!(step.abs() <= 1, "the clock runs on evenly: {step}");
        }
        assert_eq!(video.keyframes_requested, 3);
        // Audio ignores requests.
        let [audio, _] = Publisher::all(&media_plan(500, true).expect("plan"), s.warmup_start);
        let mut audio = audio.expect("audio");
        audio.keyframe_requested(&plan);
        assert_eq!(audio.keyframes_requested, 0);
    }

    #[test]
    fn stamps_are_checked_against_the_rooms() {
        let st = |sender, seq| Stamp {
            sender,
            seq,
            sent_ns: 0,
        };
        // 2 rooms of 3: participant 4 is in room 1 with 3 and 5.
        assert_eq!(check_sender(&st(3, 0), 4, 3, 6), None);
        assert_eq!(check_sender(&st(4, 0), 4, 3, 6), Some("own-packet"));
        assert_eq!(check_sender(&st(1, 0), 4, 3, 6), Some("other-room"));
        assert_eq!(check_sender(&st(6, 0), 4, 3, 6), Some("unknown-sender"));
        assert_eq!(
            check_sender(&st(3, MAX_SEQ + 1), 4, 3, 6),
            Some("unknown-sender")
        );
    }
}
