//! Keyframes through the SFU with real WebRTC peers (our Rust client on
//! 127.0.0.1). The publisher here never sends a periodic keyframe: it sends
//! deltas, and one keyframe each time the server asks (PLI). So every
//! keyframe a subscriber sees was requested, and the tests can tell whose
//! request it answered:
//! - a late joiner's first video packet is the keyframe requested for it
//!   (no delta it could not decode before it);
//! - a subscriber's PLI reaches the publisher, throttled: a burst of ten
//!   gives one PLI at once and at most one more when the interval ends.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::media::{parse, payload, until_connected};
use common::*;
use switchboard::config::ServeOptions;
use switchboard::server::RunningServer;
use switchboard_client::{Client, Event, JoinOptions, Kind};

/// Video packets per second the publisher sends.
const FPS: u64 = 30;

/// A video payload from `name` with sequence `seq`; a keyframe (VP8 P bit
/// clear) only when `keyframe`.
fn video(name: &str, seq: u32, keyframe: bool) -> Bytes {
    let mut p = payload(Kind::Video, name, seq).to_vec();
    p[1] = if keyframe { 0x00 } else { 0x01 };
    Bytes::from(p)
}

fn is_keyframe(data: &[u8]) -> bool {
    data.get(1).is_some_and(|b| b & 0x01 == 0)
}

/// What happened, in the order the test saw it.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// The publisher got a keyframe request.
    Requested,
    /// The publisher sent a keyframe with this sequence.
    SentKeyframe(u32),
    /// `who` received a video packet from the publisher.
    Received {
        who: usize,
        seq: u32,
        keyframe: bool,
    },
    /// A marker the test put in.
    Mark(&'static str),
}

/// The publisher (client 0) and its subscribers, driven in one loop: the
/// publisher sends a delta every frame and a keyframe on the frame after a
/// request (when `answer` is on).
struct Call {
    clients: Vec<Client>,
    names: Vec<&'static str>,
    seq: u32,
    answer: bool,
    owed: bool,
    log: Vec<Step>,
    corrupt: usize,
    /// Each client's track id of the publisher's video, once seen.
    track: Vec<Option<String>>,
}

impl Call {
    async fn new(server: &RunningServer, room: &str, names: &[&'static str]) -> Call {
        let mut call = Call {
            clients: Vec::new(),
            names: Vec::new(),
            seq: 0,
            answer: true,
            owed: false,
            log: Vec::new(),
            corrupt: 0,
            track: Vec::new(),
        };
        for name in names {
            call.add(server, room, name).await;
        }
        call
    }

    async fn add(&mut self, server: &RunningServer, room: &str, name: &'static str) {
        let mut opts = JoinOptions::sfu(&server.ws_url(), room, name);
        opts.publish_audio = false;
        opts.publish_video = self.clients.is_empty();
        let mut c = Client::join(opts).await.expect("joins");
        until_connected(&mut c).await;
        self.clients.push(c);
        self.names.push(name);
        self.track.push(None);
    }

    /// Runs the call for up to `limit`, one frame at a time, until `done`
    /// holds for the log.
    async fn run_until(&mut self, limit: Duration, done: impl Fn(&[Step]) -> bool) -> bool {
        let start = Instant::now();
        let mut frame = 0u64;
        loop {
            if done(&self.log) {
                return true;
            }
            if start.elapsed() >= limit {
                return false;
            }
            let keyframe = std::mem::take(&mut self.owed);
            let name = self.names[0];
            self.clients[0]
                .send_rtp(
                    Kind::Video,
                    video(name, self.seq, keyframe),
                    true,
                    self.seq * 3000,
                )
                .expect("send video");
            if keyframe {
                self.log.push(Step::SentKeyframe(self.seq));
            }
            self.seq += 1;
            frame += 1;
            let due = start + Duration::from_millis(frame * 1000 / FPS);
            while Instant::now() < due {
                for who in 0..self.clients.len() {
                    while let Some(ev) = self.clients[who]
                        .next_event_within(Duration::from_millis(1))
                        .await
                    {
                        self.absorb(who, ev);
                    }
                }
            }
        }
    }

    fn absorb(&mut self, who: usize, ev: Event) {
        match ev {
            Event::KeyframeRequested {
                kind: Kind::Video, ..
            } if who == 0 => {
                self.log.push(Step::Requested);
                self.owed |= self.answer;
            }
            Event::Rtp {
                kind: Kind::Video,
                packet,
                track_id,
                ..
            } => match parse(Kind::Video, &packet.payload) {
                Some((name, seq)) if name == self.names[0] => {
                    self.track[who].get_or_insert(track_id);
                    self.log.push(Step::Received {
                        who,
                        seq,
                        keyframe: is_keyframe(&packet.payload),
                    });
                }
                Some(_) => {}
                None => self.corrupt += 1,
            },
            _ => {}
        }
    }

    fn mark(&mut self, what: &'static str) {
        self.log.push(Step::Mark(what));
    }
}

/// Steps after the mark `what`.
fn after<'a>(log: &'a [Step], what: &str) -> &'a [Step] {
    match log
        .iter()
        .position(|s| matches!(s, Step::Mark(m) if *m == what))
    {
        Some(i) => &log[i + 1..],
        None => &[],
    }
}

