//! Room state: membership and the media-mode state machine.
//!
//! Plain data in, effects out. A [`Room`] never touches a socket or a task;
//! each operation returns the messages to deliver, in order, addressed with
//! [`To`]. The hub resolves the addresses and writes them to connections.
//!
//! Mode machine (auto rooms): `p2p` while at most two participants; a third
//! join or a `p2p-failed` switches to `sfu` and everyone gets `mode`. A room
//! created `p2p` holds two and answers a third with `full`; one created `sfu`
//! stays `sfu`. An `auto` room back to two that never had a `p2p-failed`
//! stays `sfu` too, unless [`RoomSettings::p2p_return`] is set: then, once it
//! has had two participants for that long, [`Room::poll`] returns it to `p2p`
//! (`mode` with reason `two-participants`). Time is passed in, never read.

use std::time::{Duration, Instant};

use crate::auth::Grants;
use switchboard_proto::{
    AudioMode, Full, Joined, MediaMode, ModeChange, ModeReason, OtherJoin, ParticipantId, PeerInfo,
    Relayed, RequestedMode, RoomName, RoomParticipant, ServerMessage, SFU_PEER,
};

/// Who an effect is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum To {
    /// One participant.
    One(ParticipantId),
    /// Every member except this one.
    AllExcept(ParticipantId),
    /// Every member.
    All,
}

/// A message to deliver.
#[derive(Debug, Clone, PartialEq)]
pub struct Effect {
    pub to: To,
    pub msg: ServerMessage,
}

/// Room operations that a participant got wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    #[error("{0} is not in this room")]
    NotAMember(ParticipantId),
    #[error("no participant {0:?} in this room")]
    NoSuchPeer(String),
    #[error("you cannot address yourself")]
    SelfAddressed,
    #[error("the server media peer is not available on this server yet")]
    SfuUnavailable,
    #[error("your token does not allow {0}")]
    Forbidden(&'static str),
}

/// The outcome of a join that was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    /// What to send to the one who asked (a `full`).
    pub reply: Box<ServerMessage>,
}

/// Settings a room is created with.
#[derive(Debug, Clone)]
pub struct RoomSettings {
    pub requested: RequestedMode,
    pub audio: AudioMode,
    /// Capacity of `auto` and `sfu` rooms (`p2p` rooms hold two).
    pub max_participants: usize,
    /// How long an `auto` room back to two waits before returning to `p2p`;
    /// `None` keeps it `sfu` (the default).
    pub p2p_return: Option<Duration>,
    /// Unix seconds.
    pub created_at: u64,
    /// How long the room may stay empty before it is freed; `None` frees it
    /// as soon as it empties (rooms made by a join). Rooms made through the
    /// admin API have one.
    pub empty_timeout: Option<Duration>,
}

/// What every `joined` carries besides room state.
#[derive(Debug, Clone)]
pub struct JoinContext {
    pub ice_servers: Vec<switchboard_proto::IceServer>,
    pub p2p_timeout_ms: u64,
    /// `joined.features`.
    pub features: Vec<String>,
    /// `joined.resumeToken` and `resumeWindowMs`, when the server resumes.
    pub resume: Option<(String, u64)>,
}

/// Who is joining, as the hub admitted them.
#[derive(Debug, Clone)]
pub struct Joiner {
    pub id: ParticipantId,
    pub name: String,
    /// The token's identity; `None` when auth is off.
    pub identity: Option<String>,
    pub grants: Grants,
    /// Unix seconds.
    pub joined_at: u64,
    /// A classic Socket.IO client (its server connection gets the mix and
    /// the speaker's video; a room with one never returns to `p2p`).
    pub classic: bool,
    /// Its join takes an `auto` room to `sfu` (a classic client relayed
    /// from the start).
    pub needs_sfu: bool,
    /// It cannot take part through the server (a classic client with
    /// `--socketio-relay never`): refused when the room is in `sfu` or its
    /// join would take it there.
    pub p2p_only: bool,
}

/// A member as the admin API shows it.
#[derive(Debug, Clone)]
pub struct Member {
    pub id: ParticipantId,
    pub name: String,
    pub identity: Option<String>,
    pub grants: Grants,
    pub joined_at: u64,
    pub classic: bool,
}

