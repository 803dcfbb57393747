//! What a resumable session keeps beside the relay: the replay buffer, since when its client
//! has been away, how its upstream ended while nobody was there, and the accounting of every
//! detach and attach (gauges, resume outcomes, log and audit lines).
//!
//! The relay owns the legs and decides when a client leaves or comes back; this keeps the
//! session's side of it, so that the relay's state machine does not grow a second one.

use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;
use tokio::time::Instant;

use super::registry::{Attach, SessionEntry, Sessions};
use super::replay::ReplayBuffer;
use crate::audit::Who;
use crate::config::settings::ResumeSettings;
use crate::ws::close::{Close, NotResumable};
use crate::ws::frame::opcode;
use crate::ws::leg::Leg;

/// A resumable session's state beside the relay (boxed by the relay: other routes do not pay
/// for it).
pub(crate) struct Resumable {
    settings: ResumeSettings,
    entry: Arc<SessionEntry>,
    sessions: Arc<Sessions>,
    route: Arc<str>,
    /// Who the session belongs to, for its audit lines (only when an audit log is written).
    who: Option<Arc<Who>>,
    replay: ReplayBuffer,
    detached_since: Option<Instant>,
    /// How the upstream ended while the client was away: passed on after the replay.
    upstream_final: Option<Close>,
    /// What the buffer gauges were last moved to.
    gauged: (i64, i64),
    /// What a detached session may hold before it has to drop something: the bounds, or what
    /// it already held when its client left (a connected client's buffer can pass the bounds
    /// by what one read brought, and nothing of that is lost yet).
    allowance: (usize, usize),
}

/// A client that came back, ready to go on: the replay queued on its leg.
pub(crate) struct Attached {
    pub(crate) leg: Leg,
    pub(crate) token_expires_at: Option<SystemTime>,
}

#[derive(Serialize)]
struct DetachDetails {
    reason: &'static str,
}

#[derive(Serialize)]
struct ResumeDetails {
    last_seq: u64,
    replayed: u64,
}

impl Resumable {
    pub(crate) fn new(
        settings: ResumeSettings,
        entry: Arc<SessionEntry>,
        sessions: Arc<Sessions>,
        route: Arc<str>,
        who: Option<Arc<Who>>,
    ) -> Self {
        Self {
            settings,
            entry,
            sessions,
            route,
            who,
            replay: ReplayBuffer::default(),
            detached_since: None,
            upstream_final: None,
            gauged: (0, 0),
            allowance: (0, 0),
        }
    }

    pub(crate) fn replay(&self) -> &ReplayBuffer {
        &self.replay
    }

    pub(crate) fn replay_mut(&mut self) -> &mut ReplayBuffer {
        &mut self.replay
    }

    /// The most a connected client's buffer holds before the upstream is not read further:
    /// (messages, bytes).
    pub(crate) fn bounds(&self) -> (usize, usize) {
        (self.settings.max_messages, self.settings.max_bytes)
    }

    /// When a detached session ends unless its client comes back.
    pub(crate) fn window_ends(&self) -> Option<Instant> {
        self.detached_since
            .map(|since| since + self.settings.window)
    }

    /// Whether a detached session has read past what it may hold.
    pub(crate) fn overflowed(&self) -> bool {
        let (messages, bytes) = self.allowance;
        self.replay.messages() > messages || self.replay.bytes() > bytes
    }

    /// Tells handshakes and the buffer gauges what the replay buffer holds now.
    pub(crate) fn publish(&mut self) {
        self.entry.publish(&self.replay);
        let now = (self.replay.messages() as i64, self.replay.bytes() as i64);
        self.move_gauges(now);
    }

    /// The client has everything before `offset`.
    pub(crate) fn acknowledge(&mut self, offset: u64) {
        self.replay.acknowledge(offset);
        self.publish();
    }

    fn move_gauges(&mut self, to: (i64, i64)) {
        let metrics = &self.sessions.metrics;
        metrics
            .resume_buffered_messages
            .inc_by(to.0 - self.gauged.0);
        metrics.resume_buffered_bytes.inc_by(to.1 - self.gauged.1);
        self.gauged = to;
    }

    fn audit(&self, event: &'static str, request_id: Option<&str>, details: impl Serialize) {
        if let Some(who) = &self.who {
            let request_id = request_id.unwrap_or(&who.request_id);
            self.sessions.audit.record(event, request_id, who, details);
        }
    }

