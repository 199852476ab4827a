//! The SFU's router: who receives which track, and what happens to each
//! packet. Pure: packets (header fields and payload bytes) and `now` in,
//! [`Decision`]s out. No webrtc-rs, no sockets, no tasks, no logging; on the
//! per-packet path nothing allocates (decisions go into a caller's buffer).
//!
//! The transport ([`crate::transport`]) is its driver: it owns the
//! connections, turns their events into calls here, and carries out the
//! decisions (an RTP write on a sender, a PLI to a publisher, a mixer push).
//!
//! # Model
//!
//! - A **room** ([`RoomName`]) has members and a mode: `sfu` (forwarding)
//!   or standby (p2p), and whether its audio is mixed for everyone, for its
//!   classic clients only, or not at all ([`Mixing`]).
//! - A **member** ([`PeerKey`]) publishes tracks ([`TrackName`]) and
//!   receives subscriptions: one per (publisher, track), each on an
//!   outgoing slot ([`OutSlot`], one m-section of the subscriber's
//!   connection) with its own SSRC, payload type, [`SeqRewriter`] and
//!   chosen [`Layer`] (the simulcast allocator's choice point; one layer
//!   today).
//! - A **classic** member (Socket.IO) gets no subscriptions: it sees the
//!   active speaker's video on one slot ([`speaker`]) and hears the mix.
//!
//! # Parts
//!
//! - [`forward`]: one RTP packet from a publisher → sends, a mixer push or
//!   drops.
//! - [`keyframes`]: keyframe requests (new subscribers, subscribers' PLIs,
//!   speaker switches) throttled per published track.
//! - [`speaker`]: the classic clients' active-speaker video and the forward
//!   rooms' speaker tracking.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use switchboard_proto::RoomName;

use crate::media::codec::Codec;
use crate::media::keyframe::KeyframeRequester;
use crate::media::rewrite::SeqRewriter;
use crate::media::{PayloadType, Ssrc};
use crate::mixer::{InputId, MixerConfig, SpeakerTracker};
use crate::sfu::MediaKind;

pub mod allocator;
pub mod encodings;
pub mod forward;
pub mod keyframes;
pub mod layers;
pub mod probe;
pub mod speaker;

#[cfg(test)]
mod layer_tests;
#[cfg(test)]
mod tests;

pub use forward::{Decision, DescriptorPatch, DropReason, RtpIn, Send};
pub use layers::{Allocated, LayerView, Wish};
pub use speaker::SpeakersChanged;

/// Minimum time between two PLIs to one publisher's track.
pub const KEYFRAME_THROTTLE: Duration = Duration::from_millis(500);

/// A video track silent this long whose packets come back (its path broke
/// and was restored: an address change, an ICE restart) gets a keyframe
/// request at once: every subscriber missed frames and would otherwise ask
/// only when its decoder gives up. Longer than a static screen's frame gap.
pub const RESUMED_AFTER: Duration = Duration::from_millis(1500);

/// A member's connection, as the driver numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey(pub u64);

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer-{}", self.0)
    }
}

/// An outgoing slot on a subscriber's connection (the driver uses its
/// transceiver index): where a subscription's packets are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OutSlot(pub u32);

/// Which encoding of a published track a subscriber receives, by rank:
/// 0 is the smallest picture (the simulcast allocator chooses per
/// subscriber; a track without simulcast has layer 0 only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Layer(pub u8);

/// A published track's id, as its publisher's connection names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrackName(Box<str>);

