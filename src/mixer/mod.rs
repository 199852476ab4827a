//! The audio mixer core: Opus packets and `now` in, mixed Opus packets and
//! speaker lists out.
//!
//! Like [`crate::media`], nothing here owns a socket, spawns a task, takes
//! a lock or logs. A room's inputs, decoders, encoders and every buffer are
//! set up when an input is added; a tick allocates nothing.
//!
//! # Parts
//!
//! - [`jitter`]: per-input jitter buffer of 20 ms Opus frames: reordering,
//!   late and duplicate drops, loss reports for PLC/FEC, bounded delay.
//! - [`level`]: RFC 6464 levels, levels measured from PCM, smoothing,
//!   silence threshold, the protocol's 0.0–1.0 scale.
//! - [`select`]: the loudest K active inputs with hysteresis, and the plan
//!   of who hears which mix.
//! - [`mix`]: i32 summing and the soft limiter down to i16.
//! - [`RoomMixer`]: one room: N inputs in, per tick one shared packet for
//!   listeners outside the K plus one N−1 packet per selected speaker.
//!
//! # How a room is driven
//!
//! ```text
//! RTP from a participant ─▶ RoomMixer::push(id, seq, ts, payload, level)
//! every 20 ms: RoomMixer::tick(now) ─▶ TickOutput
//!   per input:  JitterBuffer::pop ─▶ decode | PLC/FEC | nothing ─▶ LevelMeter
//!   Selector::plan(levels) ─▶ the K speakers
//!   sum the K once; shared mix (if anyone is outside the K) ─▶ 1 encode;
//!   each speaker: sum minus itself ─▶ 1 encode
//!   TickOutput::packet_for(listener), speakers(), speakers_changed()
//! ```
//!
//! So a 100-person room costs 100 decodes and at most K+1 encodes a tick.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use opus::{Application, Bitrate, Channels, Decoder, Encoder};
use thiserror::Error;

pub mod jitter;
pub mod level;
pub mod mix;
pub mod select;
pub mod speakers;

pub use jitter::{Frame, JitterBuffer, JitterStats, Push};
pub use level::{AudioLevel, LevelError, LevelMeter};
pub use mix::{Accumulator, Pcm, FRAME_SAMPLES, SAMPLE_RATE};
pub use select::{Plan, SelectConfig, Selector};
pub use speakers::SpeakerTracker;

/// The largest encoded packet the mixer produces.
pub const MAX_PACKET: usize = 1500;

/// An input (one participant's audio) as the mixer knows it; the caller
/// assigns them. The same id names that participant as a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct InputId(pub u32);

impl From<u32> for InputId {
    fn from(v: u32) -> Self {
        InputId(v)
    }
}

impl fmt::Display for InputId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

#[derive(Debug, Error)]
pub enum MixerError {
    #[error("input {0} already exists")]
    DuplicateInput(InputId),
    #[error("no input {0}")]
    UnknownInput(InputId),
    #[error("opus: {0}")]
    Opus(#[from] opus::Error),
}

/// Room mixer settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixerConfig {
    pub select: SelectConfig,
    /// Jitter-buffer ring size, in frames.
    pub jitter_capacity: usize,
    /// Frames buffered before playout starts.
    pub jitter_target: usize,
    /// Smoothed levels quieter than this (dBov) are silent.
    pub silence_threshold_dbov: u8,
    /// In-band FEC in the mixed streams.
    pub fec: bool,
    /// The loss rate the encoders plan FEC for, in percent.
    pub expected_loss_percent: i32,
    /// Encoder bitrate in bits per second; `None` leaves libopus's choice.
    pub bitrate: Option<i32>,
    /// `speakers_changed` is raised at most this often.
    pub speakers_interval: Duration,
    /// libopus encoder complexity, 0–10. Most of a mixer's CPU is encoding
    /// (SILK's noise-shaping quantizer at high complexity): see
    /// docs/benchmarks.md for what each step costs.
    pub complexity: i32,
}

impl Default for MixerConfig {
    fn default() -> Self {
        MixerConfig {
            select: SelectConfig::default(),
            jitter_capacity: 16,
            jitter_target: 2,
            silence_threshold_dbov: 50,
            fec: false,
            expected_loss_percent: 10,
            bitrate: None,
            speakers_interval: Duration::from_millis(200),
            complexity: 10,
        }
    }
}

