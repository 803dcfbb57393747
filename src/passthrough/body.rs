//! Bodies passed through frame by frame, never held whole: the client's request body on its way
//! upstream (bounded by `max_body_size`, timed out when it stalls), and the upstream's response
//! body on its way to the client (timed out when it stalls, ended at the token's expiry, and
//! reported when it is done).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::upstream::http::BoxError;
use crate::upstream::pool::UpstreamConnection;

/// What went wrong with a client's request body, if anything: the answer the client gets
/// instead of the upstream's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFault {
    /// Past `max_body_size`: 413.
    TooLarge,
    /// The client stopped sending for `http_timeout`: 408.
    Stalled,
    /// A framing error (a bad chunk) or a lost connection: 400.
    Broken,
}

/// How far a request body got, for the handler: its bytes, and its fault when the upstream
/// request failed because of it.
#[derive(Clone, Default)]
pub(crate) struct Progress(Arc<(AtomicU64, AtomicU8)>);

impl Progress {
    fn set(&self, fault: BodyFault) {
        let code = match fault {
            BodyFault::TooLarge => 1,
            BodyFault::Stalled => 2,
            BodyFault::Broken => 3,
        };
        let _ = self
            .0
            .1
            .compare_exchange(0, code, Ordering::Relaxed, Ordering::Relaxed);
    }

    pub(crate) fn fault(&self) -> Option<BodyFault> {
        match self.0.1.load(Ordering::Relaxed) {
            1 => Some(BodyFault::TooLarge),
            2 => Some(BodyFault::Stalled),
            3 => Some(BodyFault::Broken),
            _ => None,
        }
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.0.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("request body: {0:?}")]
struct FaultError(BodyFault);

/// Fires when a body has had nothing to give for `timeout`. Its timer is moved only when it
/// fires (to `timeout` after the body last went quiet), not at every frame: a stream of many
/// small frames does not pay a timer update for each.
struct IdleTimer {
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    quiet_since: Instant,
    active: bool,
}

impl IdleTimer {
    fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            quiet_since: Instant::now(),
            active: false,
        }
    }

    /// The body gave something.
    fn activity(&mut self) {
        self.active = true;
    }

    /// The body has nothing now: whether it has had nothing for `timeout`.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.active {
            self.active = false;
            self.quiet_since = Instant::now();
        }
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            let deadline = self.quiet_since + self.timeout;
            if deadline <= Instant::now() {
                return true;
            }
            self.sleep.as_mut().reset(deadline);
        }
    }
}

/// The client's request body as it goes upstream.
pub(crate) struct RequestBody {
    inner: Incoming,
    limit: u64,
    seen: u64,
    idle: IdleTimer,
    progress: Progress,
}

impl RequestBody {
    pub(crate) fn new(inner: Incoming, limit: u64, timeout: Duration, progress: Progress) -> Self {
        Self {
            inner,
            limit,
            seen: 0,
            idle: IdleTimer::new(timeout),
            progress,
        }
    }

    fn fail(&mut self, fault: BodyFault) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.progress.set(fault);
        Poll::Ready(Some(Err(Box::new(FaultError(fault)))))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.limit {
                        return this.fail(BodyFault::TooLarge);
                    }
                    this.progress.0.0.store(this.seen, Ordering::Relaxed);
                }
                this.idle.activity();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(_))) => this.fail(BodyFault::Broken),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending if this.idle.poll_expired(cx) => this.fail(BodyFault::Stalled),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Told once when a response body is done: how many bytes went to the client, and whether
/// the upstream's body ended as it should.
pub(crate) trait Finished: Send + 'static {
    fn finished(self: Box<Self>, bytes: u64, complete: bool);
}

/// Why the upstream's response body was cut.
#[derive(Debug, thiserror::Error)]
enum Cut {
    #[error("the upstream sent nothing within the timeout")]
    Stalled,
    #[error("the upstream's body failed: {0}")]
    Failed(hyper::Error),
}

/// Frames below this size are gathered with those already read behind them.
const GATHER_BELOW: usize = 8 * 1024;
/// A gathered frame is passed on once it holds this much.
const GATHER_UP_TO: usize = 64 * 1024;

