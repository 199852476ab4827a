//! Cluster mode (`--redis-url`): several nodes behind one URL, rooms placed
//! on and found through Redis.
//!
//! - Each node announces itself and its load every [`KEEPALIVE`]
//!   ([`directory`]); a node whose announcement expired is dead.
//! - A room is owned by one node (a claim in Redis). A `join` for a room no
//!   live node owns claims it for the least-loaded live node
//!   ([`placement::choose`]), which may be another node.
//! - A client connected to node A whose room is owned by node B stays
//!   connected to A; A relays its frames to B and B's answers back over
//!   Redis pub/sub ([`envelope`]); B runs the connection's session as if it
//!   were local (the `relay` module). Media goes straight to B: the
//!   candidates in B's answer are B's.
//! - A dead owner: A tells its clients `room-closed` with `rejoin`, and
//!   their next join lands on a live node. A dead origin: B keeps its
//!   participants for a `resume` (through any node), as for a dropped
//!   WebSocket.
//! - Redis unreachable: rooms this node owns go on (joins to them are
//!   served locally); other joins get `unavailable`; `/readyz` is 503.

pub mod directory;
pub mod envelope;
pub mod placement;
mod relay;

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use switchboard_proto::RoomName;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::ClusterConfig;
use crate::hub::{Client, Hub, Outbox};
use crate::metrics::{Metrics, Placement, RedisOp, RelayDirection, RelayDrop};
use directory::{relay_channel, Directory, Found};
use envelope::{conn_name, split_conn, Envelope};
use placement::NodeInfo;
pub use relay::RelayCtl;

/// How often a node announces itself and refreshes its rooms' claims.
pub const KEEPALIVE: Duration = Duration::from_millis(1500);
/// How often relayed connections' peers are checked for life.
const LIVENESS: Duration = Duration::from_secs(1);
/// Longest wait for one Redis round trip before the operation fails.
const REDIS_TIMEOUT: Duration = Duration::from_millis(1500);
/// Envelopes waiting to be published (all connections of this node).
const PUBLISH_QUEUE: usize = 8192;
/// Envelopes published in one pipeline.
const PUBLISH_BATCH: usize = 64;

/// Where a join or resume goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placed {
    /// Served by this node.
    Local,
    /// Relayed to this node.
    Remote(String),
    /// Cannot be placed now (Redis unreachable, no live node).
    Unavailable(&'static str),
}

/// The origin side of one relayed connection.
struct OriginLink {
    owner: String,
    outbox: Outbox,
    ctl: mpsc::Sender<RelayCtl>,
}

pub struct Cluster {
    me: String,
    client: redis::Client,
    conn: Mutex<Option<ConnectionManager>>,
    dir: Directory,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    /// Live nodes as of the last keepalive, with local adjustments for the
    /// rooms placed since.
    live: Mutex<Vec<NodeInfo>>,
    redis_up: AtomicBool,
    draining: AtomicBool,
    next_conn: AtomicU64,
    /// Relayed connections whose WebSocket is here, by number.
    origin: DashMap<u64, OriginLink>,
    /// Relayed connections whose room is here, by (origin node, number).
    remote: DashMap<(String, u64), relay::RemoteLink>,
    publish: mpsc::Sender<(String, String)>,
    /// Wakes the keepalive early (a drain must reach Redis at once).
    wake: Notify,
    shutdown: CancellationToken,
    media: Option<String>,
    envelope_limit: usize,
}

impl Cluster {
    /// Starts cluster mode: the keepalive, the relay's subscriber and
    /// publisher, and the liveness check. Never fails: an unreachable
    /// Redis leaves the node not ready until it is back.
    pub fn start(
        config: &ClusterConfig,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        media: Option<String>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Cluster>, redis::RedisError> {
        let client = redis::Client::open(config.redis_url.as_str())?;
        let (publish, publish_rx) = mpsc::channel(PUBLISH_QUEUE);
        let envelope_limit = envelope::max_envelope_bytes(hub.config().limits.max_frame_bytes);
        let cluster = Arc::new(Cluster {
            me: config.node_id.clone(),
            client,
            conn: Mutex::new(None),
            dir: Directory::default(),
            hub,
            metrics,
            live: Mutex::new(Vec::new()),
            redis_up: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
            origin: DashMap::new(),
            remote: DashMap::new(),
            publish,
            wake: Notify::new(),
            shutdown,
            media,
            envelope_limit,
        });
        tracing::info!(node = %cluster.me, "cluster mode: Redis directory");
        tokio::spawn(cluster.clone().keepalive());
        tokio::spawn(cluster.clone().subscribe());
        tokio::spawn(cluster.clone().publisher(publish_rx));
        tokio::spawn(cluster.clone().liveness());
        Ok(cluster)
    }

    pub fn node_id(&self) -> &str {
        &self.me
    }

    /// Redis reachable and this node announced.
    pub fn is_ready(&self) -> bool {
        self.redis_up.load(Ordering::Relaxed)
    }

    /// Takes no new rooms from now on; tells Redis at once.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    fn conn(&self) -> Option<ConnectionManager> {
        self.conn.lock().ok().and_then(|c| c.clone())
    }

