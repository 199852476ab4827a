//! P2P first, automatic fallback to the server, upgrade when a third joins —
//! on a real network of namespaces: real server binary, real Chromium (one
//! per participant, each in its own namespace), our Rust client.
//!
//! Topology, built fresh per test and always removed ([`Net`]'s Drop):
//!
//! ```text
//!   server ns 10.77.0.2 (HTTP :8080, media --rtc-ip; 10.77.0.3 for media in `unreachable`)
//!        |
//!   router ns  .0.1 | .1.1 | .2.1 | .3.1   (ip_forward; `ip rule … prohibit` per test)
//!        |          |      |
//!   alice 10.77.1.2  bob 10.77.2.2  carol 10.77.3.2
//! ```
//!
//! Chromium runs in each participant's namespace through a wrapper script
//! (`ip netns exec <ns> chromium "$@"`) that one node process (in alice's
//! namespace) launches; pages load from `http://10.77.0.2:8080`. There is no
//! STUN or TURN: the only ICE candidates are the namespace host addresses.
//! Timings are printed (`FIGURES ...`), never asserted.
//!
//! Needs root, Node.js 20+, Debian's Chromium (as tests/browser.rs).

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::ffi::OsString;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use netns::{
    chromium_wrapper, ensure_playwright, read, require_chromium, sh, Net, Site, HTTP_PORT, NETWORK,
    SERVER_IP,
};

/// The server's second address, for media only in the `unreachable` case.
const MEDIA_ONLY_IP: &str = "10.77.0.3";

const ALICE: Site = Site {
    name: "alice",
    subnet: 1,
};
const BOB: Site = Site {
    name: "bob",
    subnet: 2,
};
const CAROL: Site = Site {
    name: "carol",
    subnet: 3,
};

/// Router, server (with its second address) and one namespace per site.
fn new_net(sites: &[Site]) -> Net {
    let net = Net::new("fb", sites);
    net.add_server_address(MEDIA_ONLY_IP);
    net
}

fn logs_dir(what: &str) -> PathBuf {
    netns::logs_dir("fallback", what)
}

/// What one scenario's network and server look like.
struct Setup {
    sites: &'static [Site],
    isolate: bool,
    /// The server's media address is unreachable from every site.
    media_unreachable: bool,
    /// More `switchboard serve` options.
    server_args: &'static [&'static str],
    /// Percent of alice's UDP datagrams the router drops, each direction on
    /// its own, once her call is up (`SB_LOSS_*` for the `lossy` scenario,
    /// which sets the rules in the router namespace then).
    alice_loss: Option<u8>,
}

/// Starts the server in the server namespace, returns its child index.
fn start_server(net: &mut Net, setup: &Setup, logs: &Path) -> usize {
    let rtc_ip = if setup.media_unreachable {
        MEDIA_ONLY_IP
    } else {
        SERVER_IP
    };
    netns::start_server(net, rtc_ip, setup.server_args, logs)
}

