//! The properties behind both the fuzz targets (`fuzz/fuzz_targets/*.rs`,
//! nightly, cargo-fuzz) and the bounded property tests (`tests/props.rs`,
//! stable, part of the normal test command): one function per target takes
//! the raw input bytes, drives the real parsing code with them and asserts
//! what that code promises. The fuzz targets include this file with
//! `#[path]`, so both runs check the same things.
//!
//! Inputs that drive a state machine (demux, rewriter, mixer) are read as a
//! sequence of small operations by [`Ops`]; running out of bytes ends the
//! sequence.

#![allow(dead_code)] // each fuzz target uses one of these

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use switchboard::media::codec::{self, Vp8Descriptor, Vp9Descriptor};
use switchboard::media::demux::{self, Demux, DropReason, Route, MAX_ADDRS_PER_KEY};
use switchboard::media::offer::{self, OfferLimits};
use switchboard::media::rewrite::{Rewrite, SeqRewriter};
use switchboard::media::rtp::RtpHeader;
use switchboard::media::seqno::SeqUnwrapper;
use switchboard::media::{PayloadType, Ssrc};
use switchboard::mixer::level::AudioLevel;
use switchboard::mixer::{
    jitter, Frame, InputId, JitterBuffer, MixerConfig, Push, RoomMixer, MAX_PACKET,
};
use switchboard_proto::{parse_client, ErrorCode, CLIENT_TYPES};

/// Reads operations out of fuzz bytes; every read past the end is `None`.
pub struct Ops<'a> {
    data: &'a [u8],
}

impl<'a> Ops<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Ops { data }
    }

    pub fn u8(&mut self) -> Option<u8> {
        let (first, rest) = self.data.split_first()?;
        self.data = rest;
        Some(*first)
    }

    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }

    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes([
            self.u8()?,
            self.u8()?,
            self.u8()?,
            self.u8()?,
        ]))
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }
}

// ---------------------------------------------------------------------------
// signaling
// ---------------------------------------------------------------------------

/// `parse_client` on any text: the size limit is exact, an accepted message
/// has a known type and survives a round trip through its own JSON
/// unchanged, and a rejection under the limit does not depend on the limit.
pub fn signaling(text: &str) {
    let len = text.len();
    let at_limit = parse_client(text, len);
    let roomy = parse_client(text, len + 65_536);
    assert_eq!(
        at_limit.as_ref().map_err(|e| e.code),
        roomy.as_ref().map_err(|e| e.code),
        "the limit changes the outcome of a frame within it"
    );
    if len > 0 {
        let over = parse_client(text, len - 1).expect_err("a frame over the limit was accepted");
        assert_eq!(over.code, ErrorCode::TooLarge);
    }
    match at_limit {
        Ok(msg) => {
            assert!(CLIENT_TYPES.contains(&msg.type_name()));
            let again = msg.to_text();
            let back = parse_client(&again, usize::MAX).expect("own JSON is refused");
            assert_eq!(back, msg, "round trip through {again}");
        }
        Err(e) => assert_ne!(e.code, ErrorCode::TooLarge),
    }
}

// ---------------------------------------------------------------------------
// sdp_offer
// ---------------------------------------------------------------------------

/// The offer caps on any text. `limit_sending(x, k)`: at most `k` sending
/// sections (exactly `min(k, before)`), the same sections and candidates,
/// idempotent, and a no-op when nothing is over the cap; `check` agrees
/// with `inspect`. When the engine's SDP parser accepts the limited offer,
/// it sees the same media sections, and no more sending ones than `k`.
pub fn sdp_offer(text: &str) {
    let shape = offer::inspect(text);
    let limits = OfferLimits {
        max_sections: 4,
        max_candidates: 8,
        max_sending: 2,
        max_encodings: 3,
    };
    match offer::check(text, &limits) {
        Ok(s) => {
            assert_eq!(s, shape);
            assert!(s.sections <= 4 && s.candidates <= 8 && s.encodings <= 3);
        }
        Err(_) => assert!(shape.sections > 4 || shape.candidates > 8 || shape.encodings > 3),
    }
    for keep in 0..=3 {
        let limited = offer::limit_sending(text, keep);
        let after = offer::inspect(&limited);
        assert_eq!(after.sections, shape.sections, "keep {keep}: {limited:?}");
        assert_eq!(
            after.candidates, shape.candidates,
            "keep {keep}: {limited:?}"
        );
        assert_eq!(
            after.sending,
            shape.sending.min(keep),
            "keep {keep}: {limited:?}"
        );
        assert_eq!(
            offer::limit_sending(&limited, keep),
            limited,
            "keep {keep}: not idempotent"
        );
        if shape.sending <= keep {
            assert_eq!(
                limited, text,
                "keep {keep}: changed an offer within the cap"
            );
        }
        if keep == 1 {
            engine_agrees(&limited, after.sections, keep);
        }
    }
}

