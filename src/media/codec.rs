//! Codecs the SFU knows by name, and keyframe detection from RTP payloads.
//!
//! The forwarder needs to know when a keyframe starts (to clear pending
//! keyframe requests, and later to switch layers), and it must learn that
//! from the RTP payload format's descriptor without decoding anything:
//!
//! - VP8 (RFC 7741): the payload descriptor, then the VP8 payload header.
//!   A keyframe starts where S=1, PID=0 and the P bit (inverse key frame
//!   flag) of the payload header is 0.
//! - VP9 (RFC 9628): the payload descriptor only. A keyframe starts where
//!   B=1 (start of frame) and P=0 (not inter-picture predicted). The
//!   descriptor's optional fields are walked, so a truncated one is
//!   rejected rather than misread.
//! - H.264 (RFC 6184): an IDR slice (NAL type 5) or SPS (7), alone, inside
//!   a STAP-A, or at the start (S=1) of an FU-A.
//!
//! Parsers return [`CodecError`] on malformed or truncated input and never
//! panic; [`is_keyframe`] folds errors into `false`.

/// A codec by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    Opus,
    Vp8,
    Vp9,
    H264,
    /// Anything else (forwarded, never inspected).
    Other,
}

impl Codec {
    /// From an SDP / RTP codec name, case-insensitive: `opus`, `VP8`,
    /// `vp9`, `H264`.
    pub fn from_name(name: &str) -> Codec {
        let name = name.trim();
        [
            ("opus", Codec::Opus),
            ("vp8", Codec::Vp8),
            ("vp9", Codec::Vp9),
            ("h264", Codec::H264),
        ]
        .into_iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map_or(Codec::Other, |(_, c)| c)
    }

    /// From a MIME type such as `video/VP8` or `audio/opus` (the part after
    /// the `/`; a bare name works too).
    pub fn from_mime(mime: &str) -> Codec {
        Codec::from_name(mime.split_once('/').map_or(mime, |(_, name)| name))
    }

    /// The canonical name.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Opus => "opus",
            Codec::Vp8 => "VP8",
            Codec::Vp9 => "VP9",
            Codec::H264 => "H264",
            Codec::Other => "other",
        }
    }

    /// The RTP clock rate in Hz, if the codec fixes one.
    pub fn clock_rate(self) -> Option<u32> {
        match self {
            Codec::Opus => Some(48_000),
            Codec::Vp8 | Codec::Vp9 | Codec::H264 => Some(90_000),
            Codec::Other => None,
        }
    }

    pub fn is_video(self) -> bool {
        matches!(self, Codec::Vp8 | Codec::Vp9 | Codec::H264)
    }

    /// Whether [`Codec::is_keyframe`] can say yes: a video codec whose
    /// keyframes this module recognises.
    pub fn detects_keyframes(self) -> bool {
        matches!(self, Codec::Vp8 | Codec::Vp9 | Codec::H264)
    }

    /// Whether `payload` (an RTP payload of this codec) starts a keyframe.
    /// False for audio, unknown codecs and malformed payloads.
    pub fn is_keyframe(self, payload: &[u8]) -> bool {
        match self {
            Codec::Vp8 => vp8_is_keyframe(payload),
            Codec::Vp9 => vp9_is_keyframe(payload),
            Codec::H264 => h264_is_keyframe(payload),
            Codec::Opus | Codec::Other => Ok(false),
        }
        .unwrap_or(false)
    }
}

/// Whether `payload`, an RTP payload of codec `mime` (e.g. `video/VP8`),
/// starts a keyframe. False for anything malformed or not video.
pub fn is_keyframe(mime: &str, payload: &[u8]) -> bool {
    Codec::from_mime(mime).is_keyframe(payload)
}

/// Why a payload could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("empty payload")]
    Empty,
    #[error("payload ends inside the {0}")]
    Truncated(&'static str),
    #[error("VP9 descriptor has more than 3 reference indices")]
    TooManyReferences,
    #[error("STAP-A unit of {size} bytes overruns the payload ({left} bytes left)")]
    StapOverrun { size: usize, left: usize },
    #[error("zero-length NAL unit in STAP-A")]
    EmptyNal,
    #[error("H.264 NAL header has the forbidden bit set")]
    ForbiddenBit,
}

