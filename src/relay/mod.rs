//! The relay: one proxied connection (a session, when resumable) from the 101 to the last
//! close. Frames go both ways, in order, with backpressure; heartbeats, timeouts, token expiry
//! and the message rate are enforced; both sides are closed with codes that say what happened.
//!
//! The relay is given two ready legs and owns both sockets from then on; it moves frames
//! between them without decoding them into messages (`ws::frame` reads what the edge must know
//! as the bytes pass). Per direction the edge holds what one read brought and what the
//! destination has not taken yet; once the destination holds 64 KiB unwritten, the pump stops
//! reading its source and TCP pushes back on the sender. No queue grows with what a peer does.
//!
//! Pings and pongs are per hop: each side's pings are answered by the edge and never forwarded
//! (forwarding would produce duplicate pongs); the edge pings each side itself. On a resumable
//! session the pongs also tell the edge what the client has received, so that a dropped
//! client can come back and get exactly the rest (`session`).
//!
//! The relay is a hand-written future rather than an `async fn`: it is what every open
//! connection keeps in memory, most of them idle, and its size is the sum of its fields.

mod pump;
#[cfg(test)]
mod tests;
mod turns;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use futures_util::future::{OptionFuture, join};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::connections::Connection;
use crate::shutdown::Shutdown;
use tokio_util::task::TaskTracker;

use crate::config::settings::Lifecycle;
use crate::metrics::{DirectionCounters, Limit, TurnMetrics};
use crate::session::registry::close_not_resumable;
use crate::session::resumable::Resumable;
use crate::ws::close::{Close, Deadline, EdgeClose, End, Finish, Plan, Side};
use crate::ws::frame::opcode;
use crate::ws::leg::{CLOSE_TIMEOUT, Leg, Ping, close_leg};
pub(crate) use pump::Traffic;
use pump::{Outcome, Pump, TokenBucket, held_limit};
use turns::Turns;

/// How long the edge tries to deliver a close frame to a peer that stopped responding.
const UNRESPONSIVE_CLOSE_TIMEOUT: Duration = Duration::from_millis(500);
/// With heartbeats off, a side whose writes stay blocked this long (plus `pong_timeout`) is
/// still closed: turning pings off must not let a stalled reader hold its slots forever.
const STALL_WINDOW_WITHOUT_HEARTBEATS: Duration = Duration::from_secs(30);

/// What happened to a relayed connection, for logs and metrics.
#[derive(Debug, Clone)]
pub(crate) struct RelayReport {
    /// The side whose action ended the session (`None` when the edge ended it).
    pub(crate) ended_by: Option<Side>,
    /// A short reason: "client closed", "upstream lost", "token expired", …
    pub(crate) reason: &'static str,
    /// What exactly a side did wrong, for a protocol error.
    pub(crate) detail: Option<&'static str>,
    /// The close code sent to (or passed on to) the client, if any.
    pub(crate) client_close: Option<u16>,
    /// The close code sent to (or passed on to) the upstream, if any.
    pub(crate) upstream_close: Option<u16>,
    pub(crate) client_to_upstream: Traffic,
    pub(crate) upstream_to_client: Traffic,
    /// The limit that ended the session, for `wsedge_limit_hits_total`.
    pub(crate) limit: Option<Limit>,
    /// Chat turns begun (client messages that started one).
    pub(crate) turns: u64,
}

/// The metric counters of one connection, resolved before the relay starts.
pub(crate) struct Counters {
    pub(crate) client_to_upstream: DirectionCounters,
    pub(crate) upstream_to_client: DirectionCounters,
    pub(crate) turns: Option<Arc<TurnMetrics>>,
}

/// What a relay is given besides its legs.
pub(crate) struct RelayParams {
    pub(crate) lifecycle: Lifecycle,
    pub(crate) max_message: usize,
    pub(crate) token_expires_at: Option<SystemTime>,
    pub(crate) counters: Counters,
    pub(crate) shutdown: Shutdown,
    /// Where legs that leave a continuing session are closed.
    pub(crate) tasks: TaskTracker,
    pub(crate) resume: Option<Box<Resumable>>,
    /// A first message for the client (the `edge.session` announcement).
    pub(crate) announce: Option<String>,
    /// Its entry in the registry of open connections: an operator ends it through its
    /// switch, and the listing says whether its client is away.
    pub(crate) registered: Option<Arc<Connection>>,
}

