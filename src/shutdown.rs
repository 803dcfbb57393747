//! The edge's drain signal: a cancellation token to await, and a flag to look at. Looking costs
//! an atomic load; `CancellationToken::is_cancelled` takes a mutex that every worker thread
//! shares, which every request and every relay wake-up would contend for.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::{
    CancellationToken, WaitForCancellationFuture, WaitForCancellationFutureOwned,
};

#[derive(Clone, Default)]
pub(crate) struct Shutdown {
    token: CancellationToken,
    begun: Arc<AtomicBool>,
}

impl Shutdown {
    /// Begins the drain: every waiter wakes, every later look sees it.
    pub(crate) fn cancel(&self) {
        self.begun.store(true, Ordering::Release);
        self.token.cancel();
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.begun.load(Ordering::Acquire)
    }

    pub(crate) fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    pub(crate) fn cancelled_owned(self) -> WaitForCancellationFutureOwned {
        self.token.cancelled_owned()
    }
}

/// A switch that ends one connection (an operator revoked it): a flag, and the waker of the
/// task that looks at it. The task registers once; a look afterwards is an atomic load.
#[derive(Default)]
pub(crate) struct Switch {
    on: AtomicBool,
    waker: std::sync::Mutex<Option<std::task::Waker>>,
}

impl Switch {
    pub(crate) fn turn_on(&self) {
        self.on.store(true, Ordering::Release);
        let waker = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    pub(crate) fn is_on(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    /// Registers the task to be woken when the switch is turned on; whether it is on.
    pub(crate) fn register(&self, waker: &std::task::Waker) -> bool {
        *self.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(waker.clone());
        self.is_on()
    }
}
