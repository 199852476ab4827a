//! The media transport: the driver of the [`crate::router`]. Every
//! server-side PeerConnection, on one UDP port (and ICE-TCP on the same port
//! number), driven by webrtc-rs's sans-IO `rtc` crate from our own event
//! loop. This is the only module that imports webrtc-rs or touches media
//! sockets.
//!
//! `--media-workers` threads (`sfu-media-N`, default one per CPU) share
//! the work. Each room lives on one worker ([`crate::sfu::Placement`]) and
//! every connection of the room with it, so nothing on the packet path
//! crosses workers. Worker 0 also reads the one UDP port (and ICE-TCP) for
//! all: it drains the socket in batches and routes each datagram by ICE
//! ufrag, then by remote address ([`crate::media::demux::Demux`]), to the
//! worker holding its connection (`reader`). Every worker sends on its own
//! handle of the same socket. Each participant has one [`Peer`]: its
//! connection, the tracks it publishes and the senders of the tracks
//! forwarded to it. What
//! is forwarded to whom, with which rewriting, and when a keyframe is asked
//! for, is the router's decision; this module turns connection events into
//! router calls and router decisions into `rtc` writes.
//!
//! # Files
//!
//! - `mod.rs`: [`start`], a worker's loop, datagram input and output.
//! - `reader`: worker 0's reading of the port and routing to workers.
//! - `peer`: connection building, negotiation (offers, answers,
//!   candidates).
//! - `senders`: the senders of forwarded tracks, added and removed as the
//!   router's subscriptions come and go.
//! - `events`: a connection's events and messages; the router's decisions
//!   carried out; chat relay.
//! - `mix`: the audio mixer's tick and mixed tracks.
//! - `classic`: the two tracks of a classic Socket.IO client.
//! - `interceptors`: the RTCP interceptor chain.
//! - `tcp`: ICE-TCP.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rtc::media_stream::MediaStreamTrackId;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::RTCPeerConnection;
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RtpCodecKind};
use rtc::rtp_transceiver::{RTCRtpReceiverId, RTCRtpSenderId};
use rtc::sansio::Protocol;
use rtc::shared::tcp_framing::frame_packet;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use switchboard_proto::{ErrorCode, ParticipantId, Relayed, RoomName, ServerMessage};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::auth::Grants;
use crate::hub::Outboxes;
use crate::media::history::{History, SentLog};
use crate::metrics::Metrics;
use crate::perip::PerIp;
use crate::ratelimit::RateLimiter;
use crate::router::{Decision, OutSlot, PeerKey, Router, TrackName};
use crate::sfu::{Command, MediaConfig, MediaPlane, Publishing, Signal, COMMAND_QUEUE};
use crate::webhook::Webhooks;

mod batch;
mod bwe;
mod classic;
mod events;
mod interceptors;
mod layers;
mod mix;
mod peer;
mod reader;
mod resend;
mod senders;
mod tcp;

use tcp::{accept_tcp, next_tcp, TcpEvent, TCP_EVENT_QUEUE};

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

/// Starts the media workers; returns the hub's handle on them.
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
    let workers = config.workers.max(1);
    // Registrations of connections' ICE credentials, from every worker to
    // the reader. Unbounded, but each message is one connection made or
    // removed, which the bounded command queues and room limits pace.
    let (control_tx, control_rx) = std::sync::mpsc::channel();
    let mut commands = Vec::with_capacity(workers);
    let mut command_rxs = Vec::with_capacity(workers);
    let mut inbound_txs = vec![None];
    let mut inbound_rxs = vec![None];
    for w in 0..workers {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        commands.push(tx);
        command_rxs.push(rx);
        if w > 0 {
            let (tx, rx) = mpsc::channel(reader::INBOUND_QUEUE);
            inbound_txs.push(Some(tx));
            inbound_rxs.push(Some(rx));
        }
    }
    let mut reading = Some((socket.try_clone()?, tcp, control_rx, inbound_txs));
    for (w, (commands, inbound)) in command_rxs.into_iter().zip(inbound_rxs).enumerate() {
        let out = socket.try_clone()?;
        let reading = reading.take();
        let ctx = WorkerContext {
            worker: w,
            announce,
            tcp_announce,
            config: config.clone(),
            outboxes: outboxes.clone(),
            metrics: metrics.clone(),
            publishing: publishing.clone(),
            webhooks: webhooks.clone(),
            control: control_tx.clone(),
            out,
        };
        let name = format!("sfu-media-{w}");
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                crate::sfu::exit_on_panic(
                    &name,
                    |code| std::process::exit(code),
                    move || run_worker(ctx, reading, commands, inbound),
                )
            })?;
    }
    tracing::info!(%local, %announce, ice_tcp = tcp_announce.is_some(), workers, "media listening");
    Ok(MediaPlane::new(
        commands,
        Arc::new(std::sync::Mutex::new(crate::sfu::Placement::new(workers))),
        local,
    ))
}

