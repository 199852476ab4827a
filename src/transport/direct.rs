//! Direct sockets: a worker other than the reader's receives its
//! connections' datagrams itself, without worker 0 reading and handing
//! them over.
//!
//! The media port is one `SO_REUSEPORT` group. Worker 0's socket is its
//! first member, and a classic BPF program on the group (`return 0`) sends
//! it every datagram no other member claims. Once a connection's media
//! comes from an address (DTLS or SRTP, not only ICE checks), its worker
//! opens a socket bound to the same port and *connected* to that address:
//! the kernel prefers a connected socket's exact match to the group, so
//! from then on that peer's datagrams wait on its worker's own socket and
//! wake that worker alone. A peer that moves (a new candidate pair, a NAT
//! rebinding) arrives at worker 0 again, is handed over as before, and
//! gets a new direct socket (at most one per peer, and one attempt per
//! [`RETRY`]).
//!
//! A worker watches its direct sockets with one epoll instance of its own,
//! which the worker's runtime watches in turn: one readiness for all of
//! them, then `recvmmsg` on each socket that has something.
//!
//! Sending is unchanged: every worker sends on its handle of the group's
//! first socket, whose source port is the same.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{setsockopt, sockopt};
use rtc::shared::TransportProtocol;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;

use super::batch::{self, RecvBatch, BATCH};
use super::reader::Inbound;
use super::MAX_DATAGRAM;
use crate::metrics::Metrics;
use crate::router::PeerKey;

/// A peer whose direct socket could not be opened, or whose address moved,
/// is tried again after this long at the soonest.
pub(super) const RETRY: Duration = Duration::from_secs(1);
/// Receive buffer asked for on each direct socket (one peer's traffic).
const SOCKET_BUFFER: usize = 1 << 20;
/// Ready sockets taken from the epoll instance per call.
const EVENTS: usize = 64;
/// Rounds of (epoll, read every ready socket) per wake-up at most, so a
/// flooded socket cannot starve the timers and the flush.
const MAX_ROUNDS: usize = 4;

/// The media socket for a worker pool: bound with `SO_REUSEPORT` and the
/// BPF program that gives it every unclaimed datagram when `direct`, a
/// plain socket otherwise. Returns the socket and whether the workers may
/// open direct sockets (the program attached).
pub(super) fn media_socket(
    bind: SocketAddr,
    direct: bool,
) -> io::Result<(std::net::UdpSocket, bool)> {
    let socket = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    if bind.is_ipv6() {
        // As std binds it: the platform's default for dual stack.
        let _ = socket.set_only_v6(false);
    }
    let mut direct = direct;
    if direct {
        if let Err(e) = socket.set_reuse_port(true) {
            tracing::warn!(error = %e, "no SO_REUSEPORT: every datagram goes through worker 0");
            direct = false;
        }
    }
    socket.bind(&bind.into())?;
    if direct {
        if let Err(e) = claim_unmatched(&socket) {
            tracing::warn!(error = %e, "no reuseport program: every datagram goes through worker 0");
            direct = false;
        }
    }
    socket.set_nonblocking(true)?;
    Ok((socket.into(), direct))
}

/// Attaches `return 0` to the socket's reuseport group: a datagram no
/// connected socket matches goes to the group's first member (this
/// socket), never to a direct socket in the moment between its `bind` and
/// its `connect`.
fn claim_unmatched(socket: &impl AsFd) -> io::Result<()> {
    // BPF_RET | BPF_K, k = 0: the index of the socket in the group.
    let mut program = [nix::libc::sock_filter {
        code: 0x06,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let fprog = nix::libc::sock_fprog {
        len: 1,
        filter: program.as_mut_ptr(),
    };
    setsockopt(socket, sockopt::AttachReusePortCbpf, &fprog).map_err(io::Error::from)
}

/// An epoll instance the runtime can watch.
pub(super) struct EpollFd(Epoll);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0 .0.as_raw_fd()
    }
}

/// The readiness of a worker's direct sockets, shared by the engine (which
/// adds and removes sockets) and the worker's loop (which waits on it).
pub(super) type Readiness = Arc<AsyncFd<EpollFd>>;

struct DirectSocket {
    socket: std::net::UdpSocket,
    remote: SocketAddr,
    /// The socket's drop counter as last taken.
    overflow: Option<u32>,
}

/// One worker's direct sockets.
pub(super) struct Direct {
    ready: Readiness,
    /// The media port's address, which every direct socket binds.
    local: SocketAddr,
    sockets: HashMap<PeerKey, DirectSocket>,
    /// Peers by socket, for epoll's tokens.
    tokens: HashMap<u64, PeerKey>,
    next_token: u64,
    /// When each peer last had a socket opened (or failed to).
    tried: HashMap<PeerKey, Instant>,
    events: Vec<EpollEvent>,
    batch: RecvBatch,
    /// Direct sockets open (all workers').
    open: prometheus::IntGauge,
}

