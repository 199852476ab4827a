//! A small Switchboard client: signaling over the WebSocket plus one WebRTC
//! connection to the server's `"sfu"` peer, built on webrtc-rs's sans-IO
//! `rtc` crate. Used by the integration tests and the load tester.
//!
//! [`Client::join`] connects and joins; the client then runs in its own task.
//! It connects to `"sfu"` when the room is (or becomes) `sfu`, or at once
//! with [`JoinOptions::standby`]. With [`JoinOptions::p2p`] it first calls the
//! other participant of a `p2p` room directly (a second connection, its own
//! UDP socket, offer/answer/candidates relayed as `message`s), gives that
//! `p2pTimeoutMs` from learning of the peer to connect, and otherwise sends
//! `p2p-failed`; on `mode` `sfu` the direct connection closes and the server
//! connection takes over. Direct media arrives as [`Event::P2pRtp`]. It publishes one Opus and/or one VP8 track
//! whose packets the caller supplies ([`Client::send_rtp`]), opens the `chat`
//! data channel, answers every server offer, and reports what arrives as
//! [`Event`]s. It binds its UDP socket to [`JoinOptions::bind_ip`] and offers
//! only that host candidate.
//!
//! With [`JoinOptions::simulcast`] the video track is offered as simulcast:
//! one encoding per rid, each with its own SSRC, sent with
//! [`Client::send_rtp_layer`] (see the `simulcast` module); the server's
//! `publisher-layers` arrive as [`Event::PublisherLayers`] and its keyframe
//! requests name the layer ([`Event::KeyframeRequested`]).
//!
//! The client task's parts: this file has the API and the task's loop and
//! signaling; `sfu` the server connection and the RTP it sends, `p2p` the
//! direct connection, `tcp` ICE-TCP, `resume` getting the signaling back,
//! `light` counting receive for load generation, `host` building a
//! PeerConnection that offers one host candidate.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::{
    MediaEngine, MIME_TYPE_OPUS, MIME_TYPE_VP8,
};
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::event::{RTCDataChannelEvent, RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::{
    CandidateConfig, CandidateHostConfig, RTCIceCandidate, RTCIceCandidateInit,
};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpReceiverId, RTCRtpSenderId, RTCRtpTransceiverDirection};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use serde_json::json;
use switchboard_proto::{
    AudioMode, ClientMessage, Join, Joined, MediaMode, P2pFailed, RelayRequest, RequestedMode,
    RoomName, ServerMessage, SignalData, SFU_PEER,
};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

mod host;
mod keyframes;
pub mod light;
mod p2p;
mod resume;
mod sfu;
mod simulcast;
mod tcp;

use p2p::{read_p2p, P2pLink};
use resume::{attempt, next_frame, Ws, MAX_ATTEMPTS, PENDING_WHILE_DOWN};
use sfu::{add_tracks, learn_payload_types};
use tcp::{read_tcp, TcpLink};

pub use host::{host_peer_connection, udp_host_candidate};
pub use light::{LightCounts, LightRtp};
pub use simulcast::SimulcastError;

pub use rtc::rtp::Packet as RtpPacket;

/// Audio or video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Audio,
    Video,
}

