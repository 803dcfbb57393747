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
