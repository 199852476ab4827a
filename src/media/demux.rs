//! Routing datagrams on the one shared UDP port to connections.
//!
//! Every server PeerConnection shares one UDP port, so each inbound datagram
//! has to be matched to its connection before the WebRTC engine sees it:
//!
//! 1. Classify by the first byte (RFC 7983 section 7): 0–3 STUN, 20–63
//!    DTLS, 128–191 RTP/RTCP; anything else (ZRTP, TURN channel data,
//!    garbage) is dropped.
//! 2. STUN carries the ICE username `<local ufrag>:<remote ufrag>` in its
//!    USERNAME attribute; the local ufrag names the connection (each has
//!    its own ICE credentials). A hit also remembers the sender's address
//!    for that connection.
//! 3. Everything else (and STUN without USERNAME) goes by the sender's
//!    address, which only a STUN check can introduce.
//!
//! A STUN check is routed, and its sender's address remembered, only when
//! its MESSAGE-INTEGRITY verifies with the connection's ICE password (RFC
//! 8445 section 7.2.2): otherwise anyone who saw a ufrag could send checks
//! with it from many ports and push the real client's address out of the
//! capped list ([`MAX_ADDRS_PER_KEY`], oldest forgotten first), cutting its
//! media. The engine still checks everything again and picks the pair.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::SocketAddr;

/// Largest datagram routed by default (an Ethernet MTU).
pub const DEFAULT_MAX_DATAGRAM: usize = 1500;
/// Addresses remembered per connection (candidate pairs, NAT rebinding).
pub const MAX_ADDRS_PER_KEY: usize = 8;

/// STUN magic cookie (RFC 8489 section 5).
pub const STUN_MAGIC_COOKIE: u32 = 0x2112_A442;
const STUN_HEADER_LEN: usize = 20;
const ATTR_USERNAME: u16 = 0x0006;
const ATTR_MESSAGE_INTEGRITY: u16 = 0x0008;
const ATTR_MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
const ATTR_FINGERPRINT: u16 = 0x8028;
/// RFC 8489 section 14.3: USERNAME is less than 513 bytes.
const MAX_USERNAME_LEN: usize = 512;

/// What kind of packet a datagram is, by its first byte (RFC 7983).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketKind {
    Stun,
    Dtls,
    /// RTP or RTCP (SRTP / SRTCP on the wire).
    Rtp,
}

/// Why a STUN message's USERNAME could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    #[error("{len} bytes is shorter than the 20-byte STUN header")]
    TooShort { len: usize },
    #[error("the first two bits of a STUN message must be zero")]
    NotStun,
    #[error("magic cookie {0:#010x}, expected 0x2112a442")]
    BadMagic(u32),
    #[error("message length {declared} does not match the {actual} bytes after the header")]
    LengthMismatch { declared: usize, actual: usize },
    #[error("attribute at offset {at} overruns the message")]
    AttributeOverrun { at: usize },
    #[error("no USERNAME attribute")]
    NoUsername,
    #[error("USERNAME of {0} bytes is too long")]
    UsernameTooLong(usize),
    #[error("USERNAME is not UTF-8")]
    UsernameNotUtf8,
}

/// Why a datagram is not routed (label for metrics: [`DropReason::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    Empty,
    /// Larger than the demux's maximum datagram size.
    Oversize,
    /// First byte outside STUN, DTLS and RTP/RTCP (RFC 7983).
    Unclassified,
    /// A STUN message that does not parse.
    StunMalformed(StunError),
    /// USERNAME without the `local:remote` colon.
    StunBadUsername,
    /// No connection has the local ufrag of this STUN message.
    UnknownUfrag,
    /// A STUN check whose MESSAGE-INTEGRITY is missing or does not verify
    /// with the connection's password.
    StunBadIntegrity,
    /// Not STUN, and no STUN check came from this address for any
    /// connection.
    UnknownAddress,
}

