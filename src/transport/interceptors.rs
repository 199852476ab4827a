//! The interceptor chain of every server connection: rtc's NACK generator,
//! TWCC receiver, RTCP reports and simulcast header extensions, and one of
//! ours, [`Feedback`], in the NACK responder's slot: it hands subscribers'
//! keyframe requests and NACKs to the engine, sends the retransmissions
//! the engine gives it (as RTX), and counts NACKs.
//!
//! The engine answers NACKs, not an interceptor: a published packet is kept
//! once, in its stream's history, for all its subscribers
//! (`media::history`); rtc's responder kept a copy for each outgoing
//! stream.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rtc::interceptor::{
    Attribute, AttributedPacket, Interceptor, Packet, Registry, Slot, StreamInfo, TaggedPacket,
};
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use rtc::sansio::Protocol;

use crate::metrics::Metrics;

/// Our interceptor and rtc's, in their slots. [`Feedback`] sits where
/// rtc's NACK responder would (4_000): wire-ward of the NACK generator
/// (7_000), so the NACKs it writes pass it and are counted, and
/// application-ward of TWCC (2_000) and the congestion controller (1_000),
/// so retransmissions are numbered and recorded like any packet.
///
/// Also send-side congestion control: transport-wide sequence numbers on
/// what the server sends, and the subscriber's TWCC feedback into
/// [`super::bwe::Bwe`], whose estimate the returned handle reads. No pacer:
/// the allocator keeps what is forwarded under the estimate, and a pacer
/// would queue (and delay) every packet to smooth what is already smooth.
pub(super) fn registry(
    metrics: &Metrics,
    media_engine: &mut MediaEngine,
) -> Result<(Registry, (super::bwe::Estimate, Resender)), rtc::shared::error::Error> {
    let (bwe, estimate) = super::bwe::Bwe::new();
    let (feedback, resender) = Feedback::new(metrics);
    let registry = Registry::new()
        .with(Slot::NackResponder, feedback)
        .with(
            Slot::CongestionControl,
            rtc::interceptor::CongestionControlBuilder::new(bwe).build(),
        )
        .with(
            Slot::TwccSender,
            rtc::interceptor::TwccSenderBuilder::new().build(),
        );
    Ok((
        register_interceptors(registry, media_engine)?,
        (estimate, resender),
    ))
}

/// A lost packet is NACKed at most this many times (one per 100 ms
/// generator cycle): after that the retransmission is too late to be
/// worth asking for again, and a packet that never comes back (its
/// publisher does not keep history) does not cost a NACK every cycle for
/// as long as it stays in the receive log.
const MAX_NACKS_PER_PACKET: u16 = 4;
/// rtc's NACK generator (bounded), TWCC receiver, RTCP reports and
/// simulcast header extensions.
fn register_interceptors(
    registry: Registry,
    media_engine: &mut MediaEngine,
) -> Result<Registry, rtc::shared::error::Error> {
    use rtc::peer_connection::configuration::interceptor_registry::{
        configure_rtcp_reports, configure_simulcast_extension_headers, configure_twcc_receiver_only,
    };
    use rtc::rtp_transceiver::rtp_sender::RTCPFeedback;
    for parameter in ["", "pli"] {
        media_engine.register_feedback(
            RTCPFeedback {
                typ: "nack".to_owned(),
                parameter: parameter.to_owned(),
            },
            RtpCodecKind::Video,
        );
    }
    let registry = registry.with(
        Slot::NackGenerator,
        rtc::interceptor::NackGeneratorBuilder::new()
            .with_max_nacks_per_packet(MAX_NACKS_PER_PACKET)
            .build(),
    );
    configure_simulcast_extension_headers(media_engine)?;
    let registry = configure_twcc_receiver_only(registry, media_engine)?;
    Ok(configure_rtcp_reports(registry))
}

/// The engine's handle for retransmissions: packets as first sent (the
/// subscriber's SSRC and sequence number), sent again at the connection's
/// next write poll, as RTX where the subscriber accepted it.
#[derive(Debug, Clone, Default)]
pub(super) struct Resender(Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    pending: AtomicBool,
    queue: Mutex<Vec<rtc::rtp::Packet>>,
}

impl Resender {
    pub(super) fn resend(&self, packets: &mut Vec<rtc::rtp::Packet>) {
        if packets.is_empty() {
            return;
        }
        if let Ok(mut q) = self.0.queue.lock() {
            q.append(packets);
            self.0.pending.store(true, Ordering::Release);
        }
    }
}

