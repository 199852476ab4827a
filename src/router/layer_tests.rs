//! Simulcast in the router, without sockets: layers ranked by the size
//! received, switches at keyframes only, continuous sequence numbers and
//! picture ids, wishes, a layer that stops, dynacast.

use std::time::{Duration, Instant};

use super::tests::{publish_and_subscribe, router_with, rtp, sends, slot};
use super::*;
use crate::media::codec::Vp8Descriptor;

const A: PeerKey = PeerKey(1);
const B: PeerKey = PeerKey(2);
const C: PeerKey = PeerKey(3);

const SIMULCAST: TrackInfo = TrackInfo {
    kind: MediaKind::Video,
    codec: Codec::Vp8,
    clock_rate: 90_000,
    simulcast: true,
};

/// The three encodings of A's camera: SSRC, rid, size. They arrive in
/// this order (largest first), so the ranking must come from the sizes.
const F: (u32, &str, u16, u16) = (301, "f", 1280, 720);
const Q: (u32, &str, u16, u16) = (101, "q", 320, 180);
const H: (u32, &str, u16, u16) = (201, "h", 640, 360);

/// A VP8 payload with a 15-bit picture id; a keyframe declares its size.
fn vp8(picture_id: u16, key: Option<(u16, u16)>, size: usize) -> Vec<u8> {
    let mut p = vec![0x90, 0x80, 0x80 | (picture_id >> 8) as u8, picture_id as u8];
    match key {
        Some((w, h)) => {
            p.extend_from_slice(&[0x50, 0x2a, 0x01, 0x9d, 0x01, 0x2a]);
            p.extend_from_slice(&w.to_le_bytes());
            p.extend_from_slice(&h.to_le_bytes());
        }
        None => p.extend_from_slice(&[0x51, 0x00, 0x00]),
    }
    p.resize(size, 0);
    p
}

/// The same with L1T3's TL0PICIDX and TID (keyframes are TL0).
fn vp8_layered(picture_id: u16, tid: u8, key: Option<(u16, u16)>, size: usize) -> Vec<u8> {
    let mut p = vp8(picture_id, key, size);
    p[1] = 0xe0;
    p.splice(4..4, [0, tid << 6]);
    p.truncate(size);
    p
}

/// L1T3's temporal layer of a picture (0 2 1 2, from a keyframe on).
fn tid_of(picture: u16) -> u8 {
    [0, 2, 1, 2][usize::from(picture % 4)]
}

/// The picture id a sent copy carries (its patch, or the original).
fn picture_id_sent(d: &Send, original: &[u8]) -> u16 {
    let mut bytes = original.to_vec();
    if let Some(patch) = d.patch {
        bytes[..patch.bytes().len()].copy_from_slice(patch.bytes());
    }
    Vp8Descriptor::parse(&bytes)
        .expect("a VP8 descriptor")
        .picture_id
        .expect("a picture id")
}

struct Call {
    r: Router,
    t: Instant,
    /// Per encoding: next sequence number and picture id.
    seq: [u16; 3],
    pic: [u16; 3],
    /// Packets carry L1T3 temporal layers.
    layered: bool,
}

impl Call {
    fn new(members: &[PeerKey]) -> Call {
        let mut r = router_with(members);
        publish_and_subscribe(&mut r, A, "cam", SIMULCAST);
        for (ssrc, rid, _, _) in [F, Q, H] {
            r.set_rid(A, "cam", ssrc, rid);
        }
        Call {
            r,
            t: Instant::now(),
            seq: [1000, 5000, 9000],
            pic: [100, 20_000, 32_760],
            layered: false,
        }
    }

    fn idx(ssrc: u32) -> usize {
        [F.0, Q.0, H.0]
            .iter()
            .position(|&s| s == ssrc)
            .expect("known")
    }

