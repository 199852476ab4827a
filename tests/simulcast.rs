//! Simulcast and per-subscriber layers, end to end: the real server binary,
//! four real Chromium pages (each in its own network namespace), and a
//! router that can cap one viewer's downlink.
//!
//! ```text
//!   server ns 10.77.0.2 (HTTP :8080, media --rtc-ip 10.77.0.2)
//!        |
//!   router ns .0.1 | .1.1 | .2.1 | .3.1 | .4.1   (ip_forward; tbf on the veth to subB)
//!                  |      |      |      |
//!               pub1    pub2   subA   subB     (10.77.<n>.2)
//! ```
//!
//! The publishers' Chromium films a 1280x720 file at 15 frames a second
//! (a y4m the test writes: moving bars over a drifting gradient, with
//! noise, so the encoder has real work) and sends it in simulcast; the
//! viewers have a microphone only. tests/browser/simulcast_call.mjs drives
//! the pages (its head has the timeline and what is asserted); this test
//! owns the network.
//!
//! Control between the two: the script prints `PHASE cap` / `PHASE uncap`
//! on its stdout and waits (bounded) for a line on its stdin. On `cap` this
//! test puts `tbf rate 600kbit burst 20kb latency 200ms` on the router's
//! veth towards subB (subB's downlink); on `uncap` it notes the qdisc's
//! counters and deletes it; then it answers `ACK <phase>` (or `NAK <phase>
//! <why>`, which fails the script with the reason).
//!
//! Asserted: both viewers decode both publishers through the server; under
//! the cap subB's video of both keeps coming and its audio loses < 5 %;
//! `track-settings` `maxHeight: 180` brings the 180p layer; `paused: true`
//! stops the stream; dynacast turns the publisher's unneeded encodings off
//! and back on. The issue's adaptive-quality goals under the cap (the low
//! layer within 10 s, no freeze over 1 s, the unshaped viewer at >= 1000
//! px, climbing back within 20 s) are asserted too; `SB_SIMULCAST_GOALS=0`
//! only measures and prints them (`goalsUnmet`). On this 2-vCPU machine 12
//! runs in a row met them all (docs/benchmarks.md "Probes that fill the
//! media's gap").
//!
//! Figures (`SIMULCAST {...}`: widths before the cap, time from the cap to
//! subB's first low frame, the longest freeze, audio loss, time to climb
//! back, track-settings and dynacast times, the tbf counters) are printed.
//! Needs root, Node.js 20+, Debian's Chromium, `tc` (tbf).
//!
//! `cargo test --test simulcast -- --nocapture`. The script's knobs pass
//! through the environment: `SB_SIMULCAST_ALL=1` goes on after an unmet
//! expectation (and still fails, naming the first) so one run shows every
//! figure; `SB_KEEP_LOGS=1` keeps the logs (the server's `RUST_LOG` passes
//! through) of a run that passed; `SB_PAGE_QUERY=simulcast=0` adds page URL parameters (a baseline
//! without simulcast); `SB_SCREENSHOT_DIR` keeps screenshots there;
//! `SB_CAMERA_FPS` sets the fake camera's frame rate (15 by default). The
//! logs of a failed run stay in `target/tmp/simulcast-call-*`.

#[path = "common/netns.rs"]
mod netns;

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use netns::{
    chromium_wrapper, ensure_playwright, read, require_chromium, try_sh, Net, Site, HTTP_PORT,
    NETWORK, SERVER_IP,
};

const PUB1: Site = Site {
    name: "pub1",
    subnet: 1,
};
const PUB2: Site = Site {
    name: "pub2",
    subnet: 2,
};
const SUB_A: Site = Site {
    name: "subA",
    subnet: 3,
};
const SUB_B: Site = Site {
    name: "subB",
    subnet: 4,
};
const SITES: &[Site] = &[PUB1, PUB2, SUB_A, SUB_B];

/// subB's downlink under the cap (`tc ... tbf` arguments).
const CAP: &[&str] = &[
    "tbf", "rate", "600kbit", "burst", "20kb", "latency", "200ms",
];
/// The script gives up by itself after 210 s; this is the backstop.
const SCRIPT_LIMIT: Duration = Duration::from_secs(225);

/// The fake camera: 1280x720, 30 frames (Chromium loops the file) at
/// `SB_CAMERA_FPS` frames a second, 15 by default: four Chromiums on two
/// vCPUs encoded a 30-fps camera at 10-13 frames a second, and the
/// starved browsers' late reads showed up as freezes and estimates that
/// fell on unshaped links (docs/benchmarks.md, "Simulcast").
const CAMERA_WIDTH: usize = 1280;
const CAMERA_HEIGHT: usize = 720;
const CAMERA_FRAMES: usize = 30;

