//! The relay and its pump over in-memory pipes, for what is hard to reach with sockets: exact
//! backpressure bounds both ways, closes that cross, a replay bounded by what the client
//! confirmed, and a takeover in the middle of a message.
//!
//! The clock is paused: when every task waits, tokio moves time on to the next timer, so
//! "nothing more happens" is an event ([`settle`]) rather than a guess at a sleep.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Waker};
use std::time::Duration;

use crate::shutdown::Shutdown;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use super::pump::{Pump, Traffic, held_limit};
use super::{Counters, Relay, RelayParams, RelayReport};
use crate::audit::AuditLog;
use crate::config::settings::{Lifecycle, ResumeSettings};
use crate::metrics::{DirectionCounters, Metrics};
use crate::session::registry::{Attach, Delivery, Registry, SessionEntry, SessionKey, Sessions};
use crate::session::resumable::Resumable;
use crate::ws::close::{End, FrameError, Side};
use crate::ws::frame::{opcode, write_frame};
use crate::ws::io::Io;
use crate::ws::leg::Leg;

const MAX_MESSAGE: usize = 1 << 20;

/// A frame as a peer reads it.
#[derive(Debug, PartialEq, Eq)]
struct Frame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

impl Frame {
    fn close_code(&self) -> Option<u16> {
        (self.opcode == opcode::CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }

    fn close_reason(&self) -> &str {
        std::str::from_utf8(self.payload.get(2..).unwrap_or_default()).unwrap_or("")
    }
}

/// The far end of a leg: a client (masks what it sends) or an upstream (does not).
struct Peer {
    io: DuplexStream,
    input: Vec<u8>,
    masks: bool,
}

impl Peer {
    async fn send(&mut self, fin: bool, op: u8, payload: &[u8]) {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, op, payload, self.masks);
        if !fin {
            bytes[0] &= 0x7f;
        }
        self.io
            .write_all(&bytes)
            .await
            .expect("the edge is reading");
    }

    async fn text(&mut self, text: &str) {
        self.send(true, opcode::TEXT, text.as_bytes()).await;
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason.as_bytes());
        self.send(true, opcode::CLOSE, &payload).await;
    }

    /// The next frame the edge sent; `None` once it closed the pipe.
    async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some((frame, used)) = parse(&self.input) {
                self.input.drain(..used);
                return Some(frame);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let n = self.io.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            self.input.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next frame that is not a ping, answering pings as a live peer does.
    /// The next data message, its fragments joined (a frame the edge passes on before it has
    /// all arrived goes on as fragments), or the next close; answering pings on the way.
    async fn message(&mut self) -> Option<Frame> {
        let mut first = self.answering_pings().await?;
        while !first.fin && first.opcode != opcode::CLOSE {
            let next = self.answering_pings().await?;
            assert_eq!(
                next.opcode,
                opcode::CONTINUATION,
                "a new message inside one"
            );
            first.payload.extend_from_slice(&next.payload);
            first.fin = next.fin;
        }
        Some(first)
    }

    async fn answering_pings(&mut self) -> Option<Frame> {
        loop {
            let frame = self.frame().await?;
            if frame.opcode != opcode::PING {
                return Some(frame);
            }
            self.send(true, opcode::PONG, &frame.payload).await;
        }
    }

    async fn expect_text(&mut self, text: &str) {
        let frame = self.message().await.expect("a message");
        assert_eq!(
            (frame.opcode, frame.payload.as_slice()),
            (opcode::TEXT, text.as_bytes())
        );
    }

    /// Answers pings until nothing more happens anywhere; nothing else may arrive meanwhile.
    async fn settle(&mut self) {
        loop {
            match tokio::time::timeout(Duration::from_secs(1), self.frame()).await {
                Err(_) => return,
                Ok(Some(frame)) if frame.opcode == opcode::PING => {
                    self.send(true, opcode::PONG, &frame.payload).await;
                }
                Ok(other) => panic!("expected nothing more, got {other:?}"),
            }
        }
    }
}

