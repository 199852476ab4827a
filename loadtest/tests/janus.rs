//! `loadtest janus` against the real Janus (Debian package `janus` 1.1.2,
//! installed by `.ci/run`), in a network namespace that
//! `loadtest/janus/run.sh` creates and deletes: a small VideoRoom load must
//! deliver packets with little loss; an unreachable Janus must give a clear
//! error and a non-zero exit. Needs root (`ip netns`).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const LOADTEST: &str = env!("CARGO_BIN_EXE_loadtest");

fn run_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("janus/run.sh")
}

/// Runs `cmd` in its own process group; after `limit` sends SIGTERM to the
/// group (run.sh's trap then kills Janus and deletes the namespace), then
/// SIGKILL. Returns the output and whether the limit was hit.
fn run_bounded(cmd: &mut Command, limit: Duration) -> (Output, bool) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    let (mut out, mut err) = (
        child.stdout.take().expect("piped"),
        child.stderr.take().expect("piped"),
    );
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let mut overran = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline && !overran {
            overran = true;
            let group = format!("-{}", child.id());
            let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
            std::thread::sleep(Duration::from_secs(5));
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    };
    (output, overran)
}

fn require_janus() {
    assert!(
        Path::new("/usr/bin/janus").is_file(),
        "Janus is not installed: `apt-get install -y janus` (Debian 12 package janus 1.1.2; \
         .ci/run installs it)"
    );
}

#[test]
fn a_small_videoroom_load_is_delivered() {
    require_janus();
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("janus.json");
    let mut cmd = Command::new(run_sh());
    cmd.env("JANUS_LOG", dir.path().join("janus.log")).args([
        LOADTEST,
        "janus",
        "--url",
        "ws://10.77.0.1:8188",
        "--audio",
        "--rooms",
        "1",
        "--participants",
        "3",
        "--warmup",
        "1s",
        "--duration",
        "5s",
        "--timeout",
        "60s",
        "--server-pid",
        "{janus}",
        "--json",
    ]);
    cmd.arg(&json);
    let (out, overran) = run_bounded(&mut cmd, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log = std::fs::read_to_string(dir.path().join("janus.log")).unwrap_or_default();
    assert!(
        !overran && out.status.success(),
        "loadtest janus failed ({}):\n{stdout}\n{stderr}\nJanus log:\n{log}",
        out.status
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("JSON report written"))
            .expect("JSON report parses");
    assert_eq!(report["participants"]["connected"], 3, "{stdout}");
    assert_eq!(report["server_version"], "1.1.2");
    // The media of `loadtest run`: the committed VP8 clip and the Opus tone.
    assert_eq!(
        report["media_source"]["video"]["clip"],
        "loadtest/media/clip.ivf"
    );
    assert!(report["media_source"]["audio"].is_object());
    assert_eq!(report["bad_payloads"], serde_json::json!({}), "{stdout}");
    let media = report["media"].as_array().expect("media");
    assert_eq!(media.len(), 2, "audio and video");
    for m in media {
        let (expected, received) = (
            m["expected"].as_u64().expect("expected"),
            m["received"].as_u64().expect("received"),
        );
        assert!(received > 0, "{}: nothing received\n{stdout}", m["kind"]);
        // Three participants: every packet sent goes to two subscribers.
        assert_eq!(expected, 2 * m["sent"].as_u64().expect("sent"));
        let loss = 100.0 * expected.saturating_sub(received) as f64 / expected as f64;
        assert!(loss < 5.0, "{}: {loss:.2} % lost\n{stdout}", m["kind"]);
        assert!(m["latency"]["count"].as_u64() > Some(0));
        assert!(m["jitter_ms_mean"].is_number(), "{m}");
    }
    let server = &report["server"];
    assert_eq!(server["name"], "janus");
    assert!(server["forwarded"].as_u64() > Some(0));
    assert!(server["cpu_window_s"].is_number() && server["rss_steady_bytes"].is_number());
    assert!(stdout.contains("CPU per packet"), "{stdout}");
}

#[test]
fn a_small_audiobridge_load_gets_the_mix_back() {
    require_janus();
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("mix.json");
    let mut cmd = Command::new(run_sh());
    cmd.env("JANUS_LOG", dir.path().join("janus.log")).args([
        LOADTEST,
        "janus",
        "--audio-mode",
        "mix",
        "--audio",
        "--video-kbps",
        "0",
        "--rooms",
        "1",
        "--participants",
        "3",
        "--warmup",
        "1s",
        "--duration",
        "3s",
        "--timeout",
        "60s",
        "--server-pid",
        "{janus}",
        "--json",
    ]);
    cmd.arg(&json);
    let (out, overran) = run_bounded(&mut cmd, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log = std::fs::read_to_string(dir.path().join("janus.log")).unwrap_or_default();
    assert!(
        !overran && out.status.success(),
        "loadtest janus --audio-mode mix failed ({}):\n{stdout}\n{stderr}\nJanus log:\n{log}",
        out.status
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("JSON report written"))
            .expect("JSON report parses");
    assert_eq!(report["participants"]["connected"], 3, "{stdout}");
    let media = report["media"].as_array().expect("media");
    assert_eq!(media.len(), 1, "one mixed audio stream");
    assert_eq!(media[0]["kind"], "audio-mixed");
    // One mixed stream per participant, every 20 ms of the window.
    assert_eq!(media[0]["tracks"], 3);
    let (expected, received) = (
        media[0]["expected"].as_u64().expect("expected"),
        media[0]["received"].as_u64().expect("received"),
    );
    assert!(received > 0, "no mix received\n{stdout}");
    let loss = 100.0 * expected.saturating_sub(received) as f64 / expected as f64;
    assert!(loss < 5.0, "{loss:.2} % of the mix lost\n{stdout}");
    assert!(media[0]["jitter_ms_mean"].is_number(), "{}", media[0]);
    for sub in report["subscribers"].as_array().expect("subscribers") {
        assert!(sub["received"].as_u64() > Some(0), "{sub}");
    }
}

#[test]
fn an_unreachable_janus_is_a_clear_error() {
    // A port with nothing listening: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("ws://127.0.0.1:{port}");
    let mut cmd = Command::new(LOADTEST);
    cmd.args([
        "janus",
        "--url",
        &url,
        "--rooms",
        "1",
        "--participants",
        "2",
    ]);
    let (out, overran) = run_bounded(&mut cmd, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!overran, "did not give up by itself: {stderr}");
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot connect to Janus at {url}")),
        "{stderr}"
    );
}

#[test]
fn compare_without_a_switchboard_binary_is_a_clear_error() {
    let mut cmd = Command::new(LOADTEST);
    cmd.args([
        "compare",
        "--switchboard",
        "/nonexistent/switchboard",
        "--out-dir",
    ]);
    let dir = tempfile::tempdir().expect("temp dir");
    cmd.arg(dir.path());
    let (out, overran) = run_bounded(&mut cmd, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!overran, "did not give up by itself: {stderr}");
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("switchboard not found at /nonexistent/switchboard"),
        "{stderr}"
    );
}
