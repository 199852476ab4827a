//! Bad input: each case gets its specific `error` code, the connection stays
//! usable (except sustained flooding), the room is unharmed, and the other
//! participant sees nothing.

mod common;

use common::*;
use serde_json::{json, Value};
use switchboard::config::ServeOptions;
use switchboard::server::RunningServer;
use tokio_tungstenite::tungstenite::Message;

struct Room {
    server: RunningServer,
    a: Client,
    b: Client,
    ida: String,
    idb: String,
}

async fn room_of_two(options: ServeOptions) -> Room {
    let server = server(options).await;
    let mut a = Client::connect(&server, "alice").await;
    let mut b = Client::connect(&server, "bob").await;
    let ida = id_of(&a.join("r", json!({})).await);
    let idb = id_of(&b.join("r", json!({})).await);
    a.expect("otherjoin").await;
    Room {
        server,
        a,
        b,
        ida,
        idb,
    }
}

impl Room {
    /// Alice is still usable, bob saw nothing, and the room still relays.
    async fn unharmed(&mut self) {
        self.a.expect_nothing_pending().await;
        self.b.expect_nothing_pending().await;
        let data = json!({"type":"offer","sdp":"v=0\r\n"});
        self.a
            .send(json!({"type":"message","room":"r","data": data}))
            .await;
        let got = self.b.expect("message").await;
        assert_eq!(got["from"], self.ida.as_str());
        assert_eq!(got["data"], data);
    }

    async fn errors_counted(&self, code: &str) -> f64 {
        let m = metrics(&self.server).await;
        metric(
            &m,
            &format!("switchboard_signaling_errors_total{{code=\"{code}\"}}"),
        )
    }
}

async fn refused(text: &str, code: &str) -> Value {
    let mut r = room_of_two(ServeOptions::default()).await;
    r.a.send_text(text).await;
    let e = r.a.expect_error(code).await;
    assert!(
        !e["message"].as_str().unwrap_or("").is_empty(),
        "errors explain themselves"
    );
    r.unharmed().await;
    assert_eq!(r.errors_counted(code).await, 1.0);
    e
}

#[tokio::test]
async fn invalid_json() {
    refused("{\"type\": \"message\", ", "bad-request").await;
}

#[tokio::test]
async fn json_that_is_not_an_object() {
    refused("[\"join\", \"r\"]", "bad-request").await;
}

