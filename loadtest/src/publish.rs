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
    /// `--simulcast`: the lower layers sent next to the clip.
    pub simulcast: Option<Arc<Simulcast>>,
}

/// The rids a `--simulcast` publisher offers, lowest layer first; the
/// top one (`f`) carries the clip as is.
pub const SIMULCAST_RIDS: [&str; 3] = ["q", "h", "f"];

/// A stamp's sender field carries, above this bit, 1 + the index of the
/// lower simulcast layer the packet was sent on (0 for the top layer and
/// without simulcast), so a receiver can tell the layers apart while
/// the top layer's packets read exactly as without simulcast.
pub const LAYER_TAG_SHIFT: u32 = 24;

/// `--simulcast`'s two lower layers (`q`, `h`), built once from the clip:
/// every frame of the clip cut to 1/9 and 3/9 of its bytes, keyframes
/// with the picture size in their header rewritten to 1/4 and 1/2 of the
/// clip's (so the server, which ranks layers by the keyframes' size, ranks
/// them below the clip). Same frame rate and timestamps as the top layer,
/// so each layer's bit rate is 1/9, 3/9, 9/9 of `--video-kbps`. The cut
/// frames do not decode; the subscribers only count packets.
#[derive(Debug)]
pub struct Simulcast {
    /// Per lower layer (q, h), the clip's frames, cut.
    pub layers: [Vec<media::Vp8Frame>; 2],
    /// Per lower layer, the picture size its keyframes declare.
    pub sizes: [(u16, u16); 2],
}

impl Simulcast {
    /// The lower layers of `clip`.
    pub fn of(clip: &Vp8Clip) -> Simulcast {
        let layer = |ninths: usize, div: u16| {
            let size = ((clip.width / div).max(1), (clip.height / div).max(1));
            let frames = clip
                .frames
                .iter()
                .map(|f| media::Vp8Frame {
                    data: media::vp8_cut(&f.data, f.data.len() * ninths / 9, size),
                    keyframe: f.keyframe,
                })
                .collect();
            (frames, size)
        };
        let (q, q_size) = layer(1, 4);
        let (h, h_size) = layer(3, 2);
        Simulcast {
            layers: [q, h],
            sizes: [q_size, h_size],
        }
    }
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
    Ok(MediaPlan {
        audio,
        video,
        simulcast: None,
    })
}

impl MediaPlan {
    /// The same plan with `--simulcast`'s lower layers; an error without video.
    pub fn with_simulcast(mut self) -> Result<MediaPlan, String> {
        let (clip, _) = self
            .video
            .as_ref()
            .ok_or("--simulcast needs video (--video-kbps above 0)")?;
        self.simulcast = Some(Arc::new(Simulcast::of(clip)));
        Ok(self)
    }
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
    /// `--simulcast`: the lower layers' packets (layer index into
    /// [`SIMULCAST_RIDS`], payload, marker), same timestamp; `packets` is
    /// the top layer.
    pub lower: Vec<(usize, Bytes, bool)>,
}

/// One stream a participant publishes: frames of a clip in a loop, paced by
/// its own timer.
#[derive(Debug)]
pub struct Publisher {
    pub kind: Kind,
    /// Stamp sequence: packets sent on this stream so far.
    seq: u32,
    /// Stamp sequence of each lower simulcast layer.
    lower_seq: [u32; 2],
    /// Frames sent so far (drives the RTP timestamp).
    frame: u64,
    /// Added to `frame` to index the looping clip: a keyframe request moves
    /// it so that the next frame sent is one of the clip's keyframes, as an
    /// encoder answers a PLI with a keyframe.
    clip_shift: u64,
    /// Keyframe requests answered.
    pub keyframes_requested: u64,
    /// `--simulcast`: which layers (indexed like [`SIMULCAST_RIDS`]) are
    /// sent; the server's `publisher-layers` turns them off and on
    /// ([`Publisher::set_layers`]), as a browser applies it to its encoder.
    active: [bool; 3],
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
            lower_seq: [0; 2],
            frame: 0,
            clip_shift: 0,
            keyframes_requested: 0,
            active: [true; 3],
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
            lower: Vec::new(),
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
                let top_active = plan.simulcast.is_none() || self.active[SIMULCAST_RIDS.len() - 1];
                for (i, mut p) in parts.into_iter().enumerate().filter(|_| top_active) {
                    let stamp = Stamp {
                        sender,
                        seq: self.seq,
                        sent_ns,
                    };
                    self.seq += 1;
                    stamp::append_trailer(&mut p, stamp);
                    out.packets.push((p.freeze(), i + 1 == n));
                }
                if let Some(sc) = plan.simulcast.as_ref() {
                    for (layer, frames) in sc.layers.iter().enumerate() {
                        if !self.active[layer] {
                            continue;
                        }
                        let Some(f) = frames.get(at) else { continue };
                        let parts = media::vp8_packets(
                            &f.data,
                            (self.frame & 0x7fff) as u16,
                            media::MAX_RTP_PAYLOAD,
                            stamp::STAMP_LEN,
                        );
                        let n = parts.len();
                        for (i, mut p) in parts.into_iter().enumerate() {
                            let stamp = Stamp {
                                sender: sender | ((layer as u32 + 1) << LAYER_TAG_SHIFT),
                                seq: self.lower_seq[layer],
                                sent_ns,
                            };
                            self.lower_seq[layer] += 1;
                            stamp::append_trailer(&mut p, stamp);
                            out.lower.push((layer, p.freeze(), i + 1 == n));
                        }
                    }
                }
            }
        }
        self.frame += 1;
        Some(out)
    }
}

