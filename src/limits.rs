//! Limits checked at the handshake: the per-IP handshake rate, pending handshakes per
//! address, and per-user concurrent connections. (The global connection cap is a semaphore in
//! `Shared`; the per-connection message rate lives in the relay, where messages are.)

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::settings::RateLimit;

/// Handshakes per client IP, a token bucket per address.
pub(crate) struct HandshakeRate {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
}

impl HandshakeRate {
    pub(crate) fn new(limit: RateLimit) -> Self {
        let period = Duration::from_secs_f64(1.0 / limit.per_second);
        let burst = NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        Self {
            limiter: RateLimiter::keyed(quota),
        }
    }

    pub(crate) fn allow(&self, ip: IpAddr) -> bool {
        self.limiter.check_key(&ip).is_ok()
    }

    /// Forgets addresses whose bucket is full again, so the map holds only recent clients.
    pub(crate) fn evict_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// How many of something each key holds, each held as a [`Slot`] until it is dropped. Entries
/// are removed at zero, so the map is bounded by what is held.
pub(crate) struct Counts<K: Eq + Hash + Clone> {
    counts: Mutex<HashMap<K, usize>>,
}

impl<K: Eq + Hash + Clone> Default for Counts<K> {
    fn default() -> Self {
        Self {
            counts: Mutex::default(),
        }
    }
}

/// One of a key's slots, until dropped.
pub(crate) struct Slot<K: Eq + Hash + Clone> {
    owner: Arc<Counts<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> Counts<K> {
    /// Takes a slot for `key` unless it already holds `max`.
    pub(crate) fn acquire(self: &Arc<Self>, key: K, max: usize) -> Option<Slot<K>> {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = counts.entry(key.clone()).or_insert(0);
        if *count >= max {
            if *count == 0 {
                counts.remove(&key);
            }
            return None;
        }
        *count += 1;
        Some(Slot {
            owner: self.clone(),
            key,
        })
    }

    #[cfg(test)]
    fn keys(&self) -> usize {
        self.counts.lock().map_or(0, |counts| counts.len())
    }
}

impl<K: Eq + Hash + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut counts = self
            .owner
            .counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// Connections each address holds that have not sent a whole request yet.
pub(crate) type PendingByAddress = Counts<IpAddr>;
pub(crate) type PendingSlot = Slot<IpAddr>;

/// The key an address is counted by: an IPv6 client by its /64 (one host is given a whole /64
/// to pick from), an IPv4-mapped one as the IPv4 address it is.
pub(crate) fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

/// Open connections per (tenant, user).
pub(crate) type UserConnections = Counts<(String, String)>;
pub(crate) type UserSlot = Slot<(String, String)>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_slots_are_exact_and_released() {
        let users = Arc::new(UserConnections::default());
        let alice = || ("t".to_owned(), "alice".to_owned());
        let a = users.acquire(alice(), 2).unwrap();
        let b = users.acquire(alice(), 2).unwrap();
        assert!(users.acquire(alice(), 2).is_none());
        assert!(
            users
                .acquire(("other".to_owned(), "alice".to_owned()), 2)
                .is_some(),
            "tenants are separate"
        );
        drop(a);
        let c = users.acquire(alice(), 2).unwrap();
        drop((b, c));
        assert_eq!(users.keys(), 0, "no entry is left behind");
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_64_and_a_mapped_one_as_ipv4() {
        let key = |text: &str| address_key(text.parse().unwrap());
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::2"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        let pending = Arc::new(PendingByAddress::default());
        let held: Vec<_> = (0..3)
            .filter_map(|i| pending.acquire(key(&format!("2001:db8::{i}")), 2))
            .collect();
        assert_eq!(held.len(), 2);
    }

    #[test]
    fn handshake_rate_allows_the_burst_then_refuses() {
        let rate = HandshakeRate::new(RateLimit {
            per_second: 0.2,
            burst: 3,
        });
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        assert!((0..3).all(|_| rate.allow(ip)));
        assert!(!rate.allow(ip));
        assert!(
            rate.allow("192.0.2.8".parse().unwrap()),
            "addresses are separate"
        );
    }
}
