//! One RTP packet from a publisher: what each member of its room gets.

use std::time::Instant;

use super::layers::{Admit, Temporal};
use super::{Mixing, PeerKey, Router, TrackName};
use crate::media::codec::Codec;
use crate::media::rewrite::{Rewrite, RewriteDrop};
use crate::media::speaker::SpeakerPacket;
use crate::media::vp8::Vp8Munger;
use crate::media::{PayloadType, Ssrc};
use crate::mixer::{AudioLevel, InputId};
use crate::sfu::MediaKind;

use super::OutSlot;

/// The fields of an incoming RTP packet the router reads.
#[derive(Debug, Clone, Copy)]
pub struct RtpIn<'a> {
    pub ssrc: u32,
    pub seq: u16,
    pub ts: u32,
    pub payload: &'a [u8],
    /// The RFC 6464 audio level it carried, if any.
    pub level: Option<AudioLevel>,
}

/// The first bytes of a payload, rewritten (a VP8 descriptor): the driver
/// copies the payload and puts these over its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorPatch {
    len: u8,
    bytes: [u8; DescriptorPatch::MAX],
}

impl DescriptorPatch {
    /// Longer than any VP8 payload descriptor (at most 6 bytes).
    pub const MAX: usize = 16;

    /// The bytes to put over the start of the payload.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// `pkt`'s VP8 descriptor as `vp8` rewrites it: `None` when nothing
    /// changes (the subscriber has received one layer all along, so the
    /// payload is sent as it is, uncopied).
    fn munged(vp8: &mut Vp8Munger, pkt: &RtpIn<'_>) -> Result<Option<Self>, ()> {
        let len = pkt.payload.len().min(DescriptorPatch::MAX);
        let mut patch = DescriptorPatch {
            // At most MAX (16): fits.
            len: len as u8,
            bytes: [0; DescriptorPatch::MAX],
        };
        patch.bytes[..len].copy_from_slice(&pkt.payload[..len]);
        vp8.munge(pkt.ssrc, &mut patch.bytes[..len])
            .map_err(|_| ())?;
        Ok((patch.bytes[..len] != pkt.payload[..len]).then_some(patch))
    }
}

/// One copy of the packet to one subscriber, with its header rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Send {
    pub to: PeerKey,
    pub out: OutSlot,
    pub ssrc: Ssrc,
    pub pt: PayloadType,
    pub seq: u16,
    pub ts: u32,
    /// For a classic client's speaker video: the rewritten VP8 descriptor.
    pub patch: Option<DescriptorPatch>,
}

/// Why a packet (or one copy of it) is not sent. The labels are the
/// `reason`s of the dropped-packets metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    UnknownTrack,
    Muted,
    /// The room is in p2p mode.
    Standby,
    /// The subscriber has not answered the offer carrying the track.
    NotNegotiated,
    /// The subscriber waits for a keyframe.
    BeforeKeyframe,
    Rewrite(RewriteDrop),
    /// A VP8 descriptor that cannot be rewritten.
    BadDescriptor,
    /// A simulcast track's encoding beyond the third.
    ExtraEncoding,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::UnknownTrack => "unknown-track",
            DropReason::Muted => "muted",
            DropReason::Standby => "standby",
            DropReason::NotNegotiated => "not-negotiated",
            DropReason::BeforeKeyframe => "before-keyframe",
            DropReason::Rewrite(r) => r.as_str(),
            DropReason::BadDescriptor => "bad-descriptor",
            DropReason::ExtraEncoding => "extra-encoding",
        }
    }
}

/// What the driver does.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Send(Send),
    /// Push the packet (audio) into the room's mixer as `input`.
    Mix {
        input: InputId,
    },
    Drop(DropReason),
    /// Send a PLI for `track` to `publisher`: for its encoding `ssrc`
    /// (a simulcast layer), or for the track's one stream.
    RequestKeyframe {
        publisher: PeerKey,
        track: TrackName,
        ssrc: Option<u32>,
    },
}

