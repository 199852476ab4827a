//! Light receive, for load generation ([`crate::JoinOptions::light`]): the
//! server connection's socket is read with `recvmmsg` (up to [`BATCH`]
//! datagrams per system call), and once the connection is up every SRTP
//! datagram (RFC 7983 / RFC 5761: first byte 128..=191, second byte
//! outside 192..=223) is counted from its cleartext header instead of
//! being handed to rtc: no decryption, no jitter buffer, no events. STUN,
//! DTLS and SRTCP still go to rtc, so ICE consent, DTLS and the publishing
//! side (NACKs, keyframe requests, congestion feedback from the server)
//! keep working.
//!
//! What is counted: distinct `(SSRC, sequence number)` packets that arrive
//! inside the window set with [`LightRtp::set_window`], per SSRC in a
//! bitmap over extended sequence numbers (the last [`SEQ_WINDOW`] of them):
//! a duplicate is recognised, a packet further behind than that is counted
//! `stale` and not as received. Packets with an RTX payload type (from the
//! server's SDP: retransmissions and bandwidth-probe padding) are counted
//! apart, not as received. Nothing is allocated per packet: the bitmaps
//! come with a new SSRC (at most [`MAX_SSRCS`]), the buffers once.
//!
//! The counts live in atomics the caller reads with [`LightRtp::counts`];
//! the client task adds to them once per wake-up of its socket.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use nix::sys::socket::{recvmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};

/// Datagrams per `recvmmsg` at most.
pub const BATCH: usize = 32;
/// `recvmmsg` calls per wake-up at most (then the client's loop runs once:
/// timers, what rtc has to send, signaling).
pub const CALLS: usize = 8;
/// Receive buffer per datagram (as the client's own).
const DATAGRAM: usize = 2048;
/// Sequence numbers remembered per SSRC behind the highest one.
pub const SEQ_WINDOW: u64 = 4096;
const WORDS: usize = (SEQ_WINDOW / 64) as usize;
/// SSRCs tracked per connection; packets on more are counted `untracked`.
pub const MAX_SSRCS: usize = 256;

/// What a light receiver counted (a snapshot of [`LightRtp`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LightCounts {
    /// Distinct `(SSRC, seq)` media packets that arrived inside the window.
    pub window_distinct: u64,
    /// Their datagram bytes (SRTP header, payload and tag).
    pub window_bytes: u64,
    /// In-window arrivals of a packet already counted.
    pub window_duplicates: u64,
    /// SSRCs with at least one distinct packet inside the window.
    pub window_ssrcs: u64,
    /// Every SRTP datagram taken off rtc's path (any time, any SSRC).
    pub rtp_datagrams: u64,
    /// Packets too far behind their SSRC's highest sequence number to tell.
    pub stale: u64,
    /// Packets with an RTX payload type (retransmissions, probe padding).
    pub rtx: u64,
    /// Packets on SSRCs past [`MAX_SSRCS`].
    pub untracked: u64,
    /// RTP-looking datagrams shorter than an RTP header.
    pub malformed: u64,
    /// `recvmmsg` calls that returned datagrams, and the datagrams they
    /// returned (all kinds): the mean batch.
    pub recv_calls: u64,
    pub recv_datagrams: u64,
}

/// Shared handle of one light receiver: the window in, the counts out.
#[derive(Clone)]
pub struct LightRtp(Arc<Shared>);

struct Shared {
    base: Instant,
    /// `[from, to)` in ns since `base`; empty (`from >= to`) until set.
    from_ns: AtomicU64,
    to_ns: AtomicU64,
    window_distinct: AtomicU64,
    window_bytes: AtomicU64,
    window_duplicates: AtomicU64,
    window_ssrcs: AtomicU64,
    rtp_datagrams: AtomicU64,
    stale: AtomicU64,
    rtx: AtomicU64,
    untracked: AtomicU64,
    malformed: AtomicU64,
    recv_calls: AtomicU64,
    recv_datagrams: AtomicU64,
}

impl std::fmt::Debug for LightRtp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LightRtp").field(&self.counts()).finish()
    }
}

impl Default for LightRtp {
    fn default() -> Self {
        LightRtp::new()
    }
}