impl Direct {
    /// A worker's set, empty; must be made inside the worker's runtime.
    pub(super) fn new(local: SocketAddr, open: prometheus::IntGauge) -> io::Result<Direct> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        // `with_interest` is deprecated because a `T` that does not own
        // its descriptor could close or replace it while registered; an
        // `EpollFd` owns its descriptor (an `OwnedFd`) and neither gives it
        // out nor closes it before the `AsyncFd` drops. The unsafe
        // replacement is not open to us (`unsafe_code = "forbid"`).
        #[allow(deprecated)]
        let ready = Arc::new(AsyncFd::with_interest(
            EpollFd(epoll),
            tokio::io::Interest::READABLE,
        )?);
        Ok(Direct {
            ready,
            local,
            sockets: HashMap::new(),
            tokens: HashMap::new(),
            next_token: 1,
            tried: HashMap::new(),
            events: vec![EpollEvent::empty(); EVENTS],
            batch: RecvBatch::new(),
            open,
        })
    }

    pub(super) fn readiness(&self) -> Readiness {
        self.ready.clone()
    }

    /// Whether `key`'s media from `from`, handed over by worker 0, should
    /// get a direct socket now: not one already there for `from`, and no
    /// attempt in the last [`RETRY`].
    pub(super) fn wants(&self, key: PeerKey, from: SocketAddr, now: Instant) -> bool {
        if self.sockets.get(&key).is_some_and(|s| s.remote == from) {
            return false;
        }
        self.tried
            .get(&key)
            .is_none_or(|at| now.saturating_duration_since(*at) >= RETRY)
    }

    /// Opens `key`'s direct socket, connected to `remote`, in place of the
    /// one it had.
    pub(super) fn open(
        &mut self,
        key: PeerKey,
        remote: SocketAddr,
        now: Instant,
    ) -> io::Result<()> {
        self.tried.insert(key, now);
        self.close(key);
        let socket = Socket::new(
            Domain::for_address(self.local),
            Type::DGRAM,
            Some(Protocol::UDP),
        )?;
        if self.local.is_ipv6() {
            let _ = socket.set_only_v6(false);
        }
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&self.local.into())?;
        socket.connect(&remote.into())?;
        let socket: std::net::UdpSocket = socket.into();
        let _ = batch::enable_timestamps(&socket);
        let _ = batch::enable_overflow_count(&socket);
        let _ = batch::enlarge_buffers(&socket, SOCKET_BUFFER);
        let token = self.next_token;
        self.next_token += 1;
        self.ready
            .get_ref()
            .0
            .add(&socket, EpollEvent::new(EpollFlags::EPOLLIN, token))
            .map_err(io::Error::from)?;
        self.tokens.insert(token, key);
        self.sockets.insert(
            key,
            DirectSocket {
                socket,
                remote,
                overflow: None,
            },
        );
        self.open.inc();
        Ok(())
    }

    /// Closes `key`'s direct socket, if it has one; its datagrams go to
    /// worker 0 again.
    pub(super) fn close(&mut self, key: PeerKey) {
        if let Some(s) = self.sockets.remove(&key) {
            let _ = self.ready.get_ref().0.delete(&s.socket);
            self.tokens.retain(|_, k| *k != key);
            self.open.dec();
        }
    }

    /// Forgets `key` (its connection is gone).
    pub(super) fn forget(&mut self, key: PeerKey) {
        self.close(key);
        self.tried.remove(&key);
    }

    /// Reads what the ready sockets hold into `out`, a few rounds at most.
    /// Returns true when every socket was found empty (the readiness may
    /// be cleared), false when there may be more.
    pub(super) fn drain(&mut self, out: &mut Vec<Inbound>, metrics: &Metrics) -> bool {
        for _ in 0..MAX_ROUNDS {
            let n = match self
                .ready
                .get_ref()
                .0
                .wait(&mut self.events, EpollTimeout::ZERO)
            {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "direct sockets' epoll");
                    return true;
                }
            };
            if n == 0 {
                return true;
            }
            for i in 0..n {
                let token = self.events[i].data();
                let Some(&key) = self.tokens.get(&token) else {
                    continue;
                };
                let Some(s) = self.sockets.get_mut(&key) else {
                    continue;
                };
                read_socket(s, key, &mut self.batch, out, metrics);
            }
        }
        false
    }
}

