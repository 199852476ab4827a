//! The engine-independent media core of the SFU: packets and `now` in,
//! decisions out.
//!
//! Nothing here owns a socket, spawns a task, takes a lock or logs, and
//! nothing here knows webrtc-rs: the transport layer ([`crate::transport`])
//! reads datagrams, lets the WebRTC engine decrypt them, and then asks the
//! router ([`crate::router`]), which is built from these pieces, what to
//! do. On the per-packet path nothing allocates: buffers are
//! allocated when a track or connection is set up and reused.
//!
//! # Parts
//!
//! - [`demux`]: which connection an inbound datagram on the shared UDP port
//!   belongs to. Classifies it (RFC 7983), routes STUN by the ICE ufrag in
//!   its USERNAME and remembers the sender's address; everything else goes
//!   by remote address.
//! - [`rtp`]: a zero-copy RTP header view and in-place header writers.
//! - [`seqno`]: widening 16-bit sequence numbers (and 32-bit timestamps) to
//!   64 bits, so wrap-around is handled in one place.
//! - [`rewrite`]: per (subscriber, forwarded track), maps the publisher's
//!   SSRC / sequence number / timestamp onto one continuous outgoing stream,
//!   across SSRC changes and source switches.
//! - [`keyframe`]: throttles keyframe requests (PLI) towards a publisher.
//! - [`offer`]: caps on a client's SDP offer (sections, candidates,
//!   sending tracks) checked on its text before the engine parses it.
//! - [`vp8`]: VP8 descriptor rewriting (picture id, TL0PICIDX, KEYIDX) so a
//!   downtrack whose source changes is one continuous stream.
//! - [`speaker`]: which publisher's video a listener that receives one video
//!   track (a classic client) sees, and when the switch happens.
//! - [`codec`]: codec names and clock rates, keyframe detection for VP8,
//!   VP9 and H.264 payloads.
//!
//! # How a transport drives it
//!
//! ```text
//! datagram ──▶ Demux::route ──▶ connection (engine decrypts RTP)
//!   RTP from a publisher:
//!     codec::is_keyframe   ─▶ KeyframeRequester::keyframe_received
//!     per subscriber: SeqRewriter::rewrite ─▶ Forward{seq, ts} | Drop(reason)
//!   PLI/FIR from a subscriber, new subscriber:
//!     KeyframeRequester::request(now) ─▶ send a PLI upstream now?
//! timer: KeyframeRequester::poll; sleep until the earliest next_timeout()
//! ```
//!
//! NACKs: rtc's generator asks publishers for lost packets (bounded,
//! `transport::interceptors`); subscribers' NACKs are answered from one
//! [`history`] per published stream, shared by all its subscribers.

use std::fmt;

pub mod codec;
pub mod demux;
pub mod follow;
pub mod history;
pub mod keyframe;
pub mod offer;
pub mod removed;
pub mod rewrite;
pub mod rtp;
pub mod seqno;
pub mod speaker;
pub mod vp8;

pub use codec::{Codec, CodecError};
pub use demux::{Demux, DropReason, PacketKind, Route, StunError};
pub use keyframe::{KeyframeRequester, KeyframeStats};
pub use rewrite::{Rewrite, RewriteDrop, SeqRewriter};
pub use rtp::{RtpError, RtpHeader};
pub use seqno::{SeqUnwrapper, TsUnwrapper};

