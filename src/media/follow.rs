//! Following a client to its new address (ICE consent from a new address).
//!
//! When a client's address changes (Wi-Fi to LTE) its datagrams start to
//! come from a new address. The demultiplexer lets that address in only
//! after an ICE check from it has passed MESSAGE-INTEGRITY, so every address
//! heard here is authenticated. The ICE engine, as an ICE-lite controlled
//! agent, keeps sending to the pair it selected until the client nominates
//! another, which a client that merely moved does not do. So: when the
//! selected destination has been silent for [`SILENCE`] and another
//! authenticated address of the same connection was heard since, send to
//! the most recently heard one instead. A client with several working
//! paths (all heard) is never redirected.
//!
//! Data and `now` in, a destination out; no sockets. At most
//! [`MAX_ADDRS`] addresses are kept, the least recently heard forgotten
//! first, and nothing allocates after the first few datagrams.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How long the engine's destination must have been silent.
pub const SILENCE: Duration = Duration::from_secs(2);
/// Addresses remembered per connection (as the demultiplexer's cap).
pub const MAX_ADDRS: usize = super::demux::MAX_ADDRS_PER_KEY;

/// The addresses one connection was heard from, and when last.
#[derive(Debug, Default)]
pub struct PathFollower {
    heard: Vec<(SocketAddr, Instant)>,
}

impl PathFollower {
    /// A datagram of this connection (already authenticated or from an
    /// authenticated address) arrived from `from`.
    pub fn heard(&mut self, from: SocketAddr, now: Instant) {
        if let Some(entry) = self.heard.iter_mut().find(|(a, _)| *a == from) {
            entry.1 = now;
            return;
        }
        if self.heard.len() == MAX_ADDRS {
            if let Some(oldest) = self
                .heard
                .iter()
                .enumerate()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(i, _)| i)
            {
                self.heard.swap_remove(oldest);
            }
        }
        self.heard.push((from, now));
    }

    /// Where a datagram the engine addressed to `selected` should go.
    pub fn destination(&self, selected: SocketAddr, now: Instant) -> SocketAddr {
        let silent = |at: Instant| now.saturating_duration_since(at) >= SILENCE;
        let selected_at = self
            .heard
            .iter()
            .find(|(a, _)| *a == selected)
            .map(|(_, at)| *at);
        // Never heard from (an address only the engine knows) or heard
        // lately: the engine's choice stands.
        let Some(selected_at) = selected_at.filter(|at| silent(*at)) else {
            return selected;
        };
        self.heard
            .iter()
            .filter(|(a, at)| *a != selected && *at > selected_at && !silent(*at))
            .max_by_key(|(_, at)| *at)
            .map_or(selected, |(a, _)| *a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[test]
    fn the_engines_choice_stands_while_it_is_heard() {
        let t = Instant::now();
        let mut f = PathFollower::default();
        f.heard(addr(1), t);
        f.heard(addr(2), t + Duration::from_millis(500));
        // Two working paths: both heard, no redirection.
        f.heard(addr(1), t + Duration::from_secs(1));
        assert_eq!(f.destination(addr(1), t + Duration::from_secs(2)), addr(1));
        // Never heard from: not ours to change.
        assert_eq!(f.destination(addr(9), t + Duration::from_secs(9)), addr(9));
    }

    #[test]
    fn a_client_that_moved_is_followed_after_the_silence() {
        let t = Instant::now();
        let mut f = PathFollower::default();
        f.heard(addr(1), t);
        // It moves: from 1 s on, only the new address is heard.
        for ms in (1000..4000).step_by(20) {
            f.heard(addr(2), t + Duration::from_millis(ms));
        }
        // Not yet 2 s of silence on the old one.
        assert_eq!(
            f.destination(addr(1), t + Duration::from_millis(1900)),
            addr(1)
        );
        assert_eq!(
            f.destination(addr(1), t + Duration::from_millis(2000)),
            addr(2)
        );
        assert_eq!(
            f.destination(addr(1), t + Duration::from_millis(3990)),
            addr(2)
        );
        // Everything silent (the client is gone): nowhere better to go.
        assert_eq!(f.destination(addr(1), t + Duration::from_secs(9)), addr(1));
    }

    #[test]
    fn an_old_address_heard_before_the_selected_one_is_not_chosen() {
        let t = Instant::now();
        let mut f = PathFollower::default();
        f.heard(addr(2), t);
        f.heard(addr(1), t + Duration::from_millis(100));
        // Both silent for long: 2 was heard before 1, so it is no better.
        assert_eq!(
            f.destination(addr(1), t + Duration::from_millis(2200)),
            addr(1)
        );
    }

    #[test]
    fn at_most_max_addrs_and_the_least_recent_goes() {
        let t = Instant::now();
        let mut f = PathFollower::default();
        for p in 0..(MAX_ADDRS as u16 + 3) {
            f.heard(addr(p), t + Duration::from_millis(u64::from(p)));
        }
        assert_eq!(f.heard.len(), MAX_ADDRS);
        assert!(!f.heard.iter().any(|(a, _)| *a == addr(0)));
        assert!(f
            .heard
            .iter()
            .any(|(a, _)| *a == addr(MAX_ADDRS as u16 + 2)));
    }
}