/// What a worker thread starts with.
struct WorkerContext {
    worker: usize,
    announce: SocketAddr,
    tcp_announce: Option<SocketAddr>,
    config: MediaConfig,
    outboxes: Arc<Outboxes>,
    metrics: Arc<Metrics>,
    publishing: Arc<Publishing>,
    webhooks: Arc<Webhooks>,
    control: std::sync::mpsc::Sender<reader::DemuxControl>,
    /// The media socket, for sending.
    out: std::net::UdpSocket,
}

/// Worker 0's reading side before it starts: the socket, the ICE-TCP
/// listener, the registrations and the other workers' queues.
type Reading = (
    std::net::UdpSocket,
    Option<std::net::TcpListener>,
    std::sync::mpsc::Receiver<reader::DemuxControl>,
    Vec<Option<mpsc::Sender<reader::ToWorker>>>,
);

/// One worker thread's body: its runtime and engine.
fn run_worker(
    ctx: WorkerContext,
    reading: Option<Reading>,
    commands: mpsc::Receiver<Command>,
    inbound: Option<mpsc::Receiver<reader::ToWorker>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            // A worker that never runs is as bad as one that died: its
            // rooms would have no media behind a green /healthz.
            tracing::error!(worker = ctx.worker, error = %e, "media runtime failed to start; exiting");
            std::process::exit(crate::sfu::PANIC_EXIT_CODE);
        }
    };
    runtime.block_on(async move {
        let mut tcp_events = None;
        let mut reader = None;
        if let Some((socket, tcp, control, others)) = reading {
            tcp_events = match tcp.map(tokio::net::TcpListener::from_std) {
                Some(Ok(listener)) => {
                    let (ev_tx, ev_rx) = mpsc::channel(TCP_EVENT_QUEUE);
                    let per_ip = PerIp::new(ctx.config.max_tcp_per_ip, "ice-tcp");
                    tokio::spawn(accept_tcp(listener, ev_tx, per_ip, ctx.metrics.clone()));
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
                    reader = Some(reader::Reader::new(
                        socket,
                        control,
                        others,
                        ctx.metrics.clone(),
                    ))
                }
                Err(e) => {
                    tracing::error!(error = %e, "media socket failed; exiting");
                    std::process::exit(crate::sfu::PANIC_EXIT_CODE);
                }
            }
        }
        Engine::new(ctx)
            .run(reader, inbound, commands, tcp_events)
            .await
    });
}

/// A track a participant publishes (what the connection needs of it; the
/// router knows the rest).
struct Published {
    receiver_id: RTCRtpReceiverId,
    ssrc: u32,
    kind: RtpCodecKind,
    codec: RTCRtpCodec,
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
    /// Sent as simulcast (its packets carry rids).
    simulcast: bool,
}

/// The sender of a track forwarded to a participant (its slot in the
/// router is its transceiver).
struct Down {
    sender_id: RTCRtpSenderId,
    ssrc: u32,
    kind: RtpCodecKind,
    mime: String,
    local_id: MediaStreamTrackId,
    /// Whether the subscriber's answer settled its payload type.
    negotiated: bool,
    /// Whether a server offer carrying this track has gone out; only the
    /// answer to such an offer negotiates it.
    offered: bool,
}