    /// One packet of encoding `enc`; returns the decisions.
    fn packet(&mut self, enc: (u32, &str, u16, u16), key: bool) -> (Vec<Decision>, Vec<u8>) {
        let i = Call::idx(enc.0);
        // About 60, 160 and 370 kbit/s at 30 frames per second.
        let size = [1500, 200, 600][i];
        let size_key = key.then_some((enc.2, enc.3));
        let payload = if self.layered {
            if key {
                // A keyframe restarts the pattern at TL0.
                self.pic[i] &= !3;
            }
            vp8_layered(self.pic[i], tid_of(self.pic[i]), size_key, size)
        } else {
            vp8(self.pic[i], size_key, size)
        };
        self.pic[i] = (self.pic[i] + 1) & 0x7fff;
        let seq = self.seq[i];
        self.seq[i] = seq.wrapping_add(1);
        let mut out = Vec::new();
        self.r.on_rtp(
            A,
            "cam",
            &rtp(enc.0, seq, u32::from(seq) * 3000, &payload),
            self.t,
            self.t,
            &mut out,
        );
        (out, payload)
    }

    /// One frame of every encoding, 33 ms apart.
    fn frame(&mut self, key: bool) -> Vec<(u32, Vec<Decision>, Vec<u8>)> {
        self.t += Duration::from_millis(33);
        [F, Q, H]
            .into_iter()
            .map(|e| {
                let (d, p) = self.packet(e, key);
                (e.0, d, p)
            })
            .collect()
    }

    /// The first frames (sizes learnt), the allocator's first round for
    /// `subs`, and a keyframe of every layer.
    fn start(&mut self, subs: &[PeerKey]) {
        self.frame(true);
        for &sub in subs {
            // Room for the smallest layer only.
            self.allocate(sub, Some(200_000));
        }
        self.frame(true);
    }

    /// `rounds` allocation rounds for `subs`, each after half a second of
    /// frames (so bitrates are measured at their real rates).
    fn run(&mut self, subs: &[PeerKey], estimate: Option<u64>, rounds: usize) -> Vec<Decision> {
        let mut all = Vec::new();
        for _ in 0..rounds {
            for _ in 0..15 {
                self.frame(false);
            }
            for &sub in subs {
                all.extend(self.allocate(sub, estimate));
            }
        }
        all
    }

    fn allocate(&mut self, sub: PeerKey, estimate: Option<u64>) -> Vec<Decision> {
        let mut out = Vec::new();
        self.r.allocate(sub, estimate, self.t, &mut out);
        out
    }

    fn view(&self, sub: PeerKey) -> LayerView {
        self.r
            .subscriptions_of(sub)
            .into_iter()
            .next()
            .expect("one video subscription")
    }
}

/// The SSRC of the encoding whose packets reached `sub` in `frame`.
fn forwarded_to(sub: PeerKey, frame: &[(u32, Vec<Decision>, Vec<u8>)]) -> Vec<u32> {
    frame
        .iter()
        .filter(|(_, d, _)| sends(d).iter().any(|s| s.to == sub))
        .map(|(ssrc, _, _)| *ssrc)
        .collect()
}

#[test]
fn layers_rank_by_the_size_received_and_a_new_subscriber_starts_on_the_smallest() {
    let mut c = Call::new(&[A, B]);
    let first = c.frame(true);
    // Nothing before the allocator chose (whichever layer came first).
    assert_eq!(forwarded_to(B, &first), Vec::<u32>::new());
    let asked = c.allocate(B, Some(200_000));
    assert!(
        asked
            .iter()
            .any(|d| matches!(d, Decision::RequestKeyframe { ssrc: Some(s), .. } if *s == Q.0)),
        "{asked:?}"
    );
    let enc = c.r.encodings(A, "cam").expect("published");
    let ranked: Vec<(Option<&str>, u16)> = (0..3)
        .map(|l| enc.at(Layer(l)).expect("three layers"))
        .map(|e| (e.rid.as_deref(), e.height))
        .collect();
    assert_eq!(
        ranked,
        [(Some("q"), 180), (Some("h"), 360), (Some("f"), 720)]
    );
    // Only the smallest layer's keyframe starts B's stream.
    assert_eq!(forwarded_to(B, &c.frame(true)), vec![Q.0]);
    for _ in 0..5 {
        assert_eq!(forwarded_to(B, &c.frame(false)), vec![Q.0]);
    }
}

