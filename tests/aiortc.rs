//! Interop with a WebRTC stack that is not ours: a Python aiortc participant
//! (`tests/aiortc/peer.py`) and our Rust client share an SFU room on
//! 127.0.0.1. aiortc publishes a real Opus tone and real VP8 video; our client
//! publishes synthetic Opus/VP8-shaped packets that name their sender and
//! sequence. Each must receive the other's audio and video (in a MediaStream
//! whose id is the publisher's participant id) and the other's chat lines.
//!
//! Needs `python3` with aiortc: `pip install -r tests/aiortc/requirements.txt`
//! (`.ci/run` installs it). Without it this test fails; it never skips.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use common::aiortc::{require_aiortc, spawn_peer, Peer};
use common::media::{payload, until_connected};
use common::*;
use serde_json::Value;
use switchboard::config::ServeOptions;
use switchboard_client::{Client, Event, JoinOptions, Kind};

/// How long the aiortc peer runs once its connection is up.
const PEER_SECONDS: u64 = 6;
/// Its own hard limit (it exits 1 past it) and ours (we kill it past it).
const PEER_TIMEOUT: Duration = Duration::from_secs(60);
const KILL_AFTER: Duration = Duration::from_secs(75);
/// Our publishing rates: audio 50 packets/s, video 25 packets/s.
const AUDIO_EVERY: Duration = Duration::from_millis(20);
const VIDEO_EVERY_NTH_AUDIO: u32 = 2;
/// Share of the nominal packet count over `PEER_SECONDS` that must arrive
/// (the first few hundred ms go to the server offering the new tracks).
const MIN_SHARE: f64 = 0.6;

const ROOM: &str = "interop";
const OUR_NAME: &str = "rusty";
const PEER_NAME: &str = "aiortc";

/// What our client saw.
#[derive(Default)]
struct Seen {
    /// (stream id, kind) of each track that appeared.
    tracks: HashSet<(String, Kind)>,
    /// (stream id, kind) → RTP packets received.
    packets: HashMap<(String, Kind), u64>,
    /// Chat lines as relayed: `{"from": id, "data": text}`.
    chat: Vec<Value>,
}

impl Seen {
    fn absorb(&mut self, ev: Event) {
        match ev {
            Event::TrackAdded {
                stream_id, kind, ..
            } => {
                self.tracks.insert((stream_id, kind));
            }
            Event::Rtp {
                stream_id, kind, ..
            } => *self.packets.entry((stream_id, kind)).or_default() += 1,
            Event::Chat(text) => self.chat.push(
                serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("chat {text:?} is not JSON: {e}")),
            ),
            _ => {}
        }
    }

    fn count(&self, stream: &str, kind: Kind) -> u64 {
        self.packets
            .get(&(stream.to_owned(), kind))
            .copied()
            .unwrap_or(0)
    }
}

