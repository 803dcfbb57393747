//! Which edge holds each resumable session: `session → instance and link address`, written when
//! a session starts and renewed with the leases, so that an entry outlives a dead edge by at
//! most `node_ttl`. An ended session's entry is left to lapse: a client that comes back through
//! another edge meanwhile is carried to the owner, which tells it why the session is gone.
//!
//! The newest session under an id owns its entry: one started under an id another edge holds
//! (its client came back where that edge could not be reached, and the route starts afresh)
//! writes over it, and the other edge's renewals leave an entry that is no longer its own.

use std::sync::Arc;

use redis::{AsyncCommands, Script};

use super::{Cluster, PREFIX, Unreachable};
use crate::session::registry::SessionKey;

const BATCH: usize = 500;

/// KEYS: entries; ARGV[1] this edge's value, ARGV[2] the time to live. Renews the entries that
/// are this edge's, and writes those that lapsed; leaves those another edge wrote since.
const RENEW: &str = r"
for _, key in ipairs(KEYS) do
  local held = redis.call('GET', key)
  if not held or held == ARGV[1] then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
  end
end
return 0
";

/// The directory key of a session. Lengths first: a tenant or user may hold any byte.
fn entry_key(key: &SessionKey) -> String {
    format!(
        "{PREFIX}session:{}:{}:{}:{}:{}:{}:{}",
        key.route.len(),
        key.route,
        key.tenant.len(),
        key.tenant,
        key.user.len(),
        key.user,
        key.id
    )
}

/// The edge that holds a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Owner {
    pub(crate) instance: String,
    /// Where its link listens (`host:port`).
    pub(crate) link: String,
}

impl Cluster {
    fn entry_value(&self) -> String {
        format!("{} {}", self.instance, self.advertise)
    }

    /// Writes that this edge holds the session `key`, over any other edge's entry (in the
    /// background: the 101 does not wait for it). One that does not reach Redis is written at
    /// the next renewal that does, over any other edge's entry still.
    pub(crate) fn announce_session(self: &Arc<Self>, key: &Arc<SessionKey>) {
        if !self.is_up() {
            self.unannounced().push(key.clone());
            return;
        }
        let cluster = self.clone();
        let key = key.clone();
        tokio::spawn(async move {
            let ttl = cluster.settings.node_ttl.as_millis() as u64;
            let value = &cluster.entry_value();
            let entry = &entry_key(&key);
            let written = cluster
                .call("session", |mut redis| async move {
                    redis.pset_ex::<_, _, ()>(entry, value, ttl).await
                })
                .await;
            if written.is_err() {
                cluster.unannounced().push(key);
            }
        });
    }

    fn unannounced(&self) -> std::sync::MutexGuard<'_, Vec<Arc<SessionKey>>> {
        self.unannounced
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The other edge that holds the session `key`, if one does.
    pub(crate) async fn find_session(
        &self,
        key: &SessionKey,
    ) -> Result<Option<Owner>, Unreachable> {
        if !self.is_up() {
            return Err(Unreachable::Away);
        }
        let entry = &entry_key(key);
        let value: Option<String> = self
            .call(
                "find_session",
                |mut redis| async move { redis.get(entry).await },
            )
            .await?;
        Ok(value.and_then(|value| {
            let (instance, link) = value.split_once(' ')?;
            (instance != self.instance).then(|| Owner {
                instance: instance.to_owned(),
                link: link.to_owned(),
            })
        }))
    }

    /// Renews the entries of every session this edge holds (and writes those whose
    /// announcement did not reach Redis).
    pub(super) async fn renew_sessions(&self) -> bool {
        let keys = self.sessions.registry.live_keys();
        let ttl = self.settings.node_ttl.as_millis() as u64;
        let value = self.entry_value();
        let unannounced = std::mem::take(&mut *self.unannounced());
        if !unannounced.is_empty() {
            let live: std::collections::HashSet<&SessionKey> =
                keys.iter().map(|key| &**key).collect();
            let mut pipe = redis::pipe();
            for key in unannounced.iter().filter(|key| live.contains(&***key)) {
                pipe.pset_ex(entry_key(key), &value, ttl).ignore();
            }
            let pipe = &pipe;
            if self
                .call("session", |mut redis| async move {
                    pipe.query_async::<()>(&mut redis).await
                })
                .await
                .is_err()
            {
                self.unannounced().extend(unannounced);
                return false;
            }
        }
        let script = Script::new(RENEW);
        for batch in keys.chunks(BATCH) {
            let mut invocation = script.prepare_invoke();
            for key in batch {
                invocation.key(entry_key(key));
            }
            invocation.arg(&value).arg(ttl);
            if self
                .invoke::<i64>("renew_sessions", &invocation)
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }
}
