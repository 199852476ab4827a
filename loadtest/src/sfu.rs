//! `loadtest sfu`: the SFU forwarding benchmark.
//!
//! 1. Joins `--rooms` × `--participants` real WebRTC clients
//!    ([`switchboard_client::Client`], all in this process, many per runtime
//!    thread) to rooms created `mode:"sfu"`, at most `--connect-concurrency`
//!    at a time, and waits until each is connected and negotiated.
//! 2. Every participant publishes Opus-shaped audio (`--audio-pps` packets/s
//!    of `--audio-payload` bytes) and VP8-shaped video (`--video-payload`-byte
//!    packets at the rate `--video-kbps` needs), each paced by its own timer
//!    with a random phase. The first `--warmup` opens the tracks (the server
//!    announces a track to the others on its first packet); the next
//!    `--duration` is the measurement window; then receivers keep reading
//!    for `--drain` and everyone leaves.
//! 3. Every payload carries its sender, a sequence number and its send time
//!    (nanoseconds since a base `Instant` of this process), so each
//!    subscriber counts what it got from each (publisher, kind) and computes
//!    end-to-end latency on one clock. Packets *sent* inside the window are
//!    the ones counted.
//! 4. With `--server-pid`, the server's CPU time and RSS are read from
//!    `/proc` and its `/metrics` are scraped at both ends of the window:
//!    CPU per forwarded packet, its forwarding-latency histogram, RSS per
//!    participant.
//!
//! The whole run is bounded by `--timeout`.

mod payload;
mod report;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use switchboard_client::{Client, Event, JoinOptions, Kind};
use switchboard_proto::{MediaMode, RoomName, ServerMessage};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::{timeout_at, MissedTickBehavior};

use crate::proc::{self, Machine, Pid};
use crate::scrape;
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
/// Sequence numbers above this are treated as damage (a run sends far fewer).
const MAX_SEQ: u32 = 1 << 24;
/// The server's default room capacity.
const DEFAULT_ROOM_CAPACITY: usize = 100;

