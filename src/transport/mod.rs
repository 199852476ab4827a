//! The media transport: every server-side PeerConnection, on one UDP port,
//! driven by webrtc-rs's sans-IO `rtc` crate from our own event loop. This is
//! the only module that imports webrtc-rs or touches media sockets.
//!
//! One thread (`sfu-media`) owns the socket and all connections. Datagrams
//! are routed to a connection by ICE ufrag, then by remote address
//! ([`Demux`]). Each participant has one [`Peer`]: the tracks it publishes
//! and the tracks forwarded to it (each forwarded track is a sender on the
//! subscriber's connection, added by a server offer). Negotiation follows the
//! protocol: the client offers first; the server offers only in stable state
//! and never with another exchange in flight.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rtc::interceptor::{Attribute, Interceptor, Packet, Registry, Slot, StreamInfo, TaggedPacket};
use rtc::media_stream::{MediaStreamTrack, MediaStreamTrackId};
use rtc::peer_connection::configuration::media_engine::{MediaEngine, MIME_TYPE_OPUS};
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::event::{RTCDataChannelEvent, RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::{
    CandidateConfig, CandidateHostConfig, RTCDtlsRole, RTCIceCandidate, RTCIceCandidateInit,
};
use rtc::peer_connection::RTCPeerConnection;
use rtc::peer_connection::RTCPeerConnectionBuilder;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RTCRtpHeaderExtensionCapability, RTCRtpRtxParameters, RtpCodecKind,
};
use rtc::rtp_transceiver::{
    RTCRtpReceiverId, RTCRtpSenderId, RTCRtpTransceiverDirection, RTCRtpTransceiverInit,
};
use rtc::sansio::Protocol;
use rtc::shared::tcp_framing::frame_packet;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use serde_json::json;
use switchboard_proto::{
    AudioMode, ErrorCode, ParticipantId, Relayed, RoomName, ServerMessage, SignalData, Speaker,
    Speakers, MIX_STREAM,
};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::auth::Grants;
use crate::hub::Outboxes;
use crate::media::demux::{Demux, Route};
use crate::media::keyframe::KeyframeRequester;
use crate::media::offer::{self, OfferError, OfferLimits};
use crate::media::rewrite::{Rewrite, SeqRewriter};
use crate::metrics::{Limit, Metrics, MixDrop};
use crate::mixer::{
    AudioLevel, InputId, MixerConfig, MixerStats, Push, RoomMixer, SelectConfig, SpeakerTracker,
    FRAME_SAMPLES,
};
use crate::perip::PerIp;
use crate::ratelimit::{RateLimiter, Verdict};
use crate::sfu::{Command, MediaConfig, MediaKind, MediaPlane, Publishing, Signal, COMMAND_QUEUE};
use crate::webhook::{Event, ParticipantRef, RoomRef, TrackRef, Webhooks};

mod classic;

/// Largest datagram we read.
const MAX_DATAGRAM: usize = 1500;
/// The longest the loop sleeps: also the period of the liveness sweep.
const IDLE: Duration = Duration::from_secs(1);
/// A connection that sends nothing at all (not even an ICE consent check,
/// which browsers send every ~5 s) for this long is gone. As ICE-lite the
/// server sends no checks of its own, so this is how it notices.
const PEER_SILENCE: Duration = Duration::from_secs(8);
/// The mixer's frame: it runs every 20 ms while any room mixes.
const MIX_FRAME: Duration = Duration::from_millis(20);
/// No consent check for this long: the connection is `disconnected`.
const ICE_DISCONNECTED: Duration = Duration::from_secs(8);
/// No consent check for this long: `failed` (RFC 7675's consent expiry).
const ICE_FAILED: Duration = Duration::from_secs(30);
/// Offers a client may send: a burst of this many, then one per
/// [`OFFER_EVERY`] (each costs the media thread a parse and an answer).
const OFFER_BURST: u32 = 8;
const OFFER_EVERY: Duration = Duration::from_secs(2);
/// Media sections an offer may hold beyond those the server has put in the
/// connection (its own `--max-tracks` sending sections, a data channel, and
/// this slack for receive-only sections a client adds).
const OFFER_SECTION_SLACK: usize = 4;
/// Candidates in one offer, and trickled per connection.
const MAX_REMOTE_CANDIDATES: usize = 64;
/// Largest chat message relayed, in bytes.
pub const CHAT_MAX_BYTES: usize = 4096;
/// Chat messages per second per sender (sustained, and the burst).
const CHAT_RATE: f64 = 20.0;
const CHAT_BURST: u32 = 40;
/// A subscriber whose chat channel holds more than this many bytes not yet
/// acknowledged gets no more chat until it has taken what it was sent.
pub const CHAT_BACKLOG: usize = 256 * 1024;

/// Starts the media thread; returns the hub's handle on it.
pub fn start(
    config: MediaConfig,
    outboxes: Arc<Outboxes>,
    metrics: Arc<Metrics>,
    publishing: Arc<Publishing>,
    webhooks: Arc<Webhooks>,
) -> io::Result<MediaPlane> {
    let socket = std::net::UdpSocket::bind(config.bind)?;
    socket.set_nonblocking(true)?;
    let local = socket.local_addr()?;
    let announce = SocketAddr::new(config.public_ip.unwrap_or(local.ip()), local.port());
    // ICE-TCP (passive) on the same port number, for networks that block UDP.
    let tcp = if config.ice_tcp {
        match std::net::TcpListener::bind(local).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(%local, error = %e, "ICE-TCP disabled: cannot listen on the media port over TCP");
                None
            }
        }
    } else {
        None
    };
    let tcp_announce = tcp.as_ref().map(|_| announce);
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    std::thread::Builder::new()
        .name("sfu-media".into())
        .spawn(move || {
            crate::sfu::exit_on_panic(
                "sfu-media",
                |code| std::process::exit(code),
                move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(error = %e, "media runtime failed to start");
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        let tcp_events = match tcp.map(tokio::net::TcpListener::from_std) {
                            Some(Ok(listener)) => {
                                let (ev_tx, ev_rx) = mpsc::channel(TCP_EVENT_QUEUE);
                                let per_ip = PerIp::new(config.max_tcp_per_ip, "ice-tcp");
                                tokio::spawn(accept_tcp(listener, ev_tx, per_ip, metrics.clone()));
                                Some(ev_rx)
                            }
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "ICE-TCP disabled");
                                None
                            }
                            None => None,
                        };
                        match UdpSocket::from_std(socket) {
                            Ok(socket) => {
                                let mut engine =
                                    Engine::new(announce, tcp_announce, &config, outboxes, metrics);
                                engine.publishing = publishing;
                                engine.webhooks = Some(webhooks);
                                engine.run(socket, rx, tcp_events).await
                            }
                            Err(e) => tracing::error!(error = %e, "media socket failed"),
                        }
                    });
                },
            )
        })?;
    tracing::info!(%local, %announce, ice_tcp = tcp_announce.is_some(), "media listening");
    Ok(MediaPlane::new(tx, local))
}

/// What the ICE-TCP side tells the engine.
enum TcpEvent {
    Opened {
        from: SocketAddr,
        writer: mpsc::Sender<Vec<u8>>,
    },
    Packet {
        from: SocketAddr,
        data: Vec<u8>,
    },
    Closed {
        from: SocketAddr,
    },
}

const TCP_EVENT_QUEUE: usize = 4096;
/// Framed packets waiting to be written to one TCP connection.
const TCP_WRITE_QUEUE: usize = 512;
/// ICE-TCP connections open at once; more are refused.
const MAX_TCP_CONNECTIONS: usize = 4096;
/// A TCP connection that sends nothing for this long is closed (ICE
/// keepalives and consent checks come every few seconds).
const TCP_IDLE: Duration = Duration::from_secs(30);