/// A cursor over a payload that fails with `Truncated(what)`.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn byte(&mut self, what: &'static str) -> Result<u8, CodecError> {
        let b = *self.buf.get(self.pos).ok_or(CodecError::Truncated(what))?;
        self.pos += 1;
        Ok(b)
    }

    fn skip(&mut self, n: usize, what: &'static str) -> Result<(), CodecError> {
        if self.buf.len() - self.pos < n {
            return Err(CodecError::Truncated(what));
        }
        self.pos += n;
        Ok(())
    }

    /// A 7- or 15-bit picture ID (M bit first).
    fn picture_id(&mut self) -> Result<u16, CodecError> {
        let b = self.byte("picture ID")?;
        if b & 0x80 == 0 {
            return Ok(u16::from(b));
        }
        let lo = self.byte("picture ID")?;
        Ok((u16::from(b & 0x7f) << 8) | u16::from(lo))
    }
}

/// The VP8 payload descriptor (RFC 7741 section 4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Vp8Descriptor {
    /// N: the frame can be discarded without affecting others.
    pub non_reference: bool,
    /// S: this packet starts a VP8 partition.
    pub start_of_partition: bool,
    /// PID: the partition index.
    pub partition_id: u8,
    /// 7- or 15-bit picture ID.
    pub picture_id: Option<u16>,
    pub tl0_pic_idx: Option<u8>,
    /// TID, when T is set.
    pub temporal_id: Option<u8>,
    /// Y: layer sync.
    pub layer_sync: bool,
    /// KEYIDX, when K is set.
    pub key_idx: Option<u8>,
    /// Length of the descriptor: the VP8 payload starts here.
    pub len: usize,
}

impl Vp8Descriptor {
    pub fn parse(payload: &[u8]) -> Result<Vp8Descriptor, CodecError> {
        if payload.is_empty() {
            return Err(CodecError::Empty);
        }
        let mut r = Reader::new(payload);
        let b0 = r.byte("descriptor")?;
        let mut d = Vp8Descriptor {
            non_reference: b0 & 0x20 != 0,
            start_of_partition: b0 & 0x10 != 0,
            partition_id: b0 & 0x07,
            ..Vp8Descriptor::default()
        };
        if b0 & 0x80 != 0 {
            let x = r.byte("extension bits")?;
            if x & 0x80 != 0 {
                d.picture_id = Some(r.picture_id()?);
            }
            if x & 0x40 != 0 {
                d.tl0_pic_idx = Some(r.byte("TL0PICIDX")?);
            }
            let (t, k) = (x & 0x20 != 0, x & 0x10 != 0);
            if t || k {
                let b = r.byte("TID/KEYIDX")?;
                if t {
                    d.temporal_id = Some(b >> 6);
                    d.layer_sync = b & 0x20 != 0;
                }
                if k {
                    d.key_idx = Some(b & 0x1f);
                }
            }
        }
        d.len = r.pos;
        Ok(d)
    }
}

/// Whether a VP8 RTP payload starts a keyframe.
pub fn vp8_is_keyframe(payload: &[u8]) -> Result<bool, CodecError> {
    let d = Vp8Descriptor::parse(payload)?;
    if !d.start_of_partition || d.partition_id != 0 {
        return Ok(false);
    }
    let header = payload
        .get(d.len)
        .ok_or(CodecError::Truncated("VP8 payload header"))?;
    // P, the inverse key frame flag, is the lowest bit of the frame tag.
    Ok(header & 0x01 == 0)
}