enum Phase {
    Running,
    Closing(Pin<Box<dyn Future<Output = ()> + Send>>, Box<RelayReport>),
    Done,
}

/// One proxied connection (a session, when resumable) from the 101 to the last close.
pub(crate) struct Relay {
    phase: Phase,
    client: Option<Leg>,
    upstream: Option<Leg>,
    lifecycle: Lifecycle,
    max_message: usize,
    shutdown: Shutdown,
    /// Registers the task to be woken when `shutdown` is cancelled. Polled once: the
    /// registration lasts as long as the future is kept, and after that a look at the token
    /// is enough.
    shutdown_wait: Pin<Box<WaitForCancellationFutureOwned>>,
    shutdown_registered: bool,
    registered: Option<Arc<Connection>>,
    revoke_registered: bool,
    turns: Turns,
    tasks: TaskTracker,
    timer: Pin<Box<Sleep>>,
    timer_at: Option<Instant>,
    last_data: Instant,
    next_ping: Option<Instant>,
    token_deadline: Option<Instant>,
    session_deadline: Option<Instant>,
    bucket: Option<TokenBucket>,
    ping_serial: u64,
    up: Traffic,
    down: Traffic,
    counters: Counters,
    resume: Option<Box<Resumable>>,
    /// The upstream's close, to pass on once a resumed client has taken the replay.
    final_close: Option<Close>,
}

impl Relay {
    /// A relay over the client's and the upstream's legs. `client` is `None` when the client
    /// vanished between the 101 and the handover of its socket: a resumable session waits for
    /// it to come back, any other connection ends at once.
    pub(crate) fn new(client: Option<Leg>, upstream: Leg, params: RelayParams) -> Self {
        let now = Instant::now();
        let lifecycle = params.lifecycle;
        let turn_gap = lifecycle.turn_gap;
        let mut relay = Self {
            phase: Phase::Running,
            client,
            upstream: Some(upstream),
            token_deadline: lifecycle.token_deadline(params.token_expires_at),
            session_deadline: lifecycle.max_session.and_then(|max| now.checked_add(max)),
            next_ping: lifecycle.ping_interval.map(|interval| now + interval),
            bucket: lifecycle.message_rate.map(TokenBucket::new),
            lifecycle,
            max_message: params.max_message,
            shutdown_wait: Box::pin(params.shutdown.clone().cancelled_owned()),
            shutdown_registered: false,
            shutdown: params.shutdown,
            registered: params.registered,
            revoke_registered: false,
            turns: Turns::new(turn_gap, params.counters.turns.clone()),
            tasks: params.tasks,
            timer: Box::pin(tokio::time::sleep_until(now)),
            timer_at: None,
            last_data: now,
            ping_serial: 0,
            up: Traffic::default(),
            down: Traffic::default(),
            counters: params.counters,
            resume: params.resume,
            final_close: None,
        };
        match (relay.client.as_mut(), relay.resume.as_mut()) {
            (Some(client), _) => {
                if let Some(announce) = params.announce {
                    client.send_frame(opcode::TEXT, announce.as_bytes());
                }
            }
            // It may still come back.
            (None, Some(resume)) => {
                resume.start_detached();
                relay.mark_detached(true);
            }
            (None, None) => relay.begin_closing(Plan::vanished_during_upgrade()),
        }
        relay
    }

