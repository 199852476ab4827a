//! Simulcast: a published track's encodings, the one each subscriber
//! receives, and the switch from one to another.
//!
//! - A track's [`Encodings`] are learnt from its packets: one per SSRC (a
//!   simulcast track has up to [`MAX_ENCODINGS`], named by rid), each with
//!   its picture size (read from its keyframes), its measured bitrate and
//!   when it last sent. Layers are ranked by the size actually received,
//!   not by rid name: layer 0 is the smallest picture.
//! - A subscription's `SubLayers` holds the encoding it receives
//!   (`current`) and the one the allocator chose (`target`). A switch
//!   happens only at a keyframe of the target (asked for with a PLI to its
//!   SSRC); until then the current encoding keeps flowing. Sequence numbers
//!   and timestamps stay continuous ([`SeqRewriter`] follows the SSRC
//!   change) and the VP8 descriptor is rewritten ([`Vp8Munger`]).
//! - [`Router::allocate`] runs the subscriber's [`Allocator`] over its
//!   video subscriptions and turns the result into targets and keyframe
//!   requests; [`Router::needed_layers`] is what dynacast tells a
//!   publisher to keep encoding.
//!
//! [`SeqRewriter`]: crate::media::rewrite::SeqRewriter

use std::time::{Duration, Instant};

use super::allocator::{
    Allocation, Allocator, LayerInfo, PauseCause, Rise, Summary, Target, TrackDemand,
};
use super::{Decision, Layer, OutSlot, PeerKey, Router, TrackInfo, TrackName};
use crate::media::codec::Codec;
use crate::media::vp8::Vp8Munger;
use crate::sfu::MediaKind;

pub use super::encodings::{Encoding, Encodings, LAYER_STALE, MAX_ENCODINGS};

/// A switch whose keyframe has not come this long after the request asks
/// again (the PLI or the keyframe was lost).
const SWITCH_RETRY: Duration = Duration::from_millis(1000);

/// What a subscriber asked for one track (`track-settings`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Wish {
    /// The tallest picture worth sending; `None`: no limit.
    pub max_height: Option<u32>,
    /// Off-screen: nothing.
    pub paused: bool,
}

/// Which encoding one subscription receives, and which it should.
#[derive(Debug, Clone)]
pub(super) struct SubLayers {
    simulcast: bool,
    /// The encoding forwarded now (`None`: waiting for a first keyframe).
    current: Option<u32>,
    /// The encoding chosen (`None`: not chosen yet, the smallest live).
    target: Option<u32>,
    /// Paused by the allocator (wish or bandwidth): nothing is forwarded.
    paused: Option<PauseCause>,
    /// When the target's keyframe was last asked for.
    asked: Option<Instant>,
    pub(super) wish: Wish,
    /// Keeps the picture ids continuous across switches (VP8 simulcast).
    pub(super) vp8: Option<Vp8Munger>,
    /// The highest temporal layer (TID) chosen, and the one forwarded now
    /// (`u8::MAX`: all). A step down takes effect at the next picture, a
    /// step up at the next TL0 picture (which depends on nothing left out).
    tid_target: u8,
    tid_limit: u8,
}

/// The temporal layer of a packet of a VP8 track that has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Temporal {
    pub tid: u8,
    /// The packet starts a picture.
    pub starts_picture: bool,
}

impl Temporal {
    /// From a VP8 payload; `None` without a TID (or a descriptor that does
    /// not parse, which the munger then refuses).
    pub(super) fn of_vp8(payload: &[u8]) -> Option<Temporal> {
        let d = crate::media::codec::Vp8Descriptor::parse(payload).ok()?;
        Some(Temporal {
            tid: d.temporal_id?,
            starts_picture: d.start_of_partition && d.partition_id == 0,
        })
    }
}

/// What happens to one packet of a simulcast track for one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admit {
    Forward,
    /// Another layer than the one it receives, or a layer it waits for a
    /// keyframe of: not for this subscriber, and not a loss.
    Skip,
    Paused,
    /// A temporal layer above the one it receives: left out, and numbered
    /// as if never sent.
    Thinned,
}

impl SubLayers {
    pub(super) fn new(info: TrackInfo) -> Self {
        SubLayers {
            simulcast: info.simulcast,
            current: None,
            target: None,
            paused: None,
            asked: None,
            wish: Wish::default(),
            vp8: (info.simulcast && info.codec == Codec::Vp8).then(Vp8Munger::new),
            tid_target: u8::MAX,
            tid_limit: u8::MAX,
        }
    }

