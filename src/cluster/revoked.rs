//! The revocations every edge shares, as Redis holds them: one hash, a field per revoked token
//! or user, whose value is `until at kind` — when it ends (Unix seconds), when it was asked
//! (Unix milliseconds) and whether it is a revocation (`r`) or a lift (`l`). The later of two
//! changes to one entry wins, so a lift an edge missed is not undone by its stale copy, and a
//! lift is kept (until the revocation would have ended) to outweigh such copies.
//!
//! Each edge reads the hash back after every reconnect and every minute, a page at a time,
//! and makes its local copy what it holds: what was revoked meanwhile is added (and its live
//! sockets ended), what was lifted is dropped. What the edge holds and Redis lacks entirely
//! (Redis restarted empty) is written back: a revocation survives a Redis without persistence
//! while one edge remembers it. Changes made while Redis is away wait, in the state directory
//! when there is one, and are written (and published) before the next read-back.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use redis::Script;

use super::events::What;
use super::{Cluster, Unreachable};
use crate::revocation::{Revoked, now, write_atomically};

/// The hash every revocation and lift is a field of.
const REVOCATIONS: &str = "wsedge:revocations";
const PENDING_FILE: &str = "cluster-pending.json";
/// The most changes that wait for Redis: far above what operators do while it is away.
const MAX_PENDING: usize = 10_000;
/// Fields read back per call: each call stays short for Redis.
const PAGE: usize = 1000;

/// KEYS[1] the hash; ARGV: field, until, at, kind (`r` or `l`), channel, event. `at` is
/// `now` for a change made while Redis answers: it is stamped with Redis's clock, after any
/// change the field holds, so that an operator's latest call always wins whatever the edges'
/// clocks say. A change that waited for Redis keeps the time it was made at, and is stored
/// unless the field holds a later one. Stored, it is published; answers how many edges
/// listened, or -1 for a change that came too late. A lift keeps the latest end it knows of.
const STORE: &str = r"
local held = redis.call('HGET', KEYS[1], ARGV[1])
local held_until, held_at
if held then
  held_until, held_at = string.match(held, '^(%d+) (%d+) ')
end
local at = ARGV[3]
if at == 'now' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if held_at and tonumber(held_at) >= now then
    now = tonumber(held_at) + 1
  end
  at = string.format('%d', now)
elseif held_at and tonumber(held_at) > tonumber(at) then
  return -1
end
local ends = ARGV[2]
if ARGV[4] == 'l' and held_until and tonumber(held_until) > tonumber(ends) then
  ends = held_until
end
redis.call('HSET', KEYS[1], ARGV[1], ends .. ' ' .. at .. ' ' .. ARGV[4])
return redis.call('PUBLISH', ARGV[5], ARGV[6])
";

/// KEYS[1] the hash; ARGV: field and value pairs that have ended. Each is removed unless it
/// was changed since it was read.
const CLEAN: &str = r"
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return 0
";

/// The field of a revocation. Lengths first: a tenant or user may hold any byte.
fn field(revoked: &Revoked) -> String {
    match revoked {
        Revoked::Jti(jti) => format!("jti:{jti}"),
        Revoked::User { tenant, user } => format!("user:{}:{tenant}:{user}", tenant.len()),
    }
}

fn parse_field(field: &str) -> Option<Revoked> {
    if let Some(jti) = field.strip_prefix("jti:") {
        return Some(Revoked::Jti(jti.to_owned()));
    }
    let rest = field.strip_prefix("user:")?;
    let (length, rest) = rest.split_once(':')?;
    let length: usize = length.parse().ok()?;
    let tenant = rest.get(..length)?;
    let user = rest.get(length..)?.strip_prefix(':')?;
    Some(Revoked::User {
        tenant: tenant.to_owned(),
        user: user.to_owned(),
    })
}

/// A field's value: until when, and whether it is a lift.
fn parse_value(value: &str) -> Option<(u64, bool)> {
    let mut parts = value.split(' ');
    let until = parts.next()?.parse().ok()?;
    let _at: u64 = parts.next()?.parse().ok()?;
    let lifted = match parts.next()? {
        "r" => false,
        "l" => true,
        _ => return None,
    };
    Some((until, lifted))
}

