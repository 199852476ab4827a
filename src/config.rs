//! Configuration: command-line flags, `SWITCHBOARD_*` environment variables,
//! an optional TOML file, and built-in defaults, in that order of precedence.
//!
//! [`ServeOptions`] is both the clap argument group and the TOML file schema
//! (every field optional); [`Config::resolve`] merges and validates them into
//! the [`Config`] the server runs with.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use switchboard_proto::AudioMode;

/// Every `serve` option. Field names are the TOML keys; flags are the same in
/// kebab-case; environment variables are `SWITCHBOARD_` + upper snake case.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeOptions {
    /// Address and port for HTTP and WebSocket signaling [default: 127.0.0.1:8080]
    #[arg(long, env = "SWITCHBOARD_LISTEN", value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,

    /// TLS certificate chain (PEM); needs --tls-key
    #[arg(long, env = "SWITCHBOARD_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM); needs --tls-cert
    #[arg(long, env = "SWITCHBOARD_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// Serve HTTPS with a certificate generated at start-up (for trying the
    /// camera from phones on a LAN; browsers will ask you to accept it)
    #[arg(long, env = "SWITCHBOARD_TLS_SELF_SIGNED", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub tls_self_signed: Option<bool>,

    /// Extra DNS names or IP addresses for the self-signed certificate, comma
    /// separated (localhost, 127.0.0.1 and the listen address are always in it)
    #[arg(
        long,
        env = "SWITCHBOARD_TLS_SELF_SIGNED_NAMES",
        value_delimiter = ',',
        value_name = "NAMES"
    )]
    pub tls_self_signed_names: Option<Vec<String>>,

    /// Largest accepted text frame in bytes; larger frames get `too-large`
    /// (frames over 4x this close the connection) [default: 65536]
    #[arg(long, env = "SWITCHBOARD_MAX_FRAME_BYTES", value_name = "BYTES")]
    pub max_frame_bytes: Option<usize>,

    /// Sustained messages per second allowed per connection (token bucket) [default: 50]
    #[arg(long, env = "SWITCHBOARD_RATE_LIMIT", value_name = "MSGS")]
    pub rate_limit: Option<f64>,

    /// Burst of messages allowed above the rate; flooding on past the limit
    /// for about twice this many more messages closes the connection [default: 200]
    #[arg(long, env = "SWITCHBOARD_RATE_BURST", value_name = "MSGS")]
    pub rate_burst: Option<u32>,

    /// Most rooms that may exist at once; joins that would create more get `full` [default: 10000]
    #[arg(long, env = "SWITCHBOARD_MAX_ROOMS", value_name = "N")]
    pub max_rooms: Option<usize>,

    /// Most participants per room (p2p rooms always hold two) [default: 100]
    #[arg(long, env = "SWITCHBOARD_MAX_PARTICIPANTS", value_name = "N")]
    pub max_participants: Option<usize>,

    /// How often the server sends a WebSocket ping, in milliseconds [default: 3000]
    #[arg(long, env = "SWITCHBOARD_WS_PING_INTERVAL_MS", value_name = "MS")]
    pub ws_ping_interval_ms: Option<u64>,

    /// A connection that sends nothing (not even a pong) for this long is
    /// dropped and the room gets `bye`, in milliseconds [default: 9000]
    #[arg(long, env = "SWITCHBOARD_WS_TIMEOUT_MS", value_name = "MS")]
    pub ws_timeout_ms: Option<u64>,

    /// Every WebSocket write must finish within this many milliseconds; a
    /// client that does not read is dropped (the room gets `bye`) [default: 5000]
    #[arg(long, env = "SWITCHBOARD_WS_WRITE_TIMEOUT_MS", value_name = "MS")]
    pub ws_write_timeout_ms: Option<u64>,

    /// A participant whose WebSocket drops stays in its room this many
    /// milliseconds, its media flowing, for the client to `resume`; 0 turns
    /// resuming off (a drop is a `bye` at once) [default: 15000]
    #[arg(long, env = "SWITCHBOARD_RESUME_WINDOW_MS", value_name = "MS")]
    pub resume_window_ms: Option<u64>,

    /// A client must send its HTTP request headers within this many
    /// milliseconds of connecting, or the connection is closed [default: 10000]
    #[arg(long, env = "SWITCHBOARD_HTTP_HEADER_TIMEOUT_MS", value_name = "MS")]
    pub http_header_timeout_ms: Option<u64>,

    /// Most WebSocket connections, and most ICE-TCP connections, open at
    /// once from one IP address [default: 64]
    #[arg(long, env = "SWITCHBOARD_MAX_CONNS_PER_IP", value_name = "N")]
    pub max_conns_per_ip: Option<usize>,

    /// Count a WebSocket client by the last address in its X-Forwarded-For
    /// header (the one the nearest proxy saw) for the per-address caps and
    /// logs; set it only behind a reverse proxy that sets that header, or
    /// every client counts as the proxy [default: false]
    #[arg(long, env = "SWITCHBOARD_TRUST_FORWARDED_FOR", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub trust_forwarded_for: Option<bool>,

    /// Most rooms that connections from one IP address may have created
    /// and that still exist; joins that would create more get `full` [default: 32]
    #[arg(long, env = "SWITCHBOARD_MAX_ROOMS_PER_IP", value_name = "N")]
    pub max_rooms_per_ip: Option<usize>,

    /// Most media tracks one participant may publish to the server; further
    /// sending m-sections in its offers are rejected [default: 4]
    #[arg(long, env = "SWITCHBOARD_MAX_TRACKS", value_name = "N")]
    pub max_tracks: Option<usize>,

    /// STUN server URLs handed to clients in `joined`, comma separated
    /// (e.g. stun:stun.example.org:3478) [default: none]
    #[arg(
        long,
        env = "SWITCHBOARD_STUN_URLS",
        value_delimiter = ',',
        value_name = "URLS"
    )]
    pub stun_urls: Option<Vec<String>>,

    /// TURN server URLs handed to clients with short-lived credentials,
    /// comma separated (e.g. turn:turn.example.org:3478?transport=udp); needs --turn-secret
    #[arg(
        long,
        env = "SWITCHBOARD_TURN_URLS",
        value_delimiter = ',',
        value_name = "URLS"
    )]
    pub turn_urls: Option<Vec<String>>,

    /// Shared secret of the TURN server (coturn `use-auth-secret` / `static-auth-secret`)
    #[arg(
        long,
        env = "SWITCHBOARD_TURN_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub turn_secret: Option<String>,

    /// Lifetime of TURN credentials in seconds [default: 3600]
    #[arg(long, env = "SWITCHBOARD_TURN_TTL_SECS", value_name = "SECS")]
    pub turn_ttl_secs: Option<u64>,

    /// How long clients give a P2P connection to connect before sending
    /// `p2p-failed`, in milliseconds (sent in `joined`) [default: 5000]
    #[arg(long, env = "SWITCHBOARD_P2P_TIMEOUT_MS", value_name = "MS")]
    pub p2p_timeout_ms: Option<u64>,

    /// Return an `auto` room that is back to two participants (and never had a
    /// `p2p-failed`) to `p2p` after this many milliseconds; 0 or unset keeps it
    /// `sfu` [default: off]
    #[arg(long, env = "SWITCHBOARD_P2P_RETURN_MS", value_name = "MS")]
    pub p2p_return_ms: Option<u64>,

    /// Audio handling of new SFU rooms whose creator does not choose: mix or forward [default: mix]
    #[arg(long, env = "SWITCHBOARD_AUDIO_MODE", value_name = "MODE", value_parser = parse_audio_mode)]
    pub audio_mode: Option<AudioMode>,

    /// Classic Socket.IO clients (`/socket.io/`): `never` keeps them P2P
    /// only, two per room; `always` makes the server each one's peer;
    /// `auto` keeps two of them P2P and relays once a third joins [default: auto]
    #[arg(long, env = "SWITCHBOARD_SOCKETIO_RELAY", value_name = "WHEN", value_parser = parse_relay)]
    pub socketio_relay: Option<Relay>,

    /// In mix rooms, how many of the loudest speakers are mixed (1-16); the
    /// rest of the room hears them through one shared encode [default: 3]
    #[arg(long, env = "SWITCHBOARD_MIX_SPEAKERS", value_name = "K")]
    pub mix_speakers: Option<usize>,

    /// Opus encoder complexity of the mixer, 0 (cheapest) to 10 (best); the
    /// mixer's CPU is mostly encoding [default: 5]
    #[arg(long, env = "SWITCHBOARD_MIX_COMPLEXITY", value_name = "0-10")]
    pub mix_complexity: Option<i32>,

    /// Allowed `Origin` values for /ws, comma separated (e.g. https://meet.example.org);
    /// empty allows any origin [default: any]
    #[arg(
        long,
        env = "SWITCHBOARD_ALLOWED_ORIGINS",
        value_delimiter = ',',
        value_name = "ORIGINS"
    )]
    pub allowed_origins: Option<Vec<String>>,

    /// On the first SIGTERM/SIGINT the server drains: /readyz turns 503, new
    /// joins get `room-closed`, running rooms go on until they empty or this
    /// many milliseconds pass; then everyone gets `room-closed`. A second
    /// signal closes at once [default: 30000]
    #[arg(long, env = "SWITCHBOARD_DRAIN_TIMEOUT_MS", value_name = "MS")]
    pub drain_timeout_ms: Option<u64>,

    /// Token for `POST /admin/drain` (header `Authorization: Bearer TOKEN`);
    /// without it the endpoint is off
    #[arg(
        long,
        env = "SWITCHBOARD_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,

    /// API key naming the secret that signs access tokens (JWT `iss`); with a
    /// key, every join needs a token; needs --api-secret
    #[arg(long, env = "SWITCHBOARD_API_KEY", value_name = "KEY")]
    pub api_key: Option<String>,

    /// Secret of --api-key (at least 32 bytes)
    #[arg(
        long,
        env = "SWITCHBOARD_API_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub api_secret: Option<String>,

    /// File of API keys, one `key: secret` per line (several keys)
    #[arg(long, env = "SWITCHBOARD_KEYS_FILE", value_name = "FILE")]
    pub keys_file: Option<PathBuf>,

    /// Run without access tokens although listening on a non-loopback
    /// address (anyone who can reach the server may join any room)
    #[arg(long, env = "SWITCHBOARD_NO_AUTH", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub no_auth: Option<bool>,

    /// Serve /metrics and /admin/* on this address only (the public port
    /// then answers 404 for them) [default: on the public port]
    #[arg(long, env = "SWITCHBOARD_METRICS_LISTEN", value_name = "ADDR:PORT")]
    pub metrics_listen: Option<SocketAddr>,

    /// POST room and participant events to this URL (repeatable or comma
    /// separated; http:// only; signed with the API key)
    #[arg(
        long,
        env = "SWITCHBOARD_WEBHOOK_URL",
        value_delimiter = ',',
        value_name = "URL"
    )]
    pub webhook_url: Option<Vec<String>>,

    /// On SIGINT/SIGTERM, how long to wait for connections to close, in milliseconds [default: 5000]
    #[arg(long, env = "SWITCHBOARD_SHUTDOWN_GRACE_MS", value_name = "MS")]
    pub shutdown_grace_ms: Option<u64>,

    /// Run the SFU media plane (set false for a signaling-only server) [default: true]
    #[arg(long, env = "SWITCHBOARD_MEDIA", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub media: Option<bool>,

    /// Address the media UDP port binds to [default: 127.0.0.1]
    #[arg(long, env = "SWITCHBOARD_RTC_IP", value_name = "IP")]
    pub rtc_ip: Option<IpAddr>,

    /// The one UDP port all participants' media uses (0 picks a free one) [default: 7882]
    #[arg(long, env = "SWITCHBOARD_RTC_PORT", value_name = "PORT")]
    pub rtc_port: Option<u16>,

    /// Media worker threads; each room lives on one of them, all share the
    /// one --rtc-port (1-64) [default: the number of CPUs]
    #[arg(long, env = "SWITCHBOARD_MEDIA_WORKERS", value_name = "N")]
    pub media_workers: Option<usize>,

    /// Also accept ICE over TCP (passive) on the --rtc-port number, for
    /// networks that block UDP [default: true]
    #[arg(long, env = "SWITCHBOARD_ICE_TCP", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub ice_tcp: Option<bool>,

    /// Address announced in ICE candidates when the server is behind 1:1 NAT
    /// [default: the --rtc-ip address]
    #[arg(long, env = "SWITCHBOARD_PUBLIC_IP", value_name = "IP")]
    pub public_ip: Option<IpAddr>,

    /// Redis URL (redis://HOST:PORT): turns cluster mode on; rooms are
    /// placed on and found through it [default: off, one node]
    #[arg(long, env = "SWITCHBOARD_REDIS_URL", value_name = "URL")]
    pub redis_url: Option<String>,

    /// This node's id in the cluster, unique per node [default: random]
    #[arg(long, env = "SWITCHBOARD_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,

    /// Log format: text (human-readable) or json [default: text]
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT", value_name = "FORMAT", value_parser = ["text", "json"])]
    pub log_format: Option<String>,

    /// Log filter, e.g. info or switchboard=debug (RUST_LOG also works)
    /// [default: info, with the WebRTC crates (rtc*) at error]
    #[arg(long, env = "SWITCHBOARD_LOG", value_name = "FILTER")]
    pub log: Option<String>,
}

