//! Outboxes: the write side of each connection, bounded, kicked when full.

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use switchboard_proto::{ParticipantId, ServerMessage};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Messages a connection has yet to write, in order.
pub const OUTBOX_CAPACITY: usize = 512;

/// The write side of one connection.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Utf8Bytes>,
    /// Cancelled when the connection must be closed because it cannot keep up.
    kick: CancellationToken,
}

impl Outbox {
    /// Closes the connection behind this outbox (as a kick does).
    pub fn close(&self) {
        self.kick.cancel();
    }

    pub fn new() -> (Outbox, mpsc::Receiver<Utf8Bytes>, CancellationToken) {
        let (tx, rx) = mpsc::channel(OUTBOX_CAPACITY);
        let kick = CancellationToken::new();
        (
            Outbox {
                tx,
                kick: kick.clone(),
            },
            rx,
            kick,
        )
    }

    /// Whether `other` writes to the same connection.
    pub fn same(&self, other: &Outbox) -> bool {
        self.tx.same_channel(&other.tx)
    }

    /// Queues `text`; a full or closed outbox kicks the connection.
    pub fn push(&self, text: Utf8Bytes) -> bool {
        match self.tx.try_send(text) {
            Ok(()) => true,
            Err(_) => {
                self.kick.cancel();
                false
            }
        }
    }
}

/// Every joined participant's outbox, shared by the hub and the media plane.
#[derive(Default)]
pub struct Outboxes {
    pub(super) map: DashMap<ParticipantId, Outbox>,
}

impl Outboxes {
    /// Sends `msg` to `id` if it is still connected.
    pub fn send(&self, id: &ParticipantId, msg: &ServerMessage, metrics: &Metrics) -> bool {
        let Some(outbox) = self.map.get(id) else {
            return false;
        };
        metrics.sent(msg.type_name(), 1);
        if let ServerMessage::Error(e) = msg {
            metrics.error(e.code);
        }
        outbox.push(Utf8Bytes::from(msg.to_text()))
    }
}