/// Builds the network of `setup`, starts the server and runs
/// `node tests/browser/fallback.mjs <scenario>` with one Chromium per site
/// in the site's namespace. Returns the script's `{"ok":true,...}` JSON.
fn run_browsers(scenario: &str, setup: &Setup, standby: bool) -> serde_json::Value {
    let _one = NETWORK.lock().unwrap_or_else(|e| e.into_inner());
    require_chromium();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let browser_dir = root.join("tests/browser");
    let logs = logs_dir(scenario);
    ensure_playwright(&browser_dir, &logs);

    let mut net = new_net(setup.sites);
    if setup.isolate {
        net.isolate(ALICE, BOB);
    }
    if setup.media_unreachable {
        net.block_to(MEDIA_ONLY_IP);
    }
    let srv = start_server(&mut net, setup, &logs);

    // Chromium's singleton socket lives under TMPDIR and must stay under the
    // 108-byte unix socket limit: a short directory in /tmp, removed on return.
    let tmp = tempfile::Builder::new()
        .prefix("sbf-")
        .tempdir_in("/tmp")
        .unwrap_or_else(|e| panic!("create a temp dir in /tmp: {e}"));
    let mut envs: Vec<(&str, OsString)> = vec![
        ("TMPDIR", tmp.path().into()),
        ("SB_STANDBY", if standby { "1" } else { "0" }.into()),
        (
            "SB_SCREENSHOT_DIR",
            std::env::var_os("SB_SCREENSHOT_DIR").unwrap_or_else(|| logs.clone().into()),
        ),
    ];
    if let Some(percent) = setup.alice_loss {
        envs.push(("SB_LOSS_PERCENT", percent.to_string().into()));
        envs.push(("SB_LOSS_ROUTER", net.ns("r").into()));
        envs.push(("SB_LOSS_NET", ALICE.net().into()));
    }
    let base = format!("http://{SERVER_IP}:{HTTP_PORT}");
    let keys = setup
        .sites
        .iter()
        .map(|s| format!("SB_BROWSER_{}", s.name))
        .collect::<Vec<_>>();
    for (site, key) in setup.sites.iter().zip(&keys) {
        let wrapper = chromium_wrapper(tmp.path(), &net, *site, &base, &[]);
        envs.push((key.as_str(), wrapper.into()));
    }
    let script = browser_dir.join("fallback.mjs");
    let node_log = logs.join("node");
    let node = net.spawn(
        ALICE.name,
        Path::new("node"),
        &[script.to_str().expect("utf-8 path"), scenario, &base],
        &envs,
        &node_log,
    );
    // fallback.mjs gives up on its own after 150 s.
    let outcome = net.wait(node, srv, Duration::from_secs(180));
    let server_alive = net.exited(srv).is_none();
    drop(net); // kills everything, deletes the namespaces
    let stdout = read(&node_log.with_extension("stdout"));
    let report = format!(
        "--- node stdout ---\n{stdout}\n--- node stderr ---\n{}\n--- server stderr ---\n{}\n\
         --- server stdout ---\n{}\n(logs in {})",
        read(&node_log.with_extension("stderr")),
        read(&logs.join("server").with_extension("stderr")),
        read(&logs.join("server").with_extension("stdout")),
        logs.display()
    );
    match outcome {
        Ok(true) => {}
        Ok(false) => panic!("the browser scenario {scenario} failed\n{report}"),
        Err(why) => panic!("{why}\n{report}"),
    }
    assert!(server_alive, "the server died during the call\n{report}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("{\"ok\":true"))
        .unwrap_or_else(|| panic!("node exited 0 without a success line\n{report}"));
    let value: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON ({e}): {line}"));
    if std::env::var_os("SB_SCREENSHOT_DIR").is_none() && std::env::var_os("SB_KEEP_LOGS").is_none()
    {
        let _ = fs::remove_dir_all(&logs); // keep the logs of failed runs only
    }
    println!("FIGURES {scenario} standby={standby}: {value}");
    value
}

const TWO: &[Site] = &[ALICE, BOB];

/// Alice and Bob reach each other: the call stays P2P, both decode video,
/// the warm standby says the server is reachable, and the server forwards
/// not one media packet.
#[test]
fn same_lan_stays_p2p_and_the_server_forwards_nothing() {
    let r = run_browsers(
        "lan",
        &Setup {
            sites: TWO,
            isolate: false,
            media_unreachable: false,
            server_args: &[],
            alice_loss: None,
        },
        true,
    );
    assert_eq!(r["serverForwardedPackets"], 0, "{r}");
    for name in ["alice", "bob"] {
        assert!(r["pages"][name]["framesP2p"].as_u64() > Some(30), "{r}");
    }
}

/// Alice and Bob reach the server but not each other: P2P fails within the
/// deadline, and both decode each other's video through the server. Once
/// with the warm standby (default) and once without.
#[test]
fn isolated_peers_fall_back_to_the_server() {
    for standby in standby_variants() {
        let r = run_browsers(
            "isolated",
            &Setup {
                sites: TWO,
                isolate: true,
                media_unreachable: false,
                server_args: &[],
                alice_loss: None,
            },
            standby,
        );
        assert!(r["serverForwardedPackets"].as_u64() > Some(0), "{r}");
        for name in ["alice", "bob"] {
            assert!(r["pages"][name]["framesSfu"].as_u64() > Some(0), "{r}");
        }
    }
}

