//! One HTTP/1.1 connection to an upstream target, spoken by the edge itself.
//!
//! The request goes out as the edge shaped it (its head written straight from the shaped
//! headers, its body streamed with the framing the edge chose); the response head is parsed
//! with httparse; the response body is framed by the edge (RFC 9112 §6.3) and handed over in
//! as few pieces as it arrived in: whatever one read brought — a run of small SSE chunks, a
//! slice of a download — is one piece. The connection is driven by the request's own task,
//! with no task or channel between the socket and the client.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use hyper::body::Body;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::chunked::{ChunkError, Chunked};
use crate::ws::io::Io;

/// Errors a body passed through may end with.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A request body on its way upstream.
pub(crate) type UpstreamBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// The largest response head read from an upstream.
const MAX_HEAD: usize = 64 * 1024;
/// Headers in a response head.
const MAX_HEADERS: usize = 128;
/// What one read asks for.
const READ_SIZE: usize = 16 * 1024;
/// The most a piece of response body gathers before it is handed over.
const PIECE_UP_TO: usize = 64 * 1024;
/// Pieces up to this size are copied out of the read buffer rather than split off it: the
/// buffer is then free to take the next read, instead of a new one being allocated for it.
const COPY_UP_TO: usize = 4 * 1024;

/// Why an exchange or its response body failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum H1Error {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the upstream closed the connection before answering")]
    ClosedBeforeAnswer,
    #[error("the upstream closed the connection in the middle of the response body")]
    ClosedInBody,
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    #[error(transparent)]
    Chunked(#[from] ChunkError),
    #[error("the request body failed: {0}")]
    RequestBody(BoxError),
}

/// How a request body goes out.
enum Outbound {
    Length(UpstreamBody),
    Chunked(UpstreamBody),
    Done,
}

/// How the response body is read.
enum Inbound {
    Head,
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    Done,
}

/// One connection to a target.
pub(crate) struct HttpConnection {
    io: Io,
    /// Read and not yet used.
    input: BytesMut,
    /// To be written.
    output: BytesMut,
    outbound: Outbound,
    inbound: Inbound,
    /// The request was a HEAD: its response has no body whatever its headers say.
    head_request: bool,
    /// Set when the connection cannot serve another request (the upstream asked to close it,
    /// the response is delimited by the close, something went wrong).
    closing: bool,
    /// Whether any byte of the current response has arrived.
    answered: bool,
    /// Writing the request failed (the upstream closed or reset the connection): nothing more
    /// is sent, but what the upstream answered before it closed is still read.
    send_failed: Option<io::Error>,
    /// A read failed after a piece of body had been taken from what arrived before it: the
    /// error is told after that piece.
    read_failed: Option<io::Error>,
    /// Bytes written since the connection opened: the request is making progress while this
    /// grows.
    written: u64,
    /// How long the upstream said it keeps the connection open between requests
    /// (`Keep-Alive: timeout=N`), when it said.
    keep_alive: Option<Duration>,
    /// The request head is queued and nothing of it written yet: it waits for the first piece
    /// of its body, so that a body that fails at once (a client's malformed chunk) sends
    /// nothing upstream.
    head_queued: bool,
}

/// The response head, ready for the client: the upstream's framing headers removed (the edge
/// frames the body it passes on), but for a HEAD's, which describe a body not sent.
pub(crate) struct ResponseHead {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
}

impl HttpConnection {
    pub(super) fn new(io: Io) -> Self {
        Self {
            io,
            input: BytesMut::new(),
            output: BytesMut::new(),
            outbound: Outbound::Done,
            inbound: Inbound::Done,
            head_request: false,
            closing: false,
            answered: false,
            send_failed: None,
            read_failed: None,
            written: 0,
            keep_alive: None,
            head_queued: false,
        }
    }

