//! `loadtest shaped`: what a viewer whose downlink is capped sees of
//! simulcast publishers (issue 10), next to a viewer whose is not.
//!
//! 1. Creates a network namespace for the shaped viewer, joined to the root
//!    namespace by a veth pair (root side `10.78.<k>.1/30`, namespace side
//!    `.2/30`; [`net::Sandbox`]), and starts the server (`--server-bin`)
//!    with HTTP and media bound to the root side's address.
//! 2. In this process: `--publishers` participants publish simulcast VP8
//!    (rids `q`, `h`, `f`, [`crate::publish::Simulcast`]: the clip at
//!    `--video-kbps` on `f`, cut copies at 1/9 and 3/9 of its bytes below)
//!    and Opus, obeying the server's `publisher-layers` (dynacast) and its
//!    keyframe requests; one more participant only views, unshaped. The
//!    room is created `mode: "sfu"`.
//! 3. The shaped viewer is this binary's hidden `shaped-viewer`
//!    subcommand, run with `ip netns exec` ([`viewer`] has its protocol):
//!    it joins the same room, subscribes only, and reports on stdout.
//! 4. Once everyone is connected, publishing starts and the phases are
//!    timed here: `--before` unshaped; `--capped` with `tc qdisc add dev
//!    <root-side veth> root tbf rate <--cap-kbit>kbit burst 20kb latency
//!    200ms` (the shaped viewer's downlink); `--after` with the qdisc
//!    removed (its `tc -s` counters noted first). Each viewer is told each
//!    boundary as it happens and measures relative to it on its own clock.
//! 5. Per publisher and viewer ([`record`] says exactly what is measured):
//!    the layer before the cap, the time from the cap to the first
//!    complete lower-layer frame, the longest freeze under the cap and
//!    after it, video and audio loss under the cap, the time from the
//!    uncap to the first top-layer frame; the tbf counters; the server's
//!    CPU per phase. A table, then the same as one JSON line.
//!
//! Every wait is bounded (`--join-timeout`, `--timeout`); the namespace,
//! the veth pair and the qdisc are removed and the server and the child
//! killed on every exit path. Needs root and iproute2. Traffic stays on this
//! machine: loopback (the root namespace's clients to the server's veth
//! address) and the veth pair.

mod net;
mod record;
mod report;
mod viewer;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard_client::{Client, Event, Kind};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::timeout_at;

use crate::proc::{self, Machine, Pid};
use crate::publish::{
    media_plan, send_next_layers, tick, MediaPlan, Publisher, Schedule, Sent, SIMULCAST_RIDS,
};
pub use report::Report;
use report::{PublisherSent, ServerCpu};
pub use viewer::{main as viewer_main, ViewerArgs};
use viewer::{Control, ViewerReport};

/// Delay between telling the publishers when to start and the start.
const MEDIA_LEAD: Duration = Duration::from_millis(50);
/// Time the phases leave for joining, collecting and cleaning up.
const OVERHEAD: Duration = Duration::from_secs(25);
/// Longest wait for the viewers' reports and the publishers' tasks.
const COLLECT: Duration = Duration::from_secs(10);
/// `publisher-layers` changes kept per publisher.
const MAX_LAYER_LOG: usize = 100;

