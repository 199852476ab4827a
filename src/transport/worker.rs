//! A media worker: its thread and event loop (commands, datagrams, ICE-TCP,
//! timers, the mixer's and the allocator's ticks), datagram input, and the
//! flush of every connection's output with `sendmmsg`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rtc::sansio::Protocol;
use rtc::shared::tcp_framing::frame_packet;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::tcp::{accept_tcp, next_tcp, TcpEvent, TCP_EVENT_QUEUE};
use super::{batch, layers, reader, Engine, IDLE};
use crate::hub::Outboxes;
use crate::media::demux::{classify, PacketKind};
use crate::metrics::Metrics;
use crate::perip::PerIp;
use crate::router::{PeerKey, Router};
use crate::sfu::{Command, MediaConfig, MediaPlane, Publishing, COMMAND_QUEUE};
use crate::webhook::Webhooks;

/// The kernel buffers asked for on the media socket, each way (8 MiB:
/// about a second of 4 × 4 participants' video, what pion and LiveKit
/// recommend raising `rmem_max` to).
const SOCKET_BUFFER: usize = 8 << 20;

/// Starts the media workers; returns the hub's handle on them.
pub fn start(
    config: MediaConfig,
    outboxes: Arc<Outboxes>,
    metrics: Arc<Metrics>,
    publishing: Arc<Publishing>,
    webhooks: Arc<Webhooks>,
) -> io::Result<MediaPlane> {
    let workers = config.workers.max(1);
    // With several workers the port is a reuseport group, so that each
    // worker can read its peers' datagrams on sockets of its own.
    let (socket, direct) = super::direct::media_socket(config.bind, workers > 1)?;
    if let Err(e) = super::batch::enable_timestamps(&socket) {
        tracing::warn!(error = %e, "no kernel receive timestamps: datagrams are stamped when read");
    }
    if let Err(e) = super::batch::enable_overflow_count(&socket) {
        tracing::warn!(error = %e, "the kernel will not report datagrams the media socket drops");
    }
    match super::batch::enlarge_buffers(&socket, SOCKET_BUFFER) {
        // The kernel reports double what it was given.
        Ok(b) if b.receive < SOCKET_BUFFER => tracing::warn!(
            receive = b.receive,
            send = b.send,
            wanted = SOCKET_BUFFER,
            "the media socket's buffers are small: a busy moment drops datagrams \
             (raise net.core.rmem_max and wmem_max, or run with CAP_NET_ADMIN)"
        ),
        Ok(b) => tracing::info!(receive = b.receive, send = b.send, "media socket buffers"),
        Err(e) => tracing::warn!(error = %e, "media socket buffers unknown"),
    }
    let local = socket.local_addr()?;
    let announce = SocketAddr::new(config.public_ip.unwrap_or(local.ip()), local.port());
    // ICE-TCP (passive) on the same port number, for networks that block UDP.
    let tcp = if config.ice_tcp {
        match std::net::TcpListener::bind(local).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(%local, error = %e, "ICE-TCP disabled: cannot listen on the media port over TCP");
                None
            }
        }
    } else {
        None
    };
    let tcp_announce = tcp.as_ref().map(|_| announce);
    // Registrations of connections' ICE credentials, from every worker to
    // the reader. Unbounded, but each message is one connection made or
    // removed, which the bounded command queues and room limits pace.
    let (control_tx, control_rx) = std::sync::mpsc::channel();
    let mut commands = Vec::with_capacity(workers);
    let mut command_rxs = Vec::with_capacity(workers);
    let mut inbound_txs = vec![None];
    let mut inbound_rxs = vec![None];
    for w in 0..workers {
        // Each worker's series exist (at 0) from the start, before its
        // thread runs: a scrape right after start-up sees both families.
        let label = w.to_string();
        metrics.worker_datagrams.with_label_values(&[&label]);
        metrics.worker_rooms.with_label_values(&[&label]);
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        commands.push(tx);
        command_rxs.push(rx);
        if w > 0 {
            let (tx, rx) = mpsc::channel(reader::INBOUND_QUEUE);
            inbound_txs.push(Some(tx));
            inbound_rxs.push(Some(rx));
        }
    }
    let mut reading = Some((socket.try_clone()?, tcp, control_rx, inbound_txs));
    for (w, (commands, inbound)) in command_rxs.into_iter().zip(inbound_rxs).enumerate() {
        let out = socket.try_clone()?;
        let reading = reading.take();
        let ctx = WorkerContext {
            worker: w,
            announce,
            tcp_announce,
            config: config.clone(),
            outboxes: outboxes.clone(),
            metrics: metrics.clone(),
            publishing: publishing.clone(),
            webhooks: webhooks.clone(),
            control: control_tx.clone(),
            out,
            direct: (w > 0 && direct).then_some(local),
        };
        let name = format!("sfu-media-{w}");
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                crate::sfu::exit_on_panic(
                    &name,
                    |code| std::process::exit(code),
                    move || run_worker(ctx, reading, commands, inbound),
                )
            })?;
    }
    tracing::info!(%local, %announce, ice_tcp = tcp_announce.is_some(), workers, "media listening");
    Ok(MediaPlane::new(
        commands,
        Arc::new(std::sync::Mutex::new(crate::sfu::Placement::new(workers))),
        local,
    ))
}

