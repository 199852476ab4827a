//! Access control against the real server on 127.0.0.1:0: tokens (ours,
//! `switchboard token`'s and LiveKit's own SDK's), every refusal reason,
//! identity replacement, hidden participants, the grants with real WebRTC
//! peers, the admin API, `--metrics-listen`, and protected mode.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

use common::media::{parse, payload, until_connected};
use common::*;
use serde_json::{json, Value};
use switchboard::auth::{sign_with, unix_now, Claims, VideoGrant};
use switchboard::config::ServeOptions;
use switchboard::server::RunningServer;
use switchboard_client::{Client as Peer, Event as PeerEvent, JoinOptions, Kind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "test-key";
const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

fn keyed() -> ServeOptions {
    ServeOptions {
        api_key: Some(KEY.into()),
        api_secret: Some(SECRET.into()),
        ..Default::default()
    }
}

fn claims(room: &str, identity: &str) -> Claims {
    let now = unix_now();
    Claims {
        iss: KEY.into(),
        sub: identity.into(),
        nbf: Some(now - 5),
        exp: now + 600,
        video: VideoGrant {
            room: Some(room.into()),
            room_join: true,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn token(c: &Claims) -> String {
    sign_with(SECRET, c).expect("signs")
}

fn join_token(room: &str, identity: &str) -> String {
    token(&claims(room, identity))
}

fn admin_token(room: Option<&str>) -> String {
    let mut c = claims("", "admin");
    c.video = VideoGrant {
        room: room.map(str::to_owned),
        room_admin: true,
        room_create: true,
        room_list: true,
        ..Default::default()
    };
    token(&c)
}

/// The JSON body of an error `unauthorized` answering a join with `token`.
async fn refused(c: &mut Client, room: &str, token: Option<&str>) -> String {
    let mut msg = json!({"type":"join","room":room,"name":c.name});
    if let Some(t) = token {
        msg["token"] = json!(t);
    }
    c.send(msg).await;
    let e = c.expect_error("unauthorized").await;
    e["message"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn tokens_from_switchboard_token_and_livekits_sdk_are_accepted() {
    let server = server(keyed()).await;
    // `switchboard token`, the binary, with the same key flags as serve.
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args([
            "token",
            "--api-key",
            KEY,
            "--api-secret",
            SECRET,
            "--room",
            "lobby",
            "--identity",
            "alice@example",
            "--name",
            "Alice",
            "--ttl",
            "10m",
        ])
        .output()
        .expect("runs switchboard token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli_token = String::from_utf8(out.stdout).expect("utf-8");
    let mut a = Client::connect(&server, "ignored").await;
    let ja = a.join("lobby", json!({"token": cli_token.trim()})).await;
    assert_eq!(ja["features"], json!(["auth", "simulcast"]));

    // LiveKit's own Python SDK mints the second one.
    let lk = livekit_token("lobby", "bob@example", "Bob", &[]);
    let mut b = Client::connect(&server, "bob-ignored").await;
    let jb = b.join("lobby", json!({"token": lk})).await;
    assert_eq!(
        jb["peers"],
        json!([{"id": id_of(&ja), "name": "Alice", "identity": "alice@example"}]),
        "the token's name overrides the join's"
    );
    let other = a.expect("otherjoin").await;
    assert_eq!(other["identity"], "bob@example");
    assert_eq!(other["name"], "Bob");
}

/// A token minted by PyPI `livekit-api`'s `AccessToken` with `extra` grant
/// keyword arguments (Python literals, e.g. `can_publish=False`).
fn livekit_token(room: &str, identity: &str, name: &str, extra: &[&str]) -> String {
    let script = format!(
        "from livekit import api\n\
         g = api.VideoGrants(room_join=True, room={room:?}{extra})\n\
         print(api.AccessToken({KEY:?}, {SECRET:?}).with_identity({identity:?})\
         .with_name({name:?}).with_grants(g).to_jwt())\n",
        extra = extra.iter().map(|e| format!(", {e}")).collect::<String>(),
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "LiveKit's SDK is needed (pip install -r tests/aiortc/requirements.txt): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

#[tokio::test]
async fn bad_tokens_get_unauthorized_naming_the_reason_and_the_room_is_unharmed() {
    let server = server(keyed()).await;
    let mut a = Client::connect(&server, "alice").await;
    let ja = a
        .join("r", json!({"token": join_token("r", "alice")}))
        .await;
    let mut x = Client::connect(&server, "mallory").await;

    let now = unix_now();
    let mut expired = claims("r", "m");
    expired.exp = now - 120;
    let mut early = claims("r", "m");
    early.nbf = Some(now + 600);
    let mut no_join = claims("r", "m");
    no_join.video.room_join = false;
    let mut unknown_key = claims("r", "m");
    unknown_key.iss = "who".into();
    let forged = sign_with(&"z".repeat(40), &claims("r", "m")).expect("signs");
    let cases: Vec<(Option<String>, &str, &str)> = vec![
        (None, "needs an access token", "missing"),
        (Some("garbage".into()), "not a valid JWT", "malformed"),
        (Some(token(&expired)), "expired", "expired"),
        (Some(token(&early)), "not valid yet", "not-yet-valid"),
        (
            Some(join_token("other", "m")),
            "is for room \"other\"",
            "wrong-room",
        ),
        (Some(token(&unknown_key)), "does not know", "unknown-key"),
        (Some(forged), "signature does not verify", "bad-signature"),
        (Some(token(&no_join)), "roomJoin", "no-room-join"),
    ];
    for (t, says, _) in &cases {
        let message = refused(&mut x, "r", t.as_deref()).await;
        assert!(message.contains(says), "{message:?} should say {says:?}");
    }
    // Nobody in the room heard of mallory, and she holds no TURN credentials.
    a.expect_nothing_pending().await;
    let m = metrics(&server).await;
    for (_, _, label) in &cases {
        assert_eq!(
            metric(
                &m,
                &format!("switchboard_auth_refused_total{{reason=\"{label}\"}}")
            ),
            1.0,
            "{label}"
        );
    }
    assert_eq!(metric(&m, "switchboard_participants"), 1.0);
    // The same connection may then join properly.
    let jx = x.join("r", json!({"token": join_token("r", "m")})).await;
    assert_eq!(jx["peers"][0]["id"], ja["id"]);
}

#[tokio::test]
async fn a_second_join_with_the_same_identity_replaces_the_first() {
    let server = server(keyed()).await;
    let mut a1 = Client::connect(&server, "alice-laptop").await;
    let j1 = a1
        .join("r", json!({"token": join_token("r", "alice")}))
        .await;
    let mut b = Client::connect(&server, "bob").await;
    b.join("r", json!({"token": join_token("r", "bob")})).await;
    a1.expect("otherjoin").await;
    let mut a2 = Client::connect(&server, "alice-phone").await;
    let j2 = a2
        .join("r", json!({"token": join_token("r", "alice")}))
        .await;
    assert_eq!(
        j2["peers"].as_array().map(Vec::len),
        Some(1),
        "only bob: {j2}"
    );
    a1.expect_error("replaced").await;
    let bye = b.expect("bye").await;
    assert_eq!(bye["id"], j1["id"]);
    let other = b.expect("otherjoin").await;
    assert_eq!(other["id"], j2["id"]);
    assert_eq!(other["identity"], "alice");
    // The replaced connection is out of the room: it may not speak there.
    a1.send(json!({"type":"message","room":"r","data":{"hi":1}}))
        .await;
    a1.expect_error("not-in-room").await;
    b.expect_nothing_pending().await;
    assert_eq!(
        metric(&metrics(&server).await, "switchboard_auth_replaced_total"),
        1.0
    );
}

#[tokio::test]
async fn a_hidden_participant_is_invisible() {
    let server = server(keyed()).await;
    let mut a = Client::connect(&server, "alice").await;
    let ja = a
        .join(
            "r",
            json!({"token": join_token("r", "alice"), "mode": "sfu"}),
        )
        .await;
    let mut hidden = claims("r", "recorder");
    hidden.video.hidden = true;
    let mut h = Client::connect(&server, "recorder").await;
    let jh = h.join("r", json!({"token": token(&hidden)})).await;
    assert_eq!(
        jh["peers"][0]["id"], ja["id"],
        "the hidden one sees the room"
    );
    let mut b = Client::connect(&server, "bob").await;
    let jb = b.join("r", json!({"token": join_token("r", "bob")})).await;
    assert_eq!(
        jb["peers"].as_array().map(Vec::len),
        Some(1),
        "only alice is listed: {jb}"
    );
    // Alice hears of bob and of nobody else; the recorder leaving is silent.
    let other = a.expect("otherjoin").await;
    assert_eq!(other["id"], jb["id"]);
    // The hidden one is told of bob like any member.
    assert_eq!(h.expect("otherjoin").await["id"], jb["id"]);
    h.send(json!({"type":"leave","room":"r"})).await;
    h.expect("leaved").await;
    a.expect_nothing_pending().await;
    b.expect_nothing_pending().await;
}

#[tokio::test]
async fn an_auto_room_with_a_member_who_may_not_publish_runs_through_the_server() {
    let server = server(keyed()).await;
    let mut a = Client::connect(&server, "alice").await;
    let ja = a
        .join("r", json!({"token": join_token("r", "alice")}))
        .await;
    assert_eq!(ja["mode"], "p2p");
    let mut viewer = claims("r", "viewer");
    viewer.video.can_publish = Some(false);
    let mut v = Client::connect(&server, "viewer").await;
    v.join("r", json!({"token": token(&viewer)})).await;
    let mode = v.expect("mode").await;
    assert_eq!(
        (mode["mode"].as_str(), mode["reason"].as_str()),
        (Some("sfu"), Some("policy"))
    );
    assert_eq!(a.expect("mode").await["reason"], "policy");
    a.expect("otherjoin").await;
    // Its P2P offers are refused.
    v.send(json!({"type":"message","room":"r","to": ja["id"],"data":{"type":"offer","sdp":"v=0"}}))
        .await;
    let e = v.expect_error("forbidden").await;
    assert!(e["message"]
        .as_str()
        .unwrap_or_default()
        .contains("canPublish"));
    a.expect_nothing_pending().await;
}

// -- grants with real WebRTC peers --------------------------------------------

async fn peer(server: &RunningServer, room: &str, name: &str, token: String) -> Peer {
    let opts = JoinOptions {
        token: Some(token),
        ..JoinOptions::sfu(&server.ws_url(), room, name)
    };
    let mut p = Peer::join(opts).await.expect("joins");
    until_connected(&mut p).await;
    p
}

#[derive(Default)]
struct Seen {
    tracks: HashSet<(String, Kind)>,
    packets: HashMap<(String, Kind), usize>,
    chat: Vec<String>,
    errors: Vec<String>,
    removed: usize,
}

impl Seen {
    fn got(&self, name: &str, kind: Kind) -> usize {
        self.packets
            .get(&(name.to_owned(), kind))
            .copied()
            .unwrap_or(0)
    }

    fn absorb(&mut self, ev: PeerEvent) {
        match ev {
            PeerEvent::TrackAdded {
                stream_id, kind, ..
            } => {
                self.tracks.insert((stream_id, kind));
            }
            PeerEvent::TrackRemoved { .. } => self.removed += 1,
            PeerEvent::Rtp { kind, packet, .. } => {
                if let Some((name, _)) = parse(kind, &packet.payload) {
                    *self.packets.entry((name, kind)).or_default() += 1;
                }
            }
            PeerEvent::Chat(text) => self.chat.push(text),
            PeerEvent::Signal(switchboard_proto::ServerMessage::Error(e)) => {
                self.errors.push(e.code.as_str().to_owned())
            }
            _ => {}
        }
    }
}

/// `rounds` of one audio and one video packet from each of `senders`
/// (index into `peers`, name), 20 ms apart, absorbing everyone's events.
async fn publish(
    peers: &mut [Peer],
    seen: &mut [Seen],
    senders: &[(usize, &str)],
    kinds: &[Kind],
    rounds: u32,
) {
    let start = Instant::now();
    for i in 0..rounds {
        for &(who, name) in senders {
            for &kind in kinds {
                let step = if kind == Kind::Audio { 960 } else { 3000 };
                let _ = peers[who].send_rtp(
                    kind,
                    payload(kind, name, i),
                    kind == Kind::Video,
                    i * step,
                );
            }
        }
        let due = start + Duration::from_millis(20 * u64::from(i + 1));
        drain(peers, seen, due.saturating_duration_since(Instant::now())).await;
    }
    drain(peers, seen, Duration::from_millis(400)).await;
}

async fn drain(peers: &mut [Peer], seen: &mut [Seen], dur: Duration) {
    let end = Instant::now() + dur;
    loop {
        for (p, s) in peers.iter_mut().zip(seen.iter_mut()) {
            while let Some(ev) = p.next_event_within(Duration::from_millis(1)).await {
                s.absorb(ev);
            }
        }
        if Instant::now() >= end {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_decide_who_sends_and_who_receives_media_and_chat() {
    let server = server(keyed()).await;
    let mut viewer = claims("g", "viewer");
    viewer.video.can_publish = Some(false);
    let mut deaf = claims("g", "deaf");
    deaf.video.can_subscribe = Some(false);
    let mut peers = vec![
        peer(&server, "g", "alice", join_token("g", "alice")).await,
        peer(&server, "g", "viewer", token(&viewer)).await,
        peer(&server, "g", "deaf", token(&deaf)).await,
    ];
    let names = [(0, "alice"), (1, "viewer"), (2, "deaf")];
    let both = [Kind::Audio, Kind::Video];
    let mut warmup: Vec<Seen> = (0..3).map(|_| Seen::default()).collect();
    publish(&mut peers, &mut warmup, &names, &both, 50).await;
    let mut seen: Vec<Seen> = (0..3).map(|_| Seen::default()).collect();
    publish(&mut peers, &mut seen, &names, &both, 100).await;
    for (i, s) in seen.iter().enumerate() {
        for (_, from) in names {
            eprintln!(
                "{} <- {from}: audio {}, video {}",
                names[i].1,
                s.got(from, Kind::Audio),
                s.got(from, Kind::Video)
            );
        }
    }
    let [alice, viewer_seen, deaf_seen] = [&seen[0], &seen[1], &seen[2]];
    // canPublish:false: its media reaches nobody.
    assert_eq!(
        alice.got("viewer", Kind::Audio) + alice.got("viewer", Kind::Video),
        0
    );
    assert_eq!(
        deaf_seen.got("viewer", Kind::Audio) + deaf_seen.got("viewer", Kind::Video),
        0
    );
    // canSubscribe:false: it receives nothing, while its own media flows.
    assert!(
        warmup[2].tracks.is_empty() && seen[2].tracks.is_empty(),
        "deaf got tracks"
    );
    assert_eq!(deaf_seen.packets.values().sum::<usize>(), 0);
    assert!(alice.got("deaf", Kind::Audio) >= 90, "alice hears deaf");
    assert!(
        viewer_seen.got("deaf", Kind::Video) >= 90,
        "viewer sees deaf"
    );
    assert!(
        viewer_seen.got("alice", Kind::Audio) >= 90,
        "viewer hears alice"
    );
    assert!(alice.got("viewer", Kind::Audio) == 0 && deaf_seen.got("alice", Kind::Audio) == 0);
    // Chat: the viewer's token says canPublishData false (it defaults to
    // canPublish): dropped, and it is told once.
    peers[1].send_chat("from the viewer").expect("chat");
    peers[1].send_chat("again").expect("chat");
    peers[0].send_chat("from alice").expect("chat");
    drain(&mut peers, &mut seen, Duration::from_millis(800)).await;
    assert_eq!(seen[0].chat.len(), 0, "{:?}", seen[0].chat);
    assert!(
        seen[1].chat.iter().any(|c| c.contains("from alice")),
        "{:?}",
        seen[1].chat
    );
    assert_eq!(seen[1].errors, ["forbidden"], "told once");
}

// -- admin API ----------------------------------------------------------------

/// `method path` with a bearer token and a JSON body against `addr`;
/// returns (status, JSON body or Null).
async fn api(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (status, _, body) = raw_http(addr, &req).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_admin_api_is_off_without_auth() {
    let server = default_server().await;
    let (status, body) = api(server.local_addr(), "GET", "/api/v1/rooms", None, None).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"], "forbidden");
    assert!(body["message"]
        .as_str()
        .unwrap_or_default()
        .contains("--api-key"));
}

#[tokio::test]
async fn admin_api_endpoints_and_their_refusals() {
    let server = server(keyed()).await;
    let addr = server.local_addr();
    let admin = admin_token(None);
    // 401s and 403s.
    assert_eq!(api(addr, "GET", "/api/v1/rooms", None, None).await.0, 401);
    assert_eq!(
        api(addr, "GET", "/api/v1/rooms", Some("nope"), None)
            .await
            .0,
        401
    );
    let plain = join_token("a", "joe");
    let (status, body) = api(addr, "GET", "/api/v1/rooms", Some(&plain), None).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
    assert_eq!(
        api(
            addr,
            "POST",
            "/api/v1/rooms",
            Some(&plain),
            Some(json!({"name":"x"}))
        )
        .await
        .0,
        403
    );
    // Create, conflict, bad body.
    let (status, room) = api(
        addr,
        "POST",
        "/api/v1/rooms",
        Some(&admin),
        Some(json!({"name":"board","mode":"sfu","audio":"forward","maxParticipants":3,"emptyTimeoutS":60})),
    )
    .await;
    assert_eq!(status, 201, "{room}");
    assert_eq!(
        (
            room["name"].as_str(),
            room["mode"].as_str(),
            room["participants"].as_u64()
        ),
        (Some("board"), Some("sfu"), Some(0))
    );
    assert!(room["createdAt"].as_u64().unwrap_or(0) >= unix_now() - 60);
    let again = api(
        addr,
        "POST",
        "/api/v1/rooms",
        Some(&admin),
        Some(json!({"name":"board"})),
    )
    .await;
    assert_eq!((again.0, again.1["error"].as_str()), (409, Some("exists")));
    let bad = api(
        addr,
        "POST",
        "/api/v1/rooms",
        Some(&admin),
        Some(json!({"nom":"x"})),
    )
    .await;
    assert_eq!((bad.0, bad.1["error"].as_str()), (400, Some("bad-request")));
    // The created room waits for its members (it was not freed while empty).
    let mut a = Client::connect(&server, "alice").await;
    let ja = a
        .join("board", json!({"token": join_token("board", "alice")}))
        .await;
    assert_eq!(
        ja["mode"], "sfu",
        "the room keeps the mode it was created with"
    );
    assert_eq!(ja["audio"], "forward");
    let mut b = Client::connect(&server, "bob").await;
    let jb = b
        .join("board", json!({"token": join_token("board", "bob")}))
        .await;
    a.expect("otherjoin").await;
    // List and one room.
    let (status, list) = api(addr, "GET", "/api/v1/rooms", Some(&admin), None).await;
    assert_eq!(status, 200);
    assert_eq!(list["rooms"][0]["name"], "board");
    assert_eq!(list["rooms"][0]["participants"], 2);
    let scoped = admin_token(Some("board"));
    let (status, info) = api(addr, "GET", "/api/v1/rooms/board", Some(&scoped), None).await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = info["participants"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["identity"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, ["alice", "bob"]);
    assert_eq!(
        info["participants"][0]["publishing"],
        json!({"audio": false, "video": false})
    );
    assert_eq!(
        api(addr, "GET", "/api/v1/rooms/nowhere", Some(&admin), None)
            .await
            .0,
        404
    );
    // A roomAdmin scoped to another room may not touch this one.
    let elsewhere = admin_token(Some("other"));
    let mut no_list = claims("", "ops");
    no_list.video = VideoGrant {
        room: Some("other".into()),
        room_admin: true,
        ..Default::default()
    };
    assert_eq!(
        api(
            addr,
            "GET",
            "/api/v1/rooms/board",
            Some(&token(&no_list)),
            None
        )
        .await
        .0,
        403
    );
    assert_eq!(
        api(
            addr,
            "DELETE",
            "/api/v1/rooms/board",
            Some(&elsewhere),
            None
        )
        .await
        .0,
        403
    );
    // Send: to everyone, then to one.
    let (status, _) = api(
        addr,
        "POST",
        "/api/v1/rooms/board/send",
        Some(&admin),
        Some(json!({"data":{"notice":"hello"}})),
    )
    .await;
    assert_eq!(status, 200);
    for c in [&mut a, &mut b] {
        let m = c.expect("message").await;
        assert_eq!(
            (m["from"].as_str(), &m["data"]),
            (Some("server"), &json!({"notice":"hello"}))
        );
    }
    let (status, _) = api(
        addr,
        "POST",
        "/api/v1/rooms/board/send",
        Some(&admin),
        Some(json!({"data":1,"to":[jb["id"]]})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(b.expect("message").await["data"], 1);
    a.expect_nothing_pending().await;
    assert_eq!(
        api(
            addr,
            "POST",
            "/api/v1/rooms/board/send",
            Some(&admin),
            Some(json!({"data":1,"to":["ghost"]}))
        )
        .await
        .0,
        404
    );
    // Mute: bad kind is a 400, a missing participant a 404.
    let path = format!("/api/v1/rooms/board/participants/{}/mute", id_of(&jb));
    assert_eq!(
        api(
            addr,
            "POST",
            &path,
            Some(&admin),
            Some(json!({"kind":"smell","muted":true}))
        )
        .await
        .0,
        400
    );
    assert_eq!(
        api(
            addr,
            "POST",
            "/api/v1/rooms/board/participants/ghost/mute",
            Some(&admin),
            Some(json!({"kind":"audio","muted":true}))
        )
        .await
        .0,
        404
    );
    assert_eq!(
        api(
            addr,
            "POST",
            &path,
            Some(&admin),
            Some(json!({"kind":"audio","muted":true}))
        )
        .await
        .0,
        200
    );
    // Remove bob: he is told, alice gets bye.
    let path = format!("/api/v1/rooms/board/participants/{}", id_of(&jb));
    assert_eq!(api(addr, "DELETE", &path, Some(&admin), None).await.0, 204);
    b.expect_error("removed").await;
    assert_eq!(a.expect("bye").await["id"], jb["id"]);
    assert_eq!(api(addr, "DELETE", &path, Some(&admin), None).await.0, 404);
    // Close the room: alice gets room-closed and nothing else.
    assert_eq!(
        api(addr, "DELETE", "/api/v1/rooms/board", Some(&scoped), None)
            .await
            .0,
        204
    );
    a.expect_error("room-closed").await;
    a.expect_nothing_pending().await;
    assert_eq!(
        api(addr, "GET", "/api/v1/rooms/board", Some(&admin), None)
            .await
            .0,
        404
    );
    let m = metrics(&server).await;
    assert_eq!(metric(&m, "switchboard_rooms"), 0.0);
    assert_eq!(metric(&m, "switchboard_participants"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_mute_and_removal_really_stop_media() {
    let server = server(keyed()).await;
    let addr = server.local_addr();
    let admin = admin_token(None);
    let mut peers = vec![
        peer(&server, "m", "alice", join_token("m", "alice")).await,
        peer(&server, "m", "bob", join_token("m", "bob")).await,
    ];
    let both = [Kind::Audio, Kind::Video];
    let senders = [(0, "alice"), (1, "bob")];
    let mut seen: Vec<Seen> = (0..2).map(|_| Seen::default()).collect();
    publish(&mut peers, &mut seen, &senders, &both, 50).await;
    let (_, info) = api(addr, "GET", "/api/v1/rooms/m", Some(&admin), None).await;
    assert_eq!(
        info["participants"][0]["publishing"],
        json!({"audio": true, "video": true}),
        "{info}"
    );
    let bob_id = peers[1].id.clone();
    // Mute bob's video: alice still hears him but sees nothing of him.
    let path = format!("/api/v1/rooms/m/participants/{bob_id}/mute");
    assert_eq!(
        api(
            addr,
            "POST",
            &path,
            Some(&admin),
            Some(json!({"kind":"video","muted":true}))
        )
        .await
        .0,
        200
    );
    drain(&mut peers, &mut seen, Duration::from_millis(300)).await;
    let mut muted: Vec<Seen> = (0..2).map(|_| Seen::default()).collect();
    publish(&mut peers, &mut muted, &senders, &both, 100).await;
    eprintln!(
        "muted: alice <- bob audio {}, video {}",
        muted[0].got("bob", Kind::Audio),
        muted[0].got("bob", Kind::Video)
    );
    assert_eq!(muted[0].got("bob", Kind::Video), 0);
    assert!(muted[0].got("bob", Kind::Audio) >= 90);
    assert!(
        muted[1].got("alice", Kind::Video) >= 90,
        "alice's video is untouched"
    );
    // Unmute: it flows again.
    assert_eq!(
        api(
            addr,
            "POST",
            &path,
            Some(&admin),
            Some(json!({"kind":"video","muted":false}))
        )
        .await
        .0,
        200
    );
    drain(&mut peers, &mut seen, Duration::from_millis(300)).await;
    let mut unmuted: Vec<Seen> = (0..2).map(|_| Seen::default()).collect();
    publish(&mut peers, &mut unmuted, &senders, &both, 100).await;
    assert!(unmuted[0].got("bob", Kind::Video) >= 90);
    // Remove bob: his tracks end at alice and none of his packets arrive.
    let path = format!("/api/v1/rooms/m/participants/{bob_id}");
    assert_eq!(api(addr, "DELETE", &path, Some(&admin), None).await.0, 204);
    drain(&mut peers, &mut seen, Duration::from_millis(500)).await;
    let mut after: Vec<Seen> = (0..2).map(|_| Seen::default()).collect();
    publish(&mut peers, &mut after, &senders, &both, 100).await;
    assert_eq!(
        after[0].got("bob", Kind::Audio) + after[0].got("bob", Kind::Video),
        0
    );
    assert!(
        seen[0].removed + after[0].removed >= 2,
        "bob's two tracks ended at alice"
    );
    let m = metrics(&server).await;
    assert_eq!(metric(&m, "switchboard_media_connections"), 1.0);
}

// -- metrics listener and protected mode ---------------------------------------

#[tokio::test]
async fn metrics_and_admin_move_to_the_metrics_listener() {
    let server = server(ServeOptions {
        metrics_listen: Some("127.0.0.1:0".parse().expect("addr")),
        admin_token: Some("drain-token".into()),
        ..keyed()
    })
    .await;
    let ops = server.metrics_addr().expect("a metrics listener");
    assert_eq!(http_get(&server, "/metrics").await.0, 404);
    assert_eq!(
        http_request(
            &server,
            "POST",
            "/admin/drain",
            &["Authorization: Bearer drain-token"]
        )
        .await
        .0,
        404
    );
    assert_eq!(http_get(&server, "/healthz").await.0, 200);
    let (status, body) = api(ops, "GET", "/metrics", None, None).await;
    assert_eq!(status, 200);
    let _ = body;
    let mut s = TcpStream::connect(ops).await.expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).await.expect("read");
    assert!(
        text.contains("switchboard_rooms 0"),
        "the metrics are there"
    );
    assert_eq!(api(ops, "GET", "/readyz", None, None).await.0, 200);
    // The admin API stays on the public port.
    assert_eq!(
        api(
            server.local_addr(),
            "GET",
            "/api/v1/rooms",
            Some(&admin_token(None)),
            None
        )
        .await
        .0,
        200
    );
}

#[test]
fn serve_refuses_a_public_address_without_a_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--listen", "0.0.0.0:0", "--media", "false"])
        .env_remove("SWITCHBOARD_API_KEY")
        .env_remove("SWITCHBOARD_NO_AUTH")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--api-key") && err.contains("--no-auth"),
        "{err}"
    );
}