/// What webrtc-rs's SDP parser (the one the transport hands the offer to)
/// makes of `sdp`, against our text view.
fn engine_agrees(sdp: &str, sections: usize, keep: usize) {
    use rtc::peer_connection::sdp::RTCSessionDescription;
    let Ok(desc) = RTCSessionDescription::offer(sdp.to_owned()) else {
        return;
    };
    let Ok(parsed) = desc.unmarshal() else {
        return;
    };
    let media = &parsed.media_descriptions;
    assert_eq!(media.len(), sections, "engine sections of {sdp:?}");
    let sending = media
        .iter()
        .filter(|m| {
            let kind = m.media_name.media.as_str();
            // The engine takes a section's first direction attribute.
            let dir = m
                .attributes
                .iter()
                .map(|a| a.key.as_str())
                .find(|k| matches!(*k, "sendrecv" | "sendonly" | "recvonly" | "inactive"));
            (kind == "audio" || kind == "video")
                && m.media_name.port.value != 0
                && !matches!(dir, Some("recvonly" | "inactive"))
        })
        .count();
    assert!(sending <= keep, "engine sees {sending} sending in {sdp:?}");
}

// ---------------------------------------------------------------------------
// demux
// ---------------------------------------------------------------------------

const PWD_A: &str = "the-servers-ice-password-1234";
const PWD_B: &str = "another-ice-password-5678";

/// RFC 5769 section 2.1, sample request (USERNAME "evtj:h6vY").
pub const RFC5769_REQUEST: [u8; 108] = [
    0x00, 0x01, 0x00, 0x58, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86,
    0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x10, 0x53, 0x54, 0x55, 0x4e, 0x20, 0x74, 0x65, 0x73,
    0x74, 0x20, 0x63, 0x6c, 0x69, 0x65, 0x6e, 0x74, 0x00, 0x24, 0x00, 0x04, 0x6e, 0x00, 0x01, 0xff,
    0x80, 0x29, 0x00, 0x08, 0x93, 0x2f, 0xf9, 0xb1, 0x51, 0x26, 0x3b, 0x36, 0x00, 0x06, 0x00, 0x09,
    0x65, 0x76, 0x74, 0x6a, 0x3a, 0x68, 0x36, 0x76, 0x59, 0x20, 0x20, 0x20, 0x00, 0x08, 0x00, 0x14,
    0x9a, 0xea, 0xa7, 0x0c, 0xbf, 0xd8, 0xcb, 0x56, 0x78, 0x1e, 0xf2, 0xb5, 0xb2, 0xd3, 0xf2, 0x49,
    0xc1, 0xb5, 0x71, 0xa2, 0x80, 0x28, 0x00, 0x04, 0xe5, 0x7a, 0x3b, 0xcf,
];
const RFC5769_PASSWORD: &str = "VOkJxbRl1RmTxUk/WvJxBt";

/// A binding request with PRIORITY, USERNAME and a MESSAGE-INTEGRITY made
/// with `pwd` (then a FINGERPRINT, not checked by the demux). Returns the
/// message and the end of the MESSAGE-INTEGRITY attribute.
pub fn signed_binding(username: &[u8], pwd: &str) -> (Vec<u8>, usize) {
    use hmac::{Hmac, Mac};
    let mut m = vec![0x00, 0x01, 0, 0];
    m.extend_from_slice(&demux::STUN_MAGIC_COOKIE.to_be_bytes());
    m.extend_from_slice(&[7; 12]);
    for (kind, value) in [(0x0024u16, &[0x6e, 0, 1, 0xff][..]), (0x0006, username)] {
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&(value.len() as u16).to_be_bytes());
        m.extend_from_slice(value);
        while m.len() % 4 != 0 {
            m.push(0);
        }
    }
    let covered = (m.len() - 20 + 24) as u16;
    m[2..4].copy_from_slice(&covered.to_be_bytes());
    let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(pwd.as_bytes()) else {
        unreachable!("HMAC takes keys of any length")
    };
    mac.update(&m);
    let tag = mac.finalize().into_bytes();
    m.extend_from_slice(&0x0008u16.to_be_bytes());
    m.extend_from_slice(&20u16.to_be_bytes());
    m.extend_from_slice(&tag);
    let mi_end = m.len();
    m.extend_from_slice(&0x8028u16.to_be_bytes());
    m.extend_from_slice(&4u16.to_be_bytes());
    m.extend_from_slice(&[0; 4]);
    let len = (m.len() - 20) as u16;
    m[2..4].copy_from_slice(&len.to_be_bytes());
    (m, mi_end)
}

