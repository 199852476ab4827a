//! `/socket.io/`: the classic Socket.IO room protocol, for clients that
//! cannot be changed (protocol 1.1 "Socket.IO endpoint").
//!
//! A classic client is an ordinary participant of the same rooms as `/ws`
//! clients. Each Socket.IO connection runs one task that translates both
//! ways, in order:
//!
//! - classic events in (`join(room)`, `leave(room)`, `message(room, data)`)
//!   become hub calls, with the same rate limit, size limit and per-address
//!   cap as `/ws`; what the hub refuses is counted in
//!   `switchboard_socketio_dropped_total` (classic clients have no `error`
//!   event) and changes nothing;
//! - the hub's messages out (the JSON a `/ws` client would get) become the
//!   classic events: `joined(room, id)`, `otherjoin(room, id)`, `full(room,
//!   id)`, `leaved(room, id)`, `bye(room, id)`, `message(room, data)`.
//!
//! Relaying (`--socketio-relay`): while the room is `p2p` a classic client
//! talks to its peer as before. When the server becomes its peer (the room
//! is `sfu` at its join, or turns `sfu` later with `auto`), it gets
//! `bye(room, other)` for every peer it had, then `otherjoin(room, "sfu")`:
//! it offers to `"sfu"` as it would to anyone who came in, and from then on
//! its `message`s go to the server and the others' comings and goings are
//! not its business (it receives the mix and the active speaker's video on
//! its one connection).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, Method, Request, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use socketioxide::extract::{SocketRef, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::layer::SocketIoLayer;
use socketioxide::SocketIo;
use switchboard_proto::{
    ClientMessage, Join, Leave, MediaMode, ParticipantId, RelayRequest, RequestedMode, RoomName,
    ServerMessage, SFU_PEER,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::cluster::{Cluster, Placed, RelayCtl};
use crate::config::Relay;
use crate::hub::{Client, Departure, Hub, JoinOutcome, Outbox};
use crate::metrics::{ClassicDrop, Disconnect, Limit};
use crate::perip::PerIp;
use crate::ratelimit::{RateLimiter, Verdict};

/// Where the endpoint is.
pub const PATH: &str = "/socket.io";

/// Binary attachments a client may announce: none (classic clients send
/// none; socketioxide's default, 10,000 of up to 10 MB held for a minute,
/// would be memory a client can make us hold).
pub const MAX_INCOMING_BINARIES: usize = 0;

/// Classic events waiting for a connection's task; past this the client is
/// over any sane rate and events are dropped (and counted).
const EVENT_QUEUE: usize = 64;

/// What the endpoint shares with its connections.
#[derive(Clone)]
pub struct Shared {
    pub hub: Arc<Hub>,
    pub shutdown: CancellationToken,
    pub sessions: TaskTracker,
    /// Signaling connections per address, shared with `/ws`.
    pub per_ip: Arc<PerIp>,
    /// Cluster mode: joins are placed, and relayed to the room's node.
    pub cluster: Option<Arc<Cluster>>,
}

/// The Socket.IO layer for the public router (Engine.IO 3 and 4, so
/// socket.io-client 1.x/2.x and 3.x/4.x alike).
pub fn layer(shared: Shared) -> SocketIoLayer {
    let limits = &shared.hub.config().limits;
    // A message's data is at most `--max-frame-bytes`; the transport
    // refuses anything four times larger without buffering it (as `/ws`).
    let hard_cap = limits.max_frame_bytes.saturating_mul(4);
    let (layer, io) = SocketIo::builder()
        .req_path(PATH)
        .max_payload(hard_cap as u64)
        .ws_max_message_size(hard_cap)
        .ws_max_frame_size(hard_cap)
        // Packets queued for one client before emits fail (and the client
        // is dropped as too slow): a bound on what it can make us hold.
        .max_buffer_size(256)
        .with_parser(
            socketioxide::ParserConfig::common()
                .max_incoming_binaries(MAX_INCOMING_BINARIES)
                .max_incoming_binary_buf_size(hard_cap)
                .packet_completion_timeout(std::time::Duration::from_secs(2)),
        )
        .build_layer();
    // Everything is set up in a connect middleware, which socketioxide
    // awaits before it sends the connect packet: the event handlers exist
    // before the client can send an event (the connect handler proper is
    // spawned after that packet, so a `join` sent at once could beat it).
    let setup = move |socket: SocketRef| {
        let shared = shared.clone();
        async move { on_connect(socket, shared) }
    };
    io.ns("/", (async || {}).with(setup));
    layer
}

/// Cross-origin access for polling: a classic page is usually served from
/// elsewhere. The same `--allowed-origins` as `/ws` (any when empty); the
/// origin is echoed with credentials allowed, as socket.io 2.x servers did.
pub async fn cors(
    allowed: Arc<Vec<String>>,
    req: Request<axum::body::Body>,
    next: Next,
) -> Response {
    if !req.uri().path().starts_with(PATH) {
        return next.run(req).await;
    }
    let origin = req.headers().get(header::ORIGIN).cloned();
    let ok = origin.as_ref().is_some_and(|o| {
        allowed.is_empty() || o.to_str().is_ok_and(|o| allowed.iter().any(|a| a == o))
    });
    if req.method() == Method::OPTIONS {
        let mut res = StatusCode::NO_CONTENT.into_response();
        if ok {
            let h = res.headers_mut();
            add_cors(h, origin.as_ref());
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST"),
            );
            if let Some(asked) = req.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
                h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
            }
        }
        return res;
    }
    let mut res = next.run(req).await;
    if ok {
        add_cors(res.headers_mut(), origin.as_ref());
    }
    res
}

