//! Prometheus metrics, all named `switchboard_<subsystem>_<name>[_unit]`.
//!
//! Every labelled counter is created with all its label values up front, so
//! dashboards see zeros instead of missing series, and the hot path indexes
//! an array instead of hashing label strings.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use switchboard_proto::{ErrorCode, ModeReason, CLIENT_TYPES, SERVER_TYPES};

pub mod layers;

/// Why a signaling connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    /// The client closed it (close frame or TCP end).
    Closed,
    /// Nothing received within the WebSocket timeout.
    Timeout,
    /// Sustained flooding past the rate limit.
    RateLimit,
    /// The client did not read its messages fast enough.
    SlowConsumer,
    /// A frame over the hard limit, or a protocol error in the WebSocket layer.
    ProtocolError,
    /// The server is shutting down.
    Shutdown,
    /// A `resume` on another connection took its participant over.
    Replaced,
}

impl Disconnect {
    pub const ALL: [Disconnect; 7] = [
        Disconnect::Closed,
        Disconnect::Timeout,
        Disconnect::RateLimit,
        Disconnect::SlowConsumer,
        Disconnect::ProtocolError,
        Disconnect::Shutdown,
        Disconnect::Replaced,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Disconnect::Closed => "closed",
            Disconnect::Timeout => "timeout",
            Disconnect::RateLimit => "rate-limit",
            Disconnect::SlowConsumer => "slow-consumer",
            Disconnect::ProtocolError => "protocol-error",
            Disconnect::Shutdown => "shutdown",
            Disconnect::Replaced => "replaced",
        }
    }
}

/// Labels of `switchboard_rooms_by_participants` and their upper bounds.
const ROOM_SIZE_BUCKETS: [(&str, usize); 8] = [
    ("1", 1),
    ("2", 2),
    ("3-4", 4),
    ("5-10", 10),
    ("11-25", 25),
    ("26-50", 50),
    ("51-100", 100),
    ("101+", usize::MAX),
];

fn room_size_bucket(n: usize) -> Option<usize> {
    if n == 0 {
        return None;
    }
    ROOM_SIZE_BUCKETS.iter().position(|(_, max)| n <= *max)
}

/// Why a join was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    RoomFull,
    TooManyRooms,
}

pub struct Metrics {
    registry: Registry,
    /// Tasks alive in the server's tokio runtime, read at each scrape.
    runtime_tasks: IntGauge,
    pub connections: IntGauge,
    pub connections_opened: IntCounter,
    pub rooms: IntGauge,
    pub participants: IntGauge,
    received: Vec<IntCounter>,
    received_invalid: IntCounter,
    sent: Vec<IntCounter>,
    errors: Vec<IntCounter>,
    mode_switches: Vec<IntCounter>,
    disconnects: Vec<IntCounter>,
    refused: [IntCounter; 2],
    /// Server-side PeerConnections that exist now.
    pub media_connections: IntGauge,
    media_datagrams_in: IntCounter,
    media_bytes_in: IntCounter,
    media_datagrams_out: IntCounter,
    media_bytes_out: IntCounter,
    /// RTP packets written to a subscriber.
    pub media_forwarded: IntCounter,
    media_dropped: IntCounterVec,
    /// The counter of each known drop reason, resolved once: a drop on the
    /// media path finds its counter without the vector's lock.
    media_dropped_known: Vec<(&'static str, IntCounter)>,
    /// PLI/FIR received from subscribers.
    pub keyframe_requests_in: IntCounter,
    /// PLIs sent to publishers.
    pub plis_sent: IntCounter,
    /// Server connections removed because their peer went silent.
    pub media_timeouts: IntCounter,
    /// Framed packets received over ICE-TCP.
    pub media_tcp_in: IntCounter,
    /// Datagrams worker 0 read for another worker and handed over.
    pub media_handed_over: IntCounter,
    /// Sockets connected to one peer on the media port (`direct`).
    pub media_direct_sockets: IntGauge,
    /// Datagrams (and ICE-TCP frames) each media worker handled, by `worker`.
    pub worker_datagrams: IntCounterVec,
    /// Rooms each media worker holds, by `worker`.
    pub worker_rooms: IntGaugeVec,
    /// Packets subscribers asked to be sent again (generic NACK).
    pub nacks_received: IntCounter,
    /// Packets the server asked publishers to send again.
    pub nacks_sent: IntCounter,
    /// NACKed packets sent again from the published stream's history.
    pub nack_answered: IntCounter,
    /// NACKed packets not sent again: no longer kept (older than the
    /// history's span), never sent on that stream, or sent again just now
    /// or too often.
    pub nack_not_sent: IntCounter,
    connection_states: IntGaugeVec,
    /// Server-side PeerConnection state changes, by the state entered.
    connection_transitions: IntCounterVec,
    rooms_by_size: Vec<IntGauge>,
    /// From a packet's arrival at the socket to its last copy handed to a
    /// subscriber's connection.
    pub forward_latency: Histogram,
    /// The audio mixer of `audio: "mix"` rooms.
    pub mixer: MixerMetrics,
    /// Joins refused for their token, by reason.
    auth_refused: Vec<IntCounter>,
    /// Participants replaced by a newer join with the same identity.
    pub auth_replaced: IntCounter,
    /// Webhook delivery.
    pub webhooks: WebhookMetrics,
    /// Admin API requests, by outcome class.
    admin_requests: Vec<IntCounter>,
    /// What the hardening limits stopped, by limit.
    limited: Vec<IntCounter>,
    /// Participants whose WebSocket dropped, waiting for `resume`.
    pub parked: IntGauge,
    /// `resume` outcomes and expired waits.
    resumes: IntCounterVec,
    /// Socket.IO (classic) connections open now.
    pub socketio_connections: IntGauge,
    /// Classic events not acted on, by reason.
    socketio_dropped: Vec<IntCounter>,
    /// Cluster mode (`--redis-url`); registered in single-node mode too.
    pub cluster: ClusterMetrics,
    /// Simulcast layers, estimates, the allocator.
    pub layers: layers::LayerMetrics,
}

/// Labels of `switchboard_resumes_total`.
pub const RESUME_RESULTS: [&str; 5] = ["resumed", "took-over", "unknown", "overflowed", "expired"];

/// Why a classic Socket.IO event was not acted on (labels of
/// `switchboard_socketio_dropped_total`). Classic clients have no `error`
/// event: these counters are the only trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassicDrop {
    /// Arguments of the wrong shape or type (e.g. `message` data not an
    /// offer, answer or candidate the server can read).
    Malformed,
    /// An event the classic protocol does not have.
    UnknownEvent,
    /// Over the connection's rate limit.
    RateLimited,
    /// Larger than `--max-frame-bytes`.
    TooLarge,
    /// `leave`/`message` for a room the client is not in, or `join` while in one.
    WrongRoom,
    /// The hub refused the request (e.g. a relayed message to nobody).
    Refused,
}