/// Reads one direct socket: one `recvmmsg`, a second only when the first
/// filled the batch (a short read means it is empty, or epoll says so
/// next round).
fn read_socket(
    s: &mut DirectSocket,
    key: PeerKey,
    batch: &mut RecvBatch,
    out: &mut Vec<Inbound>,
    metrics: &Metrics,
) {
    for _ in 0..2 {
        let n = match batch.recv(s.socket.as_raw_fd()) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                // A connected UDP socket reports the peer's ICMP errors
                // (port unreachable) here: the connection's consent checks
                // decide what that means, not this read.
                tracing::debug!(error = %e, "direct socket read");
                return;
            }
        };
        let dropped = batch.take_overflow_of(&mut s.overflow);
        if dropped > 0 {
            metrics.media_dropped_by("socket-overflow", dropped);
        }
        for i in 0..n {
            let Some(d) = batch.datagram(i) else {
                continue;
            };
            if d.data.len() > MAX_DATAGRAM {
                metrics.media_dropped("oversize");
                continue;
            }
            out.push(Inbound {
                key,
                from: d.from,
                protocol: TransportProtocol::UDP,
                data: BytesMut::from(d.data),
                at: d.at,
            });
        }
        if n < BATCH {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp(addr: &str) -> std::net::UdpSocket {
        let s = std::net::UdpSocket::bind(addr).expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        s
    }

    /// The kernel behaviour this module rests on: once a direct socket is
    /// connected to a peer, that peer's datagrams reach it and no other;
    /// everyone else's still reach the group's first socket (also in the
    /// moment a direct socket is bound but not yet connected); and when
    /// the direct socket closes, the peer's datagrams come back to it.
    #[tokio::test]
    async fn a_connected_peer_reaches_its_direct_socket_and_everyone_else_the_first() {
        let (main, direct_ok) = media_socket("127.0.0.1:0".parse().unwrap(), true).expect("socket");
        assert!(direct_ok, "SO_REUSEPORT and the program attach on Linux");
        let local = main.local_addr().unwrap();
        let alice = udp("127.0.0.1:0");
        let bob = udp("127.0.0.1:0");
        let key = PeerKey(7);

        // An unconnected member of the group (a direct socket between its
        // bind and its connect) takes nothing.
        let loose = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        loose.set_reuse_port(true).unwrap();
        loose.bind(&local.into()).unwrap();
        loose.set_nonblocking(true).unwrap();
        for i in 0..20u8 {
            alice.send_to(&[i], local).unwrap();
        }
        let metrics = Metrics::new();
        let mut direct = Direct::new(local, metrics.media_direct_sockets.clone()).expect("epoll");
        direct
            .open(key, alice.local_addr().unwrap(), Instant::now())
            .expect("open");
        let mut buf = [0u8; 16];
        let mut at_main = 0;
        main.set_nonblocking(false).unwrap();
        main.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        while at_main < 20 {
            let (_, from) = main
                .recv_from(&mut buf)
                .expect("the first socket gets them");
            assert_eq!(from, alice.local_addr().unwrap());
            at_main += 1;
        }
        let mut loose_buf = [std::mem::MaybeUninit::new(0u8); 16];
        assert!(
            loose.recv_from(&mut loose_buf).is_err(),
            "the unconnected member got nothing"
        );

        // Connected: alice's datagrams go to her direct socket, bob's to
        // the first socket.
        alice.send_to(b"alice", local).unwrap();
        bob.send_to(b"bob", local).unwrap();
        let (n, from) = main.recv_from(&mut buf).expect("bob's at the first socket");
        assert_eq!((&buf[..n], from), (&b"bob"[..], bob.local_addr().unwrap()));
        let mut out = Vec::new();
        for _ in 0..200 {
            direct.drain(&mut out, &metrics);
            if !out.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].key, key);
        assert_eq!(&out[0].data[..], b"alice");
        assert_eq!(out[0].from, alice.local_addr().unwrap());
        main.set_nonblocking(true).unwrap();
        assert!(
            main.recv_from(&mut buf).is_err(),
            "alice's datagram came once"
        );

        // Closed: alice is back at the first socket.
        direct.forget(key);
        assert_eq!(direct.sockets.len(), 0);
        alice.send_to(b"again", local).unwrap();
        main.set_nonblocking(false).unwrap();
        let (n, from) = main.recv_from(&mut buf).expect("alice at the first socket");
        assert_eq!(
            (&buf[..n], from),
            (&b"again"[..], alice.local_addr().unwrap())
        );
    }

    #[test]
    fn a_peer_is_tried_once_per_retry_and_not_again_for_the_same_address() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let (main, _) = media_socket("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let local = main.local_addr().unwrap();
        let mut direct = Direct::new(local, Metrics::new().media_direct_sockets.clone()).unwrap();
        let key = PeerKey(1);
        let a: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:40002".parse().unwrap();
        let t0 = Instant::now();
        assert!(direct.wants(key, a, t0));
        direct.open(key, a, t0).unwrap();
        assert!(
            !direct.wants(key, a, t0 + RETRY * 5),
            "the same address keeps its socket"
        );
        assert!(
            !direct.wants(key, b, t0 + RETRY / 2),
            "a move waits for the retry"
        );
        assert!(direct.wants(key, b, t0 + RETRY));
        direct.open(key, b, t0 + RETRY).unwrap();
        assert_eq!(direct.sockets.len(), 1, "one socket per peer");
        assert_eq!(direct.tokens.len(), 1);
    }
}