fn demux_addr(b: u8) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], 1000 + u16::from(b % 24)))
}

/// A sequence of datagrams from a few addresses through [`Demux::route`]
/// (raw bytes, checks we sign with the right or a wrong password, the RFC
/// 5769 sample, each optionally with one byte changed), plus ufrag
/// retirements. Against a model: a STUN check with a registered ufrag is
/// routed iff its MESSAGE-INTEGRITY verifies, and only then is its address
/// remembered; everything else goes by the addresses checks introduced, so
/// a datagram from an unknown address that is not a valid check is never
/// routed. A signed check verifies, and any change before the end of its
/// MESSAGE-INTEGRITY breaks it. Addresses per connection stay capped.
pub fn demux(data: &[u8]) {
    let mut ops = Ops::new(data);
    let mut d: Demux<u32> = Demux::new();
    let mut ufrags: HashMap<&str, (u32, &str)> = HashMap::new();
    for (ufrag, pwd, key) in [
        ("abcd", PWD_A, 1),
        ("wxyz", PWD_B, 2),
        ("evtj", RFC5769_PASSWORD, 3),
    ] {
        d.register(ufrag, pwd, key);
        ufrags.insert(ufrag, (key, pwd));
    }
    // Address -> key, as the model says it should be.
    let mut known: HashMap<SocketAddr, u32> = HashMap::new();
    while let Some(op) = ops.u8() {
        let Some(from) = ops.u8().map(demux_addr) else {
            return;
        };
        let mut buf: Vec<u8>;
        let mut signed_ok = None;
        match op % 5 {
            0 | 1 => {
                let n = usize::from(ops.u16().unwrap_or(0) % 1600);
                buf = ops.take(n).to_vec();
            }
            2 => {
                let n = usize::from(ops.u8().unwrap_or(0) % 48);
                let rest = ops.take(n);
                let (local, pwd) = match op / 5 % 4 {
                    0 => ("abcd", PWD_A),
                    1 => ("wxyz", PWD_B),
                    2 => ("abcd", PWD_B),
                    _ => ("nope", PWD_A),
                };
                let mut username = local.as_bytes().to_vec();
                username.push(b':');
                username.extend_from_slice(rest);
                let (m, mi_end) = signed_binding(&username, pwd);
                // The signer and the verifier agree.
                assert!(demux::integrity_ok(&m, pwd.as_bytes()));
                buf = m;
                signed_ok = Some((mi_end, pwd));
            }
            3 => {
                buf = RFC5769_REQUEST.to_vec();
                signed_ok = Some((RFC5769_REQUEST.len() - 8, RFC5769_PASSWORD));
            }
            _ => {
                let ufrag = ["abcd", "wxyz", "evtj"][usize::from(op / 5 % 3)];
                d.unregister_ufrag(ufrag);
                ufrags.remove(ufrag);
                continue;
            }
        }
        // Optionally change one byte.
        if op & 0x80 != 0 && !buf.is_empty() {
            let at = usize::from(ops.u16().unwrap_or(0)) % buf.len();
            let value = ops.u8().unwrap_or(0);
            if buf[at] != value {
                buf[at] = value;
                if let Some((mi_end, pwd)) = signed_ok {
                    if at < mi_end && !(2..4).contains(&at) {
                        assert!(
                            !demux::integrity_ok(&buf, pwd.as_bytes()),
                            "changed byte {at} still verifies"
                        );
                    }
                }
            }
        }

        // The model.
        let expected = if buf.is_empty() {
            Route::Drop(DropReason::Empty)
        } else if buf.len() > demux::DEFAULT_MAX_DATAGRAM {
            Route::Drop(DropReason::Oversize)
        } else if let Err(reason) = demux::classify(&buf) {
            Route::Drop(reason)
        } else {
            let stun = demux::classify(&buf) == Ok(demux::PacketKind::Stun);
            match stun.then(|| demux::parse_stun_username(&buf)) {
                Some(Ok(username)) => match username.split_once(':') {
                    None => Route::Drop(DropReason::StunBadUsername),
                    Some((local, _)) => match ufrags.get(local) {
                        None => Route::Drop(DropReason::UnknownUfrag),
                        Some(&(key, pwd)) if demux::integrity_ok(&buf, pwd.as_bytes()) => {
                            Route::To(key)
                        }
                        Some(_) => Route::Drop(DropReason::StunBadIntegrity),
                    },
                },
                Some(Err(demux::StunError::NoUsername)) | None => match known.get(&from) {
                    Some(&key) => Route::To(key),
                    None => Route::Drop(DropReason::UnknownAddress),
                },
                Some(Err(e)) => Route::Drop(DropReason::StunMalformed(e)),
            }
        };
        let was_known = d.key_for_addr(from);
        let got = d.route(&buf, from);
        match (&expected, &got) {
            (Route::Drop(DropReason::UnknownAddress), Route::Drop(DropReason::UnknownAddress)) => {}
            _ => assert_eq!(got, expected, "{buf:02x?} from {from}"),
        }
        if let Route::To(key) = got {
            assert!(
                was_known == Some(key) || expected == Route::To(key),
                "routed from an unknown address"
            );
            assert_eq!(d.key_for_addr(from), Some(key));
        } else {
            assert_eq!(
                d.key_for_addr(from),
                was_known,
                "a drop changed the address map"
            );
        }
        // Follow what the demux remembered; it must only ever be addresses
        // that sent a valid check (to that key or another before).
        known.clear();
        for key in [1, 2, 3] {
            let addrs = d.addrs_of(key);
            assert!(addrs.len() <= MAX_ADDRS_PER_KEY);
            for a in addrs {
                assert_eq!(known.insert(*a, key), None, "{a} under two keys");
            }
        }
        assert_eq!(known.len(), d.addr_count());
    }
}