    pub(super) fn is_paused(&self) -> bool {
        self.paused.is_some()
    }

    /// A packet of encoding `ssrc`. Nothing is forwarded before the
    /// allocator chose a layer (its next round, within
    /// `ALLOCATE_EVERY`): the first packets of a simulcast track come from
    /// whichever layer the network delivers first, not the one to start on.
    pub(super) fn admit(&mut self, ssrc: u32, keyframe: bool, temporal: Option<Temporal>) -> Admit {
        if self.paused.is_some() {
            return Admit::Paused;
        }
        if self.current != Some(ssrc) {
            if !(keyframe && self.target == Some(ssrc)) {
                return Admit::Skip;
            }
            self.current = Some(ssrc);
            self.asked = None;
            // A keyframe depends on nothing: the new layer starts with the
            // temporal layers chosen.
            self.tid_limit = self.tid_target;
        }
        let Some(t) = temporal else {
            return Admit::Forward;
        };
        if t.starts_picture
            && self.tid_limit != self.tid_target
            && (self.tid_target < self.tid_limit || t.tid == 0)
        {
            self.tid_limit = self.tid_target;
        }
        if t.tid <= self.tid_limit {
            Admit::Forward
        } else {
            Admit::Thinned
        }
    }

    /// The encoding a keyframe request from this subscriber is for: the
    /// one it switches to, else the one it receives.
    fn wanted(&self) -> Option<u32> {
        match (self.target, self.current) {
            (Some(t), c) if c != Some(t) => Some(t),
            (_, Some(c)) => Some(c),
            (t, None) => t,
        }
    }
}

/// What [`Router::allocate`] did for one subscriber.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allocated {
    pub summary: Summary,
    /// Subscriptions whose target changed (a switch is under way).
    pub switches: u32,
}

/// One subscribed video track, as [`Router::subscriptions_of`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerView {
    pub publisher: PeerKey,
    pub track: TrackName,
    pub out: OutSlot,
    /// Rank of the encoding forwarded now.
    pub current: Option<Layer>,
    pub target: Option<Layer>,
    pub paused: Option<PauseCause>,
    pub layers: usize,
    /// The highest temporal layer chosen (`u8::MAX`: all).
    pub max_tid: u8,
}

/// Per-subscriber allocation state, kept on the member.
#[derive(Default)]
pub(super) struct SubAlloc {
    allocator: Allocator,
    /// Reused buffers: layer views, demands' keys, results.
    layers: Vec<Vec<LayerInfo>>,
    keys: Vec<(PeerKey, TrackName)>,
    out: Vec<Allocation>,
}

impl Router {
    /// The encoding of `track` this packet belongs to, measured; `None`:
    /// an extra encoding beyond [`MAX_ENCODINGS`] (dropped).
    pub(super) fn track_encoding(
        published: &mut super::Published,
        ssrc: u32,
        payload: &[u8],
        temporal: Option<Temporal>,
        keyframe: bool,
        now: Instant,
    ) -> Option<usize> {
        let info = published.info;
        published
            .encodings
            .on_packet(ssrc, payload, temporal.map(|t| t.tid), &info, keyframe, now)
    }

    /// `publisher`'s encoding `ssrc` of `track` is named `rid`.
    pub fn set_rid(&mut self, publisher: PeerKey, track: &str, ssrc: u32, rid: &str) {
        let Some(p) = self
            .members
            .get_mut(&publisher)
            .and_then(|m| m.published.get_mut(track))
        else {
            return;
        };
        let known = p.encodings.by_ssrc(ssrc).is_some();
        if !known && p.encodings.len() < MAX_ENCODINGS {
            p.encodings.list.push(Encoding::new(ssrc));
            p.encodings.rerank();
        }
        if let Some(e) = p.encodings.by_ssrc_mut(ssrc) {
            e.rid = Some(rid.into());
        }
    }

    /// The encodings of `publisher`'s `track`.
    pub fn encodings(&self, publisher: PeerKey, track: &str) -> Option<&Encodings> {
        Some(
            &self
                .members
                .get(&publisher)?
                .published
                .get(track)?
                .encodings,
        )
    }

