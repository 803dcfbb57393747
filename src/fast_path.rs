//! The edge's own reader for the plainest requests of a keep-alive connection: a `GET` over
//! HTTP/1.1 without a body, an upgrade or an expectation — what REST polling, long-polling and
//! Server-Sent Events send over and over. It parses the head with the parser hyper uses
//! (httparse, with the same strictness), hands the request to the same dispatch, and writes
//! the response itself, with hyper's framing: `content-length` when the length is known,
//! chunked otherwise, nothing after a 1xx, 204 or 304; a `date`; every frame written as it
//! comes (an SSE event is not held back).
//!
//! Anything else — an upgrade, a body, HTTP/1.0, a head too large, a target that is not
//! origin-form, a header the `http` crate would not take — is not judged here: the connection
//! goes to hyper with the bytes read so far put back in front, and hyper serves the rest of it
//! as it serves every connection. This path adds no rule of its own, only speed: hyper's
//! machinery was about a third of the edge's instructions per proxied GET.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Body;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::admission::ClientConn;
use crate::auth::memo::TokenMemo;
use crate::deadline::LazyDeadline;
use crate::dispatch::{self, EdgeBody};
use crate::passthrough::body::ClientBody;
use crate::state::Shared;
use crate::ws::io::Io;

/// The most of a response gathered for one write.
const WRITE_BATCH: usize = 64 * 1024;

/// Headers one request may have here (more: hyper judges it).
const MAX_HEADERS: usize = 64;

/// The end of a head (and of one with bare LF line ends), and the word every upgrade has:
/// searchers made once, not per request.
static HEAD_END: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\r\n\r\n"));
static BARE_LF_END: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\n\n"));
static UPGRADE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"pgrade"));

/// How the edge's reader left the connection.
pub(crate) enum Left {
    /// Closed: the client went, timed out, or the edge drains.
    Closed,
    /// For hyper, with what was read and not served.
    ToHyper(Bytes),
}

/// How reading a request head ended.
pub(crate) enum HeadRead {
    /// A whole head: its length at the start of the input.
    Whole(usize),
    /// Larger than `max_header_size`, or ended by bare LFs: hyper judges it as it judges any.
    TooLarge,
    /// The client went, or the edge drains.
    Closed,
    /// No whole head by the deadline.
    TimedOut,
}

/// Reads into `input` until it holds a whole request head, by `deadline`.
pub(crate) async fn read_head(
    io: &mut Io,
    input: &mut BytesMut,
    deadline: &mut LazyDeadline,
    shared: &Shared,
    max_head: usize,
) -> HeadRead {
    loop {
        if let Some(end) = HEAD_END.find(input) {
            return HeadRead::Whole(end + 4);
        }
        // Line ends of a bare LF, which hyper accepts: its to judge.
        if !input.is_empty() && BARE_LF_END.find(input).is_some() {
            return HeadRead::TooLarge;
        }
        if input.len() > max_head {
            return HeadRead::TooLarge;
        }
        if input.capacity() - input.len() < 1024 {
            input.reserve(4096);
        }
        let read = tokio::select! {
            biased;
            read = io.read_buf(input) => read,
            () = deadline.passed() => return HeadRead::TimedOut,
            () = shared.shutdown.cancelled(), if input.is_empty() => return HeadRead::Closed,
        };
        match read {
            Ok(0) | Err(_) => return HeadRead::Closed,
            Ok(_) => {}
        }
    }
}

/// Whether a head is an upgrade's (or names one): hyper's, whatever else it says. A look
/// before any parsing.
pub(crate) fn is_upgrade(head: &[u8]) -> bool {
    UPGRADE.find(head).is_some()
}

/// A connection as the edge's reader takes it: what was read, of which the first `head_len`
/// bytes are a whole request head, and the deadline of the heads to come.
pub(crate) struct Reading<'a> {
    pub(crate) input: BytesMut,
    pub(crate) head_len: usize,
    pub(crate) deadline: &'a mut LazyDeadline,
}

