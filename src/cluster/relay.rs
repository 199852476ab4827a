//! The owner side of relayed connections: a session run here for a client
//! whose WebSocket is on another node (its origin), fed with the frames the
//! origin relays and writing its outbox back through Redis.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use switchboard_proto::ServerMessage;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::envelope::{conn_name, Envelope};
use super::Cluster;
use crate::hub::{Client, Outbox};
use crate::metrics::RelayDrop;
use crate::session::{Ending, Next, Session, REASON_REPLACED, REASON_SLOW};

/// Frames from the origin waiting for the session (per connection).
const INBOX: usize = 256;

/// What the origin side of a relayed connection is told by its owner.
#[derive(Debug)]
pub enum RelayCtl {
    /// The connection is out of the owner's rooms; handle frames here again.
    End,
    /// A frame the owner did not take (it came after `End`): handle it here.
    Bounce(Utf8Bytes),
    /// Close the WebSocket, with this reason.
    Closed(String),
    /// The owner died: its rooms are gone.
    OwnerLost,
}

/// What the owner side of a relayed connection receives.
enum RemoteIn {
    Frame(Utf8Bytes),
    /// The client's WebSocket ended (`true`: it said goodbye).
    Close(bool),
    /// The origin node died with the client's WebSocket.
    OriginLost,
}

pub(super) struct RemoteLink {
    tx: mpsc::Sender<RemoteIn>,
}

type Key = (String, u64);

/// `open`: a new relayed connection; runs its session here.
pub(super) fn open(
    cluster: &Arc<Cluster>,
    origin: String,
    n: u64,
    ip: IpAddr,
    first: String,
    kind: Client,
) {
    let key = (origin, n);
    if cluster.remote.contains_key(&key) {
        // A replayed `open`: the session exists; treat it as a frame.
        frame(cluster, key.clone(), conn_name(&key.0, n), first);
        return;
    }
    let (tx, rx) = mpsc::channel(INBOX);
    cluster.remote.insert(key.clone(), RemoteLink { tx });
    let span = tracing::info_span!(
        "relayed",
        origin = %key.0,
        conn = n,
        %ip,
        room = tracing::field::Empty,
        participant = tracing::field::Empty
    );
    let first = Utf8Bytes::from(first);
    let task = run(cluster.clone(), key, ip, kind, first, rx, span.clone());
    tokio::spawn(task.instrument(span));
}

/// `frame`: to its session, or back to the origin when there is none.
pub(super) fn frame(cluster: &Arc<Cluster>, key: Key, c: String, t: String) {
    let text = Utf8Bytes::from(t);
    let refused = match cluster.remote.get(&key) {
        Some(link) => match link.tx.try_send(RemoteIn::Frame(text)) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(_)) => {
                cluster.metrics.cluster.relay_dropped(RelayDrop::QueueFull);
                return;
            }
            Err(mpsc::error::TrySendError::Closed(RemoteIn::Frame(t))) => t,
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        },
        None => text,
    };
    cluster.send(
        &key.0,
        &Envelope::Bounce {
            c,
            t: refused.as_str().to_owned(),
        },
    );
}

/// `close`: the client's WebSocket on the origin ended.
pub(super) fn close(cluster: &Arc<Cluster>, key: &Key, bye: bool) {
    match cluster.remote.get(key) {
        Some(link) => {
            if link.tx.try_send(RemoteIn::Close(bye)).is_err() {
                cluster.metrics.cluster.relay_dropped(RelayDrop::QueueFull);
            }
        }
        None => cluster
            .metrics
            .cluster
            .relay_dropped(RelayDrop::UnknownConnection),
    }
}

/// The origin node died: its clients' participants here are kept for a
/// `resume`, as after a dropped WebSocket.
pub(super) fn origin_lost(cluster: &Arc<Cluster>, origin: &str) {
    for link in cluster.remote.iter().filter(|e| e.key().0 == origin) {
        let _ = link.tx.try_send(RemoteIn::OriginLost);
    }
}

/// One relayed connection's session, until it leaves its room or its
/// client is gone.
async fn run(
    cluster: Arc<Cluster>,
    key: Key,
    ip: IpAddr,
    kind: Client,
    first: Utf8Bytes,
    mut inbox: mpsc::Receiver<RemoteIn>,
    span: tracing::Span,
) {
    let c = conn_name(&key.0, key.1);
    let origin = key.0.clone();
    let (outbox, mut rx, kick) = Outbox::new();
    let mut session = Session::new(cluster.hub.clone(), span, ip, None).with_client(kind);
    let send = |env: Envelope| {
        cluster.send(&origin, &env);
    };
    // Everything the session queued for the client, in order.
    let flush = |rx: &mut mpsc::Receiver<Utf8Bytes>| {
        while let Ok(t) = rx.try_recv() {
            send(Envelope::Text {
                c: c.clone(),
                t: t.as_str().to_owned(),
            });
        }
    };
    let shutdown = cluster.shutdown.clone();
    let mut next = session.on_text(&outbox, &first);
    loop {
        if let Next::Close(why, _, reason) = next {
            flush(&mut rx);
            send(Envelope::Closed {
                c: c.clone(),
                why: reason.to_owned(),
            });
            tracing::info!(reason = why.as_str(), "closing a relayed connection");
            session.depart(&outbox, Ending::Lost);
            break;
        }
        if !session.in_room() {
            flush(&mut rx);
            send(Envelope::End { c: c.clone() });
            break;
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                // This node is going: its rooms close, and the client (whose
                // connection lives on at its origin) joins again elsewhere.
                session.reply(&outbox, &ServerMessage::room_lost("the node hosting this room is shutting down; join again"));
                session.depart(&outbox, Ending::Shutdown);
                flush(&mut rx);
                send(Envelope::End { c: c.clone() });
                break;
            }
            () = kick.cancelled() => {
                let reason = if session.replaced(&outbox) {
                    REASON_REPLACED
                } else {
                    REASON_SLOW
                };
                flush(&mut rx);
                send(Envelope::Closed { c: c.clone(), why: reason.to_owned() });
                session.depart(&outbox, Ending::Lost);
                break;
            }
            Some(t) = rx.recv() => {
                send(Envelope::Text { c: c.clone(), t: t.as_str().to_owned() });
                next = Next::Continue;
            }
            msg = inbox.recv() => match msg {
                Some(RemoteIn::Frame(t)) => next = session.on_text(&outbox, &t),
                Some(RemoteIn::Close(bye)) => {
                    session.depart(&outbox, if bye { Ending::Goodbye } else { Ending::Lost });
                    break;
                }
                Some(RemoteIn::OriginLost) | None => {
                    session.depart(&outbox, Ending::Lost);
                    break;
                }
            },
        }
    }
    // Frames that were on their way: back to the origin, after `end`.
    cluster.remote.remove(&key);
    inbox.close();
    while let Ok(msg) = inbox.try_recv() {
        if let RemoteIn::Frame(t) = msg {
            send(Envelope::Bounce {
                c: c.clone(),
                t: t.as_str().to_owned(),
            });
        }
    }
}
