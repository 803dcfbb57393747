//! Resumable sessions: the registry of sessions a client may come back to, and the bounded
//! buffer of upstream messages it may not have received.
//!
//! A session is one upstream connection. Its client may drop and come back (same user, tenant,
//! conversation and `session_id`, with `last_seq` = the upstream messages it has received);
//! meanwhile the upstream connection stays open and what it sends is kept, within the route's
//! bounds. What a client has received is known from its pongs: a pong answers a ping queued
//! behind everything sent before it, so everything up to that ping has reached the client, and
//! only what came after is kept. A connected client therefore costs about one round trip of
//! messages; a detached one at most `max_messages` / `max_bytes`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use futures_util::task::AtomicWaker;
use http::HeaderValue;

use crate::leg::Leg;

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
pub const SESSION_PARAM: &str = "session_id";
pub const LAST_SEQ_PARAM: &str = "last_seq";

/// The longest `session_id` accepted (a UUID is 36 characters).
const MAX_SESSION_ID: usize = 128;
/// How long the registry remembers why a session ended, so that a late client learns
/// "expired" rather than "unknown".
const REMEMBER_ENDED: Duration = Duration::from_secs(600);
const MAX_REMEMBERED: usize = 100_000;

/// Whether `id` is acceptable as a session id: URL-safe, short.
pub fn valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_SESSION_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
}

/// Why a session cannot be resumed. Every case is told to the client (close 4002 with the
/// reason, or the `edge.session` announcement); none is silently replaced by a fresh session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotResumable {
    /// No such session for this user (also what another user's session id looks like).
    Unknown,
    /// The resume window passed.
    Expired,
    /// Messages the client has not received were dropped: the buffer was full.
    Overflowed,
    /// The client says it received more messages than were sent.
    Ahead,
    /// The session ended: the client or the edge closed it.
    Closed,
    /// A new session was asked for under the id of a live one.
    InUse,
    /// The session belongs to another conversation.
    Conversation,
}

impl NotResumable {
    /// The close reason sent with 4002, and the announcement's `reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Unknown => "session unknown",
            Self::Expired => "session expired",
            Self::Overflowed => "session overflowed",
            Self::Ahead => "last_seq ahead",
            Self::Closed => "session closed",
            Self::InUse => "session in use",
            Self::Conversation => "session conversation differs",
        }
    }

    /// The `outcome` label of `wsedge_resumes_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Expired => "expired",
            Self::Overflowed => "overflowed",
            Self::Ahead => "ahead",
            Self::Closed => "closed",
            Self::InUse => "in_use",
            Self::Conversation => "conversation",
        }
    }
}

/// Sessions are per route and per (tenant, user): another user's session id names nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub route: String,
    pub tenant: String,
    pub user: String,
    pub id: String,
}

/// A client connection handed to a live session.
pub struct Attach {
    pub leg: Leg,
    /// Upstream messages the client has received on this session.
    pub last_seq: u64,
    pub token_expires_at: Option<SystemTime>,
    pub request_id: String,
}

/// What the registry and handshakes know of a live session.
pub struct SessionEntry {
    /// Shared with the registry's map.
    pub key: Arc<SessionKey>,
    serial: u64,
    pub conversation: Option<String>,
    /// The subprotocol the upstream chose: a resumed client gets the same.
    pub protocol: OnceLock<Option<HeaderValue>>,
    /// A client handed over by a handshake, until the session takes it. One slot and a waker
    /// rather than a channel: every resumable session carries it, and a channel is several
    /// times the size.
    mailbox: Mutex<Mailbox>,
    waker: AtomicWaker,
    /// The oldest message still kept, and the number of upstream messages so far; kept
    /// current by the session for handshakes to check `last_seq` against.
    first_seq: AtomicU64,
    completed: AtomicU64,
}

#[derive(Default)]
struct Mailbox {
    waiting: Option<Box<Attach>>,
    /// The session has ended: nothing is taken any more.
    closed: bool,
}

/// What became of a client handed to a session.
pub enum Delivery {
    /// The session will take it.
    Delivered,
    /// The session will take it instead of this one, handed over a moment earlier (two
    /// reconnects racing: the later one wins, as a takeover would).
    Replaced(Box<Attach>),
    /// The session has ended; here is the client back.
    Ended(Box<Attach>),
}

impl SessionEntry {
    fn mailbox(&self) -> std::sync::MutexGuard<'_, Mailbox> {
        // Every update is a single assignment: a poisoned lock still holds a consistent slot.
        self.mailbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands a resuming client to the session.
    pub fn deliver(&self, attach: Box<Attach>) -> Delivery {
        let mut mailbox = self.mailbox();
        if mailbox.closed {
            return Delivery::Ended(attach);
        }
        let replaced = mailbox.waiting.replace(attach);
        drop(mailbox);
        self.waker.wake();
        match replaced {
            Some(earlier) => Delivery::Replaced(earlier),
            None => Delivery::Delivered,
        }
    }

