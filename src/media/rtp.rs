//! A minimal zero-copy RTP header view (RFC 3550 section 5.1) and in-place
//! header writers.
//!
//! [`RtpHeader::parse`] checks the fixed header, the CSRC list, the header
//! extension and the padding against the buffer and records where the
//! payload is; it copies nothing. The writers change one field of a packet
//! in place (the forwarder rewrites SSRC, sequence number, timestamp and
//! payload type this way). RTCP is not handled here.

use super::{PayloadType, Ssrc};

/// Length of the fixed RTP header.
pub const FIXED_HEADER_LEN: usize = 12;

/// Why a buffer is not a well-formed RTP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RtpError {
    #[error("{len} bytes is shorter than the 12-byte RTP header")]
    TooShort { len: usize },
    #[error("RTP version {0}, expected 2")]
    BadVersion(u8),
    #[error("{count} CSRCs overrun a {len}-byte packet")]
    CsrcOverrun { count: u8, len: usize },
    #[error("header extension overruns the packet (needs {needed} bytes, has {len})")]
    ExtensionOverrun { needed: usize, len: usize },
    #[error("padding of {padding} bytes does not fit {available} bytes after the header")]
    BadPadding { padding: usize, available: usize },
    #[error("payload type {0} does not fit 7 bits")]
    BadPayloadType(u8),
}

/// Where the header extension is in the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extension {
    /// The 16-bit "defined by profile" field (0xBEDE for one-byte headers).
    pub profile: u16,
    /// Offset of the extension data (after the 4-byte extension header).
    pub offset: usize,
    /// Length of the extension data in bytes (a multiple of 4).
    pub len: usize,
}

/// The parsed fields of an RTP header, plus where the payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpHeader {
    pub marker: bool,
    pub payload_type: PayloadType,
    pub seq: u16,
    pub timestamp: u32,
    pub ssrc: Ssrc,
    /// Number of CSRCs (0–15); they follow the fixed header.
    pub csrc_count: u8,
    pub extension: Option<Extension>,
    /// Offset of the payload: the end of the header.
    pub payload_offset: usize,
    /// Length of the payload, without padding.
    pub payload_len: usize,
    /// Padding bytes at the end (including the count byte), 0 if none.
    pub padding_len: usize,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl RtpHeader {
    /// Parses and bounds-checks the header of `buf`.
    pub fn parse(buf: &[u8]) -> Result<RtpHeader, RtpError> {
        let len = buf.len();
        if len < FIXED_HEADER_LEN {
            return Err(RtpError::TooShort { len });
        }
        let version = buf[0] >> 6;
        if version != 2 {
            return Err(RtpError::BadVersion(version));
        }
        let has_padding = buf[0] & 0x20 != 0;
        let has_extension = buf[0] & 0x10 != 0;
        let csrc_count = buf[0] & 0x0f;
        let mut offset = FIXED_HEADER_LEN + 4 * usize::from(csrc_count);
        if offset > len {
            return Err(RtpError::CsrcOverrun {
                count: csrc_count,
                len,
            });
        }
        let extension = if has_extension {
            if offset + 4 > len {
                return Err(RtpError::ExtensionOverrun {
                    needed: offset + 4,
                    len,
                });
            }
            let profile = be16(buf, offset);
            let ext_len = 4 * usize::from(be16(buf, offset + 2));
            let data = offset + 4;
            if data + ext_len > len {
                return Err(RtpError::ExtensionOverrun {
                    needed: data + ext_len,
                    len,
                });
            }
            offset = data + ext_len;
            Some(Extension {
                profile,
                offset: data,
                len: ext_len,
            })
        } else {
            None
        };
        let available = len - offset;
        let padding_len = if has_padding {
            let padding = buf.last().map_or(0, |b| usize::from(*b));
            if padding == 0 || padding > available {
                return Err(RtpError::BadPadding { padding, available });
            }
            padding
        } else {
            0
        };
        Ok(RtpHeader {
            marker: buf[1] & 0x80 != 0,
            payload_type: PayloadType(buf[1] & 0x7f),
            seq: be16(buf, 2),
            timestamp: be32(buf, 4),
            ssrc: Ssrc(be32(buf, 8)),
            csrc_count,
            extension,
            payload_offset: offset,
            payload_len: available - padding_len,
            padding_len,
        })
    }

    /// The payload of `buf`, the packet this header was parsed from (empty
    /// if `buf` is some other, shorter buffer).
    pub fn payload<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        buf.get(self.payload_offset..self.payload_offset + self.payload_len)
            .unwrap_or(&[])
    }

    /// The `i`-th CSRC of `buf`, if there is one.
    pub fn csrc(&self, buf: &[u8], i: usize) -> Option<Ssrc> {
        if i >= usize::from(self.csrc_count) {
            return None;
        }
        let at = FIXED_HEADER_LEN + 4 * i;
        buf.get(at..at + 4).map(|b| Ssrc(be32(b, 0)))
    }

    /// The header extension data of `buf` (after the 4-byte extension
    /// header), if the packet has one.
    pub fn extension_data<'a>(&self, buf: &'a [u8]) -> Option<&'a [u8]> {
        let ext = self.extension?;
        buf.get(ext.offset..ext.offset + ext.len)
    }
}

