//! The frame pump: frames both ways, in order, with backpressure; heartbeats, timeouts, token
//! expiry and the message rate; resumable sessions; and the closing of both sides with codes
//! that say what happened.
//!
//! One task owns both sockets of a connection and moves frames between them without decoding
//! them into messages (`frame.rs` reads what the edge must know as the bytes pass). Per
//! direction the edge holds what one read brought and what the destination has not taken yet;
//! once the destination holds 64 KiB unwritten, the pump stops reading its source and TCP
//! pushes back on the sender. No queue grows with what a peer does.
//!
//! Pings and pongs are per hop: each side's pings are answered by the edge and never forwarded
//! (forwarding would produce duplicate pongs); the edge pings each side itself. On a resumable
//! session the pongs also tell the edge what the client has received, so that a dropped
//! client can come back and get exactly the rest (`session.rs`).
//!
//! The relay is a hand-written future rather than an `async fn`: it is what every open
//! connection keeps in memory, most of them idle, and its size is the sum of its fields.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use futures_util::future::{OptionFuture, join};
use hyper::upgrade::OnUpgrade;
use serde_json::{Map, Value};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

use crate::Shared;
use crate::frame::{Close, opcode};
use crate::io::Io;
use crate::leg::{Finish, Leg, Ping, close_leg};
use crate::metrics::DirectionCounters;
use crate::pump::{End, Outcome, Pump, TokenBucket, held_limit};
use crate::session::{
    NotResumable, ReplayBuffer, ResumeSettings, SessionEntry, close_not_resumable,
};

/// Close codes the edge itself sends (PRODUCT.md).
pub mod codes {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const POLICY: u16 = 1008;
    pub const BAD_GATEWAY: u16 = 1014;
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// A reconnect named a session that cannot be resumed; the reason says why.
    pub const SESSION_NOT_RESUMABLE: u16 = 4002;
    /// Another connection resumed this one's session.
    pub const SESSION_TAKEN_OVER: u16 = 4003;
}

/// How long the edge waits for a peer to answer its close frame before dropping the socket.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the edge tries to deliver a close frame to a peer that stopped responding.
const UNRESPONSIVE_CLOSE_TIMEOUT: Duration = Duration::from_millis(500);
/// With heartbeats off, a side whose writes stay blocked this long (plus `pong_timeout`) is
/// still closed: turning pings off must not let a stalled reader hold its slots forever.
const STALL_WINDOW_WITHOUT_HEARTBEATS: Duration = Duration::from_secs(30);

/// A token bucket: `per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

/// The per-route rules of a connection's life after the upgrade.
#[derive(Debug, Clone, PartialEq)]
pub struct Lifecycle {
    /// The edge pings each side this often (`None`: no heartbeats).
    pub ping_interval: Option<Duration>,
    /// A side that has not answered a ping within this is closed.
    pub pong_timeout: Duration,
    /// No data message either way for this long closes both sides.
    pub idle_timeout: Option<Duration>,
    /// A session longer than this is closed.
    pub max_session: Option<Duration>,
    /// Close the client with 4001 when its token's `exp` (+ grace) passes.
    pub close_on_token_expiry: bool,
    pub token_expiry_grace: Duration,
    /// Client → upstream messages per connection.
    pub message_rate: Option<RateLimit>,
}

