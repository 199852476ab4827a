//! Checks on a client's SDP offer before the WebRTC engine parses it: how
//! many media sections, candidates and sending tracks it holds, against the
//! server's caps, and munging that turns the sending sections the client may
//! not use into receive-only ones (so the answer accepts none of them).
//!
//! Pure text work over lines, cheaper than a parse: an offer over a cap is
//! refused before it costs the media thread a full parse and answer.

/// Caps on one offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OfferLimits {
    /// Media sections (`m=` lines) in all.
    pub max_sections: usize,
    /// Simulcast encodings (`a=rid:... send`) in one section.
    pub max_encodings: usize,
    /// `a=candidate` lines in all.
    pub max_candidates: usize,
    /// Audio/video sections the client sends on; later ones are made
    /// receive-only.
    pub max_sending: usize,
}

/// What an offer holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OfferShape {
    pub sections: usize,
    pub candidates: usize,
    /// Audio/video sections with a sending direction (sendrecv, sendonly,
    /// or none given) and a non-zero port.
    pub sending: usize,
    /// The most sending rids (`a=rid:<id> send`) in one section.
    pub encodings: usize,
}

/// Why an offer is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    #[error("{got} media sections, more than the {max} this server accepts")]
    TooManySections { got: usize, max: usize },
    #[error("{got} candidates, more than the {max} this server accepts")]
    TooManyCandidates { got: usize, max: usize },
    #[error("{got} simulcast encodings in one section, more than the {max} this server accepts")]
    TooManyEncodings { got: usize, max: usize },
}

/// Counts the sections, candidates and sending sections of `sdp`.
pub fn inspect(sdp: &str) -> OfferShape {
    let mut shape = OfferShape::default();
    let mut section: Option<Section> = None;
    let mut rids = 0;
    for line in sdp.split('\n') {
        match sdp_line(line) {
            Some(('m', value)) => {
                if section.take().is_some_and(|s| s.sends()) {
                    shape.sending += 1;
                }
                shape.sections += 1;
                rids = 0;
                section = Some(Section::new(value));
            }
            Some(('a', value)) if attribute_key(value) == "candidate" => shape.candidates += 1,
            // `a=rid:<id> send [params]` (RFC 8851).
            Some(('a', value))
                if attribute_key(value) == "rid"
                    && value.split_whitespace().nth(1) == Some("send") =>
            {
                rids += 1;
                shape.encodings = shape.encodings.max(rids);
            }
            Some(('a', value)) => {
                if let Some(s) = section.as_mut() {
                    s.see(value);
                }
            }
            _ => {}
        }
    }
    if section.is_some_and(|s| s.sends()) {
        shape.sending += 1;
    }
    shape
}

/// One SDP line (without its `\n`) as the engine's parser reads it: `\r`s
/// before the type are skipped, the type is the one character before the
/// first `=`, and the value is trimmed. `None` for lines the engine would
/// refuse.
fn sdp_line(line: &str) -> Option<(char, &str)> {
    let (ty, value) = line.trim_start_matches('\r').split_once('=')?;
    let mut chars = ty.chars();
    match (chars.next(), chars.next()) {
        (Some(ty), None) => Some((ty, value.trim())),
        _ => None,
    }
}

/// The name of an attribute (`a=` value): the part before the first `:`.
fn attribute_key(value: &str) -> &str {
    value.split_once(':').map_or(value, |(key, _)| key)
}

/// Checks `sdp` against `limits`.
pub fn check(sdp: &str, limits: &OfferLimits) -> Result<OfferShape, OfferError> {
    let shape = inspect(sdp);
    if shape.sections > limits.max_sections {
        return Err(OfferError::TooManySections {
            got: shape.sections,
            max: limits.max_sections,
        });
    }
    if shape.candidates > limits.max_candidates {
        return Err(OfferError::TooManyCandidates {
            got: shape.candidates,
            max: limits.max_candidates,
        });
    }
    if shape.encodings > limits.max_encodings {
        return Err(OfferError::TooManyEncodings {
            got: shape.encodings,
            max: limits.max_encodings,
        });
    }
    Ok(shape)
}

