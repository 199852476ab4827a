//! Audio levels: RFC 6464 header-extension values, levels measured from
//! PCM, smoothing, a silence threshold, and the 0.0–1.0 scale of the
//! protocol's `speakers` events.
//!
//! Levels are in dBov as RFC 6464 defines them: 0 is the loudest (the
//! overload point), 127 the quietest; a full-scale square wave is 0 dBov, a
//! full-scale sine about 3 dBov.

use thiserror::Error;

/// The quietest level RFC 6464 can express (and what digital silence is).
pub const SILENT_DBOV: u8 = 127;

/// Levels at or below this many dBov map to 0.0 on the protocol scale.
pub const PROTOCOL_FLOOR_DBOV: f32 = 70.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum LevelError {
    #[error("empty audio-level extension element")]
    Empty,
}

/// One RFC 6464 audio level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioLevel {
    /// The sender's voice-activity flag (the V bit).
    pub voice: bool,
    /// 0 (loudest) ..= 127 (silence), in -dBov.
    pub dbov: u8,
}

impl AudioLevel {
    /// Parses one level byte: `V` in the top bit, the level below.
    pub fn from_byte(b: u8) -> AudioLevel {
        AudioLevel {
            voice: b & 0x80 != 0,
            dbov: b & 0x7f,
        }
    }

    /// Parses the data of an `urn:ietf:params:rtp-hdrext:ssrc-audio-level`
    /// extension element, one-byte (RFC 8285 §4.2, length 1) or two-byte
    /// (§4.3, possibly padded) form: the level is the first byte.
    pub fn from_extension(data: &[u8]) -> Result<AudioLevel, LevelError> {
        data.first()
            .map(|b| AudioLevel::from_byte(*b))
            .ok_or(LevelError::Empty)
    }

    /// The byte RFC 6464 puts on the wire.
    pub fn to_byte(self) -> u8 {
        (u8::from(self.voice) << 7) | self.dbov.min(SILENT_DBOV)
    }
}

/// The level of a 16-bit PCM frame in dBov (RMS against full scale),
/// rounded and clamped to 0..=127.
pub fn dbov_from_pcm(pcm: &[i16]) -> u8 {
    if pcm.is_empty() {
        return SILENT_DBOV;
    }
    let energy: f64 = pcm.iter().map(|s| f64::from(*s) * f64::from(*s)).sum();
    let rms = (energy / pcm.len() as f64).sqrt() / 32768.0;
    if rms <= 0.0 {
        return SILENT_DBOV;
    }
    let db = -20.0 * rms.log10();
    db.round().clamp(0.0, f64::from(SILENT_DBOV)) as u8
}

/// A level (in dBov) on the protocol's 0.0 (silent) ..= 1.0 (loudest)
/// scale: linear in dB from [`PROTOCOL_FLOOR_DBOV`] up to 0 dBov.
pub fn to_protocol(dbov: f32) -> f32 {
    (1.0 - dbov / PROTOCOL_FLOOR_DBOV).clamp(0.0, 1.0)
}

/// Smoothing and silence detection for one input.
///
/// The smoothed level follows a rise quickly (`attack`) and a fall slowly
/// (`release`), both one-pole filters in the dB domain, so a speaker does
/// not drop out between words.
#[derive(Debug, Clone)]
pub struct LevelMeter {
    smoothed: f32,
    attack: f32,
    release: f32,
    threshold: f32,
}

impl LevelMeter {
    /// `threshold_dbov`: smoothed levels quieter than this count as silent.
    pub fn new(threshold_dbov: u8) -> Self {
        LevelMeter {
            smoothed: f32::from(SILENT_DBOV),
            attack: 0.6,
            release: 0.08,
            threshold: f32::from(threshold_dbov),
        }
    }

    /// Feeds one frame's level.
    pub fn update(&mut self, dbov: u8) {
        let x = f32::from(dbov.min(SILENT_DBOV));
        let coeff = if x < self.smoothed {
            self.attack
        } else {
            self.release
        };
        self.smoothed += coeff * (x - self.smoothed);
    }