#[derive(Debug, Clone, clap::Args)]
pub struct SfuArgs {
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
    /// Participants per room; each publishes and subscribes to all others.
    #[arg(long, default_value_t = 4)]
    pub participants: usize,
    /// Measurement window (steady state), after the warm-up.
    #[arg(long, default_value = "20s", value_parser = crate::parse_duration)]
    pub duration: Duration,
    /// Sending before the window, so every track is open when it starts.
    #[arg(long, default_value = "2s", value_parser = crate::parse_duration)]
    pub warmup: Duration,
    /// Reading after the window for packets still in flight.
    #[arg(long, default_value = "1s", value_parser = crate::parse_duration)]
    pub drain: Duration,
    /// Video payload bit rate per publisher, kbit/s (0 = no video).
    #[arg(long, default_value_t = 500)]
    pub video_kbps: u32,
    /// Bytes of RTP payload per video packet.
    #[arg(long, default_value_t = 1100)]
    pub video_payload: usize,
    /// Audio packets per second per publisher (0 = no audio).
    #[arg(long, default_value_t = 50)]
    pub audio_pps: u32,
    /// Bytes of RTP payload per audio packet.
    #[arg(long, default_value_t = 100)]
    pub audio_payload: usize,
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
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run id used in room names (`sfu-<run>-<n>`); random by default.
    #[arg(long)]
    pub run_id: Option<String>,
    /// Tokio worker threads of the generator (1 = current-thread runtime,
    /// which leaves the other cores to the server).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

/// Entry point of the subcommand. Exit status 0 when every participant
/// connected, received every expected track in the window and stayed
/// connected, and the run finished before `--timeout` (loss and latency are
/// reported, not judged); 1 otherwise; 2 when it could not run.
pub fn main(args: &SfuArgs) -> ExitCode {
    let rt = match crate::runtime(args.threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest: cannot start the tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(run(args));
    // Client tasks that are still closing must not hold the process.
    rt.shutdown_timeout(Duration::from_secs(1));
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadtest sfu: {e}");
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
                eprintln!("loadtest sfu: cannot write {}: {e}", path.display());
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

/// One published stream: its kind, packet interval and payload size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamSpec {
    pub kind: Kind,
    pub period: Duration,
    pub payload: usize,
}

impl StreamSpec {
    pub fn packets_per_second(&self) -> f64 {
        1.0 / self.period.as_secs_f64()
    }
}

/// The streams every participant publishes.
fn streams(args: &SfuArgs) -> Result<Vec<StreamSpec>, String> {
    let mut out = Vec::new();
    if args.audio_pps > 0 {
        if args.audio_pps > 1000 {
            return Err("--audio-pps above 1000 is not audio".into());
        }
        out.push(StreamSpec {
            kind: Kind::Audio,
            period: Duration::from_secs(1) / args.audio_pps,
            payload: args.audio_payload.max(payload::header_len(Kind::Audio)),
        });
    }
    if args.video_kbps > 0 {
        let size = args.video_payload.max(payload::header_len(Kind::Video));
        if size > 1200 {
            return Err(format!(
                "--video-payload {size}: keep packets within a 1200-byte RTP payload"
            ));
        }
        let pps = f64::from(args.video_kbps) * 1000.0 / 8.0 / size as f64;
        if !(0.5..=5000.0).contains(&pps) {
            return Err(format!(
                "--video-kbps {} with {size}-byte packets is {pps:.1} packets/s; \
                 keep it between 0.5 and 5000",
                args.video_kbps
            ));
        }
        out.push(StreamSpec {
            kind: Kind::Video,
            period: Duration::from_secs_f64(1.0 / pps),
            payload: size,
        });
    }
    if out.is_empty() {
        return Err("nothing to publish: --audio-pps and --video-kbps are both 0".into());
    }
    Ok(out)
}

/// Checks the arguments; returns the host and port for `/metrics` and the
/// room names.
fn validate(args: &SfuArgs, run_id: &str) -> Result<(String, u16, Vec<String>), String> {
    if args.rooms == 0 || args.participants < 2 {
        return Err("--rooms must be at least 1 and --participants at least 2".into());
    }
    if args.participants > DEFAULT_ROOM_CAPACITY {
        eprintln!(
            "warning: {} participants per room; the server's default room capacity is \
             {DEFAULT_ROOM_CAPACITY}, expect `full`",
            args.participants
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
            let name = format!("sfu-{run_id}-{n}");
            RoomName::parse(&name).map(|_| name)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("--run-id {run_id:?}: {e}"))?;
    Ok((host, port, rooms))
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

/// When the media phase happens, on the generator's clock.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Publishing starts (each stream at a random phase within its period).
    pub warmup_start: Instant,
    /// The measurement window `[t0, t1)`; publishing stops at `t1`.
    pub t0: Instant,
    pub t1: Instant,
    /// Receivers stop reading and leave.
    pub end: Instant,
    t0_ns: u64,
    t1_ns: u64,
}

impl Schedule {
    fn new(base: Instant, warmup_start: Instant, args: &SfuArgs) -> Schedule {
        let t0 = warmup_start + args.warmup;
        let t1 = t0 + args.duration;
        Schedule {
            warmup_start,
            t0,
            t1,
            end: t1 + args.drain,
            t0_ns: ns_since(base, t0),
            t1_ns: ns_since(base, t1),
        }
    }

    /// Whether a packet sent at `sent_ns` belongs to the window.
    fn in_window(&self, sent_ns: u64) -> bool {
        (self.t0_ns..self.t1_ns).contains(&sent_ns)
    }
}

fn ns_since(base: Instant, t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX)
}

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
    total: usize,
    base: Instant,
    connect: Semaphore,
    join_timeout: Duration,
    streams: Vec<StreamSpec>,
}

/// The server and the generator at one instant.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    server_cpu: Option<Duration>,
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
            own_cpu,
            server_rss: server.and_then(|p| proc::rss_bytes(p).ok()),
            metrics,
            udp,
        }
    }
}