/// A P2P call, then Carol joins: everyone moves to the server and all three
/// decode both others' video. With and without the warm standby.
#[test]
fn third_participant_moves_everyone_to_the_server() {
    for standby in standby_variants() {
        let r = run_browsers(
            "third",
            &Setup {
                sites: &[ALICE, BOB, CAROL],
                isolate: false,
                media_unreachable: false,
                server_args: &[],
                alice_loss: None,
            },
            standby,
        );
        for name in ["alice", "bob", "carol"] {
            let frames = r["pages"][name]["framesSfu"]
                .as_object()
                .unwrap_or_else(|| panic!("no framesSfu for {name}: {r}"));
            assert_eq!(frames.len(), 2, "{name} decodes two remotes: {r}");
            assert!(frames.values().all(|f| f.as_u64() > Some(0)), "{r}");
        }
    }
}

/// With and without the warm standby, each `SB_FALLBACK_RUNS` times (default
/// once): more runs only give more figures to report.
fn standby_variants() -> Vec<bool> {
    let runs = std::env::var("SB_FALLBACK_RUNS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, 10);
    [true, false]
        .into_iter()
        .flat_map(|s| std::iter::repeat_n(s, runs))
        .collect()
}

/// With `--p2p-return-ms`: a P2P call, Carol joins (everyone via the
/// server), Carol leaves, and the room returns to p2p: Alice and Bob decode
/// each other's video directly again.
#[test]
fn room_back_to_two_returns_to_p2p_with_the_option() {
    let r = run_browsers(
        "return",
        &Setup {
            sites: &[ALICE, BOB, CAROL],
            isolate: false,
            media_unreachable: false,
            server_args: &["--p2p-return-ms", "1000"],
            alice_loss: None,
        },
        true,
    );
    for name in ["alice", "bob"] {
        assert!(
            r["pages"][name]["backToP2p"]["framesP2p"].as_u64() > Some(0),
            "{r}"
        );
    }
}

/// Alice and Bob reach each other but not the server's media port: the P2P
/// call works, and both pages show a warning instead of breaking silently
/// later.
#[test]
fn unreachable_server_media_port_is_a_visible_warning() {
    let r = run_browsers(
        "unreachable",
        &Setup {
            sites: TWO,
            isolate: false,
            media_unreachable: true,
            server_args: &[],
            alice_loss: None,
        },
        true,
    );
    for name in ["alice", "bob"] {
        assert_eq!(r["pages"][name]["serverReach"], "unreachable", "{r}");
        assert!(r["pages"][name]["warning"].is_string(), "{r}");
    }
}

/// Loss on alice's link (the router drops 5 %, then 10 % of her UDP
/// datagrams at random, each direction on its own, once the call is up), alice and bob in a room made `mode=sfu`: on a clean link and with
/// loss, both pages keep decoding the other's video
/// in every 2 s slice (downlink loss at alice repaired by the server's
/// retransmissions, uplink loss by its NACKs to her). Lossy runs must show
/// NACKs both ways at the server and retransmissions (RTX) received by the
/// pages; frames/s and the longest freeze are
/// printed (`LOSSY ...`), not asserted. (No delay or jitter: the kernel
/// here has no `sch_netem`.)
#[test]
fn video_keeps_decoding_through_loss() {
    for (label, loss) in [
        ("clean", None),
        ("5% loss", Some(5)),
        ("10% loss", Some(10)),
    ] {
        let r = run_browsers(
            "lossy",
            &Setup {
                sites: TWO,
                isolate: false,
                media_unreachable: false,
                server_args: &[],
                alice_loss: loss,
            },
            false,
        );
        println!(
            "LOSSY {label}: alice {} bob {} NACKed packets from subscribers {} to publishers {} PLIs {}",
            r["pages"]["alice"], r["pages"]["bob"], r["nackedPacketsReceived"], r["nackedPacketsSent"], r["plisSent"]
        );
        if loss.is_some() {
            assert!(
                r["nackedPacketsReceived"].as_f64() > Some(0.0),
                "alice's downlink loss was never NACKed: {r}"
            );
            assert!(
                r["nackedPacketsSent"].as_f64() > Some(0.0),
                "alice's uplink loss was never NACKed upstream: {r}"
            );
            // Repaired by retransmissions the pages received as such (RTX,
            // which Chromium negotiates with the server).
            let rtx: f64 = ["alice", "bob"]
                .iter()
                .filter_map(|n| r["pages"][n]["repair"]["retransmittedPacketsReceived"].as_f64())
                .sum();
            assert!(rtx > 0.0, "no retransmission reached a page: {r}");
        }
    }
}

// ---------------------------------------------------------------- our Rust client

/// Packets of the other a Rust client waits for.
const RUST_PACKETS: u64 = 50;

/// What one Rust client is told.
struct RustClientPlan {
    url: String,
    room: String,
    name: &'static str,
    other: &'static str,
    ip: std::net::IpAddr,
    /// The other's packets must come through the server (else directly).
    via_server: bool,
}

/// Runs Alice and Bob with our Rust client, each on a thread of its own
/// that has entered its site's network namespace (`setns`) before opening
/// any socket, and returns each one's result JSON. `isolate`: they cannot
/// reach each other and each waits for the other's packets through the
/// server; else over the direct connection.
fn run_rust_clients(isolate: bool) -> Vec<(&'static str, serde_json::Value)> {
    let _one = NETWORK.lock().unwrap_or_else(|e| e.into_inner());
    let logs = logs_dir("rust");
    let setup = Setup {
        sites: TWO,
        isolate,
        media_unreachable: false,
        server_args: &[],
        alice_loss: None,
    };
    let mut net = new_net(setup.sites);
    if isolate {
        net.isolate(ALICE, BOB);
    }
    let srv = start_server(&mut net, &setup, &logs);
    let room = format!("rust-{}", std::process::id());
    let mut threads = Vec::new();
    for (site, other) in [(ALICE, BOB), (BOB, ALICE)] {
        let ns = PathBuf::from("/run/netns").join(net.ns(site.name));
        let plan = RustClientPlan {
            url: format!("ws://{SERVER_IP}:{HTTP_PORT}/ws"),
            room: room.clone(),
            name: site.name,
            other: other.name,
            ip: format!("10.77.{}.2", site.subnet)
                .parse()
                .expect("an IP address"),
            via_server: isolate,
        };
        let thread = std::thread::Builder::new()
            .name(format!("client-{}", site.name))
            .spawn(move || -> Result<serde_json::Value, String> {
                // Only this thread moves: every socket the client opens from
                // here on (its runtime is this thread) is in the namespace.
                let handle = File::open(&ns).map_err(|e| format!("open {}: {e}", ns.display()))?;
                nix::sched::setns(&handle, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("setns {}: {e}", ns.display()))?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("a tokio runtime: {e}"))?;
                runtime.block_on(rust_client(plan))
            })
            .expect("spawn a client thread");
        threads.push((site.name, thread));
    }
    let mut results = Vec::new();
    let mut failures = Vec::new();
    for (name, thread) in threads {
        // The client gives up on its own after 45 s.
        match thread.join() {
            Ok(Ok(r)) => results.push((name, r)),
            Ok(Err(e)) => failures.push(format!("{name}: {e}")),
            Err(panic) => failures.push(format!(
                "{name} panicked: {}",
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("?")
            )),
        }
    }
    let server_alive = net.exited(srv).is_none();
    drop(net);
    assert!(
        failures.is_empty() && server_alive,
        "{} (server alive: {server_alive})\n--- server ---\n{}\n{}\n(logs in {})",
        failures.join("\n"),
        read(&logs.join("server").with_extension("stdout")),
        read(&logs.join("server").with_extension("stderr")),
        logs.display()
    );
    let _ = fs::remove_dir_all(&logs);
    results
}