/// One participant's server connection.
struct Peer {
    participant: ParticipantId,
    room: RoomName,
    pc: RTCPeerConnection,
    answered_first: bool,
    offer_in_flight: bool,
    needs_offer: bool,
    published: HashMap<MediaStreamTrackId, Published>,
    /// The forwarded tracks' senders, by slot.
    down: HashMap<OutSlot, Down>,
    /// Our local track id of a sent track (forwarded or the classic
    /// speaker video) → its slot.
    by_local: HashMap<MediaStreamTrackId, OutSlot>,
    chat: Option<usize>,
    state: RTCPeerConnectionState,
    /// When the last datagram from this connection arrived (or its creation).
    last_rx: Instant,
    /// The UDP addresses it was heard from: a client whose address changed
    /// is followed (see `media::follow`).
    paths: crate::media::follow::PathFollower,
    /// The server's candidate lines, trickled after the first answer.
    candidates: Vec<String>,
    /// The mixed audio sent to it, in a mix room.
    mix_out: Option<mix::MixOut>,
    /// What its token allows.
    grants: Grants,
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
    speaker_out: Option<classic::SpeakerSlot>,
    /// Its downlink bandwidth estimate (from its TWCC feedback).
    estimate: bwe::Estimate,
    /// When the connection was made (a subscriber whose feedback has not
    /// come yet gets the initial estimate for a while).
    created: Instant,
    /// What `publisher-layers` last told it, by its track: the active rids.
    layers_sent: HashMap<MediaStreamTrackId, Vec<Box<str>>>,
    /// Sends NACKed packets and probe padding again (as RTX).
    resender: interceptors::Resender,
    /// Padding for bandwidth probes: the policy, and the last video packet
    /// sent to it (SSRC, sequence number), which the padding repeats.
    prober: crate::router::probe::Prober,
    last_video: Option<(u32, u16)>,
    /// What each of its outgoing video streams sent, by SSRC: enough to
    /// find a NACKed packet in its publisher's history.
    sent: Vec<(u32, SentLog<Sent>)>,
    /// The recent packets of each video stream it publishes, by SSRC (one
    /// per simulcast encoding), for all their subscribers' NACKs.
    histories: Vec<(u32, History<rtc::rtp::Packet>)>,
    /// Its connection's next timer as last read (in the engine's heap).
    timeout: Option<Instant>,
}

/// One packet an outgoing video stream sent: which published packet it
/// was, and the header (and VP8 descriptor) it was sent with.
#[derive(Debug, Clone, Copy)]
struct Sent {
    publisher: PeerKey,
    /// The publisher's SSRC and sequence number.
    ssrc: u32,
    seq: u16,
    pt: u8,
    ts: u32,
    patch: Option<crate::router::DescriptorPatch>,
}