/// The changes that wait for Redis, read back from the state directory.
pub(super) fn load_pending(state_dir: Option<&Path>) -> (Option<PathBuf>, Vec<What>) {
    let Some(dir) = state_dir else {
        return (None, Vec::new());
    };
    let path = dir.join(PENDING_FILE);
    let pending = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
            tracing::error!(path = %path.display(), %error, "cluster: the revocations waiting for Redis cannot be read; they are not written");
            Vec::new()
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(error) => {
            tracing::error!(path = %path.display(), %error, "cluster: the revocations waiting for Redis cannot be read; they are not written");
            Vec::new()
        }
    };
    (Some(path), pending)
}

/// What became of storing a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stored {
    /// Stored and published; this many edges listened.
    Published(u64),
    /// Redis holds a later change of the same entry: this one was neither stored nor published.
    Superseded,
}

impl Cluster {
    /// Stores a revocation (`lifted` false) or lift and publishes `event`. `at`: when a change
    /// that waited for Redis was made (`None`: now, by Redis's clock).
    pub(super) async fn store(
        &self,
        revoked: &Revoked,
        until: u64,
        at: Option<u64>,
        lifted: bool,
        event: &str,
    ) -> Result<Stored, Unreachable> {
        let script = Script::new(STORE);
        let mut invocation = script.key(REVOCATIONS);
        invocation.arg(field(revoked)).arg(until);
        match at {
            Some(at) => invocation.arg(at),
            None => invocation.arg("now"),
        };
        invocation
            .arg(if lifted { "l" } else { "r" })
            .arg(super::events::CHANNEL)
            .arg(event);
        let listening: i64 = self.invoke("publish", &invocation).await?;
        Ok(match u64::try_from(listening) {
            Ok(listening) => Stored::Published(listening),
            Err(_) => Stored::Superseded,
        })
    }

    /// Keeps a change for when Redis is back (in the state directory, when there is one);
    /// whether there was room for it.
    pub(super) fn keep_pending(&self, what: What) -> bool {
        let mut pending = self
            .pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if pending.len() >= MAX_PENDING {
            tracing::error!(
                waiting = pending.len(),
                "cluster: too many changes wait for Redis; this one is made on this edge only"
            );
            return false;
        }
        pending.push(what);
        self.save_pending(&pending);
        true
    }

