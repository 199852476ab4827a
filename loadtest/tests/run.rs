//! `loadtest run` as a user runs it: the real `switchboard` binary on
//! 127.0.0.1 (HTTP port and media port picked by the kernel), the real
//! `loadtest` binary against it.
//!
//! The server binary is the one cargo builds next to `loadtest`
//! (`target/<profile>/switchboard`): `cargo test --workspace` builds it
//! before running any test; with `cargo test -p loadtest` alone, build it
//! first (`cargo build -p switchboard`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

mod common;

use common::{loadtest, switchboard_bin};

/// The server process; killed (and reaped) when dropped, even when a test fails.
struct Server {
    child: Child,
    ws_url: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(switchboard_bin())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--rtc-ip",
                "127.0.0.1",
                "--rtc-port",
                "0",
            ])
            .args(extra)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn switchboard");
        let stdout = child.stdout.take().expect("stdout");
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).expect("read");
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let http = line
            .trim()
            .strip_prefix("switchboard listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        let ws_url = format!("{}/ws", http.replacen("http://", "ws://", 1));
        Server { child, ws_url }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("loadtest-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn num(v: &Value, path: &str) -> f64 {
    let mut cur = v;
    for key in path.split('.') {
        cur = match key.parse::<usize>() {
            Ok(i) => &cur[i],
            Err(_) => &cur[key],
        };
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number: {cur}"))
}

fn has_keys(v: &Value, what: &str, keys: &[&str]) {
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{what} is not an object: {v}"));
    for k in keys {
        assert!(obj.contains_key(*k), "{what} has no `{k}`: {v}");
    }
}

#[test]
fn a_short_run_reports_every_figure() {
    let server = Server::start(&[]);
    let dir = Scratch::new("run");
    let json = dir.0.join("report.json");
    let svg = dir.0.join("report.svg");
    let pid = server.pid();
    let out = loadtest(
        &[
            "run",
            "--url",
            &server.ws_url,
            "--rooms",
            "2",
            "--participants",
            "3",
            "--video-kbps",
            "300",
            "--audio",
            "--audio-mode",
            "forward",
            "--warmup",
            "1s",
            "--duration",
            "5s",
            "--drain",
            "500ms",
            "--timeout",
            "60s",
            "--server-pid",
            &pid,
            "--json",
            json.to_str().expect("utf-8 path"),
            "--plot",
            svg.to_str().expect("utf-8 path"),
        ],
        Duration::from_secs(120),
    );
    out.assert_success();
    // The table, on stdout (no terminal here, so no progress bar).
    for line in [
        "media in the window",
        "end-to-end audio",
        "end-to-end video",
        "CPU per packet",
        "RSS/participant",
        "generator CPU",
        "per subscriber",
    ] {
        assert!(out.stdout.contains(line), "no {line:?} in\n{}", out.stdout);
    }
    assert!(
        !out.stderr.contains('\r'),
        "no progress bar without a terminal"
    );

    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json written"))
        .expect("valid JSON");
    has_keys(
        &r,
        "report",
        &[
            "tool",
            "url",
            "run_id",
            "completed",
            "config",
            "media_source",
            "audio_mode_granted",
            "machine",
            "participants",
            "join_latency",
            "window_s",
            "media",
            "latency_all",
            "first_packet_after_warmup",
            "first_packet_after_join",
            "tracks_added",
            "tracks_expected",
            "bad_payloads",
            "mixed_audio",
            "subscribers",
            "flows",
            "timeline",
            "server",
            "server_metrics",
            "generator",
            "errors",
        ],
    );
    assert_eq!(r["tool"], "loadtest run");
    assert_eq!(r["completed"], true);
    assert_eq!(num(&r, "participants.connected"), 6.0);
    assert_eq!(num(&r, "config.publishers_per_room"), 3.0);
    assert_eq!(r["audio_mode_granted"]["forward"], 6);
    assert_eq!(r["media_source"]["video"]["width"], 320);
    assert!(r["mixed_audio"].is_null(), "forward mode: no mix track");
    let window = num(&r, "window_s");
    assert!((4.5..6.0).contains(&window), "{window}");

    let media = r["media"].as_array().expect("media");
    assert_eq!(media.len(), 2);
    for m in media {
        has_keys(
            m,
            "media[]",
            &[
                "kind",
                "sent",
                "sent_bytes",
                "sent_kbps_per_publisher",
                "frames_per_s_per_publisher",
                "keyframes",
                "expected",
                "received",
                "received_bytes",
                "lost",
                "loss_percent",
                "duplicates",
                "reordered",
                "rtp_expected",
                "rtp_lost",
                "jitter_ms_mean",
                "jitter_ms_max",
                "tracks",
                "tracks_missing",
                "latency",
            ],
        );
        let kind = m["kind"].as_str().expect("kind");
        println!(
            "{kind}: expected {} received {} loss {:.2} % keyframes {}",
            m["expected"],
            m["received"],
            num(m, "loss_percent"),
            m["keyframes"]
        );
        assert!(num(m, "received") > 0.0, "{kind}: nothing received");
        assert!(num(m, "received_bytes") > 0.0);
        assert!(num(m, "loss_percent") < 5.0, "{kind}: {m}");
        assert_eq!(num(m, "tracks_missing"), 0.0);
        // Latency on one host through loopback: above zero, below a second.
        let p50 = num(m, "latency.p50_us");
        assert!(p50 > 0.0 && p50 < 1e6, "{kind}: p50 {p50} us");
        assert!(num(m, "latency.p99_us") >= p50);
        let jitter = num(m, "jitter_ms_mean");
        assert!((0.0..1000.0).contains(&jitter), "{kind}: jitter {jitter}");
        let fps = num(m, "frames_per_s_per_publisher");
        let kbps = num(m, "sent_kbps_per_publisher");
        match kind {
            // 20 ms Opus frames: 50/s (fewer if the machine is so busy that
            // the generator skips late ticks).
            "audio" => assert!((30.0..=51.0).contains(&fps), "audio {fps} frames/s"),
            // 300 kbit/s of a ~495 kbit/s 30 fps clip: ~18 fps.
            "video" => {
                assert!((9.0..=20.0).contains(&fps), "video {fps} frames/s");
                assert!((200.0..400.0).contains(&kbps), "video {kbps} kbit/s");
                assert!(num(m, "keyframes") >= 6.0, "a keyframe per 1.6 s each");
            }
            other => panic!("kind {other}"),
        }
    }

    let subs = r["subscribers"].as_array().expect("subscribers");
    assert_eq!(subs.len(), 6);
    for s in subs {
        has_keys(
            s,
            "subscribers[]",
            &[
                "name",
                "expected",
                "received",
                "received_bytes",
                "lost",
                "loss_percent",
                "jitter_ms_max",
                "latency",
                "first_packet_max_ms",
            ],
        );
        assert!(num(s, "received") > 0.0);
    }
    let flows = r["flows"].as_array().expect("flows");
    // 6 subscribers x 2 other publishers x 2 kinds.
    assert_eq!(flows.len(), 24);
    for f in flows {
        has_keys(
            f,
            "flows[]",
            &[
                "subscriber",
                "publisher",
                "kind",
                "sent",
                "received",
                "lost",
                "jitter_ms",
                "rtp_expected",
                "rtp_lost",
                "first_packet_after_join_ms",
                "latency",
            ],
        );
        // Join → first packet of this remote track: positive, under the run.
        let first = num(f, "first_packet_after_join_ms");
        assert!(first > 0.0 && first < 60_000.0, "{f}");
    }

    let server_stats = &r["server"];
    has_keys(
        server_stats,
        "server",
        &[
            "pid",
            "cpu_window_s",
            "cpu_percent_of_core",
            "cpu_per_forwarded_packet_us",
            "rss_baseline_bytes",
            "rss_steady_bytes",
            "rss_per_participant_bytes",
        ],
    );
    assert_eq!(num(server_stats, "pid").to_string(), pid);
    assert!(num(server_stats, "cpu_per_forwarded_packet_us") > 0.0);
    assert!(num(server_stats, "rss_steady_bytes") > 1e6);
    let forwarded = num(&r, "server_metrics.forwarded");
    let expected = num(&r, "server_metrics.expected_forwarded");
    assert!(forwarded > 0.0 && expected > 0.0);
    // Plausible, not exact: on a very busy machine NACKed retransmissions
    // are forwarded again (see docs/benchmarks.md).
    assert!(
        forwarded >= expected * 0.9 && forwarded <= expected * 1.5,
        "forwarded {forwarded} vs {expected} expected"
    );
    has_keys(
        &r["generator"],
        "generator",
        &["cpu_window_s", "cpu_percent_of_core", "cpu_per_packet_us"],
    );
    assert!(num(&r, "generator.cpu_window_s") > 0.0);

    // About one point a second over warm-up + window + drain (6.5 s).
    let timeline = r["timeline"].as_array().expect("timeline");
    assert!(
        (5..=9).contains(&timeline.len()),
        "{} points",
        timeline.len()
    );
    for t in timeline {
        has_keys(
            t,
            "timeline[]",
            &[
                "t_s",
                "server_cpu_percent",
                "server_rss_bytes",
                "forwarded_per_s",
                "server_cpu_per_forwarded_packet_us",
                "generator_cpu_percent",
                "packets_received",
                "latency_p50_ms",
                "latency_p99_ms",
            ],
        );
    }
    let with_latency = timeline
        .iter()
        .filter(|t| t["latency_p50_ms"].is_number())
        .count();
    assert!(with_latency >= 4, "latency in {with_latency} intervals");
    assert!(timeline
        .iter()
        .any(|t| t["server_cpu_percent"].as_f64().is_some_and(|c| c > 0.0)));

    let plot = std::fs::read_to_string(&svg).expect("plot written");
    assert!(plot.starts_with("<svg"));
    assert!(plot.contains("end-to-end latency, ms") && plot.contains("CPU, % of one core"));
}

#[test]
fn an_unreachable_url_is_a_clear_error() {
    // A port nobody listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("ws://127.0.0.1:{port}/ws");
    let out = loadtest(
        &["run", "--url", &url, "--rooms", "1", "--participants", "2"],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("cannot reach the server at") && out.stderr.contains(&url),
        "{}",
        out.stderr
    );
    assert!(out.stdout.is_empty(), "no report: {}", out.stdout);
}

#[test]
fn a_refused_join_is_a_clear_error() {
    // One participant per room: the second join of the room gets `full`.
    let server = Server::start(&["--max-participants", "1"]);
    let out = loadtest(
        &[
            "run",
            "--url",
            &server.ws_url,
            "--rooms",
            "1",
            "--participants",
            "2",
            "--connect-concurrency",
            "1",
            "--run-id",
            "refused",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("the server refused a join: r0-p1: room lt-refused-0 is full"),
        "{}",
        out.stderr
    );
}

/// `--light-subscribers`: publishers as usual, subscribers count SRTP
/// headers without decrypting. The counted packets are distinct (SSRC,
/// seq) pairs, so they can never exceed what the publishers sent times the
/// subscribers of each packet; the report says it is light mode.
#[test]
fn light_subscribers_count_distinct_packets_never_more_than_were_sent() {
    let server = Server::start(&[]);
    let dir = Scratch::new("light");
    let json = dir.0.join("report.json");
    let pid = server.pid();
    let participants = 3u32;
    let out = loadtest(
        &[
            "run",
            "--url",
            &server.ws_url,
            "--rooms",
            "2",
            "--participants",
            &participants.to_string(),
            "--video-kbps",
            "300",
            "--audio",
            "--warmup",
            "1s",
            "--duration",
            "3s",
            "--drain",
            "500ms",
            "--timeout",
            "60s",
            "--server-pid",
            &pid,
            "--light-subscribers",
            "--json",
            json.to_str().expect("utf-8 path"),
        ],
        Duration::from_secs(120),
    );
    out.assert_success();
    for line in [
        "LIGHT MODE",
        "light subscribers",
        "not available in light mode",
        "CPU per packet",
        "the generator beside it",
        "forwarding latency",
        "RSS/participant",
    ] {
        assert!(out.stdout.contains(line), "no {line:?} in\n{}", out.stdout);
    }

    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json written"))
        .expect("valid JSON");
    assert_eq!(r["config"]["light_subscribers"], true);
    let light = &r["light"];
    has_keys(
        light,
        "light",
        &[
            "counted",
            "expected",
            "sent_bound",
            "duplicates",
            "rtx",
            "ssrcs_seen",
            "ssrcs_expected",
            "mean_batch",
        ],
    );
    let counted = num(light, "counted");
    // Every packet any publisher handed to its client over the whole media
    // phase, once per other participant of its room: an upper bound no
    // distinct count can pass, whatever the timing.
    let sent_total: f64 = r["media"]
        .as_array()
        .expect("media")
        .iter()
        .map(|m| num(m, "sent_total"))
        .sum();
    let bound = sent_total * f64::from(participants - 1);
    println!(
        "light: counted {counted}, expected {}, bound {bound}, duplicates {}, rtx {}",
        light["expected"], light["duplicates"], light["rtx"]
    );
    assert!(counted > 0.0, "{light}");
    assert!(counted <= bound, "counted {counted} > sent bound {bound}");
    assert!(counted <= num(light, "sent_bound"), "{light}");
    let received: f64 = r["subscribers"]
        .as_array()
        .expect("subscribers")
        .iter()
        .map(|s| num(s, "received"))
        .sum();
    assert_eq!(received, counted, "per-subscriber rows add up");
    // No decryption: no end-to-end latency, no per-flow rows.
    assert_eq!(num(&r, "latency_all.count"), 0.0);
    assert!(r["flows"].as_array().expect("flows").is_empty());
    assert!(r["server"]["cpu_per_forwarded_packet_basis"]
        .as_str()
        .expect("basis")
        .contains("light"));
    assert!(num(&r, "server.cpu_per_forwarded_packet_us") > 0.0);
    assert!(num(&r, "generator.cpu_window_s") > 0.0);
}

/// Runs `--simulcast` with `extra` flags; returns the JSON report.
fn simulcast_run(name: &str, extra: &[&str]) -> Value {
    let server = Server::start(&[]);
    let dir = Scratch::new(name);
    let json = dir.0.join("report.json");
    let pid = server.pid();
    let mut args = vec![
        "run",
        "--url",
        &server.ws_url,
        "--rooms",
        "1",
        "--participants",
        "3",
        "--video-kbps",
        "300",
        "--audio",
        "--warmup",
        "2s",
        "--duration",
        "4s",
        "--drain",
        "500ms",
        "--timeout",
        "60s",
        "--server-pid",
        &pid,
        "--simulcast",
        "--json",
        json.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    let out = loadtest(&args, Duration::from_secs(120));
    out.assert_success();
    assert!(
        out.stdout.contains("publisher-layers messages"),
        "{}",
        out.stdout
    );
    serde_json::from_str(&std::fs::read_to_string(&json).expect("json written"))
        .expect("valid JSON")
}

/// Simulcast publishers obey `publisher-layers` as browsers do: with every
/// subscriber on the top layer the server needs only the lowest (its
/// fallback) and the top one, so the middle layer (`h`) stops at the
/// publishers while `q` goes on; with `--ignore-dynacast` every layer is
/// sent all the time. (h's frames are three times q's bytes: sent all the
/// time, h has more packets than q.)
#[test]
fn simulcast_publishers_stop_the_layer_nobody_needs_unless_told_to_ignore_dynacast() {
    let obeyed = simulcast_run("simulcast-dynacast", &[]);
    let sc = &obeyed["simulcast"];
    println!("obeying dynacast: {sc}");
    assert_eq!(sc["dynacast"], true);
    assert!(num(sc, "layer_changes") >= 1.0, "{sc}");
    let (q, h) = (num(sc, "lower_sent.0"), num(sc, "lower_sent.1"));
    assert!(q > 0.0, "{sc}");
    assert!(h < q, "h (nobody's layer) stopped early: q {q}, h {h}");
    // The top layer reached every subscriber all along.
    for m in obeyed["media"].as_array().expect("media") {
        if m["kind"] == "video" {
            assert!(num(m, "received") > 0.0, "{m}");
        }
    }

    let ignored = simulcast_run("simulcast-ignored", &["--ignore-dynacast"]);
    let sc = &ignored["simulcast"];
    println!("ignoring dynacast: {sc}");
    assert_eq!(sc["dynacast"], false);
    assert_eq!(num(sc, "layer_changes"), 0.0, "{sc}");
    assert!(num(sc, "publisher_layers_messages") >= 1.0, "{sc}");
    let (q, h) = (num(sc, "lower_sent.0"), num(sc, "lower_sent.1"));
    assert!(h > q, "every layer sent all the time: q {q}, h {h}");
}