    /// The session's side: a client handed over, if any (and a wake-up when one comes).
    pub fn poll_take(&self, cx: &mut std::task::Context<'_>) -> Option<Box<Attach>> {
        self.waker.register(cx.waker());
        self.mailbox().waiting.take()
    }

    /// The session ends: later clients are given back, and one already waiting is returned.
    pub fn close(&self) -> Option<Box<Attach>> {
        let mut mailbox = self.mailbox();
        mailbox.closed = true;
        mailbox.waiting.take()
    }

    /// Whether a client that has received `last_seq` messages can be given all the rest.
    pub fn check(&self, last_seq: u64) -> Result<(), NotResumable> {
        if last_seq > self.completed.load(Ordering::Relaxed) {
            Err(NotResumable::Ahead)
        } else if last_seq + 1 < self.first_seq.load(Ordering::Relaxed) {
            Err(NotResumable::Overflowed)
        } else {
            Ok(())
        }
    }

    pub fn publish(&self, buffer: &ReplayBuffer) {
        self.first_seq.store(buffer.first_seq, Ordering::Relaxed);
        self.completed
            .store(buffer.completed_messages(), Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct Registry {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    live: HashMap<Arc<SessionKey>, Arc<SessionEntry>>,
    ended: HashMap<SessionKey, (NotResumable, Instant)>,
    ended_order: VecDeque<(Instant, SessionKey)>,
    serial: u64,
}

impl Inner {
    fn forget_old(&mut self, now: Instant) {
        while let Some((at, _)) = self.ended_order.front() {
            let old =
                now.duration_since(*at) > REMEMBER_ENDED || self.ended_order.len() > MAX_REMEMBERED;
            if !old {
                break;
            }
            if let Some((at, key)) = self.ended_order.pop_front()
                && self.ended.get(&key).is_some_and(|(_, when)| *when == at)
            {
                self.ended.remove(&key);
            }
        }
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves the maps consistent (every update is
        // a single insert or remove), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves `key` for a new session.
    pub fn begin(
        &self,
        key: SessionKey,
        conversation: Option<String>,
    ) -> Result<Arc<SessionEntry>, NotResumable> {
        let mut inner = self.lock();
        if inner.live.contains_key(&key) {
            return Err(NotResumable::InUse);
        }
        inner.serial += 1;
        inner.ended.remove(&key);
        let key = Arc::new(key);
        let entry = Arc::new(SessionEntry {
            key: key.clone(),
            serial: inner.serial,
            conversation,
            protocol: OnceLock::new(),
            mailbox: Mutex::default(),
            waker: AtomicWaker::new(),
            first_seq: AtomicU64::new(1),
            completed: AtomicU64::new(0),
        });
        inner.live.insert(key, entry.clone());
        Ok(entry)
    }

    /// The live session under `key`, or why there is none.
    pub fn find(&self, key: &SessionKey) -> Result<Arc<SessionEntry>, NotResumable> {
        let mut inner = self.lock();
        inner.forget_old(Instant::now());
        if let Some(entry) = inner.live.get(key) {
            return Ok(entry.clone());
        }
        Err(inner
            .ended
            .get(key)
            .map_or(NotResumable::Unknown, |(why, _)| *why))
    }

    /// The session behind `entry` is over; a late client will be told `why`.
    pub fn end(&self, entry: &SessionEntry, why: NotResumable) {
        let mut inner = self.lock();
        let now = Instant::now();
        if inner
            .live
            .get(&*entry.key)
            .is_some_and(|live| live.serial == entry.serial)
        {
            inner.live.remove(&*entry.key);
            inner.ended.insert((*entry.key).clone(), (why, now));
            inner.ended_order.push_back((now, (*entry.key).clone()));
        }
        inner.forget_old(now);
    }

    /// A reserved session that never started (its upstream could not be reached).
    pub fn cancel(&self, entry: &SessionEntry) {
        let mut inner = self.lock();
        if inner
            .live
            .get(&*entry.key)
            .is_some_and(|live| live.serial == entry.serial)
        {
            inner.live.remove(&*entry.key);
        }
    }

    /// Live sessions, attached or not.
    pub fn live(&self) -> usize {
        self.lock().live.len()
    }
}

/// A new session's place in the registry: given up again unless the session starts (its
/// upstream refused, a later check failed, the handshake was dropped).
pub struct Reservation<'a> {
    registry: &'a Registry,
    tasks: &'a tokio_util::task::TaskTracker,
    entry: Option<Arc<SessionEntry>>,
}

impl<'a> Reservation<'a> {
    pub fn new(
        registry: &'a Registry,
        tasks: &'a tokio_util::task::TaskTracker,
        entry: Arc<SessionEntry>,
    ) -> Self {
        Self {
            registry,
            tasks,
            entry: Some(entry),
        }
    }

    pub fn entry(&self) -> Option<&Arc<SessionEntry>> {
        self.entry.as_ref()
    }

    /// The session starts: it owns its registry entry from now on.
    pub fn keep(mut self) -> Option<Arc<SessionEntry>> {
        self.entry.take()
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let Some(entry) = self.entry.take() else {
            return;
        };
        self.registry.cancel(&entry);
        // A client that tried to resume the session while it was starting is told it is gone.
        if let Some(waiting) = entry.close() {
            self.tasks
                .spawn(close_not_resumable(waiting.leg, NotResumable::Unknown));
        }
    }
}

/// Closes a client that cannot have its session with 4002 and the reason.
pub async fn close_not_resumable(leg: Leg, why: NotResumable) {
    let close = crate::frame::Close::new(crate::relay::codes::SESSION_NOT_RESUMABLE, why.reason());
    crate::leg::close_leg(
        leg,
        crate::leg::Finish::Close(close),
        crate::relay::CLOSE_TIMEOUT,
        true,
    )
    .await;
}

/// The upstream's data frames as passed to the client, from the oldest message the client may
/// not have received. Offsets count every byte ever pushed, so that a ping can name "all up
/// to here" and its pong free exactly that.
#[derive(Debug)]
pub struct ReplayBuffer {
    bytes: VecDeque<u8>,
    /// The offset of `bytes[0]`.
    base: u64,
    /// The end offsets of the complete messages held, oldest first.
    ends: VecDeque<u64>,
    /// The sequence number (from 1) of the oldest message held.
    first_seq: u64,
}

impl Default for ReplayBuffer {
    fn default() -> Self {
        Self {
            bytes: VecDeque::new(),
            base: 0,
            ends: VecDeque::new(),
            first_seq: 1,
        }
    }
}

impl ReplayBuffer {
    /// The offset after the last byte pushed.
    pub fn end(&self) -> u64 {
        self.base + self.bytes.len() as u64
    }

    pub fn push(&mut self, data: &[u8]) {
        self.bytes.extend(data);
    }

    /// The bytes pushed so far end a message.
    pub fn message_ended(&mut self) {
        self.ends.push_back(self.end());
    }

    /// Upstream messages completed since the session began.
    pub fn completed_messages(&self) -> u64 {
        self.first_seq - 1 + self.ends.len() as u64
    }

    /// Complete messages held.
    pub fn messages(&self) -> usize {
        self.ends.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes.len()
    }

    /// The client has everything before `offset`: drop the messages that end there or earlier.
    /// Returns how many messages and bytes were dropped.
    pub fn acknowledge(&mut self, offset: u64) -> (usize, usize) {
        let mut messages = 0;
        let mut upto = self.base;
        while let Some(&end) = self.ends.front() {
            if end > offset {
                break;
            }
            self.ends.pop_front();
            upto = end;
            messages += 1;
        }
        let bytes = (upto - self.base) as usize;
        self.bytes.drain(..bytes);
        self.base = upto;
        self.first_seq += messages as u64;
        if self.bytes.is_empty() {
            // Idle sessions keep no buffer.
            self.bytes = VecDeque::new();
            self.ends = VecDeque::new();
        }
        (messages, bytes)
    }

    /// Where a replay for a client that has received `last_seq` messages starts.
    pub fn replay_start(&self, last_seq: u64) -> Result<u64, NotResumable> {
        if last_seq > self.completed_messages() {
            return Err(NotResumable::Ahead);
        }
        if last_seq + 1 < self.first_seq {
            return Err(NotResumable::Overflowed);
        }
        Ok(if last_seq + 1 == self.first_seq {
            self.base
        } else {
            self.ends[(last_seq - self.first_seq) as usize]
        })
    }

    /// The offset after the last complete message.
    pub fn complete_end(&self) -> u64 {
        self.ends.back().copied().unwrap_or(self.base)
    }

    /// The bytes from `from` to `to` (offsets within the buffer), appended to `out`; returns
    /// how many complete messages end in that range.
    pub fn copy_range(&self, from: u64, to: u64, out: &mut Vec<u8>) -> u64 {
        let (start, end) = ((from - self.base) as usize, (to - self.base) as usize);
        let (front, back) = self.bytes.as_slices();
        let split = front.len();
        if start < split {
            out.extend_from_slice(&front[start..end.min(split)]);
        }
        if end > split {
            out.extend_from_slice(&back[start.max(split) - split..end - split]);
        }
        self.ends
            .iter()
            .filter(|&&message_end| message_end > from && message_end <= to)
            .count() as u64
    }

    /// Everything from `offset` on, complete or not, appended to `out`; returns how many
    /// complete messages that is.
    pub fn copy_from(&self, offset: u64, out: &mut Vec<u8>) -> u64 {
        self.copy_range(offset, self.end(), out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffer_with(messages: &[&[u8]]) -> ReplayBuffer {
        let mut buffer = ReplayBuffer::default();
        for message in messages {
            buffer.push(message);
            buffer.message_ended();
        }
        buffer
    }

    #[test]
    fn replay_starts_after_what_the_client_has() {
        let buffer = buffer_with(&[b"one", b"two", b"three"]);
        let mut out = Vec::new();
        let start = buffer.replay_start(1).unwrap();
        assert_eq!(buffer.copy_from(start, &mut out), 2);
        assert_eq!(out, b"twothree");
        assert_eq!(buffer.replay_start(3).unwrap(), buffer.end());
        assert_eq!(buffer.replay_start(4), Err(NotResumable::Ahead));
    }

    #[test]
    fn acknowledged_messages_are_dropped_and_cannot_be_replayed() {
        let mut buffer = buffer_with(&[b"one", b"two", b"three"]);
        // An offset inside "two" frees only "one".
        assert_eq!(buffer.acknowledge(4), (1, 3));
        assert_eq!(buffer.replay_start(0), Err(NotResumable::Overflowed));
        let mut out = Vec::new();
        buffer.copy_from(buffer.replay_start(1).unwrap(), &mut out);
        assert_eq!(out, b"twothree");
        assert_eq!(buffer.acknowledge(buffer.end()), (2, 8));
        assert_eq!(buffer.bytes(), 0);
        assert_eq!(buffer.completed_messages(), 3);
        assert_eq!(buffer.replay_start(3).unwrap(), buffer.end());
    }

    #[test]
    fn ranges_copy_across_the_ring_seam() {
        let mut buffer = ReplayBuffer::default();
        // Wrap the deque around: drop the front, then add behind it.
        for message in [&b"aaaa"[..], b"bbbb", b"cccc", b"dddd"] {
            buffer.push(message);
            buffer.message_ended();
        }
        buffer.acknowledge(8);
        for message in [&b"eeee"[..], b"ffff", b"gggggggggggggggg"] {
            buffer.push(message);
            buffer.message_ended();
        }
        buffer.push(b"hh");
        assert!(
            !buffer.bytes.as_slices().1.is_empty(),
            "the deque did not wrap"
        );
        let mut out = Vec::new();
        let start = buffer.replay_start(2).unwrap();
        assert_eq!(buffer.copy_range(start, buffer.complete_end(), &mut out), 5);
        assert_eq!(out, b"ccccddddeeeeffffgggggggggggggggg");
        out.clear();
        assert_eq!(
            buffer.copy_from(buffer.replay_start(6).unwrap(), &mut out),
            1
        );
        assert_eq!(out, b"gggggggggggggggghh");
    }

    #[test]
    fn a_partial_message_is_replayed_from_its_start() {
        let mut buffer = buffer_with(&[b"one"]);
        buffer.push(b"tw");
        let mut out = Vec::new();
        assert_eq!(
            buffer.copy_from(buffer.replay_start(1).unwrap(), &mut out),
            0
        );
        assert_eq!(out, b"tw");
    }

    #[test]
    fn the_registry_keeps_why_a_session_ended() {
        let registry = Registry::default();
        let key = |user: &str| SessionKey {
            route: "/ws".into(),
            tenant: String::new(),
            user: user.into(),
            id: "s1".into(),
        };
        let entry = registry.begin(key("alice"), None).unwrap();
        assert!(matches!(
            registry.begin(key("alice"), None),
            Err(NotResumable::InUse)
        ));
        assert!(registry.find(&key("alice")).is_ok());
        assert_eq!(
            registry.find(&key("bob")).err(),
            Some(NotResumable::Unknown)
        );
        registry.end(&entry, NotResumable::Expired);
        assert_eq!(
            registry.find(&key("alice")).err(),
            Some(NotResumable::Expired)
        );
        // A new session under the id replaces the memory of the old one.
        let _again = registry.begin(key("alice"), None).unwrap();
        assert!(registry.find(&key("alice")).is_ok());
        // The old session's end does not touch the new one.
        registry.end(&entry, NotResumable::Closed);
        assert!(registry.find(&key("alice")).is_ok());
    }

    #[test]
    fn session_ids_are_short_and_url_safe() {
        assert!(valid_session_id("0b6c1f3e-8a8f-4c1e-9d36-2f0f2b1c9a77"));
        assert!(!valid_session_id(""));
        assert!(!valid_session_id("a b"));
        assert!(!valid_session_id(&"x".repeat(129)));
    }
}
