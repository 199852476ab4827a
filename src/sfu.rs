//! The SFU media plane as the rest of the server sees it: a handle that takes
//! commands from the hub. The media itself runs on its own thread in
//! [`crate::transport`], the only module that knows webrtc-rs.
//!
//! The hub tells the media plane three things: a participant sent something
//! to `"sfu"` (offer, answer, candidate), a participant left, and a room's
//! media mode. The media plane answers participants through their outboxes.
//!
//! The media runs on `--media-workers` threads. Each room lives on one
//! worker ([`Placement`]): every command about a room goes to that worker,
//! so nothing on the packet path crosses workers.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use switchboard_proto::{AudioMode, ParticipantId, RoomName, SignalData};
use tokio::sync::mpsc;

use crate::auth::Grants;

/// Audio or video, as the admin API names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaKind {
    Audio,
    Video,
}

impl MediaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MediaKind::Audio => "audio",
            MediaKind::Video => "video",
        }
    }
}

/// What each participant publishes now, kept by the media plane for the
/// admin API.
#[derive(Debug, Default)]
pub struct Publishing {
    map: dashmap::DashMap<ParticipantId, [u32; 2]>,
}

impl Publishing {
    /// `participant` opened (`+1`) or closed (`-1`) a track of `kind`.
    pub fn track(&self, participant: &ParticipantId, kind: MediaKind, opened: bool) {
        let mut e = self.map.entry(participant.clone()).or_default();
        let n = &mut e[kind as usize];
        *n = if opened {
            n.saturating_add(1)
        } else {
            n.saturating_sub(1)
        };
    }

    /// `participant`'s connection is gone.
    pub fn forget(&self, participant: &ParticipantId) {
        self.map.remove(participant);
    }

    /// Whether `participant` publishes audio, video.
    pub fn get(&self, participant: &ParticipantId) -> (bool, bool) {
        self.map
            .get(participant)
            .map(|e| (e[0] > 0, e[1] > 0))
            .unwrap_or((false, false))
    }
}

/// Where the media plane listens and what it announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaConfig {
    /// Address the UDP socket binds (`--rtc-ip`:`--rtc-port`).
    pub bind: SocketAddr,
    /// Address put in ICE candidates (`--public-ip`, default the bind IP).
    pub public_ip: Option<IpAddr>,
    /// Also accept ICE over TCP (passive) on the same port number.
    pub ice_tcp: bool,
    /// How many of the loudest speakers a mix room mixes (K).
    pub mix_speakers: usize,
    /// Opus encoder complexity of the mixer (0-10).
    pub mix_complexity: i32,
    /// Tracks one participant may publish (`--max-tracks`).
    pub max_tracks: usize,
    /// ICE-TCP connections open at once per address (`--max-conns-per-ip`).
    pub max_tcp_per_ip: usize,
    /// Media worker threads (`--media-workers`, at least 1).
    pub workers: usize,
}

/// `message` with `to:"sfu"` from `participant` in `room`, with what the
/// media plane needs to act on it.
#[derive(Debug)]
pub struct Signal {
    pub room: RoomName,
    pub participant: ParticipantId,
    /// Whether the room is in `sfu` mode now (otherwise warm standby).
    pub sfu: bool,
    /// The room's audio handling (set when the room was created).
    pub audio: AudioMode,
    /// What the participant's token allows.
    pub grants: Grants,
    /// A classic Socket.IO client (gets the mix and the speaker's video).
    pub classic: bool,
    pub data: SignalData,
}

/// A request from the signaling side.
#[derive(Debug)]
pub enum Command {
    /// `message` with `to:"sfu"` from `participant` in `room`.
    Signal(Signal),
    /// An administrator muted (or unmuted) `participant`'s track of `kind`:
    /// it is not forwarded or mixed while muted.
    Mute {
        room: RoomName,
        participant: ParticipantId,
        kind: MediaKind,
        muted: bool,
    },
    /// `track-settings`: what `participant` wants of the track on its
    /// m-section `mid`.
    TrackSettings {
        room: RoomName,
        participant: ParticipantId,
        settings: switchboard_proto::TrackSettings,
    },
    /// `participant` left `room` (or vanished).
    Left {
        room: RoomName,
        participant: ParticipantId,
    },
    /// `room` is now in `sfu` mode: start forwarding.
    RoomSfu { room: RoomName },
    /// `room` is back in `p2p` mode (`--p2p-return-ms`): stop forwarding;
    /// the server connections stay up as warm standbys.
    RoomP2p { room: RoomName },
    /// Stop the media workers.
    Shutdown,
}

