//! One peer of a relayed connection — the client or the upstream — as the relay sees it: its
//! socket, the frames it sends (read through a [`FrameReader`]), and the bytes waiting to be
//! written to it.
//!
//! Buffers exist only while they hold something. Reads go through a 16 KiB chunk that is
//! released once the peer has nothing more to say, and the output buffer is released once it
//! has been written: an idle connection — what chat connections are most of the time — holds
//! neither.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::AsyncWrite;
use tokio::time::Instant;

use super::close::Finish;
use super::frame::{self, Event, FrameReader, Writer};
use super::io::Io;

/// How long the edge waits for a peer to answer its close frame before dropping the socket.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// The read chunk: one `recv` serves hundreds of token-sized messages.
const CHUNK: usize = 16 * 1024;
/// Chunks a worker thread keeps for its connections to reuse (1 MiB): a chat connection
/// that goes idle after each message would otherwise free its buffers and allocate them
/// again for the next one (BENCHMARKS.md, "What moved the figures").
const SPARE_CHUNKS: usize = 64;

thread_local! {
    static SPARE: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An empty chunk, from this thread's spares when it has one.
fn take_chunk() -> Vec<u8> {
    SPARE
        .with(|spare| spare.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(CHUNK))
}

/// Gives a buffer back: a chunk becomes a spare (while there is room), anything else is freed.
fn give_back(mut buffer: Vec<u8>) {
    if buffer.capacity() != CHUNK {
        return;
    }
    buffer.clear();
    SPARE.with(|spare| {
        let mut spare = spare.borrow_mut();
        if spare.len() < SPARE_CHUNKS {
            spare.push(buffer);
        }
    });
}

/// A ping the edge sent and the peer has not answered yet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ping {
    pub(crate) payload: u64,
    /// When its last byte was written to the socket; `None` while it waits behind what is
    /// queued before it, since the peer cannot answer what it has not been sent (a slow link
    /// may take seconds to take a long stream's backlog).
    pub(crate) sent: Option<Instant>,
    /// Where it ends in the stream of bytes written to this peer.
    ends_at: u64,
}

pub(crate) struct Leg {
    io: Io,
    /// Bytes read and not yet consumed start at `consumed`.
    input: Vec<u8>,
    consumed: usize,
    reader: FrameReader,
    /// Bytes to write to this peer; those before `written` are written.
    out: Vec<u8>,
    written: usize,
    /// Bytes written to this peer since the connection began.
    total_written: u64,
    /// The frames of a message from the other peer that is not complete yet, when only whole
    /// messages may be written to this peer (a resumable session's upstream: a client that
    /// drops mid-message must not leave half a message behind).
    held: Vec<u8>,
    /// Frames the edge writes to this peer are masked: it is the upstream, the edge its client.
    masked: bool,
    /// The edge's unanswered ping.
    ping: Option<Ping>,
    /// Bytes were written since the last flush (TLS keeps them until flushed).
    needs_flush: bool,
    /// Since when writes to this peer have made no progress: it has taken no byte since. A
    /// slow reader that keeps taking some is not blocked (like nginx's `send_timeout`).
    write_blocked_since: Option<Instant>,
    /// The edge holds off reading this peer (what it sent has nowhere to go yet): its pong
    /// may be behind what is not read, so it is not judged by it meanwhile.
    read_held: bool,
}

impl Leg {
    /// The client's leg: it writes masked frames, the edge writes unmasked ones to it.
    pub(crate) fn client(io: Io, initial: &[u8], max_message: usize) -> Self {
        Self::new(
            io,
            initial,
            FrameReader::new(Writer::Client, max_message),
            false,
        )
    }

    /// Moves its socket to the calling task's event loop (see [`Io::rehome`]).
    pub(crate) fn rehome(&mut self) -> io::Result<()> {
        self.io.rehome()
    }

    /// The upstream's leg: it writes unmasked frames, the edge masks what it writes to it.
    pub(crate) fn upstream(io: Io, initial: &[u8], max_message: usize) -> Self {
        Self::new(
            io,
            initial,
            FrameReader::new(Writer::Server, max_message),
            true,
        )
    }

    fn new(io: Io, initial: &[u8], reader: FrameReader, masked: bool) -> Self {
        Self {
            io,
            input: initial.to_vec(),
            consumed: 0,
            reader,
            out: Vec::new(),
            written: 0,
            total_written: 0,
            held: Vec::new(),
            masked,
            ping: None,
            needs_flush: false,
            write_blocked_since: None,
            read_held: false,
        }
    }

    /// The unread input and the reader, borrowed together for parsing.
    pub(crate) fn parse_parts(&mut self) -> (&mut [u8], &mut FrameReader) {
        (&mut self.input[self.consumed..], &mut self.reader)
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.consumed += n;
        if self.consumed == self.input.len() {
            self.input.clear();
            self.consumed = 0;
        }
    }