impl Publisher {
    /// `publisher-layers`: only the layers whose rid is in `active` are
    /// sent from now on (an empty or unknown list changes nothing). A layer
    /// that comes back starts with a keyframe, as an encoder's does.
    /// Returns whether anything changed.
    pub fn set_layers(&mut self, plan: &MediaPlan, active: &[String]) -> bool {
        if self.kind != Kind::Video || plan.simulcast.is_none() {
            return false;
        }
        let next: [bool; 3] =
            std::array::from_fn(|i| active.iter().any(|rid| rid == SIMULCAST_RIDS[i]));
        if !next.contains(&true) || next == self.active {
            return false;
        }
        let resumed = next.iter().zip(self.active).any(|(n, was)| *n && !was);
        self.active = next;
        if resumed {
            self.keyframe_requested(plan);
        }
        true
    }

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
    send_rtp: impl FnMut(Kind, Bytes, bool, u32) -> bool,
) -> u64 {
    let no_lower = |_: usize, _: Bytes, _: bool, _: u32| false;
    send_next_layers(p, plan, sender, base, schedule, sent, send_rtp, no_lower).0
}

/// [`send_next`] with `--simulcast`'s lower layers: the top layer goes
/// through `send_rtp` (and is what `Sent` and the first count cover), each
/// lower layer's packets through `send_lower(layer, ..)` after it. Returns
/// (top-layer packets handed over, lower-layer packets handed over).
#[allow(clippy::too_many_arguments)]
pub fn send_next_layers(
    p: &mut Publisher,
    plan: &MediaPlan,
    sender: usize,
    base: Instant,
    schedule: &Schedule,
    sent: &mut [Sent; 2],
    mut send_rtp: impl FnMut(Kind, Bytes, bool, u32) -> bool,
    mut send_lower: impl FnMut(usize, Bytes, bool, u32) -> bool,
) -> (u64, u64) {
    let Some(frame) = p.next_frame(plan, sender, base, schedule.t1) else {
        return (0, 0);
    };
    let in_window = schedule.in_window(frame.sent_ns);
    let sent = &mut sent[kind_index(p.kind)];
    sent.errors += frame.errors;
    // A frame of a paused top layer (dynacast) is not sent, nor counted.
    if p.kind == Kind::Audio || !frame.packets.is_empty() {
        sent.frame(in_window, frame.keyframe);
    }
    let mut handed = 0;
    for (payload, marker) in frame.packets {
        let len = payload.len();
        let ok = send_rtp(p.kind, payload, marker, frame.timestamp);
        sent.packet(ok, in_window, len);
        handed += u64::from(ok);
    }
    let mut lower = 0;
    for (layer, payload, marker) in frame.lower {
        lower += u64::from(send_lower(layer, payload, marker, frame.timestamp));
    }
    (handed, lower)
}