pub async fn run(args: &SfuArgs) -> Result<Report, String> {
    let run_id = args
        .run_id
        .clone()
        .unwrap_or_else(crate::signaling::default_run_id);
    let (host, port, rooms) = validate(args, &run_id)?;
    let streams = streams(args)?;
    let machine = Machine::probe();
    let server = args.server_pid.map(Pid::Other);
    let base = Instant::now();
    let hard = base + args.timeout;
    let say = |what: std::fmt::Arguments<'_>| {
        crate::signaling::progress(tokio::time::Instant::from_std(base), what)
    };

    let baseline = Sample::take(server, &host, port).await;
    if let Err(e) = &baseline.metrics {
        eprintln!(
            "warning: cannot read the server's /metrics ({e}); server counters will be missing"
        );
    }
    let total = args.rooms * args.participants;
    say(format_args!(
        "joining {total} participants ({} rooms x {}) to {}, {} at a time",
        args.rooms, args.participants, args.url, args.connect_concurrency
    ));
    let shared = Arc::new(Shared {
        url: args.url.clone(),
        rooms,
        per_room: args.participants,
        total,
        base,
        connect: Semaphore::new(args.connect_concurrency),
        join_timeout: args.join_timeout,
        streams: streams.clone(),
    });
    let (phase_tx, phase_rx) = watch::channel(Phase::Joining);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<bool>();
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
    while ready + failed < total {
        match timeout_at(join_deadline.into(), ready_rx.recv()).await {
            Ok(Some(true)) => ready += 1,
            Ok(Some(false)) => failed += 1,
            Ok(None) => break,
            Err(_) => {
                join_phase_complete = false;
                break;
            }
        }
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

    // Phase 2: warm-up, window, drain.
    let mut window = None;
    let mut schedule = None;
    if ready > 0 {
        let s = Schedule::new(base, Instant::now() + MEDIA_LEAD, args);
        schedule = Some(s);
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
    say(format_args!("all participants done"));
    let finished = Sample::take(server, &host, port).await;

    Ok(Report::assemble(report::Inputs {
        args,
        run_id: &run_id,
        machine,
        streams: &streams,
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
    }))
}

// ---------------------------------------------------------------------------
// One participant
// ---------------------------------------------------------------------------

/// Packets a participant sent on one stream.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sent {
    pub total: u64,
    /// Sent inside the measurement window.
    pub window: u64,
    /// `send_rtp` refused (the client task had stopped).
    pub errors: u64,
}

/// What one subscriber got from one (publisher, kind).
#[derive(Debug, Default)]
pub struct Flow {
    pub first_at: Option<Instant>,
    pub total: u64,
    /// Distinct packets sent inside the window.
    pub window: u64,
    pub duplicates: u64,
    /// Arrived after a higher sequence number.
    pub reordered: u64,
    max_seq: Option<u32>,
    seen: Vec<u64>,
    /// End-to-end latency of each distinct in-window packet.
    pub latencies: Vec<Duration>,
}

impl Flow {
    fn record(&mut self, seq: u32, at: Instant, in_window: bool, latency: Duration) {
        self.first_at.get_or_insert(at);
        self.total += 1;
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if self.seen.len() <= word {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return;
        }
        self.seen[word] |= 1 << bit;
        if self.max_seq.is_some_and(|m| seq < m) {
            self.reordered += 1;
        }
        self.max_seq = Some(self.max_seq.map_or(seq, |m| m.max(seq)));
        if in_window {
            self.window += 1;
            self.latencies.push(latency);
        }
    }
}

/// Everything one participant saw and did.
#[derive(Debug)]
pub struct Outcome {
    pub index: usize,
    pub room: usize,
    pub name: String,
    /// Participant id the server gave us.
    pub id: Option<String>,
    pub join_started: Option<Instant>,
    /// Connected and negotiated.
    pub ready_at: Option<Instant>,
    /// Published during the media phase (was ready before it began).
    pub published: bool,
    /// The first thing that went wrong.
    pub error: Option<String>,
    /// Per stream, indexed like [`kind_index`].
    pub sent: [Sent; 2],
    /// Keyed by (publisher index, kind index).
    pub flows: HashMap<(usize, usize), Flow>,
    /// `TrackAdded` by (stream id = publisher's participant id, kind index).
    pub tracks_added: HashMap<(String, usize), Instant>,
    pub tracks_removed: u64,
    /// Payloads that could not be counted, by reason.
    pub bad: BTreeMap<&'static str, u64>,
    /// Connection states reported after `connected` (e.g. `disconnected`).
    pub later_states: Vec<String>,
    /// Server `error` codes received.
    pub server_errors: BTreeMap<String, u64>,
    /// The client task ended before we left.
    pub closed_early: bool,
}

