//! The senders of the tracks forwarded to a participant: one server-added
//! m-section per track (or a spare one reused), added and removed as the
//! router's subscriptions come and go.

use rtc::media_stream::{MediaStreamTrack, MediaStreamTrackId};
use rtc::peer_connection::RTCPeerConnection;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RTCRtpRtxParameters,
    RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpSenderId, RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use switchboard_proto::RoomName;

use super::peer::random_token;
use super::{Down, Engine, Spare};
use crate::media::Ssrc;
use crate::router::{OutSlot, PeerKey};

impl Engine {
    /// Adds `publisher`'s new `track` to every other member of its room.
    pub(super) fn subscribe_all(&mut self, publisher: PeerKey, track: &str) {
        for sub in self.router.subscribers_for(publisher, track) {
            self.subscribe(sub, publisher, track);
        }
    }

    /// Forwards `publisher`'s `track` to `sub`, on a sender of its own (a
    /// new m-section, or a spare one), if the router says so.
    fn subscribe(&mut self, sub: PeerKey, publisher: PeerKey, track: &str) {
        if !self.router.wants(sub, publisher, track) {
            return;
        }
        let Some(p) = self.peers.get(&publisher) else {
            return;
        };
        let Some(published) = p.published.get(track) else {
            return;
        };
        let stream_id = p.participant.to_string();
        let codec = published.codec.clone();
        let kind = published.kind;
        let Some(s) = self.peers.get_mut(&sub) else {
            return;
        };
        match add_send_track(&mut s.pc, &mut s.spare, stream_id, kind, codec.clone()) {
            Ok(added) => {
                let out = OutSlot(added.transceiver as u32);
                if let Err(e) = self
                    .router
                    .subscribe(sub, publisher, track, out, Ssrc(added.ssrc))
                {
                    tracing::warn!(subscriber = %s.participant, error = %e, "cannot subscribe");
                }
                s.down.insert(
                    out,
                    Down {
                        sender_id: added.sender_id,
                        ssrc: added.ssrc,
                        kind,
                        mime: codec.mime_type,
                        local_id: added.local_id.clone(),
                        negotiated: false,
                        offered: false,
                    },
                );
                s.by_local.insert(added.local_id, out);
                s.needs_offer = true;
                self.offers_due.push(sub);
            }
            Err(e) => {
                tracing::warn!(subscriber = %s.participant, error = %e, "cannot add a forwarded track")
            }
        }
    }

    /// Subscribes `sub` to every track the others in its room publish, if
    /// the room is in `sfu` mode.
    pub(super) fn subscribe_to_room(&mut self, sub: PeerKey) {
        for (publisher, track) in self.router.sources_for(sub) {
            self.subscribe(sub, publisher, track.as_str());
        }
        self.add_mix_track(sub);
    }

    /// Subscribes everyone in `room` to everyone else's tracks.
    pub(super) fn room_to_sfu(&mut self, room: &RoomName) {
        let Some(members) = self.router.set_sfu(room) else {
            return;
        };
        for &publisher in &members {
            for track in self.router.published(publisher) {
                for &sub in &members {
                    if sub != publisher {
                        self.subscribe(sub, publisher, track.as_str());
                    }
                }
            }
        }
        for &key in &members {
            self.add_mix_track(key);
        }
    }

    /// The router ended these subscriptions: their m-sections go inactive in
    /// the next offer and are kept for a later track of the same kind and
    /// codec, so a subscriber's SDP does not grow with every join and leave.
    pub(super) fn end_subscriptions(&mut self, ended: &[(PeerKey, OutSlot)]) {
        for &(sub, out) in ended {
            let Some(s) = self.peers.get_mut(&sub) else {
                continue;
            };
            let Some(down) = s.down.remove(&out) else {
                continue;
            };
            s.by_local.remove(&down.local_id);
            let transceiver = out.0 as usize;
            if let Some(mut t) = s.pc.rtp_transceiver(transceiver) {
                t.set_direction(RTCRtpTransceiverDirection::Inactive);
            }
            s.spare.push(Spare {
                kind: down.kind,
                mime: down.mime,
                transceiver,
                sender_id: down.sender_id,
                ssrc: down.ssrc,
                offered: false,
                ready: false,
            });
            s.needs_offer = true;
            self.offers_due.push(sub);
        }
    }
}