/// When the server relays a classic Socket.IO client's media
/// (`--socketio-relay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Relay {
    /// Never: the classic server, two per room, P2P only.
    Never,
    /// Two classic clients P2P; the server becomes everyone's peer once a
    /// third joins (or P2P fails).
    #[default]
    Auto,
    /// The server is each classic client's one peer from the start.
    Always,
}

fn parse_relay(s: &str) -> Result<Relay, String> {
    match s {
        "never" => Ok(Relay::Never),
        "auto" => Ok(Relay::Auto),
        "always" => Ok(Relay::Always),
        other => Err(format!("expected never, auto or always, not {other:?}")),
    }
}

fn parse_audio_mode(s: &str) -> Result<AudioMode, String> {
    match s {
        "mix" => Ok(AudioMode::Mix),
        "forward" => Ok(AudioMode::Forward),
        other => Err(format!("expected mix or forward, got {other:?}")),
    }
}

impl ServeOptions {
    /// Fills every option `self` leaves unset from `other`.
    pub fn or(self, other: ServeOptions) -> ServeOptions {
        ServeOptions {
            listen: self.listen.or(other.listen),
            tls_cert: self.tls_cert.or(other.tls_cert),
            tls_key: self.tls_key.or(other.tls_key),
            tls_self_signed: self.tls_self_signed.or(other.tls_self_signed),
            tls_self_signed_names: self.tls_self_signed_names.or(other.tls_self_signed_names),
            max_frame_bytes: self.max_frame_bytes.or(other.max_frame_bytes),
            rate_limit: self.rate_limit.or(other.rate_limit),
            rate_burst: self.rate_burst.or(other.rate_burst),
            max_rooms: self.max_rooms.or(other.max_rooms),
            max_participants: self.max_participants.or(other.max_participants),
            ws_ping_interval_ms: self.ws_ping_interval_ms.or(other.ws_ping_interval_ms),
            ws_timeout_ms: self.ws_timeout_ms.or(other.ws_timeout_ms),
            ws_write_timeout_ms: self.ws_write_timeout_ms.or(other.ws_write_timeout_ms),
            resume_window_ms: self.resume_window_ms.or(other.resume_window_ms),
            http_header_timeout_ms: self.http_header_timeout_ms.or(other.http_header_timeout_ms),
            max_conns_per_ip: self.max_conns_per_ip.or(other.max_conns_per_ip),
            trust_forwarded_for: self.trust_forwarded_for.or(other.trust_forwarded_for),
            max_rooms_per_ip: self.max_rooms_per_ip.or(other.max_rooms_per_ip),
            max_tracks: self.max_tracks.or(other.max_tracks),
            stun_urls: self.stun_urls.or(other.stun_urls),
            turn_urls: self.turn_urls.or(other.turn_urls),
            turn_secret: self.turn_secret.or(other.turn_secret),
            turn_ttl_secs: self.turn_ttl_secs.or(other.turn_ttl_secs),
            p2p_timeout_ms: self.p2p_timeout_ms.or(other.p2p_timeout_ms),
            p2p_return_ms: self.p2p_return_ms.or(other.p2p_return_ms),
            audio_mode: self.audio_mode.or(other.audio_mode),
            socketio_relay: self.socketio_relay.or(other.socketio_relay),
            mix_speakers: self.mix_speakers.or(other.mix_speakers),
            mix_complexity: self.mix_complexity.or(other.mix_complexity),
            allowed_origins: self.allowed_origins.or(other.allowed_origins),
            shutdown_grace_ms: self.shutdown_grace_ms.or(other.shutdown_grace_ms),
            drain_timeout_ms: self.drain_timeout_ms.or(other.drain_timeout_ms),
            admin_token: self.admin_token.or(other.admin_token),
            api_key: self.api_key.or(other.api_key),
            api_secret: self.api_secret.or(other.api_secret),
            keys_file: self.keys_file.or(other.keys_file),
            no_auth: self.no_auth.or(other.no_auth),
            metrics_listen: self.metrics_listen.or(other.metrics_listen),
            webhook_url: self.webhook_url.or(other.webhook_url),
            media: self.media.or(other.media),
            rtc_ip: self.rtc_ip.or(other.rtc_ip),
            rtc_port: self.rtc_port.or(other.rtc_port),
            media_workers: self.media_workers.or(other.media_workers),
            public_ip: self.public_ip.or(other.public_ip),
            ice_tcp: self.ice_tcp.or(other.ice_tcp),
            redis_url: self.redis_url.or(other.redis_url),
            node_id: self.node_id.or(other.node_id),
            log_format: self.log_format.or(other.log_format),
            log: self.log.or(other.log),
        }
    }

