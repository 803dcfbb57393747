//! Disconnects and revocations that reach every edge. An operator's call on one edge acts there
//! at once and is published on a channel every edge listens to; a revocation is also stored in
//! Redis under a key that expires when it does, so that an edge that missed the message (it
//! was starting, or cut off) reads it back: after each reconnect and every minute, each edge
//! makes its local copy what Redis holds. Handshakes only ever look at the local copy.

use redis::{AsyncCommands, PushInfo, PushKind, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::Cluster;
use crate::connections::Selector;
use crate::metrics::KindLabels;
use crate::revocation::Revoked;

/// The channel every edge listens to.
pub(super) const CHANNEL: &str = "wsedge:events";
const REVOKED_PREFIX: &str = "wsedge:revoked:";

/// What one edge tells the others.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Event {
    /// The instance that published it (it has acted already).
    from: String,
    #[serde(flatten)]
    what: What,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum What {
    /// End the connections the selector matches.
    Disconnect {
        selector: Selector,
    },
    /// Refuse `revoked` until `until` (Unix seconds), and end what the selector matches.
    Revoke {
        revoked: Revoked,
        until: u64,
        selector: Selector,
    },
    Lift {
        revoked: Revoked,
    },
}

impl What {
    fn label(&self) -> &'static str {
        match self {
            What::Disconnect { .. } => "disconnect",
            What::Revoke { .. } => "revoke",
            What::Lift { .. } => "lift",
        }
    }
}

/// The key a revocation is stored under. Lengths first: a tenant or user may hold any byte.
fn revoked_key(revoked: &Revoked) -> String {
    match revoked {
        Revoked::Jti(jti) => format!("{REVOKED_PREFIX}jti:{jti}"),
        Revoked::User { tenant, user } => {
            format!("{REVOKED_PREFIX}user:{}:{tenant}:{user}", tenant.len())
        }
    }
}

fn parse_revoked_key(key: &str) -> Option<Revoked> {
    let rest = key.strip_prefix(REVOKED_PREFIX)?;
    if let Some(jti) = rest.strip_prefix("jti:") {
        return Some(Revoked::Jti(jti.to_owned()));
    }
    let rest = rest.strip_prefix("user:")?;
    let (length, rest) = rest.split_once(':')?;
    let length: usize = length.parse().ok()?;
    let tenant = rest.get(..length)?;
    let user = rest.get(length..)?.strip_prefix(':')?;
    Some(Revoked::User {
        tenant: tenant.to_owned(),
        user: user.to_owned(),
    })
}

/// What became of telling the other edges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Told {
    /// Published; this many edges (this one included) were listening.
    Published(u64),
    /// Redis is down: the revocation is written when it is back; a disconnect is lost.
    Pending,
}

impl Cluster {
    /// Tells the other edges to end the connections `selector` matches (this edge has).
    pub(crate) async fn disconnect(&self, selector: Selector) -> Told {
        self.tell(What::Disconnect { selector }).await
    }

    /// Stores a revocation and tells the other edges (this edge has acted on it).
    pub(crate) async fn revoke(&self, revoked: Revoked, until: u64, selector: Selector) -> Told {
        self.tell(What::Revoke {
            revoked,
            until,
            selector,
        })
        .await
    }

    pub(crate) async fn lift(&self, revoked: Revoked) -> Told {
        self.tell(What::Lift { revoked }).await
    }

    async fn tell(&self, what: What) -> Told {
        let event = Event {
            from: self.instance.clone(),
            what,
        };
        if self.is_up() {
            if let Ok(listening) = self.write(&event).await {
                return Told::Published(listening);
            }
        }
        if !matches!(event.what, What::Disconnect { .. }) {
            self.pending
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(event);
        }
        Told::Pending
    }

    /// Stores (for a revocation or lift) and publishes `event`: how many edges listened.
    async fn write(&self, event: &Event) -> Result<u64, super::Unreachable> {
        let Ok(payload) = serde_json::to_string(event) else {
            return Ok(0);
        };
        let mut pipe = redis::pipe();
        pipe.atomic();
        match &event.what {
            What::Revoke { revoked, until, .. } => {
                pipe.cmd("SET")
                    .arg(revoked_key(revoked))
                    .arg(until)
                    .arg("EXAT")
                    .arg(until)
                    .ignore();
            }
            What::Lift { revoked } => {
                pipe.del(revoked_key(revoked)).ignore();
            }
            What::Disconnect { .. } => {}
        }
        pipe.publish(CHANNEL, payload);
        let pipe = &pipe;
        let (listening,): (u64,) = self
            .call("publish", |mut redis| async move {
                pipe.query_async(&mut redis).await
            })
            .await?;
        Ok(listening)
    }

