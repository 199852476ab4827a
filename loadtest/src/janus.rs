//! `loadtest janus`: the `run` benchmark's fixed load, against Janus
//! VideoRoom (Debian package `janus` 1.1.2) over its WebSocket API; with
//! `--audio-mode mix`, an audio load against AudioBridge instead (see
//! [`mix`]). What follows is the VideoRoom run.
//!
//! 1. Creates `--rooms` VideoRoom rooms (Opus + VP8) on an admin session.
//! 2. Every participant opens its own WebSocket and session, joins its room
//!    as a publisher and `configure`s a PeerConnection with our offer (one
//!    Opus and one VP8 track). When every publisher is up, each participant
//!    attaches a subscriber handle and joins it with every *other* feed of
//!    its room (one multistream subscription, as `janus.js` 1.x does): Janus
//!    offers, we answer, `start`.
//! 3. Media is exactly the `run` load ([`crate::publish`], shared with it):
//!    the committed VP8 clip, RFC 7741 packetized, at the frame rate of
//!    `--video-kbps`, and with `--audio` the Opus tone, every packet stamped
//!    with sender, sequence number and send time ([`crate::stamp`]); paced
//!    the same way, with the same warm-up / window / drain.
//! 4. Each subscriber counts what it got per (publisher, kind): loss (by
//!    stamp and by RTP sequence), RTP jitter ([`crate::rxstats`]),
//!    end-to-end latency, join → first packet. With `--server-pid` (Janus's
//!    pid) the server's CPU and RSS are read from `/proc`.
//!
//! Janus has no counter of forwarded packets we can read without enabling
//! its admin API (and that counts per handle, not per forward), so **packets
//! forwarded are derived from what the subscribers received**: every
//! distinct in-window packet a subscriber got was forwarded once. CPU per
//! forwarded packet is the server's window CPU over that number; losses, if
//! any, make it a slight overestimate for Janus.
//!
//! Janus offers host candidates on interface addresses only (never on
//! loopback), so it and this generator run inside a network namespace with
//! one address (`loadtest/janus/run.sh`, `loadtest compare`). Each
//! PeerConnection binds its socket to `--bind-ip` (default: the host of
//! `--url`), which must be an address of this machine (or namespace).

mod api;
mod mix;
mod peer;
mod report;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{json, Value};
use switchboard_client::Kind;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::timeout_at;

use crate::proc::{self, Machine, Pid};
pub use crate::publish::Schedule;
use crate::publish::{check_sender, read_stamp, send_next, tick, Publisher};
pub use crate::publish::{kind_index, media_plan, Flow, MediaPlan, Sent, KIND_NAMES};
use crate::rxstats::RtpStats;
use api::{Handle, Session};
use peer::{Peer, PeerEvent};
pub use report::Report;

/// Extra time the coordinator gives the tasks to finish after the media phase.
const COLLECT_GRACE: Duration = Duration::from_secs(4);
/// Leaving: hang up and destroy the session.
const LEAVE_WAIT: Duration = Duration::from_millis(500);
/// Delay between announcing the media phase and its start.
const MEDIA_LEAD: Duration = Duration::from_millis(50);
/// Longest wait for the WebSocket to Janus to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the participants send their audio to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AudioMode {
    /// VideoRoom forwards every publisher's audio (the `sfu` load).
    Forward,
    /// AudioBridge mixes: one mixed stream back per participant (audio
    /// only: `--video-kbps 0`).
    Mix,
}

