//! The frame pump: messages both ways, in order, with backpressure; heartbeats, timeouts,
//! token expiry and the message rate; and the closing of both sides with codes that say what
//! happened.
//!
//! Each direction reads from one socket and writes to the other with no queue in between:
//! when the reader of one side is slow, its writes stall, the pump stops reading the other
//! side, and TCP pushes back on the sender. What the edge holds per direction is bounded by
//! one message, tungstenite's buffers and the read chunk under it (`io.rs`). Whatever is already readable is fed before a
//! single flush, so a burst of LLM tokens costs one write, not one per token.
//!
//! Pings and pongs are per hop: tungstenite answers each side's pings itself, the pump never
//! forwards control frames (forwarding would produce duplicate pongs), and the edge sends its
//! own pings to each side. A watchdog future beside the two pumps owns every deadline.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

use crate::metrics::DirectionCounters;

/// Close codes the edge itself sends (PRODUCT.md).
pub mod codes {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const BAD_GATEWAY: u16 = 1014;
    pub const TOKEN_EXPIRED: u16 = 4001;
}

/// How long the edge waits for a peer to answer its close frame before dropping the socket.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the edge tries to deliver a close frame to a peer that stopped responding.
const UNRESPONSIVE_CLOSE_TIMEOUT: Duration = Duration::from_millis(500);
/// With heartbeats off, a side whose writes stay blocked this long (plus `pong_timeout`) is
/// still closed: turning pings off must not let a stalled reader hold its slots forever.
const STALL_WINDOW_WITHOUT_HEARTBEATS: Duration = Duration::from_secs(30);
/// A batch of messages fed before one flush is cut at this many messages or bytes, so that a
/// source that is always ready cannot delay delivery or starve the heartbeat.
const BATCH_MESSAGES: usize = 1024;
const BATCH_BYTES: usize = 256 * 1024;

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

    fn index(self) -> usize {
        match self {
            Side::Client => 0,
            Side::Upstream => 1,
        }
    }
}

/// Why the relay stopped.
#[derive(Debug)]
enum End {
    /// The source sent a close frame (passed on to the other side).
    Closed(Option<CloseFrame>),
    /// The source's connection went away without a close frame.
    Lost,
    /// The source sent a message over the size limit.
    TooBig,
    /// The source broke the protocol; the code to close it with.
    Protocol(u16),
    /// Writing to the destination failed: the destination is gone.
    DestinationLost,
    /// The client sent faster than `message_rate`.
    RateLimited,
}

/// What the watchdog decided.
#[derive(Debug)]
enum Deadline {
    /// A side did not answer a ping, or read nothing, in time.
    Unresponsive(Side),
    Idle,
    SessionLimit,
    TokenExpired,
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

/// Timestamps shared by the two pumps and the watchdog, in ms since the relay started (+1, so
/// that 0 means "none"). Atomics only so that the futures are `Send`; nothing contends.
struct Liveness {
    start: Instant,
    /// Per side: when an unanswered ping was sent.
    ping_outstanding: [AtomicU64; 2],
    /// Per side: the watchdog asks the pump writing to that side to send a ping. The pumps run
    /// in the watchdog's task, so a flag and a self-wake replace a timer in each pump.
    ping_due: [AtomicBool; 2],
    /// Per side: since when a write to it has been blocked.
    write_blocked: [AtomicU64; 2],
    /// The last data message either way.
    last_data: AtomicU64,
}

impl Liveness {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            ping_outstanding: [AtomicU64::new(0), AtomicU64::new(0)],
            ping_due: [AtomicBool::new(false), AtomicBool::new(false)],
            write_blocked: [AtomicU64::new(0), AtomicU64::new(0)],
            last_data: AtomicU64::new(1),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64 + 1
    }

    fn at(&self, since_start: Duration) -> u64 {
        since_start.as_millis() as u64 + 1
    }