    /// Writes what waited for Redis, in the order it was done.
    pub(super) async fn write_pending(&self) {
        let pending: Vec<Event> = std::mem::take(
            &mut *self
                .pending
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        for (i, event) in pending.iter().enumerate() {
            if self.write(event).await.is_err() {
                // Redis went away again: keep the rest for next time.
                let mut kept = self
                    .pending
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                let later = std::mem::take(&mut *kept);
                kept.extend(pending[i..].iter().cloned());
                kept.extend(later);
                return;
            }
        }
    }

    /// Makes the local revocations what Redis holds (plus what still waits to be written).
    pub(super) async fn resync_revocations(&self) {
        let keys: Result<Vec<String>, _> = self
            .call("resync", |mut redis| async move {
                let mut keys = Vec::new();
                let mut iter: redis::AsyncIter<String> =
                    redis.scan_match(format!("{REVOKED_PREFIX}*")).await?;
                while let Some(key) = iter.next_item().await {
                    keys.push(key?);
                }
                Ok(keys)
            })
            .await;
        let Ok(keys) = keys else { return };
        let mut entries = Vec::with_capacity(keys.len());
        for batch in keys.chunks(500) {
            let values: Result<Vec<Option<u64>>, _> = self
                .call("resync", |mut redis| async move { redis.mget(batch).await })
                .await;
            let Ok(values) = values else { return };
            for (key, until) in batch.iter().zip(values) {
                if let (Some(revoked), Some(until)) = (parse_revoked_key(key), until) {
                    entries.push((revoked, until));
                }
            }
        }
        for event in self
            .pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
        {
            match &event.what {
                What::Revoke { revoked, until, .. } => entries.push((revoked.clone(), *until)),
                What::Lift { revoked } => entries.retain(|(held, _)| held != revoked),
                What::Disconnect { .. } => {}
            }
        }
        if let Err(error) = self.revocations.replace(entries) {
            tracing::error!(%error, "cluster: the revocations read from Redis are not written to the state directory");
        }
    }

    /// Receives what Redis pushes: the other edges' events.
    pub(super) async fn listen(
        self: std::sync::Arc<Self>,
        mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    ) {
        while let Some(push) = pushes.recv().await {
            if push.kind == PushKind::Disconnection {
                self.missed
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            if push.kind != PushKind::Message {
                continue;
            }
            // [channel, payload]
            let Some(Value::BulkString(payload)) = push.data.get(1) else {
                continue;
            };
            match serde_json::from_slice::<Event>(payload) {
                Ok(event) if event.from == self.instance => {}
                Ok(event) => self.act(event.what),
                Err(error) => {
                    tracing::warn!(%error, "cluster: an event that is not one of ours");
                }
            }
        }
    }

    /// Does here what another edge did there.
    fn act(&self, what: What) {
        self.metrics
            .cluster
            .events
            .get_or_create(&KindLabels { kind: what.label() })
            .inc();
        let selector = match what {
            What::Disconnect { selector } => selector,
            What::Revoke {
                revoked,
                until,
                selector,
            } => {
                if let Err(error) = self.revocations.revoke(revoked, until) {
                    tracing::error!(%error, "cluster: a revocation from another edge is not stored here");
                }
                selector
            }
            What::Lift { revoked } => {
                if let Err(error) = self.revocations.lift(&revoked) {
                    tracing::error!(%error, "cluster: a lift from another edge is not stored here");
                }
                return;
            }
        };
        let matching = self.connections.select(&selector);
        for connection in &matching {
            connection.revoke.turn_on();
        }
        if !matching.is_empty() {
            tracing::info!(
                closed = matching.len(),
                "cluster: connections ended at another edge's call"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocation_keys_read_back_as_what_they_name() {
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
            assert_eq!(parse_revoked_key(&revoked_key(&revoked)), Some(revoked));
        }
        assert_eq!(parse_revoked_key("wsedge:revoked:user:9:x:y"), None);
    }
}
