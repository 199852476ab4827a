//! `loadtest soak`: participants come and go for a long time, with media,
//! and the server must give back what they took.
//!
//! A new participant joins every `1 / --churn` seconds into the room with
//! the fewest members (at most `--max-per-room`), publishes the clip's VP8
//! (and the Opus tone) and receives the others' media for `--stay` (± 50 %,
//! at random), then leaves. Joins stop at `--duration`; once the last one
//! has left and `--settle` has passed, the server is sampled again. Every
//! `--sample-every` the server's RSS, open file descriptors, threads and its
//! gauges (runtime tasks, participants, rooms, media connections, signaling
//! connections, parked participants) and the number of series in `/metrics` are
//! recorded: the report shows the baseline (before anyone joined), the peak,
//! the end (after everyone left) and the growth, also per hour of churn.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use rand::Rng;
use serde::Serialize;
use switchboard_client::{Client, Event, JoinOptions, Kind};
use tokio::time::{sleep_until, timeout_at};

use crate::proc::{self, Pid};
use crate::publish::{media_plan, tick, MediaPlan, Publisher};
use crate::scrape;

/// Waiting for the server's goodbye after `leave`.
const LEAVE_WAIT: Duration = Duration::from_secs(2);
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// The server gauges a soak follows (their sums over label sets).
const GAUGES: [&str; 6] = [
    "switchboard_runtime_alive_tasks",
    "switchboard_participants",
    "switchboard_rooms",
    "switchboard_media_connections",
    "switchboard_signaling_connections",
    "switchboard_parked_participants",
];

#[derive(Debug, Args)]
pub struct SoakArgs {
    /// Signaling URL of the server.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    pub url: String,
    /// Allow a server that is not on this machine.
    #[arg(long)]
    pub allow_remote: bool,
    /// Pid of the server (RSS, open files and threads are read from /proc).
    #[arg(long)]
    pub server_pid: u32,
    /// Rooms the participants are spread over.
    #[arg(long, default_value_t = 4)]
    pub rooms: usize,
    /// Members per room at most (a join waits for a free place).
    #[arg(long, default_value_t = 4)]
    pub max_per_room: usize,
    /// Joins per second.
    #[arg(long, default_value_t = 1.0)]
    pub churn: f64,
    /// How long a participant stays (each one ± 50 % at random).
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    pub stay: Duration,
    /// How long participants keep joining.
    #[arg(long, default_value = "60s", value_parser = crate::parse_duration)]
    pub duration: Duration,
    /// After the last one left: wait this long, then take the end sample.
    #[arg(long, default_value = "3s", value_parser = crate::parse_duration)]
    pub settle: Duration,
    /// VP8 bit rate per participant, kbit/s (0 = no video).
    #[arg(long, default_value_t = 300)]
    pub video_kbps: u32,
    /// Publish no Opus audio.
    #[arg(long)]
    pub no_audio: bool,
    /// Per participant: WebSocket + join + ICE/DTLS connected.
    #[arg(long, default_value = "20s", value_parser = crate::parse_duration)]
    pub join_timeout: Duration,
    /// Server sampling period.
    #[arg(long, default_value = "5s", value_parser = crate::parse_duration)]
    pub sample_every: Duration,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run id used in room names (`soak-<run>-<n>`); random by default.
    #[arg(long)]
    pub run_id: Option<String>,
}

/// The server at one instant.
#[derive(Debug, Clone, Serialize)]
pub struct ServerSample {
    pub at_s: f64,
    pub rss_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub threads: Option<u64>,
    /// Gauge name → value (absent when the scrape failed).
    pub gauges: BTreeMap<String, f64>,
    /// Number of series in `/metrics`.
    pub series: Option<usize>,
    pub scrape_error: Option<String>,
}

