//! Switchboard signaling protocol, version 1.
//!
//! The wire contract between Switchboard and its clients: one JSON object per
//! WebSocket text frame, tagged by `"type"`. This crate holds the serde types
//! for both directions, the validation rules (room names, participant ids) and
//! [`parse_client`], which turns a text frame into a [`ClientMessage`] or into
//! the exact `error` code the server must answer with. The prose spec is
//! `proto/PROTOCOL.md`; the JSON Schema is `proto/schema/switchboard-v1.schema.json`
//! (also available as [`JSON_SCHEMA`]).
//!
//! Shared by the server, the integration tests and the load tester.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The protocol version carried in `joined.protocol`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The JSON Schema of every v1 message (draft 2020-12).
pub const JSON_SCHEMA: &str = include_str!("../schema/switchboard-v1.schema.json");

/// Reserved peer id of the server's own media peer.
pub const SFU_PEER: &str = "sfu";
/// Reserved stream id of the mixed audio track.
pub const MIX_STREAM: &str = "mix";

/// Longest room name, in characters.
pub const ROOM_NAME_MAX: usize = 128;
/// Longest participant id, in characters.
pub const PARTICIPANT_ID_MAX: usize = 64;
/// Longest display name we keep, in characters (longer names are a `bad-request`).
pub const DISPLAY_NAME_MAX: usize = 256;

// ---------------------------------------------------------------------------
// Typed ids
// ---------------------------------------------------------------------------

/// A validated room name: 1–128 characters of `[A-Za-z0-9_.-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct RoomName(String);

impl RoomName {
    /// Checks `s` against the room name rules.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() || s.len() > ROOM_NAME_MAX {
            return Err(IdError::RoomNameLength(s.chars().count()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        {
            return Err(IdError::RoomNameChar(c));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RoomName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        RoomName::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A participant id chosen by the server: 1–64 characters of `[A-Za-z0-9_-]`,
/// never `sfu` or `mix`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ParticipantId(String);

impl ParticipantId {
    /// Checks `s` against the participant id rules.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let ok_len = !s.is_empty() && s.len() <= PARTICIPANT_ID_MAX;
        let ok_chars = s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok_len || !ok_chars || s == SFU_PEER || s == MIX_STREAM {
            return Err(IdError::ParticipantId);
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ParticipantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a room name or participant id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("room name must be 1-{ROOM_NAME_MAX} characters, got {0}")]
    RoomNameLength(usize),
    #[error("room name may hold only A-Z a-z 0-9 _ . - (found {0:?})")]
    RoomNameChar(char),
    #[error("participant id must be 1-{PARTICIPANT_ID_MAX} characters of A-Z a-z 0-9 _ - and not sfu or mix")]
    ParticipantId,
}

// ---------------------------------------------------------------------------
// Enumerations
// ---------------------------------------------------------------------------

/// The media mode a `join` asks for when it creates a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestedMode {
    /// P2P while at most two participants, SFU after a third join or `p2p-failed`.
    #[default]
    Auto,
    /// Always P2P; capacity two.
    P2p,
    /// Always through the server.
    Sfu,
}

/// The media mode a room is in now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaMode {
    P2p,
    Sfu,
}

impl MediaMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MediaMode::P2p => "p2p",
            MediaMode::Sfu => "sfu",
        }
    }
}

/// How audio reaches participants in SFU mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AudioMode {
    /// One mixed track per listener: everyone but themselves.
    #[default]
    Mix,
    /// Every audio track forwarded like video.
    Forward,
}

impl AudioMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AudioMode::Mix => "mix",
            AudioMode::Forward => "forward",
        }
    }
}

/// Why a room changed media mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModeReason {
    ThirdParticipant,
    P2pFailed,
    TwoParticipants,
    /// A member may not use P2P (no publish grant, or hidden).
    Policy,
}