/// Accepts ICE-TCP connections; each gets a reader (RFC 4571 framing) and a
/// writer task. The engine routes their packets like datagrams.
async fn accept_tcp(
    listener: tokio::net::TcpListener,
    events: mpsc::Sender<TcpEvent>,
    per_ip: PerIp,
    metrics: Arc<Metrics>,
) {
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(error = %e, "ICE-TCP accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if open.load(std::sync::atomic::Ordering::Relaxed) >= MAX_TCP_CONNECTIONS {
            continue; // dropping `stream` refuses it
        }
        let Some(slot) = per_ip.acquire(from.ip()) else {
            metrics.limited(Limit::IceTcpPerIp);
            continue;
        };
        open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let (mut reader, mut writer) = stream.into_split();
        let (wtx, mut wrx) = mpsc::channel::<Vec<u8>>(TCP_WRITE_QUEUE);
        if events
            .send(TcpEvent::Opened { from, writer: wtx })
            .await
            .is_err()
        {
            return;
        }
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Some(frame) = wrx.recv().await {
                if writer.write_all(&frame).await.is_err() {
                    break;
                }
            }
        });
        let events = events.clone();
        let open = open.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let _slot = slot;
            let mut decoder = rtc::shared::tcp_framing::TcpFrameDecoder::new();
            let mut buf = vec![0u8; 4096];
            'conn: loop {
                let n = match tokio::time::timeout(TCP_IDLE, reader.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => n,
                    _ => break,
                };
                decoder.extend_from_slice(&buf[..n]);
                while let Some(data) = decoder.next_packet() {
                    if events.send(TcpEvent::Packet { from, data }).await.is_err() {
                        break 'conn;
                    }
                }
            }
            open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            let _ = events.send(TcpEvent::Closed { from }).await;
        });
    }
}

/// Index of a connection in the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct PeerKey(u64);

struct MediaRoom {
    sfu: bool,
    members: Vec<PeerKey>,
    /// The mixer of an `audio: "mix"` room (its audio is mixed, not
    /// forwarded), or of a forward room with classic members (who hear the
    /// mix; the others still get the audio forwarded: `mix_for_all` false).
    mix: Option<Box<RoomMix>>,
    /// Whether everyone hears the mix (an `audio: "mix"` room).
    mix_for_all: bool,
    /// Active speakers of a forward room, from publishers' audio levels.
    speakers: Option<Box<SpeakerTracker>>,
    /// The active speakers now, loudest first (mixer inputs).
    speaking: Vec<InputId>,
}

impl MediaRoom {
    /// Whether audio is mixed for everyone instead of forwarded.
    fn mixes_for_all(&self) -> bool {
        self.mix.is_some() && self.mix_for_all
    }
}

/// A mix room's mixer.
struct RoomMix {
    mixer: RoomMixer,
    /// Mixer counters already exported to the metrics.
    exported: MixerStats,
    /// Speakers currently counted in the active-speakers gauge.
    speakers: usize,
}

/// The one mixed audio track a participant of a mix room receives.
struct MixOut {
    transceiver: usize,
    sender_id: RTCRtpSenderId,
    ssrc: u32,
    /// Opus payload type the listener negotiated; `None` until its answer.
    pt: Option<u8>,
    offered: bool,
    seq: u16,
    ts: u32,
}

/// A track a participant publishes.
struct Published {
    receiver_id: RTCRtpReceiverId,
    ssrc: u32,
    kind: RtpCodecKind,
    codec: RTCRtpCodec,
    keyframes: KeyframeRequester,
    /// Ids of the header extensions that name the publisher's own m-section
    /// (mid, rid, repaired rid, transport-cc, abs-send-time): removed before
    /// forwarding. A subscriber would route a packet by the publisher's mid
    /// to its own m-section of that mid, and the congestion-control fields
    /// belong to the publisher's hop.
    strip_extensions: Vec<u8>,
    /// The payload type of Opus on this track (audio), which the mixer takes.
    opus_pt: Option<u8>,
    /// Id of the RFC 6464 audio-level header extension, if negotiated.
    audio_level_ext: Option<u8>,
}

/// A track forwarded to a participant.
struct Down {
    transceiver: usize,
    sender_id: RTCRtpSenderId,
    ssrc: u32,
    kind: RtpCodecKind,
    mime: String,
    /// Payload type the subscriber negotiated; `None` until its answer.
    pt: Option<u8>,
    /// Whether a server offer carrying this track has gone out; only the
    /// answer to such an offer negotiates it.
    offered: bool,
    /// Video whose keyframes we can recognise: nothing is forwarded until
    /// one arrives (requested when the subscriber's answer negotiated the
    /// track), so the subscriber's decoder never starts on deltas it cannot
    /// decode.
    awaiting_keyframe: bool,
    rewriter: SeqRewriter,
}

/// One participant's server connection.
struct Peer {
    participant: ParticipantId,
    room: RoomName,
    pc: RTCPeerConnection,
    ufrag: String,
    answered_first: bool,
    offer_in_flight: bool,
    needs_offer: bool,
    published: HashMap<MediaStreamTrackId, Published>,
    /// By publisher, then the publisher's track id (two levels so the
    /// per-packet lookup borrows the track id instead of cloning it).
    down: HashMap<PeerKey, HashMap<MediaStreamTrackId, Down>>,
    /// Our local track id of a downtrack → its key in `down`.
    down_by_local: HashMap<MediaStreamTrackId, (PeerKey, MediaStreamTrackId)>,
    chat: Option<usize>,
    state: RTCPeerConnectionState,
    /// When the last datagram from this connection arrived (or its creation).
    last_rx: Instant,
    /// The UDP addresses it was heard from: a client whose address changed
    /// is followed (see `media::follow`).
    paths: crate::media::follow::PathFollower,
    /// The server's candidate lines, trickled after the first answer.
    candidates: Vec<String>,
    /// This participant's input (and listener id) in its room's mixer.
    audio_input: Option<InputId>,
    /// The mixed audio sent to it, in a mix room.
    mix_out: Option<MixOut>,
    /// What its token allows.
    grants: Grants,
    /// Muted by an administrator: audio, video.
    muted: [bool; 2],
    /// Whether it was told once that its chat is not relayed.
    told_no_data: bool,
    /// Its offer budget.
    offers: RateLimiter,
    /// Media sections the server's side of the connection has (from the
    /// last description it made).
    sections: usize,
    /// Candidates it trickled.
    remote_candidates: usize,
    /// Its chat rate.
    chat_rate: RateLimiter,
    /// Server-sent m-sections whose track went away, for reuse.
    spare: Vec<Spare>,
    /// A classic Socket.IO client: it receives exactly the mix and the
    /// active speaker's video, on its own m-sections (answered sendrecv).
    classic: bool,
    /// The active speaker's video sent to a classic client.
    speaker_out: Option<classic::SpeakerOut>,
}

/// A server-sent m-section whose track went away: inactive in the next
/// server offer, reusable for a track of the same kind and codec once that
/// offer's exchange has completed (protocol: "the server may reuse an
/// m-section that has been inactive for at least one completed exchange").
struct Spare {
    kind: RtpCodecKind,
    mime: String,
    transceiver: usize,
    sender_id: RTCRtpSenderId,
    ssrc: u32,
    /// The outgoing stream's rewriter: a later track on this SSRC continues
    /// its sequence numbers and timestamps (the subscriber's SRTP replay
    /// window would drop a restart).
    rewriter: SeqRewriter,
    /// A server offer marking it inactive has gone out.
    offered: bool,
    /// That offer was answered.
    ready: bool,
}