impl LightRtp {
    /// A receiver with no window yet (nothing counted as received).
    pub fn new() -> LightRtp {
        LightRtp(Arc::new(Shared {
            base: Instant::now(),
            from_ns: AtomicU64::new(u64::MAX),
            to_ns: AtomicU64::new(0),
            window_distinct: AtomicU64::new(0),
            window_bytes: AtomicU64::new(0),
            window_duplicates: AtomicU64::new(0),
            window_ssrcs: AtomicU64::new(0),
            rtp_datagrams: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            rtx: AtomicU64::new(0),
            untracked: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            recv_calls: AtomicU64::new(0),
            recv_datagrams: AtomicU64::new(0),
        }))
    }

    /// Counts arrivals in `[from, to)` as received.
    pub fn set_window(&self, from: Instant, to: Instant) {
        self.0.from_ns.store(self.ns(from), Relaxed);
        self.0.to_ns.store(self.ns(to), Relaxed);
    }

    fn ns(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.0.base).as_nanos()).unwrap_or(u64::MAX)
    }

    fn in_window(&self, at: Instant) -> bool {
        let ns = self.ns(at);
        ns >= self.0.from_ns.load(Relaxed) && ns < self.0.to_ns.load(Relaxed)
    }

    /// What was counted so far.
    pub fn counts(&self) -> LightCounts {
        let s = &self.0;
        LightCounts {
            window_distinct: s.window_distinct.load(Relaxed),
            window_bytes: s.window_bytes.load(Relaxed),
            window_duplicates: s.window_duplicates.load(Relaxed),
            window_ssrcs: s.window_ssrcs.load(Relaxed),
            rtp_datagrams: s.rtp_datagrams.load(Relaxed),
            stale: s.stale.load(Relaxed),
            rtx: s.rtx.load(Relaxed),
            untracked: s.untracked.load(Relaxed),
            malformed: s.malformed.load(Relaxed),
            recv_calls: s.recv_calls.load(Relaxed),
            recv_datagrams: s.recv_datagrams.load(Relaxed),
        }
    }

    fn add(&self, d: &LightCounts) {
        let s = &self.0;
        for (a, v) in [
            (&s.window_distinct, d.window_distinct),
            (&s.window_bytes, d.window_bytes),
            (&s.window_duplicates, d.window_duplicates),
            (&s.window_ssrcs, d.window_ssrcs),
            (&s.rtp_datagrams, d.rtp_datagrams),
            (&s.stale, d.stale),
            (&s.rtx, d.rtx),
            (&s.untracked, d.untracked),
            (&s.malformed, d.malformed),
            (&s.recv_calls, d.recv_calls),
            (&s.recv_datagrams, d.recv_datagrams),
        ] {
            if v > 0 {
                a.fetch_add(v, Relaxed);
            }
        }
    }
}

/// How a sequence number compares with what an SSRC had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Fresh,
    Duplicate,
    Stale,
}

/// The sequence numbers seen on one SSRC: a bitmap over the last
/// [`SEQ_WINDOW`] extended sequence numbers up to the highest.
struct SeqSet {
    ssrc: u32,
    /// Extended (wrap-counted) highest sequence number; starts at 2^32 so
    /// a packet just before the first one does not underflow.
    highest: u64,
    bits: [u64; WORDS],
    /// Counted a packet inside the window.
    in_window: bool,
}

impl SeqSet {
    fn new(ssrc: u32, seq: u16) -> SeqSet {
        let mut s = SeqSet {
            ssrc,
            highest: (1u64 << 32) + u64::from(seq),
            bits: [0; WORDS],
            in_window: false,
        };
        s.set(s.highest);
        s
    }

