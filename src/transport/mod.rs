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
//! worker holding its connection (`reader`). Once a peer's media flows,
//! the other workers read it themselves, on a socket of the port's
//! `SO_REUSEPORT` group connected to that peer (`direct`). Every worker
//! sends on its own handle of the first socket. Each participant has one [`Peer`]: its
//! connection, the tracks it publishes and the senders of the tracks
//! forwarded to it. What
//! is forwarded to whom, with which rewriting, and when a keyframe is asked
//! for, is the router's decision; this module turns connection events into
//! router calls and router decisions into `rtc` writes.
//!
//! # Files
//!
//! - `mod.rs`: the engine's state (connections, tracks) and the dispatch
//!   of commands and actions.
//! - `worker`: [`start`], a worker's thread and loop, datagram input and
//!   output.
//! - `reader`: worker 0's reading of the port and routing to workers.
//! - `direct`: the other workers' sockets connected to their peers, which
//!   take those peers' datagrams off worker 0.
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
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rtc::media_stream::MediaStreamTrackId;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::RTCPeerConnection;
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RtpCodecKind};
use rtc::rtp_transceiver::{RTCRtpReceiverId, RTCRtpSenderId};
use rtc::sansio::Protocol;
use switchboard_proto::{ErrorCode, ParticipantId, Relayed, RoomName, ServerMessage};
use tokio::sync::mpsc;

use crate::auth::Grants;
use crate::hub::Outboxes;
use crate::media::history::{History, SentLog};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::router::{Decision, OutSlot, PeerKey, Router, TrackName};
use crate::sfu::{Command, Publishing, Signal};
use crate::webhook::Webhooks;

mod batch;
mod bwe;
mod classic;
mod direct;
mod events;
mod interceptors;
mod layers;
mod mix;
mod peer;
mod reader;
mod resend;
mod senders;
mod tcp;
mod worker;

pub use worker::start;

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
    /// Sockets connected to this worker's peers (`direct`); `None` on
    /// worker 0, which reads the port, and without `SO_REUSEPORT`.
    direct: Option<direct::Direct>,
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
        if let Some(d) = self.direct.as_mut() {
            d.forget(key);
        }
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
}