#[test]
fn a_switch_up_waits_for_the_keyframe_and_keeps_the_stream_continuous() {
    let mut c = Call::new(&[A, B]);
    c.start(&[B]);
    // Plenty of bandwidth: the allocator climbs.
    let asked: Vec<Option<u32>> = c
        .run(&[B], None, 4)
        .into_iter()
        .filter_map(|d| match d {
            Decision::RequestKeyframe { ssrc, .. } => Some(ssrc),
            _ => None,
        })
        .collect();
    assert_eq!(c.view(B).target, Some(Layer(2)), "{:?}", c.view(B));
    assert!(asked.contains(&Some(F.0)), "a PLI for f: {asked:?}");
    // Until f's keyframe, q keeps flowing; its last sequence number and
    // picture id are where the switch continues.
    let before = c.frame(false);
    assert_eq!(forwarded_to(B, &before), vec![Q.0]);
    let (_, d, p) = before.iter().find(|(s, _, _)| *s == Q.0).expect("q");
    let last = sends(d)[0];
    let last_pic = picture_id_sent(&last, p);
    // f's keyframe: the switch.
    c.t += Duration::from_millis(33);
    let (d, p) = c.packet(F, true);
    let first = sends(&d);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].seq, last.seq.wrapping_add(1));
    assert_eq!(first[0].ssrc, last.ssrc);
    assert_eq!(picture_id_sent(&first[0], &p), (last_pic + 1) & 0x7fff);
    // From now on only f reaches B, and a late q packet is not forwarded.
    let (d, _) = c.packet(Q, false);
    assert!(sends(&d).iter().all(|s| s.to != B));
    let next = c.frame(false);
    assert_eq!(forwarded_to(B, &next), vec![F.0]);
    let (_, d, p) = next.iter().find(|(s, _, _)| *s == F.0).expect("f");
    assert_eq!(sends(d)[0].seq, first[0].seq.wrapping_add(1));
    assert_eq!(picture_id_sent(&sends(d)[0], p), (last_pic + 2) & 0x7fff);
}

#[test]
fn picture_ids_stay_continuous_across_a_wrap_and_a_switch_down() {
    let mut c = Call::new(&[A, B]);
    c.start(&[B]);
    // Climb to f (h's picture ids start near the 15-bit wrap).
    c.run(&[B], None, 4);
    c.packet(F, true);
    let mut last = None;
    for _ in 0..3 {
        let f = c.frame(false);
        let (_, d, p) = f.iter().find(|(s, _, _)| *s == F.0).expect("f");
        last = Some(picture_id_sent(&sends(d)[0], p));
    }
    // The estimate collapses: down to q (h's ids wrap meanwhile).
    c.run(&[B], Some(100_000), 1);
    assert_eq!(c.view(B).target, Some(Layer(0)));
    let f = c.frame(false);
    assert_eq!(forwarded_to(B, &f), vec![F.0], "f until q's keyframe");
    let (_, d, p) = f.iter().find(|(s, _, _)| *s == F.0).expect("f");
    last = Some(picture_id_sent(&sends(d)[0], p)).or(last);
    c.t += Duration::from_millis(33);
    let (d, p) = c.packet(Q, true);
    assert_eq!(
        picture_id_sent(&sends(&d)[0], &p),
        (last.expect("sent") + 1) & 0x7fff
    );
}

