//! A published track's encodings, learnt from its packets: one per SSRC
//! (a simulcast track has up to [`MAX_ENCODINGS`], named by rid), each with
//! its picture size (read from its keyframes), its measured bitrate and
//! when it last sent. They are ranked by the size actually received, not
//! by rid name: layer 0 is the smallest picture.

use std::time::{Duration, Instant};

use super::allocator::LayerInfo;
use super::{Layer, TrackInfo, KEYFRAME_THROTTLE};
use crate::media::codec::{vp8_keyframe_size, Codec};
use crate::media::keyframe::KeyframeRequester;

/// The most encodings a simulcast track may have (the offer is refused
/// beyond it; packets of a fourth SSRC are dropped).
pub const MAX_ENCODINGS: usize = 3;

/// An encoding that sent nothing for this long is not live: it stopped, or
/// its publisher paused it. Chromium sends a 180p layer at 7+ frames per
/// second even on a still picture.
pub const LAYER_STALE: Duration = Duration::from_millis(1000);

/// Bitrates are measured over windows of this length.
const RATE_WINDOW: Duration = Duration::from_millis(1000);

/// The temporal layers the allocator tells apart in each encoding of a VP8
/// simulcast track (Chromium sends L1T3: TL0 at a quarter of the frame
/// rate, TL1 doubling it, TL2 the rest): up to TL0, up to TL1, all. Always
/// this many per encoding, whether the publisher layers it or not, so a
/// layer's index in the allocator does not move when the first TID is
/// seen; an encoding without temporal layers costs the same in all three.
pub const TEMPORAL_SLOTS: usize = 3;

/// A layer costs the last window's bitrate or, when higher, the mean of
/// this many windows: an encoder starved of CPU or of uplink sends its
/// 720p layer at 400 kbit/s one second and 1.5 Mbit/s a few later, and a
/// viewer switched to it on the low figure is over its link when the
/// encoder recovers. (The highest window instead made every layer cost its
/// keyframes: the unshaped viewer lost its 720p and a freed link took
/// longer to climb back.)
const COST_WINDOWS: usize = 5;

/// The highest TID forwarded for each slot (the last: every layer).
pub const SLOT_MAX_TID: [u8; TEMPORAL_SLOTS] = [0, 1, u8::MAX];

/// One encoding of a published track.
#[derive(Debug, Clone)]
pub struct Encoding {
    pub ssrc: u32,
    /// Its RTP stream id, when the publisher named it (simulcast).
    pub rid: Option<Box<str>>,
    pub width: u16,
    pub height: u16,
    /// Bit/s over the last full window.
    pub bitrate: u32,
    /// Bit/s of each temporal slot (the layers up to it) over the last
    /// full window; all equal to `bitrate` without temporal layers.
    pub slot_bitrate: [u32; TEMPORAL_SLOTS],
    window_bytes: u64,
    /// `slot_bitrate` of the last [`COST_WINDOWS`] windows, where the
    /// next goes, and how many are filled.
    recent: [[u32; TEMPORAL_SLOTS]; COST_WINDOWS],
    recent_next: usize,
    recent_filled: usize,
    /// This window's bytes by TID (the last counts TID 2 and up).
    window_tid_bytes: [u64; TEMPORAL_SLOTS],
    /// Whether this window's packets carried a TID.
    window_layered: bool,
    window_start: Option<Instant>,
    last_rtp: Option<Instant>,
    pub(super) keyframes: KeyframeRequester,
}

impl Encoding {
    pub(super) fn new(ssrc: u32) -> Self {
        Encoding {
            ssrc,
            rid: None,
            width: 0,
            height: 0,
            bitrate: 0,
            slot_bitrate: [0; TEMPORAL_SLOTS],
            recent: [[0; TEMPORAL_SLOTS]; COST_WINDOWS],
            recent_next: 0,
            recent_filled: 0,
            window_bytes: 0,
            window_tid_bytes: [0; TEMPORAL_SLOTS],
            window_layered: false,
            window_start: None,
            last_rtp: None,
            keyframes: KeyframeRequester::new(KEYFRAME_THROTTLE),
        }
    }

    fn live(&self, now: Instant) -> bool {
        self.last_rtp
            .is_some_and(|t| now.saturating_duration_since(t) < LAYER_STALE)
    }