impl TrackName {
    pub fn new(name: &str) -> Self {
        TrackName(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for TrackName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrackName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whose audio a room mixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mixing {
    /// Audio is forwarded.
    None,
    /// An `audio: "mix"` room: everyone hears the mix, no audio is forwarded.
    ForAll,
    /// A forward room with classic members: they hear the mix, everyone
    /// else gets the audio forwarded.
    ClassicOnly,
}

/// What the router knows of a published track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackInfo {
    pub kind: MediaKind,
    pub codec: Codec,
    /// RTP clock rate (what a subscription's rewriter counts in).
    pub clock_rate: u32,
    /// Sent as simulcast (rids): up to [`layers::MAX_ENCODINGS`] encodings,
    /// one chosen per subscriber. Otherwise any SSRC of the track is its
    /// one stream (a new SSRC after a renegotiation continues it).
    pub simulcast: bool,
}

struct Published {
    info: TrackInfo,
    keyframes: KeyframeRequester,
    /// When its last packet arrived (video: a gap means every subscriber
    /// missed frames).
    last_rtp: Option<std::time::Instant>,
    /// Its encodings as they arrive (simulcast: one per rid; otherwise one,
    /// measured for the allocator).
    encodings: layers::Encodings,
}

/// One forwarded track to one subscriber.
struct Subscription {
    out: OutSlot,
    ssrc: Ssrc,
    /// Payload type the subscriber negotiated; `None` until its answer.
    pt: Option<PayloadType>,
    /// Video whose keyframes we can recognise: nothing is forwarded until
    /// one arrives (requested when the subscriber's answer negotiated the
    /// track), so the subscriber's decoder never starts on deltas it cannot
    /// decode.
    awaiting_keyframe: bool,
    /// Which encoding it receives and wants, its wishes, and the VP8
    /// rewriting that keeps the stream continuous across switches.
    layers: layers::SubLayers,
    rewriter: SeqRewriter,
}

struct Member {
    room: RoomName,
    classic: bool,
    /// This member's input (and listener id) in its room's mixer and/or
    /// speaker tracker.
    audio_input: Option<InputId>,
    /// Its token allows subscribing.
    can_subscribe: bool,
    /// Muted by an administrator: audio, video.
    muted: [bool; 2],
    published: HashMap<TrackName, Published>,
    /// By publisher, then the publisher's track (two levels so the
    /// per-packet lookup borrows the track name).
    subs: HashMap<PeerKey, HashMap<TrackName, Subscription>>,
    /// Slot → the subscription on it.
    by_slot: HashMap<OutSlot, (PeerKey, TrackName)>,
    /// Rewriters of slots whose track went away: a later track on the same
    /// slot (same SSRC) continues their sequence numbers and timestamps
    /// (the subscriber's SRTP replay window would drop a restart).
    retired: HashMap<OutSlot, SeqRewriter>,
    /// The active speaker's video, for a classic member.
    speaker: Option<speaker::SpeakerOut>,
    /// Its layer allocator (and the buffers it reuses).
    alloc: layers::SubAlloc,
}

struct Room {
    sfu: bool,
    members: Vec<PeerKey>,
    mixing: Mixing,
    /// Active speakers of a room that does not mix for all, from
    /// publishers' audio levels.
    speakers: Option<Box<SpeakerTracker>>,
    /// The active speakers now, loudest first (mixer inputs).
    speaking: Vec<InputId>,
}

/// A member joined: its audio input id, which the driver adds to the
/// room's mixer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Joined {
    pub input: InputId,
    /// The room's speaker tracker took the input.
    pub tracked: bool,
    /// The room was created by this join.
    pub new_room: bool,
}

/// A member left.
#[derive(Debug, Default)]
pub struct Left {
    pub audio_input: Option<InputId>,
    /// Its room has no members any more and is gone.
    pub room_closed: bool,
    /// Subscriptions to its tracks that ended (subscriber, slot).
    pub unsubscribed: Vec<(PeerKey, OutSlot)>,
}

/// Errors of the router's setup calls.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    #[error("no member {0}")]
    NoMember(PeerKey),
    #[error("{0} is already a member")]
    AlreadyMember(PeerKey),
    #[error("{publisher} publishes no track {track}")]
    NoTrack {
        publisher: PeerKey,
        track: TrackName,
    },
}

/// Rooms, members, their tracks and subscriptions.
pub struct Router {
    rooms: HashMap<RoomName, Room>,
    members: HashMap<PeerKey, Member>,
    /// K of the speaker trackers (`--mix-speakers`).
    speakers_k: usize,
    next_input: u32,
    /// Reused by `forward` for the subscriber list.
    scratch: Vec<PeerKey>,
}

impl Router {
    pub fn new(speakers_k: usize) -> Router {
        Router {
            rooms: HashMap::new(),
            members: HashMap::new(),
            speakers_k,
            next_input: 1,
            scratch: Vec::new(),
        }
    }

    // -- rooms and members --------------------------------------------------