impl ClassicDrop {
    pub const ALL: [ClassicDrop; 6] = [
        ClassicDrop::Malformed,
        ClassicDrop::UnknownEvent,
        ClassicDrop::RateLimited,
        ClassicDrop::TooLarge,
        ClassicDrop::WrongRoom,
        ClassicDrop::Refused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ClassicDrop::Malformed => "malformed",
            ClassicDrop::UnknownEvent => "unknown-event",
            ClassicDrop::RateLimited => "rate-limited",
            ClassicDrop::TooLarge => "too-large",
            ClassicDrop::WrongRoom => "wrong-room",
            ClassicDrop::Refused => "refused",
        }
    }
}

/// Limits that stopped something a client tried (labels of
/// `switchboard_limited_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// A WebSocket refused: its address holds `--max-conns-per-ip`.
    ConnsPerIp,
    /// An ICE-TCP connection refused: its address holds `--max-conns-per-ip`.
    IceTcpPerIp,
    /// A room not created: its creator's address holds `--max-rooms-per-ip`.
    RoomsPerIp,
    /// A chat message over the size cap, dropped.
    ChatSize,
    /// A chat message over its sender's rate, dropped.
    ChatRate,
    /// A chat copy not sent to a subscriber whose data channel is backed up.
    ChatBacklog,
    /// An SDP offer over the connection's offer budget, refused.
    OfferRate,
    /// An SDP offer with too many m-sections, refused.
    MediaSections,
    /// An SDP offer with too many candidates, refused.
    Candidates,
    /// Sending m-sections over `--max-tracks`, rejected in the answer.
    Tracks,
    /// An SDP offer with more simulcast encodings in a section than the
    /// server forwards (3), refused.
    Encodings,
}

impl Limit {
    pub const ALL: [Limit; 11] = [
        Limit::ConnsPerIp,
        Limit::IceTcpPerIp,
        Limit::RoomsPerIp,
        Limit::ChatSize,
        Limit::ChatRate,
        Limit::ChatBacklog,
        Limit::OfferRate,
        Limit::MediaSections,
        Limit::Candidates,
        Limit::Tracks,
        Limit::Encodings,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Limit::ConnsPerIp => "conns-per-ip",
            Limit::IceTcpPerIp => "ice-tcp-per-ip",
            Limit::RoomsPerIp => "rooms-per-ip",
            Limit::ChatSize => "chat-size",
            Limit::ChatRate => "chat-rate",
            Limit::ChatBacklog => "chat-backlog",
            Limit::OfferRate => "offer-rate",
            Limit::MediaSections => "media-sections",
            Limit::Candidates => "candidates",
            Limit::Tracks => "tracks",
            Limit::Encodings => "encodings",
        }
    }
}

/// The reasons `switchboard_media_dropped_total` is labelled with: the
/// demux's (`DropReason::as_str`), the rewriter's (`RewriteDrop::as_str`)
/// and the transport's own.
pub const MEDIA_DROP_REASONS: [&str; 29] = [
    // demux
    "empty",
    "oversize",
    "unclassified",
    "stun-malformed",
    "stun-bad-username",
    "unknown-ufrag",
    "stun-bad-integrity",
    "unknown-address",
    // rewriter
    "before-switch",
    "too-old",
    "stale-source",
    // transport
    // video for a new subscriber before the first keyframe it can decode
    "before-keyframe",
    "chat-forbidden",
    // a classic client's speaker video whose VP8 descriptor does not parse
    "bad-descriptor",
    "extra-encoding",
    "chat-not-utf8",
    "forbidden",
    "muted",
    // a subscriber's connection before DTLS is up (nothing can be sent)
    "not-connected",
    "not-negotiated",
    "rejected",
    "send-failed",
    // the kernel dropped it: the media socket's receive buffer was full
    "socket-overflow",
    "standby",
    "tcp-send-failed",
    "unknown-peer",
    "unknown-track",
    // the reader's queue to another media worker was full
    "worker-queue-full",
    "write-failed",
];

/// Reasons a join's token is refused (labels of `switchboard_auth_refused_total`).
pub const AUTH_REFUSALS: [&str; 10] = [
    "missing",
    "malformed",
    "unknown-key",
    "bad-signature",
    "expired",
    "not-yet-valid",
    "no-room-join",
    "wrong-room",
    "bad-identity",
    "not-granted",
];