impl Default for Lifecycle {
    /// The defaults, and why: a 30 s ping keeps NAT and load-balancer mappings alive (most
    /// drop idle flows after 60–350 s) and finds a vanished phone within 40 s; an idle chat tab
    /// is legitimate, so there is no idle or session limit unless a route asks; 100 messages/s
    /// with a burst of 200 is far above a person typing and below a runaway client loop.
    fn default() -> Self {
        Self {
            ping_interval: Some(Duration::from_secs(30)),
            pong_timeout: Duration::from_secs(10),
            idle_timeout: None,
            max_session: None,
            close_on_token_expiry: true,
            token_expiry_grace: Duration::ZERO,
            message_rate: Some(RateLimit {
                per_second: 100.0,
                burst: 200,
            }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }
}

/// What the deadlines decided.
#[derive(Debug)]
enum Deadline {
    /// A side did not answer a ping, or read nothing, in time.
    Unresponsive(Side),
    Idle,
    SessionLimit,
    TokenExpired,
    /// A detached session's client did not come back in time.
    WindowPassed,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Traffic {
    pub messages: u64,
    pub bytes: u64,
}

/// What happened to a relayed connection, for logs and metrics.
#[derive(Debug, Clone)]
pub struct RelayReport {
    /// The side whose action ended the session (`None` when the edge ended it).
    pub ended_by: Option<Side>,
    /// A short reason: "client closed", "upstream lost", "token expired", …
    pub reason: &'static str,
    /// The close code sent to (or passed on to) the client, if any.
    pub client_close: Option<u16>,
    /// The close code sent to (or passed on to) the upstream, if any.
    pub upstream_close: Option<u16>,
    pub client_to_upstream: Traffic,
    pub upstream_to_client: Traffic,
    /// The limit that ended the session, for `wsedge_limit_hits_total`.
    pub limit: Option<&'static str>,
}

/// The metric counters of one connection, resolved before the relay starts.
pub struct Counters {
    pub client_to_upstream: DirectionCounters,
    pub upstream_to_client: DirectionCounters,
}

/// What a resumable session keeps beside the relay (boxed: other routes do not pay for it).
pub struct Resumable {
    pub settings: ResumeSettings,
    pub entry: Arc<SessionEntry>,
    pub shared: Arc<Shared>,
    pub route: String,
    /// Audit fields naming the session's owner (only when an audit log is written).
    pub audit_fields: Option<Map<String, Value>>,
    replay: ReplayBuffer,
    detached_since: Option<Instant>,
    /// How the upstream ended while the client was away: passed on after the replay.
    upstream_final: Option<Close>,
    /// What the buffer gauges were last moved to.
    gauged: (i64, i64),
    /// What a detached session may hold before it has to drop something: the bounds, or what
    /// it already held when its client left (a connected client's buffer can pass the bounds
    /// by what one read brought, and nothing of that is lost yet).
    allowance: (usize, usize),
}

impl Resumable {
    pub fn new(
        settings: ResumeSettings,
        entry: Arc<SessionEntry>,
        shared: Arc<Shared>,
        route: String,
        audit_fields: Option<Map<String, Value>>,
    ) -> Self {
        Self {
            settings,
            entry,
            shared,
            route,
            audit_fields,
            replay: ReplayBuffer::default(),
            detached_since: None,
            upstream_final: None,
            gauged: (0, 0),
            allowance: (0, 0),
        }
    }

    fn allow_detached(&mut self) {
        self.allowance = (
            self.settings.max_messages.max(self.replay.messages()),
            self.settings.max_bytes.max(self.replay.bytes()),
        );
    }

    /// Tells handshakes and the buffer gauges what the replay buffer holds now.
    fn publish(&mut self) {
        self.entry.publish(&self.replay);
        let now = (self.replay.messages() as i64, self.replay.bytes() as i64);
        self.move_gauges(now);
    }

    fn move_gauges(&mut self, to: (i64, i64)) {
        let metrics = &self.shared.metrics;
        metrics
            .resume_buffered_messages
            .inc_by(to.0 - self.gauged.0);
        metrics.resume_buffered_bytes.inc_by(to.1 - self.gauged.1);
        self.gauged = to;
    }

    fn audit(&self, event: &'static str, add: impl FnOnce(&mut Map<String, Value>)) {
        if let Some(fields) = &self.audit_fields {
            let mut fields = fields.clone();
            add(&mut fields);
            self.shared.audit.record(event, fields);
        }
    }
}

/// What a relay is given besides its sockets.
pub struct RelayParams {
    pub lifecycle: Lifecycle,
    pub max_message: usize,
    pub token_expires_at: Option<SystemTime>,
    pub counters: Counters,
    pub shutdown: CancellationToken,
    /// Where legs that leave a continuing session are closed.
    pub tasks: TaskTracker,
    pub resume: Option<Box<Resumable>>,
    /// A first message for the client (the `edge.session` announcement).
    pub announce: Option<String>,
}

enum Phase {
    /// Waiting for hyper to hand over the client's socket after the 101.
    Upgrading(OnUpgrade),
    Running,
    Closing(Pin<Box<dyn Future<Output = ()> + Send>>, Box<RelayReport>),
    Done,
}

/// One proxied connection (a session, when resumable) from the 101 to the last close.
pub struct Relay {
    phase: Phase,
    client: Option<Leg>,
    upstream: Option<Leg>,
    lifecycle: Lifecycle,
    max_message: usize,
    announce: Option<String>,
    shutdown: CancellationToken,
    /// Registers the task to be woken when `shutdown` is cancelled. Polled once: the
    /// registration lasts as long as the future is kept, and after that a look at the token
    /// is enough.
    shutdown_wait: Pin<Box<WaitForCancellationFutureOwned>>,
    shutdown_registered: bool,
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

/// An `exp` centuries away (some issuers mint "never expires" tokens) is no deadline; it must
/// neither overflow the clock arithmetic nor wrap around to "now".
fn token_deadline(lifecycle: &Lifecycle, expires_at: Option<SystemTime>) -> Option<Instant> {
    let exp = expires_at.filter(|_| lifecycle.close_on_token_expiry)?;
    let remaining = exp
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Instant::now().checked_add(remaining.checked_add(lifecycle.token_expiry_grace)?)
}

impl Relay {
    pub fn new(upstream: Leg, on_upgrade: OnUpgrade, params: RelayParams) -> Self {
        let now = Instant::now();
        let lifecycle = params.lifecycle;
        Self {
            phase: Phase::Upgrading(on_upgrade),
            client: None,
            upstream: Some(upstream),
            token_deadline: token_deadline(&lifecycle, params.token_expires_at),
            session_deadline: lifecycle.max_session.and_then(|max| now.checked_add(max)),
            next_ping: lifecycle.ping_interval.map(|interval| now + interval),
            bucket: lifecycle.message_rate.map(TokenBucket::new),
            lifecycle,
            max_message: params.max_message,
            announce: params.announce,
            shutdown_wait: Box::pin(params.shutdown.clone().cancelled_owned()),
            shutdown_registered: false,
            shutdown: params.shutdown,
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
        }
    }

    fn begin(&mut self, upgraded: Result<hyper::upgrade::Upgraded, hyper::Error>) {
        self.phase = Phase::Running;
        match upgraded {
            Ok(upgraded) => {
                let (io, initial) = Io::from_upgraded(upgraded);
                let mut leg = Leg::client(io, &initial, self.max_message);
                if let Some(announce) = self.announce.take() {
                    leg.send_frame(opcode::TEXT, announce.as_bytes());
                }
                self.client = Some(leg);
            }
            Err(error) => {
                tracing::debug!(%error, "client vanished during the upgrade");
                match self.resume.as_mut() {
                    // It may still come back.
                    Some(resume) => {
                        resume.detached_since = Some(Instant::now());
                        resume.allow_detached();
                        resume.shared.metrics.sessions_detached.inc();
                    }
                    None => self.begin_closing(Plan {
                        to_client: Finish::Gone,
                        to_upstream: close(codes::GOING_AWAY, "client went away"),
                        ended_by: Some(Side::Client),
                        reason: "client vanished during the upgrade",
                        unresponsive: None,
                        limit: None,
                        session: NotResumable::Closed,
                    }),
                }
            }
        }
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
            Some(resume) => (
                Some(&mut resume.replay),
                // A connected client's pongs make room; a detached session reads on and
                // ends when it overflows.
                attached.then_some((resume.settings.max_messages, resume.settings.max_bytes)),
            ),
            None => (None, None),
        };
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
        let passed = outcome.data;
        let result = self.after_pump(Side::Upstream, outcome, now);
        if let Some(resume) = self.resume.as_mut() {
            if passed {
                resume.publish();
            }
            // Ask the client what it has whenever something is kept for it, so that what it
            // has can be let go (and a full buffer makes room).
            if let Some(client) = self.client.as_mut()
                && client.ping.is_none()
                && resume.replay.bytes() > 0
            {
                client.send_ping(resume.replay.end());
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
                && let Some(payload) = source.ping.take().map(|ping| ping.payload)
                && side == Side::Client
                && let Some(resume) = self.resume.as_mut()
            {
                resume.replay.acknowledge(payload);
                resume.publish();
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
            let leg = match side {
                Side::Client => self.client.as_mut(),
                Side::Upstream => self.upstream.as_mut(),
            };
            let Some(leg) = leg else { continue };
            if !leg.has_output() {
                continue;
            }
            if let Poll::Ready(Err(_)) = leg.poll_write_out(cx, now) {
                // Writing to this side failed: for the relay, the other side's destination.
                let source = match side {
                    Side::Client => Side::Upstream,
                    Side::Upstream => Side::Client,
                };
                return Err((source, End::DestinationLost));
            }
        }
        Ok(())
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
        if let Some(resume) = &self.resume
            && let Some(since) = resume.detached_since
        {
            next.due(since + resume.settings.window, Deadline::WindowPassed)?;
        }
        let pong_timeout = self.lifecycle.pong_timeout;
        // Without heartbeats a peer that reads nothing is still judged, over the default window.
        let interval = self
            .lifecycle
            .ping_interval
            .unwrap_or(STALL_WINDOW_WITHOUT_HEARTBEATS);
        for side in [Side::Client, Side::Upstream] {
            let leg = match side {
                Side::Client => self.client.as_ref(),
                Side::Upstream => self.upstream.as_ref(),
            };
            let Some(leg) = leg else { continue };
            // While the edge holds off reading a side (the other is not taking what it
            // sends), its pong cannot be seen: judging it would blame the wrong peer. It gets
            // the whole timeout again once it is read (`Leg::resume_reading`).
            if !leg.read_held
                && let Some(Ping {
                    sent: Some(sent), ..
                }) = leg.ping
            {
                next.due(sent + pong_timeout, Deadline::Unresponsive(side))?;
            }
            // A side that reads nothing would have had a ping within the interval and the
            // pong timeout to answer it.
            if let Some(since) = leg.write_blocked_since {
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
                    Some(resume) => resume.replay.end(),
                    None => serial,
                };
                if let Some(client) = self.client.as_mut()
                    && client.ping.is_none()
                {
                    client.send_ping(client_payload);
                }
                if let Some(upstream) = self.upstream.as_mut()
                    && upstream.ping.is_none()
                {
                    upstream.send_ping(serial);
                }
                self.next_ping = Some(now + interval);
            }
            if let Some(at) = self.next_ping {
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
                        close(codes::GOING_AWAY, "heartbeat timeout"),
                        UNRESPONSIVE_CLOSE_TIMEOUT,
                        "client unresponsive",
                    );
                    return None;
                }
                Deadline::TokenExpired => {
                    // The client comes back with a fresh token and loses nothing.
                    self.detach(
                        close(codes::TOKEN_EXPIRED, "token expired"),
                        CLOSE_TIMEOUT,
                        "token expired",
                    );
                    return None;
                }
                _ => {}
            }
        }
        Some(plan_for_deadline(deadline))
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
                    self.final_close = self.resume.as_mut()?.upstream_final.take();
                    return None;
                }
                _ => {}
            }
        }
        Some(plan_for_end(side, end))
    }

    /// Takes the session's client out, undoing what it was in the middle of, so that the next
    /// client of the session (after a detach, or taking over) starts clean.
    fn let_client_go(
        client: &mut Option<Leg>,
        upstream: &mut Option<Leg>,
        final_close: &mut Option<Close>,
        resume: &mut Resumable,
    ) -> Option<Leg> {
        // A client that leaves in the middle of its replay leaves the rest, and the upstream's
        // close after it, to the next one.
        if let Some(close) = final_close.take() {
            resume.upstream_final = Some(close);
        }
        // Half a client message never reaches the upstream: the next client's frames would
        // be read as its rest.
        if let Some(upstream) = upstream.as_mut() {
            upstream.drop_held();
        }
        client.take()
    }

    /// The client left without ending its session: keep the upstream for the window.
    fn detach(&mut self, finish: Finish, wait: Duration, why: &'static str) {
        let Some(resume) = self.resume.as_mut() else {
            return;
        };
        if let Some(leg) = Self::let_client_go(
            &mut self.client,
            &mut self.upstream,
            &mut self.final_close,
            resume,
        ) {
            self.tasks.spawn(close_leg(leg, finish, wait, true));
        }
        self.token_deadline = None;
        resume.detached_since = Some(Instant::now());
        resume.allow_detached();
        resume.shared.metrics.sessions_detached.inc();
        tracing::info!(
            route = %resume.route,
            session = %resume.entry.key.id,
            reason = why,
            buffered = resume.replay.messages(),
            "client detached; session kept"
        );
        resume.audit("detach", |fields| {
            fields.insert("reason".into(), why.into());
        });
    }

    /// The session's upstream ended: remember how, to tell the client after the rest.
    fn upstream_ended(&mut self, end: End) {
        let Some(resume) = self.resume.as_mut() else {
            return;
        };
        let (finish, final_close) = match end {
            End::Closed(close) => (Finish::Answer(close.clone()), close),
            End::Violation(error) => (
                Finish::Close(Close::new(error.code, error.reason)),
                Close::new(codes::BAD_GATEWAY, "upstream failed"),
            ),
            End::Lost | End::DestinationLost | End::RateLimited => (
                Finish::Gone,
                Close::new(codes::BAD_GATEWAY, "upstream failed"),
            ),
        };
        if let Some(upstream) = self.upstream.take() {
            self.tasks
                .spawn(close_leg(upstream, finish, CLOSE_TIMEOUT, false));
        }
        resume.upstream_final = Some(final_close);
    }

    /// A detached session that has read past its bounds cannot be resumed any more.
    fn check_overflow(&mut self) -> Option<Plan> {
        let resume = self.resume.as_ref()?;
        if self.client.is_some() {
            return None;
        }
        let (messages, bytes) = resume.allowance;
        let over = resume.replay.messages() > messages || resume.replay.bytes() > bytes;
        over.then(|| Plan {
            to_client: Finish::Gone,
            to_upstream: close(codes::GOING_AWAY, "client went away"),
            ended_by: None,
            reason: "resume buffer overflowed",
            unresponsive: None,
            limit: Some("resume_buffer"),
            session: NotResumable::Overflowed,
        })
    }

    /// Takes over clients that resume this session.
    fn poll_attach(&mut self, cx: &mut Context<'_>) {
        loop {
            let Some(resume) = self.resume.as_mut() else {
                return;
            };
            let Some(attach) = resume.entry.poll_take(cx) else {
                return;
            };
            let start = match resume.replay.replay_start(attach.last_seq) {
                Ok(start) => start,
                Err(why) => {
                    resume.shared.metrics.resume(&resume.route, why.label());
                    tracing::info!(request_id = %attach.request_id, session = %resume.entry.key.id, reason = why.reason(), "resume refused");
                    self.tasks.spawn(close_not_resumable(attach.leg, why));
                    continue;
                }
            };
            if let Some(old) = Self::let_client_go(
                &mut self.client,
                &mut self.upstream,
                &mut self.final_close,
                resume,
            ) {
                self.tasks.spawn(close_leg(
                    old,
                    close(codes::SESSION_TAKEN_OVER, "session taken over"),
                    CLOSE_TIMEOUT,
                    true,
                ));
            } else {
                resume.shared.metrics.sessions_detached.dec();
            }
            let metrics = &resume.shared.metrics;
            let mut leg = attach.leg;
            let mut replay = Vec::new();
            // After an upstream that ended mid-message only whole messages are replayed: its
            // close must not land inside a frame.
            let end = match &resume.upstream_final {
                Some(_) => resume.replay.complete_end().max(start),
                None => resume.replay.end(),
            };
            let replayed = resume.replay.copy_range(start, end, &mut replay);
            let received = self.up.messages;
            if resume.settings.announce {
                let announce = serde_json::json!({
                    "type": "edge.session",
                    "session_id": resume.entry.key.id,
                    "resumed": true,
                    "replayed": replayed,
                    "received": received,
                });
                leg.send_frame(opcode::TEXT, announce.to_string().as_bytes());
            }
            leg.push_data(&replay);
            leg.set_mid_frame(
                self.upstream
                    .as_ref()
                    .is_some_and(|upstream| upstream.reader.mid_frame()),
            );
            metrics.resume(&resume.route, "resumed");
            tracing::info!(
                request_id = %attach.request_id,
                session = %resume.entry.key.id,
                last_seq = attach.last_seq,
                replayed,
                "session resumed"
            );
            resume.audit("resume", |fields| {
                fields.insert("request_id".into(), attach.request_id.clone().into());
                fields.insert("last_seq".into(), attach.last_seq.into());
                fields.insert("replayed".into(), replayed.into());
            });
            resume.detached_since = None;
            self.client = Some(leg);
            self.token_deadline = token_deadline(&self.lifecycle, attach.token_expires_at);
            self.bucket = self.lifecycle.message_rate.map(TokenBucket::new);
            // The upstream ended while the client was away: the rest, then its close.
            self.final_close = resume.upstream_final.take();
        }
    }

    /// The client has confirmed everything an ended upstream left: pass on its close.
    fn final_close_due(&mut self) -> Option<Plan> {
        let client = self.client.as_mut()?;
        self.final_close.as_ref()?;
        if let Some(resume) = &self.resume
            && resume.replay.messages() > 0
        {
            // Written is not received: the close waits for the client to confirm the rest.
            if client.ping.is_none() {
                client.send_ping(resume.replay.end());
            }
            return None;
        }
        // What is still queued for the client (pongs) goes out before the close.
        Some(Plan {
            to_client: Finish::Close(self.final_close.take()?),
            to_upstream: Finish::Gone,
            ended_by: Some(Side::Upstream),
            reason: "upstream closed",
            unresponsive: None,
            limit: None,
            session: NotResumable::Closed,
        })
    }

    fn begin_closing(&mut self, plan: Plan) {
        let report = RelayReport {
            ended_by: plan.ended_by,
            reason: plan.reason,
            limit: plan.limit,
            client_close: self.client.as_ref().and(plan.to_client.code()),
            upstream_close: self.upstream.as_ref().and(plan.to_upstream.code()),
            client_to_upstream: self.up,
            upstream_to_client: self.down,
        };
        if let Some(resume) = self.resume.as_mut() {
            resume.shared.registry.end(&resume.entry, plan.session);
            // A client on its way in is told, not dropped.
            if let Some(waiting) = resume.entry.close() {
                self.tasks
                    .spawn(close_not_resumable(waiting.leg, plan.session));
            }
            if resume.detached_since.is_some() {
                resume.shared.metrics.sessions_detached.dec();
            }
            resume.move_gauges((0, 0));
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
        // keep it twice: 5.4 KiB per connection end instead of 1.8).
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
                Phase::Upgrading(on_upgrade) => {
                    let upgraded = std::task::ready!(Pin::new(on_upgrade).poll(cx));
                    this.begin(upgraded);
                }
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

fn close(code: u16, reason: &'static str) -> Finish {
    Finish::Close(Close::new(code, reason))
}

struct Plan {
    to_client: Finish,
    to_upstream: Finish,
    ended_by: Option<Side>,
    reason: &'static str,
    unresponsive: Option<Side>,
    limit: Option<&'static str>,
    /// What a client that tries to resume this session afterwards is told.
    session: NotResumable,
}

impl Plan {
    fn shutdown() -> Self {
        Plan {
            to_client: close(codes::GOING_AWAY, "edge shutting down"),
            to_upstream: close(codes::GOING_AWAY, "edge shutting down"),
            ended_by: None,
            reason: "edge shutting down",
            unresponsive: None,
            limit: None,
            session: NotResumable::Closed,
        }
    }
}

fn plan_for_end(side: Side, end: End) -> Plan {
    use codes::*;
    let limit = match &end {
        End::Violation(error) if error.code == 1009 => Some("max_message_size"),
        End::RateLimited => Some("message_rate"),
        _ => None,
    };
    let (to_source, to_other, reason) = match (side, end) {
        (Side::Client, End::Closed(frame)) => (
            Finish::Answer(frame.clone()),
            Finish::Close(frame),
            "client closed",
        ),
        (Side::Upstream, End::Closed(frame)) => (
            Finish::Answer(frame.clone()),
            Finish::Close(frame),
            "upstream closed",
        ),
        (Side::Client, End::Lost) => (
            Finish::Gone,
            close(GOING_AWAY, "client went away"),
            "client lost",
        ),
        (Side::Upstream, End::Lost) => (
            Finish::Gone,
            close(BAD_GATEWAY, "upstream failed"),
            "upstream lost",
        ),
        (Side::Client, End::Violation(error)) => (
            Finish::Close(Close::new(error.code, error.reason)),
            close(GOING_AWAY, "client went away"),
            if error.code == 1009 {
                "client message too big"
            } else {
                "client protocol error"
            },
        ),
        (Side::Upstream, End::Violation(error)) => (
            Finish::Close(Close::new(error.code, error.reason)),
            close(BAD_GATEWAY, "upstream failed"),
            if error.code == 1009 {
                "upstream message too big"
            } else {
                "upstream protocol error"
            },
        ),
        // The destination is gone: tell the source why, as if the destination had been lost.
        (Side::Client, End::DestinationLost) => (
            close(BAD_GATEWAY, "upstream failed"),
            Finish::Gone,
            "upstream lost",
        ),
        (Side::Upstream, End::DestinationLost) => (
            close(GOING_AWAY, "client went away"),
            Finish::Gone,
            "client lost",
        ),
        (_, End::RateLimited) => (
            close(POLICY, "message rate exceeded"),
            close(GOING_AWAY, "client went away"),
            "client message rate exceeded",
        ),
    };
    let (to_client, to_upstream) = match side {
        Side::Client => (to_source, to_other),
        Side::Upstream => (to_other, to_source),
    };
    Plan {
        to_client,
        to_upstream,
        ended_by: Some(side),
        reason,
        unresponsive: None,
        limit,
        session: NotResumable::Closed,
    }
}

fn plan_for_deadline(deadline: Deadline) -> Plan {
    use codes::*;
    let limit = match deadline {
        Deadline::Idle => Some("idle_timeout"),
        Deadline::SessionLimit => Some("max_session"),
        _ => None,
    };
    let mut session = NotResumable::Closed;
    let (to_client, to_upstream, reason, unresponsive) = match deadline {
        Deadline::Unresponsive(Side::Client) => (
            close(GOING_AWAY, "heartbeat timeout"),
            close(GOING_AWAY, "client went away"),
            "client unresponsive",
            Some(Side::Client),
        ),
        Deadline::Unresponsive(Side::Upstream) => (
            close(BAD_GATEWAY, "upstream not responding"),
            close(GOING_AWAY, "heartbeat timeout"),
            "upstream unresponsive",
            Some(Side::Upstream),
        ),
        Deadline::Idle => (
            close(GOING_AWAY, "idle timeout"),
            close(GOING_AWAY, "idle timeout"),
            "idle timeout",
            None,
        ),
        Deadline::SessionLimit => (
            close(GOING_AWAY, "session time limit"),
            close(GOING_AWAY, "session time limit"),
            "session time limit",
            None,
        ),
        Deadline::TokenExpired => (
            close(TOKEN_EXPIRED, "token expired"),
            close(NORMAL, "token expired"),
            "token expired",
            None,
        ),
        Deadline::WindowPassed => {
            session = NotResumable::Expired;
            (
                Finish::Gone,
                close(GOING_AWAY, "client went away"),
                "resume window passed",
                None,
            )
        }
    };
    Plan {
        to_client,
        to_upstream,
        ended_by: None,
        reason,
        unresponsive,
        limit,
        session,
    }
}