/// Reads one frame from the front of `input`: (frame, bytes it took).
fn parse(input: &[u8]) -> Option<(Frame, usize)> {
    let [first, second, ..] = *input else {
        return None;
    };
    let (len, mut at) = match second & 0x7f {
        126 => (
            usize::from(u16::from_be_bytes([*input.get(2)?, *input.get(3)?])),
            4,
        ),
        127 => {
            let bytes: [u8; 8] = input.get(2..10)?.try_into().ok()?;
            (usize::try_from(u64::from_be_bytes(bytes)).ok()?, 10)
        }
        short => (usize::from(short), 2),
    };
    let mask = if second & 0x80 != 0 {
        let key: [u8; 4] = input.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(key)
    } else {
        None
    };
    let mut payload = input.get(at..at + len)?.to_vec();
    if let Some(key) = mask {
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= key[i % 4];
        }
    }
    let frame = Frame {
        fin: first & 0x80 != 0,
        opcode: first & 0x0f,
        payload,
    };
    Some((frame, at + len))
}

/// A client's leg and its far end, over a pipe that holds `capacity` bytes each way.
fn client_pair(capacity: usize) -> (Leg, Peer) {
    let (edge, far) = tokio::io::duplex(capacity);
    let leg = Leg::client(Io::Memory(edge), &[], MAX_MESSAGE);
    let peer = Peer {
        io: far,
        input: Vec::new(),
        masks: true,
    };
    (leg, peer)
}

fn upstream_pair(capacity: usize) -> (Leg, Peer) {
    let (edge, far) = tokio::io::duplex(capacity);
    let leg = Leg::upstream(Io::Memory(edge), &[], MAX_MESSAGE);
    let peer = Peer {
        io: far,
        input: Vec::new(),
        masks: false,
    };
    (leg, peer)
}

/// No heartbeats and no message rate: nothing happens that the test does not do.
fn quiet() -> Lifecycle {
    Lifecycle {
        ping_interval: None,
        message_rate: None,
        ..Lifecycle::default()
    }
}

fn params(resume: Option<Box<Resumable>>) -> RelayParams {
    RelayParams {
        lifecycle: quiet(),
        max_message: MAX_MESSAGE,
        token_expires_at: None,
        counters: Counters {
            client_to_upstream: DirectionCounters::default(),
            upstream_to_client: DirectionCounters::default(),
            turns: None,
        },
        shutdown: Shutdown::default(),
        tasks: TaskTracker::new(),
        resume,
        announce: None,
        registered: None,
    }
}

fn start(
    client: Option<Leg>,
    upstream: Leg,
    resume: Option<Box<Resumable>>,
) -> JoinHandle<RelayReport> {
    tokio::spawn(Relay::new(client, upstream, params(resume)))
}

async fn finished(relay: JoinHandle<RelayReport>) -> RelayReport {
    tokio::time::timeout(Duration::from_secs(60), relay)
        .await
        .expect("the relay ended")
        .expect("the relay did not panic")
}

// ---------------------------------------------------------------------------------------------
// The pump, one direction for one poll

fn pump_once(
    source: &mut Leg,
    dest: &mut Leg,
    atomic: bool,
    traffic: &mut Traffic,
) -> super::pump::Outcome {
    let counters = DirectionCounters::default();
    let mut cx = Context::from_waker(Waker::noop());
    Pump {
        source,
        dest: Some(dest),
        bucket: None,
        atomic,
        held_limit: held_limit(1024),
        replay: None,
        replay_cap: None,
        traffic,
        counters: &counters,
    }
    .run(&mut cx, tokio::time::Instant::now())
}