/// Something a connection's output asks the engine to do to others.
enum Action {
    Forward {
        from: PeerKey,
        track: MediaStreamTrackId,
        packet: rtc::rtp::Packet,
        arrived: Instant,
    },
    TrackOpened(PeerKey, MediaStreamTrackId),
    TrackClosed(PeerKey, MediaStreamTrackId),
    KeyframeWanted(PeerKey, MediaStreamTrackId),
    /// A classic client asked for a keyframe of the speaker it is shown.
    SpeakerKeyframeWanted(PeerKey),
    Chat(PeerKey, String),
    Failed(PeerKey),
}

struct Engine {
    announce: SocketAddr,
    /// Where ICE-TCP listens, if it does.
    tcp_announce: Option<SocketAddr>,
    /// Write side of each ICE-TCP connection, by remote address.
    tcp_writers: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    peers: HashMap<PeerKey, Peer>,
    by_participant: HashMap<ParticipantId, PeerKey>,
    rooms: HashMap<RoomName, MediaRoom>,
    demux: Demux<PeerKey>,
    outboxes: Arc<Outboxes>,
    metrics: Arc<Metrics>,
    /// What each participant publishes, for the admin API.
    publishing: Arc<Publishing>,
    /// `track_published`/`track_unpublished` events.
    webhooks: Option<Arc<Webhooks>>,
    next_key: u64,
    actions: Vec<Action>,
    /// Connections whose forwarded tracks changed since the last offer round.
    offers_due: Vec<PeerKey>,
    /// Reused by `forward` for the subscriber list.
    scratch: Vec<PeerKey>,
    /// Arrival of the first packet forwarded since the last flush.
    forwarded_since: Option<Instant>,
    /// When the mixer runs next; `None` while no room mixes.
    audio_due: Option<Instant>,
    /// K of the mixer (`--mix-speakers`).
    mix_speakers: usize,
    /// Encoder complexity of the mixer (`--mix-complexity`).
    mix_complexity: i32,
    next_input: u32,
    /// `--max-tracks`.
    max_tracks: usize,
}

impl Engine {
    fn new(
        announce: SocketAddr,
        tcp_announce: Option<SocketAddr>,
        config: &MediaConfig,
        outboxes: Arc<Outboxes>,
        metrics: Arc<Metrics>,
    ) -> Engine {
        Engine {
            announce,
            tcp_announce,
            tcp_writers: HashMap::new(),
            peers: HashMap::new(),
            by_participant: HashMap::new(),
            rooms: HashMap::new(),
            demux: Demux::new(),
            outboxes,
            metrics,
            publishing: Arc::default(),
            webhooks: None,
            next_key: 1,
            actions: Vec::new(),
            offers_due: Vec::new(),
            scratch: Vec::new(),
            forwarded_since: None,
            audio_due: None,
            mix_speakers: config.mix_speakers,
            mix_complexity: config.mix_complexity,
            next_input: 1,
            max_tracks: config.max_tracks,
        }
    }

    async fn run(
        mut self,
        socket: UdpSocket,
        mut commands: mpsc::Receiver<Command>,
        mut tcp: Option<mpsc::Receiver<TcpEvent>>,
    ) {
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        loop {
            // The mixer runs here rather than in a select branch so a busy
            // socket (always ready) cannot starve it.
            if self.audio_due.is_some_and(|due| due <= Instant::now()) {
                self.audio_tick();
            }
            self.flush(&socket);
            if let Some(arrived) = self.forwarded_since.take() {
                self.metrics
                    .forward_latency
                    .observe(arrived.elapsed().as_secs_f64());
            }
            let now = Instant::now();
            let deadline = self
                .peers
                .values_mut()
                .filter_map(|p| p.pc.poll_timeout())
                .min()
                .unwrap_or(now + IDLE)
                .min(now + IDLE)
                .min(self.audio_due.unwrap_or(now + IDLE))
                .max(now);
            tokio::select! {
                biased;
                cmd = commands.recv() => match cmd {
                    Some(Command::Shutdown) | None => break,
                    Some(cmd) => {
                        self.on_command(cmd);
                        self.apply_actions();
                    }
                },
                res = socket.recv_from(&mut buf) => match res {
                    Ok((n, from)) => self.on_packet(&buf[..n], from, TransportProtocol::UDP),
                    Err(e) => tracing::debug!(error = %e, "media socket read"),
                },
                Some(event) = next_tcp(&mut tcp) => self.on_tcp(event),
                () = tokio::time::sleep_until(deadline.into()) => {
                    let now = Instant::now();
                    let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
                    for key in keys {
                        if let Some(p) = self.peers.get_mut(&key) {
                            if p.pc.poll_timeout().is_some_and(|t| t <= now) {
                                let _ = p.pc.handle_timeout(now);
                            }
                        }
                        self.drain(key);
                    }
                    self.apply_actions();
                    self.poll_keyframes(now);
                    self.sweep_silent(now);
                }
            }
        }
        for (_, mut p) in self.peers.drain() {
            let _ = p.pc.close();
        }
        tracing::info!("media plane stopped");
    }

    // -- input ------------------------------------------------------------

    fn on_tcp(&mut self, event: TcpEvent) {
        match event {
            TcpEvent::Opened { from, writer } => {
                self.tcp_writers.insert(from, writer);
            }
            TcpEvent::Packet { from, data } => {
                self.metrics.media_tcp_in.inc();
                self.on_packet(&data, from, TransportProtocol::TCP)
            }
            TcpEvent::Closed { from } => {
                self.tcp_writers.remove(&from);
            }
        }
    }

