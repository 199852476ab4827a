//! The audio mixer's glue: a room's [`RoomMixer`], the one mixed track each
//! listener receives, and the 20 ms tick that feeds it (also the tick of
//! the router's speaker tracking and classic speaker following).

use std::time::Instant;

use bytes::Bytes;
use rtc::peer_connection::configuration::media_engine::MIME_TYPE_OPUS;
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RtpCodecKind};
use rtc::rtp_transceiver::RTCRtpSenderId;
use switchboard_proto::{ErrorCode, RoomName, ServerMessage, Speaker, Speakers, MIX_STREAM};

use super::senders::add_send_track;
use super::{Engine, MIX_FRAME};
use crate::metrics::{Metrics, MixDrop};
use crate::mixer::{MixerConfig, MixerStats, Push, RoomMixer, SelectConfig, FRAME_SAMPLES};
use crate::router::{Mixing, OutSlot, PeerKey, RtpIn};

/// A mix room's mixer.
pub(super) struct RoomMix {
    mixer: RoomMixer,
    /// Mixer counters already exported to the metrics.
    exported: MixerStats,
    /// Speakers currently counted in the active-speakers gauge.
    speakers: usize,
}

/// The one mixed audio track a participant of a mix room receives.
pub(super) struct MixOut {
    pub(super) transceiver: usize,
    pub(super) sender_id: RTCRtpSenderId,
    pub(super) ssrc: u32,
    /// Opus payload type the listener negotiated; `None` until its answer.
    pub(super) pt: Option<u8>,
    pub(super) offered: bool,
    pub(super) seq: u16,
    pub(super) ts: u32,
}

impl MixOut {
    pub(super) fn new(
        transceiver: usize,
        sender_id: RTCRtpSenderId,
        ssrc: u32,
        offered: bool,
    ) -> Self {
        MixOut {
            transceiver,
            sender_id,
            ssrc,
            pt: None,
            offered,
            seq: rand::random::<u16>(),
            ts: rand::random::<u32>(),
        }
    }
}

/// The codec of the mixed track.
pub(super) fn mix_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.to_owned(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
        rtcp_feedback: Vec::new(),
    }
}

impl Engine {
    /// A mixer for `room`, with the server's settings; `None` (and logged)
    /// when the codec cannot be set up: audio is then forwarded, worse, but
    /// the call goes on.
    pub(super) fn new_mixer(&self, room: &RoomName) -> Option<Box<RoomMix>> {
        let config = MixerConfig {
            select: SelectConfig {
                k: self.mix_speakers,
                ..SelectConfig::default()
            },
            complexity: self.mix_complexity,
            ..MixerConfig::default()
        };
        match RoomMixer::new(config) {
            Ok(mixer) => {
                self.metrics.mixer.rooms.inc();
                Some(Box::new(RoomMix {
                    mixer,
                    exported: MixerStats::default(),
                    speakers: 0,
                }))
            }
            Err(e) => {
                tracing::error!(%room, error = %e, "cannot create the room's mixer");
                None
            }
        }
    }