/// Two publishers in simulcast, two viewers; subB's downlink is capped to
/// 600 kbit/s mid-call: subB gets the low layers of both publishers while
/// subA keeps the high ones, with no long freeze and little audio loss;
/// the cap lifts and subB climbs back to the high layers. Then
/// `track-settings`: a 180 px wish gets the lowest layer, and paused or
/// small tiles everywhere turn the publishers' unneeded encodings off.
#[test]
fn a_shaped_subscriber_gets_the_low_layer_and_climbs_back() {
    let _one = NETWORK.lock().unwrap_or_else(|e| e.into_inner());
    require_chromium();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let browser_dir = root.join("tests/browser");
    let logs = netns::logs_dir("simulcast", "call");
    ensure_playwright(&browser_dir, &logs);

    // Chromium's singleton socket lives under TMPDIR and must stay under the
    // 108-byte unix socket limit: a short directory in /tmp, removed on return.
    let tmp = tempfile::Builder::new()
        .prefix("sbs-")
        .tempdir_in("/tmp")
        .unwrap_or_else(|e| panic!("create a temp dir in /tmp: {e}"));
    let camera = tmp.path().join("camera.y4m");
    write_y4m(&camera, CAMERA_WIDTH, CAMERA_HEIGHT, CAMERA_FRAMES);

    let mut net = Net::new("sc", SITES);
    let srv = netns::start_server(&mut net, SERVER_IP, &[], &logs);
    let base = format!("http://{SERVER_IP}:{HTTP_PORT}");
    let mut envs: Vec<(String, OsString)> = vec![
        ("TMPDIR".into(), tmp.path().into()),
        (
            "SB_SCREENSHOT_DIR".into(),
            std::env::var_os("SB_SCREENSHOT_DIR").unwrap_or_else(|| logs.clone().into()),
        ),
    ];
    for site in SITES {
        let extra = if site.name.starts_with("pub") {
            vec![format!(
                "--use-file-for-fake-video-capture={}",
                camera.display()
            )]
        } else {
            Vec::new()
        };
        let wrapper = chromium_wrapper(tmp.path(), &net, *site, &base, &extra);
        envs.push((format!("SB_BROWSER_{}", site.name), wrapper.into()));
    }
    let envs: Vec<(&str, OsString)> = envs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();

    let script = browser_dir.join("simulcast_call.mjs");
    let node_log = logs.join("node");
    let (node, mut stdin, stdout) = net.spawn_piped(
        SUB_A.name,
        Path::new("node"),
        &[script.to_str().expect("utf-8 path"), &base],
        &envs,
        &node_log,
    );
    let lines = forward_lines(stdout, &node_log.with_extension("stdout"));

    // The script's requests, until it exits (or the server does, or time is up).
    let router = net.ns("r");
    let veth = net.router_veth(SUB_B);
    let mut tbf = serde_json::Value::Null;
    let deadline = Instant::now() + SCRIPT_LIMIT;
    let mut stdout_lines = Vec::new();
    let outcome = loop {
        if let Some(status) = net.exited(node) {
            break Ok(status.success());
        }
        if let Some(status) = net.exited(srv) {
            net.kill(node);
            break Err(format!("the server exited early with {status}"));
        }
        if Instant::now() > deadline {
            net.kill(node);
            break Err(format!(
                "simulcast_call.mjs did not finish within {SCRIPT_LIMIT:?}"
            ));
        }
        let Ok(line) = lines.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        if let Some(phase) = line.strip_prefix("PHASE ") {
            let answer = match control(phase.trim(), &router, &veth, &mut tbf) {
                Ok(()) => format!("ACK {}\n", phase.trim()),
                Err(why) => format!("NAK {} {}\n", phase.trim(), why.replace('\n', " ")),
            };
            eprintln!("[simulcast.rs] {}", answer.trim());
            // The script may have died meanwhile: its exit is seen above.
            let _ = stdin
                .write_all(answer.as_bytes())
                .and_then(|()| stdin.flush());
        }
        stdout_lines.push(line);
    };
    // Whatever the script printed last (its result), then everything down.
    net.kill(node);
    let drain_until = Instant::now() + Duration::from_secs(5);
    while let Some(left) = drain_until.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) => stdout_lines.push(line),
            Err(_) => break,
        }
    }
    let server_alive = net.exited(srv).is_none();
    drop(net); // kills everything, deletes the namespaces

    let report = format!(
        "tbf counters at the uncap: {tbf}\n--- node stdout ---\n{}\n--- node stderr ---\n{}\n--- server stderr (last 200 lines) ---\n{}\n\
         --- server stdout (last 50 lines) ---\n{}\n(logs in {})",
        stdout_lines.join("\n"),
        read(&node_log.with_extension("stderr")),
        tail(&read(&logs.join("server").with_extension("stderr")), 200),
        tail(&read(&logs.join("server").with_extension("stdout")), 50),
        logs.display()
    );
    let failure = stdout_lines
        .iter()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["ok"] == false)
        .map(|v| v["reason"].as_str().unwrap_or("?").to_owned());
    match outcome {
        Ok(true) => {}
        Ok(false) => panic!(
            "simulcast_call.mjs failed: {}\n{report}",
            failure.as_deref().unwrap_or("(no reason printed)")
        ),
        Err(why) => panic!("{why}\n{report}"),
    }
    assert!(server_alive, "the server died during the call\n{report}");
    let line = stdout_lines
        .iter()
        .find(|l| l.starts_with("{\"ok\":true"))
        .unwrap_or_else(|| panic!("node exited 0 without a success line\n{report}"));
    let mut value: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON ({e}): {line}"));
    value["tbf"] = tbf;
    println!("SIMULCAST {value}");
    if std::env::var_os("SB_SCREENSHOT_DIR").is_none() && std::env::var_os("SB_KEEP_LOGS").is_none()
    {
        let _ = fs::remove_dir_all(&logs); // keep the logs of failed runs only
    } else {
        println!("logs kept in {}", logs.display());
    }
}