#[derive(Debug, Clone, clap::Args)]
pub struct ShapedArgs {
    /// The server binary [default: `switchboard` beside this executable].
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// The server's stdout and stderr to this file (`RUST_LOG` passes
    /// through) [default: discarded].
    #[arg(long)]
    pub server_log: Option<PathBuf>,
    /// Publishers, each sending simulcast VP8 (q, h, f) and Opus.
    #[arg(long, default_value_t = 2)]
    pub publishers: usize,
    /// Top-layer (`f`) VP8 bit rate per publisher, kbit/s of frame data;
    /// `h` and `q` carry 3/9 and 1/9 of it.
    #[arg(long, default_value_t = 500)]
    pub video_kbps: u32,
    /// Unshaped phase, from the start of publishing.
    #[arg(long, default_value = "15s", value_parser = crate::parse_duration)]
    pub before: Duration,
    /// Phase with the shaped viewer's downlink capped.
    #[arg(long, default_value = "25s", value_parser = crate::parse_duration)]
    pub capped: Duration,
    /// Phase after the cap is lifted.
    #[arg(long, default_value = "25s", value_parser = crate::parse_duration)]
    pub after: Duration,
    /// The cap: tbf rate in kbit/s (burst 20kb, latency 200ms).
    #[arg(long, default_value_t = 600)]
    pub cap_kbit: u32,
    /// Per participant: join, ICE/DTLS connected, negotiated.
    #[arg(long, default_value = "20s", value_parser = crate::parse_duration)]
    pub join_timeout: Duration,
    /// Hard limit on the whole run (at least the phases plus 25 s).
    #[arg(long, default_value = "150s", value_parser = crate::parse_duration)]
    pub timeout: Duration,
    /// Also write the report as pretty JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Tokio worker threads of the generator (1 = current-thread runtime).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

impl ShapedArgs {
    fn phases(&self) -> Duration {
        self.before + self.capped + self.after
    }

