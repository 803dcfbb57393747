//! Keep-alive HTTP/1.1 connections to one target, driven by the task that uses them.
//!
//! A connection in use is not a task of its own: the request's task polls it while it waits
//! for the response head and while the response body is read. Each piece of a body then
//! reaches the client without a hop between tasks (or threads), and the pieces the upstream
//! wrote together go to the client together. Between requests a connection waits in its
//! target's pool, in the lane of the thread that opened it: its socket is registered with that
//! thread's event loop, which is the one to use it again. One that has been idle for
//! [`IDLE_FOR`], or that the upstream closed, is let go at the next checkout or sweep.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;

use super::websocket::open;
use crate::config::settings::TargetSettings;
use crate::ws::io::Io;

/// A request body on its way upstream.
pub(crate) type UpstreamBody =
    http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, super::http::BoxError>;

type Driver = Connection<TokioIo<Io>, UpstreamBody>;

/// Idle connections are closed after this: below the shortest keep-alive that common
/// upstreams keep (Node's 5 s), so that the edge never sends on a connection the upstream is
/// closing at that moment.
pub(crate) const IDLE_FOR: Duration = Duration::from_secs(4);
/// Idle connections kept per target and thread.
const MAX_IDLE: usize = 32;

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
    connection: UpstreamConnection,
    since: Instant,
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
    pub(crate) fn checkout(self: &Arc<Self>) -> Option<UpstreamConnection> {
        let thread = std::thread::current().id();
        let mut lanes = self
            .lanes
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let idle = &mut lanes.iter_mut().find(|lane| lane.thread == thread)?.idle;
        while let Some(Idle {
            mut connection,
            since,
        }) = idle.pop()
        {
            if since.elapsed() < IDLE_FOR && connection.still_open() {
                return Some(connection);
            }
        }
        None
    }

    /// A new connection (TCP, and TLS for `wss://` targets), within the connect timeout.
    pub(crate) async fn connect(self: &Arc<Self>) -> Result<UpstreamConnection, ConnectError> {
        let io = tokio::time::timeout(self.connect_timeout, open(&self.target))
            .await
            .map_err(|_| ConnectError::TimedOut)?
            .map_err(ConnectError::Io)?;
        let (sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(ConnectError::Handshake)?;
        Ok(UpstreamConnection {
            sender,
            driver: Box::new(driver),
            closed: false,
            thread: std::thread::current().id(),
            pool: Arc::downgrade(self),
        })
    }

    fn put_back(&self, connection: UpstreamConnection) {
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
        lane.idle.push(Idle {
            connection,
            since: Instant::now(),
        });
    }

    /// Lets go of connections idle too long or closed by the upstream.
    pub(crate) fn sweep(&self) {
        let mut lanes = self
            .lanes
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        for lane in lanes.iter_mut() {
            lane.idle
                .retain_mut(|idle| idle.since.elapsed() < IDLE_FOR && idle.connection.still_open());
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

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connect timed out")]
    TimedOut,
    #[error("{0}")]
    Io(std::io::Error),
    #[error("HTTP/1.1 handshake failed: {0}")]
    Handshake(hyper::Error),
}

/// One HTTP/1.1 connection to a target, and the pool it goes back to.
pub(crate) struct UpstreamConnection {
    pub(crate) sender: SendRequest<UpstreamBody>,
    /// Boxed: the connection's state is large, and the connection moves from the pool to a
    /// request and its response body and back.
    driver: Box<Driver>,
    closed: bool,
    /// The thread whose event loop the connection's socket is registered with.
    thread: ThreadId,
    pool: Weak<Pool>,
}

impl UpstreamConnection {
    /// Reads and writes what the connection can now; whether it has ended.
    pub(crate) fn poll_drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.closed {
            return Poll::Ready(());
        }
        match Pin::new(&mut *self.driver).poll(cx) {
            Poll::Ready(result) => {
                if let Err(error) = result {
                    tracing::debug!(%error, "upstream connection ended");
                }
                self.closed = true;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Whether an idle connection can take a request: the upstream has not closed it.
    fn still_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.poll_drive(&mut cx).is_pending() && self.sender.is_ready()
    }

    /// After an exchange that ended as it should: back to the pool if the connection can take
    /// another request (the upstream did not ask to close it, no request body is still on its
    /// way); closed otherwise.
    pub(crate) fn release(mut self) {
        if !self.still_open() {
            return;
        }
        if let Some(pool) = self.pool.upgrade() {
            pool.put_back(self);
        }
    }
}
