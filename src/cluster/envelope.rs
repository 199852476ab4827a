//! What nodes say to each other over Redis pub/sub about relayed
//! connections: one JSON object per message, on the channel of the node it
//! is for (`sb:relay:<node>`).
//!
//! A connection is named `<origin node>#<n>`: the node that holds its
//! WebSocket and a number unique there. The origin sends the owner the
//! client's frames (`open`, `frame`, `close`); the owner sends back what the
//! client should read (`text`) and how the relay goes on (`end`, `bounce`,
//! `closed`).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::hub::Client;

fn is_protocol(kind: &Client) -> bool {
    *kind == Client::Protocol
}

/// The largest envelope a node reads: a client frame may be up to four
/// times `--max-frame-bytes` before the WebSocket layer refuses it; the
/// rest is the envelope's own fields.
pub fn max_envelope_bytes(max_frame_bytes: usize) -> usize {
    max_frame_bytes.saturating_mul(4).saturating_add(1024)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "lowercase", deny_unknown_fields)]
pub enum Envelope {
    /// Origin → owner: a new relayed connection and its first frame (the
    /// `join` or `resume` the origin placed on the owner); `kind`: what
    /// client it is (a classic Socket.IO client's frames are translated to
    /// the protocol's by its origin).
    Open {
        c: String,
        ip: IpAddr,
        t: String,
        #[serde(default, skip_serializing_if = "is_protocol")]
        kind: Client,
    },
    /// Origin → owner: one more frame from the client.
    Frame { c: String, t: String },
    /// Origin → owner: the client's WebSocket ended; `bye`: it said goodbye
    /// (a close frame), so the participant leaves at once instead of being
    /// kept for a `resume`.
    Close { c: String, bye: bool },
    /// Owner → origin: a frame for the client.
    Text { c: String, t: String },
    /// Owner → origin: the connection is no longer in a room on the owner;
    /// the origin handles its next frames itself.
    End { c: String },
    /// Owner → origin: a frame the owner has no connection for (sent after
    /// `end`); the origin handles it itself.
    Bounce { c: String, t: String },
    /// Owner → origin: close the client's WebSocket (`why`: the close reason).
    Closed { c: String, why: String },
}

impl Envelope {
    pub fn conn(&self) -> &str {
        match self {
            Envelope::Open { c, .. }
            | Envelope::Frame { c, .. }
            | Envelope::Close { c, .. }
            | Envelope::Text { c, .. }
            | Envelope::End { c }
            | Envelope::Bounce { c, .. }
            | Envelope::Closed { c, .. } => c,
        }
    }

    pub fn to_json(&self) -> String {
        // Plain strings, numbers and an address: serializing cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses one envelope; `None` for anything malformed or over `limit`.
    pub fn parse(bytes: &[u8], limit: usize) -> Option<Envelope> {
        if bytes.len() > limit {
            return None;
        }
        let env: Envelope = serde_json::from_slice(bytes).ok()?;
        split_conn(env.conn())?;
        Some(env)
    }
}

/// The connection name `<node>#<n>`.
pub fn conn_name(node: &str, n: u64) -> String {
    format!("{node}#{n}")
}

/// `(node, n)` of a connection name.
pub fn split_conn(c: &str) -> Option<(&str, u64)> {
    let (node, n) = c.rsplit_once('#')?;
    if node.is_empty() || node.len() > 64 {
        return None;
    }
    Some((node, n.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip() {
        let all = [
            Envelope::Open {
                c: conn_name("a", 1),
                ip: "10.0.0.1".parse().unwrap_or_else(|_| unreachable!()),
                t: r#"{"type":"join","room":"r"}"#.into(),
                kind: Client::Protocol,
            },
            Envelope::Open {
                c: conn_name("a", 2),
                ip: "::1".parse().unwrap_or_else(|_| unreachable!()),
                t: r#"{"type":"join","room":"r"}"#.into(),
                kind: Client::ClassicRelayed,
            },
            Envelope::Frame {
                c: "a#1".into(),
                t: "{}".into(),
            },
            Envelope::Close {
                c: "a#1".into(),
                bye: true,
            },
            Envelope::Text {
                c: "a#1".into(),
                t: "x".into(),
            },
            Envelope::End { c: "a#1".into() },
            Envelope::Bounce {
                c: "a#1".into(),
                t: "y".into(),
            },
            Envelope::Closed {
                c: "a#1".into(),
                why: "replaced".into(),
            },
        ];
        for env in all {
            let json = env.to_json();
            assert_eq!(Envelope::parse(json.as_bytes(), 4096), Some(env), "{json}");
        }
    }

    #[test]
    fn malformed_envelopes_are_refused() {
        for bad in [
            &b""[..],
            b"not json",
            b"{}",
            br#"{"k":"text","c":"a#1"}"#,
            br#"{"k":"text","c":"no-number","t":"x"}"#,
            br##"{"k":"text","c":"#1","t":"x"}"##,
            br#"{"k":"text","c":"a#1","t":"x","extra":1}"#,
            br#"{"k":"launch","c":"a#1"}"#,
            br#"{"k":"open","c":"a#1","ip":"not an ip","t":"x"}"#,
        ] {
            assert_eq!(
                Envelope::parse(bad, 4096),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let big = Envelope::Text {
            c: "a#1".into(),
            t: "x".repeat(5000),
        }
        .to_json();
        assert_eq!(Envelope::parse(big.as_bytes(), 4096), None);
    }
}