#[test]
fn wishes_cap_and_pause_and_dynacast_keeps_what_someone_needs() {
    let mut c = Call::new(&[A, B, C]);
    c.start(&[B, C]);
    // B shows A in a 180 px tile; C has A off-screen.
    assert!(c.r.set_wish(
        B,
        slot(A),
        Wish {
            max_height: Some(180),
            paused: false
        }
    ));
    assert!(c.r.set_wish(
        C,
        slot(A),
        Wish {
            max_height: None,
            paused: true
        }
    ));
    for _ in 0..4 {
        c.run(&[B, C], None, 1);
        let f = c.frame(false);
        assert!(forwarded_to(C, &f).is_empty(), "paused: nothing to C");
    }
    assert_eq!(c.view(B).target, Some(Layer(0)));
    assert_eq!(c.view(C).paused, Some(allocator::PauseCause::Wish));
    let mut needed = Vec::new();
    c.r.needed_layers(A, "cam", &mut needed);
    assert_eq!(needed, vec![Q.0], "only q is needed");
    // Nobody could use a layer taller than 720 px: an offered rid never
    // received may be paused too.
    assert!(!c.r.wants_taller(A, "cam"));
    c.r.set_wish(
        B,
        slot(A),
        Wish {
            max_height: Some(1080),
            paused: false,
        },
    );
    assert!(c.r.wants_taller(A, "cam"), "B's tile is taller than 720 px");
    c.r.set_wish(
        B,
        slot(A),
        Wish {
            max_height: Some(180),
            paused: false,
        },
    );
    // C scrolls A back into view: with room to spare it gets f, at f's
    // next keyframe (asked for), and dynacast wants f again.
    c.r.set_wish(C, slot(A), Wish::default());
    c.t += Duration::from_millis(500);
    let asked = c.allocate(C, None);
    assert!(
        asked
            .iter()
            .any(|d| matches!(d, Decision::RequestKeyframe { ssrc: Some(s), .. } if *s == F.0)),
        "{asked:?}"
    );
    assert!(
        forwarded_to(C, &c.frame(false)).is_empty(),
        "resumes at a keyframe"
    );
    assert_eq!(forwarded_to(C, &c.frame(true)), vec![F.0]);
    c.r.needed_layers(A, "cam", &mut needed);
    assert!(needed.contains(&F.0), "{needed:?}");
    assert!(c.r.wants_taller(A, "cam"), "C has no height limit");
}

#[test]
fn a_layer_that_stops_is_left_for_one_that_sends() {
    let mut c = Call::new(&[A, B]);
    c.start(&[B]);
    c.run(&[B], None, 4);
    c.packet(F, true);
    assert_eq!(c.view(B).current, Some(Layer(2)));
    // f stops (its publisher's CPU, or a network cap at the publisher):
    // only q and h keep sending.
    for _ in 0..45 {
        c.t += Duration::from_millis(33);
        c.packet(Q, false);
        c.packet(H, false);
    }
    c.t += Duration::from_millis(10);
    c.allocate(B, None);
    assert_eq!(c.view(B).target, Some(Layer(1)), "{:?}", c.view(B));
    c.t += Duration::from_millis(33);
    let (d, _) = c.packet(H, true);
    assert_eq!(sends(&d).len(), 1, "h's keyframe reaches B");
}

#[test]
fn a_fourth_encoding_is_dropped_and_the_others_go_on() {
    let mut c = Call::new(&[A, B]);
    c.start(&[B]);
    let mut out = Vec::new();
    let payload = vp8(1, Some((1920, 1080)), 100);
    c.r.on_rtp(A, "cam", &rtp(999, 1, 1, &payload), c.t, c.t, &mut out);
    assert_eq!(out, vec![Decision::Drop(DropReason::ExtraEncoding)]);
    assert_eq!(forwarded_to(B, &c.frame(false)), vec![Q.0]);
}

#[test]
fn a_classic_member_keeps_the_middle_layer_on() {
    let mut c = Call::new(&[A, B]);
    c.start(&[B]);
    // B shows A small: q alone would do.
    c.r.set_wish(
        B,
        slot(A),
        Wish {
            max_height: Some(180),
            paused: false,
        },
    );
    c.run(&[B], None, 1);
    let mut needed = Vec::new();
    c.r.needed_layers(A, "cam", &mut needed);
    assert_eq!(needed, vec![Q.0]);
    // A classic client joins: it is shown A's middle layer (h).
    c.r.join(C, super::tests::room(), true, false, true)
        .expect("joins");
    c.r.needed_layers(A, "cam", &mut needed);
    assert_eq!(needed, vec![Q.0, H.0]);
}

