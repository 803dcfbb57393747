//! Limits checked at the handshake: the per-IP handshake rate and per-user concurrent
//! connections. (The global connection cap is a semaphore in `Shared`; the per-connection
//! message rate lives in the relay, where messages are.)

use std::collections::HashMap;
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

/// Open connections per (tenant, user). Entries are removed at zero, so the map is bounded by
/// the open connections.
#[derive(Default)]
pub(crate) struct UserConnections {
    counts: Mutex<HashMap<(String, String), u32>>,
}

/// Holds one of a user's connection slots until dropped.
pub(crate) struct UserSlot {
    owner: Arc<UserConnections>,
    key: (String, String),
}

impl UserConnections {
    /// Takes a slot for the user unless they already hold `max`.
    pub(crate) fn acquire(
        self: &Arc<Self>,
        tenant: &str,
        user: &str,
        max: u32,
    ) -> Option<UserSlot> {
        let key = (tenant.to_owned(), user.to_owned());
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
        Some(UserSlot {
            owner: self.clone(),
            key,
        })
    }

    #[cfg(test)]
    fn users(&self) -> usize {
        self.counts.lock().map_or(0, |counts| counts.len())
    }
}

impl Drop for UserSlot {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_slots_are_exact_and_released() {
        let users = Arc::new(UserConnections::default());
        let a = users.acquire("t", "alice", 2).unwrap();
        let b = users.acquire("t", "alice", 2).unwrap();
        assert!(users.acquire("t", "alice", 2).is_none());
        assert!(
            users.acquire("other", "alice", 2).is_some(),
            "tenants are separate"
        );
        drop(a);
        let c = users.acquire("t", "alice", 2).unwrap();
        drop((b, c));
        assert_eq!(users.users(), 0, "no entry is left behind");
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
