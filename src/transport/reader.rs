//! The media port's reader. Worker 0 reads the one UDP socket (and the
//! ICE-TCP connections) for every worker: it drains the socket in batches,
//! routes each datagram to its connection by ICE ufrag, then by remote
//! address ([`Demux`]), handles its own connections' datagrams at once and
//! hands the others' to their workers, one batch per worker per wake-up.
//! Every worker sends on its own handle of the same socket, so the source
//! port is always the advertised one. A peer whose worker has opened a
//! direct socket for it (`super::direct`) no longer comes through here.
//!
//! A connection's key says which worker holds it ([`worker_of`]); workers
//! register and retire their connections' ICE credentials through a
//! channel the reader drains before it routes anything, so a ufrag is known
//! before the answer that carries it leaves the server.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use rtc::shared::TransportProtocol;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::batch::RecvBatch;
use super::MAX_DATAGRAM;
use crate::media::demux::{Demux, Route};
use crate::metrics::Metrics;
use crate::router::PeerKey;

/// Datagrams per `recvmmsg`: one wake-up serves many packets under load.
pub(super) use super::batch::BATCH;
/// `recvmmsg` calls per wake-up at most (so a flooded socket cannot starve
/// the timers and the flush).
const MAX_CALLS: usize = 2;
/// Batches waiting for one worker; more are dropped (and counted).
pub(super) const INBOUND_QUEUE: usize = 256;
/// Bits of a [`PeerKey`] below the worker index.
const KEY_WORKER_SHIFT: u32 = 48;

/// The first key worker `worker` hands out.
pub(super) fn first_key(worker: usize) -> u64 {
    ((worker as u64) << KEY_WORKER_SHIFT) | 1
}

/// The worker holding the connection `key`.
pub(super) fn worker_of(key: PeerKey) -> usize {
    (key.0 >> KEY_WORKER_SHIFT) as usize
}

/// A worker's change to the routing table.
pub(super) enum DemuxControl {
    /// STUN with this local ufrag whose integrity checks with `pwd` goes to
    /// `key` (and its address after that).
    Register {
        ufrag: String,
        pwd: String,
        key: PeerKey,
    },
    /// `key` is gone: forget its ufrags and addresses.
    Unregister(PeerKey),
}

/// One routed datagram (or ICE-TCP frame).
pub(super) struct Inbound {
    pub key: PeerKey,
    pub from: SocketAddr,
    pub protocol: TransportProtocol,
    pub data: BytesMut,
    /// When it arrived (the kernel's receive time for UDP, see
    /// [`super::batch`]): the arrival time TWCC feedback reports.
    pub at: Instant,
}

/// What the reader hands a worker.
pub(super) enum ToWorker {
    Datagrams(Vec<Inbound>),
    /// An ICE-TCP connection opened: its write side, for whichever worker
    /// holds the connection that will use it.
    TcpOpened {
        from: SocketAddr,
        writer: mpsc::Sender<Vec<u8>>,
    },
    TcpClosed {
        from: SocketAddr,
    },
}

/// Worker 0's reading side.
pub(super) struct Reader {
    socket: UdpSocket,
    demux: Demux<PeerKey>,
    control: std_mpsc::Receiver<DemuxControl>,
    /// The other workers' queues, by worker index (`None` at 0).
    others: Vec<Option<mpsc::Sender<ToWorker>>>,
    /// Datagrams for each other worker, gathered in this wake-up.
    pending: Vec<Vec<Inbound>>,
    batch: RecvBatch,
    metrics: Arc<Metrics>,
}

impl Reader {
    pub(super) fn new(
        socket: UdpSocket,
        control: std_mpsc::Receiver<DemuxControl>,
        others: Vec<Option<mpsc::Sender<ToWorker>>>,
        metrics: Arc<Metrics>,
    ) -> Reader {
        let pending = others.iter().map(|_| Vec::new()).collect();
        Reader {
            socket,
            demux: Demux::new(),
            control,
            others,
            pending,
            batch: RecvBatch::new(),
            metrics,
        }
    }

    /// Resolves when the socket has something to read.
    pub(super) async fn readable(&self) {
        let _ = self.socket.readable().await;
    }