    fn slot(ext: u64) -> (usize, u64) {
        let i = ext % SEQ_WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    fn set(&mut self, ext: u64) {
        let (w, b) = Self::slot(ext);
        self.bits[w] |= b;
    }

    fn clear(&mut self, ext: u64) {
        let (w, b) = Self::slot(ext);
        self.bits[w] &= !b;
    }

    fn test(&self, ext: u64) -> bool {
        let (w, b) = Self::slot(ext);
        self.bits[w] & b != 0
    }

    fn insert(&mut self, seq: u16) -> Seen {
        // The nearest extension of `seq` to the highest (RFC 3550 A.1 style).
        let delta = i64::from(seq.wrapping_sub(self.highest as u16) as i16);
        if delta > 0 {
            let ext = self.highest + delta.unsigned_abs();
            if delta.unsigned_abs() >= SEQ_WINDOW {
                self.bits = [0; WORDS];
            } else {
                // The slots between fall out of the window: at most
                // SEQ_WINDOW - 1 of them, one per packet in order.
                for e in (self.highest + 1)..ext {
                    self.clear(e);
                }
            }
            self.highest = ext;
            self.set(ext);
            return Seen::Fresh;
        }
        let behind = delta.unsigned_abs();
        if behind >= SEQ_WINDOW {
            return Seen::Stale;
        }
        let ext = self.highest - behind;
        if self.test(ext) {
            Seen::Duplicate
        } else {
            self.set(ext);
            Seen::Fresh
        }
    }
}

/// The distinct-packet counter of one connection (owned by its task).
pub(crate) struct Counter {
    ssrcs: Vec<SeqSet>,
    /// Index of the last SSRC hit (packets come in runs).
    last: usize,
    rtx_pt: [bool; 128],
}

impl Counter {
    pub(crate) fn new() -> Counter {
        Counter {
            ssrcs: Vec::with_capacity(16),
            last: 0,
            rtx_pt: [false; 128],
        }
    }

    /// Learns the RTX payload types (`a=rtpmap:<pt> rtx/...`) of `sdp`.
    pub(crate) fn learn_rtx(&mut self, sdp: &str) {
        self.rtx_pt = rtx_payload_types(sdp);
    }

    /// Counts one SRTP datagram that arrived at a time `in_window` says
    /// about, into `d`.
    fn count(&mut self, datagram: &[u8], in_window: bool, d: &mut LightCounts) {
        d.rtp_datagrams += 1;
        let (Some(&b1), Some(seq), Some(ssrc)) =
            (datagram.get(1), datagram.get(2..4), datagram.get(8..12))
        else {
            d.malformed += 1;
            return;
        };
        if self.rtx_pt[usize::from(b1 & 0x7f)] {
            d.rtx += 1;
            return;
        }
        let seq = u16::from_be_bytes([seq[0], seq[1]]);
        let ssrc = u32::from_be_bytes([ssrc[0], ssrc[1], ssrc[2], ssrc[3]]);
        let idx = match self.ssrcs.get(self.last) {
            Some(s) if s.ssrc == ssrc => Some(self.last),
            _ => self.ssrcs.iter().position(|s| s.ssrc == ssrc),
        };
        let (idx, seen) = match idx {
            Some(i) => (i, self.ssrcs[i].insert(seq)),
            None if self.ssrcs.len() < MAX_SSRCS => {
                self.ssrcs.push(SeqSet::new(ssrc, seq));
                (self.ssrcs.len() - 1, Seen::Fresh)
            }
            None => {
                d.untracked += 1;
                return;
            }
        };
        self.last = idx;
        match (seen, in_window) {
            (Seen::Fresh, true) => {
                d.window_distinct += 1;
                d.window_bytes += datagram.len() as u64;
                let s = &mut self.ssrcs[idx];
                if !s.in_window {
                    s.in_window = true;
                    d.window_ssrcs += 1;
                }
            }
            (Seen::Duplicate, true) => d.window_duplicates += 1,
            (Seen::Stale, _) => d.stale += 1,
            _ => {}
        }
    }
}

/// The RTX payload types of an SDP, as a lookup table.
pub(crate) fn rtx_payload_types(sdp: &str) -> [bool; 128] {
    let mut pts = [false; 128];
    for line in sdp.lines() {
        let Some(rest) = line.strip_prefix("a=rtpmap:") else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let (Some(pt), Some(codec)) = (f.next(), f.next()) else {
            continue;
        };
        if codec.to_ascii_lowercase().starts_with("rtx/") {
            if let Some(slot) = pt.parse::<usize>().ok().and_then(|p| pts.get_mut(p)) {
                *slot = true;
            }
        }
    }
    pts
}

/// Receive buffers for one `recvmmsg`, allocated once per client. nix's
/// message headers hold raw pointers (not `Send`, and the client task
/// moves between threads), so they are made per call: one allocation per
/// call, not per datagram.
pub(crate) struct RecvBatch {
    bufs: Vec<[u8; DATAGRAM]>,
    /// Length and sender of each datagram of the last call.
    got: Vec<(usize, SocketAddr)>,
}

impl RecvBatch {
    pub(crate) fn new() -> RecvBatch {
        RecvBatch {
            bufs: vec![[0u8; DATAGRAM]; BATCH],
            got: Vec::with_capacity(BATCH),
        }
    }

