//! The SFU media plane as the rest of the server sees it: a handle that takes
//! commands from the hub. The media itself runs on its own thread in
//! [`crate::transport`], the only module that knows webrtc-rs.
//!
//! The hub tells the media plane three things: a participant sent something
//! to `"sfu"` (offer, answer, candidate), a participant left, and a room's
//! media mode. The media plane answers participants through their outboxes.

use std::net::{IpAddr, SocketAddr};

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
    /// Stop the media thread.
    Shutdown,
}

/// How many commands may wait for the media thread.
pub const COMMAND_QUEUE: usize = 4096;

/// The hub's handle on the media plane.
#[derive(Debug, Clone)]
pub struct MediaPlane {
    tx: mpsc::Sender<Command>,
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
    pub(crate) fn new(tx: mpsc::Sender<Command>, local_addr: SocketAddr) -> MediaPlane {
        MediaPlane { tx, local_addr }
    }

    /// The UDP address media is received on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Queues `cmd` without waiting.
    pub fn send(&self, cmd: Command) -> Result<(), MediaError> {
        self.tx.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => MediaError::Busy,
            mpsc::error::TrySendError::Closed(_) => MediaError::Stopped,
        })
    }
}

/// Exit status of a process whose media thread panicked (EX_SOFTWARE).
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
