//! `/socket.io/` at the signaling level, with a raw Engine.IO client that
//! speaks both protocol revisions (EIO=3, what socket.io-client 1.x/2.x and
//! the Android client speak; EIO=4, socket.io-client 3.x/4.x) over the
//! WebSocket transport: the classic events and their positional arguments,
//! numeric rooms, classic and `/ws` participants in one room, the relay
//! policies, and hostile input, which is counted and harms nobody. The
//! media side is in `tests/browser.rs` (real browsers with the official
//! clients) and `tests/socketio_relay.rs` (aiortc).

mod common;

use std::time::Duration;

use common::classic::{Raw, Seen};
use common::{metric, metrics, server, Client};
use futures_util::SinkExt;
use serde_json::json;
use switchboard::config::{Relay, ServeOptions};
use tokio_tungstenite::tungstenite::Message;

fn with_relay(relay: Relay) -> ServeOptions {
    ServeOptions {
        socketio_relay: Some(relay),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_events_work_over_both_revisions_with_numeric_rooms_and_ws_peers() {
    let server = server(with_relay(Relay::Auto)).await;
    // EIO 3 and a number for a room: the room "4711".
    let mut old = Raw::connect(&server, 3, "old").await;
    old.emit(json!(["join", 4711])).await;
    let joined = old.expect("joined").await;
    assert_eq!(joined[0], "4711");
    let old_id = joined[1].as_str().expect("id").to_owned();
    // A /ws client in the same room sees an ordinary participant.
    let mut ws = Client::connect(&server, "ws").await;
    let j = ws.join("4711", json!({})).await;
    assert_eq!(j["peers"][0]["id"], old_id.as_str());
    let ws_id = j["id"].as_str().expect("id").to_owned();
    let other = old.expect("otherjoin").await;
    assert_eq!(other, vec![json!("4711"), json!(ws_id)]);
    // The one already there offers: message(room, data) reaches the /ws peer
    // as the old server relayed it, and back.
    let offer = json!({"type":"offer","sdp":"v=0\r\n"});
    old.emit(json!(["message", "4711", offer])).await;
    let m = ws.expect("message").await;
    assert_eq!(
        (m["from"].as_str(), &m["data"]),
        (Some(old_id.as_str()), &offer)
    );
    let cand = json!({"type":"candidate","label":0,"id":"0","candidate":"candidate:1 1 udp 1 127.0.0.1 9 typ host"});
    ws.send(json!({"type":"message","room":"4711","data": cand}))
        .await;
    assert_eq!(old.expect("message").await, vec![json!("4711"), cand]);
    // An EIO 4 client in another room, by name.
    let mut new = Raw::connect(&server, 4, "new").await;
    new.emit(json!(["join", "other-room"])).await;
    assert_eq!(new.expect("joined").await[0], "other-room");
    // Leaving: leaved(room, id) to it, bye(room, id) to the others.
    old.emit(json!(["leave", "4711"])).await;
    assert_eq!(
        old.expect("leaved").await,
        vec![json!("4711"), json!(old_id)]
    );
    let bye = ws.expect("bye").await;
    assert_eq!(bye["id"], old_id.as_str());
    // Its place is free at once: it joins again with a new id.
    old.emit(json!(["join", "4711"])).await;
    let again = old.expect("joined").await;
    assert_ne!(again[1], json!(old_id));
    let oj = ws.expect("otherjoin").await;
    assert_eq!(oj["id"], again[1]);
    // A vanished classic client is a bye for the others.
    drop(old);
    let bye = ws.expect("bye").await;
    assert_eq!(bye["id"], again[1]);
    new.expect_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auto_a_third_joiner_moves_both_classic_clients_to_the_server() {
    let server = server(with_relay(Relay::Auto)).await;
    let mut a = Raw::connect(&server, 3, "a").await;
    let mut b = Raw::connect(&server, 4, "b").await;
    a.emit(json!(["join", "room-auto"])).await;
    let a_id = a.expect("joined").await[1].clone();
    b.emit(json!(["join", "room-auto"])).await;
    let b_id = b.expect("joined").await[1].clone();
    assert_eq!(a.expect("otherjoin").await[1], b_id);
    // The third: its own joined, then the server as its peer.
    let mut c = Raw::connect(&server, 4, "c").await;
    c.emit(json!(["join", "room-auto"])).await;
    c.expect("joined").await;
    assert_eq!(
        c.expect("otherjoin").await,
        vec![json!("room-auto"), json!("sfu")]
    );
    // The two: bye for each other, then otherjoin "sfu" — exactly that, in
    // that order (no otherjoin for the third: the server is their peer).
    assert_eq!(a.expect("bye").await[1], b_id);
    assert_eq!(a.expect("otherjoin").await[1], "sfu");
    assert_eq!(b.expect("bye").await[1], a_id);
    assert_eq!(b.expect("otherjoin").await[1], "sfu");
    // From now on their messages go to the server: an offer it cannot
    // parse is its business, not the others'.
    a.emit(json!(["message", "room-auto", {"type":"candidate","label":0,"id":"0","candidate":""}]))
        .await;
    b.expect_quiet().await;
    c.expect_quiet().await;
    // Someone leaving is not a bye for a relayed client (its peer is the
    // server, which stays).
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.expect_quiet().await;
    b.expect_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_never_a_classic_client_gets_full_where_it_needs_the_server_and_always_relays_from_the_start(
) {
    let server_never = server(with_relay(Relay::Never)).await;
    let mut a = Raw::connect(&server_never, 4, "a").await;
    let mut b = Raw::connect(&server_never, 3, "b").await;
    let mut c = Raw::connect(&server_never, 4, "c").await;
    a.emit(json!(["join", "two"])).await;
    a.expect("joined").await;
    b.emit(json!(["join", "two"])).await;
    b.expect("joined").await;
    a.expect("otherjoin").await;
    c.emit(json!(["join", "two"])).await;
    let full = c.expect("full").await;
    assert_eq!(full[0], "two");
    a.expect_quiet().await;
    b.expect_quiet().await;
    // A place freed by leave is free again at once.
    b.emit(json!(["leave", "two"])).await;
    b.expect("leaved").await;
    a.expect("bye").await;
    c.emit(json!(["join", "two"])).await;
    c.expect("joined").await;
    a.expect("otherjoin").await;

    // A room the server already carries (a /ws participant asked for
    // `sfu`, or three /ws participants made it so) refuses it with `full`
    // alone: no `joined`, and the members never see it come and go.
    let mut host = Client::connect(&server_never, "host").await;
    host.join("onserver", json!({"mode": "sfu"})).await;
    let mut d = Raw::connect(&server_never, 4, "d").await;
    d.emit(json!(["join", "onserver"])).await;
    assert_eq!(d.expect("full").await[0], "onserver");
    d.expect_quiet().await;
    // A /ws pair in an `auto` room: a never-relayed third would take it to
    // the server, so it is refused and the pair stays P2P.
    let mut p = Client::connect(&server_never, "p").await;
    let mut q = Client::connect(&server_never, "q").await;
    p.join("pair", json!({})).await;
    assert_eq!(q.join("pair", json!({})).await["mode"], "p2p");
    p.expect("otherjoin").await;
    d.emit(json!(["join", "pair"])).await;
    assert_eq!(d.expect("full").await[0], "pair");
    host.expect_nothing_pending().await;
    p.expect_nothing_pending().await;
    q.expect_nothing_pending().await;

    let server_always = server(with_relay(Relay::Always)).await;
    let mut solo = Raw::connect(&server_always, 3, "solo").await;
    solo.emit(json!(["join", "r"])).await;
    solo.expect("joined").await;
    assert_eq!(
        solo.expect("otherjoin").await,
        vec![json!("r"), json!("sfu")]
    );
    // A /ws participant that comes in sees an SFU room.
    let mut ws = Client::connect(&server_always, "ws").await;
    let j = ws.join("r", json!({})).await;
    assert_eq!(j["mode"], "sfu");
    solo.expect_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_classic_input_is_counted_changes_nothing_and_a_flood_is_cut_off() {
    let server = server(ServeOptions {
        max_frame_bytes: Some(2048),
        rate_limit: Some(20.0),
        rate_burst: Some(40),
        ..with_relay(Relay::Auto)
    })
    .await;
    let mut bad = Raw::connect(&server, 4, "bad").await;
    bad.emit(json!(["join", "victim"])).await;
    let bad_id = bad.expect("joined").await[1].clone();
    let mut ws = Client::connect(&server, "ws").await;
    ws.join("victim", json!({})).await;
    bad.expect("otherjoin").await;
    // Each of these is dropped, counted by reason, and relays nothing.
    bad.emit(json!(["message", {"type":"offer","sdp":"x"}]))
        .await; // no room argument
    bad.emit(json!(["join"])).await; // no room
    bad.emit(json!(["join", {"room": "x"}])).await; // not a room
    bad.emit(json!(["join", "bad room!"])).await; // illegal name
    bad.emit(json!(["hello", 1, 2])).await; // not a classic event
    bad.emit(json!(["join", "elsewhere"])).await; // already in a room
    bad.emit(json!(["message", "elsewhere", {"type":"offer","sdp":"x"}]))
        .await; // not its room
    bad.emit(json!(["leave", "elsewhere"])).await;
    let big = "x".repeat(4000);
    bad.emit(json!(["message", "victim", {"type":"offer","sdp": big}]))
        .await;
    // A good message still goes through, and is the first thing the /ws
    // peer gets: nothing of the above reached it.
    bad.emit(json!(["message", "victim", {"type":"offer","sdp":"ok"}]))
        .await;
    let m = ws.expect("message").await;
    assert_eq!(m["data"]["sdp"], "ok");
    ws.expect_nothing_pending().await;
    let text = metrics(&server).await;
    let dropped = |why: &str| {
        metric(
            &text,
            &format!("switchboard_socketio_dropped_total{{reason=\"{why}\"}}"),
        )
    };
    assert_eq!(dropped("malformed"), 4.0, "{text}");
    assert_eq!(dropped("unknown-event"), 1.0);
    assert_eq!(dropped("wrong-room"), 3.0);
    assert_eq!(dropped("too-large"), 1.0);
    assert_eq!(metric(&text, "switchboard_socketio_connections"), 1.0);

    // A flood: past the burst events are dropped, then the connection is
    // closed; the room sees the flooder leave and lives on.
    for i in 0..400 {
        if !bad.send_raw(&format!("42[\"hello\",{i}]")).await {
            break;
        }
    }
    let mut closed = false;
    for _ in 0..50 {
        if bad.next().await == Seen::Closed {
            closed = true;
            break;
        }
    }
    assert!(closed, "a flooding classic client is disconnected");
    let bye = ws.expect("bye").await;
    assert_eq!(bye["id"], bad_id);
    let text = metrics(&server).await;
    assert!(dropped_after(&text, "rate-limited") > 0.0, "{text}");
    assert_eq!(metric(&text, "switchboard_socketio_connections"), 0.0);
    // The room is unharmed: a new participant joins and talks to the one there.
    let mut next = Raw::connect(&server, 3, "next").await;
    next.emit(json!(["join", "victim"])).await;
    let next_id = next.expect("joined").await[1].clone();
    ws.expect("otherjoin").await;
    // A packet that is not Socket.IO at all is a protocol error: that
    // connection ends (as a WebSocket protocol error ends a /ws one), the
    // others see a bye.
    assert!(next.send_raw("42not json").await);
    assert_eq!(next.next().await, Seen::Closed);
    assert_eq!(ws.expect("bye").await["id"], next_id);
    // A binary event (attachments to follow) is refused: classic clients
    // send none, and the server holds none. The connection ends; the room
    // sees a bye and nothing else.
    let mut binary = Raw::connect(&server, 4, "binary").await;
    binary.emit(json!(["join", "victim"])).await;
    let binary_id = binary.expect("joined").await[1].clone();
    assert_eq!(ws.expect("otherjoin").await["id"], binary_id);
    assert!(
        binary
            .send_raw(r#"451-["message","victim",{"_placeholder":true,"num":0}]"#)
            .await
    );
    let _ = binary.ws.send(Message::binary(vec![0u8; 1000])).await;
    assert_eq!(binary.next().await, Seen::Closed);
    assert_eq!(ws.expect("bye").await["id"], binary_id);
    ws.expect_nothing_pending().await;
}

fn dropped_after(text: &str, why: &str) -> f64 {
    metric(
        text,
        &format!("switchboard_socketio_dropped_total{{reason=\"{why}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_answers_cross_origin_pages_and_foreign_origins_are_refused_when_listed() {
    let open = server(ServeOptions::default()).await;
    let req = "GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\nOrigin: http://pages.example\r\nConnection: close\r\n\r\n";
    let (status, head, body) = common::raw_http(open.local_addr(), req).await;
    assert_eq!(status, 200, "{head}{body}");
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains("access-control-allow-origin: http://pages.example"),
        "{head}"
    );
    assert!(body.contains("\"sid\""), "an Engine.IO open packet: {body}");

    let listed = server(ServeOptions {
        allowed_origins: Some(vec!["http://good.example".into()]),
        ..Default::default()
    })
    .await;
    let (_, head, _) = common::raw_http(
        listed.local_addr(),
        &req.replace("pages.example", "evil.example"),
    )
    .await;
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("access-control-allow-origin"),
        "{head}"
    );
    // Over WebSocket (no CORS), a foreign origin is refused at connect.
    let url = format!(
        "ws://{}/socket.io/?EIO=4&transport=websocket",
        listed.local_addr()
    );
    let mut rq = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        url.as_str(),
    )
    .expect("request");
    rq.headers_mut()
        .insert("origin", "http://evil.example".parse().expect("header"));
    let (ws, _) = tokio_tungstenite::connect_async(rq)
        .await
        .expect("connects");
    let mut raw = Raw {
        ws,
        eio: 4,
        name: "evil",
    };
    assert!(raw.frame().await.expect("open").starts_with('0'));
    raw.ws.send(Message::text("40")).await.expect("send");
    // The namespace connect is refused with a connect_error (what a client
    // library reports as `connect_error`), never a connect.
    let refusal = raw.frame().await.expect("a connect_error packet");
    assert!(
        refusal.starts_with("44") && refusal.contains("origin not allowed"),
        "a foreign origin is not served, got {refusal}"
    );
}
