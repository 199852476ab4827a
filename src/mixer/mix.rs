//! Summing 48 kHz mono frames and bringing the sum back into 16 bits.
//!
//! Frames are 960 samples (20 ms). Sums are kept in an `i32` accumulator,
//! which cannot overflow for any realistic number of inputs (65 536
//! full-scale inputs would be needed). A speaker's own N−1 mix is the
//! shared sum minus its own frame, so K+1 mixes cost one sum plus K
//! subtractions.
//!
//! [`render`] passes the accumulator through a soft limiter: linear up to
//! a knee at 3/4 of full scale, then a tanh curve that approaches full
//! scale asymptotically. It is memoryless (no look-ahead, no gain state),
//! monotonic and odd, so loud sums are squashed smoothly, never exceed the
//! i16 range and never change sign.

/// Samples per second.
pub const SAMPLE_RATE: u32 = 48_000;

/// Samples per 20 ms mono frame.
pub const FRAME_SAMPLES: usize = 960;

/// One frame of 16-bit PCM.
pub type Pcm = [i16; FRAME_SAMPLES];

/// One frame of summed samples.
pub type Accumulator = [i32; FRAME_SAMPLES];

/// Where the limiter's knee sits, as a fraction of full scale.
pub const KNEE: f32 = 0.75;

/// Adds `pcm` into `acc`.
pub fn accumulate(acc: &mut Accumulator, pcm: &Pcm) {
    for (a, s) in acc.iter_mut().zip(pcm.iter()) {
        *a += i32::from(*s);
    }
}

/// The soft limiter on one sample, normalised so 1.0 is full scale. The
/// result lies strictly inside (-1.0, 1.0) and has `x`'s sign.
pub fn soft_clip(x: f32) -> f32 {
    let mag = x.abs();
    if mag <= KNEE {
        return x;
    }
    let room = 1.0 - KNEE;
    let y = KNEE + room * ((mag - KNEE) / room).tanh();
    y.copysign(x)
}

/// Writes `acc` (minus `exclude`, for a speaker's own mix) through the
/// limiter into `out`.
pub fn render(acc: &Accumulator, exclude: Option<&Pcm>, out: &mut Pcm) {
    const KNEE_I32: i32 = (KNEE * 32768.0) as i32;
    for (i, (o, a)) in out.iter_mut().zip(acc.iter()).enumerate() {
        let v = match exclude {
            Some(pcm) => *a - i32::from(pcm[i]),
            None => *a,
        };
        *o = if v.abs() <= KNEE_I32 {
            // Below the knee the limiter is the identity; |v| fits in i16.
            v as i16
        } else {
            let y = soft_clip(v as f32 / 32768.0) * 32768.0;
            y.round().clamp(-32767.0, 32767.0) as i16
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(freq: f32, amp: f32) -> Box<Pcm> {
        let mut pcm = Box::new([0i16; FRAME_SAMPLES]);
        for (i, s) in pcm.iter_mut().enumerate() {
            let t = i as f32 / SAMPLE_RATE as f32;
            *s = (amp * (2.0 * std::f32::consts::PI * freq * t).sin()) as i16;
        }
        pcm
    }

    #[test]
    fn quiet_sums_pass_unchanged() {
        let a = tone(440.0, 3000.0);
        let b = tone(660.0, 3000.0);
        let mut acc = [0i32; FRAME_SAMPLES];
        accumulate(&mut acc, &a);
        accumulate(&mut acc, &b);
        let mut out = [0i16; FRAME_SAMPLES];
        render(&acc, None, &mut out);
        for i in 0..FRAME_SAMPLES {
            assert_eq!(i32::from(out[i]), i32::from(a[i]) + i32::from(b[i]));
        }
        // Own mix: minus b is exactly a.
        render(&acc, Some(&b), &mut out);
        assert_eq!(&out[..], &a[..]);
    }

    #[test]
    fn loud_sum_never_wraps_or_hard_clips() {
        let inputs = [
            tone(440.0, 32767.0),
            tone(660.0, 32767.0),
            tone(880.0, 32767.0),
        ];
        let mut acc = [0i32; FRAME_SAMPLES];
        for pcm in &inputs {
            accumulate(&mut acc, pcm);
        }
        let mut out = [0i16; FRAME_SAMPLES];
        render(&acc, None, &mut out);
        let mut over = 0;
        for i in 0..FRAME_SAMPLES {
            let float_sum: f32 = inputs.iter().map(|p| f32::from(p[i])).sum();
            let o = out[i];
            // The limiter stays inside ±32767 (symmetric, no -32768).
            assert_ne!(o, i16::MIN);
            // No sign flip versus the float sum.
            if float_sum.abs() >= 1.0 {
                assert_eq!(
                    o.signum(),
                    float_sum.signum() as i16,
                    "sample {i}: sum {float_sum} -> {o}"
                );
            }
            if float_sum.abs() > 32768.0 {
                over += 1;
                assert!(o.unsigned_abs() > 24_000);
                if float_sum.abs() < 1.25 * 32768.0 {
                    // Squashed, not pinned at the rail as a hard clip would.
                    assert!(o.unsigned_abs() < 32_500, "{float_sum} -> {o}");
                }
            }
            // Monotonic: a louder sum never comes out quieter.
            assert!(f32::from(o).abs() <= float_sum.abs() + 0.5);
        }
        assert!(over > 100, "the test signal should overload: {over}");
    }

    #[test]
    fn soft_clip_shape() {
        assert_eq!(soft_clip(0.5), 0.5);
        assert_eq!(soft_clip(-0.75), -0.75);
        let mut prev = 0.0;
        for i in 1..=400 {
            let x = i as f32 * 0.01;
            let y = soft_clip(x);
            assert!(y >= prev && y <= 1.0);
            assert_eq!(soft_clip(-x), -y);
            prev = y;
        }
        // Continuous at the knee.
        assert!((soft_clip(KNEE + 1e-4) - (KNEE + 1e-4)).abs() < 1e-4);
    }

    #[test]
    fn extreme_accumulator_values() {
        let mut acc = [0i32; FRAME_SAMPLES];
        acc[0] = i32::MAX / 2;
        acc[1] = i32::MIN / 2;
        acc[2] = 32768 * 100;
        let mut out = [0i16; FRAME_SAMPLES];
        render(&acc, None, &mut out);
        assert_eq!(out[0], 32767);
        assert_eq!(out[1], -32767);
        assert_eq!(out[2], 32767);
    }
}