/// The picture size a VP8 keyframe declares (RFC 6386 §9.1: after the
/// 3-byte frame tag, the start code 9d 01 2a, then 14-bit width and height,
/// little-endian), read from the keyframe's first packet. `None` for any
/// other packet or a payload too short to say.
pub fn vp8_keyframe_size(payload: &[u8]) -> Option<(u16, u16)> {
    let d = Vp8Descriptor::parse(payload).ok()?;
    if !d.start_of_partition || d.partition_id != 0 {
        return None;
    }
    let h = payload.get(d.len..d.len + 10)?;
    if h[0] & 0x01 != 0 || h[3..6] != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let width = u16::from_le_bytes([h[6], h[7]]) & 0x3fff;
    let height = u16::from_le_bytes([h[8], h[9]]) & 0x3fff;
    Some((width, height))
}

/// The VP9 payload descriptor (RFC 9628 section 4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Vp9Descriptor {
    /// P: inter-picture predicted (not a keyframe).
    pub inter_predicted: bool,
    /// F: flexible mode.
    pub flexible: bool,
    /// B: start of a frame.
    pub start_of_frame: bool,
    /// E: end of a frame.
    pub end_of_frame: bool,
    /// V: a scalability structure is present.
    pub has_scalability_structure: bool,
    /// Z: not a reference for upper spatial layers.
    pub not_upper_reference: bool,
    /// 7- or 15-bit picture ID.
    pub picture_id: Option<u16>,
    /// TID, SID when L is set.
    pub temporal_id: Option<u8>,
    pub spatial_id: Option<u8>,
    /// U: switching up point.
    pub switching_up: bool,
    /// D: inter-layer dependency.
    pub inter_layer: bool,
    /// Non-flexible mode with L.
    pub tl0_pic_idx: Option<u8>,
    /// Number of P_DIFF reference indices (flexible mode).
    pub references: u8,
    /// Length of the descriptor: the VP9 frame data starts here.
    pub len: usize,
}

impl Vp9Descriptor {
    pub fn parse(payload: &[u8]) -> Result<Vp9Descriptor, CodecError> {
        if payload.is_empty() {
            return Err(CodecError::Empty);
        }
        let mut r = Reader::new(payload);
        let b0 = r.byte("descriptor")?;
        let mut d = Vp9Descriptor {
            inter_predicted: b0 & 0x40 != 0,
            flexible: b0 & 0x10 != 0,
            start_of_frame: b0 & 0x08 != 0,
            end_of_frame: b0 & 0x04 != 0,
            has_scalability_structure: b0 & 0x02 != 0,
            not_upper_reference: b0 & 0x01 != 0,
            ..Vp9Descriptor::default()
        };
        if b0 & 0x80 != 0 {
            d.picture_id = Some(r.picture_id()?);
        }
        if b0 & 0x20 != 0 {
            let l = r.byte("layer indices")?;
            d.temporal_id = Some(l >> 5);
            d.switching_up = l & 0x10 != 0;
            d.spatial_id = Some((l >> 1) & 0x07);
            d.inter_layer = l & 0x01 != 0;
            if !d.flexible {
                d.tl0_pic_idx = Some(r.byte("TL0PICIDX")?);
            }
        }
        if d.flexible && d.inter_predicted {
            loop {
                if d.references == 3 {
                    return Err(CodecError::TooManyReferences);
                }
                let p = r.byte("reference indices")?;
                d.references += 1;
                if p & 0x01 == 0 {
                    break;
                }
            }
        }
        if d.has_scalability_structure {
            let ss = r.byte("scalability structure")?;
            let spatial_layers = usize::from(ss >> 5) + 1;
            if ss & 0x10 != 0 {
                // WIDTH and HEIGHT, 16 bits each, per spatial layer.
                r.skip(4 * spatial_layers, "scalability structure")?;
            }
            if ss & 0x08 != 0 {
                let pictures = r.byte("scalability structure")?;
                for _ in 0..pictures {
                    let g = r.byte("picture group")?;
                    let refs = usize::from((g >> 2) & 0x03);
                    r.skip(refs, "picture group")?;
                }
            }
        }
        d.len = r.pos;
        Ok(d)
    }
}