    /// Reads more from the peer. `Ok(0)` is the end of its stream.
    pub(crate) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.consumed > 0 {
            // Only the start of a frame is ever left over: a header, a control frame, or a data
            // frame of at most `WHOLE_FRAME_LIMIT` bytes that waits to be whole.
            self.input.drain(..self.consumed);
            self.consumed = 0;
        }
        if self.input.capacity() == 0 {
            self.input = take_chunk();
        } else if self.input.capacity() - self.input.len() < CHUNK / 4 {
            self.input.reserve(CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.input)
    }

    /// Bytes waiting to go to the peer.
    pub(crate) fn pending_out(&self) -> usize {
        self.out.len() - self.written
    }

    /// Whether a write or a flush is still to be done.
    pub(crate) fn has_output(&self) -> bool {
        self.written < self.out.len() || self.needs_flush
    }

    /// Data passed through from the other peer.
    pub(crate) fn push_data(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.out.capacity() == 0 {
            self.out = take_chunk();
        }
        self.out.extend_from_slice(bytes);
    }

    /// Keeps part of a message until the rest arrives; returns how much is held.
    pub(crate) fn hold(&mut self, bytes: &[u8]) -> usize {
        self.held.extend_from_slice(bytes);
        self.held.len()
    }

    /// The held message is complete: it goes out.
    pub(crate) fn release_held(&mut self) {
        self.out.extend_from_slice(&self.held);
        self.held = Vec::new();
    }

    /// The held message will never be completed (its sender left).
    pub(crate) fn drop_held(&mut self) {
        self.held = Vec::new();
    }

    /// Queues a control or data frame written by the edge itself. (What is queued always ends
    /// at a frame boundary: a frame not all read is passed on as fragments.)
    pub(crate) fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        frame::write_frame(&mut self.out, opcode, payload, self.masked);
    }

    /// Where the bytes queued in `out` end, in the stream written to this peer.
    fn queued_end(&self) -> u64 {
        self.total_written + (self.out.len() - self.written) as u64
    }

    /// Queues a ping carrying `payload`, and remembers it until the matching pong.
    pub(crate) fn send_ping(&mut self, payload: u64) {
        self.send_frame(frame::opcode::PING, &payload.to_be_bytes());
        self.ping = Some(Ping {
            payload,
            sent: None,
            ends_at: self.queued_end(),
        });
    }

    /// Queues a close frame.
    pub(crate) fn send_close(&mut self, code: Option<u16>, reason: &str) {
        frame::write_close(&mut self.out, code, reason, self.masked);
    }

    /// The edge's unanswered ping, if any.
    pub(crate) fn ping(&self) -> Option<Ping> {
        self.ping
    }

    /// The peer answered the edge's ping: it is no longer awaited.
    pub(crate) fn take_ping(&mut self) -> Option<Ping> {
        self.ping.take()
    }

    /// Since when writes to this peer have made no progress.
    pub(crate) fn write_blocked_since(&self) -> Option<Instant> {
        self.write_blocked_since
    }

    /// Whether the edge holds off reading this peer.
    pub(crate) fn read_held(&self) -> bool {
        self.read_held
    }

    /// The edge stops reading this peer until [`Leg::resume_reading`]: what it sent has nowhere
    /// to go yet.
    pub(crate) fn hold_reading(&mut self) {
        self.read_held = true;
    }

    /// Whether what this peer sent so far ends inside a message. (A frame that waits in the
    /// input to be whole has not been passed on: reading may stop before it.)
    pub(crate) fn reading_mid_message(&self) -> bool {
        self.reader.mid_message()
    }

    /// Writes everything queued, and keeps the clocks of a relayed peer: since when it has
    /// taken nothing, and when the edge's ping reached it. `Pending` while it is not reading.
    pub(crate) fn poll_write_out(
        &mut self,
        cx: &mut Context<'_>,
        now: Instant,
    ) -> Poll<io::Result<()>> {
        let before = self.total_written;
        let result = self.poll_drain(cx);
        let written = self.total_written;
        if written > before
            && let Some(ping) = self.ping.as_mut()
            && ping.sent.is_none()
            && written >= ping.ends_at
        {
            ping.sent = Some(now);
        }
        match result {
            Poll::Ready(Ok(())) => self.write_blocked_since = None,
            Poll::Pending if written > before => self.write_blocked_since = Some(now),
            Poll::Pending => {
                self.write_blocked_since.get_or_insert(now);
            }
            Poll::Ready(Err(_)) => {}
        }
        result
    }

    /// Writes everything queued. `Pending` while the peer is not reading.
    pub(crate) fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
            self.total_written += n as u64;
            self.needs_flush = true;
        }
        if !self.out.is_empty() {
            self.out.clear();
            self.written = 0;
        }
        if self.needs_flush {
            // TLS keeps written records until flushed (and may be the one waiting for the
            // socket); for TCP this does nothing.
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.needs_flush = false;
        }
        Poll::Ready(Ok(()))
    }

    /// The edge reads this peer again after holding off: an unanswered ping gets its whole
    /// timeout from now, since its pong may have been waiting behind what was not read.
    pub(crate) fn resume_reading(&mut self, now: Instant) {
        if std::mem::take(&mut self.read_held)
            && let Some(ping) = self.ping.as_mut()
            && ping.sent.is_some()
        {
            ping.sent = Some(now);
        }
    }

    /// Frees buffers that hold nothing: called when the connection goes quiet.
    pub(crate) fn release_idle(&mut self) {
        if self.input.is_empty() && self.input.capacity() > 0 {
            give_back(std::mem::take(&mut self.input));
        }
        if self.out.is_empty() && self.out.capacity() > 0 {
            give_back(std::mem::take(&mut self.out));
        }
    }
}