    /// The client vanished before its socket was handed over: the session starts detached.
    pub(crate) fn start_detached(&mut self) {
        self.detached_since = Some(Instant::now());
        self.allowance = self.bounds();
        self.sessions.metrics.sessions_detached.inc();
    }

    /// The client left without ending its session: the upstream is kept for the window.
    pub(crate) fn detach(&mut self, why: &'static str) {
        self.detached_since = Some(Instant::now());
        self.allowance = (
            self.settings.max_messages.max(self.replay.messages()),
            self.settings.max_bytes.max(self.replay.bytes()),
        );
        self.sessions.metrics.sessions_detached.inc();
        tracing::info!(
            route = %self.route,
            session = %self.entry.key.id,
            reason = why,
            buffered = self.replay.messages(),
            "client detached; session kept"
        );
        self.audit("detach", None, DetachDetails { reason: why });
    }

    /// The upstream ended while the client was away (or before it confirmed the rest): its
    /// client gets `close` after the replay.
    pub(crate) fn upstream_ended(&mut self, close: Close) {
        self.upstream_final = Some(close);
    }

    /// The upstream's close a client had not received yet: the next client gets it.
    pub(crate) fn take_upstream_final(&mut self) -> Option<Close> {
        self.upstream_final.take()
    }

    /// A client handed over by a handshake, if any (and a wake-up when one comes).
    pub(crate) fn poll_arrival(&self, cx: &mut std::task::Context<'_>) -> Option<Box<Attach>> {
        self.entry.poll_take(cx)
    }

    /// Whether the rest can be given to a client that has received `last_seq` messages; a
    /// refusal is counted and logged, and the client is the caller's to close.
    pub(crate) fn replay_start(&self, attach: &Attach) -> Result<u64, NotResumable> {
        self.replay
            .replay_start(attach.last_seq)
            .inspect_err(|why| {
                self.sessions.metrics.resume(&self.route, why.label());
                tracing::info!(
                    request_id = %attach.request_id,
                    session = %self.entry.key.id,
                    reason = why.reason(),
                    "resume refused"
                );
            })
    }

    /// Takes a client back: `start` is where its replay begins (from [`Self::replay_start`]),
    /// `received` how many of its messages the upstream has, `took_over` whether another
    /// client was connected until now. The replay (and the announcement) are queued on its leg.
    pub(crate) fn attach(
        &mut self,
        attach: Attach,
        start: u64,
        received: u64,
        took_over: bool,
    ) -> Attached {
        if !took_over {
            self.sessions.metrics.sessions_detached.dec();
        }
        let Attach {
            mut leg,
            last_seq,
            token_expires_at,
            request_id,
            ..
        } = attach;
        // After an upstream that ended mid-message only whole messages are replayed: its
        // close must not land inside a frame.
        let end = match &self.upstream_final {
            Some(_) => self.replay.complete_end().max(start),
            None => self.replay.end(),
        };
        let mut replay = Vec::new();
        let replayed = self.replay.copy_range(start, end, &mut replay);
        if self.settings.announce {
            let announce = serde_json::json!({
                "type": "edge.session",
                "session_id": self.entry.key.id,
                "resumed": true,
                "replayed": replayed,
                "received": received,
            });
            leg.send_frame(opcode::TEXT, announce.to_string().as_bytes());
        }
        leg.push_data(&replay);
        self.sessions.metrics.resume(&self.route, "resumed");
        tracing::info!(
            request_id = %request_id,
            session = %self.entry.key.id,
            last_seq,
            replayed,
            "session resumed"
        );
        self.audit(
            "resume",
            Some(&request_id),
            ResumeDetails { last_seq, replayed },
        );
        self.detached_since = None;
        Attached {
            leg,
            token_expires_at,
        }
    }

    /// The session is over: a late client will be told `why`. Returns a client that was
    /// on its way in, for the caller to tell.
    pub(crate) fn end(&mut self, why: NotResumable) -> Option<Box<Attach>> {
        self.sessions.registry.end(&self.entry, why);
        if self.detached_since.is_some() {
            self.sessions.metrics.sessions_detached.dec();
        }
        self.move_gauges((0, 0));
        self.entry.close()
    }
}
