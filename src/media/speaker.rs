//! The active-speaker video of a listener that receives ONE video track
//! (a classic Socket.IO client relayed through the server): which
//! publisher's video feeds it, and when a switch takes effect.
//!
//! - [`choose`]: the wanted source: the loudest speaker other than the
//!   listener that has video; with nobody speaking the current one stays;
//!   with no current one (or it is gone), the first publisher with video.
//! - [`SpeakerSwitch`]: switches only at a keyframe of the new source: the
//!   caller requests one when [`SpeakerSwitch::want`] says so, and keeps
//!   forwarding the current source until that keyframe arrives, so the
//!   listener's decoder never gets a delta frame it cannot decode. A source
//!   shown stays for at least [`HOLD`] (unless it goes away), so two people
//!   talking over each other do not make the video flap.

use std::time::{Duration, Instant};

/// How long a switched-to source stays at least.
pub const HOLD: Duration = Duration::from_millis(1500);

/// Decides which source a listener's one video track shows.
#[derive(Debug, Clone)]
pub struct SpeakerSwitch<S> {
    current: Option<S>,
    pending: Option<S>,
    /// When `current` started being shown.
    since: Option<Instant>,
}

/// What to do with a packet of a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpeakerPacket {
    /// It is from the source shown: forward it.
    Forward,
    /// It is the keyframe the pending source was waiting for: the switch
    /// happens now; forward it (and the rewriters start a new source).
    SwitchAndForward,
    /// Not shown.
    Drop,
}

impl<S> Default for SpeakerSwitch<S> {
    fn default() -> Self {
        SpeakerSwitch {
            current: None,
            pending: None,
            since: None,
        }
    }
}

impl<S: Clone + PartialEq> SpeakerSwitch<S> {
    pub fn new() -> Self {
        Self::default()
    }

    /// The source shown now.
    pub fn current(&self) -> Option<&S> {
        self.current.as_ref()
    }

    /// The source waited for (its keyframe), if any.
    pub fn pending(&self) -> Option<&S> {
        self.pending.as_ref()
    }

    /// The source the listener should see is `want`. Returns the source to
    /// request a keyframe from when a switch is now pending (a new wish; a
    /// wish repeated while pending returns it again, so the caller's
    /// throttled requester can retry).
    pub fn want(&mut self, want: Option<S>, now: Instant) -> Option<S> {
        let held = self.current.is_some()
            && self
                .since
                .is_some_and(|t| now.saturating_duration_since(t) < HOLD);
        if held && self.pending.is_none() {
            return None;
        }
        match want {
            None => {
                self.pending = None;
                None
            }
            Some(w) if self.current.as_ref() == Some(&w) => {
                self.pending = None;
                None
            }
            Some(w) => {
                self.pending = Some(w.clone());
                Some(w)
            }
        }
    }

    /// A packet from `source` arrived; `keyframe` when it starts one.
    pub fn on_packet(&mut self, source: &S, keyframe: bool, now: Instant) -> SpeakerPacket {
        if self.pending.as_ref() == Some(source) && keyframe {
            self.current = self.pending.take();
            self.since = Some(now);
            return SpeakerPacket::SwitchAndForward;
        }
        if self.current.as_ref() == Some(source) {
            SpeakerPacket::Forward
        } else {
            SpeakerPacket::Drop
        }
    }

    /// `source` went away (left, or stopped publishing video).
    pub fn remove(&mut self, source: &S) {
        if self.current.as_ref() == Some(source) {
            self.current = None;
        }
        if self.pending.as_ref() == Some(source) {
            self.pending = None;
        }
    }
}