    fn get(slot: &AtomicU64) -> Option<u64> {
        Some(slot.load(Ordering::Relaxed)).filter(|&t| t != 0)
    }
}

fn frame(code: u16, reason: &'static str) -> Option<CloseFrame> {
    Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    })
}

fn code_of(frame: &Option<CloseFrame>) -> Option<u16> {
    frame.as_ref().map(|f| u16::from(f.code))
}

/// How to end one side.
enum Finish {
    /// The connection is gone: nothing to send or wait for.
    Gone,
    /// It sent its close, which tungstenite answered: wait for the end.
    Drain,
    /// Send this close (a frame without a code when `None`), then wait for the answer.
    Close(Option<CloseFrame>),
}

impl Finish {
    fn code(&self) -> Option<u16> {
        match self {
            Finish::Close(close) => code_of(close),
            Finish::Gone | Finish::Drain => None,
        }
    }
}

fn close(code: u16, reason: &'static str) -> Finish {
    Finish::Close(frame(code, reason))
}

struct Plan {
    to_client: Finish,
    to_upstream: Finish,
    ended_by: Option<Side>,
    reason: &'static str,
    unresponsive: Option<Side>,
    limit: Option<&'static str>,
}

fn plan_for_end(side: Side, end: End) -> Plan {
    use Finish::{Drain, Gone};
    use codes::*;
    let limit = match end {
        End::TooBig => Some("max_message_size"),
        End::RateLimited => Some("message_rate"),
        _ => None,
    };
    let (to_source, to_other, reason) = match (side, end) {
        (Side::Client, End::Closed(frame)) => (Drain, Finish::Close(frame), "client closed"),
        (Side::Upstream, End::Closed(frame)) => (Drain, Finish::Close(frame), "upstream closed"),
        (Side::Client, End::Lost) => (Gone, close(GOING_AWAY, "client went away"), "client lost"),
        (Side::Upstream, End::Lost) => {
            (Gone, close(BAD_GATEWAY, "upstream failed"), "upstream lost")
        }
        (Side::Client, End::TooBig) => (
            close(TOO_BIG, "message too big"),
            close(GOING_AWAY, "client went away"),
            "client message too big",
        ),
        (Side::Upstream, End::TooBig) => (
            close(TOO_BIG, "message too big"),
            close(BAD_GATEWAY, "upstream failed"),
            "upstream message too big",
        ),
        (Side::Client, End::Protocol(code)) => (
            close(code, "protocol error"),
            close(GOING_AWAY, "client went away"),
            "client protocol error",
        ),
        (Side::Upstream, End::Protocol(code)) => (
            close(code, "protocol error"),
            close(BAD_GATEWAY, "upstream failed"),
            "upstream protocol error",
        ),
        // The destination is gone: tell the source why, as if the destination had been lost.
        (Side::Client, End::DestinationLost) => {
            (close(BAD_GATEWAY, "upstream failed"), Gone, "upstream lost")
        }
        (Side::Upstream, End::DestinationLost) => {
            (close(GOING_AWAY, "client went away"), Gone, "client lost")
        }
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
    }
}

fn plan_for_deadline(deadline: Deadline) -> Plan {
    use codes::*;
    let limit = match deadline {
        Deadline::Idle => Some("idle_timeout"),
        Deadline::SessionLimit => Some("max_session"),
        _ => None,
    };
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
    };
    Plan {
        to_client,
        to_upstream,
        ended_by: None,
        reason,
        unresponsive,
        limit,
    }
}

/// Relays until either side ends, a deadline passes, or `shutdown` fires; then closes both.
/// `token_expires_at` is the token's `exp` (ignored unless the lifecycle closes on expiry).
///
/// Not an `async fn`: the streams are split before the future is built, so the future holds
/// only the halves. Every byte of it is kept for each open connection, most of which are idle.
pub fn relay<C, U>(
    client: WebSocketStream<C>,
    upstream: WebSocketStream<U>,
    lifecycle: Lifecycle,
    token_expires_at: Option<SystemTime>,
    counters: Counters,
    shutdown: CancellationToken,
) -> impl Future<Output = RelayReport> + Send
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
    U: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (client_tx, client_rx) = client.split();
    let (upstream_tx, upstream_rx) = upstream.split();
    run_relay(
        (client_tx, client_rx),
        (upstream_tx, upstream_rx),
        lifecycle,
        token_expires_at,
        counters,
        shutdown,
    )
}

