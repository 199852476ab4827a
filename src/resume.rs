//! Resuming after a dropped WebSocket (protocol 1.1): who may resume, and
//! what a participant missed while its connection was gone.
//!
//! Every participant joined over `/ws` gets a resume token. When its
//! WebSocket drops, the hub *parks* it instead of removing it: its outbox
//! in the outbox map is replaced by a parking outbox whose receiver is kept
//! here, so messages meant for it (an `otherjoin`, a server offer) queue in
//! the same bounded channel a live connection has. Its media connection is
//! not touched, so media keeps flowing. A `resume` with the right room, id
//! and token within the window puts a new connection's outbox back and
//! hands over what queued, in order, after `resumed`. A parked participant
//! whose window passes, or whose parking outbox overflowed (it could not
//! be brought up to date), leaves as a vanished one: `bye` for the others.
//!
//! Lock order (see [`crate::hub`]): room entry, then this map, then the
//! outbox map.

use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use rand::distr::{Alphanumeric, SampleString};
use switchboard_proto::{ParticipantId, RoomName};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Length of a resume token (alphanumeric, so ~190 bits).
const TOKEN_LEN: usize = 32;

/// One participant's resume state.
struct Resumable {
    room: RoomName,
    token: String,
    parked: Option<Parked>,
}

/// A participant whose connection is gone, waiting for `resume`.
pub struct Parked {
    pub since: Instant,
    /// What was sent to it meanwhile.
    pub missed: mpsc::Receiver<Utf8Bytes>,
    /// Cancelled when the parking outbox overflowed.
    pub overflowed: CancellationToken,
}

/// Why a `resume` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    #[error(
        "no participant to resume with that room, id and token (it left, or its window passed)"
    )]
    Unknown,
    #[error("too much happened while the connection was gone; join again")]
    Overflowed,
}

impl ResumeError {
    pub fn label(self) -> &'static str {
        match self {
            ResumeError::Unknown => "unknown",
            ResumeError::Overflowed => "overflowed",
        }
    }
}

/// Resume tokens and parked participants.
pub struct Resumes {
    map: DashMap<ParticipantId, Resumable>,
    window: Duration,
}

impl Resumes {
    /// `window` zero turns resuming off.
    pub fn new(window: Duration) -> Resumes {
        Resumes {
            map: DashMap::new(),
            window,
        }
    }

    pub fn enabled(&self) -> bool {
        !self.window.is_zero()
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// A new token for `id` in `room`; `None` when resuming is off.
    pub fn issue(&self, id: &ParticipantId, room: &RoomName) -> Option<String> {
        if !self.enabled() {
            return None;
        }
        let token = Alphanumeric.sample_string(&mut rand::rng(), TOKEN_LEN);
        self.map.insert(
            id.clone(),
            Resumable {
                room: room.clone(),
                token: token.clone(),
                parked: None,
            },
        );
        Some(token)
    }

    /// `id` is gone for good.
    pub fn forget(&self, id: &ParticipantId) -> bool {
        self.map.remove(id).is_some_and(|(_, r)| r.parked.is_some())
    }

    /// Parks `id`; `false` if it has no resume state.
    pub fn park(&self, id: &ParticipantId, parked: Parked) -> bool {
        match self.map.get_mut(id) {
            Some(mut r) => {
                r.parked = Some(parked);
                true
            }
            None => false,
        }
    }

    /// Checks a `resume` and takes the parked state out: the caller puts
    /// the new connection in place. `None`: the participant is not parked,
    /// its old connection still open as far as the server knows (the
    /// client saw it drop first, e.g. its address went away): the new
    /// connection takes over.
    pub fn take(
        &self,
        room: &RoomName,
        id: &ParticipantId,
        token: &str,
    ) -> Result<Option<Parked>, ResumeError> {
        let mut r = self.map.get_mut(id).ok_or(ResumeError::Unknown)?;
        if r.room != *room || !constant_time_eq(r.token.as_bytes(), token.as_bytes()) {
            return Err(ResumeError::Unknown);
        }
        let Some(parked) = r.parked.take() else {
            return Ok(None);
        };
        if parked.overflowed.is_cancelled() {
            return Err(ResumeError::Overflowed);
        }
        Ok(Some(parked))
    }

    /// Parked participants whose window has passed at `now`, or whose
    /// parking outbox overflowed, with their rooms.
    pub fn due(&self, now: Instant) -> Vec<(RoomName, ParticipantId)> {
        self.map
            .iter()
            .filter(|r| {
                r.parked.as_ref().is_some_and(|p| {
                    now.saturating_duration_since(p.since) >= self.window
                        || p.overflowed.is_cancelled()
                })
            })
            .map(|r| (r.room.clone(), r.key().clone()))
            .collect()
    }

    /// Participants parked now.
    pub fn parked(&self) -> usize {
        self.map.iter().filter(|r| r.parked.is_some()).count()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parked(now: Instant) -> (Parked, mpsc::Sender<Utf8Bytes>, CancellationToken) {
        let (tx, rx) = mpsc::channel(4);
        let overflowed = CancellationToken::new();
        (
            Parked {
                since: now,
                missed: rx,
                overflowed: overflowed.clone(),
            },
            tx,
            overflowed,
        )
    }

    fn ids() -> (RoomName, ParticipantId) {
        (
            RoomName::parse("r").expect("room"),
            ParticipantId::parse("p1").expect("id"),
        )
    }

    #[test]
    fn only_the_right_token_for_the_right_room_resumes_a_parked_participant() {
        let r = Resumes::new(Duration::from_secs(15));
        let (room, id) = ids();
        let token = r.issue(&id, &room).expect("token");
        assert!(
            matches!(r.take(&room, &id, &token), Ok(None)),
            "a live participant is taken over, with nothing parked"
        );
        let now = Instant::now();
        let (p, _tx, _) = parked(now);
        assert!(r.park(&id, p));
        assert_eq!(
            r.take(&room, &id, "wrong").err(),
            Some(ResumeError::Unknown)
        );
        let other = RoomName::parse("other").expect("room");
        assert_eq!(
            r.take(&other, &id, &token).err(),
            Some(ResumeError::Unknown)
        );
        assert!(r.take(&room, &id, &token).is_ok());
        assert_eq!(r.parked(), 0);
    }

    #[test]
    fn the_window_and_an_overflow_make_a_parked_participant_due() {
        let r = Resumes::new(Duration::from_secs(15));
        let (room, id) = ids();
        let token = r.issue(&id, &room).expect("token");
        let now = Instant::now();
        let (p, _tx, overflowed) = parked(now);
        r.park(&id, p);
        assert!(r.due(now + Duration::from_secs(14)).is_empty());
        assert_eq!(
            r.due(now + Duration::from_secs(15)),
            vec![(room.clone(), id.clone())]
        );
        overflowed.cancel();
        assert_eq!(r.due(now), vec![(room.clone(), id.clone())]);
        assert_eq!(
            r.take(&room, &id, &token).err(),
            Some(ResumeError::Overflowed)
        );
        assert!(!r.forget(&id), "taken out already");
    }

    #[test]
    fn off_issues_nothing() {
        let r = Resumes::new(Duration::ZERO);
        let (room, id) = ids();
        assert_eq!(r.issue(&id, &room), None);
    }
}