    fn poll_running(&mut self, cx: &mut Context<'_>) -> Poll<Plan> {
        if !self.shutdown_registered {
            if self.shutdown_wait.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Plan::shutdown());
            }
            self.shutdown_registered = true;
        } else if self.shutdown.is_cancelled() {
            return Poll::Ready(Plan::shutdown());
        }
        if let Some(registered) = &self.registered {
            let revoke = &registered.revoke;
            let on = if self.revoke_registered {
                revoke.is_on()
            } else {
                self.revoke_registered = true;
                revoke.register(cx.waker())
            };
            if on {
                return Poll::Ready(Plan::revoked());
            }
        }
        self.poll_attach(cx);
        for _ in 0..4 {
            let now = Instant::now();
            let moved = self.pump_up(cx, now).and_then(|()| self.pump_down(cx, now));
            if let Err((side, end)) = moved {
                match self.on_end(side, end) {
                    Some(plan) => return Poll::Ready(plan),
                    None => continue,
                }
            }
            if let Some(plan) = self.check_overflow().or_else(|| self.final_close_due()) {
                return Poll::Ready(plan);
            }
            // After the pumps: a write they found blocked starts a deadline, and the pings the
            // deadlines queue go out with the flush below.
            let next = match self.deadlines(now) {
                Ok(next) => next,
                Err(deadline) => match self.on_deadline(deadline) {
                    Some(plan) => return Poll::Ready(plan),
                    None => continue,
                },
            };
            if let Err((side, end)) = self.flush(cx, now) {
                match self.on_end(side, end) {
                    Some(plan) => return Poll::Ready(plan),
                    None => continue,
                }
            }
            if !self.arm_timer(next, cx) {
                self.note_traffic();
                return Poll::Pending;
            }
        }
        // Still busy: let other tasks run, then come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Arms the timer for `next` and reports whether it has already fired. The timer is only
    /// moved earlier: a later deadline lets it fire early and be re-armed then, which keeps
    /// the timer wheel out of the per-batch path.
    fn arm_timer(&mut self, next: Option<Instant>, cx: &mut Context<'_>) -> bool {
        let Some(next) = next else {
            self.timer_at = None;
            return false;
        };
        if self.timer_at.is_none_or(|at| next < at) {
            self.timer.as_mut().reset(next);
            self.timer_at = Some(next);
            // A poll registers the task's waker with the timer; it stays registered until
            // the timer fires, so until then a look at the timer is enough.
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
        } else if !self.timer.is_elapsed() {
            return false;
        }
        self.timer_at = None;
        true
    }

    /// Client → upstream.
    fn pump_up(&mut self, cx: &mut Context<'_>, now: Instant) -> Result<(), (Side, End)> {
        let Some(client) = self.client.as_mut() else {
            return Ok(());
        };
        // Without an upstream (a resumed session's ended while the client was away) the
        // client is still read while it takes the rest, for its pongs and its close.
        let before = self.up.messages;
        let outcome = Pump {
            source: client,
            dest: self.upstream.as_mut(),
            bucket: self.bucket.as_mut(),
            atomic: self.resume.is_some(),
            held_limit: held_limit(self.max_message),
            replay: None,
            replay_cap: None,
            traffic: &mut self.up,
            counters: &self.counters.client_to_upstream,
        }
        .run(cx, now);
        if self.up.messages != before {
            self.turns.client_spoke(now);
        }
        self.after_pump(Side::Client, outcome, now)
    }

    /// Upstream → client (and the replay buffer).
    fn pump_down(&mut self, cx: &mut Context<'_>, now: Instant) -> Result<(), (Side, End)> {
        let Some(upstream) = self.upstream.as_mut() else {
            return Ok(());
        };
        let attached = self.client.is_some();
        if !attached && self.resume.is_none() {
            return Ok(());
        }
        let (replay, replay_cap) = match self.resume.as_mut() {
            Some(resume) => {
                // A connected client's pongs make room; a detached session reads on and
                // ends when it overflows.
                let cap = attached.then(|| resume.bounds());
                (Some(resume.replay_mut()), cap)
            }
            None => (None, None),
        };
        let before = self.down.messages;
        let outcome = Pump {
            source: upstream,
            dest: self.client.as_mut(),
            bucket: None,
            atomic: false,
            held_limit: 0,
            replay,
            replay_cap,
            traffic: &mut self.down,
            counters: &self.counters.upstream_to_client,
        }
        .run(cx, now);
        if self.down.messages != before {
            self.turns.upstream_spoke(self.down.messages - before, now);
        }
        let passed = outcome.data;
        let result = self.after_pump(Side::Upstream, outcome, now);
        if let Some(resume) = self.resume.as_mut() {
            if passed {
                resume.publish();
            }
            // Ask the client what it has whenever something is kept for it, so that what it
            // has can be let go (and a full buffer makes room).
            if let Some(client) = self.client.as_mut()
                && client.ping().is_none()
                && resume.replay().bytes() > 0
            {
                client.send_ping(resume.replay().end());
            }
        }
        result
    }

    /// Answers pings, takes pongs, and turns the pump's end into the relay's.
    fn after_pump(
        &mut self,
        side: Side,
        outcome: Outcome,
        now: Instant,
    ) -> Result<(), (Side, End)> {
        if outcome.data {
            self.last_data = now;
        }
        let source = match side {
            Side::Client => self.client.as_mut(),
            Side::Upstream => self.upstream.as_mut(),
        };
        if let Some(source) = source {
            for ping in &outcome.pings {
                source.send_frame(opcode::PONG, ping);
            }
            if outcome.pong
                && let Some(Ping { payload, .. }) = source.take_ping()
                && side == Side::Client
                && let Some(resume) = self.resume.as_mut()
            {
                resume.acknowledge(payload);
            }
        }
        match outcome.end {
            Some(end) => Err((side, end)),
            None => Ok(()),
        }
    }

    /// Writes whatever is queued for either side.
    fn flush(&mut self, cx: &mut Context<'_>, now: Instant) -> Result<(), (Side, End)> {
        for side in [Side::Client, Side::Upstream] {
            let Some(leg) = self.leg_mut(side) else {
                continue;
            };
            if !leg.has_output() {
                continue;
            }
            if let Poll::Ready(Err(_)) = leg.poll_write_out(cx, now) {
                // Writing to this side failed: for the relay, the other side's destination.
                return Err((side.other(), End::DestinationLost));
            }
        }
        Ok(())
    }

    fn leg(&self, side: Side) -> Option<&Leg> {
        match side {
            Side::Client => self.client.as_ref(),
            Side::Upstream => self.upstream.as_ref(),
        }
    }

    fn leg_mut(&mut self, side: Side) -> Option<&mut Leg> {
        match side {
            Side::Client => self.client.as_mut(),
            Side::Upstream => self.upstream.as_mut(),
        }
    }

    /// Checks every deadline; returns the next one, or the one that passed.
    fn deadlines(&mut self, now: Instant) -> Result<Option<Instant>, Deadline> {
        let mut next = Next { now, at: None };
        if self.client.is_some()
            && let Some(at) = self.token_deadline
        {
            next.due(at, Deadline::TokenExpired)?;
        }
        if let Some(at) = self.session_deadline {
            next.due(at, Deadline::SessionLimit)?;
        }
        if let Some(idle) = self.lifecycle.idle_timeout {
            next.due(self.last_data + idle, Deadline::Idle)?;
        }
        if let Some(at) = self.resume.as_ref().and_then(|resume| resume.window_ends()) {
            next.due(at, Deadline::WindowPassed)?;
        }
        let pong_timeout = self.lifecycle.pong_timeout;
        // Without heartbeats a peer that reads nothing is still judged, over the default window.
        let interval = self
            .lifecycle
            .ping_interval
            .unwrap_or(STALL_WINDOW_WITHOUT_HEARTBEATS);
        for side in [Side::Client, Side::Upstream] {
            let Some(leg) = self.leg(side) else { continue };
            // While the edge holds off reading a side (the other is not taking what it
            // sends), its pong cannot be seen: judging it would blame the wrong peer. It gets
            // the whole timeout again once it is read (`Leg::resume_reading`).
            if !leg.read_held()
                && let Some(Ping {
                    sent: Some(sent), ..
                }) = leg.ping()
            {
                next.due(sent + pong_timeout, Deadline::Unresponsive(side))?;
            }
            // A side that reads nothing would have had a ping within the interval and the
            // pong timeout to answer it.
            if let Some(since) = leg.write_blocked_since() {
                next.due(
                    since + interval + pong_timeout,
                    Deadline::Unresponsive(side),
                )?;
            }
        }
        if let Some(at) = self.next_ping {
            if now >= at {
                // One ping at a time per side: an unanswered one is judged above.
                self.ping_serial += 1;
                let serial = self.ping_serial;
                let client_payload = match &self.resume {
                    Some(resume) => resume.replay().end(),
                    None => serial,
                };
                if let Some(client) = self.client.as_mut()
                    && client.ping().is_none()
                {
                    client.send_ping(client_payload);
                }
                if let Some(upstream) = self.upstream.as_mut()
                    && upstream.ping().is_none()
                {
                    upstream.send_ping(serial);
                }
                self.next_ping = Some(now + interval);
            }
            if let Some(at) = self.next_ping {
                next.later(at);
            }
        }
        // A turn whose answer has gone quiet ends, and held observations go out, on time
        // rather than at the connection's next message.
        if let Some(at) = self.turns.due_at() {
            if now >= at {
                self.turns.tick(now);
            }
            if let Some(at) = self.turns.due_at() {
                next.later(at);
            }
        }
        Ok(next.at)
    }

    fn on_deadline(&mut self, deadline: Deadline) -> Option<Plan> {
        if self.resume.is_some() {
            match deadline {
                Deadline::Unresponsive(Side::Client) => {
                    self.detach(
                        Finish::Send(EdgeClose::HeartbeatTimeout),
                        UNRESPONSIVE_CLOSE_TIMEOUT,
                        "client unresponsive",
                    );
                    return None;
                }
                Deadline::TokenExpired => {
                    // The client comes back with a fresh token and loses nothing.
                    self.detach(
                        Finish::Send(EdgeClose::TokenExpired),
                        CLOSE_TIMEOUT,
                        "token expired",
                    );
                    return None;
                }
                _ => {}
            }
        }
        Some(Plan::for_deadline(deadline))
    }

    fn on_end(&mut self, side: Side, end: End) -> Option<Plan> {
        if self.resume.is_some() {
            match (side, &end) {
                (Side::Client, End::Lost) | (Side::Upstream, End::DestinationLost)
                    if self.client.is_some() =>
                {
                    self.detach(Finish::Gone, CLOSE_TIMEOUT, "client lost");
                    return None;
                }
                (Side::Upstream, _) if self.client.is_none() => {
                    self.upstream_ended(end);
                    return None;
                }
                // The client may not have the last messages yet, though they left the edge:
                // its link can be dead without a sign. The close is passed on once it has
                // confirmed them, and a client lost before that comes back for the rest.
                (Side::Upstream, End::Closed(_)) => {
                    self.upstream_ended(end);
                    self.final_close = self.resume.as_mut()?.take_upstream_final();
                    return None;
                }
                _ => {}
            }
        }
        Some(Plan::for_end(side, end))
    }

    /// Takes the session's client out, undoing what it was in the middle of, so that the next
    /// client of the session (after a detach, or taking over) starts clean.
    fn let_client_go(&mut self) -> Option<Leg> {
        // A client that leaves in the middle of its replay leaves the rest, and the upstream's
        // close after it, to the next one.
        if let (Some(close), Some(resume)) = (self.final_close.take(), self.resume.as_mut()) {
            resume.upstream_ended(close);
        }
        // Half a client message never reaches the upstream: the next client's frames would
        // be read as its rest.
        if let Some(upstream) = self.upstream.as_mut() {
            upstream.drop_held();
        }
        self.client.take()
    }

    /// The client left without ending its session: keep the upstream for the window.
    fn detach(&mut self, finish: Finish, wait: Duration, why: &'static str) {
        if self.resume.is_none() {
            return;
        }
        if let Some(leg) = self.let_client_go() {
            self.tasks.spawn(close_leg(leg, finish, wait, true));
        }
        self.token_deadline = None;
        if let Some(resume) = self.resume.as_mut() {
            resume.detach(why);
        }
        self.mark_detached(true);
    }

    /// Writes the connection's byte counts down for the registry's listing.
    fn note_traffic(&self) {
        if let Some(registered) = &self.registered {
            use std::sync::atomic::Ordering::Relaxed;
            registered.bytes_in.store(self.up.bytes, Relaxed);
            registered.bytes_out.store(self.down.bytes, Relaxed);
        }
    }

    /// Tells the registry whether the client is away.
    fn mark_detached(&self, detached: bool) {
        if let Some(registered) = &self.registered {
            registered
                .detached
                .store(detached, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The session's upstream ended: remember how, to tell the client after the rest.
    fn upstream_ended(&mut self, end: End) {
        let Some(resume) = self.resume.as_mut() else {
            return;
        };
        let (finish, final_close) = crate::ws::close::upstream_ended_while_detached(end);
        if let Some(upstream) = self.upstream.take() {
            self.tasks
                .spawn(close_leg(upstream, finish, CLOSE_TIMEOUT, false));
        }
        resume.upstream_ended(final_close);
    }

    /// A detached session that has read past its bounds cannot be resumed any more.
    fn check_overflow(&mut self) -> Option<Plan> {
        let resume = self.resume.as_ref()?;
        (self.client.is_none() && resume.overflowed()).then(Plan::resume_overflowed)
    }

    /// Takes over clients that resume this session.
    fn poll_attach(&mut self, cx: &mut Context<'_>) {
        loop {
            let Some(attach) = self.resume.as_ref().and_then(|r| r.poll_arrival(cx)) else {
                return;
            };
            let Some(resume) = self.resume.as_ref() else {
                return;
            };
            let start = match resume.replay_start(&attach) {
                Ok(start) => start,
                Err(why) => {
                    self.tasks.spawn(close_not_resumable(attach.leg, why));
                    continue;
                }
            };
            let mut attach = *attach;
            if let Err(error) = attach.leg.rehome() {
                // Its socket is gone: the client it had (if any) stays, the session goes on.
                tracing::debug!(%error, "a resuming client's socket could not be moved to its session's thread");
                continue;
            }
            // The connection holds the token the client came back with (for the admin API's
            // listing, and for revocations by `jti`) once that client has it.
            if let Some(registered) = &self.registered {
                registered.set_token(std::mem::take(&mut attach.token));
            }
            let old = self.let_client_go();
            let took_over = old.is_some();
            if let Some(old) = old {
                self.tasks.spawn(close_leg(
                    old,
                    Finish::Send(EdgeClose::TakenOver),
                    CLOSE_TIMEOUT,
                    true,
                ));
            }
            let received = self.up.messages;
            let Some(resume) = self.resume.as_mut() else {
                return;
            };
            // (What the upstream is in the middle of reaches the new client as whole
            // frames: a message cut mid-frame goes on as fragments.)
            let attached = resume.attach(attach, start, received, took_over);
            self.client = Some(attached.leg);
            self.token_deadline = self.lifecycle.token_deadline(attached.token_expires_at);
            self.bucket = self.lifecycle.message_rate.map(TokenBucket::new);
            // The upstream ended while the client was away: the rest, then its close.
            self.final_close = resume.take_upstream_final();
            self.mark_detached(false);
        }
    }

    /// The client has confirmed everything an ended upstream left: pass on its close.
    fn final_close_due(&mut self) -> Option<Plan> {
        let client = self.client.as_mut()?;
        self.final_close.as_ref()?;
        if let Some(resume) = &self.resume
            && resume.replay().messages() > 0
        {
            // Written is not received: the close waits for the client to confirm the rest.
            if client.ping().is_none() {
                client.send_ping(resume.replay().end());
            }
            return None;
        }
        // What is still queued for the client (pongs) goes out before the close.
        Some(Plan::upstream_closed_after_replay(self.final_close.take()?))
    }

    fn begin_closing(&mut self, plan: Plan) {
        self.turns.end();
        let report = RelayReport {
            turns: self.turns.count(),
            ended_by: plan.ended_by,
            reason: plan.reason,
            detail: plan.detail,
            limit: plan.limit,
            client_close: self.client.as_ref().and(plan.to_client.code()),
            upstream_close: self.upstream.as_ref().and(plan.to_upstream.code()),
            client_to_upstream: self.up,
            upstream_to_client: self.down,
        };
        // A client on its way in is told, not dropped.
        if let Some(waiting) = self
            .resume
            .as_mut()
            .and_then(|resume| resume.end(plan.session))
        {
            self.tasks
                .spawn(close_not_resumable(waiting.leg, plan.session));
        }
        let wait = |side: Side| {
            if plan.unresponsive == Some(side) {
                UNRESPONSIVE_CLOSE_TIMEOUT
            } else {
                CLOSE_TIMEOUT
            }
        };
        let client = self
            .client
            .take()
            .map(|leg| close_leg(leg, plan.to_client, wait(Side::Client), true));
        let upstream = self
            .upstream
            .take()
            .map(|leg| close_leg(leg, plan.to_upstream, wait(Side::Upstream), false));
        // The two closes side by side, each stored once (an async block around each would
        // keep it twice).
        let closing = join(OptionFuture::from(client), OptionFuture::from(upstream)).map(drop);
        self.phase = Phase::Closing(Box::pin(closing), Box::new(report));
    }
}

impl Future for Relay {
    type Output = RelayReport;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RelayReport> {
        let this = self.get_mut();
        loop {
            match &mut this.phase {
                Phase::Running => match this.poll_running(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(plan) => this.begin_closing(plan),
                },
                Phase::Closing(closing, report) => {
                    std::task::ready!(closing.as_mut().poll(cx));
                    let report = (**report).clone();
                    this.phase = Phase::Done;
                    return Poll::Ready(report);
                }
                Phase::Done => return Poll::Pending,
            }
        }
    }
}

/// The earliest of the deadlines seen so far, or the first that has passed.
struct Next {
    now: Instant,
    at: Option<Instant>,
}

impl Next {
    fn due(&mut self, at: Instant, what: Deadline) -> Result<(), Deadline> {
        if self.now >= at {
            return Err(what);
        }
        self.later(at);
        Ok(())
    }

    fn later(&mut self, at: Instant) {
        self.at = Some(self.at.map_or(at, |next| next.min(at)));
    }
}