fn add_cors(h: &mut axum::http::HeaderMap, origin: Option<&HeaderValue>) {
    if let Some(o) = origin {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o.clone());
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
}

/// A classic event, queued for the connection's task.
#[derive(Debug)]
enum Event {
    Join(Value),
    Leave(Value),
    Message(Value, Value),
    Bad(ClassicDrop),
}

/// Why a Socket.IO connection was not accepted (its `connect_error`).
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("origin not allowed")]
    Origin,
    #[error("server shutting down")]
    ShuttingDown,
    #[error("too many connections from this address")]
    PerAddress,
}

fn on_connect(socket: SocketRef, shared: Shared) -> Result<(), Refused> {
    let parts = socket.req_parts();
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let config = shared.hub.config();
    let peer = if config.trust_forwarded_for {
        crate::server::forwarded_for(&parts.headers)
            .map_or(peer, |ip| SocketAddr::new(ip, peer.port()))
    } else {
        peer
    };
    let allowed = &config.allowed_origins;
    if !allowed.is_empty() {
        let origin = parts
            .headers
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !allowed.iter().any(|a| a == origin) {
            tracing::info!(%peer, origin, "refused a Socket.IO client from a foreign origin");
            return Err(Refused::Origin);
        }
    }
    if shared.shutdown.is_cancelled() {
        return Err(Refused::ShuttingDown);
    }
    let Some(slot) = shared.per_ip.acquire(peer.ip()) else {
        shared.hub.metrics().limited(Limit::ConnsPerIp);
        return Err(Refused::PerAddress);
    };
    // An optional access token in the handshake's query (`?token=`), for
    // deployments with auth on; classic clients pass it in the URL.
    let token = parts.uri.query().and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "token")
            .map(|(_, v)| v.to_owned())
    });
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    let gone = CancellationToken::new();
    // The rate limit applies where events arrive, before the queue, so a
    // flood is judged by what the client sent, not by what the queue held.
    let flood = CancellationToken::new();
    let limits = &config.limits;
    let limiter = Arc::new(std::sync::Mutex::new(RateLimiter::new(
        limits.rate_per_sec,
        limits.rate_burst,
        Instant::now(),
    )));
    let metrics_hub = shared.hub.clone();
    let flooded = flood.clone();
    let queue = move |tx: &mpsc::Sender<Event>, ev: Event| {
        let verdict = match limiter.lock() {
            Ok(mut l) => l.check(Instant::now()),
            Err(_) => Verdict::Close,
        };
        let dropped = match verdict {
            Verdict::Allow => tx.try_send(ev).is_err(),
            Verdict::Reject => true,
            Verdict::Close => {
                flooded.cancel();
                true
            }
        };
        if dropped {
            metrics_hub
                .metrics()
                .classic_dropped(ClassicDrop::RateLimited);
        }
    };
    {
        let (tx, queue) = (tx.clone(), queue.clone());
        socket.on("join", move |TryData::<Value>(room)| {
            queue(
                &tx,
                room.map_or(Event::Bad(ClassicDrop::Malformed), Event::Join),
            );
            async {}
        });
    }
    {
        let (tx, queue) = (tx.clone(), queue.clone());
        socket.on("leave", move |TryData::<Value>(room)| {
            queue(
                &tx,
                room.map_or(Event::Bad(ClassicDrop::Malformed), Event::Leave),
            );
            async {}
        });
    }
    {
        let (tx, queue) = (tx.clone(), queue.clone());
        socket.on("message", move |TryData::<(Value, Value)>(args)| {
            let ev = match args {
                Ok((room, data)) => Event::Message(room, data),
                Err(_) => Event::Bad(ClassicDrop::Malformed),
            };
            queue(&tx, ev);
            async {}
        });
    }
    {
        let (tx, queue) = (tx.clone(), queue.clone());
        socket.on_fallback(move || {
            queue(&tx, Event::Bad(ClassicDrop::UnknownEvent));
            async {}
        });
    }
    {
        let gone = gone.clone();
        socket.on_disconnect(move || {
            gone.cancel();
            async {}
        });
    }
    let span = tracing::info_span!(
        "classic",
        %peer,
        sid = %socket.id,
        room = tracing::field::Empty,
        participant = tracing::field::Empty
    );
    let hub = shared.hub.clone();
    let task = async move {
        let _slot = slot;
        hub.metrics().socketio_connections.inc();
        let why = Classic::new(
            hub.clone(),
            socket,
            peer,
            token,
            span.clone(),
            shared.cluster,
        )
        .serve(rx, gone, flood, shared.shutdown)
        .instrument(span)
        .await;
        hub.metrics().socketio_connections.dec();
        tracing::debug!(reason = why.as_str(), "classic client gone");
    };
    shared.sessions.spawn(task);
    Ok(())
}