    /// Reads what is waiting, up to [`BATCH`] datagrams per `recvmmsg` and
    /// at most [`MAX_CALLS`] calls; those of worker 0's connections are
    /// pushed on `own`, the others are handed to their workers. It reads
    /// until the socket says it is empty, so readiness is cleared here and
    /// the worker does not loop (and scan its connections) once more only
    /// to find nothing.
    pub(super) fn drain(&mut self, own: &mut Vec<Inbound>) {
        self.apply_control();
        let fd = self.socket.as_raw_fd();
        for _ in 0..MAX_CALLS {
            let batch = &mut self.batch;
            let n = match self.socket.try_io(Interest::READABLE, || batch.recv(fd)) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(error = %e, "media socket read");
                    break;
                }
            };
            let overflow = self.batch.take_overflow();
            if overflow > 0 {
                self.metrics.media_dropped_by("socket-overflow", overflow);
            }
            for i in 0..n {
                let Some(d) = self.batch.datagram(i) else {
                    continue;
                };
                let routed = route(
                    &mut self.demux,
                    &self.metrics,
                    d.data,
                    d.from,
                    TransportProtocol::UDP,
                    d.at,
                );
                if let Some(inbound) = routed {
                    self.deliver(inbound, own);
                }
            }
        }
        self.send_pending();
    }

    /// Routes one ICE-TCP frame.
    pub(super) fn tcp_packet(&mut self, data: Vec<u8>, from: SocketAddr, own: &mut Vec<Inbound>) {
        self.apply_control();
        let at = Instant::now();
        let routed = route(
            &mut self.demux,
            &self.metrics,
            &data,
            from,
            TransportProtocol::TCP,
            at,
        );
        if let Some(inbound) = routed {
            self.deliver(inbound, own);
            self.send_pending();
        }
    }

    /// Tells every other worker of an ICE-TCP connection's opening or end.
    pub(super) fn tcp_broadcast(&self, event: impl Fn() -> ToWorker) {
        for tx in self.others.iter().flatten() {
            if tx.try_send(event()).is_err() {
                self.metrics.media_dropped("worker-queue-full");
            }
        }
    }

    fn deliver(&mut self, inbound: Inbound, own: &mut Vec<Inbound>) {
        match worker_of(inbound.key) {
            0 => own.push(inbound),
            w => match self.pending.get_mut(w) {
                Some(batch) => batch.push(inbound),
                // A key no worker hands out: a bug, not a peer's doing.
                None => self.metrics.media_dropped("unknown-peer"),
            },
        }
    }

    fn send_pending(&mut self) {
        for (w, batch) in self.pending.iter_mut().enumerate().skip(1) {
            if batch.is_empty() {
                continue;
            }
            let n = batch.len();
            let full = std::mem::replace(batch, Vec::with_capacity(n));
            let sent = self.others[w]
                .as_ref()
                .is_some_and(|tx| tx.try_send(ToWorker::Datagrams(full)).is_ok());
            if sent {
                self.metrics.media_handed_over.inc_by(n as u64);
            } else {
                for _ in 0..n {
                    self.metrics.media_dropped("worker-queue-full");
                }
            }
        }
    }

    /// The workers' registrations and removals, before anything is routed.
    pub(super) fn apply_control(&mut self) {
        while let Ok(c) = self.control.try_recv() {
            match c {
                DemuxControl::Register { ufrag, pwd, key } => {
                    self.demux.register(&ufrag, &pwd, key);
                }
                DemuxControl::Unregister(key) => self.demux.unregister(key),
            }
        }
    }
}

/// Routes one datagram or frame to its connection (a copy of it), or
/// counts why not.
fn route(
    demux: &mut Demux<PeerKey>,
    metrics: &Metrics,
    data: &[u8],
    from: SocketAddr,
    protocol: TransportProtocol,
    at: Instant,
) -> Option<Inbound> {
    if data.len() > MAX_DATAGRAM {
        metrics.media_dropped("oversize");
        return None;
    }
    match demux.route(data, from) {
        Route::To(key) => Some(Inbound {
            key,
            from,
            protocol,
            data: BytesMut::from(data),
            at,
        }),
        Route::Drop(reason) => {
            metrics.media_dropped(reason.as_str());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_names_the_worker_that_made_it() {
        for w in 0..64 {
            for k in first_key(w)..first_key(w) + 1000 {
                assert_eq!(worker_of(PeerKey(k)), w);
            }
        }
    }
}
