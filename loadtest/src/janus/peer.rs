//! One WebRTC PeerConnection to Janus, on webrtc-rs's sans-IO `rtc` crate,
//! driven by its own task with its own UDP socket bound to the namespace
//! address (the only host candidate it offers).
//!
//! Janus gives every handle its own PeerConnection (a publisher's, and a
//! subscriber's receiving every other feed), each on its own port, so a
//! participant has two of these. The task is the same loop as
//! `switchboard_client`'s (flush `poll_write`, drain events and reads, sleep
//! until `poll_timeout` or a datagram or a command), without Switchboard's
//! signaling: the caller moves the SDP to and from Janus.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_OPUS, MIME_TYPE_VP8};
use rtc::peer_connection::event::{RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::RTCPeerConnection;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::rtp_transceiver::RTCRtpSenderId;
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use switchboard_client::Kind;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

/// Peer failures.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("webrtc: {0}")]
    Rtc(#[from] rtc::shared::error::Error),
    #[error("the peer task has stopped")]
    Stopped,
}

/// What the peer task reports.
#[derive(Debug)]
pub enum PeerEvent {
    /// Connection state: `connecting`, `connected`, `failed`, ...
    State(String),
    /// A remote track opened.
    Track,
    /// The payload of an RTP packet on a remote track, its sequence number
    /// and timestamp, and when it was read.
    Rtp {
        kind: Kind,
        seq: u16,
        timestamp: u32,
        payload: Bytes,
        at: Instant,
    },
}

enum Cmd {
    /// Create and apply an offer (publisher side).
    Offer(oneshot::Sender<Result<String, PeerError>>),
    /// Apply Janus's answer to our offer.
    Answer(String, oneshot::Sender<Result<(), PeerError>>),
    /// Apply Janus's offer and return our answer (subscriber side).
    Accept(String, oneshot::Sender<Result<String, PeerError>>),
    Rtp {
        kind: Kind,
        payload: Bytes,
        marker: bool,
        timestamp: u32,
    },
}

/// The caller's end of a peer task. Dropping it stops the task.
pub struct Peer {
    cmd: mpsc::UnboundedSender<Cmd>,
    pub events: mpsc::UnboundedReceiver<PeerEvent>,
}

struct Sender {
    id: RTCRtpSenderId,
    ssrc: u32,
    pt: Option<u8>,
    seq: u16,
}

struct Task {
    pc: RTCPeerConnection,
    socket: UdpSocket,
    local: SocketAddr,
    senders: HashMap<Kind, Sender>,
    /// Kind of each remote track, by track id.
    tracks: HashMap<String, Kind>,
    events: mpsc::UnboundedSender<PeerEvent>,
}

impl Peer {
    /// Binds a socket on `ip` and builds a PeerConnection offering only that
    /// host candidate; `publish` adds one Opus and/or one VP8 track.
    pub async fn start(ip: IpAddr, publish: &[Kind], name: &str) -> Result<Peer, PeerError> {
        let socket = UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
        let local = socket.local_addr()?;
        let mut pc = switchboard_client::host_peer_connection(local)?;
        let mut senders = HashMap::new();
        for &kind in publish {
            let (codec_kind, mime, clock_rate, channels, fmtp) = match kind {
                Kind::Audio => (
                    RtpCodecKind::Audio,
                    MIME_TYPE_OPUS,
                    48000,
                    2,
                    "minptime=10;useinbandfec=1",
                ),
                Kind::Video => (RtpCodecKind::Video, MIME_TYPE_VP8, 90000, 0, ""),
            };
            let ssrc = rand::random::<u32>();
            let track_id = format!("{name}-{kind:?}").to_lowercase();
            let track = MediaStreamTrack::new(
                format!("{name}-stream"),
                track_id.clone(),
                track_id,
                codec_kind,
                vec![RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters {
                        ssrc: Some(ssrc),
                        ..Default::default()
                    },
                    codec: RTCRtpCodec {
                        mime_type: mime.to_owned(),
                        clock_rate,
                        channels,
                        sdp_fmtp_line: fmtp.to_owned(),
                        rtcp_feedback: vec![],
                    },
                    ..Default::default()
                }],
            );
            let id = pc.add_track(track)?;
            senders.insert(
                kind,
                Sender {
                    id,
                    ssrc,
                    pt: None,
                    seq: rand::random::<u16>(),
                },
            );
        }
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let task = Task {
            pc,
            socket,
            local,
            senders,
            tracks: HashMap::new(),
            events: ev_tx,
        };
        tokio::spawn(task.run(cmd_rx));
        Ok(Peer {
            cmd: cmd_tx,
            events: ev_rx,
        })
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, PeerError>>) -> Cmd,
    ) -> Result<T, PeerError> {
        let (tx, rx) = oneshot::channel();
        self.cmd.send(make(tx)).map_err(|_| PeerError::Stopped)?;
        rx.await.map_err(|_| PeerError::Stopped)?
    }

    /// Our offer (already set as the local description).
    pub async fn offer(&self) -> Result<String, PeerError> {
        self.ask(Cmd::Offer).await
    }

    /// Applies the answer to our offer.
    pub async fn answer(&self, sdp: String) -> Result<(), PeerError> {
        self.ask(|tx| Cmd::Answer(sdp, tx)).await
    }

    /// Applies a remote offer; returns our answer.
    pub async fn accept(&self, sdp: String) -> Result<String, PeerError> {
        self.ask(|tx| Cmd::Accept(sdp, tx)).await
    }

    /// Sends one RTP packet on our track of `kind` (dropped before the answer).
    pub fn send_rtp(
        &self,
        kind: Kind,
        payload: Bytes,
        marker: bool,
        timestamp: u32,
    ) -> Result<(), PeerError> {
        self.cmd
            .send(Cmd::Rtp {
                kind,
                payload,
                marker,
                timestamp,
            })
            .map_err(|_| PeerError::Stopped)
    }
}