type Halves<S> = (
    futures_util::stream::SplitSink<WebSocketStream<S>, Message>,
    futures_util::stream::SplitStream<WebSocketStream<S>>,
);

async fn run_relay<C, U>(
    (mut client_tx, mut client_rx): Halves<C>,
    (mut upstream_tx, mut upstream_rx): Halves<U>,
    lifecycle: Lifecycle,
    token_expires_at: Option<SystemTime>,
    counters: Counters,
    shutdown: CancellationToken,
) -> RelayReport
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let lifecycle = &lifecycle;
    let mut up = Traffic::default();
    let mut down = Traffic::default();
    let liveness = Liveness::new();
    let token_deadline = token_expires_at
        .filter(|_| lifecycle.close_on_token_expiry)
        .map(|exp| {
            let remaining = exp
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            liveness.at(liveness.start.elapsed() + remaining + lifecycle.token_expiry_grace)
        });

    let plan = {
        let client_to_upstream = pump(
            &mut client_rx,
            &mut upstream_tx,
            Side::Client,
            &liveness,
            lifecycle,
            &mut up,
            &counters.client_to_upstream,
        );
        let upstream_to_client = pump(
            &mut upstream_rx,
            &mut client_tx,
            Side::Upstream,
            &liveness,
            lifecycle,
            &mut down,
            &counters.upstream_to_client,
        );
        let deadlines = watchdog(&liveness, lifecycle, token_deadline);
        tokio::select! {
            end = client_to_upstream => plan_for_end(Side::Client, end),
            end = upstream_to_client => plan_for_end(Side::Upstream, end),
            deadline = deadlines => plan_for_deadline(deadline),
            () = shutdown.cancelled() => Plan {
                to_client: close(codes::GOING_AWAY, "edge shutting down"),
                to_upstream: close(codes::GOING_AWAY, "edge shutting down"),
                ended_by: None,
                reason: "edge shutting down",
                limit: None,
                unresponsive: None,
            },
        }
    };

    let report = RelayReport {
        ended_by: plan.ended_by,
        reason: plan.reason,
        limit: plan.limit,
        client_close: plan.to_client.code(),
        upstream_close: plan.to_upstream.code(),
        client_to_upstream: up,
        upstream_to_client: down,
    };
    let wait = |side: Side| {
        if plan.unresponsive == Some(side) {
            UNRESPONSIVE_CLOSE_TIMEOUT
        } else {
            CLOSE_TIMEOUT
        }
    };
    tokio::join!(
        finish(
            &mut client_tx,
            &mut client_rx,
            plan.to_client,
            wait(Side::Client)
        ),
        finish(
            &mut upstream_tx,
            &mut upstream_rx,
            plan.to_upstream,
            wait(Side::Upstream)
        ),
    );
    report
}

/// Sends our close (if any), then waits briefly for the peer's close or EOF so that the close
/// handshake completes and the peer sees a clean end rather than a reset.
async fn finish<K, S>(tx: &mut K, rx: &mut S, how: Finish, wait: Duration)
where
    K: Sink<Message, Error = WsError> + Unpin,
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let send = match how {
        Finish::Gone => return,
        Finish::Drain => None,
        Finish::Close(frame) => Some(frame),
    };
    let _ = tokio::time::timeout(wait, async {
        if let Some(frame) = send
            && tx.send(Message::Close(frame)).await.is_err()
        {
            return;
        }
        while let Some(Ok(_)) = rx.next().await {}
    })
    .await;
}