/// A track the server sends, on a transceiver of its own.
pub(super) struct SendTrack {
    pub(super) transceiver: usize,
    pub(super) sender_id: RTCRtpSenderId,
    pub(super) ssrc: u32,
    pub(super) local_id: MediaStreamTrackId,
}

/// Adds a sendonly transceiver for one server-sent track in stream
/// `stream_id`: one server-added m-section per track, never one of the
/// client's own m-sections. Video gets an RTX stream for retransmissions
/// where the client negotiates one (RFC 4588); audio is not retransmitted.
pub(super) fn add_send_track(
    pc: &mut RTCPeerConnection,
    spare: &mut Vec<Spare>,
    stream_id: String,
    kind: RtpCodecKind,
    codec: RTCRtpCodec,
) -> Result<SendTrack, rtc::shared::error::Error> {
    let reusable = spare
        .iter()
        .position(|s| s.ready && s.kind == kind && s.mime.eq_ignore_ascii_case(&codec.mime_type));
    if let Some(i) = reusable {
        let old = spare.swap_remove(i);
        // Same sender, same SSRC (the m-section's), a new track and stream.
        let (local, local_id) = local_track(stream_id, kind, codec, old.ssrc, None);
        // (The sender is reachable again once its transceiver sends.)
        if let Some(mut t) = pc.rtp_transceiver(old.transceiver) {
            t.set_direction(RTCRtpTransceiverDirection::Sendonly);
        }
        pc.rtp_sender(old.sender_id)
            .ok_or(rtc::shared::error::Error::ErrRTPSenderNotExisted)?
            .replace_track(local)?;
        return Ok(SendTrack {
            transceiver: old.transceiver,
            sender_id: old.sender_id,
            ssrc: old.ssrc,
            local_id,
        });
    }
    let ssrc = rand::random::<u32>();
    let rtx = (kind == RtpCodecKind::Video).then(rand::random::<u32>);
    let (local, local_id) = local_track(stream_id, kind, codec, ssrc, rtx);
    let init = RTCRtpTransceiverInit {
        direction: RTCRtpTransceiverDirection::Sendonly,
        streams: vec![],
        send_encodings: vec![],
    };
    let transceiver = pc.add_transceiver_from_track(local, Some(init))?;
    let sender_id = pc
        .rtp_transceiver(transceiver)
        .and_then(|t| t.sender())
        .ok_or(rtc::shared::error::Error::ErrRTPSenderNotExisted)?;
    Ok(SendTrack {
        transceiver,
        sender_id,
        ssrc,
        local_id,
    })
}

/// A server-sent track in stream `stream_id` on `ssrc` (and an RTX SSRC),
/// with a fresh track id.
pub(super) fn local_track(
    stream_id: String,
    kind: RtpCodecKind,
    codec: RTCRtpCodec,
    ssrc: u32,
    rtx: Option<u32>,
) -> (MediaStreamTrack, MediaStreamTrackId) {
    let local_id = format!("{stream_id}-{}", random_token(8));
    let encodings = vec![RTCRtpEncodingParameters {
        rtp_coding_parameters: RTCRtpCodingParameters {
            ssrc: Some(ssrc),
            rtx: rtx.map(|ssrc| RTCRtpRtxParameters { ssrc }),
            ..Default::default()
        },
        codec,
        ..Default::default()
    }];
    let local = MediaStreamTrack::new(
        stream_id,
        local_id.clone(),
        local_id.clone(),
        kind,
        encodings,
    );
    (local, local_id)
}