impl ModeReason {
    pub const ALL: [ModeReason; 4] = [
        ModeReason::ThirdParticipant,
        ModeReason::P2pFailed,
        ModeReason::TwoParticipants,
        ModeReason::Policy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ModeReason::ThirdParticipant => "third-participant",
            ModeReason::P2pFailed => "p2p-failed",
            ModeReason::TwoParticipants => "two-participants",
            ModeReason::Policy => "policy",
        }
    }
}

/// The `code` of an `error` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    TooLarge,
    BadRequest,
    UnknownType,
    AlreadyInRoom,
    NotInRoom,
    NoSuchPeer,
    Unauthorized,
    RateLimited,
    RoomClosed,
    Internal,
    Forbidden,
    Replaced,
    Removed,
    ResumeFailed,
    Unavailable,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::TooLarge,
        ErrorCode::BadRequest,
        ErrorCode::UnknownType,
        ErrorCode::AlreadyInRoom,
        ErrorCode::NotInRoom,
        ErrorCode::NoSuchPeer,
        ErrorCode::Unauthorized,
        ErrorCode::RateLimited,
        ErrorCode::RoomClosed,
        ErrorCode::Internal,
        ErrorCode::Forbidden,
        ErrorCode::Replaced,
        ErrorCode::Removed,
        ErrorCode::ResumeFailed,
        ErrorCode::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::TooLarge => "too-large",
            ErrorCode::BadRequest => "bad-request",
            ErrorCode::UnknownType => "unknown-type",
            ErrorCode::AlreadyInRoom => "already-in-room",
            ErrorCode::NotInRoom => "not-in-room",
            ErrorCode::NoSuchPeer => "no-such-peer",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::RateLimited => "rate-limited",
            ErrorCode::RoomClosed => "room-closed",
            ErrorCode::Internal => "internal",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Replaced => "replaced",
            ErrorCode::Removed => "removed",
            ErrorCode::ResumeFailed => "resume-failed",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------
// Client -> server
// ---------------------------------------------------------------------------

/// `join`: enter a room.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Join {
    pub room: RoomName,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<RequestedMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio: Option<AudioMode>,
}

/// `resume` (1.1): take back a participant whose WebSocket dropped, within
/// its `resumeWindowMs`, with the `resumeToken` of its `joined`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resume {
    pub room: RoomName,
    pub id: ParticipantId,
    pub resume_token: String,
}

/// `leave`: leave the room.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Leave {
    pub room: RoomName,
}

/// `message`: relay `data` to the others, to one participant, or to `"sfu"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayRequest {
    pub room: RoomName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    pub data: Value,
}

/// `p2p-failed`: the client's P2P connection to `peer` failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct P2pFailed {
    pub room: RoomName,
    pub peer: String,
}

/// `ping` / `pong`: `id` is echoed verbatim (a string or a number).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Ping {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<PingId>,
}

/// The `id` of a `ping`: a string or a number, nothing else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PingId {
    Number(serde_json::Number),
    Text(String),
}

/// Every message a client may send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ClientMessage {
    Join(Join),
    Leave(Leave),
    Message(RelayRequest),
    P2pFailed(P2pFailed),
    Ping(Ping),
    Resume(Resume),
    TrackSettings(TrackSettings),
}

impl ClientMessage {
    /// The wire `type` of this message.
    pub fn type_name(&self) -> &'static str {
        match self {
            ClientMessage::Join(_) => "join",
            ClientMessage::Leave(_) => "leave",
            ClientMessage::Message(_) => "message",
            ClientMessage::P2pFailed(_) => "p2p-failed",
            ClientMessage::Ping(_) => "ping",
            ClientMessage::Resume(_) => "resume",
            ClientMessage::TrackSettings(_) => "track-settings",
        }
    }

    /// Serializes to the JSON text of one frame.
    pub fn to_text(&self) -> String {
        // Serializing these plain types cannot fail: no maps with non-string keys.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Every client `type`, in the order of the spec.
pub const CLIENT_TYPES: [&str; 7] = [
    "join",
    "leave",
    "message",
    "p2p-failed",
    "ping",
    "resume",
    "track-settings",
];

/// The longest `mid` a `track-settings` or `publisher-layers` names (the
/// server's own mids are short decimal numbers; a browser's too).
pub const MID_MAX: usize = 32;

/// `track-settings` (1.1): what a subscriber wants of one of the tracks the
/// server sends it, named by the m-section `mid` of the server's offer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrackSettings {
    pub room: RoomName,
    pub mid: String,
    /// The largest picture height worth sending (the tile's rendered
    /// height, in pixels); absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_height: Option<u32>,
    /// Off-screen or hidden: send nothing. Absent: not paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
}