/// One classic connection's state.
struct Classic {
    hub: Arc<Hub>,
    socket: SocketRef,
    peer: SocketAddr,
    token: Option<String>,
    span: tracing::Span,
    joined: Option<(RoomName, ParticipantId)>,
    /// The server is its peer (the room is `sfu`).
    relayed: bool,
    /// Its P2P peers (while not relayed), to say `bye` for when relaying
    /// starts.
    peers: Vec<ParticipantId>,
    /// The room of its last join, for a refusal that comes as an `error`.
    last_join: Option<RoomName>,
    /// Cluster mode.
    cluster: Option<Arc<Cluster>>,
    /// The connection's number and its room's node while its room is on
    /// another node: its events go there as the protocol's messages, and
    /// the hub's messages come back.
    relay: Option<(u64, String)>,
    /// Joining again by itself after its room's node died: the client
    /// already had its `joined`.
    rejoining: bool,
}

impl Classic {
    fn new(
        hub: Arc<Hub>,
        socket: SocketRef,
        peer: SocketAddr,
        token: Option<String>,
        span: tracing::Span,
        cluster: Option<Arc<Cluster>>,
    ) -> Classic {
        Classic {
            hub,
            socket,
            peer,
            token,
            span,
            joined: None,
            relayed: false,
            peers: Vec::new(),
            last_join: None,
            cluster,
            relay: None,
            rejoining: false,
        }
    }

    fn relay_policy(&self) -> Relay {
        self.hub.config().socketio_relay
    }