impl Router {
    /// One RTP packet of `track` from `from`, arrived at `arrived`; `now`
    /// is when it is forwarded. Decisions are appended to `out`. Returns
    /// whether the packet reached the fan-out (the room forwards it; some
    /// subscribers may still have dropped it).
    pub fn on_rtp(
        &mut self,
        from: PeerKey,
        track: &str,
        pkt: &RtpIn<'_>,
        arrived: Instant,
        now: Instant,
        out: &mut Vec<Decision>,
    ) -> bool {
        let Some(publisher) = self.members.get_mut(&from) else {
            return false;
        };
        let Some(published) = publisher.published.get_mut(track) else {
            out.push(Decision::Drop(DropReason::UnknownTrack));
            return false;
        };
        let kind = published.info.kind;
        if publisher.muted[kind as usize] {
            out.push(Decision::Drop(DropReason::Muted));
            return false;
        }
        let keyframe = kind == MediaKind::Video && published.info.codec.is_keyframe(pkt.payload);
        if keyframe {
            published.keyframes.keyframe_received(arrived);
        }
        let simulcast = published.info.simulcast;
        // The temporal layer, read once for every subscriber (only VP8
        // simulcast tracks are thinned).
        let temporal = (simulcast && published.info.codec == Codec::Vp8)
            .then(|| Temporal::of_vp8(pkt.payload))
            .flatten();
        if Router::track_encoding(
            published,
            pkt.ssrc,
            pkt.payload,
            temporal,
            keyframe,
            arrived,
        )
        .is_none()
        {
            out.push(Decision::Drop(DropReason::ExtraEncoding));
            return false;
        }
        let classic_layer = if simulcast {
            Router::classic_layer(published)
        } else {
            None
        };
        if kind == MediaKind::Video {
            let gap = published
                .last_rtp
                .map(|t| arrived.saturating_duration_since(t));
            published.last_rtp = Some(arrived);
            if !keyframe
                && gap.is_some_and(|g| g >= super::RESUMED_AFTER)
                && published.keyframes.request(now)
            {
                out.push(Decision::RequestKeyframe {
                    publisher: from,
                    track: TrackName::new(track),
                    ssrc: simulcast.then_some(pkt.ssrc),
                });
            }
        }
        let audio_input = publisher.audio_input;
        let Some(room) = self.rooms.get_mut(&publisher.room) else {
            return false;
        };
        if !room.sfu {
            out.push(Decision::Drop(DropReason::Standby));
            return false;
        }
        if kind == MediaKind::Audio {
            if let (true, Some(input)) = (room.mixing != Mixing::None, audio_input) {
                // A mix room: the audio goes to the mixer, not to anyone.
                // A forward room with classic members: to the mixer too.
                out.push(Decision::Mix { input });
                if room.mixing == Mixing::ForAll {
                    return false;
                }
            }
            if let (Some(tracker), Some(input), Some(level)) =
                (room.speakers.as_mut(), audio_input, pkt.level)
            {
                tracker.level(input, level);
            }
        }
        let speaker_video = kind == MediaKind::Video
            && super::speaker::is_speaker_source(publisher, track)
            // A simulcast speaker is shown to classic clients in its middle
            // layer (or its only one): one SSRC, so the stream is steady.
            && (!simulcast || classic_layer == Some(pkt.ssrc));
        // The subscribers, copied into a buffer reused from packet to packet
        // (no allocation once it has grown to the largest room).
        let mut members = std::mem::take(&mut self.scratch);
        members.clear();
        members.extend_from_slice(&room.members);
        for &sub in &members {
            if sub == from {
                continue;
            }
            let Some(s) = self.members.get_mut(&sub) else {
                continue;
            };
            if s.classic {
                if let (true, Some(speaker)) = (speaker_video, s.speaker.as_mut()) {
                    if let Some(d) = speaker.forward(sub, from, pkt, keyframe, now) {
                        out.push(d);
                    }
                }
                continue;
            }
            let Some(down) = s.subs.get_mut(&from).and_then(|t| t.get_mut(track)) else {
                continue;
            };
            let Some(pt) = down.pt else {
                out.push(Decision::Drop(DropReason::NotNegotiated));
                continue;
            };
            if simulcast {
                // One layer of several: the one this subscriber receives,
                // or the keyframe it switches at.
                match down.layers.admit(pkt.ssrc, keyframe, temporal) {
                    Admit::Forward => {}
                    Admit::Skip | Admit::Paused => continue,
                    Admit::Thinned => {
                        // Left out of the numbering: no gap to NACK.
                        down.rewriter.skip(pkt.ssrc, pkt.seq);
                        if let Some(vp8) = down.layers.vp8.as_mut() {
                            // A descriptor that does not parse has no
                            // picture id to take out.
                            let _ = vp8.drop_picture(pkt.ssrc, pkt.payload);
                        }
                        continue;
                    }
                }
            } else if down.layers.is_paused() {
                continue;
            } else if down.awaiting_keyframe {
                if !keyframe {
                    out.push(Decision::Drop(DropReason::BeforeKeyframe));
                    continue;
                }
                down.awaiting_keyframe = false;
            }
            let (seq, ts) = match down.rewriter.rewrite(pkt.ssrc, pkt.seq, pkt.ts, now) {
                Rewrite::Forward { seq, ts } => (seq, ts),
                Rewrite::Drop(reason) => {
                    out.push(Decision::Drop(DropReason::Rewrite(reason)));
                    continue;
                }
            };
            let patch = match down.layers.vp8.as_mut() {
                Some(vp8) => match DescriptorPatch::munged(vp8, pkt) {
                    Ok(patch) => patch,
                    Err(()) => {
                        out.push(Decision::Drop(DropReason::BadDescriptor));
                        continue;
                    }
                },
                None => None,
            };
            out.push(Decision::Send(Send {
                to: sub,
                out: down.out,
                ssrc: down.ssrc,
                pt,
                seq,
                ts,
                patch,
            }));
        }
        self.scratch = members;
        true
    }
}

