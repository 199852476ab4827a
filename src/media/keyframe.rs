//! Keyframe request throttling for one published video track.
//!
//! Every subscriber's PLI or FIR, and every new subscriber, wants a
//! keyframe from the publisher. Asking once per request would flood the
//! publisher's encoder (each keyframe costs several times a delta frame),
//! so requests are merged: at most one PLI goes upstream per throttle
//! interval (default 500 ms). A request inside the interval is remembered,
//! and one PLI is sent when the interval ends, unless a keyframe arrived
//! in the meantime and satisfied it.

use std::time::{Duration, Instant};

/// Default minimum time between two PLIs.
pub const DEFAULT_THROTTLE: Duration = Duration::from_millis(500);

/// Counters since the requester was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyframeStats {
    /// Calls to `request`.
    pub requests: u64,
    /// PLIs to send upstream (from `request` or `poll`).
    pub plis: u64,
    /// Deferred requests satisfied by a keyframe before their PLI was due.
    pub satisfied: u64,
}

/// Decides when to send a PLI to the publisher of one video track.
#[derive(Debug, Clone)]
pub struct KeyframeRequester {
    throttle: Duration,
    last_sent: Option<Instant>,
    pending: bool,
    stats: KeyframeStats,
}

impl Default for KeyframeRequester {
    fn default() -> Self {
        KeyframeRequester::new(DEFAULT_THROTTLE)
    }
}

impl KeyframeRequester {
    /// At most one PLI per `throttle`.
    pub fn new(throttle: Duration) -> Self {
        KeyframeRequester {
            throttle,
            last_sent: None,
            pending: false,
            stats: KeyframeStats::default(),
        }
    }

    pub fn stats(&self) -> KeyframeStats {
        self.stats
    }

    /// Whether a request is waiting for the throttle interval to end.
    pub fn is_pending(&self) -> bool {
        self.pending
    }

    fn may_send(&self, now: Instant) -> bool {
        self.last_sent.is_none_or(|t| now >= t + self.throttle)
    }

    fn sent(&mut self, now: Instant) -> bool {
        self.last_sent = Some(now);
        self.pending = false;
        self.stats.plis += 1;
        true
    }

    /// Someone wants a keyframe. True: send a PLI upstream now. False: one
    /// was sent recently; this request is remembered for [`Self::poll`].
    pub fn request(&mut self, now: Instant) -> bool {
        self.stats.requests += 1;
        if self.may_send(now) {
            return self.sent(now);
        }
        self.pending = true;
        false
    }

    /// True when a deferred request's PLI is due now (at most once per
    /// deferred batch).
    pub fn poll(&mut self, now: Instant) -> bool {
        if self.pending && self.may_send(now) {
            return self.sent(now);
        }
        false
    }

    /// A keyframe arrived from the publisher: deferred requests are
    /// satisfied.
    pub fn keyframe_received(&mut self, _now: Instant) {
        if self.pending {
            self.pending = false;
            self.stats.satisfied += 1;
        }
    }

    /// When [`Self::poll`] will next return true, if a request is pending.
    pub fn next_timeout(&self) -> Option<Instant> {
        // A request is only ever deferred behind a PLI already sent.
        self.last_sent
            .filter(|_| self.pending)
            .map(|t| t + self.throttle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn burst_gives_one_pli_now_and_one_deferred() {
        let t0 = Instant::now();
        let mut k = KeyframeRequester::default();
        assert!(k.request(t0));
        for i in 1..10 {
            assert!(!k.request(t0 + ms(i * 10)));
        }
        assert!(k.is_pending());
        assert_eq!(k.next_timeout(), Some(t0 + ms(500)));
        assert!(!k.poll(t0 + ms(499)));
        assert!(k.poll(t0 + ms(500)));
        // Exactly one.
        assert!(!k.poll(t0 + ms(500)));
        assert!(!k.poll(t0 + ms(2000)));
        assert_eq!(k.next_timeout(), None);
        let s = k.stats();
        assert_eq!((s.requests, s.plis, s.satisfied), (10, 2, 0));
    }

    #[test]
    fn deferred_pli_restarts_the_interval() {
        let t0 = Instant::now();
        let mut k = KeyframeRequester::default();
        assert!(k.request(t0));
        assert!(!k.request(t0 + ms(100)));
        assert!(k.poll(t0 + ms(600)));
        assert!(
            !k.request(t0 + ms(700)),
            "within 500 ms of the deferred PLI"
        );
        assert_eq!(k.next_timeout(), Some(t0 + ms(1100)));
        assert!(k.request(t0 + ms(1100)), "interval over: at once");
        assert!(!k.is_pending());
    }

    #[test]
    fn keyframe_clears_the_pending_request() {
        let t0 = Instant::now();
        let mut k = KeyframeRequester::default();
        assert!(k.request(t0));
        assert!(!k.request(t0 + ms(50)));
        k.keyframe_received(t0 + ms(120));
        assert!(!k.is_pending());
        assert_eq!(k.next_timeout(), None);
        assert!(!k.poll(t0 + ms(600)));
        assert_eq!(k.stats().satisfied, 1);
        // A keyframe with nothing pending changes nothing.
        k.keyframe_received(t0 + ms(700));
        assert_eq!(k.stats().satisfied, 1);
        assert!(k.request(t0 + ms(700)));
    }

    #[test]
    fn spaced_requests_all_go_through() {
        let t0 = Instant::now();
        let mut k = KeyframeRequester::new(ms(200));
        for i in 0..5 {
            assert!(k.request(t0 + ms(i * 200)));
        }
        assert_eq!(k.stats().plis, 5);
    }
}
