//! Disconnects and revocations that reach every edge. An operator's call on one edge acts there
//! at once and is published on a channel every edge listens to; a revocation or lift is also
//! stored in Redis ([`super::revoked`]), so that an edge that missed the message (it was
//! starting, or cut off) reads it back. Handshakes only ever look at the local copy.

use redis::{PushInfo, PushKind, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::revoked::Stored;
use super::{Cluster, Unreachable};
use crate::connections::Selector;
use crate::metrics::KindLabels;
use crate::revocation::Revoked;

/// The channel every edge listens to.
pub(super) const CHANNEL: &str = "wsedge:events";

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
    Disconnect { selector: Selector },
    /// Refuse `revoked` until `until` (Unix seconds), and end what the selector matches.
    /// `at` (Unix milliseconds, when it was asked) orders it against lifts of the same entry.
    Revoke {
        revoked: Revoked,
        until: u64,
        #[serde(default)]
        at: u64,
        selector: Selector,
    },
    /// Stop refusing `revoked`; `until` is when the revocation would have ended (0 when the
    /// edge asked did not know it): until then the lift outweighs an older copy of it.
    Lift {
        revoked: Revoked,
        #[serde(default)]
        until: u64,
        #[serde(default)]
        at: u64,
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

/// What became of telling the other edges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Told {
    /// Published; this many edges (this one included) were listening.
    Published(u64),
    /// Redis is down: the revocation is written when it is back; a disconnect is lost.
    Pending,
    /// Neither published nor kept for later (Redis refused it, or too many wait): this edge
    /// alone acted.
    HereOnly,
}

/// A lift of a revocation whose end no edge knew outweighs stale copies of it this long.
const LIFT_KEPT: u64 = 30 * 24 * 3600;

/// Now, in Unix milliseconds.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
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
            at: now_ms(),
            selector,
        })
        .await
    }

    /// Stores a lift and tells the other edges. `held_until`: when the revocation this edge
    /// lifted would have ended, if it held one.
    pub(crate) async fn lift(&self, revoked: Revoked, held_until: Option<u64>) -> Told {
        let at = now_ms();
        self.tell(What::Lift {
            revoked,
            until: held_until.unwrap_or(at / 1000 + LIFT_KEPT),
            at,
        })
        .await
    }

    async fn tell(&self, what: What) -> Told {
        if self.is_up() {
            match self.write(&what, true).await {
                Ok(Stored::Published(listening)) => return Told::Published(listening),
                // Stamped now, it is later than anything Redis holds: not reached.
                Ok(Stored::Superseded) => return Told::Published(0),
                Err(Unreachable::Refused) => return Told::HereOnly,
                Err(Unreachable::Away) => {}
            }
        }
        if matches!(what, What::Disconnect { .. }) || self.keep_pending(what) {
            Told::Pending
        } else {
            Told::HereOnly
        }
    }

    /// Stores (a revocation or lift) and publishes `what`. `now`: a change made now, stamped
    /// by Redis's clock; else one that waited, with the time it was made.
    pub(super) async fn write(&self, what: &What, now: bool) -> Result<Stored, Unreachable> {
        let event = Event {
            from: self.instance.clone(),
            what: what.clone(),
        };
        let Ok(payload) = serde_json::to_string(&event) else {
            return Ok(Stored::Published(0));
        };
        let (revoked, until, at, lifted) = match what {
            What::Revoke {
                revoked, until, at, ..
            } => (revoked, until, at, false),
            What::Lift { revoked, until, at } => (revoked, until, at, true),
            What::Disconnect { .. } => {
                let payload = &payload;
                return self
                    .call("publish", |mut redis| async move {
                        redis::cmd("PUBLISH")
                            .arg(CHANNEL)
                            .arg(payload)
                            .query_async(&mut redis)
                            .await
                    })
                    .await
                    .map(Stored::Published);
            }
        };
        let at = (!now).then_some(*at);
        self.store(revoked, *until, at, lifted, &payload).await
    }

    /// Receives what Redis pushes: the other edges' events.
    pub(super) async fn listen(
        self: std::sync::Arc<Self>,
        mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    ) {
        while let Some(push) = pushes.recv().await {
            if push.kind == PushKind::Disconnection {
                self.resync_due
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
                ..
            } => {
                if let Err(error) = self.revocations.revoke(revoked, until) {
                    tracing::error!(%error, "cluster: a revocation from another edge is not stored here");
                }
                selector
            }
            What::Lift { revoked, .. } => {
                if let Err(error) = self.revocations.lift(&revoked) {
                    tracing::error!(%error, "cluster: a lift from another edge is not stored here");
                }
                return;
            }
        };
        let closed = self.end_matching(&selector);
        if closed > 0 {
            tracing::info!(closed, "cluster: connections ended at another edge's call");
        }
    }

    /// Ends the connections `selector` matches (4004 to the client): how many.
    pub(super) fn end_matching(&self, selector: &Selector) -> usize {
        let matching = self.connections.select(selector);
        for connection in &matching {
            connection.revoke.turn_on();
        }
        matching.len()
    }
}