/// `result["streams"][stream][kind][field]` as a number (0 when absent).
fn peer_count(result: &Value, stream: &str, kind: &str, field: &str) -> u64 {
    result["streams"][stream][kind][field].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiortc_peer_exchanges_media_with_our_client() {
    require_aiortc();
    let server = server(ServeOptions::default()).await;

    // Our client creates the room (sfu, audio forwarded) and starts
    // publishing before aiortc arrives, so the server already knows our
    // tracks when aiortc connects.
    let mut ours = Client::join(JoinOptions::sfu(&server.ws_url(), ROOM, OUR_NAME))
        .await
        .expect("our client joins");
    until_connected(&mut ours).await;
    let our_id = ours.id.clone();

    let Peer {
        mut child,
        stdout,
        stderr,
    } = spawn_peer(&[
        "--url",
        &server.ws_url(),
        "--room",
        ROOM,
        "--name",
        PEER_NAME,
        "--duration",
        &PEER_SECONDS.to_string(),
        "--timeout",
        &PEER_TIMEOUT.as_secs().to_string(),
        "--chat",
        "hello from aiortc",
    ]);

    // Publish paced like real media and chat every 0.5 s while the peer runs.
    let started = Instant::now();
    let mut seen = Seen::default();
    let mut seq: u32 = 0;
    let mut chats_sent = 0u32;
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll the aiortc peer") {
            break status;
        }
        if started.elapsed() > KILL_AFTER {
            let _ = child.kill().await;
            let err = stderr.await.unwrap_or_default();
            panic!("the aiortc peer did not finish within {KILL_AFTER:?}; killed. Its log:\n{err}");
        }
        ours.send_rtp(
            Kind::Audio,
            payload(Kind::Audio, OUR_NAME, seq),
            false,
            seq.wrapping_mul(960),
        )
        .expect("send audio");
        if seq.is_multiple_of(VIDEO_EVERY_NTH_AUDIO) {
            ours.send_rtp(
                Kind::Video,
                payload(Kind::Video, OUR_NAME, seq),
                true,
                seq.wrapping_mul(1800),
            )
            .expect("send video");
        }
        if seq.is_multiple_of(25) {
            chats_sent += 1;
            ours.send_chat(&format!("hello from rust #{chats_sent}"))
                .expect("send chat");
        }
        seq += 1;
        let due = started + AUDIO_EVERY * seq;
        while let Some(ev) = ours
            .next_event_within(due.saturating_duration_since(Instant::now()))
            .await
        {
            seen.absorb(ev);
        }
    };
    // Anything still queued.
    while let Some(ev) = ours.next_event_within(Duration::from_millis(200)).await {
        seen.absorb(ev);
    }
    let out = stdout.await.unwrap_or_default();
    let err = stderr.await.unwrap_or_default();
    eprintln!("--- aiortc peer log ---\n{err}--- end of aiortc peer log ---");
    assert!(
        status.success(),
        "the aiortc peer exited with {status}\nstdout:\n{out}\nstderr:\n{err}"
    );
    let result: Value = out
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!("no JSON result line from the aiortc peer\nstdout:\n{out}\nstderr:\n{err}")
        });
    let peer_id = result["id"]
        .as_str()
        .expect("the result names the peer's id")
        .to_owned();
    eprintln!("aiortc peer result: {result}");

    // -- aiortc → our client -------------------------------------------------
    let nominal = PEER_SECONDS as f64;
    let min_audio_from_peer = (MIN_SHARE * 50.0 * nominal) as u64; // aiortc: 20 ms Opus
    let min_video_from_peer = (MIN_SHARE * 30.0 * nominal) as u64; // aiortc: 30 fps VP8
    let audio_in = seen.count(&peer_id, Kind::Audio);
    let video_in = seen.count(&peer_id, Kind::Video);
    let per_stream: BTreeMap<String, u64> = seen
        .packets
        .iter()
        .map(|((s, k), n)| (format!("{s}/{k:?}"), *n))
        .collect();
    eprintln!(
        "{OUR_NAME} <- aiortc ({peer_id}): audio {audio_in} packets (min {min_audio_from_peer}), \
         video {video_in} packets (min {min_video_from_peer}); all streams {per_stream:?}"
    );
    let expected_tracks: HashSet<(String, Kind)> = [
        (peer_id.clone(), Kind::Audio),
        (peer_id.clone(), Kind::Video),
    ]
    .into();
    assert_eq!(
        seen.tracks, expected_tracks,
        "our client gets exactly aiortc's audio and video, stream id = its participant id"
    );
    assert!(
        audio_in >= min_audio_from_peer,
        "our client got {audio_in} audio packets from aiortc, want >= {min_audio_from_peer}"
    );
    assert!(
        video_in >= min_video_from_peer,
        "our client got {video_in} video packets from aiortc, want >= {min_video_from_peer}"
    );

    // -- our client → aiortc -------------------------------------------------
    let min_audio_from_us = (MIN_SHARE * 50.0 * nominal) as u64;
    let min_video_from_us = (MIN_SHARE * 25.0 * nominal) as u64;
    let streams = result["streams"].as_object().expect("streams object");
    assert_eq!(
        streams.keys().collect::<Vec<_>>(),
        vec![&our_id],
        "aiortc receives exactly our client's stream (id = our participant id): {result}"
    );
    let audio_out = peer_count(&result, &our_id, "audio", "packets");
    let video_out = peer_count(&result, &our_id, "video", "packets");
    let audio_intact = result["intact"][OUR_NAME]["audio"].as_u64().unwrap_or(0);
    let video_intact = result["intact"][OUR_NAME]["video"].as_u64().unwrap_or(0);
    eprintln!(
        "aiortc <- {OUR_NAME} ({our_id}): audio {audio_out} packets / {audio_intact} intact / {} decoded frames (min {min_audio_from_us}), \
         video {video_out} packets / {video_intact} intact / {} decoded frames (min {min_video_from_us}); we sent {seq} audio, {} video",
        peer_count(&result, &our_id, "audio", "frames"),
        peer_count(&result, &our_id, "video", "frames"),
        seq.div_ceil(VIDEO_EVERY_NTH_AUDIO),
    );
    assert!(
        audio_out >= min_audio_from_us,
        "aiortc got {audio_out} audio packets from us, want >= {min_audio_from_us}"
    );
    assert!(
        video_out >= min_video_from_us,
        "aiortc got {video_out} video packets from us, want >= {min_video_from_us}"
    );
    // Our payloads are synthetic, so aiortc's decoders may reject them; what
    // must hold is that they reach aiortc's RTP layer byte for byte.
    assert!(
        audio_intact >= min_audio_from_us,
        "aiortc got {audio_intact} intact audio payloads from us, want >= {min_audio_from_us}"
    );
    assert!(
        video_intact >= min_video_from_us,
        "aiortc got {video_intact} intact video payloads from us, want >= {min_video_from_us}"
    );

    // -- chat both ways ------------------------------------------------------
    let from = |v: &Value, id: &str, prefix: &str| {
        v["from"] == id && v["data"].as_str().is_some_and(|d| d.starts_with(prefix))
    };
    let chat_in = seen
        .chat
        .iter()
        .filter(|v| from(v, &peer_id, "hello from aiortc #"))
        .count();
    let empty = Vec::new();
    let peer_chat = result["chat"].as_array().unwrap_or(&empty);
    let chat_out = peer_chat
        .iter()
        .filter(|v| from(v, &our_id, "hello from rust #"))
        .count();
    eprintln!(
        "chat: {OUR_NAME} got {chat_in} of aiortc's {} lines; aiortc got {chat_out} of our {chats_sent}",
        result["chat_sent"]
    );
    assert!(
        chat_in >= 3,
        "our client got {chat_in} chat lines from aiortc: {:?}",
        seen.chat
    );
    assert!(
        chat_out >= 3,
        "aiortc got {chat_out} chat lines from us: {peer_chat:?}"
    );
    assert_eq!(
        seen.chat.len(),
        chat_in,
        "our client receives only aiortc's chat, never its own: {:?}",
        seen.chat
    );
    assert_eq!(
        peer_chat.len(),
        chat_out,
        "aiortc receives only our chat, never its own: {peer_chat:?}"
    );
    assert_eq!(
        result["errors"],
        Value::Array(vec![]),
        "no signaling errors"
    );

    ours.leave();
}