// ---------------------------------------------------------------------------
// Server -> client
// ---------------------------------------------------------------------------

/// One entry of `joined.peers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub id: ParticipantId,
    pub name: String,
    /// The token's identity (`sub`); null when auth is off.
    #[serde(default)]
    pub identity: Option<String>,
}

/// An RTCIceServer as the browser API takes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Joined {
    pub room: RoomName,
    pub id: ParticipantId,
    pub peers: Vec<PeerInfo>,
    pub mode: MediaMode,
    pub audio: AudioMode,
    pub ice_servers: Vec<IceServer>,
    pub p2p_timeout_ms: u64,
    pub protocol: u32,
    /// Protocol 1.1 features this server speaks (e.g. `auth`).
    #[serde(default)]
    pub features: Vec<String>,
    /// Proves this participant on `resume` (1.1); absent when the server
    /// does not resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_token: Option<String>,
    /// How long after a dropped WebSocket `resume` is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_window_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OtherJoin {
    pub room: RoomName,
    pub id: ParticipantId,
    pub name: String,
    /// The token's identity (`sub`); null when auth is off.
    #[serde(default)]
    pub identity: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Full {
    pub room: RoomName,
}

/// `leaved` (to the leaver) and `bye` (to the others) carry the same fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomParticipant {
    pub room: RoomName,
    pub id: ParticipantId,
}