/// A server-sent m-section whose track went away: inactive in the next
/// server offer, reusable for a track of the same kind and codec once that
/// offer's exchange has completed (protocol: "the server may reuse an
/// m-section that has been inactive for at least one completed exchange").
/// The router keeps its stream's rewriter, so a later track on this SSRC
/// continues its sequence numbers and timestamps.
struct Spare {
    kind: RtpCodecKind,
    mime: String,
    transceiver: usize,
    sender_id: RTCRtpSenderId,
    ssrc: u32,
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
    TrackOpened(PeerKey, TrackName),
    TrackClosed(PeerKey, MediaStreamTrackId),
    KeyframeWanted(PeerKey, TrackName),
    /// A subscriber asked for a keyframe (PLI/FIR) on one of its slots.
    SubscriberPli(PeerKey, OutSlot),
    /// A subscriber NACKed these sequence numbers of its stream `ssrc`.
    Nack {
        sub: PeerKey,
        ssrc: u32,
        seqs: Vec<u16>,
    },
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
    /// Rooms, tracks, subscriptions: the forwarding decisions.
    router: Router,
    /// The mixers of the rooms that mix.
    mixes: HashMap<RoomName, Box<mix::RoomMix>>,
    /// This worker's index.
    worker: usize,
    /// The reader's routing table: connections made and removed here.
    demux: std::sync::mpsc::Sender<reader::DemuxControl>,
    /// This worker's handle of the media socket, for sending.
    out: std::net::UdpSocket,
    /// Datagrams of one flush, sent with `sendmmsg`.
    send: batch::SendBatch,
    /// Connections the packet path touched since the last flush: only
    /// their output and timers are looked at then.
    touched: Vec<PeerKey>,
    /// Something other than the packet path ran (a command, a timer, the
    /// mixer, an allocation round): every connection is looked at.
    scan_all: bool,
    /// Each connection's next timer, earliest first. An entry whose
    /// connection's timer has moved since is stale and skipped.
    timers: BinaryHeap<Reverse<(Instant, PeerKey)>>,
    /// When silent connections are looked for next.
    sweep_due: Instant,
    /// Datagrams this worker handles, by worker (`worker` label).
    worker_datagrams: prometheus::IntCounter,
    /// Rooms this worker holds.
    worker_rooms: prometheus::IntGauge,
    outboxes: Arc<Outboxes>,
    metrics: Arc<Metrics>,
    /// What each participant publishes, for the admin API.
    publishing: Arc<Publishing>,
    /// `track_published`/`track_unpublished` events.
    webhooks: Option<Arc<Webhooks>>,
    next_key: u64,
    actions: Vec<Action>,
    /// The router's decisions, a buffer reused from packet to packet.
    decisions: Vec<Decision>,
    /// Connections whose forwarded tracks changed since the last offer round.
    offers_due: Vec<PeerKey>,
    /// Arrival of the first packet forwarded since the last flush.
    forwarded_since: Option<Instant>,
    /// When the mixer runs next; `None` while no room mixes.
    audio_due: Option<Instant>,
    /// When the next layer allocation round is due.
    layers_due: Instant,
    /// When bandwidth-probe padding goes out next; `None` while no
    /// connection probes.
    padding_due: Option<Instant>,
    /// K of the mixer (`--mix-speakers`).
    mix_speakers: usize,
    /// Encoder complexity of the mixer (`--mix-complexity`).
    mix_complexity: i32,
    /// `--max-tracks`.
    max_tracks: usize,
}

impl Engine {
    fn new(ctx: WorkerContext) -> Engine {
        let config = &ctx.config;
        let label = ctx.worker.to_string();
        Engine {
            announce: ctx.announce,
            tcp_announce: ctx.tcp_announce,
            tcp_writers: HashMap::new(),
            peers: HashMap::new(),
            by_participant: HashMap::new(),
            router: Router::new(config.mix_speakers),
            mixes: HashMap::new(),
            worker: ctx.worker,
            demux: ctx.control.clone(),
            out: ctx.out,
            send: batch::SendBatch::new(),
            touched: Vec::new(),
            scan_all: true,
            timers: BinaryHeap::new(),
            sweep_due: Instant::now() + IDLE,
            worker_datagrams: ctx.metrics.worker_datagrams.with_label_values(&[&label]),
            worker_rooms: ctx.metrics.worker_rooms.with_label_values(&[&label]),
            outboxes: ctx.outboxes.clone(),
            metrics: ctx.metrics.clone(),
            publishing: ctx.publishing,
            webhooks: Some(ctx.webhooks),
            next_key: reader::first_key(ctx.worker),
            actions: Vec::new(),
            decisions: Vec::new(),
            offers_due: Vec::new(),
            forwarded_since: None,
            audio_due: None,
            layers_due: Instant::now() + layers::ALLOCATE_EVERY,
            padding_due: None,
            mix_speakers: config.mix_speakers,
            mix_complexity: config.mix_complexity,
            max_tracks: config.max_tracks,
        }
    }

