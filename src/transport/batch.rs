//! Batched datagram I/O on the media socket: `recvmmsg` drains up to
//! [`BATCH`] datagrams in one system call, `sendmmsg` writes up to
//! [`BATCH`] in one (nix's safe wrappers; the workspace forbids `unsafe`).
//! Buffers and message headers are allocated once per worker.
//!
//! Each received datagram carries the kernel's receive time
//! (`SO_TIMESTAMPNS`, see [`enable_timestamps`]): a datagram that waited in
//! the socket buffer while the worker was busy is stamped when it arrived,
//! not when it was read. Those times feed the TWCC feedback that the
//! publishers' congestion control reads, where a read-time stamp turns the
//! server's own scheduling delay into apparent network queuing.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, RawFd};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use nix::sys::socket::{
    getsockopt, recvmmsg, sendmmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags,
    MultiHeaders, SockaddrStorage,
};
use nix::sys::time::TimeSpec;

use super::MAX_DATAGRAM;

/// Datagrams per system call at most.
pub(super) const BATCH: usize = 64;

/// A kernel receive time older than this (against the clock read right
/// after the read) is not believed: the wall clock was stepped.
const MAX_STAMP_AGE: Duration = Duration::from_secs(1);

/// Asks the kernel to stamp every datagram `socket` receives with its
/// arrival time (`SO_TIMESTAMPNS`). Without it (an error here) datagrams
/// are stamped when read.
pub(super) fn enable_timestamps(socket: &impl AsFd) -> io::Result<()> {
    setsockopt(socket, sockopt::ReceiveTimestampns, &true).map_err(io::Error::from)
}

/// Asks the kernel to report with each datagram how many `socket` has
/// dropped since it was made, its receive buffer full (`SO_RXQ_OVFL`):
/// [`RecvBatch::take_overflow`].
pub(super) fn enable_overflow_count(socket: &impl AsFd) -> io::Result<()> {
    setsockopt(socket, sockopt::RxqOvfl, &1).map_err(io::Error::from)
}

/// The kernel buffers of one socket, in bytes, as it reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Buffers {
    pub receive: usize,
    pub send: usize,
}

/// Asks for `bytes` of receive and send buffer on `socket`: within the
/// system's limit (`net.core.rmem_max` / `wmem_max`), past it where the
/// process may (`CAP_NET_ADMIN`: `SO_RCVBUFFORCE`). Returns what the
/// kernel granted (it reports double what was set, its bookkeeping
/// included). A media socket read by a busy worker needs room for the
/// datagrams of the moments it is not read: the default 208 KiB is a
/// third of a second of two publishers' simulcast, and a loaded
/// machine's scheduler took longer (4.4 % of datagrams dropped in a
/// browser test, every viewer stalling at once).
pub(super) fn enlarge_buffers(socket: &impl AsFd, bytes: usize) -> io::Result<Buffers> {
    // Each call may fail alone (no privilege): what counts is the result.
    let _ = setsockopt(socket, sockopt::RcvBuf, &bytes);
    if getsockopt(socket, sockopt::RcvBuf).map_err(io::Error::from)? < bytes {
        let _ = setsockopt(socket, sockopt::RcvBufForce, &bytes);
    }
    let _ = setsockopt(socket, sockopt::SndBuf, &bytes);
    if getsockopt(socket, sockopt::SndBuf).map_err(io::Error::from)? < bytes {
        let _ = setsockopt(socket, sockopt::SndBufForce, &bytes);
    }
    Ok(Buffers {
        receive: getsockopt(socket, sockopt::RcvBuf).map_err(io::Error::from)?,
        send: getsockopt(socket, sockopt::SndBuf).map_err(io::Error::from)?,
    })
}

/// When a datagram arrived, on the monotonic clock: `read_at` (the
/// monotonic clock right after the read) less the datagram's age, which is
/// the wall clock then (`wall_now`, since the epoch) less the kernel's wall
/// clock `stamp`. Without a stamp, or with one from the future or older
/// than [`MAX_STAMP_AGE`] (the wall clock moved), `read_at`.
pub(super) fn arrival(read_at: Instant, wall_now: Duration, stamp: Option<Duration>) -> Instant {
    stamp
        .and_then(|s| wall_now.checked_sub(s))
        .filter(|age| *age <= MAX_STAMP_AGE)
        .and_then(|age| read_at.checked_sub(age))
        .unwrap_or(read_at)
}

/// One datagram of the last [`RecvBatch::recv`].
pub(super) struct Datagram<'a> {
    pub data: &'a [u8],
    pub from: SocketAddr,
    /// When it arrived ([`arrival`]).
    pub at: Instant,
}