/// Serves plain GETs on `io`, beginning with the request head `reading` holds, until the
/// connection ends or a request is not one. `first_request` is told once the first of them is
/// taken.
pub(crate) async fn serve(
    io: &mut Io,
    reading: Reading<'_>,
    conn: ClientConn,
    shared: &Arc<Shared>,
    memo: &Arc<TokenMemo>,
    mut first_request: impl FnMut(),
) -> Left {
    let live = shared.live.load();
    let max_head = live.config.server.max_header_size;
    let head_timeout = live.config.server.handshake_timeout;
    drop(live);
    let Reading {
        mut input,
        mut head_len,
        deadline,
    } = reading;
    let mut first = true;
    loop {
        if !first {
            deadline.set(tokio::time::Instant::now() + head_timeout);
            head_len = match read_head(io, &mut input, deadline, shared, max_head).await {
                HeadRead::Whole(length) => length,
                HeadRead::TooLarge => return Left::ToHyper(input.freeze()),
                HeadRead::Closed | HeadRead::TimedOut => return Left::Closed,
            };
            if is_upgrade(&input[..head_len]) {
                return Left::ToHyper(input.freeze());
            }
        }
        let head = input.split_to(head_len).freeze();
        let (request, close) = match parse(&head) {
            Some(plain) => plain,
            None => {
                let mut all = BytesMut::with_capacity(head.len() + input.len());
                all.extend_from_slice(&head);
                all.extend_from_slice(&input);
                return Left::ToHyper(all.freeze());
            }
        };
        if first {
            first_request();
            first = false;
        }
        // Pinned here, where it lives, and watched by reference: the dispatch's state is
        // large, and a future that held it would copy it on every move. (In a block of its
        // own: its room is then shared with the response writer's.)
        let mut drain_due = None;
        let response = {
            let handled = std::pin::pin!(dispatch::handle(
                request,
                conn,
                shared.clone(),
                memo.clone()
            ));
            match watch(io, &mut input, shared, &mut drain_due, handled).await {
                Watched::Done(Ok(response)) => response,
                Watched::Done(Err(never)) => match never {},
                Watched::Gone => return Left::Closed,
            }
        };
        // The drain ends the connection too: the request in flight is answered, the ones
        // behind it are not. (The edge's own answer may end it as well, as hyper would: it
        // says so, and is read as it is written.)
        let close = close || shared.shutdown.is_cancelled();
        let watching = Watching {
            input: &mut input,
            shared,
            drain_due,
        };
        if !matches!(
            write_response(io, watching, response, close).await,
            Ok(false)
        ) {
            let _ = io.shutdown().await;
            return Left::Closed;
        }
        // Drained between the answer and the next request: nothing more is read.
        if shared.shutdown.is_cancelled() {
            let _ = io.shutdown().await;
            return Left::Closed;
        }
    }
}

/// What a response's writer watches while it waits for the body: the connection's input and
/// the edge's drain.
struct Watching<'a> {
    input: &'a mut BytesMut,
    shared: &'a Shared,
    drain_due: Option<tokio::time::Instant>,
}

/// What became of waiting on the upstream for a client.
enum Watched<T> {
    Done(T),
    /// The client went (or the edge drained past its grace): the wait was given up, and with
    /// it the upstream request.
    Gone,
}

/// How long a response still being made may go on once the edge drains (as for hyper's).
const DRAIN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Waits for `work` (a response, or its next frame) while watching the client, as hyper does
/// mid-message: a client that closes its connection is gone, and what was asked of the
/// upstream for it (a long-poll, an event stream) is dropped at once rather than held until the
/// upstream answers. Bytes that come meanwhile (a pipelined request) are kept in `input`, and
/// end the watch: as with hyper, a client that has sent its next request and then closes its
/// sending side still gets its answer. At the edge's drain, the response has `DRAIN_GRACE` to
/// finish (`drain_due`: when, once the drain was seen).
async fn watch<F: std::future::Future>(
    io: &mut Io,
    input: &mut BytesMut,
    shared: &Shared,
    drain_due: &mut Option<tokio::time::Instant>,
    mut work: std::pin::Pin<&mut F>,
) -> Watched<F::Output> {
    let mut watching = input.is_empty();
    loop {
        tokio::select! {
            biased;
            done = work.as_mut() => return Watched::Done(done),
            read = io.read_buf(input), if watching => match read {
                Ok(0) | Err(_) => return Watched::Gone,
                Ok(_) => watching = false,
            },
            () = shared.shutdown.cancelled() => {
                let due = *drain_due.get_or_insert_with(|| tokio::time::Instant::now() + DRAIN_GRACE);
                return match tokio::time::timeout_at(due, work).await {
                    Ok(done) => Watched::Done(done),
                    Err(_) => Watched::Gone,
                };
            }
        }
    }
}