/// One room.
#[derive(Debug)]
pub struct Room {
    name: RoomName,
    requested: RequestedMode,
    audio: AudioMode,
    mode: MediaMode,
    capacity: usize,
    /// In join order.
    members: Vec<Member>,
    had_p2p_failure: bool,
    p2p_return: Option<Duration>,
    /// When the room, in `sfu`, came back to two participants and is due to
    /// return to `p2p` (only with `p2p_return`).
    return_at: Option<Instant>,
    created_at: u64,
    empty_timeout: Option<Duration>,
    /// Since when the room has been empty (created empty, or emptied).
    empty_since: Option<Instant>,
}

impl Room {
    /// A room; `now` starts its empty timeout, if it has one.
    pub fn new(name: RoomName, settings: &RoomSettings, now: Instant) -> Self {
        let (mode, capacity) = match settings.requested {
            RequestedMode::Auto => (MediaMode::P2p, settings.max_participants),
            RequestedMode::P2p => (MediaMode::P2p, 2.min(settings.max_participants)),
            RequestedMode::Sfu => (MediaMode::Sfu, settings.max_participants),
        };
        Room {
            name,
            requested: settings.requested,
            audio: settings.audio,
            mode,
            capacity: capacity.max(1),
            members: Vec::new(),
            had_p2p_failure: false,
            p2p_return: settings.p2p_return,
            return_at: None,
            created_at: settings.created_at,
            empty_timeout: settings.empty_timeout,
            empty_since: Some(now),
        }
    }

    /// Unix seconds.
    pub fn created_at(&self) -> u64 {
        self.created_at
    }

    /// Whether the room is empty and may be freed at `now`; with an empty
    /// timeout, when it is over.
    pub fn can_free(&self, now: Instant) -> bool {
        match (
            self.members.is_empty(),
            self.empty_timeout,
            self.empty_since,
        ) {
            (false, _, _) => false,
            (true, None, _) => true,
            (true, Some(t), Some(since)) => now >= since + t,
            (true, Some(_), None) => true,
        }
    }

    /// When an empty room with a timeout becomes freeable.
    pub fn free_due(&self) -> Option<Instant> {
        match (
            self.members.is_empty(),
            self.empty_timeout,
            self.empty_since,
        ) {
            (true, Some(t), Some(since)) => Some(since + t),
            _ => None,
        }
    }

    pub fn name(&self) -> &RoomName {
        &self.name
    }

    pub fn mode(&self) -> MediaMode {
        self.mode
    }

