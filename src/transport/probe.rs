//! The driver's side of bandwidth probing (the policy is
//! `router::probe`): padding sent as retransmissions of the subscriber's
//! most recent video packets, on its RTX stream.
//!
//! rtc's NACK responder keeps each outgoing stream's recent packets and
//! its RTX sequence numbers; a second sender on the same RTX SSRC would
//! reuse those numbers and the browser's SRTP would drop the copies as
//! replays. So the padding goes through the responder itself: the
//! [`ProbeInjector`], wire-ward of it in the chain, hands it a NACK for
//! the packets to repeat, as if the subscriber had sent one. The copies
//! then go down the chain like any retransmission: numbered for TWCC,
//! recorded by the estimator, encrypted. The NACK itself goes no further
//! than the application, which ignores NACKs; the NACK counters sit
//! wire-ward of the injector and never see it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rtc::interceptor::{Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::rtcp::transport_feedbacks::transport_layer_nack::{NackPair, TransportLayerNack};
use rtc::sansio::Protocol;
use rtc::shared::TransportContext;

/// Where the injector sits: wire-ward of the NACK responder (4_000), and
/// application-ward of the NACK counters (100) and the congestion
/// controller (1_000).
pub(super) const SLOT: usize = 3_500;

/// At most this many packets repeated per request (four NACK pairs).
pub(super) const MAX_REPEAT: u16 = 64;

#[derive(Debug, Default)]
struct Shared {
    pending: AtomicBool,
    /// (media SSRC, last sequence number sent, how many to repeat).
    request: Mutex<Option<(u32, u16, u16)>>,
}

/// The engine's handle: asks for the last `count` packets of a stream
/// to be sent again.
#[derive(Debug, Clone, Default)]
pub(super) struct ProbeHandle(Arc<Shared>);

impl ProbeHandle {
    /// Repeat the `count` packets up to `last` of `ssrc` (at most
    /// [`MAX_REPEAT`]); taken at the connection's next read poll.
    pub(super) fn repeat(&self, ssrc: u32, last: u16, count: u16) {
        if count == 0 {
            return;
        }
        if let Ok(mut r) = self.0.request.lock() {
            *r = Some((ssrc, last, count.min(MAX_REPEAT)));
            self.0.pending.store(true, Ordering::Release);
        }
    }
}

/// The interceptor (one per connection).
pub(super) struct ProbeInjector {
    shared: Arc<Shared>,
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
    /// The transport of the last packet read: the injected NACK's.
    transport: Option<TransportContext>,
}

impl ProbeInjector {
    pub(super) fn new() -> (ProbeInjector, ProbeHandle) {
        let handle = ProbeHandle::default();
        let injector = ProbeInjector {
            shared: handle.0.clone(),
            read: VecDeque::new(),
            write: VecDeque::new(),
            transport: None,
        };
        (injector, handle)
    }

    fn take_request(&mut self) -> Option<TaggedPacket> {
        // A plain load per poll (no write to the shared line); the swap and
        // the lock only when asked.
        if !self.shared.pending.load(Ordering::Relaxed)
            || !self.shared.pending.swap(false, Ordering::Acquire)
        {
            return None;
        }
        let (ssrc, last, count) = self.shared.request.lock().ok()?.take()?;
        let transport = self.transport?;
        Some(TaggedPacket {
            now: Instant::now(),
            transport,
            message: Packet::Rtcp(vec![Box::new(nack(ssrc, last, count))]).into(),
        })
    }
}

/// A NACK naming the `count` sequence numbers up to `last`.
fn nack(ssrc: u32, last: u16, count: u16) -> TransportLayerNack {
    let first = last.wrapping_sub(count.saturating_sub(1));
    let mut nacks = Vec::with_capacity(usize::from(count.div_ceil(17)));
    let mut i = 0u16;
    while i < count {
        let packet_id = first.wrapping_add(i);
        let rest = (count - i - 1).min(16);
        let lost_packets = if rest == 0 {
            0
        } else {
            u16::MAX >> (16 - rest)
        };
        nacks.push(NackPair {
            packet_id,
            lost_packets,
        });
        i += 1 + rest;
    }
    TransportLayerNack {
        sender_ssrc: 0,
        media_ssrc: ssrc,
        nacks,
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for ProbeInjector {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.transport = Some(msg.transport);
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front().or_else(|| self.take_request())
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

impl Interceptor for ProbeInjector {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(n: &TransportLayerNack) -> Vec<u16> {
        n.nacks.iter().flat_map(|p| p.packet_list()).collect()
    }

    #[test]
    fn a_nack_names_exactly_the_last_packets() {
        assert_eq!(named(&nack(7, 100, 1)), [100]);
        assert_eq!(named(&nack(7, 100, 3)), [98, 99, 100]);
        let all: Vec<u16> = (37..=100).collect();
        let n = nack(7, 100, 64);
        assert_eq!((named(&n), n.nacks.len(), n.media_ssrc), (all, 4, 7));
        // Across the wrap.
        assert_eq!(named(&nack(7, 1, 4)), [65534, 65535, 0, 1]);
    }

    #[test]
    fn a_request_is_injected_once_after_a_read() {
        let (mut inj, handle) = ProbeInjector::new();
        handle.repeat(5, 10, 2);
        // Nothing read yet: no transport to name, nothing injected.
        assert!(inj.poll_read().is_none());
        handle.repeat(5, 10, 2);
        let transport = TransportContext::default();
        let msg = TaggedPacket {
            now: Instant::now(),
            transport,
            message: Packet::Rtcp(vec![]).into(),
        };
        inj.handle_read(msg).unwrap();
        assert!(inj.poll_read().is_some(), "the packet read passes");
        let injected = inj.poll_read().expect("the NACK");
        let Packet::Rtcp(packets) = &injected.message.packet else {
            panic!("not RTCP");
        };
        let n = packets[0]
            .as_any()
            .downcast_ref::<TransportLayerNack>()
            .expect("a NACK");
        assert_eq!(named(n), [9, 10]);
        assert!(inj.poll_read().is_none(), "once");
    }
}