/// Whether a `Connection` value names `close`.
fn says_close(value: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
}

/// The request in `head` when it is a plain GET this reader serves, and whether it asks to
/// close the connection after its response.
fn parse(head: &Bytes) -> Option<(Request<ClientBody>, bool)> {
    // Left uninitialised, as hyper leaves them: zeroing room for 64 cost more than parsing.
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    // A head that httparse ends elsewhere than the edge did (bare LF line ends) is hyper's:
    // the bytes between would otherwise be neither served nor passed on.
    let Ok(httparse::Status::Complete(length)) =
        parsed.parse_with_uninit_headers(head, &mut headers)
    else {
        return None;
    };
    if length != head.len() {
        return None;
    }
    if parsed.method != Some("GET") || parsed.version != Some(1) {
        return None;
    }
    let target = parsed.path.filter(|target| target.starts_with('/'))?;
    let Ok(uri) = Uri::from_maybe_shared(head.slice_ref(target.as_bytes())) else {
        return None;
    };
    let mut map = HeaderMap::with_capacity(parsed.headers.len());
    let mut close = false;
    for parsed_header in parsed.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(parsed_header.name.as_bytes()) else {
            return None;
        };
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::EXPECT
            || name == header::UPGRADE
        {
            return None;
        }
        let Ok(value) = HeaderValue::from_maybe_shared(head.slice_ref(parsed_header.value)) else {
            return None;
        };
        if name == header::CONNECTION {
            for token in value.as_bytes().split(|&b| b == b',') {
                match token.trim_ascii() {
                    t if t.eq_ignore_ascii_case(b"close") => close = true,
                    t if t.eq_ignore_ascii_case(b"keep-alive") => {}
                    // Anything else a Connection header names (hop-by-hop headers, `TE`): hyper.
                    _ => return None,
                }
            }
        }
        map.append(name, value);
    }
    let mut request = Request::new(ClientBody::Empty);
    *request.method_mut() = Method::GET;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = map;
    Some((request, close))
}

thread_local! {
    /// The `date` header of the current second, made once a second per thread.
    static DATE: RefCell<(u64, HeaderValue)> =
        const { RefCell::new((u64::MAX, HeaderValue::from_static(""))) };
}

fn date() -> HeaderValue {
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    DATE.with(|date| {
        let mut date = date.borrow_mut();
        if date.0 != second {
            let text = httpdate::fmt_http_date(now);
            date.1 = HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static(""));
            date.0 = second;
        }
        date.1.clone()
    })
}