/// RFC 7675 consent checks from aiortc come every 5 s (± 20 %): the server
/// must not take those gaps for a lost connection. Over 16 s connected, its
/// connection never leaves `connected` (before the fix it went
/// `disconnected` and back every few seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aiortc_peer_checking_consent_every_5_s_stays_connected() {
    require_aiortc();
    let server = server(ServeOptions::default()).await;
    let Peer {
        mut child,
        stdout,
        stderr,
    } = spawn_peer(&[
        "--url",
        &server.ws_url(),
        "--room",
        "consent",
        "--name",
        "consenter",
        "--duration",
        "16",
        "--timeout",
        "60",
    ]);
    let status = tokio::time::timeout(KILL_AFTER, child.wait())
        .await
        .expect("the aiortc peer finishes in time")
        .expect("wait for the aiortc peer");
    let out = stdout.await.unwrap_or_default();
    let err = stderr.await.unwrap_or_default();
    assert!(status.success(), "aiortc peer failed: {out}\n{err}");
    let text = metrics(&server).await;
    let entered = |state: &str| {
        metric(
            &text,
            &format!("switchboard_media_connection_transitions_total{{to=\"{state}\"}}"),
        )
    };
    println!(
        "consent: connected {} times, disconnected {} times over 16 s",
        entered("connected"),
        entered("disconnected")
    );
    assert_eq!(entered("connected"), 1.0, "{text}");
    assert_eq!(entered("disconnected"), 0.0, "{text}");
    assert_eq!(entered("failed"), 0.0, "{text}");
}