/// A relayed `message`; `from` is a participant id or `"sfu"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Relayed {
    pub room: RoomName,
    pub from: String,
    pub data: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModeChange {
    pub room: RoomName,
    pub mode: MediaMode,
    pub reason: ModeReason,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Speaker {
    pub id: ParticipantId,
    pub level: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Speakers {
    pub room: RoomName,
    pub speakers: Vec<Speaker>,
}

/// `publisher-layers` (1.1): the simulcast encodings (by rid) of the
/// publisher's own m-section `mid` that some subscriber needs now; the
/// client sets `encodings[i].active` to match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublisherLayers {
    pub room: RoomName,
    pub mid: String,
    pub active: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorMessage {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// `room-closed` because the node hosting the room died (cluster mode):
    /// joining the same room again brings the participant back, on a live
    /// node.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rejoin: bool,
}

/// Every message the server may send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerMessage {
    Joined(Joined),
    /// `resume` accepted: the same fields as `joined`, as the room is now.
    Resumed(Joined),
    Otherjoin(OtherJoin),
    Full(Full),
    Leaved(RoomParticipant),
    Bye(RoomParticipant),
    Message(Relayed),
    Mode(ModeChange),
    Speakers(Speakers),
    Error(ErrorMessage),
    Pong(Ping),
    #[serde(rename = "publisher-layers")]
    PublisherLayers(PublisherLayers),
}

impl ServerMessage {
    /// The wire `type` of this message.
    pub fn type_name(&self) -> &'static str {
        match self {
            ServerMessage::Joined(_) => "joined",
            ServerMessage::Resumed(_) => "resumed",
            ServerMessage::Otherjoin(_) => "otherjoin",
            ServerMessage::Full(_) => "full",
            ServerMessage::Leaved(_) => "leaved",
            ServerMessage::Bye(_) => "bye",
            ServerMessage::Message(_) => "message",
            ServerMessage::Mode(_) => "mode",
            ServerMessage::Speakers(_) => "speakers",
            ServerMessage::Error(_) => "error",
            ServerMessage::Pong(_) => "pong",
            ServerMessage::PublisherLayers(_) => "publisher-layers",
        }
    }

    /// Builds an `error` message.
    pub fn error(code: ErrorCode, message: impl Into<String>, request: Option<&str>) -> Self {
        ServerMessage::Error(ErrorMessage {
            code,
            message: message.into(),
            request: request.map(str::to_owned),
            rejoin: false,
        })
    }

    /// `room-closed` for a room whose node died: the client should join
    /// it again (it lands on a live node).
    pub fn room_lost(message: impl Into<String>) -> Self {
        ServerMessage::Error(ErrorMessage {
            code: ErrorCode::RoomClosed,
            message: message.into(),
            request: None,
            rejoin: true,
        })
    }

    /// Serializes to the JSON text of one frame.
    pub fn to_text(&self) -> String {
        // Serializing these plain types cannot fail: no maps with non-string keys
        // and `serde_json::Value` always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Every server `type`, in the order of the spec.
pub const SERVER_TYPES: [&str; 12] = [
    "joined",
    "resumed",
    "otherjoin",
    "full",
    "leaved",
    "bye",
    "message",
    "mode",
    "speakers",
    "error",
    "pong",
    "publisher-layers",
];

// ---------------------------------------------------------------------------
// Signaling data carried inside `message`
// ---------------------------------------------------------------------------

/// The `data` of an SDP or ICE `message` (offer, answer, candidate).
///
/// `data` between participants is relayed verbatim and need not be one of
/// these; only data sent to `"sfu"` is interpreted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SignalData {
    Offer {
        sdp: String,
    },
    Answer {
        sdp: String,
    },
    Candidate {
        /// sdpMLineIndex
        label: Option<u32>,
        /// sdpMid
        id: Option<String>,
        /// `candidate:...`, or `""` for end of candidates.
        candidate: String,
    },
}

// ---------------------------------------------------------------------------
// Parsing a client frame
// ---------------------------------------------------------------------------

/// Why a client frame was refused: the `error` code to answer with and a
/// human-readable message. `request` is the frame's `type` when it had one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ParseError {
    pub code: ErrorCode,
    pub message: String,
    pub request: Option<String>,
}

impl ParseError {
    fn new(code: ErrorCode, message: impl Into<String>, request: Option<&str>) -> Self {
        ParseError {
            code,
            message: message.into(),
            request: request.map(str::to_owned),
        }
    }
}