    /// Queues a request: its head, written from `headers` (Host first), and its body (`None`
    /// for none; `length` when its size is known).
    pub(crate) fn start(
        &mut self,
        method: &Method,
        path_and_query: &str,
        host: &str,
        headers: &[(HeaderName, HeaderValue)],
        body: Option<(UpstreamBody, Option<u64>)>,
    ) {
        let out = &mut self.output;
        out.reserve(256 + path_and_query.len() + headers.len() * 48);
        let mut line = |parts: &[&[u8]]| {
            for part in parts {
                out.put_slice(part);
            }
            out.put_slice(b"\r\n");
        };
        line(&[
            method.as_str().as_bytes(),
            b" ",
            path_and_query.as_bytes(),
            b" HTTP/1.1",
        ]);
        line(&[b"host: ", host.as_bytes()]);
        for (name, value) in headers {
            line(&[name.as_str().as_bytes(), b": ", value.as_bytes()]);
        }
        self.outbound = match body {
            Some((body, Some(length))) => {
                line(&[b"content-length: ", length.to_string().as_bytes()]);
                Outbound::Length(body)
            }
            Some((body, None)) => {
                line(&[b"transfer-encoding: chunked"]);
                Outbound::Chunked(body)
            }
            None => {
                // A method that carries a body says it has none, as clients do.
                if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
                    line(&[b"content-length: 0"]);
                }
                Outbound::Done
            }
        };
        line(&[]);
        self.inbound = Inbound::Head;
        self.head_request = *method == Method::HEAD;
        self.answered = false;
        self.send_failed = None;
        self.read_failed = None;
        self.head_queued = true;
    }

    /// Sends what there is to send and reads until the response head has arrived.
    ///
    /// An upstream may answer and close before it has read the whole request (a 413 to a
    /// large upload): a failed write stops the sending, and the answer is still read.
    pub(crate) fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<ResponseHead, H1Error>> {
        loop {
            if self.send_failed.is_none() {
                match self.poll_send(cx) {
                    Ok(()) => {}
                    Err(H1Error::Io(error)) => {
                        self.closing = true;
                        self.outbound = Outbound::Done;
                        self.output.clear();
                        self.send_failed = Some(error);
                    }
                    Err(error) => {
                        self.closing = true;
                        return Poll::Ready(Err(error));
                    }
                }
            }
            if !self.input.is_empty() {
                match self.parse_head() {
                    Ok(Some(head)) => return Poll::Ready(Ok(head)),
                    Ok(None) => {}
                    Err(error) => {
                        self.closing = true;
                        return Poll::Ready(Err(error));
                    }
                }
                if self.input.len() >= MAX_HEAD {
                    self.closing = true;
                    return Poll::Ready(Err(H1Error::Malformed("response head too large")));
                }
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) if self.answered => {
                    self.closing = true;
                    return Poll::Ready(Err(H1Error::Malformed("the response head was cut off")));
                }
                Ok(0) => {
                    self.closing = true;
                    return Poll::Ready(Err(self.unanswered(None)));
                }
                Ok(_) => self.answered = true,
                Err(error) if self.answered => {
                    self.closing = true;
                    return Poll::Ready(Err(error.into()));
                }
                Err(error) => {
                    self.closing = true;
                    return Poll::Ready(Err(self.unanswered(Some(error))));
                }
            }
        }
    }

    /// Why the upstream gave no answer at all, the connection having ended (`read`: with an
    /// error). A close or reset is [`H1Error::ClosedBeforeAnswer`], whichever side saw it
    /// first: a kept-alive connection the upstream let go as the request went out ends so.
    fn unanswered(&mut self, read: Option<io::Error>) -> H1Error {
        let closed = |error: &io::Error| {
            matches!(
                error.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            )
        };
        match (read, self.send_failed.take()) {
            (Some(error), _) | (None, Some(error)) if !closed(&error) => error.into(),
            _ => H1Error::ClosedBeforeAnswer,
        }
    }

    /// The next piece of the response body: everything that has arrived, up to 64 KiB; `None`
    /// at its end. Sends the rest of the request body meanwhile.
    pub(crate) fn poll_body(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, H1Error>>> {
        // An upstream may answer before it has read the whole request; the rest still goes
        // (a failure there only keeps the connection from being reused).
        if self.poll_send(cx).is_err() {
            self.closing = true;
            self.outbound = Outbound::Done;
        }
        loop {
            match &mut self.inbound {
                Inbound::Head | Inbound::Done => return Poll::Ready(None),
                Inbound::Length(left) if !self.input.is_empty() => {
                    let take = (*left).min(self.input.len() as u64) as usize;
                    *left -= take as u64;
                    if *left == 0 {
                        self.inbound = Inbound::Done;
                    }
                    return Poll::Ready(Some(Ok(self.take_input(take))));
                }
                Inbound::Chunked(_) if !self.input.is_empty() => match self.gather_chunks(cx) {
                    Ok(Some(piece)) => return Poll::Ready(Some(Ok(piece))),
                    Ok(None) => continue,
                    Err(error) => {
                        self.closing = true;
                        self.inbound = Inbound::Done;
                        return Poll::Ready(Some(Err(error.into())));
                    }
                },
                Inbound::UntilClose if !self.input.is_empty() => {
                    return Poll::Ready(Some(Ok(self.take_input(self.input.len()))));
                }
                Inbound::Length(_) | Inbound::Chunked(_) | Inbound::UntilClose => {}
            }
            if let Some(error) = self.read_failed.take() {
                self.closing = true;
                self.inbound = Inbound::Done;
                return Poll::Ready(Some(Err(error.into())));
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => {
                    let complete = matches!(self.inbound, Inbound::UntilClose);
                    self.closing = true;
                    self.inbound = Inbound::Done;
                    return Poll::Ready(if complete {
                        None
                    } else {
                        Some(Err(H1Error::ClosedInBody))
                    });
                }
                Ok(_) => {}
                Err(error) => {
                    self.closing = true;
                    self.inbound = Inbound::Done;
                    return Poll::Ready(Some(Err(error.into())));
                }
            }
        }
    }

    /// The data of the chunks that have arrived, in one piece: what is in the read buffer, and
    /// what else the socket has right now (read without waiting), up to `PIECE_UP_TO`. An
    /// upstream writing an event per chunk sends many small chunks; passed on together they
    /// cost the client one write and one chunk to parse instead of one each.
    fn gather_chunks(&mut self, cx: &mut Context<'_>) -> Result<Option<Bytes>, ChunkError> {
        let Inbound::Chunked(mut chunked) = std::mem::replace(&mut self.inbound, Inbound::Done)
        else {
            return Ok(None);
        };
        let mut piece = BytesMut::with_capacity(self.input.len().min(PIECE_UP_TO));
        let decoded = loop {
            if let Err(error) = chunked.decode(&mut self.input, &mut piece, PIECE_UP_TO) {
                break Err(error);
            }
            if chunked.is_done() || piece.len() >= PIECE_UP_TO {
                break Ok(());
            }
            match self.poll_fill(cx) {
                Poll::Ready(Ok(read)) if read > 0 => continue,
                // The end of the stream: the next read sees it again.
                Poll::Ready(Ok(_)) | Poll::Pending => break Ok(()),
                // An error is told once: after the piece read before it.
                Poll::Ready(Err(error)) => {
                    self.read_failed = Some(error);
                    break Ok(());
                }
            }
        };
        if !chunked.is_done() {
            self.inbound = Inbound::Chunked(chunked);
        }
        decoded?;
        Ok((!piece.is_empty()).then(|| piece.freeze()))
    }

    /// The first `length` bytes read.
    fn take_input(&mut self, length: usize) -> Bytes {
        if length <= COPY_UP_TO {
            let piece = Bytes::copy_from_slice(&self.input[..length]);
            self.input.advance(length);
            piece
        } else {
            self.input.split_to(length).freeze()
        }
    }

    /// How much body is left, when the framing says.
    pub(crate) fn body_left(&self) -> Option<u64> {
        match self.inbound {
            Inbound::Length(left) => Some(left),
            Inbound::Done => Some(0),
            Inbound::Head | Inbound::Chunked(_) | Inbound::UntilClose => None,
        }
    }

    /// How long the upstream keeps the connection open between requests, when it said.
    pub(super) fn keep_alive(&self) -> Option<Duration> {
        self.keep_alive
    }

    /// Bytes written to the upstream so far.
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    pub(crate) fn body_done(&self) -> bool {
        matches!(self.inbound, Inbound::Done)
    }

    /// Whether the connection can take another request now: the exchange ended cleanly, the
    /// upstream did not ask to close, and nothing arrived that no request asked for.
    pub(crate) fn reusable(&self) -> bool {
        !self.closing
            && matches!(self.inbound, Inbound::Done)
            && matches!(self.outbound, Outbound::Done)
            && self.output.is_empty()
            && self.input.is_empty()
    }

    /// Lets go of buffers a large exchange grew (a waiting connection keeps one read's worth).
    pub(super) fn trim(&mut self) {
        if self.input.capacity() > 2 * READ_SIZE {
            self.input = BytesMut::new();
        }
        if self.output.capacity() > READ_SIZE {
            self.output = BytesMut::new();
        }
    }

    /// For a connection waiting in the pool: whether the upstream has not closed it (or sent
    /// something unasked).
    pub(super) fn still_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let mut probe = [0u8; 1];
        let mut buf = ReadBuf::new(&mut probe);
        matches!(
            Pin::new(&mut self.io).poll_read(&mut cx, &mut buf),
            Poll::Pending
        )
    }

    /// Writes what is queued, pulling the request body as the socket takes it.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Result<(), H1Error> {
        if std::mem::take(&mut self.head_queued) {
            // The head goes out with what the body has ready (or alone, if it has nothing yet).
            self.pull_body(cx)?;
        }
        loop {
            while !self.output.is_empty() {
                match Pin::new(&mut self.io).poll_write(cx, &self.output) {
                    Poll::Ready(Ok(0)) => {
                        return Err(io::Error::from(io::ErrorKind::WriteZero).into());
                    }
                    Poll::Ready(Ok(written)) => {
                        self.output.advance(written);
                        self.written += written as u64;
                    }
                    Poll::Ready(Err(error)) => return Err(error.into()),
                    Poll::Pending => return Ok(()),
                }
            }
            // TLS holds written bytes until flushed.
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Err(error)) => return Err(error.into()),
                Poll::Ready(Ok(())) | Poll::Pending => {}
            }
            if matches!(self.outbound, Outbound::Done) || !self.pull_body(cx)? {
                return Ok(());
            }
        }
    }

    /// Queues the next piece of the request body (or its end); false when it has none ready.
    fn pull_body(&mut self, cx: &mut Context<'_>) -> Result<bool, H1Error> {
        let (body, chunked) = match &mut self.outbound {
            Outbound::Done => return Ok(false),
            Outbound::Length(body) => (body, false),
            Outbound::Chunked(body) => (body, true),
        };
        match Pin::new(body).poll_frame(cx) {
            Poll::Pending => Ok(false),
            Poll::Ready(None) => {
                if chunked {
                    self.output.put_slice(b"0\r\n\r\n");
                }
                self.outbound = Outbound::Done;
                Ok(true)
            }
            Poll::Ready(Some(Err(error))) => {
                self.outbound = Outbound::Done;
                self.output.clear();
                Err(H1Error::RequestBody(error))
            }
            Poll::Ready(Some(Ok(frame))) => {
                // Trailers of a request body are not passed on.
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                {
                    if chunked {
                        let size = format!("{:x}\r\n", data.len());
                        self.output.put_slice(size.as_bytes());
                        self.output.put_slice(&data);
                        self.output.put_slice(b"\r\n");
                    } else {
                        self.output.put_slice(&data);
                    }
                }
                Ok(true)
            }
        }
    }

    /// Reads once into `input`.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.input.capacity() - self.input.len() < READ_SIZE / 4 {
            self.input.reserve(READ_SIZE);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.input)
    }

    /// Parses the response head if it has all arrived; skips informational (1xx) responses.
    fn parse_head(&mut self) -> Result<Option<ResponseHead>, H1Error> {
        loop {
            // Left uninitialised: zeroing room for every header cost more than parsing the few
            // a response has.
            let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut []);
            let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut response,
                &self.input,
                &mut headers,
            );
            let length = match parsed {
                Ok(httparse::Status::Complete(length)) => length,
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(_) => return Err(H1Error::Malformed("unparsable response head")),
            };
            let code = response.code.ok_or(H1Error::Malformed("no status"))?;
            let status =
                StatusCode::from_u16(code).map_err(|_| H1Error::Malformed("invalid status"))?;
            if status.is_informational() {
                if status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(H1Error::Malformed("a 101 to a request that asked for none"));
                }
                self.input.advance(length);
                continue;
            }
            let version = if response.version == Some(1) {
                Version::HTTP_11
            } else {
                Version::HTTP_10
            };
            let no_body = self.head_request
                || status == StatusCode::NO_CONTENT
                || status == StatusCode::NOT_MODIFIED;
            let mut map = HeaderMap::with_capacity(response.headers.len());
            let mut lengths = None::<u64>;
            // Whether a Transfer-Encoding was sent: only `chunked`, once, is passed on (another
            // coding would reach the client undeclared once the edge has removed the header).
            let mut chunked = false;
            let mut close = version == Version::HTTP_10;
            // One copy of the head, which every header value is a slice of.
            let raw = Bytes::copy_from_slice(&self.input[..length]);
            let start = self.input.as_ptr() as usize;
            for header in response.headers.iter() {
                let name = HeaderName::from_bytes(header.name.as_bytes())
                    .map_err(|_| H1Error::Malformed("invalid header name"))?;
                if name == header::CONTENT_LENGTH {
                    let length = parse_length(header.value)
                        .ok_or(H1Error::Malformed("invalid Content-Length"))?;
                    if lengths.is_some_and(|seen| seen != length) {
                        return Err(H1Error::Malformed("conflicting Content-Length"));
                    }
                    lengths = Some(length);
                    // The edge frames the body it passes on itself: a length stays only where
                    // there is no body to frame (it then describes the representation).
                    if !no_body {
                        continue;
                    }
                } else if name == header::TRANSFER_ENCODING {
                    let mut codings = header
                        .value
                        .split(|&b| b == b',')
                        .map(<[u8]>::trim_ascii)
                        .filter(|coding| !coding.is_empty());
                    let only_chunked = codings
                        .next()
                        .is_some_and(|coding| coding.eq_ignore_ascii_case(b"chunked"))
                        && codings.next().is_none();
                    if chunked || !only_chunked {
                        return Err(H1Error::Malformed("a Transfer-Encoding other than chunked"));
                    }
                    chunked = true;
                    continue;
                } else if name == "keep-alive" {
                    self.keep_alive = keep_alive_timeout(header.value).or(self.keep_alive);
                } else if name == header::CONNECTION {
                    close |= header
                        .value
                        .split(|&b| b == b',')
                        .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
                }
                // Made only for what is passed on: the framing headers were read above.
                let at = header.value.as_ptr() as usize - start;
                let value = HeaderValue::from_maybe_shared(raw.slice(at..at + header.value.len()))
                    .map_err(|_| H1Error::Malformed("invalid header value"))?;
                map.append(name, value);
            }
            self.input.advance(length);
            self.inbound = if no_body {
                Inbound::Done
            } else {
                match (chunked, lengths) {
                    (true, _) => Inbound::Chunked(Chunked::default()),
                    (false, None) => {
                        close = true;
                        Inbound::UntilClose
                    }
                    (false, Some(0)) => Inbound::Done,
                    (false, Some(length)) => Inbound::Length(length),
                }
            };
            // Both a length and a coding: the coding frames the body, and a connection whose
            // framing was ambiguous is not used again.
            if chunked && lengths.is_some() {
                close = true;
            }
            self.closing |= close;
            return Ok(Some(ResponseHead {
                status,
                headers: map,
            }));
        }
    }
}

/// The `timeout=N` (seconds) of a Keep-Alive header.
fn keep_alive_timeout(value: &[u8]) -> Option<Duration> {
    value.split(|&b| b == b',').find_map(|parameter| {
        let (name, seconds) = std::str::from_utf8(parameter).ok()?.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("timeout") {
            return None;
        }
        seconds.trim().parse().ok().map(Duration::from_secs)
    })
}

/// A Content-Length value: digits only (a list of equal values, as some servers send, too).
fn parse_length(value: &[u8]) -> Option<u64> {
    let mut length = None;
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let parsed = std::str::from_utf8(part).ok()?.parse::<u64>().ok()?;
        if length.is_some_and(|seen| seen != parsed) {
            return None;
        }
        length = Some(parsed);
    }
    length
}

#[cfg(test)]
mod tests;
