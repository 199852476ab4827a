//! A participant's server connection: building it, negotiation (the
//! client's offers, answers to the server's offers, candidates), and the
//! senders of the tracks forwarded to it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rtc::peer_connection::configuration::media_engine::{MediaEngine, MIME_TYPE_OPUS};
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::{
    CandidateConfig, CandidateHostConfig, RTCDtlsRole, RTCIceCandidate, RTCIceCandidateInit,
};
use rtc::peer_connection::RTCPeerConnection;
use rtc::peer_connection::RTCPeerConnectionBuilder;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodecParameters, RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpSenderId, RTCRtpTransceiverDirection};
use serde_json::json;
use switchboard_proto::{AudioMode, ErrorCode, ParticipantId, RoomName, SignalData};

use super::mix::opus_fec_in_answer;
use super::{
    classic, Action, Engine, Peer, Signal, ICE_DISCONNECTED, ICE_FAILED, MAX_REMOTE_CANDIDATES,
    MIX_FRAME, OFFER_BURST, OFFER_EVERY, OFFER_SECTION_SLACK,
};
use super::{CHAT_BURST, CHAT_RATE};
use crate::auth::Grants;
use crate::media::offer::{self, OfferError, OfferLimits};
use crate::media::PayloadType;
use crate::metrics::{Limit, Metrics};
use crate::ratelimit::{RateLimiter, Verdict};
use crate::router::PeerKey;

impl Engine {
    pub(super) fn on_signal(&mut self, signal: Signal) {
        let Signal {
            room,
            participant,
            sfu,
            audio,
            grants,
            classic,
            data,
        } = signal;
        let key = match (self.by_participant.get(&participant).copied(), &data) {
            (Some(key), _) => key,
            (None, SignalData::Offer { .. }) => {
                match self.add_peer(room.clone(), participant.clone(), sfu, audio, classic) {
                    Ok(key) => key,
                    Err(e) => {
                        tracing::warn!(%participant, error = %e, "cannot create a server connection");
                        self.send_error(
                            &participant,
                            ErrorCode::Internal,
                            "cannot create a server connection",
                        );
                        return;
                    }
                }
            }
            // Candidates or answers before any offer: nothing to apply them to.
            (None, _) => return,
        };
        if let Some(p) = self.peers.get_mut(&key) {
            self.router.set_can_subscribe(key, grants.subscribe);
            p.grants = grants;
        }
        match data {
            SignalData::Offer { sdp } => self.on_client_offer(key, sdp),
            SignalData::Answer { sdp } => self.on_client_answer(key, sdp),
            SignalData::Candidate {
                label,
                id,
                candidate,
            } => {
                if candidate.is_empty() {
                    return; // end of candidates
                }
                if let Some(p) = self.peers.get_mut(&key) {
                    p.remote_candidates += 1;
                    if p.remote_candidates > MAX_REMOTE_CANDIDATES {
                        self.metrics.limited(Limit::Candidates);
                        return;
                    }
                    let init = RTCIceCandidateInit {
                        candidate,
                        sdp_mid: id,
                        sdp_mline_index: label.and_then(|l| u16::try_from(l).ok()),
                        ..Default::default()
                    };
                    // Candidates we cannot use are ignored silently, per protocol.
                    let _ = p.pc.add_remote_candidate(init);
                }
            }
        }
        self.drain(key);
        self.apply_actions();
    }