impl super::speaker::SpeakerOut {
    /// A packet of `from`'s speaker track: sent if `from` is the source
    /// shown (or this is the keyframe that makes it so). `None`: not shown.
    fn forward(
        &mut self,
        to: PeerKey,
        from: PeerKey,
        pkt: &RtpIn<'_>,
        keyframe: bool,
        now: Instant,
    ) -> Option<Decision> {
        if self.switch.on_packet(&from, keyframe, now) == SpeakerPacket::Drop {
            return None;
        }
        let Some(pt) = self.pt else {
            return Some(Decision::Drop(DropReason::NotNegotiated));
        };
        let (seq, ts) = match self.rewriter.rewrite(pkt.ssrc, pkt.seq, pkt.ts, now) {
            Rewrite::Forward { seq, ts } => (seq, ts),
            Rewrite::Drop(reason) => return Some(Decision::Drop(DropReason::Rewrite(reason))),
        };
        // The descriptor is rewritten in a patch: the payload is shared with
        // every other subscriber of the track.
        let len = pkt.payload.len().min(DescriptorPatch::MAX);
        let mut patch = DescriptorPatch {
            // At most MAX (16): fits.
            len: len as u8,
            bytes: [0; DescriptorPatch::MAX],
        };
        patch.bytes[..len].copy_from_slice(&pkt.payload[..len]);
        if self.vp8.munge(pkt.ssrc, &mut patch.bytes[..len]).is_err() {
            return Some(Decision::Drop(DropReason::BadDescriptor));
        }
        Some(Decision::Send(Send {
            to,
            out: self.out,
            ssrc: self.ssrc,
            pt,
            seq,
            ts,
            patch: Some(patch),
        }))
    }
}