/// What the participants did, all together.
#[derive(Debug, Default, Serialize)]
pub struct Visits {
    pub joined: u64,
    pub join_failures: u64,
    /// Joins that went in and left without receiving a single media packet.
    pub without_media: u64,
    pub closed_early: u64,
    pub packets_sent: u64,
    pub packets_received: u64,
    /// Failure reasons, counted.
    pub errors: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
pub struct Growth {
    /// End minus baseline (includes the allocator's first growth).
    pub rss_bytes: Option<i64>,
    /// Least-squares slope of RSS over the samples of the last three
    /// quarters of the joining phase (steady churn), per hour.
    pub rss_bytes_per_hour: Option<f64>,
    pub open_fds: Option<i64>,
    pub threads: Option<i64>,
    pub series: Option<i64>,
    /// Each gauge at the end (all should be back at their baseline: 0).
    pub gauges_at_end: BTreeMap<String, f64>,
}

#[derive(Debug, Serialize)]
pub struct SoakReport {
    pub tool: &'static str,
    pub url: String,
    pub machine: proc::Machine,
    pub churn_per_s: f64,
    pub stay_s: f64,
    pub duration_s: f64,
    pub rooms: usize,
    pub max_per_room: usize,
    pub video_kbps: u32,
    pub audio: bool,
    pub visits: Visits,
    pub baseline: ServerSample,
    pub peak_rss_bytes: Option<u64>,
    pub peak_participants: f64,
    pub end: ServerSample,
    pub growth: Growth,
    pub samples: Vec<ServerSample>,
    pub server_alive: bool,
}

pub fn main(args: &SoakArgs) -> ExitCode {
    let rt = match crate::runtime(1) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest soak: cannot start the tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(soak(args));
    rt.shutdown_timeout(Duration::from_secs(1));
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadtest soak: error: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", table(&report));
    if let Some(path) = &args.json {
        if let Err(e) = crate::write_json(path, &report) {
            eprintln!("loadtest soak: {e}");
            return ExitCode::from(2);
        }
    }
    if report.server_alive {
        ExitCode::SUCCESS
    } else {
        eprintln!("loadtest soak: the server died during the run");
        ExitCode::from(1)
    }
}

fn check(args: &SoakArgs) -> Result<(String, u16), String> {
    if !(args.churn > 0.0 && args.churn <= 100.0) {
        return Err(format!("--churn {}: between 0 and 100 joins/s", args.churn));
    }
    if args.rooms == 0 || args.max_per_room < 2 {
        return Err("--rooms at least 1, --max-per-room at least 2".into());
    }
    if args.stay.is_zero() || args.duration.is_zero() || args.sample_every.is_zero() {
        return Err("--stay, --duration and --sample-every must be above 0".into());
    }
    let uri = crate::signaling::check_url(&args.url, args.allow_remote)?;
    let host = uri
        .host()
        .unwrap_or("127.0.0.1")
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if !Pid::Other(args.server_pid).exists() {
        return Err(format!("--server-pid {}: no such process", args.server_pid));
    }
    Ok((host, uri.port_u16().unwrap_or(80)))
}

async fn sample(pid: Pid, host: &str, port: u16, origin: Instant) -> ServerSample {
    let at_s = origin.elapsed().as_secs_f64();
    // /proc first: the scrape's own connection is not yet closed right after it.
    let (rss_bytes, open_fds, threads) = (
        proc::rss_bytes(pid).ok(),
        proc::open_fds(pid).ok(),
        proc::threads(pid).ok(),
    );
    let scraped = scrape::get(host, port, "/metrics", SCRAPE_TIMEOUT)
        .await
        .map(|t| scrape::parse_text(&t));
    let (gauges, series, scrape_error) = match scraped {
        Ok(s) => (
            GAUGES
                .iter()
                .filter_map(|g| scrape::sum(&s, g).map(|v| ((*g).to_owned(), v)))
                .collect(),
            Some(s.len()),
            None,
        ),
        Err(e) => (BTreeMap::new(), None, Some(e)),
    };
    ServerSample {
        at_s,
        rss_bytes,
        open_fds,
        threads,
        gauges,
        series,
        scrape_error,
    }
}

/// Shared by the participant tasks.
struct Shared {
    url: String,
    plan: MediaPlan,
    join_timeout: Duration,
    members: Mutex<Vec<usize>>,
    visits: Mutex<Visits>,
    sent: AtomicU64,
    received: AtomicU64,
}

impl Shared {
    fn fail(&self, why: &str) {
        let mut v = self.visits.lock().unwrap_or_else(|e| e.into_inner());
        *v.errors.entry(why.to_owned()).or_default() += 1;
    }
}

async fn soak(args: &SoakArgs) -> Result<SoakReport, String> {
    let (host, port) = check(args)?;
    let pid = Pid::Other(args.server_pid);
    let plan = media_plan(args.video_kbps, !args.no_audio)?;
    let run_id = args
        .run_id
        .clone()
        .unwrap_or_else(|| format!("{:06x}", rand::rng().random::<u32>() & 0xff_ffff));
    let rooms: Vec<String> = (0..args.rooms)
        .map(|n| format!("soak-{run_id}-{n}"))
        .collect();
    let shared = Arc::new(Shared {
        url: args.url.clone(),
        plan,
        join_timeout: args.join_timeout,
        members: Mutex::new(vec![0; args.rooms]),
        visits: Mutex::new(Visits::default()),
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
    });
    let origin = Instant::now();
    let baseline = sample(pid, &host, port, origin).await;
    if let Some(e) = &baseline.scrape_error {
        return Err(format!("cannot read the server's /metrics: {e}"));
    }
    eprintln!(
        "soak: {} joins/s, stay {:?} ± 50 %, {} rooms of at most {}, for {:?}",
        args.churn, args.stay, args.rooms, args.max_per_room, args.duration
    );
    let mut samples = vec![baseline.clone()];
    let mut tasks = tokio::task::JoinSet::new();
    let period = Duration::from_secs_f64(1.0 / args.churn);
    let stop_joining = Instant::now() + args.duration;
    let mut next_join = Instant::now();
    let mut next_sample = Instant::now() + args.sample_every;
    let mut index = 0usize;
    let mut rng = rand::rng();
    loop {
        let now = Instant::now();
        if now >= stop_joining && tasks.is_empty() {
            break;
        }
        if now >= next_sample {
            let s = sample(pid, &host, port, origin).await;
            eprintln!(
                "soak: {:>6.1} s  rss {:>6.1} MiB  fds {:>4}  participants {:>3}",
                s.at_s,
                s.rss_bytes.unwrap_or(0) as f64 / 1048576.0,
                s.open_fds.unwrap_or(0),
                s.gauges.get(GAUGES[1]).copied().unwrap_or(0.0)
            );
            samples.push(s);
            next_sample += args.sample_every;
        }
        if now >= next_join && now < stop_joining {
            next_join += period;
            let room = {
                let mut m = shared.members.lock().unwrap_or_else(|e| e.into_inner());
                let (r, n) = m
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, n)| **n)
                    .map(|(r, n)| (r, *n))
                    .unwrap_or((0, 0));
                if n >= args.max_per_room {
                    None
                } else {
                    m[r] += 1;
                    Some(r)
                }
            };
            if let Some(room) = room {
                let stay = args.stay.mul_f64(rng.random_range(0.5..1.5));
                let name = format!("soak-{index}");
                index += 1;
                tasks.spawn(participant(
                    shared.clone(),
                    rooms[room].clone(),
                    room,
                    name,
                    stay,
                ));
            }
        }
        let wake = next_sample.min(if now < stop_joining {
            next_join
        } else {
            next_sample
        });
        tokio::select! {
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if done.is_err() {
                    shared.fail("participant task panicked");
                }
            }
            () = sleep_until(wake.into()) => {}
        }
        if !pid.exists() {
            break;
        }
    }
    tokio::time::sleep(args.settle).await;
    let end = sample(pid, &host, port, origin).await;
    samples.push(end.clone());
    let server_alive = pid.exists();
    let diff = |a: Option<u64>, b: Option<u64>| Some(b? as i64 - a? as i64);
    let growth = Growth {
        rss_bytes: diff(baseline.rss_bytes, end.rss_bytes),
        rss_bytes_per_hour: steady_slope(&samples, args.duration.as_secs_f64())
            .map(|per_s| per_s * 3600.0),
        open_fds: diff(baseline.open_fds, end.open_fds),
        threads: diff(baseline.threads, end.threads),
        series: diff(
            baseline.series.map(|s| s as u64),
            end.series.map(|s| s as u64),
        ),
        gauges_at_end: end.gauges.clone(),
    };
    let mut visits = std::mem::take(&mut *shared.visits.lock().unwrap_or_else(|e| e.into_inner()));
    visits.packets_sent = shared.sent.load(Ordering::Relaxed);
    visits.packets_received = shared.received.load(Ordering::Relaxed);
    Ok(SoakReport {
        tool: "loadtest soak",
        url: args.url.clone(),
        machine: proc::Machine::probe(),
        churn_per_s: args.churn,
        stay_s: args.stay.as_secs_f64(),
        duration_s: args.duration.as_secs_f64(),
        rooms: args.rooms,
        max_per_room: args.max_per_room,
        video_kbps: args.video_kbps,
        audio: !args.no_audio,
        visits,
        peak_rss_bytes: samples.iter().filter_map(|s| s.rss_bytes).max(),
        peak_participants: samples
            .iter()
            .filter_map(|s| s.gauges.get(GAUGES[1]).copied())
            .fold(0.0, f64::max),
        baseline,
        end,
        growth,
        samples,
        server_alive,
    })
}