    async fn serve(
        mut self,
        mut events: mpsc::Receiver<Event>,
        gone: CancellationToken,
        flood: CancellationToken,
        shutdown: CancellationToken,
    ) -> Disconnect {
        let (outbox, mut rx, kick) = Outbox::new();
        // What the room's node says about the relay (cluster mode).
        let (ctl_tx, mut ctl) = mpsc::channel::<RelayCtl>(16);
        let why = loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break Disconnect::Shutdown,
                () = gone.cancelled() => break Disconnect::Closed,
                () = kick.cancelled() => {
                    tracing::warn!("closing a classic client that does not read its messages");
                    break Disconnect::SlowConsumer;
                }
                () = flood.cancelled() => {
                    tracing::warn!("closing a classic client that keeps flooding");
                    break Disconnect::RateLimit;
                }
                Some(text) = rx.recv() => {
                    if let Err(why) = self.on_server(&text) {
                        break why;
                    }
                }
                Some(c) = ctl.recv() => {
                    if let Err(why) = self.on_relay_ctl(&outbox, &ctl_tx, c).await {
                        break why;
                    }
                }
                Some(event) = events.recv() => self.on_event(&outbox, &ctl_tx, event).await,
            }
        };
        if let Some((n, owner)) = self.relay.take() {
            // Classic clients never resume: gone is gone.
            self.joined = None;
            if let Some(cluster) = &self.cluster {
                cluster.end_relay(n, &owner, Some(true));
            }
        }
        if let Some((room, id)) = self.joined.take() {
            let how = if why == Disconnect::Shutdown {
                Departure::ServerClosing
            } else {
                Departure::Vanished
            };
            self.hub.leave(&room, &id, how);
        }
        if why != Disconnect::Closed {
            let _ = self.socket.clone().disconnect();
        }
        why
    }

    // -- classic events in ----------------------------------------------------

    async fn on_event(&mut self, outbox: &Outbox, ctl: &mpsc::Sender<RelayCtl>, event: Event) {
        let hub = self.hub.clone();
        let metrics = hub.metrics();
        if self.relay.is_some() {
            return self.on_event_relayed(event);
        }
        match event {
            Event::Bad(why) => {
                tracing::debug!(reason = why.as_str(), "ignored a classic event");
                metrics.classic_dropped(why);
            }
            Event::Join(room) => {
                metrics.received(Some("join"));
                self.forget_if_gone();
                let Some(room) = room_name(&room) else {
                    metrics.classic_dropped(ClassicDrop::Malformed);
                    return;
                };
                if self.joined.is_some() {
                    metrics.classic_dropped(ClassicDrop::WrongRoom);
                    return;
                }
                let (mode, client) = match self.relay_policy() {
                    Relay::Never => (RequestedMode::P2p, Client::ClassicP2pOnly),
                    Relay::Auto => (RequestedMode::Auto, Client::Classic),
                    Relay::Always => (RequestedMode::Sfu, Client::ClassicRelayed),
                };
                self.last_join = Some(room.clone());
                let req = Join {
                    room: room.clone(),
                    name: String::new(),
                    token: self.token.clone(),
                    mode: Some(mode),
                    audio: None,
                };
                if let Some(cluster) = self.cluster.clone() {
                    match cluster.place(&room, false).await {
                        Placed::Local => {}
                        Placed::Remote(owner) => {
                            let text = serde_json::to_string(&ClientMessage::Join(req))
                                .unwrap_or_default();
                            let ip = self.peer.ip();
                            match cluster.open_relay(&owner, outbox, ctl.clone(), ip, &text, client)
                            {
                                Some(n) => {
                                    self.span.record("room", room.as_str());
                                    tracing::info!(node = %owner, "relaying the classic client to the room's node");
                                    self.relay = Some((n, owner));
                                }
                                None => self.refuse_join(),
                            }
                            return;
                        }
                        Placed::Unavailable(why) => {
                            tracing::debug!(why, "classic join not placed");
                            metrics.classic_dropped(ClassicDrop::Refused);
                            self.refuse_join();
                            return;
                        }
                    }
                }
                if let JoinOutcome::Joined(id) =
                    self.hub.join_as(outbox, req, self.peer.ip(), client)
                {
                    self.span.record("room", room.as_str());
                    self.span.record("participant", id.as_str());
                    tracing::info!("classic client joined");
                    self.joined = Some((room, id));
                }
            }
            Event::Leave(room) => {
                metrics.received(Some("leave"));
                match self.my_room(&room) {
                    Some((room, id)) => {
                        self.hub.leave(&room, &id, Departure::Left);
                        self.joined = None;
                        self.relayed = false;
                        self.peers.clear();
                    }
                    None => metrics.classic_dropped(ClassicDrop::WrongRoom),
                }
            }
            Event::Message(room, data) => {
                let Some((room, id)) = self.message_room(&room, &data) else {
                    return;
                };
                // Relayed: everything it says is for the server; otherwise
                // for its peer, verbatim (the old behaviour).
                let to = self.relayed.then_some(SFU_PEER);
                if let Err(e) = self.hub.relay(&room, &id, to, data) {
                    tracing::debug!(error = %e, "classic message not relayed");
                    metrics.classic_dropped(ClassicDrop::Refused);
                }
            }
        }
    }

    /// A classic event while the room is on another node: the protocol's
    /// message for it, relayed there (the room's node runs the checks and
    /// the hub calls; its answers come back through the outbox).
    fn on_event_relayed(&mut self, event: Event) {
        let hub = self.hub.clone();
        let metrics = hub.metrics();
        let msg = match event {
            Event::Bad(why) => {
                tracing::debug!(reason = why.as_str(), "ignored a classic event");
                metrics.classic_dropped(why);
                return;
            }
            Event::Join(room) => {
                metrics.received(Some("join"));
                // Left, and its node has not said `end` yet: the room's
                // node bounces the join back, and it is placed here afresh.
                match (self.joined.is_none(), room_name(&room)) {
                    (true, Some(room)) => ClientMessage::Join(Join {
                        room,
                        name: String::new(),
                        token: None,
                        mode: None,
                        audio: None,
                    }),
                    // In a room already (or joining): as locally, not acted on.
                    _ => {
                        metrics.classic_dropped(ClassicDrop::WrongRoom);
                        return;
                    }
                }
            }
            Event::Leave(room) => {
                metrics.received(Some("leave"));
                let Some((room, _)) = self.my_room(&room) else {
                    metrics.classic_dropped(ClassicDrop::WrongRoom);
                    return;
                };
                self.joined = None;
                self.relayed = false;
                self.peers.clear();
                ClientMessage::Leave(Leave { room })
            }
            Event::Message(room, data) => {
                let Some((room, _)) = self.message_room(&room, &data) else {
                    return;
                };
                ClientMessage::Message(RelayRequest {
                    room,
                    to: self.relayed.then(|| SFU_PEER.to_owned()),
                    data,
                })
            }
        };
        let (Some((n, owner)), Some(cluster)) = (&self.relay, &self.cluster) else {
            return;
        };
        let text = serde_json::to_string(&msg).unwrap_or_default();
        if !cluster.forward(*n, owner, &text) {
            metrics.classic_dropped(ClassicDrop::Refused);
        }
    }

    /// What the room's node says about this relayed classic client.
    async fn on_relay_ctl(
        &mut self,
        outbox: &Outbox,
        ctl_tx: &mpsc::Sender<RelayCtl>,
        ctl: RelayCtl,
    ) -> Result<(), Disconnect> {
        let Some((n, owner)) = self.relay.take() else {
            return Ok(());
        };
        let Some(cluster) = self.cluster.clone() else {
            return Ok(());
        };
        cluster.end_relay(n, &owner, None);
        match ctl {
            RelayCtl::End => {
                // Out of the room on its node (left, refused, removed).
                self.joined = None;
                self.relayed = false;
                self.peers.clear();
                Ok(())
            }
            RelayCtl::Bounce(text) => {
                self.joined = None;
                let event = match serde_json::from_str::<ClientMessage>(&text) {
                    Ok(ClientMessage::Join(j)) => Event::Join(Value::from(j.room.as_str())),
                    Ok(ClientMessage::Leave(l)) => Event::Leave(Value::from(l.room.as_str())),
                    Ok(ClientMessage::Message(m)) => {
                        Event::Message(Value::from(m.room.as_str()), m.data)
                    }
                    _ => return Ok(()),
                };
                Box::pin(self.on_event(outbox, ctl_tx, event)).await;
                Ok(())
            }
            RelayCtl::Closed(why) => {
                tracing::info!(%why, "the room's node closed this classic client");
                Err(Disconnect::SlowConsumer)
            }
            RelayCtl::OwnerLost => {
                // Its peer (the server) is gone: `bye`, then the same room
                // joined again, on a live node; the client offers to the new
                // `otherjoin(room, "sfu")` as to anyone who came in.
                let Some((room, _)) = self.joined.take() else {
                    return Ok(());
                };
                tracing::warn!(node = %owner, "the classic client's room node died; joining again");
                if self.relayed {
                    self.emit("bye", (room.as_str(), SFU_PEER))?;
                }
                for p in std::mem::take(&mut self.peers) {
                    self.emit("bye", (room.as_str(), p.as_str()))?;
                }
                self.relayed = false;
                self.rejoining = true;
                Box::pin(self.on_event(outbox, ctl_tx, Event::Join(Value::from(room.as_str()))))
                    .await;
                Ok(())
            }
        }
    }

    /// A join that cannot be served now: `full`, as the classic server
    /// said when it could not take someone.
    fn refuse_join(&mut self) {
        if let Some(room) = self.last_join.take() {
            if !self.rejoining {
                let _ = self.emit("full", (room.as_str(), self.socket.id.to_string()));
            }
        }
        self.rejoining = false;
    }

    /// A `message(room, data)`: counted, and its room and id when `room` is
    /// the connection's and `data` is within the size limit (else dropped
    /// and counted).
    fn message_room(&mut self, room: &Value, data: &Value) -> Option<(RoomName, ParticipantId)> {
        let hub = self.hub.clone();
        let metrics = hub.metrics();
        metrics.received(Some("message"));
        let Some(mine) = self.my_room(room) else {
            metrics.classic_dropped(ClassicDrop::WrongRoom);
            return None;
        };
        let size = serde_json::to_string(data).map_or(usize::MAX, |s| s.len());
        if size > hub.config().limits.max_frame_bytes {
            metrics.classic_dropped(ClassicDrop::TooLarge);
            return None;
        }
        Some(mine)
    }

    /// The connection's room and id, when `named` is that room.
    fn my_room(&mut self, named: &Value) -> Option<(RoomName, ParticipantId)> {
        self.forget_if_gone();
        let named = room_name(named)?;
        match &self.joined {
            Some((room, id)) if *room == named => Some((room.clone(), id.clone())),
            _ => None,
        }
    }

    /// Forgets the room when this participant is no longer in it (replaced
    /// or removed by an administrator).
    fn forget_if_gone(&mut self) {
        // A relayed room is on another node, which ends the relay when the
        // client is no longer in it.
        if self.relay.is_some() {
            return;
        }
        if let Some((room, id)) = &self.joined {
            if !self.hub.is_member(room, id) {
                self.joined = None;
                self.relayed = false;
                self.peers.clear();
            }
        }
    }

    // -- hub messages out -----------------------------------------------------

    /// Emits what the hub said, as classic events.
    fn on_server(&mut self, text: &str) -> Result<(), Disconnect> {
        let msg: ServerMessage = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "a hub message did not parse");
                return Ok(());
            }
        };
        match msg {
            ServerMessage::Joined(j) => {
                if self.relay.is_some() {
                    self.span.record("participant", j.id.as_str());
                    self.joined = Some((j.room.clone(), j.id.clone()));
                }
                // (With `never`, a room in `sfu` refused the join: `full`.)
                // Joined again after its room's node died: it knew already.
                if !std::mem::take(&mut self.rejoining) {
                    self.emit("joined", (j.room.as_str(), j.id.as_str()))?;
                }
                match j.mode {
                    MediaMode::Sfu => self.start_relay(&j.room)?,
                    MediaMode::P2p => {
                        self.peers = j.peers.into_iter().map(|p| p.id).collect();
                    }
                }
            }
            ServerMessage::Otherjoin(o) => {
                if !self.relayed {
                    self.peers.push(o.id.clone());
                    self.emit("otherjoin", (o.room.as_str(), o.id.as_str()))?;
                }
            }
            ServerMessage::Full(f) => {
                self.emit("full", (f.room.as_str(), self.socket.id.to_string()))?;
            }
            ServerMessage::Leaved(l) => {
                self.emit("leaved", (l.room.as_str(), l.id.as_str()))?;
            }
            ServerMessage::Bye(b) => {
                if let Some(i) = self.peers.iter().position(|p| *p == b.id) {
                    self.peers.remove(i);
                    self.emit("bye", (b.room.as_str(), b.id.as_str()))?;
                }
            }
            ServerMessage::Message(m) => {
                // Relayed, only the server speaks to it; otherwise its peers.
                if self.relayed == (m.from == SFU_PEER) {
                    self.emit("message", (m.room.as_str(), m.data))?;
                }
            }
            ServerMessage::Mode(m) => match (m.mode, self.relay_policy()) {
                (MediaMode::Sfu, Relay::Never) => {
                    // Its P2P call ends; the server may not take over.
                    for p in std::mem::take(&mut self.peers) {
                        self.emit("bye", (m.room.as_str(), p.as_str()))?;
                    }
                }
                (MediaMode::Sfu, _) if !self.relayed => self.start_relay(&m.room)?,
                _ => {}
            },
            ServerMessage::Error(e) => {
                // No error event in the classic protocol: the trace is here.
                tracing::debug!(code = %e.code, message = %e.message, "error for a classic client");
                // A join refused for its token or a draining server: not
                // admitted, which a classic client knows as `full`.
                if e.request.as_deref() == Some("join") {
                    self.refuse_join();
                }
            }
            // Classic clients never resume (no `resume` event).
            // A classic client publishes one layer: nothing to pause.
            ServerMessage::Speakers(_)
            | ServerMessage::Pong(_)
            | ServerMessage::Resumed(_)
            | ServerMessage::PublisherLayers(_) => {}
        }
        Ok(())
    }

    /// The server becomes the client's peer: `bye` for every peer it had,
    /// then `otherjoin(room, "sfu")`, to which it offers.
    fn start_relay(&mut self, room: &RoomName) -> Result<(), Disconnect> {
        for p in std::mem::take(&mut self.peers) {
            self.emit("bye", (room.as_str(), p.as_str()))?;
        }
        self.relayed = true;
        tracing::info!("relaying the classic client through the server");
        self.emit("otherjoin", (room.as_str(), SFU_PEER))
    }

    fn emit<T: serde::Serialize>(&self, event: &'static str, args: T) -> Result<(), Disconnect> {
        self.hub.metrics().sent(event, 1);
        match self.socket.emit(event, &args) {
            Ok(()) => Ok(()),
            Err(socketioxide::SendError::Socket(socketioxide::SocketError::Closed)) => {
                Err(Disconnect::Closed)
            }
            Err(e) => {
                tracing::warn!(error = %e, "closing a classic client that does not read its messages");
                Err(Disconnect::SlowConsumer)
            }
        }
    }
}

/// A classic room argument: a room name, or a number (`join(123456)` is
/// the room `"123456"`).
pub fn room_name(v: &Value) -> Option<RoomName> {
    match v {
        Value::String(s) => RoomName::parse(s).ok(),
        Value::Number(n) if n.is_u64() || n.is_i64() => RoomName::parse(&n.to_string()).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms_are_names_or_whole_numbers() {
        assert_eq!(
            room_name(&Value::from("demo")).map(|r| r.to_string()),
            Some("demo".into())
        );
        assert_eq!(
            room_name(&Value::from(123456)).map(|r| r.to_string()),
            Some("123456".into())
        );
        assert_eq!(room_name(&Value::from(1.5)), None);
        assert_eq!(room_name(&Value::from("bad room!")), None);
        assert_eq!(room_name(&Value::Null), None);
        assert_eq!(room_name(&serde_json::json!({"room": "x"})), None);
    }
}
