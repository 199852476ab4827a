//! `loadtest compare`: Switchboard and Janus in turn, under the same fixed
//! load, in one invocation; prints the ratio table and, with `--write-doc`,
//! writes it (machine, versions, exact commands, results) into a section of
//! `docs/benchmarks.md` (one section per `--audio-mode`).
//!
//! - `--audio-mode forward` (default): Switchboard's SFU (`run --audio`)
//!   against Janus VideoRoom (`janus --audio`), Opus + VP8 per participant.
//! - `--audio-mode mix`: Switchboard's mixer (`run --audio-mode mix --audio
//!   --video-kbps 0`) against Janus AudioBridge (`janus --audio-mode mix
//!   --audio --video-kbps 0`): every participant sends Opus and gets one
//!   mixed stream back; compared per delivered mixed packet and per
//!   participant.
//!
//! Both generators send byte for byte the same media ([`crate::publish`]).
//!
//! Both servers run inside one network namespace this command creates (a
//! veth pair, both ends inside, `lt0` = 10.77.0.1/24, and `lo`): Janus offers
//! host candidates on interface addresses only, never loopback, and the same
//! place for both keeps the comparison fair. The load generators run there
//! too (`ip netns exec`, this same binary: `run` for Switchboard, `janus` for
//! Janus). Every process started is killed and the namespace deleted when the
//! command ends, also on error or panic ([`Sandbox`]'s `Drop`). Needs root.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::floor::{FloorArgs, FloorRun};

use serde_json::Value;

use crate::janus::AudioMode;

/// The namespace's address, on which both servers listen (also fixed in
/// `loadtest/janus/*.jcfg`).
pub const NS_ADDR: &str = "10.77.0.1";
/// The Switchboard load: `loadtest run` (its JSON is what [`Figures::read`]
/// reads).
const SWITCHBOARD_LOAD: &str = "run";
const SWITCHBOARD_PORT: u16 = 8080;
const JANUS_PORT: u16 = 8188;
/// Longest wait for a server to listen.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Markers around the section `--write-doc` replaces, per audio mode.
const DOC_BEGIN: &str = "<!-- loadtest compare: begin (generated; rerun to update) -->";
const DOC_END: &str = "<!-- loadtest compare: end -->";
const DOC_MIX_BEGIN: &str =
    "<!-- loadtest compare --audio-mode mix: begin (generated; rerun to update) -->";
const DOC_MIX_END: &str = "<!-- loadtest compare --audio-mode mix: end -->";

#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// Rooms.
    #[arg(long, default_value_t = 4)]
    pub rooms: usize,
    /// Participants per room; each publishes and subscribes to all others.
    #[arg(long, default_value_t = 4)]
    pub participants: usize,
    /// Measurement window per server.
    #[arg(long, default_value = "20s", value_parser = crate::parse_duration)]
    pub duration: Duration,
    /// Sending before the window.
    #[arg(long, default_value = "2s", value_parser = crate::parse_duration)]
    pub warmup: Duration,
    /// `forward`: Switchboard's SFU vs Janus VideoRoom; `mix`: Switchboard's
    /// mixer vs Janus AudioBridge (audio only).
    #[arg(long, value_enum, default_value_t = AudioMode::Forward)]
    pub audio_mode: AudioMode,
    /// VP8 bit rate per publisher, kbit/s (default 500 in forward mode; mix
    /// mode is audio only). Every publisher also sends the Opus tone.
    #[arg(long)]
    pub video_kbps: Option<u32>,
    /// The Switchboard binary (default: `switchboard` beside this one).
    #[arg(long)]
    pub switchboard: Option<PathBuf>,
    /// The Janus binary.
    #[arg(long, default_value = "/usr/bin/janus")]
    pub janus: PathBuf,
    /// Folder with `janus.jcfg` and the plugin configs.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/janus"))]
    pub janus_config: PathBuf,
    /// Where the two JSON reports and the server logs go.
    #[arg(long, default_value = "target/loadtest-compare")]
    pub out_dir: PathBuf,
    /// Replace (or append) the comparison section of this Markdown file.
    #[arg(long)]
    pub write_doc: Option<PathBuf>,
    /// Rounds; each runs the floor (forward mode), Switchboard and Janus in
    /// turn, so every server runs this many times, alternating.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
}

/// Owns the namespace and every process started in it. Dropping it (also on
/// panic) kills the processes and deletes the namespace.
struct Sandbox {
    netns: String,
    children: Vec<Child>,
}