/// How many commands may wait for one media worker.
pub const COMMAND_QUEUE: usize = 4096;

/// The hub's handle on the media plane.
#[derive(Debug, Clone)]
pub struct MediaPlane {
    workers: Vec<mpsc::Sender<Command>>,
    placement: Arc<Mutex<Placement>>,
    local_addr: SocketAddr,
}

/// Why the media plane refused a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MediaError {
    #[error("the media plane is overloaded")]
    Busy,
    #[error("the media plane has stopped")]
    Stopped,
}

impl MediaPlane {
    pub(crate) fn new(
        workers: Vec<mpsc::Sender<Command>>,
        placement: Arc<Mutex<Placement>>,
        local_addr: SocketAddr,
    ) -> MediaPlane {
        MediaPlane {
            workers,
            placement,
            local_addr,
        }
    }

    /// The UDP address media is received on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Queues `cmd` without waiting, on the worker of its room. A command
    /// about a room no worker holds (a mute or a mode change before anyone
    /// signaled the server) has nothing to act on and is dropped.
    pub fn send(&self, cmd: Command) -> Result<(), MediaError> {
        if matches!(cmd, Command::Shutdown) {
            for tx in &self.workers {
                let _ = tx.try_send(Command::Shutdown);
            }
            return Ok(());
        }
        let worker = {
            let mut placement = self.placement.lock().unwrap_or_else(|e| e.into_inner());
            match &cmd {
                Command::Signal(s) => Some(placement.place(&s.room, &s.participant)),
                Command::Left { room, participant } => placement.remove(room, participant),
                Command::Mute { room, .. }
                | Command::TrackSettings { room, .. }
                | Command::RoomSfu { room }
                | Command::RoomP2p { room } => placement.worker_of(room),
                Command::Shutdown => None,
            }
        };
        let Some(tx) = worker.and_then(|w| self.workers.get(w)) else {
            return Ok(());
        };
        tx.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => MediaError::Busy,
            mpsc::error::TrySendError::Closed(_) => MediaError::Stopped,
        })
    }
}

/// Which worker holds which room. A room is placed on the worker holding
/// the fewest rooms when its first participant signals the server, and stays
/// there while any participant that signaled is in it. Of equally loaded
/// workers the last is chosen (worker 0 also reads the port for all).
#[derive(Debug)]
pub struct Placement {
    rooms: HashMap<RoomName, (usize, HashSet<ParticipantId>)>,
    /// Rooms per worker.
    load: Vec<usize>,
}

impl Placement {
    pub fn new(workers: usize) -> Placement {
        Placement {
            rooms: HashMap::new(),
            load: vec![0; workers.max(1)],
        }
    }

    /// The worker of `room`, placing it if new; `participant` counts as in it.
    pub fn place(&mut self, room: &RoomName, participant: &ParticipantId) -> usize {
        if let Some((w, members)) = self.rooms.get_mut(room) {
            if !members.contains(participant) {
                members.insert(participant.clone());
            }
            return *w;
        }
        // Ties go to the highest index: worker 0 also reads the port for
        // everyone, so it takes rooms last.
        let w = (0..self.load.len())
            .rev()
            .min_by_key(|&w| self.load[w])
            .unwrap_or(0);
        self.load[w] += 1;
        self.rooms
            .insert(room.clone(), (w, HashSet::from([participant.clone()])));
        w
    }

    /// The worker of `room`, if placed.
    pub fn worker_of(&self, room: &RoomName) -> Option<usize> {
        self.rooms.get(room).map(|(w, _)| *w)
    }

