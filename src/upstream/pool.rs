//! Keep-alive HTTP/1.1 connections to one target ([`HttpConnection`]), reused by requests.
//!
//! Between requests a connection waits in its target's pool, in the lane of the thread that
//! opened it: its socket is registered with that thread's event loop, which is the one to use
//! it again (taking it from another thread would cost a cross-thread wake per read). One that
//! has been idle for [`IDLE_FOR`] (or less, when the upstream's `Keep-Alive: timeout` is
//! shorter), or that the upstream closed, is let go at the next checkout or sweep.

use std::sync::{Arc, Mutex, Weak};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use super::h1::HttpConnection;
use super::websocket::open;
use crate::config::settings::TargetSettings;
use crate::deadline::LazyDeadline;

/// Idle connections are closed after this: below the shortest keep-alive that common
/// upstreams keep (Node's 5 s), so that the edge never sends on a connection the upstream is
/// closing at that moment.
pub(crate) const IDLE_FOR: Duration = Duration::from_secs(4);
/// Idle connections kept per target and thread: as many as requests were in flight at once,
/// within reason (a lower cap closes, after every burst, the connections the next burst opens
/// again); `IDLE_FOR` bounds how long they stay.
const MAX_IDLE: usize = 1024;

/// The idle connections to one target.
pub(crate) struct Pool {
    pub(crate) target: TargetSettings,
    connect_timeout: Duration,
    lanes: Mutex<Vec<Lane>>,
}

/// The idle connections one thread opened, most recently used last.
struct Lane {
    thread: ThreadId,
    idle: Vec<Idle>,
}

struct Idle {
    connection: Pooled,
    /// When it stops being offered.
    until: Instant,
}

impl Idle {
    /// Whether it can still be used: not idle too long, not closed by the upstream.
    fn usable(&mut self, now: Instant) -> bool {
        now < self.until && self.connection.connection.still_open()
    }
}

/// A connection of a pool, on loan to a request.
pub(crate) struct Pooled {
    pub(crate) connection: HttpConnection,
    /// Whether a request went out on it before the one now in flight: such a connection may
    /// have been closed by the upstream as it was taken.
    pub(crate) used: bool,
    /// By when the response head of the exchange in flight must have come: one timer for
    /// the connection's life, made at its first exchange.
    pub(crate) head_deadline: Option<LazyDeadline>,
    /// The thread whose event loop the socket is registered with.
    thread: ThreadId,
    pool: Weak<Pool>,
}

impl Pool {
    pub(crate) fn new(target: TargetSettings, connect_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            target,
            connect_timeout,
            lanes: Mutex::new(Vec::new()),
        })
    }

    /// The most recently used idle connection of this thread that is still open.
    pub(crate) fn checkout(&self) -> Option<Pooled> {
        let thread = std::thread::current().id();
        let mut lanes = self
            .lanes
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let idle = &mut lanes.iter_mut().find(|lane| lane.thread == thread)?.idle;
        let now = Instant::now();
        while let Some(mut waiting) = idle.pop() {
            if waiting.usable(now) {
                return Some(waiting.connection);
            }
        }
        None
    }

    /// A new connection (TCP, and TLS for `wss://` targets), within the connect timeout.
    pub(crate) async fn connect(self: &Arc<Self>) -> std::io::Result<Pooled> {
        let io = tokio::time::timeout(self.connect_timeout, open(&self.target))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        Ok(Pooled {
            connection: HttpConnection::new(io),
            used: false,
            head_deadline: None,
            thread: std::thread::current().id(),
            pool: Arc::downgrade(self),
        })
    }

    fn put_back(&self, mut connection: Pooled) {
        connection.used = true;
        connection.connection.trim();
        // A second short of what the upstream keeps, so that it is never used as the upstream
        // closes it.
        let idle_for = connection
            .connection
            .keep_alive()
            .map_or(IDLE_FOR, |upstream| {
                upstream
                    .saturating_sub(Duration::from_secs(1))
                    .min(IDLE_FOR)
            });
        if idle_for.is_zero() {
            return;
        }
        let until = Instant::now() + idle_for;
        let mut lanes = self
            .lanes
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let lane = match lanes
            .iter()
            .position(|lane| lane.thread == connection.thread)
        {
            Some(at) => &mut lanes[at],
            None => {
                lanes.push(Lane {
                    thread: connection.thread,
                    idle: Vec::new(),
                });
                let last = lanes.len() - 1;
                &mut lanes[last]
            }
        };
        if lane.idle.len() >= MAX_IDLE {
            lane.idle.remove(0);
        }
        lane.idle.push(Idle { connection, until });
    }

    /// Lets go of connections idle too long or closed by the upstream. Each lane is looked at
    /// outside the lock (a probe is a system call per connection): requests meanwhile open
    /// connections or put them back as usual.
    pub(crate) fn sweep(&self) {
        let lock = || {
            self.lanes
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
        };
        let threads: Vec<ThreadId> = lock().iter().map(|lane| lane.thread).collect();
        for thread in threads {
            let taken = lock()
                .iter_mut()
                .find(|lane| lane.thread == thread)
                .map(|lane| std::mem::take(&mut lane.idle));
            let Some(mut kept) = taken.filter(|idle| !idle.is_empty()) else {
                continue;
            };
            let now = Instant::now();
            kept.retain_mut(|idle| idle.usable(now));
            let mut lanes = lock();
            if let Some(lane) = lanes.iter_mut().find(|lane| lane.thread == thread) {
                // Those put back meanwhile were used more recently: they stay last.
                kept.append(&mut lane.idle);
                let over = kept.len().saturating_sub(MAX_IDLE);
                kept.drain(..over);
                lane.idle = kept;
            }
        }
    }
}

impl Pooled {
    /// After an exchange: back to its pool if it can take another request; closed otherwise.
    pub(crate) fn release(self) {
        if !self.connection.reusable() {
            return;
        }
        if let Some(pool) = self.pool.upgrade() {
            pool.put_back(self);
        }
    }
}

/// Sweeps `pools` every second until they are gone (the routes holding them were replaced).
pub(crate) fn sweep_while_alive(pools: Vec<Weak<Pool>>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let mut alive = false;
            for pool in pools.iter().filter_map(Weak::upgrade) {
                alive = true;
                pool.sweep();
            }
            if !alive {
                return;
            }
        }
    });
}