    async fn run(
        mut self,
        mut reader: Option<reader::Reader>,
        mut inbound: Option<mpsc::Receiver<reader::ToWorker>>,
        mut commands: mpsc::Receiver<Command>,
        mut tcp: Option<mpsc::Receiver<TcpEvent>>,
    ) {
        let mut own: Vec<reader::Inbound> = Vec::with_capacity(reader::BATCH);
        let mut deadline = Instant::now() + IDLE;
        loop {
            // Timers that came due while input kept the loop busy (a socket
            // that is always readable must not starve them).
            if deadline <= Instant::now() {
                self.on_timers(Instant::now(), reader.as_mut());
            }
            // The mixer runs here rather than in a select branch so a busy
            // socket (always ready) cannot starve it.
            if self.audio_due.is_some_and(|due| due <= Instant::now()) {
                self.audio_tick();
                self.scan_all = true;
            }
            // Likewise the layer allocation.
            if self.layers_due <= Instant::now() {
                let now = Instant::now();
                self.allocate_layers(now);
                self.layers_due = now + layers::ALLOCATE_EVERY;
                self.scan_all = true;
            }
            if self.padding_due.is_some_and(|due| due <= Instant::now()) {
                self.pad(Instant::now());
                self.scan_all = true;
            }
            if self.scan_all {
                // Whatever ran may have left events on any connection.
                let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
                for key in keys {
                    self.drain(key);
                }
                self.apply_actions();
            }
            self.flush();
            if let Some(arrived) = self.forwarded_since.take() {
                self.metrics
                    .forward_latency
                    .observe(arrived.elapsed().as_secs_f64());
            }
            let now = Instant::now();
            deadline = self
                .next_timer()
                .unwrap_or(now + IDLE)
                .min(now + IDLE)
                .min(self.audio_due.unwrap_or(now + IDLE))
                .min(self.layers_due)
                .min(self.padding_due.unwrap_or(now + IDLE))
                .min(self.sweep_due)
                .max(now);
            tokio::select! {
                biased;
                cmd = commands.recv() => match cmd {
                    Some(Command::Shutdown) | None => break,
                    Some(cmd) => {
                        self.on_command(cmd);
                        self.apply_actions();
                        self.scan_all = true;
                    }
                },
                () = readable(&reader) => {
                    if let Some(r) = reader.as_mut() {
                        r.drain(&mut own);
                    }
                    self.on_datagrams(&mut own);
                },
                Some(msg) = next_inbound(&mut inbound) => match msg {
                    reader::ToWorker::Datagrams(mut batch) => self.on_datagrams(&mut batch),
                    reader::ToWorker::TcpOpened { from, writer } => {
                        self.tcp_writers.insert(from, writer);
                    }
                    reader::ToWorker::TcpClosed { from } => {
                        self.tcp_writers.remove(&from);
                    }
                },
                Some(event) = next_tcp(&mut tcp) => {
                    if let Some(r) = reader.as_mut() {
                        self.on_tcp(r, event, &mut own);
                    }
                }
                () = tokio::time::sleep_until(deadline.into()) => {
                    let now = Instant::now();
                    self.on_timers(now, reader.as_mut());
                    // Not again at the top of the loop.
                    deadline = now + IDLE;
                }
            }
        }
        for (_, mut p) in self.peers.drain() {
            let _ = p.pc.close();
        }
        tracing::info!(worker = self.worker, "media worker stopped");
    }

    /// Connections' timers that are due, deferred keyframe requests,
    /// silent connections (once per [`IDLE`]), the reader's registrations.
    fn on_timers(&mut self, now: Instant, reader: Option<&mut reader::Reader>) {
        while let Some(&Reverse((at, key))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(p) = self.peers.get_mut(&key) else {
                continue;
            };
            if p.timeout != Some(at) {
                continue; // stale: its timer moved
            }
            p.timeout = None;
            let _ = p.pc.handle_timeout(now);
            self.touched.push(key);
            self.drain(key);
        }
        self.apply_actions();
        self.poll_keyframes(now);
        if self.sweep_due <= now {
            self.sweep_silent(now);
            self.prune_histories(now);
            self.sweep_due = now + IDLE;
            self.worker_rooms.set(self.router.room_count() as i64);
        }
        if let Some(r) = reader {
            r.apply_control();
        }
    }

