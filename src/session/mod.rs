//! Resumable sessions: the registry of sessions a client may come back to ([`registry`]), the
//! bounded buffer of upstream messages it may not have received ([`replay`]), and what a
//! session does beside the relay when its client leaves and comes back ([`resumable`]).
//!
//! A session is one upstream connection. Its client may drop and come back (same user, tenant,
//! conversation and `session_id`, with `last_seq` = the upstream messages it has received);
//! meanwhile the upstream connection stays open and what it sends is kept, within the route's
//! bounds. What a client has received is known from its pongs: a pong answers a ping queued
//! behind everything sent before it, so everything up to that ping has reached the client, and
//! only what came after is kept. A connected client therefore costs about one round trip of
//! messages; a detached one at most `max_messages` / `max_bytes`.

pub(crate) mod registry;
pub(crate) mod replay;
pub(crate) mod resumable;

use std::sync::Arc;
use std::time::Duration;

use crate::audit::AuditLog;
use crate::metrics::Metrics;
use crate::ws::close::{EdgeClose, Finish, NotResumable};
use crate::ws::leg::{CLOSE_TIMEOUT, Leg, close_leg};

pub(crate) use registry::Registry;

/// A route's `resume = { … }`.
#[derive(Debug, Clone, PartialEq)]
pub struct ResumeSettings {
    /// How long a session whose client dropped is kept for it.
    pub window: Duration,
    /// Upstream messages kept for a client that may not have received them.
    pub max_messages: usize,
    pub max_bytes: usize,
    /// Tell each client what happened to its session in a first `edge.session` message.
    pub announce: bool,
}

/// The query parameters a client names its session with.
pub(crate) const SESSION_PARAM: &str = "session_id";
pub(crate) const LAST_SEQ_PARAM: &str = "last_seq";

/// The longest `session_id` accepted (a UUID is 36 characters).
const MAX_SESSION_ID: usize = 128;

/// Whether `id` is acceptable as a session id: URL-safe, short.
pub(crate) fn valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_SESSION_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
}

/// Sessions are per route and per (tenant, user): another user's session id names nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct SessionKey {
    pub(crate) route: String,
    pub(crate) tenant: String,
    pub(crate) user: String,
    pub(crate) id: String,
}

/// What every resumable session of an edge shares: the registry, the metrics its sessions
/// move and the audit log they write to.
pub(crate) struct Sessions {
    pub(crate) registry: Registry,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) audit: AuditLog,
}

/// Closes a client that cannot have its session with 4002 and the reason.
pub(crate) async fn close_not_resumable(leg: Leg, why: NotResumable) {
    close_leg(
        leg,
        Finish::Send(EdgeClose::NotResumable(why)),
        CLOSE_TIMEOUT,
        true,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_short_and_url_safe() {
        assert!(valid_session_id("0b6c1f3e-8a8f-4c1e-9d36-2f0f2b1c9a77"));
        assert!(!valid_session_id(""));
        assert!(!valid_session_id("a b"));
        assert!(!valid_session_id(&"x".repeat(129)));
    }
}