impl Sandbox {
    fn new() -> Result<Sandbox, String> {
        let netns = format!("lt-cmp-{}", std::process::id());
        ip(&["netns", "add", &netns])?;
        let sandbox = Sandbox {
            netns,
            children: Vec::new(),
        };
        let ns = sandbox.netns.as_str();
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", ns, "link", "add", "lt0", "type", "veth", "peer", "name", "lt1",
        ])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{NS_ADDR}/24"),
            "dev",
            "lt0",
        ])?;
        ip(&["-n", ns, "link", "set", "lt1", "up"])?;
        ip(&["-n", ns, "link", "set", "lt0", "up"])?;
        watch_signals(sandbox.netns.clone());
        Ok(sandbox)
    }

    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).arg(program);
        c
    }

    /// Starts a server in the namespace, logging to `log`; `ip netns exec`
    /// execs the program, so the child's pid is the server's.
    fn spawn(&mut self, mut cmd: Command, log: &Path) -> Result<u32, String> {
        let file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = file.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// Waits until something listens on `NS_ADDR:port` inside the namespace.
    fn wait_listening(&mut self, port: u16, what: &str) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let probe = format!("exec 3<>/dev/tcp/{NS_ADDR}/{port}");
        loop {
            let ok = Command::new("ip")
                .args(["netns", "exec", &self.netns, "bash", "-c", &probe])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            if let Some(c) = self.children.last_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(format!("{what} exited at start-up ({status})"));
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{what} did not listen on port {port} within {START_TIMEOUT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops the last server: SIGTERM, then SIGKILL after 3 s.
    fn stop_last(&mut self) {
        if let Some(mut c) = self.children.pop() {
            stop(&mut c);
        }
    }
}

fn stop(c: &mut Child) {
    if matches!(c.try_wait(), Ok(None)) {
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until && matches!(c.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = c.kill();
    }
    let _ = c.wait();
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for c in &mut self.children {
            stop(c);
        }
        empty_and_delete(&self.netns);
    }
}

/// Kills whatever still runs in the namespace, then deletes it.
fn empty_and_delete(netns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", netns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "delete", netns])
        .stderr(Stdio::null())
        .status();
}

/// On SIGINT or SIGTERM (which would end this process without running
/// `Drop`), empties and deletes the namespace, then exits with 130. Every
/// process this command starts lives in the namespace, so none survives.
fn watch_signals(netns: String) {
    crate::proc::on_interrupt(move || {
        eprintln!("loadtest compare: interrupted; deleting namespace {netns}");
        empty_and_delete(&netns);
    });
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed (needs root): {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The figures compared, from one report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    pub cpu_per_forwarded_us: Option<f64>,
    pub cpu_percent_of_core: Option<f64>,
    pub forwarded: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub loss_percent: Option<f64>,
    pub rss_per_participant_kib: Option<f64>,
    pub connected: Option<u64>,
    pub version: Option<String>,
    pub generator_percent_of_core: Option<f64>,
    /// The 1-minute load average when the run started.
    pub loadavg: Option<f64>,
    /// Mix mode: mixed packets the subscribers received (window start to
    /// drain end), the server's CPU per such packet and per participant.
    pub mixed_received: Option<f64>,
    pub cpu_per_mixed_packet_us: Option<f64>,
    pub cpu_percent_per_participant: Option<f64>,
    pub jitter_ms_mean: Option<f64>,
}

impl Figures {
    /// Reads the JSON report of `loadtest run` or `loadtest janus`. In mix
    /// mode the media is the mixed stream: `mixed_audio` in `run`'s report,
    /// `media` (kind `audio-mixed`) in `janus`'s.
    pub fn read(v: &Value) -> Figures {
        let f = |p: &str| v.pointer(p).and_then(Value::as_f64);
        let sum = |field: &str| {
            v["media"].as_array().map_or(0.0, |m| {
                m.iter().map(|k| k[field].as_f64().unwrap_or(0.0)).sum()
            })
        };
        let run_mix = v.get("mixed_audio").filter(|m| m.is_object());
        let mix = run_mix.is_some() || v.pointer("/config/audio_mode") == Some(&"mix".into());
        let (expected, received) = match run_mix {
            Some(m) => (
                m["rtp_expected"].as_f64().unwrap_or(0.0),
                m["received"].as_f64().unwrap_or(0.0),
            ),
            None => (sum("expected"), sum("received")),
        };
        let jitters: Vec<f64> = match run_mix {
            Some(m) => m["jitter_ms_mean"].as_f64().into_iter().collect(),
            None => v["media"].as_array().map_or(Vec::new(), |m| {
                m.iter()
                    .filter_map(|k| k["jitter_ms_mean"].as_f64())
                    .collect()
            }),
        };
        let cpu_s = f("/server/cpu_window_s");
        let participants = v
            .pointer("/participants/connected")
            .and_then(Value::as_f64)
            .filter(|n| *n > 0.0);
        Figures {
            mixed_received: mix.then_some(received),
            cpu_per_mixed_packet_us: cpu_s
                .filter(|_| mix && received > 0.0)
                .map(|c| c * 1e6 / received),
            cpu_percent_per_participant: f("/server/cpu_percent_of_core")
                .filter(|_| mix)
                .zip(participants)
                .map(|(c, n)| c / n),
            jitter_ms_mean: (!jitters.is_empty())
                .then(|| jitters.iter().sum::<f64>() / jitters.len() as f64),
            // Forwarded packets are counted the same way for every server:
            // the distinct in-window packets its subscribers received.
            cpu_per_forwarded_us: cpu_s
                .filter(|_| !mix && received > 0.0)
                .map(|c| c * 1e6 / received),
            cpu_percent_of_core: f("/server/cpu_percent_of_core"),
            forwarded: (!mix && received > 0.0).then_some(received),
            p50_ms: f("/latency_all/p50_us").map(|u| u / 1e3),
            p99_ms: f("/latency_all/p99_us").map(|u| u / 1e3),
            loss_percent: (expected > 0.0)
                .then(|| 100.0 * (expected - received).max(0.0) / expected),
            rss_per_participant_kib: f("/server/rss_per_participant_bytes").map(|b| b / 1024.0),
            connected: v.pointer("/participants/connected").and_then(Value::as_u64),
            version: v["server_version"].as_str().map(str::to_owned),
            generator_percent_of_core: f("/generator/cpu_percent_of_core"),
            loadavg: f("/machine/loadavg/0"),
        }
    }
}

/// The ratio table (Markdown) of `mode`: one row per figure, Switchboard /
/// Janus.
pub fn ratio_table(
    mode: AudioMode,
    sb: &Figures,
    janus: &Figures,
    floor: Option<&[FloorRun]>,
) -> String {
    type Row<'a> = (&'a str, Option<f64>, Option<f64>, usize);
    let common: [Row<'_>; 4] = [
        (
            "server RSS per participant (KiB)",
            sb.rss_per_participant_kib,
            janus.rss_per_participant_kib,
            1,
        ),
        (
            "load generator CPU (% of one core)",
            sb.generator_percent_of_core,
            janus.generator_percent_of_core,
            1,
        ),
        (
            "machine load average at the run's start",
            sb.loadavg,
            janus.loadavg,
            2,
        ),
        (
            "participants connected",
            sb.connected.map(|n| n as f64),
            janus.connected.map(|n| n as f64),
            0,
        ),
    ];
    let (other, rows): (&str, Vec<Row<'_>>) = match mode {
        AudioMode::Forward => (
            "Janus VideoRoom",
            vec![
                (
                    "server CPU per forwarded packet (µs)",
                    sb.cpu_per_forwarded_us,
                    janus.cpu_per_forwarded_us,
                    2,
                ),
                (
                    "server CPU (% of one core)",
                    sb.cpu_percent_of_core,
                    janus.cpu_percent_of_core,
                    1,
                ),
                (
                    "packets forwarded in the window",
                    sb.forwarded,
                    janus.forwarded,
                    0,
                ),
                ("end-to-end latency p50 (ms)", sb.p50_ms, janus.p50_ms, 2),
                ("end-to-end latency p99 (ms)", sb.p99_ms, janus.p99_ms, 2),
                ("loss (%)", sb.loss_percent, janus.loss_percent, 3),
                (
                    "RTP jitter, mean (ms)",
                    sb.jitter_ms_mean,
                    janus.jitter_ms_mean,
                    3,
                ),
            ],
        ),
        AudioMode::Mix => (
            "Janus AudioBridge",
            vec![
                (
                    "server CPU per delivered mixed packet (µs)",
                    sb.cpu_per_mixed_packet_us,
                    janus.cpu_per_mixed_packet_us,
                    1,
                ),
                (
                    "server CPU (% of one core)",
                    sb.cpu_percent_of_core,
                    janus.cpu_percent_of_core,
                    1,
                ),
                (
                    "server CPU per participant (% of one core)",
                    sb.cpu_percent_per_participant,
                    janus.cpu_percent_per_participant,
                    3,
                ),
                (
                    "mixed packets delivered",
                    sb.mixed_received,
                    janus.mixed_received,
                    0,
                ),
                (
                    "loss of the mixed stream (%)",
                    sb.loss_percent,
                    janus.loss_percent,
                    3,
                ),
                (
                    "RTP jitter of the mixed stream, mean (ms)",
                    sb.jitter_ms_mean,
                    janus.jitter_ms_mean,
                    3,
                ),
            ],
        ),
    };
    // The floor of this round (sendmmsg: batched, the best a plain relay
    // does at this load), as a multiple.
    let floor_us = floor
        .and_then(|f| f.iter().find(|r| r.mode == "sendmmsg"))
        .map(|r| r.relay_us_per_packet);
    let over_floor = |v: Option<f64>| v.zip(floor_us).map(|(v, f)| v / f);
    let floor_rows: Vec<Row<'_>> = match mode {
        AudioMode::Forward if floor_us.is_some() => vec![(
            "CPU per forwarded packet ÷ the floor (sendmmsg, same load, same round)",
            over_floor(sb.cpu_per_forwarded_us),
            over_floor(janus.cpu_per_forwarded_us),
            2,
        )],
        _ => Vec::new(),
    };
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| figure | Switchboard | {other} | Switchboard / Janus |"
    );
    t.push_str("| --- | ---: | ---: | ---: |\n");
    let cell = |v: Option<f64>, d: usize| v.map_or("-".to_owned(), |v| format!("{v:.d$}"));
    for (name, a, b, d) in rows.into_iter().chain(floor_rows).chain(common) {
        let ratio = match (a, b) {
            (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
            _ => "-".to_owned(),
        };
        let _ = writeln!(t, "| {name} | {} | {} | {ratio} |", cell(a, d), cell(b, d));
    }
    if let Some(runs) = floor {
        let modes: Vec<String> = runs
            .iter()
            .map(|r| format!("{} {:.2} µs", r.mode, r.relay_us_per_packet))
            .collect();
        let _ = writeln!(
            t,
            "\nThe floor this round (`loadtest floor`: a bare relay, one AES-128-GCM seal per \
             output packet, CPU per output packet): {}.",
            modes.join(", ")
        );
    }
    t
}

/// The markers of `mode`'s section.
fn markers(mode: AudioMode) -> (&'static str, &'static str) {
    match mode {
        AudioMode::Forward => (DOC_BEGIN, DOC_END),
        AudioMode::Mix => (DOC_MIX_BEGIN, DOC_MIX_END),
    }
}

/// Replaces the section of `mode` between its markers in `doc`, or appends
/// it.
pub fn splice_section(doc: &str, mode: AudioMode, section: &str) -> String {
    let (begin, end_marker) = markers(mode);
    let block = format!("{begin}\n{section}{end_marker}\n");
    match (doc.find(begin), doc.find(end_marker)) {
        (Some(a), Some(b)) if b > a => {
            let end = b + end_marker.len();
            let rest = doc[end..].strip_prefix('\n').unwrap_or(&doc[end..]);
            format!("{}{block}{rest}", &doc[..a])
        }
        _ => {
            let sep = if doc.is_empty() || doc.ends_with("\n\n") {
                ""
            } else if doc.ends_with('\n') {
                "\n"
            } else {
                "\n\n"
            };
            format!("{doc}{sep}{block}")
        }
    }
}

fn version_of(program: &Path) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// `date -u` (no time crate here).
fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

fn shell_join(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./:=".contains(c))
            {
                a.clone()
            } else {
                format!("'{a}'")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs one load generator in the namespace; its report must appear.
fn run_load(sandbox: &Sandbox, me: &Path, args: &[String], json: &Path) -> Result<Value, String> {
    let _ = std::fs::remove_file(json);
    let status = sandbox
        .command(me)
        .args(args)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run the load generator: {e}"))?;
    let text = std::fs::read_to_string(json).map_err(|e| {
        format!(
            "the load generator ({status}) wrote no report {}: {e}",
            json.display()
        )
    })?;
    if !status.success() {
        eprintln!("warning: the load generator exited with {status}; its report is used as is");
    }
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", json.display()))
}

pub fn main(args: &CompareArgs) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadtest compare: {e}");
            ExitCode::from(2)
        }
    }
}