/// A local (sent) stream that answers NACKs: its RTX SSRC and payload
/// type, if negotiated, and the RTX stream's next sequence number.
struct Retransmitted {
    rtx: Option<(u32, u8)>,
    rtx_seq: u16,
}

/// The per-connection interceptor (see the module documentation).
pub(super) struct Feedback {
    shared: Arc<Shared>,
    streams: HashMap<u32, Retransmitted>,
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
    nacks_in: prometheus::IntCounter,
    nacks_out: prometheus::IntCounter,
}

impl Feedback {
    fn new(metrics: &Metrics) -> (Feedback, Resender) {
        let resender = Resender::default();
        let feedback = Feedback {
            shared: resender.0.clone(),
            streams: HashMap::new(),
            read: VecDeque::new(),
            write: VecDeque::new(),
            nacks_in: metrics.nacks_received.clone(),
            nacks_out: metrics.nacks_sent.clone(),
        };
        (feedback, resender)
    }

    /// Queues the engine's retransmissions for the wire.
    fn take_resends(&mut self) {
        // A plain load per poll (no write to the shared line); the swap and
        // the lock only when something is queued.
        if !self.shared.pending.load(Ordering::Relaxed)
            || !self.shared.pending.swap(false, Ordering::Acquire)
        {
            return;
        }
        let packets = match self.shared.queue.lock() {
            Ok(mut q) => std::mem::take(&mut *q),
            Err(_) => return,
        };
        let now = Instant::now();
        for packet in packets {
            let Some(stream) = self.streams.get_mut(&packet.header.ssrc) else {
                continue; // not a stream that answers NACKs (or gone)
            };
            let packet = match stream.rtx {
                Some((ssrc, pt)) => {
                    let seq = stream.rtx_seq;
                    stream.rtx_seq = seq.wrapping_add(1);
                    rtx(&packet, ssrc, pt, seq)
                }
                None => packet,
            };
            self.write.push_back(TaggedPacket {
                now,
                transport: Default::default(),
                message: AttributedPacket::new(Packet::Rtp(packet)).with(Attribute::Retransmission),
            });
        }
    }
}

/// `original` as an RFC 4588 retransmission: on the RTX SSRC and payload
/// type, its own sequence number, the original one ahead of the payload.
fn rtx(original: &rtc::rtp::Packet, ssrc: u32, pt: u8, seq: u16) -> rtc::rtp::Packet {
    let mut payload = Vec::with_capacity(2 + original.payload.len());
    payload.extend_from_slice(&original.header.sequence_number.to_be_bytes());
    payload.extend_from_slice(&original.payload);
    rtc::rtp::Packet {
        header: rtc::rtp::header::Header {
            version: 2,
            ssrc,
            payload_type: pt,
            sequence_number: seq,
            timestamp: original.header.timestamp,
            marker: original.header.marker,
            ..Default::default()
        },
        payload: payload.into(),
    }
}

/// Sequence numbers requested by the generic NACKs among `packets`.
fn nacked_packets(packets: &[Box<dyn rtc::rtcp::Packet>]) -> u64 {
    packets
        .iter()
        .filter_map(|p| p.as_any().downcast_ref::<TransportLayerNack>())
        .flat_map(|n| n.nacks.iter())
        .map(|pair| 1 + u64::from(pair.lost_packets.count_ones()))
        .sum()
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for Feedback {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            let nacked = nacked_packets(packets);
            self.nacks_in.inc_by(nacked);
            // Keyframe requests and NACKs are the engine's to answer.
            let wanted = nacked > 0
                || packets.iter().any(|p| {
                    let any = p.as_any();
                    any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
                });
            if wanted {
                msg.message.add(Attribute::DeliverToApplication);
            }
        }
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            self.nacks_out.inc_by(nacked_packets(packets));
        }
        self.write.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        if self.write.is_empty() {
            self.take_resends();
        }
        self.write.pop_front()
    }

    fn handle_timeout(&mut self, _now: Instant) -> Result<(), Self::Error> {
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        None
    }
}