#[tokio::test]
async fn a_whole_message_destination_gets_a_fragmented_message_only_once_it_is_complete() {
    let (mut client, mut client_peer) = client_pair(1 << 16);
    let (mut upstream, mut upstream_peer) = upstream_pair(1 << 16);
    let mut traffic = Traffic::default();
    client_peer.send(false, opcode::TEXT, b"hel").await;
    let outcome = pump_once(&mut client, &mut upstream, true, &mut traffic);
    assert!(outcome.end.is_none());
    assert_eq!(upstream.pending_out(), 0, "half a message went on");
    client_peer.send(true, opcode::CONTINUATION, b"lo").await;
    let outcome = pump_once(&mut client, &mut upstream, true, &mut traffic);
    assert!(outcome.end.is_none());
    assert_eq!(
        traffic,
        Traffic {
            messages: 1,
            bytes: 5
        }
    );
    drop(client);
    let (first, second) = (upstream_peer.frame().await, upstream_peer.frame().await);
    assert_eq!(
        first,
        Some(Frame {
            fin: false,
            opcode: opcode::TEXT,
            payload: b"hel".to_vec()
        })
    );
    assert_eq!(
        second,
        Some(Frame {
            fin: true,
            opcode: opcode::CONTINUATION,
            payload: b"lo".to_vec()
        })
    );
}

#[tokio::test]
async fn a_ping_inside_a_fragmented_message_is_handed_back_and_not_passed_on() {
    let (mut client, mut client_peer) = client_pair(1 << 16);
    let (mut upstream, mut upstream_peer) = upstream_pair(1 << 16);
    let mut traffic = Traffic::default();
    client_peer.send(false, opcode::BINARY, b"a").await;
    client_peer.send(true, opcode::PING, b"are you there").await;
    client_peer.send(true, opcode::CONTINUATION, b"b").await;
    let outcome = pump_once(&mut client, &mut upstream, false, &mut traffic);
    assert_eq!(outcome.pings, vec![b"are you there".to_vec()]);
    assert!(outcome.end.is_none() && outcome.data);
    drop(client);
    let mut cx = Context::from_waker(Waker::noop());
    assert!(
        upstream
            .poll_write_out(&mut cx, tokio::time::Instant::now())
            .is_ready()
    );
    let frames = [upstream_peer.frame().await, upstream_peer.frame().await];
    let kinds: Vec<(bool, u8)> = frames.iter().flatten().map(|f| (f.fin, f.opcode)).collect();
    assert_eq!(
        kinds,
        [(false, opcode::BINARY), (true, opcode::CONTINUATION)]
    );
}

#[tokio::test]
async fn endless_fragments_held_for_a_whole_message_destination_end_in_1009() {
    let (mut client, mut client_peer) = client_pair(1 << 20);
    let (mut upstream, _upstream_peer) = upstream_pair(1 << 16);
    let mut traffic = Traffic::default();
    // The pump is built with room for a message of 1 KiB: twice that and some headers.
    client_peer.send(false, opcode::BINARY, &[7; 1000]).await;
    for _ in 0..7 {
        client_peer
            .send(false, opcode::CONTINUATION, &[7; 1000])
            .await;
    }
    let outcome = pump_once(&mut client, &mut upstream, true, &mut traffic);
    assert!(
        matches!(outcome.end, Some(End::Violation(FrameError::TooBig))),
        "{:?}",
        outcome.end
    );
}

// ---------------------------------------------------------------------------------------------
// Backpressure

/// Writes `count` binary messages of `size` bytes from `peer`, counting the bytes handed over.
fn flood(mut peer: Peer, count: usize, size: usize, written: Arc<AtomicUsize>) -> JoinHandle<Peer> {
    tokio::spawn(async move {
        for i in 0..count {
            let payload = vec![(i % 251) as u8; size];
            peer.send(true, opcode::BINARY, &payload).await;
            written.fetch_add(size, Ordering::SeqCst);
        }
        peer
    })
}

