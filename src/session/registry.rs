//! The registry of live sessions, and the mailbox through which a handshake hands a resuming
//! client to its session.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use futures_util::task::AtomicWaker;
use http::HeaderValue;

use super::replay::ReplayBuffer;
use crate::audit::AuditLog;
use crate::connections::TokenFacts;
use crate::metrics::Metrics;
use crate::ws::close::{EdgeClose, Finish, NotResumable};
use crate::ws::leg::{CLOSE_TIMEOUT, Leg, close_leg};

/// How long the registry remembers why a session ended, so that a late client learns
/// "expired" rather than "unknown".
const REMEMBER_ENDED: Duration = Duration::from_secs(600);
const MAX_REMEMBERED: usize = 100_000;

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

/// A client connection handed to a live session.
pub(crate) struct Attach {
    pub(crate) leg: Leg,
    /// Upstream messages the client has received on this session.
    pub(crate) last_seq: u64,
    pub(crate) token_expires_at: Option<SystemTime>,
    /// The token it came back with: the session's connection holds it once it is attached.
    pub(crate) token: TokenFacts,
    pub(crate) request_id: String,
}

/// What the registry and handshakes know of a live session.
pub(crate) struct SessionEntry {
    /// Shared with the registry's map.
    pub(crate) key: Arc<SessionKey>,
    serial: u64,
    pub(crate) conversation: Option<String>,
    /// The subprotocol the upstream chose: a resumed client gets the same.
    pub(crate) protocol: OnceLock<Option<HeaderValue>>,
    /// A client handed over by a handshake, until the session takes it. One slot and a waker
    /// rather than a channel: every resumable session carries it, and a channel is several
    /// times the size.
    mailbox: Mutex<Mailbox>,
    waker: AtomicWaker,
    /// The oldest message still kept; kept current by the session for handshakes to check
    /// `last_seq` against.
    first_seq: AtomicU64,
}

#[derive(Default)]
struct Mailbox {
    waiting: Option<Box<Attach>>,
    /// The session has ended: nothing is taken any more.
    closed: bool,
}

/// What became of a client handed to a session.
pub(crate) enum Delivery {
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
    pub(crate) fn deliver(&self, attach: Box<Attach>) -> Delivery {
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
    pub(crate) fn poll_take(&self, cx: &mut std::task::Context<'_>) -> Option<Box<Attach>> {
        self.waker.register(cx.waker());
        self.mailbox().waiting.take()
    }

    /// The session ends: later clients are given back, and one already waiting is returned.
    pub(crate) fn close(&self) -> Option<Box<Attach>> {
        let mut mailbox = self.mailbox();
        mailbox.closed = true;
        mailbox.waiting.take()
    }

    /// Whether a client that has received `last_seq` messages may still be given all the rest,
    /// as far as a handshake can tell. Only what the published state proves is refused here:
    /// messages let go. A `last_seq` past the published count is not: the session publishes
    /// after it writes, so a client can have read a message before the count shows it (a soak
    /// found such false "ahead" refusals). The relay, which holds the
    /// buffer itself, judges that one when the client attaches.
    pub(crate) fn check(&self, last_seq: u64) -> Result<(), NotResumable> {
        if last_seq.saturating_add(1) < self.first_seq.load(Ordering::Relaxed) {
            Err(NotResumable::Overflowed)
        } else {
            Ok(())
        }
    }

    pub(crate) fn publish(&self, buffer: &ReplayBuffer) {
        self.first_seq.store(buffer.first_seq(), Ordering::Relaxed);
    }
}

#[derive(Default)]
pub(crate) struct Registry {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    live: HashMap<Arc<SessionKey>, Arc<SessionEntry>>,
    /// Keyed by the session's own key, shared with the order below: an ended session costs
    /// no copy of its names.
    ended: HashMap<Arc<SessionKey>, (NotResumable, Instant)>,
    ended_order: VecDeque<(Instant, Arc<SessionKey>)>,
    /// Slots `ended` had when the edge last sized it (its capacity may read less since, as
    /// freed slots wait to be tidied).
    ended_room: usize,
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

    fn remember_ended(&mut self, key: Arc<SessionKey>, why: NotResumable, now: Instant) {
        // Room for twice what is remembered, taken as the count grows. Sessions end and are
        // forgotten all the time, and a table more than half full when its freed slots run out
        // doubles rather than tidying itself: the edge's memory stepped up minutes after the
        // count had levelled off. At most half full, it tidies in place and keeps its size.
        let wanted = 2 * (self.ended.len() + 1);
        if self.ended_room < wanted {
            self.ended.reserve(wanted - self.ended.len());
            self.ended_room = self.ended.capacity();
        }
        self.ended.insert(key.clone(), (why, now));
        self.ended_order.push_back((now, key));
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves the maps consistent (every update is
        // a single insert or remove), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves `key` for a new session.
    pub(crate) fn begin(
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
        });
        inner.live.insert(key, entry.clone());
        Ok(entry)
    }

