//! The hub: every room and every joined participant's outbox.
//!
//! Sessions call the hub with parsed requests; the hub runs the pure [`Room`]
//! logic under that room's map entry lock and writes the resulting effects
//! into the recipients' outboxes, serializing each message once however many
//! receive it. Nothing here awaits: outboxes are bounded channels written
//! with `try_send`, and a recipient whose outbox is full is kicked (its
//! session closes it) instead of slowing the room down.
//!
//! Lock order: a `rooms` entry may be held while touching `outboxes`; never
//! the other way round.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::ws::Utf8Bytes;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use rand::distr::{Alphanumeric, SampleString};
use switchboard_proto::{
    ErrorCode, Join, MediaMode, ParticipantId, RequestedMode, RoomName, ServerMessage, SignalData,
    SFU_PEER,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ice::ice_servers;
use crate::metrics::{Metrics, Refusal};
use crate::room::{Effect, JoinContext, Room, RoomError, RoomSettings, To};
use crate::sfu::{Command, MediaError, MediaPlane};

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
    map: DashMap<ParticipantId, Outbox>,
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

/// Requests the hub refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    #[error("you are not in room {0}")]
    NotInRoom(RoomName),
    #[error(transparent)]
    Room(#[from] RoomError),
    #[error("data for \"sfu\" must be an offer, answer or candidate: {0}")]
    BadSignal(String),
    #[error("the media plane cannot take this now: {0}")]
    Media(#[from] MediaError),
}

impl HubError {
    pub fn code(&self) -> ErrorCode {
        match self {
            HubError::NotInRoom(_) | HubError::Room(RoomError::NotAMember(_)) => {
                ErrorCode::NotInRoom
            }
            HubError::Room(
                RoomError::NoSuchPeer(_) | RoomError::SelfAddressed | RoomError::SfuUnavailable,
            ) => ErrorCode::NoSuchPeer,
            HubError::BadSignal(_) => ErrorCode::BadRequest,
            HubError::Media(_) => ErrorCode::Internal,
        }
    }
}

/// How a participant left its room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Departure {
    /// It sent `leave`: `leaved` to it, `bye` to the others.
    Left,
    /// Its connection ended: `bye` to the others.
    Vanished,
    /// The server is shutting down and everyone gets `room-closed`: no `bye`.
    ServerClosing,
}

/// The result of a join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinOutcome {
    /// Admitted with this id; `joined` (and the rest) are in the outbox.
    Joined(ParticipantId),
    /// Not admitted; `full` is in the outbox.
    Refused,
}

pub struct Hub {
    rooms: DashMap<RoomName, Room>,
    outboxes: Arc<Outboxes>,
    media: Option<MediaPlane>,
    room_count: AtomicUsize,
    /// Set when the server drains: no new joins.
    draining: std::sync::atomic::AtomicBool,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    /// Rooms waiting to return to `p2p` (`--p2p-return-ms`), with when.
    /// Plain mutex: held for a push or a drain, never across an await, and
    /// never while a `rooms` entry is being taken.
    returns: Mutex<Vec<(Instant, RoomName)>>,
}

