//! `max_connections_per_user` across edges: each connection of a user holds a lease, a member
//! of the user's sorted set scored by when it lapses. Taking one is a script (drop the lapsed,
//! count, add only under the limit), so two edges never both take the last place. Each edge
//! renews its own leases every third of `node_ttl`; an edge that dies stops counting when its
//! leases lapse, and the set itself expires with its last lease.
//!
//! A lease is given back as soon as its socket closes (a task of its own takes the releases as
//! they come), so a user who closes one socket can open another at once on any edge. A renewal
//! only extends leases Redis still has: one released meanwhile stays released. A lease Redis
//! lacks and the edge still holds (taken while Redis was down under "open", or lost when Redis
//! restarted empty) is written again, so a user's count is whole once Redis is back: a live
//! connection always counts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use redis::Script;
use redis::aio::ConnectionManager;
use tokio::sync::mpsc;

use super::{Cluster, PREFIX};
use crate::config::settings::RedisDown;

/// How many leases one renewal script takes: a few hundred keep one call short for Redis.
const RENEW_BATCH: usize = 500;

const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// Made once: a script's digest is computed when it is made, and every handshake runs this one.
static ACQUIRE_SCRIPT: std::sync::LazyLock<Script> =
    std::sync::LazyLock::new(|| Script::new(ACQUIRE));

/// KEYS: the users' sets; ARGV[1] the lease time, then one member per key. Extends the leases
/// Redis has (each one's new end is the latest of its set, so the set's expiry moves with it);
/// answers, per key, 1 for a lease extended and 0 for one Redis lacks.
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local found = {}
for i, key in ipairs(KEYS) do
  if redis.call('ZSCORE', key, ARGV[i + 1]) then
    redis.call('ZADD', key, now + ttl, ARGV[i + 1])
    redis.call('PEXPIRE', key, ttl)
    found[i] = 1
  else
    found[i] = 0
  end
end
return found
";

/// KEYS[1] a user's set, ARGV[1] the member, ARGV[2] the lease time: a lease written again
/// for a socket that is live (whatever the count).
const REWRITE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

/// The key of a user's leases. Lengths first: a tenant or user may hold any printable byte.
pub(crate) fn user_key(tenant: &str, user: &str) -> String {
    format!(
        "{PREFIX}user:{}:{tenant}:{}:{user}",
        tenant.len(),
        user.len()
    )
}

/// A lease this edge holds: the user's key and its member there.
struct Held {
    key: String,
    member: String,
    /// Redis has taken it (or it was taken while Redis was away under "open"): a renewal
    /// writes it again if Redis lacks it. Not while its first call is out.
    counted: bool,
    /// While its first call is out: the connection it went out on.
    acquiring_on: Option<ConnectionManager>,
}

/// A lease given back.
struct Release {
    key: String,
    member: String,
    /// The connection its first call went out on, when that call may still be on its way (the
    /// handshake was dropped, or the call timed out): the release goes out behind it on the same
    /// connection, so that Redis cannot take the lease after giving it back.
    behind: Option<ConnectionManager>,
}

/// The leases this edge holds, for renewal, and those given back, for release.
pub(crate) struct LeaseBook {
    instance: String,
    next: AtomicU64,
    held: Mutex<HashMap<u64, Held>>,
    released: mpsc::UnboundedSender<Release>,
    /// Taken by the task that gives leases back.
    to_release: Mutex<Option<mpsc::UnboundedReceiver<Release>>>,
}

/// Why no lease was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoLease {
    /// The user holds the most across the edges.
    Full,
    /// Redis is down and `on_redis_down` is "closed".
    Unavailable,
}

/// One connection's place in its user's count, until dropped. Made before Redis is asked:
/// a handshake dropped while the call is out, or a call that timed out after Redis took it,
/// gives the place back all the same.
pub(crate) struct Lease {
    book: Arc<LeaseBook>,
    id: u64,
}

impl Lease {
    /// Redis took it, or (`settled` false) the edge counts it without knowing whether Redis
    /// did: its first call may still be on its way, and its release goes out behind it.
    fn counted(&self, settled: bool) {
        if let Some(held) = self.book.held().get_mut(&self.id) {
            held.counted = true;
            if settled {
                held.acquiring_on = None;
            }
        }
    }

    /// Drops a lease Redis refused: there is nothing to give back.
    fn refused(self) {
        self.book.held().remove(&self.id);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let removed = self.book.held().remove(&self.id);
        if let Some(held) = removed {
            // Given back at once by the releasing task; if Redis is away, it lapses.
            let _ = self.book.released.send(Release {
                key: held.key,
                member: held.member,
                behind: held.acquiring_on,
            });
        }
    }
}

