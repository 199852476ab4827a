//! The admin API's side of the hub: listing, creating and closing rooms,
//! removing and muting participants, sending them data.

use std::sync::atomic::Ordering;

use switchboard_proto::{
    ErrorCode, MediaMode, ParticipantId, RequestedMode, RoomName, ServerMessage,
};

use super::{Departure, Hub};
use crate::auth::unix_now;
use crate::room::{Room, RoomSettings};
use crate::sfu::{Command, MediaError, MediaKind};

/// Admin API requests the hub refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("no room {0}")]
    NoRoom(String),
    #[error("no participant {0} in this room")]
    NoParticipant(String),
    #[error("room {0} exists")]
    Exists(String),
    #[error("the server has as many rooms as it may hold")]
    TooManyRooms,
    #[error("the server is draining")]
    Draining,
    #[error("the media plane cannot take this now: {0}")]
    Media(#[from] MediaError),
}

/// A room as the admin API lists it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomView {
    pub name: String,
    pub mode: MediaMode,
    pub audio: switchboard_proto::AudioMode,
    /// Visible members.
    pub participants: usize,
    pub created_at: u64,
}

/// What a participant publishes, for the admin API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PublishingView {
    pub audio: bool,
    pub video: bool,
}

/// A member as the admin API shows it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberView {
    pub id: String,
    pub identity: Option<String>,
    pub name: String,
    pub joined_at: u64,
    pub publishing: PublishingView,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub hidden: bool,
}

/// Settings of a room created through the admin API.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateRoom {
    pub name: RoomName,
    #[serde(default)]
    pub mode: Option<RequestedMode>,
    #[serde(default)]
    pub audio: Option<switchboard_proto::AudioMode>,
    #[serde(default)]
    pub max_participants: Option<usize>,
    #[serde(default)]
    pub empty_timeout_s: Option<u64>,
}

/// How long a room made through the admin API may stay empty, by default.
pub const DEFAULT_EMPTY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

impl Hub {
    /// Every room.
    pub fn list_rooms(&self) -> Vec<RoomView> {
        let mut rooms: Vec<RoomView> = self.rooms.iter().map(|r| room_view(&r)).collect();
        rooms.sort_by(|a, b| a.name.cmp(&b.name));
        rooms
    }

    /// Creates a room that waits `emptyTimeoutS` (default 300 s) for members.
    pub fn create_room(&self, req: CreateRoom) -> Result<RoomView, AdminError> {
        if self.is_draining() {
            return Err(AdminError::Draining);
        }
        if self.rooms.contains_key(&req.name) {
            return Err(AdminError::Exists(req.name.to_string()));
        }
        let timeout = req
            .empty_timeout_s
            .map(std::time::Duration::from_secs)
            .unwrap_or(DEFAULT_EMPTY_TIMEOUT);
        let settings = RoomSettings {
            requested: req.mode.unwrap_or(RequestedMode::Auto),
            audio: req.audio.unwrap_or(self.config.audio_mode),
            max_participants: req
                .max_participants
                .filter(|&n| n > 0)
                .unwrap_or(self.config.limits.max_participants)
                .min(self.config.limits.max_participants),
            p2p_return: self.config.p2p_return,
            created_at: unix_now(),
            empty_timeout: Some(timeout),
        };
        let name = req.name.clone();
        // Another request may create it between the check and here: then it
        // exists, and this one says so.
        let created_at = settings.created_at;
        let room = self
            .room_or_create(&name, settings, None)
            .map_err(|_| AdminError::TooManyRooms)?;
        if room.created_at() != created_at || !room.is_empty() {
            return Err(AdminError::Exists(name.to_string()));
        }
        let view = room_view(&room);
        let due = room.free_due();
        drop(room);
        self.free_if_empty(&name, due);
        Ok(view)
    }

    /// One room and its members (hidden ones marked).
    pub fn room_info(&self, name: &str) -> Result<(RoomView, Vec<MemberView>), AdminError> {
        let room = self.room_ref(name)?;
        let members = room
            .members()
            .iter()
            .map(|m| {
                let (audio, video) = self.publishing.get(&m.id);
                MemberView {
                    id: m.id.to_string(),
                    identity: m.identity.clone(),
                    name: m.name.clone(),
                    joined_at: m.joined_at,
                    publishing: PublishingView { audio, video },
                    hidden: m.grants.hidden,
                }
            })
            .collect();
        Ok((room_view(&room), members))
    }