impl Drop for Leg {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.input));
        give_back(std::mem::take(&mut self.out));
    }
}

/// Ends a leg: sends the close (if any), waits up to `wait` for the peer's close or the end of
/// its stream so that the peer sees a clean close rather than a reset, then shuts the socket.
/// `server`: the edge is the server on this leg (the client's), so it may close the TCP
/// connection first once the close handshake is done (RFC 6455 §7.1.1).
pub(crate) async fn close_leg(mut leg: Leg, how: Finish, wait: Duration, server: bool) {
    match &how {
        Finish::Gone => return,
        Finish::Answer(close) | Finish::PassOn(close) => leg.send_close(close.code, &close.reason),
        Finish::Send(close) => leg.send_close(Some(close.code()), close.reason()),
    }
    let expect_answer = !matches!(how, Finish::Answer(_));
    let _ = tokio::time::timeout(wait, async {
        if poll_fn(|cx| leg.poll_drain(cx)).await.is_err() {
            return;
        }
        let mut answered = !expect_answer;
        // Past the close handshake, a server may end at once; a client waits for the
        // server to end the TCP connection.
        while !(answered && server) {
            match poll_fn(|cx| leg.poll_fill(cx)).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            loop {
                let (input, reader) = leg.parse_parts();
                if input.is_empty() {
                    break;
                }
                match reader.next(input) {
                    Err(_) => return,
                    Ok(Event::NeedMore) => break,
                    Ok(Event::Data { len, .. }) => leg.consume(len),
                    Ok(Event::Control { len, frame }) => {
                        leg.consume(len);
                        if frame.opcode == frame::opcode::CLOSE {
                            answered = true;
                        }
                    }
                }
            }
        }
    })
    .await;
    // TLS says goodbye with close_notify; a TCP socket's FIN goes out when it is dropped, and a
    // shutdown call first would only cost a syscall.
    if !matches!(leg.io, Io::Tcp(_)) {
        let _ = tokio::time::timeout(
            Duration::from_millis(100),
            poll_fn(|cx| Pin::new(&mut leg.io).poll_shutdown(cx)),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn leg_pair() -> (Leg, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (peer, accepted) = tokio::join!(peer, listener.accept());
        let leg = Leg::client(Io::Tcp(accepted.unwrap().0), &[], 1024);
        (leg, peer.unwrap())
    }

    #[tokio::test]
    async fn a_ping_behind_a_backlog_is_timed_from_when_the_backlog_has_gone() {
        let (mut leg, mut peer) = leg_pair().await;
        // More than the socket buffers take: the peer has to read before the ping goes out.
        let backlog = vec![0u8; 8 << 20];
        leg.push_data(&backlog);
        leg.send_ping(9);
        let start = Instant::now();
        let blocked = poll_fn(|cx| Poll::Ready(leg.poll_write_out(cx, start))).await;
        assert!(
            blocked.is_pending(),
            "8 MiB should not fit the socket buffers"
        );
        assert!(leg.ping.is_some_and(|ping| ping.sent.is_none()));
        let blocked_since = leg.write_blocked_since.expect("blocked");
        // The peer takes some: writes make progress, so the peer is no longer "blocked" since
        // the first write that waited.
        let mut chunk = vec![0u8; 1 << 20];
        use tokio::io::AsyncReadExt;
        peer.read_exact(&mut chunk).await.unwrap();
        let later = start + Duration::from_secs(1);
        let progressed = tokio::time::timeout(Duration::from_secs(10), async {
            // Until the runtime has seen the socket become writable again.
            while leg.write_blocked_since == Some(blocked_since) {
                let _ = poll_fn(|cx| Poll::Ready(leg.poll_write_out(cx, later))).await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        assert!(
            progressed.is_ok(),
            "the peer read 1 MiB and nothing more was written"
        );
        assert_eq!(leg.write_blocked_since, Some(later));
        // Everything read: the ping is written, and timed from then.
        let reader = tokio::spawn(async move {
            let mut rest = vec![0u8; (8 << 20) + 10 - (1 << 20)];
            peer.read_exact(&mut rest).await.unwrap();
            rest[rest.len() - 10..].to_vec()
        });
        let end = start + Duration::from_secs(2);
        poll_fn(|cx| leg.poll_write_out(cx, end)).await.unwrap();
        assert_eq!(reader.await.unwrap(), [0x89, 8, 0, 0, 0, 0, 0, 0, 0, 9]);
        assert!(leg.ping.is_some_and(|ping| ping.sent == Some(end)));
        assert_eq!(leg.write_blocked_since, None);
    }
}