    /// Rooms with members.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    pub fn has_room(&self, room: &RoomName) -> bool {
        self.rooms.contains_key(room)
    }

    /// `key` joins `room` (created if new, mixing for all when `mix`).
    /// `sfu`: the room forwards (a room once `sfu` stays so until
    /// [`Router::set_standby`]).
    pub fn join(
        &mut self,
        key: PeerKey,
        room: RoomName,
        sfu: bool,
        mix: bool,
        classic: bool,
    ) -> Result<Joined, RouterError> {
        if self.members.contains_key(&key) {
            return Err(RouterError::AlreadyMember(key));
        }
        let new_room = !self.rooms.contains_key(&room);
        let speakers_k = self.speakers_k;
        let r = self.rooms.entry(room.clone()).or_insert_with(|| {
            let speakers = (!mix).then(|| {
                let defaults = MixerConfig::default();
                Box::new(SpeakerTracker::new(
                    speakers_k,
                    defaults.silence_threshold_dbov,
                    defaults.speakers_interval,
                ))
            });
            Room {
                sfu,
                members: Vec::new(),
                mixing: if mix { Mixing::ForAll } else { Mixing::None },
                speakers,
                speaking: Vec::new(),
            }
        });
        r.sfu |= sfu;
        r.members.push(key);
        let input = InputId(self.next_input);
        self.next_input = self.next_input.wrapping_add(1).max(1);
        let tracked = match r.speakers.as_mut() {
            Some(tracker) => {
                tracker.add(input);
                true
            }
            None => false,
        };
        self.members.insert(
            key,
            Member {
                room,
                classic,
                audio_input: None,
                can_subscribe: true,
                muted: [false; 2],
                published: HashMap::new(),
                subs: HashMap::new(),
                by_slot: HashMap::new(),
                retired: HashMap::new(),
                speaker: None,
                alloc: layers::SubAlloc::default(),
            },
        );
        Ok(Joined {
            input,
            tracked,
            new_room,
        })
    }

    /// The member's input in its room's mixer / speaker tracker.
    pub fn set_audio_input(&mut self, key: PeerKey, input: Option<InputId>) {
        if let Some(m) = self.members.get_mut(&key) {
            m.audio_input = input;
        }
    }

    pub fn audio_input(&self, key: PeerKey) -> Option<InputId> {
        self.members.get(&key).and_then(|m| m.audio_input)
    }

    /// Whether its token lets `key` receive others' tracks.
    pub fn set_can_subscribe(&mut self, key: PeerKey, allowed: bool) {
        if let Some(m) = self.members.get_mut(&key) {
            m.can_subscribe = allowed;
        }
    }

    /// Muted by an administrator: its `kind` tracks are not forwarded.
    pub fn set_muted(&mut self, key: PeerKey, kind: MediaKind, muted: bool) {
        if let Some(m) = self.members.get_mut(&key) {
            m.muted[kind as usize] = muted;
        }
    }

    /// `key` leaves its room; every subscription to its tracks ends.
    pub fn leave(&mut self, key: PeerKey) -> Left {
        let Some(m) = self.members.remove(&key) else {
            return Left::default();
        };
        let mut left = Left {
            audio_input: m.audio_input,
            ..Left::default()
        };
        if let Some(room) = self.rooms.get_mut(&m.room) {
            room.members.retain(|k| *k != key);
            if let (Some(tracker), Some(input)) = (room.speakers.as_mut(), m.audio_input) {
                tracker.remove(input);
            }
            if room.members.is_empty() {
                self.rooms.remove(&m.room);
                left.room_closed = true;
            }
        }
        let mut tracks: Vec<&TrackName> = m.published.keys().collect();
        tracks.sort_unstable();
        for track in tracks {
            self.unsubscribe_all(key, track, &mut left.unsubscribed);
        }
        left
    }

    /// The members of `room`.
    pub fn members(&self, room: &RoomName) -> &[PeerKey] {
        self.rooms.get(room).map_or(&[], |r| &r.members)
    }

    /// The room `key` is in.
    pub fn room_of(&self, key: PeerKey) -> Option<&RoomName> {
        self.members.get(&key).map(|m| &m.room)
    }

    /// Whether `room` forwards (`sfu`) and whose audio it mixes.
    pub fn room_mode(&self, room: &RoomName) -> Option<(bool, Mixing)> {
        self.rooms.get(room).map(|r| (r.sfu, r.mixing))
    }

    /// Every room, with its mode.
    pub fn rooms(&self) -> impl Iterator<Item = (&RoomName, bool, Mixing)> {
        self.rooms.iter().map(|(n, r)| (n, r.sfu, r.mixing))
    }

    /// The room now mixes for its classic clients (it had no mixer).
    pub fn set_mixing(&mut self, room: &RoomName, mixing: Mixing) {
        if let Some(r) = self.rooms.get_mut(room) {
            r.mixing = mixing;
        }
    }

    /// Back to p2p: forwarding stops (packets count as `standby` drops);
    /// subscriptions stay, so a later `sfu` resumes them.
    pub fn set_standby(&mut self, room: &RoomName) {
        if let Some(r) = self.rooms.get_mut(room) {
            r.sfu = false;
        }
    }

    /// The room goes `sfu`. Returns its members when it was not already,
    /// for the driver to subscribe everyone to everyone else
    /// ([`Router::sources_for`]).
    pub fn set_sfu(&mut self, room: &RoomName) -> Option<Vec<PeerKey>> {
        let r = self.rooms.get_mut(room)?;
        if r.sfu {
            return None;
        }
        r.sfu = true;
        Some(r.members.clone())
    }

    /// Whether `key` is a classic member.
    pub fn is_classic(&self, key: PeerKey) -> bool {
        self.members.get(&key).is_some_and(|m| m.classic)
    }

    // -- tracks -------------------------------------------------------------

    /// `publisher` publishes `track`.
    pub fn publish(
        &mut self,
        publisher: PeerKey,
        track: TrackName,
        info: TrackInfo,
    ) -> Result<(), RouterError> {
        let m = self
            .members
            .get_mut(&publisher)
            .ok_or(RouterError::NoMember(publisher))?;
        m.published.insert(
            track,
            Published {
                info,
                keyframes: KeyframeRequester::new(KEYFRAME_THROTTLE),
                last_rtp: None,
                encodings: layers::Encodings::default(),
            },
        );
        Ok(())
    }

    pub fn is_published(&self, publisher: PeerKey, track: &str) -> bool {
        self.members
            .get(&publisher)
            .is_some_and(|m| m.published.contains_key(track))
    }

    /// `publisher`'s tracks, in name order.
    pub fn published(&self, publisher: PeerKey) -> Vec<TrackName> {
        let mut tracks: Vec<TrackName> = self
            .members
            .get(&publisher)
            .map(|m| m.published.keys().cloned().collect())
            .unwrap_or_default();
        tracks.sort_unstable();
        tracks
    }

    /// `publisher` stopped publishing `track`: every subscription to it ends
    /// (their slots' rewriters are kept for reuse); the ended ones are
    /// appended to `ended`.
    pub fn unpublish(
        &mut self,
        publisher: PeerKey,
        track: &str,
        ended: &mut Vec<(PeerKey, OutSlot)>,
    ) -> Option<TrackInfo> {
        let gone = self
            .members
            .get_mut(&publisher)?
            .published
            .remove_entry(track)?;
        self.unsubscribe_all(publisher, &gone.0, ended);
        Some(gone.1.info)
    }

    fn unsubscribe_all(
        &mut self,
        publisher: PeerKey,
        track: &TrackName,
        ended: &mut Vec<(PeerKey, OutSlot)>,
    ) {
        let mut subs: Vec<PeerKey> = self.members.keys().copied().collect();
        subs.sort_unstable();
        for sub in subs {
            let Some(s) = self.members.get_mut(&sub) else {
                continue;
            };
            let removed = s
                .subs
                .get_mut(&publisher)
                .and_then(|t| t.remove(track.as_str()));
            if s.subs.get(&publisher).is_some_and(HashMap::is_empty) {
                s.subs.remove(&publisher);
            }
            if let Some(gone) = removed {
                s.by_slot.remove(&gone.out);
                s.retired.insert(gone.out, gone.rewriter);
                ended.push((sub, gone.out));
            }
        }
    }

    // -- subscriptions ------------------------------------------------------

    /// Whether `sub` should receive `publisher`'s `track` (and does not
    /// yet): not its own, not audio the room mixes for all, not to a
    /// classic client (the mix and the speaker's video carry it), only
    /// with the subscribe grant.
    pub fn wants(&self, sub: PeerKey, publisher: PeerKey, track: &str) -> bool {
        if sub == publisher {
            return false;
        }
        let (Some(p), Some(s)) = (self.members.get(&publisher), self.members.get(&sub)) else {
            return false;
        };
        let Some(published) = p.published.get(track) else {
            return false;
        };
        let mixed = self
            .rooms
            .get(&p.room)
            .is_some_and(|r| r.mixing == Mixing::ForAll);
        if published.info.kind == MediaKind::Audio && mixed {
            return false;
        }
        !s.classic
            && s.can_subscribe
            && !s
                .subs
                .get(&publisher)
                .is_some_and(|t| t.contains_key(track))
    }

    /// The members that should receive `publisher`'s new `track` now: none
    /// while the room is on standby (subscriptions start when it goes
    /// `sfu`).
    pub fn subscribers_for(&self, publisher: PeerKey, track: &str) -> Vec<PeerKey> {
        let Some(room) = self
            .members
            .get(&publisher)
            .and_then(|p| self.rooms.get(&p.room))
        else {
            return Vec::new();
        };
        if !room.sfu {
            return Vec::new();
        }
        room.members
            .iter()
            .copied()
            .filter(|&sub| self.wants(sub, publisher, track))
            .collect()
    }

    /// Every (publisher, track) of the others in `sub`'s room, if the room
    /// is `sfu`, for the driver to offer `sub` ([`Router::wants`] filters).
    pub fn sources_for(&self, sub: PeerKey) -> Vec<(PeerKey, TrackName)> {
        let Some(room) = self.members.get(&sub).and_then(|s| self.rooms.get(&s.room)) else {
            return Vec::new();
        };
        if !room.sfu {
            return Vec::new();
        }
        let mut sources = Vec::new();
        for &k in room.members.iter().filter(|&&k| k != sub) {
            let Some(o) = self.members.get(&k) else {
                continue;
            };
            let mut tracks: Vec<&TrackName> = o.published.keys().collect();
            tracks.sort_unstable();
            sources.extend(tracks.into_iter().map(|t| (k, t.clone())));
        }
        sources
    }

    /// `sub` receives `publisher`'s `track` on `out`, as `ssrc`. A slot that
    /// carried an earlier track continues its stream.
    pub fn subscribe(
        &mut self,
        sub: PeerKey,
        publisher: PeerKey,
        track: &str,
        out: OutSlot,
        ssrc: Ssrc,
    ) -> Result<(), RouterError> {
        let (info, name) = self
            .members
            .get(&publisher)
            .and_then(|p| p.published.get_key_value(track))
            .map(|(n, p)| (p.info, n.clone()))
            .ok_or_else(|| RouterError::NoTrack {
                publisher,
                track: TrackName::new(track),
            })?;
        let s = self
            .members
            .get_mut(&sub)
            .ok_or(RouterError::NoMember(sub))?;
        let rewriter = s
            .retired
            .remove(&out)
            .unwrap_or_else(|| SeqRewriter::new(info.clock_rate));
        s.by_slot.insert(out, (publisher, name.clone()));
        s.subs.entry(publisher).or_default().insert(
            name,
            Subscription {
                out,
                ssrc,
                pt: None,
                awaiting_keyframe: info.kind == MediaKind::Video && info.codec.detects_keyframes(),
                layers: layers::SubLayers::new(info),
                rewriter,
            },
        );
        Ok(())
    }

    /// The subscriber's answer negotiated the subscription on `out` with
    /// payload type `pt`. Returns the (publisher, track) when it is video,
    /// whose keyframe the subscriber now waits for.
    pub fn negotiated(
        &mut self,
        sub: PeerKey,
        out: OutSlot,
        pt: PayloadType,
    ) -> Option<(PeerKey, TrackName)> {
        let s = self.members.get_mut(&sub)?;
        let (publisher, track) = s.by_slot.get(&out)?.clone();
        let subscription = s.subs.get_mut(&publisher)?.get_mut(&track)?;
        subscription.pt = Some(pt);
        let video = self
            .members
            .get(&publisher)
            .and_then(|p| p.published.get(&track))
            .is_some_and(|t| t.info.kind == MediaKind::Video);
        video.then_some((publisher, track))
    }

    /// The slot is no longer a subscription's (the driver gave it to
    /// something else): forget the rewriter kept for it.
    pub fn release_slot(&mut self, key: PeerKey, out: OutSlot) {
        if let Some(m) = self.members.get_mut(&key) {
            m.retired.remove(&out);
        }
    }
}