    /// One datagram (UDP) or framed packet (ICE-TCP) from `from`.
    fn on_packet(&mut self, data: &[u8], from: SocketAddr, protocol: TransportProtocol) {
        if data.len() > MAX_DATAGRAM {
            self.metrics.media_dropped("oversize");
            return;
        }
        let key = match self.demux.route(data, from) {
            Route::To(key) => key,
            Route::Drop(reason) => {
                self.metrics.media_dropped(reason.as_str());
                return;
            }
        };
        let Some(peer) = self.peers.get_mut(&key) else {
            self.metrics.media_dropped("unknown-peer");
            return;
        };
        self.metrics.media_in(data.len());
        let now = Instant::now();
        peer.last_rx = now;
        if protocol == TransportProtocol::UDP {
            peer.paths.heard(from, now);
        }
        let msg = TaggedBytesMut {
            now,
            transport: TransportContext {
                local_addr: self.announce,
                peer_addr: from,
                ecn: None,
                transport_protocol: protocol,
            },
            message: BytesMut::from(data),
        };
        if let Err(e) = peer.pc.handle_read(msg) {
            tracing::debug!(participant = %peer.participant, error = %e, "bad media datagram");
            self.metrics.media_dropped("rejected");
        }
        self.drain(key);
        self.apply_actions();
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Signal(signal) => self.on_signal(signal),
            Command::Mute {
                participant,
                kind,
                muted,
                ..
            } => {
                if let Some(p) = self
                    .by_participant
                    .get(&participant)
                    .and_then(|k| self.peers.get_mut(k))
                {
                    p.muted[kind as usize] = muted;
                    tracing::info!(%participant, kind = kind.as_str(), muted, "muted by an administrator");
                }
            }
            Command::Left { room, participant } => {
                if let Some(key) = self.by_participant.get(&participant).copied() {
                    self.remove_peer(key);
                }
                let _ = room;
            }
            Command::RoomSfu { room } => self.room_to_sfu(&room),
            // Back to p2p: forwarding stops (packets count as `standby`
            // drops); subscriptions stay, so a later `sfu` resumes them.
            Command::RoomP2p { room } => {
                if let Some(media_room) = self.rooms.get_mut(&room) {
                    media_room.sfu = false;
                }
            }
            Command::Shutdown => {}
        }
    }

    fn on_signal(&mut self, signal: Signal) {
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
        let (pc, candidates) = build_connection(
            &ufrag,
            &pwd,
            self.announce,
            self.tcp_announce,
            &self.metrics,
        )?;
        let key = PeerKey(self.next_key);
        self.next_key += 1;
        self.demux.register(&ufrag, &pwd, key);
        let new_mix = match audio {
            AudioMode::Mix if !self.rooms.contains_key(&room) => self.new_mixer(&room),
            _ => None,
        };
        let media_room = match self.rooms.entry(room.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let mix = new_mix;
                let speakers = mix.is_none().then(|| {
                    let defaults = MixerConfig::default();
                    Box::new(SpeakerTracker::new(
                        self.mix_speakers,
                        defaults.silence_threshold_dbov,
                        defaults.speakers_interval,
                    ))
                });
                let mix_for_all = mix.is_some();
                e.insert(MediaRoom {
                    sfu,
                    members: Vec::new(),
                    mix,
                    mix_for_all,
                    speakers,
                    speaking: Vec::new(),
                })
            }
        };
        media_room.sfu |= sfu;
        media_room.members.push(key);
        // Every participant is an input of its room's mixer and/or speaker
        // tracker, by this id.
        let input = InputId(self.next_input);
        self.next_input = self.next_input.wrapping_add(1).max(1);
        let mut audio_input = None;
        if let Some(mix) = media_room.mix.as_mut() {
            match mix.mixer.add_input(input) {
                Ok(()) => {
                    audio_input = Some(input);
                }
                Err(e) => {
                    tracing::error!(%room, %participant, error = %e, "cannot add a mixer input")
                }
            }
        }
        if let Some(tracker) = media_room.speakers.as_mut() {
            tracker.add(input);
            audio_input = Some(input);
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
                ufrag,
                answered_first: false,
                offer_in_flight: false,
                needs_offer: false,
                published: HashMap::new(),
                down: HashMap::new(),
                down_by_local: HashMap::new(),
                chat: None,
                state: RTCPeerConnectionState::New,
                last_rx: Instant::now(),
                paths: Default::default(),
                candidates,
                audio_input,
                mix_out: None,
                grants: Grants::ALL,
                muted: [false; 2],
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

    /// A mixer for `room`, with the server's settings; `None` (and logged)
    /// when the codec cannot be set up: audio is then forwarded, worse, but
    /// the call goes on.
    fn new_mixer(&self, room: &RoomName) -> Option<Box<RoomMix>> {
        let config = MixerConfig {
            select: SelectConfig {
                k: self.mix_speakers,
                ..SelectConfig::default()
            },
            complexity: self.mix_complexity,
            ..MixerConfig::default()
        };
        match RoomMixer::new(config) {
            Ok(mixer) => {
                self.metrics.mixer.rooms.inc();
                Some(Box::new(RoomMix {
                    mixer,
                    exported: MixerStats::default(),
                    speakers: 0,
                }))
            }
            Err(e) => {
                tracing::error!(%room, error = %e, "cannot create the room's mixer");
                None
            }
        }
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
        };
        let shape = match offer::check(&sdp, &limits) {
            Ok(shape) => shape,
            Err(e) => {
                self.metrics.limited(match e {
                    OfferError::TooManySections { .. } => Limit::MediaSections,
                    OfferError::TooManyCandidates { .. } => Limit::Candidates,
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
                    classic::attach_tracks(p, offered_kinds);
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
                    classic::negotiated(p);
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
        let downs = p.down.iter_mut().flat_map(|(publisher, tracks)| {
            tracks.iter_mut().map(move |(t, d)| (*publisher, t, d))
        });
        for (publisher, track, down) in downs {
            if down.pt.is_some() || !down.offered {
                continue;
            }
            down.pt = negotiated_pt(&mut p.pc, down.sender_id, &down.mime);
            if down.pt.is_some() && down.kind == RtpCodecKind::Video {
                want_keyframes.push((publisher, track.clone()));
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
        if let (Some(fec), Some(input)) = (mix_fec, p.audio_input) {
            if let Some(mix) = self.rooms.get_mut(&p.room).and_then(|r| r.mix.as_mut()) {
                let _ = mix.mixer.set_fec(input, fec);
            }
        }
        for (publisher, track) in want_keyframes {
            self.actions.push(Action::KeyframeWanted(publisher, track));
        }
        self.maybe_offer(key);
    }

    /// Sends a server offer if one is needed and allowed now.
    fn maybe_offer(&mut self, key: PeerKey) {
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
                for down in p.down.values_mut().flat_map(HashMap::values_mut) {
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

    // -- output of a connection ---------------------------------------------

    /// Drains one connection's events and messages into `self.actions`.
    fn drain(&mut self, key: PeerKey) {
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
                    p.state = state;
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
                    tracing::info!(participant = %p.participant, track = %init.track_id, ?kind, mime = %codec.mime_type, "track published");
                    let media_kind = media_kind(kind);
                    self.publishing.track(&p.participant, media_kind, true);
                    if let Some(w) = &self.webhooks {
                        let mid = receiver_mid(&mut p.pc, init.receiver_id);
                        w.emit(track_event(
                            "track_published",
                            p,
                            &self.rooms,
                            media_kind,
                            mid,
                        ));
                    }
                    p.published.insert(
                        init.track_id.clone(),
                        Published {
                            receiver_id: init.receiver_id,
                            ssrc: init.ssrc,
                            kind,
                            codec,
                            keyframes: KeyframeRequester::new(Duration::from_millis(500)),
                            strip_extensions,
                            opus_pt,
                            audio_level_ext,
                        },
                    );
                    self.actions.push(Action::TrackOpened(key, init.track_id));
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
                                &self.rooms,
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
                    let wants_keyframe = packets.iter().any(|pkt| {
                        let any = pkt.as_any();
                        any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
                    });
                    if wants_keyframe {
                        if let Some((publisher, source)) = p.down_by_local.get(&track) {
                            self.metrics.keyframe_requests_in.inc();
                            self.actions
                                .push(Action::KeyframeWanted(*publisher, source.clone()));
                        } else if p.speaker_out.as_ref().is_some_and(|o| o.local_id == track) {
                            self.metrics.keyframe_requests_in.inc();
                            self.actions.push(Action::SpeakerKeyframeWanted(key));
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

    fn apply_actions(&mut self) {
        while !self.actions.is_empty() {
            let actions = std::mem::take(&mut self.actions);
            for action in actions {
                match action {
                    Action::Forward {
                        from,
                        track,
                        packet,
                        arrived,
                    } => self.forward(from, &track, packet, arrived),
                    Action::TrackOpened(publisher, track) => self.subscribe_all(publisher, &track),
                    Action::TrackClosed(publisher, track) => {
                        self.unsubscribe_all(publisher, &track)
                    }
                    Action::KeyframeWanted(publisher, track) => {
                        self.request_keyframe(publisher, &track)
                    }
                    Action::SpeakerKeyframeWanted(sub) => self.speaker_keyframe_wanted(sub),
                    Action::Chat(from, text) => self.relay_chat(from, &text),
                    Action::Failed(key) => self.remove_peer(key),
                }
            }
        }
        // One offer per connection for everything that changed in this round,
        // not one per track.
        let due = std::mem::take(&mut self.offers_due);
        for key in due {
            self.maybe_offer(key);
        }
    }

    // -- forwarding ----------------------------------------------------------

    fn forward(
        &mut self,
        from: PeerKey,
        track: &MediaStreamTrackId,
        mut packet: rtc::rtp::Packet,
        arrived: Instant,
    ) {
        let Some(publisher) = self.peers.get_mut(&from) else {
            return;
        };
        let Some(published) = publisher.published.get_mut(track) else {
            self.metrics.media_dropped("unknown-track");
            return;
        };
        if publisher.muted[media_kind(published.kind) as usize] {
            self.metrics.media_dropped("muted");
            return;
        }
        let level = published
            .audio_level_ext
            .and_then(|id| packet.header.get_extension(id))
            .and_then(|data| AudioLevel::from_extension(&data).ok());
        for id in &published.strip_extensions {
            let _ = packet.header.del_extension(*id);
        }
        let keyframe = published.kind == RtpCodecKind::Video
            && crate::media::codec::is_keyframe(&published.codec.mime_type, &packet.payload);
        if keyframe {
            published.keyframes.keyframe_received(arrived);
        }
        let Some(media_room) = self.rooms.get_mut(&publisher.room) else {
            return;
        };
        if !media_room.sfu {
            self.metrics.media_dropped("standby");
            return;
        }
        let mix_for_all = media_room.mix_for_all;
        if published.kind == RtpCodecKind::Audio {
            if let (Some(mix), Some(input)) = (media_room.mix.as_mut(), publisher.audio_input) {
                // A mix room: the audio goes to the mixer, not to anyone.
                // A forward room with classic members: to the mixer too.
                match mixable(published.opus_pt, packet.header.payload_type) {
                    Err(why) => self.metrics.mixer.dropped(why, 1),
                    Ok(()) => {
                        let pushed = mix.mixer.push(
                            input,
                            packet.header.sequence_number,
                            packet.header.timestamp,
                            &packet.payload,
                            level,
                            arrived,
                        );
                        if let Ok(Push::Invalid) = pushed {
                            self.metrics.mixer.dropped(MixDrop::Invalid, 1);
                        }
                    }
                }
                if mix_for_all {
                    return;
                }
            }
            if let (Some(tracker), Some(input), Some(level)) =
                (media_room.speakers.as_mut(), publisher.audio_input, level)
            {
                tracker.level(input, level);
            }
        }
        // The subscribers, copied into a buffer reused from packet to packet
        // (no allocation once it has grown to the largest room).
        let mut members = std::mem::take(&mut self.scratch);
        members.clear();
        members.extend_from_slice(&media_room.members);
        let now = Instant::now();
        let speaker_video =
            published.kind == RtpCodecKind::Video && classic::is_speaker_source(publisher, track);
        for &sub in &members {
            if sub == from {
                continue;
            }
            let Some(s) = self.peers.get_mut(&sub) else {
                continue;
            };
            if s.classic {
                if let (true, Some(out)) = (speaker_video, s.speaker_out.as_mut()) {
                    match out.forward(&mut s.pc, from, &packet, keyframe, now) {
                        Ok(true) => self.metrics.media_forwarded.inc(),
                        Ok(false) => {}
                        Err(reason) => self.metrics.media_dropped(reason),
                    }
                }
                continue;
            }
            let Some(down) = s.down.get_mut(&from).and_then(|t| t.get_mut(track)) else {
                continue;
            };
            let Some(pt) = down.pt else {
                self.metrics.media_dropped("not-negotiated");
                continue;
            };
            if down.awaiting_keyframe {
                if !keyframe {
                    self.metrics.media_dropped("before-keyframe");
                    continue;
                }
                down.awaiting_keyframe = false;
            }
            let (seq, ts) = match down.rewriter.rewrite(
                packet.header.ssrc,
                packet.header.sequence_number,
                packet.header.timestamp,
                now,
            ) {
                Rewrite::Forward { seq, ts } => (seq, ts),
                Rewrite::Drop(reason) => {
                    self.metrics.media_dropped(reason.as_str());
                    continue;
                }
            };
            let mut out = packet.clone();
            out.header.ssrc = down.ssrc;
            out.header.payload_type = pt;
            out.header.sequence_number = seq;
            out.header.timestamp = ts;
            let sender_id = down.sender_id;
            if let Some(mut sender) = s.pc.rtp_sender(sender_id) {
                match sender.write_rtp(now, out) {
                    Ok(()) => self.metrics.media_forwarded.inc(),
                    Err(_) => self.metrics.media_dropped("write-failed"),
                }
            }
        }
        self.scratch = members;
        // Timed once the copies are on the wire (after encryption and
        // sendto, in `flush`), from the earliest packet of this turn.
        self.forwarded_since.get_or_insert(arrived);
    }

    /// Adds `publisher`'s `track` to every other member of its room.
    fn subscribe_all(&mut self, publisher: PeerKey, track: &MediaStreamTrackId) {
        let Some(p) = self.peers.get(&publisher) else {
            return;
        };
        let Some(media_room) = self.rooms.get(&p.room) else {
            return;
        };
        if !media_room.sfu {
            return; // warm standby: subscriptions start when the room goes sfu
        }
        let members = media_room.members.clone();
        for sub in members {
            if sub != publisher {
                self.subscribe(sub, publisher, track);
            }
        }
    }

    fn subscribe(&mut self, sub: PeerKey, publisher: PeerKey, track: &MediaStreamTrackId) {
        let Some(p) = self.peers.get(&publisher) else {
            return;
        };
        let Some(published) = p.published.get(track) else {
            return;
        };
        let mixed = self
            .rooms
            .get(&p.room)
            .is_some_and(MediaRoom::mixes_for_all);
        if published.kind == RtpCodecKind::Audio && mixed {
            return; // the mix carries it
        }
        if self.peers.get(&sub).is_some_and(|s| s.classic) {
            return; // the mix and the speaker's video carry it
        }
        let stream_id = p.participant.to_string();
        let codec = published.codec.clone();
        let kind = published.kind;
        let Some(s) = self.peers.get_mut(&sub) else {
            return;
        };
        if !s.grants.subscribe {
            return;
        }
        if s.down
            .get(&publisher)
            .is_some_and(|t| t.contains_key(track))
        {
            return;
        }
        match add_send_track(&mut s.pc, &mut s.spare, stream_id, kind, codec.clone()) {
            Ok(added) => {
                s.down.entry(publisher).or_default().insert(
                    track.clone(),
                    Down {
                        transceiver: added.transceiver,
                        sender_id: added.sender_id,
                        ssrc: added.ssrc,
                        kind,
                        mime: codec.mime_type.clone(),
                        pt: None,
                        offered: false,
                        awaiting_keyframe: kind == RtpCodecKind::Video
                            && crate::media::codec::Codec::from_mime(&codec.mime_type)
                                .detects_keyframes(),
                        rewriter: added
                            .rewriter
                            .unwrap_or_else(|| SeqRewriter::new(codec.clock_rate)),
                    },
                );
                s.down_by_local
                    .insert(added.local_id, (publisher, track.clone()));
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
    fn subscribe_to_room(&mut self, sub: PeerKey) {
        let Some(p) = self.peers.get(&sub) else {
            return;
        };
        let Some(media_room) = self.rooms.get(&p.room) else {
            return;
        };
        if !media_room.sfu {
            return;
        }
        let mixed = media_room.mixes_for_all();
        let sources: Vec<(PeerKey, MediaStreamTrackId)> = media_room
            .members
            .iter()
            .filter(|&&k| k != sub)
            .filter_map(|k| self.peers.get(k).map(|o| (k, o)))
            .flat_map(|(k, o)| o.published.keys().map(move |t| (*k, t.clone())))
            .collect();
        for (publisher, track) in sources {
            self.subscribe(sub, publisher, &track);
        }
        if mixed {
            self.add_mix_track(sub);
        }
    }

    /// Gives `key` its one mixed audio track (stream id `mix`), if its room
    /// mixes, is in `sfu` mode, and it has none yet.
    fn add_mix_track(&mut self, key: PeerKey) {
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        let mixing = self
            .rooms
            .get(&p.room)
            .is_some_and(|r| r.sfu && r.mixes_for_all());
        if !mixing
            || p.classic
            || p.mix_out.is_some()
            || p.audio_input.is_none()
            || !p.answered_first
            || !p.grants.subscribe
        {
            return;
        }
        let codec = RTCRtpCodec {
            mime_type: MIME_TYPE_OPUS.to_owned(),
            clock_rate: 48_000,
            channels: 2,
            sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
            rtcp_feedback: Vec::new(),
        };
        match add_send_track(
            &mut p.pc,
            &mut p.spare,
            MIX_STREAM.to_owned(),
            RtpCodecKind::Audio,
            codec,
        ) {
            Ok(added) => {
                p.mix_out = Some(MixOut {
                    transceiver: added.transceiver,
                    sender_id: added.sender_id,
                    ssrc: added.ssrc,
                    pt: None,
                    offered: false,
                    seq: rand::random::<u16>(),
                    ts: rand::random::<u32>(),
                });
                p.needs_offer = true;
                self.offers_due.push(key);
            }
            Err(e) => {
                // In practice: the client negotiated audio without Opus (a
                // PCMU-only peer), and the mix is Opus. Say so rather than
                // leave it wondering why it hears nobody.
                tracing::info!(participant = %p.participant, error = %e, "cannot add the mixed audio track");
                let participant = p.participant.clone();
                self.send_error(
                    &participant,
                    ErrorCode::BadRequest,
                    "this room mixes audio as Opus, and your connection negotiated audio without \
                     Opus: you cannot hear the room (and your audio is not mixed)",
                );
            }
        }
    }

    /// One 20 ms mixer frame for every mixing room: decode, mix, encode,
    /// and hand each listener its packet; `speakers` when they change.
    fn audio_tick(&mut self) {
        let Some(due) = self.audio_due else {
            return;
        };
        let started = Instant::now();
        let late = started.saturating_duration_since(due);
        self.metrics.mixer.tick_lateness.observe(late.as_secs_f64());
        // The schedule stays on the 20 ms grid; a tick more than a frame
        // late skips the frames it missed rather than bunching them.
        let missed = (late.as_nanos() / MIX_FRAME.as_nanos()) as u32;
        if missed > 0 {
            self.metrics.mixer.overruns.inc_by(u64::from(missed));
        }
        let mut any = false;
        let mut speaker_events = Vec::new();
        for (name, room) in &mut self.rooms {
            any = true;
            if !room.sfu {
                continue;
            }
            if let Some(tracker) = room.speakers.as_mut() {
                if let Some(list) = tracker.tick(started) {
                    room.speaking.clear();
                    room.speaking.extend(list.iter().map(|s| s.id));
                    speaker_events.push((name.clone(), room.members.clone(), list.to_vec()));
                }
            }
            let Some(mix) = room.mix.as_mut() else {
                continue;
            };
            let out = mix.mixer.tick(started);
            let shared = out.shared().map(Bytes::copy_from_slice);
            for &member in &room.members {
                let Some(p) = self.peers.get_mut(&member) else {
                    continue;
                };
                let (Some(input), Some(mo)) = (p.audio_input, p.mix_out.as_mut()) else {
                    continue;
                };
                let ts = mo.ts;
                mo.ts = mo.ts.wrapping_add(FRAME_SAMPLES as u32 * (missed + 1));
                let Some(pt) = mo.pt else {
                    continue;
                };
                let payload = match out.own().find(|(id, _)| *id == input) {
                    Some((_, own)) => Bytes::copy_from_slice(own),
                    None => match &shared {
                        Some(shared) => shared.clone(),
                        None => continue,
                    },
                };
                let packet = rtc::rtp::Packet {
                    header: rtc::rtp::header::Header {
                        version: 2,
                        payload_type: pt,
                        sequence_number: mo.seq,
                        timestamp: ts,
                        ssrc: mo.ssrc,
                        ..Default::default()
                    },
                    payload,
                };
                mo.seq = mo.seq.wrapping_add(1);
                if let Some(mut sender) = p.pc.rtp_sender(mo.sender_id) {
                    if sender.write_rtp(started, packet).is_err() {
                        self.metrics.media_dropped("write-failed");
                    }
                }
            }
            let active = out.speakers().len();
            self.metrics
                .mixer
                .active_speakers
                .add(active as i64 - mix.speakers as i64);
            mix.speakers = active;
            // In a forward room the speaker tracker reports speakers.
            if out.speakers_changed() && room.mix_for_all {
                room.speaking.clear();
                room.speaking.extend(out.speakers().iter().map(|s| s.id));
                speaker_events.push((name.clone(), room.members.clone(), out.speakers().to_vec()));
            }
            let stats = *mix.mixer.stats();
            export_mixer_stats(&self.metrics, &mix.exported, &stats);
            mix.exported = stats;
        }
        self.follow_speakers(started);
        for (room, members, list) in speaker_events {
            // Input ids → participant ids (inputs are members of this room).
            let speakers = list
                .iter()
                .filter_map(|s| {
                    let p = members
                        .iter()
                        .filter_map(|k| self.peers.get(k))
                        .find(|p| p.audio_input == Some(s.id))?;
                    Some(Speaker {
                        id: p.participant.clone(),
                        level: s.level,
                    })
                })
                .collect();
            let msg = ServerMessage::Speakers(Speakers { room, speakers });
            for key in members {
                if let Some(p) = self.peers.get(&key) {
                    self.outboxes.send(&p.participant, &msg, &self.metrics);
                }
            }
        }
        self.audio_due = any.then_some(due + MIX_FRAME * (missed + 1));
        self.metrics
            .mixer
            .tick
            .observe(started.elapsed().as_secs_f64());
    }

    /// Removes `publisher`'s `track` from everyone who receives it.
    fn unsubscribe_all(&mut self, publisher: PeerKey, track: &MediaStreamTrackId) {
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        for sub in keys {
            let Some(s) = self.peers.get_mut(&sub) else {
                continue;
            };
            let removed = s.down.get_mut(&publisher).and_then(|t| t.remove(track));
            if s.down.get(&publisher).is_some_and(HashMap::is_empty) {
                s.down.remove(&publisher);
            }
            if let Some(down) = removed {
                s.down_by_local
                    .retain(|_, (p, t)| !(*p == publisher && t == track));
                // The m-section goes inactive in the next offer and is kept
                // for a later track of the same kind and codec, so a
                // subscriber's SDP does not grow with every join and leave.
                if let Some(mut t) = s.pc.rtp_transceiver(down.transceiver) {
                    t.set_direction(RTCRtpTransceiverDirection::Inactive);
                }
                s.spare.push(Spare {
                    kind: down.kind,
                    mime: down.mime,
                    transceiver: down.transceiver,
                    sender_id: down.sender_id,
                    ssrc: down.ssrc,
                    rewriter: down.rewriter,
                    offered: false,
                    ready: false,
                });
                s.needs_offer = true;
                self.offers_due.push(sub);
            }
        }
    }

    /// Subscribes everyone in `room` to everyone else's tracks.
    fn room_to_sfu(&mut self, room: &RoomName) {
        let Some(media_room) = self.rooms.get_mut(room) else {
            return;
        };
        if media_room.sfu {
            return;
        }
        media_room.sfu = true;
        let members = media_room.members.clone();
        for &publisher in &members {
            let tracks: Vec<MediaStreamTrackId> = self
                .peers
                .get(&publisher)
                .map(|p| p.published.keys().cloned().collect())
                .unwrap_or_default();
            for track in tracks {
                for &sub in &members {
                    if sub != publisher {
                        self.subscribe(sub, publisher, &track);
                    }
                }
            }
        }
        for &key in &members {
            self.add_mix_track(key);
        }
    }

    fn request_keyframe(&mut self, publisher: PeerKey, track: &MediaStreamTrackId) {
        let now = Instant::now();
        let Some(p) = self.peers.get_mut(&publisher) else {
            return;
        };
        let Some(published) = p.published.get_mut(track) else {
            return;
        };
        if published.kind != RtpCodecKind::Video {
            return;
        }
        if published.keyframes.request(now) {
            send_pli(&mut p.pc, published.receiver_id, published.ssrc, now);
            self.metrics.plis_sent.inc();
        }
    }

    /// Sends the PLIs that throttling deferred.
    fn poll_keyframes(&mut self, now: Instant) {
        for p in self.peers.values_mut() {
            for published in p.published.values_mut() {
                if published.keyframes.poll(now) {
                    send_pli(&mut p.pc, published.receiver_id, published.ssrc, now);
                    self.metrics.plis_sent.inc();
                }
            }
        }
    }

    /// Removes connections that have been silent for [`PEER_SILENCE`].
    fn sweep_silent(&mut self, now: Instant) {
        let silent: Vec<PeerKey> = self
            .peers
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.last_rx) >= PEER_SILENCE)
            .map(|(k, _)| *k)
            .collect();
        for key in silent {
            if let Some(p) = self.peers.get(&key) {
                tracing::info!(participant = %p.participant, room = %p.room, "server connection silent; removing it");
            }
            self.metrics.media_timeouts.inc();
            self.remove_peer(key);
        }
    }

    fn relay_chat(&mut self, from: PeerKey, text: &str) {
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
        let Some(media_room) = self.rooms.get(&p.room) else {
            return;
        };
        let body = json!({"from": p.participant.as_str(), "data": text}).to_string();
        let members = media_room.members.clone();
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

    fn remove_peer(&mut self, key: PeerKey) {
        let Some(mut p) = self.peers.remove(&key) else {
            return;
        };
        tracing::info!(participant = %p.participant, room = %p.room, "server connection removed");
        self.publishing.forget(&p.participant);
        self.demux.unregister(key);
        self.by_participant.remove(&p.participant);
        let _ = p.pc.close();
        self.metrics.media_connections.dec();
        self.metrics
            .move_connection_state(Some(state_label(p.state)), None);
        if let Some(room) = self.rooms.get_mut(&p.room) {
            room.members.retain(|k| *k != key);
            if let (Some(mix), Some(input)) = (room.mix.as_mut(), p.audio_input) {
                let _ = mix.mixer.remove_input(input);
            }
            if let (Some(tracker), Some(input)) = (room.speakers.as_mut(), p.audio_input) {
                tracker.remove(input);
            }
            if room.members.is_empty() {
                if let Some(mix) = self.rooms.remove(&p.room).and_then(|r| r.mix) {
                    self.metrics.mixer.rooms.dec();
                    self.metrics.mixer.active_speakers.sub(mix.speakers as i64);
                }
            }
        }
        let tracks: Vec<MediaStreamTrackId> = p.published.keys().cloned().collect();
        for track in tracks {
            self.unsubscribe_all(key, &track);
        }
        let _ = p.ufrag;
    }

    // -- signaling back to clients -------------------------------------------

    fn send_signal(&self, participant: &ParticipantId, room: &RoomName, data: serde_json::Value) {
        let msg = ServerMessage::Message(Relayed {
            room: room.clone(),
            from: switchboard_proto::SFU_PEER.to_owned(),
            data,
        });
        self.outboxes.send(participant, &msg, &self.metrics);
    }

    fn send_error(&self, participant: &ParticipantId, code: ErrorCode, message: &str) {
        let msg = ServerMessage::error(code, message, Some("message"));
        self.outboxes.send(participant, &msg, &self.metrics);
    }

    /// Writes every connection's pending datagrams to the socket.
    fn flush(&mut self, socket: &UdpSocket) {
        let now = Instant::now();
        for p in self.peers.values_mut() {
            while let Some(out) = p.pc.poll_write() {
                if out.transport.transport_protocol == TransportProtocol::TCP {
                    let sent = self
                        .tcp_writers
                        .get(&out.transport.peer_addr)
                        .is_some_and(|w| w.try_send(frame_packet(&out.message)).is_ok());
                    if sent {
                        self.metrics.media_out(out.message.len());
                    } else {
                        self.metrics.media_dropped("tcp-send-failed");
                    }
                    continue;
                }
                let to = p.paths.destination(out.transport.peer_addr, now);
                match socket.try_send_to(&out.message, to) {
                    Ok(n) => self.metrics.media_out(n),
                    Err(_) => self.metrics.media_dropped("send-failed"),
                }
            }
        }
    }
}

/// Whether a packet of payload type `pt` on a track whose Opus payload type
/// is `opus_pt` can go to the mixer: only Opus can (a publisher that
/// negotiated PCMU or G.722 only, or switches codec mid-call, is not mixed).
fn mixable(opus_pt: Option<u8>, pt: u8) -> Result<(), MixDrop> {
    match opus_pt {
        Some(opus) if opus == pt => Ok(()),
        _ => Err(MixDrop::NotOpus),
    }
}

/// A track the server sends, on a transceiver of its own.
struct SendTrack {
    transceiver: usize,
    sender_id: RTCRtpSenderId,
    ssrc: u32,
    local_id: MediaStreamTrackId,
    /// The rewriter of a reused m-section's stream.
    rewriter: Option<SeqRewriter>,
}

/// Adds a sendonly transceiver for one server-sent track in stream
/// `stream_id`: one server-added m-section per track, never one of the
/// client's own m-sections. Video gets an RTX stream for retransmissions
/// where the client negotiates one (RFC 4588); audio is not retransmitted.
fn add_send_track(
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
            rewriter: Some(old.rewriter),
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
        rewriter: None,
    })
}

/// A server-sent track in stream `stream_id` on `ssrc` (and an RTX SSRC),
/// with a fresh track id.
fn local_track(
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

/// The payload type of `mime` among `codecs`.
fn pt_of(codecs: &[RTCRtpCodecParameters], mime: &str) -> Option<u8> {
    codecs
        .iter()
        .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(mime))
        .map(|c| c.payload_type)
}

/// The payload type of `mime` that a sender's negotiation settled on.
fn negotiated_pt(pc: &mut RTCPeerConnection, sender: RTCRtpSenderId, mime: &str) -> Option<u8> {
    let mut sender = pc.rtp_sender(sender)?;
    pt_of(&sender.get_parameters().rtp_parameters.codecs, mime)
}

/// Adds what the mixer counted since `before` to the metrics.
fn export_mixer_stats(metrics: &Metrics, before: &MixerStats, now: &MixerStats) {
    let m = &metrics.mixer;
    m.decodes.inc_by(now.decodes.saturating_sub(before.decodes));
    m.encodes.inc_by(now.encodes.saturating_sub(before.encodes));
    m.late_frames.inc_by(now.late.saturating_sub(before.late));
    m.lost_frames.inc_by(now.lost.saturating_sub(before.lost));
    m.concealed_frames
        .inc_by(now.concealed.saturating_sub(before.concealed));
    m.dropped(
        MixDrop::Corrupt,
        now.decode_errors.saturating_sub(before.decode_errors),
    );
}

/// Whether the answer's m-section `mid` enables Opus in-band FEC
/// (`useinbandfec=1` in the fmtp of payload type `pt`): the listener's
/// decoder then uses it, so the mix carries it.
fn opus_fec_in_answer(sdp: &str, mid: &str, pt: u8) -> bool {
    let fmtp = format!("a=fmtp:{pt} ");
    let mut in_section = false;
    let mut section_lines: Vec<&str> = Vec::new();
    let mut found = false;
    for line in sdp.lines().chain(["m=end"]) {
        if line.starts_with("m=") {
            if in_section {
                found = section_lines.iter().any(|l| {
                    l.strip_prefix(&fmtp).is_some_and(|params| {
                        params
                            .split(';')
                            .any(|kv| kv.trim().eq_ignore_ascii_case("useinbandfec=1"))
                    })
                });
                break;
            }
            section_lines.clear();
        } else {
            if line.strip_prefix("a=mid:") == Some(mid) {
                in_section = true;
            }
            section_lines.push(line);
        }
    }
    found
}

fn media_kind(kind: RtpCodecKind) -> MediaKind {
    if kind == RtpCodecKind::Audio {
        MediaKind::Audio
    } else {
        MediaKind::Video
    }
}

/// The mid of the m-section a receiver belongs to.
fn receiver_mid(pc: &mut RTCPeerConnection, receiver: RTCRtpReceiverId) -> String {
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
    rooms: &HashMap<RoomName, MediaRoom>,
    kind: MediaKind,
    mid: String,
) -> Event {
    let room = rooms.get(&p.room);
    Event {
        event,
        room: RoomRef {
            name: p.room.to_string(),
            mode: if room.is_some_and(|r| r.sfu) {
                switchboard_proto::MediaMode::Sfu
            } else {
                switchboard_proto::MediaMode::P2p
            },
            audio: if room.is_some_and(|r| r.mix.is_some()) {
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
fn state_label(state: RTCPeerConnectionState) -> &'static str {
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

/// The next ICE-TCP event, or never when ICE-TCP is off.
async fn next_tcp(tcp: &mut Option<mpsc::Receiver<TcpEvent>>) -> Option<TcpEvent> {
    match tcp {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn build_connection(
    ufrag: &str,
    pwd: &str,
    announce: SocketAddr,
    tcp_announce: Option<SocketAddr>,
    metrics: &Metrics,
) -> Result<(RTCPeerConnection, Vec<String>), rtc::shared::error::Error> {
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
    // Keyframe requests are picked out application-most (after everything
    // else has read them); NACKs are counted wire-most, where those the NACK
    // generator (7_000) writes pass too.
    let registry = Registry::new()
        .with(Slot::from(14_000), DeliverKeyframeRequests::default())
        .with(Slot::from(100), CountNacks::new(metrics));
    let registry = register_interceptors(registry, &mut media_engine)?;
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
    Ok((pc, candidates))
}

fn random_token(len: usize) -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), len)
}

/// A lost packet is NACKed at most this many times (one per 100 ms
/// generator cycle): after that the retransmission is too late to be
/// worth asking for again, and a packet that never comes back (its
/// publisher does not keep history) does not cost a NACK every cycle for
/// as long as it stays in the receive log.
const MAX_NACKS_PER_PACKET: u16 = 4;

/// rtc's default chain (NACK both ways, TWCC receiver, RTCP reports,
/// simulcast header extensions), with the NACK generator bounded.
fn register_interceptors(
    registry: Registry,
    media_engine: &mut MediaEngine,
) -> Result<Registry, rtc::shared::error::Error> {
    use rtc::peer_connection::configuration::interceptor_registry::{
        configure_rtcp_reports, configure_simulcast_extension_headers, configure_twcc_receiver_only,
    };
    use rtc::rtp_transceiver::rtp_sender::RTCPFeedback;
    for parameter in ["", "pli"] {
        media_engine.register_feedback(
            RTCPFeedback {
                typ: "nack".to_owned(),
                parameter: parameter.to_owned(),
            },
            RtpCodecKind::Video,
        );
    }
    let registry = registry
        .with(
            Slot::NackResponder,
            rtc::interceptor::NackResponderBuilder::new().build(),
        )
        .with(
            Slot::NackGenerator,
            rtc::interceptor::NackGeneratorBuilder::new()
                .with_max_nacks_per_packet(MAX_NACKS_PER_PACKET)
                .build(),
        );
    configure_simulcast_extension_headers(media_engine)?;
    let registry = configure_twcc_receiver_only(registry, media_engine)?;
    Ok(configure_rtcp_reports(registry))
}

/// Lets subscribers' keyframe requests (PLI, FIR) reach the application;
/// the rest of RTCP stays with the interceptors that act on it.
#[derive(Default)]
struct DeliverKeyframeRequests {
    read: std::collections::VecDeque<TaggedPacket>,
    write: std::collections::VecDeque<TaggedPacket>,
}

/// Counts the NACKed packets that cross the wire, in either direction.
struct CountNacks {
    read: std::collections::VecDeque<TaggedPacket>,
    write: std::collections::VecDeque<TaggedPacket>,
    nacks_in: prometheus::IntCounter,
    nacks_out: prometheus::IntCounter,
}

impl CountNacks {
    fn new(metrics: &Metrics) -> Self {
        CountNacks {
            read: Default::default(),
            write: Default::default(),
            nacks_in: metrics.nacks_received.clone(),
            nacks_out: metrics.nacks_sent.clone(),
        }
    }
}

/// Sequence numbers requested by the generic NACKs among `packets`.
fn nacked_packets(packets: &[Box<dyn rtc::rtcp::Packet>]) -> u64 {
    packets
        .iter()
        .filter_map(|p| p.as_any().downcast_ref::<TransportLayerNack>())
        .flat_map(|n| n.nacks.iter())
        .map(|pair| 1 + u64::from(pair.lost_packets.count_ones()))
        .sum()
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for DeliverKeyframeRequests {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            let wanted = packets.iter().any(|p| {
                let any = p.as_any();
                any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
            });
            if wanted {
                msg.message.add(Attribute::DeliverToApplication);
            }
        }
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write.pop_front()
    }

    fn handle_timeout(&mut self, _now: Instant) -> Result<(), Self::Error> {
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        None
    }
}

impl Interceptor for DeliverKeyframeRequests {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for CountNacks {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            self.nacks_in.inc_by(nacked_packets(packets));
        }
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            self.nacks_out.inc_by(nacked_packets(packets));
        }
        self.write.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write.pop_front()
    }

    fn handle_timeout(&mut self, _now: Instant) -> Result<(), Self::Error> {
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        None
    }
}

impl Interceptor for CountNacks {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

#[cfg(test)]
mod tests {
    use super::{accepts_nothing, mixable, opus_fec_in_answer};
    use crate::metrics::MixDrop;

    #[test]
    fn only_the_tracks_opus_payload_type_is_mixed() {
        assert_eq!(mixable(Some(111), 111), Ok(()));
        assert_eq!(
            mixable(Some(111), 0),
            Err(MixDrop::NotOpus),
            "PCMU on an Opus track"
        );
        assert_eq!(
            mixable(None, 0),
            Err(MixDrop::NotOpus),
            "a PCMU-only publisher"
        );
        assert_eq!(mixable(None, 111), Err(MixDrop::NotOpus));
    }

    #[test]
    fn fec_is_read_from_the_listeners_section_and_payload_type() {
        let sdp = "v=0\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:3\r\na=fmtp:111 minptime=10\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 109\r\na=mid:4\r\na=fmtp:109 minptime=10; useinbandfec=1\r\n";
        assert!(opus_fec_in_answer(sdp, "0", 111));
        assert!(
            !opus_fec_in_answer(sdp, "3", 111),
            "that section did not ask for FEC"
        );
        assert!(
            opus_fec_in_answer(sdp, "4", 109),
            "last section, spaces after ';'"
        );
        assert!(!opus_fec_in_answer(sdp, "4", 111), "another payload type");
        assert!(!opus_fec_in_answer(sdp, "9", 111), "no such section");
    }

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
