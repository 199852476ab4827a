//! Retransmissions to subscribers (NACKs and bandwidth-probe padding),
//! answered from one history per published stream (`media::history`).
//!
//! The publisher's packet is kept once, after it was forwarded, in the
//! history of the stream it came on; each subscriber's outgoing video
//! stream logs what it sent. A NACK from any subscriber is looked up in its
//! log, the packet found in the publisher's history and rewritten exactly
//! as it was first sent, and handed to the connection's [`Feedback`]
//! interceptor, which sends it as RTX.
//!
//! [`Feedback`]: super::interceptors

use std::time::Instant;

use bytes::BytesMut;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;

use super::{Engine, Sent};
use crate::media::history::{History, SentLog};
use crate::metrics::Metrics;
use crate::router::PeerKey;

/// Why packets are sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resend {
    /// The subscriber NACKed them (each at most a few times).
    Nack,
    /// Bandwidth-probe padding (repeats of the last packets).
    Padding,
}

/// The most sequence numbers one NACK gets answered (a NACK of the whole
/// history would otherwise cost a burst of a thousand packets, which
/// the subscriber's lossy link would only lose again); the rest are
/// counted as dropped (`nack-over-limit`).
pub(super) const MAX_NACKED: usize = 128;

/// Bytes of an RTP header without extensions, and of the original
/// sequence number an RTX packet carries ahead of the payload.
pub(super) const RTP_HEADER: usize = 12;
const RTX_HEADER: usize = 2;

/// What one [`Engine::resend`] handed to the connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Resent {
    pub packets: usize,
    /// Their size on the wire, about (headers without extensions).
    pub bytes: usize,
}

/// The most published streams (simulcast encodings) one connection keeps
/// a history of; past it, the stream silent the longest is forgotten.
const MAX_HISTORIES: usize = 16;

/// The most outgoing streams one connection keeps a log of.
const MAX_SENT_LOGS: usize = 256;

/// The sequence numbers `nack` asks for, at most [`MAX_NACKED`].
pub(super) fn nacked(nack: &TransportLayerNack, metrics: &Metrics) -> Vec<u16> {
    let mut seqs = Vec::new();
    let mut over = 0u64;
    for pair in &nack.nacks {
        for seq in pair.packet_list() {
            if seqs.len() < MAX_NACKED {
                seqs.push(seq);
            } else {
                over += 1;
            }
        }
    }
    if over > 0 {
        metrics.media_dropped_by("nack-over-limit", over);
    }
    seqs
}

/// The publisher's `packet` as sent on the subscriber's stream `ssrc`
/// with sequence number `seq`: `sent`'s payload type and timestamp, and
/// its VP8 descriptor (the payload is copied only then; otherwise it is
/// shared with every other copy).
pub(super) fn rewritten(
    packet: &rtc::rtp::Packet,
    ssrc: u32,
    seq: u16,
    sent: &Sent,
) -> rtc::rtp::Packet {
    let mut out = packet.clone();
    if let Some(patch) = &sent.patch {
        let mut payload = BytesMut::from(&packet.payload[..]);
        let n = patch.bytes().len().min(payload.len());
        payload[..n].copy_from_slice(&patch.bytes()[..n]);
        out.payload = payload.freeze();
    }
    out.header.ssrc = ssrc;
    out.header.payload_type = sent.pt;
    out.header.sequence_number = seq;
    out.header.timestamp = sent.ts;
    out
}

/// Logs that the subscriber's stream `ssrc` sent `what` as `seq`.
pub(super) fn record(
    logs: &mut Vec<(u32, SentLog<Sent>)>,
    ssrc: u32,
    seq: u16,
    now: Instant,
    what: Sent,
) {
    if let Some((_, log)) = logs.iter_mut().find(|(s, _)| *s == ssrc) {
        log.record(seq, now, what);
        return;
    }
    if logs.len() >= MAX_SENT_LOGS {
        logs.remove(0);
    }
    let mut log = SentLog::new(now);
    log.record(seq, now, what);
    logs.push((ssrc, log));
}

impl Engine {
    /// Keeps `packet`, just forwarded for `from`, in the history of its
    /// stream.
    pub(super) fn keep(&mut self, from: PeerKey, packet: rtc::rtp::Packet, arrived: Instant) {
        let Some(p) = self.peers.get_mut(&from) else {
            return;
        };
        let ssrc = packet.header.ssrc;
        let seq = packet.header.sequence_number;
        let i = match p.histories.iter().position(|(s, _)| *s == ssrc) {
            Some(i) => i,
            None => {
                if p.histories.len() >= MAX_HISTORIES {
                    let stalest = p
                        .histories
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, (_, h))| h.newest())
                        .map_or(0, |(i, _)| i);
                    p.histories.swap_remove(stalest);
                }
                p.histories.push((ssrc, History::default()));
                p.histories.len() - 1
            }
        };
        p.histories[i].1.push(seq, arrived, packet);
    }

    /// Sends `seqs` of `sub`'s stream `ssrc` again, from the publishers'
    /// histories. Returns how many were sent (the rest are too old, were
    /// never sent on that stream, or, for a NACK, were sent again just
    /// now or too often).
    pub(super) fn resend(
        &mut self,
        sub: PeerKey,
        ssrc: u32,
        seqs: &[u16],
        why: Resend,
        now: Instant,
    ) -> Resent {
        let Some(s) = self.peers.get_mut(&sub) else {
            return Resent::default();
        };
        let Some((_, log)) = s.sent.iter_mut().find(|(x, _)| *x == ssrc) else {
            return Resent::default();
        };
        let wanted: Vec<(u16, Sent)> = seqs
            .iter()
            .filter_map(|&seq| {
                let sent = match why {
                    Resend::Nack => log.resend(seq, now),
                    Resend::Padding => log.get(seq, now),
                };
                sent.map(|sent| (seq, sent))
            })
            .collect();
        let Some(s) = self.peers.get(&sub) else {
            return Resent::default();
        };
        let mut out = Vec::with_capacity(wanted.len());
        for (seq, sent) in wanted {
            let original = self
                .peers
                .get(&sent.publisher)
                .and_then(|p| p.histories.iter().find(|(x, _)| *x == sent.ssrc))
                .and_then(|(_, history)| history.get(sent.seq));
            if let Some(original) = original {
                out.push(rewritten(original, ssrc, seq, &sent));
            }
        }
        let resent = Resent {
            packets: out.len(),
            bytes: out
                .iter()
                .map(|p| RTP_HEADER + RTX_HEADER + p.payload.len())
                .sum(),
        };
        s.resender.resend(&mut out);
        if resent.packets > 0 {
            self.touched.push(sub);
        }
        resent
    }

    /// Answers a NACK of `sub`'s stream `ssrc`.
    pub(super) fn answer_nack(&mut self, sub: PeerKey, ssrc: u32, seqs: &[u16]) {
        let resent = self.resend(sub, ssrc, seqs, Resend::Nack, Instant::now());
        // Repairs take their share of a probe's rate, as media does.
        if let Some(s) = self.peers.get_mut(&sub) {
            s.prober.sent(resent.bytes);
        }
        let found = resent.packets;
        self.metrics.nack_answered.inc_by(found as u64);
        self.metrics
            .nack_not_sent
            .inc_by((seqs.len() - found) as u64);
    }

    /// Forgets what every history holds past its span, and the histories
    /// of streams that went silent.
    pub(super) fn prune_histories(&mut self, now: Instant) {
        for p in self.peers.values_mut() {
            for (_, h) in &mut p.histories {
                h.prune(now);
            }
            p.histories.retain(|(_, h)| !h.is_empty());
        }
    }
}