/// The source `listener` should see: the loudest in `speakers` (loudest
/// first) that is not the listener and has video (`has_video`); with none,
/// `current` if it still has video; else the first of `with_video` that is
/// not the listener.
pub fn choose<S: Clone + PartialEq>(
    listener: &S,
    speakers: &[S],
    with_video: &[S],
    current: Option<&S>,
) -> Option<S> {
    let has_video = |s: &S| with_video.contains(s);
    if let Some(s) = speakers.iter().find(|s| *s != listener && has_video(s)) {
        return Some(s.clone());
    }
    if let Some(c) = current.filter(|c| *c != listener && has_video(c)) {
        return Some(c.clone());
    }
    with_video.iter().find(|s| *s != listener).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loudest_other_with_video_is_chosen_and_never_the_listener() {
        let all = [1, 2, 3];
        assert_eq!(choose(&1, &[1, 3, 2], &all, None), Some(3));
        assert_eq!(
            choose(&3, &[3], &all, Some(&2)),
            Some(2),
            "only itself speaks: keep"
        );
        assert_eq!(choose(&1, &[2], &[1, 3], None), Some(3), "2 has no video");
        assert_eq!(
            choose(&1, &[], &all, Some(&3)),
            Some(3),
            "silence keeps the last"
        );
        assert_eq!(choose(&1, &[], &all, None), Some(2));
        assert_eq!(choose(&1, &[], &[1], None), None);
        assert_eq!(
            choose(&1, &[], &[1, 2], Some(&3)),
            Some(2),
            "the current one left"
        );
    }

    #[test]
    fn a_switch_waits_for_the_new_sources_keyframe_and_the_old_one_flows_until_then() {
        let mut s = SpeakerSwitch::new();
        let t0 = Instant::now();
        assert_eq!(s.want(Some(1), t0), Some(1));
        assert_eq!(
            s.on_packet(&1, false, t0),
            SpeakerPacket::Drop,
            "no delta before a keyframe"
        );
        assert_eq!(s.on_packet(&1, true, t0), SpeakerPacket::SwitchAndForward);
        assert_eq!(s.on_packet(&1, false, t0), SpeakerPacket::Forward);
        assert_eq!(s.want(Some(2), t0 + HOLD), Some(2));
        assert_eq!(s.on_packet(&2, false, t0), SpeakerPacket::Drop);
        assert_eq!(
            s.on_packet(&1, false, t0),
            SpeakerPacket::Forward,
            "old source until the keyframe"
        );
        assert_eq!(s.on_packet(&2, true, t0), SpeakerPacket::SwitchAndForward);
        assert_eq!(s.on_packet(&1, false, t0), SpeakerPacket::Drop);
        assert_eq!(s.current(), Some(&2));
    }

    #[test]
    fn wanting_the_current_source_again_cancels_a_pending_switch() {
        let mut s = SpeakerSwitch::new();
        let t0 = Instant::now();
        s.want(Some(1), t0);
        s.on_packet(&1, true, t0);
        assert_eq!(s.want(Some(2), t0 + HOLD), Some(2));
        assert_eq!(s.want(Some(1), t0), None);
        assert_eq!(s.pending(), None);
        assert_eq!(s.on_packet(&2, true, t0), SpeakerPacket::Drop);
        assert_eq!(s.current(), Some(&1));
    }

    #[test]
    fn a_new_source_holds_before_the_next_switch() {
        let mut s = SpeakerSwitch::new();
        let t0 = Instant::now();
        s.want(Some(1), t0);
        s.on_packet(&1, true, t0);
        assert_eq!(s.want(Some(2), t0 + HOLD / 2), None, "too soon");
        assert_eq!(s.on_packet(&2, true, t0), SpeakerPacket::Drop);
        assert_eq!(s.want(Some(2), t0 + HOLD), Some(2));
        // Gone: the hold does not keep a source that left.
        s.remove(&1);
        assert_eq!(s.want(Some(3), t0 + HOLD), Some(3));
    }

    #[test]
    fn a_source_that_goes_away_is_forgotten() {
        let mut s = SpeakerSwitch::new();
        let t0 = Instant::now();
        s.want(Some(1), t0);
        s.on_packet(&1, true, t0);
        s.want(Some(2), t0 + HOLD);
        s.remove(&1);
        assert_eq!(s.current(), None);
        assert_eq!(s.pending(), Some(&2));
        s.remove(&2);
        assert_eq!(s.pending(), None);
    }
}