    /// Adds `key`'s audio input to its room's mixer, if the room mixes.
    pub(super) fn add_mixer_input(
        &mut self,
        room: &RoomName,
        input: crate::mixer::InputId,
    ) -> bool {
        let Some(mix) = self.mixes.get_mut(room) else {
            return false;
        };
        match mix.mixer.add_input(input) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(%room, error = %e, "cannot add a mixer input");
                false
            }
        }
    }

    /// `key` left: its input leaves the mixer; the mixer goes with the room.
    pub(super) fn leave_mixer(&mut self, room: &RoomName, left: &crate::router::Left) {
        if let (Some(mix), Some(input)) = (self.mixes.get_mut(room), left.audio_input) {
            let _ = mix.mixer.remove_input(input);
        }
        if left.room_closed {
            if let Some(mix) = self.mixes.remove(room) {
                self.metrics.mixer.rooms.dec();
                self.metrics.mixer.active_speakers.sub(mix.speakers as i64);
            }
        }
    }

    /// One audio packet of `from` for its room's mixer. `opus_pt`: the
    /// payload type of Opus on its track.
    pub(super) fn push_to_mixer(
        &mut self,
        from: PeerKey,
        input: crate::mixer::InputId,
        pkt: &RtpIn<'_>,
        pt: u8,
        opus_pt: Option<u8>,
        arrived: Instant,
    ) {
        let Some(mix) = self
            .router
            .room_of(from)
            .and_then(|room| self.mixes.get_mut(room))
        else {
            return;
        };
        match mixable(opus_pt, pt) {
            Err(why) => self.metrics.mixer.dropped(why, 1),
            Ok(()) => {
                let pushed =
                    mix.mixer
                        .push(input, pkt.seq, pkt.ts, pkt.payload, pkt.level, arrived);
                if let Ok(Push::Invalid) = pushed {
                    self.metrics.mixer.dropped(MixDrop::Invalid, 1);
                }
            }
        }
    }

    /// Sets whether the listener `key`'s decoder takes in-band FEC.
    pub(super) fn set_mix_fec(&mut self, key: PeerKey, room: &RoomName, fec: bool) {
        if let (Some(input), Some(mix)) = (self.router.audio_input(key), self.mixes.get_mut(room)) {
            let _ = mix.mixer.set_fec(input, fec);
        }
    }

    /// Gives `key` its one mixed audio track (stream id `mix`), if its room
    /// mixes, is in `sfu` mode, and it has none yet.
    pub(super) fn add_mix_track(&mut self, key: PeerKey) {
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        let mixing = self
            .router
            .room_mode(&p.room)
            .is_some_and(|(sfu, mixing)| sfu && mixing == Mixing::ForAll);
        if !mixing
            || p.classic
            || p.mix_out.is_some()
            || self.router.audio_input(key).is_none()
            || !p.answered_first
            || !p.grants.subscribe
        {
            return;
        }
        match add_send_track(
            &mut p.pc,
            &mut p.spare,
            MIX_STREAM.to_owned(),
            RtpCodecKind::Audio,
            mix_codec(),
        ) {
            Ok(added) => {
                // A reused m-section's forwarding history is of no use here.
                self.router
                    .release_slot(key, OutSlot(added.transceiver as u32));
                p.mix_out = Some(MixOut::new(
                    added.transceiver,
                    added.sender_id,
                    added.ssrc,
                    false,
                ));
                p.needs_offer = true;
                self.offers_due.push(key);
            }
            Err(e) => {
                // In practice: the client negotiated audio without Opus (a
                // PCMU-only peer), and the mix is Opus. Say so rather than
                // leave it wondering why it hears nobody.
                tracing::info!(participant = %p.participant, error = %e, "cannot add the mixed audio track");
                let participant = p.participant.clone();
                self.send_error(
                    &participant,
                    ErrorCode::BadRequest,
                    "this room mixes audio as Opus, and your connection negotiated audio without \
                     Opus: you cannot hear the room (and your audio is not mixed)",
                );
            }
        }
    }

    /// Gives `key`'s room a mixer if it has none (a forward room): a classic
    /// client hears the mix; everyone else keeps getting audio forwarded.
    pub(super) fn ensure_classic_mix(&mut self, key: PeerKey) {
        let Some(room_name) = self.peers.get(&key).map(|p| p.room.clone()) else {
            return;
        };
        if self
            .router
            .room_mode(&room_name)
            .is_none_or(|(_, mixing)| mixing != Mixing::None)
        {
            return;
        }
        let Some(mut mix) = self.new_mixer(&room_name) else {
            return;
        };
        for &k in self.router.members(&room_name) {
            if let Some(input) = self.router.audio_input(k) {
                if let Err(e) = mix.mixer.add_input(input) {
                    tracing::error!(room = %room_name, error = %e, "cannot add a mixer input");
                }
            }
        }
        self.mixes.insert(room_name.clone(), mix);
        self.router.set_mixing(&room_name, Mixing::ClassicOnly);
        tracing::info!(room = %room_name, "mixing for the room's classic clients");
    }

    /// One 20 ms mixer frame for every mixing room: decode, mix, encode,
    /// and hand each listener its packet; `speakers` when they change.
    pub(super) fn audio_tick(&mut self) {
        let Some(due) = self.audio_due else {
            return;
        };
        let started = Instant::now();
        let late = started.saturating_duration_since(due);
        self.metrics.mixer.tick_lateness.observe(late.as_secs_f64());
        // The schedule stays on the 20 ms grid; a tick more than a frame
        // late skips the frames it missed rather than bunching them.
        let missed = (late.as_nanos() / MIX_FRAME.as_nanos()) as u32;
        if missed > 0 {
            self.metrics.mixer.overruns.inc_by(u64::from(missed));
        }
        let any = self.router.rooms().next().is_some();
        let mut changed = Vec::new();
        self.router.tick_speakers(started, &mut changed);
        for (name, mix) in &mut self.mixes {
            if !self.router.room_mode(name).is_some_and(|(sfu, _)| sfu) {
                continue;
            }
            let out = mix.mixer.tick(started);
            let shared = out.shared().map(Bytes::copy_from_slice);
            for &member in self.router.members(name) {
                let Some(p) = self.peers.get_mut(&member) else {
                    continue;
                };
                let (Some(input), Some(mo)) = (self.router.audio_input(member), p.mix_out.as_mut())
                else {
                    continue;
                };
                let ts = mo.ts;
                mo.ts = mo.ts.wrapping_add(FRAME_SAMPLES as u32 * (missed + 1));
                let Some(pt) = mo.pt else {
                    continue;
                };
                let payload = match out.own().find(|(id, _)| *id == input) {
                    Some((_, own)) => Bytes::copy_from_slice(own),
                    None => match &shared {
                        Some(shared) => shared.clone(),
                        None => continue,
                    },
                };
                let packet = rtc::rtp::Packet {
                    header: rtc::rtp::header::Header {
                        version: 2,
                        payload_type: pt,
                        sequence_number: mo.seq,
                        timestamp: ts,
                        ssrc: mo.ssrc,
                        ..Default::default()
                    },
                    payload,
                };
                mo.seq = mo.seq.wrapping_add(1);
                let size = super::resend::RTP_HEADER + packet.payload.len();
                if let Some(mut sender) = p.pc.rtp_sender(mo.sender_id) {
                    match sender.write_rtp(started, packet) {
                        // A probe's padding fills what the media leaves.
                        Ok(()) => p.prober.sent(size),
                        Err(_) => self.metrics.media_dropped("write-failed"),
                    }
                }
            }
            let active = out.speakers().len();
            self.metrics
                .mixer
                .active_speakers
                .add(active as i64 - mix.speakers as i64);
            mix.speakers = active;
            // In a forward room the speaker tracker reports speakers.
            if out.speakers_changed() {
                changed.extend(self.router.mixer_speakers(name, out.speakers()));
            }
            let stats = *mix.mixer.stats();
            export_mixer_stats(&self.metrics, &mix.exported, &stats);
            mix.exported = stats;
        }
        self.decide(started, |r, d| r.follow_speakers(started, d));
        for c in changed {
            let speakers = c
                .speakers
                .iter()
                .filter_map(|&(k, level)| {
                    Some(Speaker {
                        id: self.peers.get(&k)?.participant.clone(),
                        level,
                    })
                })
                .collect();
            let msg = ServerMessage::Speakers(Speakers {
                room: c.room,
                speakers,
            });
            for key in c.members {
                if let Some(p) = self.peers.get(&key) {
                    self.outboxes.send(&p.participant, &msg, &self.metrics);
                }
            }
        }
        self.audio_due = any.then_some(due + MIX_FRAME * (missed + 1));
        self.metrics
            .mixer
            .tick
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Whether a packet of payload type `pt` on a track whose Opus payload type
/// is `opus_pt` can go to the mixer: only Opus can (a publisher that
/// negotiated PCMU or G.722 only, or switches codec mid-call, is not mixed).
fn mixable(opus_pt: Option<u8>, pt: u8) -> Result<(), MixDrop> {
    match opus_pt {
        Some(opus) if opus == pt => Ok(()),
        _ => Err(MixDrop::NotOpus),
    }
}

/// Adds what the mixer counted since `before` to the metrics.
fn export_mixer_stats(metrics: &Metrics, before: &MixerStats, now: &MixerStats) {
    let m = &metrics.mixer;
    m.decodes.inc_by(now.decodes.saturating_sub(before.decodes));
    m.encodes.inc_by(now.encodes.saturating_sub(before.encodes));
    m.late_frames.inc_by(now.late.saturating_sub(before.late));
    m.lost_frames.inc_by(now.lost.saturating_sub(before.lost));
    m.concealed_frames
        .inc_by(now.concealed.saturating_sub(before.concealed));
    m.dropped(
        MixDrop::Corrupt,
        now.decode_errors.saturating_sub(before.decode_errors),
    );
}

/// Whether the answer's m-section `mid` enables Opus in-band FEC
/// (`useinbandfec=1` in the fmtp of payload type `pt`): the listener's
/// decoder then uses it, so the mix carries it.
pub(super) fn opus_fec_in_answer(sdp: &str, mid: &str, pt: u8) -> bool {
    let fmtp = format!("a=fmtp:{pt} ");
    let mut in_section = false;
    let mut section_lines: Vec<&str> = Vec::new();
    let mut found = false;
    for line in sdp.lines().chain(["m=end"]) {
        if line.starts_with("m=") {
            if in_section {
                found = section_lines.iter().any(|l| {
                    l.strip_prefix(&fmtp).is_some_and(|params| {
                        params
                            .split(';')
                            .any(|kv| kv.trim().eq_ignore_ascii_case("useinbandfec=1"))
                    })
                });
                break;
            }
            section_lines.clear();
        } else {
            if line.strip_prefix("a=mid:") == Some(mid) {
                in_section = true;
            }
            section_lines.push(line);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::{mixable, opus_fec_in_answer};
    use crate::metrics::MixDrop;

    #[test]
    fn only_the_tracks_opus_payload_type_is_mixed() {
        assert_eq!(mixable(Some(111), 111), Ok(()));
        assert_eq!(
            mixable(Some(111), 0),
            Err(MixDrop::NotOpus),
            "PCMU on an Opus track"
        );
        assert_eq!(
            mixable(None, 0),
            Err(MixDrop::NotOpus),
            "a PCMU-only publisher"
        );
        assert_eq!(mixable(None, 111), Err(MixDrop::NotOpus));
    }

    #[test]
    fn fec_is_read_from_the_listeners_section_and_payload_type() {
        let sdp = "v=0\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=fmtp:111 minptime=10;useinbandfec=1\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:3\r\na=fmtp:111 minptime=10\r\n\
            m=audio 9 UDP/TLS/RTP/SAVPF 109\r\na=mid:4\r\na=fmtp:109 minptime=10; useinbandfec=1\r\n";
        assert!(opus_fec_in_answer(sdp, "0", 111));
        assert!(
            !opus_fec_in_answer(sdp, "3", 111),
            "that section did not ask for FEC"
        );
        assert!(
            opus_fec_in_answer(sdp, "4", 109),
            "last section, spaces after ';'"
        );
        assert!(!opus_fec_in_answer(sdp, "4", 111), "another payload type");
        assert!(!opus_fec_in_answer(sdp, "9", 111), "no such section");
    }
}
