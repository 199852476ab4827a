//! Keyframe requests towards publishers, throttled per published track
//! ([`crate::media::keyframe`]): from new subscribers, from subscribers'
//! PLIs and FIRs, and from classic clients' speaker switches.

use std::time::Instant;

use super::{Decision, OutSlot, PeerKey, Router, TrackName};
use crate::sfu::MediaKind;

impl Router {
    /// Someone wants a keyframe of `publisher`'s `track` (video only):
    /// a [`Decision::RequestKeyframe`] now, or later from
    /// [`Router::poll_keyframes`] when a PLI went out recently.
    pub fn request_keyframe(
        &mut self,
        publisher: PeerKey,
        track: &str,
        now: Instant,
        out: &mut Vec<Decision>,
    ) {
        let Some(published) = self
            .members
            .get_mut(&publisher)
            .and_then(|p| p.published.get_mut(track))
        else {
            return;
        };
        if published.info.kind != MediaKind::Video {
            return;
        }
        // Simulcast: a new subscriber starts on the smallest layer.
        let lowest = if published.info.simulcast {
            Router::lowest_live(published, now)
        } else {
            None
        };
        let requester = match lowest.and_then(|s| published.encodings.by_ssrc_mut(s)) {
            Some(e) => &mut e.keyframes,
            None => &mut published.keyframes,
        };
        if requester.request(now) {
            out.push(Decision::RequestKeyframe {
                publisher,
                track: TrackName::new(track),
                ssrc: lowest,
            });
        }
    }

    /// A subscriber sent a PLI or FIR on its slot `out`: the publisher of
    /// what that slot carries is asked (for a classic client's speaker
    /// video: the source it is shown).
    pub fn keyframe_request_from(
        &mut self,
        sub: PeerKey,
        out: OutSlot,
        now: Instant,
        decisions: &mut Vec<Decision>,
    ) {
        let Some(s) = self.members.get(&sub) else {
            return;
        };
        if let Some((publisher, track)) = s.by_slot.get(&out).cloned() {
            self.subscriber_wants(sub, publisher, &track, now, decisions);
            return;
        }
        let source = s
            .speaker
            .as_ref()
            .filter(|o| o.out == out)
            .and_then(|o| o.switch.current().copied());
        let Some(source) = source else {
            return;
        };
        let track = self
            .members
            .get(&source)
            .and_then(super::speaker::speaker_track)
            .cloned();
        if let Some(track) = track {
            self.request_keyframe(source, track.as_str(), now, decisions);
        }
    }

    /// The PLIs that throttling deferred and that are due now.
    pub fn poll_keyframes(&mut self, now: Instant, out: &mut Vec<Decision>) {
        for (&publisher, p) in &mut self.members {
            for (track, published) in &mut p.published {
                if published.keyframes.poll(now) {
                    out.push(Decision::RequestKeyframe {
                        publisher,
                        track: track.clone(),
                        ssrc: None,
                    });
                }
                for e in published.encodings.list_mut() {
                    if e.keyframes.poll(now) {
                        out.push(Decision::RequestKeyframe {
                            publisher,
                            track: track.clone(),
                            ssrc: Some(e.ssrc),
                        });
                    }
                }
            }
        }
    }
}
