//! Simulcast publishing ([`crate::JoinOptions::simulcast`]): one VP8 track
//! whose sender has one encoding per rid, each with its own SSRC and
//! sequence numbers, as a browser sends with `sendEncodings`.
//!
//! The offer carries `a=rid:<id> send` per rid and `a=simulcast:send
//! <id>;<id>;..` (rtc 0.21 writes both when every encoding of a sender has
//! a rid), and no `a=ssrc` lines: the receiver (the server's rtc) binds each
//! SSRC to its rid from the packets' `sdes:mid` and `sdes:rtp-stream-id`
//! header extensions (RFC 8852). rtc's sender does not add those, so every
//! packet written here carries both (ids as negotiated; a few bytes a
//! packet, and always, so a receiver that lost a binding finds it again).

use std::time::Instant;

use bytes::Bytes;
use rtc::peer_connection::RTCPeerConnection;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters,
};
use rtc::rtp_transceiver::RTCRtpSenderId;

/// Longest rid accepted (RFC 8851 sets none; browsers use one letter).
pub const MAX_RID_LEN: usize = 16;
/// Most rids accepted client-side. The server accepts fewer (3) and says so
/// with an `error`; this only bounds what the client builds.
pub const MAX_RIDS: usize = 8;

/// Why simulcast options or a layer call were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimulcastError {
    #[error("simulcast needs at least 2 rids, got {0}")]
    TooFewRids(usize),
    #[error("at most {MAX_RIDS} rids, got {0}")]
    TooManyRids(usize),
    #[error("rid {0:?} is not 1-{MAX_RID_LEN} characters of A-Z, a-z, 0-9, '-' or '_'")]
    BadRid(String),
    #[error("rid {0:?} is given twice")]
    DuplicateRid(String),
    #[error("simulcast needs publish_video")]
    NoVideo,
    #[error("this client does not publish simulcast")]
    NotSimulcast,
    #[error("no layer with rid {0:?}")]
    UnknownRid(String),
}

/// Checks the rids of [`crate::JoinOptions::simulcast`].
pub fn validate(rids: &[String], publish_video: bool) -> Result<(), SimulcastError> {
    if !publish_video {
        return Err(SimulcastError::NoVideo);
    }
    if rids.len() < 2 {
        return Err(SimulcastError::TooFewRids(rids.len()));
    }
    if rids.len() > MAX_RIDS {
        return Err(SimulcastError::TooManyRids(rids.len()));
    }
    for (i, rid) in rids.iter().enumerate() {
        let ok = (1..=MAX_RID_LEN).contains(&rid.len())
            && rid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(SimulcastError::BadRid(rid.clone()));
        }
        if rids[..i].contains(rid) {
            return Err(SimulcastError::DuplicateRid(rid.clone()));
        }
    }
    Ok(())
}

/// One encoding we send.
pub(crate) struct Layer {
    pub(crate) ssrc: u32,
    seq: u16,
    /// The rid, as the header extension's payload.
    rid: Bytes,
}

/// The encodings of our simulcast video sender and what their packets carry.
pub(crate) struct Layers {
    pub(crate) list: Vec<Layer>,
    /// Our video section's mid, as the header extension's payload.
    mid: Option<Bytes>,
    /// Negotiated ids of the `sdes:mid` and `sdes:rtp-stream-id` extensions.
    mid_ext: Option<u8>,
    rid_ext: Option<u8>,
}

impl Layers {
    /// One encoding per rid, each with a random SSRC and first sequence number.
    pub(crate) fn new(rids: &[String]) -> Layers {
        let mut list: Vec<Layer> = Vec::with_capacity(rids.len());
        for rid in rids {
            let mut ssrc = rand::random::<u32>();
            while ssrc == 0 || list.iter().any(|l| l.ssrc == ssrc) {
                ssrc = rand::random::<u32>();
            }
            list.push(Layer {
                ssrc,
                seq: rand::random::<u16>(),
                rid: Bytes::copy_from_slice(rid.as_bytes()),
            });
        }
        Layers {
            list,
            mid: None,
            mid_ext: None,
            rid_ext: None,
        }
    }