/// How to join.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// `ws://host:port/ws`
    pub url: String,
    pub room: String,
    pub name: String,
    pub mode: Option<RequestedMode>,
    pub audio: Option<AudioMode>,
    pub publish_audio: bool,
    pub publish_video: bool,
    /// Open the server connection at once, even while the room is `p2p`.
    pub standby: bool,
    /// Address the media socket binds to (and the only candidate offered).
    pub bind_ip: IpAddr,
    /// Bind the server connection's socket to the unspecified address (the
    /// port alone) while still offering `bind_ip` as the candidate: when
    /// the host's address changes (Wi-Fi to LTE), datagrams leave from the
    /// new one, and the server follows after the next authenticated
    /// connectivity check from it (ICE consent from the new address).
    pub bind_any: bool,
    /// Test hook: drop every Nth incoming RTP datagram once connected, to
    /// make the client's NACKs (and the server's answers) happen.
    pub drop_incoming_rtp_every: Option<u32>,
    /// Test hook: drop every Nth outgoing RTP datagram to the server (after
    /// the sender kept it for retransmission), as a lossy uplink would, to
    /// make the server's NACKs upstream happen.
    pub drop_outgoing_rtp_every: Option<u32>,
    /// Use ICE over TCP only (an active candidate connecting to the
    /// server's passive one), as a client behind a UDP-blocking firewall would.
    pub ice_tcp: bool,
    /// In a `p2p` room, call the other participant directly first (see the
    /// crate docs). Off: the client only ever talks to `"sfu"`.
    pub p2p: bool,
    /// Access token, for a server with auth on.
    pub token: Option<String>,
    /// Publish the video track as simulcast with these rids (RFC 8851),
    /// lowest layer first by convention (browsers: `q`, `h`, `f`): one
    /// encoding per rid, each with its own SSRC, packets sent with
    /// [`Client::send_rtp_layer`]. At least 2 rids, needs
    /// `publish_video`; the server accepts at most 3 (more: an `error`).
    /// `None` (the default): one encoding, as before. The direct (P2P)
    /// connection always carries a single encoding: the last rid's.
    pub simulcast: Option<Vec<String>>,
    /// Light receive (load generation, see the `light` module): the server
    /// connection's socket is read with `recvmmsg`, and once connected its
    /// SRTP datagrams are counted into this handle (distinct in-window
    /// packets per SSRC) instead of being decrypted: no [`Event::Rtp`] and
    /// no `TrackAdded` from the server connection. STUN, DTLS and SRTCP
    /// still go to the connection. `None` (the default): everything does.
    pub light: Option<LightRtp>,
}

impl JoinOptions {
    /// Options for a room created `sfu`, publishing audio and video, on 127.0.0.1.
    pub fn sfu(url: &str, room: &str, name: &str) -> JoinOptions {
        JoinOptions {
            url: url.to_owned(),
            room: room.to_owned(),
            name: name.to_owned(),
            mode: Some(RequestedMode::Sfu),
            audio: Some(AudioMode::Forward),
            publish_audio: true,
            publish_video: true,
            standby: false,
            bind_ip: IpAddr::from([127, 0, 0, 1]),
            bind_any: false,
            drop_incoming_rtp_every: None,
            drop_outgoing_rtp_every: None,
            ice_tcp: false,
            p2p: false,
            token: None,
            simulcast: None,
            light: None,
        }
    }

    /// Options for an `auto` room that tries P2P first, publishing audio and
    /// video, on 127.0.0.1.
    pub fn auto(url: &str, room: &str, name: &str) -> JoinOptions {
        JoinOptions {
            mode: Some(RequestedMode::Auto),
            p2p: true,
            ..JoinOptions::sfu(url, room, name)
        }
    }
}

/// Something that happened.
#[derive(Debug)]
pub enum Event {
    /// A signaling message other than SDP/ICE from `"sfu"`.
    Signal(ServerMessage),
    /// The server connection's state: `connecting`, `connected`, `failed`, ...
    Connection(String),
    /// A forwarded track appeared.
    TrackAdded {
        track_id: String,
        stream_id: String,
        kind: Kind,
    },
    /// A forwarded track ended.
    TrackRemoved { track_id: String },
    /// An RTP packet on a forwarded track.
    Rtp {
        track_id: String,
        stream_id: String,
        kind: Kind,
        packet: RtpPacket,
        at: Instant,
    },
    /// Text on the `chat` channel (`{"from":..,"data":..}` JSON).
    Chat(String),
    /// An offer/answer exchange with the server completed.
    Negotiated,
    /// The direct connection to `peer` ([`JoinOptions::p2p`]): `connected`,
    /// `failed` (we sent `p2p-failed`: deadline or ICE failure), or `closed`
    /// (the room went `sfu`, or the peer left).
    P2p { peer: String, state: String },
    /// An RTP packet from `peer` over the direct connection.
    P2pRtp {
        peer: String,
        kind: Kind,
        packet: RtpPacket,
        at: Instant,
    },
    /// The server asked for a keyframe (PLI or FIR) of the track we
    /// publish with this `kind`; with simulcast, of the layer `rid` (one
    /// event per layer asked for; `None` without simulcast, or when the
    /// request named no SSRC of ours).
    KeyframeRequested {
        kind: Kind,
        at: Instant,
        rid: Option<String>,
    },
    /// `publisher-layers`: the rids of our simulcast track on m-section
    /// `mid` that some subscriber needs (dynacast); the others may pause.
    /// The client only reports it: what to send stays the caller's call.
    PublisherLayers { mid: String, active: Vec<String> },
    /// The signaling connection dropped; media goes on, and the client
    /// reconnects with backoff and `resume`s (1.1).
    SignalingLost,
    /// `resumed`: the signaling connection is back, same id.
    Resumed(Joined),
    /// The server no longer knew us (`resume-failed`: it restarted, or the
    /// window passed), or our room's node died (`room-closed` with
    /// `rejoin`, cluster mode): the client joined the room again by itself,
    /// with a new id (this `joined`), and reconnects its media.
    Rejoined(Joined),
    /// The task ended (signaling closed for good, not admitted again after
    /// `resume-failed`, or left).
    Closed,
}