/// Admin API outcomes (labels of `switchboard_admin_requests_total`).
pub const ADMIN_OUTCOMES: [&str; 3] = ["ok", "client-error", "unauthorized"];

/// Webhook delivery counters.
pub struct WebhookMetrics {
    /// Events delivered (a 2xx answer).
    pub delivered: IntCounter,
    /// Attempts that failed (error, timeout or non-2xx) and were retried or given up.
    pub failed_attempts: IntCounter,
    /// Events dropped: `queue-full` (the URL's queue was full) or `gave-up`
    /// (every attempt failed).
    dropped: [IntCounter; 2],
}

impl WebhookMetrics {
    pub fn dropped_queue_full(&self) {
        self.dropped[0].inc();
    }
    pub fn dropped_gave_up(&self) {
        self.dropped[1].inc();
    }
}

/// Why the mixer dropped an input packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MixDrop {
    /// The publisher's audio is not Opus (payload type is not its Opus one).
    NotOpus,
    /// libopus could not decode it.
    Corrupt,
    /// Empty or larger than a packet can be.
    Invalid,
}

impl MixDrop {
    pub const ALL: [MixDrop; 3] = [MixDrop::NotOpus, MixDrop::Corrupt, MixDrop::Invalid];

    pub fn as_str(self) -> &'static str {
        match self {
            MixDrop::NotOpus => "not-opus",
            MixDrop::Corrupt => "corrupt",
            MixDrop::Invalid => "invalid",
        }
    }
}

/// `switchboard_mixer_*`.
pub struct MixerMetrics {
    /// Wall time of one mixer tick (all mixing rooms of the media thread).
    pub tick: Histogram,
    /// How late a tick started against its 20 ms schedule (the jitter).
    pub tick_lateness: Histogram,
    /// Ticks skipped because the mixer fell a whole frame or more behind.
    pub overruns: IntCounter,
    pub decodes: IntCounter,
    pub encodes: IntCounter,
    /// Frames that arrived after their playout time.
    pub late_frames: IntCounter,
    /// Frames missing at playout time (concealed when possible).
    pub lost_frames: IntCounter,
    /// Of the lost, those concealed by PLC or recovered by FEC.
    pub concealed_frames: IntCounter,
    dropped: Vec<IntCounter>,
    /// Inputs being mixed now (the loudest K of each room).
    pub active_speakers: IntGauge,
    /// Rooms being mixed now.
    pub rooms: IntGauge,
}

impl MixerMetrics {
    pub fn dropped(&self, why: MixDrop, n: u64) {
        if let Some(i) = MixDrop::ALL.iter().position(|d| *d == why) {
            self.dropped[i].inc_by(n);
        }
    }
}

/// Which way a signaling message was relayed between nodes (labels of
/// `switchboard_cluster_relayed_messages_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayDirection {
    /// A client's frame, from the node holding its WebSocket to the room's owner.
    ToOwner,
    /// An owner's message, delivered to a client connected to this node.
    ToClient,
}

impl RelayDirection {
    pub const ALL: [RelayDirection; 2] = [RelayDirection::ToOwner, RelayDirection::ToClient];

    pub fn as_str(self) -> &'static str {
        match self {
            RelayDirection::ToOwner => "to-owner",
            RelayDirection::ToClient => "to-client",
        }
    }
}

/// Why a relayed message was dropped (labels of
/// `switchboard_cluster_relay_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayDrop {
    /// An envelope that does not parse, or names the wrong node.
    Malformed,
    /// For a relayed connection this node does not know (any more).
    UnknownConnection,
    /// A relay queue (to Redis or to a connection) was full.
    QueueFull,
}

impl RelayDrop {
    pub const ALL: [RelayDrop; 3] = [
        RelayDrop::Malformed,
        RelayDrop::UnknownConnection,
        RelayDrop::QueueFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RelayDrop::Malformed => "malformed",
            RelayDrop::UnknownConnection => "unknown-connection",
            RelayDrop::QueueFull => "queue-full",
        }
    }
}

/// Where a join's room was found or put (labels of
/// `switchboard_cluster_placements_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// A new room, claimed for this node.
    Local,
    /// A new room, claimed for another node.
    Remote,
    /// A room this node already owns.
    ExistingLocal,
    /// A room another live node owns.
    ExistingRemote,
    /// A room whose owner was dead, claimed again.
    Takeover,
    /// Not placed: Redis unreachable or no live node to take it.
    Unavailable,
}

impl Placement {
    pub const ALL: [Placement; 6] = [
        Placement::Local,
        Placement::Remote,
        Placement::ExistingLocal,
        Placement::ExistingRemote,
        Placement::Takeover,
        Placement::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Placement::Local => "local",
            Placement::Remote => "remote",
            Placement::ExistingLocal => "existing-local",
            Placement::ExistingRemote => "existing-remote",
            Placement::Takeover => "takeover",
            Placement::Unavailable => "unavailable",
        }
    }
}

/// Redis operations of cluster mode (the `op` label of
/// `switchboard_cluster_redis_seconds` and `switchboard_cluster_redis_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisOp {
    /// The node's announcement, claim refreshes and the read of live nodes.
    Keepalive,
    /// Finding or claiming a join's room.
    Place,
    /// Releasing (or taking) room claims.
    Claim,
    /// Publishing relayed messages.
    Publish,
    /// Checking that relayed connections' other nodes are alive.
    Liveness,
}