    /// Reads what is waiting, up to [`BATCH`] datagrams, without blocking
    /// (`WouldBlock` when there is nothing).
    pub(crate) fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.got.clear();
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
        // One small vector of slices per call (not per datagram): the
        // slices borrow the buffers, so they cannot be kept between calls.
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> = self
            .bufs
            .iter_mut()
            .map(|b| [IoSliceMut::new(&mut b[..])])
            .collect();
        let results = recvmmsg(fd, &mut headers, &mut iovs, MsgFlags::MSG_DONTWAIT, None)
            .map_err(io::Error::from)?;
        for msg in results {
            let Some(from) = msg.address.as_ref().and_then(to_socket_addr) else {
                continue;
            };
            self.got.push((msg.bytes.min(DATAGRAM), from));
        }
        Ok(self.got.len())
    }

    /// Datagram `i` of the last call.
    pub(crate) fn datagram(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
        let (len, from) = *self.got.get(i)?;
        let buf = self.bufs.get(i)?;
        Some((&buf[..len.min(buf.len())], from))
    }
}

fn to_socket_addr(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    s.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// A client's light receiver: the shared handle, its counter and buffers,
/// and whether the connection is up (before that everything goes to rtc).
pub(crate) struct Light {
    pub(crate) handle: LightRtp,
    pub(crate) counter: Counter,
    pub(crate) batch: RecvBatch,
    pub(crate) up: bool,
}

impl Light {
    pub(crate) fn new(handle: LightRtp) -> Light {
        Light {
            handle,
            counter: Counter::new(),
            batch: RecvBatch::new(),
            up: false,
        }
    }

    /// Counts the SRTP datagram `i` of the last batch when the connection
    /// is up; `false` when it should go to rtc instead.
    pub(crate) fn take(&mut self, i: usize, in_window: bool, d: &mut LightCounts) -> bool {
        if !self.up {
            return false;
        }
        let Some((data, _)) = self.batch.datagram(i) else {
            return false;
        };
        if !crate::is_rtp(data) {
            return false;
        }
        self.counter.count(data, in_window, d);
        true
    }

    /// Whether `at` is inside the window.
    pub(crate) fn in_window(&self, at: Instant) -> bool {
        self.handle.in_window(at)
    }

    /// Adds one batch's counts to the shared handle.
    pub(crate) fn publish(&self, d: &LightCounts) {
        self.handle.add(d);
    }
}

/// The client task's side of light receive.
impl crate::Task {
    /// Light receive: what is waiting, in up to [`CALLS`]
    /// `recvmmsg` calls (until one finds nothing, which also clears the
    /// socket's readiness); SRTP is counted once connected, the rest goes
    /// to the connection as usual.
    pub(crate) fn on_light_readable(&mut self, local: Option<SocketAddr>) {
        use std::os::fd::AsRawFd;
        let Some(mut light) = self.light.take() else {
            return;
        };
        let fd = self.socket.as_raw_fd();
        let mut d = LightCounts::default();
        for _ in 0..CALLS {
            let read = self
                .socket
                .try_io(tokio::io::Interest::READABLE, || light.batch.recv(fd));
            let Ok(n) = read else {
                break;
            };
            if n == 0 {
                break;
            }
            let now = Instant::now();
            let in_window = light.in_window(now);
            d.recv_calls += 1;
            d.recv_datagrams += n as u64;
            for i in 0..n {
                if self.frozen || light.take(i, in_window, &mut d) {
                    continue;
                }
                let Some((data, from)) = light.batch.datagram(i) else {
                    continue;
                };
                if !self.keep_incoming(data) {
                    continue;
                }
                if let (Some(pc), Some(local)) = (self.pc.as_mut(), local) {
                    let _ = pc.handle_read(TaggedBytesMut {
                        now,
                        transport: TransportContext {
                            local_addr: local,
                            peer_addr: from,
                            ecn: None,
                            transport_protocol: TransportProtocol::UDP,
                        },
                        message: BytesMut::from(data),
                    });
                }
            }
        }
        light.publish(&d);
        self.light = Some(light);
    }

    /// Light receive: the RTX payload types of the server's description,
    /// whose packets are not counted as received.
    pub(crate) fn light_learn_rtx(&mut self) {
        let (Some(light), Some(pc)) = (self.light.as_mut(), self.pc.as_ref()) else {
            return;
        };
        if let Some(d) = pc.remote_description() {
            light.counter.learn_rtx(&d.sdp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtp(pt: u8, seq: u16, ssrc: u32) -> Vec<u8> {
        let mut v = vec![0x80, pt];
        v.extend_from_slice(&seq.to_be_bytes());
        v.extend_from_slice(&[0; 4]);
        v.extend_from_slice(&ssrc.to_be_bytes());
        v.extend_from_slice(&[0xaa; 20]);
        v
    }

    #[test]
    fn distinct_packets_across_a_wrap_with_duplicates_and_reordering() {
        let mut c = Counter::new();
        c.learn_rtx("v=0\r\na=rtpmap:96 VP8/90000\r\na=rtpmap:97 rtx/90000\r\n");
        let mut d = LightCounts::default();
        for seq in [65533u16, 65535, 65534, 0, 1, 1, 65535, 3, 2] {
            c.count(&rtp(96, seq, 7), true, &mut d);
        }
        c.count(&rtp(111, 5, 8), false, &mut d); // outside the window
        c.count(&rtp(111, 5, 8), true, &mut d); // seen already: duplicate
        c.count(&rtp(97, 9, 9), true, &mut d); // RTX
        c.count(&[0x80, 96, 0], true, &mut d); // too short
        assert_eq!(d.window_distinct, 7);
        assert_eq!(d.window_duplicates, 3);
        assert_eq!(d.window_ssrcs, 1);
        assert_eq!((d.rtx, d.malformed, d.rtp_datagrams), (1, 1, 13));
    }

    #[test]
    fn far_behind_is_stale_and_a_jump_forgets_the_past() {
        let mut s = SeqSet::new(1, 100);
        assert_eq!(s.insert(100), Seen::Duplicate);
        // Forward by more than the window, then the old number again.
        let far = 100u16.wrapping_add(SEQ_WINDOW as u16 + 5);
        assert_eq!(s.insert(far), Seen::Fresh);
        assert_eq!(s.insert(100), Seen::Stale);
        assert_eq!(s.insert(far.wrapping_sub(1)), Seen::Fresh);
        assert_eq!(s.insert(far.wrapping_sub(1)), Seen::Duplicate);
        // Every number once, in order, over several wraps: all fresh.
        let mut s = SeqSet::new(2, 0);
        let mut fresh = 1u64;
        for i in 1..200_000u32 {
            fresh += u64::from(s.insert(i as u16) == Seen::Fresh);
        }
        assert_eq!(fresh, 200_000);
    }

    #[test]
    fn rtx_types_from_sdp() {
        let pts = rtx_payload_types(
            "a=rtpmap:96 VP8/90000\na=rtpmap:97 rtx/90000\na=rtpmap:200 rtx/90000\na=rtpmap:x rtx/1\n",
        );
        assert!(pts[97] && !pts[96]);
        assert_eq!(pts.iter().filter(|p| **p).count(), 1);
    }

    #[test]
    fn a_batch_reads_what_is_waiting() {
        use std::os::fd::AsRawFd;
        let a = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        b.set_nonblocking(true).expect("nonblocking");
        let to = b.local_addr().expect("addr");
        for i in 0..(BATCH + 3) {
            a.send_to(&rtp(96, i as u16, 1), to).expect("send");
        }
        let mut batch = RecvBatch::new();
        let mut got = 0;
        // Bounded: loopback delivers at once; a few calls drain it.
        for _ in 0..100 {
            match batch.recv(b.as_raw_fd()) {
                Ok(n) => {
                    got += n;
                    let (data, from) = batch.datagram(0).expect("first");
                    assert_eq!(data.len(), 32);
                    assert_eq!(from, a.local_addr().expect("addr"));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if got == BATCH + 3 {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, BATCH + 3);
    }
}
