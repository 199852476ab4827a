//! The driver's side of simulcast: the allocation rounds (each
//! subscriber's estimate into the router's allocator), `track-settings`
//! from subscribers, and `publisher-layers` (dynacast) to publishers.

use std::time::{Duration, Instant};

use rtc::media_stream::MediaStreamTrackId;
use rtc::peer_connection::RTCPeerConnection;
use switchboard_proto::{ParticipantId, PublisherLayers, ServerMessage, TrackSettings};

use super::Engine;
use crate::router::allocator::{Rise, Summary};
use crate::router::probe::{Feedback, ProbeEvent, TICK};
use crate::router::{OutSlot, PeerKey, Wish};

/// How often every subscriber's layers are chosen again. TWCC feedback
/// arrives every 50–100 ms; the allocator's hysteresis works in seconds.
pub(super) const ALLOCATE_EVERY: Duration = Duration::from_millis(500);

/// A subscriber without congestion feedback this long after its
/// connection was made sends none (aiortc, clients that do not negotiate
/// TWCC): it gets every layer its wishes allow. Before that, if it has
/// layers to choose from, it gets the estimator's initial value; tracks
/// without simulcast are never cut on a guess.
const NO_FEEDBACK: Duration = Duration::from_secs(5);

/// How many packets a round's padding starts with: its bytes over about a
/// video packet (more follow when the packets were smaller).
const PADDING_PACKET: usize = 1_100;

/// At most this many packets repeated per padding round.
const MAX_REPEAT: u16 = 64;

impl Engine {
    /// One allocation round: every subscriber's layers for its estimate,
    /// then what each publisher needs to keep encoding.
    pub(super) fn allocate_layers(&mut self, now: Instant) {
        let mut keys: Vec<PeerKey> = self
            .peers
            .iter()
            .filter(|(_, p)| !p.classic)
            .map(|(&k, _)| k)
            .collect();
        keys.sort_unstable();
        let mut decisions = std::mem::take(&mut self.decisions);
        decisions.clear();
        let (mut paused, mut deficit) = (0i64, 0i64);
        for key in keys {
            // A probe that has run its time ends first: its success lets
            // the layers rise in this round.
            self.end_probe(key, now);
            let Some(p) = self.peers.get(&key) else {
                continue;
            };
            let estimate = match p.estimate.get() {
                Some(e) => {
                    self.metrics.layers.estimate.observe(e as f64);
                    Some(e)
                }
                // Layers to choose and no feedback yet: start modestly.
                None if now.saturating_duration_since(p.created) < NO_FEEDBACK
                    && self.router.receives_simulcast(key) =>
                {
                    Some(super::bwe::INITIAL as u64)
                }
                None => None,
            };
            // No layer goes up past what the link was seen to carry, where a
            // probe can show more (its padding is RTX): the estimate alone
            // may have climbed on trust. The answer is read only when that
            // limit would bind.
            let tested = p
                .estimate
                .tested()
                .filter(|&t| estimate.is_some_and(|e| e > t) && accepts_rtx(&p.pc));
            // While a probe pads, or during a failed one's back-off,
            // nothing goes up (see `Rise::Hold`, `Prober::holds_rises`).
            let rise = match tested {
                _ if p.prober.holds_rises(now) => Rise::Hold,
                Some(t) => Rise::Tested(t),
                None => Rise::Estimate,
            };
            let a = self
                .router
                .allocate_tested(key, estimate, rise, now, &mut decisions);
            if a.switches > 0 && tracing::enabled!(tracing::Level::DEBUG) {
                let layers = self.router.subscriptions_of(key);
                let encodings: Vec<_> = layers
                    .iter()
                    .map(|v| self.router.encodings(v.publisher, v.track.as_str()))
                    .collect();
                tracing::debug!(participant = %p.participant, ?estimate, ?layers, ?encodings, "layers chosen");
            }
            self.metrics.layers.switches.inc_by(u64::from(a.switches));
            self.probe_round(key, now, &a.summary);
            paused += i64::from(a.summary.paused_for_bandwidth);
            deficit += i64::try_from(a.summary.deficit).unwrap_or(i64::MAX);
        }
        self.metrics.layers.paused.set(paused);
        self.metrics.layers.deficit.set(deficit);
        self.apply_decisions(&mut decisions, None, now);
        self.decisions = decisions;
        self.dynacast();
    }

