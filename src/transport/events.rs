//! What a connection says (events, RTP, RTCP, chat) becomes actions and
//! router calls; what the router decides becomes `rtc` writes.

use std::time::Instant;

use rtc::peer_connection::configuration::media_engine::MIME_TYPE_OPUS;
use rtc::peer_connection::event::{RTCDataChannelEvent, RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::RTCPeerConnection;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use rtc::rtp_transceiver::RTCRtpReceiverId;
use rtc::sansio::Protocol;
use serde_json::json;
use switchboard_proto::{AudioMode, ErrorCode, ServerMessage};

use super::peer::{pt_of, state_label};
use super::{Action, Engine, Peer, Published, Sent, CHAT_BACKLOG, CHAT_MAX_BYTES};
use crate::media::codec::Codec;
use crate::metrics::Limit;
use crate::mixer::AudioLevel;
use crate::ratelimit::Verdict;
use crate::router::{Decision, Mixing, PeerKey, Router, RtpIn, TrackInfo, TrackName};
use crate::sfu::MediaKind;
use crate::webhook::{Event, ParticipantRef, RoomRef, TrackRef};

impl Engine {
    // -- output of a connection ---------------------------------------------

    /// Drains one connection's events and messages into `self.actions`.
    pub(super) fn drain(&mut self, key: PeerKey) {
        let max_tracks = self.max_tracks;
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        while let Some(event) = p.pc.poll_event() {
            match event {
                RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => {
                    tracing::info!(participant = %p.participant, %state, "server connection");
                    self.metrics.move_connection_state(
                        Some(state_label(p.state)),
                        Some(state_label(state)),
                    );
                    let was = std::mem::replace(&mut p.state, state);
                    if state == RTCPeerConnectionState::Connected
                        && matches!(
                            was,
                            RTCPeerConnectionState::New | RTCPeerConnectionState::Connecting
                        )
                    {
                        // What was forwarded before DTLS was up is lost:
                        // a keyframe for every track it receives.
                        let outs = p
                            .down
                            .keys()
                            .copied()
                            .chain(p.speaker_out.as_ref().map(|o| o.out));
                        for out in outs {
                            self.actions.push(Action::SubscriberPli(key, out));
                        }
                    }
                    if matches!(
                        state,
                        RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
                    ) {
                        self.actions.push(Action::Failed(key));
                    }
                }
                // rtc raises OnOpen again for a known track after some
                // renegotiations: the same track, perhaps on a new SSRC.
                // Keep its state (keyframe throttle, subscribers) and
                // follow the SSRC, which keyframe requests name.
                RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init))
                    if p.published.contains_key(&init.track_id) =>
                {
                    if let Some(published) = p.published.get_mut(&init.track_id) {
                        published.ssrc = init.ssrc;
                        published.receiver_id = init.receiver_id;
                    }
                    // Simulcast: one OnOpen per encoding, each with its rid.
                    tracing::debug!(participant = %p.participant, track = %init.track_id, rid = ?init.rid, ssrc = init.ssrc, "track encoding");
                    if let Some(rid) = &init.rid {
                        self.router.set_rid(key, &init.track_id, init.ssrc, rid);
                    }
                }
                RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(_)) if !p.grants.publish => {
                    self.metrics.media_dropped("forbidden");
                }
                // Past --max-tracks: not published (rtc 0.21 answers every
                // offered section `recvonly`, whatever direction the offer
                // munging gave it, so the cap holds here).
                RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(_))
                    if p.published.len() >= max_tracks =>
                {
                    self.metrics.limited(Limit::Tracks);
                }
                RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) => {
                    let Some(mut receiver) = p.pc.rtp_receiver(init.receiver_id) else {
                        continue;
                    };
                    let kind = receiver.track().kind();
                    let params = &receiver.get_parameters().rtp_parameters;
                    let codec = params
                        .codecs
                        .first()
                        .map(|c| c.rtp_codec.clone())
                        .unwrap_or_default();
                    let strip_extensions = params
                        .header_extensions
                        .iter()
                        .filter(|e| {
                            [
                                rtc::sdp::extmap::SDES_MID_URI,
                                rtc::sdp::extmap::SDES_RTP_STREAM_ID_URI,
                                rtc::sdp::extmap::SDES_REPAIR_RTP_STREAM_ID_URI,
                                // These two describe the publisher-to-server
                                // hop; to a subscriber they are noise.
                                rtc::sdp::extmap::TRANSPORT_CC_URI,
                                rtc::sdp::extmap::ABS_SEND_TIME_URI,
                                // Read by the server (mixer, speakers); the
                                // subscriber did not negotiate it.
                                rtc::sdp::extmap::AUDIO_LEVEL_URI,
                            ]
                            .contains(&e.uri.as_str())
                        })
                        .filter_map(|e| u8::try_from(e.id).ok())
                        .collect();
                    let opus_pt = pt_of(&params.codecs, MIME_TYPE_OPUS);
                    let audio_level_ext = params
                        .header_extensions
                        .iter()
                        .find(|e| e.uri == rtc::sdp::extmap::AUDIO_LEVEL_URI)
                        .and_then(|e| u8::try_from(e.id).ok());
                    tracing::info!(participant = %p.participant, track = %init.track_id, ?kind, mime = %codec.mime_type, rid = ?init.rid, ssrc = init.ssrc, "track published");
                    let media_kind = media_kind(kind);
                    self.publishing.track(&p.participant, media_kind, true);
                    if let Some(w) = &self.webhooks {
                        let mid = receiver_mid(&mut p.pc, init.receiver_id);
                        w.emit(track_event(
                            "track_published",
                            p,
                            &self.router,
                            media_kind,
                            mid,
                        ));
                    }
                    let simulcast = init.rid.is_some();
                    let info = TrackInfo {
                        kind: media_kind,
                        codec: Codec::from_mime(&codec.mime_type),
                        clock_rate: codec.clock_rate,
                        simulcast,
                    };
                    let name = TrackName::new(&init.track_id);
                    if let Err(e) = self.router.publish(key, name.clone(), info) {
                        tracing::error!(participant = %p.participant, error = %e, "cannot publish");
                    }
                    if let Some(rid) = &init.rid {
                        self.router.set_rid(key, &init.track_id, init.ssrc, rid);
                    }
                    p.published.insert(
                        init.track_id.clone(),
                        Published {
                            receiver_id: init.receiver_id,
                            ssrc: init.ssrc,
                            kind,
                            codec,
                            strip_extensions,
                            opus_pt,
                            audio_level_ext,
                            simulcast,
                        },
                    );
                    self.actions.push(Action::TrackOpened(key, name));
                }
                RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnClose(track_id))
                    if p.published.contains_key(&track_id) =>
                {
                    if let Some(gone) = p.published.remove(&track_id) {
                        let media_kind = media_kind(gone.kind);
                        self.publishing.track(&p.participant, media_kind, false);
                        if let Some(w) = &self.webhooks {
                            let mid = receiver_mid(&mut p.pc, gone.receiver_id);
                            w.emit(track_event(
                                "track_unpublished",
                                p,
                                &self.router,
                                media_kind,
                                mid,
                            ));
                        }
                    }
                    self.actions.push(Action::TrackClosed(key, track_id));
                }
                RTCPeerConnectionEvent::OnDataChannel(RTCDataChannelEvent::OnOpen(id))
                    if p.pc.data_channel(id).is_some_and(|dc| dc.label() == "chat") =>
                {
                    p.chat = Some(id);
                }
                RTCPeerConnectionEvent::OnDataChannel(RTCDataChannelEvent::OnClose(id))
                    if p.chat == Some(id) =>
                {
                    p.chat = None;
                }
                _ => {}
            }
        }
        while let Some(TaggedRTCMessage { now, message }) = p.pc.poll_read() {
            match message {
                RTCMessage::RtpPacket(track, packet) => self.actions.push(Action::Forward {
                    from: key,
                    track,
                    packet,
                    arrived: now,
                }),
                RTCMessage::RtcpPacket(track, packets) => {
                    for nack in packets
                        .iter()
                        .filter_map(|p| p.as_any().downcast_ref::<TransportLayerNack>())
                    {
                        let seqs = super::resend::nacked(nack, &self.metrics);
                        self.actions.push(Action::Nack {
                            sub: key,
                            ssrc: nack.media_ssrc,
                            seqs,
                        });
                    }
                    let wants_keyframe = packets.iter().any(|pkt| {
                        let any = pkt.as_any();
                        any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
                    });
                    if wants_keyframe {
                        if let Some(&out) = p.by_local.get(&track) {
                            self.metrics.keyframe_requests_in.inc();
                            self.actions.push(Action::SubscriberPli(key, out));
                        }
                    }
                }
                RTCMessage::DataChannelMessage(id, msg) if Some(id) == p.chat && msg.is_string => {
                    match String::from_utf8(msg.data.to_vec()) {
                        Ok(text) => self.actions.push(Action::Chat(key, text)),
                        Err(_) => self.metrics.media_dropped("chat-not-utf8"),
                    }
                }
                _ => {}
            }
        }
    }

    // -- forwarding ----------------------------------------------------------

    /// One RTP packet of `from`'s `track`: the router decides, this carries
    /// it out.
    pub(super) fn forward(
        &mut self,
        from: PeerKey,
        track: &str,
        mut packet: rtc::rtp::Packet,
        arrived: Instant,
    ) {
        let Some(publisher) = self.peers.get_mut(&from) else {
            return;
        };
        let (level, opus_pt, video) = match publisher.published.get(track) {
            Some(published) => {
                let level = published
                    .audio_level_ext
                    .and_then(|id| packet.header.get_extension(id))
                    .and_then(|data| AudioLevel::from_extension(&data).ok());
                for id in &published.strip_extensions {
                    let _ = packet.header.del_extension(*id);
                }
                (
                    level,
                    published.opus_pt,
                    published.kind == RtpCodecKind::Video,
                )
            }
            None => (None, None, false),
        };
        let pkt = RtpIn {
            ssrc: packet.header.ssrc,
            seq: packet.header.sequence_number,
            ts: packet.header.timestamp,
            payload: &packet.payload,
            level,
        };
        let mut decisions = std::mem::take(&mut self.decisions);
        decisions.clear();
        let now = Instant::now();
        let fanned_out = self
            .router
            .on_rtp(from, track, &pkt, arrived, now, &mut decisions);
        for d in &decisions {
            if let Decision::Mix { input } = *d {
                self.push_to_mixer(
                    from,
                    input,
                    &pkt,
                    packet.header.payload_type,
                    opus_pt,
                    arrived,
                );
            }
        }
        self.apply_decisions(&mut decisions, Some((from, &packet)), now);
        self.decisions = decisions;
        if video && fanned_out {
            // Kept once for every subscriber's NACKs.
            self.keep(from, packet, arrived);
        }
        if fanned_out {
            // Timed once the copies are on the wire (after encryption and
            // sendto, in `flush`), from the earliest packet of this turn.
            self.forwarded_since.get_or_insert(arrived);
        }
    }

    /// Carries out the router's `decisions` (and empties the buffer).
    /// `packet`: the packet the sends are copies of, and its publisher.
    pub(super) fn apply_decisions(
        &mut self,
        decisions: &mut Vec<Decision>,
        packet: Option<(PeerKey, &rtc::rtp::Packet)>,
        now: Instant,
    ) {
        for d in decisions.drain(..) {
            match d {
                Decision::Drop(reason) => self.metrics.media_dropped(reason.as_str()),
                // Pushed by `forward`, which has the packet's payload type.
                Decision::Mix { .. } => {}
                Decision::RequestKeyframe {
                    publisher,
                    track,
                    ssrc,
                } => {
                    let Some(p) = self.peers.get_mut(&publisher) else {
                        continue;
                    };
                    self.touched.push(publisher);
                    if let Some(published) = p.published.get(track.as_str()) {
                        let ssrc = ssrc.unwrap_or(published.ssrc);
                        send_pli(&mut p.pc, published.receiver_id, ssrc, now);
                        self.metrics.plis_sent.inc();
                    }
                }
                Decision::Send(send) => {
                    let (Some((from, packet)), Some(s)) = (packet, self.peers.get_mut(&send.to))
                    else {
                        continue;
                    };
                    if matches!(
                        s.state,
                        RTCPeerConnectionState::New | RTCPeerConnectionState::Connecting
                    ) {
                        // No SRTP keys yet: rtc would refuse the write.
                        // Its first keyframe is asked for once connected.
                        self.metrics.media_dropped("not-connected");
                        continue;
                    }
                    self.touched.push(send.to);
                    let sent = Sent {
                        publisher: from,
                        ssrc: packet.header.ssrc,
                        seq: packet.header.sequence_number,
                        pt: send.pt.0,
                        ts: send.ts,
                        patch: send.patch,
                    };
                    let out = super::resend::rewritten(packet, send.ssrc.0, send.seq, &sent);
                    let size = super::resend::RTP_HEADER + out.payload.len();
                    let mut video = false;
                    let sender_id = match (s.down.get(&send.out), &s.speaker_out) {
                        (Some(down), _) => {
                            video = down.kind == RtpCodecKind::Video;
                            Some(down.sender_id)
                        }
                        (None, Some(o)) if o.out == send.out => {
                            // A classic client's speaker video: a missing
                            // sender is a failed write.
                            if s.pc.rtp_sender(o.sender_id).is_none() {
                                self.metrics.media_dropped("write-failed");
                                continue;
                            }
                            video = true;
                            Some(o.sender_id)
                        }
                        _ => None,
                    };
                    let Some(mut sender) = sender_id.and_then(|id| s.pc.rtp_sender(id)) else {
                        continue;
                    };
                    match sender.write_rtp(now, out) {
                        Ok(()) => {
                            self.metrics.media_forwarded.inc();
                            // A probe's padding fills what the media leaves.
                            s.prober.sent(size);
                            if video {
                                // What bandwidth-probe padding repeats.
                                s.last_video = Some((send.ssrc.0, send.seq));
                                super::resend::record(
                                    &mut s.sent,
                                    send.ssrc.0,
                                    send.seq,
                                    now,
                                    sent,
                                );
                            }
                        }
                        Err(_) => self.metrics.media_dropped("write-failed"),
                    }
                }
            }
        }
    }

    pub(super) fn relay_chat(&mut self, from: PeerKey, text: &str) {
        let Some(p) = self.peers.get_mut(&from) else {
            return;
        };
        if !p.grants.publish_data {
            self.metrics.media_dropped("chat-forbidden");
            if !std::mem::replace(&mut p.told_no_data, true) {
                let participant = p.participant.clone();
                let msg = ServerMessage::error(
                    ErrorCode::Forbidden,
                    "your token does not allow sending data (canPublishData is false): your \
                     chat messages are not relayed",
                    None,
                );
                self.outboxes.send(&participant, &msg, &self.metrics);
            }
            return;
        }
        let now = Instant::now();
        if p.chat_rate.check(now) != Verdict::Allow {
            self.metrics.limited(Limit::ChatRate);
            return;
        }
        if text.len() > CHAT_MAX_BYTES {
            self.metrics.limited(Limit::ChatSize);
            let participant = p.participant.clone();
            let msg = ServerMessage::error(
                ErrorCode::TooLarge,
                format!("chat messages over {CHAT_MAX_BYTES} bytes are not relayed"),
                None,
            );
            self.outboxes.send(&participant, &msg, &self.metrics);
            return;
        }
        let Some(p) = self.peers.get(&from) else {
            return;
        };
        let body = json!({"from": p.participant.as_str(), "data": text}).to_string();
        let members = self.router.members(&p.room).to_vec();
        for sub in members {
            if sub == from {
                continue;
            }
            let Some(s) = self.peers.get_mut(&sub) else {
                continue;
            };
            if let Some(id) = s.chat {
                if let Some(mut dc) = s.pc.data_channel(id) {
                    if dc.outstanding_bytes() > CHAT_BACKLOG {
                        // It does not take what it was sent: queueing more
                        // for it would only grow the server's memory.
                        self.metrics.limited(Limit::ChatBacklog);
                        continue;
                    }
                    let _ = dc.send_text(now, body.clone());
                }
            }
        }
    }
}