    /// Reads a TOML file of options.
    pub fn from_file(path: &Path) -> Result<ServeOptions, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Toml {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }
}

/// Configuration errors, reported at start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("--node-id {0:?}: use at most 64 letters, digits, '-', '_' or '.'")]
    NodeId(String),
    #[error("--tls-cert and --tls-key go together")]
    TlsPair,
    #[error("--tls-self-signed cannot be combined with --tls-cert/--tls-key")]
    TlsBoth,
    #[error("--turn-urls needs --turn-secret (short-lived credentials are made from it)")]
    TurnSecret,
    #[error("{option} must be greater than zero")]
    Zero { option: &'static str },
    #[error("--ws-timeout-ms ({timeout}) must be longer than --ws-ping-interval-ms ({interval})")]
    PingTimeout { interval: u64, timeout: u64 },
    #[error("--rtc-ip {0} binds every interface, so it cannot be announced in ICE candidates: set --public-ip to the address clients reach")]
    PublicIpNeeded(IpAddr),
    #[error("--media-workers {0} is out of range (1-64)")]
    MediaWorkers(usize),
    #[error("--mix-speakers {0} is out of range (1-16)")]
    MixSpeakers(usize),
    #[error("--mix-complexity {0} is out of range (0-10)")]
    MixComplexity(i32),
    #[error("{0}")]
    Keys(#[from] crate::auth::KeysError),
    #[error(
        "listening on {0}, which is not a loopback address, with no API key: anyone could \
             join any room. Configure a key (--api-key/--api-secret or --keys-file) or pass \
             --no-auth to run open on purpose"
    )]
    Unprotected(SocketAddr),
    #[error("--webhook-url needs an API key to sign the events (--api-key or --keys-file)")]
    WebhookKey,
    #[error("{url:?} is not a {kind} URL")]
    Url { kind: &'static str, url: String },
}