/// The fixed header of `buf`, or `TooShort`.
fn fixed_mut(buf: &mut [u8]) -> Result<&mut [u8], RtpError> {
    let len = buf.len();
    buf.get_mut(..FIXED_HEADER_LEN)
        .ok_or(RtpError::TooShort { len })
}

/// Sets the SSRC of the packet in `buf`.
pub fn set_ssrc(buf: &mut [u8], ssrc: Ssrc) -> Result<(), RtpError> {
    fixed_mut(buf)?[8..12].copy_from_slice(&ssrc.0.to_be_bytes());
    Ok(())
}

/// Sets the sequence number of the packet in `buf`.
pub fn set_seq(buf: &mut [u8], seq: u16) -> Result<(), RtpError> {
    fixed_mut(buf)?[2..4].copy_from_slice(&seq.to_be_bytes());
    Ok(())
}

/// Sets the timestamp of the packet in `buf`.
pub fn set_timestamp(buf: &mut [u8], ts: u32) -> Result<(), RtpError> {
    fixed_mut(buf)?[4..8].copy_from_slice(&ts.to_be_bytes());
    Ok(())
}

/// Sets the payload type of the packet in `buf`, keeping the marker bit.
pub fn set_payload_type(buf: &mut [u8], pt: PayloadType) -> Result<(), RtpError> {
    if pt.0 > 0x7f {
        return Err(RtpError::BadPayloadType(pt.0));
    }
    let h = fixed_mut(buf)?;
    h[1] = (h[1] & 0x80) | pt.0;
    Ok(())
}

