//! `loadtest signaling`: the signaling benchmark.
//!
//! 1. Opens `--connections` WebSockets (at most `--connect-concurrency` connecting
//!    and joining at a time), spread round-robin over `--rooms` rooms, each
//!    joining with `mode: "sfu"`; measures the WebSocket handshake and
//!    `join` → `joined`.
//! 2. When every connection has joined or failed (the steady state), each one
//!    sends `--pings` pings, one every `--ping-interval`, starting at a random
//!    offset within the first interval; measures `ping` → `pong` per id.
//! 3. Every connection sends `leave`, waits for `leaved` and closes.
//!
//! With `--server-pid` it samples the server's RSS before connecting, after the
//! joins, after the pings (the steady state, all connections still open) and
//! after closing, and the server's CPU time per phase. The whole run is bounded
//! by `--timeout`.

mod report;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use switchboard_proto::{
    ClientMessage, ErrorCode, Join, Leave, Ping, PingId, RequestedMode, RoomName, ServerMessage,
};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::{sleep_until, timeout_at, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{Request, Uri};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::proc::{self, Machine, Pid};
pub use report::Report;
use report::{Phases, ServerStats, Usage};

/// Longest wait for `leaved` after sending `leave`.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the server's close frame after ours.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Delay between announcing the ping phase and its start, so every connection
/// task has seen the announcement before the first ping is due.
const PING_PHASE_LEAD: Duration = Duration::from_millis(20);
/// Pause after the last connection closed before the final server RSS sample.
const SETTLE_AFTER_CLOSE: Duration = Duration::from_millis(500);
/// The server's default room capacity.
const DEFAULT_ROOM_CAPACITY: usize = 100;
/// The server's default per-connection rate limit, messages per second.
const DEFAULT_RATE_LIMIT: f64 = 50.0;
/// Per-connection read buffer. tungstenite's default (128 KiB) is zero-filled
/// on first read, which would cost the generator 128 KiB of RSS per
/// connection; signaling frames are small.
const READ_BUFFER: usize = 8 * 1024;

#[derive(Debug, Clone, clap::Args)]
pub struct SignalingArgs {
    /// WebSocket URL of the server's signaling endpoint (`ws://` only). The
    /// tool connects to this URL and nowhere else.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    pub url: String,
    /// Allow a host other than loopback (127.0.0.0/8, ::1, localhost).
    #[arg(long)]
    pub allow_remote: bool,
    /// WebSocket connections (participants) to open.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Rooms to spread the connections over (round-robin).
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,
    /// Pings each connection sends once all have joined.
    #[arg(long, default_value_t = 20)]
    pub pings: u32,
    /// Time between two pings of one connection (e.g. `100ms`).
    #[arg(long, default_value = "100ms", value_parser = crate::parse_duration)]
    pub ping_interval: Duration,
    /// How long to wait for outstanding pongs after a connection's last ping.
    #[arg(long, default_value = "5s", value_parser = crate::parse_duration)]
    pub ping_timeout: Duration,
    /// Per connection: TCP connect + WebSocket handshake + join → joined.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    pub join_timeout: Duration,
    /// Hard limit on the whole run; the tool stops by itself when it expires.
    #[arg(long, default_value = "120s", value_parser = crate::parse_duration)]
    pub timeout: Duration,
    /// Connections connecting and joining at the same time.
    #[arg(long, default_value_t = 50)]
    pub connect_concurrency: usize,
    /// Pid of the server, to sample its RSS and CPU from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run id used in room names (`bench-<run>-<n>`); random by default.
    #[arg(long)]
    pub run_id: Option<String>,
    /// Tokio worker threads of the generator (1 = current-thread runtime,
    /// which leaves the other cores to the server).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

/// Entry point of the subcommand: runs the benchmark, prints the table, writes
/// the JSON. Exit status 0 when every connection joined, had every ping
/// answered and left (see [`Report::all_ok`]), 1 when some did not or the run
/// timed out, 2 when it could not run.
pub fn main(args: &SignalingArgs) -> ExitCode {
    let rt = match crate::runtime(args.threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest: cannot start the tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let report = match rt.block_on(run(args)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadtest signaling: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report.table());
    if let Some(path) = &args.json {
        let written = serde_json::to_string_pretty(&report)
            .map_err(|e| e.to_string())
            .and_then(|j| std::fs::write(path, j + "\n").map_err(|e| e.to_string()));
        match written {
            Ok(()) => eprintln!("report written to {}", path.display()),
            Err(e) => {
                eprintln!("loadtest signaling: cannot write {}: {e}", path.display());
                return ExitCode::from(2);
            }
        }
    }
    if report.all_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

// ---------------------------------------------------------------------------
// Set-up
// ---------------------------------------------------------------------------

/// Checks the arguments and the URL; returns the parsed URI and the room names.
fn validate(args: &SignalingArgs, run_id: &str) -> Result<(Uri, Vec<RoomName>), String> {
    if args.connections == 0 || args.rooms == 0 {
        return Err("--connections and --rooms must be at least 1".into());
    }
    if args.rooms > args.connections {
        return Err(format!(
            "--rooms {} is more than --connections {}: some rooms would be empty",
            args.rooms, args.connections
        ));
    }
    if args.connect_concurrency == 0 {
        return Err("--connect-concurrency must be at least 1".into());
    }
    if args.pings > 0 && args.ping_interval.is_zero() {
        return Err("--ping-interval must be more than 0".into());
    }
    if args.timeout < Duration::from_secs(1) {
        return Err("--timeout must be at least 1s".into());
    }
    let uri = check_url(&args.url, args.allow_remote)?;
    if let Some(pid) = args.server_pid {
        if !Pid::Other(pid).exists() {
            return Err(format!("--server-pid {pid}: no such process"));
        }
        let name = proc::comm(Pid::Other(pid)).unwrap_or_default();
        if !name.contains("switchboard") {
            eprintln!("warning: --server-pid {pid} is {name:?}, not switchboard");
        }
    }
    if let Some(limit) = proc::open_files_limit() {
        let needed = args.connections as u64 + 64;
        if limit < needed {
            return Err(format!(
                "open files limit is {limit}, {needed} needed: raise it with `ulimit -n`"
            ));
        }
    }
    let per_room = args.connections.div_ceil(args.rooms);
    if per_room > DEFAULT_ROOM_CAPACITY {
        eprintln!(
            "warning: {per_room} connections per room; the server's default room capacity \
             is {DEFAULT_ROOM_CAPACITY}, expect `full`"
        );
    }
    if args.pings > 0 && 1.0 / args.ping_interval.as_secs_f64() > DEFAULT_RATE_LIMIT * 0.8 {
        eprintln!(
            "warning: --ping-interval {:?} is close to or over the server's default rate \
             limit of {DEFAULT_RATE_LIMIT} messages/s per connection",
            args.ping_interval
        );
    }
    let rooms = (0..args.rooms)
        .map(|n| RoomName::parse(&format!("bench-{run_id}-{n}")))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("--run-id {run_id:?}: {e}"))?;
    Ok((uri, rooms))
}

/// Accepts `ws://` URLs whose host is loopback, or any host with `allow_remote`.
pub(crate) fn check_url(url: &str, allow_remote: bool) -> Result<Uri, String> {
    let req = url
        .into_client_request()
        .map_err(|e| format!("--url {url:?}: {e}"))?;
    let uri = req.uri().clone();
    match uri.scheme_str() {
        Some("ws") => {}
        Some("wss") => {
            return Err("--url: wss:// is not supported (built without TLS); use ws://".into())
        }
        other => return Err(format!("--url: scheme {other:?} is not ws")),
    }
    let host = uri.host().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback && !allow_remote {
        return Err(format!(
            "--url host {host:?} is not loopback; pass --allow-remote to load a remote server"
        ));
    }
    Ok(uri)
}

pub(crate) fn default_run_id() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{:x}{:04x}", secs & 0xff_ffff, rand::random::<u16>())
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

/// What the coordinator tells the connection tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Connect and join, then wait.
    Connecting,
    /// Send the pings; the first interval begins at `start`.
    Ping { start: Instant },
    /// Leave and close.
    Close,
}

/// What a connection task tells the coordinator; each is sent exactly once
/// per task (see [`Reporter`]).
#[derive(Debug, Clone, Copy)]
enum Event {
    /// Joined, or gave up joining.
    JoinDone,
    /// Pings answered, timed out, or abandoned.
    PingsDone,
}

/// Everything the connection tasks share.
struct Shared {
    uri: Uri,
    rooms: Vec<RoomName>,
    connect: Semaphore,
    pings: u32,
    ping_interval: Duration,
    ping_timeout: Duration,
    join_timeout: Duration,
    hard_deadline: Instant,
}

impl Shared {
    fn request(&self) -> Result<Request<()>, WsError> {
        self.uri.clone().into_client_request()
    }
}

/// CPU time of the server and of the generator at one instant.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    at: Instant,
    server: Option<Duration>,
    own: Option<Duration>,
}

impl CpuSample {
    fn take(server: Option<Pid>) -> CpuSample {
        CpuSample {
            at: Instant::now(),
            server: server.and_then(|p| proc::cpu_time(p).ok()),
            own: proc::cpu_time(Pid::Own).ok(),
        }
    }
}

pub async fn run(args: &SignalingArgs) -> Result<Report, String> {
    let run_id = args.run_id.clone().unwrap_or_else(default_run_id);
    let (uri, rooms) = validate(args, &run_id)?;
    let machine = Machine::probe();
    let server = args.server_pid.map(Pid::Other);
    let rss = |p: Option<Pid>| p.and_then(|p| proc::rss_bytes(p).ok());

    let started = Instant::now();
    let hard_deadline = started + args.timeout;
    // Leave time for the leave/close phase inside the hard limit.
    let grace = (args.timeout / 4).min(Duration::from_secs(10));
    let work_deadline = hard_deadline - grace;

    let rss_baseline = rss(server);
    let cpu_start = CpuSample::take(server);
    progress(
        started,
        format_args!(
            "connecting {} clients to {} ({} rooms, {} at a time)",
            args.connections, args.url, args.rooms, args.connect_concurrency
        ),
    );

    let shared = Arc::new(Shared {
        uri,
        rooms,
        connect: Semaphore::new(args.connect_concurrency),
        pings: args.pings,
        ping_interval: args.ping_interval,
        ping_timeout: args.ping_timeout,
        join_timeout: args.join_timeout,
        hard_deadline,
    });
    let (phase_tx, phase_rx) = watch::channel(Phase::Connecting);
    let (event_tx, mut event_rx) = mpsc::unbounded_channel();
    let tasks: Vec<_> = (0..args.connections)
        .map(|idx| {
            let reporter = Reporter::new(event_tx.clone());
            tokio::spawn(connection(idx, shared.clone(), phase_rx.clone(), reporter))
        })
        .collect();
    drop(event_tx);
    drop(phase_rx);

    // Phase 1: every connection joined (or failed).
    let mut counts = EventCounts::default();
    let n = args.connections;
    let mut completed = wait_for(&mut event_rx, &mut counts, n, |c| c.join, work_deadline).await;
    let cpu_joined = CpuSample::take(server);
    let rss_after_join = rss(server);
    let mut cpu_pinged = cpu_joined;
    let mut rss_steady = rss_after_join;
    if completed {
        progress(started, format_args!("joins done; pinging"));
        // Phase 2: pings in the steady state.
        let _ = phase_tx.send(Phase::Ping {
            start: Instant::now() + PING_PHASE_LEAD,
        });
        completed = wait_for(&mut event_rx, &mut counts, n, |c| c.pings, work_deadline).await;
        cpu_pinged = CpuSample::take(server);
        rss_steady = rss(server);
        if completed {
            progress(started, format_args!("pings done; leaving"));
        }
    }
    if !completed {
        progress(started, format_args!("run timeout reached; leaving"));
    }

    // Phase 3: leave and close.
    let _ = phase_tx.send(Phase::Close);
    let mut outcomes = Vec::with_capacity(n);
    let mut lost_tasks = 0usize;
    for task in tasks {
        let abort = task.abort_handle();
        match timeout_at(hard_deadline + Duration::from_secs(1), task).await {
            Ok(Ok(outcome)) => outcomes.push(outcome),
            Ok(Err(_)) => lost_tasks += 1,
            Err(_) => {
                abort.abort();
                lost_tasks += 1;
            }
        }
    }
    let cpu_closed = CpuSample::take(server);
    progress(started, format_args!("all connections closed"));
    let rss_after_close = if server.is_some() && Instant::now() + SETTLE_AFTER_CLOSE < hard_deadline
    {
        tokio::time::sleep(SETTLE_AFTER_CLOSE).await;
        rss(server)
    } else {
        rss(server)
    };

    let mut report = Report::assemble(args, &run_id, machine, &outcomes, lost_tasks);
    report.completed = completed;
    report.phases = Phases {
        connect_s: secs(cpu_joined.at - cpu_start.at),
        ping_s: secs(cpu_pinged.at - cpu_joined.at),
        close_s: secs(cpu_closed.at - cpu_pinged.at),
        total_s: secs(cpu_closed.at - started),
    };
    report.generator = Usage::between(&[cpu_start, cpu_joined, cpu_pinged, cpu_closed], |s| s.own);
    report.generator.rss_bytes = rss(Some(Pid::Own));
    report.server = args.server_pid.map(|pid| {
        let joined = report.connections.joined;
        let per_conn = match (rss_baseline, rss_steady) {
            (Some(b), Some(s)) if joined > 0 => Some((s as i64 - b as i64) / joined as i64),
            _ => None,
        };
        ServerStats {
            pid,
            name: proc::comm(Pid::Other(pid)).ok(),
            rss_baseline_bytes: rss_baseline,
            rss_after_join_bytes: rss_after_join,
            rss_steady_bytes: rss_steady,
            rss_after_close_bytes: rss_after_close,
            rss_per_connection_bytes: per_conn,
            cpu: Usage::between(&[cpu_start, cpu_joined, cpu_pinged, cpu_closed], |s| {
                s.server
            }),
        }
    });
    Ok(report)
}

#[derive(Debug, Default)]
struct EventCounts {
    join: usize,
    pings: usize,
}

/// Receives events until `field(counts) >= n`; false if `deadline` came first.
async fn wait_for(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    counts: &mut EventCounts,
    n: usize,
    field: fn(&EventCounts) -> usize,
    deadline: Instant,
) -> bool {
    while field(counts) < n {
        match timeout_at(deadline, rx.recv()).await {
            Ok(Some(Event::JoinDone)) => counts.join += 1,
            Ok(Some(Event::PingsDone)) => counts.pings += 1,
            // Every task has ended; the reporters sent all they will.
            Ok(None) => return field(counts) >= n,
            Err(_) => return false,
        }
    }
    true
}

pub(crate) fn progress(started: Instant, what: std::fmt::Arguments<'_>) {
    eprintln!("[{:7.2}s] {what}", started.elapsed().as_secs_f64());
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

// ---------------------------------------------------------------------------
// One connection
// ---------------------------------------------------------------------------

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Sends each [`Event`] once: explicitly when the task reaches it, or on drop
/// for the ones a failing task never reaches, so the coordinator's counts
/// always add up.
struct Reporter {
    tx: mpsc::UnboundedSender<Event>,
    join_sent: bool,
    pings_sent: bool,
}

impl Reporter {
    fn new(tx: mpsc::UnboundedSender<Event>) -> Reporter {
        Reporter {
            tx,
            join_sent: false,
            pings_sent: false,
        }
    }

    fn join_done(&mut self) {
        if !std::mem::replace(&mut self.join_sent, true) {
            let _ = self.tx.send(Event::JoinDone);
        }
    }

    fn pings_done(&mut self) {
        if !std::mem::replace(&mut self.pings_sent, true) {
            let _ = self.tx.send(Event::PingsDone);
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.join_done();
        self.pings_done();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum JoinResult {
    /// Never started connecting (run ended first).
    #[default]
    NotAttempted,
    Ok(Duration),
    Failed,
    TimedOut,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum LeaveResult {
    #[default]
    NotAttempted,
    Ok,
    Failed,
    TimedOut,
}

/// What one connection saw.
#[derive(Debug, Default)]
struct ConnOutcome {
    handshake: Option<Duration>,
    join: JoinResult,
    pings_sent: u32,
    rtts: Vec<Duration>,
    /// Send time of each ping id still waiting for its pong.
    pending: Vec<Option<Instant>>,
    ping_timeouts: u32,
    ping_failed: u32,
    leave: LeaveResult,
    closed_cleanly: bool,
    /// The connection broke (error, EOF or server close) before we closed it.
    lost: bool,
    /// First thing that went wrong, as a category for the error table.
    error: Option<String>,
    /// Server messages received, by `type`.
    received: BTreeMap<&'static str, u64>,
    /// `error` messages received, by code.
    server_errors: BTreeMap<&'static str, u64>,
}

impl ConnOutcome {
    fn fail(&mut self, what: impl Into<String>) {
        if self.error.is_none() {
            self.error = Some(what.into());
        }
    }

    /// Records the pong for ping `id`; false if no such ping is outstanding.
    fn pong(&mut self, id: Option<u64>, now: Instant) -> bool {
        let sent = id
            .and_then(|id| usize::try_from(id).ok())
            .and_then(|i| self.pending.get_mut(i))
            .and_then(Option::take);
        if let Some(sent) = sent {
            self.rtts.push(now - sent);
        }
        sent.is_some()
    }

    /// Settles the ping counters once the task is over.
    fn finish(&mut self, pings: u32) {
        if !matches!(self.join, JoinResult::Ok(_)) {
            return;
        }
        let unanswered = self.pending.iter().filter(|p| p.is_some()).count() as u32;
        if self.lost {
            self.ping_failed += unanswered;
        } else {
            self.ping_timeouts += unanswered;
        }
        // Pings never sent because the connection broke or the run ended.
        self.ping_failed += pings - self.pings_sent;
    }
}

/// One connection's whole life, bounded by the hard deadline.
async fn connection(
    idx: usize,
    shared: Arc<Shared>,
    phase: watch::Receiver<Phase>,
    mut reporter: Reporter,
) -> ConnOutcome {
    let mut out = ConnOutcome::default();
    let drive = drive(idx, &shared, phase, &mut reporter, &mut out);
    match timeout_at(shared.hard_deadline, drive).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => out.fail(e),
        Err(_) => out.fail("run timeout"),
    }
    out.finish(shared.pings);
    out
}

/// What a frame from the server means to the state machine.
#[derive(Debug)]
enum Incoming {
    Joined,
    Full,
    Leaved,
    /// A `pong`; true if it answered one of our outstanding pings.
    Pong(bool),
    ServerError(ErrorCode),
    Other,
    /// The connection is over; says how.
    Gone(String),
}

/// Interprets one read from the socket. Counts it in `out`, and records the
/// round trip of a `pong` (received at `now`) whatever phase we are in.
fn classify(
    item: Option<Result<Message, WsError>>,
    now: Instant,
    out: &mut ConnOutcome,
) -> Incoming {
    let text = match item {
        None => return Incoming::Gone("connection closed without a close frame".into()),
        Some(Err(e)) => return Incoming::Gone(ws_error(&e)),
        Some(Ok(Message::Close(frame))) => {
            return Incoming::Gone(match frame {
                Some(f) => format!("closed by server ({})", u16::from(f.code)),
                None => "closed by server".into(),
            })
        }
        Some(Ok(Message::Text(t))) => t,
        Some(Ok(Message::Binary(_))) => {
            *out.received.entry("(binary)").or_default() += 1;
            return Incoming::Other;
        }
        // WebSocket ping/pong: tungstenite answers pings itself.
        Some(Ok(_)) => return Incoming::Other,
    };
    let Ok(msg) = serde_json::from_str::<ServerMessage>(&text) else {
        *out.received.entry("(unparsable)").or_default() += 1;
        return Incoming::Other;
    };
    *out.received.entry(msg.type_name()).or_default() += 1;
    match msg {
        ServerMessage::Joined(_) => Incoming::Joined,
        ServerMessage::Full(_) => Incoming::Full,
        ServerMessage::Leaved(_) => Incoming::Leaved,
        ServerMessage::Pong(Ping {
            id: Some(PingId::Number(n)),
        }) => Incoming::Pong(out.pong(n.as_u64(), now)),
        ServerMessage::Pong(_) => Incoming::Pong(false),
        ServerMessage::Error(e) => {
            *out.server_errors.entry(e.code.as_str()).or_default() += 1;
            Incoming::ServerError(e.code)
        }
        _ => Incoming::Other,
    }
}

/// A short, aggregatable description of a WebSocket error.
fn ws_error(e: &WsError) -> String {
    match e {
        WsError::Io(io) => format!("io: {}", io.kind()),
        WsError::Http(resp) => format!("http {}", resp.status()),
        other => other.to_string(),
    }
}

async fn send(ws: &mut Ws, msg: &ClientMessage) -> Result<(), String> {
    ws.send(Message::text(msg.to_text()))
        .await
        .map_err(|e| ws_error(&e))
}

fn phase_now(rx: &mut watch::Receiver<Phase>) -> Phase {
    *rx.borrow_and_update()
}

/// Waits for the phase to change; a vanished coordinator means close.
async fn next_phase(rx: &mut watch::Receiver<Phase>) -> Phase {
    match rx.changed().await {
        Ok(()) => phase_now(rx),
        Err(_) => Phase::Close,
    }
}

async fn drive(
    idx: usize,
    sh: &Shared,
    mut phase: watch::Receiver<Phase>,
    reporter: &mut Reporter,
    out: &mut ConnOutcome,
) -> Result<(), String> {
    let room = sh.rooms[idx % sh.rooms.len()].clone();

    // --- Connect and join, holding one of the connect permits. ---
    let permit = tokio::select! {
        p = sh.connect.acquire() => p.map_err(|_| "semaphore closed".to_owned())?,
        _ = async { while next_phase(&mut phase).await != Phase::Close {} } => {
            return Err("not attempted: run timeout".into());
        }
    };
    let request = sh.request().map_err(|e| ws_error(&e))?;
    out.join = JoinResult::TimedOut;
    let join_deadline = Instant::now() + sh.join_timeout;
    let t = Instant::now();
    let connected = timeout_at(
        join_deadline,
        tokio_tungstenite::connect_async_with_config(
            request,
            Some(WebSocketConfig::default().read_buffer_size(READ_BUFFER)),
            true,
        ),
    )
    .await;
    let mut ws = match connected {
        Err(_) => return Err("connect: timeout".into()),
        Ok(Err(e)) => {
            out.join = JoinResult::Failed;
            return Err(format!("connect: {}", ws_error(&e)));
        }
        Ok(Ok((ws, _response))) => ws,
    };
    out.handshake = Some(t.elapsed());

    let join = ClientMessage::Join(Join {
        room: room.clone(),
        name: format!("bench-{idx}"),
        token: None,
        mode: Some(RequestedMode::Sfu),
        audio: None,
    });
    let t = Instant::now();
    if let Err(e) = send(&mut ws, &join).await {
        out.join = JoinResult::Failed;
        out.lost = true;
        return Err(format!("join: send: {e}"));
    }
    loop {
        let Ok(item) = timeout_at(join_deadline, ws.next()).await else {
            return Err("join: timeout".into());
        };
        let now = Instant::now();
        match classify(item, now, out) {
            Incoming::Joined => {
                out.join = JoinResult::Ok(now - t);
                break;
            }
            Incoming::Full => {
                out.join = JoinResult::Failed;
                return Err("join: full".into());
            }
            Incoming::ServerError(code) => {
                out.join = JoinResult::Failed;
                return Err(format!("join: error {code}"));
            }
            Incoming::Gone(how) => {
                out.join = JoinResult::Failed;
                out.lost = true;
                return Err(format!("join: {how}"));
            }
            _ => {}
        }
    }
    drop(permit);
    reporter.join_done();

    // --- Wait (reading) for the ping phase. ---
    let start = loop {
        match phase_now(&mut phase) {
            Phase::Ping { start } => break Some(start),
            Phase::Close => break None,
            Phase::Connecting => {}
        }
        tokio::select! {
            _ = phase.changed() => {}
            item = ws.next() => {
                if let Incoming::Gone(how) = classify(item, Instant::now(), out) {
                    out.lost = true;
                    return Err(format!("idle: {how}"));
                }
            }
        }
    };

    // --- Pings. ---
    if let Some(start) = start {
        ping_phase(sh, start, &mut ws, &mut phase, out).await?;
    }
    reporter.pings_done();

    // --- Wait (reading) for the close phase. ---
    while phase_now(&mut phase) != Phase::Close {
        tokio::select! {
            _ = phase.changed() => {}
            item = ws.next() => {
                if let Incoming::Gone(how) = classify(item, Instant::now(), out) {
                    out.lost = true;
                    return Err(format!("idle: {how}"));
                }
            }
        }
    }

    // --- Leave and close. ---
    leave_and_close(room, &mut ws, out).await
}

async fn ping_phase(
    sh: &Shared,
    start: Instant,
    ws: &mut Ws,
    phase: &mut watch::Receiver<Phase>,
    out: &mut ConnOutcome,
) -> Result<(), String> {
    if sh.pings == 0 {
        return Ok(());
    }
    let interval = sh.ping_interval;
    let stagger_us = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX);
    let mut next_send = start + Duration::from_micros(rand::random_range(0..stagger_us));
    out.pending = vec![None; sh.pings as usize];
    let mut last_sent = start;
    let mut answered = 0u32;
    loop {
        let all_sent = out.pings_sent == sh.pings;
        if all_sent && answered == sh.pings {
            return Ok(());
        }
        let wake = if all_sent {
            last_sent + sh.ping_timeout
        } else {
            next_send
        };
        tokio::select! {
            () = sleep_until(wake) => {
                if all_sent {
                    // The rest are timeouts (settled in `finish`).
                    return Ok(());
                }
                let id = out.pings_sent;
                let ping = ClientMessage::Ping(Ping { id: Some(PingId::Number(id.into())) });
                let now = Instant::now();
                out.pending[id as usize] = Some(now);
                out.pings_sent += 1;
                last_sent = now;
                if let Err(e) = send(ws, &ping).await {
                    out.lost = true;
                    return Err(format!("ping: send: {e}"));
                }
                // Fixed schedule; if we fell behind, skip ahead rather than burst.
                next_send += interval;
                let now = Instant::now();
                if next_send <= now {
                    next_send = now + interval;
                }
            }
            item = ws.next() => {
                match classify(item, Instant::now(), out) {
                    Incoming::Pong(true) => answered += 1,
                    Incoming::Gone(how) => {
                        out.lost = true;
                        return Err(format!("ping: {how}"));
                    }
                    _ => {}
                }
            }
            p = next_phase(phase) => {
                if p == Phase::Close {
                    return Ok(());
                }
            }
        }
    }
}

async fn leave_and_close(room: RoomName, ws: &mut Ws, out: &mut ConnOutcome) -> Result<(), String> {
    let deadline = Instant::now() + LEAVE_TIMEOUT;
    out.leave = LeaveResult::TimedOut;
    if let Err(e) = send(ws, &ClientMessage::Leave(Leave { room })).await {
        out.leave = LeaveResult::Failed;
        out.lost = true;
        return Err(format!("leave: send: {e}"));
    }
    loop {
        let Ok(item) = timeout_at(deadline, ws.next()).await else {
            out.fail("leave: timeout");
            break;
        };
        match classify(item, Instant::now(), out) {
            Incoming::Leaved => {
                out.leave = LeaveResult::Ok;
                break;
            }
            Incoming::ServerError(code) => {
                out.leave = LeaveResult::Failed;
                out.fail(format!("leave: error {code}"));
                break;
            }
            Incoming::Gone(how) => {
                out.leave = LeaveResult::Failed;
                out.lost = true;
                return Err(format!("leave: {how}"));
            }
            _ => {}
        }
    }
    // Close handshake: our close frame, then read until the server's reply ends
    // the stream.
    let deadline = Instant::now() + CLOSE_TIMEOUT;
    match timeout_at(deadline, ws.close(None)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("close: {}", ws_error(&e))),
        Err(_) => return Err("close: timeout".into()),
    }
    loop {
        match timeout_at(deadline, ws.next()).await {
            Err(_) => return Err("close: no close frame from the server".into()),
            Ok(None) | Ok(Some(Err(WsError::ConnectionClosed))) => break,
            Ok(Some(Err(e))) => return Err(format!("close: {}", ws_error(&e))),
            Ok(Some(Ok(_))) => {}
        }
    }
    out.closed_cleanly = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(check_url("ws://127.0.0.1:8080/ws", false).is_ok());
        assert!(check_url("ws://127.1.2.3:8080/ws", false).is_ok());
        assert!(check_url("ws://localhost:8080/ws", false).is_ok());
        assert!(check_url("ws://[::1]:8080/ws", false).is_ok());
        assert!(check_url("ws://10.0.0.1:8080/ws", false).is_err());
        assert!(check_url("ws://example.com/ws", false).is_err());
        assert!(check_url("ws://example.com/ws", true).is_ok());
        assert!(check_url("wss://127.0.0.1/ws", false).is_err());
        assert!(check_url("http://127.0.0.1/ws", false).is_err());
        assert!(check_url("not a url", false).is_err());
    }

    #[test]
    fn messages_on_the_wire() {
        let join = ClientMessage::Join(Join {
            room: RoomName::parse("bench-x-0").expect("valid"),
            name: "bench-0".into(),
            token: None,
            mode: Some(RequestedMode::Sfu),
            audio: None,
        });
        assert_eq!(
            join.to_text(),
            r#"{"type":"join","room":"bench-x-0","name":"bench-0","mode":"sfu"}"#
        );
        let ping = ClientMessage::Ping(Ping {
            id: Some(PingId::Number(7u32.into())),
        });
        assert_eq!(ping.to_text(), r#"{"type":"ping","id":7}"#);
    }

    #[test]
    fn classifies_server_frames() {
        let mut out = ConnOutcome {
            pending: vec![None, None, None, Some(Instant::now())],
            ..ConnOutcome::default()
        };
        let text = |s: &str| Some(Ok(Message::text(s.to_owned())));
        let now = Instant::now();
        let mut classify = |item| classify(item, now, &mut out);
        assert!(matches!(
            classify(text(r#"{"type":"pong","id":3}"#)),
            Incoming::Pong(true)
        ));
        // A second pong for the same id, an unknown id, or no id matches nothing.
        for pong in [
            r#"{"type":"pong","id":3}"#,
            r#"{"type":"pong","id":9}"#,
            r#"{"type":"pong","id":"3"}"#,
            r#"{"type":"pong"}"#,
        ] {
            assert!(matches!(classify(text(pong)), Incoming::Pong(false)));
        }
        assert!(matches!(
            classify(text(
                r#"{"type":"error","code":"rate-limited","message":"slow down"}"#
            )),
            Incoming::ServerError(ErrorCode::RateLimited)
        ));
        assert!(matches!(
            classify(text(
                r#"{"type":"otherjoin","room":"r","id":"p2","name":""}"#
            )),
            Incoming::Other
        ));
        assert!(matches!(classify(text("garbage")), Incoming::Other));
        assert!(matches!(classify(None), Incoming::Gone(_)));
        assert_eq!(out.rtts.len(), 1);
        assert_eq!(out.pending, vec![None; 4]);
        assert_eq!(out.received.get("pong"), Some(&5));
        assert_eq!(out.received.get("(unparsable)"), Some(&1));
        assert_eq!(out.server_errors.get("rate-limited"), Some(&1));
    }

    #[test]
    fn ping_accounting() {
        let mut o = ConnOutcome {
            join: JoinResult::Ok(Duration::from_millis(1)),
            pings_sent: 3,
            rtts: vec![Duration::from_millis(1)],
            pending: vec![None, Some(Instant::now()), Some(Instant::now()), None],
            ..ConnOutcome::default()
        };
        o.finish(4);
        assert_eq!((o.ping_timeouts, o.ping_failed), (2, 1));
        let mut lost = ConnOutcome {
            join: JoinResult::Ok(Duration::from_millis(1)),
            pings_sent: 1,
            pending: vec![Some(Instant::now()), None],
            lost: true,
            ..ConnOutcome::default()
        };
        lost.finish(2);
        assert_eq!((lost.ping_timeouts, lost.ping_failed), (0, 2));
        let mut never = ConnOutcome::default();
        never.finish(5);
        assert_eq!((never.ping_timeouts, never.ping_failed), (0, 0));
    }

    /// How the mock server behaves.
    #[derive(Clone, Copy)]
    enum Mock {
        /// Answers join, ping and leave like Switchboard.
        Good,
        /// Joins, but never answers pings.
        NoPongs,
        /// Accepts the WebSocket and then says nothing.
        Silent,
    }

    /// A minimal stand-in for the server on 127.0.0.1:<random port>.
    async fn mock_server(kind: Mock) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut n = 0u32;
            while let Ok((tcp, _)) = listener.accept().await {
                n += 1;
                tokio::spawn(mock_connection(tcp, n, kind));
            }
        });
        format!("ws://{addr}/ws")
    }

    async fn mock_connection(tcp: TcpStream, n: u32, kind: Mock) {
        let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
            return;
        };
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(text) = msg else { continue };
            let Ok(msg) = switchboard_proto::parse_client(&text, 65536) else {
                continue;
            };
            let reply = match (kind, msg) {
                (Mock::Silent, _) => continue,
                (_, ClientMessage::Join(j)) => format!(
                    r#"{{"type":"joined","room":"{}","id":"p{n}","peers":[],"mode":"sfu","audio":"mix","iceServers":[],"p2pTimeoutMs":5000,"protocol":1}}"#,
                    j.room
                ),
                (Mock::Good, ClientMessage::Ping(p)) => ServerMessage::Pong(p).to_text(),
                (_, ClientMessage::Leave(l)) => {
                    format!(r#"{{"type":"leaved","room":"{}","id":"p{n}"}}"#, l.room)
                }
                _ => continue,
            };
            if ws.send(Message::text(reply)).await.is_err() {
                return;
            }
        }
    }

    fn args(url: String) -> SignalingArgs {
        SignalingArgs {
            url,
            allow_remote: false,
            connections: 24,
            rooms: 4,
            pings: 3,
            ping_interval: Duration::from_millis(25),
            ping_timeout: Duration::from_millis(300),
            join_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(20),
            connect_concurrency: 5,
            server_pid: Some(std::process::id()),
            json: None,
            run_id: Some("t".into()),
            threads: 1,
        }
    }

    #[tokio::test]
    async fn full_run_against_a_mock_server() {
        let url = mock_server(Mock::Good).await;
        let report = run(&args(url)).await.expect("runs");
        assert!(report.all_ok(), "{}", report.table());
        assert_eq!(report.connections.established, 24);
        assert_eq!(report.connections.joined, 24);
        assert_eq!(report.connections.leave_ok, 24);
        assert_eq!(report.connections.closed_cleanly, 24);
        assert_eq!(report.join_latency.count, 24);
        assert_eq!((report.pings.expected, report.pings.ok), (72, 72));
        assert_eq!(report.ping_latency.count, 72);
        let server = report.server.as_ref().expect("server stats");
        assert!(server.rss_baseline_bytes.is_some() && server.rss_steady_bytes.is_some());
        assert!(report.generator.cpu_total_s.is_some());
        let json = serde_json::to_value(&report).expect("serializes");
        assert_eq!(json["ping_latency"]["count"], 72);
        assert!(json["ping_latency"]["p99_us"].as_u64().is_some());
        assert!(report.table().contains("ping -> pong"));
    }

    #[tokio::test]
    async fn unanswered_pings_are_timeouts() {
        let url = mock_server(Mock::NoPongs).await;
        let report = run(&args(url)).await.expect("runs");
        assert!(!report.all_ok());
        assert_eq!(report.connections.joined, 24);
        assert_eq!(report.pings.sent, 72);
        assert_eq!((report.pings.ok, report.pings.timeouts), (0, 72));
        assert_eq!(report.connections.leave_ok, 24);
    }

    #[tokio::test]
    async fn a_silent_server_cannot_hold_the_run_past_its_timeout() {
        let url = mock_server(Mock::Silent).await;
        let mut a = args(url);
        a.timeout = Duration::from_secs(2);
        let started = Instant::now();
        let report = run(&a).await.expect("runs");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        assert!(!report.completed);
        assert_eq!(report.connections.joined, 0);
        // 5 were joining when the run ended, the rest never got a permit.
        assert_eq!(report.connections.join_timeouts, 5);
        assert_eq!(report.connections.not_attempted, 19);
    }

    #[tokio::test]
    async fn nothing_listening_is_counted_not_fatal() {
        // Bind and drop a listener to find a port that refuses connections.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let mut a = args(format!("ws://127.0.0.1:{port}/ws"));
        a.server_pid = None;
        let report = run(&a).await.expect("runs");
        assert_eq!(report.connections.established, 0);
        assert_eq!(report.connections.join_failed, 24);
        assert_eq!(report.connection_errors.values().sum::<u64>(), 24);
    }
}