/// How HTTPS is served, if at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    Off,
    Files { cert: PathBuf, key: PathBuf },
    SelfSigned { extra_names: Vec<String> },
}

/// Per-connection and per-server limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub rate_per_sec: f64,
    pub rate_burst: u32,
    pub max_rooms: usize,
    pub max_participants: usize,
    /// WebSocket and ICE-TCP connections open at once per IP address.
    pub max_conns_per_ip: usize,
    /// Live rooms created from one IP address.
    pub max_rooms_per_ip: usize,
    /// Tracks one participant may publish.
    pub max_tracks: usize,
}

/// The log filter when `--log` is not given: `info`, except the WebRTC
/// crates, which log a warning per bad packet (a hostile peer could fill the
/// disk with them: 196 MB in 10 s measured); their errors still show.
pub const DEFAULT_LOG_FILTER: &str = "info,rtc=error,rtc_ice=error,rtc_dtls=error,\
rtc_srtp=error,rtc_sctp=error,rtc_rtp=error,rtc_rtcp=error,rtc_interceptor=error,\
rtc_datachannel=error,rtc_stun=error,rtc_turn=error,rtc_mdns=error,rtc_sdp=error,\
rtc_media=error,rtc_shared=error";

/// STUN/TURN servers for `joined.iceServers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IceConfig {
    pub stun_urls: Vec<String>,
    pub turn_urls: Vec<String>,
    pub turn_secret: Option<String>,
    pub turn_ttl: Duration,
}