    /// The live session under `key`, or why there is none.
    pub(crate) fn find(&self, key: &SessionKey) -> Result<Arc<SessionEntry>, NotResumable> {
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

    /// The sessions live now (for the cluster's directory).
    pub(crate) fn live_keys(&self) -> Vec<Arc<SessionKey>> {
        self.lock().live.keys().cloned().collect()
    }

    /// The session behind `entry` is over; a late client will be told `why`.
    pub(crate) fn end(&self, entry: &SessionEntry, why: NotResumable) {
        let mut inner = self.lock();
        let now = Instant::now();
        inner.forget_old(now);
        if inner
            .live
            .get(&*entry.key)
            .is_some_and(|live| live.serial == entry.serial)
        {
            inner.live.remove(&*entry.key);
            inner.remember_ended(entry.key.clone(), why, now);
        }
    }

    /// Forgets the ended sessions past `REMEMBER_ENDED` when no handshake came to do it, and
    /// gives back the room a burst of them took: an idle edge holds none of it.
    pub(crate) fn sweep(&self) {
        self.sweep_at(Instant::now());
    }

    fn sweep_at(&self, now: Instant) {
        let mut inner = self.lock();
        inner.forget_old(now);
        let Inner {
            ended,
            ended_order,
            ended_room,
            ..
        } = &mut *inner;
        if ended.len() < *ended_room / 4 {
            ended.shrink_to_fit();
            *ended_room = ended.capacity();
        }
        if ended_order.len() < ended_order.capacity() / 4 {
            ended_order.shrink_to_fit();
        }
    }

    /// A reserved session that never started (its upstream could not be reached).
    pub(crate) fn cancel(&self, entry: &SessionEntry) {
        let mut inner = self.lock();
        if inner
            .live
            .get(&*entry.key)
            .is_some_and(|live| live.serial == entry.serial)
        {
            inner.live.remove(&*entry.key);
        }
    }
}

/// A new session's place in the registry: given up again unless the session starts (its
/// upstream refused, a later check failed, the handshake was dropped).
pub(crate) struct Reservation<'a> {
    registry: &'a Registry,
    tasks: &'a tokio_util::task::TaskTracker,
    entry: Option<Arc<SessionEntry>>,
}

impl<'a> Reservation<'a> {
    pub(crate) fn new(
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

    pub(crate) fn entry(&self) -> Option<&Arc<SessionEntry>> {
        self.entry.as_ref()
    }

    /// The session starts: it owns its registry entry from now on.
    pub(crate) fn keep(mut self) -> Option<Arc<SessionEntry>> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_steady_churn_of_ended_sessions_keeps_the_room_it_took() {
        // About 2,000 sessions remembered at any time, one ending and one forgotten at each
        // step, for thirty times as long as one is remembered: the table's room (its capacity
        // when no freed slot waits to be tidied, the most it reads) must level off with the
        // count, not grow again later.
        const REMEMBERED: u32 = 2_000;
        let mut inner = Inner::default();
        let start = Instant::now();
        let (mut room_while_filling, mut room_after) = (0, 0);
        for n in 0..30 * REMEMBERED {
            let now = start + REMEMBER_ENDED / REMEMBERED * n;
            inner.forget_old(now);
            let key = Arc::new(SessionKey {
                route: "/ws".into(),
                tenant: String::new(),
                user: format!("user-{n}"),
                id: "s1".into(),
            });
            inner.remember_ended(key, NotResumable::Expired, now);
            let room = if n < 2 * REMEMBERED {
                &mut room_while_filling
            } else {
                &mut room_after
            };
            *room = (*room).max(inner.ended.capacity());
        }
        assert!(inner.ended.len() <= REMEMBERED as usize + 1);
        assert!(
            room_after <= room_while_filling,
            "{room_while_filling} slots, then {room_after}"
        );
    }

    #[test]
    fn an_idle_registry_forgets_ended_sessions_and_gives_their_room_back() {
        let registry = Registry::default();
        let key = |n: usize| SessionKey {
            route: "/ws".into(),
            tenant: String::new(),
            user: format!("user-{n}"),
            id: "s1".into(),
        };
        for n in 0..5_000 {
            let entry = registry.begin(key(n), None).unwrap();
            registry.end(&entry, NotResumable::Expired);
        }
        registry.sweep();
        assert_eq!(registry.find(&key(7)).err(), Some(NotResumable::Expired));
        // Ten minutes on, with no handshake meanwhile.
        registry.sweep_at(Instant::now() + REMEMBER_ENDED + Duration::from_secs(1));
        {
            let inner = registry.lock();
            assert!(inner.ended.is_empty() && inner.ended_order.is_empty());
            assert!(inner.ended.capacity() < 100, "{}", inner.ended.capacity());
            assert!(inner.ended_order.capacity() < 100);
        }
        assert_eq!(registry.find(&key(7)).err(), Some(NotResumable::Unknown));
    }
}
