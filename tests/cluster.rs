//! Cluster mode with real processes: Debian's `redis-server` on a loopback
//! port and two or three `switchboard serve --redis-url` nodes, each with its
//! own HTTP and media port. Clients reach the nodes directly (a load
//! balancer in front would do the same): participants of one room joined
//! through different nodes see each other, relay P2P signaling, and in SFU
//! mode exchange real media through the room's node. Then the faults: the
//! owner killed (SIGKILL), Redis stopped and restarted, a stale claim, and
//! garbage on a node's relay channel.

mod common;

use std::collections::HashSet;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::classic::Raw;
use common::media::{parse, payload, until_connected};
use common::{free_port, metric, Client as WsClient, WAIT};
use serde_json::json;
use switchboard_client::{Client, Event, JoinOptions, Kind};

const ADMIN_TOKEN: &str = "cluster-test-admin-token";

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not come up on {port}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// `redis-server` on 127.0.0.1, no persistence; killed when dropped.
struct Redis {
    port: u16,
    child: Option<Child>,
}

impl Redis {
    fn start() -> Redis {
        let mut r = Redis {
            port: free_port(),
            child: None,
        };
        r.restart();
        r
    }

    /// Starts it (again) on the same port.
    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/run installs Debian's redis-server)");
        self.child = Some(child);
        wait_for_port(self.port, "redis-server");
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// One command through `redis-cli`; its output.
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        assert!(out.status.success(), "redis-cli {args:?} failed");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One `switchboard serve` node; killed when dropped. Its log goes to a
/// file shown when a test fails.
struct Node {
    id: String,
    http: u16,
    media: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl Node {
    fn start(id: &str, redis: &Redis) -> Node {
        let (http, media) = (free_port(), free_port());
        let log = std::env::temp_dir().join(format!("sb-cluster-{id}-{http}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["serve", "--listen", &format!("127.0.0.1:{http}")])
            .args(["--rtc-ip", "127.0.0.1", "--rtc-port", &media.to_string()])
            .args(["--redis-url", &redis.url(), "--node-id", id])
            .args(["--admin-token", ADMIN_TOKEN])
            .args(["--log", "info,rtc=error"])
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start switchboard");
        wait_for_port(http, id);
        Node {
            id: id.to_owned(),
            http,
            media,
            child: Some(child),
            log,
        }
    }

    fn ws(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.http)
    }

    /// SIGKILL: no goodbye to anyone, as a crash or an OOM kill.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn get(&self, path: &str) -> (u16, String) {
        common::raw_http(
            format!("127.0.0.1:{}", self.http).parse().expect("addr"),
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await
        .pipe(|(status, _, body)| (status, body))
    }

    async fn metric(&self, sample: &str) -> f64 {
        let (status, body) = self.get("/metrics").await;
        assert_eq!(status, 200, "{}: /metrics", self.id);
        metric(&body, sample)
    }

    /// Waits until /readyz says `ready` (`true`) or not.
    async fn until_ready(&self, ready: bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, _) = self.get("/readyz").await;
            if (status == 200) == ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: /readyz never became {} (last {status})\n{}",
                self.id,
                if ready { "ready" } else { "not ready" },
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the node sees `n` live nodes (itself included).
    async fn until_sees(&self, n: usize) {
        let deadline = Instant::now() + WAIT;
        while self.metric("switchboard_cluster_nodes_live").await != n as f64 {
            assert!(Instant::now() < deadline, "{} never saw {n} nodes", self.id);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- log of {} ----\n{}", self.id, self.log_text());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

trait Pipe: Sized {
    fn pipe<T>(self, f: impl FnOnce(Self) -> T) -> T {
        f(self)
    }
}
impl<T> Pipe for T {}

/// A cluster of nodes, all seeing each other.
async fn cluster(ids: &[&str]) -> (Redis, Vec<Node>) {
    let redis = Redis::start();
    let nodes: Vec<Node> = ids.iter().map(|id| Node::start(id, &redis)).collect();
    for n in &nodes {
        n.until_ready(true).await;
        n.until_sees(nodes.len()).await;
    }
    (redis, nodes)
}

/// The node that owns `room`, from Redis.
fn owner(redis: &Redis, room: &str) -> String {
    redis.cli(&["GET", &format!("sb:room:{room}")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_on_different_nodes_share_a_room() {
    let (redis, nodes) = cluster(&["node-a", "node-b"]).await;
    let (a, b) = (&nodes[0], &nodes[1]);

    // Alice through node B; the room goes to the least-loaded node (a tie:
    // the lower id, node-a), so her signaling is relayed.
    let mut alice = WsClient::connect_url(&b.ws(), "alice").await;
    let joined_a = alice.join("talk", json!({})).await;
    assert_eq!(owner(&redis, "talk"), "node-a");
    assert!(
        joined_a["features"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "cluster")),
        "{joined_a}"
    );
    let ida = common::id_of(&joined_a);

    // Bob through node A, where the room is.
    let mut bob = WsClient::connect_url(&a.ws(), "bob").await;
    let joined_b = bob.join("talk", json!({})).await;
    let peers: Vec<&str> = joined_b["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .filter_map(|p| p["id"].as_str())
        .collect();
    assert_eq!(peers, vec![ida.as_str()], "{joined_b}");
    let idb = common::id_of(&joined_b);
    let other = alice.expect("otherjoin").await;
    assert_eq!(other["id"], idb.as_str());

    // P2P signaling both ways, intact and in order.
    for i in 0..20 {
        bob.send(json!({"type":"message","room":"talk","to": ida,"data": {"n": i}}))
            .await;
    }
    for i in 0..20 {
        let m = alice.expect("message").await;
        assert_eq!(m["from"], idb.as_str());
        assert_eq!(m["data"]["n"], i);
    }
    alice
        .send(json!({"type":"message","room":"talk","to": idb,"data": {"sdp":"answer"}}))
        .await;
    assert_eq!(bob.expect("message").await["data"]["sdp"], "answer");
    // A ping answered through the relay, and a bad request answered with
    // its error, the room unharmed.
    alice.send(json!({"type":"ping","id":7})).await;
    assert_eq!(alice.expect("pong").await["id"], 7);
    alice
        .send(json!({"type":"message","room":"elsewhere","data": {}}))
        .await;
    alice.expect_error("not-in-room").await;

    // Alice leaves through the relay: Bob gets `bye`; then the relayed
    // connection is free and joins another room, placed afresh.
    alice.send(json!({"type":"leave","room":"talk"})).await;
    alice.expect("leaved").await;
    assert_eq!(bob.expect("bye").await["id"], ida.as_str());

    // Counted as what it was: Alice's five frames (join, message, ping,
    // the bad message, leave) relayed to node-a, and at least her 25
    // answers back (joined, otherjoin, 20 messages, pong, error, leaved);
    // nothing relayed by node-a; one room placed remotely by node-b.
    let to_owner = r#"switchboard_cluster_relayed_messages_total{direction="to-owner"}"#;
    let to_client = r#"switchboard_cluster_relayed_messages_total{direction="to-client"}"#;
    assert_eq!(b.metric(to_owner).await, 5.0);
    assert!(b.metric(to_client).await >= 25.0);
    assert_eq!(a.metric(to_owner).await, 0.0);
    assert_eq!(a.metric(to_client).await, 0.0);
    assert_eq!(
        b.metric(r#"switchboard_cluster_placements_total{outcome="remote"}"#)
            .await,
        1.0
    );

    // Out of the room, the relayed connection is node-b's again: a join
    // is placed afresh.
    let again = alice.join("second", json!({})).await;
    assert_eq!(again["room"], "second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_room_goes_to_the_less_busy_node() {
    let (redis, nodes) = cluster(&["node-a", "node-b"]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    // Two in room one, through different nodes: it lands on node-a.
    let mut c1 = WsClient::connect_url(&a.ws(), "c1").await;
    c1.join("one", json!({})).await;
    let mut c2 = WsClient::connect_url(&b.ws(), "c2").await;
    c2.join("one", json!({})).await;
    assert_eq!(owner(&redis, "one"), "node-a");
    // Once node-a has announced its two participants, a new room asked of
    // node-a goes to node-b, and one asked of node-b stays there.
    let deadline = Instant::now() + WAIT;
    while !redis
        .cli(&["GET", "sb:node:node-a"])
        .contains(r#""participants":2"#)
    {
        assert!(Instant::now() < deadline, "node-a never announced its load");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // one more keepalive round read everywhere
    let mut c3 = WsClient::connect_url(&a.ws(), "c3").await;
    c3.join("two", json!({})).await;
    assert_eq!(owner(&redis, "two"), "node-b");
    assert_eq!(a.metric("switchboard_rooms").await, 1.0);
    assert_eq!(b.metric("switchboard_rooms").await, 1.0);
}

/// What one SFU subscriber received from whom.
#[derive(Default)]
struct Got {
    from: HashSet<String>,
    corrupt: usize,
    rejoined: bool,
    room_closed: bool,
}

impl Got {
    fn absorb(&mut self, ev: Event) {
        match ev {
            Event::Rtp { kind, packet, .. } => match parse(kind, &packet.payload) {
                Some((name, _)) => {
                    self.from.insert(name);
                }
                None => self.corrupt += 1,
            },
            Event::Rejoined(_) => self.rejoined = true,
            Event::Signal(switchboard_proto::ServerMessage::Error(e))
                if e.code == switchboard_proto::ErrorCode::RoomClosed =>
            {
                self.room_closed = true;
            }
            _ => {}
        }
    }
}

/// Publishes from every client and collects until every client has
/// received from every other (or `limit` passes); returns what each got.
async fn exchange(clients: &mut [Client], names: &[&str], limit: Duration) -> Vec<Got> {
    let mut got: Vec<Got> = names.iter().map(|_| Got::default()).collect();
    let start = Instant::now();
    let mut seq = 0u32;
    while start.elapsed() < limit {
        for (c, name) in clients.iter().zip(names) {
            let _ = c.send_rtp(
                Kind::Audio,
                payload(Kind::Audio, name, seq),
                false,
                seq * 960,
            );
        }
        seq += 1;
        let tick = Instant::now() + Duration::from_millis(20);
        while Instant::now() < tick {
            for (c, g) in clients.iter_mut().zip(got.iter_mut()) {
                while let Some(ev) = c.next_event_within(Duration::from_millis(1)).await {
                    g.absorb(ev);
                }
            }
        }
        let all = got.iter().zip(names).all(|(g, me)| {
            names
                .iter()
                .filter(|n| *n != me)
                .all(|n| g.from.contains(*n))
        });
        if all {
            break;
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sfu_media_goes_to_the_rooms_node_from_clients_of_every_node() {
    let (redis, nodes) = cluster(&["node-a", "node-b", "node-c"]).await;
    let names = ["ann", "ben", "cat"];
    let mut clients = Vec::new();
    for (node, name) in nodes.iter().zip(names) {
        let mut c = Client::join(JoinOptions::sfu(&node.ws(), "media", name))
            .await
            .expect("joins");
        until_connected(&mut c).await;
        clients.push(c);
    }
    let room_node = owner(&redis, "media");
    assert_eq!(room_node, "node-a");
    let got = exchange(&mut clients, &names, Duration::from_secs(15)).await;
    for (g, me) in got.iter().zip(names) {
        let want: HashSet<String> = names
            .iter()
            .filter(|n| **n != me)
            .map(|n| n.to_string())
            .collect();
        assert_eq!(g.from, want, "{me} heard");
        assert_eq!(g.corrupt, 0, "{me}");
    }
    // Every PeerConnection is on the room's node; the others only relay.
    assert_eq!(nodes[0].metric("switchboard_media_connections").await, 3.0);
    assert_eq!(nodes[1].metric("switchboard_media_connections").await, 0.0);
    assert_eq!(nodes[2].metric("switchboard_media_connections").await, 0.0);
    println!(
        "media ports: room node {} (udp {}), others udp {} / {}",
        room_node, nodes[0].media, nodes[1].media, nodes[2].media
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_rooms_node_dies_its_participants_rejoin_on_a_live_node() {
    let (redis, mut nodes) = cluster(&["node-a", "node-b"]).await;
    // Both clients on node-b; the room is placed on node-a.
    let names = ["dan", "eve"];
    let mut clients = Vec::new();
    for name in names {
        let mut c = Client::join(JoinOptions::sfu(&nodes[1].ws(), "survive", name))
            .await
            .expect("joins");
        until_connected(&mut c).await;
        clients.push(c);
    }
    assert_eq!(owner(&redis, "survive"), "node-a");
    let before = exchange(&mut clients, &names, Duration::from_secs(10)).await;
    assert!(
        before.iter().all(|g| g.from.len() == 1),
        "media before the kill"
    );

    let killed = Instant::now();
    nodes[0].kill();
    // Each client is told (`room-closed`, rejoin), joins again by itself,
    // lands on node-b, and has media again.
    let after = exchange(&mut clients, &names, Duration::from_secs(30)).await;
    let back = killed.elapsed();
    for (g, me) in after.iter().zip(names) {
        assert!(g.room_closed, "{me} was told the room closed");
        assert!(g.rejoined, "{me} rejoined by itself");
        assert_eq!(g.from.len(), 1, "{me} has media again");
    }
    assert_eq!(owner(&redis, "survive"), "node-b");
    assert_eq!(nodes[1].metric("switchboard_media_connections").await, 2.0);
    println!("owner killed -> media back at both clients: {back:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_calls_go_on_and_new_rooms_elsewhere_are_refused() {
    let (mut redis, nodes) = cluster(&["node-a", "node-b"]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    // A call on node-a, one client through node-b.
    let names = ["fay", "gus"];
    let mut clients = Vec::new();
    for (node, name) in [a, b].into_iter().zip(names) {
        let mut c = Client::join(JoinOptions::sfu(&node.ws(), "steady", name))
            .await
            .expect("joins");
        until_connected(&mut c).await;
        clients.push(c);
    }
    assert_eq!(owner(&redis, "steady"), "node-a");
    // Negotiated (each receives the other: the server's offers for the
    // other's tracks reached the relayed client too) before Redis goes.
    let before = exchange(&mut clients, &names, Duration::from_secs(10)).await;
    for (g, me) in before.iter().zip(names) {
        assert_eq!(g.from.len(), 1, "{me} has media with Redis up");
    }

    redis.kill();
    a.until_ready(false).await;
    b.until_ready(false).await;
    // Media of the running call flows on (it never touches Redis).
    let during = exchange(&mut clients, &names, Duration::from_secs(10)).await;
    for (g, me) in during.iter().zip(names) {
        assert_eq!(g.from.len(), 1, "{me} has media with Redis down");
    }
    // A room that needs placing: `unavailable`, and the connection lives on.
    let mut newcomer = WsClient::connect_url(&b.ws(), "hal").await;
    newcomer
        .send(json!({"type":"join","room":"fresh","name":"hal"}))
        .await;
    let err = newcomer.expect_error("unavailable").await;
    assert_eq!(err["request"], "join");
    newcomer.send(json!({"type":"ping","id":1})).await;
    newcomer.expect("pong").await;
    // The room node-a holds still takes joins there.
    let mut local = WsClient::connect_url(&a.ws(), "ida").await;
    local.join("steady", json!({})).await;

    // Redis back: without restarting any node, placing works again.
    redis.restart();
    a.until_ready(true).await;
    b.until_ready(true).await;
    b.until_sees(2).await;
    newcomer.join("fresh", json!({})).await;
    assert!(
        b.metric(r#"switchboard_cluster_placements_total{outcome="unavailable"}"#)
            .await
            >= 1.0
    );
    assert!(
        b.metric(r#"switchboard_cluster_redis_errors_total{op="keepalive"}"#)
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_claims_are_taken_over_and_garbage_on_the_relay_is_dropped() {
    let (redis, nodes) = cluster(&["node-a", "node-b"]).await;
    let a = &nodes[0];
    // A claim left by a node that is gone (no registration).
    redis.cli(&["SET", "sb:room:orphan", "node-gone", "PX", "60000"]);
    let mut c = WsClient::connect_url(&a.ws(), "jo").await;
    c.join("orphan", json!({})).await;
    assert_eq!(owner(&redis, "orphan"), "node-a");
    assert_eq!(
        a.metric(r#"switchboard_cluster_placements_total{outcome="takeover"}"#)
            .await,
        1.0
    );

    // Garbage published on node-a's relay channel: each one dropped and
    // counted, nothing else happens.
    let garbage = [
        "not json",
        r#"{"k":"text","c":"node-a#999","t":"x"}"#,
        r#"{"k":"launch","c":"node-a#1"}"#,
        r#"{"k":"frame","c":"nohash","t":"{}"}"#,
        r#"{"k":"text","c":"node-b#1","t":"for another origin"}"#,
    ];
    for g in garbage {
        redis.cli(&["PUBLISH", "sb:relay:node-a", g]);
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let malformed = a
            .metric(r#"switchboard_cluster_relay_dropped_total{reason="malformed"}"#)
            .await;
        let unknown = a
            .metric(r#"switchboard_cluster_relay_dropped_total{reason="unknown-connection"}"#)
            .await;
        if malformed == 4.0 && unknown == 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "drops counted: {malformed} malformed, {unknown} unknown"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The member of the room is unharmed and nothing reached it.
    c.send(json!({"type":"ping","id":2})).await;
    assert_eq!(c.expect("pong").await["id"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_takes_no_new_rooms() {
    let (redis, nodes) = cluster(&["node-a", "node-b"]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    // node-a holds a call, so its drain lasts (and node-a stays up).
    let mut stay = WsClient::connect_url(&a.ws(), "kim").await;
    stay.join("stay", json!({})).await;
    assert_eq!(owner(&redis, "stay"), "node-a");
    // Make node-b the busier node, so only the drain keeps rooms off
    // node-a (the room put there by hand: views of load lag a keepalive).
    redis.cli(&["SET", "sb:room:busy", "node-b", "PX", "60000"]);
    let mut busy = Vec::new();
    for name in ["b1", "b2", "b3"] {
        let mut c = WsClient::connect_url(&b.ws(), name).await;
        c.join("busy", json!({})).await;
        busy.push(c);
    }
    assert_eq!(owner(&redis, "busy"), "node-b");

    let (status, _, _) = common::raw_http(
        format!("127.0.0.1:{}", a.http).parse().expect("addr"),
        &format!(
            "POST /admin/drain HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 202);
    // Redis says so first (the announcement goes out at once) ...
    let deadline = Instant::now() + WAIT;
    while !redis
        .cli(&["GET", "sb:node:node-a"])
        .contains(r#""draining":true"#)
    {
        assert!(
            Instant::now() < deadline,
            "node-a never announced its drain"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.until_ready(false).await;
    // ... and a new room asked of node-a itself goes to node-b, relayed.
    let mut newcomer = WsClient::connect_url(&a.ws(), "lou").await;
    newcomer.join("after-drain", json!({})).await;
    assert_eq!(owner(&redis, "after-drain"), "node-b");
    // The call on node-a goes on.
    stay.send(json!({"type":"ping","id":3})).await;
    assert_eq!(stay.expect("pong").await["id"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_clients_reach_the_rooms_node_from_any_node_and_follow_it_when_it_dies() {
    let (redis, mut nodes) = cluster(&["node-a", "node-b"]).await;
    let b_addr = format!("127.0.0.1:{}", nodes[1].http);
    // A classic client (socket.io-client 2.x's revision) on node-b; its
    // room goes to node-a, so its events are relayed there.
    let mut old = Raw::connect_to(&b_addr, 3, "old").await;
    old.emit(json!(["join", 4242])).await;
    let joined = old.expect("joined").await;
    assert_eq!(joined[0], "4242");
    let old_id = joined[1].as_str().expect("id").to_owned();
    assert_eq!(owner(&redis, "4242"), "node-a");

    // A /ws client on node-a: an ordinary room mate, both ways.
    let mut ws = WsClient::connect_url(&nodes[0].ws(), "ws").await;
    let j = ws.join("4242", json!({})).await;
    assert_eq!(j["peers"][0]["id"], old_id.as_str());
    let ws_id = common::id_of(&j);
    assert_eq!(
        old.expect("otherjoin").await,
        vec![json!("4242"), json!(ws_id)]
    );
    let offer = json!({"type":"offer","sdp":"v=0\r\n"});
    old.emit(json!(["message", "4242", offer])).await;
    let m = ws.expect("message").await;
    assert_eq!(
        (m["from"].as_str(), &m["data"]),
        (Some(old_id.as_str()), &offer)
    );
    let cand = json!({"type":"candidate","label":0,"id":"0","candidate":"candidate:1 1 udp 1 127.0.0.1 9 typ host"});
    ws.send(json!({"type":"message","room":"4242","data": cand}))
        .await;
    assert_eq!(old.expect("message").await, vec![json!("4242"), cand]);

    // A third joiner (on node-b too): the room goes `sfu`, and the classic
    // client is moved to the server as on one node: bye, otherjoin "sfu".
    let mut third = WsClient::connect_url(&nodes[1].ws(), "third").await;
    third.join("4242", json!({})).await;
    assert_eq!(old.expect("bye").await[1], ws_id.as_str());
    assert_eq!(
        old.expect("otherjoin").await,
        vec![json!("4242"), json!("sfu")]
    );

    // node-a dies. The classic client has no error event: its peer (the
    // server) says `bye`, its node joins the room again for it, on node-b.
    nodes[0].kill();
    assert_eq!(old.expect("bye").await, vec![json!("4242"), json!("sfu")]);
    // The /ws client on node-b is told to rejoin, does, and the classic
    // client sees it come in (two again: P2P).
    // (After what the room said before: its move to `sfu`, the server's
    // offer to it.)
    let lost = loop {
        let m = third.recv().await;
        if m["type"] == "error" {
            break m;
        }
    };
    assert_eq!(lost["code"], "room-closed");
    assert_eq!(lost["rejoin"], true);
    let again = third.join("4242", json!({})).await;
    assert_eq!(owner(&redis, "4242"), "node-b");
    assert_eq!(
        old.expect("otherjoin").await,
        vec![json!("4242"), json!(common::id_of(&again))]
    );
    old.expect_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_client_resumes_through_another_node() {
    let (redis, nodes) = cluster(&["node-a", "node-b"]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    redis.cli(&["SET", "sb:room:res", "node-b", "PX", "60000"]);
    // Ann on node-a, relayed to node-b where the room is; Bo on node-b.
    let mut ann = WsClient::connect_url(&a.ws(), "ann").await;
    let joined = ann.join("res", json!({})).await;
    let id = common::id_of(&joined);
    let token = joined["resumeToken"]
        .as_str()
        .expect("resume token")
        .to_owned();
    let mut bo = WsClient::connect_url(&b.ws(), "bo").await;
    bo.join("res", json!({})).await;
    ann.expect("otherjoin").await;

    // Ann's WebSocket drops (no close frame): node-b keeps her for a
    // resume; Bo hears no `bye`, and what he sends her waits.
    ann.drop_abruptly();
    tokio::time::sleep(Duration::from_millis(500)).await;
    bo.send(json!({"type":"message","room":"res","to": id,"data": {"while":"away"}}))
        .await;
    bo.expect_nothing_pending().await;

    // She comes back through node-b this time (a load balancer's choice).
    let mut back = WsClient::connect_url(&b.ws(), "ann").await;
    back.send(json!({"type":"resume","room":"res","id": id,"resumeToken": token}))
        .await;
    let resumed = back.expect("resumed").await;
    assert_eq!(resumed["id"], id.as_str());
    assert_eq!(back.expect("message").await["data"]["while"], "away");
    // And once more through node-a (relayed again): the same participant.
    let token = resumed["resumeToken"].as_str().unwrap_or(&token).to_owned();
    back.drop_abruptly();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut again = WsClient::connect_url(&a.ws(), "ann").await;
    again
        .send(json!({"type":"resume","room":"res","id": id,"resumeToken": token}))
        .await;
    assert_eq!(again.expect("resumed").await["id"], id.as_str());
    bo.send(json!({"type":"message","room":"res","to": id,"data": {"n": 2}}))
        .await;
    assert_eq!(again.expect("message").await["data"]["n"], 2);
    bo.expect_nothing_pending().await;
}