async fn backpressure_holds(from: Side) {
    const PIPE: usize = 16 * 1024;
    const COUNT: usize = 1000;
    const SIZE: usize = 1024;
    let (client, client_peer) = client_pair(PIPE);
    let (upstream, upstream_peer) = upstream_pair(PIPE);
    let relay = start(Some(client), upstream, None);
    let (sender, mut reader) = match from {
        Side::Upstream => (upstream_peer, client_peer),
        Side::Client => (client_peer, upstream_peer),
    };
    let written = Arc::new(AtomicUsize::new(0));
    let sender = flood(sender, COUNT, SIZE, written.clone());
    // Until everything waits: the sender for room, the edge for its reader.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = written.load(Ordering::SeqCst);
    // Both pipes, what one read brought, and the edge's 64 KiB before it stops reading, with
    // a read chunk and a frame of slack: far below the megabyte the sender has.
    assert!(
        held < 2 * PIPE + 64 * 1024 + 16 * 1024 + 2 * SIZE + 1024,
        "{held} bytes were taken from a sender whose reader reads nothing"
    );
    assert!(
        held >= PIPE,
        "the sender was stopped before the edge read anything"
    );
    for i in 0..COUNT {
        let frame = reader.message().await.expect("the whole flood");
        assert_eq!(
            (frame.opcode, frame.payload.len(), frame.payload[0]),
            (opcode::BINARY, SIZE, (i % 251) as u8),
            "message {i}"
        );
    }
    let mut sender = sender.await.expect("the flood was taken");
    assert_eq!(written.load(Ordering::SeqCst), COUNT * SIZE);
    sender.close(1000, "done").await;
    let report = finished(relay).await;
    let traffic = match from {
        Side::Upstream => report.upstream_to_client,
        Side::Client => report.client_to_upstream,
    };
    assert_eq!(traffic.messages, COUNT as u64);
}

#[tokio::test(start_paused = true)]
async fn an_upstream_is_not_read_while_its_client_reads_nothing() {
    backpressure_holds(Side::Upstream).await;
}

#[tokio::test(start_paused = true)]
async fn a_client_is_not_read_while_its_upstream_reads_nothing() {
    backpressure_holds(Side::Client).await;
}

// ---------------------------------------------------------------------------------------------
// Closes that cross

