//! Per-connection message rate limit: a token bucket, plus a strike counter
//! so that sustained flooding closes the connection while an occasional
//! burst only earns `rate-limited` errors.
//!
//! Pure: every call takes `now`.

use std::time::Instant;

/// What to do with one incoming message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limit.
    Allow,
    /// Over the limit: answer `rate-limited`, drop the message.
    Reject,
    /// Flooding went on too long: answer `rate-limited` and close.
    Close,
}

#[derive(Debug, Clone)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    /// Rejections not yet forgiven; forgiven at half the rate.
    strikes: f64,
    strike_limit: f64,
    last: Instant,
}

impl RateLimiter {
    /// `rate` messages per second sustained, `burst` above it. Each rejected
    /// message is a strike; strikes are forgiven at half the rate, and
    /// `2 * burst` unforgiven strikes close the connection. So a sender at
    /// up to 1.5x the rate is only throttled, a flood is closed.
    pub fn new(rate: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        RateLimiter {
            rate,
            burst,
            tokens: burst,
            strikes: 0.0,
            strike_limit: 2.0 * burst,
            last: now,
        }
    }

    pub fn check(&mut self, now: Instant) -> Verdict {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.strikes = (self.strikes - dt * self.rate * 0.5).max(0.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allow;
        }
        self.strikes += 1.0;
        if self.strikes >= self.strike_limit {
            Verdict::Close
        } else {
            Verdict::Reject
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(10.0, 5, t0);
        for _ in 0..5 {
            assert_eq!(r.check(t0), Verdict::Allow);
        }
        assert_eq!(r.check(t0), Verdict::Reject);
        // 100 ms later one token is back.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(r.check(t1), Verdict::Allow);
        assert_eq!(r.check(t1), Verdict::Reject);
    }

    #[test]
    fn steady_sender_at_the_rate_is_never_limited() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(20.0, 10, t0);
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_millis(50 * i);
            assert_eq!(r.check(now), Verdict::Allow, "message {i}");
        }
    }

    #[test]
    fn a_short_overshoot_is_forgiven() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(10.0, 5, t0);
        let verdicts: Vec<_> = (0..12).map(|_| r.check(t0)).collect();
        assert!(verdicts.iter().all(|v| *v != Verdict::Close));
        // After a quiet spell the sender is whole again.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(r.check(later), Verdict::Allow);
    }

    #[test]
    fn sustained_flood_closes() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(10.0, 5, t0);
        // 1000 messages/s for up to 5 s.
        let closed_at = (0..5000u64)
            .position(|i| r.check(t0 + Duration::from_millis(i)) == Verdict::Close)
            .expect("a flood must be closed");
        assert!(closed_at > 5, "the burst itself is allowed");
    }
}
