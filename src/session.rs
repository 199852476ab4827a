//! One signaling connection: reads frames, applies limits, turns requests
//! into hub calls, and writes its outbox to the socket.
//!
//! One task per connection, selecting over: the socket, the outbox, the
//! keepalive timer, the server's shutdown, and a kick from the hub when the
//! outbox overflowed. Every reply goes through the outbox, so what one
//! connection sees is always in the order the hub produced it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use switchboard_proto::{
    parse_client, ClientMessage, ErrorCode, ParticipantId, RoomName, ServerMessage,
};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cluster::{Cluster, Placed, RelayCtl};
use crate::hub::{Client, Departure, Hub, JoinOutcome, Outbox};
use crate::metrics::Disconnect;
use crate::ratelimit::{RateLimiter, Verdict};

/// WebSocket close codes we send.
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_POLICY: u16 = 1008;
/// Close reasons a relayed connection's node may send back (`closed`).
pub(crate) const REASON_REPLACED: &str = "resumed on another connection";
pub(crate) const REASON_SLOW: &str = "too slow";

/// Runs one connection to its end.
pub async fn run(
    socket: WebSocket,
    hub: Arc<Hub>,
    cluster: Option<Arc<Cluster>>,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let span = tracing::info_span!(
        "conn",
        %peer,
        room = tracing::field::Empty,
        participant = tracing::field::Empty
    );
    let metrics_hub = hub.clone();
    metrics_hub.metrics().connections.inc();
    metrics_hub.metrics().connections_opened.inc();
    let why = Session::new(hub, span.clone(), peer.ip(), cluster)
        .serve(socket, shutdown)
        .instrument(span)
        .await;
    metrics_hub.metrics().connections.dec();
    metrics_hub.metrics().disconnect(why);
}

/// One connection's requests, whether its WebSocket is here or on another
/// node that relays it (cluster mode, `crate::cluster`).
pub(crate) struct Session {
    hub: Arc<Hub>,
    span: tracing::Span,
    /// The room this connection is in, and its id there.
    joined: Option<(RoomName, ParticipantId)>,
    limiter: RateLimiter,
    /// The client's address.
    ip: IpAddr,
    /// Cluster mode, where joins are placed before they are served.
    cluster: Option<Arc<Cluster>>,
    /// The connection's number and its room's node while its frames are
    /// relayed to that node.
    relay: Option<(u64, String)>,
    /// What client this is (a classic Socket.IO client relayed from
    /// another node joins as one).
    client: Client,
}

/// What handling one frame asks the loop to do next.
pub(crate) enum Next {
    Continue,
    Close(Disconnect, u16, &'static str),
    /// A `join` or `resume` to place in the cluster first.
    Place(ClientMessage, Utf8Bytes),
}

/// How a connection's participant leaves when the connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The server is closing the room.
    Shutdown,
    /// The client closed the connection: it leaves now.
    Goodbye,
    /// The connection dropped: kept for a `resume` when the server resumes.
    Lost,
}

impl Session {
    pub(crate) fn new(
        hub: Arc<Hub>,
        span: tracing::Span,
        ip: IpAddr,
        cluster: Option<Arc<Cluster>>,
    ) -> Session {
        let limits = &hub.config().limits;
        let limiter = RateLimiter::new(
            limits.rate_per_sec,
            limits.rate_burst,
            std::time::Instant::now(),
        );
        Session {
            hub,
            span,
            joined: None,
            limiter,
            ip,
            cluster,
            relay: None,
            client: Client::Protocol,
        }
    }

    /// The same session for another kind of client.
    pub(crate) fn with_client(mut self, client: Client) -> Session {
        self.client = client;
        self
    }