    /// Times one Redis operation into the metrics; a timeout is an error.
    async fn timed<T>(
        &self,
        op: RedisOp,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        let started = Instant::now();
        let r = tokio::time::timeout(REDIS_TIMEOUT, f).await;
        self.metrics
            .cluster
            .redis_op(op, started.elapsed().as_secs_f64());
        match r {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                tracing::debug!(op = op.as_str(), error = %e, "redis error");
                self.metrics.cluster.redis_error(op);
                None
            }
            Err(_) => {
                tracing::debug!(op = op.as_str(), "redis timeout");
                self.metrics.cluster.redis_error(op);
                None
            }
        }
    }

    /// Where a `join` (or, with `lookup_only`, a `resume`) for `room` goes.
    pub async fn place(&self, room: &RoomName, lookup_only: bool) -> Placed {
        let m = &self.metrics.cluster;
        // A room this node holds is served here, Redis or not.
        if self.hub.has_room(room) {
            m.placed(Placement::ExistingLocal);
            return Placed::Local;
        }
        let Some(mut conn) = self.conn().filter(|_| self.is_ready()) else {
            m.placed(Placement::Unavailable);
            return Placed::Unavailable("the room directory (Redis) cannot be reached; try again");
        };
        // A candidate found dead is dropped from the view and the next
        // one tried (a few times: each try is one round trip).
        let mut found = None;
        for _ in 0..3 {
            let candidate = if lookup_only {
                None
            } else {
                match self.candidate() {
                    Some(c) => Some(c),
                    None => {
                        m.placed(Placement::Unavailable);
                        return Placed::Unavailable("no node can take a new room now; try again");
                    }
                }
            };
            found = self
                .timed(
                    RedisOp::Place,
                    self.dir
                        .place(&mut conn, room.as_str(), candidate.as_deref()),
                )
                .await;
            match &found {
                Some(Found::Stale(dead)) => self.forget_node(dead),
                _ => break,
            }
        }
        let (owner, outcome) = match found {
            None | Some(Found::Stale(_)) => {
                m.placed(Placement::Unavailable);
                return Placed::Unavailable(
                    "the room directory (Redis) cannot be reached; try again",
                );
            }
            // Nobody holds the room a `resume` names: resume here, which
            // fails cleanly (`resume-failed`) and the client joins again.
            Some(Found::Nobody) => return Placed::Local,
            Some(Found::Existing(owner)) => {
                let local = owner == self.me;
                let outcome = if local {
                    Placement::ExistingLocal
                } else {
                    Placement::ExistingRemote
                };
                (owner, outcome)
            }
            Some(Found::Claimed(owner)) => {
                self.count_placed(&owner);
                let outcome = if owner == self.me {
                    Placement::Local
                } else {
                    Placement::Remote
                };
                (owner, outcome)
            }
            Some(Found::TakenOver(owner)) => {
                self.count_placed(&owner);
                (owner, Placement::Takeover)
            }
        };
        m.placed(outcome);
        tracing::debug!(room = %room, %owner, outcome = outcome.as_str(), "placed");
        if owner == self.me {
            Placed::Local
        } else {
            Placed::Remote(owner)
        }
    }

    /// The node a new room goes to now.
    fn candidate(&self) -> Option<String> {
        let live = self.live.lock().ok()?;
        let mut view: Vec<NodeInfo> = live.clone();
        drop(live);
        // This node's own load is known now, not as of the last keepalive.
        let draining = self.draining.load(Ordering::Relaxed) || self.hub.is_draining();
        match view.iter_mut().find(|n| n.id == self.me) {
            Some(me) => {
                me.participants = self.hub.participant_count() as u64;
                me.rooms = self.hub.room_count() as u64;
                me.draining = draining;
            }
            None => view.push(self.info(0.0)),
        }
        placement::choose(&view).map(|n| n.id.clone())
    }

    /// Drops a dead node from the view of live nodes (until the next
    /// keepalive reads them all again).
    fn forget_node(&self, node: &str) {
        if node == self.me {
            return;
        }
        if let Ok(mut live) = self.live.lock() {
            live.retain(|n| n.id != node);
            self.metrics.cluster.nodes_live.set(live.len() as i64);
        }
    }

    /// Counts a room just placed on `node` in the local view, so the rooms
    /// placed before the next keepalive spread instead of piling onto the
    /// node that looked least loaded.
    fn count_placed(&self, node: &str) {
        if let Ok(mut live) = self.live.lock() {
            if let Some(n) = live.iter_mut().find(|n| n.id == node) {
                n.participants += 1;
                n.rooms += 1;
            }
        }
    }

    fn info(&self, cpu: f32) -> NodeInfo {
        NodeInfo {
            id: self.me.clone(),
            participants: self.hub.participant_count() as u64,
            rooms: self.hub.room_count() as u64,
            cpu,
            draining: self.draining.load(Ordering::Relaxed) || self.hub.is_draining(),
            media: self.media.clone(),
        }
    }

    /// Announces the node, refreshes and releases its rooms' claims, and
    /// reads the live nodes, every [`KEEPALIVE`]; connects (and reconnects)
    /// to Redis with backoff.
    async fn keepalive(self: Arc<Self>) {
        let mut cpu = CpuMeter::new();
        let mut claimed: HashSet<String> = HashSet::new();
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.shutdown.is_cancelled() {
                self.leave(&claimed).await;
                return;
            }
            let Some(mut conn) = self.connect().await else {
                // Counted, so a node that never reached Redis shows too.
                self.metrics.cluster.redis_error(RedisOp::Keepalive);
                self.set_up(false);
                tokio::select! {
                    () = self.shutdown.cancelled() => {}
                    () = tokio::time::sleep(jitter(backoff)) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            };
            backoff = Duration::from_millis(100);
            let rooms: Vec<String> = self
                .hub
                .room_names()
                .into_iter()
                .map(|r| r.as_str().to_owned())
                .collect();
            let me = self.info(cpu.cores());
            match self
                .timed(
                    RedisOp::Keepalive,
                    self.dir.keepalive(&mut conn, &me, &rooms),
                )
                .await
            {
                Some((live, lost)) => {
                    for room in &lost {
                        tracing::warn!(%room, "another node claims a room this node holds");
                    }
                    let now: HashSet<String> = rooms.into_iter().collect();
                    let owned = now.len();
                    let gone: Vec<String> = claimed.difference(&now).cloned().collect();
                    let released = gone.is_empty()
                        || self
                            .timed(RedisOp::Claim, self.dir.release(&mut conn, &self.me, &gone))
                            .await
                            .is_some();
                    // Unreleased claims are tried again next round (or expire).
                    claimed = if released {
                        now
                    } else {
                        now.into_iter().chain(gone).collect()
                    };
                    let m = &self.metrics.cluster;
                    m.nodes_live.set(live.len() as i64);
                    m.rooms_owned.set(owned as i64);
                    if let Ok(mut l) = self.live.lock() {
                        *l = live;
                    }
                    self.set_up(true);
                }
                None => self.set_up(false),
            }
            tokio::select! {
                () = self.shutdown.cancelled() => {}
                () = self.wake.notified() => {}
                () = tokio::time::sleep(KEEPALIVE) => {}
            }
        }
    }

    /// A clean stop: the node's registration and claims go at once, so
    /// its rooms can be placed elsewhere without waiting for expiry.
    async fn leave(&self, claimed: &HashSet<String>) {
        let Some(mut conn) = self.conn() else { return };
        let rooms: Vec<String> = claimed.iter().cloned().collect();
        let _ = self
            .timed(
                RedisOp::Claim,
                self.dir.release(&mut conn, &self.me, &rooms),
            )
            .await;
        let _ = self
            .timed(RedisOp::Keepalive, self.dir.deregister(&mut conn, &self.me))
            .await;
        tracing::info!("left the cluster");
    }

    fn set_up(&self, up: bool) {
        let was = self.redis_up.swap(up, Ordering::Relaxed);
        self.metrics.cluster.redis_up.set(i64::from(up));
        if was != up {
            if up {
                tracing::info!("Redis reachable; node announced");
            } else {
                tracing::warn!("Redis unreachable; new rooms elsewhere cannot be placed");
            }
        }
    }

    /// The shared connection, made on first use (the connection manager
    /// then reconnects by itself).
    async fn connect(&self) -> Option<ConnectionManager> {
        if let Some(c) = self.conn() {
            return Some(c);
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(1))
            .set_response_timeout(REDIS_TIMEOUT)
            .set_number_of_retries(1)
            .set_max_delay(1000);
        let c = tokio::time::timeout(
            Duration::from_secs(3),
            self.client.get_connection_manager_with_config(config),
        )
        .await
        .ok()?
        .map_err(|e| tracing::debug!(error = %e, "cannot connect to Redis"))
        .ok()?;
        if let Ok(mut slot) = self.conn.lock() {
            *slot = Some(c.clone());
        }
        Some(c)
    }

    /// Sends an envelope to `node` (in order with everything else this
    /// node sends); false when the queue is full.
    fn send(&self, node: &str, env: &Envelope) -> bool {
        match self.publish.try_send((relay_channel(node), env.to_json())) {
            Ok(()) => true,
            Err(_) => {
                self.metrics.cluster.relay_dropped(RelayDrop::QueueFull);
                false
            }
        }
    }

    /// Publishes queued envelopes, in order, a pipeline at a time.
    async fn publisher(self: Arc<Self>, mut rx: mpsc::Receiver<(String, String)>) {
        let mut batch = Vec::with_capacity(PUBLISH_BATCH);
        while rx.recv_many(&mut batch, PUBLISH_BATCH).await > 0 {
            let Some(mut conn) = self.conn() else {
                self.metrics.cluster.redis_error(RedisOp::Publish);
                batch.clear();
                continue;
            };
            let mut pipe = redis::pipe();
            for (channel, payload) in batch.drain(..) {
                pipe.publish(channel, payload).ignore();
            }
            let _ = self
                .timed(RedisOp::Publish, pipe.query_async::<()>(&mut conn))
                .await;
        }
    }

    /// Receives this node's envelopes; resubscribes with backoff when the
    /// subscription drops.
    async fn subscribe(self: Arc<Self>) {
        let channel = relay_channel(&self.me);
        let mut backoff = Duration::from_millis(100);
        loop {
            let pubsub = tokio::time::timeout(Duration::from_secs(3), async {
                let mut ps = self.client.get_async_pubsub().await?;
                ps.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(ps)
            })
            .await;
            if let Ok(Ok(mut ps)) = pubsub {
                backoff = Duration::from_millis(100);
                let mut stream = ps.on_message();
                loop {
                    tokio::select! {
                        () = self.shutdown.cancelled() => break,
                        msg = stream.next() => match msg {
                            Some(msg) => self.dispatch(msg.get_payload_bytes()),
                            None => break,
                        },
                    }
                }
                tracing::debug!("relay subscription ended");
            }
            if self.shutdown.is_cancelled() {
                // Go on receiving for the shutdown grace: rooms here are
                // closing and their relayed clients must hear it.
                tokio::time::sleep(Duration::from_secs(1)).await;
                if self.remote.is_empty() && self.origin.is_empty() {
                    return;
                }
            }
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Routes one received envelope.
    fn dispatch(self: &Arc<Self>, payload: &[u8]) {
        let m = &self.metrics.cluster;
        let Some(env) = Envelope::parse(payload, self.envelope_limit) else {
            m.relay_dropped(RelayDrop::Malformed);
            return;
        };
        let Some((node, n)) = split_conn(env.conn()) else {
            m.relay_dropped(RelayDrop::Malformed);
            return;
        };
        let node = node.to_owned();
        match env {
            // For the owner (this node): the client is elsewhere.
            Envelope::Open { ip, t, kind, .. } => relay::open(self, node, n, ip, t, kind),
            Envelope::Frame { c, t } => relay::frame(self, (node, n), c, t),
            Envelope::Close { bye, .. } => relay::close(self, &(node, n), bye),
            // For the origin (this node): `node` must be this one.
            env if node != self.me => {
                tracing::debug!(conn = env.conn(), "an owner's envelope for another origin");
                m.relay_dropped(RelayDrop::Malformed);
            }
            Envelope::Text { t, .. } => match self.origin.get(&n) {
                Some(link) => {
                    m.relayed(RelayDirection::ToClient);
                    link.outbox.push(Utf8Bytes::from(t));
                }
                None => m.relay_dropped(RelayDrop::UnknownConnection),
            },
            Envelope::End { .. } => self.to_origin(n, RelayCtl::End),
            Envelope::Bounce { t, .. } => self.to_origin(n, RelayCtl::Bounce(Utf8Bytes::from(t))),
            Envelope::Closed { why, .. } => self.to_origin(n, RelayCtl::Closed(why)),
        }
    }

    fn to_origin(&self, n: u64, ctl: RelayCtl) {
        match self.origin.get(&n) {
            Some(link) => {
                if link.ctl.try_send(ctl).is_err() {
                    self.metrics.cluster.relay_dropped(RelayDrop::QueueFull);
                    link.outbox.close();
                }
            }
            None => self
                .metrics
                .cluster
                .relay_dropped(RelayDrop::UnknownConnection),
        }
    }

    /// Starts relaying a connection to `owner` with its first frame;
    /// returns its number. `None` when the relay queue is full.
    pub fn open_relay(
        &self,
        owner: &str,
        outbox: &Outbox,
        ctl: mpsc::Sender<RelayCtl>,
        ip: IpAddr,
        first: &str,
        kind: Client,
    ) -> Option<u64> {
        let n = self.next_conn.fetch_add(1, Ordering::Relaxed);
        self.origin.insert(
            n,
            OriginLink {
                owner: owner.to_owned(),
                outbox: outbox.clone(),
                ctl,
            },
        );
        let env = Envelope::Open {
            c: conn_name(&self.me, n),
            ip,
            t: first.to_owned(),
            kind,
        };
        if self.send(owner, &env) {
            self.metrics.cluster.relayed(RelayDirection::ToOwner);
            Some(n)
        } else {
            self.origin.remove(&n);
            None
        }
    }

    /// Relays one more client frame; false when the queue is full.
    pub fn forward(&self, n: u64, owner: &str, text: &str) -> bool {
        let env = Envelope::Frame {
            c: conn_name(&self.me, n),
            t: text.to_owned(),
        };
        let ok = self.send(owner, &env);
        if ok {
            self.metrics.cluster.relayed(RelayDirection::ToOwner);
        }
        ok
    }

    /// The relay of connection `n` is over (ended by the owner, or the
    /// owner died); `close` with `bye`: the client's WebSocket ended too.
    pub fn end_relay(&self, n: u64, owner: &str, close: Option<bool>) {
        self.origin.remove(&n);
        if let Some(bye) = close {
            self.send(
                owner,
                &Envelope::Close {
                    c: conn_name(&self.me, n),
                    bye,
                },
            );
        }
    }

    /// Every second: relayed connections whose other end's node died.
    async fn liveness(self: Arc<Self>) {
        let mut tick = tokio::time::interval(LIVENESS);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut nodes: Vec<String> = self.origin.iter().map(|l| l.owner.clone()).collect();
            nodes.extend(self.remote.iter().map(|e| e.key().0.clone()));
            nodes.sort();
            nodes.dedup();
            if nodes.is_empty() {
                continue;
            }
            let Some(mut conn) = self.conn().filter(|_| self.is_ready()) else {
                continue;
            };
            let Some(alive) = self
                .timed(RedisOp::Liveness, self.dir.alive(&mut conn, &nodes))
                .await
            else {
                continue;
            };
            for (node, alive) in nodes.iter().zip(alive) {
                if alive {
                    continue;
                }
                tracing::warn!(%node, "a node holding relayed connections died");
                self.forget_node(node);
                for link in self.origin.iter().filter(|l| l.owner == *node) {
                    if link.ctl.try_send(RelayCtl::OwnerLost).is_err() {
                        link.outbox.close();
                    }
                }
                relay::origin_lost(&self, node);
            }
        }
    }
}

/// `d` plus up to a quarter more, so nodes that lost Redis together do
/// not come back in step.
fn jitter(d: Duration) -> Duration {
    d + d.mul_f64(rand::random::<f64>() * 0.25)
}

/// This process's CPU use between two readings, in cores.
struct CpuMeter {
    last: Option<(Instant, f64)>,
}

impl CpuMeter {
    fn new() -> CpuMeter {
        CpuMeter { last: None }
    }

    fn cores(&mut self) -> f32 {
        let Some(secs) = process_cpu_seconds() else {
            return 0.0;
        };
        let now = Instant::now();
        let used = match self.last {
            Some((at, before)) => {
                let wall = now.duration_since(at).as_secs_f64();
                if wall > 0.0 {
                    ((secs - before) / wall) as f32
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        self.last = Some((now, secs));
        used
    }
}

/// User + system CPU seconds of this process (Linux `/proc/self/stat`,
/// clock ticks of 1/100 s).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}
