//! `loadtest run` (alias `sfu`): real media through the SFU.
//!
//! 1. Joins `--rooms` × `--participants` real WebRTC clients
//!    ([`switchboard_client::Client`], all in this process, many per runtime
//!    thread as tokio tasks) to rooms created `mode:"sfu"` with the
//!    `--audio-mode` of the join, at most `--connect-concurrency` at a time,
//!    and waits until each is connected and negotiated.
//! 2. The first `--publishers` participants of each room publish real media
//!    ([`crate::media`]): VP8 frames of the committed clip, RFC 7741
//!    packetized, at the frame rate that gives `--video-kbps`, and with
//!    `--audio` Opus frames of a tone encoded at start-up, one per 20 ms.
//!    Everyone subscribes to everyone. The first `--warmup` opens the tracks
//!    (the server announces a track to the others on its first packet); the
//!    next `--duration` is the measurement window; then receivers keep
//!    reading for `--drain` and everyone leaves.
//! 3. Every packet carries its sender, a sequence number and its send time
//!    ([`crate::stamp`], inside the payload), so each subscriber counts what
//!    it got from each (publisher, kind) and computes end-to-end latency on
//!    one clock; RTP-level loss and jitter come from [`crate::rxstats`].
//!    Mixed audio (a track with stream id `mix`, re-encoded by the server)
//!    carries no stamp: it is counted by RTP sequence numbers and timestamps
//!    only.
//! 4. The server's CPU time and RSS (`--server-pid`) and `/metrics` are
//!    sampled at both ends of the window and once a second
//!    ([`crate::sampler`]) for the time series and the plot.
//!
//! With `--simulcast` each publisher's video is a simulcast track of three
//! layers (rids `q`, `h`, `f`; [`crate::publish::Simulcast`]): the clip on
//! `f`, cut copies at 1/9 and 3/9 of its bytes on `q` and `h`. The
//! accounting above follows the top layer (what each subscriber receives
//! when its estimate allows); lower-layer packets that reach a subscriber
//! are counted apart.
//!
//! The whole run is bounded by `--timeout`.

mod report;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard_client::{Client, ClientError, Event, JoinOptions, Kind, LightCounts, LightRtp};
use switchboard_proto::{AudioMode, MediaMode, RoomName, ServerMessage};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::timeout_at;

use crate::media;
use crate::proc::{self, Machine, Pid};
use crate::progress::{Live, Progress};
pub use crate::publish::Schedule;
use crate::publish::{
    check_sender, read_stamp, send_next_layers, split_layer, tick, Publisher, SIMULCAST_RIDS,
};
pub use crate::publish::{kind_index, media_plan, Flow, MediaPlan, Sent, KIND_NAMES};
use crate::rxstats::RtpStats;
use crate::{sampler, scrape};
pub use report::Report;

/// How long after the last packet of the window a participant waits for
/// `Closed` after leaving.
const LEAVE_WAIT: Duration = Duration::from_secs(2);
/// Extra time the coordinator gives the tasks to finish after the media phase.
const COLLECT_GRACE: Duration = Duration::from_secs(4);
/// Delay between announcing the media phase and its start, so every task has
/// seen the schedule before its first packet is due.
const MEDIA_LEAD: Duration = Duration::from_millis(50);
/// Longest wait for one `/metrics` scrape.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for the TCP connection of the reachability check.
const REACH_TIMEOUT: Duration = Duration::from_secs(3);
/// The server's default room capacity.
const DEFAULT_ROOM_CAPACITY: usize = 100;
/// The stream id of the server's mixed-audio track.
pub const MIX_STREAM_ID: &str = "mix";
/// Sampling period of the time series.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// `--audio-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AudioModeArg {
    /// Every audio track forwarded like video.
    Forward,
    /// One mixed track per listener (re-encoded by the server).
    Mix,
}

