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

mod keyframes;
pub mod light;
mod resume;
mod simulcast;

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

/// The direct connection to the other participant of a `p2p` room.
struct P2pLink {
    peer: String,
    pc: RTCPeerConnection,
    socket: UdpSocket,
    local: SocketAddr,
    /// `p2pTimeoutMs` after we learnt of the peer: connected by then, or
    /// `p2p-failed`.
    deadline: Instant,
    connected: bool,
    /// `p2p-failed` was sent (once).
    reported: bool,
    /// Remote candidates that came before the remote description.
    pending: Vec<RTCIceCandidateInit>,
    senders: HashMap<Kind, Sender>,
    /// Remote track id → kind.
    tracks: HashMap<String, Kind>,
}

/// Reads from the direct connection's socket; never resolves without one.
async fn read_p2p(socket: Option<&UdpSocket>, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
    match socket {
        Some(socket) => socket.recv_from(buf).await.ok(),
        None => std::future::pending().await,
    }
}

struct TcpLink {
    reader: tokio::net::tcp::OwnedReadHalf,
    writer: tokio::net::tcp::OwnedWriteHalf,
    local: SocketAddr,
    remote: SocketAddr,
    decoder: rtc::shared::tcp_framing::TcpFrameDecoder,
}

/// Reads from the ICE-TCP link; `None` when it closed. Never resolves
/// without a link.
async fn read_tcp(link: &mut Option<TcpLink>, buf: &mut [u8]) -> Option<usize> {
    use tokio::io::AsyncReadExt;
    match link {
        Some(l) => match l.reader.read(buf).await {
            Ok(n) if n > 0 => Some(n),
            _ => None,
        },
        None => std::future::pending().await,
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
type WsSink = futures_util::stream::SplitSink<Ws, Message>;
type WsStream = futures_util::stream::SplitStream<Ws>;

/// Messages kept while the signaling connection is down, sent after
/// `resumed`; past this the oldest are dropped.
const PENDING_WHILE_DOWN: usize = 256;
/// Reconnection attempts before the client gives up.
const MAX_ATTEMPTS: u32 = 30;

/// The next frame of the signaling connection; never resolves while it is
/// down.
async fn next_frame(
    link: &mut Option<(WsSink, WsStream)>,
) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
    match link {
        Some((_, stream)) => stream.next().await,
        None => std::future::pending().await,
    }
}

/// A connection attempt's result; never resolves without one running.
async fn attempt(
    connecting: &mut Option<tokio::sync::oneshot::Receiver<Option<Ws>>>,
) -> Option<Ws> {
    match connecting {
        Some(rx) => rx.await.ok().flatten(),
        None => std::future::pending().await,
    }
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

    /// Connects to the server's passive TCP candidate from its answer.
    async fn connect_tcp(&mut self) {
        let Some(sdp) = self
            .pc
            .as_ref()
            .and_then(|pc| pc.remote_description())
            .map(|d| d.sdp.clone())
        else {
            return;
        };
        // a=candidate:<foundation> 1 tcp <prio> <ip> <port> typ host tcptype passive
        let target = sdp.lines().find_map(|l| {
            let f: Vec<&str> = l.strip_prefix("a=candidate:")?.split_whitespace().collect();
            let passive = f.get(2)?.eq_ignore_ascii_case("tcp")
                && f.windows(2).any(|w| w[0] == "tcptype" && w[1] == "passive");
            if !passive {
                return None;
            }
            format!("{}:{}", f.get(4)?, f.get(5)?)
                .parse::<SocketAddr>()
                .ok()
        });
        let Some(target) = target else { return };
        match tokio::net::TcpStream::connect(target).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                let local = stream.local_addr().unwrap_or(target);
                let (reader, writer) = stream.into_split();
                self.tcp = Some(TcpLink {
                    reader,
                    writer,
                    local,
                    remote: target,
                    decoder: rtc::shared::tcp_framing::TcpFrameDecoder::new(),
                });
            }
            Err(e) => tracing::warn!(error = %e, %target, "ICE-TCP connect failed"),
        }
    }

    fn on_tcp_read(&mut self, n: Option<usize>, buf: &[u8]) {
        let Some(link) = self.tcp.as_mut() else {
            return;
        };
        let Some(n) = n else {
            self.tcp = None;
            return;
        };
        link.decoder.extend_from_slice(&buf[..n]);
        let (local, remote) = (link.local, link.remote);
        let mut packets = Vec::new();
        while let Some(p) = link.decoder.next_packet() {
            packets.push(p);
        }
        for p in packets {
            if !self.keep_incoming(&p) {
                continue;
            }
            if let Some(pc) = self.pc.as_mut() {
                let _ = pc.handle_read(TaggedBytesMut {
                    now: Instant::now(),
                    transport: TransportContext {
                        local_addr: local,
                        peer_addr: remote,
                        ecn: None,
                        transport_protocol: TransportProtocol::TCP,
                    },
                    message: BytesMut::from(&p[..]),
                });
            }
        }
    }

    /// Light receive: what is waiting, in up to [`light::CALLS`]
    /// `recvmmsg` calls (until one finds nothing, which also clears the
    /// socket's readiness); SRTP is counted once connected, the rest goes
    /// to the connection as usual.
    fn on_light_readable(&mut self, local: Option<SocketAddr>) {
        use std::os::fd::AsRawFd;
        let Some(mut light) = self.light.take() else {
            return;
        };
        let fd = self.socket.as_raw_fd();
        let mut d = LightCounts::default();
        for _ in 0..light::CALLS {
            let read = self
                .socket
                .try_io(tokio::io::Interest::READABLE, || light.batch.recv(fd));
            let Ok(n) = read else {
                break;
            };
            if n == 0 {
                break;
            }
            let now = Instant::now();
            let in_window = light.in_window(now);
            d.recv_calls += 1;
            d.recv_datagrams += n as u64;
            for i in 0..n {
                if self.frozen || light.take(i, in_window, &mut d) {
                    continue;
                }
                let Some((data, from)) = light.batch.datagram(i) else {
                    continue;
                };
                if !self.keep_incoming(data) {
                    continue;
                }
                if let (Some(pc), Some(local)) = (self.pc.as_mut(), local) {
                    let _ = pc.handle_read(TaggedBytesMut {
                        now,
                        transport: TransportContext {
                            local_addr: local,
                            peer_addr: from,
                            ecn: None,
                            transport_protocol: TransportProtocol::UDP,
                        },
                        message: BytesMut::from(data),
                    });
                }
            }
        }
        light.publish(&d);
        self.light = Some(light);
    }

    /// Light receive: the RTX payload types of the server's description,
    /// whose packets are not counted as received.
    fn light_learn_rtx(&mut self) {
        let (Some(light), Some(pc)) = (self.light.as_mut(), self.pc.as_ref()) else {
            return;
        };
        if let Some(d) = pc.remote_description() {
            light.counter.learn_rtx(&d.sdp);
        }
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

    /// Handles a signaling message when P2P is on: what concerns the direct
    /// connection here, everything else as without P2P.
    fn on_p2p_signal(&mut self, msg: ServerMessage, outgoing: &mut Vec<ClientMessage>) {
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
    fn open_p2p(&mut self, peer: String, offer: bool, outgoing: &mut Vec<ClientMessage>) {
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

    fn build_p2p(&self, peer: &str, offer: bool) -> Result<(P2pLink, Option<String>), ClientError> {
        // Bound synchronously: this runs inside the client task, where an
        // await holding `&self` would make the task's future not `Send`.
        let std_socket = std::net::UdpSocket::bind(SocketAddr::new(self.opts.bind_ip, 0))?;
        std_socket.set_nonblocking(true)?;
        let socket = UdpSocket::from_std(std_socket)?;
        let local = socket.local_addr()?;
        let mut media_engine = MediaEngine::default();
        media_engine.register_default_codecs()?;
        let registry =
            register_default_interceptors(rtc::interceptor::Registry::new(), &mut media_engine)?;
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_setting_engine(SettingEngineBuilder::new().build())
            .with_media_engine(media_engine)
            .with_interceptor_registry(registry)
            .build(Instant::now())?;
        let candidate = CandidateHostConfig {
            base_config: CandidateConfig {
                network: "udp".to_owned(),
                address: local.ip().to_string(),
                port: local.port(),
                component: 1,
                ..Default::default()
            },
            ..Default::default()
        }
        .new_candidate_host()?;
        pc.add_local_candidate(RTCIceCandidate::from(&candidate).to_json()?)?;
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
    fn on_peer_data(&mut self, from: String, data: SignalData, outgoing: &mut Vec<ClientMessage>) {
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
    fn drain_p2p(&mut self, outgoing: &mut Vec<ClientMessage>) {
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
    fn send_p2p_failed(&mut self, peer: &str, outgoing: &mut Vec<ClientMessage>) {
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

    fn close_p2p(&mut self) {
        if let Some(mut link) = self.p2p.take() {
            let _ = link.pc.close();
            let _ = self.events.send(Event::P2p {
                peer: link.peer,
                state: "closed".to_owned(),
            });
        }
    }

    fn to_peer(&self, peer: &str, data: serde_json::Value) -> ClientMessage {
        ClientMessage::Message(RelayRequest {
            room: self.room.clone(),
            to: Some(peer.to_owned()),
            data,
        })
    }

    fn to_sfu(&self, data: serde_json::Value) -> ClientMessage {
        ClientMessage::Message(RelayRequest {
            room: self.room.clone(),
            to: Some(SFU_PEER.to_owned()),
            data,
        })
    }

    /// Builds the connection, adds our tracks and the chat channel, and offers.
    /// Drops both media connections and what was negotiated on them (the
    /// server that knew them is gone).
    fn forget_connections(&mut self) {
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

    fn connect_sfu(&mut self, outgoing: &mut Vec<ClientMessage>) {
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

    fn build_and_offer(&mut self) -> Result<String, ClientError> {
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
        let candidate = CandidateHostConfig {
            base_config: CandidateConfig {
                network: "udp".to_owned(),
                address: self.opts.bind_ip.to_string(),
                port: local.port(),
                component: 1,
                ..Default::default()
            },
            ..Default::default()
        }
        .new_candidate_host()?;
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
            pc.add_local_candidate(RTCIceCandidate::from(&candidate).to_json()?)?;
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
    fn detect_ended_tracks(&mut self, silent: &[String]) {
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

    fn learn_payload_types(&mut self) {
        let Some(pc) = self.pc.as_mut() else { return };
        learn_payload_types(pc, &mut self.senders);
    }

    fn send_rtp(&mut self, kind: Kind, payload: Bytes, marker: bool, timestamp: u32) {
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
    fn send_rtp_layer(&mut self, layer: usize, payload: Bytes, marker: bool, timestamp: u32) {
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
    fn request_keyframe(&mut self, track_id: &str) {
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

    fn drain_pc(&mut self) {
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
fn add_tracks(
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
fn write_rtp(
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
fn learn_payload_types(pc: &mut RTCPeerConnection, senders: &mut HashMap<Kind, Sender>) {
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