/// Splits the lower-layer tag off a stamp's sender: the stamp as it would
/// be without simulcast, and the lower layer (index into
/// [`SIMULCAST_RIDS`]) the packet was sent on, `None` for the top layer.
pub fn split_layer(mut stamp: Stamp) -> (Stamp, Option<usize>) {
    let tag = stamp.sender >> LAYER_TAG_SHIFT;
    stamp.sender &= (1 << LAYER_TAG_SHIFT) - 1;
    (stamp, tag.checked_sub(1).map(|l| l as usize))
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

    /// A 500 kbit/s simulcast plan, a minute-long window from now and its
    /// video publisher.
    fn simulcast_video() -> (MediaPlan, Instant, Schedule, Publisher) {
        let plan = media_plan(500, false)
            .expect("plan")
            .with_simulcast()
            .expect("simulcast");
        let base = Instant::now();
        let s = Schedule::new(
            base,
            base,
            Duration::ZERO,
            Duration::from_secs(60),
            Duration::ZERO,
        );
        let [_, video] = Publisher::all(&plan, s.warmup_start);
        (plan, base, s, video.expect("video"))
    }

    #[tokio::test]
    async fn simulcast_sends_three_layers_at_one_third_steps() {
        assert!(media_plan(0, true)
            .expect("audio")
            .with_simulcast()
            .is_err());
        let (plan, base, s, mut video) = simulcast_video();
        let sc = plan.simulcast.clone().expect("layers");
        assert_eq!(sc.sizes, [(80, 60), (160, 120)]);
        let mut sent = [Sent::default(); 2];
        let (clip, _) = plan.video.as_ref().expect("clip");
        let mut bytes = [0usize; 3];
        let mut seqs: [Vec<u32>; 3] = Default::default();
        for frame in 0..clip.frames.len() {
            let mut top = Vec::new();
            let mut lower = Vec::new();
            let (handed, low) = send_next_layers(
                &mut video,
                &plan,
                7,
                base,
                &s,
                &mut sent,
                |_, p, m, t| {
                    top.push((p, m, t));
                    true
                },
                |l, p, m, t| {
                    lower.push((l, p, m, t));
                    true
                },
            );
            assert_eq!((handed, low), (top.len() as u64, lower.len() as u64));
            for (p, _, t) in &top {
                let (st, layer) = split_layer(read_stamp(Kind::Video, p).expect("stamp"));
                assert_eq!((st.sender, layer), (7, None));
                assert_eq!(*t, top[0].2);
                bytes[2] += p.len();
                seqs[2].push(st.seq);
            }
            for (l, p, _, t) in &lower {
                let (st, layer) = split_layer(read_stamp(Kind::Video, p).expect("stamp"));
                assert_eq!((st.sender, layer), (7, Some(*l)));
                assert_eq!(*t, top[0].2, "one timestamp for every layer of a frame");
                bytes[*l] += p.len();
                seqs[*l].push(st.seq);
            }
            // Each layer's last packet of the frame has the marker.
            for l in 0..2 {
                let marks: Vec<bool> = lower.iter().filter(|x| x.0 == l).map(|x| x.2).collect();
                assert_eq!(marks.iter().filter(|m| **m).count(), 1, "frame {frame}");
                assert_eq!(marks.last(), Some(&true));
            }
            if frame == 0 {
                // The keyframe's size, as the server reads it, per layer.
                for (l, (w, h)) in sc.sizes.iter().enumerate() {
                    let p = &lower.iter().find(|x| x.0 == l).expect("packet").1;
                    let d = media::vp8_descriptor(p).expect("descriptor");
                    let f = &p[d.len..];
                    assert_eq!(&f[3..6], &[0x9d, 0x01, 0x2a]);
                    assert_eq!(u16::from_le_bytes([f[6], f[7]]) & 0x3fff, *w);
                    assert_eq!(u16::from_le_bytes([f[8], f[9]]) & 0x3fff, *h);
                }
            }
        }
        // Each layer's stamps count on from 0 by itself.
        for q in &seqs {
            assert_eq!(*q, (0..q.len() as u32).collect::<Vec<_>>());
        }
        // About 1/9 and 3/9 of the top layer's bytes (descriptor and stamp
        // per packet on top of the frame data).
        let ratio = |l: usize| bytes[l] as f64 / bytes[2] as f64;
        assert!((0.10..0.16).contains(&ratio(0)), "q/f {}", ratio(0));
        assert!((0.32..0.38).contains(&ratio(1)), "h/f {}", ratio(1));
    }

    #[tokio::test]
    async fn publisher_layers_pause_and_resume_layers_and_a_resumed_layer_starts_at_a_keyframe() {
        let (plan, base, s, mut video) = simulcast_video();
        let mut sent = [Sent::default(); 2];
        // Sends one frame: (layers that carried packets, q/h/f; whether it
        // was a keyframe).
        let frame = |video: &mut Publisher, sent: &mut [Sent; 2]| {
            let mut top = false;
            let mut lower = [false; 2];
            let keyframes = sent[1].window_keyframes;
            send_next_layers(
                video,
                &plan,
                1,
                base,
                &s,
                sent,
                |_, _, _, _| {
                    top = true;
                    true
                },
                |l, _, _, _| {
                    lower[l] = true;
                    true
                },
            );
            (
                [lower[0], lower[1], top],
                sent[1].window_keyframes > keyframes,
            )
        };
        assert_eq!(frame(&mut video, &mut sent).0, [true; 3]);
        let rids = |r: &[&str]| r.iter().map(|r| (*r).to_owned()).collect::<Vec<_>>();
        // Nothing to change, nothing active, unknown rids: no change.
        assert!(!video.set_layers(&plan, &rids(&["q", "h", "f"])));
        assert!(!video.set_layers(&plan, &[]));
        assert!(!video.set_layers(&plan, &rids(&["x"])));
        assert!(video.set_layers(&plan, &rids(&["q", "f"])));
        for _ in 0..5 {
            assert_eq!(frame(&mut video, &mut sent).0, [true, false, true]);
        }
        let top_frames = sent[1].window_frames;
        assert!(video.set_layers(&plan, &rids(&["q"])));
        for _ in 0..5 {
            assert_eq!(frame(&mut video, &mut sent).0, [true, false, false]);
        }
        assert_eq!(
            sent[1].window_frames, top_frames,
            "a paused top layer's frames are not counted"
        );
        let requested = video.keyframes_requested;
        assert!(video.set_layers(&plan, &rids(&["q", "h", "f"])));
        assert_eq!(video.keyframes_requested, requested + 1);
        let (layers, keyframe) = frame(&mut video, &mut sent);
        assert_eq!(layers, [true; 3]);
        assert!(keyframe, "the resumed layers start with a keyframe");
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