/// Log output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub json: bool,
    pub filter: String,
}

/// The resolved configuration the server runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    pub tls: Tls,
    pub limits: Limits,
    pub ws_ping_interval: Duration,
    pub ws_timeout: Duration,
    pub ws_write_timeout: Duration,
    /// `--resume-window-ms`; zero: no resuming.
    pub resume_window: Duration,
    pub http_header_timeout: Duration,
    pub ice: IceConfig,
    pub p2p_timeout_ms: u64,
    /// How long an `auto` room back to two stays `sfu` before returning to
    /// `p2p`; `None` (the default) keeps it `sfu`.
    pub p2p_return: Option<Duration>,
    pub audio_mode: AudioMode,
    /// `--socketio-relay`.
    pub socketio_relay: Relay,
    pub allowed_origins: Vec<String>,
    /// `--trust-forwarded-for`.
    pub trust_forwarded_for: bool,
    pub shutdown_grace: Duration,
    /// How long a drain lets running rooms go on.
    pub drain_timeout: Duration,
    /// Bearer token of `POST /admin/drain`; `None` turns the endpoint off.
    pub admin_token: Option<String>,
    /// API keys; empty means auth is off.
    pub keys: crate::auth::Keys,
    /// Separate listener for `/metrics` and `/admin/*`.
    pub metrics_listen: Option<SocketAddr>,
    /// Where webhooks go.
    pub webhook_urls: Vec<String>,
    /// The SFU media plane, unless turned off.
    pub media: Option<crate::sfu::MediaConfig>,
    pub log: LogConfig,
    /// Cluster mode (`--redis-url`).
    pub cluster: Option<ClusterConfig>,
}