    /// The bitrate, or 0 when it went silent (its last window is stale).
    fn rate(&self, now: Instant) -> u32 {
        if self.live(now) {
            self.bitrate
        } else {
            0
        }
    }

    /// What temporal slot `slot` costs: its last window's bitrate or the
    /// mean of the last [`COST_WINDOWS`], whichever is higher; 0 when it
    /// went silent.
    fn slot_cost(&self, slot: usize, now: Instant) -> u32 {
        if !self.live(now) || self.recent_filled == 0 {
            return 0;
        }
        let filled = &self.recent[..self.recent_filled];
        let sum: u64 = filled.iter().map(|w| u64::from(w[slot])).sum();
        // The mean of u32s fits a u32.
        let mean = (sum / filled.len() as u64) as u32;
        self.slot_bitrate[slot].max(mean)
    }
}

/// A published track's encodings, in arrival order, with their ranking by
/// picture size.
#[derive(Debug, Clone, Default)]
pub struct Encodings {
    pub(super) list: Vec<Encoding>,
    /// Indices into `list`, smallest picture first.
    rank: Vec<u8>,
}

impl Encodings {
    /// A packet of `ssrc` with `len` payload bytes and temporal layer
    /// `tid` (when its descriptor has one): the index of its encoding, or
    /// `None` when the track already has its [`MAX_ENCODINGS`] live ones. A
    /// track without simulcast has one encoding, which a new SSRC takes
    /// over.
    pub(super) fn on_packet(
        &mut self,
        ssrc: u32,
        payload: &[u8],
        tid: Option<u8>,
        info: &TrackInfo,
        keyframe: bool,
        now: Instant,
    ) -> Option<usize> {
        let i = match self.list.iter().position(|e| e.ssrc == ssrc) {
            Some(i) => i,
            None if !info.simulcast && !self.list.is_empty() => {
                let mut e = Encoding::new(ssrc);
                e.keyframes = self.list[0].keyframes.clone();
                self.list[0] = e;
                0
            }
            None if self.list.len() < MAX_ENCODINGS => {
                self.list.push(Encoding::new(ssrc));
                self.rerank();
                self.list.len() - 1
            }
            None => {
                // A stale encoding's slot goes to the new SSRC (its
                // publisher restarted the layer on a new SSRC).
                let stale = self.list.iter().position(|e| !e.live(now))?;
                self.list[stale] = Encoding::new(ssrc);
                self.rerank();
                stale
            }
        };
        let e = &mut self.list[i];
        e.last_rtp = Some(now);
        match e.window_start {
            Some(start) if now.saturating_duration_since(start) >= RATE_WINDOW => {
                let secs = now.saturating_duration_since(start).as_secs_f64();
                let rate = |bytes: u64| ((bytes * 8) as f64 / secs).min(f64::from(u32::MAX)) as u32;
                e.bitrate = rate(e.window_bytes);
                let mut upto = 0;
                for (slot, bytes) in e.window_tid_bytes.iter().enumerate() {
                    upto += bytes;
                    e.slot_bitrate[slot] = if e.window_layered && slot + 1 < TEMPORAL_SLOTS {
                        rate(upto)
                    } else {
                        e.bitrate
                    };
                }
                e.recent[e.recent_next] = e.slot_bitrate;
                e.recent_next = (e.recent_next + 1) % COST_WINDOWS;
                e.recent_filled = (e.recent_filled + 1).min(COST_WINDOWS);
                e.window_bytes = 0;
                e.window_tid_bytes = [0; TEMPORAL_SLOTS];
                e.window_layered = false;
                e.window_start = Some(now);
            }
            None => e.window_start = Some(now),
            Some(_) => {}
        }
        // Payload plus a typical RTP/SRTP/UDP/IP overhead per packet.
        let bytes = payload.len() as u64 + 60;
        e.window_bytes += bytes;
        if let Some(tid) = tid {
            e.window_layered = true;
            e.window_tid_bytes[usize::from(tid).min(TEMPORAL_SLOTS - 1)] += bytes;
        }
        if keyframe && info.codec == Codec::Vp8 {
            if let Some((w, h)) = vp8_keyframe_size(payload) {
                if (w, h) != (e.width, e.height) {
                    e.width = w;
                    e.height = h;
                    self.rerank();
                }
            }
        }
        if keyframe {
            self.list[i].keyframes.keyframe_received(now);
        }
        Some(i)
    }

