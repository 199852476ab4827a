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
}

/// Why an offer is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    #[error("{got} media sections, more than the {max} this server accepts")]
    TooManySections { got: usize, max: usize },
    #[error("{got} candidates, more than the {max} this server accepts")]
    TooManyCandidates { got: usize, max: usize },
}

/// Counts the sections, candidates and sending sections of `sdp`.
pub fn inspect(sdp: &str) -> OfferShape {
    let mut shape = OfferShape::default();
    let mut section: Option<Section> = None;
    for line in sdp.lines() {
        if let Some(m) = line.strip_prefix("m=") {
            if section.take().is_some_and(|s| s.sends()) {
                shape.sending += 1;
            }
            shape.sections += 1;
            section = Some(Section::new(m));
        } else if line.starts_with("a=candidate:") {
            shape.candidates += 1;
        } else if let Some(s) = section.as_mut() {
            s.see(line);
        }
    }
    if section.is_some_and(|s| s.sends()) {
        shape.sending += 1;
    }
    shape
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
    Ok(shape)
}

/// `sdp` with only its first `keep` sending audio/video sections left
/// sending: in the others `sendrecv` becomes `recvonly` and `sendonly`
/// becomes `inactive` (a section with no direction, which means sendrecv,
/// gets `a=recvonly`). `keep = 0` makes the whole offer receive-only.
/// (The engine decides what it accepts from its own state too; the
/// transport enforces the same caps on the tracks that open.)
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
                let bare = line.trim_end_matches(['\r', '\n']);
                let eol = &line[bare.len()..];
                match bare {
                    "a=sendrecv" if over => {
                        out.push_str("a=recvonly");
                        out.push_str(eol);
                    }
                    "a=sendonly" if over => {
                        out.push_str("a=inactive");
                        out.push_str(eol);
                    }
                    _ => out.push_str(line),
                }
            }
            if over && section.direction.is_none() {
                out.push_str("a=recvonly\r\n");
            }
        };
    for line in sdp.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\r', '\n']);
        if let Some(m) = bare.strip_prefix("m=") {
            flush(&mut out, &mut pending, header.take(), &mut kept);
            header = Some(Section::new(m));
        } else if let Some(s) = header.as_mut() {
            s.see(bare);
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

impl Section {
    fn new(m_line: &str) -> Section {
        let mut fields = m_line.split(' ');
        let kind = fields.next().unwrap_or("");
        let port = fields.next().unwrap_or("");
        Section {
            media: kind == "audio" || kind == "video",
            port_zero: port == "0",
            direction: None,
        }
    }

    fn see(&mut self, line: &str) {
        let dir = match line {
            "a=sendrecv" => Direction::SendRecv,
            "a=sendonly" => Direction::SendOnly,
            "a=recvonly" => Direction::RecvOnly,
            "a=inactive" => Direction::Inactive,
            _ => return,
        };
        self.direction = Some(dir);
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
                sending: 3
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
        };
        assert_eq!(
            check(&sdp, &limits),
            Err(OfferError::TooManySections { got: 5, max: 4 })
        );
        let limits = OfferLimits {
            max_sections: 8,
            max_candidates: 4,
            max_sending: 4,
        };
        assert_eq!(
            check(&sdp, &limits),
            Err(OfferError::TooManyCandidates { got: 5, max: 4 })
        );
        let limits = OfferLimits {
            max_sections: 5,
            max_candidates: 5,
            max_sending: 1,
        };
        assert_eq!(check(&sdp, &limits).map(|s| s.sending), Ok(5));
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
}