/// The same with Chromium pages: alice's address changes mid-call in an SFU
/// room; her page notices the broken path, checks its signaling socket
/// (dead with the old address: dropped and resumed), restarts ICE with new
/// credentials and candidates, and both pages decode each other again, alice
/// keeping her id. Prints the time from the change to each decoding again.
#[test]
fn a_pages_call_survives_its_address_change() {
    let r = run_browsers(
        "addrchange",
        &Setup {
            sites: TWO,
            isolate: true,
            media_unreachable: false,
            server_args: &[],
            alice_loss: None,
        },
        false,
    );
    println!("ADDRESS CHANGE page: {}", r["pages"]);
}

/// Alice's address changes mid-call (Wi-Fi to LTE: a new address on her
/// interface, the old one removed) while she and Bob, Rust clients, talk
/// through the server. Her client's socket is bound to the port alone
/// (`bind_any`), so her datagrams leave from the new address; the server
/// must follow after her next authenticated connectivity check: Bob hears
/// her again, and she hears Bob again. Prints the time from the change to
/// the first packet each way.
#[test]
fn a_rust_clients_call_survives_its_address_change() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, OnceLock};
    use switchboard_client::{Client, Event, JoinOptions, Kind};

    let _one = NETWORK.lock().unwrap_or_else(|e| e.into_inner());
    let logs = logs_dir("addr");
    let setup = Setup {
        sites: TWO,
        isolate: true,
        media_unreachable: false,
        server_args: &[],
        alice_loss: None,
    };
    let mut net = new_net(setup.sites);
    net.isolate(ALICE, BOB);
    let srv = start_server(&mut net, &setup, &logs);
    let alice_ns = net.ns(ALICE.name);
    for key in ["all", "eth0"] {
        sh(&[
            "ip",
            "netns",
            "exec",
            &alice_ns,
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{key}.promote_secondaries=1"),
        ]);
    }
    // Clients that heard the other before the change.
    let ready = Arc::new(AtomicUsize::new(0));
    let changed: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    // Clients with their packets after the change: each keeps sending until
    // both have theirs.
    let done = Arc::new(AtomicUsize::new(0));
    let room = format!("addr-{}", std::process::id());
    let mut threads = Vec::new();
    for (site, other) in [(ALICE, BOB), (BOB, ALICE)] {
        let ns = PathBuf::from("/run/netns").join(net.ns(site.name));
        let (ready, changed, room, done) =
            (ready.clone(), changed.clone(), room.clone(), done.clone());
        threads.push(std::thread::spawn(move || -> Result<u64, String> {
            let handle = File::open(&ns).map_err(|e| format!("open {}: {e}", ns.display()))?;
            nix::sched::setns(&handle, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns: {e}"))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let url = format!("ws://{SERVER_IP}:{HTTP_PORT}/ws");
                let mut opts = JoinOptions::sfu(&url, &room, site.name);
                opts.bind_ip = format!("10.77.{}.2", site.subnet).parse().expect("ip");
                opts.bind_any = true;
                let started = Instant::now();
                let mut client = loop {
                    match Client::join(opts.clone()).await {
                        Ok(c) => break c,
                        Err(_) if started.elapsed() < Duration::from_secs(15) => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => return Err(format!("{}: join: {e}", site.name)),
                    }
                };
                let deadline = Instant::now() + Duration::from_secs(40);
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                let (mut seq, mut before, mut after) = (0u32, 0u64, 0u64);
                let mut waited = false;
                let mut first_after: Option<Instant> = None;
                let mut counted = false;
                while done.load(Ordering::SeqCst) < 2 {
                    if after >= 50 && !counted {
                        counted = true;
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    if Instant::now() > deadline {
                        return Err(format!("{}: {before} of {}'s packets before the change, {after} after", site.name, other.name));
                    }
                    if before >= 25 && !waited {
                        // Heard the other; the test changes the address
                        // once both have (and we go on sending).
                        waited = true;
                        ready.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::select! {
                        _ = tick.tick() => {
                            seq += 1;
                            let _ = client.send_rtp(Kind::Audio, common::media::payload(Kind::Audio, site.name, seq), false, seq * 960);
                        }
                        ev = client.next_event() => match ev {
                            Some(Event::Rtp { kind, packet, .. }) => {
                                if common::media::parse(kind, &packet.payload).is_some_and(|(from, _)| from == other.name) {
                                    if changed.get().is_some() {
                                        after += 1;
                                        first_after.get_or_insert_with(Instant::now);
                                    } else {
                                        before += 1;
                                    }
                                }
                            }
                            Some(Event::Closed) | None => return Err(format!("{}: the client stopped", site.name)),
                            Some(_) => {}
                        },
                    }
                }
                client.leave();
                let at = *changed.get().expect("changed");
                Ok(first_after.expect("a packet after").duration_since(at).as_millis() as u64)
            })
        }));
    }
    // Both hear each other: move alice to 10.77.1.3 (or give up after 40 s;
    // the clients stop by themselves then).
    let until = Instant::now() + Duration::from_secs(40);
    while ready.load(Ordering::SeqCst) < 2 && Instant::now() < until {
        sleep(Duration::from_millis(20));
    }
    for change in [
        ["addr", "add", "10.77.1.3/24", "dev", "eth0"],
        ["addr", "del", "10.77.1.2/24", "dev", "eth0"],
        ["route", "replace", "default", "via", "10.77.1.1"],
    ] {
        sh(&[&["ip", "-n", alice_ns.as_str()][..], &change[..]].concat());
    }
    let _ = changed.set(Instant::now());
    let results: Vec<Result<u64, String>> = threads
        .into_iter()
        .map(|t| t.join().unwrap_or_else(|_| Err("panicked".into())))
        .collect();
    let server_alive = net.exited(srv).is_none();
    drop(net);
    let report = format!(
        "{results:?} (server alive: {server_alive})\n{}\n(logs in {})",
        read(&logs.join("server").with_extension("stderr")),
        logs.display()
    );
    assert!(
        results.iter().all(Result::is_ok) && server_alive,
        "{report}"
    );
    println!(
        "FIGURES address change: alice hears bob again after {} ms, bob hears alice again after {} ms",
        results[0].as_ref().map_or(0, |v| *v),
        results[1].as_ref().map_or(0, |v| *v)
    );
    let _ = fs::remove_dir_all(&logs);
}

