//! A classic Socket.IO client relayed through the server: one connection
//! that receives exactly two tracks, the mix of everyone else's audio and
//! the active speaker's video, both in the stream `sfu`, on the client's
//! own m-sections (the answer to its first offer is `sendrecv`: classic
//! clients never receive a server offer).
//!
//! The decisions (whom to show, when to switch, how to rewrite) are the
//! pure [`crate::media::speaker`] and [`crate::media::vp8`]; this file wires
//! them to the engine's peers.

use std::time::Instant;

use bytes::BytesMut;
use rtc::media_stream::MediaStreamTrackId;
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_OPUS, MIME_TYPE_VP8};
use rtc::peer_connection::RTCPeerConnection;
use rtc::rtp_transceiver::rtp_sender::{RTCPFeedback, RTCRtpCodec, RtpCodecKind};
use rtc::rtp_transceiver::RTCRtpSenderId;

use super::{local_track, negotiated_pt, Engine, MediaRoom, MixOut, Peer, PeerKey};
use crate::media::rewrite::{Rewrite, SeqRewriter};
use crate::media::speaker::{choose, SpeakerPacket, SpeakerSwitch};
use crate::media::vp8::Vp8Munger;
use crate::mixer::InputId;

/// The stream id of both tracks a classic client receives.
pub(super) const CLASSIC_STREAM: &str = "sfu";

/// The active speaker's video sent to a classic client.
pub(super) struct SpeakerOut {
    sender_id: RTCRtpSenderId,
    ssrc: u32,
    pub(super) local_id: MediaStreamTrackId,
    /// VP8 payload type the answer settled on; `None`: the client takes no
    /// VP8 and gets no video.
    pt: Option<u8>,
    pub(super) switch: SpeakerSwitch<PeerKey>,
    rewriter: SeqRewriter,
    vp8: Vp8Munger,
}

impl SpeakerOut {
    /// Sends `packet` (video of `from`'s speaker track) if `from` is the
    /// source shown (or this is the keyframe that makes it so). `Ok(false)`:
    /// not shown; `Err`: a drop reason.
    pub(super) fn forward(
        &mut self,
        pc: &mut RTCPeerConnection,
        from: PeerKey,
        packet: &rtc::rtp::Packet,
        keyframe: bool,
        now: Instant,
    ) -> Result<bool, &'static str> {
        if self.switch.on_packet(&from, keyframe, now) == SpeakerPacket::Drop {
            return Ok(false);
        }
        let pt = self.pt.ok_or("not-negotiated")?;
        let (seq, ts) = match self.rewriter.rewrite(
            packet.header.ssrc,
            packet.header.sequence_number,
            packet.header.timestamp,
            now,
        ) {
            Rewrite::Forward { seq, ts } => (seq, ts),
            Rewrite::Drop(reason) => return Err(reason.as_str()),
        };
        // The descriptor is rewritten in a copy: the payload is shared with
        // every other subscriber of the track.
        let mut payload = BytesMut::from(&packet.payload[..]);
        self.vp8
            .munge(packet.header.ssrc, &mut payload)
            .map_err(|_| "bad-descriptor")?;
        let mut out = rtc::rtp::Packet {
            header: packet.header.clone(),
            payload: payload.freeze(),
        };
        out.header.ssrc = self.ssrc;
        out.header.payload_type = pt;
        out.header.sequence_number = seq;
        out.header.timestamp = ts;
        let mut sender = pc.rtp_sender(self.sender_id).ok_or("write-failed")?;
        sender.write_rtp(now, out).map_err(|_| "write-failed")?;
        Ok(true)
    }
}

/// The publisher's video track a classic client may see: its first VP8
/// track (by track id, so the choice is stable).
pub(super) fn speaker_track(p: &Peer) -> Option<&MediaStreamTrackId> {
    p.published
        .iter()
        .filter(|(_, t)| {
            t.kind == RtpCodecKind::Video && t.codec.mime_type.eq_ignore_ascii_case(MIME_TYPE_VP8)
        })
        .map(|(id, _)| id)
        .min()
}

/// Whether `track` of `publisher` is the one classic clients may see.
pub(super) fn is_speaker_source(publisher: &Peer, track: &MediaStreamTrackId) -> bool {
    speaker_track(publisher) == Some(track)
}

