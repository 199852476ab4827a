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

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use rand::distr::{Alphanumeric, SampleString};
use switchboard_proto::{
    ErrorCode, Join, Joined, MediaMode, ParticipantId, RequestedMode, Resume, RoomName,
    ServerMessage, SignalData, SFU_PEER,
};

use crate::auth::{unix_now, AuthError, Grants};
use crate::config::Config;
use crate::ice::ice_servers;
use crate::metrics::{Limit, Metrics, Refusal};
use crate::perip::{PerIp, Slot};
use crate::resume::{Parked, ResumeError, Resumes};
use crate::room::{Effect, JoinContext, Joiner, Room, RoomError, RoomSettings, To};
use crate::sfu::{Command, MediaError, MediaPlane, Publishing, Signal};
use crate::webhook::{Event, ParticipantRef, RoomRef, Webhooks};

mod admin;
mod outbox;

pub use admin::{
    AdminError, CreateRoom, MemberView, PublishingView, RoomView, DEFAULT_EMPTY_TIMEOUT,
};
pub use outbox::{Outbox, Outboxes, OUTBOX_CAPACITY};

/// How a `resume` succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumed {
    /// The participant was parked: what it missed was replayed.
    Parked,
    /// The server still held its old connection (the client saw it drop
    /// first): the new one took over and the old one was closed.
    TookOver,
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
            HubError::Room(RoomError::Forbidden(_)) => ErrorCode::Forbidden,
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

/// What kind of client a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Client {
    /// The WebSocket protocol (`/ws`).
    #[default]
    Protocol,
    /// A classic Socket.IO client, P2P until the room goes `sfu`.
    Classic,
    /// A classic Socket.IO client that is never relayed
    /// (`--socketio-relay never`): a room in `sfu`, or one its join would
    /// take there, refuses it with `full`.
    ClassicP2pOnly,
    /// A classic Socket.IO client whose peer is the server from the start
    /// (`--socketio-relay always`): its join takes an `auto` room to `sfu`.
    ClassicRelayed,
}

/// The result of a join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinOutcome {
    /// Admitted with this id; `joined` (and the rest) are in the outbox.
    Joined(ParticipantId),
    /// Not admitted; `full` is in the outbox.
    Refused,
}

/// Why a room was not created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotCreated {
    /// The server holds `--max-rooms`.
    TooMany,
    /// The creator's address holds `--max-rooms-per-ip`.
    PerAddress,
}

pub struct Hub {
    rooms: DashMap<RoomName, Room>,
    outboxes: Arc<Outboxes>,
    media: Option<MediaPlane>,
    publishing: Arc<Publishing>,
    webhooks: Arc<Webhooks>,
    /// Empty rooms that wait out an empty timeout, with when.
    frees: Mutex<Vec<(Instant, RoomName)>>,
    room_count: AtomicUsize,
    /// Set when the server drains: no new joins.
    draining: std::sync::atomic::AtomicBool,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    /// Rooms waiting to return to `p2p` (`--p2p-return-ms`), with when.
    /// Plain mutex: held for a push or a drain, never across an await, and
    /// never while a `rooms` entry is being taken.
    returns: Mutex<Vec<(Instant, RoomName)>>,
    /// Rooms created per client address (`--max-rooms-per-ip`), and the
    /// slot each such room holds until it is freed.
    rooms_per_ip: PerIp,
    room_slots: DashMap<RoomName, Slot>,
    /// Resume tokens and participants whose WebSocket dropped.
    resumes: Resumes,
}