/// `sdp` with only its first `keep` sending audio/video sections left
/// sending: in the others every `sendrecv` becomes `recvonly` and every
/// `sendonly` becomes `inactive` (a section with no direction, which means
/// sendrecv, gets `a=recvonly`). `keep = 0` makes the whole offer
/// receive-only. Lines are read as the engine reads them (`sdp_line`),
/// and the engine takes a section's first direction attribute, so that is
/// the one that counts here too. (The engine decides what it accepts from
/// its own state too; the transport enforces the same caps on the tracks
/// that open.)
pub fn limit_sending(sdp: &str, keep: usize) -> String {
    let mut out = String::with_capacity(sdp.len() + 16);
    let mut kept = 0;
    // Lines of the current media section, written out when it ends.
    let mut pending: Vec<&str> = Vec::new();
    let mut header: Option<Section> = None;
    let flush =
        |out: &mut String, pending: &mut Vec<&str>, header: Option<Section>, kept: &mut usize| {
            let Some(section) = header else {
                pending.drain(..).for_each(|l| out.push_str(l));
                return;
            };
            let over = section.sends() && {
                *kept += 1;
                *kept > keep
            };
            for line in pending.drain(..) {
                let dir = match sdp_line(line) {
                    Some(('a', value)) if over => Direction::parse(attribute_key(value)),
                    _ => None,
                };
                let bare = line.trim_end_matches(['\r', '\n']);
                let eol = &line[bare.len()..];
                match dir {
                    Some(Direction::SendRecv) => {
                        out.push_str("a=recvonly");
                        out.push_str(eol);
                    }
                    Some(Direction::SendOnly) => {
                        out.push_str("a=inactive");
                        out.push_str(eol);
                    }
                    _ => out.push_str(line),
                }
            }
            if over && section.direction.is_none() {
                // The section's last line may lack its line break.
                if !out.ends_with('\n') {
                    out.push_str("\r\n");
                }
                out.push_str("a=recvonly\r\n");
            }
        };
    for line in sdp.split_inclusive('\n') {
        match sdp_line(line.strip_suffix('\n').unwrap_or(line)) {
            Some(('m', value)) => {
                flush(&mut out, &mut pending, header.take(), &mut kept);
                header = Some(Section::new(value));
            }
            Some(('a', value)) => {
                if let Some(s) = header.as_mut() {
                    s.see(value);
                }
            }
            _ => {}
        }
        pending.push(line);
    }
    flush(&mut out, &mut pending, header.take(), &mut kept);
    out
}

/// One media section, as far as sending goes.
#[derive(Debug, Clone, Copy)]
struct Section {
    media: bool,
    port_zero: bool,
    direction: Option<Direction>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    SendRecv,
    SendOnly,
    RecvOnly,
    Inactive,
}

impl Direction {
    /// The direction an attribute name sets, if it is one.
    fn parse(key: &str) -> Option<Direction> {
        match key {
            "sendrecv" => Some(Direction::SendRecv),
            "sendonly" => Some(Direction::SendOnly),
            "recvonly" => Some(Direction::RecvOnly),
            "inactive" => Some(Direction::Inactive),
            _ => None,
        }
    }
}

impl Section {
    /// From the value of an `m=` line.
    fn new(m_value: &str) -> Section {
        let mut fields = m_value.split_whitespace();
        let kind = fields.next().unwrap_or("");
        let port = fields.next().unwrap_or("");
        Section {
            media: kind == "audio" || kind == "video",
            port_zero: port == "0",
            direction: None,
        }
    }

    /// Sees the value of an `a=` line of this section: the first direction
    /// attribute is the section's direction.
    fn see(&mut self, value: &str) {
        if self.direction.is_none() {
            self.direction = Direction::parse(attribute_key(value));
        }
    }