#[derive(Debug, Clone, clap::Args)]
pub struct JanusArgs {
    /// Janus's WebSocket API (`ws://` only, subprotocol `janus-protocol`).
    #[arg(long, default_value = "ws://10.77.0.1:8188")]
    pub url: String,
    /// Address the generator's media sockets bind to (and the only host
    /// candidate offered); default: the host of `--url`. Must be an address
    /// of this machine or namespace.
    #[arg(long)]
    pub bind_ip: Option<IpAddr>,
    /// Rooms, each a VideoRoom room created for this run.
    #[arg(long, default_value_t = 5)]
    pub rooms: usize,
    /// Participants per room; each subscribes to every publisher but itself.
    #[arg(long, default_value_t = 4)]
    pub participants: usize,
    /// Publishers per room (the first N participants; default: all).
    #[arg(long)]
    pub publishers: Option<usize>,
    /// `forward` (VideoRoom) or `mix` (AudioBridge).
    #[arg(long, value_enum, default_value_t = AudioMode::Forward)]
    pub audio_mode: AudioMode,
    /// Measurement window (steady state), after the warm-up.
    #[arg(long, default_value = "20s", value_parser = crate::parse_duration)]
    pub duration: Duration,
    /// Sending before the window, so every track is flowing when it starts.
    #[arg(long, default_value = "2s", value_parser = crate::parse_duration)]
    pub warmup: Duration,
    /// Reading after the window for packets still in flight.
    #[arg(long, default_value = "1s", value_parser = crate::parse_duration)]
    pub drain: Duration,
    /// VP8 bit rate per publisher, kbit/s of frame data (0 = no video): the
    /// clip's frames at the frame rate that gives this rate, as `run`.
    #[arg(long, default_value_t = 500)]
    pub video_kbps: u32,
    /// Also publish Opus audio (a 440 Hz tone, 20 ms frames, 32 kbit/s),
    /// as `run --audio`.
    #[arg(long)]
    pub audio: bool,
    /// Per participant: session, publisher PeerConnection connected; then
    /// again for the subscriber PeerConnection.
    #[arg(long, default_value = "20s", value_parser = crate::parse_duration)]
    pub join_timeout: Duration,
    /// Participants joining and connecting at the same time.
    #[arg(long, default_value_t = 4)]
    pub connect_concurrency: usize,
    /// Hard limit on the whole run; the tool stops by itself when it expires.
    #[arg(long, default_value = "120s", value_parser = crate::parse_duration)]
    pub timeout: Duration,
    /// Pid of Janus, to sample its CPU time and RSS from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run id shown in the report and Janus displays; random by default.
    #[arg(long)]
    pub run_id: Option<String>,
    /// Tokio worker threads of the generator (1 = current-thread runtime).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

/// Entry point. Exit status 0 when every participant connected both
/// PeerConnections, received every expected track in the window and the run
/// finished before `--timeout`; 1 otherwise; 2 when it could not run (bad
/// arguments, Janus unreachable or refusing to create rooms).
pub fn main(args: &JanusArgs) -> ExitCode {
    let rt = match crate::runtime(args.threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest: cannot start the tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(run(args));
    rt.shutdown_timeout(Duration::from_secs(1));
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadtest janus: {e}");
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
                eprintln!("loadtest janus: cannot write {}: {e}", path.display());
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

/// Checks the arguments; returns the address media binds to.
fn validate(args: &JanusArgs) -> Result<IpAddr, String> {
    if args.audio_mode == AudioMode::Mix && (args.video_kbps != 0 || !args.audio) {
        return Err(
            "--audio-mode mix (AudioBridge) is audio only: pass --audio --video-kbps 0".into(),
        );
    }
    if args.rooms == 0 || args.participants < 2 {
        return Err("--rooms must be at least 1 and --participants at least 2".into());
    }
    let publishers = args.publishers.unwrap_or(args.participants);
    if publishers == 0 || publishers > args.participants {
        return Err(format!(
            "--publishers {publishers}: between 1 and --participants ({})",
            args.participants
        ));
    }
    if args.connect_concurrency == 0 {
        return Err("--connect-concurrency must be at least 1".into());
    }
    if args.duration < Duration::from_secs(1) {
        return Err("--duration must be at least 1s".into());
    }
    let media = args.warmup + args.duration + args.drain + LEAVE_WAIT + COLLECT_GRACE;
    if args.timeout < media + Duration::from_secs(5) {
        return Err(format!(
            "--timeout {:?} leaves no time to join: warm-up, window, drain and leaving \
             take {:?}",
            args.timeout, media
        ));
    }
    let uri: tokio_tungstenite::tungstenite::http::Uri = args
        .url
        .parse()
        .map_err(|e| format!("--url {:?}: {e}", args.url))?;
    if uri.scheme_str() != Some("ws") {
        return Err(format!("--url {:?}: only ws:// is supported", args.url));
    }
    let host: IpAddr = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| {
            format!(
                "--url {:?}: the host must be an IP address (Janus's namespace address)",
                args.url
            )
        })?;
    let bind = args.bind_ip.unwrap_or(host);
    // Traffic stays on this machine: both addresses must be ours.
    for (what, ip) in [("--url host", host), ("--bind-ip", bind)] {
        std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).map_err(|e| {
            format!(
                "{what} {ip} is not an address of this machine or namespace ({e}); \
                 run inside Janus's namespace (loadtest/janus/run.sh)"
            )
        })?;
    }
    if let Some(pid) = args.server_pid {
        if !Pid::Other(pid).exists() {
            return Err(format!("--server-pid {pid}: no such process"));
        }
        let name = proc::comm(Pid::Other(pid)).unwrap_or_default();
        if !name.contains("janus") {
            eprintln!("warning: --server-pid {pid} is {name:?}, not janus");
        }
    }
    Ok(bind)
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

/// Every room's publishers: (participant index, Janus feed id).
type Feeds = Arc<Vec<Vec<(usize, u64)>>>;

/// What the coordinator tells the participant tasks.
#[derive(Debug, Clone)]
enum Phase {
    /// Join and publish.
    Publishing,
    /// Every publisher is up: subscribe to these feeds.
    Subscribe(Feeds),
    Media(Schedule),
    Stop,
}

/// What a participant tells the coordinator.
#[derive(Debug)]
enum Ready {
    /// Publishing (with its feed id), or only subscribing (`None`).
    Published(Option<u64>),
    Subscribed,
    Failed,
}

struct Shared {
    url: String,
    bind: IpAddr,
    room_ids: Vec<u64>,
    per_room: usize,
    publishers: usize,
    total: usize,
    base: Instant,
    connect: Semaphore,
    join_timeout: Duration,
    plan: MediaPlan,
    run_id: String,
    mode: AudioMode,
}

/// The server and the generator at one instant.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    server_cpu: Option<Duration>,
    own_cpu: Option<Duration>,
    server_rss: Option<u64>,
}

impl Sample {
    fn take(server: Option<Pid>) -> Sample {
        Sample {
            at: Instant::now(),
            server_cpu: server.and_then(|p| proc::cpu_time(p).ok()),
            own_cpu: proc::cpu_time(Pid::Own).ok(),
            server_rss: server.and_then(|p| proc::rss_bytes(p).ok()),
        }
    }
}

/// Creates one VideoRoom room per `--rooms` on an admin session; returns the
/// session (kept open for the run), Janus's version string and the room ids.
async fn create_rooms(
    args: &JanusArgs,
    publishers: usize,
) -> Result<(Session, String, Vec<u64>), String> {
    let admin = Session::connect(&args.url, CONNECT_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    let version = admin
        .info()
        .await
        .ok()
        .and_then(|i| i["version_string"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into());
    let plugin = match args.audio_mode {
        AudioMode::Forward => "janus.plugin.videoroom",
        AudioMode::Mix => "janus.plugin.audiobridge",
    };
    let handle = admin.attach(plugin).await.map_err(|e| e.to_string())?;
    let first: u64 = rand::rng().random_range(1_000_000..1_000_000_000);
    let mut ids = Vec::with_capacity(args.rooms);
    for n in 0..args.rooms as u64 {
        let room = first + n;
        let body = match args.audio_mode {
            AudioMode::Mix => json!({
                "request": "create",
                "room": room,
                "permanent": false,
                "description": format!("loadtest {}", n),
                "sampling_rate": 48000,
                "audiolevel_event": false,
                "record": false,
            }),
            AudioMode::Forward => json!({
            "request": "create",
            "room": room,
            "permanent": false,
            "description": format!("loadtest {}", n),
            "publishers": publishers,
            "audiocodec": "opus",
            "videocodec": "vp8",
            // No bitrate cap (REMB) and no periodic keyframe requests: the
            // generator paces its own rates, as with Switchboard.
            "bitrate": 0,
            "fir_freq": 0,
            "notify_joining": false,
            "require_pvtid": false,
            }),
        };
        let (data, _) = admin
            .message(handle, body, None)
            .await
            .map_err(|e| format!("creating room {room}: {e}"))?;
        if data["videoroom"] != "created" && data["audiobridge"] != "created" {
            return Err(format!("creating room {room}: Janus answered {data}"));
        }
        ids.push(room);
    }
    Ok((admin, version, ids))
}

pub async fn run(args: &JanusArgs) -> Result<Report, String> {
    let bind = validate(args)?;
    let plan = media_plan(args.video_kbps, args.audio)?;
    let run_id = args
        .run_id
        .clone()
        .unwrap_or_else(crate::signaling::default_run_id);
    let publishers = args.publishers.unwrap_or(args.participants);
    let machine = Machine::probe();
    let server = args.server_pid.map(Pid::Other);
    let base = Instant::now();
    let hard = base + args.timeout;
    let say = |what: std::fmt::Arguments<'_>| {
        crate::signaling::progress(tokio::time::Instant::from_std(base), what)
    };

    let baseline = Sample::take(server);
    let (admin, janus_version, room_ids) = create_rooms(args, publishers).await?;
    say(format_args!(
        "Janus {janus_version} at {}: {} {} rooms created",
        args.url,
        args.rooms,
        match args.audio_mode {
            AudioMode::Forward => "VideoRoom",
            AudioMode::Mix => "AudioBridge",
        }
    ));
    let total = args.rooms * args.participants;
    let shared = Arc::new(Shared {
        url: args.url.clone(),
        bind,
        room_ids,
        per_room: args.participants,
        publishers,
        total,
        base,
        connect: Semaphore::new(args.connect_concurrency),
        join_timeout: args.join_timeout,
        plan: plan.clone(),
        run_id: run_id.clone(),
        mode: args.audio_mode,
    });
    let (phase_tx, phase_rx) = watch::channel(Phase::Publishing);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<(usize, Ready)>();
    let tasks: Vec<_> = (0..total)
        .map(|i| {
            tokio::spawn(participant(
                i,
                shared.clone(),
                phase_rx.clone(),
                ready_tx.clone(),
            ))
        })
        .collect();
    drop(ready_tx);
    drop(phase_rx);

    let media_time = args.warmup + args.duration + args.drain + LEAVE_WAIT + COLLECT_GRACE;
    let join_deadline = hard - media_time;
    say(format_args!(
        "joining {total} participants ({} rooms x {}, {} publishing), {} at a time",
        args.rooms, args.participants, publishers, args.connect_concurrency
    ));

    // Phase 1: every publisher up. Phase 2: every subscriber up.
    let mut join_phase_complete = true;
    let mut feeds: Vec<Vec<(usize, u64)>> = vec![Vec::new(); args.rooms];
    let (mut published, mut failed) = (0usize, 0usize);
    while published + failed < total {
        match timeout_at(join_deadline.into(), ready_rx.recv()).await {
            Ok(Some((i, Ready::Published(feed)))) => {
                published += 1;
                if let Some(f) = feed {
                    feeds[i / args.participants].push((i, f));
                }
            }
            Ok(Some((_, _))) => failed += 1,
            Ok(None) => break,
            Err(_) => {
                join_phase_complete = false;
                break;
            }
        }
    }
    say(format_args!(
        "{published} joined (publishers connected), {failed} failed; subscribing"
    ));
    let _ = phase_tx.send(Phase::Subscribe(Arc::new(feeds)));
    let mut ready = 0usize;
    while join_phase_complete && ready + failed < total {
        match timeout_at(join_deadline.into(), ready_rx.recv()).await {
            Ok(Some((_, Ready::Subscribed))) => ready += 1,
            Ok(Some((_, _))) => failed += 1,
            Ok(None) => break,
            Err(_) => {
                join_phase_complete = false;
                break;
            }
        }
    }
    let after_join = Sample::take(server);
    say(format_args!(
        "{ready} connected (publisher and subscriber), {failed} failed{}",
        if join_phase_complete {
            ""
        } else {
            ", the rest still joining at the deadline"
        }
    ));

    // Phase 3: warm-up, window, drain.
    let mut window = None;
    let mut schedule = None;
    if ready > 0 {
        let s = Schedule::new(
            base,
            Instant::now() + MEDIA_LEAD,
            args.warmup,
            args.duration,
            args.drain,
        );
        schedule = Some(s);
        let _ = phase_tx.send(Phase::Media(s));
        say(format_args!(
            "publishing; warm-up {:?}, then a {:?} window",
            args.warmup, args.duration
        ));
        tokio::time::sleep_until(s.t0.into()).await;
        let start = Sample::take(server);
        say(format_args!("window open"));
        tokio::time::sleep_until(s.t1.into()).await;
        let stop = Sample::take(server);
        say(format_args!("window closed; draining and leaving"));
        window = Some((start, stop));
    } else {
        let _ = phase_tx.send(Phase::Stop);
    }

    // Phase 4: collect the tasks (they leave by themselves at `end`).
    let collect_deadline = schedule
        .map_or(Instant::now() + LEAVE_WAIT, |s| {
            s.end + LEAVE_WAIT + COLLECT_GRACE / 2
        })
        .min(hard);
    let mut outcomes = Vec::with_capacity(total);
    let mut tasks_lost = 0usize;
    let mut stop_sent = schedule.is_none();
    for mut task in tasks {
        let mut res = timeout_at(collect_deadline.into(), &mut task).await;
        if res.is_err() {
            if !stop_sent {
                stop_sent = true;
                let _ = phase_tx.send(Phase::Stop);
            }
            let limit = (Instant::now() + Duration::from_millis(500)).min(hard.max(Instant::now()));
            res = timeout_at(limit.into(), &mut task).await;
        }
        match res {
            Ok(Ok(o)) => outcomes.push(o),
            Ok(Err(_)) => tasks_lost += 1,
            Err(_) => {
                task.abort();
                tasks_lost += 1;
            }
        }
    }
    admin.close();
    let completed = join_phase_complete && Instant::now() <= hard && tasks_lost == 0;
    say(format_args!("all participants done"));
    let finished = Sample::take(server);

    Ok(Report::assemble(report::Inputs {
        args,
        run_id: &run_id,
        janus_version,
        machine,
        plan: &plan,
        publishers,
        outcomes,
        tasks_lost,
        completed,
        schedule,
        baseline,
        after_join,
        window,
        finished,
    }))
}

// ---------------------------------------------------------------------------
// One participant
// ---------------------------------------------------------------------------

/// Everything one participant saw and did.
#[derive(Debug)]
pub struct Outcome {
    pub index: usize,
    pub room: usize,
    pub name: String,
    pub publishes: bool,
    pub feed: Option<u64>,
    pub join_started: Option<Instant>,
    /// Both PeerConnections connected.
    pub ready_at: Option<Instant>,
    /// Took part in the media phase.
    pub published: bool,
    pub error: Option<String>,
    pub sent: [Sent; 2],
    /// Keyed by (publisher index, kind index).
    pub flows: HashMap<(usize, usize), Flow>,
    pub tracks_added: usize,
    pub bad: BTreeMap<&'static str, u64>,
    /// Connection states reported after `connected`, and Janus `hangup`s.
    pub later_states: Vec<String>,
    /// Mix mode: the mixed stream received, by RTP header, from the window
    /// start on (as `run` counts Switchboard's mix); and its first packet.
    pub mixed: Option<RtpStats>,
    pub mixed_first_at: Option<Instant>,
}

impl Outcome {
    fn new(index: usize, shared: &Shared) -> Outcome {
        let room = index / shared.per_room;
        let slot = index % shared.per_room;
        Outcome {
            index,
            room,
            name: format!("r{room}-p{slot}"),
            publishes: slot < shared.publishers,
            feed: None,
            join_started: None,
            ready_at: None,
            published: false,
            error: None,
            sent: [Sent::default(); 2],
            flows: HashMap::new(),
            tracks_added: 0,
            bad: BTreeMap::new(),
            later_states: Vec::new(),
            mixed: None,
            mixed_first_at: None,
        }
    }

    fn fail(&mut self, e: impl Into<String>) {
        if self.error.is_none() {
            self.error = Some(e.into());
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn absorb_rtp(
        &mut self,
        kind: Kind,
        seq: u16,
        timestamp: u32,
        data: &[u8],
        at: Instant,
        schedule: Option<&Schedule>,
        shared: &Shared,
    ) {
        let stamp = match read_stamp(kind, data) {
            Ok(s) => s,
            Err(bad) => {
                *self.bad.entry(bad.as_str()).or_default() += 1;
                return;
            }
        };
        if let Some(reason) = check_sender(&stamp, self.index, shared.per_room, shared.total) {
            *self.bad.entry(reason).or_default() += 1;
            return;
        }
        let sender = stamp.sender as usize;
        let sent_at = shared.base + Duration::from_nanos(stamp.sent_ns);
        let in_window = schedule.is_some_and(|s| s.in_window(stamp.sent_ns));
        let flow = self
            .flows
            .entry((sender, kind_index(kind)))
            .or_insert_with(|| Flow::new(kind));
        flow.stamp.record(
            stamp.seq,
            at,
            in_window,
            at.saturating_duration_since(sent_at),
        );
        // By the stamp's send time, as `run` does.
        if in_window {
            flow.rtp.record(seq, timestamp, data.len(), at);
        }
    }

    /// Mix mode: a packet of the mixed stream (no stamp survives mixing).
    fn absorb_mixed(
        &mut self,
        seq: u16,
        timestamp: u32,
        len: usize,
        at: Instant,
        schedule: Option<&Schedule>,
    ) {
        self.mixed_first_at.get_or_insert(at);
        if schedule.is_some_and(|s| at >= s.t0) {
            self.mixed
                .get_or_insert_with(|| RtpStats::new(crate::media::OPUS_CLOCK))
                .record(seq, timestamp, len, at);
        }
    }
}

/// Sends the next frame of `p` (or stops it at the end of the window).
fn send(p: &mut Publisher, peer: &Peer, out: &mut Outcome, schedule: &Schedule, shared: &Shared) {
    send_next(
        p,
        &shared.plan,
        out.index,
        shared.base,
        schedule,
        &mut out.sent,
        |kind, payload, marker, ts| peer.send_rtp(kind, payload, marker, ts).is_ok(),
    );
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// The next event of an optional peer; never resolves without one.
async fn peer_event(p: &mut Option<Peer>) -> Option<PeerEvent> {
    match p {
        Some(p) => p.events.recv().await,
        None => std::future::pending().await,
    }
}

/// Waits for a phase past `past` (`Publishing`, then `Subscribe`); `Stop` if
/// the coordinator is gone.
async fn next_phase(rx: &mut watch::Receiver<Phase>, past_subscribe: bool) -> Phase {
    loop {
        let p = rx.borrow_and_update().clone();
        let waiting = match p {
            Phase::Publishing => true,
            Phase::Subscribe(_) => past_subscribe,
            Phase::Media(_) | Phase::Stop => false,
        };
        if !waiting {
            return p;
        }
        if rx.changed().await.is_err() {
            return Phase::Stop;
        }
    }
}

/// Waits until `peer` reports `connected`, taking its track events.
async fn until_connected(
    peer: &mut Peer,
    deadline: tokio::time::Instant,
    what: &str,
    out: &mut Outcome,
) -> Result<(), String> {
    loop {
        match timeout_at(deadline, peer.events.recv()).await {
            Err(_) => return Err(format!("timed out waiting for the {what} to connect")),
            Ok(None) => return Err(format!("{what} stopped")),
            Ok(Some(PeerEvent::State(s))) => match s.as_str() {
                "connected" => return Ok(()),
                "failed" | "closed" => return Err(format!("{what} {s}")),
                _ => {}
            },
            Ok(Some(PeerEvent::Track)) => out.tracks_added += 1,
            Ok(Some(PeerEvent::Rtp { .. })) => {}
        }
    }
}

/// The SDP of a JSEP Janus sent, checking its type.
fn jsep_sdp(jsep: Option<Value>, want: &str, what: &str) -> Result<String, String> {
    let j = jsep.ok_or_else(|| format!("{what}: Janus sent no JSEP"))?;
    if j["type"] != want {
        return Err(format!(
            "{what}: Janus sent a {} instead of an {want}",
            j["type"]
        ));
    }
    j["sdp"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("{what}: JSEP without SDP"))
}

/// Session, publisher handle, `join` as publisher, `configure` with our
/// offer, publisher PeerConnection connected.
async fn publish(
    shared: &Shared,
    out: &mut Outcome,
    session: &mut Session,
) -> Result<Option<Peer>, String> {
    if !out.publishes {
        return Ok(None);
    }
    let deadline: tokio::time::Instant = (Instant::now() + shared.join_timeout).into();
    let room = shared.room_ids[out.room];
    let handle = session
        .attach("janus.plugin.videoroom")
        .await
        .map_err(|e| e.to_string())?;
    let display = format!("{}-{}", shared.run_id, out.name);
    let (joined, _) = session
        .message(
            handle,
            json!({"request": "join", "ptype": "publisher", "room": room, "display": display}),
            None,
        )
        .await
        .map_err(|e| e.to_string())?;
    out.feed = joined["id"].as_u64();
    if out.feed.is_none() {
        return Err(format!("join: no feed id in {joined}"));
    }
    let kinds: Vec<Kind> = shared.plan.kinds();
    let mut peer = Peer::start(shared.bind, &kinds, &out.name)
        .await
        .map_err(|e| format!("publisher PeerConnection: {e}"))?;
    let offer = peer.offer().await.map_err(|e| format!("offer: {e}"))?;
    let (_, jsep) = session
        .message(
            handle,
            json!({"request": "configure", "audio": true, "video": true}),
            Some(json!({"type": "offer", "sdp": offer, "trickle": false})),
        )
        .await
        .map_err(|e| e.to_string())?;
    session.trickle_completed(handle);
    let answer = jsep_sdp(jsep, "answer", "configure")?;
    peer.answer(answer)
        .await
        .map_err(|e| format!("Janus's answer: {e}"))?;
    until_connected(&mut peer, deadline, "publisher PeerConnection", out).await?;
    // Janus lets subscribers at a feed only once its own side is up
    // (`webrtcup`); before that, a subscription gets "No such feed".
    until_webrtcup(session, handle, deadline).await?;
    Ok(Some(peer))
}

/// Joins the room: VideoRoom publisher, or AudioBridge participant.
async fn join_room(
    shared: &Shared,
    out: &mut Outcome,
    session: &mut Session,
) -> Result<Option<Peer>, String> {
    match shared.mode {
        AudioMode::Forward => publish(shared, out, session).await,
        AudioMode::Mix => mix::join(shared, out, session).await.map(Some),
    }
}

/// Waits for Janus's `webrtcup` on `handle` (other notifications are
/// dropped: nothing else matters while joining).
async fn until_webrtcup(
    session: &mut Session,
    handle: Handle,
    deadline: tokio::time::Instant,
) -> Result<(), String> {
    loop {
        match timeout_at(deadline, session.events.recv()).await {
            Err(_) => return Err("timed out waiting for Janus's webrtcup".into()),
            Ok(None) => return Err("the Janus connection closed".into()),
            Ok(Some(v)) if v["janus"] == "webrtcup" && v["sender"].as_u64() == Some(handle.0) => {
                return Ok(())
            }
            Ok(Some(v)) if v["janus"] == "hangup" => {
                return Err(format!("Janus hung up the publisher: {}", v["reason"]))
            }
            Ok(Some(_)) => {}
        }
    }
}

/// Subscriber handle joined with every other feed of the room; Janus
/// offers, we answer and `start`; subscriber PeerConnection connected.
/// `None` when the room has no other publisher.
async fn subscribe(
    shared: &Shared,
    out: &mut Outcome,
    session: &Session,
    feeds: &[(usize, u64)],
) -> Result<Option<Peer>, String> {
    let deadline: tokio::time::Instant = (Instant::now() + shared.join_timeout).into();
    let room = shared.room_ids[out.room];
    let streams: Vec<Value> = feeds
        .iter()
        .filter(|(i, _)| *i != out.index)
        .map(|(_, f)| json!({"feed": f}))
        .collect();
    if streams.is_empty() {
        // The room's only publisher (`--publishers 1`) has nothing to receive.
        return Ok(None);
    }
    let handle: Handle = session
        .attach("janus.plugin.videoroom")
        .await
        .map_err(|e| e.to_string())?;
    let (_, jsep) = session
        .message(
            handle,
            json!({"request": "join", "ptype": "subscriber", "room": room, "streams": streams}),
            None,
        )
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    let offer = jsep_sdp(jsep, "offer", "subscribe")?;
    let mut peer = Peer::start(shared.bind, &[], &out.name)
        .await
        .map_err(|e| format!("subscriber PeerConnection: {e}"))?;
    let answer = peer
        .accept(offer)
        .await
        .map_err(|e| format!("Janus's subscriber offer: {e}"))?;
    session
        .message(
            handle,
            json!({"request": "start"}),
            Some(json!({"type": "answer", "sdp": answer, "trickle": false})),
        )
        .await
        .map_err(|e| format!("start: {e}"))?;
    session.trickle_completed(handle);
    until_connected(&mut peer, deadline, "subscriber PeerConnection", out).await?;
    Ok(Some(peer))
}

async fn participant(
    index: usize,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
    ready: mpsc::UnboundedSender<(usize, Ready)>,
) -> Outcome {
    let mut out = Outcome::new(index, &shared);
    // Join and publish, holding a connect permit.
    let joined = {
        let permit = shared.connect.acquire().await;
        out.join_started = Some(Instant::now());
        let r = match permit {
            Err(_) => Err("stopped".to_owned()),
            Ok(_permit) => match Session::connect(&shared.url, CONNECT_TIMEOUT).await {
                Err(e) => Err(e.to_string()),
                Ok(mut session) => match join_room(&shared, &mut out, &mut session).await {
                    Ok(peer) => Ok((session, peer)),
                    Err(e) => {
                        session.close();
                        Err(e)
                    }
                },
            },
        };
        r
    };
    let (mut session, mut pub_peer) = match joined {
        Ok(j) => j,
        Err(e) => {
            out.fail(format!("join: {e}"));
            let _ = ready.send((index, Ready::Failed));
            return out;
        }
    };
    let _ = ready.send((index, Ready::Published(out.feed)));
    let feeds = match next_phase(&mut phase, false).await {
        Phase::Subscribe(f) => f,
        _ => {
            session.close();
            return out;
        }
    };
    let sub = match shared.mode {
        // The AudioBridge PeerConnection also receives the mix.
        AudioMode::Mix => Ok(None),
        AudioMode::Forward => {
            let _permit = shared.connect.acquire().await;
            let room = out.room;
            subscribe(&shared, &mut out, &session, &feeds[room]).await
        }
    };
    let mut sub_peer = match sub {
        Ok(p) => p,
        Err(e) => {
            out.fail(e);
            let _ = ready.send((index, Ready::Failed));
            session.close();
            return out;
        }
    };
    out.ready_at = Some(Instant::now());
    let _ = ready.send((index, Ready::Subscribed));
    drop(ready);

    let schedule = match next_phase(&mut phase, true).await {
        Phase::Media(s) => Some(s),
        _ => {
            session.close();
            return out;
        }
    };
    out.published = true;
    // The same publishers in both modes (mix mode: audio only).
    let [mut audio, mut video] = match schedule.as_ref().filter(|_| out.publishes) {
        Some(s) => Publisher::all(&shared.plan, s.warmup_start),
        None => [None, None],
    };
    loop {
        let end = schedule.map(|s| s.end);
        tokio::select! {
            ev = peer_event(&mut sub_peer) => match ev {
                Some(PeerEvent::Rtp { kind, seq, timestamp, payload, at }) => {
                    out.absorb_rtp(kind, seq, timestamp, &payload, at, schedule.as_ref(), &shared);
                }
                Some(PeerEvent::Track) => out.tracks_added += 1,
                Some(PeerEvent::State(s)) => out.later_states.push(format!("subscriber {s}")),
                None => {
                    out.fail("subscriber PeerConnection stopped");
                    sub_peer = None;
                }
            },
            ev = peer_event(&mut pub_peer) => match ev {
                Some(PeerEvent::State(s)) => out.later_states.push(format!("publisher {s}")),
                Some(PeerEvent::Rtp { seq, timestamp, payload, at, .. }) => {
                    // Mix mode: the mix comes back on the publishing connection.
                    out.absorb_mixed(seq, timestamp, payload.len(), at, schedule.as_ref());
                }
                Some(PeerEvent::Track) => out.tracks_added += 1,
                None => {
                    out.fail("publisher PeerConnection stopped");
                    pub_peer = None;
                }
            },
            ev = session.events.recv() => match ev {
                Some(v) if v["janus"] == "hangup" => {
                    out.later_states.push(format!("janus hangup: {}", v["reason"]));
                }
                Some(_) => {}
                None => {
                    out.fail("the Janus connection closed during the run");
                    break;
                }
            },
            changed = phase.changed() => {
                if changed.is_err() || matches!(*phase.borrow_and_update(), Phase::Stop) {
                    break;
                }
            }
            () = tick(&mut audio) => {
                if let (Some(p), Some(s), Some(peer)) = (audio.as_mut(), schedule.as_ref(), pub_peer.as_ref()) {
                    send(p, peer, &mut out, s, &shared);
                }
            }
            () = tick(&mut video) => {
                if let (Some(p), Some(s), Some(peer)) = (video.as_mut(), schedule.as_ref(), pub_peer.as_ref()) {
                    send(p, peer, &mut out, s, &shared);
                }
            }
            () = sleep_until_opt(end) => break,
        }
    }
    // Hang up: dropping the peers stops their tasks; the session goes.
    session.close();
    drop(pub_peer);
    drop(sub_peer);
    tokio::time::sleep(LEAVE_WAIT).await;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: JanusArgs,
    }

    fn args(extra: &[&str]) -> JanusArgs {
        let mut v = vec!["x"];
        v.extend_from_slice(extra);
        Wrap::try_parse_from(v).expect("parses").args
    }

    #[test]
    fn same_load_as_run() {
        // The defaults that shape the load are `run`'s.
        #[derive(Parser)]
        struct RunWrap {
            #[command(flatten)]
            args: crate::run::RunArgs,
        }
        let r = RunWrap::try_parse_from(["x", "--audio"])
            .expect("parses")
            .args;
        let j = args(&["--audio"]);
        assert_eq!(
            (j.video_kbps, j.audio, j.duration, j.warmup, j.drain),
            (r.video_kbps, r.audio, r.duration, r.warmup, r.drain)
        );
        assert_eq!((j.rooms, j.participants), (r.rooms, r.participants));
    }

    #[test]
    fn validation() {
        // 127.0.0.1 is ours, so it passes the locality check.
        let ok = args(&["--url", "ws://127.0.0.1:8188"]);
        assert_eq!(validate(&ok), Ok(IpAddr::from([127, 0, 0, 1])));
        let remote = args(&["--url", "ws://192.0.2.1:8188"]);
        let e = validate(&remote).expect_err("not ours");
        assert!(e.contains("not an address of this machine"), "{e}");
        assert!(validate(&args(&["--url", "wss://127.0.0.1:8188"])).is_err());
        assert!(validate(&args(&["--url", "ws://janus:8188"])).is_err());
        assert!(validate(&args(&["--url", "ws://127.0.0.1:1", "--publishers", "5"])).is_err());
        assert!(validate(&args(&["--url", "ws://127.0.0.1:1", "--audio-mode", "mix"])).is_err());
        let mix = args(&[
            "--url",
            "ws://127.0.0.1:1",
            "--audio-mode",
            "mix",
            "--video-kbps",
            "0",
        ]);
        assert!(validate(&mix).is_err(), "mix without --audio");
        let mix = args(&[
            "--url",
            "ws://127.0.0.1:1",
            "--audio-mode",
            "mix",
            "--audio",
            "--video-kbps",
            "0",
        ]);
        assert!(validate(&mix).is_ok());
        assert!(validate(&args(&["--url", "ws://127.0.0.1:1", "--timeout", "10s"])).is_err());
    }

    #[tokio::test]
    async fn nothing_listening_is_a_clear_error_quickly() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let url = format!("ws://127.0.0.1:{port}");
        let a = args(&["--url", &url, "--rooms", "1", "--participants", "2"]);
        // A generous bound so a hang fails the test instead of stalling it.
        let e = tokio::time::timeout(Duration::from_secs(60), run(&a))
            .await
            .expect("gives up by itself")
            .expect_err("no Janus there");
        assert!(e.contains("cannot connect to Janus"), "{e}");
    }
}