    fn on_client_offer(&mut self, key: PeerKey, sdp: String) {
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        if p.offer_in_flight {
            // Glare: the client is the polite peer and rolls back; its offer is dropped.
            return;
        }
        let now = Instant::now();
        // Every offer costs a parse and an answer on this thread, which all
        // rooms' media share: a budget per connection, and caps checked on
        // the text before any parse.
        if p.offers.check(now) != Verdict::Allow {
            self.metrics.limited(Limit::OfferRate);
            let participant = p.participant.clone();
            self.send_error(
                &participant,
                ErrorCode::RateLimited,
                "too many offers; renegotiate less often",
            );
            return;
        }
        let limits = OfferLimits {
            max_sections: p.sections + self.max_tracks + OFFER_SECTION_SLACK,
            max_candidates: MAX_REMOTE_CANDIDATES,
            max_sending: self.max_tracks,
            max_encodings: crate::router::layers::MAX_ENCODINGS,
        };
        let shape = match offer::check(&sdp, &limits) {
            Ok(shape) => shape,
            Err(e) => {
                self.metrics.limited(match e {
                    OfferError::TooManySections { .. } => Limit::MediaSections,
                    OfferError::TooManyCandidates { .. } => Limit::Candidates,
                    OfferError::TooManyEncodings { .. } => Limit::Encodings,
                });
                let participant = p.participant.clone();
                let never_answered = !p.answered_first;
                tracing::info!(%participant, error = %e, "refused an offer");
                if never_answered {
                    self.remove_peer(key);
                }
                self.send_error(
                    &participant,
                    ErrorCode::BadRequest,
                    &format!("offer refused: {e}"),
                );
                return;
            }
        };
        // Without the publish grant nothing the client would send is
        // accepted: its sending sections become receive-only before the
        // answer is made, so the answer accepts none of them. With it, only
        // the first `--max-tracks` are.
        let keep = if p.grants.publish { self.max_tracks } else { 0 };
        if p.grants.publish && shape.sending > keep {
            self.metrics.limited(Limit::Tracks);
        }
        let sdp = if shape.sending > keep {
            offer::limit_sending(&sdp, keep)
        } else {
            sdp
        };
        let classic_first = p.classic && !p.answered_first;
        let offered_kinds = (sdp.contains("\nm=audio "), sdp.contains("\nm=video "));
        let result = RTCSessionDescription::offer(sdp)
            .and_then(|offer| p.pc.set_remote_description(now, offer))
            .and_then(|()| {
                if classic_first {
                    // The mix and the speaker's video go on the client's own
                    // m-sections: a classic client takes no server offer.
                    classic::attach_tracks(p, &mut self.router, key, offered_kinds);
                }
                p.pc.create_answer(None)
            })
            .and_then(|answer| {
                p.pc.set_local_description(now, answer.clone())
                    .map(|()| answer)
            })
            .map_err(|e| format!("offer refused: {e}"))
            .and_then(|answer| {
                if accepts_nothing(&answer.sdp) {
                    Err(
                        "offer refused: no media section or data channel this server can \
                         accept (no codec in common)"
                            .to_owned(),
                    )
                } else {
                    Ok(answer)
                }
            });
        match result {
            Ok(answer) => {
                let first = !p.answered_first;
                p.answered_first = true;
                if classic_first {
                    classic::negotiated(p, &mut self.router, key);
                }
                p.sections = offer::inspect(&answer.sdp).sections;
                let (participant, room) = (p.participant.clone(), p.room.clone());
                // Candidates also trickle, for clients that read them only
                // from `candidate` messages; they are in the SDP too.
                let trickle = if first {
                    std::mem::take(&mut p.candidates)
                } else {
                    Vec::new()
                };
                let mid = answer
                    .sdp
                    .lines()
                    .find_map(|l| l.strip_prefix("a=mid:"))
                    .map(str::to_owned);
                self.send_signal(
                    &participant,
                    &room,
                    json!({"type":"answer","sdp": answer.sdp}),
                );
                if first {
                    // A newcomer gets every track already published in the
                    // room (offered once its first exchange is done).
                    self.subscribe_to_room(key);
                }
                if let (false, Some(mid)) = (trickle.is_empty(), mid) {
                    for candidate in trickle.into_iter().chain([String::new()]) {
                        self.send_signal(
                            &participant,
                            &room,
                            json!({"type":"candidate","label":0,"id": mid,"candidate": candidate}),
                        );
                    }
                }
                self.maybe_offer(key);
            }
            Err(e) => {
                let participant = p.participant.clone();
                let never_answered = !p.answered_first;
                tracing::info!(%participant, error = %e, "refused an offer");
                // A connection that never got a valid offer is useless: free
                // it before saying so.
                if never_answered {
                    self.remove_peer(key);
                }
                self.send_error(&participant, ErrorCode::BadRequest, &e);
            }
        }
    }