/// Alice and Bob with our Rust client, isolated from each other as above:
/// each tries P2P, reports `p2p-failed` at the deadline, and then receives
/// the other's packets through the server.
#[test]
fn isolated_rust_clients_fall_back_to_the_server() {
    let results = run_rust_clients(true);
    assert!(
        results.iter().any(|(_, r)| r["reportedP2pFailed"] == true),
        "someone reports p2p-failed: {results:?}"
    );
    for (name, r) in results {
        assert_eq!(r["modeReason"], "p2p-failed", "{name}: {r}");
        assert_eq!(r["p2pFailed"], true, "{name}: {r}");
        assert_eq!(
            r["p2pPackets"], 0,
            "{name}: nothing direct across the router: {r}"
        );
        assert!(
            r["serverPackets"].as_u64() >= Some(RUST_PACKETS),
            "{name}: {r}"
        );
        println!("FIGURES rust-isolated {name}: {r}");
    }
}

/// The same two Rust clients when they can reach each other: the direct
/// connection connects and carries the other's packets; the room stays p2p.
#[test]
fn rust_clients_that_reach_each_other_call_directly() {
    for (name, r) in run_rust_clients(false) {
        assert_eq!(
            r["modeReason"],
            serde_json::Value::Null,
            "{name}: no mode change: {r}"
        );
        assert_eq!(r["p2pFailed"], false, "{name}: {r}");
        assert_eq!(r["reportedP2pFailed"], false, "{name}: {r}");
        assert!(
            r["p2pPackets"].as_u64() >= Some(RUST_PACKETS),
            "{name}: {r}"
        );
        assert_eq!(r["serverPackets"], 0, "{name}: {r}");
        println!("FIGURES rust-p2p {name}: {r}");
    }
}