#[test]
fn a_tight_estimate_thins_temporal_layers_and_the_stream_has_no_gap() {
    let mut c = Call::new(&[A, B]);
    c.layered = true;
    c.start(&[B]);
    assert!(c.r.set_wish(
        B,
        slot(A),
        Wish {
            max_height: Some(180),
            paused: false
        }
    ));
    // Rates measured, every picture of q sent.
    c.run(&[B], Some(200_000), 3);
    assert_eq!(c.r.temporal_limit(B, A, "cam"), Some(u8::MAX));
    // q costs ~62 kbit/s: TL0 a quarter of its pictures (~16), TL0+TL1
    // half (~31). 45 kbit/s buys TL0+TL1: down at once, no keyframe.
    let asked = c.run(&[B], Some(45_000), 1);
    assert!(
        !asked
            .iter()
            .any(|d| matches!(d, Decision::RequestKeyframe { .. })),
        "{asked:?}"
    );
    assert_eq!(c.view(B).current, Some(Layer(0)));
    let mut sent = Vec::new(); // (seq, picture id, tid)
    for _ in 0..12 {
        for (ssrc, d, p) in c.frame(false) {
            let tid = Vp8Descriptor::parse(&p).expect("vp8").temporal_id;
            for s in sends(&d).iter().filter(|s| s.to == B) {
                assert_eq!(ssrc, Q.0);
                sent.push((s.seq, picture_id_sent(s, &p), tid.expect("a TID")));
            }
        }
    }
    assert_eq!(c.r.temporal_limit(B, A, "cam"), Some(1));
    assert_eq!(sent.len(), 6, "half of 12 pictures: {sent:?}");
    assert!(sent.iter().all(|&(_, _, tid)| tid <= 1), "{sent:?}");
    for w in sent.windows(2) {
        assert_eq!(w[1].0, w[0].0.wrapping_add(1), "sequence numbers: {sent:?}");
        assert_eq!(w[1].1, (w[0].1 + 1) & 0x7fff, "picture ids: {sent:?}");
    }
    // Room again: back to every picture, after the hold, without a
    // keyframe, from a TL0 picture on (the TL1 and TL2 pictures before it
    // may depend on TL2 pictures B never got). The numbering has no gap
    // throughout.
    let mut prev = (sent[5].0, sent[5].1);
    let mut tids = Vec::new();
    for _ in 0..10 {
        for _ in 0..15 {
            for (_, d, p) in c.frame(false) {
                let tid = Vp8Descriptor::parse(&p).expect("vp8").temporal_id;
                for s in sends(&d).iter().filter(|s| s.to == B) {
                    let pid = picture_id_sent(s, &p);
                    assert_eq!(s.seq, prev.0.wrapping_add(1), "{tids:?}");
                    assert_eq!(pid, (prev.1 + 1) & 0x7fff, "{tids:?}");
                    prev = (s.seq, pid);
                    tids.push(tid.expect("a TID"));
                }
            }
        }
        let asked = c.allocate(B, Some(90_000));
        assert!(
            !asked
                .iter()
                .any(|d| matches!(d, Decision::RequestKeyframe { .. })),
            "no keyframe for temporal layers: {asked:?}"
        );
    }
    assert_eq!(c.r.temporal_limit(B, A, "cam"), Some(u8::MAX));
    let first_tl2 = tids.iter().position(|&t| t == 2).expect("TL2 again");
    assert!(first_tl2 > 0 && tids[first_tl2 - 1] == 0, "{tids:?}");
    let pattern: Vec<u8> = (0..)
        .map(|i| [2, 1, 2, 0][i % 4])
        .take(tids.len() - first_tl2)
        .collect();
    assert_eq!(
        tids[first_tl2..],
        pattern[..],
        "every picture from there on"
    );
}