/// Whether a VP9 RTP payload starts a keyframe.
pub fn vp9_is_keyframe(payload: &[u8]) -> Result<bool, CodecError> {
    let d = Vp9Descriptor::parse(payload)?;
    Ok(d.start_of_frame && !d.inter_predicted)
}

const NAL_IDR: u8 = 5;
const NAL_SPS: u8 = 7;
const NAL_STAP_A: u8 = 24;
const NAL_FU_A: u8 = 28;

fn is_key_nal(nal_type: u8) -> bool {
    nal_type == NAL_IDR || nal_type == NAL_SPS
}

/// Whether an H.264 RTP payload (packetization mode 0 or 1) starts a
/// keyframe.
pub fn h264_is_keyframe(payload: &[u8]) -> Result<bool, CodecError> {
    let header = *payload.first().ok_or(CodecError::Empty)?;
    if header & 0x80 != 0 {
        return Err(CodecError::ForbiddenBit);
    }
    match header & 0x1f {
        t @ 1..=23 => Ok(is_key_nal(t)),
        NAL_STAP_A => {
            let mut rest = &payload[1..];
            if rest.is_empty() {
                return Err(CodecError::Truncated("STAP-A"));
            }
            let mut key = false;
            while !rest.is_empty() {
                let [hi, lo, units @ ..] = rest else {
                    return Err(CodecError::Truncated("STAP-A NAL size"));
                };
                let size = usize::from(u16::from_be_bytes([*hi, *lo]));
                if size == 0 {
                    return Err(CodecError::EmptyNal);
                }
                let Some((nal, next)) = units.split_at_checked(size) else {
                    return Err(CodecError::StapOverrun {
                        size,
                        left: units.len(),
                    });
                };
                key |= is_key_nal(nal[0] & 0x1f);
                rest = next;
            }
            Ok(key)
        }
        NAL_FU_A => {
            let fu = *payload.get(1).ok_or(CodecError::Truncated("FU header"))?;
            Ok(fu & 0x80 != 0 && is_key_nal(fu & 0x1f))
        }
        // STAP-B, MTAP, FU-B (not used by WebRTC), reserved types.
        _ => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_mimes() {
        assert_eq!(Codec::from_name("opus"), Codec::Opus);
        assert_eq!(Codec::from_name("OPUS"), Codec::Opus);
        assert_eq!(Codec::from_name("VP8"), Codec::Vp8);
        assert_eq!(Codec::from_name("vp9"), Codec::Vp9);
        assert_eq!(Codec::from_name("h264"), Codec::H264);
        assert_eq!(Codec::from_name("AV1"), Codec::Other);
        assert_eq!(Codec::from_name(""), Codec::Other);
        assert_eq!(Codec::from_mime("video/VP8"), Codec::Vp8);
        assert_eq!(Codec::from_mime("Video/vp9"), Codec::Vp9);
        assert_eq!(Codec::from_mime("audio/opus"), Codec::Opus);
        assert_eq!(Codec::from_mime("video/H264"), Codec::H264);
        assert_eq!(Codec::from_mime("video/rtx"), Codec::Other);
        assert_eq!(Codec::from_mime("VP8"), Codec::Vp8);
        assert_eq!(Codec::from_mime("video/"), Codec::Other);
        assert_eq!(Codec::Opus.clock_rate(), Some(48_000));
        assert_eq!(Codec::H264.clock_rate(), Some(90_000));
        assert_eq!(Codec::Other.clock_rate(), None);
        assert!(Codec::Vp9.is_video() && !Codec::Opus.is_video());
        for c in [Codec::Opus, Codec::Vp8, Codec::Vp9, Codec::H264] {
            assert_eq!(Codec::from_name(c.name()), c);
        }
    }

    // VP8 keyframe as Chrome sends it: X=1 S=1 PID=0; I=1 with a 15-bit
    // picture ID; then a key frame tag (P=0), start code 9d 01 2a, 640x480.
    const VP8_KEY: [u8; 13] = [
        0x90, 0x80, 0x81, 0x23, // descriptor
        0x50, 0x42, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, // frame header
    ];
    // Interframe: same descriptor, frame tag with P=1.
    const VP8_DELTA: [u8; 7] = [0x90, 0x80, 0x81, 0x24, 0x31, 0x0d, 0x00];

    #[test]
    fn vp8_keyframes() {
        assert_eq!(vp8_is_keyframe(&VP8_KEY), Ok(true));
        assert_eq!(vp8_is_keyframe(&VP8_DELTA), Ok(false));
        let d = Vp8Descriptor::parse(&VP8_KEY).unwrap();
        assert_eq!(d.picture_id, Some(0x0123));
        assert_eq!(d.len, 4);
        // Minimal descriptor (no X), keyframe.
        assert_eq!(vp8_is_keyframe(&[0x10, 0x50, 0x42]), Ok(true));
        // Not the start of partition 0: never a keyframe start.
        assert_eq!(vp8_is_keyframe(&[0x00, 0x50]), Ok(false));
        assert_eq!(vp8_is_keyframe(&[0x11, 0x50]), Ok(false));
        // All extension fields: I (7-bit), L, T and K.
        let full = [0x90, 0xf0, 0x05, 0x11, 0b1010_0011, 0x50];
        let d = Vp8Descriptor::parse(&full).unwrap();
        assert_eq!(d.picture_id, Some(5));
        assert_eq!(d.tl0_pic_idx, Some(0x11));
        assert_eq!(d.temporal_id, Some(2));
        assert!(d.layer_sync);
        assert_eq!(d.key_idx, Some(3));
        assert_eq!(d.len, 5);
        assert_eq!(vp8_is_keyframe(&full), Ok(true));
        // K without T: the byte is there, TID is not reported.
        let d = Vp8Descriptor::parse(&[0x90, 0x10, 0x07, 0x50]).unwrap();
        assert_eq!((d.temporal_id, d.key_idx, d.len), (None, Some(7), 3));
    }

    #[test]
    fn vp8_keyframe_sizes() {
        // Descriptor (X, I with a 15-bit picture id), frame tag of a
        // keyframe, start code, 1280 x 720 with scaling bits set.
        let mut key = vec![0x90, 0x80, 0x81, 0x23, 0x50, 0x2a, 0x01, 0x9d, 0x01, 0x2a];
        key.extend_from_slice(&(1280u16 | 0x4000).to_le_bytes());
        key.extend_from_slice(&(720u16 | 0x8000).to_le_bytes());
        assert_eq!(vp8_keyframe_size(&key), Some((1280, 720)));
        // A delta frame, a later partition, a bad start code, too short.
        let mut delta = key.clone();
        delta[4] |= 0x01;
        assert_eq!(vp8_keyframe_size(&delta), None);
        let mut later = key.clone();
        later[0] = 0x81;
        assert_eq!(vp8_keyframe_size(&later), None);
        let mut bad = key.clone();
        bad[7] = 0;
        assert_eq!(vp8_keyframe_size(&bad), None);
        assert_eq!(vp8_keyframe_size(&key[..12]), None);
        assert_eq!(vp8_keyframe_size(&[]), None);
    }

    #[test]
    fn vp8_truncated() {
        assert_eq!(vp8_is_keyframe(&[]), Err(CodecError::Empty));
        for n in 1..4 {
            assert!(matches!(
                vp8_is_keyframe(&VP8_KEY[..n]),
                Err(CodecError::Truncated(_))
            ));
        }
        assert_eq!(
            vp8_is_keyframe(&VP8_KEY[..4]),
            Err(CodecError::Truncated("VP8 payload header"))
        );
        assert!(!is_keyframe("video/VP8", &VP8_KEY[..4]));
        assert!(is_keyframe("video/VP8", &VP8_KEY[..5]));
    }

    // VP9 keyframe with a scalability structure: I=1 B=1 V=1, 15-bit
    // picture ID, SS: one spatial layer with resolution (640x480) and a
    // picture group of one picture with no references, then frame data.
    const VP9_KEY_SS: [u8; 12] = [
        0x8a, 0x80, 0x01, // I P=0 B V | picture ID 1
        0x18, 0x02, 0x80, 0x01, 0xe0, // N_S=0 Y G | 640 x 480
        0x01, 0x04, 0x00, // N_G=1 | TID=0 U=0 R=1 | P_DIFF
        0x82, // frame data
    ];

    #[test]
    fn vp9_keyframes() {
        assert_eq!(vp9_is_keyframe(&VP9_KEY_SS), Ok(true));
        let d = Vp9Descriptor::parse(&VP9_KEY_SS).unwrap();
        assert_eq!((d.picture_id, d.len), (Some(1), 11));
        assert!(d.has_scalability_structure && d.start_of_frame);

        // Non-flexible with layer indices: I L B E, 7-bit ID, TID/SID, TL0.
        let key = [0xac, 0x05, 0b0010_0000, 0x07, 0x82];
        let d = Vp9Descriptor::parse(&key).unwrap();
        assert_eq!(d.temporal_id, Some(1));
        assert_eq!(d.spatial_id, Some(0));
        assert_eq!(d.tl0_pic_idx, Some(7));
        assert_eq!(d.len, 4);
        assert_eq!(vp9_is_keyframe(&key), Ok(true));

        // Middle of a key frame (B=0) is not a start.
        assert_eq!(vp9_is_keyframe(&[0x80, 0x05, 0x82]), Ok(false));

        // Flexible delta frame: I P L F B, layer byte, two P_DIFFs.
        let delta = [0xf8, 0x81, 0x00, 0x02, 0x03, 0x04, 0x82];
        let d = Vp9Descriptor::parse(&delta).unwrap();
        assert_eq!((d.references, d.tl0_pic_idx, d.len), (2, None, 6));
        assert_eq!(vp9_is_keyframe(&delta), Ok(false));

        // Three references is the most.
        assert_eq!(
            Vp9Descriptor::parse(&[0x58, 0x03, 0x03, 0x03, 0x02]),
            Err(CodecError::TooManyReferences)
        );
        assert_eq!(
            Vp9Descriptor::parse(&[0x58, 0x03, 0x03, 0x02])
                .unwrap()
                .references,
            3
        );

        // SS with two spatial layers, resolutions but no picture group.
        let two = [0x0a, 0x30, 0, 1, 0, 1, 0, 2, 0, 2, 0x82];
        assert_eq!(Vp9Descriptor::parse(&two).unwrap().len, 10);
    }

    #[test]
    fn vp9_truncated() {
        assert_eq!(vp9_is_keyframe(&[]), Err(CodecError::Empty));
        // Every cut inside the descriptor is an error, not a guess.
        for n in 1..11 {
            assert!(
                matches!(
                    vp9_is_keyframe(&VP9_KEY_SS[..n]),
                    Err(CodecError::Truncated(_))
                ),
                "cut at {n}"
            );
        }
        assert_eq!(vp9_is_keyframe(&VP9_KEY_SS[..11]), Ok(true));
        // Picture group claiming more references than present.
        assert!(vp9_is_keyframe(&[0x0a, 0x08, 0x01, 0x0c, 0x00]).is_err());
        assert!(!is_keyframe("video/VP9", &VP9_KEY_SS[..5]));
    }

    const SPS: [u8; 10] = [0x67, 0x42, 0xc0, 0x1f, 0xda, 0x01, 0x40, 0x16, 0xec, 0x04];
    const PPS: [u8; 4] = [0x68, 0xce, 0x3c, 0x80];

    fn stap_a(units: &[&[u8]]) -> Vec<u8> {
        let mut p = vec![0x78]; // NRI=3, type 24
        for u in units {
            p.extend_from_slice(&(u.len() as u16).to_be_bytes());
            p.extend_from_slice(u);
        }
        p
    }

    #[test]
    fn h264_keyframes() {
        // Single NAL units.
        assert_eq!(h264_is_keyframe(&SPS), Ok(true));
        assert_eq!(h264_is_keyframe(&[0x65, 0x88, 0x84, 0x00]), Ok(true));
        assert_eq!(h264_is_keyframe(&PPS), Ok(false));
        assert_eq!(h264_is_keyframe(&[0x41, 0x9a, 0x02]), Ok(false));
        assert_eq!(h264_is_keyframe(&[0x06, 0x05, 0x01]), Ok(false), "SEI");
        // STAP-A with SPS + PPS, and with PPS + IDR; without either.
        assert_eq!(h264_is_keyframe(&stap_a(&[&SPS, &PPS])), Ok(true));
        assert_eq!(h264_is_keyframe(&stap_a(&[&PPS, &[0x65, 0x88]])), Ok(true));
        assert_eq!(h264_is_keyframe(&stap_a(&[&PPS, &[0x41, 0x9a]])), Ok(false));
        // FU-A: start of IDR, middle of IDR, start of non-IDR.
        assert_eq!(h264_is_keyframe(&[0x7c, 0x85, 0xb8, 0x00]), Ok(true));
        assert_eq!(h264_is_keyframe(&[0x7c, 0x05, 0xb8, 0x00]), Ok(false));
        assert_eq!(h264_is_keyframe(&[0x7c, 0x81, 0x9a]), Ok(false));
        // FU-B, MTAP: not inspected.
        assert_eq!(h264_is_keyframe(&[0x7d, 0x85, 0, 0]), Ok(false));
        assert!(is_keyframe("video/h264", &SPS));
    }

    #[test]
    fn h264_malformed() {
        assert_eq!(h264_is_keyframe(&[]), Err(CodecError::Empty));
        assert_eq!(h264_is_keyframe(&[0xe7]), Err(CodecError::ForbiddenBit));
        assert_eq!(
            h264_is_keyframe(&[0x7c]),
            Err(CodecError::Truncated("FU header"))
        );
        assert_eq!(
            h264_is_keyframe(&[0x78]),
            Err(CodecError::Truncated("STAP-A"))
        );
        let good = stap_a(&[&SPS, &PPS]);
        // Every truncation of the STAP-A is rejected, except the cut right
        // after the SPS unit, which is a well-formed STAP-A on its own.
        let boundary = 1 + 2 + SPS.len();
        for n in 1..good.len() {
            if n == boundary {
                assert_eq!(h264_is_keyframe(&good[..n]), Ok(true));
            } else {
                assert!(h264_is_keyframe(&good[..n]).is_err(), "cut at {n}");
            }
        }
        assert_eq!(
            h264_is_keyframe(&[0x78, 0x00, 0x00, 0x67]),
            Err(CodecError::EmptyNal)
        );
        assert_eq!(
            h264_is_keyframe(&[0x78, 0xff, 0xff, 0x67, 0x42]),
            Err(CodecError::StapOverrun {
                size: 0xffff,
                left: 2
            })
        );
        assert!(!is_keyframe("video/H264", &good[..5]));
    }

    #[test]
    fn audio_and_unknown_are_never_keyframes() {
        assert!(!is_keyframe("audio/opus", &[0x00; 20]));
        assert!(!is_keyframe("video/AV1", &VP8_KEY));
        assert!(!Codec::Other.is_keyframe(&SPS));
    }

    /// Random bytes through every parser: no panics.
    #[test]
    fn property_random_payloads_never_panic() {
        let mut rng = crate::media::XorShift::new(99);
        let mut buf = [0u8; 40];
        for _ in 0..50_000 {
            let n = rng.below(buf.len() as u64 + 1) as usize;
            for b in &mut buf[..n] {
                *b = rng.next_u64() as u8;
            }
            let p = &buf[..n];
            let _ = vp8_is_keyframe(p);
            let _ = vp9_is_keyframe(p);
            let _ = h264_is_keyframe(p);
            if let Ok(d) = Vp8Descriptor::parse(p) {
                assert!(d.len <= n);
            }
            if let Ok(d) = Vp9Descriptor::parse(p) {
                assert!(d.len <= n);
            }
        }
    }
}