impl LeaseBook {
    pub(super) fn new(instance: String) -> Self {
        let (released, to_release) = mpsc::unbounded_channel();
        Self {
            instance,
            next: AtomicU64::new(0),
            held: Mutex::default(),
            released,
            to_release: Mutex::new(Some(to_release)),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Held>> {
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn member(&self) -> (u64, String) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        (id, format!("{}:{id}", self.instance))
    }

    fn keep(
        self: &Arc<Self>,
        id: u64,
        key: String,
        member: String,
        acquiring_on: Option<ConnectionManager>,
    ) -> Lease {
        let held = Held {
            key,
            member,
            counted: false,
            acquiring_on,
        };
        self.held().insert(id, held);
        Lease {
            book: self.clone(),
            id,
        }
    }
}

impl Cluster {
    /// A lease for one more connection of the user, unless they hold `max` across the edges.
    /// With Redis down, `on_redis_down` decides: "open" takes a lease to be written later
    /// (the edge's own count still holds), "closed" refuses with 503.
    pub(crate) async fn lease(&self, tenant: &str, user: &str, max: u32) -> Result<Lease, NoLease> {
        let key = user_key(tenant, user);
        let (id, member) = self.leases.member();
        let up = self.is_up();
        let lease = self
            .leases
            .keep(id, key.clone(), member.clone(), up.then(|| self.redis()));
        if up {
            let ttl = self.settings.node_ttl.as_millis() as u64;
            let mut invocation = ACQUIRE_SCRIPT.key(&key);
            invocation.arg(&member).arg(max).arg(ttl);
            let taken: Result<i64, _> = self.invoke("lease", &invocation).await;
            match taken {
                Ok(1) => {
                    lease.counted(true);
                    return Ok(lease);
                }
                Ok(_) => {
                    lease.refused();
                    return Err(NoLease::Full);
                }
                Err(_) => {}
            }
        }
        // Redis is down (the handshake's admission counted the decision).
        match self.settings.on_redis_down {
            RedisDown::Open => {
                lease.counted(false);
                Ok(lease)
            }
            // Dropped: given back, in case Redis took it before the call timed out.
            RedisDown::Closed => Err(NoLease::Unavailable),
        }
    }

    /// Gives leases back as their sockets close, until the edge stops: all that have come
    /// since the last call in one round trip.
    pub(super) async fn release_leases(self: Arc<Self>) {
        let receiver = self
            .leases
            .to_release
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        let Some(mut receiver) = receiver else {
            return;
        };
        while let Some(first) = receiver.recv().await {
            let mut released = vec![first];
            while let Ok(more) = receiver.try_recv() {
                released.push(more);
            }
            let mut pipe = redis::pipe();
            let mut behind = Vec::new();
            for release in released {
                match release.behind {
                    None => {
                        pipe.zrem(release.key, release.member).ignore();
                    }
                    Some(connection) => behind.push((connection, release.key, release.member)),
                }
            }
            // All at once, each on its own connection; what does not go through goes with
            // the others (its first call's fate is settled by then).
            if !behind.is_empty() {
                let sends = behind.iter().map(|(connection, key, member)| {
                    let mut connection = connection.clone();
                    let mut zrem = redis::cmd("ZREM");
                    zrem.arg(key).arg(member);
                    async move { zrem.query_async::<()>(&mut connection).await }
                });
                let sent = tokio::time::timeout(
                    self.settings.redis_timeout,
                    futures_util::future::join_all(sends),
                )
                .await;
                for (i, (_, key, member)) in behind.iter().enumerate() {
                    let went = sent
                        .as_ref()
                        .is_ok_and(|results| results.get(i).is_some_and(Result::is_ok));
                    if !went {
                        pipe.zrem(key, member).ignore();
                    }
                }
            }
            if pipe.is_empty() {
                continue;
            }
            let pipe = &pipe;
            // When Redis is away they lapse within node_ttl: nobody renews them.
            let _ = self
                .call("release", |mut redis| async move {
                    pipe.query_async::<()>(&mut redis).await
                })
                .await;
        }
    }

    /// Renews the leases this edge holds, and writes again those Redis lacks.
    pub(super) async fn renew_leases(&self) -> bool {
        let held: Vec<(u64, String, String)> = self
            .leases
            .held()
            .iter()
            .filter(|(_, held)| held.counted)
            .map(|(id, held)| (*id, held.key.clone(), held.member.clone()))
            .collect();
        let ttl = self.settings.node_ttl.as_millis() as u64;
        let mut missing = Vec::new();
        for batch in held.chunks(RENEW_BATCH) {
            let script = Script::new(RENEW);
            let mut invocation = script.prepare_invoke();
            invocation.arg(ttl);
            for (_, key, member) in batch {
                invocation.key(key).arg(member);
            }
            let Ok(found) = self.invoke::<Vec<i64>>("renew", &invocation).await else {
                return false;
            };
            missing.extend(
                batch
                    .iter()
                    .zip(found)
                    .filter(|(_, found)| *found == 0)
                    .map(|(lease, _)| lease.clone()),
            );
        }
        for (id, key, member) in missing {
            // Only while its socket is live: one released since is not brought back.
            if !self.leases.held().contains_key(&id) {
                continue;
            }
            let script = Script::new(REWRITE);
            let mut invocation = script.key(&key);
            invocation.arg(&member).arg(ttl);
            if self.invoke::<i64>("renew", &invocation).await.is_err() {
                return false;
            }
            // Released while it was being written: given back again, after the write.
            if !self.leases.held().contains_key(&id) {
                let _ = self.leases.released.send(Release {
                    key,
                    member,
                    behind: None,
                });
            }
        }
        true
    }
}
