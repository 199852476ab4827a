//! The connection to the server's `"sfu"` peer: the offer with our tracks
//! and the chat channel, what the connection emits, and the RTP we send.

use super::*;

impl Task {
    pub(crate) fn to_sfu(&self, data: serde_json::Value) -> ClientMessage {
        ClientMessage::Message(RelayRequest {
            room: self.room.clone(),
            to: Some(SFU_PEER.to_owned()),
            data,
        })
    }

    /// Drops both media connections and what was negotiated on them (the
    /// server that knew them is gone).
    pub(crate) fn forget_connections(&mut self) {
        if let Some(mut pc) = self.pc.take() {
            let _ = pc.close();
        }
        if let Some(mut link) = self.p2p.take() {
            let _ = link.pc.close();
        }
        self.senders.clear();
        self.tracks.clear();
        self.receivers.clear();
        self.chat = None;
        self.chat_open = false;
        self.offer_sent = false;
        self.tcp = None;
        if let Some(light) = self.light.as_mut() {
            // A new connection: everything goes to it until it is up.
            light.up = false;
        }
        *self.server_ufrag.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub(crate) fn connect_sfu(&mut self, outgoing: &mut Vec<ClientMessage>) {
        if self.offer_sent {
            return;
        }
        match self.build_and_offer() {
            Ok(sdp) => {
                self.offer_sent = true;
                outgoing.push(self.to_sfu(json!({"type":"offer","sdp": sdp})));
            }
            Err(e) => tracing::warn!(error = %e, "cannot connect to the server"),
        }
    }

    /// Builds the connection, adds our tracks and the chat channel, and offers.
    pub(crate) fn build_and_offer(&mut self) -> Result<String, ClientError> {
        let settings = if self.opts.ice_tcp {
            SettingEngineBuilder::new()
                .with_network_types(vec![rtc::ice::network_type::NetworkType::Tcp4])
                .build()
        } else {
            SettingEngineBuilder::new().build()
        };
        let mut media_engine = MediaEngine::default();
        media_engine.register_default_codecs()?;
        let registry = rtc::interceptor::Registry::new().with(
            rtc::interceptor::Slot::from(14_000),
            keyframes::DeliverKeyframeRequests::default(),
        );
        let registry = register_default_interceptors(registry, &mut media_engine)?;
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_setting_engine(settings)
            .with_media_engine(media_engine)
            .with_interceptor_registry(registry)
            .build(Instant::now())?;
        let local = self.socket.local_addr()?;
        if self.opts.ice_tcp {
            // An active candidate does not listen: port 9 by convention.
            let active = CandidateHostConfig {
                base_config: CandidateConfig {
                    network: "tcp".to_owned(),
                    address: local.ip().to_string(),
                    port: 9,
                    component: 1,
                    ..Default::default()
                },
                tcp_type: rtc::ice::tcp_type::TcpType::Active,
            }
            .new_candidate_host()?;
            pc.add_local_candidate(RTCIceCandidate::from(&active).to_json()?)?;
        } else {
            pc.add_local_candidate(udp_host_candidate(self.opts.bind_ip, local.port())?)?;
        }
        self.senders = add_tracks(&self.opts, &mut pc, true)?;
        self.chat = Some(pc.create_data_channel("chat", None)?.id());
        let offer = pc.create_offer(None)?;
        pc.set_local_description(Instant::now(), offer.clone())?;
        self.pc = Some(pc);
        Ok(offer.sdp)
    }

    /// A forwarded track ends when the server marks its m-section inactive:
    /// rtc 0.21 raises no track event for that, so after each exchange every
    /// transceiver that no longer receives ends its track here. `silent` are
    /// the mids the server's offer does not send on (rtc 0.21 leaves the
    /// current direction of a reused m-section at `recvonly` when it goes
    /// inactive again, so the offer is read too).
    pub(crate) fn detect_ended_tracks(&mut self, silent: &[String]) {
        let Some(pc) = self.pc.as_mut() else { return };
        let transceivers: Vec<_> = pc.get_transceivers().collect();
        for id in transceivers {
            let Some((direction, receiver, mid)) = pc
                .rtp_transceiver(id)
                .map(|t| (t.current_direction(), t.receiver(), t.mid().clone()))
            else {
                continue;
            };
            let receiving = matches!(
                direction,
                RTCRtpTransceiverDirection::Sendrecv | RTCRtpTransceiverDirection::Recvonly
            ) && !mid.is_some_and(|m| silent.contains(&m));
            let Some(receiver) = receiver.filter(|_| !receiving) else {
                continue;
            };
            let Some(track_id) = self.receivers.remove(&receiver) else {
                continue;
            };
            if self.tracks.remove(&track_id).is_some() {
                let _ = self.events.send(Event::TrackRemoved { track_id });
            }
        }
    }

    pub(crate) fn learn_payload_types(&mut self) {
        let Some(pc) = self.pc.as_mut() else { return };
        learn_payload_types(pc, &mut self.senders);
    }

    pub(crate) fn send_rtp(&mut self, kind: Kind, payload: Bytes, marker: bool, timestamp: u32) {
        if let Some(top) = self
            .senders
            .get(&kind)
            .and_then(|s| s.layers.as_ref())
            .and_then(|l| l.list.len().checked_sub(1))
        {
            self.send_rtp_layer(top, payload, marker, timestamp);
            return;
        }
        if let Some(link) = self.p2p.as_mut().filter(|l| l.connected) {
            if let Some(sender) = link.senders.get_mut(&kind) {
                write_rtp(&mut link.pc, sender, payload.clone(), marker, timestamp);
            }
        }
        let (Some(pc), Some(sender)) = (self.pc.as_mut(), self.senders.get_mut(&kind)) else {
            return;
        };
        write_rtp(pc, sender, payload, marker, timestamp);
    }

    /// A packet on simulcast layer `layer` of our video; the top layer's
    /// also go on the direct connection (as its single encoding).
    pub(crate) fn send_rtp_layer(
        &mut self,
        layer: usize,
        payload: Bytes,
        marker: bool,
        timestamp: u32,
    ) {
        let rids = self.opts.simulcast.as_ref().map_or(0, Vec::len);
        if layer + 1 == rids {
            if let Some(link) = self.p2p.as_mut().filter(|l| l.connected) {
                if let Some(s) = link.senders.get_mut(&Kind::Video) {
                    write_rtp(&mut link.pc, s, payload.clone(), marker, timestamp);
                }
            }
        }
        let Some(sender) = self.senders.get_mut(&Kind::Video) else {
            return;
        };
        let (Some(pc), Some(pt), Some(layers)) =
            (self.pc.as_mut(), sender.pt, sender.layers.as_mut())
        else {
            return;
        };
        layers.write(pc, sender.id, pt, layer, (payload, marker, timestamp));
    }

    /// A PLI for the remote track `track_id`, to the server.
    pub(crate) fn request_keyframe(&mut self, track_id: &str) {
        let Some(pc) = self.pc.as_mut() else { return };
        let Some(receiver_id) = self
            .receivers
            .iter()
            .find(|(_, t)| t.as_str() == track_id)
            .map(|(r, _)| *r)
        else {
            return;
        };
        if let Some(mut receiver) = pc.rtp_receiver(receiver_id) {
            let Some(ssrc) = receiver.track().ssrcs().next() else {
                return;
            };
            let _ = receiver.write_rtcp(Instant::now(), keyframes::pli(ssrc));
        }
    }

    pub(crate) fn drain_pc(&mut self) {
        let Some(pc) = self.pc.as_mut() else { return };
        while let Some(event) = pc.poll_event() {
            match event {
                RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => {
                    if state == RTCPeerConnectionState::Connected {
                        if let Some(light) = self.light.as_mut() {
                            // Up (ICE and DTLS): SRTP is counted from now on.
                            light.up = true;
                        }
                    }
                    let _ = self.events.send(Event::Connection(state.to_string()));
                }
                RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) => {
                    let kind = match pc.rtp_receiver(init.receiver_id).map(|r| r.track().kind()) {
                        Some(RtpCodecKind::Audio) => Kind::Audio,
                        _ => Kind::Video,
                    };
                    let stream_id = init.stream_ids.first().cloned().unwrap_or_default();
                    self.tracks
                        .insert(init.track_id.clone(), (stream_id.clone(), kind));
                    self.receivers
                        .insert(init.receiver_id, init.track_id.clone());
                    let _ = self.events.send(Event::TrackAdded {
                        track_id: init.track_id,
                        stream_id,
                        kind,
                    });
                }
                RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnClose(track_id)) => {
                    self.tracks.remove(&track_id);
                    let _ = self.events.send(Event::TrackRemoved { track_id });
                }
                RTCPeerConnectionEvent::OnDataChannel(RTCDataChannelEvent::OnOpen(id))
                    if Some(id) == self.chat =>
                {
                    self.chat_open = true;
                }
                _ => {}
            }
        }
        while let Some(TaggedRTCMessage { now, message }) = pc.poll_read() {
            match message {
                RTCMessage::RtpPacket(track_id, packet) => {
                    let (stream_id, kind) = self
                        .tracks
                        .get(&track_id)
                        .cloned()
                        .unwrap_or_else(|| (String::new(), Kind::Video));
                    let _ = self.events.send(Event::Rtp {
                        track_id,
                        stream_id,
                        kind,
                        packet,
                        at: now,
                    });
                }
                RTCMessage::DataChannelMessage(_, msg) if msg.is_string => {
                    if let Ok(text) = String::from_utf8(msg.data.to_vec()) {
                        let _ = self.events.send(Event::Chat(text));
                    }
                }
                RTCMessage::RtcpPacket(track_id, packets)
                    if keyframes::wants_keyframe(&packets) =>
                {
                    // Our own tracks are named `<name>-audio` / `<name>-video`.
                    let kind = if track_id.ends_with("-audio") {
                        Kind::Audio
                    } else {
                        Kind::Video
                    };
                    if self.tracks.contains_key(&track_id) {
                        continue;
                    }
                    let layers = self.senders.get(&kind).and_then(|s| s.layers.as_ref());
                    let Some(layers) = layers else {
                        let _ = self.events.send(Event::KeyframeRequested {
                            kind,
                            at: now,
                            rid: None,
                        });
                        continue;
                    };
                    // Simulcast: the server asks per encoding SSRC.
                    let mut named = false;
                    let mut asked = keyframes::requested_ssrcs(&packets);
                    asked.sort_unstable();
                    asked.dedup();
                    for rid in asked.into_iter().filter_map(|ssrc| layers.rid_of(ssrc)) {
                        named = true;
                        let _ = self.events.send(Event::KeyframeRequested {
                            kind,
                            at: now,
                            rid: Some(rid),
                        });
                    }
                    if !named {
                        let _ = self.events.send(Event::KeyframeRequested {
                            kind,
                            at: now,
                            rid: None,
                        });
                    }
                }
                _ => {}
            }
        }
    }
}

