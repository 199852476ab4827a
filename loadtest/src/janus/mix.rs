//! `--audio-mode mix`: the load against Janus AudioBridge.
//!
//! Every participant joins an AudioBridge room and `configure`s one
//! PeerConnection with our offer (one sendrecv Opus track): it sends audio
//! (publishers, unmuted) and gets back one stream, the mix of everyone else.
//! AudioBridge decodes what it mixes, so the audio is real Opus: a tone
//! encoded once at start-up (20 ms frames, 48 kHz mono), sent in a loop.
//!
//! A mix carries no stamp of ours, so there is no end-to-end latency here.
//! Each subscriber counts the mixed packets that *arrived* inside the window
//! and, from their RTP sequence numbers, how many of the stream's packets in
//! that span it missed (loss). The server's CPU is reported per delivered
//! mixed packet and per participant.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use switchboard_client::Kind;

use super::api::Session;
use super::peer::Peer;
use super::{jsep_sdp, until_connected, until_webrtcup, Outcome, Schedule, Shared};

/// Opus frame length: AudioBridge mixes 20 ms frames.
pub const FRAME: Duration = Duration::from_millis(20);
const SAMPLE_RATE: u32 = 48_000;
const SAMPLES: usize = 960;
/// Frames in the looped tone (one second).
const TONE_FRAMES: usize = 50;

/// One second of a tone at `freq` Hz, −12 dBFS, as 20 ms Opus packets.
pub fn tone(freq: f64) -> Result<Vec<Bytes>, opus::Error> {
    let mut enc = opus::Encoder::new(SAMPLE_RATE, opus::Channels::Mono, opus::Application::Voip)?;
    enc.set_bitrate(opus::Bitrate::Bits(32_000))?;
    let amplitude = 0.25 * f64::from(i16::MAX);
    let mut out = Vec::with_capacity(TONE_FRAMES);
    let mut buf = vec![0u8; 1500];
    for f in 0..TONE_FRAMES {
        let pcm: Vec<i16> = (0..SAMPLES)
            .map(|i| {
                let t = (f * SAMPLES + i) as f64 / f64::from(SAMPLE_RATE);
                (amplitude * (2.0 * std::f64::consts::PI * freq * t).sin()) as i16
            })
            .collect();
        let n = enc.encode(&pcm, &mut buf)?;
        out.push(Bytes::copy_from_slice(&buf[..n]));
    }
    Ok(out)
}

/// The mixed stream one subscriber received.
#[derive(Debug, Default)]
pub struct Mixed {
    pub first_at: Option<Instant>,
    pub total: u64,
    /// Distinct packets that arrived inside the window.
    pub window: u64,
    pub duplicates: u64,
    /// Lowest and highest extended sequence number that arrived in the window.
    span: Option<(u64, u64)>,
    last_ext: Option<u64>,
    seen: std::collections::HashSet<u64>,
}

impl Mixed {
    /// Extends a 16-bit sequence number to 64 bits around the last one seen,
    /// so wrap-around (and reordering across it) is handled.
    fn extend(&mut self, seq: u16) -> u64 {
        let ext = match self.last_ext {
            None => (1 << 16) + u64::from(seq),
            Some(last) => {
                let delta = i64::from(seq.wrapping_sub(last as u16) as i16);
                (last as i64 + delta).max(0) as u64
            }
        };
        self.last_ext = Some(self.last_ext.map_or(ext, |l| l.max(ext)));
        ext
    }

    pub fn record(&mut self, seq: u16, at: Instant, in_window: bool) {
        self.first_at.get_or_insert(at);
        self.total += 1;
        let ext = self.extend(seq);
        if !self.seen.insert(ext) {
            self.duplicates += 1;
            return;
        }
        if in_window {
            self.window += 1;
            self.span = Some(
                self.span
                    .map_or((ext, ext), |(a, b)| (a.min(ext), b.max(ext))),
            );
        }
    }

    /// Packets of the stream inside the in-window span (first to last seen).
    pub fn expected(&self) -> u64 {
        self.span.map_or(0, |(a, b)| b - a + 1)
    }
}