    fn validate(&self) -> Result<(), String> {
        if self.publishers == 0 || self.publishers > 16 {
            return Err("--publishers must be 1 to 16".into());
        }
        if self.video_kbps == 0 {
            return Err("--video-kbps must be above 0 (simulcast needs video)".into());
        }
        if self.cap_kbit == 0 {
            return Err("--cap-kbit must be above 0".into());
        }
        for (name, d) in [
            ("--before", self.before),
            ("--capped", self.capped),
            ("--after", self.after),
        ] {
            if d < Duration::from_secs(1) {
                return Err(format!("{name} must be at least 1s"));
            }
        }
        let needed = self.phases() + self.join_timeout + OVERHEAD;
        if self.timeout < needed {
            return Err(format!(
                "--timeout {:?} is too short: the phases, --join-timeout and {OVERHEAD:?} \
                 take {needed:?}",
                self.timeout
            ));
        }
        Ok(())
    }
}

/// Entry point: 0 when both viewers received video from every publisher
/// before the cap and the run completed; 1 when not; 2 when it could not
/// run.
pub fn main(args: &ShapedArgs) -> ExitCode {
    let report = match run(args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadtest shaped: error: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report.table());
    match serde_json::to_string(&report) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("loadtest shaped: {e}"),
    }
    if let Some(path) = &args.json {
        if let Err(e) = crate::write_json(path, &report) {
            eprintln!("loadtest shaped: {e}");
            return ExitCode::from(2);
        }
    }
    if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run(args: &ShapedArgs) -> Result<Report, String> {
    args.validate()?;
    let started = Instant::now();
    let hard = started + args.timeout;
    let me = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    let bin = args
        .server_bin
        .clone()
        .unwrap_or_else(|| me.with_file_name("switchboard"));
    if !bin.is_file() {
        return Err(format!(
            "no server binary at {} (build it: cargo build -p switchboard, or give --server-bin)",
            bin.display()
        ));
    }
    let plan = media_plan(args.video_kbps, true)?.with_simulcast()?;
    let machine = Machine::probe();
    // Dropped last: removes everything on every way out of this function.
    let mut sandbox = net::Sandbox::new()?;
    eprintln!(
        "namespace {} ({}), veth {} ({}), starting {}",
        sandbox.netns,
        sandbox.ns_ip,
        sandbox.veth,
        sandbox.root_ip,
        bin.display()
    );
    let (server_pid, http) = sandbox.start_server(&bin, args.server_log.as_deref())?;
    let rt = crate::runtime(args.threads).map_err(|e| format!("tokio runtime: {e}"))?;
    let ctx = Arc::new(Ctx {
        url: format!("ws://{http}/ws"),
        room: format!("lt-shp-{:x}", std::process::id()),
        root_ip: IpAddr::V4(sandbox.root_ip),
        plan: plan.clone(),
        publishers: args.publishers,
        join_timeout: args.join_timeout,
        hard,
        base: Instant::now(),
    });
    let result = rt.block_on(async {
        timeout_at(hard.into(), media(args, &ctx, &sandbox, &me, server_pid))
            .await
            .unwrap_or_else(|_| Err(format!("--timeout {:?} expired", args.timeout)))
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    let alive = sandbox.server_alive();
    let mut media = result?;
    if !alive {
        media
            .problems
            .push("the server exited during the run".into());
    }
    Ok(Report::assemble(
        args,
        machine,
        &plan,
        &bin,
        &sandbox.veth,
        media,
    ))
}

/// What every task of the run shares.
struct Ctx {
    url: String,
    room: String,
    root_ip: IpAddr,
    plan: MediaPlan,
    publishers: usize,
    join_timeout: Duration,
    hard: Instant,
    /// The origin of the stamps' send times.
    base: Instant,
}

/// What the coordinator tells the publishers.
#[derive(Debug, Clone, Copy)]
enum Go {
    Wait,
    Start(Schedule),
    Stop,
}

/// What the media phase gives the report.
pub struct Media {
    pub shaped: Option<ViewerReport>,
    pub unshaped: Option<ViewerReport>,
    pub sent: Vec<PublisherSent>,
    pub tbf: net::Tbf,
    pub cpu: ServerCpu,
    /// What went wrong, in words (empty: nothing).
    pub problems: Vec<String>,
    /// ms from the cap and from the uncap to the shaped viewer's
    /// acknowledgement: at most how late its clock takes them.
    pub child_lag_ms: [Option<f64>; 2],
}

/// The lines of the child's stdout, parsed.
async fn child_lines(
    stdout: tokio::process::ChildStdout,
    tx: mpsc::UnboundedSender<(Instant, serde_json::Value)>,
) {
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        match serde_json::from_str(&line) {
            Ok(v) => {
                if tx.send((Instant::now(), v)).is_err() {
                    return;
                }
            }
            Err(_) => eprintln!("shaped-viewer: {line}"),
        }
    }
}

/// The next line of the child with `"event": event` (and, for `phase`,
/// `"phase": phase`; an `error` event is an error), within `until`, and
/// when it arrived.
async fn child_event(
    rx: &mut mpsc::UnboundedReceiver<(Instant, serde_json::Value)>,
    event: &str,
    phase: Option<&str>,
    until: Instant,
) -> Result<(Instant, serde_json::Value), String> {
    loop {
        match timeout_at(until.into(), rx.recv()).await {
            Err(_) => return Err(format!("the shaped viewer sent no {event:?} in time")),
            Ok(None) => return Err(format!("the shaped viewer ended before {event:?}")),
            Ok(Some((at, v))) => match v["event"].as_str() {
                Some(e) if e == event && (phase.is_none() || v["phase"].as_str() == phase) => {
                    return Ok((at, v))
                }
                Some("error") => {
                    return Err(format!(
                        "shaped viewer: {}",
                        v["message"].as_str().unwrap_or("?")
                    ))
                }
                _ => {}
            },
        }
    }
}

async fn media(
    args: &ShapedArgs,
    ctx: &Arc<Ctx>,
    sandbox: &net::Sandbox,
    me: &std::path::Path,
    server_pid: u32,
) -> Result<Media, String> {
    let n = args.publishers;
    let participants = n + 2;
    let (go_tx, go_rx) = watch::channel(Go::Wait);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let publishers: Vec<_> = (0..n)
        .map(|i| tokio::spawn(publisher(i, ctx.clone(), go_rx.clone(), ready_tx.clone())))
        .collect();
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel();
    let unshaped = {
        let (ctx, ready) = (ctx.clone(), ready_tx.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let joined = viewer::join(
                &ctx.url,
                &ctx.room,
                "unshaped",
                ctx.root_ip,
                None,
                ctx.join_timeout,
            )
            .await;
            let mut client = match joined {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready.send(Err(e.clone()));
                    return Err(e);
                }
            };
            let _ = ready.send(Ok(()));
            drop(ready);
            let join_ms = started.elapsed().as_secs_f64() * 1e3;
            let rec = record::Recording::new(ctx.publishers, ctx.publishers + 2, ctx.publishers);
            let r = viewer::view(&mut client, rec, &mut ctl_rx, ctx.hard, join_ms).await;
            client.leave();
            r
        })
    };
    drop(ready_tx);