/// What a worker thread starts with.
struct WorkerContext {
    worker: usize,
    announce: SocketAddr,
    tcp_announce: Option<SocketAddr>,
    config: MediaConfig,
    outboxes: Arc<Outboxes>,
    metrics: Arc<Metrics>,
    publishing: Arc<Publishing>,
    webhooks: Arc<Webhooks>,
    control: std::sync::mpsc::Sender<reader::DemuxControl>,
    /// The media socket, for sending.
    out: std::net::UdpSocket,
    /// The port's address, when this worker opens direct sockets on it.
    direct: Option<SocketAddr>,
}

/// Worker 0's reading side before it starts: the socket, the ICE-TCP
/// listener, the registrations and the other workers' queues.
type Reading = (
    std::net::UdpSocket,
    Option<std::net::TcpListener>,
    std::sync::mpsc::Receiver<reader::DemuxControl>,
    Vec<Option<mpsc::Sender<reader::ToWorker>>>,
);

/// One worker thread's body: its runtime and engine.
fn run_worker(
    ctx: WorkerContext,
    reading: Option<Reading>,
    commands: mpsc::Receiver<Command>,
    inbound: Option<mpsc::Receiver<reader::ToWorker>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            // A worker that never runs is as bad as one that died: its
            // rooms would have no media behind a green /healthz.
            tracing::error!(worker = ctx.worker, error = %e, "media runtime failed to start; exiting");
            std::process::exit(crate::sfu::PANIC_EXIT_CODE);
        }
    };
    runtime.block_on(async move {
        let mut tcp_events = None;
        let mut reader = None;
        if let Some((socket, tcp, control, others)) = reading {
            tcp_events = match tcp.map(tokio::net::TcpListener::from_std) {
                Some(Ok(listener)) => {
                    let (ev_tx, ev_rx) = mpsc::channel(TCP_EVENT_QUEUE);
                    let per_ip = PerIp::new(ctx.config.max_tcp_per_ip, "ice-tcp");
                    tokio::spawn(accept_tcp(listener, ev_tx, per_ip, ctx.metrics.clone()));
                    Some(ev_rx)
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "ICE-TCP disabled");
                    None
                }
                None => None,
            };
            match UdpSocket::from_std(socket) {
                Ok(socket) => {
                    reader = Some(reader::Reader::new(
                        socket,
                        control,
                        others,
                        ctx.metrics.clone(),
                    ))
                }
                Err(e) => {
                    tracing::error!(error = %e, "media socket failed; exiting");
                    std::process::exit(crate::sfu::PANIC_EXIT_CODE);
                }
            }
        }
        Engine::new(ctx)
            .run(reader, inbound, commands, tcp_events)
            .await
    });
}