/// Session, AudioBridge handle, `join` (muted unless publishing),
/// `configure` with our offer, PeerConnection connected and `webrtcup`.
pub async fn join(
    shared: &Shared,
    out: &mut Outcome,
    session: &mut Session,
) -> Result<Peer, String> {
    let deadline: tokio::time::Instant = (Instant::now() + shared.join_timeout).into();
    let room = shared.room_ids[out.room];
    let handle = session
        .attach("janus.plugin.audiobridge")
        .await
        .map_err(|e| e.to_string())?;
    let display = format!("{}-{}", shared.run_id, out.name);
    let muted = !out.publishes;
    let (joined, _) = session
        .message(
            handle,
            json!({"request": "join", "room": room, "display": display, "muted": muted}),
            None,
        )
        .await
        .map_err(|e| e.to_string())?;
    out.feed = joined["id"].as_u64();
    if joined["audiobridge"] != "joined" || out.feed.is_none() {
        return Err(format!("join: unexpected answer {joined}"));
    }
    let mut peer = Peer::start(shared.bind, &[Kind::Audio], &out.name)
        .await
        .map_err(|e| format!("PeerConnection: {e}"))?;
    let offer = peer.offer().await.map_err(|e| format!("offer: {e}"))?;
    let (_, jsep) = session
        .message(
            handle,
            json!({"request": "configure", "muted": muted}),
            Some(json!({"type": "offer", "sdp": offer, "trickle": false})),
        )
        .await
        .map_err(|e| e.to_string())?;
    session.trickle_completed(handle);
    let answer = jsep_sdp(jsep, "answer", "configure")?;
    peer.answer(answer)
        .await
        .map_err(|e| format!("Janus's answer: {e}"))?;
    until_connected(&mut peer, deadline, "PeerConnection", out).await?;
    until_webrtcup(session, handle, deadline).await?;
    Ok(peer)
}

/// Sends the tone, one packet per tick, until the window ends.
pub struct Sender {
    pub seq: u32,
    pub interval: Option<tokio::time::Interval>,
}

impl Sender {
    pub fn start(schedule: &Schedule) -> Sender {
        let phase = FRAME.mul_f64(rand::random::<f64>());
        let mut interval = tokio::time::interval_at((schedule.warmup_start + phase).into(), FRAME);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        Sender {
            seq: 0,
            interval: Some(interval),
        }
    }

    pub fn send(&mut self, peer: &Peer, tone: &[Bytes], out: &mut Outcome, schedule: &Schedule) {
        let now = Instant::now();
        if now >= schedule.t1 {
            self.interval = None;
            return;
        }
        let data = tone[self.seq as usize % tone.len()].clone();
        let timestamp = self.seq.wrapping_mul(SAMPLES as u32);
        self.seq += 1;
        let sent = &mut out.sent[0];
        match peer.send_rtp(Kind::Audio, data, false, timestamp) {
            Ok(()) => {
                sent.total += 1;
                if (schedule.t0..schedule.t1).contains(&now) {
                    sent.window += 1;
                }
            }
            Err(_) => sent.errors += 1,
        }
    }
}

/// Waits for the next tick; never resolves for a stopped sender.
pub async fn tick(s: &mut Option<Sender>) {
    match s.as_mut().and_then(|s| s.interval.as_mut()) {
        Some(iv) => {
            iv.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_accounting_handles_wrap_loss_duplicates_and_reordering() {
        let mut m = Mixed::default();
        let t = Instant::now();
        // 65534, 65535, (0 lost), 1, 1 again, then 3 before 2.
        for seq in [65534u16, 65535, 1, 1, 3, 2] {
            m.record(seq, t, true);
        }
        assert_eq!(m.total, 6);
        assert_eq!(m.duplicates, 1);
        assert_eq!(m.window, 5);
        // Span 65534 ..= 3 (wrapped) is 6 packets; 5 arrived: one lost.
        assert_eq!(m.expected(), 6);
        // Outside the window: counted, not in the span.
        m.record(4, t, false);
        assert_eq!((m.total, m.window, m.expected()), (7, 5, 6));
    }

    #[test]
    fn the_tone_is_opus() {
        let packets = tone(440.0).expect("encodes");
        assert_eq!(packets.len(), TONE_FRAMES);
        let mut dec = opus::Decoder::new(SAMPLE_RATE, opus::Channels::Mono).expect("decoder");
        let mut pcm = vec![0i16; SAMPLES];
        for p in &packets {
            assert_eq!(dec.decode(p, &mut pcm, false).expect("decodes"), SAMPLES);
        }
        // A tone, not silence.
        assert!(pcm.iter().map(|s| i32::from(*s).abs()).max() > Some(1000));
    }
}