    // The shaped viewer, in the namespace.
    let mut child = sandbox
        .in_netns(me)
        .arg("shaped-viewer")
        .args(["--url", &ctx.url, "--room", &ctx.room])
        .args(["--bind-ip", &sandbox.ns_ip.to_string()])
        .args(["--index", &(n + 1).to_string()])
        .args(["--publishers", &n.to_string()])
        .args(["--participants", &participants.to_string()])
        .args([
            "--join-timeout",
            &format!("{}ms", args.join_timeout.as_millis()),
        ])
        .args([
            "--timeout",
            &format!(
                "{}ms",
                ctx.hard
                    .saturating_duration_since(Instant::now())
                    .as_millis()
            ),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the shaped viewer: {e}"))?;
    if let Some(pid) = child.id() {
        sandbox.own_pid(pid);
    }
    let mut stdin = child.stdin.take().ok_or("no stdin to the shaped viewer")?;
    let stdout = child
        .stdout
        .take()
        .ok_or("no stdout from the shaped viewer")?;
    let (line_tx, mut lines) = mpsc::unbounded_channel();
    tokio::spawn(child_lines(stdout, line_tx));

    // Everyone connected and negotiated.
    let join_deadline = Instant::now() + args.join_timeout + Duration::from_secs(5);
    for _ in 0..=n {
        match timeout_at(join_deadline.into(), ready_rx.recv()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) | Err(_) => return Err("not everyone joined in time".into()),
        }
    }
    child_event(&mut lines, "ready", None, join_deadline).await?;
    eprintln!("everyone connected; publishing");

    let cpu = |pid: u32| proc::cpu_time(Pid::Other(pid)).ok();
    let start = Instant::now() + MEDIA_LEAD;
    let total = args.phases();
    let schedule = Schedule::new(
        ctx.base,
        start,
        Duration::ZERO,
        total + COLLECT,
        Duration::ZERO,
    );
    let _ = go_tx.send(Go::Start(schedule));
    tokio::time::sleep_until(start.into()).await;
    write_line(&mut stdin, "start").await?;
    let _ = ctl_tx.send(Control::Start(start));
    let mut cpu_at = vec![(Instant::now(), cpu(server_pid))];

    tokio::time::sleep_until((start + args.before).into()).await;
    sandbox.cap(args.cap_kbit).await?;
    let cap = Instant::now();
    write_line(&mut stdin, "cap").await?;
    let _ = ctl_tx.send(Control::Cap(cap));
    cpu_at.push((cap, cpu(server_pid)));
    eprintln!("capped at {} kbit/s", args.cap_kbit);
    let (cap_ack, _) = child_event(
        &mut lines,
        "phase",
        Some("cap"),
        cap + Duration::from_secs(5),
    )
    .await?;

    tokio::time::sleep_until((cap + args.capped).into()).await;
    let tbf = sandbox.uncap().await?;
    let uncap = Instant::now();
    write_line(&mut stdin, "uncap").await?;
    let _ = ctl_tx.send(Control::Uncap(uncap));
    cpu_at.push((uncap, cpu(server_pid)));
    eprintln!("cap lifted");
    let (uncap_ack, _) = child_event(
        &mut lines,
        "phase",
        Some("uncap"),
        uncap + Duration::from_secs(5),
    )
    .await?;

    tokio::time::sleep_until((uncap + args.after).into()).await;
    let end = Instant::now();
    write_line(&mut stdin, "stop").await?;
    let _ = ctl_tx.send(Control::Stop(end));
    cpu_at.push((end, cpu(server_pid)));
    let _ = go_tx.send(Go::Stop);
    eprintln!("done; collecting");

    let mut problems = Vec::new();
    let until = (Instant::now() + COLLECT).min(ctx.hard);
    let shaped = match child_event(&mut lines, "report", None, until).await {
        Ok((_, v)) => match serde_json::from_value::<ViewerReport>(v["report"].clone()) {
            Ok(r) => Some(r),
            Err(e) => {
                problems.push(format!("the shaped viewer's report does not parse: {e}"));
                None
            }
        },
        Err(e) => {
            problems.push(e);
            None
        }
    };
    let unshaped = match timeout_at(until.into(), unshaped).await {
        Ok(Ok(Ok(r))) => Some(r),
        Ok(Ok(Err(e))) => {
            problems.push(format!("unshaped viewer: {e}"));
            None
        }
        Ok(Err(e)) => {
            problems.push(format!("unshaped viewer task: {e}"));
            None
        }
        Err(_) => {
            problems.push("the unshaped viewer did not finish in time".into());
            None
        }
    };
    let mut sent = Vec::new();
    for task in publishers {
        match timeout_at(until.into(), task).await {
            Ok(Ok(s)) => {
                if let Some(e) = &s.error {
                    problems.push(format!("publisher {}: {e}", s.publisher));
                }
                sent.push(s);
            }
            Ok(Err(e)) => problems.push(format!("publisher task: {e}")),
            Err(_) => problems.push("a publisher did not finish in time".into()),
        }
    }
    let _ = timeout_at(until.into(), child.wait()).await;
    let lag =
        |ack: Instant, at: Instant| Some(ack.saturating_duration_since(at).as_secs_f64() * 1e3);
    Ok(Media {
        shaped,
        unshaped,
        sent,
        tbf,
        cpu: ServerCpu::of(&cpu_at),
        problems,
        child_lag_ms: [lag(cap_ack, cap), lag(uncap_ack, uncap)],
    })
}

async fn write_line(stdin: &mut tokio::process::ChildStdin, word: &str) -> Result<(), String> {
    let line = format!("{word}\n");
    stdin
        .write_all(line.as_bytes())
        .await
        .and(stdin.flush().await)
        .map_err(|e| format!("cannot tell the shaped viewer {word:?}: {e}"))
}

/// One publisher: joins with simulcast, waits for the start, sends until
/// told to stop; answers keyframe requests and obeys `publisher-layers`.
async fn publisher(
    index: usize,
    ctx: Arc<Ctx>,
    mut go: watch::Receiver<Go>,
    ready: mpsc::UnboundedSender<Result<(), String>>,
) -> PublisherSent {
    let mut out = PublisherSent {
        publisher: index,
        ..PublisherSent::default()
    };
    let rids = SIMULCAST_RIDS.iter().map(|r| (*r).to_owned()).collect();
    let name = format!("pub{index}");
    let mut client = match viewer::join(
        &ctx.url,
        &ctx.room,
        &name,
        ctx.root_ip,
        Some(rids),
        ctx.join_timeout,
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e.clone()));
            out.error = Some(e);
            return out;
        }
    };
    let _ = ready.send(Ok(()));
    drop(ready);
    let mut streams: [Option<Publisher>; 2] = [None, None];
    let mut schedule: Option<Schedule> = None;
    let mut layers: Option<Vec<String>> = None;
    let mut sent = [Sent::default(); 2];
    loop {
        let [audio, video] = &mut streams;
        tokio::select! {
            ev = client.next_event() => match ev {
                None | Some(Event::Closed) => {
                    out.error = Some("client closed during the run".into());
                    return out;
                }
                Some(Event::KeyframeRequested { kind: Kind::Video, .. }) => {
                    out.keyframes_requested += 1;
                    if let Some(v) = video.as_mut() {
                        v.keyframe_requested(&ctx.plan);
                    }
                }
                Some(Event::PublisherLayers { active, .. }) => {
                    if let Some(s) = &schedule {
                        if out.layer_log.len() < MAX_LAYER_LOG {
                            let t = Instant::now().saturating_duration_since(s.warmup_start);
                            out.layer_log.push((u64::try_from(t.as_millis()).unwrap_or(u64::MAX), active.clone()));
                        }
                    }
                    if let Some(v) = video.as_mut() {
                        v.set_layers(&ctx.plan, &active);
                    }
                    layers = Some(active);
                }
                Some(Event::Connection(state)) => out.later_states.push(state),
                Some(_) => {}
            },
            changed = go.changed() => {
                if changed.is_err() {
                    break;
                }
                match *go.borrow_and_update() {
                    Go::Start(s) => {
                        schedule = Some(s);
                        [*audio, *video] = Publisher::all(&ctx.plan, s.warmup_start);
                        if let (Some(v), Some(l)) = (video.as_mut(), layers.as_ref()) {
                            v.set_layers(&ctx.plan, l);
                        }
                    }
                    Go::Stop => break,
                    Go::Wait => {}
                }
            }
            () = tick(audio) => {
                if let (Some(p), Some(s)) = (audio.as_mut(), schedule.as_ref()) {
                    send(p, &client, &ctx, index, s, &mut sent, &mut out);
                }
            }
            () = tick(video) => {
                if let (Some(p), Some(s)) = (video.as_mut(), schedule.as_ref()) {
                    send(p, &client, &ctx, index, s, &mut sent, &mut out);
                }
            }
            () = tokio::time::sleep_until(ctx.hard.into()) => {
                out.error = Some("--timeout expired while publishing".into());
                break;
            }
        }
    }
    out.audio_packets = sent[0].total;
    out.video_packets[2] = sent[1].total;
    client.leave();
    out
}