impl Engine {
    fn new(ctx: WorkerContext) -> Engine {
        let config = &ctx.config;
        let label = ctx.worker.to_string();
        Engine {
            announce: ctx.announce,
            tcp_announce: ctx.tcp_announce,
            tcp_writers: HashMap::new(),
            peers: HashMap::new(),
            by_participant: HashMap::new(),
            router: Router::new(config.mix_speakers),
            mixes: HashMap::new(),
            worker: ctx.worker,
            demux: ctx.control.clone(),
            out: ctx.out,
            direct: ctx.direct.and_then(|local| {
                super::direct::Direct::new(local, ctx.metrics.media_direct_sockets.clone())
                    .map_err(|e| {
                        tracing::warn!(worker = ctx.worker, error = %e, "no direct sockets: this worker's datagrams go through worker 0");
                    })
                    .ok()
            }),
            send: batch::SendBatch::new(),
            touched: Vec::new(),
            scan_all: true,
            timers: BinaryHeap::new(),
            sweep_due: Instant::now() + IDLE,
            worker_datagrams: ctx.metrics.worker_datagrams.with_label_values(&[&label]),
            worker_rooms: ctx.metrics.worker_rooms.with_label_values(&[&label]),
            outboxes: ctx.outboxes.clone(),
            metrics: ctx.metrics.clone(),
            publishing: ctx.publishing,
            webhooks: Some(ctx.webhooks),
            next_key: reader::first_key(ctx.worker),
            actions: Vec::new(),
            decisions: Vec::new(),
            offers_due: Vec::new(),
            forwarded_since: None,
            audio_due: None,
            layers_due: Instant::now() + layers::ALLOCATE_EVERY,
            padding_due: None,
            mix_speakers: config.mix_speakers,
            mix_complexity: config.mix_complexity,
            max_tracks: config.max_tracks,
        }
    }

    async fn run(
        mut self,
        mut reader: Option<reader::Reader>,
        mut inbound: Option<mpsc::Receiver<reader::ToWorker>>,
        mut commands: mpsc::Receiver<Command>,
        mut tcp: Option<mpsc::Receiver<TcpEvent>>,
    ) {
        let mut own: Vec<reader::Inbound> = Vec::with_capacity(reader::BATCH);
        let direct_ready = self.direct.as_ref().map(|d| d.readiness());
        let mut deadline = Instant::now() + IDLE;
        loop {
            // Timers that came due while input kept the loop busy (a socket
            // that is always readable must not starve them).
            if deadline <= Instant::now() {
                self.on_timers(Instant::now(), reader.as_mut());
            }
            // The mixer runs here rather than in a select branch so a busy
            // socket (always ready) cannot starve it.
            if self.audio_due.is_some_and(|due| due <= Instant::now()) {
                self.audio_tick();
                self.scan_all = true;
            }
            // Likewise the layer allocation.
            if self.layers_due <= Instant::now() {
                let now = Instant::now();
                self.allocate_layers(now);
                self.layers_due = now + layers::ALLOCATE_EVERY;
                self.scan_all = true;
            }
            if self.padding_due.is_some_and(|due| due <= Instant::now()) {
                self.pad(Instant::now());
                self.scan_all = true;
            }
            if self.scan_all {
                // Whatever ran may have left events on any connection.
                let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
                for key in keys {
                    self.drain(key);
                }
                self.apply_actions();
            }
            self.flush();
            if let Some(arrived) = self.forwarded_since.take() {
                self.metrics
                    .forward_latency
                    .observe(arrived.elapsed().as_secs_f64());
            }
            let now = Instant::now();
            deadline = self
                .next_timer()
                .unwrap_or(now + IDLE)
                .min(now + IDLE)
                .min(self.audio_due.unwrap_or(now + IDLE))
                .min(self.layers_due)
                .min(self.padding_due.unwrap_or(now + IDLE))
                .min(self.sweep_due)
                .max(now);
            tokio::select! {
                biased;
                cmd = commands.recv() => match cmd {
                    Some(Command::Shutdown) | None => break,
                    Some(cmd) => {
                        self.on_command(cmd);
                        self.apply_actions();
                        self.scan_all = true;
                    }
                },
                () = readable(&reader) => {
                    if let Some(r) = reader.as_mut() {
                        r.drain(&mut own);
                    }
                    self.on_datagrams(&mut own);
                },
                Some(mut guard) = direct_readable(&direct_ready) => {
                    let empty = match self.direct.as_mut() {
                        Some(d) => d.drain(&mut own, &self.metrics),
                        None => true,
                    };
                    if empty {
                        guard.clear_ready();
                    }
                    self.on_datagrams(&mut own);
                },
                Some(msg) = next_inbound(&mut inbound) => match msg {
                    reader::ToWorker::Datagrams(mut batch) => {
                        self.open_direct(&batch);
                        self.on_datagrams(&mut batch)
                    }
                    reader::ToWorker::TcpOpened { from, writer } => {
                        self.tcp_writers.insert(from, writer);
                    }
                    reader::ToWorker::TcpClosed { from } => {
                        self.tcp_writers.remove(&from);
                    }
                },
                Some(event) = next_tcp(&mut tcp) => {
                    if let Some(r) = reader.as_mut() {
                        self.on_tcp(r, event, &mut own);
                    }
                }
                () = tokio::time::sleep_until(deadline.into()) => {
                    let now = Instant::now();
                    self.on_timers(now, reader.as_mut());
                    // Not again at the top of the loop.
                    deadline = now + IDLE;
                }
            }
        }
        for (_, mut p) in self.peers.drain() {
            let _ = p.pc.close();
        }
        tracing::info!(worker = self.worker, "media worker stopped");
    }

