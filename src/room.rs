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
}

/// The outcome of a join that was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    /// What to send to the one who asked (a `full`).
    pub reply: ServerMessage,
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
}

/// What every `joined` carries besides room state.
#[derive(Debug, Clone)]
pub struct JoinContext {
    pub ice_servers: Vec<switchboard_proto::IceServer>,
    pub p2p_timeout_ms: u64,
}

#[derive(Debug, Clone)]
struct Member {
    id: ParticipantId,
    name: String,
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
}

impl Room {
    pub fn new(name: RoomName, settings: &RoomSettings) -> Self {
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
    pub fn join(
        &mut self,
        id: ParticipantId,
        name: String,
        ctx: &JoinContext,
    ) -> Result<Vec<Effect>, Refused> {
        if self.members.len() >= self.capacity {
            return Err(Refused {
                reply: ServerMessage::Full(Full {
                    room: self.name.clone(),
                }),
            });
        }
        let switch = self.requested == RequestedMode::Auto
            && self.mode == MediaMode::P2p
            && self.members.len() >= 2;
        if switch {
            self.mode = MediaMode::Sfu;
        }
        // A third person is back: the room stays `sfu`.
        self.return_at = None;
        let peers = self
            .members
            .iter()
            .map(|m| PeerInfo {
                id: m.id.clone(),
                name: m.name.clone(),
            })
            .collect();
        self.members.push(Member {
            id: id.clone(),
            name: name.clone(),
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
            }),
        });
        if switch {
            effects.push(self.mode_effect(ModeReason::ThirdParticipant));
        }
        if self.members.len() > 1 {
            effects.push(Effect {
                to: To::AllExcept(id.clone()),
                msg: ServerMessage::Otherjoin(OtherJoin {
                    room: self.name.clone(),
                    id,
                    name,
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
        self.members.remove(pos);
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
        if !self.members.is_empty() {
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
        if !self.contains(from) {
            return Err(RoomError::NotAMember(from.clone()));
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
            },
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
            },
        )
    }

    fn ctx() -> JoinContext {
        JoinContext {
            ice_servers: vec![],
            p2p_timeout_ms: 5000,
        }
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
        let e = r.join(pid("a"), "A".into(), &ctx()).unwrap();
        assert_eq!(types(&e), vec![(To::One(pid("a")), "joined")]);
        let e = r.join(pid("b"), "B".into(), &ctx()).unwrap();
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
        let e = r.join(pid("c"), "C".into(), &ctx()).unwrap();
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
        let e = r.join(pid("d"), "D".into(), &ctx()).unwrap();
        assert!(!types(&e).iter().any(|(_, t)| *t == "mode"));
    }

    #[test]
    fn p2p_room_holds_two() {
        let mut r = room(RequestedMode::P2p);
        r.join(pid("a"), String::new(), &ctx()).unwrap();
        r.join(pid("b"), String::new(), &ctx()).unwrap();
        let refused = r.join(pid("c"), String::new(), &ctx()).unwrap_err();
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
                r.join(pid(&format!("p{i}")), String::new(), &ctx())
                    .unwrap();
            }
            assert!(r.join(pid("p9"), String::new(), &ctx()).is_err());
            assert_eq!(r.mode(), MediaMode::Sfu);
        }
    }

    #[test]
    fn p2p_failed_switches_once() {
        let mut r = room(RequestedMode::Auto);
        r.join(pid("a"), String::new(), &ctx()).unwrap();
        r.join(pid("b"), String::new(), &ctx()).unwrap();
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
        r.join(pid("a"), String::new(), &ctx()).unwrap();
        r.join(pid("b"), String::new(), &ctx()).unwrap();
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
        r.join(pid("a"), String::new(), &ctx()).unwrap();
        r.join(pid("b"), String::new(), &ctx()).unwrap();
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
            r.join(pid(p), String::new(), &ctx()).unwrap();
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
        let e = r.join(pid("d"), String::new(), &ctx()).unwrap();
        assert!(types(&e).contains(&(To::All, "mode")));
        assert_eq!(r.mode(), MediaMode::Sfu);
    }

    #[test]
    fn a_third_joining_during_the_wait_keeps_the_room_sfu() {
        let mut r = returning_room(3000);
        let t0 = Instant::now();
        back_to_two(&mut r, t0);
        r.join(pid("d"), String::new(), &ctx()).unwrap();
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
        r.join(pid("a"), String::new(), &ctx()).unwrap();
        r.join(pid("b"), String::new(), &ctx()).unwrap();
        r.p2p_failed(&pid("a"), "b").unwrap();
        r.join(pid("c"), String::new(), &ctx()).unwrap();
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
            },
        );
        for p in ["a", "b", "c"] {
            r.join(pid(p), String::new(), &ctx()).unwrap();
        }
        r.leave(&pid("c"), false, t0);
        assert!(r.poll(t0 + Duration::from_secs(5)).is_empty());
        assert_eq!(r.mode(), MediaMode::Sfu);
    }
}