impl RedisOp {
    pub const ALL: [RedisOp; 5] = [
        RedisOp::Keepalive,
        RedisOp::Place,
        RedisOp::Claim,
        RedisOp::Publish,
        RedisOp::Liveness,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RedisOp::Keepalive => "keepalive",
            RedisOp::Place => "place",
            RedisOp::Claim => "claim",
            RedisOp::Publish => "publish",
            RedisOp::Liveness => "liveness",
        }
    }
}

/// `switchboard_cluster_*`: cluster mode (`--redis-url`). Registered in
/// single-node mode too, where they stay 0.
pub struct ClusterMetrics {
    /// 1 while Redis answers (the node is announced), else 0.
    pub redis_up: IntGauge,
    /// Live nodes this node sees, itself included (0 in single-node mode).
    pub nodes_live: IntGauge,
    /// Rooms this node holds the claim of.
    pub rooms_owned: IntGauge,
    relayed: Vec<IntCounter>,
    relay_dropped: Vec<IntCounter>,
    placements: Vec<IntCounter>,
    redis_seconds: Vec<Histogram>,
    redis_errors: Vec<IntCounter>,
}

impl ClusterMetrics {
    /// A signaling message relayed through Redis.
    pub fn relayed(&self, dir: RelayDirection) {
        if let Some(c) = self.relayed.get(dir as usize) {
            c.inc();
        }
    }

    /// A relayed message dropped.
    pub fn relay_dropped(&self, why: RelayDrop) {
        if let Some(c) = self.relay_dropped.get(why as usize) {
            c.inc();
        }
    }

    /// Where a join's room was found or put.
    pub fn placed(&self, outcome: Placement) {
        if let Some(c) = self.placements.get(outcome as usize) {
            c.inc();
        }
    }

    /// One Redis round trip of `op` took `seconds` (failed ones too).
    pub fn redis_op(&self, op: RedisOp, seconds: f64) {
        if let Some(h) = self.redis_seconds.get(op as usize) {
            h.observe(seconds);
        }
    }