    /// `sub`'s wish for the track on its slot `out` (`track-settings`).
    /// Returns false when the slot carries no subscription.
    pub fn set_wish(&mut self, sub: PeerKey, out: OutSlot, wish: Wish) -> bool {
        let Some(s) = self.members.get_mut(&sub) else {
            return false;
        };
        let Some((publisher, track)) = s.by_slot.get(&out) else {
            return false;
        };
        match s.subs.get_mut(publisher).and_then(|t| t.get_mut(track)) {
            Some(down) => {
                down.layers.wish = wish;
                true
            }
            None => false,
        }
    }

    /// `sub`'s video subscriptions and their layers.
    pub fn subscriptions_of(&self, sub: PeerKey) -> Vec<LayerView> {
        let Some(s) = self.members.get(&sub) else {
            return Vec::new();
        };
        let mut views = Vec::new();
        for (&publisher, tracks) in &s.subs {
            for (track, down) in tracks {
                let Some(enc) = self
                    .members
                    .get(&publisher)
                    .and_then(|p| p.published.get(track))
                    .filter(|p| p.info.kind == MediaKind::Video)
                    .map(|p| &p.encodings)
                else {
                    continue;
                };
                let rank = |ssrc: Option<u32>| ssrc.and_then(|s| enc.layer_of(s));
                views.push(LayerView {
                    publisher,
                    track: track.clone(),
                    out: down.out,
                    current: rank(down.layers.current),
                    target: rank(down.layers.target),
                    paused: down.layers.paused,
                    layers: enc.len(),
                    max_tid: down.layers.tid_target,
                });
            }
        }
        views.sort_by_key(|v| v.out);
        views
    }

    /// Chooses the layer of every video track `sub` receives, for a
    /// downlink estimate of `estimate` bit/s (`None`: no estimate, the
    /// subscriber sends no congestion feedback: no limit). New targets get
    /// a keyframe request for their encoding (appended to `out`).
    pub fn allocate(
        &mut self,
        sub: PeerKey,
        estimate: Option<u64>,
        now: Instant,
        out: &mut Vec<Decision>,
    ) -> Allocated {
        self.allocate_tested(sub, estimate, Rise::Estimate, now, out)
    }

    /// [`Router::allocate`] where layers go up only as far as `rise`
    /// allows (see [`Rise`]).
    pub fn allocate_tested(
        &mut self,
        sub: PeerKey,
        estimate: Option<u64>,
        rise: Rise,
        now: Instant,
        out: &mut Vec<Decision>,
    ) -> Allocated {
        let Some(s) = self.members.get_mut(&sub) else {
            return Allocated::default();
        };
        let mut alloc = std::mem::take(&mut s.alloc);
        let room = s.room.clone();
        let speaking: &[crate::mixer::InputId] =
            self.rooms.get(&room).map_or(&[], |r| &r.speaking[..]);
        // The demands: every video subscription, with its publisher's
        // speaking rank as priority; audio only adds to the budget taken.
        alloc.keys.clear();
        let mut audio = 0u64;
        let mut n = 0;
        let mut meta: Vec<(u32, Wish, u64)> = Vec::new();
        {
            let s = &self.members[&sub];
            let mut pubs: Vec<&PeerKey> = s.subs.keys().collect();
            pubs.sort_unstable();
            for &publisher in pubs {
                let Some(p) = self.members.get(&publisher) else {
                    continue;
                };
                let priority = p
                    .audio_input
                    .and_then(|i| speaking.iter().position(|&x| x == i))
                    .map_or(u32::MAX / 2, |r| r as u32);
                let mut tracks: Vec<(&TrackName, &super::Subscription)> =
                    s.subs[&publisher].iter().collect();
                tracks.sort_unstable_by(|a, b| a.0.cmp(b.0));
                for (track, down) in tracks {
                    let Some(published) = p.published.get(track) else {
                        continue;
                    };
                    if published.info.kind == MediaKind::Audio {
                        if !down.layers.is_paused() {
                            audio += published.encodings.total_rate(now);
                        }
                        continue;
                    }
                    if alloc.layers.len() <= n {
                        alloc.layers.push(Vec::with_capacity(MAX_ENCODINGS));
                    }
                    published.encodings.view(
                        now,
                        temporal_slots(&published.info),
                        &mut alloc.layers[n],
                    );
                    if alloc.layers[n].is_empty() {
                        // Nothing arrived yet: one layer of unknown size,
                        // so the track is counted (and can be paused).
                        alloc.layers[n].push(LayerInfo {
                            height: 0,
                            bitrate: 0,
                            live: true,
                        });
                    }
                    alloc.keys.push((publisher, track.clone()));
                    meta.push((priority, down.layers.wish, u64::from(down.out.0)));
                    n += 1;
                }
            }
        }
        let demands: Vec<TrackDemand<'_>> = meta
            .iter()
            .zip(&alloc.layers)
            .map(|(&(priority, wish, key), layers)| TrackDemand {
                key,
                priority,
                layers,
                max_height: wish.max_height,
                paused: wish.paused,
            })
            .collect();
        let summary = alloc.allocator.allocate_tested(
            estimate.unwrap_or(u64::MAX / 4),
            rise,
            audio,
            &demands,
            now,
            &mut alloc.out,
        );
        drop(demands);
        let mut switches = 0;
        for (a, (publisher, track)) in alloc.out.iter().zip(&alloc.keys) {
            if self.apply_target(sub, *publisher, track, a.target, now, out) {
                switches += 1;
            }
        }
        if let Some(s) = self.members.get_mut(&sub) {
            s.alloc = alloc;
        }
        Allocated { summary, switches }
    }