    /// Before `key`'s allocation round: ends its probe if it ran its time
    /// or its estimate fell (see [`Prober::end_round`]).
    ///
    /// [`Prober::end_round`]: crate::router::probe::Prober::end_round
    fn end_probe(&mut self, key: PeerKey, now: Instant) {
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        if !p.prober.active() {
            return;
        }
        let estimate = p.estimate.get();
        if let Some(event) = p.prober.end_round(now, estimate, p.estimate.tested()) {
            self.probe_ended(key, event, now);
        }
    }

    /// Logs and counts how `key`'s probe ended at `now`, with what its
    /// connection's feedback said then.
    fn probe_ended(&mut self, key: PeerKey, event: ProbeEvent, now: Instant) {
        let Some(p) = self.peers.get(&key) else {
            return;
        };
        let padding = p.prober.padding_of_last();
        let (reported, lost) = p.estimate.losses();
        let overusing = p.estimate.overusing(now);
        let outcome = event.label();
        tracing::debug!(participant = %p.participant, estimate = ?p.estimate.get(), reported, lost, overusing, padding_due = padding.due, padding_sent = padding.sent, outcome, "probe ended");
        self.metrics.layers.probes(outcome);
    }

    /// After `key`'s allocation round: starts, ends or aborts its
    /// bandwidth probe. Only connections whose answer accepted RTX for
    /// video are probed (the padding is RTX retransmissions; repeated
    /// packets on the media SSRC would be dropped as SRTP replays and
    /// reported lost).
    fn probe_round(&mut self, key: PeerKey, now: Instant, summary: &Summary) {
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        // The answer is read only when a probe could start (checked then,
        // not every round of every connection).
        let could_start =
            !p.prober.active() && summary.deficit >= crate::router::probe::MIN_DEFICIT;
        let rtx = !could_start || accepts_rtx(&p.pc);
        let estimate = p.estimate.get().filter(|_| rtx);
        // The allocator raises nothing past what the link was seen to
        // carry: that is what a probe tests.
        let tested = p.estimate.tested();
        let Some(event) =
            p.prober
                .on_round_tested(now, estimate, tested, p.estimate.overusing(now), summary)
        else {
            return;
        };
        match event {
            ProbeEvent::Started { pad_bps } => {
                tracing::debug!(participant = %p.participant, ?estimate, pad_bps, allocated = summary.allocated, deficit = summary.deficit, "probe started");
                self.padding_due.get_or_insert(now);
                self.metrics.layers.probes(event.label());
            }
            _ => self.probe_ended(key, event, now),
        }
    }

    /// Sends the padding due on every probing connection: the last
    /// packets of its video, again, on its RTX stream.
    pub(super) fn pad(&mut self, now: Instant) {
        let mut any = false;
        let keys: Vec<PeerKey> = self
            .peers
            .iter()
            .filter(|(_, p)| p.prober.active())
            .map(|(&k, _)| k)
            .collect();
        for key in keys {
            let Some(p) = self.peers.get_mut(&key) else {
                continue;
            };
            any = true;
            let (reported, lost) = p.estimate.losses();
            let feedback = Feedback {
                estimate: p.estimate.get(),
                overuse: p.estimate.overuse(now),
                reported,
                lost,
            };
            if let Some(event) = p.prober.on_feedback(now, feedback) {
                self.probe_ended(key, event, now);
                continue;
            }
            let due = p.prober.padding_due(now);
            let Some((ssrc, seq)) = p.last_video else {
                p.prober.forgive();
                continue;
            };
            // The last packets, oldest first, until `due` bytes went out
            // (counted as sent: a probe of small low-layer packets must not
            // pad at half its rate), at most MAX_REPEAT per round.
            let (mut left, mut back, mut sent, mut bytes) = (due, 0u16, 0usize, 0usize);
            while left > 0 && back < MAX_REPEAT {
                let n = u16::try_from(left.div_ceil(PADDING_PACKET))
                    .unwrap_or(u16::MAX)
                    .min(MAX_REPEAT - back);
                let seqs: Vec<u16> = (back..back + n)
                    .rev()
                    .map(|i| seq.wrapping_sub(i))
                    .collect();
                let r = self.resend(key, ssrc, &seqs, super::resend::Resend::Padding, now);
                if r.packets == 0 {
                    break;
                }
                sent += r.packets;
                bytes += r.bytes;
                left = left.saturating_sub(r.bytes);
                back += n;
            }
            self.metrics.layers.padding_packets.inc_by(sent as u64);
            if let Some(p) = self.peers.get_mut(&key) {
                p.prober.padded(bytes);
                if sent == 0 && due > 0 {
                    // Nothing recent to repeat (the publisher went quiet).
                    p.prober.forgive();
                }
            }
        }
        self.padding_due = any.then_some(now + TICK);
    }

