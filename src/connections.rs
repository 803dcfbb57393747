//! The proxied WebSocket connections open now, for the admin API: who holds each, and a switch
//! that ends it (with 4004 to the client, 1000 to its upstream). A detached resumable session
//! is still its connection, until it ends.
//!
//! Registered once per connection and removed when it ends; found by scanning, which only an
//! operator's call does. Sharded, so that the registrations of two worker threads rarely meet.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::shutdown::Switch;

const SHARDS: usize = 16;

/// Who holds a connection.
#[derive(Debug, Clone, Default)]
pub(crate) struct Holder {
    pub(crate) request_id: String,
    pub(crate) route: Arc<str>,
    pub(crate) user: String,
    pub(crate) tenant: Option<String>,
    pub(crate) conversation: Option<String>,
    pub(crate) session_id: Option<String>,
}

/// The token a connection holds now: a resumed session's client may bring a fresh one.
#[derive(Debug, Clone, Default)]
pub(crate) struct TokenFacts {
    pub(crate) jti: Option<String>,
    /// When the token expires (Unix seconds).
    pub(crate) expires_at: Option<u64>,
}

/// One open connection.
pub(crate) struct Connection {
    pub(crate) holder: Holder,
    /// The token it holds now (a resume may bring another).
    token: Mutex<TokenFacts>,
    pub(crate) since: SystemTime,
    /// Bytes of messages from the client, and to it, as the relay last wrote them down.
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    /// Whether its client is away (a resumable session waiting for it).
    pub(crate) detached: AtomicBool,
    /// Ends it: the relay looks at it as it looks at the edge's drain.
    pub(crate) revoke: Switch,
}

/// Which connections an operator means: every field given must match.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct Selector {
    pub(crate) user: Option<String>,
    pub(crate) tenant: Option<String>,
    pub(crate) conversation: Option<String>,
    pub(crate) session: Option<String>,
    pub(crate) jti: Option<String>,
    /// Only connections without a tenant (a revoked user without one is not every tenant's
    /// user of that name).
    pub(crate) without_tenant: bool,
}

impl Selector {
    pub(crate) fn is_empty(&self) -> bool {
        self.user.is_none()
            && self.tenant.is_none()
            && self.conversation.is_none()
            && self.session.is_none()
            && self.jti.is_none()
    }

    fn matches(&self, connection: &Connection) -> bool {
        let holder = &connection.holder;
        let same = |wanted: &Option<String>, held: Option<&str>| {
            wanted.as_deref().is_none_or(|wanted| held == Some(wanted))
        };
        same(&self.user, Some(&holder.user))
            && same(&self.tenant, holder.tenant.as_deref())
            && !(self.without_tenant && holder.tenant.is_some())
            && same(&self.conversation, holder.conversation.as_deref())
            && same(&self.session, holder.session_id.as_deref())
            && (self.jti.is_none() || same(&self.jti, connection.token().jti.as_deref()))
    }
}

/// A connection as the admin API lists it.
#[derive(Serialize)]
pub(crate) struct Listed {
    request_id: String,
    route: String,
    user: String,
    tenant: Option<String>,
    conversation: Option<String>,
    session_id: Option<String>,
    jti: Option<String>,
    /// RFC 3339, UTC.
    since: String,
    bytes_in: u64,
    bytes_out: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    detached: bool,
}

#[derive(Default)]
pub(crate) struct Connections {
    shards: [Mutex<HashMap<u64, Arc<Connection>>>; SHARDS],
    next: AtomicU64,
}

/// A connection's place in the registry; it leaves when this is dropped.
pub(crate) struct Registered {
    connections: Arc<Connections>,
    id: u64,
    pub(crate) connection: Arc<Connection>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.connections.shard(self.id).remove(&self.id);
    }
}

impl Connections {
    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Connection>>> {
        self.shards[id as usize % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn register(self: &Arc<Self>, holder: Holder, token: TokenFacts) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let connection = Arc::new(Connection {
            token: Mutex::new(token),
            holder,
            since: SystemTime::now(),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            detached: AtomicBool::new(false),
            revoke: Switch::default(),
        });
        self.shard(id).insert(id, connection.clone());
        Registered {
            connections: self.clone(),
            id,
            connection,
        }
    }

    /// The connections `selector` matches.
    pub(crate) fn select(&self, selector: &Selector) -> Vec<Arc<Connection>> {
        let mut found = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            found.extend(
                shard
                    .values()
                    .filter(|connection| selector.matches(connection))
                    .cloned(),
            );
        }
        found.sort_by_key(|connection| connection.since);
        found
    }
}

impl Connection {
    /// The token it holds now.
    pub(crate) fn token(&self) -> TokenFacts {
        self.token.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A resumed session's client brought this token.
    pub(crate) fn set_token(&self, token: TokenFacts) {
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = token;
    }

    pub(crate) fn listed(&self) -> Listed {
        let holder = &self.holder;
        let token = self.token();
        Listed {
            request_id: holder.request_id.clone(),
            route: holder.route.to_string(),
            user: holder.user.clone(),
            tenant: holder.tenant.clone(),
            conversation: holder.conversation.clone(),
            session_id: holder.session_id.clone(),
            jti: token.jti,
            since: humantime::format_rfc3339_seconds(self.since).to_string(),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            detached: self.detached.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(user: &str, tenant: &str, conversation: &str) -> Holder {
        Holder {
            user: user.into(),
            tenant: Some(tenant.into()),
            conversation: Some(conversation.into()),
            ..Holder::default()
        }
    }

    #[test]
    fn selectors_and_every_given_field_and_registrations_leave_when_dropped() {
        let connections = Arc::new(Connections::default());
        let a = connections.register(holder("alice", "acme", "c1"), TokenFacts::default());
        let _b = connections.register(holder("alice", "acme", "c2"), TokenFacts::default());
        let _c = connections.register(holder("bob", "acme", "c1"), TokenFacts::default());
        let alice = Selector {
            user: Some("alice".into()),
            ..Selector::default()
        };
        assert_eq!(connections.select(&alice).len(), 2);
        let alice_c1 = Selector {
            conversation: Some("c1".into()),
            ..alice.clone()
        };
        assert_eq!(connections.select(&alice_c1).len(), 1);
        assert_eq!(connections.select(&Selector::default()).len(), 3);
        drop(a);
        assert_eq!(connections.select(&alice).len(), 1);
    }
}