/// Receive buffers for one `recvmmsg`.
pub(super) struct RecvBatch {
    headers: MultiHeaders<SockaddrStorage>,
    bufs: Vec<[u8; MAX_DATAGRAM + 1]>,
    /// Length, sender and arrival of each datagram of the last call.
    got: Vec<(usize, SocketAddr, Instant)>,
    /// The socket's drop counter (`SO_RXQ_OVFL`) as last reported, and as
    /// last taken.
    overflow: Option<u32>,
    overflow_taken: Option<u32>,
    /// A datagram's control messages did not fit (see [`RecvBatch::recv`]).
    truncated_cmsg: bool,
}

/// Control message room per datagram: its arrival stamp and the socket's
/// drop counter.
fn cmsg_room() -> Vec<u8> {
    nix::cmsg_space!(TimeSpec, u32)
}

impl RecvBatch {
    pub(super) fn new() -> RecvBatch {
        RecvBatch {
            headers: MultiHeaders::preallocate(BATCH, Some(cmsg_room())),
            bufs: vec![[0u8; MAX_DATAGRAM + 1]; BATCH],
            got: Vec::with_capacity(BATCH),
            overflow: None,
            overflow_taken: None,
            truncated_cmsg: false,
        }
    }

    /// Datagrams the kernel dropped (receive buffer full) since the last
    /// call, as the drop counter on the datagrams read since shows it (a
    /// datagram carries the count as it was when it was queued: drops show
    /// with the next datagram that gets in).
    pub(super) fn take_overflow(&mut self) -> u64 {
        let Some(now) = self.overflow else {
            return 0;
        };
        // The counter counts from the socket's creation: the first report
        // is all new. It wraps at 2^32.
        let new = now.wrapping_sub(self.overflow_taken.unwrap_or(0));
        self.overflow_taken = Some(now);
        u64::from(new)
    }

    /// Like [`RecvBatch::take_overflow`] for a batch that reads several
    /// sockets in turn: the drops reported by the last call against the
    /// counter of the socket it read, as last taken (`taken`).
    pub(super) fn take_overflow_of(&mut self, taken: &mut Option<u32>) -> u64 {
        let Some(now) = self.overflow.take() else {
            return 0;
        };
        let new = now.wrapping_sub(taken.unwrap_or(0));
        *taken = Some(now);
        u64::from(new)
    }

    /// Reads what is waiting, up to [`BATCH`] datagrams, without blocking
    /// (`WouldBlock` when there is nothing). A datagram longer than
    /// [`MAX_DATAGRAM`] shows as `MAX_DATAGRAM + 1` bytes.
    pub(super) fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.got.clear();
        // nix's `recvmmsg` leaves each header's control length as the
        // kernel set it, the size of what the last datagram in that slot
        // carried: a slot whose datagram had a stamp only is too small for
        // a stamp and a drop count. Once a datagram's control messages did
        // not fit, the headers are made again, full size (rare: the drop
        // count, once there, comes on every datagram after).
        if std::mem::take(&mut self.truncated_cmsg) {
            self.headers = MultiHeaders::preallocate(BATCH, Some(cmsg_room()));
        }
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> = self
            .bufs
            .iter_mut()
            .map(|b| [IoSliceMut::new(&mut b[..])])
            .collect();
        let results = recvmmsg(
            fd,
            &mut self.headers,
            &mut iovs,
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(io::Error::from)?;
        let read_at = Instant::now();
        let wall_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        for msg in results {
            let Some(from) = msg.address.as_ref().and_then(to_socket_addr) else {
                continue;
            };
            let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
            let len = if truncated {
                MAX_DATAGRAM + 1
            } else {
                msg.bytes
            };
            let mut stamp = None;
            self.truncated_cmsg |= msg.flags.contains(MsgFlags::MSG_CTRUNC);
            if let Ok(cmsgs) = msg.cmsgs() {
                for m in cmsgs {
                    match m {
                        ControlMessageOwned::ScmTimestampns(ts) => stamp = Some(Duration::from(ts)),
                        ControlMessageOwned::RxqOvfl(n) => self.overflow = Some(n),
                        _ => {}
                    }
                }
            }
            self.got
                .push((len, from, arrival(read_at, wall_now, stamp)));
        }
        Ok(self.got.len())
    }

    /// Datagram `i` of the last call.
    pub(super) fn datagram(&self, i: usize) -> Option<Datagram<'_>> {
        let (len, from, at) = *self.got.get(i)?;
        let buf = self.bufs.get(i)?;
        Some(Datagram {
            data: &buf[..len.min(buf.len())],
            from,
            at,
        })
    }
}