/// Adds the tracks `opts` publishes to `pc`: one Opus and/or one VP8 track,
/// each with its own SSRC; with `simulcast` and [`JoinOptions::simulcast`],
/// the VP8 track with one encoding (and SSRC) per rid.
pub(crate) fn add_tracks(
    opts: &JoinOptions,
    pc: &mut RTCPeerConnection,
    simulcast: bool,
) -> Result<HashMap<Kind, Sender>, ClientError> {
    let mut senders = HashMap::new();
    let stream_id = format!("{}-stream", opts.name);
    let publish = [
        (
            opts.publish_audio,
            Kind::Audio,
            RtpCodecKind::Audio,
            MIME_TYPE_OPUS,
            48000,
            2,
            "minptime=10;useinbandfec=1",
        ),
        (
            opts.publish_video,
            Kind::Video,
            RtpCodecKind::Video,
            MIME_TYPE_VP8,
            90000,
            0,
            "",
        ),
    ];
    for (on, kind, codec_kind, mime, clock_rate, channels, fmtp) in publish {
        if !on {
            continue;
        }
        let ssrc = rand::random::<u32>();
        let track_id = format!("{}-{kind:?}", opts.name).to_lowercase();
        let codec = RTCRtpCodec {
            mime_type: mime.to_owned(),
            clock_rate,
            channels,
            sdp_fmtp_line: fmtp.to_owned(),
            rtcp_feedback: vec![],
        };
        let layers = match (&opts.simulcast, kind) {
            (Some(rids), Kind::Video) if simulcast => Some(simulcast::Layers::new(rids)),
            _ => None,
        };
        let encodings = match &layers {
            Some(l) => l.encodings(&codec),
            None => vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    ..Default::default()
                },
                codec,
                ..Default::default()
            }],
        };
        let track = MediaStreamTrack::new(
            stream_id.clone(),
            track_id.clone(),
            track_id,
            codec_kind,
            encodings,
        );
        let id = pc.add_track(track)?;
        senders.insert(
            kind,
            Sender {
                id,
                ssrc,
                pt: None,
                seq: rand::random::<u16>(),
                layers,
            },
        );
    }
    Ok(senders)
}

