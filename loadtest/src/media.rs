//! Real media to publish: a VP8 clip (pre-encoded, committed under
//! `loadtest/media/`, see its README) packetized per RFC 7741, and Opus
//! frames of a sine tone encoded at start-up with libopus.
//!
//! Nothing here knows about a server: an adapter takes frames from
//! [`Vp8Clip`] and [`OpusClip`], packetizes with [`vp8_packets`], stamps with
//! [`crate::stamp`], and sends them however its server wants them.

use bytes::{BufMut, Bytes, BytesMut};

/// The committed VP8 clip (320x240, 30 fps, 3 s, keyframe every 30 frames,
/// about 500 kbit/s; `loadtest/media/README.md` has the command).
pub const CLIP_IVF: &[u8] = include_bytes!("../media/clip.ivf");

/// Largest RTP payload we send (descriptor + frame data + stamp), leaving
/// room for RTP, SRTP and UDP/IP headers within a 1280-byte path MTU.
pub const MAX_RTP_PAYLOAD: usize = 1200;

/// RTP clock rates.
pub const VP8_CLOCK: u32 = 90_000;
pub const OPUS_CLOCK: u32 = 48_000;
/// Opus frame length: 20 ms at 48 kHz.
pub const OPUS_FRAME_SAMPLES: usize = 960;

/// One encoded VP8 frame.
#[derive(Debug, Clone)]
pub struct Vp8Frame {
    pub data: Bytes,
    pub keyframe: bool,
}

/// A VP8 clip read from IVF.
#[derive(Debug, Clone)]
pub struct Vp8Clip {
    pub width: u16,
    pub height: u16,
    /// Frames per second from the IVF time base.
    pub fps: f64,
    pub frames: Vec<Vp8Frame>,
}

impl Vp8Clip {
    /// The committed clip.
    pub fn builtin() -> Result<Vp8Clip, String> {
        Vp8Clip::parse_ivf(CLIP_IVF)
    }

    /// Parses an IVF file (32-byte header, then 12-byte frame headers).
    pub fn parse_ivf(b: &[u8]) -> Result<Vp8Clip, String> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if b.len() < 32 || &b[..4] != b"DKIF" {
            return Err("not an IVF file".into());
        }
        if &b[8..12] != b"VP80" {
            return Err(format!(
                "IVF codec {:?}, not VP80",
                String::from_utf8_lossy(&b[8..12])
            ));
        }
        let header = usize::from(u16_at(6)).max(32);
        let (rate, scale) = (u32_at(16), u32_at(20));
        if rate == 0 || scale == 0 {
            return Err("IVF time base is zero".into());
        }
        let mut frames = Vec::new();
        let mut at = header;
        while at + 12 <= b.len() {
            let size = u32_at(at) as usize;
            let start = at + 12;
            let end = start
                .checked_add(size)
                .filter(|e| *e <= b.len())
                .ok_or("IVF frame runs past the end")?;
            let data = Bytes::copy_from_slice(&b[start..end]);
            let keyframe = data.first().is_some_and(|t| t & 0x01 == 0);
            frames.push(Vp8Frame { data, keyframe });
            at = end;
        }
        if frames.is_empty() {
            return Err("IVF file has no frames".into());
        }
        if !frames[0].keyframe {
            return Err("the clip does not start with a keyframe".into());
        }
        Ok(Vp8Clip {
            width: u16_at(12),
            height: u16_at(14),
            fps: f64::from(rate) / f64::from(scale),
            frames,
        })
    }

    pub fn bytes(&self) -> usize {
        self.frames.iter().map(|f| f.data.len()).sum()
    }

    /// The clip's own bit rate at its frame rate, kbit/s of frame data.
    pub fn natural_kbps(&self) -> f64 {
        self.bytes() as f64 * 8.0 / 1e3 / (self.frames.len() as f64 / self.fps)
    }

    /// Frames per second to send so that the frame data comes to `kbps`:
    /// the clip's frame rate scaled by `kbps / natural_kbps` (frame sizes
    /// stay as encoded; RTP timestamps follow the scaled rate).
    pub fn fps_for(&self, kbps: f64) -> f64 {
        self.fps * kbps / self.natural_kbps()
    }

    pub fn keyframes(&self) -> usize {
        self.frames.iter().filter(|f| f.keyframe).count()
    }
}

/// Bytes of the VP8 payload descriptor we write: X=1 with a 15-bit picture
/// ID (I=1, M=1), as browsers send.
pub const VP8_DESCRIPTOR_LEN: usize = 4;