    /// Puts one allocation into effect. Returns whether the target changed
    /// (its encoding, or its temporal layers).
    fn apply_target(
        &mut self,
        sub: PeerKey,
        publisher: PeerKey,
        track: &TrackName,
        target: Target,
        now: Instant,
        out: &mut Vec<Decision>,
    ) -> bool {
        let Some(published) = self
            .members
            .get(&publisher)
            .and_then(|p| p.published.get(track))
        else {
            return false;
        };
        let info = published.info;
        let (layer_ssrc, max_tid) = match target {
            Target::Layer(layer) => published
                .encodings
                .at_slot(layer, temporal_slots(&info))
                .map_or((None, u8::MAX), |(e, tid)| (Some(e.ssrc), tid)),
            Target::Paused(_) => (None, u8::MAX),
        };
        let Some(down) = self
            .members
            .get_mut(&sub)
            .and_then(|s| s.subs.get_mut(&publisher))
            .and_then(|t| t.get_mut(track))
        else {
            return false;
        };
        let l = &mut down.layers;
        let mut temporal_changed = false;
        let (changed, ask) = match target {
            // Nothing arrives: nothing to stop. When its packets come back
            // they go on as before (a silent publisher, a muted one, a
            // layer that restarts), without waiting for a keyframe.
            Target::Paused(PauseCause::NoLiveLayer) => (false, None),
            Target::Paused(cause) => {
                let changed = l.paused.is_none();
                l.paused = Some(cause);
                // Resuming starts at a keyframe.
                l.current = None;
                down.awaiting_keyframe = info.codec.detects_keyframes();
                (changed, None)
            }
            Target::Layer(_) => {
                let resumed = l.paused.take().is_some();
                let changed = resumed || (layer_ssrc.is_some() && layer_ssrc != l.target);
                // Fewer or more temporal layers of the same encoding: no
                // keyframe needed (see `admit`).
                if layer_ssrc.is_some() {
                    temporal_changed = l.tid_target != max_tid;
                    l.tid_target = max_tid;
                }
                if layer_ssrc.is_some() {
                    l.target = layer_ssrc;
                }
                let waiting = l.current.is_none() || (l.simulcast && l.current != l.target);
                let due = l
                    .asked
                    .is_none_or(|t| now.saturating_duration_since(t) >= SWITCH_RETRY);
                let ask = (changed || waiting) && due && info.kind == MediaKind::Video;
                if ask {
                    l.asked = Some(now);
                }
                let simulcast_waiting = l.simulcast && waiting;
                // A paused plain track resumes at its next keyframe.
                if resumed && !l.simulcast {
                    down.awaiting_keyframe = info.codec.detects_keyframes();
                }
                let wanted = if down.layers.simulcast {
                    down.layers.wanted()
                } else {
                    None
                };
                (
                    changed,
                    (ask && (changed || simulcast_waiting || down.awaiting_keyframe))
                        .then_some(wanted),
                )
            }
        };
        if let Some(wanted) = ask {
            let Some(published) = self
                .members
                .get_mut(&publisher)
                .and_then(|p| p.published.get_mut(track))
            else {
                return changed || temporal_changed;
            };
            let requester = match wanted.and_then(|s| published.encodings.by_ssrc_mut(s)) {
                Some(e) => &mut e.keyframes,
                None => &mut published.keyframes,
            };
            if requester.request(now) {
                out.push(Decision::RequestKeyframe {
                    publisher,
                    track: track.clone(),
                    ssrc: wanted,
                });
            }
        }
        changed || temporal_changed
    }