/// `--video-kbps`: 500 by default in forward mode; mix mode is audio only.
fn video_kbps(args: &CompareArgs) -> Result<u32, String> {
    match (args.audio_mode, args.video_kbps) {
        (AudioMode::Forward, v) => Ok(v.unwrap_or(500)),
        (AudioMode::Mix, None | Some(0)) => Ok(0),
        (AudioMode::Mix, Some(v)) => Err(format!(
            "--video-kbps {v}: --audio-mode mix compares audio mixing only"
        )),
    }
}

fn run(args: &CompareArgs) -> Result<(), String> {
    let me = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    let switchboard = args
        .switchboard
        .clone()
        .unwrap_or_else(|| me.with_file_name("switchboard"));
    for (what, p) in [("switchboard", &switchboard), ("janus", &args.janus)] {
        if !p.is_file() {
            return Err(format!(
                "{what} not found at {} (build it: cargo build --release -p switchboard; \
                 Janus: apt-get install -y janus)",
                p.display()
            ));
        }
    }
    let jcfg = args.janus_config.join("janus.jcfg");
    if !jcfg.is_file() {
        return Err(format!("no {}", jcfg.display()));
    }
    std::fs::create_dir_all(&args.out_dir)
        .map_err(|e| format!("{}: {e}", args.out_dir.display()))?;
    let out_dir = args
        .out_dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", args.out_dir.display()))?;
    let mode = args.audio_mode;
    let video_kbps = video_kbps(args)?;
    // The same load for both generators (the same flags, the same media).
    let load = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--rooms".into(),
            args.rooms.to_string(),
            "--participants".into(),
            args.participants.to_string(),
            "--duration".into(),
            format!("{}ms", args.duration.as_millis()),
            "--warmup".into(),
            format!("{}ms", args.warmup.as_millis()),
            "--video-kbps".into(),
            video_kbps.to_string(),
            "--audio".into(),
        ];
        if mode == AudioMode::Mix {
            v.extend(["--audio-mode".into(), "mix".into()]);
        }
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v
    };

    let mut sandbox = Sandbox::new()?;
    eprintln!("namespace {} with {NS_ADDR}", sandbox.netns);

    let sb_server_args = [
        "serve".to_owned(),
        "--listen".into(),
        format!("{NS_ADDR}:{SWITCHBOARD_PORT}"),
        // The benchmark's own namespace and its load clients: no key.
        "--no-auth".into(),
        "--rtc-ip".into(),
        NS_ADDR.into(),
    ];
    let mut rounds: Vec<(Figures, Figures, Option<Vec<FloorRun>>)> = Vec::new();
    let (mut sb_load, mut j_load) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds.max(1) {
        // 0. The floor, on the same load (forward mode: a relay of packets;
        // a mix has no bare-relay equivalent).
        let floor = match mode {
            AudioMode::Forward => {
                eprintln!("== round {round}: the floor (loadtest floor)");
                let floor_args = FloorArgs {
                    rooms: args.rooms,
                    participants: args.participants,
                    video_kbps,
                    audio: true,
                    duration: args.duration.min(Duration::from_secs(10)),
                    mode: None,
                    json: Some(out_dir.join(format!("floor-{round}.json"))),
                };
                Some(crate::floor::floor(&floor_args).map_err(|e| format!("floor: {e}"))?)
            }
            AudioMode::Mix => None,
        };

        // 1. Switchboard.
        let sb_json = out_dir.join(format!("switchboard-{round}.json"));
        let mut sb_cmd = sandbox.command(&switchboard);
        sb_cmd.args(&sb_server_args);
        let sb_pid = sandbox.spawn(sb_cmd, &out_dir.join(format!("switchboard-{round}.log")))?;
        sandbox.wait_listening(SWITCHBOARD_PORT, "switchboard")?;
        let sb_url = format!("ws://{NS_ADDR}:{SWITCHBOARD_PORT}/ws");
        let sb_pid_s = sb_pid.to_string();
        let sb_json_s = sb_json.display().to_string();
        sb_load = vec![SWITCHBOARD_LOAD.to_owned()];
        sb_load.extend(load(&[
            "--url",
            &sb_url,
            "--allow-remote",
            "--server-pid",
            &sb_pid_s,
            "--json",
            &sb_json_s,
        ]));
        eprintln!(
            "== round {round}: Switchboard: loadtest {}",
            shell_join(&sb_load)
        );
        let sb_report = run_load(&sandbox, &me, &sb_load, &sb_json);
        sandbox.stop_last();
        let sb_report = sb_report?;

        // 2. Janus.
        let j_json = out_dir.join(format!("janus-{round}.json"));
        let mut j_cmd = sandbox.command(&args.janus);
        let cfg = args.janus_config.display().to_string();
        j_cmd.args([
            "-C".to_owned(),
            jcfg.display().to_string(),
            "-F".into(),
            cfg,
            "-o".into(),
        ]);
        let j_pid = sandbox.spawn(j_cmd, &out_dir.join(format!("janus-{round}.log")))?;
        sandbox.wait_listening(JANUS_PORT, "janus")?;
        let j_url = format!("ws://{NS_ADDR}:{JANUS_PORT}");
        let j_pid_s = j_pid.to_string();
        let j_json_s = j_json.display().to_string();
        j_load = vec!["janus".to_owned()];
        j_load.extend(load(&[
            "--url",
            &j_url,
            "--server-pid",
            &j_pid_s,
            "--json",
            &j_json_s,
        ]));
        eprintln!("== round {round}: Janus: loadtest {}", shell_join(&j_load));
        let j_report = run_load(&sandbox, &me, &j_load, &j_json);
        sandbox.stop_last();
        let j_report = j_report?;
        rounds.push((Figures::read(&sb_report), Figures::read(&j_report), floor));
    }
    drop(sandbox);

    let tables: Vec<String> = rounds
        .iter()
        .map(|(sb, janus, floor)| ratio_table(mode, sb, janus, floor.as_deref()))
        .collect();
    let (sb, janus) = (&rounds[0].0, &rounds[0].1);
    let what = match mode {
        AudioMode::Forward => format!(
            "Switchboard vs Janus VideoRoom: {} rooms x {} participants, Opus + VP8 {video_kbps} kbit/s each, {:?} window",
            args.rooms, args.participants, args.duration
        ),
        AudioMode::Mix => format!(
            "Switchboard mixer vs Janus AudioBridge: {} rooms x {} participants, Opus each, one mix back each, {:?} window",
            args.rooms, args.participants, args.duration
        ),
    };
    println!();
    println!("{what}");
    for (i, table) in tables.iter().enumerate() {
        println!("\nRound {} of {}:\n", i + 1, tables.len());
        print!("{table}");
    }

    if let Some(doc) = &args.write_doc {
        let machine = crate::proc::Machine::probe();
        let mut s = String::new();
        let media = match mode {
            AudioMode::Forward => format!(
                "publishes real media, the same for both servers (`loadtest/src/publish.rs`): \
                 the committed VP8 clip (`loadtest/media/clip.ivf`, RFC 7741 packetized) at \
                 the frame rate that gives {video_kbps} kbit/s, and a 440 Hz Opus tone \
                 (20 ms frames, 32 kbit/s), every packet stamped with sender, sequence and \
                 send time; and subscribes to every other participant of its room"
            ),
            AudioMode::Mix => "sends the 440 Hz Opus tone (20 ms frames, 32 kbit/s, stamped \
                 in the Opus padding; the same packets for both servers) and receives one \
                 mixed stream: Switchboard `--audio-mode mix` rooms, Janus AudioBridge rooms"
                .to_owned(),
        };
        let _ = writeln!(
            s,
            "## {} (`loadtest compare{}`)\n",
            match mode {
                AudioMode::Forward => "Switchboard vs Janus VideoRoom",
                AudioMode::Mix => "Switchboard's mixer vs Janus AudioBridge",
            },
            if mode == AudioMode::Mix {
                " --audio-mode mix"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "Load: {} room(s) × {} participants; every participant {media}. Warm-up {:?}, \
             measurement window {:?}. Both servers and both load generators ran in turn \
             inside one network namespace (`lt0` = {NS_ADDR}), one generator process on a \
             single-threaded runtime.\n",
            args.rooms, args.participants, args.warmup, args.duration
        );
        let _ = writeln!(
            s,
            "- Machine: {} CPUs, {} (Debian 12); run finished {} UTC; the load average at each \
             run's start is in the table (this machine is shared, so other work may have run \
             at the same time)",
            machine.nproc,
            machine.cpu_model,
            utc_now()
        );
        let _ = writeln!(
            s,
            "- Switchboard: `{}` (release build)",
            version_of(&switchboard)
        );
        let _ = writeln!(
            s,
            "- Janus: {} (Debian package `janus`), configs in `loadtest/janus/`",
            janus.version.as_deref().unwrap_or("unknown")
        );
        let _ = writeln!(
            s,
            "- Participants connected: Switchboard {}, Janus {}\n",
            sb.connected.map_or("-".into(), |n| n.to_string()),
            janus.connected.map_or("-".into(), |n| n.to_string())
        );
        let _ = writeln!(
            s,
            "Every round ran the floor, Switchboard and Janus in turn (each server {} \
             times, alternating); every round is reported. Janus VideoRoom uses two \
             PeerConnections per participant (a publisher handle and a subscriber handle), \
             Switchboard one.\n",
            tables.len()
        );
        for (i, table) in tables.iter().enumerate() {
            let _ = writeln!(s, "Round {} of {}:\n\n{table}", i + 1, tables.len());
        }
        if mode == AudioMode::Mix {
            let _ = writeln!(
                s,
                "Mix mode: a mix carries no stamp, so there is no end-to-end latency; each \
                 subscriber counts its mixed stream by RTP sequence numbers and timestamps \
                 from the window start to the end of the drain (the same code for both, \
                 `loadtest/src/rxstats.rs`). CPU per delivered mixed packet is the window's \
                 server CPU over those packets; CPU per participant is the server's CPU \
                 (% of one core) over the participants connected.\n"
            );
        }
        let counted = match mode {
            AudioMode::Forward => {
                "Packets forwarded, for both servers alike: the distinct in-window packets \
                 the subscribers received (so CPU per forwarded packet is the window's server \
                 CPU over packets that arrived). Latency is end to end (send time stamped in \
                 the payload, same clock), generator included. "
            }
            AudioMode::Mix => {
                "Mixed packets are counted over the window and the drain after it, CPU over \
                 the window only: the same for both servers, so the ratio holds, the absolute \
                 µs per packet are a little low. "
            }
        };
        let _ = writeln!(
            s,
            "Server CPU is utime+stime from `/proc/<pid>/stat` over the window (10 ms ticks). \
             {counted}RSS per participant is (RSS at the window's end − RSS before anyone \
             joined) / participants. The Switchboard client binds its media sockets to \
             127.0.0.1 and the Janus generator to {NS_ADDR}: inside the namespace both paths \
             are the kernel's local delivery.\n"
        );
        let _ = writeln!(s, "Commands (as root, from the repository root):\n");
        let _ = writeln!(s, "```");
        let _ = writeln!(s, "cargo build --release -p switchboard -p loadtest");
        let mut cmd = vec![
            "target/release/loadtest".to_owned(),
            "compare".into(),
            "--rooms".into(),
            args.rooms.to_string(),
            "--participants".into(),
            args.participants.to_string(),
            "--duration".into(),
            format!("{}s", args.duration.as_secs_f64()),
            "--warmup".into(),
            format!("{}s", args.warmup.as_secs_f64()),
        ];
        match mode {
            AudioMode::Forward => {
                cmd.extend(["--video-kbps".into(), video_kbps.to_string()]);
            }
            AudioMode::Mix => cmd.extend(["--audio-mode".into(), "mix".into()]),
        }
        cmd.extend(["--write-doc".into(), doc.display().to_string()]);
        let _ = writeln!(s, "{}", shell_join(&cmd));
        let _ = writeln!(s, "```\n");
        let _ = writeln!(s, "which ran, inside the namespace:\n");
        let _ = writeln!(s, "```");
        let _ = writeln!(s, "switchboard {}", shell_join(&sb_server_args));
        let _ = writeln!(
            s,
            "loadtest {}",
            shell_join(&sb_load).replace(&out_dir.display().to_string(), "OUT")
        );
        let _ = writeln!(s, "janus -C loadtest/janus/janus.jcfg -F loadtest/janus -o");
        let _ = writeln!(
            s,
            "loadtest {}",
            shell_join(&j_load).replace(&out_dir.display().to_string(), "OUT")
        );
        let _ = writeln!(s, "```");
        let old = std::fs::read_to_string(doc).unwrap_or_default();
        std::fs::write(doc, splice_section(&old, mode, &s))
            .map_err(|e| format!("{}: {e}", doc.display()))?;
        eprintln!("wrote the comparison into {}", doc.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn figures_from_either_report_count_forwarded_packets_alike() {
        // Switchboard's own counter says 1000; what counts, for both
        // servers, is what the subscribers received in the window (997).
        let sb = json!({
            "server": {"cpu_window_s": 0.00997, "cpu_percent_of_core": 20.0,
                       "rss_per_participant_bytes": 2048},
            "server_metrics": {"forwarded": 1000.0},
            "latency_all": {"p50_us": 500, "p99_us": 2000},
            "media": [{"expected": 600, "received": 597, "jitter_ms_mean": 1.0},
                      {"expected": 400, "received": 400, "jitter_ms_mean": 3.0}],
            "mixed_audio": null,
            "participants": {"connected": 16}
        });
        let f = Figures::read(&sb);
        assert_eq!(f.forwarded, Some(997.0));
        assert!((f.cpu_per_forwarded_us.expect("cpu") - 10.0).abs() < 1e-9);
        assert_eq!(f.p50_ms, Some(0.5));
        assert_eq!(f.rss_per_participant_kib, Some(2.0));
        assert_eq!(f.jitter_ms_mean, Some(2.0));
        assert_eq!(f.mixed_received, None);
        assert!((f.loss_percent.expect("loss") - 0.3).abs() < 1e-9);
        let janus = json!({"server": {"forwarded": 990, "cpu_window_s": 0.04},
                           "server_version": "1.1.2",
                           "media": [{"expected": 1000, "received": 1000}]});
        let j = Figures::read(&janus);
        assert_eq!(j.forwarded, Some(1000.0));
        assert_eq!(j.loss_percent, Some(0.0));
        let floor = [FloorRun {
            mode: "sendmmsg",
            seconds: 10.0,
            inputs: 100,
            outputs: 300,
            received: 300,
            relay_us_per_packet: 4.0,
            relay_cores: 0.1,
            inputs_per_wakeup: 1.2,
            generator_cores: 0.1,
        }];
        let t = ratio_table(AudioMode::Forward, &f, &j, Some(&floor));
        assert!(t.contains("| Switchboard | Janus VideoRoom |"), "{t}");
        assert!(
            t.contains("| server CPU per forwarded packet (µs) | 10.00 | 40.00 | 0.25 |"),
            "{t}"
        );
        assert!(
            t.contains("÷ the floor (sendmmsg, same load, same round) | 2.50 | 10.00 | 0.25 |"),
            "{t}"
        );
        assert!(t.contains("sendmmsg 4.00 µs"), "{t}");
        assert!(t.contains("| loss (%) | 0.300 | 0.000 | - |"), "{t}");
    }

    #[test]
    fn mix_figures_from_either_report() {
        // `run --audio-mode mix`: the mix is in `mixed_audio`; `media` holds
        // the stamped audio that no one receives in a mix room.
        let sb = json!({
            "server": {"cpu_window_s": 0.5, "cpu_percent_of_core": 10.0},
            "media": [{"expected": 1000, "received": 0}],
            "mixed_audio": {"received": 5000, "rtp_expected": 5010, "jitter_ms_mean": 0.5},
            "participants": {"connected": 10}
        });
        let f = Figures::read(&sb);
        assert_eq!(f.mixed_received, Some(5000.0));
        assert_eq!(f.cpu_per_mixed_packet_us, Some(100.0));
        assert_eq!(f.cpu_percent_per_participant, Some(1.0));
        assert!((f.loss_percent.expect("loss") - 10.0 / 50.1).abs() < 1e-9);
        // `janus --audio-mode mix`: the mix is `media` (kind audio-mixed).
        let janus = json!({
            "config": {"audio_mode": "mix"},
            "server": {"cpu_window_s": 2.0, "cpu_percent_of_core": 40.0},
            "media": [{"kind": "audio-mixed", "expected": 4000, "received": 4000}],
            "participants": {"connected": 10}
        });
        let j = Figures::read(&janus);
        assert_eq!(j.mixed_received, Some(4000.0));
        assert_eq!(j.cpu_per_mixed_packet_us, Some(500.0));
        assert_eq!(j.cpu_percent_per_participant, Some(4.0));
        assert_eq!(j.loss_percent, Some(0.0));
        let t = ratio_table(AudioMode::Mix, &f, &j, None);
        assert!(t.contains("| Switchboard | Janus AudioBridge |"), "{t}");
        assert!(
            t.contains("| server CPU per delivered mixed packet (µs) | 100.0 | 500.0 | 0.20 |"),
            "{t}"
        );
        assert!(!t.contains("forwarded"), "{t}");
    }

    #[test]
    fn video_kbps_by_mode() {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            args: CompareArgs,
        }
        let parse = |a: &[&str]| {
            let mut v = vec!["x"];
            v.extend_from_slice(a);
            Wrap::try_parse_from(v).expect("parses").args
        };
        assert_eq!(video_kbps(&parse(&[])), Ok(500));
        assert_eq!(video_kbps(&parse(&["--audio-mode", "mix"])), Ok(0));
        assert!(video_kbps(&parse(&["--audio-mode", "mix", "--video-kbps", "300"])).is_err());
    }

    #[test]
    fn the_section_is_replaced_not_duplicated() {
        let doc = "# Benchmarks\n\nintro\n";
        let once = splice_section(doc, AudioMode::Forward, "A\n");
        assert!(once.starts_with("# Benchmarks\n\nintro\n\n<!--"));
        assert!(once.contains("\nA\n"));
        let twice = splice_section(&format!("{once}\n## later\n"), AudioMode::Forward, "B\n");
        assert!(!twice.contains("\nA\n") && twice.contains("\nB\n"));
        assert_eq!(twice.matches(DOC_BEGIN).count(), 1);
        assert!(twice.ends_with("## later\n"));
        assert_eq!(
            splice_section("", AudioMode::Forward, "C\n"),
            format!("{DOC_BEGIN}\nC\n{DOC_END}\n")
        );
        // The mix section is its own: both stay.
        let both = splice_section(&twice, AudioMode::Mix, "M\n");
        assert!(both.contains("\nB\n") && both.contains("\nM\n"));
        let again = splice_section(&both, AudioMode::Mix, "N\n");
        assert!(again.contains("\nB\n") && again.contains("\nN\n") && !again.contains("\nM\n"));
        assert_eq!(again.matches(DOC_MIX_BEGIN).count(), 1);
    }
}