    fn on_client_answer(&mut self, key: PeerKey, sdp: String) {
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        if !p.offer_in_flight {
            let participant = p.participant.clone();
            self.send_error(
                &participant,
                ErrorCode::BadRequest,
                "answer without a server offer",
            );
            return;
        }
        let mix_pending = p
            .mix_out
            .as_ref()
            .is_some_and(|m| m.offered && m.pt.is_none());
        let answer_sdp = if mix_pending {
            sdp.clone()
        } else {
            String::new()
        };
        let result = RTCSessionDescription::answer(sdp)
            .and_then(|answer| p.pc.set_remote_description(Instant::now(), answer));
        if let Err(e) = result {
            let participant = p.participant.clone();
            tracing::info!(%participant, error = %e, "refused an answer");
            self.send_error(
                &participant,
                ErrorCode::BadRequest,
                &format!("answer refused: {e}"),
            );
            return;
        }
        p.offer_in_flight = false;
        for spare in &mut p.spare {
            spare.ready |= spare.offered;
        }
        // Learn the payload types the subscriber accepted; new video
        // downtracks need a keyframe.
        let mut want_keyframes = Vec::new();
        for (&out, down) in &mut p.down {
            if down.negotiated || !down.offered {
                continue;
            }
            let Some(pt) = negotiated_pt(&mut p.pc, down.sender_id, &down.mime) else {
                continue;
            };
            down.negotiated = true;
            if let Some(source) = self.router.negotiated(key, out, PayloadType(pt)) {
                want_keyframes.push(source);
            }
        }
        // The mixed track: its payload type, and whether the listener's
        // decoder asked for in-band FEC.
        let mut mix_fec = None;
        if let Some(mo) = p.mix_out.as_mut().filter(|m| m.offered && m.pt.is_none()) {
            mo.pt = negotiated_pt(&mut p.pc, mo.sender_id, MIME_TYPE_OPUS);
            let mid =
                p.pc.rtp_transceiver(mo.transceiver)
                    .and_then(|t| t.mid().clone());
            if let (Some(pt), Some(mid)) = (mo.pt, mid) {
                mix_fec = Some(opus_fec_in_answer(&answer_sdp, &mid, pt));
            }
        }
        if let Some(fec) = mix_fec {
            let room = p.room.clone();
            self.set_mix_fec(key, &room, fec);
        }
        for (publisher, track) in want_keyframes {
            self.actions.push(Action::KeyframeWanted(publisher, track));
        }
        self.maybe_offer(key);
    }

    /// Sends a server offer if one is needed and allowed now.
    pub(super) fn maybe_offer(&mut self, key: PeerKey) {
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        // Client offers are answered at once, so the only time the
        // connection is not stable is while our own offer is out.
        if !p.needs_offer || !p.answered_first || p.offer_in_flight {
            return;
        }
        let now = Instant::now();
        match p.pc.create_offer(None).and_then(|offer| {
            p.pc.set_local_description(now, offer.clone())
                .map(|()| offer)
        }) {
            Ok(offer) => {
                p.needs_offer = false;
                p.offer_in_flight = true;
                for spare in &mut p.spare {
                    spare.offered = true;
                }
                p.sections = offer::inspect(&offer.sdp).sections;
                for down in p.down.values_mut() {
                    down.offered = true;
                }
                if let Some(mo) = p.mix_out.as_mut() {
                    mo.offered = true;
                }
                let (participant, room) = (p.participant.clone(), p.room.clone());
                self.send_signal(
                    &participant,
                    &room,
                    json!({"type":"offer","sdp": offer.sdp}),
                );
            }
            Err(e) => {
                tracing::warn!(participant = %p.participant, error = %e, "cannot create an offer")
            }
        }
    }

