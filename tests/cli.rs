//! The `switchboard` binary as an operator runs it: help, environment and
//! config-file options, bad configuration, and signals.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_switchboard"))
}

/// Starts `serve` with `args` and `env`, returns the child and the URL it printed.
fn serve(args: &[&str], env: &[(&str, &str)]) -> (std::process::Child, String) {
    let mut cmd = bin();
    cmd.arg("serve")
        .args(["--rtc-port", "0"])
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn switchboard");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("read");
    let url = line
        .trim()
        .strip_prefix("switchboard listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (child, url)
}

fn wait_exit(child: &mut std::process::Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn sigterm(child: &std::process::Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
}

#[test]
fn help_explains_every_option() {
    let out = bin().args(["serve", "--help"]).output().expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--listen",
        "--config",
        "--tls-cert",
        "--tls-key",
        "--tls-self-signed",
        "--max-frame-bytes",
        "--rate-limit",
        "--rate-burst",
        "--max-rooms",
        "--max-participants",
        "--ws-ping-interval-ms",
        "--ws-timeout-ms",
        "--stun-urls",
        "--turn-urls",
        "--turn-secret",
        "--turn-ttl-secs",
        "--p2p-timeout-ms",
        "--p2p-return-ms",
        "--audio-mode",
        "--allowed-origins",
        "--shutdown-grace-ms",
        "--rtc-ip",
        "--rtc-port",
        "--public-ip",
        "--log-format",
    ] {
        assert!(help.contains(opt), "--help does not mention {opt}");
    }
    assert!(
        help.contains("SWITCHBOARD_LISTEN"),
        "env fallbacks are shown"
    );
    assert!(help.contains("127.0.0.1:8080"), "defaults are shown");
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let out = bin()
        .args(["serve", "--turn-urls", "turn:127.0.0.1:3478"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--turn-secret"), "{err}");

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "max_room = 3\n").expect("write");
    let out = bin()
        .args(["serve", "--config"])
        .arg(&file)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_room"), "the typo is named: {err}");
}

#[test]
fn environment_and_config_file_set_options() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("sb.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:1\"\n").expect("write");
    // The environment beats the file.
    let (mut child, url) = serve(
        &["--config", file.to_str().expect("utf-8 path")],
        &[("SWITCHBOARD_LISTEN", "127.0.0.1:0")],
    );
    assert!(
        url.starts_with("http://127.0.0.1:") && !url.ends_with(":1"),
        "{url}"
    );
    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(10)).expect("exits after SIGTERM");
    assert!(status.success());
}

#[test]
fn sigterm_stops_the_server_even_when_its_log_pipe_is_closed() {
    // `switchboard serve 2>&1 | head -2` and then a shutdown: logging into a
    // closed pipe must not take the signal handler down.
    let (mut child, _url) = serve(&["--listen", "127.0.0.1:0"], &[]);
    drop(child.stderr.take());
    sigterm(&child);
    match wait_exit(&mut child, Duration::from_secs(10)) {
        Some(status) => assert!(status.success(), "{status:?}"),
        None => {
            let _ = child.kill();
            panic!("still running 10 s after SIGTERM");
        }
    }
}

#[test]
fn first_sigterm_drains_second_sigterm_closes() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (mut child, url) = serve(
        &["--listen", "127.0.0.1:0", "--drain-timeout-ms", "600000"],
        &[],
    );
    let host = url.trim_start_matches("http://").to_owned();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{host}/ws"))
            .await
            .expect("connect");
        ws.send(Message::text(r#"{"type":"join","room":"r","name":"a"}"#))
            .await
            .expect("send");
        let joined = ws.next().await.expect("frame").expect("ok");
        assert!(joined.to_text().expect("text").contains("\"joined\""));

        sigterm(&child);
        // Draining: still serving the call, but not ready for new people.
        let readyz = || {
            let mut s = std::net::TcpStream::connect(&host).expect("connect");
            use std::io::{Read, Write};
            s.write_all(b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .expect("write");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        };
        let mut status = String::new();
        for _ in 0..50 {
            status = readyz();
            if status.starts_with("HTTP/1.1 503") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(status.starts_with("HTTP/1.1 503"), "{status}");
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "still running while the call goes on"
        );

        sigterm(&child);
        let closed = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("room-closed in time")
            .expect("frame")
            .expect("ok");
        assert!(
            closed.to_text().expect("text").contains("room-closed"),
            "{closed:?}"
        );
    });
    let status =
        wait_exit(&mut child, Duration::from_secs(10)).expect("exits after the second SIGTERM");
    assert!(status.success());
}