/// Splits one VP8 frame into RTP payloads (RFC 7741): each starts with a
/// payload descriptor (S=1 and partition 0 on the first packet only, the
/// frame's picture ID on all), then at most `max_payload` minus the
/// descriptor minus `reserve` bytes of the frame; `reserve` bytes are left
/// for a trailer (the caller's stamp). The caller sets the RTP marker on the
/// last payload.
pub fn vp8_packets(
    frame: &[u8],
    picture_id: u16,
    max_payload: usize,
    reserve: usize,
) -> Vec<BytesMut> {
    let chunk = max_payload
        .saturating_sub(VP8_DESCRIPTOR_LEN + reserve)
        .max(1);
    let pid = picture_id & 0x7fff;
    frame
        .chunks(chunk)
        .enumerate()
        .map(|(i, part)| {
            let mut p = BytesMut::with_capacity(VP8_DESCRIPTOR_LEN + part.len() + reserve);
            p.put_u8(if i == 0 { 0x90 } else { 0x80 }); // X, S (first), PID 0
            p.put_u8(0x80); // I: picture ID present
            p.put_u16(0x8000 | pid); // M=1: 15-bit picture ID
            p.put_slice(part);
            p
        })
        .collect()
}

/// The first `keep` bytes of VP8 frame `frame` (never fewer than its frame
/// tag, plus the start code and size for a keyframe), with a keyframe's
/// picture size rewritten to `size` (the 2-bit scaling fields kept). What
/// `--simulcast` sends on its lower layers: the size ranks the layer at the
/// server; the cut picture does not decode.
pub fn vp8_cut(frame: &[u8], keep: usize, size: (u16, u16)) -> Bytes {
    let keyframe = frame.first().is_some_and(|t| t & 0x01 == 0);
    let header = if keyframe { 10 } else { 3 };
    let mut out = BytesMut::from(&frame[..keep.max(header).min(frame.len())]);
    if keyframe && out.len() >= 10 && out[3..6] == [0x9d, 0x01, 0x2a] {
        let w = (size.0 & 0x3fff) | (u16::from_le_bytes([out[6], out[7]]) & 0xc000);
        let h = (size.1 & 0x3fff) | (u16::from_le_bytes([out[8], out[9]]) & 0xc000);
        out[6..8].copy_from_slice(&w.to_le_bytes());
        out[8..10].copy_from_slice(&h.to_le_bytes());
    }
    out.freeze()
}

/// A parsed RFC 7741 payload descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vp8Descriptor {
    pub len: usize,
    pub start: bool,
    pub partition: u8,
    pub picture_id: Option<u16>,
}

/// Parses the payload descriptor at the start of a VP8 RTP payload.
pub fn vp8_descriptor(p: &[u8]) -> Option<Vp8Descriptor> {
    let b0 = *p.first()?;
    let mut len = 1;
    let mut picture_id = None;
    if b0 & 0x80 != 0 {
        let x = *p.get(1)?;
        len = 2;
        if x & 0x80 != 0 {
            let m = *p.get(2)?;
            if m & 0x80 != 0 {
                picture_id = Some(u16::from_be_bytes([m & 0x7f, *p.get(3)?]));
                len += 2;
            } else {
                picture_id = Some(u16::from(m));
                len += 1;
            }
        }
        if x & 0x40 != 0 {
            len += 1; // TL0PICIDX
        }
        if x & 0x30 != 0 {
            len += 1; // TID/Y/KEYIDX
        }
    }
    (p.len() >= len).then_some(Vp8Descriptor {
        len,
        start: b0 & 0x10 != 0,
        partition: b0 & 0x07,
        picture_id,
    })
}

/// Opus frames of a sine tone, encoded once with libopus (48 kHz mono,
/// 20 ms frames, 32 kbit/s). They are played in a loop.
#[derive(Debug, Clone)]
pub struct OpusClip {
    pub frames: Vec<Bytes>,
    pub bitrate: i32,
}

impl OpusClip {
    /// `frames` 20 ms frames of a `freq` Hz tone at a third of full scale.
    /// Pick a `freq` with a whole number of cycles per loop (440 Hz over 50
    /// frames = 1 s) and the loop is seamless.
    pub fn tone(freq: f64, frames: usize) -> Result<OpusClip, String> {
        let bitrate = 32_000;
        let mut enc =
            opus::Encoder::new(OPUS_CLOCK, opus::Channels::Mono, opus::Application::Audio)
                .map_err(|e| format!("opus encoder: {e}"))?;
        enc.set_bitrate(opus::Bitrate::Bits(bitrate))
            .map_err(|e| format!("opus bitrate: {e}"))?;
        let mut out = Vec::with_capacity(frames);
        let mut buf = [0u8; 1500];
        for f in 0..frames {
            let pcm: Vec<i16> = (0..OPUS_FRAME_SAMPLES)
                .map(|i| {
                    let n = (f * OPUS_FRAME_SAMPLES + i) as f64;
                    let x = (2.0 * std::f64::consts::PI * freq * n / f64::from(OPUS_CLOCK)).sin();
                    (x * 10_000.0) as i16
                })
                .collect();
            let len = enc
                .encode(&pcm, &mut buf)
                .map_err(|e| format!("opus encode: {e}"))?;
            let packet = Bytes::copy_from_slice(&buf[..len]);
            if packet.first().is_none_or(|toc| toc & 0x03 != 0) {
                return Err("libopus produced a packet that is not one frame (code 0)".into());
            }
            out.push(packet);
        }
        Ok(OpusClip {
            frames: out,
            bitrate,
        })
    }