/// RSS slope (bytes/s) over the samples taken between a quarter of the
/// joining phase and its end; `None` with fewer than three.
fn steady_slope(samples: &[ServerSample], joining_s: f64) -> Option<f64> {
    let points: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.at_s >= joining_s / 4.0 && s.at_s <= joining_s)
        .filter_map(|s| Some((s.at_s, s.rss_bytes? as f64)))
        .collect();
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// One participant's visit: join, publish and receive for `stay`, leave.
async fn participant(shared: Arc<Shared>, room: String, slot: usize, name: String, stay: Duration) {
    visit(&shared, &room, &name, stay).await;
    let mut m = shared.members.lock().unwrap_or_else(|e| e.into_inner());
    m[slot] = m[slot].saturating_sub(1);
}

async fn visit(shared: &Shared, room: &str, name: &str, stay: Duration) {
    let deadline = Instant::now() + shared.join_timeout;
    let mut opts = JoinOptions::sfu(&shared.url, room, name);
    opts.publish_audio = shared.plan.audio.is_some();
    opts.publish_video = shared.plan.video.is_some();
    let joined = match timeout_at(deadline.into(), Client::join(opts)).await {
        Ok(r) => r.map_err(|e| format!("join: {e}")),
        Err(_) => Err("join: timed out".to_owned()),
    };
    let mut client = match joined {
        Ok(c) => c,
        Err(why) => {
            shared.fail(&why);
            shared
                .visits
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .join_failures += 1;
            return;
        }
    };
    shared
        .visits
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .joined += 1;
    let start = Instant::now();
    let end = start + stay;
    let [mut audio, mut video] = Publisher::all(&shared.plan, start);
    let (mut sent, mut received) = (0u64, 0u64);
    let mut closed = false;
    loop {
        tokio::select! {
            ev = client.next_event() => match ev {
                Some(Event::Rtp { .. }) => received += 1,
                Some(Event::KeyframeRequested { kind: Kind::Video, .. }) => {
                    if let Some(v) = video.as_mut() {
                        v.keyframe_requested(&shared.plan);
                    }
                }
                Some(Event::Closed) | None => {
                    closed = true;
                    break;
                }
                Some(_) => {}
            },
            () = tick(&mut audio) => sent += send(&mut audio, &client, &shared.plan, start, end),
            () = tick(&mut video) => sent += send(&mut video, &client, &shared.plan, start, end),
            () = sleep_until(end.into()) => break,
        }
    }
    shared.sent.fetch_add(sent, Ordering::Relaxed);
    shared.received.fetch_add(received, Ordering::Relaxed);
    {
        let mut v = shared.visits.lock().unwrap_or_else(|e| e.into_inner());
        v.without_media += u64::from(received == 0);
        v.closed_early += u64::from(closed);
    }
    if closed {
        shared.fail("closed by the server during the stay");
        return;
    }
    client.leave();
    let until = Instant::now() + LEAVE_WAIT;
    while let Ok(Some(ev)) = timeout_at(until.into(), client.next_event()).await {
        if matches!(ev, Event::Closed) {
            break;
        }
    }
}

