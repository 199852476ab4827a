//! Per-IP-address caps: how many of something (connections, rooms) one
//! address holds at once. A [`Slot`] is one unit held; dropping it gives
//! the unit back, so a count can never leak past its holder.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;

/// Counts per address against one cap.
#[derive(Debug)]
pub struct PerIp {
    counts: Arc<DashMap<IpAddr, usize>>,
    max: usize,
    what: &'static str,
}

/// One unit held by `ip`; given back on drop.
#[derive(Debug)]
pub struct Slot {
    counts: Arc<DashMap<IpAddr, usize>>,
    ip: IpAddr,
}

impl PerIp {
    /// At most `max` units per address; `what` names them in logs.
    pub fn new(max: usize, what: &'static str) -> PerIp {
        PerIp {
            counts: Arc::new(DashMap::new()),
            max,
            what,
        }
    }

    /// One more unit for `ip`, or `None` when it holds `max` already.
    /// IPv6 addresses count per /64 (one host usually has the whole prefix).
    pub fn acquire(&self, ip: IpAddr) -> Option<Slot> {
        let ip = prefix(ip);
        let mut n = self.counts.entry(ip).or_insert(0);
        if *n >= self.max {
            tracing::info!(%ip, max = self.max, what = self.what, "per-address cap reached");
            return None;
        }
        *n += 1;
        Some(Slot {
            counts: self.counts.clone(),
            ip,
        })
    }

    /// Units `ip` holds now.
    pub fn held(&self, ip: IpAddr) -> usize {
        self.counts.get(&prefix(ip)).map_or(0, |n| *n)
    }

    /// Addresses that hold at least one unit (bounded by the units held).
    pub fn addresses(&self) -> usize {
        self.counts.len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Remove the entry at zero so the map holds only live addresses.
        self.counts.remove_if_mut(&self.ip, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

/// The address a cap counts: IPv4 as is, IPv6 by its /64 (IPv4-mapped
/// IPv6 as the IPv4 address).
fn prefix(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0])
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_holds_per_address_and_slots_give_back_on_drop() {
        let caps = PerIp::new(2, "test");
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = caps.acquire(a).expect("first");
        let s2 = caps.acquire(a).expect("second");
        assert!(caps.acquire(a).is_none(), "third from the same address");
        let other = caps.acquire(b).expect("another address is not affected");
        assert_eq!(caps.held(a), 2);
        drop(s1);
        assert_eq!(caps.held(a), 1);
        let s3 = caps.acquire(a).expect("a slot came back");
        drop((s2, s3, other));
        assert_eq!(caps.addresses(), 0, "no entry left for idle addresses");
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let caps = PerIp::new(1, "test");
        let x: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let y: IpAddr = "2001:db8:1:2::ffff".parse().unwrap();
        let z: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _sx = caps.acquire(x).unwrap();
        assert!(caps.acquire(y).is_none(), "same /64");
        let _sz = caps.acquire(z).expect("another /64");
        let v4: IpAddr = "192.0.2.9".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.9".parse().unwrap();
        let _s4 = caps.acquire(v4).unwrap();
        assert!(caps.acquire(mapped).is_none());
    }
}