/// Owns every deadline of the connection. It wakes at the next one that could fire, so an
/// idle connection costs one timer, not a tick per second.
async fn watchdog(
    liveness: &Liveness,
    lifecycle: &Lifecycle,
    token_deadline: Option<u64>,
) -> Deadline {
    let pong_timeout = lifecycle.pong_timeout.as_millis() as u64;
    let session_deadline = lifecycle.max_session.map(|max| liveness.at(max));
    let mut next_ping = lifecycle
        .ping_interval
        .map(|interval| liveness.at(interval));
    loop {
        let now = liveness.now();
        let mut next = u64::MAX;
        let mut due = |deadline: u64, what: Deadline| -> Option<Deadline> {
            if now >= deadline {
                return Some(what);
            }
            next = next.min(deadline);
            None
        };
        if let Some(deadline) = token_deadline
            && let Some(what) = due(deadline, Deadline::TokenExpired)
        {
            return what;
        }
        if let Some(deadline) = session_deadline
            && let Some(what) = due(deadline, Deadline::SessionLimit)
        {
            return what;
        }
        if let Some(idle) = lifecycle.idle_timeout {
            let last = liveness.last_data.load(Ordering::Relaxed);
            if let Some(what) = due(last + idle.as_millis() as u64, Deadline::Idle) {
                return what;
            }
        }
        // Without heartbeats a peer that reads nothing is still judged, over the default window.
        let interval = lifecycle
            .ping_interval
            .unwrap_or(STALL_WINDOW_WITHOUT_HEARTBEATS)
            .as_millis() as u64;
        for side in [Side::Client, Side::Upstream] {
            let i = side.index();
            // While writes to the other side are blocked, this side is not being read, so its
            // pong cannot be seen: judging it would blame the wrong peer.
            let other_blocked = liveness.write_blocked[1 - i].load(Ordering::Relaxed) != 0;
            if !other_blocked
                && let Some(sent) = Liveness::get(&liveness.ping_outstanding[i])
                && let Some(what) = due(sent + pong_timeout, Deadline::Unresponsive(side))
            {
                return what;
            }
            // A side that reads nothing would have had a ping within the interval and the pong
            // timeout to answer it.
            if let Some(since) = Liveness::get(&liveness.write_blocked[i])
                && let Some(what) = due(
                    since + interval + pong_timeout,
                    Deadline::Unresponsive(side),
                )
            {
                return what;
            }
        }
        if let Some(at) = next_ping.as_mut() {
            if now >= *at {
                // One ping at a time: an unanswered one is judged above.
                for side in [Side::Client, Side::Upstream] {
                    if liveness.ping_outstanding[side.index()].load(Ordering::Relaxed) == 0 {
                        liveness.ping_due[side.index()].store(true, Ordering::Relaxed);
                    }
                }
                *at = now + interval;
                // Re-poll the task at once, so the pumps see the flags.
                tokio::task::yield_now().await;
                continue;
            }
            next = next.min(*at);
        }
        // A write that blocks starts without waking us; by the next ping (or window) plus
        // pong_timeout we look again.
        next = next.min(next_ping.unwrap_or(now + interval) + pong_timeout);
        let sleep_ms = next.saturating_sub(now).min(24 * 3600 * 1000);
        tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
    }
}

enum Item {
    Data(Message),
    Pong,
    Control,
    End(End),
}

fn classify(item: Option<Result<Message, WsError>>) -> Item {
    match item {
        Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => Item::Data(message),
        Some(Ok(Message::Pong(_))) => Item::Pong,
        Some(Ok(Message::Ping(_) | Message::Frame(_))) => Item::Control,
        Some(Ok(Message::Close(close))) => Item::End(End::Closed(close)),
        None => Item::End(End::Lost),
        Some(Err(error)) => Item::End(match error {
            WsError::Capacity(_) => End::TooBig,
            WsError::Utf8(_) => End::Protocol(codes::INVALID_PAYLOAD),
            WsError::Protocol(_) => End::Protocol(codes::PROTOCOL_ERROR),
            _ => End::Lost,
        }),
    }
}

