//! Resume after a dropped WebSocket (protocol 1.1): the participant keeps
//! its id and its server connection, the others see nothing, and what it
//! missed arrives after `resumed`; a wrong or late `resume` fails and the
//! participant is gone as before. With our Rust client, media keeps
//! flowing while its WebSocket is down and not one packet is lost.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::media::{parse, payload, until_connected};
use common::{free_port, metric, metrics, server, Client as Ws, WAIT};
use serde_json::json;
use switchboard::config::ServeOptions;
use switchboard_client::{Client, Event, JoinOptions, Kind};

async fn until_parked(server: &switchboard::server::RunningServer, n: f64) {
    for _ in 0..200 {
        if metric(&metrics(server).await, "switchboard_parked_participants") == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("parked participants never reached {n}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_websocket_resumes_with_its_id_and_what_it_missed_and_nobody_sees_it_go() {
    let server = server(ServeOptions::default()).await;
    let mut a = Ws::connect(&server, "a").await;
    let joined = a.join("resume-room", json!({})).await;
    let id = joined["id"].as_str().expect("id").to_owned();
    let token = joined["resumeToken"]
        .as_str()
        .expect("a resume token")
        .to_owned();
    assert_eq!(joined["resumeWindowMs"], 15000);
    let mut b = Ws::connect(&server, "b").await;
    b.join("resume-room", json!({})).await;
    a.expect("otherjoin").await;

    a.drop_abruptly();
    until_parked(&server, 1.0).await;
    // While it is gone, the room talks to it.
    b.send(json!({"type":"message","room":"resume-room","data":{"n":1}}))
        .await;
    b.send(json!({"type":"message","room":"resume-room","to": id,"data":{"n":2}}))
        .await;
    b.expect_nothing_pending().await; // no bye

    let mut back = Ws::connect(&server, "a-again").await;
    back.send(json!({"type":"resume","room":"resume-room","id": id,"resumeToken": token}))
        .await;
    let resumed = back.expect("resumed").await;
    assert_eq!(resumed["id"], id.as_str());
    assert_eq!(resumed["mode"], "p2p");
    assert_eq!(resumed["peers"].as_array().map(Vec::len), Some(1));
    // What it missed, in order, after `resumed`.
    assert_eq!(back.expect("message").await["data"], json!({"n":1}));
    assert_eq!(back.expect("message").await["data"], json!({"n":2}));
    back.expect_nothing_pending().await;
    // It is the same participant: the others reach it as before.
    b.send(json!({"type":"message","room":"resume-room","data":{"n":3}}))
        .await;
    assert_eq!(back.expect("message").await["data"], json!({"n":3}));
    b.expect_nothing_pending().await;
    let m = metrics(&server).await;
    assert_eq!(
        metric(&m, "switchboard_resumes_total{result=\"resumed\"}"),
        1.0
    );
    assert_eq!(metric(&m, "switchboard_parked_participants"), 0.0);
    assert_eq!(metric(&m, "switchboard_participants"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_early_or_late_resume_fails_and_after_the_window_the_room_gets_bye() {
    let server = server(ServeOptions {
        resume_window_ms: Some(600),
        ..Default::default()
    })
    .await;
    let mut a = Ws::connect(&server, "a").await;
    let joined = a.join("late", json!({})).await;
    let id = joined["id"].as_str().expect("id").to_owned();
    let token = joined["resumeToken"].as_str().expect("token").to_owned();
    let mut b = Ws::connect(&server, "b").await;
    b.join("late", json!({})).await;
    a.expect("otherjoin").await;

    let mut other = Ws::connect(&server, "other").await;
    // A wrong token fails.
    other
        .send(json!({"type":"resume","room":"late","id": id,"resumeToken":"nope"}))
        .await;
    other.expect_error("resume-failed").await;
    // The right one while the server still holds its old connection (the
    // client saw it drop before the server did): the new connection takes
    // over, same id, and the old one is closed; b sees nothing.
    other
        .send(json!({"type":"resume","room":"late","id": id,"resumeToken": token}))
        .await;
    let resumed = other.expect("resumed").await;
    assert_eq!(resumed["id"], id.as_str());
    assert!(
        matches!(a.next_event().await, common::Event::Closed(_)),
        "the old connection is closed"
    );
    b.expect_nothing_pending().await;
    // It is the participant now: b's message reaches it.
    b.send(json!({"type":"message","room":"late","to": id,"data":{"x":1}}))
        .await;
    assert_eq!(other.expect("message").await["data"]["x"], 1);

    // Gone for longer than the window: a bye, then resume fails.
    other.drop_abruptly();
    let mut other = Ws::connect(&server, "other2").await;
    let bye = b.expect("bye").await;
    assert_eq!(bye["id"], id.as_str());
    other
        .send(json!({"type":"resume","room":"late","id": id,"resumeToken": token}))
        .await;
    other.expect_error("resume-failed").await;
    // The failed connection can still join afresh.
    let fresh = other.join("late", json!({})).await;
    assert_ne!(fresh["id"], id.as_str());
    let m = metrics(&server).await;
    assert_eq!(
        metric(&m, "switchboard_resumes_total{result=\"expired\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "switchboard_resumes_total{result=\"unknown\"}"),
        2.0
    );
    assert_eq!(
        metric(&m, "switchboard_resumes_total{result=\"took-over\"}"),
        1.0
    );

    // With resuming off, joined has no token and a drop is a bye at once.
    let off = server_off().await;
    let mut c = Ws::connect(&off, "c").await;
    let j = c.join("off", json!({})).await;
    assert!(j.get("resumeToken").is_none(), "{j}");
}

async fn server_off() -> switchboard::server::RunningServer {
    server(ServeOptions {
        resume_window_ms: Some(0),
        ..Default::default()
    })
    .await
}

/// Publishes audio every 20 ms from `c` as `name`, numbered from `seq`.
fn publish(c: &Client, name: &str, seq: &mut u32) {
    let _ = c.send_rtp(
        Kind::Audio,
        payload(Kind::Audio, name, *seq),
        false,
        *seq * 960,
    );
    *seq += 1;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_keeps_flowing_while_the_rust_clients_websocket_is_down_and_it_resumes_by_itself() {
    let server = server(ServeOptions::default()).await;
    let url = server.ws_url();
    let mut talker = Client::join(JoinOptions::sfu(&url, "flow", "talker"))
        .await
        .expect("talker joins");
    until_connected(&mut talker).await;
    let mut listener = Client::join(JoinOptions::sfu(&url, "flow", "listener"))
        .await
        .expect("listener joins");
    until_connected(&mut listener).await;

    let mut seq = 0u32;
    let mut received = BTreeSet::new();
    let mut dropped_at: Option<(Instant, u32)> = None;
    let mut resumed: Option<(Duration, u32)> = None;
    let mut lost_seen = false;
    let mut bye = false;
    let deadline = Instant::now() + WAIT * 3;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        assert!(
            Instant::now() < deadline,
            "did not resume and settle in time"
        );
        tokio::select! {
            _ = tick.tick() => {
                publish(&talker, "talker", &mut seq);
                // After 1 s of media, the talker's WebSocket drops.
                if seq == 50 {
                    talker.drop_signaling();
                    dropped_at = Some((Instant::now(), seq));
                }
                // 1 s after resuming, stop and count.
                if resumed.is_some_and(|(_, s)| seq >= s + 50) {
                    break;
                }
            }
            ev = talker.next_event() => match ev {
                Some(Event::SignalingLost) => lost_seen = true,
                Some(Event::Resumed(j)) => {
                    assert_eq!(j.id.as_str(), talker.id);
                    let (at, _) = dropped_at.expect("dropped first");
                    resumed = Some((at.elapsed(), seq));
                }
                Some(Event::Closed) | None => panic!("the talker's client stopped"),
                Some(_) => {}
            },
            ev = listener.next_event() => match ev {
                Some(Event::Rtp { kind: Kind::Audio, packet, .. }) => {
                    if let Some((name, n)) = parse(Kind::Audio, &packet.payload) {
                        if name == "talker" {
                            received.insert(n);
                        }
                    }
                }
                Some(Event::Signal(m)) if m.type_name() == "bye" => bye = true,
                Some(Event::Closed) | None => panic!("the listener's client stopped"),
                Some(_) => {}
            },
        }
    }
    let (resume_time, resumed_at) = resumed.expect("resumed");
    let (_, dropped_seq) = dropped_at.expect("dropped");
    assert!(lost_seen, "the client said its signaling was lost");
    assert!(!bye, "the listener never saw the talker go");
    // Every packet sent from 10 before the drop to 10 before the end came
    // through: none lost while the WebSocket was down.
    let window: Vec<u32> = (dropped_seq - 10..seq - 10).collect();
    let missing: Vec<u32> = window
        .iter()
        .copied()
        .filter(|n| !received.contains(n))
        .collect();
    println!(
        "FIGURES resume: drop -> resumed {:.0} ms; packets sent while down {}; lost {} of {}",
        resume_time.as_secs_f64() * 1000.0,
        resumed_at - dropped_seq,
        missing.len(),
        window.len()
    );
    assert!(
        resumed_at > dropped_seq,
        "packets were sent while it was down"
    );
    assert!(missing.is_empty(), "lost while resuming: {missing:?}");
    let m = metrics(&server).await;
    assert_eq!(
        metric(&m, "switchboard_resumes_total{result=\"resumed\"}"),
        1.0
    );
}

/// A `switchboard serve` process on fixed ports (so a restart comes back
/// at the same address); killed when dropped.
struct Process(std::process::Child);

impl Process {
    fn start(http: u16, media: u16) -> Process {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["serve", "--listen", &format!("127.0.0.1:{http}")])
            .args(["--rtc-ip", "127.0.0.1", "--rtc-port", &media.to_string()])
            .args(["--log", "warn"])
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start switchboard");
        Process(child)
    }

    async fn until_healthy(http: u16) {
        let deadline = Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", http))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the server did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no goodbye to anyone, as a crash or an OOM kill.
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The server process is killed and started again on the same address:
/// two Rust clients notice, fail to resume (the new server never knew
/// them), join the room again by themselves with new ids, reconnect their
/// media, and hear each other again: the room is back with its members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_clients_rejoin_a_restarted_server_by_themselves() {
    let (http, media) = (free_port(), free_port());
    let mut server = Process::start(http, media);
    Process::until_healthy(http).await;
    let url = format!("ws://127.0.0.1:{http}/ws");
    let mut a = Client::join(JoinOptions::sfu(&url, "restart", "a"))
        .await
        .expect("a joins");
    until_connected(&mut a).await;
    let mut b = Client::join(JoinOptions::sfu(&url, "restart", "b"))
        .await
        .expect("b joins");
    until_connected(&mut b).await;
    let first_ids = (a.id.clone(), b.id.clone());

    // Heard from the other: (before the restart, after rejoining).
    let mut heard = [(false, false), (false, false)];
    let mut rejoined: [Option<(String, Instant)>; 2] = [None, None];
    let mut killed_at: Option<Instant> = None;
    let mut restarted = false;
    let (mut seq_a, mut seq_b) = (0u32, 0u32);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let deadline = Instant::now() + WAIT * 4;
    while !(heard[0].1 && heard[1].1) {
        assert!(
            Instant::now() < deadline,
            "not back in time: heard {heard:?}, rejoined {rejoined:?}"
        );
        tokio::select! {
            _ = tick.tick() => {
                publish(&a, "a", &mut seq_a);
                publish(&b, "b", &mut seq_b);
                if heard[0].0 && heard[1].0 && killed_at.is_none() {
                    server.kill();
                    killed_at = Some(Instant::now());
                }
                // Down for a second, then back on the same ports.
                if !restarted && killed_at.is_some_and(|t| t.elapsed() > Duration::from_secs(1)) {
                    server = Process::start(http, media);
                    restarted = true;
                }
            }
            ev = a.next_event() => on_event(ev, "a", 0, &mut heard, &mut rejoined),
            ev = b.next_event() => on_event(ev, "b", 1, &mut heard, &mut rejoined),
        }
    }
    let killed_at = killed_at.expect("killed");
    for (i, first) in [&first_ids.0, &first_ids.1].into_iter().enumerate() {
        let (id, at) = rejoined[i].as_ref().expect("rejoined");
        assert_ne!(id, first, "a new server gives a new id");
        println!(
            "FIGURES restart: client {i} rejoined {:.0} ms after the kill (the server was down ~1 s)",
            at.duration_since(killed_at).as_secs_f64() * 1000.0
        );
    }
    drop(server);
}

/// Counts what client `i` (`name`) sees: the other's packets before the
/// restart and after its own rejoin.
fn on_event(
    ev: Option<Event>,
    name: &str,
    i: usize,
    heard: &mut [(bool, bool); 2],
    rejoined: &mut [Option<(String, Instant)>; 2],
) {
    match ev {
        Some(Event::Rtp {
            kind: Kind::Audio,
            packet,
            ..
        }) => {
            if let Some((from, _)) = parse(Kind::Audio, &packet.payload) {
                if from != name {
                    if rejoined[i].is_some() {
                        heard[i].1 = true;
                    } else {
                        heard[i].0 = true;
                    }
                }
            }
        }
        Some(Event::Rejoined(j)) => rejoined[i] = Some((j.id.to_string(), Instant::now())),
        Some(Event::Closed) | None => panic!("{name}: the client stopped"),
        Some(_) => {}
    }
}