pub fn kind_index(kind: Kind) -> usize {
    match kind {
        Kind::Audio => 0,
        Kind::Video => 1,
    }
}

pub const KIND_NAMES: [&str; 2] = ["audio", "video"];

impl Outcome {
    fn new(index: usize, per_room: usize) -> Outcome {
        let room = index / per_room;
        Outcome {
            index,
            room,
            name: format!("r{room}-p{}", index % per_room),
            id: None,
            join_started: None,
            ready_at: None,
            published: false,
            error: None,
            sent: [Sent::default(); 2],
            flows: HashMap::new(),
            tracks_added: HashMap::new(),
            tracks_removed: 0,
            bad: BTreeMap::new(),
            later_states: Vec::new(),
            server_errors: BTreeMap::new(),
            closed_early: false,
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
                kind, packet, at, ..
            } => {
                let stamp = match payload::parse(kind, &packet.payload) {
                    Ok(s) => s,
                    Err(bad) => {
                        let reason = match bad {
                            payload::Bad::Short => "short",
                            payload::Bad::Kind => "wrong-kind",
                            payload::Bad::Filler => "damaged",
                        };
                        *self.bad.entry(reason).or_default() += 1;
                        return;
                    }
                };
                let sender = stamp.sender as usize;
                let reason = if sender >= shared.total || stamp.seq > MAX_SEQ {
                    Some("unknown-sender")
                } else if sender == self.index {
                    Some("own-packet")
                } else if sender / shared.per_room != self.room {
                    Some("other-room")
                } else {
                    None
                };
                if let Some(reason) = reason {
                    *self.bad.entry(reason).or_default() += 1;
                    return;
                }
                let sent_at = shared.base + Duration::from_nanos(stamp.sent_ns);
                let in_window = schedule.is_some_and(|s| s.in_window(stamp.sent_ns));
                self.flows
                    .entry((sender, kind_index(kind)))
                    .or_default()
                    .record(
                        stamp.seq,
                        at,
                        in_window,
                        at.saturating_duration_since(sent_at),
                    );
            }
            Event::TrackAdded {
                stream_id, kind, ..
            } => {
                self.tracks_added
                    .entry((stream_id, kind_index(kind)))
                    .or_insert_with(Instant::now);
            }
            Event::TrackRemoved { .. } => self.tracks_removed += 1,
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

/// One stream a participant publishes.
struct Publisher {
    spec: StreamSpec,
    seq: u32,
    interval: Option<tokio::time::Interval>,
}

impl Publisher {
    fn start(spec: StreamSpec, schedule: &Schedule) -> Publisher {
        let phase = spec.period.mul_f64(rand::rng().random::<f64>());
        let mut interval =
            tokio::time::interval_at((schedule.warmup_start + phase).into(), spec.period);
        // Late ticks are skipped, not sent in a burst: the rate may fall under
        // load (the report shows what was sent), the pacing stays.
        interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
        Publisher {
            spec,
            seq: 0,
            interval: Some(interval),
        }
    }

    /// Sends the next packet, or stops the stream at the end of the window.
    fn send(&mut self, client: &Client, out: &mut Outcome, schedule: &Schedule, base: Instant) {
        let now = Instant::now();
        if now >= schedule.t1 {
            self.interval = None;
            return;
        }
        let kind = self.spec.kind;
        let stamp = payload::Stamp {
            sender: out.index as u32,
            seq: self.seq,
            sent_ns: ns_since(base, now),
        };
        let data = payload::build(kind, stamp, self.spec.payload);
        let (marker, timestamp) = match kind {
            Kind::Audio => (false, self.seq.wrapping_mul(960)),
            Kind::Video => {
                let ticks = now
                    .saturating_duration_since(schedule.warmup_start)
                    .as_micros()
                    * 9
                    / 100;
                (true, ticks as u32)
            }
        };
        self.seq += 1;
        let sent = &mut out.sent[kind_index(kind)];
        match client.send_rtp(kind, data, marker, timestamp) {
            Ok(()) => {
                sent.total += 1;
                if schedule.in_window(stamp.sent_ns) {
                    sent.window += 1;
                }
            }
            Err(_) => sent.errors += 1,
        }
    }
}

/// Waits for the next tick of `p`; never resolves for a stopped stream.
async fn tick(p: &mut Option<Publisher>) {
    match p.as_mut().and_then(|p| p.interval.as_mut()) {
        Some(iv) => {
            iv.tick().await;
        }
        None => std::future::pending().await,
    }
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
    ready: mpsc::UnboundedSender<bool>,
) -> Outcome {
    let mut out = Outcome::new(index, shared.per_room);
    let client = tokio::select! {
        c = join(&shared, &mut out) => c,
        () = until_stop(&mut phase) => {
            out.fail("stopped while joining");
            None
        }
    };
    let _ = ready.send(client.is_some());
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
    let base = shared.base;
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
                        for spec in &shared.streams {
                            let slot = if spec.kind == Kind::Audio { &mut *audio } else { &mut *video };
                            *slot = Some(Publisher::start(*spec, &s));
                        }
                    }
                    Phase::Stop => break,
                    Phase::Joining => {}
                }
            }
            () = tick(audio) => {
                if let (Some(p), Some(s)) = (audio.as_mut(), schedule.as_ref()) {
                    p.send(&client, &mut out, s, base);
                }
            }
            () = tick(video) => {
                if let (Some(p), Some(s)) = (video.as_mut(), schedule.as_ref()) {
                    p.send(&client, &mut out, s, base);
                }
            }
            () = sleep_until_opt(end) => break,
        }
    }
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
/// `out.error` set) on failure.
async fn join(shared: &Shared, out: &mut Outcome) -> Option<Client> {
    let _permit = shared.connect.acquire().await.ok()?;
    let started = Instant::now();
    out.join_started = Some(started);
    let deadline: tokio::time::Instant = (started + shared.join_timeout).into();
    let mut opts = JoinOptions::sfu(&shared.url, &shared.rooms[out.room], &out.name);
    opts.publish_audio = shared.streams.iter().any(|s| s.kind == Kind::Audio);
    opts.publish_video = shared.streams.iter().any(|s| s.kind == Kind::Video);
    let mut client = match timeout_at(deadline, Client::join(opts)).await {
        Err(_) => {
            out.fail("join: timed out");
            return None;
        }
        Ok(Err(e)) => {
            out.fail(format!("join: {e}"));
            return None;
        }
        Ok(Ok(c)) => c,
    };
    out.id = Some(client.id.clone());
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: SfuArgs,
    }

    fn args(extra: &[&str]) -> SfuArgs {
        let mut v = vec!["x"];
        v.extend_from_slice(extra);
        Wrap::try_parse_from(v).expect("parses").args
    }

    #[test]
    fn stream_rates() {
        let s = streams(&args(&[])).expect("streams");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].kind, Kind::Audio);
        assert_eq!(s[0].period, Duration::from_millis(20));
        assert_eq!(s[0].payload, 100);
        assert_eq!(s[1].kind, Kind::Video);
        // 500 kbit/s of 1100-byte payloads: 56.8 packets/s.
        assert!((s[1].packets_per_second() - 500_000.0 / 8800.0).abs() < 0.01);
        let only_audio = streams(&args(&["--video-kbps", "0"])).expect("audio only");
        assert_eq!(only_audio.len(), 1);
        assert!(streams(&args(&["--video-kbps", "0", "--audio-pps", "0"])).is_err());
        assert!(streams(&args(&["--video-payload", "1500"])).is_err());
    }

    #[test]
    fn validation() {
        let ok = validate(&args(&["--run-id", "t"]), "t").expect("valid");
        assert_eq!((ok.0.as_str(), ok.1), ("127.0.0.1", 8080));
        assert_eq!(ok.2.len(), 5);
        assert_eq!(ok.2[4], "sfu-t-4");
        assert!(validate(&args(&["--url", "ws://10.1.2.3:8080/ws"]), "t").is_err());
        assert!(validate(&args(&["--participants", "1"]), "t").is_err());
        assert!(validate(&args(&["--timeout", "20s"]), "t").is_err());
        let remote = args(&["--url", "ws://10.1.2.3:9/ws", "--allow-remote"]);
        assert_eq!(validate(&remote, "t").expect("remote").1, 9);
    }

    #[test]
    fn flow_counts_duplicates_reorders_and_window() {
        let mut f = Flow::default();
        let t = Instant::now();
        let ms = Duration::from_millis;
        f.record(0, t, false, ms(1));
        f.record(2, t, true, ms(2));
        f.record(1, t, true, ms(3));
        f.record(2, t, true, ms(4));
        f.record(200, t, true, ms(5));
        assert_eq!(f.total, 5);
        assert_eq!(f.window, 3);
        assert_eq!(f.duplicates, 1);
        assert_eq!(f.reordered, 1);
        assert_eq!(f.latencies, vec![ms(2), ms(3), ms(5)]);
        assert_eq!(f.first_at, Some(t));
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
            // ~2 s at 50 (audio) or 56.8 (video) packets/s from 6 publishers.
            assert!(m.sent > 500, "{}: {} sent", m.kind, m.sent);
            assert_eq!(m.expected, m.sent * 2, "{}: two subscribers each", m.kind);
            assert_eq!(m.tracks_missing, 0);
            // Loopback within one process: allow a stray late packet, no more.
            assert!(m.loss_percent < 1.0, "{}", r.table());
            assert!(m.latency.count > 0 && m.latency.p50 < Duration::from_millis(200));
        }
        assert!(r.bad_payloads.is_empty(), "{:?}", r.bad_payloads);
        let sm = r.server_metrics.as_ref().expect("/metrics scraped");
        assert!(sm.forwarded > 0.0);
        let fwd = sm.expected_forwarded as f64;
        assert!(
            (sm.forwarded - fwd).abs() <= fwd * 0.05 + 20.0,
            "server forwarded {} vs {} expected",
            sm.forwarded,
            fwd
        );
        let h = sm.forward_latency.as_ref().expect("histogram");
        assert!(h.observations > 0.0);
        let s = r.server.as_ref().expect("server stats");
        assert!(s.cpu_window_s.is_some() && s.rss_steady_bytes.is_some());
        assert_eq!(r.first_packet_after_warmup.count, 24);
        let table = r.table();
        assert!(table.contains("CPU per packet"), "{table}");
        serde_json::to_string(&r).expect("serializes");
    }

    #[tokio::test]
    async fn nothing_listening_fails_fast_and_reports() {
        // A port with no listener: bind one, note it, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let url = format!("ws://127.0.0.1:{port}/ws");
        let a = args(&["--url", &url, "--rooms", "1", "--participants", "2"]);
        let started = Instant::now();
        let r = run(&a).await.expect("runs");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(!r.all_ok());
        assert_eq!(r.participants.failed, 2);
        assert!(r.server_metrics.is_none());
        assert!(
            r.errors.keys().all(|e| e.starts_with("join:")),
            "{:?}",
            r.errors
        );
        assert!(r.table().contains("participant errors"));
    }

    #[test]
    fn schedule_window() {
        let base = Instant::now();
        let a = args(&["--warmup", "1s", "--duration", "2s", "--drain", "500ms"]);
        let s = Schedule::new(base, base + Duration::from_secs(1), &a);
        assert!(!s.in_window(1_999_999_999));
        assert!(s.in_window(2_000_000_000));
        assert!(s.in_window(3_999_999_999));
        assert!(!s.in_window(4_000_000_000));
        assert_eq!(s.end - s.t1, Duration::from_millis(500));
    }
}
