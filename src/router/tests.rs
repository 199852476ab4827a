//! The router without sockets or connections: packets and `now` in,
//! decisions checked.

use std::time::{Duration, Instant};

use switchboard_proto::RoomName;

use super::*;
use crate::media::codec::Codec;
use crate::media::rewrite::RewriteDrop;

const A: PeerKey = PeerKey(1);
const B: PeerKey = PeerKey(2);
const C: PeerKey = PeerKey(3);

pub(super) const OPUS: TrackInfo = TrackInfo {
    kind: MediaKind::Audio,
    codec: Codec::Opus,
    clock_rate: 48_000,
    simulcast: false,
};
const VP8: TrackInfo = TrackInfo {
    kind: MediaKind::Video,
    codec: Codec::Vp8,
    clock_rate: 90_000,
    simulcast: false,
};

/// A VP8 payload: descriptor (S=1, partition 0), then the frame tag.
const KEYFRAME: &[u8] = &[0x10, 0x00, 0x00, 0x00];
const DELTA: &[u8] = &[0x10, 0x01, 0x00, 0x00];

pub(super) fn room() -> RoomName {
    RoomName::parse("r").expect("a valid room name")
}

pub(super) fn rtp(ssrc: u32, seq: u16, ts: u32, payload: &[u8]) -> RtpIn<'_> {
    RtpIn {
        ssrc,
        seq,
        ts,
        payload,
        level: None,
    }
}

/// A router with `members` in one `sfu` room.
pub(super) fn router_with(members: &[PeerKey]) -> Router {
    let mut r = Router::new(3);
    for &k in members {
        r.join(k, room(), true, false, false).expect("joins");
    }
    r
}

/// What a driver does when `publisher` publishes `track`: every member the
/// router names gets a slot (numbered from 10 + the publisher's key), and
/// the subscriber's answer negotiates payload type 96.
pub(super) fn publish_and_subscribe(
    r: &mut Router,
    publisher: PeerKey,
    track: &str,
    info: TrackInfo,
) {
    r.publish(publisher, TrackName::new(track), info)
        .expect("publishes");
    for sub in r.subscribers_for(publisher, track) {
        let out = slot(publisher);
        r.subscribe(sub, publisher, track, out, Ssrc(1000 + sub.0 as u32))
            .expect("subscribes");
        r.negotiated(sub, out, PayloadType(96));
    }
}

pub(super) fn slot(publisher: PeerKey) -> OutSlot {
    OutSlot(10 + publisher.0 as u32)
}

pub(super) fn sends(decisions: &[Decision]) -> Vec<Send> {
    decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Send(s) => Some(*s),
            _ => None,
        })
        .collect()
}