    pub fn audio(&self) -> AudioMode {
        self.audio
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn contains(&self, id: &ParticipantId) -> bool {
        self.members.iter().any(|m| &m.id == id)
    }

    /// Member ids in join order.
    pub fn member_ids(&self) -> impl Iterator<Item = &ParticipantId> {
        self.members.iter().map(|m| &m.id)
    }

    /// Admits `id`, or refuses with `full`.
    ///
    /// Effects, in order: `joined` to the joiner; if the join switches the
    /// room to `sfu`, `mode` to everyone (so the joiner gets it right after
    /// `joined`, the others before `otherjoin`); `otherjoin` to the others.
    pub fn join(&mut self, joiner: Joiner, ctx: &JoinContext) -> Result<Vec<Effect>, Refused> {
        let Joiner {
            id,
            name,
            identity,
            grants,
            joined_at,
            classic,
            needs_sfu,
            p2p_only,
        } = joiner;
        let third = self.members.len() >= 2;
        let switch = self.requested == RequestedMode::Auto
            && self.mode == MediaMode::P2p
            && (third || grants.needs_sfu() || needs_sfu);
        let unreachable = p2p_only && (self.mode == MediaMode::Sfu || switch);
        if self.members.len() >= self.capacity || unreachable {
            return Err(Refused {
                reply: Box::new(ServerMessage::Full(Full {
                    room: self.name.clone(),
                })),
            });
        }
        // A third person, or a member who may not use P2P (no publish
        // grant, or hidden), takes an `auto` room to the server.
        if switch {
            self.mode = MediaMode::Sfu;
        }
        // A third person is back: the room stays `sfu`.
        self.return_at = None;
        self.empty_since = None;
        let peers = self
            .members
            .iter()
            .filter(|m| !m.grants.hidden)
            .map(|m| PeerInfo {
                id: m.id.clone(),
                name: m.name.clone(),
                identity: m.identity.clone(),
            })
            .collect();
        self.members.push(Member {
            id: id.clone(),
            name: name.clone(),
            identity: identity.clone(),
            grants,
            joined_at,
            classic,
        });
        let mut effects = Vec::with_capacity(3);
        effects.push(Effect {
            to: To::One(id.clone()),
            msg: ServerMessage::Joined(Joined {
                room: self.name.clone(),
                id: id.clone(),
                peers,
                mode: self.mode,
                audio: self.audio,
                ice_servers: ctx.ice_servers.clone(),
                p2p_timeout_ms: ctx.p2p_timeout_ms,
                protocol: switchboard_proto::PROTOCOL_VERSION,
                features: ctx.features.clone(),
                resume_token: ctx.resume.as_ref().map(|r| r.0.clone()),
                resume_window_ms: ctx.resume.as_ref().map(|r| r.1),
            }),
        });
        if switch {
            let reason = if third {
                ModeReason::ThirdParticipant
            } else {
                ModeReason::Policy
            };
            effects.push(self.mode_effect(reason));
        }
        if self.members.len() > 1 && !grants.hidden {
            effects.push(Effect {
                to: To::AllExcept(id.clone()),
                msg: ServerMessage::Otherjoin(OtherJoin {
                    room: self.name.clone(),
                    id,
                    name,
                    identity,
                }),
            });
        }
        Ok(effects)
    }

    /// Removes `id` at `now`. `leaved` goes to the leaver when it asked to
    /// leave (`acknowledge`), `bye` to everyone else. A departure that brings
    /// an `auto` room in `sfu` back to two starts the wait before returning
    /// to `p2p`, when the room has one ([`Room::return_due`]).
    pub fn leave(&mut self, id: &ParticipantId, acknowledge: bool, now: Instant) -> Vec<Effect> {
        let Some(pos) = self.members.iter().position(|m| &m.id == id) else {
            return Vec::new();
        };
        let gone = self.members.remove(pos);
        if self.members.is_empty() {
            self.empty_since = Some(now);
        }
        self.return_at = match self.p2p_return {
            Some(delay) if self.may_return_to_p2p() => Some(now + delay),
            _ => None,
        };
        let body = RoomParticipant {
            room: self.name.clone(),
            id: id.clone(),
        };
        let mut effects = Vec::with_capacity(2);
        if acknowledge {
            effects.push(Effect {
                to: To::One(id.clone()),
                msg: ServerMessage::Leaved(body.clone()),
            });
        }
        if !self.members.is_empty() && !gone.grants.hidden {
            effects.push(Effect {
                to: To::All,
                msg: ServerMessage::Bye(body),
            });
        }
        effects
    }

    /// Relays `data` from `from`: to everyone else without `to`, to one
    /// participant with `to`. `to:"sfu"` is for the media plane, not a room
    /// member; the caller handles it before coming here.
    pub fn relay(
        &self,
        from: &ParticipantId,
        to: Option<&str>,
        data: serde_json::Value,
    ) -> Result<Effect, RoomError> {
        let sender = self
            .member(from)
            .ok_or_else(|| RoomError::NotAMember(from.clone()))?;
        let is_p2p_signal = data
            .get("type")
            .and_then(serde_json::Value::as_str)
            .is_some_and(|t| matches!(t, "offer" | "answer" | "candidate"));
        if is_p2p_signal && !sender.grants.publish {
            return Err(RoomError::Forbidden("P2P media (canPublish is false)"));
        }
        let to = match to {
            None => To::AllExcept(from.clone()),
            Some(SFU_PEER) => return Err(RoomError::SfuUnavailable),
            Some(peer) => To::One(self.peer(from, peer)?),
        };
        Ok(Effect {
            to,
            msg: ServerMessage::Message(Relayed {
                room: self.name.clone(),
                from: from.to_string(),
                data,
            }),
        })
    }

    /// Handles `p2p-failed` from `from` about `peer`. An `auto` room that is
    /// still `p2p` switches to `sfu`; otherwise it is accepted silently. In
    /// an `auto` room it also rules out any later return to `p2p`: these two
    /// cannot reach each other directly.
    pub fn p2p_failed(
        &mut self,
        from: &ParticipantId,
        peer: &str,
    ) -> Result<Vec<Effect>, RoomError> {
        if !self.contains(from) {
            return Err(RoomError::NotAMember(from.clone()));
        }
        self.peer(from, peer)?;
        if self.requested != RequestedMode::Auto {
            return Ok(Vec::new());
        }
        self.had_p2p_failure = true;
        self.return_at = None;
        if self.mode == MediaMode::Sfu {
            return Ok(Vec::new());
        }
        self.mode = MediaMode::Sfu;
        Ok(vec![self.mode_effect(ModeReason::P2pFailed)])
    }

    /// Whether a `p2p-failed` was ever reported in this room.
    pub fn had_p2p_failure(&self) -> bool {
        self.had_p2p_failure
    }

    /// When the room is due to return to `p2p`, if it is waiting to.
    pub fn return_due(&self) -> Option<Instant> {
        self.return_at
    }

    /// Returns the room to `p2p` if its wait is over at `now` and it still
    /// qualifies (`auto`, `sfu`, two participants, never a `p2p-failed`):
    /// `mode` `p2p` with reason `two-participants` to both. Otherwise nothing.
    pub fn poll(&mut self, now: Instant) -> Vec<Effect> {
        match self.return_at {
            Some(at) if now >= at => {}
            _ => return Vec::new(),
        }
        self.return_at = None;
        if !self.may_return_to_p2p() {
            return Vec::new();
        }
        self.mode = MediaMode::P2p;
        vec![self.mode_effect(ModeReason::TwoParticipants)]
    }

    /// Two participants in an `auto` room that went `sfu` only because a
    /// third joined: P2P worked for them before.
    fn may_return_to_p2p(&self) -> bool {
        self.requested == RequestedMode::Auto
            && self.mode == MediaMode::Sfu
            && self.members.len() == 2
            && !self.had_p2p_failure
            && !self
                .members
                .iter()
                .any(|m| m.grants.needs_sfu() || m.classic)
    }

    /// The visible members other than `except`, as `joined.peers` lists
    /// them.
    pub fn peer_list(&self, except: &ParticipantId) -> Vec<PeerInfo> {
        self.members
            .iter()
            .filter(|m| !m.grants.hidden && m.id != *except)
            .map(|m| PeerInfo {
                id: m.id.clone(),
                name: m.name.clone(),
                identity: m.identity.clone(),
            })
            .collect()
    }

    /// The member `id`, if it is one.
    pub fn member(&self, id: &ParticipantId) -> Option<&Member> {
        self.members.iter().find(|m| &m.id == id)
    }

    /// Every member, in join order.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Members other people can see (not hidden).
    pub fn visible_len(&self) -> usize {
        self.members.iter().filter(|m| !m.grants.hidden).count()
    }

    /// The member whose token identity is `identity`.
    pub fn find_identity(&self, identity: &str) -> Option<ParticipantId> {
        self.members
            .iter()
            .find(|m| m.identity.as_deref() == Some(identity))
            .map(|m| m.id.clone())
    }

    /// The room's settings as created.
    pub fn requested(&self) -> RequestedMode {
        self.requested
    }

    fn peer(&self, from: &ParticipantId, peer: &str) -> Result<ParticipantId, RoomError> {
        if peer == from.as_str() {
            return Err(RoomError::SelfAddressed);
        }
        self.members
            .iter()
            .find(|m| m.id.as_str() == peer)
            .map(|m| m.id.clone())
            .ok_or_else(|| RoomError::NoSuchPeer(peer.chars().take(64).collect()))
    }

    fn mode_effect(&self, reason: ModeReason) -> Effect {
        Effect {
            to: To::All,
            msg: ServerMessage::Mode(ModeChange {
                room: self.name.clone(),
                mode: self.mode,
                reason,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pid(s: &str) -> ParticipantId {
        ParticipantId::parse(s).unwrap()
    }

    fn room(requested: RequestedMode) -> Room {
        Room::new(
            RoomName::parse("r").unwrap(),
            &RoomSettings {
                requested,
                audio: AudioMode::Mix,
                max_participants: 4,
                p2p_return: None,
                created_at: 0,
                empty_timeout: None,
            },
            Instant::now(),
        )
    }

    fn returning_room(delay_ms: u64) -> Room {
        Room::new(
            RoomName::parse("r").unwrap(),
            &RoomSettings {
                requested: RequestedMode::Auto,
                audio: AudioMode::Mix,
                max_participants: 4,
                p2p_return: Some(Duration::from_millis(delay_ms)),
                created_at: 0,
                empty_timeout: None,
            },
            Instant::now(),
        )
    }

    fn ctx() -> JoinContext {
        JoinContext {
            ice_servers: vec![],
            p2p_timeout_ms: 5000,
            features: vec![],
            resume: None,
        }
    }

    fn joiner(id: &str, name: impl Into<String>) -> Joiner {
        Joiner {
            id: pid(id),
            name: name.into(),
            identity: None,
            grants: Grants::ALL,
            joined_at: 0,
            classic: false,
            needs_sfu: false,
            p2p_only: false,
        }
    }

    #[test]
    fn a_p2p_only_joiner_is_refused_where_it_would_need_the_server() {
        let p2p_only = |id: &str| Joiner {
            p2p_only: true,
            ..joiner(id, id)
        };
        // Third in an `auto` room: its join would take the room to `sfu`.
        let mut r = room(RequestedMode::Auto);
        r.join(joiner("a1", "a"), &ctx()).unwrap();
        r.join(joiner("b1", "b"), &ctx()).unwrap();
        let refused = r.join(p2p_only("c1"), &ctx()).unwrap_err();
        assert!(matches!(*refused.reply, ServerMessage::Full(_)));
        assert_eq!(r.mode(), MediaMode::P2p, "the call of the two is unharmed");
        assert_eq!(r.len(), 2);
        // A room already in `sfu`, even with room to spare.
        let mut r = room(RequestedMode::Sfu);
        r.join(joiner("a1", "a"), &ctx()).unwrap();
        assert!(r.join(p2p_only("c1"), &ctx()).is_err());
        assert_eq!(r.len(), 1);
        // Second in an `auto` room: admitted, P2P.
        let mut r = room(RequestedMode::Auto);
        r.join(joiner("a1", "a"), &ctx()).unwrap();
        r.join(p2p_only("c1"), &ctx()).unwrap();
        assert_eq!(r.mode(), MediaMode::P2p);
    }

    #[test]
    fn a_hidden_member_is_invisible_and_takes_the_room_to_sfu() {
        let mut r = room(RequestedMode::Auto);
        r.join(joiner("a", "A"), &ctx()).unwrap();
        let mut h = joiner("h", "H");
        h.grants = Grants {
            hidden: true,
            publish: false,
            publish_data: false,
            subscribe: true,
        };
        let e = r.join(h, &ctx()).unwrap();
        // joined to h, then mode (policy) to all; no otherjoin for a.
        assert_eq!(
            types(&e),
            vec![(To::One(pid("h")), "joined"), (To::All, "mode")]
        );
        assert!(matches!(&e[1].msg, ServerMessage::Mode(m) if m.reason == ModeReason::Policy));
        let e = r.join(joiner("b", "B"), &ctx()).unwrap();
        let ServerMessage::Joined(j) = &e[0].msg else {
            panic!("joined first")
        };
        assert_eq!(
            j.peers.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["a"],
            "h is not listed"
        );
        assert_eq!(r.visible_len(), 2);
        let e = r.leave(&pid("h"), false, Instant::now());
        assert!(e.is_empty(), "no bye for a hidden member: {e:?}");
    }

    #[test]
    fn an_admin_room_waits_out_its_empty_timeout() {
        let t0 = Instant::now();
        let mut r = Room::new(
            RoomName::parse("a").unwrap(),
            &RoomSettings {
                requested: RequestedMode::Auto,
                audio: AudioMode::Mix,
                max_participants: 4,
                p2p_return: None,
                created_at: 0,
                empty_timeout: Some(Duration::from_secs(10)),
            },
            t0,
        );
        assert!(!r.can_free(t0 + Duration::from_secs(9)));
        assert!(r.can_free(t0 + Duration::from_secs(10)));
        r.join(joiner("a", ""), &ctx()).unwrap();
        assert!(
            !r.can_free(t0 + Duration::from_secs(60)),
            "not while occupied"
        );
        let t1 = t0 + Duration::from_secs(100);
        r.leave(&pid("a"), false, t1);
        assert_eq!(r.free_due(), Some(t1 + Duration::from_secs(10)));
        assert!(!r.can_free(t1 + Duration::from_secs(1)));
        assert!(
            room(RequestedMode::Auto).can_free(t0),
            "join rooms free at once"
        );
    }

    #[test]
    fn a_member_without_publish_cannot_relay_p2p_signaling() {
        let mut r = room(RequestedMode::Auto);
        r.join(joiner("a", "A"), &ctx()).unwrap();
        let mut v = joiner("v", "V");
        v.grants.publish = false;
        let e = r.join(v, &ctx()).unwrap();
        assert!(e
            .iter()
            .any(|e| matches!(&e.msg, ServerMessage::Mode(m) if m.reason == ModeReason::Policy)));
        assert_eq!(
            r.relay(&pid("v"), Some("a"), json!({"type":"offer","sdp":"v=0"})),
            Err(RoomError::Forbidden("P2P media (canPublish is false)"))
        );
        assert!(r.relay(&pid("v"), Some("a"), json!({"hello": 1})).is_ok());
    }

    fn types(effects: &[Effect]) -> Vec<(To, &'static str)> {
        effects
            .iter()
            .map(|e| (e.to.clone(), e.msg.type_name()))
            .collect()
    }

    #[test]
    fn auto_room_switches_on_third_join_with_mode_before_otherjoin() {
        let mut r = room(RequestedMode::Auto);
        let e = r.join(joiner("a", "A"), &ctx()).unwrap();
        assert_eq!(types(&e), vec![(To::One(pid("a")), "joined")]);
        let e = r.join(joiner("b", "B"), &ctx()).unwrap();
        assert_eq!(
            types(&e),
            vec![
                (To::One(pid("b")), "joined"),
                (To::AllExcept(pid("b")), "otherjoin")
            ]
        );
        let ServerMessage::Joined(j) = &e[0].msg else {
            panic!()
        };
        assert_eq!(j.mode, MediaMode::P2p);
        assert_eq!(j.peers.len(), 1);
        let e = r.join(joiner("c", "C"), &ctx()).unwrap();
        assert_eq!(
            types(&e),
            vec![
                (To::One(pid("c")), "joined"),
                (To::All, "mode"),
                (To::AllExcept(pid("c")), "otherjoin")
            ]
        );
        let ServerMessage::Joined(j) = &e[0].msg else {
            panic!()
        };
        assert_eq!(j.mode, MediaMode::Sfu);
        let ServerMessage::Mode(m) = &e[1].msg else {
            panic!()
        };
        assert_eq!(m.reason, ModeReason::ThirdParticipant);
        // Back to two: stays sfu, and a new third join sends no second `mode`.
        r.leave(&pid("c"), true, Instant::now());
        assert_eq!(r.mode(), MediaMode::Sfu);
        assert_eq!(r.return_due(), None, "off by default");
        let e = r.join(joiner("d", "D"), &ctx()).unwrap();
        assert!(!types(&e).iter().any(|(_, t)| *t == "mode"));
    }

    #[test]
    fn p2p_room_holds_two() {
        let mut r = room(RequestedMode::P2p);
        r.join(joiner("a", String::new()), &ctx()).unwrap();
        r.join(joiner("b", String::new()), &ctx()).unwrap();
        let refused = r.join(joiner("c", String::new()), &ctx()).unwrap_err();
        assert_eq!(refused.reply.type_name(), "full");
        assert_eq!(r.len(), 2);
        assert_eq!(r.mode(), MediaMode::P2p);
        // p2p-failed is accepted silently in a p2p room.
        assert_eq!(r.p2p_failed(&pid("a"), "b"), Ok(vec![]));
    }

    #[test]
    fn capacity_applies_to_auto_and_sfu_rooms() {
        for mode in [RequestedMode::Auto, RequestedMode::Sfu] {
            let mut r = room(mode);
            for i in 0..4 {
                r.join(joiner(&format!("p{i}"), ""), &ctx()).unwrap();
            }
            assert!(r.join(joiner("p9", String::new()), &ctx()).is_err());
            assert_eq!(r.mode(), MediaMode::Sfu);
        }
    }

    #[test]
    fn p2p_failed_switches_once() {
        let mut r = room(RequestedMode::Auto);
        r.join(joiner("a", String::new()), &ctx()).unwrap();
        r.join(joiner("b", String::new()), &ctx()).unwrap();
        assert_eq!(
            r.p2p_failed(&pid("a"), "zz"),
            Err(RoomError::NoSuchPeer("zz".into()))
        );
        assert_eq!(r.p2p_failed(&pid("a"), "a"), Err(RoomError::SelfAddressed));
        assert_eq!(r.mode(), MediaMode::P2p);
        let e = r.p2p_failed(&pid("b"), "a").unwrap();
        assert_eq!(types(&e), vec![(To::All, "mode")]);
        assert!(r.had_p2p_failure());
        assert_eq!(r.p2p_failed(&pid("a"), "b"), Ok(vec![]));
    }

    #[test]
    fn relay_sets_from_and_checks_the_target() {
        let mut r = room(RequestedMode::Auto);
        r.join(joiner("a", String::new()), &ctx()).unwrap();
        r.join(joiner("b", String::new()), &ctx()).unwrap();
        let e = r.relay(&pid("a"), None, json!({"x":1})).unwrap();
        assert_eq!(e.to, To::AllExcept(pid("a")));
        let ServerMessage::Message(m) = &e.msg else {
            panic!()
        };
        assert_eq!(m.from, "a");
        assert_eq!(m.data, json!({"x":1}));
        let e = r.relay(&pid("a"), Some("b"), json!(1)).unwrap();
        assert_eq!(e.to, To::One(pid("b")));
        assert_eq!(
            r.relay(&pid("a"), Some("a"), json!(1)),
            Err(RoomError::SelfAddressed)
        );
        assert_eq!(
            r.relay(&pid("a"), Some("q"), json!(1)),
            Err(RoomError::NoSuchPeer("q".into()))
        );
        assert_eq!(
            r.relay(&pid("a"), Some("sfu"), json!(1)),
            Err(RoomError::SfuUnavailable)
        );
        assert_eq!(
            r.relay(&pid("zz"), None, json!(1)),
            Err(RoomError::NotAMember(pid("zz")))
        );
    }

    #[test]
    fn leave_acknowledges_and_says_bye() {
        let mut r = room(RequestedMode::Auto);
        r.join(joiner("a", String::new()), &ctx()).unwrap();
        r.join(joiner("b", String::new()), &ctx()).unwrap();
        let now = Instant::now();
        let e = r.leave(&pid("a"), true, now);
        assert_eq!(
            types(&e),
            vec![(To::One(pid("a")), "leaved"), (To::All, "bye")]
        );
        let e = r.leave(&pid("b"), false, now);
        assert!(e.is_empty(), "nobody left to tell");
        assert!(r.is_empty());
        assert!(
            r.leave(&pid("b"), true, now).is_empty(),
            "leaving twice is a no-op"
        );
    }

    /// Three in an `auto` room, then one leaves at `t0`.
    fn back_to_two(r: &mut Room, t0: Instant) {
        for p in ["a", "b", "c"] {
            r.join(joiner(p, ""), &ctx()).unwrap();
        }
        assert_eq!(r.mode(), MediaMode::Sfu);
        r.leave(&pid("c"), false, t0);
    }

    #[test]
    fn room_back_to_two_returns_to_p2p_after_the_delay() {
        let mut r = returning_room(3000);
        let t0 = Instant::now();
        back_to_two(&mut r, t0);
        assert_eq!(r.return_due(), Some(t0 + Duration::from_millis(3000)));
        assert!(r.poll(t0).is_empty());
        assert!(r.poll(t0 + Duration::from_millis(2999)).is_empty());
        assert_eq!(r.mode(), MediaMode::Sfu);
        let e = r.poll(t0 + Duration::from_millis(3000));
        assert_eq!(types(&e), vec![(To::All, "mode")]);
        let ServerMessage::Mode(m) = &e[0].msg else {
            panic!()
        };
        assert_eq!(
            (m.mode, m.reason),
            (MediaMode::P2p, ModeReason::TwoParticipants)
        );
        assert_eq!(r.mode(), MediaMode::P2p);
        assert_eq!(r.return_due(), None);
        assert!(r.poll(t0 + Duration::from_secs(60)).is_empty(), "only once");
        // A new third switches to sfu again, like the first time.
        let e = r.join(joiner("d", String::new()), &ctx()).unwrap();
        assert!(types(&e).contains(&(To::All, "mode")));
        assert_eq!(r.mode(), MediaMode::Sfu);
    }

    #[test]
    fn a_third_joining_during_the_wait_keeps_the_room_sfu() {
        let mut r = returning_room(3000);
        let t0 = Instant::now();
        back_to_two(&mut r, t0);
        r.join(joiner("d", String::new()), &ctx()).unwrap();
        assert_eq!(r.return_due(), None);
        assert!(r.poll(t0 + Duration::from_secs(10)).is_empty());
        assert_eq!(r.mode(), MediaMode::Sfu);
        // Back to two again: the wait starts over from that departure.
        let t1 = t0 + Duration::from_secs(20);
        r.leave(&pid("d"), false, t1);
        assert!(r.poll(t1 + Duration::from_millis(2000)).is_empty());
        assert_eq!(r.poll(t1 + Duration::from_millis(3000)).len(), 1);
        assert_eq!(r.mode(), MediaMode::P2p);
    }

    #[test]
    fn a_room_that_had_a_p2p_failure_never_returns() {
        let mut r = returning_room(1000);
        r.join(joiner("a", String::new()), &ctx()).unwrap();
        r.join(joiner("b", String::new()), &ctx()).unwrap();
        r.p2p_failed(&pid("a"), "b").unwrap();
        r.join(joiner("c", String::new()), &ctx()).unwrap();
        let t0 = Instant::now();
        r.leave(&pid("c"), false, t0);
        assert_eq!(r.return_due(), None);
        assert!(r.poll(t0 + Duration::from_secs(60)).is_empty());
        assert_eq!(r.mode(), MediaMode::Sfu);
    }

    #[test]
    fn a_p2p_failure_during_the_wait_cancels_it() {
        let mut r = returning_room(1000);
        let t0 = Instant::now();
        back_to_two(&mut r, t0);
        // Accepted silently (the room is sfu), but it rules out a return.
        assert_eq!(r.p2p_failed(&pid("a"), "b"), Ok(vec![]));
        assert!(r.poll(t0 + Duration::from_secs(5)).is_empty());
        assert_eq!(r.mode(), MediaMode::Sfu);
    }

    #[test]
    fn only_auto_rooms_down_to_exactly_two_return() {
        // Down to one: nobody to call.
        let mut r = returning_room(1000);
        let t0 = Instant::now();
        back_to_two(&mut r, t0);
        r.leave(&pid("b"), false, t0);
        assert_eq!(r.return_due(), None);
        assert!(r.poll(t0 + Duration::from_secs(5)).is_empty());
        // A room created sfu stays sfu.
        let mut r = Room::new(
            RoomName::parse("s").unwrap(),
            &RoomSettings {
                requested: RequestedMode::Sfu,
                audio: AudioMode::Mix,
                max_participants: 4,
                p2p_return: Some(Duration::from_millis(1)),
                created_at: 0,
                empty_timeout: None,
            },
            t0,
        );
        for p in ["a", "b", "c"] {
            r.join(joiner(p, ""), &ctx()).unwrap();
        }
        r.leave(&pid("c"), false, t0);
        assert!(r.poll(t0 + Duration::from_secs(5)).is_empty());
        assert_eq!(r.mode(), MediaMode::Sfu);
    }
}