pub(super) fn media_kind(kind: RtpCodecKind) -> MediaKind {
    if kind == RtpCodecKind::Audio {
        MediaKind::Audio
    } else {
        MediaKind::Video
    }
}

/// The mid of the m-section a receiver belongs to.
pub(super) fn receiver_mid(pc: &mut RTCPeerConnection, receiver: RTCRtpReceiverId) -> String {
    let ids: Vec<_> = pc.get_transceivers().collect();
    ids.into_iter()
        .find_map(|id| {
            let t = pc.rtp_transceiver(id)?;
            (t.receiver() == Some(receiver)).then(|| t.mid().clone().unwrap_or_default())
        })
        .unwrap_or_default()
}

fn track_event(
    event: &'static str,
    p: &Peer,
    router: &Router,
    kind: MediaKind,
    mid: String,
) -> Event {
    let mode = router.room_mode(&p.room);
    Event {
        event,
        room: RoomRef {
            name: p.room.to_string(),
            mode: if mode.is_some_and(|(sfu, _)| sfu) {
                switchboard_proto::MediaMode::Sfu
            } else {
                switchboard_proto::MediaMode::P2p
            },
            audio: if mode.is_some_and(|(_, mixing)| mixing != Mixing::None) {
                AudioMode::Mix
            } else {
                AudioMode::Forward
            },
        },
        participant: Some(ParticipantRef {
            id: p.participant.to_string(),
            identity: None,
            name: String::new(),
        }),
        track: Some(TrackRef {
            kind: kind.as_str(),
            mid,
        }),
    }
}

fn send_pli(pc: &mut RTCPeerConnection, receiver: RTCRtpReceiverId, ssrc: u32, now: Instant) {
    if let Some(mut r) = pc.rtp_receiver(receiver) {
        let _ = r.write_rtcp(
            now,
            vec![Box::new(PictureLossIndication {
                sender_ssrc: 0,
                media_ssrc: ssrc,
            })],
        );
    }
}
