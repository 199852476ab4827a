//! Active speakers: the forward rooms' speaker tracking, and the video a
//! classic (Socket.IO) client sees, which follows the loudest other
//! speaker ([`crate::media::speaker`] decides when to switch;
//! [`crate::media::vp8`] keeps the descriptors continuous).

use std::time::Instant;

use super::{Decision, Member, Mixing, OutSlot, PeerKey, Room, Router, TrackName};
use crate::media::codec::Codec;
use crate::media::rewrite::SeqRewriter;
use crate::media::speaker::{choose, SpeakerSwitch};
use crate::media::vp8::Vp8Munger;
use crate::media::{PayloadType, Ssrc};
use crate::mixer::{InputId, Speaker};
use crate::sfu::MediaKind;

/// The active speaker's video sent to a classic client.
pub(super) struct SpeakerOut {
    pub(super) out: OutSlot,
    pub(super) ssrc: Ssrc,
    /// VP8 payload type the answer settled on; `None`: the client takes no
    /// VP8 and gets no video.
    pub(super) pt: Option<PayloadType>,
    pub(super) switch: SpeakerSwitch<PeerKey>,
    pub(super) rewriter: SeqRewriter,
    pub(super) vp8: Vp8Munger,
}

/// A room's active speakers changed (loudest first).
#[derive(Debug, Clone, PartialEq)]
pub struct SpeakersChanged {
    pub room: switchboard_proto::RoomName,
    /// The room's members, to tell.
    pub members: Vec<PeerKey>,
    /// The speakers, as members, with their levels (0.0–1.0).
    pub speakers: Vec<(PeerKey, f32)>,
}

/// The publisher's video track a classic client may see: its first VP8
/// track (by track name, so the choice is stable).
pub(super) fn speaker_track(p: &Member) -> Option<&TrackName> {
    p.published
        .iter()
        .filter(|(_, t)| t.info.kind == MediaKind::Video && t.info.codec == Codec::Vp8)
        .map(|(id, _)| id)
        .min()
}

/// Whether `track` of `publisher` is the one classic clients may see.
pub(super) fn is_speaker_source(publisher: &Member, track: &str) -> bool {
    speaker_track(publisher).is_some_and(|t| t.as_str() == track)
}

impl Router {
    /// A classic member's speaker video goes out on `out` as `ssrc`.
    pub fn attach_speaker(&mut self, key: PeerKey, out: OutSlot, ssrc: Ssrc) {
        if let Some(m) = self.members.get_mut(&key) {
            m.speaker = Some(SpeakerOut {
                out,
                ssrc,
                pt: None,
                switch: SpeakerSwitch::new(),
                rewriter: SeqRewriter::new(90_000),
                vp8: Vp8Munger::new(),
            });
        }
    }

    /// The VP8 payload type a classic member's answer settled on.
    pub fn speaker_negotiated(&mut self, key: PeerKey, pt: Option<PayloadType>) {
        if let Some(o) = self.members.get_mut(&key).and_then(|m| m.speaker.as_mut()) {
            o.pt = pt;
        }
    }

    /// The source a classic member is shown now.
    pub fn speaker_shown(&self, key: PeerKey) -> Option<PeerKey> {
        let m = self.members.get(&key)?;
        m.speaker.as_ref()?.switch.current().copied()
    }

    /// Runs every 20 ms: the speaker trackers of `sfu` rooms report their
    /// changes (appended to `changed`).
    pub fn tick_speakers(&mut self, now: Instant, changed: &mut Vec<SpeakersChanged>) {
        for (name, room) in &mut self.rooms {
            let Room {
                sfu,
                members,
                speakers,
                speaking,
                ..
            } = room;
            if !*sfu {
                continue;
            }
            let Some(tracker) = speakers.as_mut() else {
                continue;
            };
            if let Some(list) = tracker.tick(now) {
                speaking.clear();
                speaking.extend(list.iter().map(|s| s.id));
                changed.push(SpeakersChanged {
                    room: name.clone(),
                    members: members.clone(),
                    speakers: to_members(members, &self.members, list),
                });
            }
        }
    }

    /// The mixer of a room that mixes for all reports its speakers.
    pub fn mixer_speakers(
        &mut self,
        room: &switchboard_proto::RoomName,
        list: &[Speaker],
    ) -> Option<SpeakersChanged> {
        let r = self.rooms.get_mut(room)?;
        if r.mixing != Mixing::ForAll {
            return None;
        }
        r.speaking.clear();
        r.speaking.extend(list.iter().map(|s| s.id));
        Some(SpeakersChanged {
            room: room.clone(),
            members: r.members.clone(),
            speakers: to_members(&r.members, &self.members, list),
        })
    }

    /// Points every classic client's video at the loudest other speaker
    /// with video, and asks that speaker for the keyframe the switch waits
    /// for. Runs on the mixer's 20 ms tick.
    pub fn follow_speakers(&mut self, now: Instant, out: &mut Vec<Decision>) {
        let mut keyframes: Vec<PeerKey> = Vec::new();
        let (rooms, members) = (&self.rooms, &mut self.members);
        for room in rooms.values() {
            if !room.sfu
                || !room
                    .members
                    .iter()
                    .any(|k| members.get(k).is_some_and(|m| m.speaker.is_some()))
            {
                continue;
            }
            let speakers = speaking_members(room, members);
            let with_video: Vec<PeerKey> = room
                .members
                .iter()
                .filter(|k| members.get(k).is_some_and(|m| speaker_track(m).is_some()))
                .copied()
                .collect();
            for &k in &room.members {
                let Some(o) = members.get_mut(&k).and_then(|m| m.speaker.as_mut()) else {
                    continue;
                };
                if let Some(gone) = o
                    .switch
                    .current()
                    .filter(|c| !with_video.contains(c))
                    .copied()
                {
                    o.switch.remove(&gone);
                }
                let want = choose(&k, &speakers, &with_video, o.switch.current());
                if let Some(source) = o.switch.want(want, now) {
                    keyframes.push(source);
                }
            }
        }
        keyframes.sort_unstable();
        keyframes.dedup();
        for source in keyframes {
            let track = self.members.get(&source).and_then(speaker_track).cloned();
            if let Some(track) = track {
                self.request_keyframe(source, track.as_str(), now, out);
            }
        }
    }
}

/// Speakers (mixer inputs) as members of `room`.
fn to_members(
    room_members: &[PeerKey],
    members: &std::collections::HashMap<PeerKey, Member>,
    list: &[Speaker],
) -> Vec<(PeerKey, f32)> {
    list.iter()
        .filter_map(|s| {
            let k = room_members
                .iter()
                .find(|k| members.get(k).is_some_and(|m| m.audio_input == Some(s.id)))?;
            Some((*k, s.level))
        })
        .collect()
}

/// The room's active speakers, loudest first, as members.
fn speaking_members(
    room: &Room,
    members: &std::collections::HashMap<PeerKey, Member>,
) -> Vec<PeerKey> {
    room.speaking
        .iter()
        .filter_map(|id: &InputId| {
            room.members
                .iter()
                .find(|k| members.get(k).is_some_and(|m| m.audio_input == Some(*id)))
                .copied()
        })
        .collect()
}
