//! Simulcast from our Rust client (`JoinOptions::simulcast`) through the
//! in-process server, on 127.0.0.1: what a subscriber sees of a publisher
//! that sends three layers, what the server counts, and the edges (four
//! rids refused, a rid that never sends).
//!
//! The publisher sends synthetic VP8: one packet a frame and layer, 30
//! frames a second, each layer with its own picture size in its keyframes
//! (320x180, 640x360, 1280x720: what the server ranks layers by) and its
//! own payload size (1:3:9: what its bitrate measurement sees). Every
//! payload names its layer and frame, so the subscriber can tell which
//! layer each packet it receives came from.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::media::until_connected;
use common::*;
use switchboard::config::ServeOptions;
use switchboard::server::RunningServer;
use switchboard_client::{Client, Event, JoinOptions, Kind};
use switchboard_proto::{ErrorCode, ServerMessage};

const RIDS: [&str; 3] = ["q", "h", "f"];
/// Picture size each layer's keyframes declare.
const SIZES: [(u16, u16); 3] = [(320, 180), (640, 360), (1280, 720)];
/// Payload bytes of each layer's packets (1:3:9).
const BODY: [usize; 3] = [100, 300, 900];
/// One frame every this long (30 fps).
const FRAME: Duration = Duration::from_millis(33);
/// A keyframe every this many frames, on every layer (and on request).
const GOP: u32 = 30;

fn rids() -> Vec<String> {
    RIDS.iter().map(|r| (*r).to_owned()).collect()
}

/// One layer's packet of frame `frame`: VP8 payload descriptor (X, I, M:
/// 15-bit picture id), the VP8 frame tag (a keyframe's with the start code
/// and the layer's size), then `SC`, the layer index, the frame number, and
/// a filler that depends on both, up to the layer's size.
fn payload(layer: usize, frame: u32, keyframe: bool) -> Bytes {
    let mut p = Vec::with_capacity(BODY[layer]);
    let pid = (frame & 0x7fff) as u16;
    p.extend_from_slice(&[0x90, 0x80, 0x80 | (pid >> 8) as u8, pid as u8]);
    if keyframe {
        let (w, h) = SIZES[layer];
        p.extend_from_slice(&[0x10, 0x00, 0x00, 0x9d, 0x01, 0x2a]);
        p.extend_from_slice(&w.to_le_bytes());
        p.extend_from_slice(&h.to_le_bytes());
    } else {
        p.extend_from_slice(&[0x11, 0x00, 0x00]);
    }
    p.extend_from_slice(b"SC");
    p.push(layer as u8);
    p.extend_from_slice(&frame.to_be_bytes());
    let start = p.len();
    p.extend((start..BODY[layer]).map(|i| filler(i, layer, frame)));
    Bytes::from(p)
}

fn filler(i: usize, layer: usize, frame: u32) -> u8 {
    (i as u8) ^ (frame as u8) ^ ((layer as u8) << 5)
}

/// What a received payload says: (layer, frame, keyframe), after checking
/// every byte; `None` for anything damaged.
fn parse(p: &[u8]) -> Option<(usize, u32, bool)> {
    // The server rewrites the picture id; the descriptor's shape stays.
    if p.len() < 4 || p[0] & 0x80 == 0 || p[1] & 0x80 == 0 || p[2] & 0x80 == 0 {
        return None;
    }
    let keyframe = p.get(4)? & 0x01 == 0;
    let mut at = 4 + if keyframe { 10 } else { 3 };
    let body = p.get(at..at + 7)?;
    if &body[..2] != b"SC" {
        return None;
    }
    let layer = usize::from(body[2]);
    if layer >= RIDS.len() {
        return None;
    }
    if keyframe {
        let (w, h) = SIZES[layer];
        let mut want = vec![0x9d, 0x01, 0x2a];
        want.extend_from_slice(&w.to_le_bytes());
        want.extend_from_slice(&h.to_le_bytes());
        if p.get(7..14)? != want.as_slice() {
            return None;
        }
    }
    let frame = u32::from_be_bytes(body[3..7].try_into().ok()?);
    at += 7;
    if p.len() != BODY[layer]
        || p[at..]
            .iter()
            .enumerate()
            .any(|(i, b)| *b != filler(at + i, layer, frame))
    {
        return None;
    }
    Some((layer, frame, keyframe))
}