    async fn serve(mut self, socket: WebSocket, shutdown: CancellationToken) -> Disconnect {
        let (outbox, mut rx, kick) = Outbox::new();
        // What the node relaying this connection's room says (cluster mode).
        let (ctl_tx, mut ctl) = tokio::sync::mpsc::channel::<RelayCtl>(16);
        let (mut sink, mut stream) = socket.split();
        let ping_every = self.hub.config().ws_ping_interval;
        let timeout = self.hub.config().ws_timeout;
        let write_timeout = self.hub.config().ws_write_timeout;
        let mut last_rx = Instant::now();
        let mut next_ping = last_rx + ping_every;
        // A close handshake from the client is a goodbye (a page closed);
        // anything else that ends the connection may be a network fault,
        // which the participant may `resume` from.
        let mut said_goodbye = false;
        tracing::debug!("connected");

        let why = loop {
            let deadline = last_rx + timeout;
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    // A relayed room lives on at its node: the client
                    // reconnects (to another node) and resumes.
                    if self.relay.is_none() {
                        self.hub.reply(&outbox, &ServerMessage::error(
                            ErrorCode::RoomClosed, "the server is shutting down", None));
                    }
                    drain(&mut rx, &mut sink).await;
                    close(&mut sink, CLOSE_GOING_AWAY, "server shutting down").await;
                    break Disconnect::Shutdown;
                }
                () = kick.cancelled() => {
                    if self.joined.as_ref().is_some_and(|(_, id)| !self.hub.holds(id, &outbox)) {
                        tracing::info!("its participant resumed on another connection; closing this one");
                        close(&mut sink, CLOSE_POLICY, REASON_REPLACED).await;
                        break Disconnect::Replaced;
                    }
                    tracing::warn!("closing a connection that does not read its messages");
                    close(&mut sink, CLOSE_POLICY, REASON_SLOW).await;
                    break Disconnect::SlowConsumer;
                }
                Some(text) = rx.recv() => {
                    match write(&mut sink, Message::Text(text), write_timeout).await {
                        Ok(()) => {}
                        Err(why) => break why,
                    }
                }
                Some(c) = ctl.recv() => {
                    if let Some(Next::Close(why, code, reason)) = self.on_relay_ctl(&outbox, &ctl_tx, c).await {
                        drain(&mut rx, &mut sink).await;
                        close(&mut sink, code, reason).await;
                        break why;
                    }
                }
                frame = stream.next() => {
                    let Some(Ok(frame)) = frame else {
                        // `Err` is a WebSocket protocol error or a frame over the
                        // hard size cap; `None` is the end of the stream.
                        break if matches!(frame, Some(Err(_))) { Disconnect::ProtocolError } else { Disconnect::Closed };
                    };
                    last_rx = Instant::now();
                    let next = match frame {
                        Message::Text(text) => self.on_text_here(&outbox, &ctl_tx, text).await,
                        Message::Binary(_) => self.on_binary(&outbox),
                        // Control frames count against the same limit: the
                        // library answers each ping with a pong, so an
                        // unlimited ping flood is an unlimited write.
                        Message::Ping(_) | Message::Pong(_) => self.rate_limit_control(),
                        Message::Close(_) => {
                            // Answer the close handshake instead of resetting.
                            let _ = sink.close().await;
                            said_goodbye = true;
                            break Disconnect::Closed;
                        }
                    };
                    if let Next::Close(why, code, reason) = next {
                        drain(&mut rx, &mut sink).await;
                        close(&mut sink, code, reason).await;
                        break why;
                    }
                }
                () = sleep_until(deadline.min(next_ping)) => {
                    let now = Instant::now();
                    if now >= deadline {
                        tracing::info!(silent_for = ?now - last_rx, "connection timed out");
                        break Disconnect::Timeout;
                    }
                    next_ping = now + ping_every;
                    if let Err(why) = write(&mut sink, Message::Ping(Default::default()), write_timeout).await {
                        break why;
                    }
                }
            }
        };
        if let Some((n, owner)) = self.relay.take() {
            if let Some(cluster) = &self.cluster {
                cluster.end_relay(n, &owner, Some(said_goodbye));
            }
        }
        let ending = if why == Disconnect::Shutdown {
            Ending::Shutdown
        } else if said_goodbye {
            Ending::Goodbye
        } else {
            Ending::Lost
        };
        self.depart(&outbox, ending);
        tracing::debug!(reason = why.as_str(), "disconnected");
        why
    }

    /// The participant's departure when its connection ends.
    pub(crate) fn depart(&mut self, outbox: &Outbox, ending: Ending) {
        if let Some((room, id)) = self.joined.take() {
            match ending {
                Ending::Shutdown => self.hub.leave(&room, &id, Departure::ServerClosing),
                Ending::Goodbye => self.hub.leave(&room, &id, Departure::Vanished),
                // Parked for a `resume` if the server resumes; else a `bye`.
                Ending::Lost => self.hub.connection_lost(&room, &id, outbox),
            }
        }
    }

    /// Whether the connection is in a room now.
    pub(crate) fn in_room(&mut self) -> bool {
        self.forget_if_gone();
        self.joined.is_some()
    }

    /// Whether this connection's participant now lives on another connection.
    pub(crate) fn replaced(&self, outbox: &Outbox) -> bool {
        self.joined
            .as_ref()
            .is_some_and(|(_, id)| !self.hub.holds(id, outbox))
    }

    pub(crate) fn reply(&self, outbox: &Outbox, msg: &ServerMessage) {
        self.hub.reply(outbox, msg);
    }

    /// A text frame from this node's own WebSocket: relayed to its room's
    /// node, placed in the cluster, or handled here.
    async fn on_text_here(
        &mut self,
        outbox: &Outbox,
        ctl: &tokio::sync::mpsc::Sender<RelayCtl>,
        text: Utf8Bytes,
    ) -> Next {
        if let (Some((n, owner)), Some(cluster)) = (self.relay.clone(), self.cluster.clone()) {
            if let Some(next) = self.rate_limit(outbox) {
                return next;
            }
            if !cluster.forward(n, &owner, text.as_str()) {
                self.error(
                    outbox,
                    ErrorCode::Unavailable,
                    "the room's node cannot be reached now; try again",
                    None,
                );
            }
            return Next::Continue;
        }
        match self.on_text(outbox, &text) {
            Next::Place(msg, text) => {
                self.place(outbox, ctl, msg, text).await;
                Next::Continue
            }
            next => next,
        }
    }

    /// Serves a `join` or `resume` here or relays it to the node that owns
    /// (or gets) its room.
    async fn place(
        &mut self,
        outbox: &Outbox,
        ctl: &tokio::sync::mpsc::Sender<RelayCtl>,
        msg: ClientMessage,
        text: Utf8Bytes,
    ) {
        let Some(cluster) = self.cluster.clone() else {
            return self.on_message(outbox, msg);
        };
        let ty = msg.type_name();
        let (room, lookup_only) = match &msg {
            ClientMessage::Join(j) => (j.room.clone(), false),
            ClientMessage::Resume(r) => (r.room.clone(), true),
            _ => return self.on_message(outbox, msg),
        };
        match cluster.place(&room, lookup_only).await {
            Placed::Local => self.on_message(outbox, msg),
            Placed::Remote(owner) => {
                match cluster.open_relay(
                    &owner,
                    outbox,
                    ctl.clone(),
                    self.ip,
                    text.as_str(),
                    self.client,
                ) {
                    Some(n) => {
                        self.span.record("room", room.as_str());
                        tracing::info!(node = %owner, "relaying to the room's node");
                        self.relay = Some((n, owner));
                    }
                    None => self.error(
                        outbox,
                        ErrorCode::Unavailable,
                        "the room's node cannot be reached now; try again",
                        Some(ty),
                    ),
                }
            }
            Placed::Unavailable(why) => self.error(outbox, ErrorCode::Unavailable, why, Some(ty)),
        }
    }

    /// What the room's node says about this relayed connection.
    async fn on_relay_ctl(
        &mut self,
        outbox: &Outbox,
        ctl_tx: &tokio::sync::mpsc::Sender<RelayCtl>,
        ctl: RelayCtl,
    ) -> Option<Next> {
        let (n, owner) = self.relay.take()?;
        let cluster = self.cluster.clone()?;
        match ctl {
            RelayCtl::End => {
                cluster.end_relay(n, &owner, None);
                self.span.record("room", "");
                None
            }
            RelayCtl::Bounce(text) => {
                cluster.end_relay(n, &owner, None);
                Some(self.on_text_here(outbox, ctl_tx, text).await)
            }
            RelayCtl::Closed(why) => {
                cluster.end_relay(n, &owner, None);
                tracing::info!(%why, "the room's node closed this connection");
                Some(if why == REASON_REPLACED {
                    Next::Close(Disconnect::Replaced, CLOSE_POLICY, REASON_REPLACED)
                } else {
                    Next::Close(Disconnect::SlowConsumer, CLOSE_POLICY, REASON_SLOW)
                })
            }
            RelayCtl::OwnerLost => {
                cluster.end_relay(n, &owner, None);
                tracing::warn!(node = %owner, "the room's node died");
                self.hub.reply(
                    outbox,
                    &ServerMessage::room_lost("the node hosting this room stopped; join again"),
                );
                None
            }
        }
    }

    fn on_binary(&mut self, outbox: &Outbox) -> Next {
        if let Some(next) = self.rate_limit(outbox) {
            return next;
        }
        self.hub.metrics().received(None);
        self.error(
            outbox,
            ErrorCode::BadRequest,
            "binary frames are not accepted; send JSON text",
            None,
        );
        Next::Continue
    }

    pub(crate) fn on_text(&mut self, outbox: &Outbox, text: &Utf8Bytes) -> Next {
        if let Some(next) = self.rate_limit(outbox) {
            return next;
        }
        let msg = match parse_client(text.as_str(), self.hub.config().limits.max_frame_bytes) {
            Ok(msg) => msg,
            Err(e) => {
                self.hub.metrics().received(None);
                tracing::debug!(code = %e.code, message = %e.message, "refused a frame");
                self.error(outbox, e.code, &e.message, e.request.as_deref());
                return Next::Continue;
            }
        };
        self.hub.metrics().received(Some(msg.type_name()));
        if self.cluster.is_some()
            && matches!(msg, ClientMessage::Join(_) | ClientMessage::Resume(_))
            && !self.in_room()
        {
            return Next::Place(msg, text.clone());
        }
        self.on_message(outbox, msg);
        Next::Continue
    }

    /// Applies the rate limit; `Some` when the frame must not be handled.
    fn rate_limit(&mut self, outbox: &Outbox) -> Option<Next> {
        match self.limiter.check(std::time::Instant::now()) {
            Verdict::Allow => None,
            Verdict::Reject => {
                self.error(
                    outbox,
                    ErrorCode::RateLimited,
                    "too many messages; slow down",
                    None,
                );
                Some(Next::Continue)
            }
            Verdict::Close => {
                tracing::warn!("closing a connection that keeps flooding");
                self.error(
                    outbox,
                    ErrorCode::RateLimited,
                    "too many messages for too long; closing the connection",
                    None,
                );
                Some(Next::Close(
                    Disconnect::RateLimit,
                    CLOSE_POLICY,
                    "rate limit",
                ))
            }
        }
    }

    /// The rate limit for a ping or pong: over the limit it is ignored
    /// (answering with an `error` would be one more write to a client that
    /// may not read); flooding on closes the connection.
    fn rate_limit_control(&mut self) -> Next {
        match self.limiter.check(std::time::Instant::now()) {
            Verdict::Allow | Verdict::Reject => Next::Continue,
            Verdict::Close => {
                tracing::warn!("closing a connection that keeps flooding control frames");
                Next::Close(Disconnect::RateLimit, CLOSE_POLICY, "rate limit")
            }
        }
    }

    fn on_message(&mut self, outbox: &Outbox, msg: ClientMessage) {
        let ty = msg.type_name();
        match msg {
            ClientMessage::Ping(p) => self.hub.reply(outbox, &ServerMessage::Pong(p)),
            ClientMessage::Join(join) => {
                self.forget_if_gone();
                if let Some((room, _)) = &self.joined {
                    let text = format!("already in room {room}; leave it first");
                    self.error(outbox, ErrorCode::AlreadyInRoom, &text, Some(ty));
                    return;
                }
                let room = join.room.clone();
                if let JoinOutcome::Joined(id) =
                    self.hub.join_as(outbox, join, self.ip, self.client)
                {
                    self.span.record("room", room.as_str());
                    self.span.record("participant", id.as_str());
                    tracing::info!("joined");
                    self.joined = Some((room, id));
                }
            }
            ClientMessage::Resume(r) => {
                self.forget_if_gone();
                if let Some((room, _)) = &self.joined {
                    let text = format!("already in room {room}; leave it first");
                    self.error(outbox, ErrorCode::AlreadyInRoom, &text, Some(ty));
                    return;
                }
                if self.hub.resume(outbox, &r).is_ok() {
                    self.span.record("room", r.room.as_str());
                    self.span.record("participant", r.id.as_str());
                    self.joined = Some((r.room, r.id));
                }
            }
            ClientMessage::Leave(leave) => {
                if let Some((room, id)) = self.my_room(outbox, &leave.room, ty) {
                    self.hub.leave(&room, &id, Departure::Left);
                    tracing::info!("left");
                    self.joined = None;
                }
            }
            ClientMessage::Message(m) => {
                if let Some((room, id)) = self.my_room(outbox, &m.room, ty) {
                    if let Err(e) = self.hub.relay(&room, &id, m.to.as_deref(), m.data) {
                        self.error(outbox, e.code(), &e.to_string(), Some(ty));
                    }
                }
            }
            ClientMessage::TrackSettings(t) => {
                if let Some((room, id)) = self.my_room(outbox, &t.room, ty) {
                    if let Err(e) = self.hub.track_settings(&room, &id, t) {
                        self.error(outbox, e.code(), &e.to_string(), Some(ty));
                    }
                }
            }
            ClientMessage::P2pFailed(f) => {
                if let Some((room, id)) = self.my_room(outbox, &f.room, ty) {
                    match self.hub.p2p_failed(&room, &id, &f.peer) {
                        Ok(()) => {
                            tracing::info!(peer = %f.peer.chars().take(64).collect::<String>(), "p2p failed")
                        }
                        Err(e) => self.error(outbox, e.code(), &e.to_string(), Some(ty)),
                    }
                }
            }
        }
    }

    /// The connection's room and id when `named` is that room; otherwise
    /// answers `not-in-room`.
    fn my_room(
        &mut self,
        outbox: &Outbox,
        named: &RoomName,
        ty: &str,
    ) -> Option<(RoomName, ParticipantId)> {
        self.forget_if_gone();
        match &self.joined {
            Some((room, id)) if room == named => Some((room.clone(), id.clone())),
            Some((room, _)) => {
                let text = format!("you are in room {room}, not {named}");
                self.error(outbox, ErrorCode::NotInRoom, &text, Some(ty));
                None
            }
            None => {
                self.error(outbox, ErrorCode::NotInRoom, "join a room first", Some(ty));
                None
            }
        }
    }

    /// Forgets the room when this participant is no longer in it (replaced
    /// by a newer join with its identity, or removed by an administrator;
    /// it was told so with an `error`).
    fn forget_if_gone(&mut self) {
        if let Some((room, id)) = &self.joined {
            if !self.hub.is_member(room, id) {
                self.joined = None;
            }
        }
    }

    fn error(&self, outbox: &Outbox, code: ErrorCode, message: &str, request: Option<&str>) {
        self.hub
            .reply(outbox, &ServerMessage::error(code, message, request));
    }
}

/// One write to the socket, bounded by `limit`: a client that does not read
/// (its TCP window full) cannot hold the connection's task. A write error
/// is the socket closing, or the write buffer over its cap.
async fn write<S>(sink: &mut S, msg: Message, limit: Duration) -> Result<(), Disconnect>
where
    S: SinkExt<Message> + Unpin,
{
    match tokio::time::timeout(limit, sink.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Disconnect::Closed),
        Err(_) => {
            tracing::warn!(
                ?limit,
                "closing a connection that does not read its messages"
            );
            Err(Disconnect::SlowConsumer)
        }
    }
}

/// Writes whatever is already queued (bounded: the outbox is), so a final
/// `error` reaches the client before the close frame.
async fn drain<S>(rx: &mut tokio::sync::mpsc::Receiver<Utf8Bytes>, sink: &mut S)
where
    S: SinkExt<Message> + Unpin,
{
    let write_all = async {
        while let Ok(text) = rx.try_recv() {
            if sink.send(Message::Text(text)).await.is_err() {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write_all).await;
}

async fn close<S>(sink: &mut S, code: u16, reason: &'static str)
where
    S: SinkExt<Message> + Unpin,
{
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    };
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        sink.send(Message::Close(Some(frame))),
    )
    .await;
}