/// Sends `p`'s next frame; the packets handed over.
fn send(
    p: &mut Option<Publisher>,
    client: &Client,
    plan: &MediaPlan,
    base: Instant,
    end: Instant,
) -> u64 {
    let Some(publisher) = p.as_mut() else {
        return 0;
    };
    let Some(frame) = publisher.next_frame(plan, 0, base, end) else {
        return 0;
    };
    let mut n = 0;
    for (payload, marker) in frame.packets {
        n += u64::from(
            client
                .send_rtp(publisher.kind, payload, marker, frame.timestamp)
                .is_ok(),
        );
    }
    n
}

fn mib(b: Option<u64>) -> String {
    b.map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

/// The human summary.
pub fn table(r: &SoakReport) -> String {
    let v = &r.visits;
    let g = &r.growth;
    let mut out = format!(
        "soak: {:.0} s of {} joins/s, stay {:.0} s ± 50 %, {} rooms of at most {}\n\
         visits: {} joined, {} failed to join, {} without media, {} closed early; \
         packets sent {}, received {}\n",
        r.duration_s,
        r.churn_per_s,
        r.stay_s,
        r.rooms,
        r.max_per_room,
        v.joined,
        v.join_failures,
        v.without_media,
        v.closed_early,
        v.packets_sent,
        v.packets_received
    );
    out += "(\"without media\": alone in the room for the whole stay, or left before the first packet)\n";
    for (why, n) in &v.errors {
        out += &format!("  error ×{n}: {why}\n");
    }
    out += &format!(
        "server       baseline      peak          end           growth\n\
         RSS          {:<13} {:<13} {:<13} {} (steady churn: {}/h)\n\
         open fds     {:<13} {:<13} {:<13} {}\n\
         threads      {:<13} {:<13} {:<13} {}\n\
         series       {:<13} {:<13} {:<13} {}\n",
        mib(r.baseline.rss_bytes),
        mib(r.peak_rss_bytes),
        mib(r.end.rss_bytes),
        g.rss_bytes
            .map_or("-".into(), |b| format!("{:+.1} MiB", b as f64 / 1048576.0)),
        g.rss_bytes_per_hour
            .map_or("-".into(), |b| format!("{:+.1} MiB", b / 1048576.0)),
        opt(r.baseline.open_fds),
        opt(r.samples.iter().filter_map(|s| s.open_fds).max()),
        opt(r.end.open_fds),
        opt(g.open_fds),
        opt(r.baseline.threads),
        opt(r.samples.iter().filter_map(|s| s.threads).max()),
        opt(r.end.threads),
        opt(g.threads),
        opt(r.baseline.series),
        opt(r.samples.iter().filter_map(|s| s.series).max()),
        opt(r.end.series),
        opt(g.series),
    );
    for name in GAUGES {
        out += &format!(
            "{name}: baseline {} peak {} end {}\n",
            opt(r.baseline.gauges.get(name)),
            r.samples
                .iter()
                .filter_map(|s| s.gauges.get(name).copied())
                .fold(0.0, f64::max),
            opt(r.end.gauges.get(name)),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(at_s: f64, rss: u64) -> ServerSample {
        ServerSample {
            at_s,
            rss_bytes: Some(rss),
            open_fds: None,
            threads: None,
            gauges: BTreeMap::new(),
            series: None,
            scrape_error: None,
        }
    }

    #[test]
    fn the_steady_slope_skips_the_first_quarter_and_what_follows_the_joins() {
        // Warm-up jump in the first quarter, then +10 bytes/s, then a drop
        // after the joining phase (everyone left): only the middle counts.
        let mut s = vec![at(0.0, 0), at(10.0, 5_000)];
        s.extend((3..=10).map(|i| at(f64::from(i) * 10.0, 10_000 + i as u64 * 100)));
        s.push(at(110.0, 1_000));
        let slope = steady_slope(&s, 100.0).expect("enough samples");
        assert!((slope - 10.0).abs() < 1e-9, "{slope}");
        assert_eq!(steady_slope(&s[..3], 100.0), None);
    }
}
