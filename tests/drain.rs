//! Draining for deploys: `/readyz` turns not-ready at once, new joins are
//! refused with `room-closed`, running rooms go on until they empty or the
//! drain timeout passes, then everyone gets `room-closed` and the server stops.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use switchboard::config::ServeOptions;

#[tokio::test]
async fn a_drain_keeps_running_rooms_refuses_new_joins_and_ends_at_the_timeout() {
    let server = server(ServeOptions {
        drain_timeout_ms: Some(1500),
        ..Default::default()
    })
    .await;
    let mut a = Client::connect(&server, "alice").await;
    let mut b = Client::connect(&server, "bob").await;
    a.join("live", json!({})).await;
    let idb = id_of(&b.join("live", json!({})).await);
    a.expect("otherjoin").await;
    assert_eq!(http_get(&server, "/readyz").await.0, 200);

    server.drain();
    assert_eq!(
        http_get(&server, "/readyz").await,
        (503, "draining\n".to_owned())
    );
    assert_eq!(
        http_get(&server, "/healthz").await.0,
        200,
        "alive while draining"
    );

    // A newcomer is refused; the running call is untouched.
    let mut c = Client::connect(&server, "carol").await;
    c.send(json!({"type":"join","room":"live"})).await;
    assert_eq!(c.expect_error("room-closed").await["request"], "join");
    c.send(json!({"type":"join","room":"other"})).await;
    c.expect_error("room-closed").await;
    a.send(json!({"type":"message","room":"live","to": idb,"data":{"still":"here"}}))
        .await;
    assert_eq!(b.expect("message").await["data"], json!({"still":"here"}));
    a.expect_nothing_pending().await;

    // At the timeout the room is closed for everyone and the server stops.
    for x in [&mut a, &mut b] {
        x.expect_error("room-closed").await;
        match x.next_event().await {
            Event::Closed(code) => assert_eq!(code, Some(1001)),
            other => panic!("expected close, got {other:?}"),
        }
    }
    tokio::time::timeout(WAIT, server.wait())
        .await
        .expect("stops after the drain timeout")
        .expect("clean exit");
}

#[tokio::test]
async fn a_drain_ends_as_soon_as_the_last_participant_leaves() {
    let server = server(ServeOptions {
        drain_timeout_ms: Some(600_000),
        ..Default::default()
    })
    .await;
    let mut a = Client::connect(&server, "alice").await;
    a.join("last", json!({})).await;
    server.drain();
    a.send(json!({"type":"leave","room":"last"})).await;
    a.expect("leaved").await;
    tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .expect("stops long before the 10-minute drain timeout")
        .expect("clean exit");
}

#[tokio::test]
async fn the_admin_drain_endpoint_needs_its_token() {
    let off = default_server().await;
    assert_eq!(
        http_request(&off, "POST", "/admin/drain", &[]).await.0,
        404,
        "off without --admin-token"
    );
    assert_eq!(http_get(&off, "/readyz").await.0, 200);

    let server = server(ServeOptions {
        admin_token: Some("s3cret-token".into()),
        ..Default::default()
    })
    .await;
    // Someone in a call, so the drain has something to wait for.
    let mut a = Client::connect(&server, "alice").await;
    a.join("call", json!({})).await;
    assert_eq!(
        http_request(&server, "POST", "/admin/drain", &[]).await.0,
        401
    );
    let wrong = http_request(
        &server,
        "POST",
        "/admin/drain",
        &["Authorization: Bearer nope"],
    )
    .await;
    assert_eq!(wrong.0, 401);
    assert_eq!(
        http_get(&server, "/readyz").await.0,
        200,
        "a refused call drains nothing"
    );
    let ok = http_request(
        &server,
        "POST",
        "/admin/drain",
        &["Authorization: Bearer s3cret-token"],
    )
    .await;
    assert_eq!(ok, (202, "draining\n".to_owned()));
    assert_eq!(http_get(&server, "/readyz").await.0, 503);
    a.expect_nothing_pending().await;
}