struct TokenBucket {
    limit: RateLimit,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            tokens: f64::from(limit.burst),
            last: Instant::now(),
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.limit.per_second;
        self.tokens = (self.tokens + refill).min(f64::from(self.limit.burst));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Awaits a write; if it does not complete at once, records that writes to `side` are blocked
/// until it does (the watchdog closes a side that reads nothing for too long).
async fn tracked<F: Future>(write: F, side: Side, liveness: &Liveness) -> F::Output {
    let mut write = pin!(write);
    if let Poll::Ready(output) = poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
        return output;
    }
    liveness.write_blocked[side.index()].store(liveness.now(), Ordering::Relaxed);
    let output = write.await;
    liveness.write_blocked[side.index()].store(0, Ordering::Relaxed);
    output
}

/// One direction: reads from `source_side`, writes to the other side.
async fn pump<S, K>(
    source: &mut S,
    destination: &mut K,
    source_side: Side,
    liveness: &Liveness,
    lifecycle: &Lifecycle,
    traffic: &mut Traffic,
    counters: &DirectionCounters,
) -> End
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
    K: Sink<Message, Error = WsError> + Unpin,
{
    let destination_side = match source_side {
        Side::Client => Side::Upstream,
        Side::Upstream => Side::Client,
    };
    // Only what the client sends is rate limited; the upstream is trusted to stream.
    let mut bucket = match source_side {
        Side::Client => lifecycle.message_rate.map(TokenBucket::new),
        Side::Upstream => None,
    };
    let ping_due = &liveness.ping_due[destination_side.index()];

    loop {
        // One relaxed load per poll: the ping check costs nothing on the hot path.
        let woke = poll_fn(|cx| {
            if ping_due.load(Ordering::Relaxed) {
                ping_due.store(false, Ordering::Relaxed);
                return Poll::Ready(None);
            }
            source.poll_next_unpin(cx).map(Some)
        })
        .await;
        let Some(item) = woke else {
            liveness.ping_outstanding[destination_side.index()]
                .store(liveness.now(), Ordering::Relaxed);
            let ping = destination.send(Message::Ping(Bytes::new()));
            if tracked(ping, destination_side, liveness).await.is_err() {
                return End::DestinationLost;
            }
            continue;
        };

        let mut batch_messages = 0;
        let mut batch_bytes = 0;
        let mut next = Some(item);
        let mut ended = None;
        while let Some(item) = next.take() {
            match classify(item) {
                Item::Data(message) => {
                    if let Some(bucket) = bucket.as_mut()
                        && !bucket.allow()
                    {
                        ended = Some(End::RateLimited);
                        break;
                    }
                    traffic.messages += 1;
                    batch_messages += 1;
                    let len = message.len();
                    traffic.bytes += len as u64;
                    batch_bytes += len;
                    if tracked(destination.feed(message), destination_side, liveness)
                        .await
                        .is_err()
                    {
                        return End::DestinationLost;
                    }
                }
                Item::Pong => {
                    liveness.ping_outstanding[source_side.index()].store(0, Ordering::Relaxed);
                }
                Item::Control => {}
                Item::End(end) => {
                    ended = Some(end);
                    break;
                }
            }
            // Feed whatever is already readable, then flush once.
            if batch_messages < BATCH_MESSAGES && batch_bytes < BATCH_BYTES {
                next = source.next().now_or_never();
            }
        }
        if batch_messages > 0 {
            counters.add(batch_messages as u64, batch_bytes as u64);
            liveness.last_data.store(liveness.now(), Ordering::Relaxed);
            if tracked(destination.flush(), destination_side, liveness)
                .await
                .is_err()
            {
                return End::DestinationLost;
            }
        }
        if let Some(end) = ended {
            return end;
        }
    }
}