    /// Connections' timers that are due, deferred keyframe requests,
    /// silent connections (once per [`IDLE`]), the reader's registrations.
    fn on_timers(&mut self, now: Instant, reader: Option<&mut reader::Reader>) {
        while let Some(&Reverse((at, key))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(p) = self.peers.get_mut(&key) else {
                continue;
            };
            if p.timeout != Some(at) {
                continue; // stale: its timer moved
            }
            p.timeout = None;
            let _ = p.pc.handle_timeout(now);
            self.touched.push(key);
            self.drain(key);
        }
        self.apply_actions();
        self.poll_keyframes(now);
        if self.sweep_due <= now {
            self.sweep_silent(now);
            self.prune_histories(now);
            self.sweep_due = now + IDLE;
            self.worker_rooms.set(self.router.room_count() as i64);
        }
        if let Some(r) = reader {
            r.apply_control();
        }
    }

    /// The earliest connection timer (stale entries dropped on the way).
    fn next_timer(&mut self) -> Option<Instant> {
        while let Some(&Reverse((at, key))) = self.timers.peek() {
            if self.peers.get(&key).is_some_and(|p| p.timeout == Some(at)) {
                return Some(at);
            }
            self.timers.pop();
        }
        None
    }

    // -- input ------------------------------------------------------------

    fn on_tcp(
        &mut self,
        reader: &mut reader::Reader,
        event: TcpEvent,
        own: &mut Vec<reader::Inbound>,
    ) {
        match event {
            TcpEvent::Opened { from, writer } => {
                reader.tcp_broadcast(|| reader::ToWorker::TcpOpened {
                    from,
                    writer: writer.clone(),
                });
                self.tcp_writers.insert(from, writer);
            }
            TcpEvent::Packet { from, data } => {
                self.metrics.media_tcp_in.inc();
                reader.tcp_packet(data, from, own);
                self.on_datagrams(own);
            }
            TcpEvent::Closed { from } => {
                reader.tcp_broadcast(|| reader::ToWorker::TcpClosed { from });
                self.tcp_writers.remove(&from);
            }
        }
    }

    /// Opens a direct socket for each peer whose media (not only ICE
    /// checks) worker 0 handed over from an address without one.
    fn open_direct(&mut self, batch: &[reader::Inbound]) {
        let Some(direct) = self.direct.as_mut() else {
            return;
        };
        let now = Instant::now();
        for inbound in batch {
            // DTLS or RTP/RTCP: the selected path, not only ICE checks.
            let media = !matches!(classify(&inbound.data), Ok(PacketKind::Stun) | Err(_));
            if inbound.protocol != TransportProtocol::UDP
                || !media
                || !self.peers.contains_key(&inbound.key)
                || !direct.wants(inbound.key, inbound.from, now)
            {
                continue;
            }
            match direct.open(inbound.key, inbound.from, now) {
                Ok(()) => {
                    tracing::debug!(worker = self.worker, key = inbound.key.0, from = %inbound.from, "direct socket")
                }
                Err(e) => {
                    tracing::debug!(worker = self.worker, from = %inbound.from, error = %e, "no direct socket")
                }
            }
        }
    }

    /// A batch of routed datagrams for this worker's connections.
    fn on_datagrams(&mut self, batch: &mut Vec<reader::Inbound>) {
        self.worker_datagrams.inc_by(batch.len() as u64);
        for inbound in batch.drain(..) {
            self.on_packet(inbound);
        }
    }