    pub(super) fn rerank(&mut self) {
        self.rank.clear();
        // At most MAX_ENCODINGS (3): the index fits.
        self.rank.extend((0..self.list.len()).map(|i| i as u8));
        let list = &self.list;
        // Unknown sizes (0) rank by arrival among themselves, below known
        // ones only if they are smaller: a size is learnt at the first
        // keyframe, within a second of the first packet.
        self.rank.sort_by_key(|&i| (list[usize::from(i)].height, i));
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub(super) fn list_mut(&mut self) -> &mut [Encoding] {
        &mut self.list
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn by_rid(&self, rid: &str) -> Option<&Encoding> {
        self.list.iter().find(|e| e.rid.as_deref() == Some(rid))
    }

    pub fn by_ssrc(&self, ssrc: u32) -> Option<&Encoding> {
        self.list.iter().find(|e| e.ssrc == ssrc)
    }

    pub(super) fn by_ssrc_mut(&mut self, ssrc: u32) -> Option<&mut Encoding> {
        self.list.iter_mut().find(|e| e.ssrc == ssrc)
    }

    /// The encoding of rank `layer`.
    pub fn at(&self, layer: Layer) -> Option<&Encoding> {
        let i = *self.rank.get(usize::from(layer.0))?;
        self.list.get(usize::from(i))
    }

    /// The rank of `ssrc`'s encoding.
    pub fn layer_of(&self, ssrc: u32) -> Option<Layer> {
        let i = self.list.iter().position(|e| e.ssrc == ssrc)?;
        // At most MAX_ENCODINGS ranks: fits.
        self.rank
            .iter()
            .position(|&r| usize::from(r) == i)
            .map(|p| Layer(p as u8))
    }

    /// The smallest live encoding.
    pub(super) fn lowest_live(&self, now: Instant) -> Option<u32> {
        self.rank
            .iter()
            .map(|&i| &self.list[usize::from(i)])
            .find(|e| e.live(now))
            .map(|e| e.ssrc)
    }

    /// The layers as the allocator sees them, smallest first, at their
    /// costs (see [`COST_WINDOWS`]): one per encoding, or with `temporal`
    /// [`TEMPORAL_SLOTS`] per encoding (its temporal layers, fewest first;
    /// see [`Encodings::at_slot`]), told apart in the lowest live encoding
    /// only.
    pub(super) fn view(&self, now: Instant, temporal: bool, out: &mut Vec<LayerInfo>) {
        out.clear();
        let mut lowest = true;
        for &i in &self.rank {
            let e = &self.list[usize::from(i)];
            let info = |bitrate| LayerInfo {
                height: e.height,
                bitrate,
                live: e.live(now),
            };
            if temporal && lowest {
                out.extend((0..TEMPORAL_SLOTS).map(|slot| info(e.slot_cost(slot, now))));
            } else if temporal {
                // Above the lowest live encoding, only at its full frame
                // rate (as Jitsi's allocator does for cameras): all three
                // slots cost the same, so the allocator, which takes the
                // highest that fits, always takes the last. A smaller
                // picture at 30 frames a second beats a larger one at 7.5.
                let full = e.slot_cost(TEMPORAL_SLOTS - 1, now);
                out.extend((0..TEMPORAL_SLOTS).map(|_| info(full)));
            } else {
                out.push(info(e.slot_cost(TEMPORAL_SLOTS - 1, now)));
            }
            lowest &= !e.live(now);
        }
    }

    /// The encoding and the highest TID of the allocator's layer `index`
    /// in an `Encodings::view` with `temporal`.
    pub fn at_slot(&self, index: u8, temporal: bool) -> Option<(&Encoding, u8)> {
        if !temporal {
            return self.at(Layer(index)).map(|e| (e, u8::MAX));
        }
        // TEMPORAL_SLOTS (3) fits a u8.
        let slots = TEMPORAL_SLOTS as u8;
        let e = self.at(Layer(index / slots))?;
        Some((e, SLOT_MAX_TID[usize::from(index % slots)]))
    }

    /// Sum of the live encodings' bitrates.
    pub(super) fn total_rate(&self, now: Instant) -> u64 {
        self.list.iter().map(|e| u64::from(e.rate(now))).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sfu::MediaKind;

    const INFO: TrackInfo = TrackInfo {
        kind: MediaKind::Video,
        codec: Codec::Vp8,
        clock_rate: 90_000,
        simulcast: true,
    };

    /// One second of 30 pictures of `bytes` each on `ssrc`, TIDs 0 2 1 2.
    fn second(enc: &mut Encodings, ssrc: u32, bytes: usize, t: &mut Instant) {
        let payload = vec![0u8; bytes - 60];
        for i in 0..30 {
            let tid = [0, 2, 1, 2][i % 4];
            enc.on_packet(ssrc, &payload, Some(tid), &INFO, false, *t);
            *t += Duration::from_micros(33_334);
        }
    }

    fn costs(enc: &Encodings, now: Instant) -> Vec<u32> {
        let mut out = Vec::new();
        enc.view(now, true, &mut out);
        out.iter().map(|l| l.bitrate).collect()
    }

    #[test]
    fn a_layer_costs_its_last_window_or_the_recent_mean_per_temporal_slot() {
        let (mut enc, mut t) = (Encodings::default(), Instant::now());
        // 6,250 bytes a picture at 30 a second: 1.5 Mbit/s.
        for _ in 0..2 {
            second(&mut enc, 7, 6_250, &mut t);
        }
        let full = costs(&enc, t);
        assert_eq!(full.len(), TEMPORAL_SLOTS);
        // TL0 is a quarter of the pictures, TL0+TL1 half, all of them.
        let near = |x: u32, y: f64| (f64::from(x) - y).abs() < y * 0.1;
        assert!(
            near(full[0], 375_000.0) && near(full[1], 750_000.0),
            "{full:?}"
        );
        assert!(near(full[2], 1_500_000.0), "{full:?}");
        // The encoder falls to 400 kbit/s: the cost comes down with the
        // mean of the last COST_WINDOWS windows, and is 400 kbit/s only
        // once the 1.5-Mbit/s ones are all out of it.
        // (A window closes at the first packet after it: the first low
        // second closes the last high window.)
        second(&mut enc, 7, 1_667, &mut t);
        assert_eq!(costs(&enc, t), full);
        let mut was = full[2];
        for _ in 0..COST_WINDOWS - 1 {
            second(&mut enc, 7, 1_667, &mut t);
            let c = costs(&enc, t)[2];
            assert!(c < was && f64::from(c) > 1.2 * 400_000.0, "{c} after {was}");
            was = c;
        }
        for _ in 0..2 {
            second(&mut enc, 7, 1_667, &mut t);
        }
        let low = costs(&enc, t);
        assert!(near(low[2], 400_000.0), "{low:?}");
        // A window above the mean (the encoder recovers) counts at once.
        for _ in 0..2 {
            second(&mut enc, 7, 6_250, &mut t);
        }
        assert!(near(costs(&enc, t)[2], 1_500_000.0));
        // Silent for a second: not live, costs nothing.
        assert_eq!(costs(&enc, t + LAYER_STALE), vec![0; TEMPORAL_SLOTS]);
    }

    #[test]
    fn temporal_steps_are_offered_in_the_lowest_live_encoding_only() {
        let (mut enc, mut t) = (Encodings::default(), Instant::now());
        // Two encodings of unknown size rank by arrival: 7 below 8.
        for _ in 0..2 {
            let start = t;
            second(&mut enc, 7, 1_000, &mut t);
            t = start;
            second(&mut enc, 8, 4_000, &mut t);
        }
        let c = costs(&enc, t);
        assert_eq!(c.len(), 2 * TEMPORAL_SLOTS);
        assert!(c[0] < c[1] && c[1] < c[2], "the lowest thins: {c:?}");
        assert!(
            c[3] > c[2] && c[3] == c[4] && c[4] == c[5],
            "the other does not: {c:?}"
        );
        // The lowest stops: the next one up is the lowest live, and thins.
        for _ in 0..2 {
            second(&mut enc, 8, 4_000, &mut t);
        }
        let c = costs(&enc, t);
        assert_eq!(c[..3], [0, 0, 0], "{c:?}");
        assert!(c[3] < c[4] && c[4] < c[5], "{c:?}");
    }
}
