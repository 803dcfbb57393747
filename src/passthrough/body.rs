//! Bodies passed through frame by frame, never held whole: the client's request body on its way
//! upstream (bounded by `max_body_size`, timed out when it stalls), and the upstream's response
//! body on its way to the client (timed out when it stalls, ended at the token's expiry, and
//! reported when it is done).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::report::Ending;
use crate::upstream::h1::BoxError;
use crate::upstream::h1::H1Error;
use crate::upstream::pool::Pooled;

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
/// The timer itself is made the first time the body has nothing to give: a short response
/// that arrives whole never needs one.
struct IdleTimer {
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    quiet_since: Instant,
    active: bool,
}

impl IdleTimer {
    fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            sleep: None,
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
        let deadline = self.quiet_since + self.timeout;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            let deadline = self.quiet_since + self.timeout;
            if deadline <= Instant::now() {
                return true;
            }
            sleep.as_mut().reset(deadline);
        }
    }
}

/// A client's request body: as hyper reads it, or none at all (a request the edge's own reader
/// took: it takes only requests without a body).
pub(crate) enum ClientBody {
    Hyper(Incoming),
    Empty,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ClientBody::Hyper(incoming) => Pin::new(incoming).poll_frame(cx),
            ClientBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(incoming) => incoming.is_end_stream(),
            ClientBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(incoming) => incoming.size_hint(),
            ClientBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// The client's request body as it goes upstream.
pub(crate) struct RequestBody {
    inner: ClientBody,
    limit: u64,
    seen: u64,
    idle: IdleTimer,
    progress: Progress,
}

impl RequestBody {
    pub(crate) fn new(
        inner: ClientBody,
        limit: u64,
        timeout: Duration,
        progress: Progress,
    ) -> Self {
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

/// Told once when a response body is done: how many bytes went to the client, and how the
/// body ended.
pub(crate) trait Finished: Send + 'static {
    fn finished(self: Box<Self>, bytes: u64, ending: Ending);
}

/// Why the upstream's response body was cut.
#[derive(Debug, thiserror::Error)]
enum Cut {
    #[error("the upstream sent nothing within the timeout")]
    Stalled,
    #[error("the upstream's body failed: {0}")]
    Failed(H1Error),
    #[error("the client's token expired")]
    TokenExpired,
}

/// The upstream's response body as it goes to the client, read from the connection it comes on
/// (which hands over, in one piece, what one read from the upstream brought).
pub(crate) struct ResponseBody {
    /// Back to its pool when the body ended as it should; closed when dropped otherwise.
    connection: Option<Pooled>,
    idle: IdleTimer,
    /// When the client's token expires: the stream ends then (its timer made when the body
    /// first has to wait).
    expires_at: Option<Instant>,
    expires: Option<Pin<Box<Sleep>>>,
    /// An event stream (`text/event-stream`): it ends cleanly at the token's expiry, as a
    /// stream of events may (its client reconnects, with a fresh token). Any other body is cut
    /// then, so that its client cannot take what it got for the whole.
    event_stream: bool,
    bytes: u64,
    done: bool,
    finished: Option<Box<dyn Finished>>,
}

type Polled = Poll<Option<Result<Frame<Bytes>, BoxError>>>;

impl ResponseBody {
    pub(crate) fn new(
        connection: Pooled,
        timeout: Duration,
        expires_at: Option<Instant>,
        event_stream: bool,
        finished: Box<dyn Finished>,
    ) -> Self {
        Self {
            connection: Some(connection),
            idle: IdleTimer::new(timeout),
            expires_at,
            expires: None,
            event_stream,
            bytes: 0,
            done: false,
            finished: Some(finished),
        }
    }

    /// Reports the exchange; a connection whose body ended as it should can serve another.
    fn finish(&mut self, ending: Ending) {
        self.done = true;
        if let Some(connection) = self.connection.take()
            && ending == Ending::Complete
        {
            connection.release();
        }
        if let Some(finished) = self.finished.take() {
            finished.finished(self.bytes, ending);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let this = self.get_mut();
        let Some(connection) = this.connection.as_mut().filter(|_| !this.done) else {
            return Poll::Ready(None);
        };
        match connection.connection.poll_body(cx) {
            Poll::Ready(Some(Ok(data))) => {
                this.idle.activity();
                this.bytes += data.len() as u64;
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            Poll::Ready(Some(Err(error))) => {
                this.finish(Ending::Cut);
                return Poll::Ready(Some(Err(Box::new(Cut::Failed(error)))));
            }
            Poll::Ready(None) => {
                this.finish(Ending::Complete);
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        // The token expired: the stream ends, as a socket gets 4001. The upstream's connection
        // is closed (the rest of its body is not read).
        if let Some(at) = this.expires_at
            && this
                .expires
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)))
                .as_mut()
                .poll(cx)
                .is_ready()
        {
            this.finish(Ending::TokenExpired);
            return Poll::Ready(if this.event_stream {
                None
            } else {
                Some(Err(Box::new(Cut::TokenExpired)))
            });
        }
        if this.idle.poll_expired(cx) {
            this.finish(Ending::Cut);
            return Poll::Ready(Some(Err(Box::new(Cut::Stalled))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.done
            || self
                .connection
                .as_ref()
                .is_none_or(|pooled| pooled.connection.body_done())
    }

    fn size_hint(&self) -> SizeHint {
        match self
            .connection
            .as_ref()
            .and_then(|c| c.connection.body_left())
        {
            Some(left) if !self.done => SizeHint::with_exact(left),
            Some(_) => SizeHint::with_exact(0),
            None => SizeHint::default(),
        }
    }
}

impl Drop for ResponseBody {
    /// Reported here when hyper stopped reading at the body's announced length (complete), or
    /// when the client went away before the end (cut short).
    fn drop(&mut self) {
        if !self.done {
            let complete = self
                .connection
                .as_ref()
                .is_some_and(|pooled| pooled.connection.body_done());
            self.finish(if complete {
                Ending::Complete
            } else {
                Ending::Cut
            });
        }
    }
}
