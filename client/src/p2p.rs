//! The direct connection to the other participant of a `p2p` room: built
//! on `peer-joined`, offer/answer/candidates relayed as `message`s, given
//! `p2pTimeoutMs` to connect, `p2p-failed` otherwise.

use super::*;

/// The direct connection to the other participant of a `p2p` room.
pub(crate) struct P2pLink {
    pub(crate) peer: String,
    pub(crate) pc: RTCPeerConnection,
    pub(crate) socket: UdpSocket,
    pub(crate) local: SocketAddr,
    /// `p2pTimeoutMs` after we learnt of the peer: connected by then, or
    /// `p2p-failed`.
    pub(crate) deadline: Instant,
    pub(crate) connected: bool,
    /// `p2p-failed` was sent (once).
    pub(crate) reported: bool,
    /// Remote candidates that came before the remote description.
    pub(crate) pending: Vec<RTCIceCandidateInit>,
    pub(crate) senders: HashMap<Kind, Sender>,
    /// Remote track id → kind.
    pub(crate) tracks: HashMap<String, Kind>,
}

/// Reads from the direct connection's socket; never resolves without one.
pub(crate) async fn read_p2p(
    socket: Option<&UdpSocket>,
    buf: &mut [u8],
) -> Option<(usize, SocketAddr)> {
    match socket {
        Some(socket) => socket.recv_from(buf).await.ok(),
        None => std::future::pending().await,
    }
}

impl Task {
    /// Handles a signaling message when P2P is on: what concerns the direct
    /// connection here, everything else as without P2P.
    pub(crate) fn on_p2p_signal(&mut self, msg: ServerMessage, outgoing: &mut Vec<ClientMessage>) {
        match &msg {
            ServerMessage::Mode(m) => {
                self.mode = m.mode;
                if m.mode == MediaMode::Sfu {
                    self.close_p2p();
                }
            }
            // The participant already in the room offers, never in an sfu room.
            ServerMessage::Otherjoin(o) if self.mode == MediaMode::P2p && self.p2p.is_none() => {
                self.open_p2p(o.id.to_string(), true, outgoing);
            }
            ServerMessage::Bye(b) if self.p2p.as_ref().is_some_and(|l| l.peer == b.id.as_str()) => {
                self.close_p2p();
            }
            ServerMessage::Message(m) if m.from != SFU_PEER => {
                if let Ok(data) = serde_json::from_value::<SignalData>(m.data.clone()) {
                    let from = m.from.clone();
                    self.on_peer_data(from, data, outgoing);
                    return;
                }
            }
            _ => {}
        }
        self.on_signal(msg, outgoing);
    }

    /// Opens the direct connection to `peer` (and offers, if `offer`); its
    /// deadline starts now. A connection that cannot even be built counts as
    /// failed at once.
    pub(crate) fn open_p2p(
        &mut self,
        peer: String,
        offer: bool,
        outgoing: &mut Vec<ClientMessage>,
    ) {
        match self.build_p2p(&peer, offer) {
            Ok((link, sdp)) => {
                self.p2p = Some(link);
                if let Some(sdp) = sdp {
                    outgoing.push(self.to_peer(&peer, json!({"type":"offer","sdp": sdp})));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, %peer, "cannot build the direct connection");
                self.send_p2p_failed(&peer, outgoing);
            }
        }
    }

    pub(crate) fn build_p2p(
        &self,
        peer: &str,
        offer: bool,
    ) -> Result<(P2pLink, Option<String>), ClientError> {
        // Bound synchronously: this runs inside the client task, where an
        // await holding `&self` would make the task's future not `Send`.
        let std_socket = std::net::UdpSocket::bind(SocketAddr::new(self.opts.bind_ip, 0))?;
        std_socket.set_nonblocking(true)?;
        let socket = UdpSocket::from_std(std_socket)?;
        let local = socket.local_addr()?;
        let mut pc = host_peer_connection(local)?;
        let senders = add_tracks(&self.opts, &mut pc, false)?;
        let sdp = if offer {
            let o = pc.create_offer(None)?;
            pc.set_local_description(Instant::now(), o.clone())?;
            Some(o.sdp)
        } else {
            None
        };
        let link = P2pLink {
            peer: peer.to_owned(),
            pc,
            socket,
            local,
            deadline: Instant::now() + self.p2p_timeout,
            connected: false,
            reported: false,
            pending: Vec::new(),
            senders,
            tracks: HashMap::new(),
        };
        Ok((link, sdp))
    }