    fn add_peer(
        &mut self,
        room: RoomName,
        participant: ParticipantId,
        sfu: bool,
        audio: AudioMode,
        classic: bool,
    ) -> Result<PeerKey, rtc::shared::error::Error> {
        let ufrag = random_token(16);
        let pwd = random_token(32);
        let (pc, candidates, (estimate, resender)) = build_connection(
            &ufrag,
            &pwd,
            self.announce,
            self.tcp_announce,
            &self.metrics,
        )?;
        let key = PeerKey(self.next_key);
        self.next_key += 1;
        let _ = self.demux.send(super::reader::DemuxControl::Register {
            ufrag: ufrag.clone(),
            pwd: pwd.clone(),
            key,
        });
        let new_mix = match audio {
            AudioMode::Mix if !self.router.has_room(&room) => self.new_mixer(&room),
            _ => None,
        };
        let joined = match self
            .router
            .join(key, room.clone(), sfu, new_mix.is_some(), classic)
        {
            Ok(joined) => joined,
            Err(e) => {
                // Keys are never reused: this is a bug, not a client's doing.
                tracing::error!(%room, %participant, error = %e, "cannot join the router");
                let _ = self
                    .demux
                    .send(super::reader::DemuxControl::Unregister(key));
                return Err(rtc::shared::error::Error::Other(e.to_string()));
            }
        };
        if let Some(mix) = new_mix {
            self.mixes.insert(room.clone(), mix);
        }
        // Every participant is an input of its room's mixer and/or speaker
        // tracker, by this id.
        let mixed = self.add_mixer_input(&room, joined.input);
        if mixed || joined.tracked {
            self.router.set_audio_input(key, Some(joined.input));
        }
        if self.audio_due.is_none() {
            self.audio_due = Some(Instant::now() + MIX_FRAME);
        }
        self.by_participant.insert(participant.clone(), key);
        tracing::info!(%room, %participant, "server connection created");
        self.peers.insert(
            key,
            Peer {
                participant,
                room,
                pc,
                answered_first: false,
                offer_in_flight: false,
                needs_offer: false,
                published: HashMap::new(),
                down: HashMap::new(),
                by_local: HashMap::new(),
                chat: None,
                state: RTCPeerConnectionState::New,
                last_rx: Instant::now(),
                paths: Default::default(),
                candidates,
                mix_out: None,
                grants: Grants::ALL,
                told_no_data: false,
                offers: RateLimiter::new(
                    1.0 / OFFER_EVERY.as_secs_f64(),
                    OFFER_BURST,
                    Instant::now(),
                ),
                sections: 0,
                remote_candidates: 0,
                chat_rate: RateLimiter::new(CHAT_RATE, CHAT_BURST, Instant::now()),
                spare: Vec::new(),
                classic,
                speaker_out: None,
                estimate,
                created: Instant::now(),
                layers_sent: HashMap::new(),
                resender,
                prober: crate::router::probe::Prober::new(),
                last_video: None,
                sent: Vec::new(),
                histories: Vec::new(),
                timeout: None,
            },
        );
        if classic {
            // A classic client hears the mix, also in a forward room.
            self.ensure_classic_mix(key);
        }
        self.metrics.media_connections.inc();
        self.metrics
            .move_connection_state(None, Some(state_label(RTCPeerConnectionState::New)));
        Ok(key)
    }
}

/// The payload type of `mime` among `codecs`.
pub(super) fn pt_of(codecs: &[RTCRtpCodecParameters], mime: &str) -> Option<u8> {
    codecs
        .iter()
        .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(mime))
        .map(|c| c.payload_type)
}

/// The payload type of `mime` that a sender's negotiation settled on.
pub(super) fn negotiated_pt(
    pc: &mut RTCPeerConnection,
    sender: RTCRtpSenderId,
    mime: &str,
) -> Option<u8> {
    let mut sender = pc.rtp_sender(sender)?;
    pt_of(&sender.get_parameters().rtp_parameters.codecs, mime)
}

/// Whether an answer rejects every m-section (all ports 0): the offer had
/// nothing in common with what this server speaks.
fn accepts_nothing(answer_sdp: &str) -> bool {
    let mut sections = answer_sdp
        .lines()
        .filter_map(|l| l.strip_prefix("m="))
        .map(|m| m.split_whitespace().nth(1) == Some("0"))
        .peekable();
    sections.peek().is_some() && sections.all(|rejected| rejected)
}

/// The metric label of a connection state.
pub(super) fn state_label(state: RTCPeerConnectionState) -> &'static str {
    match state {
        RTCPeerConnectionState::New => "new",
        RTCPeerConnectionState::Connecting => "connecting",
        RTCPeerConnectionState::Connected => "connected",
        RTCPeerConnectionState::Disconnected => "disconnected",
        RTCPeerConnectionState::Failed => "failed",
        RTCPeerConnectionState::Closed => "closed",
        _ => "unspecified",
    }
}