#[test]
fn payloads_round_trip() {
    for (layer, body) in BODY.iter().enumerate() {
        for key in [false, true] {
            let p = payload(layer, 77, key);
            assert_eq!(p.len(), *body);
            assert_eq!(parse(&p), Some((layer, 77, key)));
            let mut bad = p.to_vec();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert_eq!(parse(&bad), None, "a damaged filler is caught");
        }
    }
}

/// A simulcast publisher: one frame on each of its sending layers per call.
struct Publisher {
    client: Client,
    frame: u32,
    /// A keyframe was asked for, per layer.
    owed: [bool; 3],
    /// Keyframe requests that named each rid.
    asked: [u32; 3],
    /// Keyframe requests that named no rid.
    asked_unnamed: u32,
    /// `publisher-layers` received (mid, active).
    told: Vec<(String, Vec<String>)>,
    errors: Vec<(ErrorCode, String)>,
}

impl Publisher {
    async fn join(server: &RunningServer, room: &str, name: &str, rids: Vec<String>) -> Client {
        let opts = JoinOptions {
            publish_audio: false,
            simulcast: Some(rids),
            ..JoinOptions::sfu(&server.ws_url(), room, name)
        };
        Client::join(opts).await.expect("joins")
    }

    fn new(client: Client) -> Publisher {
        Publisher {
            client,
            frame: 0,
            owed: [false; 3],
            asked: [0; 3],
            asked_unnamed: 0,
            told: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// Sends the next frame on `layers`.
    fn send(&mut self, layers: &[usize]) {
        let ts = self.frame.wrapping_mul(3000);
        for &l in layers {
            let key = self.frame.is_multiple_of(GOP) || std::mem::take(&mut self.owed[l]);
            self.client
                .send_rtp_layer(RIDS[l], payload(l, self.frame, key), true, ts)
                .expect("client task running");
        }
        self.frame += 1;
    }

    fn absorb(&mut self, ev: Event) {
        match ev {
            Event::KeyframeRequested {
                kind: Kind::Video,
                rid,
                ..
            } => match rid.and_then(|r| RIDS.iter().position(|x| *x == r)) {
                Some(l) => {
                    self.asked[l] += 1;
                    self.owed[l] = true;
                }
                None => self.asked_unnamed += 1,
            },
            Event::PublisherLayers { mid, active } => self.told.push((mid, active)),
            Event::Signal(ServerMessage::Error(e)) => self.errors.push((e.code, e.message)),
            Event::Closed => panic!("{}: client closed", self.client.id),
            _ => {}
        }
    }
}

/// One video packet as the subscriber got it.
#[derive(Debug, Clone, Copy)]
struct Got {
    seq: u16,
    ts: u32,
    layer: usize,
    frame: u32,
    key: bool,
}

/// What a subscriber saw of the publisher's video.
#[derive(Default)]
struct Viewer {
    /// Video tracks that appeared (track id, stream id).
    video_tracks: Vec<(String, String)>,
    /// Track ids the video packets came on.
    on_tracks: HashSet<String>,
    packets: Vec<Got>,
    damaged: usize,
    errors: Vec<ErrorCode>,
}

impl Viewer {
    fn absorb(&mut self, ev: Event) {
        match ev {
            Event::TrackAdded {
                track_id,
                stream_id,
                kind: Kind::Video,
            } => self.video_tracks.push((track_id, stream_id)),
            Event::Rtp {
                kind: Kind::Video,
                packet,
                track_id,
                ..
            } => {
                self.on_tracks.insert(track_id);
                match parse(&packet.payload) {
                    Some((layer, frame, key)) => self.packets.push(Got {
                        seq: packet.header.sequence_number,
                        ts: packet.header.timestamp,
                        layer,
                        frame,
                        key,
                    }),
                    None => self.damaged += 1,
                }
            }
            Event::Signal(ServerMessage::Error(e)) => self.errors.push(e.code),
            Event::Closed => panic!("viewer: client closed"),
            _ => {}
        }
    }

    /// Distinct packets (frames: one packet a frame) of `layer` received.
    fn count(&self, layer: usize) -> usize {
        self.packets
            .iter()
            .filter(|g| g.layer == layer)
            .map(|g| g.frame)
            .collect::<HashSet<u32>>()
            .len()
    }

    /// Distinct packets received.
    fn distinct(&self) -> usize {
        self.packets
            .iter()
            .map(|g| (g.layer, g.frame))
            .collect::<HashSet<(usize, u32)>>()
            .len()
    }

    /// The packets by extended sequence number, checked to be one stream:
    /// no gaps, no two different packets on one sequence number,
    /// timestamps never going back, the first packet and every change of
    /// layer a keyframe of the layer switched to. A repeat of a packet
    /// (same sequence number, same layer and frame: a retransmission, or
    /// the server's padding, which rtc hands the application like media;
    /// a decoder's jitter buffer drops them) is counted, not failed.
    /// Returns the layers in the order they came and the repeats.
    fn check_one_stream(&self) -> (Vec<usize>, usize) {
        assert_eq!(self.damaged, 0, "damaged payloads");
        assert!(!self.packets.is_empty(), "no video");
        let mut ext: Vec<(i64, Got)> = Vec::with_capacity(self.packets.len());
        let mut last: Option<i64> = None;
        for g in &self.packets {
            let e = match last {
                None => i64::from(g.seq),
                Some(l) => l + i64::from(g.seq.wrapping_sub(l as u16) as i16),
            };
            last = Some(last.map_or(e, |l| l.max(e)));
            ext.push((e, *g));
        }
        ext.sort_by_key(|(e, _)| *e);
        let mut repeats = 0;
        ext.dedup_by(|b, a| {
            if a.0 != b.0 {
                return false;
            }
            assert_eq!(
                (a.1.layer, a.1.frame, a.1.ts),
                (b.1.layer, b.1.frame, b.1.ts),
                "two different packets on sequence number {}: {:?} and {:?}",
                a.1.seq,
                a.1,
                b.1
            );
            repeats += 1;
            true
        });
        for w in ext.windows(2) {
            assert_eq!(
                w[0].0 + 1,
                w[1].0,
                "gap in the sequence numbers: {:?} then {:?}",
                w[0].1,
                w[1].1
            );
            let dt = w[1].1.ts.wrapping_sub(w[0].1.ts) as i32;
            assert!(
                dt >= 0,
                "timestamp went back: {:?} then {:?}",
                w[0].1,
                w[1].1
            );
            if w[0].1.layer != w[1].1.layer {
                assert!(
                    w[1].1.key,
                    "switched from layer {} to {} on a delta frame: {:?}",
                    w[0].1.layer, w[1].1.layer, w[1].1
                );
            }
        }
        assert!(ext[0].1.key, "the first packet is not a keyframe");
        let mut order: Vec<usize> = Vec::new();
        for (_, g) in &ext {
            if order.last() != Some(&g.layer) {
                order.push(g.layer);
            }
        }
        (order, repeats)
    }
}

async fn viewer(server: &RunningServer, room: &str, name: &str) -> Client {
    let opts = JoinOptions {
        publish_audio: false,
        publish_video: false,
        ..JoinOptions::sfu(&server.ws_url(), room, name)
    };
    let mut c = Client::join(opts).await.expect("joins");
    until_connected(&mut c).await;
    c
}

/// Sends frames on `layers` every [`FRAME`] and feeds everyone's events
/// until `done` says so or `limit` passes; returns whether `done` did.
async fn run(
    alice: &mut Publisher,
    viewers: &mut [(&mut Client, &mut Viewer)],
    layers: &[usize],
    limit: Duration,
    mut done: impl FnMut(&Publisher, &[(&mut Client, &mut Viewer)]) -> bool,
) -> bool {
    let end = Instant::now() + limit;
    let mut tick = tokio::time::interval(FRAME);
    while Instant::now() < end {
        tick.tick().await;
        alice.send(layers);
        // Everything already queued, without waiting.
        while let Some(ev) = alice.client.next_event_within(Duration::ZERO).await {
            alice.absorb(ev);
        }
        for (c, v) in viewers.iter_mut() {
            while let Some(ev) = c.next_event_within(Duration::ZERO).await {
                v.absorb(ev);
            }
        }
        if done(alice, viewers) {
            return true;
        }
    }
    false
}

/// Two more seconds of `layers` bring the viewer at least a second of
/// video, still one continuous stream.
async fn video_goes_on(
    alice: &mut Publisher,
    bob: &mut Client,
    seen: &mut Viewer,
    layers: &[usize],
) {
    let before = seen.distinct();
    run(
        alice,
        &mut [(bob, &mut *seen)],
        layers,
        Duration::from_secs(2),
        |_, _| false,
    )
    .await;
    assert!(
        seen.distinct() >= before + 30,
        "video stalled: {} packets in the last 2 s",
        seen.distinct() - before
    );
    seen.check_one_stream();
}

/// A metric's value (the first series of that name) in `/metrics` text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        let key = key.split('{').next()?;
        (key == name).then(|| value.parse().ok()).flatten()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_layers_reach_a_viewer_as_one_stream_of_the_top_layer() {
    let server = server(ServeOptions::default()).await;
    let room = "simulcast-client";
    let mut alice = Publisher::new(Publisher::join(&server, room, "alice", rids()).await);
    until_connected(&mut alice.client).await;
    let mut bob = viewer(&server, room, "bob").await;
    let mut seen = Viewer::default();

    // Until bob has had 3 s (90 frames) of the top layer; 25 s at most.
    let reached = run(
        &mut alice,
        &mut [(&mut bob, &mut seen)],
        &[0, 1, 2],
        Duration::from_secs(25),
        |_, v| v[0].1.count(2) >= 90,
    )
    .await;
    let (order, repeats) = seen.check_one_stream();
    assert!(
        reached,
        "bob never got 3 s of the top layer in 25 s: {} packets of q, {} of h, {} of f; \
         layers in order {order:?}",
        seen.count(0),
        seen.count(1),
        seen.count(2)
    );
    assert_eq!(
        order.last(),
        Some(&2),
        "bob ends on the top layer: {order:?}"
    );
    // One video track from alice, and every packet on it.
    assert_eq!(seen.video_tracks.len(), 1, "{:?}", seen.video_tracks);
    assert_eq!(
        seen.video_tracks[0].1, alice.client.id,
        "the stream is alice's"
    );
    assert_eq!(
        seen.on_tracks,
        HashSet::from([seen.video_tracks[0].0.clone()])
    );
    assert!(seen.errors.is_empty(), "bob got errors {:?}", seen.errors);
    assert!(
        alice.errors.is_empty(),
        "alice got errors {:?}",
        alice.errors
    );

    // Dynacast reached alice as an event naming her video's mid and only
    // her rids.
    assert!(!alice.told.is_empty(), "alice was never told her layers");
    for (mid, active) in &alice.told {
        assert!(!mid.is_empty());
        assert!(!active.is_empty());
        assert!(
            active.iter().all(|r| RIDS.contains(&r.as_str())),
            "{active:?}"
        );
    }

    // The server's keyframe requests named the layers they were for.
    assert!(
        alice.asked.iter().sum::<u32>() >= 1,
        "no keyframe request named a rid (unnamed: {})",
        alice.asked_unnamed
    );
    assert_eq!(alice.asked_unnamed, 0, "keyframe requests without a rid");

    // The server learnt the layers and counted the choice.
    let text = metrics(&server).await;
    let switches = metric(&text, "switchboard_layers_switches_total");
    assert!(
        switches.is_some_and(|s| s >= 1.0),
        "switchboard_layers_switches_total: {switches:?}"
    );
    let updates = metric(&text, "switchboard_layers_publisher_updates_total");
    assert!(
        updates.is_some_and(|u| u >= alice.told.len() as f64),
        "switchboard_layers_publisher_updates_total {updates:?} < {} received",
        alice.told.len()
    );
    assert_eq!(
        metric(&text, "switchboard_layers_paused_tracks"),
        Some(0.0),
        "nothing paused on loopback"
    );
    eprintln!(
        "bob: layers {order:?}, {} packets (q {}, h {}, f {}), {repeats} repeats; alice: keyframe requests \
         q/h/f {:?}, unnamed {}, publisher-layers {:?}; switches {switches:?}",
        seen.distinct(),
        seen.count(0),
        seen.count(1),
        seen.count(2),
        alice.asked,
        alice.asked_unnamed,
        alice.told
    );
    alice.client.leave();
    bob.leave();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_rids_are_refused_and_the_room_goes_on() {
    let server = server(ServeOptions::default()).await;
    let room = "simulcast-four";
    let mut alice = Publisher::new(Publisher::join(&server, room, "alice", rids()).await);
    until_connected(&mut alice.client).await;
    let mut bob = viewer(&server, room, "bob").await;
    let mut seen = Viewer::default();
    let got_video = run(
        &mut alice,
        &mut [(&mut bob, &mut seen)],
        &[0, 1, 2],
        Duration::from_secs(10),
        |_, v| v[0].1.distinct() >= 30,
    )
    .await;
    assert!(got_video, "bob got no video before carol came");

    // carol offers four encodings: refused with a clear error.
    let four: Vec<String> = ["q", "h", "f", "x"]
        .iter()
        .map(|r| (*r).to_owned())
        .collect();
    let mut carol = Publisher::new(Publisher::join(&server, room, "carol", four).await);
    let mut carol_negotiated = false;
    let mut carol_connected = false;
    let deadline = Instant::now() + WAIT;
    while carol.errors.is_empty() && Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        match carol.client.next_event_within(left).await {
            Some(Event::Negotiated) => carol_negotiated = true,
            Some(Event::Connection(s)) if s == "connected" => carol_connected = true,
            Some(ev) => carol.absorb(ev),
            None => break,
        }
    }
    let (code, message) = carol
        .errors
        .first()
        .cloned()
        .expect("carol got an error for four encodings");
    assert_eq!(code, ErrorCode::BadRequest, "{message}");
    assert!(
        message.contains("4 simulcast encodings") && message.contains('3'),
        "the error says why: {message:?}"
    );
    assert!(!carol_negotiated, "carol's offer was answered");
    assert!(!carol_connected, "carol connected");

    // The room is unharmed: bob keeps getting alice's video, one stream.
    let before = seen.distinct();
    let last_frame = seen.packets.last().map_or(0, |g| g.frame);
    let going_on = run(
        &mut alice,
        &mut [(&mut bob, &mut seen)],
        &[0, 1, 2],
        Duration::from_secs(10),
        |_, v| {
            v[0].1
                .packets
                .iter()
                .filter(|g| g.frame > last_frame)
                .map(|g| g.frame)
                .collect::<HashSet<u32>>()
                .len()
                >= 60
        },
    )
    .await;
    assert!(
        going_on,
        "bob got {} packets after carol's refusal",
        seen.distinct() - before
    );
    seen.check_one_stream();
    assert_eq!(seen.video_tracks.len(), 1, "{:?}", seen.video_tracks);
    assert!(seen.errors.is_empty(), "bob got errors {:?}", seen.errors);
    assert!(
        alice.errors.is_empty(),
        "alice got errors {:?}",
        alice.errors
    );
    let text = metrics(&server).await;
    let limited = text
        .lines()
        .find(|l| l.starts_with("switchboard_limited_total") && l.contains("encodings"));
    assert!(
        limited.is_some_and(|l| metric(l, "switchboard_limited_total").is_some_and(|v| v >= 1.0)),
        "the refusal is counted: {limited:?}"
    );
    carol.client.leave();
    alice.client.leave();
    bob.leave();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rid_that_never_sends_does_not_stop_the_video() {
    let server = server(ServeOptions::default()).await;
    let room = "simulcast-silent";
    let mut alice = Publisher::new(Publisher::join(&server, room, "alice", rids()).await);
    until_connected(&mut alice.client).await;
    let mut bob = viewer(&server, room, "bob").await;
    let mut seen = Viewer::default();
    // q and h only; f is offered but never sends. Until bob has had 3 s of
    // h (the best there is); 20 s at most.
    let reached = run(
        &mut alice,
        &mut [(&mut bob, &mut seen)],
        &[0, 1],
        Duration::from_secs(20),
        |_, v| v[0].1.count(1) >= 90,
    )
    .await;
    let (order, _) = seen.check_one_stream();
    assert!(
        reached,
        "bob got {} packets of q and {} of h in 20 s; layers {order:?}",
        seen.count(0),
        seen.count(1)
    );
    assert_eq!(seen.count(2), 0, "f never sent, yet received");
    assert_eq!(seen.video_tracks.len(), 1, "{:?}", seen.video_tracks);
    assert!(seen.errors.is_empty(), "bob got errors {:?}", seen.errors);
    // Nothing stalls.
    video_goes_on(&mut alice, &mut bob, &mut seen, &[0, 1]).await;
    alice.client.leave();
    bob.leave();
}

/// A layer that stops mid-call (the publisher's encoder dropped it, or its
/// uplink did): the viewer on it is moved to the best layer still arriving,
/// at that layer's keyframe, as one continuous stream, and is never stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_that_stops_mid_call_moves_its_viewer_down_and_the_video_goes_on() {
    let server = server(ServeOptions::default()).await;
    let room = "simulcast-stops";
    let mut alice = Publisher::new(Publisher::join(&server, room, "alice", rids()).await);
    until_connected(&mut alice.client).await;
    let mut bob = viewer(&server, room, "bob").await;
    let mut seen = Viewer::default();
    // Until bob has had 2 s of f (the top layer); 25 s at most.
    let on_top = run(
        &mut alice,
        &mut [(&mut bob, &mut seen)],
        &[0, 1, 2],
        Duration::from_secs(25),
        |_, v| v[0].1.count(2) >= 60,
    )
    .await;
    assert!(
        on_top,
        "bob never got 2 s of f: q {}, h {}, f {}",
        seen.count(0),
        seen.count(1),
        seen.count(2)
    );
    // f stops; q and h go on. Until bob has had 2 s of h after that; 15 s
    // at most.
    let f_before = seen.count(2);
    let h_before = seen.count(1);
    let moved = run(
        &mut alice,
        &mut [(&mut bob, &mut seen)],
        &[0, 1],
        Duration::from_secs(15),
        |_, v| v[0].1.count(1) >= h_before + 60,
    )
    .await;
    let (order, _) = seen.check_one_stream();
    assert!(
        moved,
        "bob was not moved down from f when it stopped: h {} -> {}, layers {order:?}",
        h_before,
        seen.count(1)
    );
    assert_eq!(seen.count(2), f_before, "f packets after f stopped");
    assert_eq!(order.last(), Some(&1), "bob ends on h: {order:?}");
    assert_eq!(seen.video_tracks.len(), 1, "{:?}", seen.video_tracks);
    assert!(seen.errors.is_empty(), "bob got errors {:?}", seen.errors);
    // And the video keeps coming.
    video_goes_on(&mut alice, &mut bob, &mut seen, &[0, 1]).await;
    eprintln!(
        "bob: layers {order:?}; f {f_before}, h {h_before} -> {}; alice keyframe requests q/h/f {:?}",
        seen.count(1),
        alice.asked
    );
    alice.client.leave();
    bob.leave();
}
