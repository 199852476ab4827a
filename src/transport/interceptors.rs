//! The interceptor chain of every server connection: rtc's defaults (NACK
//! both ways, TWCC receiver, RTCP reports, simulcast header extensions) and
//! two of ours, which hand subscribers' keyframe requests to the engine and
//! count NACKs.

use std::time::Instant;

use rtc::interceptor::{Attribute, Interceptor, Packet, Registry, Slot, StreamInfo, TaggedPacket};
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use rtc::sansio::Protocol;

use crate::metrics::Metrics;

/// Our interceptors and rtc's defaults, in their slots: keyframe requests
/// are picked out application-most (after everything else has read them);
/// NACKs are counted wire-most, where those the NACK generator (7_000)
/// writes pass too.
///
/// Also send-side congestion control: transport-wide sequence numbers on
/// what the server sends, and the subscriber's TWCC feedback into
/// [`super::bwe::Bwe`], whose estimate the returned handle reads. No pacer:
/// the allocator keeps what is forwarded under the estimate, and a pacer
/// would queue (and delay) every packet to smooth what is already smooth.
pub(super) fn registry(
    metrics: &Metrics,
    media_engine: &mut MediaEngine,
) -> Result<(Registry, (super::bwe::Estimate, super::probe::ProbeHandle)), rtc::shared::error::Error>
{
    let (bwe, estimate) = super::bwe::Bwe::new();
    let (injector, probe) = super::probe::ProbeInjector::new();
    let registry = Registry::new()
        .with(Slot::from(super::probe::SLOT), injector)
        .with(Slot::from(14_000), DeliverKeyframeRequests::default())
        .with(Slot::from(100), CountNacks::new(metrics))
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
        (estimate, probe),
    ))
}

/// A lost packet is NACKed at most this many times (one per 100 ms
/// generator cycle): after that the retransmission is too late to be
/// worth asking for again, and a packet that never comes back (its
/// publisher does not keep history) does not cost a NACK every cycle for
/// as long as it stays in the receive log.
const MAX_NACKS_PER_PACKET: u16 = 4;
/// Packets of each outgoing video stream kept to answer NACKs (a power of
/// two, as rtc's send buffer needs). A NACK is worth answering for about a
/// second (a retransmission later than that reaches a decoder that has
/// already asked for a keyframe): 256 packets is ~0.9 s of 720p video at
/// 2.5 Mbit/s and ~4.5 s at 500 kbit/s. rtc's default, 1024, kept ~18 s
/// of a 500 kbit/s stream for every subscriber. The payload bytes are
/// shared with the publisher's packet; each slot holds the subscriber's
/// own header.
const NACK_HISTORY: u16 = 256;

/// rtc's default chain (NACK both ways, TWCC receiver, RTCP reports,
/// simulcast header extensions), with the NACK generator bounded.
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
    let registry = registry
        .with(
            Slot::NackResponder,
            rtc::interceptor::NackResponderBuilder::new()
                .with_size(NACK_HISTORY)
                .build(),
        )
        .with(
            Slot::NackGenerator,
            rtc::interceptor::NackGeneratorBuilder::new()
                .with_max_nacks_per_packet(MAX_NACKS_PER_PACKET)
                .build(),
        );
    configure_simulcast_extension_headers(media_engine)?;
    let registry = configure_twcc_receiver_only(registry, media_engine)?;
    Ok(configure_rtcp_reports(registry))
}

/// Lets subscribers' keyframe requests (PLI, FIR) reach the application;
/// the rest of RTCP stays with the interceptors that act on it.
#[derive(Default)]
struct DeliverKeyframeRequests {
    read: std::collections::VecDeque<TaggedPacket>,
    write: std::collections::VecDeque<TaggedPacket>,
}

/// Counts the NACKed packets that cross the wire, in either direction.
struct CountNacks {
    read: std::collections::VecDeque<TaggedPacket>,
    write: std::collections::VecDeque<TaggedPacket>,
    nacks_in: prometheus::IntCounter,
    nacks_out: prometheus::IntCounter,
}

impl CountNacks {
    fn new(metrics: &Metrics) -> Self {
        CountNacks {
            read: Default::default(),
            write: Default::default(),
            nacks_in: metrics.nacks_received.clone(),
            nacks_out: metrics.nacks_sent.clone(),
        }
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

impl Protocol<TaggedPacket, TaggedPacket, ()> for DeliverKeyframeRequests {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            let wanted = packets.iter().any(|p| {
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
        self.write.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write.pop_front()
    }

    fn handle_timeout(&mut self, _now: Instant) -> Result<(), Self::Error> {
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        None
    }
}

impl Interceptor for DeliverKeyframeRequests {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for CountNacks {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            self.nacks_in.inc_by(nacked_packets(packets));
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
        self.write.pop_front()
    }

    fn handle_timeout(&mut self, _now: Instant) -> Result<(), Self::Error> {
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        None
    }
}

impl Interceptor for CountNacks {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}
