//! `loadtest soak` as a user runs it, short (CI): the real `switchboard`
//! binary on 127.0.0.1, participants joining at 2/s with VP8 and Opus,
//! staying 4 s ± 50 %, for 20 s. After everyone left, the server holds
//! nothing: no participants, rooms, media or signaling connections, parked
//! participants, extra tasks, file descriptors, threads or metric series; it did
//! not panic; and the visits themselves worked (every join admitted and
//! connected, nobody cut off, media received). RSS is printed (the
//! allocator keeps what it grew to), not asserted.
//!
//! The server binary is the one cargo builds next to `loadtest` (see
//! tests/run.rs).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::Value;

#[test]
fn after_a_churn_with_media_the_server_is_back_to_its_baseline() {
    let bin = Path::new(env!("CARGO_BIN_EXE_loadtest")).with_file_name("switchboard");
    assert!(
        bin.exists(),
        "{} is missing: `cargo build -p switchboard` (`cargo test --workspace` does)",
        bin.display()
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let server_err = dir.path().join("server.stderr");
    let mut server = Command::new(&bin)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--rtc-ip",
            "127.0.0.1",
            "--rtc-port",
            "0",
        ])
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&server_err).expect("stderr file"))
        .spawn()
        .expect("spawn switchboard");
    let mut reader = BufReader::new(server.stdout.take().expect("stdout"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("read");
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    let http = line
        .trim()
        .strip_prefix("switchboard listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    let url = format!("{}/ws", http.replacen("http://", "ws://", 1));
    let json = dir.path().join("soak.json");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args([
            "soak",
            "--url",
            &url,
            "--server-pid",
            &server.id().to_string(),
        ])
        .args([
            "--duration",
            "20s",
            "--churn",
            "2",
            "--stay",
            "4s",
            "--settle",
            "3s",
        ])
        .args(["--sample-every", "2s", "--video-kbps", "200", "--json"])
        .arg(&json)
        .output()
        .expect("run loadtest soak");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    println!("{stdout}");
    println!("(soak took {:.1} s)", started.elapsed().as_secs_f64());
    let alive = matches!(server.try_wait(), Ok(None));
    let _ = server.kill();
    let _ = server.wait();
    let server_log = std::fs::read_to_string(&server_err).unwrap_or_default();
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(alive, "the server exited\n{server_log}");
    assert!(
        !server_log.contains("panicked"),
        "the server panicked:\n{server_log}"
    );

    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json written"))
        .expect("valid JSON");
    let v = &r["visits"];
    let n = |x: &Value| x.as_f64().unwrap_or_else(|| panic!("not a number: {x}"));
    // 20 s at 2/s: about 40 visits (a join waits when every room is full).
    assert!(n(&v["joined"]) >= 30.0, "{v}");
    assert_eq!(n(&v["join_failures"]), 0.0, "{v}");
    assert_eq!(n(&v["closed_early"]), 0.0, "{v}");
    assert!(n(&v["packets_received"]) > 0.0, "{v}");
    assert!(v["errors"].as_object().is_some_and(|e| e.is_empty()), "{v}");
    // It was busy: several at once.
    assert!(n(&r["peak_participants"]) >= 3.0, "{r}");
    // And then gave everything back.
    let (base, end) = (&r["baseline"], &r["end"]);
    for gauge in [
        "switchboard_participants",
        "switchboard_rooms",
        "switchboard_media_connections",
        "switchboard_signaling_connections",
        "switchboard_parked_participants",
    ] {
        assert_eq!(base["gauges"][gauge], 0.0, "{gauge} at the start: {base}");
        assert_eq!(
            end["gauges"][gauge], 0.0,
            "{gauge} after everyone left: {end}"
        );
    }
    let tasks = "switchboard_runtime_alive_tasks";
    assert_eq!(
        end["gauges"][tasks], base["gauges"][tasks],
        "{tasks}: baseline {base} end {end}"
    );
    for figure in ["open_fds", "threads", "series"] {
        assert_eq!(
            end[figure], base[figure],
            "{figure}: baseline {base} end {end}"
        );
    }
}
