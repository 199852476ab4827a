//! Classic Socket.IO clients that cannot reach each other still talk,
//! through the server (`--socketio-relay always`). Two Python classic
//! clients (python-socketio + aiortc, `tests/socketio/classic_peer.py`,
//! written against the classic events only) each sit in a network
//! namespace of their own, both plugged into the server's namespace
//! through an isolated bridge port: each reaches the server, neither the
//! other (proved first: a listener in one client's namespace is reached from the server's, not from the other client's). Each must receive the other's tone (in
//! the server's mix, without its own) and video frames (the other is the
//! active speaker).
//!
//! Needs root (`ip netns`), `bridge` from iproute2, python3 with aiortc and
//! python-socketio (`tests/aiortc/requirements.txt`; `.ci/run` installs it).

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::rand_id;
use serde_json::Value;

const SERVER_IP: &str = "10.91.0.1";
const PORT: u16 = 8080;
const RTC_PORT: u16 = 7882;

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The server's namespace with a bridge, and one namespace per client on
/// an isolated port of it. Deleted (with everything in it) when dropped.
struct Net {
    server: String,
    clients: Vec<(String, String)>,
}

impl Net {
    fn new(clients: usize) -> Net {
        let tag = rand_id();
        let tag = &tag[..6.min(tag.len())];
        let server = format!("sbr{tag}");
        ip(&["netns", "add", &server]);
        let mut net = Net {
            server: server.clone(),
            clients: Vec::new(),
        };
        ip(&["-n", &server, "link", "set", "lo", "up"]);
        ip(&["-n", &server, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            &server,
            "addr",
            "add",
            &format!("{SERVER_IP}/24"),
            "dev",
            "br0",
        ]);
        ip(&["-n", &server, "link", "set", "br0", "up"]);
        for i in 0..clients {
            let ns = format!("sbc{tag}{i}");
            let addr = format!("10.91.0.{}", 10 + i);
            ip(&["netns", "add", &ns]);
            net.clients.push((ns.clone(), addr.clone()));
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            let (outer, inner) = (format!("sbp{i}"), "eth0");
            ip(&[
                "-n", &server, "link", "add", &outer, "type", "veth", "peer", "name", inner,
                "netns", &ns,
            ]);
            ip(&["-n", &server, "link", "set", &outer, "master", "br0"]);
            ip(&["-n", &server, "link", "set", &outer, "up"]);
            // An isolated port talks to the bridge (the server), never to
            // another isolated port (the other client).
            let out = Command::new("ip")
                .args([
                    "netns", "exec", &server, "bridge", "link", "set", "dev", &outer, "isolated",
                    "on",
                ])
                .output()
                .expect("bridge");
            assert!(
                out.status.success(),
                "bridge link set isolated: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                inner,
            ]);
            ip(&["-n", &ns, "link", "set", inner, "up"]);
        }
        net
    }

    /// Whether a TCP connection from namespace `ns` to `to:port` opens
    /// within a second.
    fn connects(&self, ns: &str, to: &str, port: u16) -> bool {
        let probe = format!(
            "import socket,sys\ntry:\n socket.create_connection(('{to}',{port}),timeout=1)\nexcept OSError:\n sys.exit(1)"
        );
        Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", &probe])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let all = std::iter::once(&self.server).chain(self.clients.iter().map(|(ns, _)| ns));
        for ns in all {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

fn require_python_socketio() {
    let out = Command::new("python3")
        .args(["-c", "import aiortc, socketio, aiohttp"])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "needs aiortc and python-socketio: pip install -r tests/aiortc/requirements.txt \
         (.ci/run installs it)\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits (bounded) until the server answers on its HTTP port.
fn wait_ready(ns: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let ok = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "python3",
                "-c",
                &format!(
                    "import urllib.request; urllib.request.urlopen('http://{SERVER_IP}:{PORT}/readyz', timeout=1)"
                ),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("the server in {ns} did not get ready");
}

#[test]
fn relayed_classic_clients_that_cannot_reach_each_other_still_hear_and_see_each_other() {
    require_python_socketio();
    let net = Net::new(2);
    let (a_ns, a_ip) = net.clients[0].clone();
    let (b_ns, b_ip) = net.clients[1].clone();
    let bin = env!("CARGO_BIN_EXE_switchboard");
    let logs = std::env::temp_dir().join(format!("sb-relay-{}", rand_id()));
    std::fs::create_dir_all(&logs).expect("log dir");
    let log = std::fs::File::create(logs.join("server.log")).expect("log");
    let mut server = Command::new("ip")
        .args(["netns", "exec", &net.server, bin, "serve"])
        .args(["--listen", &format!("{SERVER_IP}:{PORT}")])
        .args(["--rtc-ip", SERVER_IP, "--rtc-port", &RTC_PORT.to_string()])
        .args(["--no-auth", "--socketio-relay", "always", "--log", "info"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the server");
    wait_ready(&net.server);
    // The P2P path is blocked, the server reachable from both: a listener
    // in bob's namespace is reached from the server's, not from alice's.
    assert!(
        net.connects(&a_ns, SERVER_IP, PORT),
        "alice reaches the server"
    );
    assert!(
        net.connects(&b_ns, SERVER_IP, PORT),
        "bob reaches the server"
    );
    let mut listener = Command::new("ip")
        .args(["netns", "exec", &b_ns, "python3", "-c"])
        .arg(format!(
            "import socket,time\ns=socket.socket()\ns.bind(('{b_ip}',9999))\ns.listen(8)\ntime.sleep(60)"
        ))
        .spawn()
        .expect("listener");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !net.connects(&net.server, &b_ip, 9999) {
        assert!(
            Instant::now() < deadline,
            "the listener in bob's namespace is up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!net.connects(&a_ns, &b_ip, 9999), "alice cannot reach bob");
    let _ = listener.kill();
    let _ = listener.wait();

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/socketio/classic_peer.py");
    let url = format!("http://{SERVER_IP}:{PORT}");
    let spawn = |ns: &str, addr: &str, freq: &str| {
        Command::new("ip")
            .args(["netns", "exec", ns, "python3"])
            .arg(&script)
            .args(["--url", &url, "--room", "blocked", "--ip", addr])
            .args(["--freq", freq, "--probe", "440,660", "--seconds", "6"])
            .args(["--timeout", "45"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start classic_peer.py")
    };
    let alice = spawn(&a_ns, &a_ip, "440");
    let bob = spawn(&b_ns, &b_ip, "660");
    let finish = |child: std::process::Child, who: &str| -> Value {
        let out: Output = child.wait_with_output().expect("classic_peer.py");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().last().unwrap_or("");
        serde_json::from_str(line).unwrap_or_else(|e| {
            panic!(
                "{who}: no result ({e}); stdout {stdout}\nstderr {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    let a = finish(alice, "alice");
    let b = finish(bob, "bob");
    let _ = server.kill();
    let _ = server.wait();
    println!("alice: {a}\nbob: {b}");
    for (who, r, own, other) in [("alice", &a, "440", "660"), ("bob", &b, "660", "440")] {
        let events: Vec<&str> = r["events"]
            .as_array()
            .map(|e| e.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        // Classic events only, in the classic order: joined, then the
        // server as the peer to offer to.
        let joined = events.iter().position(|e| e.starts_with("joined"));
        let sfu = events.iter().position(|e| *e == "otherjoin:sfu");
        assert!(
            joined.is_some() && sfu > joined,
            "{who}: joined, then otherjoin(room, \"sfu\"): {events:?}"
        );
        assert_eq!(r["connected"], true, "{who}: connected to the server: {r}");
        let video = r["video_frames"].as_u64().unwrap_or(0);
        let audio = r["audio_frames"].as_u64().unwrap_or(0);
        assert!(
            video >= 30,
            "{who}: the other's video arrives ({video} frames)"
        );
        assert!(audio >= 100, "{who}: the mix arrives ({audio} frames)");
        let level = |f: &str| r["levels"][f].as_f64().unwrap_or(-200.0);
        assert!(
            level(other) >= level(own) + 20.0,
            "{who} hears the other's {other} Hz tone ({:.1} dB) and not its own {own} Hz ({:.1} dB)",
            level(other),
            level(own)
        );
    }
    let _ = std::fs::remove_dir_all(&logs);
}
