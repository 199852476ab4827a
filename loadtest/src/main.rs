//! `loadtest`: load generator for Switchboard.
//!
//! Subcommands:
//! - `signaling`: many WebSocket clients join rooms and ping; reports
//!   join and ping latency and what the connections cost the server.
//! - `run` (alias `sfu`): rooms of real WebRTC clients publish real VP8 and
//!   Opus through the SFU and subscribe to each other; reports per
//!   subscriber packets, bytes, loss, jitter, end-to-end latency and
//!   join → first packet, and the server's CPU per forwarded packet and RSS
//!   per participant, with a live progress bar, JSON and an SVG plot.
//! - `janus`: the same load (the same media) against Janus VideoRoom, or
//!   AudioBridge with `--audio-mode mix`, inside a network namespace.
//! - `compare`: `run` against Switchboard and `janus` against Janus in turn
//!   under one load; the ratio table, optionally written into a document.
//! - `floor`: a bare UDP relay (one AES-128-GCM seal per copy) under the
//!   same load, in three send modes: the CPU per packet a server is measured
//!   against.
//! - `soak`: participants join and leave at a set rate, with media, for a
//!   set time; the server's RSS, open files, threads, gauges and metric
//!   series before, at the peak and after everyone left.
//! - `shaped`: simulcast publishers, an unshaped viewer and one in a network
//!   namespace whose downlink is capped with `tc` for a while; layer
//!   switches, freezes, loss and recovery as each viewer saw them.
//!
//! The building blocks are plain modules an adapter for another server can
//! reuse: [`publish`] (what a publisher sends, paced and stamped, and the
//! per-flow accounting of what arrives; `run` and `janus` both use it),
//! [`media`] (VP8 clip, RFC 7741 packetizer, Opus tone), [`stamp`]
//! (sender/sequence/send time inside the payload), [`rxstats`] (RTP loss,
//! jitter, latency per track), [`sampler`] (server CPU/RSS and a `/metrics`
//! counter once a second), [`plot`] and [`progress`].

mod compare;
mod floor;
mod janus;
mod media;
mod plot;
mod proc;
mod progress;
mod publish;
mod run;
mod rxstats;
mod sampler;
mod scrape;
mod shaped;
mod signaling;
mod soak;
mod stamp;
mod stats;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "loadtest", version, about = "Load generator for Switchboard")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Signaling benchmark: open N WebSocket connections spread over M rooms,
    /// join (mode sfu), ping, leave; report latency percentiles and the
    /// server's RSS and CPU.
    Signaling(signaling::SignalingArgs),
    /// Media load: rooms x participants WebRTC clients publish real VP8 (and
    /// Opus with --audio) through the SFU and subscribe to each other; report
    /// loss, jitter, end-to-end latency, and the server's CPU per forwarded
    /// packet and RSS per participant.
    #[command(alias = "sfu")]
    Run(run::RunArgs),
    /// The `run` load against Janus VideoRoom, or AudioBridge with
    /// `--audio-mode mix` (run it inside Janus's network namespace:
    /// loadtest/janus/run.sh).
    Janus(janus::JanusArgs),
    /// Switchboard (`run`) and Janus in turn under the same load, in a
    /// network namespace it creates (root); prints the ratio table.
    Compare(compare::CompareArgs),
    /// Churn with media for a set time (participants join at --churn per
    /// second, stay --stay, leave); reports what the server holds before,
    /// at the peak and after everyone left.
    Soak(soak::SoakArgs),
    /// The floor: a bare UDP relay doing the same fan-out with one
    /// AES-128-GCM seal per output packet, with sendto, sendmmsg and UDP GSO;
    /// reports its CPU per output packet.
    Floor(floor::FloorArgs),
    /// Simulcast publishers, an unshaped viewer and a shaped one (its
    /// downlink capped with tc tbf for a while, in a network namespace it
    /// creates; root): time to a lower layer, freezes, loss, recovery.
    Shaped(shaped::ShapedArgs),
    /// The shaped viewer of `shaped` (started by it inside its namespace).
    #[command(hide = true)]
    ShapedViewer(shaped::ViewerArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Signaling(args) => signaling::main(&args),
        Command::Run(args) => run::main(&args),
        Command::Janus(args) => janus::main(&args),
        Command::Compare(args) => compare::main(&args),
        Command::Soak(args) => soak::main(&args),
        Command::Shaped(args) => shaped::main(&args),
        Command::ShapedViewer(args) => shaped::viewer_main(&args),
        Command::Floor(args) => match floor::floor(&args) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("loadtest floor: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// A tokio runtime: current-thread for `threads == 1`, else multi-thread with
/// that many workers.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// Writes `report` as pretty JSON (plus a newline) to `path` and says so on
/// stderr.
pub fn write_json<T: serde::Serialize>(path: &std::path::Path, report: &T) -> Result<(), String> {
    serde_json::to_string_pretty(report)
        .map_err(|e| e.to_string())
        .and_then(|j| std::fs::write(path, j + "\n").map_err(|e| e.to_string()))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    eprintln!("report written to {}", path.display());
    Ok(())
}

/// Parses a duration: humantime (`30s`, `1m 30s`, `500ms`, `2min`), or a
/// decimal number with one unit (`1.5s`, `250us`, `2m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(d);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{s:?} has no unit (use us, ms, s or m)"))?;
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} does not start with a number"))?;
    let secs = match unit.trim() {
        "us" | "µs" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" | "min" => value * 60.0,
        other => return Err(format!("unknown unit {other:?} (use us, ms, s or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("100").is_err());
        assert!(parse_duration("ms").is_err());
        assert_eq!(parse_duration("5h"), Ok(Duration::from_secs(5 * 3600)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30sec"), Ok(Duration::from_secs(30)));
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "loadtest",
            "signaling",
            "--url",
            "ws://127.0.0.1:9/ws",
            "--connections",
            "10",
            "--rooms",
            "2",
            "--ping-interval",
            "50ms",
        ])
        .expect("parses");
        let Command::Signaling(a) = cli.command else {
            panic!("not signaling");
        };
        assert_eq!(a.connections, 10);
        assert_eq!(a.rooms, 2);
        assert_eq!(a.ping_interval, Duration::from_millis(50));
        assert_eq!(a.timeout, Duration::from_secs(120));
        let cli = Cli::try_parse_from([
            "loadtest",
            "run",
            "--rooms",
            "2",
            "--participants",
            "3",
            "--duration",
            "5s",
            "--server-pid",
            "1",
        ])
        .expect("parses");
        let Command::Run(a) = cli.command else {
            panic!("not run");
        };
        assert_eq!((a.rooms, a.participants), (2, 3));
        assert_eq!(a.duration, Duration::from_secs(5));
        assert_eq!(a.video_kbps, 500);
        assert_eq!(a.server_pid, Some(1));
        assert!(!a.audio);
        assert_eq!(a.audio_mode, run::AudioModeArg::Forward);
        assert_eq!(a.publishers(), 3);
        assert!(!a.light_subscribers);
        // The old name still works, with the new options.
        let cli = Cli::try_parse_from([
            "loadtest",
            "sfu",
            "--audio",
            "--audio-mode",
            "mix",
            "--publishers",
            "2",
            "--duration",
            "1m 30s",
            "--light-subscribers",
        ])
        .expect("parses");
        let Command::Run(a) = cli.command else {
            panic!("alias");
        };
        assert!(a.audio);
        assert_eq!(a.audio_mode, run::AudioModeArg::Mix);
        assert_eq!(a.publishers(), 2);
        assert_eq!(a.duration, Duration::from_secs(90));
        assert!(a.light_subscribers);
    }
}