    /// The earliest connection timer (stale entries dropped on the way).
    fn next_timer(&mut self) -> Option<Instant> {
        while let Some(&Reverse((at, key))) = self.timers.peek() {
            if self.peers.get(&key).is_some_and(|p| p.timeout == Some(at)) {
                return Some(at);
            }
            self.timers.pop();
        }
        None
    }

    // -- input ------------------------------------------------------------

    fn on_tcp(
        &mut self,
        reader: &mut reader::Reader,
        event: TcpEvent,
        own: &mut Vec<reader::Inbound>,
    ) {
        match event {
            TcpEvent::Opened { from, writer } => {
                reader.tcp_broadcast(|| reader::ToWorker::TcpOpened {
                    from,
                    writer: writer.clone(),
                });
                self.tcp_writers.insert(from, writer);
            }
            TcpEvent::Packet { from, data } => {
                self.metrics.media_tcp_in.inc();
                reader.tcp_packet(data, from, own);
                self.on_datagrams(own);
            }
            TcpEvent::Closed { from } => {
                reader.tcp_broadcast(|| reader::ToWorker::TcpClosed { from });
                self.tcp_writers.remove(&from);
            }
        }
    }

    /// A batch of routed datagrams for this worker's connections.
    fn on_datagrams(&mut self, batch: &mut Vec<reader::Inbound>) {
        self.worker_datagrams.inc_by(batch.len() as u64);
        for inbound in batch.drain(..) {
            self.on_packet(inbound);
        }
    }