    /// Closes a room: every member gets `error` `room-closed` and is out.
    pub fn close_room(&self, name: &str) -> Result<(), AdminError> {
        let room_name = parse_room(name)?;
        {
            let mut room = self
                .rooms
                .get_mut(&room_name)
                .ok_or_else(|| AdminError::NoRoom(name.to_owned()))?;
            let notice = ServerMessage::error(
                ErrorCode::RoomClosed,
                "an administrator closed this room",
                None,
            );
            let ids: Vec<ParticipantId> = room.member_ids().cloned().collect();
            for id in ids {
                self.remove_member(&mut room, &id, Departure::ServerClosing, Some(&notice));
            }
        }
        let removed = self.rooms.remove_if(&room_name, |_, r| {
            let empty = r.is_empty();
            if empty {
                self.room_finished(r);
            }
            empty
        });
        if removed.is_some() {
            self.room_slots.remove(&room_name);
            self.room_count.fetch_sub(1, Ordering::AcqRel);
            self.metrics.rooms.dec();
            tracing::info!(room = %room_name, "room closed by an administrator");
        }
        Ok(())
    }

    /// Removes one participant: it gets `error` `removed`, the others `bye`.
    pub fn remove_participant(&self, room: &str, id: &str) -> Result<(), AdminError> {
        let room_name = parse_room(room)?;
        let due = {
            let mut r = self
                .rooms
                .get_mut(&room_name)
                .ok_or_else(|| AdminError::NoRoom(room.to_owned()))?;
            let pid = member_id(&r, id)?;
            let notice = ServerMessage::error(
                ErrorCode::Removed,
                "an administrator removed you from this room",
                None,
            );
            self.remove_member(&mut r, &pid, Departure::Vanished, Some(&notice));
            tracing::info!(room = %room_name, participant = %pid, "removed by an administrator");
            r.free_due()
        };
        self.free_if_empty(&room_name, due);
        Ok(())
    }

    /// Stops (or resumes) forwarding and mixing one participant's `kind`.
    pub fn mute(
        &self,
        room: &str,
        id: &str,
        kind: MediaKind,
        muted: bool,
    ) -> Result<(), AdminError> {
        let r = self.room_ref(room)?;
        let participant = member_id(&r, id)?;
        if let Some(media) = &self.media {
            media.send(Command::Mute {
                room: r.name().clone(),
                participant,
                kind,
                muted,
            })?;
        }
        Ok(())
    }

    /// Sends `data` as `message` from `"server"` to every member, or to `to`.
    pub fn send_data(
        &self,
        room: &str,
        data: serde_json::Value,
        to: Option<Vec<String>>,
    ) -> Result<(), AdminError> {
        let r = self.room_ref(room)?;
        let targets: Vec<ParticipantId> = match to {
            None => r.member_ids().cloned().collect(),
            Some(ids) => ids
                .iter()
                .map(|id| member_id(&r, id))
                .collect::<Result<_, _>>()?,
        };
        let msg = ServerMessage::Message(switchboard_proto::Relayed {
            room: r.name().clone(),
            from: "server".to_owned(),
            data,
        });
        for id in &targets {
            self.outboxes.send(id, &msg, &self.metrics);
        }
        Ok(())
    }

    fn room_ref(
        &self,
        name: &str,
    ) -> Result<dashmap::mapref::one::Ref<'_, RoomName, Room>, AdminError> {
        let room_name = parse_room(name)?;
        self.rooms
            .get(&room_name)
            .ok_or_else(|| AdminError::NoRoom(name.to_owned()))
    }
}

fn room_view(room: &Room) -> RoomView {
    RoomView {
        name: room.name().to_string(),
        mode: room.mode(),
        audio: room.audio(),
        participants: room.visible_len(),
        created_at: room.created_at(),
    }
}

fn parse_room(name: &str) -> Result<RoomName, AdminError> {
    RoomName::parse(name).map_err(|_| AdminError::NoRoom(name.chars().take(128).collect()))
}

fn member_id(room: &Room, id: &str) -> Result<ParticipantId, AdminError> {
    room.member_ids()
        .find(|m| m.as_str() == id)
        .cloned()
        .ok_or_else(|| AdminError::NoParticipant(id.chars().take(64).collect()))
}
