//! A route's targets as they fare: which ones are passed over after a failure (passive health),
//! where the round robin stands, and — with `affinity = "user"` — which target each user's
//! requests go to.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::config::settings::TargetSettings;

pub(crate) struct Targets {
    next: AtomicUsize,
    /// Per target: until when (ms on [`clock_ms`]) it is passed over.
    down_until: Box<[AtomicU64]>,
    /// Per target: what a user's key is weighed with (its URL, hashed once).
    seeds: Box<[u64]>,
}

/// Milliseconds since the first call: a cheap monotonic clock that fits in an atomic.
fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// FNV-1a: the same on every edge and in every version, so that several edges in front of the
/// same targets send a user to the same one.
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(seed, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The key `affinity = "user"` places a user with: their tenant and user.
pub(crate) fn user_key(tenant: Option<&str>, user: &str) -> u64 {
    let tenant = fnv1a(FNV_OFFSET, tenant.unwrap_or("").as_bytes());
    // A separator that neither part can hold, so that ("ab", "c") and ("a", "bc") differ.
    fnv1a(fnv1a(tenant, &[0]), user.as_bytes())
}

/// How strongly target `seed` draws `key` (rendezvous hashing): each key goes to the target
/// that draws it most, and when that one is down, to the next — other keys do not move.
fn weight(key: u64, seed: u64) -> u64 {
    // A final mix so that nearby keys spread over the targets.
    let mut x = key ^ seed;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The order to try a route's targets in.
pub(crate) enum Order {
    One(Option<usize>),
    Many(std::vec::IntoIter<usize>),
}

impl Iterator for Order {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        match self {
            Order::One(one) => one.take(),
            Order::Many(many) => many.next(),
        }
    }
}

impl Targets {
    pub(crate) fn new(targets: &[TargetSettings]) -> Self {
        Self {
            next: AtomicUsize::new(0),
            down_until: targets.iter().map(|_| AtomicU64::new(0)).collect(),
            seeds: targets
                .iter()
                .map(|target| fnv1a(FNV_OFFSET, target.url.as_bytes()))
                .collect(),
        }
    }

    /// Target indices in the order to try them: the healthy ones first — for a key the one
    /// that draws it most and then the others by weight, without a key from the round-robin
    /// position — then those cooling down: a last resort is better than refusing untried.
    /// A route with one target (most) is tried without an allocation.
    pub(crate) fn in_order(&self, key: Option<u64>) -> Order {
        let count = self.down_until.len();
        if count == 1 {
            return Order::One(Some(0));
        }
        let mut order: Vec<usize> = match key {
            Some(key) => {
                let mut order: Vec<usize> = (0..count).collect();
                order.sort_by_key(|&i| std::cmp::Reverse(weight(key, self.seeds[i])));
                order
            }
            None => {
                let start = if count > 1 {
                    self.next.fetch_add(1, Ordering::Relaxed) % count
                } else {
                    0
                };
                (0..count).map(|i| (start + i) % count).collect()
            }
        };
        let now = clock_ms();
        // A stable sort: the order above holds within the healthy and within the cooling.
        order.sort_by_key(|&i| self.down_until[i].load(Ordering::Relaxed) > now);
        Order::Many(order.into_iter())
    }

    /// Passes target `i` over for `cooldown` after it failed.
    pub(crate) fn mark_down(&self, i: usize, cooldown: Duration) {
        self.down_until[i].store(clock_ms() + cooldown.as_millis() as u64, Ordering::Relaxed);
    }

    pub(crate) fn mark_up(&self, i: usize) {
        if self.down_until[i].load(Ordering::Relaxed) != 0 {
            self.down_until[i].store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(count: usize) -> Targets {
        let settings: Vec<TargetSettings> = (0..count)
            .map(|i| TargetSettings {
                url: format!("ws://10.0.0.{i}:80/ws"),
                host: format!("10.0.0.{i}"),
                port: 80,
                authority: format!("10.0.0.{i}"),
                path: "/ws".into(),
                query: None,
                tls: None,
            })
            .collect();
        Targets::new(&settings)
    }

    fn order(t: &Targets, key: Option<u64>) -> Vec<usize> {
        t.in_order(key).collect()
    }

    #[test]
    fn round_robin_starts_one_further_each_time() {
        let t = targets(3);
        assert_eq!(order(&t, None), [0, 1, 2]);
        assert_eq!(order(&t, None), [1, 2, 0]);
        assert_eq!(order(&t, None), [2, 0, 1]);
    }

    #[test]
    fn a_user_keeps_a_target_while_it_is_healthy_and_only_its_users_move() {
        let t = targets(3);
        let users: Vec<u64> = (0..300)
            .map(|i| user_key(Some("acme"), &format!("u{i}")))
            .collect();
        let first: Vec<usize> = users.iter().map(|&key| order(&t, Some(key))[0]).collect();
        // Stable, and spread over all three.
        assert_eq!(
            first,
            users
                .iter()
                .map(|&key| order(&t, Some(key))[0])
                .collect::<Vec<_>>()
        );
        for target in 0..3 {
            let share = first.iter().filter(|&&f| f == target).count();
            assert!(
                (60..=140).contains(&share),
                "target {target} drew {share} of 300 users"
            );
        }
        // Target 1 goes down: its users move, nobody else does.
        t.mark_down(1, Duration::from_secs(60));
        for (&key, &before) in users.iter().zip(&first) {
            let now = order(&t, Some(key))[0];
            if before == 1 {
                assert_ne!(now, 1);
            } else {
                assert_eq!(now, before);
            }
        }
        t.mark_up(1);
        assert_eq!(order(&t, Some(users[0]))[0], first[0]);
        // Tenants are apart: the same user name in another tenant is another key.
        assert_ne!(user_key(Some("acme"), "u1"), user_key(Some("globex"), "u1"));
        assert_ne!(user_key(Some("ab"), "c"), user_key(Some("a"), "bc"));
    }

    #[test]
    fn targets_cooling_down_come_last() {
        let t = targets(3);
        t.mark_down(0, Duration::from_secs(60));
        let tried = order(&t, None);
        assert_eq!(tried.last(), Some(&0));
        assert_eq!(tried.len(), 3);
        assert_eq!(order(&targets(1), None), [0]);
    }
}