impl Task {
    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        let mut buf = vec![0u8; 2048];
        loop {
            while let Some(out) = self.pc.poll_write() {
                let _ = self
                    .socket
                    .try_send_to(&out.message, out.transport.peer_addr);
            }
            if !self.drain() {
                break;
            }
            let now = Instant::now();
            let deadline = self
                .pc
                .poll_timeout()
                .unwrap_or(now + Duration::from_secs(1))
                .max(now);
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => self.on_cmd(cmd),
                    None => break,
                },
                res = self.socket.recv_from(&mut buf) => {
                    if let Ok((n, from)) = res {
                        let _ = self.pc.handle_read(TaggedBytesMut {
                            now: Instant::now(),
                            transport: TransportContext {
                                local_addr: self.local,
                                peer_addr: from,
                                ecn: None,
                                transport_protocol: TransportProtocol::UDP,
                            },
                            message: BytesMut::from(&buf[..n]),
                        });
                    }
                }
                () = tokio::time::sleep_until(deadline.into()) => {
                    let _ = self.pc.handle_timeout(Instant::now());
                }
            }
        }
        let _ = self.pc.close();
        while let Some(out) = self.pc.poll_write() {
            let _ = self
                .socket
                .try_send_to(&out.message, out.transport.peer_addr);
        }
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        let now = Instant::now();
        match cmd {
            Cmd::Offer(reply) => {
                let r = self.pc.create_offer(None).and_then(|o| {
                    self.pc.set_local_description(now, o.clone())?;
                    Ok(o.sdp)
                });
                let _ = reply.send(r.map_err(PeerError::from));
            }
            Cmd::Answer(sdp, reply) => {
                let r = RTCSessionDescription::answer(sdp)
                    .and_then(|a| self.pc.set_remote_description(now, a));
                if r.is_ok() {
                    self.learn_payload_types();
                }
                let _ = reply.send(r.map_err(PeerError::from));
            }
            Cmd::Accept(sdp, reply) => {
                let r = RTCSessionDescription::offer(sdp)
                    .and_then(|o| self.pc.set_remote_description(now, o))
                    .and_then(|()| self.pc.create_answer(None))
                    .and_then(|a| {
                        self.pc.set_local_description(now, a.clone())?;
                        Ok(a.sdp)
                    });
                let _ = reply.send(r.map_err(PeerError::from));
            }
            Cmd::Rtp {
                kind,
                payload,
                marker,
                timestamp,
            } => self.send_rtp(kind, payload, marker, timestamp),
        }
    }

    fn learn_payload_types(&mut self) {
        for sender in self.senders.values_mut() {
            if let Some(mut s) = self.pc.rtp_sender(sender.id) {
                sender.pt = s
                    .get_parameters()
                    .rtp_parameters
                    .codecs
                    .first()
                    .map(|c| c.payload_type);
            }
        }
    }

    fn send_rtp(&mut self, kind: Kind, payload: Bytes, marker: bool, timestamp: u32) {
        let Some(sender) = self.senders.get_mut(&kind) else {
            return;
        };
        let Some(pt) = sender.pt else { return };
        sender.seq = sender.seq.wrapping_add(1);
        let packet = switchboard_client::RtpPacket {
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
        if let Some(mut s) = self.pc.rtp_sender(sender.id) {
            let _ = s.write_rtp(Instant::now(), packet);
        }
    }

    /// Forwards events and received packets; false when the caller is gone.
    fn drain(&mut self) -> bool {
        while let Some(event) = self.pc.poll_event() {
            let ev = match event {
                RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => {
                    PeerEvent::State(state.to_string())
                }
                RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) => {
                    let kind = match self
                        .pc
                        .rtp_receiver(init.receiver_id)
                        .map(|r| r.track().kind())
                    {
                        Some(RtpCodecKind::Audio) => Kind::Audio,
                        _ => Kind::Video,
                    };
                    self.tracks.insert(init.track_id, kind);
                    PeerEvent::Track
                }
                _ => continue,
            };
            if self.events.send(ev).is_err() {
                return false;
            }
        }
        while let Some(TaggedRTCMessage { now, message }) = self.pc.poll_read() {
            if let RTCMessage::RtpPacket(track_id, packet) = message {
                let kind = self.tracks.get(&track_id).copied().unwrap_or(Kind::Video);
                let ev = PeerEvent::Rtp {
                    kind,
                    seq: packet.header.sequence_number,
                    timestamp: packet.header.timestamp,
                    payload: packet.payload,
                    at: now,
                };
                if self.events.send(ev).is_err() {
                    return false;
                }
            }
        }
        true
    }
}