/// How the body goes on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Writes a response as hyper would, ending the connection after it when `close` or the
/// response says so (true: it ends). An error (the client went, the body broke, the body did
/// not match its length) means the connection must not carry another response.
async fn write_response(
    io: &mut Io,
    mut watching: Watching<'_>,
    response: Response<EdgeBody>,
    close: bool,
) -> std::io::Result<bool> {
    let (parts, mut body) = response.into_parts();
    let status = parts.status;
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut out: Vec<u8> = Vec::with_capacity(512);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // One walk over the headers: what frames the body and ends the connection is learned on
    // the way, not looked up.
    let mut declared = None;
    let mut dated = false;
    let mut close = close;
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH {
            // The first valid length, where there is a body to frame; no other.
            if !bodiless && declared.is_none() {
                declared = value
                    .to_str()
                    .ok()
                    .and_then(|value| value.parse::<u64>().ok());
                if declared.is_some() {
                    put_header(&mut out, name.as_str(), value.as_bytes());
                }
            }
            continue;
        }
        if name == header::CONNECTION {
            close |= says_close(value.as_bytes());
            continue;
        }
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        dated |= name == header::DATE;
        put_header(&mut out, name.as_str(), value.as_bytes());
    }
    let framing = if bodiless {
        Framing::None
    } else if let Some(length) = declared.or_else(|| body.size_hint().exact()) {
        Framing::Length(length)
    } else {
        Framing::Chunked
    };
    if !dated {
        put_header(&mut out, "date", date().as_bytes());
    }
    match framing {
        Framing::Length(length) if declared.is_none() => {
            out.extend_from_slice(b"content-length: ");
            push_number(&mut out, length, 10);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => put_header(&mut out, "transfer-encoding", b"chunked"),
        _ => {}
    }
    if close {
        put_header(&mut out, "connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    if framing == Framing::None {
        return send(io, &mut out).await.map(|()| close);
    }
    let mut written = 0u64;
    // What is at hand goes in one write: the head with the first frame (a whole body, for
    // most), then each frame as it comes.
    loop {
        let frame = if out.is_empty() {
            let Watching {
                input,
                shared,
                drain_due,
            } = &mut watching;
            let next = std::pin::pin!(body.frame());
            match watch(io, input, shared, drain_due, next).await {
                Watched::Done(frame) => frame,
                Watched::Gone => {
                    return Err(std::io::Error::from(std::io::ErrorKind::ConnectionAborted));
                }
            }
        } else if out.len() >= WRITE_BATCH {
            // An upstream that always has more ready must not have its body gathered here:
            // what is at hand goes out first, at the client's pace.
            send(io, &mut out).await?;
            continue;
        } else {
            match futures_util::FutureExt::now_or_never(body.frame()) {
                Some(frame) => frame,
                None => {
                    send(io, &mut out).await?;
                    continue;
                }
            }
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(std::io::Error::other)?;
        let Ok(data) = frame.into_data() else {
            // Trailers are not passed on.
            continue;
        };
        if data.is_empty() {
            continue;
        }
        written += data.len() as u64;
        match framing {
            Framing::Length(length) if written > length => {
                return Err(std::io::Error::other("the body is longer than its length"));
            }
            Framing::Chunked => {
                push_number(&mut out, data.len() as u64, 16);
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&data);
                out.extend_from_slice(b"\r\n");
            }
            _ => out.extend_from_slice(&data),
        }
    }
    match framing {
        Framing::Length(length) if written != length => {
            send(io, &mut out).await?;
            Err(std::io::Error::other("the body is shorter than its length"))
        }
        Framing::Chunked => {
            out.extend_from_slice(b"0\r\n\r\n");
            send(io, &mut out).await.map(|()| close)
        }
        _ => send(io, &mut out).await.map(|()| close),
    }
}

/// `number` in `radix` (10 or 16, lowercase), written in place: `fmt` costs more than the
/// rest of a small response's head.
fn push_number(out: &mut Vec<u8>, mut number: u64, radix: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[(number % radix) as usize];
        number /= radix;
        if number == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

fn put_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

async fn send(io: &mut Io, out: &mut Vec<u8>) -> std::io::Result<()> {
    if !out.is_empty() {
        io.write_all(out).await?;
        out.clear();
    }
    io.flush().await
}

#[cfg(test)]
mod tests {
    use super::push_number;

    #[test]
    fn numbers_are_written_as_fmt_writes_them() {
        for number in [0u64, 1, 9, 10, 15, 16, 255, 4096, 1_234_567_890, u64::MAX] {
            let mut decimal = Vec::new();
            push_number(&mut decimal, number, 10);
            assert_eq!(decimal, number.to_string().as_bytes());
            let mut hex = Vec::new();
            push_number(&mut hex, number, 16);
            assert_eq!(hex, format!("{number:x}").as_bytes());
        }
    }
}