/// One participant of [`run_rust_clients`]: joins `auto` with P2P on, sends
/// audio and video, and returns its result once [`RUST_PACKETS`] of the
/// other's packets came the expected way and a little more time passed (so
/// the other gets its packets too); an error after 45 s.
async fn rust_client(plan: RustClientPlan) -> Result<serde_json::Value, String> {
    use switchboard_client::{Client, Event, JoinOptions, Kind};
    use switchboard_proto::ServerMessage;

    let RustClientPlan {
        url,
        room,
        name,
        other,
        ip,
        via_server,
    } = plan;
    let expect = if via_server { "server" } else { "p2p" };
    let mut opts = JoinOptions::auto(&url, &room, name);
    opts.bind_ip = ip;
    // The server may still be starting: retry the join for a while.
    let started = Instant::now();
    let mut client = loop {
        match Client::join(opts.clone()).await {
            Ok(c) => break c,
            Err(e) if started.elapsed() < Duration::from_secs(15) => {
                eprintln!("join: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(format!("join: {e}")),
        }
    };
    let joined_at = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let (mut seq, mut p2p_packets, mut server_packets) = (0u32, 0u64, 0u64);
    // When P2P was declared failed: by us, or by the other (`mode`).
    let (mut failed_at, mut mode_reason, mut reported) = (None, None, false);
    let (mut first_server_at, mut first_p2p_at) = (None, None);
    // Keep sending for 2 s after we have ours, so the other gets its own.
    let mut done_at: Option<tokio::time::Instant> = None;
    while done_at.is_none_or(|t| tokio::time::Instant::now() < t) {
        let got = if via_server {
            server_packets
        } else {
            p2p_packets
        };
        if got >= RUST_PACKETS && done_at.is_none() {
            done_at = Some(tokio::time::Instant::now() + Duration::from_secs(2));
        }
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => return Err(format!(
                "{name}: after 45 s, {server_packets} packets of {other} through the server \
                 and {p2p_packets} direct (expected {RUST_PACKETS} via {expect}; \
                 p2p-failed {failed_at:?}, mode {mode_reason:?})"
            )),
            _ = tick.tick() => {
                seq += 1;
                for kind in [Kind::Audio, Kind::Video] {
                    let payload = common::media::payload(kind, name, seq);
                    let _ = client.send_rtp(kind, payload, true, seq * 960);
                }
            }
            ev = client.next_event() => match ev {
                Some(Event::P2p { state, .. }) if state == "failed" => {
                    reported = true;
                    failed_at.get_or_insert_with(Instant::now);
                }
                Some(Event::P2pRtp { kind, packet, .. }) => {
                    if common::media::parse(kind, &packet.payload).is_some_and(|(from, _)| from == other) {
                        p2p_packets += 1;
                        first_p2p_at.get_or_insert_with(Instant::now);
                    }
                }
                Some(Event::Signal(ServerMessage::Mode(m))) => {
                    mode_reason = Some(m.reason.as_str());
                    if m.reason == switchboard_proto::ModeReason::P2pFailed {
                        failed_at.get_or_insert_with(Instant::now);
                    }
                }
                Some(Event::Rtp { kind, packet, .. }) => {
                    if common::media::parse(kind, &packet.payload).is_some_and(|(from, _)| from == other) {
                        server_packets += 1;
                        first_server_at.get_or_insert_with(Instant::now);
                    }
                }
                Some(Event::Closed) | None => return Err(format!("{name}: the client stopped")),
                Some(_) => {}
            },
        }
    }
    client.leave();
    let ms = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
        (Some(a), Some(b)) => {
            serde_json::json!(b.saturating_duration_since(a).as_millis() as u64)
        }
        _ => serde_json::Value::Null,
    };
    let result = serde_json::json!({
        "name": name,
        "modeReason": mode_reason,
        "p2pFailed": failed_at.is_some(),
        "reportedP2pFailed": reported,
        "p2pPackets": p2p_packets,
        "serverPackets": server_packets,
        "joinToFirstServerPacketMs": ms(Some(joined_at), first_server_at),
        "joinToFirstP2pPacketMs": ms(Some(joined_at), first_p2p_at),
        "p2pFailedToFirstServerPacketMs": ms(failed_at, first_server_at),
    });
    Ok(result)
}
