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