    /// The default loop: 1 s of 440 Hz.
    pub fn default_tone() -> Result<OpusClip, String> {
        OpusClip::tone(440.0, 50)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_frames_keep_their_header_with_the_new_size() {
        let c = Vp8Clip::builtin().expect("clip");
        let key = &c.frames[0].data;
        let cut = vp8_cut(key, key.len() / 9, (80, 60));
        assert_eq!(cut.len(), key.len() / 9);
        assert_eq!(&cut[..6], &key[..6]);
        assert_eq!(u16::from_le_bytes([cut[6], cut[7]]) & 0x3fff, 80);
        assert_eq!(u16::from_le_bytes([cut[8], cut[9]]) & 0x3fff, 60);
        assert_eq!(&cut[10..], &key[10..cut.len()]);
        // Never shorter than the keyframe header, nor longer than the frame.
        assert_eq!(vp8_cut(key, 0, (80, 60)).len(), 10);
        assert_eq!(vp8_cut(key, usize::MAX, (80, 60)).len(), key.len());
        let delta = &c.frames[1].data;
        assert!(!c.frames[1].keyframe);
        let d = vp8_cut(delta, 1, (80, 60));
        assert_eq!(&d[..], &delta[..3], "a delta frame is cut, not rewritten");
    }

    #[test]
    fn the_committed_clip_is_what_its_readme_says() {
        let c = Vp8Clip::builtin().expect("parses");
        assert_eq!((c.width, c.height), (320, 240));
        assert_eq!(c.fps, 30.0);
        assert_eq!(c.frames.len(), 90);
        assert_eq!(c.keyframes(), 3);
        assert!(c.frames[0].keyframe && c.frames[30].keyframe && c.frames[60].keyframe);
        let kbps = c.natural_kbps();
        assert!((350.0..650.0).contains(&kbps), "{kbps}");
        assert!((c.fps_for(kbps / 2.0) - 15.0).abs() < 1e-9);
    }

    #[test]
    fn packetizes_and_reassembles_per_rfc7741() {
        let c = Vp8Clip::builtin().expect("parses");
        let key = &c.frames[0].data;
        assert!(key.len() > 2400, "a keyframe spans several packets");
        let packets = vp8_packets(key, 0x1234, MAX_RTP_PAYLOAD, 18);
        assert!(packets.len() >= 3);
        let mut back = Vec::new();
        for (i, p) in packets.iter().enumerate() {
            assert!(p.len() + 18 <= MAX_RTP_PAYLOAD);
            let d = vp8_descriptor(p).expect("descriptor");
            assert_eq!(d.start, i == 0);
            assert_eq!(d.partition, 0);
            assert_eq!(d.picture_id, Some(0x1234));
            back.extend_from_slice(&p[d.len..]);
        }
        assert_eq!(&back[..], &key[..]);
        // The first packet shows the keyframe bit (P=0) where SFUs look.
        assert_eq!(packets[0][VP8_DESCRIPTOR_LEN] & 1, 0);
        let delta = vp8_packets(&c.frames[1].data, 1, MAX_RTP_PAYLOAD, 18);
        assert_eq!(delta[0][VP8_DESCRIPTOR_LEN] & 1, 1);
    }

    #[test]
    fn short_descriptor_forms() {
        assert_eq!(
            vp8_descriptor(&[0x10, 0x9d]),
            Some(Vp8Descriptor {
                len: 1,
                start: true,
                partition: 0,
                picture_id: None
            })
        );
        let seven_bit = vp8_descriptor(&[0x80, 0x80, 0x05, 0]).expect("7-bit pid");
        assert_eq!((seven_bit.len, seven_bit.picture_id), (3, Some(5)));
        assert_eq!(vp8_descriptor(&[0x80, 0x80, 0x85]), None);
        assert_eq!(vp8_descriptor(&[]), None);
    }

    #[test]
    fn opus_tone_is_twenty_ms_frames() {
        let c = OpusClip::default_tone().expect("encodes");
        assert_eq!(c.frames.len(), 50);
        let mut dec = opus::Decoder::new(48_000, opus::Channels::Mono).expect("decoder");
        let mut pcm = vec![0i16; 5760];
        for f in &c.frames {
            assert_eq!(dec.decode(f, &mut pcm, false).expect("decodes"), 960);
        }
        // 32 kbit/s of 20 ms frames is about 80 bytes each.
        let mean = c.frames.iter().map(|f| f.len()).sum::<usize>() / c.frames.len();
        assert!((40..=120).contains(&mean), "{mean}");
    }
}
