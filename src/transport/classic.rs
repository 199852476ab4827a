//! A classic Socket.IO client relayed through the server: one connection
//! that receives exactly two tracks, the mix of everyone else's audio and
//! the active speaker's video, both in the stream `sfu`, on the client's
//! own m-sections (the answer to its first offer is `sendrecv`: classic
//! clients never receive a server offer).
//!
//! The decisions (whom to show, when to switch, how to rewrite) are the
//! router's ([`crate::router::speaker`]); this file attaches the two tracks
//! to the client's connection.

use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_OPUS, MIME_TYPE_VP8};
use rtc::peer_connection::RTCPeerConnection;
use rtc::rtp_transceiver::rtp_sender::{RTCPFeedback, RTCRtpCodec, RtpCodecKind};
use rtc::rtp_transceiver::RTCRtpSenderId;

use super::mix::{mix_codec, MixOut};
use super::peer::negotiated_pt;
use super::senders::local_track;
use super::Peer;
use crate::media::{PayloadType, Ssrc};
use crate::router::{OutSlot, PeerKey, Router};

/// The stream id of both tracks a classic client receives.
pub(super) const CLASSIC_STREAM: &str = "sfu";

/// Where the active speaker's video goes out to a classic client.
pub(super) struct SpeakerSlot {
    pub(super) out: OutSlot,
    pub(super) sender_id: RTCRtpSenderId,
}

/// Puts the mix and the speaker's video on the m-sections of the client's
/// first offer (after its remote description is set, before the answer is
/// made): `add_track` takes an offered transceiver of the same kind, so the
/// answer says `sendrecv` with both tracks in stream [`CLASSIC_STREAM`].
/// `offered`: whether the offer has an audio, a video section.
pub(super) fn attach_tracks(
    p: &mut Peer,
    router: &mut Router,
    key: PeerKey,
    offered: (bool, bool),
) {
    if offered.0 && p.mix_out.is_none() {
        let ssrc = rand::random::<u32>();
        let (local, _) = local_track(
            CLASSIC_STREAM.to_owned(),
            RtpCodecKind::Audio,
            mix_codec(),
            ssrc,
            None,
        );
        match p.pc.add_track(local) {
            Ok(sender_id) => {
                let transceiver = transceiver_of(&mut p.pc, sender_id);
                p.mix_out = Some(MixOut::new(transceiver, sender_id, ssrc, true));
            }
            Err(e) => {
                tracing::info!(participant = %p.participant, error = %e, "cannot attach the mix")
            }
        }
    }
    if offered.1 && p.speaker_out.is_none() {
        let feedback = |typ: &str, parameter: &str| RTCPFeedback {
            typ: typ.to_owned(),
            parameter: parameter.to_owned(),
        };
        let codec = RTCRtpCodec {
            mime_type: MIME_TYPE_VP8.to_owned(),
            clock_rate: 90_000,
            channels: 0,
            sdp_fmtp_line: String::new(),
            rtcp_feedback: vec![
                feedback("nack", ""),
                feedback("nack", "pli"),
                feedback("ccm", "fir"),
            ],
        };
        let ssrc = rand::random::<u32>();
        let (local, local_id) = local_track(
            CLASSIC_STREAM.to_owned(),
            RtpCodecKind::Video,
            codec,
            ssrc,
            Some(rand::random::<u32>()),
        );
        match p.pc.add_track(local) {
            Ok(sender_id) => {
                let out = OutSlot(transceiver_of(&mut p.pc, sender_id) as u32);
                router.attach_speaker(key, out, Ssrc(ssrc));
                p.by_local.insert(local_id, out);
                p.speaker_out = Some(SpeakerSlot { out, sender_id });
            }
            Err(e) => {
                tracing::info!(participant = %p.participant, error = %e, "cannot attach the speaker video")
            }
        }
    }
}

/// After the answer to a classic client's first offer: the payload types
/// its two tracks go out with.
pub(super) fn negotiated(p: &mut Peer, router: &mut Router, key: PeerKey) {
    if let Some(mo) = p.mix_out.as_mut() {
        mo.pt = negotiated_pt(&mut p.pc, mo.sender_id, MIME_TYPE_OPUS);
    }
    if let Some(so) = p.speaker_out.as_ref() {
        let pt = negotiated_pt(&mut p.pc, so.sender_id, MIME_TYPE_VP8);
        router.speaker_negotiated(key, pt.map(PayloadType));
        if pt.is_none() {
            tracing::info!(participant = %p.participant, "the client takes no VP8: it gets no video");
        }
    }
}

/// The transceiver that holds `sender`.
fn transceiver_of(pc: &mut RTCPeerConnection, sender: RTCRtpSenderId) -> usize {
    let ids: Vec<_> = pc.get_transceivers().collect();
    ids.into_iter()
        .find(|&t| pc.rtp_transceiver(t).and_then(|t| t.sender()) == Some(sender))
        .unwrap_or_default()
}
