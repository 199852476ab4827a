//! Signaling protocol v1 against the real server on 127.0.0.1:0, with real
//! WebSocket clients. Every server frame is schema-checked by the harness.

mod common;

use common::*;
use serde_json::json;
use switchboard::config::ServeOptions;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

#[tokio::test]
async fn the_classic_p2p_room_flow() {
    let server = default_server().await;
    let mut a = Client::connect(&server, "alice").await;
    let mut b = Client::connect(&server, "bob").await;
    let mut c = Client::connect(&server, "carol").await;

    let ja = a.join("demo", json!({"mode":"p2p"})).await;
    assert_eq!(ja["peers"], json!([]));
    assert_eq!(ja["mode"], "p2p");
    assert_eq!(ja["room"], "demo");
    assert_eq!(ja["protocol"], 1);
    assert_eq!(ja["p2pTimeoutMs"], 5000);
    assert_eq!(ja["audio"], "mix");
    let ida = id_of(&ja);

    let jb = b.join("demo", json!({})).await;
    let idb = id_of(&jb);
    assert_ne!(ida, idb);
    assert_eq!(
        jb["peers"],
        json!([{"id": ida, "name": "alice", "identity": null}])
    );
    assert_eq!(jb["mode"], "p2p");
    let other = a.expect("otherjoin").await;
    assert_eq!(
        other,
        json!({"type":"otherjoin","room":"demo","id": idb,"name":"bob","identity":null})
    );

    // A p2p room holds two.
    c.send(json!({"type":"join","room":"demo","name":"carol"}))
        .await;
    assert_eq!(c.recv().await, json!({"type":"full","room":"demo"}));
    // Carol was not admitted, so she may join elsewhere and nobody heard of her.
    a.expect_nothing_pending().await;
    b.expect_nothing_pending().await;

    // Broadcast: the one already there offers; a forged `from` is ignored.
    let offer = json!({"type":"offer","sdp":"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n"});
    a.send(json!({"type":"message","room":"demo","from":"someone-else","data": offer}))
        .await;
    let got = b.expect("message").await;
    assert_eq!(
        got,
        json!({"type":"message","room":"demo","from": ida,"data": offer})
    );
    // Unicast with `to`, the answer and a candidate, data verbatim.
    let answer = json!({"type":"answer","sdp":"v=0\r\n","extra":{"z":1,"a":[1,2]}});
    b.send(json!({"type":"message","room":"demo","to": ida,"data": answer}))
        .await;
    assert_eq!(a.expect("message").await["data"], answer);
    let cand = json!({"type":"candidate","label":0,"id":"0","candidate":"candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host"});
    b.send(json!({"type":"message","room":"demo","to": ida,"data": cand}))
        .await;
    let got = a.expect("message").await;
    assert_eq!(got["from"], idb.as_str());
    assert_eq!(got["data"], cand);
    a.expect_nothing_pending().await;
    b.expect_nothing_pending().await;

    // Leave: `leaved` to the leaver, `bye` to the other.
    a.send(json!({"type":"leave","room":"demo"})).await;
    assert_eq!(
        a.recv().await,
        json!({"type":"leaved","room":"demo","id": ida})
    );
    assert_eq!(
        b.recv().await,
        json!({"type":"bye","room":"demo","id": ida})
    );

    // The same connection may join again and gets a new id.
    let again = a.join("demo", json!({})).await;
    assert_ne!(id_of(&again), ida);
    assert_eq!(
        again["peers"],
        json!([{"id": idb, "name": "bob", "identity": null}])
    );
    b.expect("otherjoin").await;

    // Carol, refused before, can still use her connection.
    c.expect_nothing_pending().await;
    c.join("elsewhere", json!({})).await;
}

#[tokio::test]
async fn a_dropped_tcp_connection_says_bye() {
    let server = default_server().await;
    let mut a = Client::connect(&server, "alice").await;
    let mut b = Client::connect(&server, "bob").await;
    a.join("drop", json!({})).await;
    let idb = id_of(&b.join("drop", json!({})).await);
    a.expect("otherjoin").await;
    b.drop_abruptly();
    assert_eq!(
        a.recv().await,
        json!({"type":"bye","room":"drop","id": idb})
    );
}

/// A peer that vanishes without closing TCP (cable pulled, phone asleep) is
/// found by the server's WebSocket pings. A proxy in the middle stops
/// forwarding in both directions but keeps both sockets open.
#[tokio::test]
async fn a_vanished_peer_is_detected_by_websocket_ping() {
    let server = server(ServeOptions {
        ws_ping_interval_ms: Some(300),
        ws_timeout_ms: Some(1500),
        ..Default::default()
    })
    .await;
    let proxy = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
    let proxy_addr = proxy.local_addr().expect("addr");
    let upstream = server.local_addr();
    let (freeze, frozen) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let (client, _) = proxy.accept().await.expect("accept");
        let server = TcpStream::connect(upstream).await.expect("upstream");
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        tokio::spawn(pump(cr, sw, frozen.clone()));
        tokio::spawn(pump(sr, cw, frozen));
    });

    let mut a = Client::connect(&server, "alice").await;
    a.join("vanish", json!({})).await;
    let mut b = Client::connect_url(&format!("ws://{proxy_addr}/ws"), "bob").await;
    let idb = id_of(&b.join("vanish", json!({})).await);
    a.expect("otherjoin").await;

    freeze.send(true).expect("freeze");
    // Keep bob's socket alive (not dropped) while alice waits for the bye.
    let bye = a.recv().await;
    assert_eq!(bye, json!({"type":"bye","room":"vanish","id": idb}));
    drop(b);
    let m = metrics(&server).await;
    assert_eq!(
        metric(
            &m,
            "switchboard_signaling_disconnects_total{reason=\"timeout\"}"
        ),
        1.0
    );
}

/// Copies bytes until `frozen`; from then on holds both sockets open and
/// forwards nothing.
async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    frozen: tokio::sync::watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16384];
    loop {
        let n = match tokio::io::AsyncReadExt::read(&mut r, &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if *frozen.borrow() {
            let _keep_open = (r, w);
            std::future::pending::<()>().await;
            return;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