impl AudioModeArg {
    pub fn proto(self) -> AudioMode {
        match self {
            AudioModeArg::Forward => AudioMode::Forward,
            AudioModeArg::Mix => AudioMode::Mix,
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// WebSocket URL of the server's signaling endpoint (`ws://` only). The
    /// tool connects to this host only: signaling there, `/metrics` on the
    /// same host and port, media to the addresses the server offers.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    pub url: String,
    /// Allow a host other than loopback (127.0.0.0/8, ::1, localhost).
    #[arg(long)]
    pub allow_remote: bool,
    /// Rooms, each created `mode:"sfu"`.
    #[arg(long, default_value_t = 5)]
    pub rooms: usize,
    /// Participants per room; each subscribes to every publisher.
    #[arg(long, default_value_t = 4)]
    pub participants: usize,
    /// Publishers per room (the first N participants); default: all.
    #[arg(long)]
    pub publishers: Option<usize>,
    /// Measurement window (steady state), after the warm-up.
    #[arg(long, default_value = "20s", value_parser = crate::parse_duration)]
    pub duration: Duration,
    /// Sending before the window, so every track is open when it starts.
    #[arg(long, default_value = "2s", value_parser = crate::parse_duration)]
    pub warmup: Duration,
    /// Reading after the window for packets still in flight.
    #[arg(long, default_value = "1s", value_parser = crate::parse_duration)]
    pub drain: Duration,
    /// VP8 bit rate per publisher, kbit/s of frame data (0 = no video): the
    /// clip's frames are sent at the frame rate that gives this rate.
    #[arg(long, default_value_t = 500)]
    pub video_kbps: u32,
    /// Also publish Opus audio (a 440 Hz tone, 20 ms frames, 32 kbit/s).
    #[arg(long)]
    pub audio: bool,
    /// The `audio` field of the join: how the room treats audio.
    #[arg(long, value_enum, default_value = "forward")]
    pub audio_mode: AudioModeArg,
    /// Per participant: WebSocket + join + ICE/DTLS connected + negotiated.
    #[arg(long, default_value = "20s", value_parser = crate::parse_duration)]
    pub join_timeout: Duration,
    /// Participants joining and connecting at the same time.
    #[arg(long, default_value_t = 4)]
    pub connect_concurrency: usize,
    /// Hard limit on the whole run; the tool stops by itself when it expires.
    #[arg(long, default_value = "120s", value_parser = crate::parse_duration)]
    pub timeout: Duration,
    /// Pid of the server, to sample its CPU time and RSS from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Also write the report (every figure) as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also plot latency and CPU over time to this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Run id used in room names (`lt-<run>-<n>`); random by default.
    #[arg(long)]
    pub run_id: Option<String>,
    /// Tokio worker threads of the generator (1 = current-thread runtime,
    /// which leaves the other cores to the server).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Publish video as simulcast: three layers (rids q, h, f). `f` is the
    /// clip at --video-kbps; `q` and `h` are copies of each frame cut to
    /// 1/9 and 3/9 of its bytes (same frame rate), their keyframes
    /// declaring 1/4 and 1/2 of the clip's picture size so the server ranks
    /// them below it. The cut frames do not decode: subscribers only count
    /// packets. The publishers obey the server's `publisher-layers`
    /// (dynacast) as a browser does: a layer nobody needs is not sent, and
    /// one that comes back starts with a keyframe. Loss and latency figures
    /// follow the top layer.
    #[arg(long)]
    pub simulcast: bool,
    /// With --simulcast: send all three layers all the time, whatever
    /// `publisher-layers` says (counted, not obeyed): the server's worst
    /// case.
    #[arg(long, requires = "simulcast")]
    pub ignore_dynacast: bool,
    /// Light subscribers: participants publish as usual (full clients,
    /// encrypting), but their receive side reads the socket with recvmmsg
    /// and, once connected, counts SRTP datagrams from the cleartext header
    /// (distinct SSRC and sequence number, arrived inside the window)
    /// without decrypting them; STUN, DTLS and SRTCP still go to the
    /// WebRTC stack. One generator core then absorbs far more packets; the
    /// report has no end-to-end latency, loss per flow or jitter (the
    /// server's forwarding-latency histogram stays). Not with --simulcast
    /// or --audio-mode mix.
    #[arg(long)]
    pub light_subscribers: bool,
}

impl RunArgs {
    /// Publishers per room.
    pub fn publishers(&self) -> usize {
        self.publishers.unwrap_or(self.participants)
    }
}

/// Entry point of the subcommand. Exit status 0 when every participant
/// connected, received every expected track in the window and stayed
/// connected, and the run finished before `--timeout` (loss and latency are
/// reported, not judged); 1 otherwise; 2 when it could not run (bad
/// arguments, server unreachable, join refused, nobody connected).
pub fn main(args: &RunArgs) -> ExitCode {
    let rt = match crate::runtime(args.threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest run: cannot start the tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(run(args));
    // Client tasks that are still closing must not hold the process.
    rt.shutdown_timeout(Duration::from_secs(1));
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadtest run: error: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report.table());
    if let Some(path) = &args.json {
        if let Err(e) = crate::write_json(path, &report) {
            eprintln!("loadtest run: {e}");
            return ExitCode::from(2);
        }
    }
    if let Some(path) = &args.plot {
        match crate::plot::write_svg(path, &report.plot_title(), &report.plot_points()) {
            Ok(()) => eprintln!("plot written to {}", path.display()),
            Err(e) => {
                eprintln!("loadtest run: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if report.participants.connected == 0 {
        eprintln!(
            "loadtest run: error: no participant connected; {}",
            report
                .errors
                .iter()
                .max_by_key(|(_, n)| **n)
                .map_or("no error recorded".to_owned(), |(e, n)| format!("{n}x {e}"))
        );
        return ExitCode::from(2);
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

/// Checks the arguments; returns the host and port for `/metrics` and the
/// room names.
fn validate(args: &RunArgs, run_id: &str) -> Result<(String, u16, Vec<String>), String> {
    if args.rooms == 0 || args.participants < 2 {
        return Err("--rooms must be at least 1 and --participants at least 2".into());
    }
    if args.publishers() == 0 || args.publishers() > args.participants {
        return Err(format!(
            "--publishers {} must be between 1 and --participants {}",
            args.publishers(),
            args.participants
        ));
    }
    if args.participants > DEFAULT_ROOM_CAPACITY {
        eprintln!(
            "warning: {} participants per room; the server's default room capacity is \
             {DEFAULT_ROOM_CAPACITY}, expect `full`",
            args.participants
        );
    }
    if args.light_subscribers && (args.simulcast || args.audio_mode == AudioModeArg::Mix) {
        return Err(
            "--light-subscribers counts forwarded packets only: not with --simulcast or \
             --audio-mode mix"
                .into(),
        );
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
    let uri = crate::signaling::check_url(&args.url, args.allow_remote)?;
    let host = uri
        .host()
        .unwrap_or("127.0.0.1")
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(80);
    if let Some(pid) = args.server_pid {
        if !Pid::Other(pid).exists() {
            return Err(format!("--server-pid {pid}: no such process"));
        }
        let name = proc::comm(Pid::Other(pid)).unwrap_or_default();
        if !name.contains("switchboard") {
            eprintln!("warning: --server-pid {pid} is {name:?}, not switchboard");
        }
    }
    let rooms = (0..args.rooms)
        .map(|n| {
            let name = format!("lt-{run_id}-{n}");
            RoomName::parse(&name).map(|_| name)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("--run-id {run_id:?}: {e}"))?;
    Ok((host, port, rooms))
}

/// Fails fast, with the reason, when nothing accepts TCP at `host:port`.
async fn reachable(url: &str, host: &str, port: u16) -> Result<(), String> {
    match tokio::time::timeout(REACH_TIMEOUT, tokio::net::TcpStream::connect((host, port))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("cannot reach the server at {url}: {e}")),
        Err(_) => Err(format!(
            "cannot reach the server at {url}: no TCP connection within {REACH_TIMEOUT:?}"
        )),
    }
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

/// What the coordinator tells the participant tasks.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Joining,
    Media(Schedule),
    Stop,
}

/// Everything the participant tasks share.
struct Shared {
    url: String,
    rooms: Vec<String>,
    per_room: usize,
    publishers: usize,
    total: usize,
    base: Instant,
    connect: Semaphore,
    join_timeout: Duration,
    plan: MediaPlan,
    audio_mode: AudioMode,
    live: Arc<Live>,
    /// `--light-subscribers`.
    light: bool,
    /// Publishers obey `publisher-layers` (`--simulcast` without
    /// `--ignore-dynacast`).
    dynacast: bool,
}

impl Shared {
    /// Whether participant `index` publishes.
    fn publishes(&self, index: usize) -> bool {
        index % self.per_room < self.publishers
    }
}

/// The server and the generator at one instant.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    server_cpu: Option<Duration>,
    /// The server's CPU time by thread name.
    server_threads: BTreeMap<String, Duration>,
    own_cpu: Option<Duration>,
    server_rss: Option<u64>,
    metrics: Result<scrape::Samples, String>,
    udp: Option<BTreeMap<String, u64>>,
}

impl Sample {
    async fn take(server: Option<Pid>, host: &str, port: u16) -> Sample {
        let at = Instant::now();
        let server_cpu = server.and_then(|p| proc::cpu_time(p).ok());
        let own_cpu = proc::cpu_time(Pid::Own).ok();
        let udp = proc::udp_counters();
        let metrics = scrape::get(host, port, "/metrics", SCRAPE_TIMEOUT)
            .await
            .map(|t| scrape::parse_text(&t));
        Sample {
            at,
            server_cpu,
            server_threads: server
                .and_then(|p| proc::thread_cpu_times(p).ok())
                .unwrap_or_default(),
            own_cpu,
            server_rss: server.and_then(|p| proc::rss_bytes(p).ok()),
            metrics,
            udp,
        }
    }
}

/// How a participant's join ended, as told to the coordinator.
enum Ready {
    Connected,
    Failed,
    /// The server said no (`full`, `error`, ...): a configuration problem,
    /// not a load result; the run stops.
    Refused(String),
}

pub async fn run(args: &RunArgs) -> Result<Report, String> {
    let run_id = args
        .run_id
        .clone()
        .unwrap_or_else(crate::signaling::default_run_id);
    let (host, port, rooms) = validate(args, &run_id)?;
    let mut plan = media_plan(args.video_kbps, args.audio)?;
    if args.simulcast {
        plan = plan.with_simulcast()?;
    }
    reachable(&args.url, &host, port).await?;
    let machine = Machine::probe();
    let server = args.server_pid.map(Pid::Other);
    let base = Instant::now();
    let hard = base + args.timeout;
    let total = args.rooms * args.participants;
    let progress = Progress::new(total as u64, base);
    let say = |what: std::fmt::Arguments<'_>| progress.say(what);

    let baseline = Sample::take(server, &host, port).await;
    if let Err(e) = &baseline.metrics {
        say(format_args!(
            "warning: cannot read the server's /metrics ({e}); server counters will be missing"
        ));
    }
    say(format_args!(
        "joining {total} participants ({} rooms x {}, {} publishing per room) to {}, {} at a time",
        args.rooms,
        args.participants,
        args.publishers(),
        args.url,
        args.connect_concurrency
    ));
    let live = Arc::new(Live::default());
    let follower = progress.follow(live.clone());
    let shared = Arc::new(Shared {
        url: args.url.clone(),
        rooms,
        per_room: args.participants,
        publishers: args.publishers(),
        total,
        base,
        connect: Semaphore::new(args.connect_concurrency),
        join_timeout: args.join_timeout,
        plan: plan.clone(),
        audio_mode: args.audio_mode.proto(),
        live: live.clone(),
        light: args.light_subscribers,
        dynacast: args.simulcast && !args.ignore_dynacast,
    });
    let (phase_tx, phase_rx) = watch::channel(Phase::Joining);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Ready>();
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

    // Phase 1: every participant connected and negotiated (or failed).
    let media_time = args.warmup + args.duration + args.drain + LEAVE_WAIT + COLLECT_GRACE;
    let join_deadline = hard - media_time;
    let (mut ready, mut failed) = (0usize, 0usize);
    let mut join_phase_complete = true;
    let mut refused = None;
    while ready + failed < total {
        match timeout_at(join_deadline.into(), ready_rx.recv()).await {
            Ok(Some(Ready::Connected)) => ready += 1,
            Ok(Some(Ready::Failed)) => failed += 1,
            Ok(Some(Ready::Refused(why))) => {
                refused = Some(why);
                break;
            }
            Ok(None) => break,
            Err(_) => {
                join_phase_complete = false;
                break;
            }
        }
    }
    if let Some(why) = refused {
        // Nothing useful can be measured: stop everyone, briefly, and say why.
        let _ = phase_tx.send(Phase::Stop);
        let until = Instant::now() + Duration::from_secs(3);
        for task in tasks {
            if timeout_at(until.into(), task).await.is_err() {
                break;
            }
        }
        if let Some(f) = follower {
            f.abort();
        }
        progress.finish();
        return Err(format!("the server refused a join: {why}"));
    }
    let joined_at = Instant::now();
    let after_join = Sample::take(server, &host, port).await;
    say(format_args!(
        "{ready} connected, {failed} failed{}",
        if join_phase_complete {
            ""
        } else {
            ", the rest still joining at the deadline"
        }
    ));

    // Phase 2: warm-up, window, drain; the sampler runs throughout.
    let mut window = None;
    let mut schedule = None;
    let mut ticks = Vec::new();
    if ready > 0 {
        let s = Schedule::new(
            base,
            Instant::now() + MEDIA_LEAD,
            args.warmup,
            args.duration,
            args.drain,
        );
        schedule = Some(s);
        let (stop_tx, stop_rx) = watch::channel(false);
        let target = sampler::Target {
            pid: args.server_pid,
            metrics: Some((host.clone(), port)),
            counter: report::FORWARDED.to_owned(),
        };
        let sampling = tokio::spawn(async move {
            tokio::time::sleep_until(s.warmup_start.into()).await;
            sampler::sample_until(target, SAMPLE_EVERY, stop_rx).await
        });
        let _ = phase_tx.send(Phase::Media(s));
        say(format_args!(
            "publishing; warm-up {:?}, then a {:?} window",
            args.warmup, args.duration
        ));
        tokio::time::sleep_until(s.t0.into()).await;
        let start = Sample::take(server, &host, port).await;
        say(format_args!("window open"));
        tokio::time::sleep_until(s.t1.into()).await;
        let stop = Sample::take(server, &host, port).await;
        say(format_args!("window closed; draining and leaving"));
        window = Some((start, stop));
        tokio::time::sleep_until(s.end.into()).await;
        let _ = stop_tx.send(true);
        let limit = Instant::now() + Duration::from_secs(3);
        ticks = timeout_at(limit.into(), sampling)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
    }

    // Phase 3: collect the tasks (they leave by themselves at `end`).
    let collect_deadline = schedule
        .map_or(Instant::now(), |s| s.end + LEAVE_WAIT + COLLECT_GRACE / 2)
        .min(hard);
    if schedule.is_none() {
        let _ = phase_tx.send(Phase::Stop);
    }
    let mut outcomes = Vec::with_capacity(total);
    let mut tasks_lost = 0usize;
    let mut stop_sent = schedule.is_none();
    for mut task in tasks {
        let mut res = timeout_at(collect_deadline.into(), &mut task).await;
        if res.is_err() {
            // Late: tell everyone to stop, give it a moment, then abandon it.
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
    let completed = join_phase_complete && Instant::now() <= hard && tasks_lost == 0;
    if let Some(f) = follower {
        f.abort();
    }
    say(format_args!("all participants done"));
    progress.finish();
    let finished = Sample::take(server, &host, port).await;

    Ok(Report::assemble(report::Inputs {
        args,
        run_id: &run_id,
        machine,
        plan: &plan,
        base,
        outcomes,
        tasks_lost,
        completed,
        schedule,
        baseline,
        after_join,
        joined_at,
        window,
        finished,
        ticks,
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
    /// Participant id the server gave us.
    pub id: Option<String>,
    /// The audio mode in our `joined`.
    pub audio_mode: Option<AudioMode>,
    pub join_started: Option<Instant>,
    /// Connected and negotiated.
    pub ready_at: Option<Instant>,
    /// Publishes (one of the room's first `--publishers`).
    pub publisher: bool,
    /// Took part in the media phase (was ready before it began).
    pub published: bool,
    /// The first thing that went wrong.
    pub error: Option<String>,
    /// Per stream, indexed like [`kind_index`].
    pub sent: [Sent; 2],
    /// Keyed by (publisher index, kind index).
    pub flows: HashMap<(usize, usize), Flow>,
    /// The server's mixed-audio track (stream id `mix`), by RTP header only,
    /// from the window start on; and when its first packet came.
    pub mix: Option<RtpStats>,
    pub mix_first_at: Option<Instant>,
    /// `TrackAdded` by (stream id = publisher's participant id, kind index).
    pub tracks_added: HashMap<(String, usize), Instant>,
    pub tracks_removed: u64,
    /// Payloads that could not be counted, by reason.
    pub bad: BTreeMap<&'static str, u64>,
    /// (arrival in ms since publishing began, latency in µs) of every
    /// in-window stamped packet, for the time series.
    pub timeline: Vec<(u32, u32)>,
    /// Connection states reported after `connected` (e.g. `disconnected`).
    pub later_states: Vec<String>,
    /// Server `error` codes received.
    pub server_errors: BTreeMap<String, u64>,
    /// The client task ended before we left.
    pub closed_early: bool,
    /// `--simulcast`: lower-layer packets handed to the client, per layer (q, h).
    pub lower_sent: [u64; 2],
    /// `--simulcast`: lower-layer packets received, per layer (q, h).
    pub lower_received: [u64; 2],
    /// `publisher-layers` messages received.
    pub publisher_layers: u64,
    /// Of those, the ones that turned a layer off or on (dynacast obeyed).
    pub layer_changes: u64,
    /// `--light-subscribers`: this participant's light receiver, and what it
    /// had counted when the media phase ended.
    pub light: Option<LightRtp>,
    pub light_counts: Option<LightCounts>,
}

impl Outcome {
    fn new(index: usize, shared: &Shared) -> Outcome {
        let per_room = shared.per_room;
        let room = index / per_room;
        Outcome {
            index,
            room,
            name: format!("r{room}-p{}", index % per_room),
            id: None,
            audio_mode: None,
            join_started: None,
            ready_at: None,
            publisher: shared.publishes(index),
            published: false,
            error: None,
            sent: [Sent::default(); 2],
            flows: HashMap::new(),
            mix: None,
            mix_first_at: None,
            tracks_added: HashMap::new(),
            tracks_removed: 0,
            bad: BTreeMap::new(),
            timeline: Vec::new(),
            later_states: Vec::new(),
            server_errors: BTreeMap::new(),
            closed_early: false,
            lower_sent: [0; 2],
            lower_received: [0; 2],
            publisher_layers: 0,
            layer_changes: 0,
            light: shared.light.then(LightRtp::new),
            light_counts: None,
        }
    }

    fn fail(&mut self, e: impl Into<String>) {
        if self.error.is_none() {
            self.error = Some(e.into());
        }
    }

    fn absorb(&mut self, ev: Event, schedule: Option<&Schedule>, shared: &Shared) {
        match ev {
            Event::Rtp {
                kind,
                packet,
                at,
                stream_id,
                ..
            } => {
                let counted = schedule.is_some_and(|s| at >= s.t0);
                if kind == Kind::Audio && stream_id == MIX_STREAM_ID {
                    // Re-encoded by the server: no stamp survives; RTP only.
                    self.mix_first_at.get_or_insert(at);
                    if counted {
                        self.mix
                            .get_or_insert_with(|| RtpStats::new(media::OPUS_CLOCK))
                            .record(
                                packet.header.sequence_number,
                                packet.header.timestamp,
                                packet.payload.len(),
                                at,
                            );
                    }
                    Live::add(&shared.live.received, 1);
                    return;
                }
                let (stamp, lower) = match read_stamp(kind, &packet.payload) {
                    Ok(s) => split_layer(s),
                    Err(bad) => {
                        *self.bad.entry(bad.as_str()).or_default() += 1;
                        return;
                    }
                };
                if let Some(layer) = lower.filter(|_| kind == Kind::Video) {
                    // A lower simulcast layer: counted apart.
                    if let Some(reason) =
                        check_sender(&stamp, self.index, shared.per_room, shared.total)
                    {
                        *self.bad.entry(reason).or_default() += 1;
                        return;
                    }
                    match self.lower_received.get_mut(layer) {
                        Some(n) => *n += 1,
                        None => *self.bad.entry("unknown-layer").or_default() += 1,
                    }
                    Live::add(&shared.live.received, 1);
                    return;
                }
                if let Some(reason) =
                    check_sender(&stamp, self.index, shared.per_room, shared.total)
                {
                    *self.bad.entry(reason).or_default() += 1;
                    return;
                }
                let sender = stamp.sender as usize;
                Live::add(&shared.live.received, 1);
                let sent_at = shared.base + Duration::from_nanos(stamp.sent_ns);
                let in_window = schedule.is_some_and(|s| s.in_window(stamp.sent_ns));
                let latency = at.saturating_duration_since(sent_at);
                let flow = self
                    .flows
                    .entry((sender, kind_index(kind)))
                    .or_insert_with(|| Flow::new(kind));
                let fresh = flow.stamp.record(stamp.seq, at, in_window, latency);
                // Sent in the window (the stamp says when), like the stamp
                // counts: by arrival time, a late packet from the warm-up
                // would stretch the sequence range back to packets that
                // arrived before the window and count them as lost.
                if in_window {
                    flow.rtp.record(
                        packet.header.sequence_number,
                        packet.header.timestamp,
                        packet.payload.len(),
                        at,
                    );
                }
                if let (true, true, Some(s)) = (fresh, in_window, schedule) {
                    let t_ms = at.saturating_duration_since(s.warmup_start).as_millis();
                    let lat_us = latency.as_micros();
                    self.timeline.push((
                        u32::try_from(t_ms).unwrap_or(u32::MAX),
                        u32::try_from(lat_us).unwrap_or(u32::MAX),
                    ));
                }
            }
            Event::TrackAdded {
                stream_id, kind, ..
            } => {
                self.tracks_added
                    .entry((stream_id, kind_index(kind)))
                    .or_insert_with(Instant::now);
            }
            Event::TrackRemoved { .. } => self.tracks_removed += 1,
            Event::PublisherLayers { .. } => self.publisher_layers += 1,
            Event::Connection(state) => self.later_states.push(state),
            Event::Signal(ServerMessage::Error(e)) => {
                *self
                    .server_errors
                    .entry(e.code.as_str().to_owned())
                    .or_default() += 1;
            }
            _ => {}
        }
    }
}

/// Sends the next frame of `p` (or stops it at the end of the window).
fn send(
    p: &mut Publisher,
    client: &Client,
    out: &mut Outcome,
    schedule: &Schedule,
    shared: &Shared,
) {
    // With simulcast, `send_rtp` video goes on the top layer (the client's
    // last rid, `f`); the lower layers name theirs.
    let lower_sent = &mut out.lower_sent;
    let (handed, _) = send_next_layers(
        p,
        &shared.plan,
        out.index,
        shared.base,
        schedule,
        &mut out.sent,
        |kind, payload, marker, ts| client.send_rtp(kind, payload, marker, ts).is_ok(),
        |layer, payload, marker, ts| {
            let ok = SIMULCAST_RIDS
                .get(layer)
                .is_some_and(|rid| client.send_rtp_layer(rid, payload, marker, ts).is_ok());
            if let (true, Some(n)) = (ok, lower_sent.get_mut(layer)) {
                *n += 1;
            }
            ok
        },
    );
    Live::add(&shared.live.expected, handed * (shared.per_room - 1) as u64);
}

/// Resolves when the coordinator says `Stop` (or is gone).
async fn until_stop(rx: &mut watch::Receiver<Phase>) {
    loop {
        if matches!(*rx.borrow_and_update(), Phase::Stop) {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn participant(
    index: usize,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
    ready: mpsc::UnboundedSender<Ready>,
) -> Outcome {
    let mut out = Outcome::new(index, &shared);
    let mut refused = None;
    let client = tokio::select! {
        c = join(&shared, &mut out, &mut refused) => c,
        () = until_stop(&mut phase) => {
            out.fail("stopped while joining");
            None
        }
    };
    let _ = ready.send(match (&client, refused) {
        (Some(_), _) => {
            Live::add(&shared.live.connected, 1);
            Ready::Connected
        }
        (None, Some(why)) => Ready::Refused(format!("{}: {why}", out.name)),
        (None, None) => {
            Live::add(&shared.live.failed, 1);
            Ready::Failed
        }
    });
    drop(ready);
    let Some(mut client) = client else {
        return out;
    };
    let mut schedule = match *phase.borrow_and_update() {
        Phase::Joining => None,
        Phase::Media(_) => {
            out.fail("connected after the media phase began");
            client.leave();
            return out;
        }
        Phase::Stop => {
            client.leave();
            return out;
        }
    };
    let mut streams: [Option<Publisher>; 2] = [None, None];
    // The last `publisher-layers` (dynacast), for a video stream not
    // started yet when it came.
    let mut layers: Option<Vec<String>> = None;
    loop {
        let end = schedule.map(|s: Schedule| s.end);
        let [audio, video] = &mut streams;
        tokio::select! {
            ev = client.next_event() => match ev {
                Some(Event::Closed) | None => {
                    out.closed_early = true;
                    out.fail("client closed (signaling ended) during the run");
                    return out;
                }
                Some(Event::KeyframeRequested { kind: Kind::Video, .. }) => {
                    // Answered as an encoder does: the next frame is a keyframe.
                    if let Some(v) = video.as_mut() {
                        v.keyframe_requested(&shared.plan);
                    }
                }
                Some(Event::PublisherLayers { active, .. }) if shared.dynacast => {
                    out.publisher_layers += 1;
                    if let Some(v) = video.as_mut() {
                        if v.set_layers(&shared.plan, &active) {
                            out.layer_changes += 1;
                        }
                    }
                    layers = Some(active);
                }
                Some(ev) => out.absorb(ev, schedule.as_ref(), &shared),
            },
            changed = phase.changed() => {
                if changed.is_err() {
                    break;
                }
                match *phase.borrow_and_update() {
                    Phase::Media(s) => {
                        schedule = Some(s);
                        out.published = true;
                        if let Some(light) = &out.light {
                            light.set_window(s.t0, s.t1);
                        }
                        if out.publisher {
                            [*audio, *video] = Publisher::all(&shared.plan, s.warmup_start);
                            if let (Some(v), Some(l)) = (video.as_mut(), layers.as_ref()) {
                                v.set_layers(&shared.plan, l);
                            }
                        }
                    }
                    Phase::Stop => break,
                    Phase::Joining => {}
                }
            }
            () = tick(audio) => {
                if let (Some(p), Some(s)) = (audio.as_mut(), schedule.as_ref()) {
                    send(p, &client, &mut out, s, &shared);
                }
            }
            () = tick(video) => {
                if let (Some(p), Some(s)) = (video.as_mut(), schedule.as_ref()) {
                    send(p, &client, &mut out, s, &shared);
                }
            }
            () = sleep_until_opt(end) => break,
        }
    }
    out.light_counts = out.light.as_ref().map(LightRtp::counts);
    client.leave();
    // Let the leave reach the server before the client is dropped.
    let until = Instant::now() + LEAVE_WAIT;
    while let Ok(Some(ev)) = timeout_at(until.into(), client.next_event()).await {
        if matches!(ev, Event::Closed) {
            break;
        }
    }
    out
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Joins and waits until connected and negotiated; `None` (with
/// `out.error` set) on failure, and `refused` set when the server said no.
async fn join(shared: &Shared, out: &mut Outcome, refused: &mut Option<String>) -> Option<Client> {
    let _permit = shared.connect.acquire().await.ok()?;
    let started = Instant::now();
    out.join_started = Some(started);
    let deadline: tokio::time::Instant = (started + shared.join_timeout).into();
    let mut opts = JoinOptions::sfu(&shared.url, &shared.rooms[out.room], &out.name);
    opts.audio = Some(shared.audio_mode);
    opts.publish_audio = out.publisher && shared.plan.audio.is_some();
    opts.publish_video = out.publisher && shared.plan.video.is_some();
    opts.light = out.light.clone();
    if opts.publish_video && shared.plan.simulcast.is_some() {
        opts.simulcast = Some(SIMULCAST_RIDS.iter().map(|r| (*r).to_owned()).collect());
    }
    let mut client = match timeout_at(deadline, Client::join(opts)).await {
        Err(_) => {
            out.fail("join: timed out");
            return None;
        }
        Ok(Err(ClientError::Refused(msg))) => {
            let why = refusal(&msg);
            out.fail(format!("join refused: {why}"));
            *refused = Some(why);
            return None;
        }
        Ok(Err(e)) => {
            out.fail(format!("join: {e}"));
            return None;
        }
        Ok(Ok(c)) => c,
    };
    out.id = Some(client.id.clone());
    out.audio_mode = Some(client.joined.audio);
    if client.joined.mode != MediaMode::Sfu {
        out.fail(format!(
            "joined a room in mode {:?}, not sfu",
            client.joined.mode
        ));
        return None;
    }
    let (mut connected, mut negotiated) = (false, false);
    while !(connected && negotiated) {
        match timeout_at(deadline, client.next_event()).await {
            Err(_) => {
                out.fail(if connected {
                    "timed out waiting for negotiation"
                } else {
                    "timed out waiting for ICE/DTLS connected"
                });
                return None;
            }
            Ok(None | Some(Event::Closed)) => {
                out.fail("client closed before connecting");
                return None;
            }
            Ok(Some(Event::Connection(state))) => match state.as_str() {
                "connected" => connected = true,
                "failed" | "closed" => {
                    out.fail(format!("connection {state}"));
                    return None;
                }
                _ => {}
            },
            Ok(Some(Event::Negotiated)) => negotiated = true,
            Ok(Some(Event::Signal(ServerMessage::Error(e)))) => {
                out.fail(format!("server error {} while joining", e.code.as_str()));
                return None;
            }
            Ok(Some(_)) => {}
        }
    }
    out.ready_at = Some(Instant::now());
    Some(client)
}

/// The server's answer to a refused join, shortened to what a person needs:
/// `room lt-x-0 is full ...`, `error <code>: <message>`, or the message as is.
fn refusal(msg: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(msg) {
        Ok(v) => {
            let ty = v["type"].as_str().unwrap_or("?");
            match (ty, v["code"].as_str(), v["message"].as_str()) {
                ("full", _, _) => format!(
                    "room {} is full (the server's --max-participants)",
                    v["room"].as_str().unwrap_or("?")
                ),
                (_, Some(c), Some(t)) => format!("{ty} {c}: {t}"),
                (_, Some(c), None) => format!("{ty} {c}"),
                _ => msg.to_owned(),
            }
        }
        Err(_) => msg.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stamp::{self, Stamp};
    use bytes::Bytes;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: RunArgs,
    }

    fn args(extra: &[&str]) -> RunArgs {
        let mut v = vec!["x"];
        v.extend_from_slice(extra);
        Wrap::try_parse_from(v).expect("parses").args
    }

    #[test]
    fn validation() {
        let ok = validate(&args(&["--run-id", "t"]), "t").expect("valid");
        assert_eq!((ok.0.as_str(), ok.1), ("127.0.0.1", 8080));
        assert_eq!(ok.2.len(), 5);
        assert_eq!(ok.2[4], "lt-t-4");
        assert!(validate(&args(&["--url", "ws://10.1.2.3:8080/ws"]), "t").is_err());
        assert!(validate(&args(&["--participants", "1"]), "t").is_err());
        assert!(validate(&args(&["--publishers", "5"]), "t").is_err());
        assert!(validate(&args(&["--publishers", "0"]), "t").is_err());
        assert!(validate(&args(&["--timeout", "20s"]), "t").is_err());
        assert!(validate(&args(&["--light-subscribers"]), "t").is_ok());
        for bad in [
            ["--light-subscribers", "--simulcast"],
            ["--light-subscribers", "--audio-mode=mix"],
        ] {
            let e =
                validate(&args(&bad), "t").expect_err("light mode counts forwarded packets only");
            assert!(e.contains("--light-subscribers"), "{e}");
        }
        let remote = args(&["--url", "ws://10.1.2.3:9/ws", "--allow-remote"]);
        assert_eq!(validate(&remote, "t").expect("remote").1, 9);
    }

    #[test]
    fn refusals_read_well() {
        assert_eq!(
            refusal(r#"{"type":"full","room":"lt-a-0"}"#),
            "room lt-a-0 is full (the server's --max-participants)"
        );
        assert_eq!(
            refusal(r#"{"type":"error","code":"bad-room","message":"nope"}"#),
            "error bad-room: nope"
        );
        assert_eq!(refusal("garbage"), "garbage");
    }

    /// The real server in-process on 127.0.0.1 (ports picked by the kernel).
    async fn server() -> switchboard::server::RunningServer {
        use switchboard::config::{Config, ServeOptions};
        let options = ServeOptions {
            listen: Some("127.0.0.1:0".parse().expect("address")),
            rtc_ip: Some("127.0.0.1".parse().expect("address")),
            rtc_port: Some(0),
            ..ServeOptions::default()
        };
        let config = Config::resolve(options).expect("valid config");
        switchboard::server::start(config)
            .await
            .expect("server starts")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_run_against_the_real_server_counts_every_packet() {
        let server = server().await;
        let a = args(&[
            "--url",
            &server.ws_url(),
            "--rooms",
            "2",
            "--participants",
            "3",
            "--audio",
            "--warmup",
            "1s",
            "--duration",
            "2s",
            "--drain",
            "500ms",
            "--timeout",
            "40s",
            "--server-pid",
            &std::process::id().to_string(),
        ]);
        let started = Instant::now();
        let r = run(&a).await.expect("runs");
        assert!(started.elapsed() < Duration::from_secs(40));
        assert!(r.all_ok(), "{}", r.table());
        assert_eq!(r.participants.connected, 6);
        assert_eq!(r.tracks_expected, 6 * 2 * 2);
        for m in &r.media {
            // ~2 s of 50 audio packets/s, or of ~30 VP8 frames/s of 1-5
            // packets each, from 6 publishers.
            assert!(m.sent > 400, "{}: {} sent", m.kind, m.sent);
            assert_eq!(m.expected, m.sent * 2, "{}: two subscribers each", m.kind);
            assert_eq!(m.tracks_missing, 0);
            // Loopback within one process: allow a stray late packet, no more.
            assert!(m.loss_percent < 1.0, "{}", r.table());
            assert!(m.latency.count > 0 && m.latency.p50 < Duration::from_millis(200));
            assert!(m.jitter_ms_max.is_some());
            assert!(m.received_bytes > 0);
        }
        let video = &r.media[1];
        assert!(
            (300.0..700.0).contains(&video.sent_kbps_per_publisher),
            "{}",
            video.sent_kbps_per_publisher
        );
        assert!(
            video.keyframes >= 6,
            "a keyframe a second from each publisher"
        );
        assert!(r.bad_payloads.is_empty(), "{:?}", r.bad_payloads);
        assert!(r.mixed_audio.is_none());
        let sm = r.server_metrics.as_ref().expect("/metrics scraped");
        assert!(sm.forwarded > 0.0);
        let fwd = sm.expected_forwarded as f64;
        // Plausible, not exact (as in tests/run.rs): the server's count runs
        // between two /metrics scrapes, and when the other tests of this
        // binary load the machine, receivers NACK late packets and the
        // retransmissions are forwarded again (seen: 1.28x and 1.62x in two
        // of four CI runs here; within 5 % otherwise).
        assert!(
            sm.forwarded >= fwd * 0.9 && sm.forwarded <= fwd * 1.7,
            "server forwarded {} vs {} expected",
            sm.forwarded,
            fwd
        );
        let s = r.server.as_ref().expect("server stats");
        assert!(s.cpu_window_s.is_some() && s.rss_steady_bytes.is_some());
        assert_eq!(r.first_packet_after_warmup.count, 24);
        assert!(r.timeline.len() >= 3, "{} points", r.timeline.len());
        assert!(r.timeline.iter().any(|t| t.latency_p50_ms.is_some()));
        let table = r.table();
        assert!(table.contains("CPU per packet"), "{table}");
        serde_json::to_string(&r).expect("serializes");
    }

    #[tokio::test]
    async fn nothing_listening_is_an_error_at_once() {
        // A port with no listener: bind one, note it, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let url = format!("ws://127.0.0.1:{port}/ws");
        let a = args(&["--url", &url, "--rooms", "1", "--participants", "2"]);
        let started = Instant::now();
        let e = run(&a).await.expect_err("nothing to run against");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(e.contains("cannot reach the server"), "{e}");
        assert!(e.contains(&url), "{e}");
    }

    fn rtp(seq: u16, ts: u32, payload: Bytes) -> switchboard_client::RtpPacket {
        let mut p = switchboard_client::RtpPacket::default();
        p.header.sequence_number = seq;
        p.header.timestamp = ts;
        p.payload = payload;
        p
    }

    /// What a subscriber does with what arrives: stamped VP8 and Opus go to
    /// per-publisher flows with latency; a `mix` track (no stamp) is counted
    /// by RTP only; foreign or damaged payloads are set aside.
    #[test]
    fn absorb_routes_stamped_and_mixed_media() {
        let base = Instant::now();
        let a = args(&["--rooms", "2", "--participants", "3", "--audio"]);
        let shared = Shared {
            url: a.url.clone(),
            rooms: vec!["a".into(), "b".into()],
            per_room: 3,
            publishers: 3,
            total: 6,
            base,
            connect: Semaphore::new(1),
            join_timeout: a.join_timeout,
            plan: media_plan(500, true).expect("plan"),
            audio_mode: AudioMode::Mix,
            live: Arc::new(Live::default()),
            light: false,
            dynacast: false,
        };
        let s = Schedule::new(base, base, a.warmup, a.duration, a.drain);
        let mut out = Outcome::new(0, &shared);
        let sent_ns = crate::publish::ns_since(base, s.t0) + 1_000;
        let stamp = |sender, seq| Stamp {
            sender,
            seq,
            sent_ns,
        };
        let at = s.t0 + Duration::from_millis(5);
        let ev = |kind, stream: &str, packet| Event::Rtp {
            track_id: "t".into(),
            stream_id: stream.into(),
            kind,
            packet,
            at,
        };
        // VP8 from participant 1: one packet of a frame, stamped.
        let mut v = media::vp8_packets(&[0x10, 2, 3, 4], 7, 1200, stamp::STAMP_LEN)
            .pop()
            .expect("one packet");
        stamp::append_trailer(&mut v, stamp(1, 0));
        out.absorb(
            ev(Kind::Video, "p1", rtp(100, 9000, v.freeze())),
            Some(&s),
            &shared,
        );
        // Opus from participant 2.
        let opus = shared.plan.audio.as_ref().expect("audio").frames[0].clone();
        let o = stamp::opus_stamped(&opus, stamp(2, 0)).expect("code 0");
        out.absorb(ev(Kind::Audio, "p2", rtp(5, 960, o)), Some(&s), &shared);
        // Mixed audio across a sequence wrap, one lost, one duplicated.
        for seq in [65534u16, 65535, 1, 1] {
            out.absorb(
                ev(
                    Kind::Audio,
                    MIX_STREAM_ID,
                    rtp(seq, u32::from(seq) * 960, opus.clone()),
                ),
                Some(&s),
                &shared,
            );
        }
        // Someone from the other room, our own packet, an unstamped payload.
        let mut other = media::vp8_packets(&[0x10, 1], 1, 1200, stamp::STAMP_LEN)
            .pop()
            .expect("one packet");
        stamp::append_trailer(&mut other, stamp(4, 0));
        out.absorb(
            ev(Kind::Video, "p4", rtp(1, 0, other.freeze())),
            Some(&s),
            &shared,
        );
        let own = stamp::opus_stamped(&opus, stamp(0, 0)).expect("code 0");
        out.absorb(ev(Kind::Audio, "p0", rtp(1, 0, own)), Some(&s), &shared);
        out.absorb(
            ev(Kind::Audio, "p2", rtp(6, 0, opus.clone())),
            Some(&s),
            &shared,
        );

        let video = &out.flows[&(1, 1)];
        assert_eq!((video.stamp.window, video.rtp.received), (1, 1));
        assert_eq!(video.stamp.latencies, vec![Duration::from_micros(4_999)]);
        let audio = &out.flows[&(2, 0)];
        assert_eq!(audio.stamp.window, 1);
        let mix = out.mix.as_ref().expect("mix counted");
        assert_eq!((mix.received, mix.expected(), mix.lost()), (3, 4, 1));
        assert_eq!(mix.duplicates, 1);
        assert_eq!(out.flows.len(), 2, "mixed audio has no per-publisher flow");
        assert_eq!(out.timeline.len(), 2, "latency only for stamped packets");
        assert_eq!(out.bad.get("other-room"), Some(&1));
        assert_eq!(out.bad.get("own-packet"), Some(&1));
        assert_eq!(out.bad.get("no-stamp"), Some(&1));
    }

    #[test]
    fn schedule_window() {
        let base = Instant::now();
        let a = args(&["--warmup", "1s", "--duration", "2s", "--drain", "500ms"]);
        let s = Schedule::new(
            base,
            base + Duration::from_secs(1),
            a.warmup,
            a.duration,
            a.drain,
        );
        assert!(!s.in_window(1_999_999_999));
        assert!(s.in_window(2_000_000_000));
        assert!(s.in_window(3_999_999_999));
        assert!(!s.in_window(4_000_000_000));
        assert_eq!(s.end - s.t1, Duration::from_millis(500));
    }
}
