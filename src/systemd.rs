//! systemd integration: `Type=notify` readiness, reload and stop notifications, and the
//! watchdog keep-alive. Every call is a no-op without `$NOTIFY_SOCKET`, so the binary runs the
//! same outside systemd.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

fn send(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "systemd notification failed");
    }
}

/// READY=1: the listeners are bound and the edge is serving.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// RELOADING=1 with MONOTONIC_USEC, which systemd 253+ requires to accept the reload.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// STOPPING=1: draining has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// When systemd set `WatchdogSec=`, sends WATCHDOG=1 at half the interval until `stop`. The
/// keep-alive runs on the same runtime as the relays, so a wedged runtime stops it too.
pub fn spawn_watchdog(stop: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = (interval / 2).max(Duration::from_millis(10));
    tokio::spawn(async move {
        let mut every = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = every.tick() => send(&[NotifyState::Watchdog]),
                () = stop.cancelled() => return,
            }
        }
    });
}