impl Hub {
    /// A hub; `media` is the SFU media plane, if this server runs one.
    pub fn new(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        outboxes: Arc<Outboxes>,
        media: Option<MediaPlane>,
        publishing: Arc<Publishing>,
        webhooks: Arc<Webhooks>,
    ) -> Hub {
        Hub {
            rooms: DashMap::new(),
            outboxes,
            media,
            publishing,
            webhooks,
            frees: Mutex::new(Vec::new()),
            room_count: AtomicUsize::new(0),
            draining: std::sync::atomic::AtomicBool::new(false),
            metrics,
            returns: Mutex::new(Vec::new()),
            rooms_per_ip: PerIp::new(config.limits.max_rooms_per_ip, "rooms"),
            room_slots: DashMap::new(),
            resumes: Resumes::new(config.resume_window),
            config,
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

    /// Whether the room exists here now.
    pub fn has_room(&self, name: &RoomName) -> bool {
        self.rooms.contains_key(name)
    }

    /// The names of the rooms that exist here now.
    pub fn room_names(&self) -> Vec<RoomName> {
        self.rooms.iter().map(|r| r.key().clone()).collect()
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
    /// if needed (with the mode and audio `req` asks for). With auth on, the
    /// join's token decides who it is and what it may do; a member with the
    /// same identity is replaced.
    /// `from` is the client's address (rooms it creates count against
    /// `--max-rooms-per-ip`).
    pub fn join(&self, outbox: &Outbox, req: Join, from: IpAddr) -> JoinOutcome {
        self.join_as(outbox, req, from, Client::Protocol)
    }

    /// [`Hub::join`] for a connection of the given kind.
    pub fn join_as(&self, outbox: &Outbox, req: Join, from: IpAddr, client: Client) -> JoinOutcome {
        let classic = client != Client::Protocol;
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
        let (identity, name, grants) = match self.admit(&req) {
            Ok(who) => who,
            Err(e) => {
                self.metrics.auth_refused(e.label());
                tracing::info!(room = %req.room, reason = e.label(), "join refused: {e}");
                self.reply(
                    outbox,
                    &ServerMessage::error(ErrorCode::Unauthorized, e.to_string(), Some("join")),
                );
                return JoinOutcome::Refused;
            }
        };
        let id = self.new_participant_id();
        // Classic clients have no `resume`.
        let resume = match client {
            Client::Protocol => self.resumes.issue(&id, &req.room).map(|token| {
                let ms = u64::try_from(self.resumes.window().as_millis()).unwrap_or(u64::MAX);
                (token, ms)
            }),
            _ => None,
        };
        let ctx = JoinContext {
            ice_servers: ice_servers(&self.config.ice, &id, unix_now()),
            p2p_timeout_ms: self.config.p2p_timeout_ms,
            features: self.features(),
            resume,
        };
        let settings = RoomSettings {
            requested: req.mode.unwrap_or(RequestedMode::Auto),
            audio: req.audio.unwrap_or(self.config.audio_mode),
            max_participants: self.config.limits.max_participants,
            p2p_return: self.config.p2p_return,
            created_at: unix_now(),
            empty_timeout: None,
        };
        let mut room = match self.room_or_create(&req.room, settings, Some(from)) {
            Ok(room) => room,
            Err(why) => {
                match why {
                    NotCreated::TooMany => self.metrics.refused(Refusal::TooManyRooms),
                    NotCreated::PerAddress => self.metrics.limited(Limit::RoomsPerIp),
                }
                self.reply(
                    outbox,
                    &ServerMessage::Full(switchboard_proto::Full { room: req.room }),
                );
                return JoinOutcome::Refused;
            }
        };
        // The same identity again: the newer connection wins.
        if let Some(old) = identity.as_deref().and_then(|i| room.find_identity(i)) {
            self.metrics.auth_replaced.inc();
            tracing::info!(room = %req.room, participant = %old, "replaced by a newer join with the same identity");
            let notice = ServerMessage::error(
                ErrorCode::Replaced,
                "another connection joined this room with your identity",
                None,
            );
            self.remove_member(&mut room, &old, Departure::Vanished, Some(&notice));
        }
        let joiner = Joiner {
            id: id.clone(),
            name,
            identity,
            grants,
            joined_at: unix_now(),
            classic,
            needs_sfu: client == Client::ClassicRelayed,
            p2p_only: client == Client::ClassicP2pOnly,
        };
        match room.join(joiner, &ctx) {
            Ok(effects) => {
                self.metrics.room_resized(room.len() - 1, room.len());
                self.outboxes.map.insert(id.clone(), outbox.clone());
                self.metrics.participants.inc();
                self.deliver(&room, effects);
                self.participant_event("participant_joined", &room, &id);
                JoinOutcome::Joined(id)
            }
            Err(refused) => {
                self.resumes.forget(&id);
                self.metrics.refused(Refusal::RoomFull);
                self.reply(outbox, &refused.reply);
                let due = room.free_due();
                let name = room.name().clone();
                drop(room);
                self.free_if_empty(&name, due);
                JoinOutcome::Refused
            }
        }
    }

    /// Who the join is and what it may do: from its token when auth is on.
    fn admit(&self, req: &Join) -> Result<(Option<String>, String, Grants), AuthError> {
        let keys = &self.config.keys;
        if keys.is_empty() {
            return Ok((None, req.name.clone(), Grants::ALL));
        }
        let token = req.token.as_deref().ok_or(AuthError::Missing)?;
        let claims = keys.verify_join(token, req.room.as_str(), unix_now())?;
        let name = claims
            .name
            .filter(|n| !n.is_empty())
            .map(|n| n.chars().take(256).collect())
            .unwrap_or_else(|| req.name.clone());
        Ok((Some(claims.sub), name, Grants::from_video(&claims.video)))
    }

    /// `joined.features`.
    fn features(&self) -> Vec<String> {
        let mut f = Vec::new();
        if !self.config.keys.is_empty() {
            f.push("auth".to_owned());
        }
        if self.config.cluster.is_some() {
            f.push("cluster".to_owned());
        }
        if self.media.is_some() {
            // Simulcast publishing, `track-settings`, `publisher-layers`.
            f.push("simulcast".to_owned());
        }
        f
    }

    /// The room `name`, created with `settings` if it does not exist (unless
    /// the server holds `--max-rooms` already).
    fn room_or_create(
        &self,
        name: &RoomName,
        settings: RoomSettings,
        creator: Option<IpAddr>,
    ) -> Result<dashmap::mapref::one::RefMut<'_, RoomName, Room>, NotCreated> {
        match self.rooms.entry(name.clone()) {
            Entry::Occupied(e) => Ok(e.into_ref()),
            Entry::Vacant(v) => {
                let slot = match creator {
                    Some(ip) => Some(
                        self.rooms_per_ip
                            .acquire(ip)
                            .ok_or(NotCreated::PerAddress)?,
                    ),
                    None => None,
                };
                let max = self.config.limits.max_rooms;
                let admitted = self
                    .room_count
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < max).then_some(n + 1)
                    })
                    .is_ok();
                if !admitted {
                    return Err(NotCreated::TooMany);
                }
                if let Some(slot) = slot {
                    self.room_slots.insert(name.clone(), slot);
                }
                self.metrics.rooms.inc();
                tracing::info!(room = %name, mode = ?settings.requested, audio = settings.audio.as_str(), "room created");
                let room = v.insert(Room::new(name.clone(), &settings, Instant::now()));
                self.room_event("room_started", &room);
                Ok(room)
            }
        }
    }

    /// Takes `id` out of `room` (whose lock the caller holds): `notice` to it
    /// first, the room's effects per `how`, its outbox and media connection
    /// gone. The caller frees the room if it is now empty.
    fn remove_member(
        &self,
        room: &mut Room,
        id: &ParticipantId,
        how: Departure,
        notice: Option<&ServerMessage>,
    ) {
        if !room.contains(id) {
            return;
        }
        if let Some(msg) = notice {
            self.outboxes.send(id, msg, &self.metrics);
        }
        self.participant_event("participant_left", room, id);
        let effects = room.leave(id, how == Departure::Left, Instant::now());
        self.metrics.room_resized(room.len() + 1, room.len());
        if how != Departure::ServerClosing {
            self.deliver_with_leaver(room, effects, id);
        }
        if self.outboxes.map.remove(id).is_some() {
            self.metrics.participants.dec();
        }
        if self.resumes.forget(id) {
            self.metrics.parked.dec();
        }
        if let Some(at) = room.return_due() {
            self.returns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((at, room.name().clone()));
        }
        if let Some(media) = &self.media {
            let left = Command::Left {
                room: room.name().clone(),
                participant: id.clone(),
            };
            if let Err(e) = media.send(left) {
                tracing::warn!(error = %e, participant = %id, "media plane missed a departure");
            }
        }
    }

    /// Removes `id` from `room`, telling whom [`Departure`] says. Frees the
    /// room when it is empty.
    pub fn leave(&self, room_name: &RoomName, id: &ParticipantId, how: Departure) {
        let due = {
            let Some(mut room) = self.rooms.get_mut(room_name) else {
                return;
            };
            if !room.contains(id) {
                return;
            }
            self.remove_member(&mut room, id, how, None);
            room.free_due()
        };
        self.free_if_empty(room_name, due);
    }

    /// The connection behind `outbox` is gone without a `leave`: with
    /// resuming on, `id` stays in `room` (parked, media flowing) for the
    /// resume window; otherwise, or when it cannot be parked, it leaves as
    /// vanished. Nothing happens when `outbox` is no longer `id`'s (a
    /// `resume` on another connection took it over).
    pub fn connection_lost(&self, room: &RoomName, id: &ParticipantId, outbox: &Outbox) {
        {
            let Some(mut current) = self.outboxes.map.get_mut(id) else {
                return;
            };
            if !current.same(outbox) {
                return;
            }
            if self.resumes.enabled() {
                let (parking, missed, overflowed) = Outbox::new();
                let parked = Parked {
                    since: Instant::now(),
                    missed,
                    overflowed,
                };
                if self.resumes.park(id, parked) {
                    *current = parking;
                    self.metrics.parked.inc();
                    tracing::info!("connection lost; the participant may resume");
                    return;
                }
            }
        }
        self.leave(room, id, Departure::Vanished);
    }

    /// Whether `outbox` is (still) `id`'s connection.
    pub fn holds(&self, id: &ParticipantId, outbox: &Outbox) -> bool {
        self.outboxes.map.get(id).is_some_and(|o| o.same(outbox))
    }

    /// `resume`: puts the connection behind `outbox` in the place of a
    /// parked participant, sends it `resumed` and what it missed, in order.
    /// A refusal is answered with `resume-failed`.
    pub fn resume(&self, outbox: &Outbox, req: &Resume) -> Result<Resumed, ResumeError> {
        let result = self.try_resume(outbox, req);
        match &result {
            Ok(Resumed::Parked) => self.metrics.resumed("resumed"),
            Ok(Resumed::TookOver) => self.metrics.resumed("took-over"),
            Err(e) => {
                self.metrics.resumed(e.label());
                self.reply(
                    outbox,
                    &ServerMessage::error(ErrorCode::ResumeFailed, e.to_string(), Some("resume")),
                );
            }
        }
        result
    }

    fn try_resume(&self, outbox: &Outbox, req: &Resume) -> Result<Resumed, ResumeError> {
        // The room's entry is held throughout: nothing is delivered to the
        // room while the connections change places.
        let room = self.rooms.get(&req.room).ok_or(ResumeError::Unknown)?;
        if !room.contains(&req.id) {
            return Err(ResumeError::Unknown);
        }
        let parked = match self.resumes.take(&req.room, &req.id, &req.resume_token) {
            Ok(p) => p,
            Err(ResumeError::Overflowed) => {
                drop(room);
                self.metrics.parked.dec();
                self.leave(&req.room, &req.id, Departure::Vanished);
                return Err(ResumeError::Overflowed);
            }
            Err(e) => return Err(e),
        };
        if parked.is_some() {
            self.metrics.parked.dec();
        }
        let resumed = ServerMessage::Resumed(Joined {
            room: req.room.clone(),
            id: req.id.clone(),
            peers: room.peer_list(&req.id),
            mode: room.mode(),
            audio: room.audio(),
            ice_servers: ice_servers(&self.config.ice, &req.id, unix_now()),
            p2p_timeout_ms: self.config.p2p_timeout_ms,
            protocol: switchboard_proto::PROTOCOL_VERSION,
            features: self.features(),
            resume_token: Some(req.resume_token.clone()),
            resume_window_ms: u64::try_from(self.resumes.window().as_millis()).ok(),
        });
        // Holding the outbox entry keeps the media plane's sends to this
        // participant out until what it missed is queued behind `resumed`.
        let Some(mut current) = self.outboxes.map.get_mut(&req.id) else {
            return Err(ResumeError::Unknown);
        };
        self.metrics.sent("resumed", 1);
        outbox.push(Utf8Bytes::from(resumed.to_text()));
        let mut replayed = 0usize;
        let how = match parked {
            Some(mut parked) => {
                while let Ok(text) = parked.missed.try_recv() {
                    outbox.push(text);
                    replayed += 1;
                }
                Resumed::Parked
            }
            None => Resumed::TookOver,
        };
        let old = std::mem::replace(&mut *current, outbox.clone());
        if how == Resumed::TookOver {
            // The old connection is dead to the client: close it, quietly
            // (its end no longer counts: `connection_lost` ignores an
            // outbox that is not the participant's). What was queued on it
            // and not yet written is lost.
            old.close();
        }
        tracing::info!(room = %req.room, participant = %req.id, replayed, how = ?how, "resumed");
        Ok(how)
    }

    /// Parked participants whose window has passed leave (`bye` to the
    /// others). The server calls this on a timer.
    pub fn run_due_resumes(&self, now: Instant) {
        for (room, id) in self.resumes.due(now) {
            tracing::info!(%room, participant = %id, "resume window over; the participant is gone");
            self.metrics.resumed("expired");
            self.leave(&room, &id, Departure::Vanished);
        }
    }

    /// Whether `id` is (still) a member of `room`: a participant replaced or
    /// removed is not, though its connection lives on.
    pub fn is_member(&self, room: &RoomName, id: &ParticipantId) -> bool {
        self.rooms.get(room).is_some_and(|r| r.contains(id))
    }

    /// Frees `name` if it is empty and may be freed now; an empty room with
    /// an empty timeout (`due`) is freed by [`Hub::run_housekeeping`] later.
    fn free_if_empty(&self, name: &RoomName, due: Option<Instant>) {
        let now = Instant::now();
        let removed = self.rooms.remove_if(name, |_, r| {
            let free = r.can_free(now);
            if free {
                self.room_finished(r);
            }
            free
        });
        if removed.is_some() {
            self.room_slots.remove(name);
            self.room_count.fetch_sub(1, Ordering::AcqRel);
            self.metrics.rooms.dec();
            tracing::info!(room = %name, "room freed");
        } else if let Some(at) = due {
            self.frees
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((at, name.clone()));
        }
    }

    // -- webhooks -------------------------------------------------------------

    fn room_event(&self, event: &'static str, room: &Room) {
        if self.webhooks.is_on() {
            self.webhooks.emit(Event {
                event,
                room: room_ref(room),
                participant: None,
                track: None,
            });
        }
    }

    /// `room_finished` for a room being removed. Called from the removal's
    /// predicate, under the map entry's lock: a join that makes the room
    /// again right after waits for that lock, so its `room_started` cannot
    /// overtake this on the way to the webhook queues.
    fn room_finished(&self, room: &Room) {
        self.room_event("room_finished", room);
    }

    fn participant_event(&self, event: &'static str, room: &Room, id: &ParticipantId) {
        if !self.webhooks.is_on() {
            return;
        }
        let Some(m) = room.member(id) else { return };
        self.webhooks.emit(Event {
            event,
            room: room_ref(room),
            participant: Some(ParticipantRef {
                id: m.id.to_string(),
                identity: m.identity.clone(),
                name: m.name.clone(),
            }),
            track: None,
        });
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
            let (grants, classic) = room
                .member(from)
                .map(|m| (m.grants, m.classic))
                .unwrap_or((Grants::ALL, false));
            let data: SignalData =
                serde_json::from_value(data).map_err(|e| HubError::BadSignal(e.to_string()))?;
            media.send(Command::Signal(Signal {
                room: room_name.clone(),
                participant: from.clone(),
                sfu: room.mode() == MediaMode::Sfu,
                audio: room.audio(),
                grants,
                classic,
                data,
            }))?;
            return Ok(());
        }
        let effect = room.relay(from, to, data)?;
        self.deliver(&room, [effect]);
        Ok(())
    }

    /// Handles `track-settings` (1.1): passed to the media plane, which
    /// applies it to the participant's subscription on `mid` (an unknown
    /// mid is ignored there: the track may have just gone away).
    pub fn track_settings(
        &self,
        room_name: &RoomName,
        from: &ParticipantId,
        settings: switchboard_proto::TrackSettings,
    ) -> Result<(), HubError> {
        let room = self
            .rooms
            .get(room_name)
            .ok_or_else(|| HubError::NotInRoom(room_name.clone()))?;
        if !room.contains(from) {
            return Err(RoomError::NotAMember(from.clone()).into());
        }
        if let Some(media) = &self.media {
            media.send(Command::TrackSettings {
                room: room_name.clone(),
                participant: from.clone(),
                settings,
            })?;
        }
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
        let due = take_due(&self.returns, now);
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

    /// Frees the empty rooms whose empty timeout is over at `now`.
    pub fn run_due_frees(&self, now: Instant) {
        let due = take_due(&self.frees, now);
        for name in due {
            // Still waiting (someone came and went since): `free_if_empty`
            // queues it again with its new time.
            let due = self.rooms.get(&name).and_then(|r| r.free_due());
            self.free_if_empty(&name, due.filter(|&at| at > now));
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
        if let ServerMessage::Mode(_) = &effect.msg {
            self.room_event("room_mode_changed", room);
        }
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

/// Takes the rooms due by `now` out of a timer queue (`frees`, `returns`).
fn take_due(queue: &Mutex<Vec<(Instant, RoomName)>>, now: Instant) -> Vec<RoomName> {
    let mut queue = queue.lock().unwrap_or_else(|e| e.into_inner());
    let (due, later): (Vec<_>, Vec<_>) = queue.drain(..).partition(|(at, _)| *at <= now);
    *queue = later;
    due.into_iter().map(|(_, name)| name).collect()
}

fn room_ref(room: &Room) -> RoomRef {
    RoomRef {
        name: room.name().to_string(),
        mode: room.mode(),
        audio: room.audio(),
    }
}