    /// Tells each simulcast publisher which of its encodings some
    /// subscriber needs (`publisher-layers`), when that set changed.
    fn dynacast(&mut self) {
        let mut ssrcs = Vec::new();
        let mut keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        keys.sort_unstable();
        for key in keys {
            let Some(p) = self.peers.get(&key) else {
                continue;
            };
            let tracks: Vec<(MediaStreamTrackId, rtc::rtp_transceiver::RTCRtpReceiverId)> = p
                .published
                .iter()
                .filter(|(_, t)| t.simulcast)
                .map(|(id, t)| (id.clone(), t.receiver_id))
                .collect();
            for (track, receiver) in tracks {
                self.router.needed_layers(key, &track, &mut ssrcs);
                // The rids the publisher offered, in its order.
                let Some(p) = self.peers.get_mut(&key) else {
                    continue;
                };
                let rids: Vec<Box<str>> = match p.pc.rtp_receiver(receiver) {
                    Some(r) => r
                        .track()
                        .codings()
                        .iter()
                        .map(|c| c.rtp_coding_parameters.rid.as_str())
                        .filter(|rid| !rid.is_empty())
                        .map(Box::from)
                        .collect(),
                    None => continue,
                };
                let Some(enc) = self.router.encodings(key, &track) else {
                    continue;
                };
                // A rid the server has not received yet stays on while
                // someone could use a taller layer than it knows: it cannot
                // be judged before its first packet, and pausing it would
                // keep it unknown for good.
                let taller = self.router.wants_taller(key, &track);
                let active: Vec<Box<str>> = rids
                    .into_iter()
                    .filter(|rid| match enc.by_rid(rid) {
                        Some(e) => ssrcs.contains(&e.ssrc),
                        None => taller,
                    })
                    .collect();
                if active.is_empty() {
                    continue;
                }
                let Some(p) = self.peers.get_mut(&key) else {
                    continue;
                };
                if p.layers_sent.get(&track) == Some(&active) {
                    continue;
                }
                let mid = super::events::receiver_mid(&mut p.pc, receiver);
                let msg = ServerMessage::PublisherLayers(PublisherLayers {
                    room: p.room.clone(),
                    mid,
                    active: active.iter().map(|r| r.to_string()).collect(),
                });
                tracing::debug!(participant = %p.participant, track = %track, active = ?active, "publisher layers");
                self.metrics.layers.publisher_updates.inc();
                self.outboxes.send(&p.participant, &msg, &self.metrics);
                p.layers_sent.insert(track, active);
            }
        }
    }

    /// `track-settings` from `participant`: its wish for the track it
    /// receives on m-section `mid`. A mid that carries nothing (the track
    /// just went away) is ignored.
    pub(super) fn on_track_settings(&mut self, participant: &ParticipantId, t: TrackSettings) {
        let Some(&key) = self.by_participant.get(participant) else {
            return;
        };
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        let slot = p.down.keys().copied().find(|slot| {
            p.pc.rtp_transceiver(slot.0 as usize)
                .is_some_and(|tr| tr.mid().as_deref() == Some(t.mid.as_str()))
        });
        let Some(slot) = slot else {
            self.metrics.layers.unknown_mid.inc();
            return;
        };
        let wish = Wish {
            max_height: t.max_height,
            paused: t.paused.unwrap_or(false),
        };
        if self.router.set_wish(key, OutSlot(slot.0), wish) {
            tracing::debug!(%participant, mid = %t.mid, ?wish, "track settings");
        }
    }
}

/// Whether the connection's answer accepted RTX for video: probe padding
/// is RTX, so only then can a probe show more than was sent.
fn accepts_rtx(pc: &RTCPeerConnection) -> bool {
    pc.remote_description()
        .is_some_and(|d| d.sdp.contains(" rtx/90000"))
}