/// Several nodes coordinated through Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub redis_url: String,
    pub node_id: String,
}

impl Default for Config {
    fn default() -> Self {
        // The defaults are exactly what an empty set of options resolves to.
        match Config::resolve(ServeOptions::default()) {
            Ok(c) => c,
            Err(e) => unreachable!("built-in defaults are valid: {e}"),
        }
    }
}

impl Config {
    /// Applies defaults and checks the options.
    pub fn resolve(o: ServeOptions) -> Result<Config, ConfigError> {
        let tls = match (o.tls_cert, o.tls_key, o.tls_self_signed.unwrap_or(false)) {
            (None, None, false) => Tls::Off,
            (None, None, true) => Tls::SelfSigned {
                extra_names: o.tls_self_signed_names.unwrap_or_default(),
            },
            (Some(cert), Some(key), false) => Tls::Files { cert, key },
            (Some(_), Some(_), true) => return Err(ConfigError::TlsBoth),
            _ => return Err(ConfigError::TlsPair),
        };
        let limits = Limits {
            max_frame_bytes: nonzero(o.max_frame_bytes.unwrap_or(65536), "--max-frame-bytes")?,
            rate_per_sec: o.rate_limit.unwrap_or(50.0),
            rate_burst: nonzero(o.rate_burst.unwrap_or(200), "--rate-burst")?,
            max_rooms: nonzero(o.max_rooms.unwrap_or(10_000), "--max-rooms")?,
            max_participants: nonzero(o.max_participants.unwrap_or(100), "--max-participants")?,
            max_conns_per_ip: nonzero(o.max_conns_per_ip.unwrap_or(64), "--max-conns-per-ip")?,
            max_rooms_per_ip: nonzero(o.max_rooms_per_ip.unwrap_or(32), "--max-rooms-per-ip")?,
            max_tracks: nonzero(o.max_tracks.unwrap_or(4), "--max-tracks")?,
        };
        let mix_speakers = o.mix_speakers.unwrap_or(3);
        if !(1..=16).contains(&mix_speakers) {
            return Err(ConfigError::MixSpeakers(mix_speakers));
        }
        let media_workers = o
            .media_workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(64)));
        if !(1..=64).contains(&media_workers) {
            return Err(ConfigError::MediaWorkers(media_workers));
        }
        let mix_complexity = o.mix_complexity.unwrap_or(5);
        if !(0..=10).contains(&mix_complexity) {
            return Err(ConfigError::MixComplexity(mix_complexity));
        }
        if limits.rate_per_sec.is_nan() || limits.rate_per_sec <= 0.0 {
            return Err(ConfigError::Zero {
                option: "--rate-limit",
            });
        }
        let interval = nonzero(
            o.ws_ping_interval_ms.unwrap_or(3000),
            "--ws-ping-interval-ms",
        )?;
        let timeout = o.ws_timeout_ms.unwrap_or(9000);
        if timeout <= interval {
            return Err(ConfigError::PingTimeout { interval, timeout });
        }
        let stun_urls = o.stun_urls.unwrap_or_default();
        let turn_urls = o.turn_urls.unwrap_or_default();
        check_urls(&stun_urls, "STUN", &["stun:", "stuns:"])?;
        check_urls(&turn_urls, "TURN", &["turn:", "turns:"])?;
        let turn_secret = o.turn_secret.filter(|s| !s.is_empty());
        if !turn_urls.is_empty() && turn_secret.is_none() {
            return Err(ConfigError::TurnSecret);
        }
        let turn_ttl = nonzero(o.turn_ttl_secs.unwrap_or(3600), "--turn-ttl-secs")?;
        let rtc_ip = o.rtc_ip.unwrap_or(IpAddr::from([127, 0, 0, 1]));
        if o.media != Some(false) && rtc_ip.is_unspecified() && o.public_ip.is_none() {
            return Err(ConfigError::PublicIpNeeded(rtc_ip));
        }
        let keys = crate::auth::Keys::load(
            o.api_key.as_deref(),
            o.api_secret.as_deref(),
            o.keys_file.as_deref(),
        )?;
        let listen = o
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
        if keys.is_empty() && !listen.ip().is_loopback() && o.no_auth != Some(true) {
            return Err(ConfigError::Unprotected(listen));
        }
        let webhook_urls = o.webhook_url.unwrap_or_default();
        check_urls(&webhook_urls, "webhook (http://)", &["http://"])?;
        // Each must also parse as a URL with a host, or every event to it
        // would fail all its attempts.
        if let Some(bad) = webhook_urls.iter().find(|u| {
            u.parse::<hyper::Uri>()
                .map_or(true, |uri| uri.host().is_none_or(str::is_empty))
        }) {
            return Err(ConfigError::Url {
                kind: "webhook (http://)",
                url: bad.clone(),
            });
        }
        if !webhook_urls.is_empty() && keys.is_empty() {
            return Err(ConfigError::WebhookKey);
        }
        let (max_tracks, max_tcp_per_ip) = (limits.max_tracks, limits.max_conns_per_ip);
        let cluster = match o.redis_url.filter(|u| !u.is_empty()) {
            None => None,
            Some(url) => {
                if !(url.starts_with("redis://") || url.starts_with("rediss://"))
                    || redis::Client::open(url.as_str()).is_err()
                {
                    return Err(ConfigError::Url {
                        kind: "Redis (redis://)",
                        url,
                    });
                }
                let node_id = match o.node_id.filter(|n| !n.is_empty()) {
                    Some(id) => {
                        if id.len() > 64
                            || !id
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                        {
                            return Err(ConfigError::NodeId(id));
                        }
                        id
                    }
                    None => format!("node-{:08x}", rand::random::<u32>()),
                };
                Some(ClusterConfig {
                    redis_url: url,
                    node_id,
                })
            }
        };
        Ok(Config {
            cluster,
            listen,
            tls,
            limits,
            ws_ping_interval: Duration::from_millis(interval),
            ws_timeout: Duration::from_millis(timeout),
            ws_write_timeout: Duration::from_millis(nonzero(
                o.ws_write_timeout_ms.unwrap_or(5000),
                "--ws-write-timeout-ms",
            )?),
            resume_window: Duration::from_millis(o.resume_window_ms.unwrap_or(15_000)),
            http_header_timeout: Duration::from_millis(nonzero(
                o.http_header_timeout_ms.unwrap_or(10_000),
                "--http-header-timeout-ms",
            )?),
            ice: IceConfig {
                stun_urls,
                turn_urls,
                turn_secret,
                turn_ttl: Duration::from_secs(turn_ttl),
            },
            p2p_timeout_ms: o.p2p_timeout_ms.unwrap_or(5000),
            p2p_return: o
                .p2p_return_ms
                .filter(|&ms| ms > 0)
                .map(Duration::from_millis),
            audio_mode: o.audio_mode.unwrap_or_default(),
            socketio_relay: o.socketio_relay.unwrap_or_default(),
            allowed_origins: o.allowed_origins.unwrap_or_default(),
            trust_forwarded_for: o.trust_forwarded_for.unwrap_or(false),
            shutdown_grace: Duration::from_millis(o.shutdown_grace_ms.unwrap_or(5000)),
            drain_timeout: Duration::from_millis(o.drain_timeout_ms.unwrap_or(30_000)),
            admin_token: o.admin_token.filter(|t| !t.is_empty()),
            keys,
            metrics_listen: o.metrics_listen,
            webhook_urls,
            media: o.media.unwrap_or(true).then(|| crate::sfu::MediaConfig {
                bind: SocketAddr::new(rtc_ip, o.rtc_port.unwrap_or(7882)),
                public_ip: o.public_ip,
                ice_tcp: o.ice_tcp.unwrap_or(true),
                mix_speakers,
                mix_complexity,
                max_tracks,
                max_tcp_per_ip,
                workers: media_workers,
            }),
            log: LogConfig {
                json: o.log_format.as_deref() == Some("json"),
                filter: o.log.unwrap_or_else(|| DEFAULT_LOG_FILTER.to_owned()),
            },
        })
    }
}