    /// Drops straight to silence (muted, removed, stream stopped).
    pub fn reset(&mut self) {
        self.smoothed = f32::from(SILENT_DBOV);
    }

    /// The smoothed level in dBov (0 loudest, 127 silent).
    pub fn dbov(&self) -> f32 {
        self.smoothed
    }

    /// Loudness in dB relative to full scale (≤ 0, higher is louder).
    pub fn loudness_db(&self) -> f32 {
        -self.smoothed
    }

    /// Louder than the silence threshold.
    pub fn is_active(&self) -> bool {
        self.smoothed <= self.threshold
    }

    /// The smoothed level on the protocol's 0.0–1.0 scale.
    pub fn protocol_level(&self) -> f32 {
        to_protocol(self.smoothed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rfc6464_bytes() {
        assert_eq!(
            AudioLevel::from_byte(0x80 | 30),
            AudioLevel {
                voice: true,
                dbov: 30
            }
        );
        assert_eq!(
            AudioLevel::from_byte(127),
            AudioLevel {
                voice: false,
                dbov: 127
            }
        );
        assert_eq!(AudioLevel::from_byte(0xff).dbov, 127);
        assert_eq!(AudioLevel::from_byte(0).dbov, 0);
        for b in 0..=255u8 {
            assert_eq!(AudioLevel::from_byte(b).to_byte(), b);
        }
    }

    #[test]
    fn parses_extension_elements() {
        // One-byte header form: ID=1, L=0 (one data byte) then the level.
        let one_byte_element = [0x10, 0x80 | 42];
        assert_eq!(
            AudioLevel::from_extension(&one_byte_element[1..]),
            Ok(AudioLevel {
                voice: true,
                dbov: 42
            })
        );
        // Two-byte header form: ID, length 2 (level plus padding).
        let two_byte_element = [1, 2, 55, 0];
        assert_eq!(
            AudioLevel::from_extension(&two_byte_element[2..]),
            Ok(AudioLevel {
                voice: false,
                dbov: 55
            })
        );
        assert_eq!(AudioLevel::from_extension(&[]), Err(LevelError::Empty));
    }

    #[test]
    fn pcm_levels() {
        assert_eq!(dbov_from_pcm(&[0; 960]), 127);
        assert_eq!(dbov_from_pcm(&[]), 127);
        // Full-scale square wave: 0 dBov.
        let square: Vec<i16> = (0..960)
            .map(|i| if i % 2 == 0 { i16::MAX } else { i16::MIN })
            .collect();
        assert_eq!(dbov_from_pcm(&square), 0);
        // Full-scale sine: about 3 dBov; a tenth of that: about 23.
        let sine = |amp: f64| -> Vec<i16> {
            (0..960)
                .map(|i| (amp * (i as f64 * 0.1).sin()) as i16)
                .collect()
        };
        assert_eq!(dbov_from_pcm(&sine(32767.0)), 3);
        assert_eq!(dbov_from_pcm(&sine(3276.7)), 23);
    }

    #[test]
    fn protocol_scale() {
        assert_eq!(to_protocol(0.0), 1.0);
        assert_eq!(to_protocol(127.0), 0.0);
        assert_eq!(to_protocol(PROTOCOL_FLOOR_DBOV), 0.0);
        assert!((to_protocol(35.0) - 0.5).abs() < 1e-6);
    }

    #[test]
    fn meter_attacks_fast_releases_slowly() {
        let mut m = LevelMeter::new(50);
        assert!(!m.is_active());
        m.update(20);
        m.update(20);
        assert!(m.is_active(), "two loud frames make it active");
        for _ in 0..3 {
            m.update(20);
        }
        assert!(m.dbov() < 25.0);
        // A short pause between words keeps it active.
        for _ in 0..3 {
            m.update(127);
        }
        assert!(m.is_active());
        // A long silence does not.
        for _ in 0..40 {
            m.update(127);
        }
        assert!(!m.is_active());
        assert!(m.protocol_level() < 0.05);
        m.update(0);
        m.reset();
        assert_eq!(m.dbov(), 127.0);
    }
}