#[tokio::test]
async fn unknown_type() {
    refused(r#"{"type":"dance","room":"r"}"#, "unknown-type").await;
}

#[tokio::test]
async fn missing_field() {
    let e = refused(r#"{"type":"message","room":"r"}"#, "bad-request").await;
    assert_eq!(e["request"], "message");
}

#[tokio::test]
async fn mistyped_field() {
    let e = refused(
        r#"{"type":"message","room":"r","to":42,"data":{}}"#,
        "bad-request",
    )
    .await;
    assert_eq!(e["request"], "message");
}

#[tokio::test]
async fn illegal_room_name() {
    let mut r = room_of_two(ServeOptions::default()).await;
    let mut c = Client::connect(&r.server, "carol").await;
    for bad in ["no spaces", "", "slash/es", "ümlaut"] {
        c.send(json!({"type":"join","room": bad})).await;
        let e = c.expect_error("bad-request").await;
        assert_eq!(e["request"], "join");
    }
    c.expect_nothing_pending().await;
    r.unharmed().await;
}

#[tokio::test]
async fn too_long_room_name() {
    let mut r = room_of_two(ServeOptions::default()).await;
    let mut c = Client::connect(&r.server, "carol").await;
    c.send(json!({"type":"join","room": "x".repeat(129)})).await;
    c.expect_error("bad-request").await;
    // 128 is the longest allowed.
    c.join(&"x".repeat(128), json!({})).await;
    r.unharmed().await;
}

#[tokio::test]
async fn frame_over_the_limit() {
    let mut r = room_of_two(ServeOptions::default()).await;
    let big =
        json!({"type":"message","room":"r","data":{"type":"offer","sdp": "a".repeat(70_000)}});
    r.a.send(big).await;
    r.a.expect_error("too-large").await;
    r.unharmed().await;
    // Just under the limit is fine.
    let sdp = "a".repeat(65_536 - 200);
    r.a.send(json!({"type":"message","room":"r","data":{"type":"offer","sdp": sdp}}))
        .await;
    assert_eq!(
        r.b.expect("message").await["data"]["sdp"]
            .as_str()
            .map(str::len),
        Some(sdp.len())
    );
    assert_eq!(r.errors_counted("too-large").await, 1.0);
}

#[tokio::test]
async fn binary_frame() {
    let mut r = room_of_two(ServeOptions::default()).await;
    r.a.send_raw(Message::binary(vec![1u8, 2, 3])).await;
    r.a.expect_error("bad-request").await;
    r.unharmed().await;
}

#[tokio::test]
async fn message_before_join() {
    let mut r = room_of_two(ServeOptions::default()).await;
    let mut c = Client::connect(&r.server, "carol").await;
    c.send(json!({"type":"message","room":"r","data":{"x":1}}))
        .await;
    assert_eq!(c.expect_error("not-in-room").await["request"], "message");
    c.send(json!({"type":"leave","room":"r"})).await;
    c.expect_error("not-in-room").await;
    c.send(json!({"type":"p2p-failed","room":"r","peer": r.ida}))
        .await;
    c.expect_error("not-in-room").await;
    c.expect_nothing_pending().await;
    r.unharmed().await;
}

#[tokio::test]
async fn message_naming_a_room_that_is_not_yours() {
    let mut r = room_of_two(ServeOptions::default()).await;
    r.a.send(json!({"type":"message","room":"other","data":{"x":1}}))
        .await;
    r.a.expect_error("not-in-room").await;
    r.a.send(json!({"type":"leave","room":"other"})).await;
    r.a.expect_error("not-in-room").await;
    r.unharmed().await;
}

#[tokio::test]
async fn message_to_an_unknown_peer() {
    let mut r = room_of_two(ServeOptions::default()).await;
    r.a.send(json!({"type":"message","room":"r","to":"nobody","data":{"x":1}}))
        .await;
    r.a.expect_error("no-such-peer").await;
    let ida = r.ida.clone();
    r.a.send(json!({"type":"message","room":"r","to": ida,"data":{"x":1}}))
        .await;
    r.a.expect_error("no-such-peer").await;
    r.a.send(json!({"type":"p2p-failed","room":"r","peer":"nobody"}))
        .await;
    r.a.expect_error("no-such-peer").await;
    r.unharmed().await;
    // Nothing switched.
    let m = metrics(&r.server).await;
    assert_eq!(
        metric(
            &m,
            "switchboard_room_mode_switches_total{reason=\"p2p-failed\"}"
        ),
        0.0
    );
}

#[tokio::test]
async fn data_for_the_sfu_that_is_not_signaling() {
    let mut r = room_of_two(ServeOptions::default()).await;
    r.a.send(json!({"type":"message","room":"r","to":"sfu","data":{"hello":"server"}}))
        .await;
    assert_eq!(r.a.expect_error("bad-request").await["request"], "message");
    r.unharmed().await;
}

#[tokio::test]
async fn an_invalid_sdp_offer_to_the_sfu() {
    let mut r = room_of_two(ServeOptions::default()).await;
    r.a.send(json!({"type":"message","room":"r","to":"sfu","data":{"type":"offer","sdp":"this is not SDP"}})).await;
    let e = r.a.expect_error("bad-request").await;
    assert!(e["message"].as_str().unwrap_or("").contains("offer"), "{e}");
    r.unharmed().await;
    let m = metrics(&r.server).await;
    assert_eq!(
        metric(&m, "switchboard_media_connections"),
        0.0,
        "the failed connection was freed"
    );
}

#[tokio::test]
async fn the_sfu_peer_on_a_signaling_only_server() {
    // `--media false`: no server media peer, so "sfu" is nobody.
    let mut r = room_of_two(ServeOptions {
        media: Some(false),
        ..Default::default()
    })
    .await;
    r.a.send(
        json!({"type":"message","room":"r","to":"sfu","data":{"type":"offer","sdp":"v=0\r\n"}}),
    )
    .await;
    r.a.expect_error("no-such-peer").await;
    r.unharmed().await;
}

#[tokio::test]
async fn join_while_in_a_room() {
    let mut r = room_of_two(ServeOptions::default()).await;
    r.a.send(json!({"type":"join","room":"r2"})).await;
    assert_eq!(r.a.expect_error("already-in-room").await["request"], "join");
    r.unharmed().await;
}

#[tokio::test]
async fn bad_ping_id() {
    refused(r#"{"type":"ping","id":{"x":1}}"#, "bad-request").await;
}

#[tokio::test]
async fn over_the_rate_limit_then_recovering() {
    // 2 messages/s refill, so the few milliseconds the burst takes refill at
    // most one token even on a slow machine.
    let mut r = room_of_two(ServeOptions {
        rate_limit: Some(2.0),
        rate_burst: Some(10),
        ..Default::default()
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(600)).await; // refill the join's token
    for i in 0..15 {
        r.a.send(json!({"type":"ping","id": i})).await;
    }
    let mut pongs = 0;
    let mut limited = 0;
    for _ in 0..15 {
        let v = r.a.recv().await;
        match v["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") if v["code"] == "rate-limited" => limited += 1,
            _ => panic!("unexpected {v}"),
        }
    }
    assert!(
        (10..=11).contains(&pongs),
        "the burst of 10 is allowed, got {pongs}"
    );
    assert_eq!(pongs + limited, 15, "every refused message is answered");
    // A short overshoot is forgiven: once tokens refill the connection works.
    tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
    r.unharmed().await;
}

#[tokio::test]
async fn sustained_flooding_closes_the_connection_and_nobody_else_is_hurt() {
    let mut r = room_of_two(ServeOptions {
        rate_limit: Some(20.0),
        rate_burst: Some(10),
        ..Default::default()
    })
    .await;
    let flood = json!({"type":"message","room":"r","data":{"spam":true}}).to_string();
    // Bounded: at most 2000 frames; the server closes long before.
    for _ in 0..2000 {
        if tokio::time::timeout(std::time::Duration::from_secs(2), r.a.send_raw_ok(&flood))
            .await
            .map_or(true, |ok| !ok)
        {
            break;
        }
    }
    // Alice sees rate-limited errors, then the close.
    let mut limited = 0;
    let closed = loop {
        match r.a.next_event().await {
            Event::Msg(v) if v["code"] == "rate-limited" => limited += 1,
            Event::Msg(v) => panic!("unexpected {v}"),
            Event::Closed(code) => break code,
            Event::Error(_) | Event::End => break None,
        }
    };
    assert!(limited > 0);
    if let Some(code) = closed {
        assert_eq!(code, 1008, "policy violation");
    }
    // Bob got the burst alice was allowed, then her bye; nothing more.
    let mut relayed = 0;
    loop {
        let v = r.b.recv().await;
        match v["type"].as_str() {
            Some("message") => relayed += 1,
            Some("bye") => {
                assert_eq!(v["id"], r.ida.as_str());
                break;
            }
            _ => panic!("unexpected {v}"),
        }
    }
    assert!(
        relayed <= 10 + 2,
        "at most the burst got through, got {relayed}"
    );
    r.b.expect_nothing_pending().await;
    let m = metrics(&r.server).await;
    assert_eq!(
        metric(
            &m,
            "switchboard_signaling_disconnects_total{reason=\"rate-limit\"}"
        ),
        1.0
    );
    // The room lives on with bob in it.
    let mut c = Client::connect(&r.server, "carol").await;
    let jc = c.join("r", json!({})).await;
    assert_eq!(
        jc["peers"],
        json!([{"id": r.idb, "name": "bob", "identity": null}])
    );
}

#[tokio::test]
async fn an_offer_with_no_common_codec() {
    let mut r = room_of_two(ServeOptions::default()).await;
    // A well-formed offer whose only media section carries a codec nobody
    // here speaks.
    let sdp = "v=0\r\n\
o=- 4611731400430051336 2 IN IP4 127.0.0.1\r\n\
s=-\r\n\
t=0 0\r\n\
a=group:BUNDLE 0\r\n\
a=msid-semantic: WMS\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\
c=IN IP4 0.0.0.0\r\n\
a=rtcp:9 IN IP4 0.0.0.0\r\n\
a=ice-ufrag:abcd\r\n\
a=ice-pwd:abcdefghijklmnopqrstuvwx\r\n\
a=fingerprint:sha-256 9A:5B:3C:7E:2F:11:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD\r\n\
a=setup:actpass\r\n\
a=mid:0\r\n\
a=sendrecv\r\n\
a=rtcp-mux\r\n\
a=rtpmap:111 NOSUCHCODEC/8000\r\n";
    r.a.send(json!({"type":"message","room":"r","to":"sfu","data":{"type":"offer","sdp": sdp}}))
        .await;
    let e = r.a.expect_error("bad-request").await;
    assert!(
        e["message"]
            .as_str()
            .unwrap_or("")
            .contains("no codec in common"),
        "{e}"
    );
    let m = metrics(&r.server).await;
    assert_eq!(
        metric(&m, "switchboard_media_connections"),
        0.0,
        "nothing is kept for it"
    );
    r.unharmed().await;
}