fn nonzero<T: PartialEq + Default>(v: T, option: &'static str) -> Result<T, ConfigError> {
    if v == T::default() {
        Err(ConfigError::Zero { option })
    } else {
        Ok(v)
    }
}

fn check_urls(urls: &[String], kind: &'static str, schemes: &[&str]) -> Result<(), ConfigError> {
    match urls
        .iter()
        .find(|u| !schemes.iter().any(|s| u.starts_with(s)) || u.len() > 512)
    {
        Some(url) => Err(ConfigError::Url {
            kind,
            url: url.clone(),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls_must_parse_with_a_host() {
        let with = |url: &str| {
            Config::resolve(ServeOptions {
                api_key: Some("k".into()),
                api_secret: Some("s".repeat(32)),
                webhook_url: Some(vec![url.to_owned()]),
                ..ServeOptions::default()
            })
        };
        assert!(with("http://127.0.0.1:9000/hook").is_ok());
        for bad in [
            "http://has space/hook",
            "http://",
            "http:///path",
            "https://x/",
        ] {
            assert!(
                matches!(with(bad), Err(ConfigError::Url { .. })),
                "{bad} is refused"
            );
        }
    }

    #[test]
    fn defaults() {
        let c = Config::default();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.tls, Tls::Off);
        assert_eq!(c.limits.max_frame_bytes, 65536);
        assert_eq!(c.limits.max_participants, 100);
        assert_eq!(c.p2p_timeout_ms, 5000);
        assert_eq!(c.p2p_return, None, "returning to p2p is off by default");
        assert_eq!(c.audio_mode, AudioMode::Mix);
        assert!(
            c.ws_timeout <= Duration::from_secs(10),
            "dead peers within 10 s"
        );
    }

    #[test]
    fn cli_beats_file_beats_default() {
        let file: ServeOptions = toml::from_str(
            "listen = \"127.0.0.1:9000\"\nmax_rooms = 7\nstun_urls = [\"stun:127.0.0.1:3478\"]\n",
        )
        .unwrap();
        let cli = ServeOptions {
            max_rooms: Some(3),
            ..Default::default()
        };
        let c = Config::resolve(cli.or(file)).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.limits.max_rooms, 3);
        assert_eq!(c.ice.stun_urls, vec!["stun:127.0.0.1:3478".to_owned()]);
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        assert!(toml::from_str::<ServeOptions>("max_room = 7").is_err());
    }

    #[test]
    fn refuses_inconsistent_options() {
        let bad = |o: ServeOptions| Config::resolve(o).unwrap_err().to_string();
        assert!(bad(ServeOptions {
            tls_cert: Some("c.pem".into()),
            ..Default::default()
        })
        .contains("go together"));
        assert!(bad(ServeOptions {
            turn_urls: Some(vec!["turn:127.0.0.1:3478".into()]),
            ..Default::default()
        })
        .contains("turn-secret"));
        assert!(bad(ServeOptions {
            stun_urls: Some(vec!["http://x".into()]),
            ..Default::default()
        })
        .contains("STUN"));
        assert!(bad(ServeOptions {
            rtc_ip: Some("0.0.0.0".parse().unwrap()),
            ..Default::default()
        })
        .contains("--public-ip"));
        assert!(Config::resolve(ServeOptions {
            rtc_ip: Some("0.0.0.0".parse().unwrap()),
            public_ip: Some("192.0.2.10".parse().unwrap()),
            ..Default::default()
        })
        .is_ok());
        assert!(bad(ServeOptions {
            max_frame_bytes: Some(0),
            ..Default::default()
        })
        .contains("greater than zero"));
        assert!(bad(ServeOptions {
            ws_ping_interval_ms: Some(5000),
            ws_timeout_ms: Some(4000),
            ..Default::default()
        })
        .contains("longer than"));
    }

    #[test]
    fn protected_mode_needs_a_key_or_no_auth() {
        let public = || ServeOptions {
            listen: Some("0.0.0.0:8080".parse().unwrap()),
            ..Default::default()
        };
        let e = Config::resolve(public()).unwrap_err().to_string();
        assert!(e.contains("--api-key") && e.contains("--no-auth"), "{e}");
        assert!(Config::resolve(ServeOptions {
            no_auth: Some(true),
            ..public()
        })
        .is_ok());
        let c = Config::resolve(ServeOptions {
            api_key: Some("k".into()),
            api_secret: Some("s".repeat(32)),
            ..public()
        })
        .unwrap();
        assert!(!c.keys.is_empty());
        let e = Config::resolve(ServeOptions {
            api_key: Some("k".into()),
            api_secret: Some("short".into()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("shorter than 32"), "{e}");
        let e = Config::resolve(ServeOptions {
            webhook_url: Some(vec!["http://127.0.0.1:9/hook".into()]),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("API key"), "{e}");
    }
}