    fn sends(&self) -> bool {
        self.media
            && !self.port_zero
            && matches!(
                self.direction,
                None | Some(Direction::SendRecv) | Some(Direction::SendOnly)
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(sections: &[(&str, &str, &str)]) -> String {
        let mut s = String::from("v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n");
        for (i, (kind, port, dir)) in sections.iter().enumerate() {
            s.push_str(&format!(
                "m={kind} {port} UDP/TLS/RTP/SAVPF 96\r\na=mid:{i}\r\n"
            ));
            if !dir.is_empty() {
                s.push_str(&format!("a={dir}\r\n"));
            }
            s.push_str("a=candidate:1 1 udp 1 127.0.0.1 9 typ host\r\n");
        }
        s
    }

    #[test]
    fn shape_counts_sections_candidates_and_sending_ones() {
        let sdp = offer(&[
            ("audio", "9", "sendrecv"),
            ("video", "9", "sendonly"),
            ("video", "9", "recvonly"),
            ("video", "0", "sendrecv"),
            ("video", "9", ""),
            ("application", "9", ""),
        ]);
        assert_eq!(
            inspect(&sdp),
            OfferShape {
                sections: 6,
                candidates: 6,
                sending: 3,
                encodings: 0,
            }
        );
    }

    #[test]
    fn caps_refuse_with_the_count_and_the_cap() {
        let sdp = offer(&[("audio", "9", "sendrecv"); 5]);
        let limits = OfferLimits {
            max_sections: 4,
            max_candidates: 10,
            max_sending: 4,
            max_encodings: 3,
        };
        assert_eq!(
            check(&sdp, &limits),
            Err(OfferError::TooManySections { got: 5, max: 4 })
        );
        let limits = OfferLimits {
            max_sections: 8,
            max_candidates: 4,
            max_sending: 4,
            max_encodings: 3,
        };
        assert_eq!(
            check(&sdp, &limits),
            Err(OfferError::TooManyCandidates { got: 5, max: 4 })
        );
        let limits = OfferLimits {
            max_sections: 5,
            max_candidates: 5,
            max_sending: 1,
            max_encodings: 3,
        };
        assert_eq!(check(&sdp, &limits).map(|s| s.sending), Ok(5));
    }

    #[test]
    fn more_than_three_simulcast_encodings_are_refused() {
        let video = |rids: &[&str]| {
            let mut s = String::from("v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendonly\r\n");
            for r in rids {
                s.push_str(&format!("a=rid:{r} send\r\n"));
            }
            // Receive rids do not count.
            s.push_str("a=rid:x recv\r\n");
            s
        };
        let limits = OfferLimits {
            max_sections: 4,
            max_candidates: 4,
            max_sending: 4,
            max_encodings: 3,
        };
        assert_eq!(
            check(&video(&["q", "h", "f"]), &limits).map(|s| s.encodings),
            Ok(3)
        );
        assert_eq!(
            check(&video(&["a", "b", "c", "d"]), &limits),
            Err(OfferError::TooManyEncodings { got: 4, max: 3 })
        );
    }

    #[test]
    fn sending_past_the_cap_becomes_receive_only() {
        let sdp = offer(&[
            ("audio", "9", "sendrecv"),
            ("video", "9", "recvonly"),
            ("video", "9", "sendonly"),
            ("video", "9", ""),
            ("application", "9", ""),
        ]);
        let limited = limit_sending(&sdp, 1);
        assert_eq!(inspect(&limited).sending, 1);
        assert_eq!(inspect(&limited).sections, 5);
        assert!(limited.contains("a=mid:0\r\na=sendrecv\r\n"), "{limited}");
        assert!(limited.contains("a=mid:2\r\na=inactive\r\n"), "{limited}");
        assert!(limited.contains("a=recvonly\r\n"), "{limited}");
        let none = limit_sending(&sdp, 0);
        assert_eq!(inspect(&none).sending, 0);
        assert!(!none.contains("a=sendrecv") && !none.contains("a=sendonly"));
        // Nothing to change: byte for byte the same.
        assert_eq!(limit_sending(&sdp, 10), sdp);
    }

    /// Found by the property test of `tests/props.rs` (fuzz target
    /// `sdp_offer`): a last section without a direction and without a final
    /// line break got `a=recvonly` glued onto its last line
    /// (`a=mid:3a=recvonly`), so it stayed sending.
    #[test]
    fn regression_direction_added_after_a_last_line_without_break() {
        let sdp = "v=0\no=- 1 2 IN IP4 127.0.0.1\ns=-\nt=0 0\n\
                   m=audio 9 UDP/TLS/RTP/SAVPF 111\na=mid:3";
        let limited = limit_sending(sdp, 0);
        assert_eq!(inspect(&limited).sending, 0, "{limited:?}");
        assert!(
            limited.ends_with("a=mid:3\r\na=recvonly\r\n"),
            "{limited:?}"
        );
    }

    /// Lines as the engine reads them: it takes a section's first direction
    /// attribute, skips `\r` before a line's type and trims values. Each of
    /// these sections sends as far as the engine is concerned, so each must
    /// count and be limited.
    #[test]
    fn regression_directions_read_as_the_engine_reads_them() {
        let head = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n";
        for section in [
            // First direction wins: sendrecv, though recvonly follows.
            "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendrecv\r\na=recvonly\r\n",
            // Padded and with a value: still sendonly.
            "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na= sendonly \r\n",
            "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendrecv:x\r\n",
            // Extra carriage returns around a line.
            "m=video 9 UDP/TLS/RTP/SAVPF 96\r\n\ra=sendrecv\r\r\n",
            // A tab before the media kind.
            "m=\tvideo 9 UDP/TLS/RTP/SAVPF 96\r\n",
        ] {
            let sdp = format!("{head}{section}");
            assert_eq!(inspect(&sdp).sending, 1, "{sdp:?}");
            let limited = limit_sending(&sdp, 0);
            assert_eq!(inspect(&limited).sending, 0, "{limited:?}");
            assert_eq!(limit_sending(&limited, 0), limited);
        }
    }
}
