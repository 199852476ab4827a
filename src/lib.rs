//! Switchboard: a WebRTC room server. Two people talk peer to peer through
//! its signaling; when P2P fails or a third person joins, everyone moves to
//! the server's SFU.
//!
//! # Layout
//!
//! - [`config`]: `serve` options from flags, `SWITCHBOARD_*` env and a TOML
//!   file, resolved into one validated [`config::Config`].
//! - [`server`]: the HTTP edge (axum): `/` browser client, `/ws`, `/healthz`,
//!   `/metrics`, TLS, graceful shutdown. [`server::start`] is what `serve`
//!   and the integration tests run.
//! - [`session`]: one WebSocket connection: limits, parsing, hub calls.
//! - [`socketio`]: `/socket.io/`, the classic Socket.IO room protocol:
//!   classic events to hub calls and hub messages to classic events.
//! - [`hub`]: every room and every participant's outbox; runs room logic and
//!   delivers its effects. Never awaits.
//! - [`room`]: one room's membership and media-mode state machine. Pure:
//!   requests in, addressed messages out.
//! - [`sfu`]: the hub's handle on the media plane (commands in, no webrtc-rs).
//! - [`router`]: the SFU's forwarding decisions. Pure: rooms → publishers →
//!   tracks → subscriptions (each with its rewriter and layer choice);
//!   packets and `now` in, sends, keyframe requests and drops out.
//! - [`transport`]: the media plane's driver: every server PeerConnection on
//!   one UDP port (and ICE-TCP), driven by webrtc-rs's sans-IO `rtc`;
//!   negotiation, the mixer tick, router inputs from connection events and
//!   `rtc` writes from router decisions. The only module that imports
//!   webrtc-rs or touches media sockets.
//! - `media`: the engine-independent media core (rewriting, NACK cache,
//!   keyframe throttling, demux): data and `now` in, decisions out.
//! - [`mixer`]: the audio mixer's pure core (jitter buffers, Opus decode and
//!   encode, top-K selection, soft limiter, levels).
//! - [`auth`]: access tokens (LiveKit-compatible JWTs), API keys, grants.
//! - [`admin`]: the admin API (`/api/v1`), authorized by tokens.
//! - [`webhook`]: signed room/participant events POSTed to `--webhook-url`s
//!   through bounded per-URL queues.
//! - [`resume`]: resume tokens and participants parked after a dropped
//!   WebSocket.
//! - [`cluster`]: several nodes behind one URL (`--redis-url`): rooms placed
//!   on and found through Redis, signaling relayed to a room's node.
//! - [`ratelimit`], [`ice`] (STUN/TURN credentials), [`metrics`].
//! - `web/`: the browser client, embedded in the binary.
//! - The wire types live in the `switchboard-proto` crate (`proto/`).
//!
//! Data flows one way: socket → session (parse, limit) → hub → room (decide)
//! → hub (deliver) → outboxes → each session's socket.

pub mod admin;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod hub;
pub mod ice;
pub mod media;
pub mod metrics;
pub mod mixer;
pub mod perip;
pub mod ratelimit;
pub mod resume;
pub mod room;
pub mod router;
pub mod server;
pub mod session;
pub mod sfu;
pub mod socketio;
pub mod transport;
pub mod webhook;