/// The upstream's response body as it goes to the client.
///
/// It drives the upstream connection the body comes on, so that what the connection has read
/// is here without a hop between tasks, and small frames that were read together go out
/// together: an upstream that writes an event stream one small chunk per event would otherwise
/// cost a write to the client per event. Nothing waits for data that has not arrived: what was
/// gathered goes out as soon as the connection has nothing more.
pub(crate) struct ResponseBody {
    inner: Incoming,
    /// Back to its pool when the body ended as it should; closed when dropped otherwise.
    connection: Option<UpstreamConnection>,
    idle: IdleTimer,
    /// When the client's token expires: the stream ends then.
    expires: Option<Pin<Box<Sleep>>>,
    gathered: BytesMut,
    /// What the upstream's body ended with, held back until the gathered data is out.
    end: Option<End>,
    bytes: u64,
    done: bool,
    finished: Option<Box<dyn Finished>>,
}

/// How the upstream's body ended.
enum End {
    Trailers(Frame<Bytes>),
    Complete,
    Failed(hyper::Error),
}

type Polled = Poll<Option<Result<Frame<Bytes>, BoxError>>>;

impl ResponseBody {
    pub(crate) fn new(
        inner: Incoming,
        connection: UpstreamConnection,
        timeout: Duration,
        expires_at: Option<Instant>,
        finished: Box<dyn Finished>,
    ) -> Self {
        Self {
            inner,
            connection: Some(connection),
            idle: IdleTimer::new(timeout),
            expires: expires_at.map(|at| Box::pin(tokio::time::sleep_until(at))),
            gathered: BytesMut::new(),
            end: None,
            bytes: 0,
            done: false,
            finished: Some(finished),
        }
    }

    /// Reports the exchange; a connection whose body ended as it should can serve another.
    fn finish(&mut self, complete: bool) {
        self.done = true;
        if let Some(connection) = self.connection.take()
            && complete
        {
            connection.release();
        }
        if let Some(finished) = self.finished.take() {
            finished.finished(self.bytes, complete);
        }
    }

    fn data(&mut self, data: Bytes) -> Polled {
        self.bytes += data.len() as u64;
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn flush_gathered(&mut self) -> Polled {
        let data = self.gathered.split().freeze();
        self.data(data)
    }

    fn ended(&mut self, end: End) -> Polled {
        match end {
            End::Trailers(trailers) => Poll::Ready(Some(Ok(trailers))),
            End::Complete => {
                self.finish(true);
                Poll::Ready(None)
            }
            End::Failed(error) => {
                self.finish(false);
                Poll::Ready(Some(Err(Box::new(Cut::Failed(error)))))
            }
        }
    }

    /// Lets the upstream connection read and hand over what it can; false when it had already
    /// ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        match &mut self.connection {
            Some(connection) => {
                let _ = connection.poll_drive(cx);
                true
            }
            None => false,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(end) = this.end.take() {
            return this.ended(end);
        }
        // Whether the connection was driven since the body last gave something: once it has
        // been and the body still has nothing, nothing more is there now.
        let mut drove = false;
        loop {
            let end = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    drove = false;
                    this.idle.activity();
                    match frame.into_data() {
                        Ok(data) if this.gathered.is_empty() && data.len() >= GATHER_BELOW => {
                            return this.data(data);
                        }
                        Ok(data) => {
                            this.gathered.extend_from_slice(&data);
                            if this.gathered.len() >= GATHER_UP_TO {
                                return this.flush_gathered();
                            }
                            continue;
                        }
                        Err(trailers) => End::Trailers(trailers),
                    }
                }
                Poll::Ready(Some(Err(error))) => End::Failed(error),
                Poll::Ready(None) => End::Complete,
                Poll::Pending if !drove && this.drive(cx) => {
                    drove = true;
                    continue;
                }
                Poll::Pending if this.gathered.is_empty() => break,
                Poll::Pending => return this.flush_gathered(),
            };
            if this.gathered.is_empty() {
                return this.ended(end);
            }
            this.end = Some(end);
            return this.flush_gathered();
        }
        // The token expired: the stream ends, as a socket gets 4001.
        if let Some(expires) = this.expires.as_mut()
            && expires.as_mut().poll(cx).is_ready()
        {
            this.finish(true);
            return Poll::Ready(None);
        }
        if this.idle.poll_expired(cx) {
            this.finish(false);
            return Poll::Ready(Some(Err(Box::new(Cut::Stalled))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.gathered.is_empty() && self.end.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        // Gathering changes how the body is cut into frames, not its length.
        let mut hint = self.inner.size_hint();
        let waiting = self.gathered.len() as u64;
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + waiting);
        }
        hint.set_lower(hint.lower() + waiting);
        hint
    }
}

impl Drop for ResponseBody {
    /// Reported here when hyper stopped reading at the body's announced length (complete), or
    /// when the client went away before the end (cut short).
    fn drop(&mut self) {
        if !self.done {
            let complete = self.inner.is_end_stream();
            self.finish(complete);
        }
    }
}