/// Client failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("websocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("not admitted: {0}")]
    Refused(String),
    #[error("bad room name: {0}")]
    Room(#[from] switchboard_proto::IdError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("webrtc: {0}")]
    Rtc(#[from] rtc::shared::error::Error),
    #[error("the client task has stopped")]
    Stopped,
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("simulcast: {0}")]
    Simulcast(#[from] SimulcastError),
}

enum Cmd {
    Rtp {
        kind: Kind,
        payload: Bytes,
        marker: bool,
        timestamp: u32,
    },
    /// A packet on simulcast layer `layer` (index into the rids).
    RtpLayer {
        layer: usize,
        payload: Bytes,
        marker: bool,
        timestamp: u32,
    },
    Chat(String),
    RequestKeyframe(String),
    Raw(ClientMessage),
    FreezeMedia,
    DropSignaling,
    Leave,
}

/// The `join` `opts` asks for.
fn join_message(room: &RoomName, opts: &JoinOptions) -> ClientMessage {
    ClientMessage::Join(Join {
        room: room.clone(),
        name: opts.name.clone(),
        token: opts.token.clone(),
        mode: opts.mode,
        audio: opts.audio,
    })
}

/// The signaling WebSocket's settings: a 4 KiB read chunk instead of
/// tungstenite's 128 KiB, which it zero-fills on every read attempt, and the
/// client's loop polls the socket on nearly every turn (a memset of 128 KiB
/// per media datagram). Larger messages still arrive whole, over more reads.
pub(crate) fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096)
}

/// Whether a datagram is (S)RTP, not RTCP (RFC 5761): first byte
/// 128..=191, second byte's payload type outside 192..=223.
fn is_rtp(datagram: &[u8]) -> bool {
    matches!(datagram, [0x80..=0xbf, b, ..] if !(192..=223).contains(b))
}

/// The mids of the media sections in `offer` that the offerer does not
/// send on (`recvonly` or `inactive`).
fn not_sending_mids(offer: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut mid: Option<&str> = None;
    for line in offer.lines() {
        if line.starts_with("m=") {
            mid = None;
        } else if let Some(m) = line.strip_prefix("a=mid:") {
            mid = Some(m.trim());
        } else if line == "a=inactive" || line == "a=recvonly" {
            if let Some(m) = mid {
                out.push(m.to_owned());
            }
        }
    }
    out
}

/// A joined participant.
pub struct Client {
    /// Our participant id.
    pub id: String,
    /// The `joined` we got.
    pub joined: Joined,
    cmd: mpsc::UnboundedSender<Cmd>,
    events: mpsc::UnboundedReceiver<Event>,
    /// The server connection's ICE ufrag, from its answer.
    server_ufrag: Arc<Mutex<Option<String>>>,
    /// Media sections in the server's last offer.
    server_sections: Arc<Mutex<usize>>,
    /// [`JoinOptions::simulcast`]'s rids (empty without simulcast).
    rids: Vec<String>,
}