fn received_by(log: &[Step], who: usize) -> impl Iterator<Item = (u32, bool)> + '_ {
    log.iter().filter_map(move |s| match s {
        Step::Received {
            who: w,
            seq,
            keyframe,
        } if *w == who => Some((*seq, *keyframe)),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiners_first_video_packet_is_the_keyframe_requested_for_it() {
    let server = server(ServeOptions::default()).await;
    let mut call = Call::new(&server, "late", &["alice", "bob"]).await;
    // Bob, the first subscriber, gets video going.
    assert!(
        call.run_until(WAIT, |log| received_by(log, 1).nth(10).is_some())
            .await,
        "bob receives alice's video: {:?}",
        call.log
    );
    // Some deltas with no request pending: nothing is owed.
    call.answer = true;
    call.run_until(Duration::from_secs(1), |_| false).await;
    call.mark("carol joins");
    call.add(&server, "late", "carol").await;
    assert!(
        call.run_until(WAIT, |log| received_by(after(log, "carol joins"), 2)
            .nth(5)
            .is_some())
            .await,
        "carol receives alice's video: {:?}",
        after(&call.log, "carol joins")
    );
    let since = after(&call.log, "carol joins");
    println!("after carol's join: {since:?}");
    // In order: a request for carol reached alice, alice answered with a
    // keyframe, and that keyframe is the first thing carol got.
    let requested = since
        .iter()
        .position(|s| *s == Step::Requested)
        .expect("alice is asked for a keyframe after carol joins");
    let (sent_at, key_seq) = since
        .iter()
        .enumerate()
        .find_map(|(i, s)| match s {
            Step::SentKeyframe(q) if i > requested => Some((i, *q)),
            _ => None,
        })
        .expect("alice answers the request with a keyframe");
    let first = received_by(since, 2).next().expect("carol got video");
    assert_eq!(
        first,
        (key_seq, true),
        "carol's first video packet is the keyframe sent for her (sent at step {sent_at}), \
         not a delta she cannot decode: {since:?}"
    );
    // Everything after it arrives in order, nothing before it.
    let seqs: Vec<u32> = received_by(since, 2).map(|(q, _)| q).collect();
    assert!(seqs.iter().all(|q| *q >= key_seq), "{seqs:?}");
    // Bob's stream never stopped (his decoder already had a picture).
    assert!(received_by(since, 1).count() >= 5);
    assert_eq!(call.corrupt, 0);
    let text = metrics(&server).await;
    assert!(
        metric(
            &text,
            "switchboard_media_dropped_total{reason=\"before-keyframe\"}"
        ) > 0.0,
        "the deltas before carol's keyframe were held back (counted)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribers_pli_reaches_the_publisher_throttled() {
    let server = server(ServeOptions::default()).await;
    let mut call = Call::new(&server, "pli", &["alice", "bob"]).await;
    assert!(
        call.run_until(WAIT, |log| received_by(log, 1).nth(10).is_some())
            .await,
        "bob receives alice's video: {:?}",
        call.log
    );
    // Quiet: no request for a second (bounded), so what follows is bob's.
    let quiet = call
        .run_until(WAIT, |log| {
            let n = log.len();
            let last_req = log.iter().rposition(|s| *s == Step::Requested);
            // At least 30 frames' worth of steps since the last request.
            last_req.is_none_or(|i| n - i > 30)
        })
        .await;
    assert!(quiet, "alice stops being asked: {:?}", call.log);
    let before = metrics(&server).await;
    let in_before = metric(
        &before,
        "switchboard_media_keyframe_requests_received_total",
    );
    let sent_before = metric(&before, "switchboard_media_plis_sent_total");
    // Bob's decoder lost its picture, ten times in a row; alice, busy,
    // answers nothing for now, so no keyframe satisfies the deferred one.
    call.answer = false;
    call.mark("bob asks");
    let track = call.track[1]
        .clone()
        .expect("bob knows alice's video track");
    for _ in 0..10 {
        call.clients[1].request_keyframe(&track).expect("pli");
    }
    // Two throttle intervals (500 ms each) of frames.
    call.run_until(Duration::from_millis(1500), |_| false).await;
    let asked = after(&call.log, "bob asks")
        .iter()
        .filter(|s| **s == Step::Requested)
        .count();
    let after_text = metrics(&server).await;
    let got = metric(
        &after_text,
        "switchboard_media_keyframe_requests_received_total",
    ) - in_before;
    let sent = metric(&after_text, "switchboard_media_plis_sent_total") - sent_before;
    println!("10 PLIs from bob: server got {got}, sent {sent} upstream, alice saw {asked}");
    assert_eq!(got, 10.0, "every PLI reached the server");
    assert!(asked >= 1, "bob's PLI reached alice: {:?}", call.log);
    assert!(
        asked <= 2 && sent <= 2.0,
        "throttled: one now, at most one deferred (alice saw {asked}, server sent {sent})"
    );
    // Alice answers now; bob gets the keyframe his PLI asked for.
    call.answer = true;
    call.mark("alice answers");
    call.clients[1].request_keyframe(&track).expect("pli");
    assert!(
        call.run_until(WAIT, |log| received_by(after(log, "alice answers"), 1)
            .any(|(_, k)| k))
            .await,
        "bob receives a keyframe: {:?}",
        after(&call.log, "alice answers")
    );
}