fn send(
    p: &mut Publisher,
    client: &Client,
    ctx: &Ctx,
    index: usize,
    s: &Schedule,
    sent: &mut [Sent; 2],
    out: &mut PublisherSent,
) {
    let lower = &mut out.video_packets;
    send_next_layers(
        p,
        &ctx.plan,
        index,
        ctx.base,
        s,
        sent,
        |kind, payload, marker, ts| client.send_rtp(kind, payload, marker, ts).is_ok(),
        |layer, payload, marker, ts| {
            let ok = SIMULCAST_RIDS
                .get(layer)
                .is_some_and(|rid| client.send_rtp_layer(rid, payload, marker, ts).is_ok());
            if let (true, Some(n)) = (ok, lower.get_mut(layer)) {
                *n += 1;
            }
            ok
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: ShapedArgs,
    }

    fn args(extra: &[&str]) -> ShapedArgs {
        let mut v = vec!["x"];
        v.extend_from_slice(extra);
        Wrap::try_parse_from(v).expect("parses").args
    }

    #[test]
    fn defaults_and_validation() {
        let a = args(&[]);
        assert_eq!((a.publishers, a.cap_kbit, a.video_kbps), (2, 600, 500));
        assert_eq!(a.phases(), Duration::from_secs(65));
        assert!(a.validate().is_ok());
        assert!(args(&["--publishers", "0"]).validate().is_err());
        assert!(args(&["--cap-kbit", "0"]).validate().is_err());
        assert!(args(&["--capped", "0s"]).validate().is_err());
        let e = args(&["--after", "2m"])
            .validate()
            .expect_err("timeout too short");
        assert!(e.contains("--timeout"), "{e}");
        assert!(args(&["--after", "2m", "--timeout", "4m"])
            .validate()
            .is_ok());
    }
}