    /// The encodings (SSRCs) of `publisher`'s `track` that a subscriber
    /// needs now: the smallest always (a subscriber whose bandwidth drops
    /// falls back to it), the middle one while classic members watch (their
    /// speaker video), each subscriber's target and current, the one
    /// above its current and the largest its wish allows (so the allocator
    /// can climb to it, a step at a time). The
    /// others can be paused at the publisher (dynacast).
    pub fn needed_layers(&self, publisher: PeerKey, track: &str, out: &mut Vec<u32>) {
        out.clear();
        let Some(p) = self.members.get(&publisher) else {
            return;
        };
        let Some(published) = p.published.get(track) else {
            return;
        };
        let enc = &published.encodings;
        if let Some(e) = enc.at(Layer(0)) {
            out.push(e.ssrc);
        }
        let Some(room) = self.rooms.get(&p.room) else {
            return;
        };
        // Classic members are shown the speaker's middle layer.
        let classic = room
            .members
            .iter()
            .any(|m| self.members.get(m).is_some_and(|m| m.classic));
        if let Some(ssrc) = Router::classic_layer(published).filter(|_| classic) {
            if !out.contains(&ssrc) {
                out.push(ssrc);
            }
        }
        for sub in &room.members {
            let Some(down) = self
                .members
                .get(sub)
                .and_then(|s| s.subs.get(&publisher))
                .and_then(|t| t.get(track))
            else {
                continue;
            };
            let l = &down.layers;
            if l.wish.paused {
                continue;
            }
            let allowed =
                |e: &&Encoding| l.wish.max_height.is_none_or(|h| u32::from(e.height) <= h);
            // The next step up from where it is, so it can climb one
            // layer at a time.
            let next = l
                .current
                .and_then(|c| enc.layer_of(c))
                .and_then(|Layer(r)| enc.at(Layer(r.saturating_add(1))))
                .filter(allowed)
                .map(|e| e.ssrc);
            // The tallest layer the wish allows.
            let cap = (0..enc.len())
                .rev()
                .filter_map(|r| enc.at(Layer(r as u8)))
                .find(allowed)
                .map(|e| e.ssrc);
            for ssrc in [l.current, l.target, next, cap].into_iter().flatten() {
                if !out.contains(&ssrc) {
                    out.push(ssrc);
                }
            }
        }
    }

    /// Whether some subscriber of `publisher`'s `track` could use a layer
    /// taller than any the server has received: one not paused whose wish
    /// has no height limit, or a limit above the tallest known layer. An
    /// encoding the publisher offered but has not sent (yet) stays on at
    /// the publisher only then: nobody could be given it otherwise.
    pub fn wants_taller(&self, publisher: PeerKey, track: &str) -> bool {
        let Some(p) = self.members.get(&publisher) else {
            return false;
        };
        let Some(published) = p.published.get(track) else {
            return false;
        };
        let enc = &published.encodings;
        let tallest = (0..enc.len())
            .filter_map(|r| enc.at(Layer(r as u8)))
            .map(|e| u32::from(e.height))
            .max()
            .unwrap_or(0);
        let Some(room) = self.rooms.get(&p.room) else {
            return false;
        };
        // A classic member is shown the middle layer, which may not have
        // arrived yet.
        let classic = room
            .members
            .iter()
            .any(|m| self.members.get(m).is_some_and(|m| m.classic));
        let middle_unknown = enc.len() < 2;
        if classic && middle_unknown {
            return true;
        }
        room.members.iter().any(|sub| {
            self.members
                .get(sub)
                .and_then(|s| s.subs.get(&publisher))
                .and_then(|t| t.get(track))
                .is_some_and(|d| {
                    let w = d.layers.wish;
                    !w.paused && w.max_height.is_none_or(|h| h > tallest)
                })
        })
    }

    /// A subscriber's keyframe request, for the encoding it is about.
    pub(super) fn subscriber_wants(
        &mut self,
        sub: PeerKey,
        publisher: PeerKey,
        track: &TrackName,
        now: Instant,
        out: &mut Vec<Decision>,
    ) {
        let wanted = self
            .members
            .get(&sub)
            .and_then(|s| s.subs.get(&publisher))
            .and_then(|t| t.get(track))
            .filter(|d| d.layers.simulcast)
            .and_then(|d| d.layers.wanted());
        let Some(ssrc) = wanted else {
            self.request_keyframe(publisher, track.as_str(), now, out);
            return;
        };
        let Some(e) = self
            .members
            .get_mut(&publisher)
            .and_then(|p| p.published.get_mut(track))
            .and_then(|p| p.encodings.by_ssrc_mut(ssrc))
        else {
            return;
        };
        if e.keyframes.request(now) {
            out.push(Decision::RequestKeyframe {
                publisher,
                track: track.clone(),
                ssrc: Some(ssrc),
            });
        }
    }