#[tokio::test(start_paused = true)]
async fn closes_that_cross_are_each_answered_once_and_the_client_is_named() {
    let (client, mut client_peer) = client_pair(1 << 16);
    let (upstream, mut upstream_peer) = upstream_pair(1 << 16);
    // Both closes are on their way before the relay reads either.
    client_peer.close(4000, "bye").await;
    upstream_peer.close(4001, "mine").await;
    let relay = start(Some(client), upstream, None);
    let to_client = client_peer.frame().await.expect("an answer");
    assert_eq!(
        (to_client.close_code(), to_client.close_reason()),
        (Some(4000), "bye")
    );
    let to_upstream = upstream_peer.frame().await.expect("the client's close");
    assert_eq!(
        (to_upstream.close_code(), to_upstream.close_reason()),
        (Some(4000), "bye")
    );
    assert_eq!(client_peer.frame().await, None, "one close, then the end");
    assert_eq!(upstream_peer.frame().await, None, "one close, then the end");
    let report = finished(relay).await;
    assert_eq!(
        (
            report.ended_by,
            report.reason,
            report.client_close,
            report.upstream_close
        ),
        (Some(Side::Client), "client closed", None, Some(4000))
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_vanishes_as_its_upstream_closes_leaves_the_upstream_a_1001() {
    let (client, client_peer) = client_pair(1 << 16);
    let (upstream, mut upstream_peer) = upstream_pair(1 << 16);
    upstream_peer.close(4001, "mine").await;
    drop(client_peer);
    let relay = start(Some(client), upstream, None);
    let to_upstream = upstream_peer.frame().await.expect("a close");
    assert_eq!(
        (to_upstream.close_code(), to_upstream.close_reason()),
        (Some(1001), "client went away")
    );
    assert_eq!(upstream_peer.frame().await, None);
    let report = finished(relay).await;
    assert_eq!(
        (report.reason, report.upstream_close),
        ("client lost", Some(1001))
    );
}

// ---------------------------------------------------------------------------------------------
// Resumable sessions

fn sessions() -> Arc<Sessions> {
    Arc::new(Sessions {
        registry: Registry::default(),
        metrics: Arc::new(Metrics::new()),
        audit: AuditLog::start(None, Counter::default()).expect("an audit writer"),
    })
}

/// A resumable session of alice's and its registry entry.
fn resumable(sessions: &Arc<Sessions>) -> (Box<Resumable>, Arc<SessionEntry>) {
    let key = SessionKey {
        route: "/ws".into(),
        tenant: String::new(),
        user: "alice".into(),
        id: "s1".into(),
    };
    let entry = sessions.registry.begin(key, None).expect("a new session");
    let settings = ResumeSettings {
        window: Duration::from_secs(30),
        max_messages: 1000,
        max_bytes: 1 << 20,
        announce: false,
    };
    let resume = Resumable::new(
        settings,
        entry.clone(),
        sessions.clone(),
        "/ws".into(),
        None,
    );
    (Box::new(resume), entry)
}

/// A client coming back with `last_seq`: its far end.
fn come_back(entry: &SessionEntry, last_seq: u64, request_id: &str) -> Peer {
    let (leg, peer) = client_pair(1 << 16);
    let attach = Attach {
        leg,
        last_seq,
        token_expires_at: None,
        token: Default::default(),
        request_id: request_id.into(),
    };
    assert!(matches!(
        entry.deliver(Box::new(attach)),
        Delivery::Delivered
    ));
    peer
}

#[tokio::test(start_paused = true)]
async fn a_replay_holds_exactly_what_the_client_has_not_confirmed() {
    let sessions = sessions();
    let (resume, entry) = resumable(&sessions);
    let (client, mut first) = client_pair(1 << 16);
    let (upstream, mut upstream_peer) = upstream_pair(1 << 16);
    let relay = start(Some(client), upstream, Some(resume));
    for text in ["1", "2", "3"] {
        upstream_peer.text(text).await;
    }
    for text in ["1", "2", "3"] {
        first.expect_text(text).await;
    }
    // Its pongs confirm all three: nothing is kept for it any more.
    first.settle().await;
    assert_eq!(sessions.metrics.resume_buffered_messages.get(), 0);
    drop(first);
    upstream_peer.text("4").await;
    upstream_peer.text("5").await;
    upstream_peer.settle().await;
    assert_eq!(sessions.metrics.sessions_detached.get(), 1);
    assert_eq!(sessions.metrics.resume_buffered_messages.get(), 2);

    // Message 3 was confirmed and let go: a client that says it has only two cannot be served.
    let mut behind = come_back(&entry, 2, "r2");
    let refused = behind.frame().await.expect("a close");
    assert_eq!(
        (refused.close_code(), refused.close_reason()),
        (Some(4002), "session overflowed")
    );

    let mut back = come_back(&entry, 3, "r3");
    back.expect_text("4").await;
    back.expect_text("5").await;
    upstream_peer.text("6").await;
    back.expect_text("6").await;
    assert_eq!(sessions.metrics.sessions_detached.get(), 0);
    back.close(1000, "").await;
    let to_upstream = upstream_peer.answering_pings().await.expect("the close");
    assert_eq!(to_upstream.close_code(), Some(1000));
    let report = finished(relay).await;
    assert_eq!(report.reason, "client closed");
    assert_eq!(
        report.upstream_to_client.messages, 6,
        "one upstream connection"
    );
}

#[tokio::test(start_paused = true)]
async fn a_takeover_closes_the_old_client_with_4003_and_drops_its_unfinished_message() {
    let sessions = sessions();
    let (resume, entry) = resumable(&sessions);
    let (client, mut old) = client_pair(1 << 16);
    let (upstream, mut upstream_peer) = upstream_pair(1 << 16);
    let relay = start(Some(client), upstream, Some(resume));
    // Half a message from the old client; the upstream must never see it.
    old.send(false, opcode::TEXT, b"hel").await;
    upstream_peer.text("x").await;
    old.expect_text("x").await;
    old.settle().await;

    let mut new = come_back(&entry, 1, "r2");
    let taken = old.frame().await.expect("a close");
    assert_eq!(
        (taken.close_code(), taken.close_reason()),
        (Some(4003), "session taken over")
    );
    new.text("world").await;
    let frame = upstream_peer
        .answering_pings()
        .await
        .expect("the new client's message");
    assert_eq!(
        frame,
        Frame {
            fin: true,
            opcode: opcode::TEXT,
            payload: b"world".to_vec()
        }
    );
    upstream_peer.text("y").await;
    new.expect_text("y").await;
    new.close(1000, "").await;
    finished(relay).await;
}