/// Parses one client text frame of at most `max_bytes` bytes.
///
/// Errors carry the exact protocol code: `too-large`, `bad-request` (not JSON,
/// not an object, missing or mistyped field, illegal room name) or
/// `unknown-type`.
pub fn parse_client(text: &str, max_bytes: usize) -> Result<ClientMessage, ParseError> {
    if text.len() > max_bytes {
        return Err(ParseError::new(
            ErrorCode::TooLarge,
            format!(
                "frame of {} bytes exceeds the limit of {max_bytes}",
                text.len()
            ),
            None,
        ));
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ParseError::new(ErrorCode::BadRequest, format!("not JSON: {e}"), None))?;
    let Value::Object(mut obj) = value else {
        return Err(ParseError::new(
            ErrorCode::BadRequest,
            "a message must be a JSON object",
            None,
        ));
    };
    let ty = match obj.get("type") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(ParseError::new(
                ErrorCode::BadRequest,
                "field `type` must be a string",
                None,
            ))
        }
        None => {
            return Err(ParseError::new(
                ErrorCode::BadRequest,
                "missing field `type`",
                None,
            ))
        }
    };
    if !CLIENT_TYPES.contains(&ty.as_str()) {
        let shown: String = ty.chars().take(64).collect();
        return Err(ParseError::new(
            ErrorCode::UnknownType,
            format!("unknown message type {shown:?}"),
            None,
        ));
    }
    obj.remove("type");
    let body = Value::Object(obj);
    let bad = |e: serde_json::Error| {
        ParseError::new(ErrorCode::BadRequest, e.to_string(), Some(ty.as_str()))
    };
    let msg = match ty.as_str() {
        "join" => {
            let j: Join = serde_json::from_value(body).map_err(bad)?;
            if j.name.chars().count() > DISPLAY_NAME_MAX {
                return Err(ParseError::new(
                    ErrorCode::BadRequest,
                    format!("name is longer than {DISPLAY_NAME_MAX} characters"),
                    Some("join"),
                ));
            }
            ClientMessage::Join(j)
        }
        "leave" => ClientMessage::Leave(serde_json::from_value(body).map_err(bad)?),
        "message" => {
            // `data` must be present; `null` counts as missing.
            if body.get("data").is_none_or(Value::is_null) {
                return Err(ParseError::new(
                    ErrorCode::BadRequest,
                    "missing field `data`",
                    Some("message"),
                ));
            }
            ClientMessage::Message(serde_json::from_value(body).map_err(bad)?)
        }
        "p2p-failed" => ClientMessage::P2pFailed(serde_json::from_value(body).map_err(bad)?),
        "resume" => ClientMessage::Resume(serde_json::from_value(body).map_err(bad)?),
        "track-settings" => {
            let t: TrackSettings = serde_json::from_value(body).map_err(bad)?;
            if t.mid.is_empty() || t.mid.len() > MID_MAX {
                return Err(ParseError::new(
                    ErrorCode::BadRequest,
                    format!("mid must be 1 to {MID_MAX} bytes"),
                    Some("track-settings"),
                ));
            }
            ClientMessage::TrackSettings(t)
        }
        "ping" => ClientMessage::Ping(serde_json::from_value(body).map_err(|_| {
            ParseError::new(
                ErrorCode::BadRequest,
                "field `id` must be a string or a number",
                Some("ping"),
            )
        })?),
        _ => unreachable!("checked against CLIENT_TYPES above"),
    };
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> ErrorCode {
        parse_client(text, 65536).expect_err("must be refused").code
    }

    #[test]
    fn room_names() {
        assert!(RoomName::parse("demo-1_a.b").is_ok());
        assert!(RoomName::parse(&"a".repeat(128)).is_ok());
        assert_eq!(
            RoomName::parse(&"a".repeat(129)),
            Err(IdError::RoomNameLength(129))
        );
        assert_eq!(RoomName::parse(""), Err(IdError::RoomNameLength(0)));
        assert_eq!(RoomName::parse("a b"), Err(IdError::RoomNameChar(' ')));
        assert_eq!(RoomName::parse("é"), Err(IdError::RoomNameChar('é')));
    }

    #[test]
    fn participant_ids() {
        assert!(ParticipantId::parse("p-1_A").is_ok());
        for bad in ["", "sfu", "mix", "a.b", &"x".repeat(65)] {
            assert!(ParticipantId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_every_client_type() {
        let j = parse_client(r#"{"type":"join","room":"r","name":"al","x":1}"#, 1000).unwrap();
        assert_eq!(
            j,
            ClientMessage::Join(Join {
                room: RoomName::parse("r").unwrap(),
                name: "al".into(),
                token: None,
                mode: None,
                audio: None
            })
        );
        assert!(matches!(
            parse_client(r#"{"type":"leave","room":"r"}"#, 1000),
            Ok(ClientMessage::Leave(_))
        ));
        assert_eq!(
            parse_client(
                r#"{"type":"resume","room":"r","id":"p1","resumeToken":"t"}"#,
                1000
            )
            .unwrap(),
            ClientMessage::Resume(Resume {
                room: RoomName::parse("r").unwrap(),
                id: ParticipantId::parse("p1").unwrap(),
                resume_token: "t".into(),
            })
        );
        assert_eq!(
            parse_client(r#"{"type":"resume","room":"r","id":"p1"}"#, 1000)
                .unwrap_err()
                .code,
            ErrorCode::BadRequest
        );
        let m = parse_client(
            r#"{"type":"message","room":"r","to":"p1","data":{"b":1,"a":2}}"#,
            1000,
        )
        .unwrap();
        let ClientMessage::Message(m) = m else {
            panic!("not a message")
        };
        // Key order is kept so relayed data is verbatim.
        assert_eq!(m.data.to_string(), r#"{"b":1,"a":2}"#);
        assert!(matches!(
            parse_client(r#"{"type":"p2p-failed","room":"r","peer":"p1"}"#, 1000),
            Ok(ClientMessage::P2pFailed(_))
        ));
        assert_eq!(
            parse_client(r#"{"type":"ping","id":7}"#, 1000).unwrap(),
            ClientMessage::Ping(Ping {
                id: Some(PingId::Number(7.into()))
            })
        );
        assert_eq!(
            parse_client(r#"{"type":"ping"}"#, 1000).unwrap(),
            ClientMessage::Ping(Ping { id: None })
        );
    }

    #[test]
    fn specific_error_codes() {
        assert_eq!(code("{nope"), ErrorCode::BadRequest);
        assert_eq!(code("[1,2]"), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"room":"r"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"type":5}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":"join"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"type":"join","room":7}"#), ErrorCode::BadRequest);
        assert_eq!(
            code(r#"{"type":"join","room":"a b"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"join","room":"r","mode":"mesh"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"message","room":"r"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"message","room":"r","data":null}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"message","room":"r","to":3,"data":{}}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(code(r#"{"type":"ping","id":[1]}"#), ErrorCode::BadRequest);
        let e = parse_client(&format!("\"{}\"", "x".repeat(100)), 50).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooLarge);
        let e = parse_client(r#"{"type":"join","room":""}"#, 100).unwrap_err();
        assert_eq!(e.request.as_deref(), Some("join"));
    }

    #[test]
    fn server_messages_round_trip_and_match_the_schema() {
        let schema: Value = serde_json::from_str(JSON_SCHEMA).unwrap();
        let server = jsonschema::validator_for(&serde_json::json!({
            "$ref": "#/$defs/ServerMessage",
            "$defs": schema["$defs"].clone(),
        }))
        .unwrap();
        let room = RoomName::parse("demo").unwrap();
        let p1 = ParticipantId::parse("p1").unwrap();
        let msgs = vec![
            ServerMessage::Joined(Joined {
                room: room.clone(),
                id: p1.clone(),
                peers: vec![PeerInfo {
                    id: ParticipantId::parse("p2").unwrap(),
                    name: "bob".into(),
                    identity: Some("bob@example".into()),
                }],
                mode: MediaMode::P2p,
                audio: AudioMode::Mix,
                ice_servers: vec![IceServer {
                    urls: vec!["turn:127.0.0.1:3478".into()],
                    username: Some("1:p1".into()),
                    credential: Some("x".into()),
                }],
                p2p_timeout_ms: 5000,
                protocol: PROTOCOL_VERSION,
                features: vec!["auth".into()],
                resume_token: Some("t0k3n".into()),
                resume_window_ms: Some(15000),
            }),
            ServerMessage::Resumed(Joined {
                room: room.clone(),
                id: p1.clone(),
                peers: vec![],
                mode: MediaMode::Sfu,
                audio: AudioMode::Mix,
                ice_servers: vec![],
                p2p_timeout_ms: 5000,
                protocol: PROTOCOL_VERSION,
                features: vec![],
                resume_token: Some("t0k3n".into()),
                resume_window_ms: Some(15000),
            }),
            ServerMessage::Otherjoin(OtherJoin {
                room: room.clone(),
                id: p1.clone(),
                name: String::new(),
                identity: None,
            }),
            ServerMessage::Full(Full { room: room.clone() }),
            ServerMessage::Leaved(RoomParticipant {
                room: room.clone(),
                id: p1.clone(),
            }),
            ServerMessage::Bye(RoomParticipant {
                room: room.clone(),
                id: p1.clone(),
            }),
            ServerMessage::Message(Relayed {
                room: room.clone(),
                from: "sfu".into(),
                data: serde_json::json!({"type":"answer","sdp":"v=0"}),
            }),
            ServerMessage::Mode(ModeChange {
                room: room.clone(),
                mode: MediaMode::Sfu,
                reason: ModeReason::ThirdParticipant,
            }),
            ServerMessage::Speakers(Speakers {
                room: room.clone(),
                speakers: vec![Speaker {
                    id: p1.clone(),
                    level: 0.5,
                }],
            }),
            ServerMessage::error(ErrorCode::NoSuchPeer, "nobody", Some("message")),
            ServerMessage::Pong(Ping {
                id: Some(PingId::Text("a".into())),
            }),
            ServerMessage::PublisherLayers(PublisherLayers {
                room: room.clone(),
                mid: "0".into(),
                active: vec!["q".into(), "h".into()],
            }),
        ];
        let mut seen = Vec::new();
        for m in &msgs {
            let text = m.to_text();
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["type"], m.type_name());
            assert!(server.is_valid(&v), "schema rejects {text}");
            let back: ServerMessage = serde_json::from_str(&text).unwrap();
            assert_eq!(&back, m);
            seen.push(m.type_name());
        }
        assert_eq!(seen, SERVER_TYPES);
        // The schema is not a rubber stamp.
        assert!(!server.is_valid(&serde_json::json!({"type":"joined","room":"demo"})));
        assert!(!server.is_valid(&serde_json::json!({"type":"bye","room":"a b","id":"p1"})));
    }

    #[test]
    fn client_messages_match_the_schema() {
        let schema: Value = serde_json::from_str(JSON_SCHEMA).unwrap();
        let client = jsonschema::validator_for(&serde_json::json!({
            "$ref": "#/$defs/ClientMessage",
            "$defs": schema["$defs"].clone(),
        }))
        .unwrap();
        for text in [
            r#"{"type":"join","room":"r","name":"a","mode":"sfu","audio":"forward"}"#,
            r#"{"type":"leave","room":"r"}"#,
            r#"{"type":"message","room":"r","data":{"type":"candidate","label":0,"id":"0","candidate":""}}"#,
            r#"{"type":"p2p-failed","room":"r","peer":"p1"}"#,
            r#"{"type":"ping","id":"x"}"#,
            r#"{"type":"track-settings","room":"r","mid":"1","maxHeight":180}"#,
            r#"{"type":"track-settings","room":"r","mid":"1","paused":true}"#,
        ] {
            let v: Value = serde_json::from_str(text).unwrap();
            assert!(client.is_valid(&v), "schema rejects {text}");
            let parsed = parse_client(text, 1000).unwrap();
            let again: Value = serde_json::from_str(&parsed.to_text()).unwrap();
            assert!(client.is_valid(&again));
        }
        assert!(!client.is_valid(&serde_json::json!({"type":"join","room":""})));
        assert!(!client.is_valid(&serde_json::json!({"type":"track-settings","room":"r"})));
    }

    #[test]
    fn track_settings_are_bounded() {
        assert_eq!(
            code(r#"{"type":"track-settings","room":"r","mid":""}"#),
            ErrorCode::BadRequest
        );
        let long = format!(
            r#"{{"type":"track-settings","room":"r","mid":"{}"}}"#,
            "1".repeat(33)
        );
        assert_eq!(code(&long), ErrorCode::BadRequest);
        assert_eq!(
            code(r#"{"type":"track-settings","room":"r","mid":"1","maxHeight":-1}"#),
            ErrorCode::BadRequest
        );
        let ok = parse_client(
            r#"{"type":"track-settings","room":"r","mid":"1","maxHeight":180}"#,
            1000,
        )
        .unwrap();
        let ClientMessage::TrackSettings(t) = ok else {
            panic!("not track-settings: {ok:?}")
        };
        assert_eq!(
            (t.mid.as_str(), t.max_height, t.paused),
            ("1", Some(180), None)
        );
    }
}