/// Applies one phase the script asks for, on the router's veth to subB.
/// `uncap` notes the qdisc's counters in `tbf` before deleting it.
fn control(
    phase: &str,
    router: &str,
    veth: &str,
    tbf: &mut serde_json::Value,
) -> Result<(), String> {
    let tc = |args: &[&str]| -> Result<String, String> {
        let mut all = vec!["ip", "netns", "exec", router, "tc"];
        all.extend_from_slice(args);
        try_sh(&all)
    };
    match phase {
        "cap" => {
            let mut args = vec!["qdisc", "replace", "dev", veth, "root"];
            args.extend_from_slice(CAP);
            tc(&args)?;
            let shown = tc(&["qdisc", "show", "dev", veth])?;
            if !shown.contains("tbf") {
                return Err(format!("no tbf on {veth} after adding it: {shown}"));
            }
            Ok(())
        }
        "uncap" => {
            let stats = tc(&["-s", "qdisc", "show", "dev", veth])?;
            *tbf = tbf_counters(&stats);
            tc(&["qdisc", "del", "dev", veth, "root"])?;
            Ok(())
        }
        other => Err(format!("unknown phase {other:?}")),
    }
}

/// `Sent 123 bytes 4 pkt (dropped 5, overlimits 6 requeues 0)` of `tc -s
/// qdisc show` as JSON (with the text itself).
fn tbf_counters(stats: &str) -> serde_json::Value {
    let words: Vec<&str> = stats
        .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
        .filter(|w| !w.is_empty())
        .collect();
    let after = |key: &str| -> Option<u64> {
        let i = words.iter().position(|w| *w == key)?;
        words.get(i + 1)?.parse().ok()
    };
    let before = |key: &str| -> Option<u64> {
        let i = words.iter().position(|w| *w == key)?;
        words.get(i.checked_sub(1)?)?.parse().ok()
    };
    serde_json::json!({
        "sentBytes": after("Sent"),
        "sentPackets": before("pkt"),
        "dropped": after("dropped"),
        "overlimits": after("overlimits"),
        "text": stats.trim(),
    })
}

/// Copies the script's stdout lines to `log` and hands each to the caller.
/// The thread ends when the pipe closes (the script and its browsers gone).
fn forward_lines(stdout: std::process::ChildStdout, log: &Path) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let mut file = netns::create(log);
    std::thread::Builder::new()
        .name("node-stdout".into())
        .spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(file, "{line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        })
        .expect("spawn a reader thread");
    rx
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A y4m video Chromium can film (`--use-file-for-fake-video-capture`):
/// 4:2:0, `frames` frames at 30 fps of bars moving right over a gradient
/// drifting down, with a little noise everywhere, so that every frame
/// differs from the last and the encoder produces real bitrate.
fn write_y4m(path: &Path, width: usize, height: usize, frames: usize) {
    let fps: u32 = match std::env::var("SB_CAMERA_FPS") {
        Err(_) => 15,
        Ok(v) => v
            .parse()
            .ok()
            .filter(|f| (1..=60).contains(f))
            .unwrap_or_else(|| panic!("SB_CAMERA_FPS={v:?}: expected 1 to 60 frames a second")),
    };
    let file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut out = BufWriter::new(file);
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut noise = move || {
        // xorshift64: cheap, deterministic
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng & 15) as i32 - 8
    };
    let mut y = vec![0u8; width * height];
    let (cw, ch) = (width / 2, height / 2);
    let mut u = vec![0u8; cw * ch];
    let mut v = vec![0u8; cw * ch];
    let write = |out: &mut BufWriter<File>, bytes: &[u8]| {
        out.write_all(bytes)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    };
    write(
        &mut out,
        format!("YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n").as_bytes(),
    );
    for f in 0..frames {
        for row in 0..height {
            for col in 0..width {
                let gradient = ((row + f * 6) % 256) as i32 / 2 + (col % 256) as i32 / 4;
                let bar = if (col + f * 24) % 160 < 28 { 110 } else { 0 };
                y[row * width + col] = (30 + gradient + bar + noise()).clamp(16, 235) as u8;
            }
        }
        for row in 0..ch {
            for col in 0..cw {
                u[row * cw + col] = (96 + ((col + f * 4) % 64)) as u8;
                v[row * cw + col] = (96 + ((row + f * 3) % 64)) as u8;
            }
        }
        write(&mut out, b"FRAME\n");
        write(&mut out, &y);
        write(&mut out, &u);
        write(&mut out, &v);
    }
    out.flush()
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