impl DropReason {
    /// Label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Empty => "empty",
            DropReason::Oversize => "oversize",
            DropReason::Unclassified => "unclassified",
            DropReason::StunMalformed(_) => "stun-malformed",
            DropReason::StunBadUsername => "stun-bad-username",
            DropReason::UnknownUfrag => "unknown-ufrag",
            DropReason::StunBadIntegrity => "stun-bad-integrity",
            DropReason::UnknownAddress => "unknown-address",
        }
    }
}

/// Where a datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<K> {
    To(K),
    Drop(DropReason),
}

/// Classifies a datagram by its first byte (RFC 7983 section 7).
pub fn classify(buf: &[u8]) -> Result<PacketKind, DropReason> {
    match buf.first() {
        None => Err(DropReason::Empty),
        Some(0..=3) => Ok(PacketKind::Stun),
        Some(20..=63) => Ok(PacketKind::Dtls),
        Some(128..=191) => Ok(PacketKind::Rtp),
        Some(_) => Err(DropReason::Unclassified),
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The USERNAME attribute of the STUN message in `buf`, checking the header
/// (first bits, magic cookie, length) and every attribute's bounds on the
/// way. Attributes after MESSAGE-INTEGRITY or FINGERPRINT are ignored, as
/// RFC 8489 requires.
pub fn parse_stun_username(buf: &[u8]) -> Result<&str, StunError> {
    let len = buf.len();
    if len < STUN_HEADER_LEN {
        return Err(StunError::TooShort { len });
    }
    if buf[0] & 0xc0 != 0 {
        return Err(StunError::NotStun);
    }
    let cookie = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if cookie != STUN_MAGIC_COOKIE {
        return Err(StunError::BadMagic(cookie));
    }
    let declared = usize::from(be16(buf, 2));
    let actual = len - STUN_HEADER_LEN;
    if declared != actual || declared % 4 != 0 {
        return Err(StunError::LengthMismatch { declared, actual });
    }
    let mut at = STUN_HEADER_LEN;
    while at < len {
        if len - at < 4 {
            return Err(StunError::AttributeOverrun { at });
        }
        let kind = be16(buf, at);
        let value_len = usize::from(be16(buf, at + 2));
        let value = at + 4;
        if value_len > len - value {
            return Err(StunError::AttributeOverrun { at });
        }
        match kind {
            ATTR_USERNAME => {
                if value_len > MAX_USERNAME_LEN {
                    return Err(StunError::UsernameTooLong(value_len));
                }
                return std::str::from_utf8(&buf[value..value + value_len])
                    .map_err(|_| StunError::UsernameNotUtf8);
            }
            ATTR_MESSAGE_INTEGRITY | ATTR_MESSAGE_INTEGRITY_SHA256 | ATTR_FINGERPRINT => break,
            _ => {}
        }
        // Values are padded to 4 bytes; the padded end stays within the
        // message because both the message and `value` are 4-aligned.
        at = value + value_len.next_multiple_of(4);
    }
    Err(StunError::NoUsername)
}

/// Whether the STUN message in `buf` (whose header and attribute bounds
/// [`parse_stun_username`] checked) carries a MESSAGE-INTEGRITY (HMAC-SHA1)
/// or MESSAGE-INTEGRITY-SHA256 that verifies with the short-term `key`
/// (RFC 8489 sections 14.5 and 14.6). The HMAC covers the message up to the
/// attribute, with the header's length set as if the message ended with it.
pub fn integrity_ok(buf: &[u8], key: &[u8]) -> bool {
    use hmac::{Hmac, Mac};
    let len = buf.len();
    let mut at = STUN_HEADER_LEN;
    while at + 4 <= len {
        let kind = be16(buf, at);
        let value_len = usize::from(be16(buf, at + 2));
        let value = at + 4;
        if value_len > len - value {
            return false;
        }
        let sha256 = match kind {
            ATTR_MESSAGE_INTEGRITY if value_len == 20 => false,
            // Truncation to 16..32 bytes (multiples of 4) is allowed.
            ATTR_MESSAGE_INTEGRITY_SHA256
                if (16..=32).contains(&value_len) && value_len % 4 == 0 =>
            {
                true
            }
            ATTR_MESSAGE_INTEGRITY | ATTR_MESSAGE_INTEGRITY_SHA256 => return false,
            _ => {
                at = value + value_len.next_multiple_of(4);
                continue;
            }
        };
        let covered_len = (value + value_len - STUN_HEADER_LEN) as u16;
        let mut header = [0u8; STUN_HEADER_LEN];
        header.copy_from_slice(&buf[..STUN_HEADER_LEN]);
        header[2..4].copy_from_slice(&covered_len.to_be_bytes());
        let expected = &buf[value..value + value_len];
        return if sha256 {
            let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(key) else {
                return false;
            };
            mac.update(&header);
            mac.update(&buf[STUN_HEADER_LEN..at]);
            mac.verify_truncated_left(expected).is_ok()
        } else {
            let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(key) else {
                return false;
            };
            mac.update(&header);
            mac.update(&buf[STUN_HEADER_LEN..at]);
            mac.verify_slice(expected).is_ok()
        };
    }
    false
}

/// Routes datagrams to connection keys `K`: by ICE ufrag for STUN, by
/// remembered remote address for the rest.
#[derive(Debug, Clone)]
pub struct Demux<K> {
    max_datagram: usize,
    /// Local ufrag → connection and its ICE password.
    ufrags: HashMap<String, (K, String)>,
    addrs: HashMap<SocketAddr, K>,
    /// Each key's addresses, oldest first.
    by_key: HashMap<K, Vec<SocketAddr>>,
}

impl<K: Copy + Eq + Hash> Default for Demux<K> {
    fn default() -> Self {
        Demux::new()
    }
}

impl<K: Copy + Eq + Hash> Demux<K> {
    pub fn new() -> Self {
        Demux {
            max_datagram: DEFAULT_MAX_DATAGRAM,
            ufrags: HashMap::new(),
            addrs: HashMap::new(),
            by_key: HashMap::new(),
        }
    }

    /// Drops datagrams larger than `bytes` (default 1500).
    pub fn with_max_datagram(mut self, bytes: usize) -> Self {
        self.max_datagram = bytes;
        self
    }

    /// STUN messages whose USERNAME starts with `ufrag:` and whose
    /// MESSAGE-INTEGRITY verifies with `pwd` go to `key`. Returns the key
    /// that had this ufrag before, if any. A key may have several ufrags
    /// (ICE restart).
    pub fn register(&mut self, ufrag: &str, pwd: &str, key: K) -> Option<K> {
        self.ufrags
            .insert(ufrag.to_owned(), (key, pwd.to_owned()))
            .map(|(k, _)| k)
    }

    /// Retires one ufrag; the key's addresses stay.
    pub fn unregister_ufrag(&mut self, ufrag: &str) -> Option<K> {
        self.ufrags.remove(ufrag).map(|(k, _)| k)
    }

    /// Forgets `key`: its ufrags and its addresses.
    pub fn unregister(&mut self, key: K) {
        self.ufrags.retain(|_, (k, _)| *k != key);
        for addr in self.by_key.remove(&key).unwrap_or_default() {
            self.addrs.remove(&addr);
        }
    }

    /// The key an address is routed to.
    pub fn key_for_addr(&self, addr: SocketAddr) -> Option<K> {
        self.addrs.get(&addr).copied()
    }

    /// The addresses remembered for `key`, oldest first.
    pub fn addrs_of(&self, key: K) -> &[SocketAddr] {
        self.by_key.get(&key).map_or(&[], Vec::as_slice)
    }

    /// Number of registered ufrags.
    pub fn ufrag_count(&self) -> usize {
        self.ufrags.len()
    }

    /// Number of remembered addresses.
    pub fn addr_count(&self) -> usize {
        self.addrs.len()
    }

    /// Routes `from`'s datagram `buf`.
    pub fn route(&mut self, buf: &[u8], from: SocketAddr) -> Route<K> {
        if buf.len() > self.max_datagram {
            return Route::Drop(DropReason::Oversize);
        }
        let kind = match classify(buf) {
            Ok(kind) => kind,
            Err(reason) => return Route::Drop(reason),
        };
        if kind == PacketKind::Stun {
            match parse_stun_username(buf) {
                Ok(username) => return self.route_username(buf, username, from),
                Err(StunError::NoUsername) => {} // indications, responses
                Err(e) => return Route::Drop(DropReason::StunMalformed(e)),
            }
        }
        match self.addrs.get(&from) {
            Some(&key) => Route::To(key),
            None => Route::Drop(DropReason::UnknownAddress),
        }
    }

    fn route_username(&mut self, buf: &[u8], username: &str, from: SocketAddr) -> Route<K> {
        let Some((local, _remote)) = username.split_once(':') else {
            return Route::Drop(DropReason::StunBadUsername);
        };
        let Some((key, pwd)) = self.ufrags.get(local) else {
            return Route::Drop(DropReason::UnknownUfrag);
        };
        let key = *key;
        if !integrity_ok(buf, pwd.as_bytes()) {
            return Route::Drop(DropReason::StunBadIntegrity);
        }
        self.remember(from, key);
        Route::To(key)
    }

    /// Routes `addr` to `key` from now on (the transport may also call this
    /// for an accepted ICE-TCP connection).
    pub fn remember(&mut self, addr: SocketAddr, key: K) {
        match self.addrs.insert(addr, key) {
            Some(old) if old == key => return,
            Some(old) => {
                // The address moved to another connection.
                if let Some(list) = self.by_key.get_mut(&old) {
                    list.retain(|a| *a != addr);
                }
            }
            None => {}
        }
        let list = self.by_key.entry(key).or_default();
        list.push(addr);
        if list.len() > MAX_ADDRS_PER_KEY {
            let oldest = list.remove(0);
            self.addrs.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    /// A STUN binding request with these attributes (values padded).
    fn stun(attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (kind, value) in attrs {
            body.extend_from_slice(&kind.to_be_bytes());
            body.extend_from_slice(&(value.len() as u16).to_be_bytes());
            body.extend_from_slice(value);
            while body.len() % 4 != 0 {
                body.push(0);
            }
        }
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&(body.len() as u16).to_be_bytes());
        m.extend_from_slice(&STUN_MAGIC_COOKIE.to_be_bytes());
        m.extend_from_slice(&[7; 12]);
        m.extend_from_slice(&body);
        m
    }

    /// The ICE password every test connection is registered with.
    const PWD: &str = "the-servers-ice-password-1234";

    /// A binding request from a client that knows [`PWD`].
    fn binding(username: &str) -> Vec<u8> {
        signed(username, PWD)
    }

    /// A binding request with USERNAME and a MESSAGE-INTEGRITY made with
    /// `pwd`, then a FINGERPRINT (not checked here).
    fn signed(username: &str, pwd: &str) -> Vec<u8> {
        use hmac::{Hmac, Mac};
        let mut m = stun(&[
            (0x0024, &[0x6e, 0, 1, 0xff]), // PRIORITY
            (ATTR_USERNAME, username.as_bytes()),
        ]);
        let covered = (m.len() - 20 + 24) as u16;
        m[2..4].copy_from_slice(&covered.to_be_bytes());
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(pwd.as_bytes()).unwrap();
        mac.update(&m);
        let tag = mac.finalize().into_bytes();
        m.extend_from_slice(&ATTR_MESSAGE_INTEGRITY.to_be_bytes());
        m.extend_from_slice(&20u16.to_be_bytes());
        m.extend_from_slice(&tag);
        m.extend_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
        m.extend_from_slice(&4u16.to_be_bytes());
        m.extend_from_slice(&[0; 4]);
        let len = (m.len() - 20) as u16;
        m[2..4].copy_from_slice(&len.to_be_bytes());
        m
    }

    const RTP: [u8; 12] = [0x80, 0x60, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1];
    const DTLS: [u8; 13] = [22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

    /// RFC 5769 section 2.1: the sample request's password.
    const RFC5769_PASSWORD: &str = "VOkJxbRl1RmTxUk/WvJxBt";

    /// RFC 5769 section 2.1, sample request (USERNAME "evtj:h6vY").
    const RFC5769_REQUEST: [u8; 108] = [
        0x00, 0x01, 0x00, 0x58, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6,
        0x86, 0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x10, 0x53, 0x54, 0x55, 0x4e, 0x20, 0x74,
        0x65, 0x73, 0x74, 0x20, 0x63, 0x6c, 0x69, 0x65, 0x6e, 0x74, 0x00, 0x24, 0x00, 0x04, 0x6e,
        0x00, 0x01, 0xff, 0x80, 0x29, 0x00, 0x08, 0x93, 0x2f, 0xf9, 0xb1, 0x51, 0x26, 0x3b, 0x36,
        0x00, 0x06, 0x00, 0x09, 0x65, 0x76, 0x74, 0x6a, 0x3a, 0x68, 0x36, 0x76, 0x59, 0x20, 0x20,
        0x20, 0x00, 0x08, 0x00, 0x14, 0x9a, 0xea, 0xa7, 0x0c, 0xbf, 0xd8, 0xcb, 0x56, 0x78, 0x1e,
        0xf2, 0xb5, 0xb2, 0xd3, 0xf2, 0x49, 0xc1, 0xb5, 0x71, 0xa2, 0x80, 0x28, 0x00, 0x04, 0xe5,
        0x7a, 0x3b, 0xcf,
    ];

    #[test]
    fn classifies_by_first_byte() {
        assert_eq!(classify(&[0x00]), Ok(PacketKind::Stun));
        assert_eq!(classify(&[3]), Ok(PacketKind::Stun));
        assert_eq!(classify(&[20]), Ok(PacketKind::Dtls));
        assert_eq!(classify(&[63]), Ok(PacketKind::Dtls));
        assert_eq!(classify(&[128]), Ok(PacketKind::Rtp));
        assert_eq!(classify(&[191]), Ok(PacketKind::Rtp));
        for b in [4u8, 16, 19, 64, 79, 100, 127, 192, 255] {
            assert_eq!(classify(&[b]), Err(DropReason::Unclassified), "{b}");
        }
        assert_eq!(classify(&[]), Err(DropReason::Empty));
    }

    #[test]
    fn parses_rfc5769_sample_request() {
        assert_eq!(parse_stun_username(&RFC5769_REQUEST), Ok("evtj:h6vY"));
    }

    #[test]
    fn stun_header_errors() {
        assert_eq!(
            parse_stun_username(&RFC5769_REQUEST[..19]),
            Err(StunError::TooShort { len: 19 })
        );
        let mut m = RFC5769_REQUEST;
        m[0] = 0x40;
        assert_eq!(parse_stun_username(&m), Err(StunError::NotStun));
        let mut m = RFC5769_REQUEST;
        m[4] = 0;
        assert_eq!(
            parse_stun_username(&m),
            Err(StunError::BadMagic(0x0012_a442))
        );
        // Datagram cut short of the declared length, or longer than it.
        assert_eq!(
            parse_stun_username(&RFC5769_REQUEST[..100]),
            Err(StunError::LengthMismatch {
                declared: 88,
                actual: 80
            })
        );
        let mut long = RFC5769_REQUEST.to_vec();
        long.extend_from_slice(&[0; 4]);
        assert!(matches!(
            parse_stun_username(&long),
            Err(StunError::LengthMismatch { .. })
        ));
        // Header alone: valid, no attributes.
        let mut bare = RFC5769_REQUEST[..20].to_vec();
        bare[2..4].copy_from_slice(&[0, 0]);
        assert_eq!(parse_stun_username(&bare), Err(StunError::NoUsername));
    }

    #[test]
    fn stun_attribute_walk_is_bounds_checked() {
        // An attribute claiming more bytes than the message has.
        let mut m = binding("abcd:efgh");
        m[20 + 2..20 + 4].copy_from_slice(&0x0100u16.to_be_bytes());
        assert_eq!(
            parse_stun_username(&m),
            Err(StunError::AttributeOverrun { at: 20 })
        );
        // USERNAME length overrunning by one byte.
        let mut m = stun(&[(ATTR_USERNAME, b"abcd:efgh")]);
        m[22..24].copy_from_slice(&13u16.to_be_bytes());
        assert_eq!(
            parse_stun_username(&m),
            Err(StunError::AttributeOverrun { at: 20 })
        );
        // Length 0xffff everywhere.
        let mut m = stun(&[(0x0024, &[0; 4]), (ATTR_USERNAME, b"x:y")]);
        m[22] = 0xff;
        m[23] = 0xff;
        assert!(matches!(
            parse_stun_username(&m),
            Err(StunError::AttributeOverrun { .. })
        ));
        // USERNAME after MESSAGE-INTEGRITY is ignored.
        let m = stun(&[(ATTR_MESSAGE_INTEGRITY, &[0; 20]), (ATTR_USERNAME, b"a:b")]);
        assert_eq!(parse_stun_username(&m), Err(StunError::NoUsername));
        // Not UTF-8, too long, empty.
        let m = stun(&[(ATTR_USERNAME, &[0xff, 0xfe, b':', b'a'])]);
        assert_eq!(parse_stun_username(&m), Err(StunError::UsernameNotUtf8));
        let m = stun(&[(ATTR_USERNAME, &[b'a'; 600])]);
        assert_eq!(
            parse_stun_username(&m),
            Err(StunError::UsernameTooLong(600))
        );
        let m = stun(&[(ATTR_USERNAME, b"")]);
        assert_eq!(parse_stun_username(&m), Ok(""));
        // Padding of odd-length values is skipped correctly.
        let m = stun(&[(0x8022, b"abc"), (ATTR_USERNAME, b"u1:u2")]);
        assert_eq!(parse_stun_username(&m), Ok("u1:u2"));
    }

    #[test]
    fn routes_by_ufrag_then_by_address() {
        let mut d: Demux<u32> = Demux::new();
        assert_eq!(d.register("abcd", PWD, 1), None);
        d.register("wxyz", PWD, 2);
        // Media before any STUN: unknown address.
        assert_eq!(
            d.route(&RTP, addr(5000)),
            Route::Drop(DropReason::UnknownAddress)
        );
        assert_eq!(d.route(&binding("abcd:rem1"), addr(5000)), Route::To(1));
        assert_eq!(d.route(&RTP, addr(5000)), Route::To(1));
        assert_eq!(d.route(&DTLS, addr(5000)), Route::To(1));
        assert_eq!(
            d.route(&RTP, addr(5001)),
            Route::Drop(DropReason::UnknownAddress)
        );
        assert_eq!(d.route(&binding("wxyz:rem2"), addr(6000)), Route::To(2));
        assert_eq!(d.route(&DTLS, addr(6000)), Route::To(2));
        assert_eq!(d.key_for_addr(addr(5000)), Some(1));
        assert_eq!(d.addrs_of(1), &[addr(5000)]);
        // The RFC 5769 message is for ufrag "evtj".
        d.register("evtj", RFC5769_PASSWORD, 3);
        assert_eq!(d.route(&RFC5769_REQUEST, addr(7000)), Route::To(3));
    }

    #[test]
    fn stun_drops_and_indications() {
        let mut d: Demux<u32> = Demux::new();
        d.register("abcd", PWD, 1);
        assert_eq!(
            d.route(&binding("nope:rem"), addr(1)),
            Route::Drop(DropReason::UnknownUfrag)
        );
        // Prefix of a registered ufrag is not a match.
        assert_eq!(
            d.route(&binding("abc:rem"), addr(1)),
            Route::Drop(DropReason::UnknownUfrag)
        );
        assert_eq!(
            d.route(&binding("abcd"), addr(1)),
            Route::Drop(DropReason::StunBadUsername)
        );
        assert_eq!(d.addr_count(), 0, "nothing remembered from drops");
        // A binding indication (no USERNAME) goes by address.
        let indication = stun(&[(ATTR_FINGERPRINT, &[0; 4])]);
        assert_eq!(
            d.route(&indication, addr(1)),
            Route::Drop(DropReason::UnknownAddress)
        );
        d.route(&binding("abcd:r"), addr(1));
        assert_eq!(d.route(&indication, addr(1)), Route::To(1));
        // Truncated STUN is malformed, whoever sends it.
        let m = binding("abcd:r");
        assert_eq!(
            d.route(&m[..10], addr(1)),
            Route::Drop(DropReason::StunMalformed(StunError::TooShort { len: 10 }))
        );
        assert_eq!(
            d.route(&m[..m.len() - 4], addr(1)),
            Route::Drop(DropReason::StunMalformed(StunError::LengthMismatch {
                declared: m.len() - 20,
                actual: m.len() - 24
            }))
        );
    }

    #[test]
    fn garbage_empty_and_oversize() {
        let mut d: Demux<u32> = Demux::new().with_max_datagram(1200);
        d.register("abcd", PWD, 1);
        d.route(&binding("abcd:r"), addr(1));
        assert_eq!(d.route(&[], addr(1)), Route::Drop(DropReason::Empty));
        assert_eq!(
            d.route(&[0x64; 40], addr(1)),
            Route::Drop(DropReason::Unclassified)
        );
        assert_eq!(
            d.route(&[0xff], addr(1)),
            Route::Drop(DropReason::Unclassified)
        );
        let mut big = vec![0x80u8; 1201];
        assert_eq!(d.route(&big, addr(1)), Route::Drop(DropReason::Oversize));
        big.truncate(1200);
        assert_eq!(d.route(&big, addr(1)), Route::To(1));
        assert_eq!(DropReason::Oversize.as_str(), "oversize");
        assert_eq!(
            DropReason::StunMalformed(StunError::NotStun).as_str(),
            "stun-malformed"
        );
    }

    #[test]
    fn unregister_removes_ufrags_and_addresses() {
        let mut d: Demux<u32> = Demux::new();
        d.register("abcd", PWD, 1);
        d.register("abcd2", PWD, 1); // ICE restart: second ufrag
        d.register("wxyz", PWD, 2);
        d.route(&binding("abcd:r"), addr(1));
        d.route(&binding("abcd2:r"), addr(2));
        d.route(&binding("wxyz:r"), addr(3));
        assert_eq!(d.addrs_of(1), &[addr(1), addr(2)]);
        d.unregister(1);
        assert_eq!(d.ufrag_count(), 1);
        assert_eq!(d.addr_count(), 1);
        assert_eq!(
            d.route(&RTP, addr(1)),
            Route::Drop(DropReason::UnknownAddress)
        );
        assert_eq!(
            d.route(&binding("abcd:r"), addr(1)),
            Route::Drop(DropReason::UnknownUfrag)
        );
        assert_eq!(d.route(&RTP, addr(3)), Route::To(2));
        // Retiring a ufrag keeps the addresses.
        assert_eq!(d.unregister_ufrag("wxyz"), Some(2));
        assert_eq!(d.route(&RTP, addr(3)), Route::To(2));
        // Unregistering an unknown key is harmless.
        d.unregister(42);
    }

    #[test]
    fn address_moves_between_keys_and_is_capped() {
        let mut d: Demux<u32> = Demux::new();
        d.register("aaaa", PWD, 1);
        d.register("bbbb", PWD, 2);
        d.route(&binding("aaaa:r"), addr(1));
        // Same address now checks for connection 2 (client reconnected).
        assert_eq!(d.route(&binding("bbbb:r"), addr(1)), Route::To(2));
        assert_eq!(d.route(&RTP, addr(1)), Route::To(2));
        assert!(d.addrs_of(1).is_empty());
        // Repeated checks from one address do not duplicate it.
        d.route(&binding("bbbb:r"), addr(1));
        assert_eq!(d.addrs_of(2), &[addr(1)]);
        // More addresses than the cap: the oldest are forgotten.
        for p in 0..MAX_ADDRS_PER_KEY as u16 + 2 {
            d.route(&binding("aaaa:r"), addr(100 + p));
        }
        assert_eq!(d.addrs_of(1).len(), MAX_ADDRS_PER_KEY);
        assert_eq!(
            d.route(&RTP, addr(100)),
            Route::Drop(DropReason::UnknownAddress)
        );
        assert_eq!(
            d.route(&RTP, addr(101)),
            Route::Drop(DropReason::UnknownAddress)
        );
        assert_eq!(d.route(&RTP, addr(102)), Route::To(1));
        assert_eq!(d.addr_count(), MAX_ADDRS_PER_KEY + 1);
    }

    #[test]
    fn integrity_verifies_the_rfc5769_vector_and_nothing_else() {
        assert!(integrity_ok(&RFC5769_REQUEST, RFC5769_PASSWORD.as_bytes()));
        assert!(!integrity_ok(&RFC5769_REQUEST, b"VOkJxbRl1RmTxUk/WvJxBu"));
        // One flipped bit anywhere before the tag breaks it.
        for at in [1, 9, 30, 70] {
            let mut m = RFC5769_REQUEST;
            m[at] ^= 1;
            assert!(!integrity_ok(&m, RFC5769_PASSWORD.as_bytes()), "byte {at}");
        }
        // No MESSAGE-INTEGRITY at all.
        let bare = stun(&[(ATTR_USERNAME, b"evtj:h6vY")]);
        assert!(!integrity_ok(&bare, RFC5769_PASSWORD.as_bytes()));
    }

    /// The attack: checks with a known ufrag but a wrong password, from
    /// more ports than the per-connection address cap, must not push the
    /// real client's address out.
    #[test]
    fn checks_with_a_wrong_password_are_dropped_and_evict_nothing() {
        let mut d: Demux<u32> = Demux::new();
        d.register("vict", PWD, 1);
        assert_eq!(d.route(&binding("vict:c"), addr(1)), Route::To(1));
        for p in 0..4 * MAX_ADDRS_PER_KEY as u16 {
            assert_eq!(
                d.route(&signed("vict:c", "guessed"), addr(2000 + p)),
                Route::Drop(DropReason::StunBadIntegrity)
            );
        }
        assert_eq!(d.addrs_of(1), &[addr(1)]);
        assert_eq!(d.route(&RTP, addr(1)), Route::To(1));
        assert_eq!(
            d.route(&RTP, addr(2000)),
            Route::Drop(DropReason::UnknownAddress)
        );
    }

    #[test]
    fn ufrag_reregistered_to_another_key() {
        let mut d: Demux<u32> = Demux::new();
        d.register("abcd", PWD, 1);
        assert_eq!(d.register("abcd", PWD, 2), Some(1));
        assert_eq!(d.route(&binding("abcd:r"), addr(9)), Route::To(2));
    }

    /// Random datagrams (with a valid STUN header some of the time): the
    /// demux never panics and never routes garbage from unknown senders.
    #[test]
    fn property_random_datagrams() {
        let mut rng = crate::media::XorShift::new(5);
        let mut d: Demux<u32> = Demux::new();
        d.register("abcd", PWD, 1);
        let template = binding("abcd:r");
        let mut buf = [0u8; 200];
        for i in 0..50_000u32 {
            let mut n = rng.below(buf.len() as u64 + 1) as usize;
            if rng.below(2) == 0 {
                n = template.len();
                buf[..n].copy_from_slice(&template);
                // Corrupt a few bytes past the cookie.
                for _ in 0..3 {
                    let at = 8 + rng.below(template.len() as u64 - 8) as usize;
                    buf[at] = rng.next_u64() as u8;
                }
            } else {
                for b in &mut buf[..n] {
                    *b = rng.next_u64() as u8;
                }
            }
            let from = addr(1000 + (i % 50) as u16);
            let _ = parse_stun_username(&buf[..n]);
            if let Route::To(key) = d.route(&buf[..n], from) {
                assert_eq!(key, 1);
            }
        }
    }
}