    /// A Redis operation failed or timed out.
    pub fn redis_error(&self, op: RedisOp) {
        if let Some(c) = self.redis_errors.get(op as usize) {
            c.inc();
        }
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).unwrap_or_else(|e| unreachable!("{e}"));
            register(&registry, g.clone());
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).unwrap_or_else(|e| unreachable!("{e}"));
            register(&registry, c.clone());
            c
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let v = IntCounterVec::new(Opts::new(name, help), &[label])
                .unwrap_or_else(|e| unreachable!("{e}"));
            register(&registry, v.clone());
            v
        };
        let gauge_vec = |name: &str, help: &str, label: &str| {
            let v = IntGaugeVec::new(Opts::new(name, help), &[label])
                .unwrap_or_else(|e| unreachable!("{e}"));
            register(&registry, v.clone());
            v
        };
        let labelled = |name: &str, help: &str, label: &str, values: &[&str]| {
            let v = counter_vec(name, help, label);
            values
                .iter()
                .map(|l| v.with_label_values(&[*l]))
                .collect::<Vec<_>>()
        };
        let received_names: Vec<&str> = CLIENT_TYPES.iter().copied().chain(["invalid"]).collect();
        let mut received = labelled(
            "switchboard_signaling_messages_received_total",
            "Signaling messages received, by type (invalid: not parseable as a known type)",
            "type",
            &received_names,
        );
        let received_invalid = received.pop().unwrap_or_else(|| unreachable!());
        let refused = labelled(
            "switchboard_room_joins_refused_total",
            "Joins answered with `full`, by reason",
            "reason",
            &["room-full", "too-many-rooms"],
        );
        let mut nack_answers = labelled(
            "switchboard_media_nack_answers_total",
            "Packets subscribers' NACKs asked for, by outcome: sent again from the published \
             stream's history (shared by all its subscribers, 1 s), or not sent: no longer \
             kept, never sent on that stream, or already sent again just now or 4 times",
            "result",
            &["sent", "not-sent"],
        );
        let nack_not_sent = nack_answers.pop().unwrap_or_else(|| unreachable!());
        let nack_answered = nack_answers.pop().unwrap_or_else(|| unreachable!());
        let media_dropped = counter_vec(
            "switchboard_media_dropped_total",
            "Datagrams or RTP packets dropped, by reason",
            "reason",
        );
        Metrics {
            runtime_tasks: gauge(
                "switchboard_runtime_alive_tasks",
                "Tasks alive in the server's tokio runtime (read when scraped)",
            ),
            connections: gauge(
                "switchboard_signaling_connections",
                "Open signaling WebSocket connections",
            ),
            connections_opened: counter(
                "switchboard_signaling_connections_opened_total",
                "Signaling WebSocket connections accepted",
            ),
            rooms: gauge("switchboard_rooms", "Rooms that exist now"),
            participants: gauge("switchboard_participants", "Participants in rooms now"),
            received,
            received_invalid,
            sent: labelled(
                "switchboard_signaling_messages_sent_total",
                "Signaling messages sent, by type",
                "type",
                &SERVER_TYPES,
            ),
            errors: labelled(
                "switchboard_signaling_errors_total",
                "`error` messages sent, by code",
                "code",
                &ErrorCode::ALL.map(ErrorCode::as_str),
            ),
            mode_switches: labelled(
                "switchboard_room_mode_switches_total",
                "Rooms that changed media mode, by reason",
                "reason",
                &ModeReason::ALL.map(ModeReason::as_str),
            ),
            disconnects: labelled(
                "switchboard_signaling_disconnects_total",
                "Signaling connections ended, by reason",
                "reason",
                &Disconnect::ALL.map(Disconnect::as_str),
            ),
            refused: [refused[0].clone(), refused[1].clone()],
            media_connections: gauge(
                "switchboard_media_connections",
                "Server-side PeerConnections (one per participant in SFU mode or on standby)",
            ),
            media_datagrams_in: counter(
                "switchboard_media_datagrams_received_total",
                "Datagrams received on the media port and routed to a connection",
            ),
            media_bytes_in: counter(
                "switchboard_media_received_bytes_total",
                "Bytes of routed datagrams received on the media port",
            ),
            media_datagrams_out: counter(
                "switchboard_media_datagrams_sent_total",
                "Datagrams sent from the media port",
            ),
            media_bytes_out: counter(
                "switchboard_media_sent_bytes_total",
                "Bytes sent from the media port",
            ),
            media_forwarded: counter(
                "switchboard_media_rtp_forwarded_total",
                "RTP packets forwarded to a subscriber",
            ),
            // Resolving every known reason also makes it exist from the
            // first scrape: dashboards and alerts see 0, not "No data".
            media_dropped_known: MEDIA_DROP_REASONS
                .iter()
                .map(|r| (*r, media_dropped.with_label_values(&[r])))
                .collect(),
            media_dropped,
            keyframe_requests_in: counter(
                "switchboard_media_keyframe_requests_received_total",
                "PLI and FIR received from subscribers",
            ),
            plis_sent: counter(
                "switchboard_media_plis_sent_total",
                "PLIs sent to publishers (after throttling)",
            ),
            media_handed_over: counter(
                "switchboard_media_handed_over_total",
                "Datagrams worker 0 read for another media worker and handed over (a peer without a direct socket yet)",
            ),
            media_direct_sockets: gauge(
                "switchboard_media_direct_sockets",
                "Sockets on the media port connected to one peer, read by that peer's worker",
            ),
            media_tcp_in: counter(
                "switchboard_media_tcp_packets_received_total",
                "Framed packets received over ICE-TCP (also counted as datagrams received)",
            ),
            nacks_received: counter(
                "switchboard_media_nacked_packets_received_total",
                "Packets that subscribers' generic NACKs asked for (answered from the published stream's history, RTX where negotiated)",
            ),
            nacks_sent: counter(
                "switchboard_media_nacked_packets_sent_total",
                "Packets the server's NACKs asked publishers to send again",
            ),
            nack_answered,
            nack_not_sent,
            connection_transitions: {
                let v = counter_vec(
                    "switchboard_media_connection_transitions_total",
                    "Server-side PeerConnection state changes, by the state entered (a \
                     `disconnected` count growing with connections up means clients' \
                     consent checks are missed)",
                    "to",
                );
                for s in ["new", "connecting", "connected", "disconnected", "failed", "closed"] {
                    v.with_label_values(&[s]).inc_by(0);
                }
                v
            },
            worker_datagrams: counter_vec(
                "switchboard_media_worker_datagrams_total",
                "Datagrams and ICE-TCP frames routed to each media worker's connections",
                "worker",
            ),
            worker_rooms: gauge_vec(
                "switchboard_media_worker_rooms",
                "Rooms each media worker holds (every member of a room is on its worker)",
                "worker",
            ),
            connection_states: {
                let v = gauge_vec(
                    "switchboard_media_connections_by_state",
                    "Server-side PeerConnections by connection state",
                    "state",
                );
                for s in ["new", "connecting", "connected", "disconnected", "failed", "closed"] {
                    v.with_label_values(&[s]).set(0);
                }
                v
            },
            rooms_by_size: {
                let v = gauge_vec(
                    "switchboard_rooms_by_participants",
                    "Rooms by how many participants they hold now",
                    "participants",
                );
                ROOM_SIZE_BUCKETS
                    .iter()
                    .map(|(label, _)| v.with_label_values(&[*label]))
                    .collect()
            },
            media_timeouts: counter(
                "switchboard_media_connection_timeouts_total",
                "Server connections removed because the peer sent nothing for 8 s",
            ),
            forward_latency: {
                // 5 µs to 20 ms: forwarding on an idle server takes ~10 µs.
                let buckets = vec![
                    5e-6, 10e-6, 20e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3,
                    10e-3, 20e-3,
                ];
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "switchboard_media_forward_latency_seconds",
                        "From a forwarded packet's arrival at the socket until its copies have been encrypted and sent",
                    )
                    .buckets(buckets),
                )
                .unwrap_or_else(|e| unreachable!("{e}"));
                register(&registry, h.clone());
                h
            },
            mixer: MixerMetrics {
                tick: {
                    let h = Histogram::with_opts(
                        HistogramOpts::new(
                            "switchboard_mixer_tick_seconds",
                            "Time one 20 ms mixer tick took (decode, mix, encode and send for every mixed room)",
                        )
                        .buckets(vec![
                            50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3,
                        ]),
                    )
                    .unwrap_or_else(|e| unreachable!("{e}"));
                    register(&registry, h.clone());
                    h
                },
                tick_lateness: {
                    let h = Histogram::with_opts(
                        HistogramOpts::new(
                            "switchboard_mixer_tick_lateness_seconds",
                            "How late a mixer tick started against its 20 ms schedule",
                        )
                        .buckets(vec![100e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3]),
                    )
                    .unwrap_or_else(|e| unreachable!("{e}"));
                    register(&registry, h.clone());
                    h
                },
                overruns: counter(
                    "switchboard_mixer_tick_overruns_total",
                    "Mixer ticks skipped because the mixer fell a whole 20 ms frame behind",
                ),
                decodes: counter(
                    "switchboard_mixer_decodes_total",
                    "Opus packets the mixer decoded",
                ),
                encodes: counter(
                    "switchboard_mixer_encodes_total",
                    "Opus frames the mixer encoded (shared mixes plus per-speaker mixes)",
                ),
                late_frames: counter(
                    "switchboard_mixer_late_frames_total",
                    "Input frames that arrived after their playout time",
                ),
                lost_frames: counter(
                    "switchboard_mixer_lost_frames_total",
                    "Input frames missing at playout time",
                ),
                concealed_frames: counter(
                    "switchboard_mixer_concealed_frames_total",
                    "Missing input frames concealed (Opus PLC) or recovered (in-band FEC)",
                ),
                dropped: labelled(
                    "switchboard_mixer_input_dropped_total",
                    "Input packets the mixer dropped, by reason",
                    "reason",
                    &MixDrop::ALL.map(MixDrop::as_str),
                ),
                active_speakers: gauge(
                    "switchboard_mixer_active_speakers",
                    "Inputs being mixed now (the loudest K of each mixed room)",
                ),
                rooms: gauge("switchboard_mixer_rooms", "Rooms whose audio is mixed now"),
            },
            parked: gauge(
                "switchboard_parked_participants",
                "Participants whose WebSocket dropped, kept (media flowing) for a resume",
            ),
            resumes: {
                let v = counter_vec(
                    "switchboard_resumes_total",
                    "Resume outcomes: resumed, took-over (the old connection was still open), refused (unknown, overflowed), \
                     or expired (the window passed)",
                    "result",
                );
                for r in RESUME_RESULTS {
                    v.with_label_values(&[r]).inc_by(0);
                }
                v
            },
            socketio_connections: gauge(
                "switchboard_socketio_connections",
                "Classic Socket.IO connections open now",
            ),
            socketio_dropped: labelled(
                "switchboard_socketio_dropped_total",
                "Classic Socket.IO events not acted on (they get no error event), by reason",
                "reason",
                &ClassicDrop::ALL.map(ClassicDrop::as_str),
            ),
            limited: labelled(
                "switchboard_limited_total",
                "Client actions stopped by a limit (per-address caps, chat and offer limits), by limit",
                "limit",
                &Limit::ALL.map(Limit::as_str),
            ),
            auth_refused: labelled(
                "switchboard_auth_refused_total",
                "Joins refused for their access token, by reason",
                "reason",
                &AUTH_REFUSALS,
            ),
            auth_replaced: counter(
                "switchboard_auth_replaced_total",
                "Participants replaced by a newer join with the same identity",
            ),
            webhooks: {
                let dropped = labelled(
                    "switchboard_webhook_dropped_total",
                    "Webhook events dropped: queue-full (the URL's bounded queue was full) or gave-up (every retry failed)",
                    "reason",
                    &["queue-full", "gave-up"],
                );
                WebhookMetrics {
                    delivered: counter(
                        "switchboard_webhook_delivered_total",
                        "Webhook events delivered (2xx answer)",
                    ),
                    failed_attempts: counter(
                        "switchboard_webhook_failed_attempts_total",
                        "Webhook POSTs that failed (error, timeout, non-2xx)",
                    ),
                    dropped: [dropped[0].clone(), dropped[1].clone()],
                }
            },
            admin_requests: labelled(
                "switchboard_admin_requests_total",
                "Admin API requests, by outcome",
                "outcome",
                &ADMIN_OUTCOMES,
            ),
            cluster: ClusterMetrics {
                redis_up: gauge(
                    "switchboard_cluster_redis_up",
                    "1 while Redis answers and this node is announced in it, else 0 (always 0 in single-node mode)",
                ),
                nodes_live: gauge(
                    "switchboard_cluster_nodes_live",
                    "Live cluster nodes this node sees, itself included (0 in single-node mode)",
                ),
                rooms_owned: gauge(
                    "switchboard_cluster_rooms_owned",
                    "Rooms whose claim in Redis this node holds",
                ),
                relayed: labelled(
                    "switchboard_cluster_relayed_messages_total",
                    "Signaling messages relayed through Redis: to-owner (a client's, to the room's node) or to-client (an owner's, to a client here)",
                    "direction",
                    &RelayDirection::ALL.map(RelayDirection::as_str),
                ),
                relay_dropped: labelled(
                    "switchboard_cluster_relay_dropped_total",
                    "Relayed signaling messages dropped, by reason",
                    "reason",
                    &RelayDrop::ALL.map(RelayDrop::as_str),
                ),
                placements: labelled(
                    "switchboard_cluster_placements_total",
                    "Joins placed through the room directory, by outcome",
                    "outcome",
                    &Placement::ALL.map(Placement::as_str),
                ),
                redis_seconds: {
                    // 100 µs to 1 s: a Redis round trip on a LAN takes ~0.2-1 ms;
                    // operations time out after 1.5 s (counted in +Inf).
                    let v = HistogramVec::new(
                        HistogramOpts::new(
                            "switchboard_cluster_redis_seconds",
                            "Redis round trips of cluster mode, by operation (failed and timed-out ones too)",
                        )
                        .buckets(vec![
                            100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
                            100e-3, 250e-3, 500e-3, 1.0,
                        ]),
                        &["op"],
                    )
                    .unwrap_or_else(|e| unreachable!("{e}"));
                    register(&registry, v.clone());
                    RedisOp::ALL
                        .iter()
                        .map(|op| v.with_label_values(&[op.as_str()]))
                        .collect()
                },
                redis_errors: labelled(
                    "switchboard_cluster_redis_errors_total",
                    "Redis operations of cluster mode that failed or timed out, by operation",
                    "op",
                    &RedisOp::ALL.map(RedisOp::as_str),
                ),
            },
            layers: layers::LayerMetrics::new(&registry),
            registry,
        }
    }

    /// A client message of wire type `ty`, or `None` when it did not parse.
    pub fn received(&self, ty: Option<&str>) {
        match ty.and_then(|t| CLIENT_TYPES.iter().position(|c| *c == t)) {
            Some(i) => self.received[i].inc(),
            None => self.received_invalid.inc(),
        }
    }

    /// A server message of wire type `ty`.
    pub fn sent(&self, ty: &str, count: u64) {
        if let Some(i) = SERVER_TYPES.iter().position(|c| *c == ty) {
            self.sent[i].inc_by(count);
        }
    }

    pub fn error(&self, code: ErrorCode) {
        if let Some(i) = ErrorCode::ALL.iter().position(|c| *c == code) {
            self.errors[i].inc();
        }
    }

    pub fn mode_switch(&self, reason: ModeReason) {
        if let Some(i) = ModeReason::ALL.iter().position(|c| *c == reason) {
            self.mode_switches[i].inc();
        }
    }

    pub fn disconnect(&self, why: Disconnect) {
        if let Some(i) = Disconnect::ALL.iter().position(|c| *c == why) {
            self.disconnects[i].inc();
        }
    }

    /// A join refused for its token; `reason` is one of [`AUTH_REFUSALS`].
    pub fn auth_refused(&self, reason: &str) {
        if let Some(i) = AUTH_REFUSALS.iter().position(|r| *r == reason) {
            self.auth_refused[i].inc();
        }
    }

    /// An admin API request with `outcome` one of [`ADMIN_OUTCOMES`].
    pub fn admin_request(&self, outcome: &str) {
        if let Some(i) = ADMIN_OUTCOMES.iter().position(|r| *r == outcome) {
            self.admin_requests[i].inc();
        }
    }

    /// A `resume` outcome or an expired wait.
    pub fn resumed(&self, result: &str) {
        self.resumes.with_label_values(&[result]).inc();
    }

    pub fn classic_dropped(&self, why: ClassicDrop) {
        self.socketio_dropped[why as usize].inc();
    }

    /// A limit stopped something.
    pub fn limited(&self, limit: Limit) {
        self.limited[limit as usize].inc();
    }

    pub fn refused(&self, why: Refusal) {
        self.refused[why as usize].inc();
    }

    /// A datagram of `bytes` was received and routed.
    pub fn media_in(&self, bytes: usize) {
        self.media_datagrams_in.inc();
        self.media_bytes_in.inc_by(bytes as u64);
    }

    /// A datagram of `bytes` was sent.
    pub fn media_out(&self, bytes: usize) {
        self.media_datagrams_out.inc();
        self.media_bytes_out.inc_by(bytes as u64);
    }

    /// `datagrams` datagrams of `bytes` in all were sent.
    pub fn media_out_many(&self, datagrams: usize, bytes: usize) {
        if datagrams > 0 {
            self.media_datagrams_out.inc_by(datagrams as u64);
            self.media_bytes_out.inc_by(bytes as u64);
        }
    }

    /// Something on the media path was dropped for `reason` (a short,
    /// fixed string: the label set stays small).
    pub fn media_dropped(&self, reason: &'static str) {
        self.media_dropped_by(reason, 1);
    }

    /// `n` packets dropped for `reason`.
    pub fn media_dropped_by(&self, reason: &'static str, n: u64) {
        match self.media_dropped_known.iter().find(|(r, _)| *r == reason) {
            Some((_, counter)) => counter.inc_by(n),
            None => self.media_dropped.with_label_values(&[reason]).inc_by(n),
        }
    }

    /// A server connection moved from one state to another (`None`: it did
    /// not exist before / does not exist any more).
    pub fn move_connection_state(&self, from: Option<&str>, to: Option<&str>) {
        if let Some(from) = from {
            self.connection_states.with_label_values(&[from]).dec();
        }
        if let Some(to) = to {
            self.connection_states.with_label_values(&[to]).inc();
            self.connection_transitions.with_label_values(&[to]).inc();
        }
    }

    /// A room went from `from` to `to` participants (0 = it did not exist /
    /// was freed).
    pub fn room_resized(&self, from: usize, to: usize) {
        if let Some(g) = room_size_bucket(from).and_then(|i| self.rooms_by_size.get(i)) {
            g.dec();
        }
        if let Some(g) = room_size_bucket(to).and_then(|i| self.rooms_by_size.get(i)) {
            g.inc();
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let tasks = rt.metrics().num_alive_tasks();
            self.runtime_tasks
                .set(i64::try_from(tasks).unwrap_or(i64::MAX));
        }
        let mut buf = Vec::with_capacity(8192);
        // Encoding into a Vec cannot fail for well-formed metric families.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn register<C: prometheus::core::Collector + 'static>(registry: &Registry, c: C) {
    // Names are fixed and distinct, so registration cannot collide.
    if let Err(e) = registry.register(Box::new(c)) {
        unreachable!("metric registration: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_media_drop_reason_is_listed_and_exists_before_any_drop() {
        use crate::media::demux::{DropReason, StunError};
        use crate::media::rewrite::RewriteDrop;
        let demux = [
            DropReason::Empty,
            DropReason::Oversize,
            DropReason::Unclassified,
            DropReason::StunMalformed(StunError::NotStun),
            DropReason::StunBadUsername,
            DropReason::UnknownUfrag,
            DropReason::StunBadIntegrity,
            DropReason::UnknownAddress,
        ]
        .map(DropReason::as_str);
        let rewrite = [
            RewriteDrop::BeforeSwitch,
            RewriteDrop::TooOld,
            RewriteDrop::StaleSource,
        ]
        .map(RewriteDrop::as_str);
        for reason in demux.iter().chain(&rewrite) {
            assert!(
                MEDIA_DROP_REASONS.contains(reason),
                "{reason} is not listed"
            );
        }
        let text = Metrics::new().render();
        for reason in MEDIA_DROP_REASONS {
            let sample = format!("switchboard_media_dropped_total{{reason=\"{reason}\"}} 0");
            assert!(text.contains(&sample), "no {sample}");
        }
    }

    #[test]
    fn renders_every_family_with_zeroes() {
        let m = Metrics::new();
        m.received(Some("join"));
        m.received(None);
        m.error(ErrorCode::TooLarge);
        let text = m.render();
        assert!(text.contains("switchboard_signaling_messages_received_total{type=\"join\"} 1"));
        assert!(text.contains("switchboard_signaling_messages_received_total{type=\"invalid\"} 1"));
        assert!(text.contains("switchboard_signaling_errors_total{code=\"too-large\"} 1"));
        assert!(text.contains("switchboard_signaling_errors_total{code=\"internal\"} 0"));
        assert!(text.contains("switchboard_room_mode_switches_total{reason=\"p2p-failed\"} 0"));
        // Outside a runtime the task gauge stays 0; inside, it counts.
        assert!(text.contains("switchboard_runtime_alive_tasks 0"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let counted = rt.block_on(async {
            let _held = tokio::spawn(std::future::pending::<()>());
            m.render()
        });
        assert!(
            counted.contains("switchboard_runtime_alive_tasks 1"),
            "{counted}"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("switchboard_"), "{line}");
        }
    }

    #[test]
    fn cluster_families_exist_with_every_label_value() {
        // The accessors index by discriminant: `ALL` must be in that order.
        for (i, d) in RelayDirection::ALL.iter().enumerate() {
            assert_eq!(*d as usize, i);
        }
        for (i, d) in RelayDrop::ALL.iter().enumerate() {
            assert_eq!(*d as usize, i);
        }
        for (i, p) in Placement::ALL.iter().enumerate() {
            assert_eq!(*p as usize, i);
        }
        for (i, op) in RedisOp::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i);
        }
        let m = Metrics::new();
        let text = m.render();
        for sample in [
            "switchboard_cluster_redis_up 0",
            "switchboard_cluster_nodes_live 0",
            "switchboard_cluster_rooms_owned 0",
        ] {
            assert!(text.contains(&format!("\n{sample}\n")), "no {sample}");
        }
        let mut samples = Vec::new();
        for d in RelayDirection::ALL {
            samples.push(format!(
                "switchboard_cluster_relayed_messages_total{{direction=\"{}\"}} 0",
                d.as_str()
            ));
        }
        for r in RelayDrop::ALL {
            samples.push(format!(
                "switchboard_cluster_relay_dropped_total{{reason=\"{}\"}} 0",
                r.as_str()
            ));
        }
        for p in Placement::ALL {
            samples.push(format!(
                "switchboard_cluster_placements_total{{outcome=\"{}\"}} 0",
                p.as_str()
            ));
        }
        for op in RedisOp::ALL {
            let op = op.as_str();
            samples.push(format!(
                "switchboard_cluster_redis_errors_total{{op=\"{op}\"}} 0"
            ));
            samples.push(format!(
                "switchboard_cluster_redis_seconds_bucket{{op=\"{op}\",le=\"0.0001\"}} 0"
            ));
            samples.push(format!(
                "switchboard_cluster_redis_seconds_bucket{{op=\"{op}\",le=\"1\"}} 0"
            ));
            samples.push(format!(
                "switchboard_cluster_redis_seconds_count{{op=\"{op}\"}} 0"
            ));
        }
        for sample in &samples {
            assert!(text.contains(&format!("\n{sample}\n")), "no {sample}");
        }

        let c = &m.cluster;
        c.relayed(RelayDirection::ToClient);
        c.relay_dropped(RelayDrop::QueueFull);
        c.placed(Placement::ExistingRemote);
        c.redis_op(RedisOp::Publish, 0.003);
        c.redis_error(RedisOp::Liveness);
        c.redis_up.set(1);
        let text = m.render();
        for sample in [
            "switchboard_cluster_relayed_messages_total{direction=\"to-client\"} 1",
            "switchboard_cluster_relayed_messages_total{direction=\"to-owner\"} 0",
            "switchboard_cluster_relay_dropped_total{reason=\"queue-full\"} 1",
            "switchboard_cluster_placements_total{outcome=\"existing-remote\"} 1",
            "switchboard_cluster_placements_total{outcome=\"local\"} 0",
            "switchboard_cluster_redis_seconds_bucket{op=\"publish\",le=\"0.0025\"} 0",
            "switchboard_cluster_redis_seconds_bucket{op=\"publish\",le=\"0.005\"} 1",
            "switchboard_cluster_redis_seconds_count{op=\"publish\"} 1",
            "switchboard_cluster_redis_errors_total{op=\"liveness\"} 1",
            "switchboard_cluster_redis_errors_total{op=\"publish\"} 0",
            "switchboard_cluster_redis_up 1",
        ] {
            assert!(text.contains(&format!("\n{sample}\n")), "no {sample}");
        }
    }
}