impl Client {
    /// Connects, joins, and starts the client task.
    pub async fn join(opts: JoinOptions) -> Result<Client, ClientError> {
        let room = RoomName::parse(&opts.room)?;
        if let Some(rids) = &opts.simulcast {
            simulcast::validate(rids, opts.publish_video)?;
        }
        let rids = opts.simulcast.clone().unwrap_or_default();
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(
            opts.url.as_str(),
            Some(ws_config()),
            false,
        )
        .await?;
        let join = join_message(&room, &opts);
        ws.send(Message::text(join.to_text())).await?;
        let joined = loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .map_err(|_| ClientError::Timeout("joined"))?;
            let Some(frame) = frame else {
                return Err(ClientError::Stopped);
            };
            let Message::Text(text) = frame? else {
                continue;
            };
            match serde_json::from_str::<ServerMessage>(&text) {
                Ok(ServerMessage::Joined(j)) => break j,
                Ok(other) => return Err(ClientError::Refused(other.to_text())),
                Err(_) => return Err(ClientError::Refused(text.to_string())),
            }
        };
        let bind = if opts.bind_any {
            IpAddr::from([0, 0, 0, 0])
        } else {
            opts.bind_ip
        };
        let socket = UdpSocket::bind(SocketAddr::new(bind, 0)).await?;
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let id = joined.id.to_string();
        let sfu_now = opts.standby || joined.mode == MediaMode::Sfu;
        // A newcomer to a p2p room waits for the offer of the one already
        // there; its deadline runs from now (it learnt of the peer in `joined`).
        let await_offer_from = (opts.p2p && joined.mode == MediaMode::P2p)
            .then(|| joined.peers.first().map(|p| p.id.to_string()))
            .flatten();
        let light = opts.light.clone().map(light::Light::new);
        let task = Task {
            light,
            id: joined.id.clone(),
            resume_token: joined.resume_token.clone(),
            room,
            opts,
            socket,
            pc: None,
            senders: HashMap::new(),
            tracks: HashMap::new(),
            receivers: HashMap::new(),
            chat: None,
            chat_open: false,
            events: ev_tx,
            offer_sent: false,
            frozen: false,
            rtp_seen: 0,
            rtp_sent: 0,
            tcp: None,
            mode: joined.mode,
            p2p_timeout: Duration::from_millis(joined.p2p_timeout_ms),
            p2p: None,
            server_ufrag: Arc::default(),
            server_sections: Arc::default(),
        };
        let server_ufrag = task.server_ufrag.clone();
        let server_sections = task.server_sections.clone();
        tokio::spawn(task.run(ws, cmd_rx, sfu_now, await_offer_from));
        Ok(Client {
            id,
            joined,
            cmd: cmd_tx,
            events: ev_rx,
            server_ufrag,
            server_sections,
            rids,
        })
    }

    /// The next event, or `None` when the task has ended.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// The next event within `limit`.
    pub async fn next_event_within(&mut self, limit: Duration) -> Option<Event> {
        tokio::time::timeout(limit, self.events.recv())
            .await
            .ok()
            .flatten()
    }

    /// Sends one RTP packet on our audio or video track. Packets before the
    /// connection is negotiated are dropped. With [`JoinOptions::simulcast`],
    /// video goes on the last rid's layer (the top one, by convention); use
    /// [`Client::send_rtp_layer`] for the others.
    pub fn send_rtp(
        &self,
        kind: Kind,
        payload: Bytes,
        marker: bool,
        timestamp: u32,
    ) -> Result<(), ClientError> {
        self.cmd
            .send(Cmd::Rtp {
                kind,
                payload,
                marker,
                timestamp,
            })
            .map_err(|_| ClientError::Stopped)
    }

    /// Sends one RTP packet on the simulcast layer `rid` of our video track
    /// (its own SSRC and sequence numbers; the mid and rid header
    /// extensions are added). Packets before the connection is negotiated
    /// are dropped. On the direct (P2P) connection only the last rid's
    /// packets go, as its single video encoding.
    pub fn send_rtp_layer(
        &self,
        rid: &str,
        payload: Bytes,
        marker: bool,
        timestamp: u32,
    ) -> Result<(), ClientError> {
        if self.rids.is_empty() {
            return Err(SimulcastError::NotSimulcast.into());
        }
        let layer = self
            .rids
            .iter()
            .position(|r| r == rid)
            .ok_or_else(|| SimulcastError::UnknownRid(rid.to_owned()))?;
        self.cmd
            .send(Cmd::RtpLayer {
                layer,
                payload,
                marker,
                timestamp,
            })
            .map_err(|_| ClientError::Stopped)
    }

    /// The rids of [`JoinOptions::simulcast`] (empty without simulcast).
    pub fn rids(&self) -> &[String] {
        &self.rids
    }

    /// Sends text on the `chat` data channel.
    pub fn send_chat(&self, text: &str) -> Result<(), ClientError> {
        self.cmd
            .send(Cmd::Chat(text.to_owned()))
            .map_err(|_| ClientError::Stopped)
    }

    /// Asks the server for a keyframe of the remote track `track_id` (a
    /// PLI on its stream), as a decoder that lost its picture would.
    pub fn request_keyframe(&self, track_id: &str) -> Result<(), ClientError> {
        self.cmd
            .send(Cmd::RequestKeyframe(track_id.to_owned()))
            .map_err(|_| ClientError::Stopped)
    }

    /// Sends any signaling message as is (for tests of bad input).
    pub fn send_signal(&self, msg: ClientMessage) -> Result<(), ClientError> {
        self.cmd
            .send(Cmd::Raw(msg))
            .map_err(|_| ClientError::Stopped)
    }

    /// The ICE username fragment of the server's side of our connection
    /// (from its answer), once negotiated: what an on-path observer of our
    /// STUN checks would learn (tests of the server's STUN handling use it).
    pub fn server_ufrag(&self) -> Option<String> {
        self.server_ufrag
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many media sections (`m=` lines) the server's last offer had:
    /// what this connection's SDP has grown to.
    pub fn server_sections(&self) -> usize {
        *self
            .server_sections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Test hook: from now on, send and receive no media datagrams (as if the
    /// network vanished) while signaling stays up.
    pub fn freeze_media(&self) {
        let _ = self.cmd.send(Cmd::FreezeMedia);
    }

    /// Test hook: drops the signaling WebSocket without a close handshake,
    /// as a network fault would; the client reconnects and resumes (when
    /// the server resumes) while media goes on.
    pub fn drop_signaling(&self) {
        let _ = self.cmd.send(Cmd::DropSignaling);
    }

    /// Leaves the room and stops.
    pub fn leave(&self) {
        let _ = self.cmd.send(Cmd::Leave);
    }
}

struct Sender {
    id: RTCRtpSenderId,
    ssrc: u32,
    pt: Option<u8>,
    seq: u16,
    /// Simulcast encodings (video with [`JoinOptions::simulcast`], server
    /// connection only).
    layers: Option<simulcast::Layers>,
}

struct Task {
    /// [`JoinOptions::light`]'s receiver, its counter and buffers.
    light: Option<light::Light>,
    room: RoomName,
    opts: JoinOptions,
    socket: UdpSocket,
    pc: Option<RTCPeerConnection>,
    senders: HashMap<Kind, Sender>,
    /// Remote track id → (stream id, kind).
    tracks: HashMap<String, (String, Kind)>,
    /// Receiver of each remote track.
    receivers: HashMap<RTCRtpReceiverId, String>,
    /// Our participant id.
    id: switchboard_proto::ParticipantId,
    /// `joined.resumeToken`: with it the client resumes after a drop.
    resume_token: Option<String>,
    chat: Option<usize>,
    chat_open: bool,
    events: mpsc::UnboundedSender<Event>,
    offer_sent: bool,
    frozen: bool,
    rtp_seen: u32,
    rtp_sent: u32,
    /// The ICE-TCP connection, when `opts.ice_tcp`.
    tcp: Option<TcpLink>,
    /// The room's media mode as last heard.
    mode: MediaMode,
    /// `p2pTimeoutMs` from `joined`.
    p2p_timeout: Duration,
    /// The direct connection, when `opts.p2p` and the room is `p2p`.
    p2p: Option<P2pLink>,
    /// See [`Client::server_ufrag`].
    server_ufrag: Arc<Mutex<Option<String>>>,
    /// See [`Client::server_sections`].
    server_sections: Arc<Mutex<usize>>,
}

impl Task {
    async fn run(
        mut self,
        ws: Ws,
        mut cmds: mpsc::UnboundedReceiver<Cmd>,
        sfu_now: bool,
        await_offer_from: Option<String>,
    ) {
        let mut link = Some(ws.split());
        // Resuming (1.1): the token from `joined`, when the server resumes.
        let mut resume_token = self.resume_token.clone();
        // A `join` went out after `resume-failed`; its answer is awaited.
        let mut rejoining = false;
        let mut connecting = None;
        let mut retry_at: Option<Instant> = None;
        let mut attempts = 0u32;
        let mut pending: std::collections::VecDeque<ClientMessage> = Default::default();
        let mut outgoing: Vec<ClientMessage> = Vec::new();
        if sfu_now {
            self.connect_sfu(&mut outgoing);
        }
        if let Some(peer) = await_offer_from {
            self.open_p2p(peer, false, &mut outgoing);
        }
        let mut buf = vec![0u8; 2048];
        let mut p2p_buf = vec![0u8; 2048];
        let mut tcp_buf = vec![0u8; 4096];
        // As the connection knows it: the offered address, whatever the
        // socket is bound to.
        let local = self
            .socket
            .local_addr()
            .ok()
            .map(|a| SocketAddr::new(self.opts.bind_ip, a.port()));
        loop {
            let mut lost = false;
            for msg in outgoing.drain(..) {
                match link.as_mut() {
                    Some((sink, _)) if !lost => {
                        if sink.send(Message::text(msg.to_text())).await.is_err() {
                            lost = true;
                            pending.push_back(msg);
                        }
                    }
                    _ => {
                        if pending.len() == PENDING_WHILE_DOWN {
                            pending.pop_front();
                        }
                        pending.push_back(msg);
                    }
                }
            }
            if lost {
                link = None;
                if resume_token.is_none() {
                    let _ = self.events.send(Event::Closed);
                    return;
                }
                retry_at = Some(Instant::now() + resume::backoff(attempts));
                let _ = self.events.send(Event::SignalingLost);
            }
            if link.is_none()
                && connecting.is_none()
                && retry_at.is_some_and(|t| t <= Instant::now())
            {
                retry_at = None;
                connecting = Some(resume::connect(self.opts.url.clone()));
            }
            if let Some(pc) = self.pc.as_mut() {
                while let Some(out) = pc.poll_write() {
                    if self.frozen {
                        continue;
                    }
                    if let Some(n) = self.opts.drop_outgoing_rtp_every.filter(|n| *n > 0) {
                        if is_rtp(&out.message) {
                            self.rtp_sent = self.rtp_sent.wrapping_add(1);
                            if self.rtp_sent.is_multiple_of(n) {
                                continue;
                            }
                        }
                    }
                    if out.transport.transport_protocol == TransportProtocol::TCP {
                        if let Some(link) = self.tcp.as_mut() {
                            use tokio::io::AsyncWriteExt;
                            let frame = rtc::shared::tcp_framing::frame_packet(&out.message);
                            let _ = link.writer.write_all(&frame).await;
                        }
                        continue;
                    }
                    let _ = self
                        .socket
                        .try_send_to(&out.message, out.transport.peer_addr);
                }
            }
            if let Some(link) = self.p2p.as_mut() {
                while let Some(out) = link.pc.poll_write() {
                    if !self.frozen {
                        let _ = link
                            .socket
                            .try_send_to(&out.message, out.transport.peer_addr);
                    }
                }
            }
            if self.opts.ice_tcp && self.tcp.is_none() {
                self.connect_tcp().await;
            }
            self.drain_pc();
            self.drain_p2p(&mut outgoing);
            if !outgoing.is_empty() {
                continue; // send what the direct connection asked for first
            }
            let now = Instant::now();
            let mut deadline = self
                .pc
                .as_mut()
                .and_then(|pc| pc.poll_timeout())
                .unwrap_or(now + Duration::from_secs(1));
            if let Some(link) = self.p2p.as_mut() {
                if let Some(t) = link.pc.poll_timeout() {
                    deadline = deadline.min(t);
                }
                if !link.connected && !link.reported {
                    deadline = deadline.min(link.deadline);
                }
            }
            if let Some(t) = retry_at {
                deadline = deadline.min(t);
            }
            let deadline = deadline.max(now);
            tokio::select! {
                frame = next_frame(&mut link) => match frame {
                    Some(Ok(Message::Text(text))) => {
                        match serde_json::from_str::<ServerMessage>(&text) {
                            Ok(ServerMessage::Resumed(j)) => {
                                attempts = 0;
                                let _ = self.events.send(Event::Resumed(j));
                            }
                            Ok(ServerMessage::Error(e)) if e.code == switchboard_proto::ErrorCode::ResumeFailed
                                || (e.code == switchboard_proto::ErrorCode::RoomClosed && e.rejoin) => {
                                // `room-closed` with `rejoin`: the room's node
                                // died (cluster mode); joining again lands on a
                                // live node.
                                // The server no longer knows us (it restarted,
                                // or the window passed): join afresh, and
                                // connect media again once admitted.
                                let _ = self.events.send(Event::Signal(ServerMessage::Error(e)));
                                self.forget_connections();
                                pending.clear();
                                rejoining = true;
                                outgoing.push(join_message(&self.room, &self.opts));
                            }
                            Ok(ServerMessage::Joined(j)) if rejoining => {
                                rejoining = false;
                                attempts = 0;
                                self.id = j.id.clone();
                                self.resume_token = j.resume_token.clone();
                                resume_token = j.resume_token.clone();
                                self.mode = j.mode;
                                self.p2p_timeout = Duration::from_millis(j.p2p_timeout_ms);
                                let peer = j.peers.first().map(|p| p.id.to_string());
                                let p2p_room = j.mode == MediaMode::P2p;
                                let _ = self.events.send(Event::Rejoined(j));
                                if self.opts.standby || !p2p_room {
                                    self.connect_sfu(&mut outgoing);
                                }
                                if let (true, true, Some(peer)) = (self.opts.p2p, p2p_room, peer) {
                                    self.open_p2p(peer, false, &mut outgoing);
                                }
                            }
                            Ok(ServerMessage::Error(e)) if rejoining => {
                                // Not admitted again (room full, token expired...).
                                let _ = self.events.send(Event::Signal(ServerMessage::Error(e)));
                                break;
                            }
                            Ok(msg) => {
                                if self.opts.p2p {
                                    self.on_p2p_signal(msg, &mut outgoing);
                                } else {
                                    self.on_signal(msg, &mut outgoing);
                                }
                            }
                            Err(_) => {}
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        link = None;
                        if resume_token.is_none() {
                            break;
                        }
                        retry_at = Some(Instant::now() + resume::backoff(attempts));
                        let _ = self.events.send(Event::SignalingLost);
                    }
                    Some(Ok(_)) => {}
                },
                ws = attempt(&mut connecting) => {
                    connecting = None;
                    match (ws, resume_token.as_ref()) {
                        (Some(ws), Some(token)) => {
                            link = Some(ws.split());
                            // `resume` first; what waited goes right after it.
                            outgoing.push(ClientMessage::Resume(switchboard_proto::Resume {
                                room: self.room.clone(),
                                id: self.id.clone(),
                                resume_token: token.clone(),
                            }));
                            outgoing.extend(pending.drain(..));
                        }
                        _ => {
                            attempts += 1;
                            if attempts >= MAX_ATTEMPTS {
                                break;
                            }
                            retry_at = Some(Instant::now() + resume::backoff(attempts));
                        }
                    }
                },
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Rtp { kind, payload, marker, timestamp }) => self.send_rtp(kind, payload, marker, timestamp),
                    Some(Cmd::RtpLayer { layer, payload, marker, timestamp }) => self.send_rtp_layer(layer, payload, marker, timestamp),
                    Some(Cmd::Chat(text)) => {
                        if let (Some(pc), Some(id)) = (self.pc.as_mut(), self.chat) {
                            if let Some(mut dc) = pc.data_channel(id) {
                                let _ = dc.send_text(Instant::now(), text);
                            }
                        }
                    }
                    Some(Cmd::RequestKeyframe(track)) => self.request_keyframe(&track),
                    Some(Cmd::Raw(msg)) => outgoing.push(msg),
                    Some(Cmd::FreezeMedia) => self.frozen = true,
                    Some(Cmd::DropSignaling) => {
                        // As a network fault would: no close handshake.
                        link = None;
                        retry_at = Some(Instant::now() + resume::backoff(attempts));
                        let _ = self.events.send(Event::SignalingLost);
                    }
                    Some(Cmd::Leave) | None => {
                        if let Some((sink, _)) = link.as_mut() {
                            let leave = ClientMessage::Leave(switchboard_proto::Leave { room: self.room.clone() });
                            let _ = sink.send(Message::text(leave.to_text())).await;
                            let _ = sink.close().await;
                        }
                        break;
                    }
                },
                res = self.socket.readable(), if self.light.is_some() => {
                    if res.is_ok() {
                        self.on_light_readable(local);
                    }
                }
                res = self.socket.recv_from(&mut buf), if self.light.is_none() => {
                    let keep = match &res {
                        Ok((n, _)) => self.keep_incoming(&buf[..*n]),
                        Err(_) => false,
                    };
                    if let (true, Ok((n, from)), Some(pc), Some(local)) = (keep, res, self.pc.as_mut(), local) {
                        let _ = pc.handle_read(TaggedBytesMut {
                            now: Instant::now(),
                            transport: TransportContext {
                                local_addr: local,
                                peer_addr: from,
                                ecn: None,
                                transport_protocol: TransportProtocol::UDP,
                            },
                            message: BytesMut::from(&buf[..n]),
                        });
                    }
                }
                n = read_tcp(&mut self.tcp, &mut tcp_buf) => self.on_tcp_read(n, &tcp_buf),
                res = read_p2p(self.p2p.as_ref().map(|l| &l.socket), &mut p2p_buf) => {
                    if let (Some((n, from)), Some(link), false) = (res, self.p2p.as_mut(), self.frozen) {
                        let _ = link.pc.handle_read(TaggedBytesMut {
                            now: Instant::now(),
                            transport: TransportContext {
                                local_addr: link.local,
                                peer_addr: from,
                                ecn: None,
                                transport_protocol: TransportProtocol::UDP,
                            },
                            message: BytesMut::from(&p2p_buf[..n]),
                        });
                    }
                }
                () = tokio::time::sleep_until(deadline.into()) => {
                    let now = Instant::now();
                    if let Some(pc) = self.pc.as_mut() {
                        let _ = pc.handle_timeout(now);
                    }
                    if let Some(link) = self.p2p.as_mut() {
                        let _ = link.pc.handle_timeout(now);
                    }
                }
            }
        }
        if let Some(pc) = self.pc.as_mut() {
            let _ = pc.close();
        }
        if let Some(mut link) = self.p2p.take() {
            let _ = link.pc.close();
        }
        let _ = self.events.send(Event::Closed);
    }

    /// Applies the test hooks to one incoming datagram.
    fn keep_incoming(&mut self, datagram: &[u8]) -> bool {
        if self.frozen {
            return false;
        }
        match self.opts.drop_incoming_rtp_every {
            Some(n) if n > 0 && is_rtp(datagram) => {
                self.rtp_seen = self.rtp_seen.wrapping_add(1);
                !self.rtp_seen.is_multiple_of(n)
            }
            _ => true,
        }
    }

    fn on_signal(&mut self, msg: ServerMessage, outgoing: &mut Vec<ClientMessage>) {
        match msg {
            ServerMessage::Message(m) if m.from == SFU_PEER => {
                match serde_json::from_value::<SignalData>(m.data) {
                    Ok(SignalData::Answer { sdp }) => {
                        if let Some(ufrag) =
                            sdp.lines().find_map(|l| l.strip_prefix("a=ice-ufrag:"))
                        {
                            *self.server_ufrag.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(ufrag.trim().to_owned());
                        }
                        if let Some(pc) = self.pc.as_mut() {
                            let r = RTCSessionDescription::answer(sdp)
                                .and_then(|a| pc.set_remote_description(Instant::now(), a));
                            if r.is_ok() {
                                self.learn_payload_types();
                                self.light_learn_rtx();
                                let _ = self.events.send(Event::Negotiated);
                            }
                        }
                    }
                    Ok(SignalData::Offer { sdp }) => {
                        *self
                            .server_sections
                            .lock()
                            .unwrap_or_else(|e| e.into_inner()) =
                            sdp.lines().filter(|l| l.starts_with("m=")).count();
                        let silent = not_sending_mids(&sdp);
                        if let Some(pc) = self.pc.as_mut() {
                            let now = Instant::now();
                            let r = RTCSessionDescription::offer(sdp)
                                .and_then(|o| pc.set_remote_description(now, o))
                                .and_then(|()| pc.create_answer(None))
                                .and_then(|a| pc.set_local_description(now, a.clone()).map(|()| a));
                            if let Ok(answer) = r {
                                outgoing
                                    .push(self.to_sfu(json!({"type":"answer","sdp": answer.sdp})));
                                self.detect_ended_tracks(&silent);
                                self.light_learn_rtx();
                                let _ = self.events.send(Event::Negotiated);
                            }
                        }
                    }
                    Ok(SignalData::Candidate { .. }) | Err(_) => {}
                }
            }
            ServerMessage::Mode(m) if m.mode == MediaMode::Sfu => {
                if self.pc.is_none() {
                    self.connect_sfu(outgoing);
                }
                let _ = self.events.send(Event::Signal(ServerMessage::Mode(m)));
            }
            ServerMessage::PublisherLayers(l) => {
                let _ = self.events.send(Event::PublisherLayers {
                    mid: l.mid,
                    active: l.active,
                });
            }
            other => {
                let _ = self.events.send(Event::Signal(other));
            }
        }
    }

    // -- the direct connection (JoinOptions::p2p) ----------------------------
}