impl Hub {
    /// A hub; `media` is the SFU media plane, if this server runs one.
    pub fn new(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        outboxes: Arc<Outboxes>,
        media: Option<MediaPlane>,
    ) -> Hub {
        Hub {
            rooms: DashMap::new(),
            outboxes,
            media,
            room_count: AtomicUsize::new(0),
            draining: std::sync::atomic::AtomicBool::new(false),
            config,
            metrics,
            returns: Mutex::new(Vec::new()),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Number of rooms now.
    pub fn room_count(&self) -> usize {
        self.room_count.load(Ordering::Relaxed)
    }

    /// Stops admitting joins (the server is draining).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Participants in rooms now.
    pub fn participant_count(&self) -> usize {
        self.outboxes.map.len()
    }

    /// Admits the connection behind `outbox` to `req.room`, creating the room
    /// if needed (with the mode and audio `req` asks for).
    pub fn join(&self, outbox: &Outbox, req: Join) -> JoinOutcome {
        if self.is_draining() {
            self.reply(
                outbox,
                &ServerMessage::error(
                    ErrorCode::RoomClosed,
                    "this server is draining and admits no new participants; try again",
                    Some("join"),
                ),
            );
            return JoinOutcome::Refused;
        }
        let id = self.new_participant_id();
        let ctx = JoinContext {
            ice_servers: ice_servers(&self.config.ice, &id, unix_now()),
            p2p_timeout_ms: self.config.p2p_timeout_ms,
        };
        let mut room = match self.rooms.entry(req.room.clone()) {
            Entry::Occupied(e) => e.into_ref(),
            Entry::Vacant(v) => {
                let max = self.config.limits.max_rooms;
                let admitted = self
                    .room_count
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < max).then_some(n + 1)
                    })
                    .is_ok();
                if !admitted {
                    self.metrics.refused(Refusal::TooManyRooms);
                    self.reply(
                        outbox,
                        &ServerMessage::Full(switchboard_proto::Full { room: req.room }),
                    );
                    return JoinOutcome::Refused;
                }
                self.metrics.rooms.inc();
                let settings = RoomSettings {
                    requested: req.mode.unwrap_or(RequestedMode::Auto),
                    audio: req.audio.unwrap_or(self.config.audio_mode),
                    max_participants: self.config.limits.max_participants,
                    p2p_return: self.config.p2p_return,
                };
                tracing::info!(room = %req.room, mode = ?settings.requested, audio = settings.audio.as_str(), "room created");
                v.insert(Room::new(req.room.clone(), &settings))
            }
        };
        match room.join(id.clone(), req.name, &ctx) {
            Ok(effects) => {
                self.metrics.room_resized(room.len() - 1, room.len());
                self.outboxes.map.insert(id.clone(), outbox.clone());
                self.metrics.participants.inc();
                self.deliver(&room, effects);
                JoinOutcome::Joined(id)
            }
            Err(refused) => {
                self.metrics.refused(Refusal::RoomFull);
                self.reply(outbox, &refused.reply);
                JoinOutcome::Refused
            }
        }
    }

    /// Removes `id` from `room`, telling whom [`Departure`] says. Frees the
    /// room when it is empty.
    pub fn leave(&self, room_name: &RoomName, id: &ParticipantId, how: Departure) {
        let (now_empty, return_due) = {
            let Some(mut room) = self.rooms.get_mut(room_name) else {
                return;
            };
            if !room.contains(id) {
                return;
            }
            let effects = room.leave(id, how == Departure::Left, Instant::now());
            self.metrics.room_resized(room.len() + 1, room.len());
            if how != Departure::ServerClosing {
                self.deliver_with_leaver(&room, effects, id);
            }
            (room.is_empty(), room.return_due())
        };
        if self.outboxes.map.remove(id).is_some() {
            self.metrics.participants.dec();
        }
        if let Some(at) = return_due {
            self.returns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((at, room_name.clone()));
        }
        if let Some(media) = &self.media {
            let left = Command::Left {
                room: room_name.clone(),
                participant: id.clone(),
            };
            if let Err(e) = media.send(left) {
                tracing::warn!(error = %e, participant = %id, "media plane missed a departure");
            }
        }
        if now_empty
            && self
                .rooms
                .remove_if(room_name, |_, r| r.is_empty())
                .is_some()
        {
            self.room_count.fetch_sub(1, Ordering::AcqRel);
            self.metrics.rooms.dec();
            tracing::info!(room = %room_name, "room freed");
        }
    }

    /// Relays `data` from `from` per `message`.
    pub fn relay(
        &self,
        room_name: &RoomName,
        from: &ParticipantId,
        to: Option<&str>,
        data: serde_json::Value,
    ) -> Result<(), HubError> {
        let room = self
            .rooms
            .get(room_name)
            .ok_or_else(|| HubError::NotInRoom(room_name.clone()))?;
        if let (Some(SFU_PEER), Some(media)) = (to, &self.media) {
            if !room.contains(from) {
                return Err(RoomError::NotAMember(from.clone()).into());
            }
            let data: SignalData =
                serde_json::from_value(data).map_err(|e| HubError::BadSignal(e.to_string()))?;
            media.send(Command::Signal {
                room: room_name.clone(),
                participant: from.clone(),
                sfu: room.mode() == MediaMode::Sfu,
                audio: room.audio(),
                data,
            })?;
            return Ok(());
        }
        let effect = room.relay(from, to, data)?;
        self.deliver(&room, [effect]);
        Ok(())
    }

    /// Handles `p2p-failed`.
    pub fn p2p_failed(
        &self,
        room_name: &RoomName,
        from: &ParticipantId,
        peer: &str,
    ) -> Result<(), HubError> {
        let mut room = self
            .rooms
            .get_mut(room_name)
            .ok_or_else(|| HubError::NotInRoom(room_name.clone()))?;
        let effects = room.p2p_failed(from, peer)?;
        self.deliver(&room, effects);
        Ok(())
    }

    /// Returns to `p2p` every room whose wait (`--p2p-return-ms`) is over at
    /// `now` and that still qualifies (see [`Room::poll`]). The server calls
    /// this on a timer when the option is on.
    pub fn run_due_returns(&self, now: Instant) {
        let due: Vec<RoomName> = {
            let mut returns = self.returns.lock().unwrap_or_else(|e| e.into_inner());
            let (due, later): (Vec<_>, Vec<_>) = returns.drain(..).partition(|(at, _)| *at <= now);
            *returns = later;
            due.into_iter().map(|(_, name)| name).collect()
        };
        for name in due {
            let Some(mut room) = self.rooms.get_mut(&name) else {
                continue;
            };
            let effects = room.poll(now);
            if !effects.is_empty() {
                tracing::info!(room = %name, "room back to two returns to p2p");
            }
            self.deliver(&room, effects);
        }
    }

    /// Sends `msg` to one connection that may not be in a room.
    pub fn reply(&self, outbox: &Outbox, msg: &ServerMessage) {
        self.count_sent(msg, 1);
        outbox.push(Utf8Bytes::from(msg.to_text()));
    }

    fn deliver(&self, room: &Room, effects: impl IntoIterator<Item = Effect>) {
        for effect in effects {
            self.deliver_one(room, effect, None);
        }
    }

    /// Like `deliver`, for effects of a leave: `leaver` is no longer a room
    /// member but may still be addressed.
    fn deliver_with_leaver(&self, room: &Room, effects: Vec<Effect>, leaver: &ParticipantId) {
        for effect in effects {
            self.deliver_one(room, effect, Some(leaver));
        }
    }

    fn deliver_one(&self, room: &Room, effect: Effect, leaver: Option<&ParticipantId>) {
        let text = Utf8Bytes::from(effect.msg.to_text());
        let mut count = 0u64;
        let mut send = |id: &ParticipantId| {
            if let Some(outbox) = self.outboxes.map.get(id) {
                outbox.push(text.clone());
                count += 1;
            }
        };
        match &effect.to {
            To::One(id) => {
                if room.contains(id) || leaver == Some(id) {
                    send(id);
                }
            }
            To::AllExcept(except) => room.member_ids().filter(|m| *m != except).for_each(send),
            To::All => room.member_ids().for_each(send),
        }
        self.count_sent(&effect.msg, count);
        if let (ServerMessage::Mode(m), Some(media)) = (&effect.msg, &self.media) {
            let room_name = room.name().clone();
            let cmd = match m.mode {
                MediaMode::Sfu => Command::RoomSfu { room: room_name },
                MediaMode::P2p => Command::RoomP2p { room: room_name },
            };
            if let Err(e) = media.send(cmd) {
                tracing::warn!(error = %e, room = %room.name(), "media plane missed a mode switch");
            }
        }
    }

    fn count_sent(&self, msg: &ServerMessage, count: u64) {
        self.metrics.sent(msg.type_name(), count);
        match msg {
            ServerMessage::Error(e) => self.metrics.error(e.code),
            ServerMessage::Mode(m) => self.metrics.mode_switch(m.reason),
            _ => {}
        }
    }

    fn new_participant_id(&self) -> ParticipantId {
        loop {
            let s = Alphanumeric.sample_string(&mut rand::rng(), 12);
            // 12 alphanumeric characters always pass the id rules.
            if let Ok(id) = ParticipantId::parse(&s) {
                if !self.outboxes.map.contains_key(&id) {
                    return id;
                }
            }
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