    fn save_pending(&self, pending: &[What]) {
        let Some(path) = &self.pending_file else {
            return;
        };
        let written = if pending.is_empty() {
            match std::fs::remove_file(path) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
                _ => Ok(()),
            }
        } else {
            serde_json::to_vec(pending)
                .map_err(std::io::Error::other)
                .and_then(|json| write_atomically(path, &json))
        };
        if let Err(error) = written {
            tracing::error!(path = %path.display(), %error, "cluster: the revocations waiting for Redis are not kept across a restart");
        }
    }

    /// Writes what waited for Redis, in the order it was done; whether all of it was.
    pub(super) async fn write_pending(&self) -> bool {
        let pending: Vec<What> = self
            .pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let mut written = 0;
        for what in &pending {
            match self.write(what, false).await {
                Ok(Stored::Published(_)) => {}
                Ok(Stored::Superseded) => {
                    tracing::info!(
                        ?what,
                        "cluster: a change that waited for Redis is older than the one Redis holds; the later one stands"
                    );
                }
                // Redis refused it, and would again: said, and not kept waiting forever.
                Err(Unreachable::Refused) => {
                    tracing::error!(
                        ?what,
                        "cluster: Redis refused a change that waited for it; it holds on this edge only"
                    );
                }
                Err(Unreachable::Away) => break,
            }
            written += 1;
        }
        if written > 0 {
            let mut kept = self
                .pending
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            // Only this task takes from the front; others may have added behind.
            let written = written.min(kept.len());
            kept.drain(..written);
            self.save_pending(&kept);
        }
        written == pending.len()
    }

    /// Makes the local revocations what Redis holds, writes back what Redis lost, and ends
    /// the live sockets of what was revoked while this edge did not hear of it; whether
    /// Redis could be read.
    pub(super) async fn resync_revocations(&self) -> bool {
        let replacing = self.revocations.begin_replace();
        let Ok(stored) = self.read_revocations().await else {
            return false;
        };
        let now = now();
        let mut entries = Vec::new();
        let mut named = HashSet::new();
        let mut ended = Vec::new();
        for (name, value) in stored {
            let (Some(revoked), Some((until, is_lift))) = (parse_field(&name), parse_value(&value))
            else {
                continue;
            };
            if until <= now {
                ended.push((name, value));
            } else if !is_lift {
                entries.push((revoked.clone(), until));
            }
            named.insert(revoked);
        }
        // Lost: what Redis has no field for at all (a lift, even one that has ended, says
        // Redis did not lose it).
        let lost: Vec<(Revoked, u64)> = self
            .revocations
            .entries()
            .into_iter()
            .filter(|(revoked, _)| !named.contains(revoked))
            .collect();
        entries.extend(lost.iter().cloned());
        let (added, replaced) = replacing.replace(entries);
        if let Err(error) = replaced {
            tracing::error!(%error, "cluster: the revocations read from Redis are not all held here");
        }
        let closed: usize = added
            .iter()
            .map(|revoked| self.end_matching(&revoked.selector()))
            .sum();
        if !added.is_empty() {
            tracing::info!(
                revocations = added.len(),
                closed,
                "cluster: revocations this edge had not heard of, read back from Redis"
            );
        }
        self.write_back(&lost, &ended).await;
        true
    }

    /// Every field of the hash, a page per call.
    async fn read_revocations(&self) -> Result<HashMap<String, String>, Unreachable> {
        let mut stored = HashMap::new();
        let mut cursor = 0_u64;
        loop {
            let (next, page): (u64, HashMap<String, String>) = self
                .call("resync", |mut redis| async move {
                    redis::cmd("HSCAN")
                        .arg(REVOCATIONS)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(PAGE)
                        .query_async(&mut redis)
                        .await
                })
                .await?;
            stored.extend(page);
            if next == 0 {
                return Ok(stored);
            }
            cursor = next;
        }
    }

    /// Writes back the revocations Redis lost (unless an edge wrote the field since), and
    /// removes the fields that have ended.
    async fn write_back(&self, lost: &[(Revoked, u64)], ended: &[(String, String)]) {
        for batch in lost.chunks(PAGE) {
            let mut pipe = redis::pipe();
            for (revoked, until) in batch {
                // Asked at 0: any change an operator makes outweighs it.
                pipe.hset_nx(REVOCATIONS, field(revoked), format!("{until} 0 r"))
                    .ignore();
            }
            let pipe = &pipe;
            if self
                .call("resync", |mut redis| async move {
                    pipe.query_async::<()>(&mut redis).await
                })
                .await
                .is_err()
            {
                return;
            }
        }
        if !lost.is_empty() {
            tracing::warn!(
                revocations = lost.len(),
                "cluster: Redis had lost revocations this edge holds; written back"
            );
        }
        for batch in ended.chunks(PAGE) {
            let script = Script::new(CLEAN);
            let mut invocation = script.key(REVOCATIONS);
            for (name, value) in batch {
                invocation.arg(name).arg(value);
            }
            if self.invoke::<i64>("resync", &invocation).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::PREFIX;
    use super::*;

    #[test]
    fn fields_read_back_as_what_they_name() {
        for revoked in [
            Revoked::Jti("a:b:c".into()),
            Revoked::User {
                tenant: "ac:me".into(),
                user: "al:ice".into(),
            },
            Revoked::User {
                tenant: String::new(),
                user: "bob".into(),
            },
        ] {
            assert_eq!(parse_field(&field(&revoked)), Some(revoked));
        }
        assert_eq!(parse_field("user:9:x:y"), None);
        assert_eq!(
            parse_value("1700000000 1700000000123 r"),
            Some((1_700_000_000, false))
        );
        assert_eq!(parse_value("1700000000 0 l"), Some((1_700_000_000, true)));
        assert_eq!(parse_value("1700000000 x r"), None);
        assert_eq!(parse_value("1700000000 1 z"), None);
        assert!(REVOCATIONS.starts_with(PREFIX));
    }
}