/// Counters, monotonically increasing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MixerStats {
    pub ticks: u64,
    /// Packets decoded (not counting concealment).
    pub decodes: u64,
    /// Frames concealed (PLC or FEC).
    pub concealed: u64,
    /// Of those, decoded from the next packet (its in-band FEC data when
    /// the sender put some in, else libopus conceals).
    pub fec_recovered: u64,
    pub encodes: u64,
    pub late: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub decode_errors: u64,
    pub encode_errors: u64,
}

/// A speaker and its level on the protocol's 0.0–1.0 scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Speaker {
    pub id: InputId,
    pub level: f32,
}

#[derive(Debug)]
struct Encoded {
    listener: InputId,
    len: usize,
    data: Box<[u8]>,
}

impl Encoded {
    fn new() -> Self {
        Encoded {
            listener: InputId::default(),
            len: 0,
            data: vec![0u8; MAX_PACKET].into_boxed_slice(),
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

/// What one tick produced. Owned by the [`RoomMixer`] and overwritten by
/// the next tick.
#[derive(Debug)]
pub struct TickOutput {
    shared: Encoded,
    has_shared: bool,
    own: Vec<Encoded>,
    own_count: usize,
    speakers: Vec<Speaker>,
    speakers_changed: bool,
    encodes: usize,
}

impl TickOutput {
    fn new(k: usize) -> Self {
        TickOutput {
            shared: Encoded::new(),
            has_shared: false,
            own: (0..k).map(|_| Encoded::new()).collect(),
            own_count: 0,
            speakers: Vec::with_capacity(k),
            speakers_changed: false,
            encodes: 0,
        }
    }

    /// The shared mix of all speakers, for every listener outside the K.
    /// `None` when every listener is a speaker (or the encode failed).
    pub fn shared(&self) -> Option<&[u8]> {
        self.has_shared.then(|| self.shared.bytes())
    }

    /// Each selected speaker's own mix (everyone selected but itself).
    pub fn own(&self) -> impl Iterator<Item = (InputId, &[u8])> {
        self.own[..self.own_count]
            .iter()
            .map(|e| (e.listener, e.bytes()))
    }

    /// The packet `listener` should receive this tick.
    pub fn packet_for(&self, listener: InputId) -> Option<&[u8]> {
        match self.own().find(|(id, _)| *id == listener) {
            Some((_, bytes)) => Some(bytes),
            None => self.shared(),
        }
    }

    /// The active speakers, loudest first.
    pub fn speakers(&self) -> &[Speaker] {
        &self.speakers
    }

    /// The set of speakers differs from the one last reported, and the last
    /// report is at least [`MixerConfig::speakers_interval`] old: send a
    /// `speakers` event now.
    pub fn speakers_changed(&self) -> bool {
        self.speakers_changed
    }

    /// Opus encodes this tick ran (at most K+1).
    pub fn encodes(&self) -> usize {
        self.encodes
    }
}

/// Rate-limits "the speaker set changed" notifications.
///
/// A change is reported at once if the last report is at least `interval`
/// old, otherwise at the first update after that (if the set still differs
/// from what was last reported).
#[derive(Debug, Clone)]
pub struct SpeakerNotifier {
    interval: Duration,
    reported: Vec<InputId>,
    last_at: Option<Instant>,
}

impl SpeakerNotifier {
    pub fn new(interval: Duration) -> Self {
        SpeakerNotifier {
            interval,
            reported: Vec::new(),
            last_at: None,
        }
    }

    /// `current` is the list as it would be reported (loudest first). True
    /// when a change is to be reported now.
    pub fn update(&mut self, current: &[InputId], now: Instant) -> bool {
        if current == self.reported.as_slice() {
            return false;
        }
        if let Some(at) = self.last_at {
            if now.saturating_duration_since(at) < self.interval {
                return false;
            }
        }
        self.reported.clear();
        self.reported.extend_from_slice(current);
        self.last_at = Some(now);
        true
    }
}

struct Input {
    id: InputId,
    decoder: Decoder,
    /// Encodes this input's own mix while it is a selected speaker.
    encoder: Encoder,
    jitter: JitterBuffer,
    meter: LevelMeter,
    pcm: Box<Pcm>,
    /// `pcm` holds this tick's audio.
    has_audio: bool,
    /// The decoder has seen a packet, so concealment has something to go on.
    started: bool,
    muted: bool,
    was_selected: bool,
    /// This listener negotiated Opus in-band FEC (`useinbandfec=1`).
    fec: bool,
}

fn new_encoder(config: &MixerConfig) -> Result<Encoder, MixerError> {
    let mut enc = Encoder::new(SAMPLE_RATE, Channels::Mono, Application::Voip)?;
    enc.set_complexity(config.complexity.clamp(0, 10))?;
    enc.set_inband_fec(config.fec)?;
    if config.fec {
        enc.set_packet_loss_perc(config.expected_loss_percent)?;
    }
    if let Some(bits) = config.bitrate {
        enc.set_bitrate(Bitrate::Bits(bits))?;
    }
    Ok(enc)
}

fn configure_fec(enc: &mut Encoder, fec: bool, loss_percent: i32) -> Result<(), MixerError> {
    enc.set_inband_fec(fec)?;
    enc.set_packet_loss_perc(if fec { loss_percent } else { 0 })?;
    Ok(())
}

fn encode(enc: &mut Encoder, pcm: &Pcm, out: &mut Encoded, stats: &mut MixerStats) -> bool {
    match enc.encode(&pcm[..], &mut out.data) {
        Ok(len) => {
            out.len = len;
            stats.encodes += 1;
            true
        }
        Err(_) => {
            out.len = 0;
            stats.encode_errors += 1;
            false
        }
    }
}

/// One room's audio mixer.
pub struct RoomMixer {
    config: MixerConfig,
    slots: Vec<Option<Input>>,
    by_id: HashMap<InputId, usize>,
    selector: Selector,
    levels: Vec<Option<f32>>,
    acc: Box<Accumulator>,
    mixed: Box<Pcm>,
    shared_encoder: Encoder,
    /// The shared stream was produced last tick.
    shared_active: bool,
    notifier: SpeakerNotifier,
    speaker_ids: Vec<InputId>,
    out: TickOutput,
    stats: MixerStats,
}

impl fmt::Debug for RoomMixer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoomMixer")
            .field("inputs", &self.by_id.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl RoomMixer {
    pub fn new(config: MixerConfig) -> Result<Self, MixerError> {
        let k = config.select.k;
        Ok(RoomMixer {
            shared_encoder: new_encoder(&config)?,
            shared_active: false,
            selector: Selector::new(config.select),
            slots: Vec::new(),
            by_id: HashMap::new(),
            levels: Vec::new(),
            acc: Box::new([0; FRAME_SAMPLES]),
            mixed: Box::new([0; FRAME_SAMPLES]),
            notifier: SpeakerNotifier::new(config.speakers_interval),
            speaker_ids: Vec::with_capacity(k),
            out: TickOutput::new(k),
            stats: MixerStats::default(),
            config,
        })
    }

    pub fn stats(&self) -> &MixerStats {
        &self.stats
    }

    /// How many inputs the room has.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Adds an input (and listener). Allocates its decoder, encoder and
    /// buffers.
    pub fn add_input(&mut self, id: InputId) -> Result<(), MixerError> {
        if self.by_id.contains_key(&id) {
            return Err(MixerError::DuplicateInput(id));
        }
        let input = Input {
            id,
            decoder: Decoder::new(SAMPLE_RATE, Channels::Mono)?,
            encoder: new_encoder(&self.config)?,
            jitter: JitterBuffer::new(self.config.jitter_capacity, self.config.jitter_target),
            meter: LevelMeter::new(self.config.silence_threshold_dbov),
            pcm: Box::new([0; FRAME_SAMPLES]),
            has_audio: false,
            started: false,
            muted: false,
            was_selected: false,
            fec: self.config.fec,
        };
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(free) => {
                self.slots[free] = Some(input);
                free
            }
            None => {
                self.slots.push(Some(input));
                self.levels.push(None);
                self.slots.len() - 1
            }
        };
        self.by_id.insert(id, slot);
        Ok(())
    }

    /// Removes an input; its slot is reused by a later one.
    pub fn remove_input(&mut self, id: InputId) -> Result<(), MixerError> {
        let slot = self.by_id.remove(&id).ok_or(MixerError::UnknownInput(id))?;
        self.slots[slot] = None;
        self.levels[slot] = None;
        self.selector.remove(slot);
        Ok(())
    }

    /// A muted input is neither decoded nor mixed (its packets are still
    /// drained so it resumes cleanly).
    pub fn set_muted(&mut self, id: InputId, muted: bool) -> Result<(), MixerError> {
        let input = self.input_mut(id)?;
        input.muted = muted;
        if muted {
            input.meter.reset();
        }
        Ok(())
    }

    /// Turns Opus in-band FEC on or off in what `id` hears: its own
    /// encoder, and the shared encoder, which carries FEC while any
    /// listener asked for it (decoders that did not ask ignore it).
    pub fn set_fec(&mut self, id: InputId, fec: bool) -> Result<(), MixerError> {
        let loss = self.config.expected_loss_percent;
        let input = self.input_mut(id)?;
        if input.fec != fec {
            input.fec = fec;
            configure_fec(&mut input.encoder, fec, loss)?;
        }
        let any = self.slots.iter().flatten().any(|i| i.fec);
        configure_fec(&mut self.shared_encoder, any, loss)?;
        Ok(())
    }

    fn input_mut(&mut self, id: InputId) -> Result<&mut Input, MixerError> {
        self.by_id
            .get(&id)
            .and_then(|slot| self.slots[*slot].as_mut())
            .ok_or(MixerError::UnknownInput(id))
    }

    /// One RTP packet from input `id` (Opus payload, RFC 6464 level if the
    /// packet carried one).
    pub fn push(
        &mut self,
        id: InputId,
        seq: u16,
        ts: u32,
        payload: &[u8],
        level: Option<AudioLevel>,
        now: Instant,
    ) -> Result<Push, MixerError> {
        let input = self.input_mut(id)?;
        let result = input.jitter.push(seq, ts, payload, level, now);
        match result {
            Push::Late => self.stats.late += 1,
            Push::Duplicate => self.stats.duplicates += 1,
            Push::Stored | Push::Invalid | Push::Reset => {}
        }
        Ok(result)
    }

    /// Runs one 20 ms tick.
    pub fn tick(&mut self, now: Instant) -> &TickOutput {
        self.stats.ticks += 1;

        // 1. Every input: play out one frame, measure its level.
        for (slot, entry) in self.slots.iter_mut().enumerate() {
            let Some(input) = entry.as_mut() else {
                continue;
            };
            input.has_audio = false;
            let frame = input.jitter.pop();
            if input.muted {
                if let Frame::Lost { .. } = frame {
                    self.stats.lost += 1;
                }
                self.levels[slot] = None;
                continue;
            }
            let mut ext_level = None;
            let decoded = match frame {
                Frame::Packet { payload, level } => {
                    ext_level = level;
                    match input.decoder.decode(payload, &mut input.pcm[..], false) {
                        Ok(n) => {
                            self.stats.decodes += 1;
                            input.started = true;
                            Some(n)
                        }
                        Err(_) => {
                            self.stats.decode_errors += 1;
                            None
                        }
                    }
                }
                Frame::Lost { fec } => {
                    self.stats.lost += 1;
                    if input.started {
                        self.stats.concealed += 1;
                        let result = match fec {
                            Some(next) => {
                                self.stats.fec_recovered += 1;
                                input.decoder.decode(next, &mut input.pcm[..], true)
                            }
                            _ => input.decoder.decode(&[], &mut input.pcm[..], false),
                        };
                        result.ok()
                    } else {
                        None
                    }
                }
                Frame::Empty => None,
            };
            match decoded {
                Some(n) => {
                    input.pcm[n.min(FRAME_SAMPLES)..].fill(0);
                    input.has_audio = true;
                    let dbov = match ext_level {
                        Some(l) => l.dbov,
                        None => level::dbov_from_pcm(&input.pcm[..]),
                    };
                    input.meter.update(dbov);
                }
                None => input.meter.update(level::SILENT_DBOV),
            }
            self.levels[slot] = input.meter.is_active().then(|| input.meter.loudness_db());
        }

        // 2. Who is mixed.
        let plan = self.selector.plan(&self.levels);

        // 3. Sum the speakers once.
        self.acc.fill(0);
        for &slot in plan.shared() {
            if let Some(input) = self.slots[slot].as_ref().filter(|i| i.has_audio) {
                mix::accumulate(&mut self.acc, &input.pcm);
            }
        }

        // 4. The shared mix, if anyone listens to it.
        let out = &mut self.out;
        out.encodes = 0;
        out.has_shared = false;
        let someone_outside = self.by_id.values().any(|slot| !plan.is_selected(*slot));
        if someone_outside {
            if !self.shared_active {
                // No one heard the shared stream last tick: start clean.
                let _ = self.shared_encoder.reset_state();
            }
            mix::render(&self.acc, None, &mut self.mixed);
            if encode(
                &mut self.shared_encoder,
                &self.mixed,
                &mut out.shared,
                &mut self.stats,
            ) {
                out.has_shared = true;
                out.encodes += 1;
            }
        }

        self.shared_active = someone_outside;

        // 5. Each speaker's own mix: the sum minus itself.
        out.own_count = 0;
        out.speakers.clear();
        self.speaker_ids.clear();
        for (slot, entry) in self.slots.iter_mut().enumerate() {
            if let Some(input) = entry.as_mut() {
                let selected = plan.is_selected(slot);
                if selected && !input.was_selected {
                    // Its listener was on the shared stream: start clean.
                    let _ = input.encoder.reset_state();
                }
                input.was_selected = selected;
            }
        }
        for &slot in plan.shared() {
            let Some(input) = self.slots[slot].as_mut() else {
                continue;
            };
            let exclude = input.has_audio.then_some(&*input.pcm);
            mix::render(&self.acc, exclude, &mut self.mixed);
            let Some(packet) = out.own.get_mut(out.own_count) else {
                break;
            };
            packet.listener = input.id;
            if encode(&mut input.encoder, &self.mixed, packet, &mut self.stats) {
                out.own_count += 1;
                out.encodes += 1;
            }
            if self.levels[slot].is_some() {
                out.speakers.push(Speaker {
                    id: input.id,
                    level: input.meter.protocol_level(),
                });
                self.speaker_ids.push(input.id);
            }
        }

        // 6. Speaker events, rate-limited. The protocol reports the ordered
        // list (loudest first), so a new order is a change too.
        out.speakers_changed = self.notifier.update(&self.speaker_ids, now);
        &self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(20);

    /// A sine source Opus-encoded into 20 ms packets, as a participant's
    /// browser would send them.
    struct Talker {
        freq: f32,
        amp: f32,
        phase: u64,
        seq: u16,
        encoder: Encoder,
        pcm: Vec<i16>,
        buf: Vec<u8>,
    }

    impl Talker {
        fn new(freq: f32, amp: f32) -> Self {
            Talker {
                freq,
                amp,
                phase: 0,
                seq: 1000,
                encoder: Encoder::new(SAMPLE_RATE, Channels::Mono, Application::Voip).unwrap(),
                pcm: vec![0; FRAME_SAMPLES],
                buf: vec![0; MAX_PACKET],
            }
        }

        /// The next packet: (seq, ts, payload).
        fn next(&mut self) -> (u16, u32, Vec<u8>) {
            for s in self.pcm.iter_mut() {
                let t = self.phase as f32 / SAMPLE_RATE as f32;
                *s = (self.amp * (2.0 * std::f32::consts::PI * self.freq * t).sin()) as i16;
                self.phase += 1;
            }
            let len = self.encoder.encode(&self.pcm, &mut self.buf).unwrap();
            let seq = self.seq;
            self.seq = self.seq.wrapping_add(1);
            let ts = (self.phase - FRAME_SAMPLES as u64) as u32;
            (seq, ts, self.buf[..len].to_vec())
        }
    }

    /// Goertzel power of `freq` in `pcm`.
    fn goertzel(pcm: &[i16], freq: f32) -> f64 {
        let w = 2.0 * std::f64::consts::PI * f64::from(freq) / f64::from(SAMPLE_RATE);
        let coeff = 2.0 * w.cos();
        let (mut s1, mut s2) = (0.0f64, 0.0f64);
        for x in pcm {
            let s0 = f64::from(*x) + coeff * s1 - s2;
            s2 = s1;
            s1 = s0;
        }
        s1 * s1 + s2 * s2 - coeff * s1 * s2
    }

    fn db(ratio: f64) -> f64 {
        10.0 * ratio.log10()
    }

    /// A listener's browser: decodes what it is sent.
    struct Ear {
        decoder: Decoder,
        heard: Vec<i16>,
        frame: Vec<i16>,
    }

    impl Ear {
        fn new() -> Self {
            Ear {
                decoder: Decoder::new(SAMPLE_RATE, Channels::Mono).unwrap(),
                heard: Vec::new(),
                frame: vec![0; FRAME_SAMPLES],
            }
        }

        fn hear(&mut self, packet: &[u8]) {
            let n = self.decoder.decode(packet, &mut self.frame, false).unwrap();
            self.heard.extend_from_slice(&self.frame[..n]);
        }

        /// The last `frames` frames heard.
        fn tail(&self, frames: usize) -> &[i16] {
            &self.heard[self.heard.len() - frames * FRAME_SAMPLES..]
        }
    }

    const TONES: [f32; 3] = [440.0, 660.0, 880.0];

    #[test]
    fn each_speaker_hears_the_others_not_itself() {
        let start = Instant::now();
        let mut mixer = RoomMixer::new(MixerConfig::default()).unwrap();
        let mut talkers: Vec<Talker> = TONES.iter().map(|f| Talker::new(*f, 6000.0)).collect();
        let mut ears: Vec<Ear> = TONES.iter().map(|_| Ear::new()).collect();
        for i in 0..3 {
            mixer.add_input(InputId(i)).unwrap();
        }
        let ticks = 40;
        for tick in 0..ticks {
            let now = start + TICK * tick;
            for (i, talker) in talkers.iter_mut().enumerate() {
                let (seq, ts, payload) = talker.next();
                if i == 0 && tick == 20 {
                    continue; // one lost packet: concealed
                }
                mixer
                    .push(InputId(i as u32), seq, ts, &payload, None, now)
                    .unwrap();
            }
            let out = mixer.tick(now);
            if tick >= 3 {
                assert_eq!(out.encodes(), 3, "tick {tick}: all three are speakers");
                assert!(out.shared().is_none(), "no one listens to the shared mix");
            }
            for (i, ear) in ears.iter_mut().enumerate() {
                if let Some(packet) = out.packet_for(InputId(i as u32)) {
                    ear.hear(packet);
                }
            }
        }

        for (i, ear) in ears.iter().enumerate() {
            let tail = ear.tail(15);
            let powers: Vec<f64> = TONES.iter().map(|f| goertzel(tail, *f)).collect();
            for (j, p) in powers.iter().enumerate() {
                if j != i {
                    let margin = db(p / powers[i]);
                    assert!(
                        margin >= 15.0,
                        "listener {i}: tone {} only {margin:.1} dB above its own",
                        TONES[j]
                    );
                }
            }
        }

        let stats = *mixer.stats();
        assert_eq!(stats.lost, 1);
        assert_eq!(stats.concealed, 1);
        assert_eq!(stats.fec_recovered, 1, "the next packet was buffered");
        assert_eq!(stats.decodes + stats.lost, 3 * (ticks as u64 - 1));
        assert_eq!(stats.late, 0);
        let speakers = mixer.tick(start + TICK * ticks).speakers().to_vec();
        assert_eq!(speakers.len(), 3);
        assert!(speakers.iter().all(|s| s.level > 0.5 && s.level <= 1.0));
    }

    #[test]
    fn silent_listeners_share_one_encode() {
        let start = Instant::now();
        let mut mixer = RoomMixer::new(MixerConfig::default()).unwrap();
        // Inputs 0..3 talk, 3..6 send silence.
        let mut talkers: Vec<Talker> = TONES
            .iter()
            .map(|f| Talker::new(*f, 6000.0))
            .chain((0..3).map(|_| Talker::new(440.0, 0.0)))
            .collect();
        for i in 0..6 {
            mixer.add_input(InputId(i)).unwrap();
        }
        let mut ears: Vec<Ear> = (0..6).map(|_| Ear::new()).collect();
        let ticks = 30;
        for tick in 0..ticks {
            let now = start + TICK * tick;
            for (i, talker) in talkers.iter_mut().enumerate() {
                let (seq, ts, payload) = talker.next();
                mixer
                    .push(InputId(i as u32), seq, ts, &payload, None, now)
                    .unwrap();
            }
            let encodes_before = mixer.stats().encodes;
            let out = mixer.tick(now);
            if tick >= 3 {
                let k = 3;
                assert_eq!(out.encodes(), 1 + k, "tick {tick}");
                let shared = out.shared().unwrap();
                let own: Vec<InputId> = out.own().map(|(id, _)| id).collect();
                assert_eq!(own.len(), 3);
                for i in 0..6 {
                    let packet = out.packet_for(InputId(i)).unwrap();
                    if i < 3 {
                        assert!(own.contains(&InputId(i)));
                        assert!(!std::ptr::eq(packet, shared));
                    } else {
                        assert!(
                            std::ptr::eq(packet, shared),
                            "listener {i} gets the shared mix"
                        );
                    }
                }
                let speakers: Vec<InputId> = out.speakers().iter().map(|s| s.id).collect();
                assert_eq!(speakers.len(), 3);
                assert!(speakers.iter().all(|id| id.0 < 3));
                assert_eq!(mixer.stats().encodes - encodes_before, 1 + k as u64);
            }
            let out = &mixer.out;
            for (i, ear) in ears.iter_mut().enumerate() {
                if let Some(packet) = out.packet_for(InputId(i as u32)) {
                    ear.hear(packet);
                }
            }
        }
        assert_eq!(mixer.stats().decodes, 6 * (ticks as u64 - 1));

        // A silent listener hears all three talkers.
        for ear in &ears[3..] {
            let tail = ear.tail(15);
            let silence_floor = goertzel(tail, 1234.0).max(1.0);
            for f in TONES {
                assert!(
                    db(goertzel(tail, f) / silence_floor) > 20.0,
                    "{f} Hz missing"
                );
            }
        }
    }

    #[test]
    fn muted_and_removed_inputs_are_not_mixed() {
        let start = Instant::now();
        let mut mixer = RoomMixer::new(MixerConfig::default()).unwrap();
        let mut a = Talker::new(440.0, 6000.0);
        let mut b = Talker::new(660.0, 6000.0);
        mixer.add_input(InputId(1)).unwrap();
        mixer.add_input(InputId(2)).unwrap();
        assert!(matches!(
            mixer.add_input(InputId(1)),
            Err(MixerError::DuplicateInput(InputId(1)))
        ));
        mixer.set_muted(InputId(2), true).unwrap();
        for tick in 0..10 {
            let now = start + TICK * tick;
            let (seq, ts, p) = a.next();
            mixer.push(InputId(1), seq, ts, &p, None, now).unwrap();
            let (seq, ts, p) = b.next();
            mixer.push(InputId(2), seq, ts, &p, None, now).unwrap();
            let out = mixer.tick(now);
            assert!(out.speakers().iter().all(|s| s.id == InputId(1)));
        }
        // Only input 1 was decoded.
        assert_eq!(mixer.stats().decodes, 9);
        mixer.remove_input(InputId(1)).unwrap();
        assert!(matches!(
            mixer.push(InputId(1), 0, 0, &[1], None, start),
            Err(MixerError::UnknownInput(InputId(1)))
        ));
        assert_eq!(mixer.len(), 1);
        // The freed slot is reused.
        mixer.add_input(InputId(3)).unwrap();
        assert_eq!(mixer.slots.len(), 2);
    }

    #[test]
    fn rfc6464_levels_drive_selection() {
        // The sender says it is silent (127 dBov): its audio is not mixed
        // even though it decodes to a loud tone.
        let start = Instant::now();
        let mut mixer = RoomMixer::new(MixerConfig::default()).unwrap();
        let mut a = Talker::new(440.0, 6000.0);
        mixer.add_input(InputId(1)).unwrap();
        let quiet = AudioLevel::from_byte(127);
        for tick in 0..10 {
            let now = start + TICK * tick;
            let (seq, ts, p) = a.next();
            mixer
                .push(InputId(1), seq, ts, &p, Some(quiet), now)
                .unwrap();
            let out = mixer.tick(now);
            assert!(out.speakers().is_empty());
            assert_eq!(out.own().count(), 0);
            assert_eq!(out.encodes(), 1, "only the shared (silent) mix");
        }
    }

    #[test]
    fn speakers_changed_is_rate_limited() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut n = SpeakerNotifier::new(Duration::from_millis(200));
        let (a, b, c) = (InputId(1), InputId(2), InputId(3));
        assert!(!n.update(&[], ms(0)), "nothing to report yet");
        assert!(n.update(&[a], ms(20)));
        // Changes within 200 ms wait.
        assert!(!n.update(&[a, b], ms(40)));
        assert!(!n.update(&[a, b, c], ms(200)));
        // ... and are reported once the interval is over.
        assert!(n.update(&[a, b, c], ms(220)));
        assert!(!n.update(&[a, b, c], ms(240)));
        assert!(!n.update(&[a, b, c], ms(1000)), "no change, no report");
        assert!(n.update(&[a], ms(1020)), "a long quiet time: at once");
        // A change that reverts before the interval is never reported.
        assert!(!n.update(&[a, c], ms(1040)));
        assert!(!n.update(&[a], ms(1300)));
    }

    #[test]
    fn mixer_speaker_events_follow_the_clock() {
        let start = Instant::now();
        let mut mixer = RoomMixer::new(MixerConfig::default()).unwrap();
        let mut talkers: Vec<Talker> = TONES.iter().map(|f| Talker::new(*f, 6000.0)).collect();
        for i in 0..3 {
            mixer.add_input(InputId(i)).unwrap();
        }
        let mut reports = Vec::new();
        for tick in 0..40u32 {
            let now = start + TICK * tick;
            // Talker i starts at tick 2 * i: three changes within 100 ms.
            for (i, talker) in talkers.iter_mut().enumerate() {
                let (seq, ts, p) = talker.next();
                if tick >= 2 * i as u32 {
                    mixer
                        .push(InputId(i as u32), seq, ts, &p, None, now)
                        .unwrap();
                }
            }
            let out = mixer.tick(now);
            if out.speakers_changed() {
                reports.push((tick, out.speakers().len()));
            }
        }
        assert_eq!(reports.len(), 2, "{reports:?}");
        let (first, n) = reports[0];
        assert!(n >= 1);
        assert!(reports[1].0 - first >= 10, "{reports:?}");
        assert_eq!(reports[1].1, 3);
    }

    #[test]
    fn corrupt_packets_are_counted_not_fatal() {
        let start = Instant::now();
        let mut mixer = RoomMixer::new(MixerConfig {
            jitter_target: 1,
            ..MixerConfig::default()
        })
        .unwrap();
        mixer.add_input(InputId(1)).unwrap();
        // A TOC byte for a 60 ms code-3 packet with a bad frame count.
        mixer
            .push(InputId(1), 1, 0, &[0xff, 0xff], None, start)
            .unwrap();
        let out = mixer.tick(start);
        assert!(out.speakers().is_empty());
        assert_eq!(mixer.stats().decode_errors, 1);
        assert_eq!(mixer.stats().decodes, 0);
    }

    #[test]
    fn fec_config_is_accepted() {
        let config = MixerConfig {
            fec: true,
            bitrate: Some(24_000),
            ..MixerConfig::default()
        };
        let mut mixer = RoomMixer::new(config).unwrap();
        mixer.add_input(InputId(7)).unwrap();
        let out = mixer.tick(Instant::now());
        assert_eq!(out.encodes(), 1);
        assert!(out.shared().is_some_and(|p| !p.is_empty()));
        assert!(format!("{mixer:?}").contains("RoomMixer"));
    }

    #[test]
    fn fec_follows_what_listeners_negotiated() {
        let mut mixer = RoomMixer::new(MixerConfig::default()).unwrap();
        let (a, b) = (InputId(1), InputId(2));
        mixer.add_input(a).unwrap();
        mixer.add_input(b).unwrap();
        assert!(!mixer.shared_encoder.get_inband_fec().unwrap());
        mixer.set_fec(a, true).unwrap();
        let slot = mixer.by_id[&a];
        assert!(mixer.slots[slot]
            .as_mut()
            .unwrap()
            .encoder
            .get_inband_fec()
            .unwrap());
        assert!(
            mixer.shared_encoder.get_inband_fec().unwrap(),
            "a listener on the shared mix asked for FEC"
        );
        mixer.remove_input(a).unwrap();
        mixer.set_fec(b, false).unwrap();
        assert!(
            !mixer.shared_encoder.get_inband_fec().unwrap(),
            "nobody asks for FEC any more"
        );
        assert!(matches!(
            mixer.set_fec(a, true),
            Err(MixerError::UnknownInput(_))
        ));
    }
}
