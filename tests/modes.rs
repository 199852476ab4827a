//! Media modes at the signaling level: auto rooms switch to sfu on a third
//! join or on `p2p-failed`; p2p and sfu rooms keep their mode.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn third_join_switches_an_auto_room_to_sfu_for_everyone() {
    let server = default_server().await;
    let mut a = Client::connect(&server, "alice").await;
    let mut b = Client::connect(&server, "bob").await;
    let mut c = Client::connect(&server, "carol").await;
    assert_eq!(a.join("trio", json!({})).await["mode"], "p2p");
    assert_eq!(b.join("trio", json!({})).await["mode"], "p2p");
    a.expect("otherjoin").await;

    let jc = c.join("trio", json!({})).await;
    assert_eq!(
        jc["mode"], "sfu",
        "the third joiner's joined already says sfu"
    );
    assert_eq!(jc["peers"].as_array().map(Vec::len), Some(2));
    let mode = json!({"type":"mode","room":"trio","mode":"sfu","reason":"third-participant"});
    assert_eq!(
        c.recv().await,
        mode,
        "the joiner gets mode right after joined"
    );
    for x in [&mut a, &mut b] {
        assert_eq!(x.recv().await, mode, "mode comes before otherjoin");
        assert_eq!(x.expect("otherjoin").await["id"], id_of(&jc).as_str());
        x.expect_nothing_pending().await;
    }
    c.expect_nothing_pending().await;

    // Back to two: the room stays sfu (the return-to-p2p option is off).
    c.send(json!({"type":"leave","room":"trio"})).await;
    c.expect("leaved").await;
    a.expect("bye").await;
    b.expect("bye").await;
    let mut d = Client::connect(&server, "dave").await;
    assert_eq!(d.join("trio", json!({})).await["mode"], "sfu");
    d.expect_nothing_pending().await;
    let m = metrics(&server).await;
    assert_eq!(
        metric(
            &m,
            "switchboard_room_mode_switches_total{reason=\"third-participant\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn p2p_failed_switches_both_to_sfu_once() {
    let server = default_server().await;
    let mut a = Client::connect(&server, "alice").await;
    let mut b = Client::connect(&server, "bob").await;
    let ida = id_of(&a.join("pair", json!({})).await);
    let idb = id_of(&b.join("pair", json!({})).await);
    a.expect("otherjoin").await;

    b.send(json!({"type":"p2p-failed","room":"pair","peer": ida}))
        .await;
    let mode = json!({"type":"mode","room":"pair","mode":"sfu","reason":"p2p-failed"});
    assert_eq!(a.recv().await, mode);
    assert_eq!(b.recv().await, mode);

    // Already sfu: accepted silently, no error, no second mode.
    a.send(json!({"type":"p2p-failed","room":"pair","peer": idb}))
        .await;
    a.expect_nothing_pending().await;
    b.expect_nothing_pending().await;
    let m = metrics(&server).await;
    assert_eq!(
        metric(
            &m,
            "switchboard_room_mode_switches_total{reason=\"p2p-failed\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn p2p_failed_in_a_p2p_room_is_accepted_silently() {
    let server = default_server().await;
    let mut a = Client::connect(&server, "alice").await;
    let mut b = Client::connect(&server, "bob").await;
    a.join("fixed", json!({"mode":"p2p"})).await;
    let idb = id_of(&b.join("fixed", json!({})).await);
    a.expect("otherjoin").await;
    a.send(json!({"type":"p2p-failed","room":"fixed","peer": idb}))
        .await;
    a.expect_nothing_pending().await;
    b.expect_nothing_pending().await;
}

#[tokio::test]
async fn a_room_created_sfu_is_sfu_from_the_start_and_keeps_its_settings() {
    let server = default_server().await;
    let mut a = Client::connect(&server, "alice").await;
    let mut b = Client::connect(&server, "bob").await;
    let ja = a.join("big", json!({"mode":"sfu","audio":"forward"})).await;
    assert_eq!(ja["mode"], "sfu");
    assert_eq!(ja["audio"], "forward");
    // Later joiners get the room's values, whatever they ask for.
    let jb = b.join("big", json!({"mode":"p2p","audio":"mix"})).await;
    assert_eq!(jb["mode"], "sfu");
    assert_eq!(jb["audio"], "forward");
    a.expect("otherjoin").await;
    a.expect_nothing_pending().await;
    b.expect_nothing_pending().await;
}

/// `--p2p-return-ms`: a room back to two returns to p2p after the delay,
/// both get `mode` with reason `two-participants`, and a new third switches
/// it to sfu again.
#[tokio::test]
async fn with_the_return_option_a_room_back_to_two_returns_to_p2p() {
    let server = server(switchboard::config::ServeOptions {
        p2p_return_ms: Some(300),
        ..Default::default()
    })
    .await;
    let mut a = Client::connect(&server, "alice").await;
    let mut b = Client::connect(&server, "bob").await;
    let mut c = Client::connect(&server, "carol").await;
    a.join("back", json!({})).await;
    b.join("back", json!({})).await;
    a.expect("otherjoin").await;
    c.join("back", json!({})).await;
    c.expect("mode").await;
    for x in [&mut a, &mut b] {
        assert_eq!(x.expect("mode").await["mode"], "sfu");
        x.expect("otherjoin").await;
    }
    c.send(json!({"type":"leave","room":"back"})).await;
    c.expect("leaved").await;
    let back = json!({"type":"mode","room":"back","mode":"p2p","reason":"two-participants"});
    for x in [&mut a, &mut b] {
        x.expect("bye").await;
        assert_eq!(x.recv().await, back);
        x.expect_nothing_pending().await;
    }
    let mut d = Client::connect(&server, "dave").await;
    let jd = d.join("back", json!({})).await;
    assert_eq!(jd["mode"], "sfu", "a new third switches it again");
    assert_eq!(a.expect("mode").await["reason"], "third-participant");
    let m = metrics(&server).await;
    assert_eq!(
        metric(
            &m,
            "switchboard_room_mode_switches_total{reason=\"two-participants\"}"
        ),
        1.0
    );
}

/// With the option on, a pair that once reported `p2p-failed` stays sfu.
#[tokio::test]
async fn with_the_return_option_a_pair_that_failed_p2p_stays_sfu() {
    let server = server(switchboard::config::ServeOptions {
        p2p_return_ms: Some(100),
        ..Default::default()
    })
    .await;
    let mut a = Client::connect(&server, "alice").await;
    let mut b = Client::connect(&server, "bob").await;
    let mut c = Client::connect(&server, "carol").await;
    a.join("nope", json!({})).await;
    let idb = id_of(&b.join("nope", json!({})).await);
    a.expect("otherjoin").await;
    a.send(json!({"type":"p2p-failed","room":"nope","peer": idb}))
        .await;
    a.expect("mode").await;
    b.expect("mode").await;
    c.join("nope", json!({})).await;
    c.send(json!({"type":"leave","room":"nope"})).await;
    c.expect("leaved").await;
    for x in [&mut a, &mut b] {
        x.expect("otherjoin").await;
        x.expect("bye").await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    a.expect_nothing_pending().await;
    b.expect_nothing_pending().await;
}