/// Declares a `Copy` newtype id over an integer, with conversions both ways
/// and `Display` of the bare number.
macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident($inner:ty)) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub $inner);

        impl From<$inner> for $name {
            fn from(v: $inner) -> Self {
                $name(v)
            }
        }

        impl From<$name> for $inner {
            fn from(v: $name) -> Self {
                v.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

id_type!(
    /// RTP synchronization source identifier.
    Ssrc(u32)
);
id_type!(
    /// RTP payload type (7 bits on the wire).
    PayloadType(u8)
);
id_type!(
    /// An extended RTP sequence number: the 16-bit wire value plus a
    /// roll-over count in the upper bits (see [`seqno`]). Ordering and
    /// differences are meaningful across wrap-around.
    SeqNo(u64)
);
id_type!(
    /// A track as the media core knows it (the transport assigns them).
    TrackId(u32)
);

impl SeqNo {
    /// The 16-bit value carried in the RTP header.
    pub fn wire(self) -> u16 {
        // Truncation is the point: the low 16 bits are the wire value.
        self.0 as u16
    }

    /// How many times the 16-bit value has wrapped (relative to the
    /// unwrapper's starting point).
    pub fn roll_over_count(self) -> u64 {
        self.0 >> 16
    }

    /// The next sequence number.
    pub fn next(self) -> SeqNo {
        SeqNo(self.0.wrapping_add(1))
    }

    /// `self - earlier` if `earlier <= self`.
    pub fn since(self, earlier: SeqNo) -> Option<u64> {
        self.0.checked_sub(earlier.0)
    }
}

/// A tiny deterministic PRNG (xorshift64*) for property-style tests.
#[cfg(test)]
pub(crate) struct XorShift(u64);

#[cfg(test)]
impl XorShift {
    pub(crate) fn new(seed: u64) -> Self {
        XorShift(seed.max(1))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqno_helpers() {
        let s = SeqNo((3 << 16) | 0xfffe);
        assert_eq!(s.wire(), 0xfffe);
        assert_eq!(s.roll_over_count(), 3);
        assert_eq!(s.next().next().wire(), 0);
        assert_eq!(s.next().next().roll_over_count(), 4);
        assert_eq!(s.next().since(s), Some(1));
        assert_eq!(s.since(s.next()), None);
        assert!(s < s.next());
    }

    #[test]
    fn ids_convert_and_display() {
        let ssrc: Ssrc = 0xdead_beef.into();
        assert_eq!(u32::from(ssrc), 0xdead_beef);
        assert_eq!(ssrc.to_string(), "3735928559");
        assert_eq!(PayloadType(96).to_string(), "96");
        assert_eq!(TrackId::from(7).0, 7);
    }

    /// The call shapes the router and transport use (owned strings, `Bytes`
    /// payloads, raw header integers), so the two stay in step.
    #[test]
    fn transport_call_shapes() {
        use std::net::SocketAddr;
        use std::time::{Duration, Instant};

        fn label(reason: &'static str) -> &'static str {
            reason
        }

        let now = Instant::now();
        let ufrag = String::from("abcd");
        let mut demux: Demux<u64> = Demux::new();
        demux.register(&ufrag, &ufrag, 7);
        let from: SocketAddr = ([127, 0, 0, 1], 9).into();
        match demux.route(&[0x80; 12], from) {
            Route::To(key) => panic!("routed to {key}"),
            Route::Drop(reason) => assert_eq!(label(reason.as_str()), "unknown-address"),
        }
        demux.unregister(7);

        let mut keyframes = KeyframeRequester::new(Duration::from_millis(500));
        assert!(keyframes.request(now));
        assert!(!keyframes.poll(now));
        keyframes.keyframe_received(now);

        let mime = String::from("video/VP8");
        let payload = bytes::Bytes::from_static(&[0x10, 0x50]);
        assert!(codec::is_keyframe(&mime, &payload));

        let mut rewriter = SeqRewriter::new(90_000);
        let (ssrc, seq, ts): (u32, u16, u32) = (1, 2, 3);
        let (seq, ts): (u16, u32) = match rewriter.rewrite(ssrc, seq, ts, now) {
            Rewrite::Forward { seq, ts } => (seq, ts),
            Rewrite::Drop(reason) => panic!("{}", label(reason.as_str())),
        };
        assert_eq!((seq, ts), (2, 3));
    }

    #[test]
    fn xorshift_is_deterministic_and_spreads() {
        let mut a = XorShift::new(42);
        let mut b = XorShift::new(42);
        let mut seen = [false; 16];
        for _ in 0..1000 {
            let x = a.next_u64();
            assert_eq!(x, b.next_u64());
            seen[(x % 16) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }
}