    /// One datagram (UDP) or framed packet (ICE-TCP), routed to its
    /// connection.
    fn on_packet(&mut self, inbound: reader::Inbound) {
        let reader::Inbound {
            key,
            from,
            protocol,
            data,
            at,
        } = inbound;
        let Some(peer) = self.peers.get_mut(&key) else {
            self.metrics.media_dropped("unknown-peer");
            return;
        };
        self.metrics.media_in(data.len());
        self.touched.push(key);
        peer.last_rx = at;
        if protocol == TransportProtocol::UDP {
            peer.paths.heard(from, at);
        }
        let msg = TaggedBytesMut {
            now: at,
            transport: TransportContext {
                local_addr: self.announce,
                peer_addr: from,
                ecn: None,
                transport_protocol: protocol,
            },
            message: data,
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
                if let Some(&key) = self.by_participant.get(&participant) {
                    self.router.set_muted(key, kind, muted);
                    tracing::info!(%participant, kind = kind.as_str(), muted, "muted by an administrator");
                }
            }
            Command::TrackSettings {
                participant,
                settings,
                ..
            } => self.on_track_settings(&participant, settings),
            Command::Left { room, participant } => {
                if let Some(key) = self.by_participant.get(&participant).copied() {
                    self.remove_peer(key);
                }
                let _ = room;
            }
            Command::RoomSfu { room } => self.room_to_sfu(&room),
            // Back to p2p: forwarding stops (packets count as `standby`
            // drops); subscriptions stay, so a later `sfu` resumes them.
            Command::RoomP2p { room } => self.router.set_standby(&room),
            Command::Shutdown => {}
        }
    }

    fn apply_actions(&mut self) {
        while !self.actions.is_empty() {
            let actions = std::mem::take(&mut self.actions);
            for action in actions {
                // Only forwarding keeps to the connections it touches.
                if !matches!(action, Action::Forward { .. }) {
                    self.scan_all = true;
                }
                match action {
                    Action::Forward {
                        from,
                        track,
                        packet,
                        arrived,
                    } => self.forward(from, &track, packet, arrived),
                    Action::TrackOpened(publisher, track) => {
                        self.subscribe_all(publisher, track.as_str())
                    }
                    Action::TrackClosed(publisher, track) => {
                        let mut ended = Vec::new();
                        self.router.unpublish(publisher, &track, &mut ended);
                        self.end_subscriptions(&ended);
                    }
                    Action::KeyframeWanted(publisher, track) => {
                        let now = Instant::now();
                        self.decide(now, |r, d| {
                            r.request_keyframe(publisher, track.as_str(), now, d)
                        });
                    }
                    Action::SubscriberPli(sub, out) => {
                        let now = Instant::now();
                        self.decide(now, |r, d| r.keyframe_request_from(sub, out, now, d));
                    }
                    Action::Nack { sub, ssrc, seqs } => {
                        self.answer_nack(sub, ssrc, &seqs);
                    }
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

    /// Sends the PLIs that throttling deferred.
    fn poll_keyframes(&mut self, now: Instant) {
        self.decide(now, |r, d| r.poll_keyframes(now, d));
    }

    /// One router call that decides (no packet to copy), and its decisions
    /// carried out.
    fn decide(&mut self, now: Instant, call: impl FnOnce(&mut Router, &mut Vec<Decision>)) {
        let mut decisions = std::mem::take(&mut self.decisions);
        decisions.clear();
        call(&mut self.router, &mut decisions);
        self.apply_decisions(&mut decisions, None, now);
        self.decisions = decisions;
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

    fn remove_peer(&mut self, key: PeerKey) {
        let Some(mut p) = self.peers.remove(&key) else {
            return;
        };
        tracing::info!(participant = %p.participant, room = %p.room, "server connection removed");
        self.publishing.forget(&p.participant);
        let _ = self.demux.send(reader::DemuxControl::Unregister(key));
        self.by_participant.remove(&p.participant);
        let _ = p.pc.close();
        self.metrics.media_connections.dec();
        self.metrics
            .move_connection_state(Some(peer::state_label(p.state)), None);
        let left = self.router.leave(key);
        self.leave_mixer(&p.room, &left);
        self.end_subscriptions(&left.unsubscribed);
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

    /// Writes the pending datagrams of the connections touched since the
    /// last flush (of all after [`Engine::scan_all`]) to the socket, up to
    /// [`batch::BATCH`] per system call, and files their next timers.
    fn flush(&mut self) {
        let now = Instant::now();
        let mut keys = std::mem::take(&mut self.touched);
        if std::mem::take(&mut self.scan_all) {
            keys.clear();
            keys.extend(self.peers.keys().copied());
        } else {
            keys.sort_unstable();
            keys.dedup();
        }
        for key in keys.drain(..) {
            let Some(p) = self.peers.get_mut(&key) else {
                continue;
            };
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
                if self.send.is_full() {
                    send_batch(&mut self.send, &self.out, &self.metrics);
                }
                let to = p.paths.destination(out.transport.peer_addr, now);
                self.send.push(out.message, to);
            }
            let timeout = p.pc.poll_timeout();
            if timeout != p.timeout {
                p.timeout = timeout;
                if let Some(at) = timeout {
                    self.timers.push(Reverse((at, key)));
                }
            }
        }
        self.touched = keys;
        send_batch(&mut self.send, &self.out, &self.metrics);
        // Stale entries pile up when timers move later; start over then.
        if self.timers.len() > 4 * self.peers.len() + 64 {
            self.timers = self
                .peers
                .iter()
                .filter_map(|(k, p)| p.timeout.map(|at| Reverse((at, *k))))
                .collect();
        }
    }
}

/// Resolves when worker 0's socket is readable; never on other workers.
async fn readable(reader: &Option<reader::Reader>) {
    match reader {
        Some(r) => r.readable().await,
        None => std::future::pending().await,
    }
}

/// The next message from the reader; never on worker 0.
async fn next_inbound(
    inbound: &mut Option<mpsc::Receiver<reader::ToWorker>>,
) -> Option<reader::ToWorker> {
    match inbound {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Sends what `batch` holds on `socket` and counts it.
fn send_batch(batch: &mut batch::SendBatch, socket: &std::net::UdpSocket, metrics: &Metrics) {
    use std::os::fd::AsRawFd;
    let sent = batch.send(socket.as_raw_fd());
    metrics.media_out_many(sent.datagrams, sent.bytes);
    for _ in 0..sent.failed {
        metrics.media_dropped("send-failed");
    }
}