    /// `participant` left `room`: returns the room's worker (which must hear
    /// of it); the room is unplaced when nobody that signaled is left.
    pub fn remove(&mut self, room: &RoomName, participant: &ParticipantId) -> Option<usize> {
        let (w, members) = self.rooms.get_mut(room)?;
        let w = *w;
        members.remove(participant);
        if members.is_empty() {
            self.rooms.remove(room);
            self.load[w] = self.load[w].saturating_sub(1);
        }
        Some(w)
    }

    /// Rooms each worker holds.
    pub fn load(&self) -> &[usize] {
        &self.load
    }
}

/// Exit status of a process whose media worker panicked (EX_SOFTWARE).
pub const PANIC_EXIT_CODE: i32 = 70;

/// Runs `f` (a thread's whole body); if it panics, logs it and calls
/// `exit(PANIC_EXIT_CODE)`. Every room's media lives on that thread: a
/// process that lost it would answer `/healthz` and signaling while no
/// packet moves, so it ends instead and its supervisor restarts it.
pub fn exit_on_panic<F: FnOnce()>(thread: &str, exit: impl FnOnce(i32), f: F) {
    if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-string panic".to_owned());
        tracing::error!(thread, panic = %what, "the media thread panicked; exiting so the supervisor restarts the server");
        exit(PANIC_EXIT_CODE);
    }
}

#[cfg(test)]
mod placement_tests {
    use super::*;

    fn room(n: &str) -> RoomName {
        RoomName::parse(n).expect("room name")
    }
    fn who(n: &str) -> ParticipantId {
        ParticipantId::parse(n).expect("participant id")
    }

    #[test]
    fn a_rooms_members_share_a_worker_and_rooms_spread_over_workers() {
        let mut p = Placement::new(2);
        let mut worker_of_room = HashMap::new();
        for r in 0..8 {
            for m in 0..4 {
                let w = p.place(&room(&format!("r{r}")), &who(&format!("p{r}-{m}")));
                assert_eq!(*worker_of_room.entry(r).or_insert(w), w, "room r{r} split");
            }
        }
        assert_eq!(p.load(), &[4, 4]);
        let on_zero = worker_of_room.values().filter(|&&w| w == 0).count();
        assert_eq!(on_zero, 4);
    }

    #[test]
    fn a_room_stays_on_its_worker_until_its_last_member_leaves() {
        let mut p = Placement::new(2);
        let (a, b) = (room("a"), room("b"));
        // The first room goes to the worker that does not read the port.
        assert_eq!(p.place(&a, &who("x")), 1);
        assert_eq!(p.place(&b, &who("y")), 0);
        assert_eq!(p.place(&a, &who("z")), 1);
        assert_eq!(p.remove(&a, &who("x")), Some(1));
        assert_eq!(p.worker_of(&a), Some(1), "z is still in a");
        assert_eq!(p.remove(&a, &who("z")), Some(1));
        assert_eq!(p.worker_of(&a), None);
        assert_eq!(p.load(), &[1, 0]);
        // A new room goes to the emptier worker; a stranger's leave is nothing.
        assert_eq!(p.place(&room("c"), &who("w")), 1);
        assert_eq!(p.remove(&room("nowhere"), &who("w")), None);
    }

    #[test]
    fn one_worker_takes_every_room() {
        let mut p = Placement::new(1);
        for r in 0..5 {
            assert_eq!(p.place(&room(&format!("r{r}")), &who("m")), 0);
        }
        assert_eq!(p.load(), &[5]);
    }
}

#[cfg(test)]
mod panic_tests {
    use super::*;

    #[test]
    fn a_panic_exits_with_the_panic_code_and_a_clean_end_does_not() {
        let mut code = None;
        exit_on_panic("t", |c| code = Some(c), || panic!("boom"));
        assert_eq!(code, Some(PANIC_EXIT_CODE));
        let mut code = None;
        exit_on_panic("t", |c| code = Some(c), || {});
        assert_eq!(code, None);
    }
}