impl Interceptor for Feedback {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        let nack = info
            .rtcp_feedback
            .iter()
            .any(|fb| fb.typ == "nack" && fb.parameter.is_empty());
        if nack {
            self.streams.insert(
                info.ssrc,
                Retransmitted {
                    rtx: info.ssrc_rtx.zip(info.payload_type_rtx),
                    rtx_seq: 0,
                },
            );
        }
    }
    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.streams.remove(&info.ssrc);
    }
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::rtcp::transport_feedbacks::transport_layer_nack::NackPair;

    fn info(ssrc: u32, rtx: Option<(u32, u8)>) -> StreamInfo {
        StreamInfo {
            ssrc,
            ssrc_rtx: rtx.map(|r| r.0),
            payload_type_rtx: rtx.map(|r| r.1),
            rtcp_feedback: vec![rtc::interceptor::RTCPFeedback {
                typ: "nack".to_owned(),
                parameter: String::new(),
            }],
            ..Default::default()
        }
    }

    fn packet(ssrc: u32, seq: u16, payload: &'static [u8]) -> rtc::rtp::Packet {
        rtc::rtp::Packet {
            header: rtc::rtp::header::Header {
                version: 2,
                ssrc,
                sequence_number: seq,
                timestamp: 9_000,
                marker: true,
                payload_type: 96,
                ..Default::default()
            },
            payload: bytes::Bytes::from_static(payload),
        }
    }

    fn rtp_out(f: &mut Feedback) -> Vec<rtc::rtp::Packet> {
        std::iter::from_fn(|| f.poll_write())
            .map(|t| {
                assert!(t.message.has(&Attribute::Retransmission));
                t.message.packet
            })
            .map(|p| match p {
                Packet::Rtp(p) => p,
                _ => panic!("not RTP"),
            })
            .collect()
    }

    #[test]
    fn resends_go_out_as_rtx_numbered_in_order_or_plain_without_rtx() {
        let metrics = Metrics::new();
        let (mut f, resender) = Feedback::new(&metrics);
        f.bind_local_stream(&info(10, Some((11, 97))));
        f.bind_local_stream(&info(20, None));
        assert!(f.poll_write().is_none(), "nothing queued");
        let mut batch = vec![
            packet(10, 500, b"abc"),
            packet(20, 7, b"xy"),
            packet(30, 1, b"unknown stream"),
            packet(10, 501, b"d"),
        ];
        resender.resend(&mut batch);
        assert!(batch.is_empty());
        let out = rtp_out(&mut f);
        assert_eq!(out.len(), 3, "the unbound stream's packet is dropped");
        let (a, plain, b) = (&out[0], &out[1], &out[2]);
        assert_eq!((a.header.ssrc, a.header.payload_type), (11, 97));
        assert_eq!((a.header.sequence_number, b.header.sequence_number), (0, 1));
        assert_eq!(&a.payload[..], &[0x01, 0xf4, b'a', b'b', b'c']);
        assert_eq!(&b.payload[..], &[0x01, 0xf5, b'd']);
        assert_eq!((a.header.timestamp, a.header.marker), (9_000, true));
        assert_eq!((plain.header.ssrc, plain.header.sequence_number), (20, 7));
        assert_eq!(&plain.payload[..], b"xy");
        // Unbound: no longer answered.
        f.unbind_local_stream(&info(10, Some((11, 97))));
        resender.resend(&mut vec![packet(10, 502, b"e")]);
        assert!(rtp_out(&mut f).is_empty());
    }

    #[test]
    fn nacks_and_keyframe_requests_reach_the_engine_and_are_counted() {
        let metrics = Metrics::new();
        let (mut f, _) = Feedback::new(&metrics);
        let nack = TransportLayerNack {
            sender_ssrc: 1,
            media_ssrc: 10,
            nacks: vec![NackPair {
                packet_id: 100,
                lost_packets: 0b101,
            }],
        };
        let rr = rtc::rtcp::receiver_report::ReceiverReport::default();
        let read = |packets: Vec<Box<dyn rtc::rtcp::Packet>>| TaggedPacket {
            now: Instant::now(),
            transport: Default::default(),
            message: Packet::Rtcp(packets).into(),
        };
        f.handle_read(read(vec![Box::new(rr.clone()), Box::new(nack.clone())]))
            .unwrap();
        f.handle_read(read(vec![Box::new(PictureLossIndication::default())]))
            .unwrap();
        f.handle_read(read(vec![Box::new(rr)])).unwrap();
        let delivered: Vec<bool> = std::iter::from_fn(|| f.poll_read())
            .map(|t| t.message.has(&Attribute::DeliverToApplication))
            .collect();
        assert_eq!(delivered, [true, true, false]);
        assert_eq!(metrics.nacks_received.get(), 3);
        f.handle_write(read(vec![Box::new(nack)])).unwrap();
        assert_eq!(metrics.nacks_sent.get(), 3);
    }
}