fn to_socket_addr(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    s.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// Datagrams gathered in one pass over the connections, sent together.
pub(super) struct SendBatch {
    headers: MultiHeaders<SockaddrStorage>,
    queue: Vec<BytesMut>,
    /// Each queued datagram's destination, as `sendmmsg` takes it.
    addrs: Vec<Option<SockaddrStorage>>,
}

/// What one [`SendBatch::send`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Sent {
    pub datagrams: usize,
    pub bytes: usize,
    pub failed: usize,
}

impl SendBatch {
    pub(super) fn new() -> SendBatch {
        SendBatch {
            headers: MultiHeaders::preallocate(BATCH, None),
            queue: Vec::with_capacity(BATCH),
            addrs: Vec::with_capacity(BATCH),
        }
    }

    /// Whether a batch is full and should be sent before pushing more.
    pub(super) fn is_full(&self) -> bool {
        self.queue.len() >= BATCH
    }

    pub(super) fn push(&mut self, data: BytesMut, to: SocketAddr) {
        self.queue.push(data);
        self.addrs.push(Some(SockaddrStorage::from(to)));
    }

    /// Sends everything queued (one `sendmmsg` per [`BATCH`]). A datagram
    /// the kernel refuses (full buffer, unreachable) is counted failed and
    /// the rest still go.
    pub(super) fn send(&mut self, fd: RawFd) -> Sent {
        let mut sent = Sent::default();
        let mut start = 0;
        while start < self.queue.len() {
            let end = self.queue.len().min(start + BATCH);
            let iovs: Vec<[IoSlice<'_>; 1]> = self.queue[start..end]
                .iter()
                .map(|d| [IoSlice::new(&d[..])])
                .collect();
            match sendmmsg(
                fd,
                &mut self.headers,
                &iovs,
                &self.addrs[start..end],
                [],
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(results) => {
                    let mut n = 0;
                    for r in results {
                        n += 1;
                        sent.bytes += r.bytes;
                    }
                    sent.datagrams += n;
                    if n == 0 {
                        // Nothing went: count the first as failed and go on.
                        sent.failed += 1;
                        n = 1;
                    }
                    start += n;
                }
                Err(_) => {
                    // The first datagram of the chunk was refused.
                    sent.failed += 1;
                    start += 1;
                }
            }
        }
        self.queue.clear();
        self.addrs.clear();
        sent
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn a_batch_goes_out_and_comes_back_whole_with_its_senders() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let c = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        b.set_nonblocking(true).expect("nonblocking");
        let to = b.local_addr().expect("addr");
        // More than one sendmmsg's worth, of different sizes, and one too
        // large for the media path, which arrives flagged as oversize.
        let mut out = SendBatch::new();
        let mut sent_total = Sent::default();
        for i in 0..(BATCH + 10) {
            if out.is_full() {
                let s = out.send(a.as_raw_fd());
                sent_total.datagrams += s.datagrams;
                sent_total.failed += s.failed;
            }
            out.push(BytesMut::from(&vec![i as u8; 20 + i][..]), to);
        }
        let s = out.send(a.as_raw_fd());
        sent_total.datagrams += s.datagrams;
        sent_total.failed += s.failed;
        assert_eq!(sent_total.datagrams, BATCH + 10);
        assert_eq!(sent_total.failed, 0);
        c.send_to(&[7u8; MAX_DATAGRAM + 300], to).expect("send big");

        let mut inp = RecvBatch::new();
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while seen.len() < BATCH + 11 && std::time::Instant::now() < deadline {
            match inp.recv(b.as_raw_fd()) {
                Ok(n) => {
                    assert!(n <= BATCH);
                    for i in 0..n {
                        let d = inp.datagram(i).expect("datagram");
                        seen.push((d.data.to_vec(), d.from));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
        assert_eq!(seen.len(), BATCH + 11);
        for (i, (data, from)) in seen.iter().take(BATCH + 10).enumerate() {
            assert_eq!(*from, a.local_addr().expect("addr"));
            assert_eq!(
                data,
                &vec![i as u8; 20 + i],
                "datagram {i} intact, in order"
            );
        }
        let (big, from) = &seen[BATCH + 10];
        assert_eq!(*from, c.local_addr().expect("addr"));
        assert_eq!(
            big.len(),
            MAX_DATAGRAM + 1,
            "an oversize datagram shows as oversize"
        );
        assert!(matches!(
            inp.recv(b.as_raw_fd()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        ));
    }

    #[test]
    fn datagrams_the_kernel_drops_are_counted_once() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        enable_overflow_count(&b).expect("SO_RXQ_OVFL");
        enable_timestamps(&b).expect("SO_TIMESTAMPNS");
        // The smallest buffer the kernel allows: a few datagrams.
        setsockopt(&b, sockopt::RcvBuf, &1).expect("SO_RCVBUF");
        b.set_nonblocking(true).expect("nonblocking");
        let to = b.local_addr().expect("addr");
        let sent = 200;
        for i in 0..sent {
            a.send_to(&[i as u8; 1000], to).expect("send");
        }
        // Everything sent has been delivered or dropped by now: loopback
        // delivers within the send call.
        let mut inp = RecvBatch::new();
        let mut received = 0;
        while let Ok(n) = inp.recv(b.as_raw_fd()) {
            received += n;
        }
        // A datagram carries the count as it was when it was queued: the
        // drops show on the next one that gets in.
        let deadline = Instant::now() + Duration::from_secs(5);
        let next = |inp: &mut RecvBatch| {
            a.send_to(b"one more", to).expect("send");
            while inp.recv(b.as_raw_fd()).unwrap_or(0) == 0 {
                assert!(Instant::now() < deadline, "the datagram never arrived");
            }
        };
        // The first may not find room for it (its slot last held a
        // datagram with a stamp only): the next does.
        let mut dropped = 0;
        for _ in 0..2 {
            next(&mut inp);
            dropped += inp.take_overflow();
        }
        assert!(
            received > 0 && dropped > 0,
            "{received} received, {dropped} dropped"
        );
        assert_eq!(received as u64 + dropped, sent as u64);
        // Taken once: nothing new since.
        next(&mut inp);
        assert_eq!(inp.take_overflow(), 0);
    }

    #[test]
    fn the_media_socket_gets_the_buffers_the_system_allows() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let want = 1 << 20;
        let got = enlarge_buffers(&s, want).expect("buffers");
        let max = |f: &str| -> usize {
            std::fs::read_to_string(f)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        // Root (CAP_NET_ADMIN) gets what it asks; anyone else the system's
        // limit. The kernel reports double what it set.
        let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|st| {
            st.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        });
        let floor = |limit: usize| if root { want } else { want.min(limit) };
        assert!(
            got.receive >= floor(max("/proc/sys/net/core/rmem_max")),
            "{got:?}"
        );
        assert!(
            got.send >= floor(max("/proc/sys/net/core/wmem_max")),
            "{got:?}"
        );
    }

    #[test]
    fn a_datagram_is_stamped_when_it_arrived_not_when_it_was_read() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        enable_timestamps(&b).expect("SO_TIMESTAMPNS");
        b.set_nonblocking(true).expect("nonblocking");
        let before_send = Instant::now();
        a.send_to(b"early", b.local_addr().expect("addr"))
            .expect("send");
        // Until it is in b's buffer (on a loaded machine loopback delivery
        // can lag the send).
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut peek = [0u8; 16];
        while b.peek_from(&mut peek).is_err() {
            assert!(Instant::now() < deadline, "the datagram never arrived");
            std::thread::sleep(Duration::from_millis(1));
        }
        let arrived_by = Instant::now();
        // The datagram waits in b's buffer, as it does while a worker is busy.
        std::thread::sleep(Duration::from_millis(60));
        let before_read = Instant::now();
        let mut inp = RecvBatch::new();
        let n = loop {
            match inp.recv(b.as_raw_fd()) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("recv: {e}"),
            }
        };
        assert_eq!(n, 1);
        let d = inp.datagram(0).expect("datagram");
        assert_eq!(d.data, b"early");
        // Stamped when it arrived (by the time the peek saw it; the wall
        // and monotonic clocks are read a few µs apart), not when it was
        // read, 60 ms later.
        assert!(
            d.at < arrived_by + Duration::from_millis(5) && d.at < before_read,
            "stamped {:?} after the send; it was in the buffer {:?} after it, read {:?} after it",
            d.at.duration_since(before_send),
            arrived_by.duration_since(before_send),
            before_read.duration_since(before_send)
        );
    }

    #[test]
    fn arrival_falls_back_to_the_read_time_without_a_believable_stamp() {
        let read_at = Instant::now();
        let wall = Duration::from_secs(1_800_000_000);
        let ms = Duration::from_millis;
        assert_eq!(arrival(read_at, wall, Some(wall - ms(7))), read_at - ms(7));
        assert_eq!(arrival(read_at, wall, Some(wall)), read_at);
        assert_eq!(arrival(read_at, wall, None), read_at);
        // From the future, or older than a second: the wall clock moved.
        assert_eq!(arrival(read_at, wall, Some(wall + ms(3))), read_at);
        assert_eq!(arrival(read_at, wall, Some(wall - ms(1500))), read_at);
    }
}