/// Puts the mix and the speaker's video on the m-sections of the client's
/// first offer (after its remote description is set, before the answer is
/// made): `add_track` takes an offered transceiver of the same kind, so the
/// answer says `sendrecv` with both tracks in stream [`CLASSIC_STREAM`].
/// `offered`: whether the offer has an audio, a video section.
pub(super) fn attach_tracks(p: &mut Peer, offered: (bool, bool)) {
    if offered.0 && p.mix_out.is_none() {
        let codec = RTCRtpCodec {
            mime_type: MIME_TYPE_OPUS.to_owned(),
            clock_rate: 48_000,
            channels: 2,
            sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
            rtcp_feedback: Vec::new(),
        };
        let ssrc = rand::random::<u32>();
        let (local, _) = local_track(
            CLASSIC_STREAM.to_owned(),
            RtpCodecKind::Audio,
            codec,
            ssrc,
            None,
        );
        match p.pc.add_track(local) {
            Ok(sender_id) => {
                p.mix_out = Some(MixOut {
                    transceiver: transceiver_of(&mut p.pc, sender_id),
                    sender_id,
                    ssrc,
                    pt: None,
                    offered: true,
                    seq: rand::random::<u16>(),
                    ts: rand::random::<u32>(),
                });
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
                p.speaker_out = Some(SpeakerOut {
                    sender_id,
                    ssrc,
                    local_id,
                    pt: None,
                    switch: SpeakerSwitch::new(),
                    rewriter: SeqRewriter::new(90_000),
                    vp8: Vp8Munger::new(),
                });
            }
            Err(e) => {
                tracing::info!(participant = %p.participant, error = %e, "cannot attach the speaker video")
            }
        }
    }
}

/// After the answer to a classic client's first offer: the payload types
/// its two tracks go out with.
pub(super) fn negotiated(p: &mut Peer) {
    if let Some(mo) = p.mix_out.as_mut() {
        mo.pt = negotiated_pt(&mut p.pc, mo.sender_id, MIME_TYPE_OPUS);
    }
    if let Some(so) = p.speaker_out.as_mut() {
        so.pt = negotiated_pt(&mut p.pc, so.sender_id, MIME_TYPE_VP8);
        if so.pt.is_none() {
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

impl Engine {
    /// Gives `key`'s room a mixer if it has none (a forward room): a classic
    /// client hears the mix; everyone else keeps getting audio forwarded.
    pub(super) fn ensure_classic_mix(&mut self, key: PeerKey) {
        let Some(room_name) = self.peers.get(&key).map(|p| p.room.clone()) else {
            return;
        };
        if self.rooms.get(&room_name).is_none_or(|r| r.mix.is_some()) {
            return;
        }
        let Some(mut mix) = self.new_mixer(&room_name) else {
            return;
        };
        let Some(room) = self.rooms.get_mut(&room_name) else {
            return;
        };
        for k in &room.members {
            if let Some(input) = self.peers.get(k).and_then(|p| p.audio_input) {
                if let Err(e) = mix.mixer.add_input(input) {
                    tracing::error!(room = %room_name, error = %e, "cannot add a mixer input");
                }
            }
        }
        room.mix = Some(mix);
        room.mix_for_all = false;
        tracing::info!(room = %room_name, "mixing for the room's classic clients");
    }

    /// Points every classic client's video at the loudest other speaker
    /// with video, and asks that speaker for the keyframe the switch waits
    /// for. Runs on the mixer's 20 ms tick.
    pub(super) fn follow_speakers(&mut self, now: Instant) {
        let mut keyframes: Vec<PeerKey> = Vec::new();
        for room in self.rooms.values() {
            if !room.sfu
                || !room
                    .members
                    .iter()
                    .any(|k| self.peers.get(k).is_some_and(|p| p.speaker_out.is_some()))
            {
                continue;
            }
            let speakers = speaking_members(room, &self.peers);
            let with_video: Vec<PeerKey> = room
                .members
                .iter()
                .filter(|k| {
                    self.peers
                        .get(k)
                        .is_some_and(|p| speaker_track(p).is_some())
                })
                .copied()
                .collect();
            for &k in &room.members {
                let Some(out) = self.peers.get_mut(&k).and_then(|p| p.speaker_out.as_mut()) else {
                    continue;
                };
                if let Some(gone) = out
                    .switch
                    .current()
                    .filter(|c| !with_video.contains(c))
                    .copied()
                {
                    out.switch.remove(&gone);
                }
                let want = choose(&k, &speakers, &with_video, out.switch.current());
                if let Some(source) = out.switch.want(want, now) {
                    keyframes.push(source);
                }
            }
        }
        keyframes.sort_unstable();
        keyframes.dedup();
        for source in keyframes {
            let track = self.peers.get(&source).and_then(speaker_track).cloned();
            if let Some(track) = track {
                self.request_keyframe(source, &track);
            }
        }
    }

    /// A classic client asked for a keyframe (PLI/FIR on its video): from
    /// the source it is shown.
    pub(super) fn speaker_keyframe_wanted(&mut self, sub: PeerKey) {
        let source = self
            .peers
            .get(&sub)
            .and_then(|p| p.speaker_out.as_ref())
            .and_then(|o| o.switch.current().copied());
        let Some(source) = source else {
            return;
        };
        let track = self.peers.get(&source).and_then(speaker_track).cloned();
        if let Some(track) = track {
            self.request_keyframe(source, &track);
        }
    }
}

/// The room's active speakers, loudest first, as connections.
fn speaking_members(
    room: &MediaRoom,
    peers: &std::collections::HashMap<PeerKey, Peer>,
) -> Vec<PeerKey> {
    room.speaking
        .iter()
        .filter_map(|id: &InputId| {
            room.members
                .iter()
                .find(|k| peers.get(k).is_some_and(|p| p.audio_input == Some(*id)))
                .copied()
        })
        .collect()
}