/// Writes one RTP packet on `sender` (dropped until its payload type is known).
pub(crate) fn write_rtp(
    pc: &mut RTCPeerConnection,
    sender: &mut Sender,
    payload: Bytes,
    marker: bool,
    timestamp: u32,
) {
    let Some(pt) = sender.pt else { return };
    sender.seq = sender.seq.wrapping_add(1);
    let packet = RtpPacket {
        header: rtc::rtp::header::Header {
            version: 2,
            marker,
            payload_type: pt,
            sequence_number: sender.seq,
            timestamp,
            ssrc: sender.ssrc,
            ..Default::default()
        },
        payload,
    };
    if let Some(mut s) = pc.rtp_sender(sender.id) {
        let _ = s.write_rtp(Instant::now(), packet);
    }
}

/// Learns each sender's negotiated payload type (and, for simulcast, its
/// mid and header extension ids).
pub(crate) fn learn_payload_types(pc: &mut RTCPeerConnection, senders: &mut HashMap<Kind, Sender>) {
    for sender in senders.values_mut() {
        if let Some(mut s) = pc.rtp_sender(sender.id) {
            sender.pt = s
                .get_parameters()
                .rtp_parameters
                .codecs
                .first()
                .map(|c| c.payload_type);
        }
        if let Some(layers) = sender.layers.as_mut() {
            layers.learn(pc, sender.id);
        }
    }
}