    /// The encoding of a simulcast track shown to classic clients: the
    /// middle one when there are three or two (360p of a 720p camera), the
    /// only one otherwise.
    pub(super) fn classic_layer(published: &super::Published) -> Option<u32> {
        let enc = &published.encodings;
        enc.at(Layer(1))
            .or_else(|| enc.at(Layer(0)))
            .map(|e| e.ssrc)
    }

    /// Whether `sub` receives a simulcast track.
    pub fn receives_simulcast(&self, sub: PeerKey) -> bool {
        let Some(s) = self.members.get(&sub) else {
            return false;
        };
        s.subs
            .values()
            .flat_map(|t| t.values())
            .any(|d| d.layers.simulcast)
    }

    /// The highest temporal layer `sub` is sent of `publisher`'s `track`
    /// now (`u8::MAX`: all), or `None` without such a subscription.
    pub fn temporal_limit(&self, sub: PeerKey, publisher: PeerKey, track: &str) -> Option<u8> {
        self.members
            .get(&sub)?
            .subs
            .get(&publisher)?
            .get(track)
            .map(|d| d.layers.tid_limit)
    }

    /// The smallest live encoding of a track (the default target).
    pub(super) fn lowest_live(published: &super::Published, now: Instant) -> Option<u32> {
        published.encodings.lowest_live(now)
    }
}

/// Whether the allocator sees `info`'s temporal layers: those of VP8
/// simulcast tracks (the only ones whose layers the router rewrites).
fn temporal_slots(info: &TrackInfo) -> bool {
    info.simulcast && info.codec == Codec::Vp8
}

#[cfg(test)]
mod tests {
    use super::*;

    const VP8_SIMULCAST: TrackInfo = TrackInfo {
        kind: MediaKind::Video,
        codec: Codec::Vp8,
        clock_rate: 90_000,
        simulcast: true,
    };

    fn picture(tid: u8) -> [Option<Temporal>; 2] {
        [true, false].map(|starts_picture| {
            Some(Temporal {
                tid,
                starts_picture,
            })
        })
    }

    /// Whether each packet of pictures with these TIDs is forwarded.
    fn admitted(l: &mut SubLayers, ssrc: u32, tids: &[u8]) -> Vec<Admit> {
        tids.iter()
            .flat_map(|&t| picture(t))
            .map(|t| l.admit(ssrc, false, t))
            .collect()
    }

    #[test]
    fn temporal_layers_go_down_at_the_next_picture_and_up_only_at_a_tl0_picture() {
        use Admit::{Forward as F, Thinned as T};
        let mut l = SubLayers::new(VP8_SIMULCAST);
        l.target = Some(7);
        assert_eq!(l.admit(7, true, picture(0)[0]), F);
        assert_eq!(admitted(&mut l, 7, &[0, 2]), [F, F, F, F]);
        // Down to TL0+TL1, chosen in the middle of a TL2 picture: its
        // second packet still goes (a picture is sent whole or not at all).
        l.admit(7, false, picture(2)[0]);
        l.tid_target = 1;
        assert_eq!(l.admit(7, false, picture(2)[1]), F);
        assert_eq!(admitted(&mut l, 7, &[1, 2, 0, 2]), [F, F, T, T, F, F, T, T]);
        // Back up to all: not at a TL1 or TL2 picture (they may refer to
        // TL2 pictures left out), at the next TL0 one.
        l.tid_target = u8::MAX;
        assert_eq!(admitted(&mut l, 7, &[1, 2]), [F, F, T, T]);
        assert_eq!(admitted(&mut l, 7, &[0, 2, 1, 2]), [F; 8]);
        // A keyframe of a new layer starts with the layers chosen.
        l.tid_target = 0;
        l.target = Some(9);
        assert_eq!(l.admit(9, true, picture(0)[0]), F);
        assert_eq!(admitted(&mut l, 9, &[2, 1, 0]), [T, T, T, T, F, F]);
        // Without a TID, everything goes.
        assert_eq!(l.admit(9, false, None), F);
    }
}