// ---------------------------------------------------------------------------
// rtp_rewrite
// ---------------------------------------------------------------------------

/// A stream of packets from a few SSRCs through one [`SeqRewriter`], some
/// as bare (ssrc, seq, ts), some as whole RTP packets through
/// [`RtpHeader::parse`] and `rewrite_packet`. Checks: a parsed header
/// accounts for every byte; a forwarded packet is rewritten in exactly its
/// SSRC, payload type, sequence number and timestamp, a dropped or
/// malformed one is left untouched; the highest output sequence number
/// never goes back; a switch to another source continues at last + 1
/// (the first source passes through unchanged); every forwarded packet
/// maps back to its source packet through `source_of`; a drop changes
/// nothing.
pub fn rtp_rewrite(data: &[u8]) {
    let mut ops = Ops::new(data);
    let Some(window) = ops.u8() else {
        return;
    };
    let mut r = SeqRewriter::new(90_000).with_max_reorder(u64::from(window) * 8 + 1);
    let mut outputs: std::collections::HashMap<u16, u16> = std::collections::HashMap::new();
    let t0 = Instant::now();
    let mut now = t0;
    while let Some(op) = ops.u8() {
        now += Duration::from_millis(u64::from(op >> 3));
        let (ssrc, seq, ts, packet) = if op & 0x04 == 0 {
            let ssrc = Ssrc(u32::from(op & 0x03));
            let (Some(seq), Some(ts)) = (ops.u16(), ops.u32()) else {
                return;
            };
            (ssrc, seq, ts, None)
        } else {
            let n = usize::from(ops.u8().unwrap_or(0));
            let mut buf = ops.take(n).to_vec();
            // Keep the version bits right most of the time.
            if op & 0x01 == 0 && !buf.is_empty() {
                buf[0] = (buf[0] & 0x3f) | 0x80;
            }
            match RtpHeader::parse(&buf) {
                Ok(h) => {
                    assert_eq!(h.payload_offset + h.payload_len + h.padding_len, buf.len());
                    assert_eq!(h.payload(&buf).len(), h.payload_len);
                    if let Some(ext) = h.extension {
                        assert_eq!(h.extension_data(&buf).map(<[u8]>::len), Some(ext.len));
                    }
                    (h.ssrc, h.seq, h.timestamp, Some((buf, h)))
                }
                Err(_) => {
                    let before = buf.clone();
                    let out = r.rewrite_packet(&mut buf, Ssrc(9), PayloadType(100), now);
                    assert!(out.is_err());
                    assert_eq!(buf, before);
                    continue;
                }
            }
        };
        let last = r.last_out_seq();
        let current = r.current_ssrc();
        if outputs.len() > 4096 {
            outputs.clear();
        }
        let decision = match packet {
            None => r.rewrite(ssrc, seq, ts, now),
            Some((mut buf, h)) => {
                let before = buf.clone();
                let pt = PayloadType(op >> 1);
                let decision = r
                    .rewrite_packet(&mut buf, Ssrc(0xfeed), pt, now)
                    .expect("a parsed packet is rewritten");
                match decision {
                    Rewrite::Forward { seq, ts } => {
                        let after = RtpHeader::parse(&buf).expect("rewritten packet parses");
                        assert_eq!(after.ssrc, Ssrc(0xfeed));
                        assert_eq!(after.payload_type, pt);
                        assert_eq!((after.seq, after.timestamp), (seq, ts));
                        assert_eq!(after.marker, h.marker);
                        assert_eq!(after.payload_offset, h.payload_offset);
                        assert_eq!(&buf[12..], &before[12..], "only the fixed header changes");
                    }
                    Rewrite::Drop(_) => assert_eq!(buf, before),
                }
                decision
            }
        };
        match decision {
            Rewrite::Forward {
                seq: out,
                ts: out_ts,
            } => {
                let new_last = r.last_out_seq().expect("forwarded, so something was sent");
                assert!(last.is_none_or(|l| new_last >= l), "last output went back");
                assert_eq!(r.current_ssrc(), Some(ssrc));
                if current != Some(ssrc) {
                    match last {
                        None => assert_eq!((out, out_ts), (seq, ts), "first source changed"),
                        Some(l) => assert_eq!(out, l.next().wire(), "switch is not last + 1"),
                    }
                }
                // Within one source, one output number per input number
                // (a repeated packet keeps its number).
                if current != Some(ssrc) {
                    outputs.clear();
                }
                if let Some(was) = outputs.insert(out, seq) {
                    assert_eq!(was, seq, "two packets of {ssrc:?} numbered {out}");
                }
            }
            Rewrite::Drop(_) => {
                assert_eq!(r.current_ssrc(), current);
                assert_eq!(r.last_out_seq(), last);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// vp8 (VP8, VP9, H.264 payloads)
// ---------------------------------------------------------------------------

/// Every payload parser on the same bytes. A descriptor that parses lies
/// within the payload, is read from exactly its own bytes (the same
/// descriptor from just those, and every shorter cut is rejected rather
/// than misread); keyframe answers follow from the descriptor; the MIME
/// front door gives the same answers with errors as `false`.
pub fn codecs(p: &[u8]) {
    match Vp8Descriptor::parse(p) {
        Ok(d) => {
            assert!(d.len >= 1 && d.len <= p.len());
            assert_eq!(Vp8Descriptor::parse(&p[..d.len]), Ok(d));
            for cut in 0..d.len {
                assert!(Vp8Descriptor::parse(&p[..cut]).is_err(), "cut {cut}");
            }
            let key = codec::vp8_is_keyframe(p);
            if d.start_of_partition && d.partition_id == 0 {
                assert_eq!(key.ok(), p.get(d.len).map(|b| b & 1 == 0));
            } else {
                assert_eq!(key, Ok(false));
            }
        }
        Err(_) => assert!(codec::vp8_is_keyframe(p).is_err()),
    }
    match Vp9Descriptor::parse(p) {
        Ok(d) => {
            assert!(d.len >= 1 && d.len <= p.len());
            assert!(d.references <= 3);
            assert_eq!(Vp9Descriptor::parse(&p[..d.len]), Ok(d));
            for cut in 0..d.len {
                assert!(Vp9Descriptor::parse(&p[..cut]).is_err(), "cut {cut}");
            }
            assert_eq!(
                codec::vp9_is_keyframe(p),
                Ok(d.start_of_frame && !d.inter_predicted)
            );
        }
        Err(e) => assert_eq!(codec::vp9_is_keyframe(p), Err(e)),
    }
    let h264 = codec::h264_is_keyframe(p);
    if h264.is_ok() {
        assert!(!p.is_empty() && p[0] & 0x80 == 0);
    }
    assert_eq!(
        codec::is_keyframe("video/VP8", p),
        codec::vp8_is_keyframe(p).unwrap_or(false)
    );
    assert_eq!(
        codec::is_keyframe("video/VP9", p),
        codec::vp9_is_keyframe(p).unwrap_or(false)
    );
    assert_eq!(codec::is_keyframe("video/H264", p), h264.unwrap_or(false));
    assert!(!codec::is_keyframe("audio/opus", p));
}

// ---------------------------------------------------------------------------
// mixer_input
// ---------------------------------------------------------------------------

/// Ticks one input may run before the input ends (Opus encoding dominates
/// the cost of a tick).
const MAX_TICKS: u32 = 24;

/// Packets from two participants into a [`RoomMixer`] (through its jitter
/// buffers into libopus's decoder) and into a standalone
/// [`JitterBuffer`] watched against a model, with ticks in between.
/// Checks: empty or oversize payloads are `Invalid` and nothing else is;
/// the buffer's depth never exceeds its capacity; a played frame is
/// exactly a payload stored under that sequence number; counters only
/// grow; a tick encodes at most K+1 packets and each fits `MAX_PACKET`.
pub fn mixer_input(data: &[u8]) {
    let mut ops = Ops::new(data);
    let config = MixerConfig {
        complexity: 0,
        ..MixerConfig::default()
    };
    let k = config.select.k;
    let Ok(mut mixer) = RoomMixer::new(config) else {
        panic!("mixer with default settings");
    };
    for id in [1, 2] {
        assert!(mixer.add_input(InputId(id)).is_ok());
    }
    let capacity = 6;
    let mut jb = JitterBuffer::new(capacity, 2);
    // The model of the standalone buffer: extended seq -> payload stored.
    let mut unwrap = SeqUnwrapper::new();
    let mut stored: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut now = Instant::now();
    let mut ticks = 0;
    let mut last_stats = *mixer.stats();
    while let Some(op) = ops.u8() {
        if op & 0x80 == 0 {
            let (Some(seq), Some(ts)) = (ops.u16(), ops.u16()) else {
                return;
            };
            let ts = u32::from(ts) * 960;
            let n = match op & 0x07 {
                0 => 0,
                7 => jitter::MAX_PAYLOAD + 1,
                _ => usize::from(ops.u8().unwrap_or(0)),
            };
            let payload = ops.take(n);
            let level = (op & 0x08 != 0).then(|| AudioLevel::from_byte(op << 1));
            let id = InputId(u32::from(op >> 4 & 1) + 1);
            let got = mixer
                .push(id, seq, ts, payload, level, now)
                .expect("input exists");
            let invalid = payload.is_empty() || payload.len() > jitter::MAX_PAYLOAD;
            assert_eq!(got == Push::Invalid, invalid);

            let got = jb.push(seq, ts, payload, level, now);
            assert_eq!(got == Push::Invalid, invalid);
            if !invalid {
                let ext = unwrap.extend(seq).0;
                if got == Push::Reset {
                    stored.clear();
                }
                if matches!(got, Push::Stored | Push::Reset) {
                    stored.insert(ext, payload.to_vec());
                }
            }
            assert!(jb.depth() <= capacity as u64, "depth {}", jb.depth());
        } else {
            if ticks == MAX_TICKS {
                return;
            }
            ticks += 1;
            now += Duration::from_millis(20);
            match jb.pop() {
                Frame::Packet { payload, .. } => {
                    assert!(
                        stored.values().any(|p| p == payload),
                        "played a payload never stored"
                    );
                }
                Frame::Lost { fec: Some(next) } => {
                    assert!(stored.values().any(|p| p == next));
                }
                Frame::Lost { fec: None } | Frame::Empty => {}
            }
            let out = mixer.tick(now);
            assert!(out.encodes() <= k + 1);
            for id in [1, 2] {
                if let Some(p) = out.packet_for(InputId(id)) {
                    assert!(p.len() <= MAX_PACKET);
                }
            }
            let stats = *mixer.stats();
            assert!(stats.ticks == last_stats.ticks + 1);
            assert!(stats.decodes >= last_stats.decodes);
            assert!(stats.decode_errors >= last_stats.decode_errors);
            assert!(stats.lost >= last_stats.lost);
            last_stats = stats;
        }
    }
}

// ---------------------------------------------------------------------------
// socketio
// ---------------------------------------------------------------------------

/// A Socket.IO packet (what an Engine.IO message carries on `/socket.io/`)
/// through socketioxide's parser, configured as the endpoint configures it,
/// then the endpoint's reading of a classic event's room argument:
/// - nothing is held back for later: a packet announcing binary
///   attachments is refused, never kept waiting for them;
/// - an accepted packet with a JSON payload re-encodes to one that parses
///   to the same packet;
/// - for an event `[name, room, ...]`, `room_name` gives a room exactly when
///   the room is a string or a whole number whose text is a valid name, and
///   that room's text is the argument's.
pub fn socketio(data: &[u8]) {
    use socketioxide_core::packet::PacketData;
    use socketioxide_core::parser::{Parse, ParseConfig, ParseError, ParserState};
    use socketioxide_core::{Str, Value};
    use socketioxide_parser_common::CommonParser;
    use switchboard::socketio::{room_name, MAX_INCOMING_BINARIES};
    use switchboard_proto::RoomName;

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = ParseConfig {
        max_incoming_binaries: MAX_INCOMING_BINARIES,
        ..ParseConfig::default()
    };
    let state = ParserState::default();
    let parsed = CommonParser.decode_str(&config, &state, Str::from(text.to_owned()));
    let held = state
        .partial_bin_packet
        .lock()
        .map_or(true, |p| p.is_some());
    assert!(!held, "{text:?}: a partial binary packet is held");
    assert!(
        !matches!(parsed, Err(ParseError::NeedsMoreBinaryData)),
        "{text:?}: waits for attachments it may not get"
    );
    let Ok(packet) = parsed else { return };
    if let PacketData::BinaryEvent(..) | PacketData::BinaryAck(..) = packet.inner {
        // Only with no attachments at all; anything else was refused above.
        assert_eq!(MAX_INCOMING_BINARIES, 0);
    }
    // Round trip through the encoder (as what a server sends back), for
    // packets whose payload is JSON: everything the server encodes is (a
    // relayed `message` is re-serialized from parsed JSON). The parser also
    // takes a CONNECT whose data is not JSON, which the encoder cannot write
    // back unambiguously: `00/admin,{..}` is namespace `/` with the data
    // `/admin,{..}`, re-encoded `0/admin,{..}`, which is namespace `/admin`
    // (found by the fuzzer; regression seed-23).
    let payload = match &packet.inner {
        PacketData::Connect(Some(v))
        | PacketData::Event(v, _)
        | PacketData::EventAck(v, _)
        | PacketData::BinaryEvent(v, _)
        | PacketData::BinaryAck(v, _) => Some(v),
        _ => None,
    };
    let json_payload = payload.is_none_or(|v| match v {
        Value::Str(s, _) => serde_json::from_str::<serde_json::Value>(s).is_ok(),
        _ => false,
    });
    if let (true, Value::Str(again, None)) = (json_payload, CommonParser.encode(packet.clone())) {
        let fresh = ParserState::default();
        let back = CommonParser
            .decode_str(&config, &fresh, again.clone())
            .unwrap_or_else(|e| panic!("{text:?}: re-encoded {again:?} does not parse: {e}"));
        assert_eq!(back, packet, "{text:?}: round trip via {again:?}");
    }
    // The event's room argument, as the endpoint reads it.
    let (PacketData::Event(Value::Str(body, _), _)
    | PacketData::BinaryEvent(Value::Str(body, _), _)) = &packet.inner
    else {
        return;
    };
    let Ok(serde_json::Value::Array(args)) = serde_json::from_str::<serde_json::Value>(body) else {
        return;
    };
    let Some(arg) = args.get(1) else { return };
    let as_text = match arg {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) if n.is_u64() || n.is_i64() => Some(n.to_string()),
        _ => None,
    };
    let expected = as_text.as_deref().and_then(|t| RoomName::parse(t).ok());
    let got = room_name(arg);
    assert_eq!(
        got.as_ref().map(|r| r.as_str().to_owned()),
        expected.as_ref().map(|r| r.as_str().to_owned()),
        "{text:?}: room argument {arg}"
    );
    if let (Some(room), Some(t)) = (got, as_text) {
        assert_eq!(
            room.as_str(),
            t,
            "{text:?}: the room is the argument's text"
        );
    }
}