    /// One datagram (UDP) or framed packet (ICE-TCP), routed to its
    /// connection.
    fn on_packet(&mut self, inbound: reader::Inbound) {
        let reader::Inbound {
            key,
            from,
            protocol,
            data,
            at,
        } = inbound;
        let Some(peer) = self.peers.get_mut(&key) else {
            self.metrics.media_dropped("unknown-peer");
            return;
        };
        self.metrics.media_in(data.len());
        self.touched.push(key);
        peer.last_rx = at;
        if protocol == TransportProtocol::UDP {
            peer.paths.heard(from, at);
        }
        let msg = TaggedBytesMut {
            now: at,
            transport: TransportContext {
                local_addr: self.announce,
                peer_addr: from,
                ecn: None,
                transport_protocol: protocol,
            },
            message: data,
        };
        if let Err(e) = peer.pc.handle_read(msg) {
            tracing::debug!(participant = %peer.participant, error = %e, "bad media datagram");
            self.metrics.media_dropped("rejected");
        }
        self.drain(key);
        self.apply_actions();
    }

    /// Writes the pending datagrams of the connections touched since the
    /// last flush (of all after [`Engine::scan_all`]) to the socket, up to
    /// [`batch::BATCH`] per system call, and files their next timers.
    fn flush(&mut self) {
        let now = Instant::now();
        let mut keys = std::mem::take(&mut self.touched);
        if std::mem::take(&mut self.scan_all) {
            keys.clear();
            keys.extend(self.peers.keys().copied());
        } else {
            keys.sort_unstable();
            keys.dedup();
        }
        for key in keys.drain(..) {
            let Some(p) = self.peers.get_mut(&key) else {
                continue;
            };
            while let Some(out) = p.pc.poll_write() {
                if out.transport.transport_protocol == TransportProtocol::TCP {
                    let sent = self
                        .tcp_writers
                        .get(&out.transport.peer_addr)
                        .is_some_and(|w| w.try_send(frame_packet(&out.message)).is_ok());
                    if sent {
                        self.metrics.media_out(out.message.len());
                    } else {
                        self.metrics.media_dropped("tcp-send-failed");
                    }
                    continue;
                }
                if self.send.is_full() {
                    send_batch(&mut self.send, &self.out, &self.metrics);
                }
                let to = p.paths.destination(out.transport.peer_addr, now);
                self.send.push(out.message, to);
            }
            let timeout = p.pc.poll_timeout();
            if timeout != p.timeout {
                p.timeout = timeout;
                if let Some(at) = timeout {
                    self.timers.push(Reverse((at, key)));
                }
            }
        }
        self.touched = keys;
        send_batch(&mut self.send, &self.out, &self.metrics);
        // Stale entries pile up when timers move later; start over then.
        if self.timers.len() > 4 * self.peers.len() + 64 {
            self.timers = self
                .peers
                .iter()
                .filter_map(|(k, p)| p.timeout.map(|at| Reverse((at, *k))))
                .collect();
        }
    }
}

/// Resolves when worker 0's socket is readable; never on other workers.
async fn readable(reader: &Option<reader::Reader>) {
    match reader {
        Some(r) => r.readable().await,
        None => std::future::pending().await,
    }
}

/// Resolves when a direct socket may have something to read; never
/// without direct sockets.
async fn direct_readable(
    ready: &Option<super::direct::Readiness>,
) -> Option<tokio::io::unix::AsyncFdReadyGuard<'_, super::direct::EpollFd>> {
    match ready {
        Some(r) => r.readable().await.ok(),
        None => std::future::pending().await,
    }
}

/// The next message from the reader; never on worker 0.
async fn next_inbound(
    inbound: &mut Option<mpsc::Receiver<reader::ToWorker>>,
) -> Option<reader::ToWorker> {
    match inbound {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Sends what `batch` holds on `socket` and counts it.
fn send_batch(batch: &mut batch::SendBatch, socket: &std::net::UdpSocket, metrics: &Metrics) {
    use std::os::fd::AsRawFd;
    let sent = batch.send(socket.as_raw_fd());
    metrics.media_out_many(sent.datagrams, sent.bytes);
    for _ in 0..sent.failed {
        metrics.media_dropped("send-failed");
    }
}