    /// The sender's encoding parameters: one per layer, rid and SSRC set.
    pub(crate) fn encodings(&self, codec: &RTCRtpCodec) -> Vec<RTCRtpEncodingParameters> {
        self.list
            .iter()
            .map(|l| RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    rid: String::from_utf8_lossy(&l.rid).into_owned(),
                    ssrc: Some(l.ssrc),
                    ..Default::default()
                },
                codec: codec.clone(),
                ..Default::default()
            })
            .collect()
    }

    /// The rid of the layer sending on `ssrc`.
    pub(crate) fn rid_of(&self, ssrc: u32) -> Option<String> {
        self.list
            .iter()
            .find(|l| l.ssrc == ssrc)
            .map(|l| String::from_utf8_lossy(&l.rid).into_owned())
    }

    /// Learns, after a negotiation, the mid of `sender`'s section and the
    /// extension ids its packets carry.
    pub(crate) fn learn(&mut self, pc: &mut RTCPeerConnection, sender: RTCRtpSenderId) {
        let transceivers: Vec<_> = pc.get_transceivers().collect();
        for id in transceivers {
            let Some(t) = pc.rtp_transceiver(id) else {
                continue;
            };
            if t.sender() == Some(sender) {
                if let Some(mid) = t.mid().as_ref() {
                    self.mid = Some(Bytes::copy_from_slice(mid.as_bytes()));
                }
                break;
            }
        }
        if let Some(mut s) = pc.rtp_sender(sender) {
            let exts = &s.get_parameters().rtp_parameters.header_extensions;
            let id = |uri: &str| {
                exts.iter()
                    .find(|e| e.uri == uri)
                    .and_then(|e| u8::try_from(e.id).ok())
            };
            self.mid_ext = id(rtc::sdp::extmap::SDES_MID_URI);
            self.rid_ext = id(rtc::sdp::extmap::SDES_RTP_STREAM_ID_URI);
        }
    }

    /// Writes one packet on layer `layer` of `sender` (payload type `pt`).
    /// Dropped when the layer does not exist.
    pub(crate) fn write(
        &mut self,
        pc: &mut RTCPeerConnection,
        sender: RTCRtpSenderId,
        pt: u8,
        layer: usize,
        packet: (Bytes, bool, u32),
    ) {
        let (payload, marker, timestamp) = packet;
        let Some(l) = self.list.get_mut(layer) else {
            return;
        };
        l.seq = l.seq.wrapping_add(1);
        let mut header = rtc::rtp::header::Header {
            version: 2,
            marker,
            payload_type: pt,
            sequence_number: l.seq,
            timestamp,
            ssrc: l.ssrc,
            ..Default::default()
        };
        // Ids the answer did not accept are left out (the sender refuses
        // a packet with an extension it did not negotiate).
        if let (Some(id), Some(mid)) = (self.mid_ext, self.mid.as_ref()) {
            let _ = header.set_extension(id, mid.clone());
        }
        if let Some(id) = self.rid_ext {
            let _ = header.set_extension(id, l.rid.clone());
        }
        if let Some(mut s) = pc.rtp_sender(sender) {
            let _ = s.write_rtp(Instant::now(), rtc::rtp::Packet { header, payload });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rids(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn rids_are_checked() {
        assert_eq!(validate(&rids(&["q", "h", "f"]), true), Ok(()));
        assert_eq!(validate(&rids(&["lo", "hi-1_x"]), true), Ok(()));
        assert_eq!(
            validate(&rids(&["q", "h", "f", "x"]), true),
            Ok(()),
            "the server, not the client, caps the count at 3"
        );
        assert_eq!(
            validate(&rids(&["q", "h"]), false),
            Err(SimulcastError::NoVideo)
        );
        assert_eq!(
            validate(&rids(&["q"]), true),
            Err(SimulcastError::TooFewRids(1))
        );
        assert_eq!(
            validate(&rids(&["q", "q"]), true),
            Err(SimulcastError::DuplicateRid("q".into()))
        );
        assert_eq!(
            validate(&rids(&["q", "h f"]), true),
            Err(SimulcastError::BadRid("h f".into()))
        );
        assert_eq!(
            validate(&rids(&["q", ""]), true),
            Err(SimulcastError::BadRid(String::new()))
        );
        let many: Vec<String> = (0..9).map(|i| format!("r{i}")).collect();
        assert_eq!(validate(&many, true), Err(SimulcastError::TooManyRids(9)));
    }

    #[test]
    fn layers_have_distinct_ssrcs_and_rids() {
        let l = Layers::new(&rids(&["q", "h", "f"]));
        let codec = RTCRtpCodec {
            mime_type: "video/VP8".into(),
            clock_rate: 90000,
            ..Default::default()
        };
        let enc = l.encodings(&codec);
        assert_eq!(enc.len(), 3);
        let names: Vec<&str> = enc
            .iter()
            .map(|e| e.rtp_coding_parameters.rid.as_str())
            .collect();
        assert_eq!(names, ["q", "h", "f"]);
        for (e, layer) in enc.iter().zip(&l.list) {
            assert_eq!(e.rtp_coding_parameters.ssrc, Some(layer.ssrc));
            assert_eq!(
                l.rid_of(layer.ssrc).as_deref(),
                Some(e.rtp_coding_parameters.rid.as_str())
            );
        }
        let unknown = (1..)
            .find(|s| l.list.iter().all(|x| x.ssrc != *s))
            .expect("free ssrc");
        assert_eq!(l.rid_of(unknown), None);
    }
}
