//! A deadline that is moved often and seldom reached: the head of the next request on a
//! keep-alive connection, the response head of the next exchange on a pooled upstream one.
//! One timer for its whole life, set again only when it goes off before the deadline has
//! passed. A timer made (or moved) for every request had tokio wake its own event loop through
//! the kernel for about every other request.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::time::{Instant, Sleep};

pub(crate) struct LazyDeadline {
    due: Instant,
    timer: Pin<Box<Sleep>>,
}

impl LazyDeadline {
    pub(crate) fn new(due: Instant) -> Self {
        Self {
            due,
            timer: Box::pin(tokio::time::sleep_until(due)),
        }
    }

    /// Moves the deadline; a later one costs nothing until the timer goes off.
    pub(crate) fn set(&mut self, due: Instant) {
        if due < self.timer.deadline() {
            self.timer.as_mut().reset(due);
        }
        self.due = due;
    }

    /// Ready once the deadline has passed.
    pub(crate) fn poll_passed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            ready!(self.timer.as_mut().poll(cx));
            if Instant::now() >= self.due {
                return Poll::Ready(());
            }
            self.timer.as_mut().reset(self.due);
        }
    }

    pub(crate) async fn passed(&mut self) {
        poll_fn(|cx| self.poll_passed(cx)).await;
    }
}
