//! Keyframe requests at the client: the interceptor that lets PLI and FIR
//! for our own tracks reach the application (rtc's default chain keeps
//! them), and the PLI we send for a track we receive.

use std::collections::VecDeque;
use std::time::Instant;

use rtc::interceptor::{Attribute, Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::sansio::Protocol;

/// Whether `packets` ask for a keyframe (PLI or FIR).
pub(crate) fn wants_keyframe(packets: &[Box<dyn rtc::rtcp::Packet>]) -> bool {
    packets.iter().any(|p| {
        let any = p.as_any();
        any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
    })
}

/// The media SSRCs that `packets` ask a keyframe of (a PLI's media SSRC,
/// each FIR entry's SSRC), in order, repeats included.
pub(crate) fn requested_ssrcs(packets: &[Box<dyn rtc::rtcp::Packet>]) -> Vec<u32> {
    let mut out = Vec::new();
    for p in packets {
        let any = p.as_any();
        if let Some(pli) = any.downcast_ref::<PictureLossIndication>() {
            out.push(pli.media_ssrc);
        } else if let Some(fir) = any.downcast_ref::<FullIntraRequest>() {
            out.extend(fir.fir.iter().map(|e| e.ssrc));
        }
    }
    out
}

/// A PLI for the stream `media_ssrc`.
pub(crate) fn pli(media_ssrc: u32) -> Vec<Box<dyn rtc::rtcp::Packet>> {
    vec![Box::new(PictureLossIndication {
        sender_ssrc: 0,
        media_ssrc,
    })]
}

/// Marks incoming RTCP that asks for a keyframe for delivery to the
/// application; everything else passes as it was.
#[derive(Default)]
pub(crate) struct DeliverKeyframeRequests {
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for DeliverKeyframeRequests {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            if wants_keyframe(packets) {
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