pub(super) fn keyframe_requests(decisions: &[Decision]) -> Vec<(PeerKey, String)> {
    decisions
        .iter()
        .filter_map(|d| match d {
            Decision::RequestKeyframe {
                publisher, track, ..
            } => Some((*publisher, track.as_str().to_owned())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_packet_goes_to_every_subscriber_but_its_sender() {
    let mut r = router_with(&[A, B, C]);
    publish_and_subscribe(&mut r, A, "mic", OPUS);
    let now = Instant::now();
    let mut out = Vec::new();
    assert!(r.on_rtp(A, "mic", &rtp(7, 100, 4800, &[1, 2, 3]), now, now, &mut out));
    let mut to: Vec<PeerKey> = sends(&out).iter().map(|s| s.to).collect();
    to.sort_unstable();
    assert_eq!(to, vec![B, C]);
    for s in sends(&out) {
        assert_eq!(
            s.ssrc,
            Ssrc(1000 + s.to.0 as u32),
            "the subscriber's own SSRC"
        );
        assert_eq!(s.pt, PayloadType(96), "the payload type it negotiated");
        assert_eq!(
            (s.seq, s.ts),
            (100, 4800),
            "the first source keeps its numbers"
        );
        assert_eq!(s.patch, None);
    }
}

#[test]
fn nothing_is_sent_before_the_subscriber_negotiated() {
    let mut r = router_with(&[A, B]);
    r.publish(A, TrackName::new("mic"), OPUS)
        .expect("publishes");
    r.subscribe(B, A, "mic", OutSlot(1), Ssrc(5))
        .expect("subscribes");
    let now = Instant::now();
    let mut out = Vec::new();
    r.on_rtp(A, "mic", &rtp(7, 1, 1, &[1]), now, now, &mut out);
    assert_eq!(out, vec![Decision::Drop(DropReason::NotNegotiated)]);
}

#[test]
fn a_late_subscriber_waits_for_a_keyframe_requested_once() {
    let mut r = router_with(&[A, B]);
    publish_and_subscribe(&mut r, A, "cam", VP8);
    let t0 = Instant::now();
    let mut out = Vec::new();
    r.on_rtp(A, "cam", &rtp(7, 1, 0, KEYFRAME), t0, t0, &mut out);
    assert_eq!(sends(&out).len(), 1, "B started on a keyframe");

    // C joins later: the driver subscribes it and, on its answer, asks for
    // a keyframe.
    r.join(C, room(), true, false, false).expect("joins");
    let sources = r.sources_for(C);
    assert_eq!(sources, vec![(A, TrackName::new("cam"))]);
    r.subscribe(C, A, "cam", OutSlot(3), Ssrc(33))
        .expect("subscribes");
    let wanted = r.negotiated(C, OutSlot(3), PayloadType(100));
    assert_eq!(
        wanted,
        Some((A, TrackName::new("cam"))),
        "video: wants a keyframe"
    );
    let t1 = t0 + Duration::from_secs(2);
    out.clear();
    r.request_keyframe(A, "cam", t1, &mut out);
    assert_eq!(keyframe_requests(&out), vec![(A, "cam".to_owned())]);
    // A second subscriber's wish inside the throttle interval: no second PLI.
    out.clear();
    r.request_keyframe(A, "cam", t1 + Duration::from_millis(100), &mut out);
    assert!(out.is_empty(), "throttled: {out:?}");

    // Deltas reach B, not C.
    out.clear();
    r.on_rtp(A, "cam", &rtp(7, 2, 3000, DELTA), t1, t1, &mut out);
    assert_eq!(
        sends(&out).iter().map(|s| s.to).collect::<Vec<_>>(),
        vec![B]
    );
    assert!(out.contains(&Decision::Drop(DropReason::BeforeKeyframe)));
    // The keyframe: both; the pending request it satisfied is not sent.
    out.clear();
    r.on_rtp(A, "cam", &rtp(7, 3, 6000, KEYFRAME), t1, t1, &mut out);
    let mut to: Vec<PeerKey> = sends(&out).iter().map(|s| s.to).collect();
    to.sort_unstable();
    assert_eq!(to, vec![B, C]);
    out.clear();
    r.poll_keyframes(t1 + Duration::from_secs(1), &mut out);
    assert!(
        out.is_empty(),
        "the keyframe satisfied the deferred request"
    );
}

#[test]
fn a_subscribers_pli_reaches_the_publisher_throttled() {
    let mut r = router_with(&[A, B, C]);
    publish_and_subscribe(&mut r, A, "cam", VP8);
    let t0 = Instant::now();
    let mut out = Vec::new();
    r.keyframe_request_from(B, slot(A), t0, &mut out);
    assert_eq!(keyframe_requests(&out), vec![(A, "cam".to_owned())]);
    out.clear();
    r.keyframe_request_from(C, slot(A), t0 + Duration::from_millis(50), &mut out);
    assert!(out.is_empty(), "merged into the PLI just sent");
    r.poll_keyframes(t0 + Duration::from_millis(200), &mut out);
    assert!(out.is_empty(), "not yet due");
    r.poll_keyframes(t0 + KEYFRAME_THROTTLE, &mut out);
    assert_eq!(
        keyframe_requests(&out),
        vec![(A, "cam".to_owned())],
        "the deferred request, once the interval is over"
    );
    // Audio has no keyframes; an unknown slot names nothing.
    out.clear();
    publish_and_subscribe(&mut r, A, "mic", OPUS);
    r.request_keyframe(A, "mic", t0 + Duration::from_secs(5), &mut out);
    r.keyframe_request_from(B, OutSlot(999), t0 + Duration::from_secs(5), &mut out);
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn unsubscribing_stops_forwarding() {
    let mut r = router_with(&[A, B, C]);
    publish_and_subscribe(&mut r, A, "mic", OPUS);
    let now = Instant::now();
    let mut out = Vec::new();
    // C leaves: only B gets A's audio.
    let left = r.leave(C);
    assert!(left.unsubscribed.is_empty(), "C published nothing");
    assert!(!left.room_closed);
    r.on_rtp(A, "mic", &rtp(7, 1, 0, &[1]), now, now, &mut out);
    assert_eq!(
        sends(&out).iter().map(|s| s.to).collect::<Vec<_>>(),
        vec![B]
    );
    // A stops publishing: B's subscription ends; the track is unknown.
    let mut ended = Vec::new();
    assert_eq!(r.unpublish(A, "mic", &mut ended), Some(OPUS));
    assert_eq!(ended, vec![(B, slot(A))]);
    out.clear();
    r.on_rtp(A, "mic", &rtp(7, 2, 960, &[1]), now, now, &mut out);
    assert_eq!(out, vec![Decision::Drop(DropReason::UnknownTrack)]);
    // The publisher leaving ends the subscriptions to what it published.
    publish_and_subscribe(&mut r, A, "mic2", OPUS);
    let left = r.leave(A);
    assert_eq!(left.unsubscribed, vec![(B, slot(A))]);
    let left = r.leave(B);
    assert!(left.room_closed, "the last member closes the room");
    assert!(!r.has_room(&room()));
}

#[test]
fn rewriting_keeps_sequence_and_timestamps_continuous_across_a_source_switch() {
    let mut r = router_with(&[A, B]);
    publish_and_subscribe(&mut r, A, "mic", OPUS);
    let t0 = Instant::now();
    let mut out = Vec::new();
    for i in 0..3u16 {
        r.on_rtp(
            A,
            "mic",
            &rtp(7, 500 + i, 9600 + u32::from(i) * 960, &[1]),
            t0,
            t0,
            &mut out,
        );
    }
    let last = *sends(&out).last().expect("sent");
    assert_eq!((last.seq, last.ts), (502, 9600 + 2 * 960));
    // The publisher restarts on a new SSRC with unrelated numbers.
    out.clear();
    let t1 = t0 + Duration::from_millis(20);
    r.on_rtp(A, "mic", &rtp(8, 40_000, 123, &[1]), t1, t1, &mut out);
    let next = sends(&out)[0];
    assert_eq!(next.seq, 503, "continues the sequence");
    assert_eq!(
        next.ts,
        last.ts + 960,
        "continues the clock by the time elapsed"
    );
    assert_eq!(next.ssrc, last.ssrc, "one outgoing stream");
    // A straggler of the old source is dropped.
    out.clear();
    r.on_rtp(A, "mic", &rtp(7, 501, 10_560, &[1]), t1, t1, &mut out);
    assert_eq!(
        out,
        vec![Decision::Drop(DropReason::Rewrite(
            RewriteDrop::StaleSource
        ))]
    );

    // A later track on the same slot continues the slot's stream.
    let mut ended = Vec::new();
    r.unpublish(A, "mic", &mut ended);
    r.publish(A, TrackName::new("mic-2"), OPUS)
        .expect("publishes");
    r.subscribe(B, A, "mic-2", slot(A), next.ssrc)
        .expect("reuses the slot");
    r.negotiated(B, slot(A), PayloadType(111));
    out.clear();
    let t2 = t1 + Duration::from_millis(20);
    r.on_rtp(A, "mic-2", &rtp(9, 7, 77, &[1]), t2, t2, &mut out);
    let reused = sends(&out)[0];
    assert_eq!(
        reused.seq, 504,
        "no restart: the SRTP replay window would drop it"
    );
    assert_eq!(reused.pt, PayloadType(111));
}

#[test]
fn a_room_on_standby_forwards_nothing_and_resumes_on_sfu() {
    let mut r = Router::new(3);
    r.join(A, room(), false, false, false).expect("joins");
    r.join(B, room(), false, false, false).expect("joins");
    r.publish(A, TrackName::new("mic"), OPUS)
        .expect("publishes");
    assert!(
        r.subscribers_for(A, "mic").is_empty(),
        "standby: no subscriptions yet"
    );
    let now = Instant::now();
    let mut out = Vec::new();
    assert!(!r.on_rtp(A, "mic", &rtp(7, 1, 0, &[1]), now, now, &mut out));
    assert_eq!(out, vec![Decision::Drop(DropReason::Standby)]);
    assert_eq!(r.set_sfu(&room()), Some(vec![A, B]));
    assert_eq!(r.set_sfu(&room()), None, "already sfu");
    assert!(r.wants(B, A, "mic"));
    assert!(!r.wants(A, A, "mic"), "never one's own track");
}

#[test]
fn a_mix_room_mixes_audio_instead_of_forwarding_it() {
    let mut r = Router::new(3);
    let joined = r.join(A, room(), true, true, false).expect("joins");
    assert!(
        joined.new_room && !joined.tracked,
        "a mix room has no tracker"
    );
    r.set_audio_input(A, Some(joined.input));
    r.join(B, room(), true, false, false).expect("joins");
    r.publish(A, TrackName::new("mic"), OPUS)
        .expect("publishes");
    assert!(!r.wants(B, A, "mic"), "the mix carries it");
    let now = Instant::now();
    let mut out = Vec::new();
    r.on_rtp(A, "mic", &rtp(7, 1, 0, &[1]), now, now, &mut out);
    assert_eq!(
        out,
        vec![Decision::Mix {
            input: joined.input
        }]
    );
}

#[test]
fn muted_tracks_and_classic_or_unauthorized_subscribers_get_nothing() {
    let mut r = router_with(&[A, B]);
    r.join(C, room(), true, false, true)
        .expect("a classic member joins");
    r.set_can_subscribe(B, false);
    r.publish(A, TrackName::new("mic"), OPUS)
        .expect("publishes");
    assert!(r.subscribers_for(A, "mic").is_empty());
    r.set_muted(A, MediaKind::Audio, true);
    let now = Instant::now();
    let mut out = Vec::new();
    r.on_rtp(A, "mic", &rtp(7, 1, 0, &[1]), now, now, &mut out);
    assert_eq!(out, vec![Decision::Drop(DropReason::Muted)]);
}

#[test]
fn a_classic_client_sees_the_speaker_with_a_rewritten_descriptor() {
    let mut r = router_with(&[A]);
    r.join(C, room(), true, false, true)
        .expect("a classic member joins");
    r.attach_speaker(C, OutSlot(1), Ssrc(77));
    r.speaker_negotiated(C, Some(PayloadType(120)));
    r.publish(A, TrackName::new("cam"), VP8).expect("publishes");
    let t0 = Instant::now();
    let mut out = Vec::new();
    // The only speaker with video is chosen; its keyframe is asked for.
    r.follow_speakers(t0, &mut out);
    assert_eq!(keyframe_requests(&out), vec![(A, "cam".to_owned())]);
    out.clear();
    r.on_rtp(A, "cam", &rtp(5, 10, 0, DELTA), t0, t0, &mut out);
    assert!(out.is_empty(), "not shown before its keyframe: {out:?}");
    // With a picture id (X, I, 15-bit): the switch starts a new source.
    let payload = [0x90, 0x80, 0x80 | 0x12, 0x34, 0x00, 0x00];
    r.on_rtp(A, "cam", &rtp(5, 11, 0, &payload), t0, t0, &mut out);
    let sent = sends(&out);
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].to, sent[0].out, sent[0].ssrc),
        (C, OutSlot(1), Ssrc(77))
    );
    let patch = sent[0].patch.expect("a VP8 descriptor patch");
    assert_eq!(patch.bytes().len(), payload.len());
    assert_eq!(r.speaker_shown(C), Some(A));
    out.clear();
    r.keyframe_request_from(C, OutSlot(1), t0 + Duration::from_secs(1), &mut out);
    assert_eq!(keyframe_requests(&out), vec![(A, "cam".to_owned())]);
}

#[test]
fn setup_errors_name_what_is_missing() {
    let mut r = router_with(&[A, B]);
    publish_and_subscribe(&mut r, A, "cam", VP8);
    assert!(matches!(
        r.subscribe(B, A, "nope", OutSlot(9), Ssrc(1)),
        Err(RouterError::NoTrack { .. })
    ));
    assert_eq!(
        r.join(A, room(), true, false, false),
        Err(RouterError::AlreadyMember(A))
    );
}

#[test]
fn video_back_after_a_silence_asks_its_publisher_for_a_keyframe() {
    let mut r = router_with(&[A, B]);
    publish_and_subscribe(&mut r, A, "cam", VP8);
    let t0 = Instant::now();
    let mut out = Vec::new();
    r.on_rtp(A, "cam", &rtp(7, 1, 0, KEYFRAME), t0, t0, &mut out);
    // Frames at a normal pace: no request.
    let mut t = t0;
    for seq in 2..10u16 {
        t += Duration::from_millis(100);
        out.clear();
        r.on_rtp(
            A,
            "cam",
            &rtp(7, seq, u32::from(seq) * 3000, DELTA),
            t,
            t,
            &mut out,
        );
        assert!(keyframe_requests(&out).is_empty(), "{out:?}");
    }
    // A static screen's second between frames: still none.
    t += Duration::from_millis(1000);
    out.clear();
    r.on_rtp(A, "cam", &rtp(7, 10, 30_000, DELTA), t, t, &mut out);
    assert!(keyframe_requests(&out).is_empty(), "{out:?}");
    // 2.3 s of nothing (the publisher's address changed), then a delta:
    // forwarded, and one keyframe request for the subscribers that missed.
    t += Duration::from_millis(2300);
    out.clear();
    r.on_rtp(A, "cam", &rtp(7, 11, 33_000, DELTA), t, t, &mut out);
    assert_eq!(sends(&out).len(), 1);
    assert_eq!(keyframe_requests(&out), vec![(A, "cam".to_owned())]);
    // The next delta right after: nothing more.
    out.clear();
    let t2 = t + Duration::from_millis(30);
    r.on_rtp(A, "cam", &rtp(7, 12, 36_000, DELTA), t2, t2, &mut out);
    assert!(keyframe_requests(&out).is_empty(), "{out:?}");
    // Audio never asks.
    publish_and_subscribe(&mut r, A, "mic", OPUS);
    out.clear();
    r.on_rtp(A, "mic", &rtp(8, 1, 0, &[1, 2, 3]), t2, t2, &mut out);
    let t3 = t2 + Duration::from_secs(5);
    out.clear();
    r.on_rtp(A, "mic", &rtp(8, 2, 960, &[1, 2, 3]), t3, t3, &mut out);
    assert!(keyframe_requests(&out).is_empty(), "{out:?}");
}