    /// Offer, answer or candidate from another participant.
    pub(crate) fn on_peer_data(
        &mut self,
        from: String,
        data: SignalData,
        outgoing: &mut Vec<ClientMessage>,
    ) {
        if self.p2p.is_none() {
            // An offer from someone we were not told about yet: take it.
            if !matches!(data, SignalData::Offer { .. }) || self.mode != MediaMode::P2p {
                return;
            }
            self.open_p2p(from.clone(), false, outgoing);
        }
        let Some(link) = self.p2p.as_mut().filter(|l| l.peer == from) else {
            return;
        };
        let now = Instant::now();
        let reply = match data {
            SignalData::Offer { sdp } => RTCSessionDescription::offer(sdp)
                .and_then(|o| link.pc.set_remote_description(now, o))
                .and_then(|()| link.pc.create_answer(None))
                .and_then(|a| {
                    link.pc
                        .set_local_description(now, a.clone())
                        .map(|()| Some(a.sdp))
                }),
            SignalData::Answer { sdp } => RTCSessionDescription::answer(sdp)
                .and_then(|a| link.pc.set_remote_description(now, a))
                .map(|()| None),
            SignalData::Candidate {
                label,
                id,
                candidate,
            } => {
                if !candidate.is_empty() {
                    link.pending.push(RTCIceCandidateInit {
                        candidate,
                        sdp_mid: id,
                        sdp_mline_index: label.and_then(|l| u16::try_from(l).ok()),
                        ..Default::default()
                    });
                }
                Ok(None)
            }
        };
        if link.pc.remote_description().is_some() {
            for c in link.pending.drain(..) {
                // Candidates we cannot use are ignored, as the server does.
                let _ = link.pc.add_remote_candidate(c);
            }
            learn_payload_types(&mut link.pc, &mut link.senders);
        }
        match reply {
            Ok(Some(answer)) => {
                outgoing.push(self.to_peer(&from, json!({"type":"answer","sdp": answer})));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, peer = %from, "direct connection signaling failed")
            }
        }
    }

    /// Events and media of the direct connection; reports `p2p-failed` on
    /// ICE failure or when the deadline passes unconnected.
    pub(crate) fn drain_p2p(&mut self, outgoing: &mut Vec<ClientMessage>) {
        let Some(link) = self.p2p.as_mut() else {
            return;
        };
        let mut failed = false;
        while let Some(event) = link.pc.poll_event() {
            match event {
                RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => match state {
                    RTCPeerConnectionState::Connected => {
                        link.connected = true;
                        let _ = self.events.send(Event::P2p {
                            peer: link.peer.clone(),
                            state: "connected".to_owned(),
                        });
                    }
                    RTCPeerConnectionState::Failed => failed = true,
                    _ => {}
                },
                RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) => {
                    let kind = match link
                        .pc
                        .rtp_receiver(init.receiver_id)
                        .map(|r| r.track().kind())
                    {
                        Some(RtpCodecKind::Audio) => Kind::Audio,
                        _ => Kind::Video,
                    };
                    link.tracks.insert(init.track_id, kind);
                }
                _ => {}
            }
        }
        while let Some(TaggedRTCMessage { now, message }) = link.pc.poll_read() {
            if let RTCMessage::RtpPacket(track_id, packet) = message {
                let kind = link.tracks.get(&track_id).copied().unwrap_or(Kind::Video);
                let _ = self.events.send(Event::P2pRtp {
                    peer: link.peer.clone(),
                    kind,
                    packet,
                    at: now,
                });
            }
        }
        let late = !link.connected && Instant::now() >= link.deadline;
        if (failed || late) && !link.reported {
            link.reported = true;
            let peer = link.peer.clone();
            self.send_p2p_failed(&peer, outgoing);
        }
    }

    /// Tells the server (once per connection) that `peer` cannot be reached
    /// directly; only while the room is `p2p`, as the protocol asks.
    pub(crate) fn send_p2p_failed(&mut self, peer: &str, outgoing: &mut Vec<ClientMessage>) {
        if self.mode == MediaMode::P2p {
            outgoing.push(ClientMessage::P2pFailed(P2pFailed {
                room: self.room.clone(),
                peer: peer.to_owned(),
            }));
        }
        let _ = self.events.send(Event::P2p {
            peer: peer.to_owned(),
            state: "failed".to_owned(),
        });
    }

    pub(crate) fn close_p2p(&mut self) {
        if let Some(mut link) = self.p2p.take() {
            let _ = link.pc.close();
            let _ = self.events.send(Event::P2p {
                peer: link.peer,
                state: "closed".to_owned(),
            });
        }
    }

    pub(crate) fn to_peer(&self, peer: &str, data: serde_json::Value) -> ClientMessage {
        ClientMessage::Message(RelayRequest {
            room: self.room.clone(),
            to: Some(peer.to_owned()),
            data,
        })
    }
}