/// What the engine keeps of a connection's interceptors: its estimate and
/// its retransmission handle.
type Links = (super::bwe::Estimate, super::interceptors::Resender);

fn build_connection(
    ufrag: &str,
    pwd: &str,
    announce: SocketAddr,
    tcp_announce: Option<SocketAddr>,
    metrics: &Metrics,
) -> Result<(RTCPeerConnection, Vec<String>, Links), rtc::shared::error::Error> {
    let mut media_engine = MediaEngine::default();
    media_engine.register_default_codecs()?;
    // Publishers' audio levels (RFC 6464) feed the mixer and `speakers`; the
    // server only receives them.
    media_engine.register_header_extension(
        RTCRtpHeaderExtensionCapability {
            uri: rtc::sdp::extmap::AUDIO_LEVEL_URI.to_owned(),
        },
        RtpCodecKind::Audio,
        Some(RTCRtpTransceiverDirection::Recvonly),
    )?;
    let (registry, links) = super::interceptors::registry(metrics, &mut media_engine)?;
    let settings = SettingEngineBuilder::new()
        .with_lite(true)
        .with_ice_credentials(ufrag.to_owned(), pwd.to_owned())
        .with_answering_dtls_role(RTCDtlsRole::Server)
        // Clients check consent every 5 s ± 20 % (RFC 7675; aiortc, and
        // browsers once idle): `disconnected` only after a check is clearly
        // missed, `failed` when consent has expired (30 s). A peer that
        // vanishes goes sooner: PEER_SILENCE counts every datagram.
        .with_ice_timeouts(
            Some(ICE_DISCONNECTED),
            Some(ICE_FAILED),
            Some(Duration::from_secs(2)),
        )
        .build();
    let mut pc = RTCPeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_setting_engine(settings)
        .with_media_engine(media_engine)
        .with_interceptor_registry(registry)
        .build(Instant::now())?;
    let candidate = CandidateHostConfig {
        base_config: CandidateConfig {
            network: "udp".to_owned(),
            address: announce.ip().to_string(),
            port: announce.port(),
            component: 1,
            ..Default::default()
        },
        ..Default::default()
    }
    .new_candidate_host()?;
    let mut candidates = Vec::with_capacity(2);
    let udp = RTCIceCandidate::from(&candidate).to_json()?;
    candidates.push(udp.candidate.clone());
    pc.add_local_candidate(udp)?;
    if let Some(tcp) = tcp_announce {
        let candidate = CandidateHostConfig {
            base_config: CandidateConfig {
                network: "tcp".to_owned(),
                address: tcp.ip().to_string(),
                port: tcp.port(),
                component: 1,
                ..Default::default()
            },
            tcp_type: rtc::ice::tcp_type::TcpType::Passive,
        }
        .new_candidate_host()?;
        let tcp = RTCIceCandidate::from(&candidate).to_json()?;
        candidates.push(tcp.candidate.clone());
        pc.add_local_candidate(tcp)?;
    }
    Ok((pc, candidates, links))
}

pub(super) fn random_token(len: usize) -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), len)
}

#[cfg(test)]
mod tests {
    use super::accepts_nothing;

    #[test]
    fn receive_only_turns_every_sending_media_section_off() {
        let offer = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=sendrecv\r\n\
                     m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendonly\r\n\
                     m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=sendrecv\r\n";
        let out = crate::media::offer::limit_sending(offer, 0);
        assert_eq!(
            out,
            "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=recvonly\r\n\
             m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=inactive\r\n\
             m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=sendrecv\r\n"
        );
    }

    #[test]
    fn an_answer_that_rejects_every_section_accepts_nothing() {
        let rejected = "v=0\r\nm=audio 0 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n";
        assert!(accepts_nothing(rejected));
        let partly = "v=0\r\nm=audio 0 UDP/TLS/RTP/SAVPF 0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n";
        assert!(!accepts_nothing(partly));
        assert!(
            !accepts_nothing("v=0\r\n"),
            "no sections at all is not a codec problem"
        );
    }
}