/// Sets the marker bit of the packet in `buf`.
pub fn set_marker(buf: &mut [u8], marker: bool) -> Result<(), RtpError> {
    let h = fixed_mut(buf)?;
    h[1] = (h[1] & 0x7f) | if marker { 0x80 } else { 0 };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packet with 2 CSRCs, a one-byte-header extension of one word,
    /// 3 payload bytes and 4 bytes of padding.
    fn full_packet() -> Vec<u8> {
        let mut p = vec![
            0xb2, 0xe0, 0x12, 0x34, // V=2 P X CC=2 | M PT=96 | seq
            0x00, 0x01, 0xe2, 0x40, // timestamp 123456
            0xca, 0xfe, 0xba, 0xbe, // ssrc
            0x00, 0x00, 0x00, 0x01, // csrc 1
            0x00, 0x00, 0x00, 0x02, // csrc 2
            0xbe, 0xde, 0x00, 0x01, // extension header, 1 word
            0x10, 0x7f, 0x00, 0x00, // audio level element + padding
        ];
        p.extend_from_slice(&[0xaa, 0xbb, 0xcc]);
        p.extend_from_slice(&[0, 0, 0, 4]);
        p
    }

    #[test]
    fn parses_all_fields() {
        let p = full_packet();
        let h = RtpHeader::parse(&p).unwrap();
        assert!(h.marker);
        assert_eq!(h.payload_type, PayloadType(96));
        assert_eq!(h.seq, 0x1234);
        assert_eq!(h.timestamp, 123_456);
        assert_eq!(h.ssrc, Ssrc(0xcafe_babe));
        assert_eq!(h.csrc_count, 2);
        assert_eq!(h.csrc(&p, 0), Some(Ssrc(1)));
        assert_eq!(h.csrc(&p, 1), Some(Ssrc(2)));
        assert_eq!(h.csrc(&p, 2), None);
        assert_eq!(
            h.extension,
            Some(Extension {
                profile: 0xbede,
                offset: 24,
                len: 4
            })
        );
        assert_eq!(h.extension_data(&p), Some(&[0x10, 0x7f, 0, 0][..]));
        assert_eq!(h.payload_offset, 28);
        assert_eq!(h.payload(&p), &[0xaa, 0xbb, 0xcc]);
        assert_eq!(h.padding_len, 4);
    }

    #[test]
    fn minimal_packet_and_empty_payload() {
        let p = [0x80, 0x6f, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3];
        let h = RtpHeader::parse(&p).unwrap();
        assert!(!h.marker);
        assert_eq!(h.payload_type, PayloadType(111));
        assert_eq!(h.payload(&p), &[] as &[u8]);
        assert_eq!(h.extension, None);
        assert_eq!(h.extension_data(&p), None);
    }

    #[test]
    fn errors() {
        assert_eq!(
            RtpHeader::parse(&[0x80; 11]),
            Err(RtpError::TooShort { len: 11 })
        );
        let mut p = full_packet();
        p[0] = (p[0] & 0x3f) | 0x40;
        assert_eq!(RtpHeader::parse(&p), Err(RtpError::BadVersion(1)));

        // 15 CSRCs in a 20-byte packet.
        let mut p = vec![0x8f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        p.extend_from_slice(&[0; 8]);
        assert_eq!(
            RtpHeader::parse(&p),
            Err(RtpError::CsrcOverrun { count: 15, len: 20 })
        );

        // Extension header cut off, then extension length overrunning.
        let p = [0x90, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xbe, 0xde];
        assert_eq!(
            RtpHeader::parse(&p),
            Err(RtpError::ExtensionOverrun {
                needed: 16,
                len: 14
            })
        );
        let p = [
            0x90, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xbe, 0xde, 0, 2, 1, 2,
        ];
        assert_eq!(
            RtpHeader::parse(&p),
            Err(RtpError::ExtensionOverrun {
                needed: 24,
                len: 18
            })
        );

        // Padding count of 0, and padding longer than the payload.
        let p = [0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        assert_eq!(
            RtpHeader::parse(&p),
            Err(RtpError::BadPadding {
                padding: 0,
                available: 2
            })
        );
        let p = [0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 3];
        assert!(matches!(
            RtpHeader::parse(&p),
            Err(RtpError::BadPadding { padding: 3, .. })
        ));
        // Padding bit with no room at all for the count byte.
        let p = [0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            RtpHeader::parse(&p),
            Err(RtpError::BadPadding { .. })
        ));
        // Padding-only packet is fine.
        let p = [0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let h = RtpHeader::parse(&p).unwrap();
        assert_eq!((h.payload_len, h.padding_len), (0, 2));
    }

    #[test]
    fn every_prefix_is_rejected_or_consistent() {
        let p = full_packet();
        for n in 0..p.len() {
            if let Ok(h) = RtpHeader::parse(&p[..n]) {
                assert!(h.payload_offset + h.payload_len + h.padding_len <= n);
            }
        }
    }

    #[test]
    fn writers_change_one_field() {
        let mut p = full_packet();
        set_ssrc(&mut p, Ssrc(7)).unwrap();
        set_seq(&mut p, 65535).unwrap();
        set_timestamp(&mut p, u32::MAX).unwrap();
        set_payload_type(&mut p, PayloadType(100)).unwrap();
        let h = RtpHeader::parse(&p).unwrap();
        assert_eq!(h.ssrc, Ssrc(7));
        assert_eq!(h.seq, 65535);
        assert_eq!(h.timestamp, u32::MAX);
        assert_eq!(h.payload_type, PayloadType(100));
        assert!(h.marker, "marker kept");
        set_marker(&mut p, false).unwrap();
        let h = RtpHeader::parse(&p).unwrap();
        assert!(!h.marker);
        assert_eq!(h.payload_type, PayloadType(100));
        assert_eq!(h.payload(&p), &[0xaa, 0xbb, 0xcc]);

        assert_eq!(
            set_payload_type(&mut p, PayloadType(128)),
            Err(RtpError::BadPayloadType(128))
        );
        let mut short = [0x80u8; 5];
        assert_eq!(
            set_ssrc(&mut short, Ssrc(1)),
            Err(RtpError::TooShort { len: 5 })
        );
        assert!(set_seq(&mut short, 1).is_err());
        assert!(set_timestamp(&mut short, 1).is_err());
        assert!(set_marker(&mut short, true).is_err());
        assert_eq!(short, [0x80; 5]);
    }
}
