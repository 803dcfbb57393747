//! The edge-to-edge link: how an edge that a resuming client reached asks the edge holding its
//! session to take the client. Over a TCP connection to the owner's link listener it sends one
//! request (a line naming the protocol and the request's HMAC-SHA256 under `[cluster] secret`,
//! then the request as a JSON line), and reads one answer line: `ok <subprotocol or ->` or
//! `refused <reason>`. After `ok` the connection carries the client's WebSocket bytes as they
//! are, both ways: the owner reads the client's masked frames as if the client were its own.
//!
//! The edge that asks has authenticated the client already (token, revocations, identity
//! rules); the owner checks that the session is this user's, as for a resume of its own. A
//! request is good for `MAX_AGE`, which bounds what a copied one could be replayed for.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::{constant_time, hmac};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::ws::close::NotResumable;

const MAGIC: &str = "wsedge-link/1";
/// Longer than any request (ids are bounded): more is not a request.
const MAX_HEAD: usize = 16 * 1024;
const MAX_AGE: Duration = Duration::from_secs(30);
/// How long either side waits for the other's line.
pub(crate) const LINK_TIMEOUT: Duration = Duration::from_secs(5);

/// A client the asking edge has admitted, for the session it names.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct LinkRequest {
    pub(crate) route: String,
    pub(crate) tenant: String,
    pub(crate) user: String,
    pub(crate) session_id: String,
    pub(crate) last_seq: u64,
    /// The conversation the client named, if it named one (a resume must match the session's).
    pub(crate) conversation: Option<String>,
    /// Unix seconds; the client is closed with 4001 then.
    pub(crate) token_expires_at: Option<u64>,
    pub(crate) jti: Option<String>,
    pub(crate) request_id: String,
    /// The instance that asks, for the owner's log.
    pub(crate) from: String,
    /// Unix milliseconds when it was made.
    pub(crate) sent_at: u64,
}

/// Why the owner does not take a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Declined {
    /// The session cannot be had.
    Session(NotResumable),
    /// The owner holds a revocation of the client's token or user.
    Revoked,
}

const REVOKED: &str = "revoked";

/// Why a link could not be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    #[error("the owner refused the resume: {}", .0.reason())]
    Refused(NotResumable),
    #[error("the owner holds a revocation of the client's token or user")]
    Revoked,
    #[error("cannot reach the owner: {0}")]
    Io(#[from] std::io::Error),
    #[error("the owner's answer is not one: {0}")]
    Garbled(&'static str),
    #[error("the other edge did not answer in time")]
    TimedOut,
}

/// Why a request read by the owner is not one it takes.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BadRequest {
    #[error("not a link request")]
    NotARequest,
    #[error("its signature does not verify (is [cluster] secret the same on every edge?)")]
    Signature,
    #[error("it is too old, or from the future (are the edges' clocks set?)")]
    Stale,
    #[error("it was taken before: a copy")]
    Replayed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn sign(secret: &[u8], body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hex(hmac::sign(&key, body).as_ref())
}

/// Reads up to `lines` lines (at most `MAX_HEAD` bytes in all); the lines and what came after.
async fn read_lines<S: AsyncRead + Unpin>(
    stream: &mut S,
    lines: usize,
) -> std::io::Result<Option<(Vec<String>, Bytes)>> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let ends: Vec<usize> = buffer
            .iter()
            .enumerate()
            .filter(|(_, byte)| **byte == b'\n')
            .map(|(i, _)| i)
            .take(lines)
            .collect();
        if ends.len() == lines {
            let end = ends[lines - 1] + 1;
            let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
            let rest = Bytes::copy_from_slice(&buffer[end..]);
            let read = head.lines().map(str::to_owned).collect();
            return Ok(Some((read, rest)));
        }
        if buffer.len() > MAX_HEAD {
            return Ok(None);
        }
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
}

/// The asking side: connects to `link`, sends `request`, and reads the owner's answer. On `ok`,
/// the connection (carrying the client from now on), the bytes the owner sent right after its
/// answer, and the subprotocol of the session.
pub(crate) async fn ask(
    link: &str,
    secret: &[u8],
    request: &LinkRequest,
) -> Result<(TcpStream, Bytes, Option<String>), LinkError> {
    let asked = async {
        let mut stream = TcpStream::connect(link).await?;
        stream.set_nodelay(true)?;
        let body = serde_json::to_string(request).map_err(|_| LinkError::Garbled("request"))?;
        let head = format!("{MAGIC} {}\n{body}\n", sign(secret, body.as_bytes()));
        stream.write_all(head.as_bytes()).await?;
        let Some((lines, rest)) = read_lines(&mut stream, 1).await? else {
            return Err(LinkError::Garbled("closed before answering"));
        };
        let answer = lines.first().map(String::as_str).unwrap_or("");
        match answer.split_once(' ') {
            Some(("ok", "-")) => Ok((stream, rest, None)),
            Some(("ok", protocol)) => Ok((stream, rest, Some(protocol.to_owned()))),
            Some(("refused", REVOKED)) => Err(LinkError::Revoked),
            // A reason this edge does not know (a newer owner's) is a session that cannot be
            // had, never one to start afresh here.
            Some(("refused", label)) => Err(LinkError::Refused(
                NotResumable::from_label(label).unwrap_or(NotResumable::Closed),
            )),
            _ => Err(LinkError::Garbled("unknown answer")),
        }
    };
    tokio::time::timeout(LINK_TIMEOUT, asked)
        .await
        .map_err(|_| LinkError::TimedOut)?
}

/// A request as the owner read it: what it asks, its signature (each is taken once) and the
/// client's bytes that came behind it.
pub(crate) struct Received {
    pub(crate) request: LinkRequest,
    pub(crate) signature: String,
    pub(crate) rest: Bytes,
}

/// The owner's side: the request on a link connection, verified, and the bytes after it.
pub(crate) async fn read_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    secret: &[u8],
) -> Result<Received, BadRequest> {
    let Some((lines, rest)) = read_lines(stream, 2).await? else {
        return Err(BadRequest::NotARequest);
    };
    let (Some(first), Some(body)) = (lines.first(), lines.get(1)) else {
        return Err(BadRequest::NotARequest);
    };
    let Some(mac) = first.strip_prefix(MAGIC).and_then(|m| m.strip_prefix(' ')) else {
        return Err(BadRequest::NotARequest);
    };
    let expected = sign(secret, body.as_bytes());
    if constant_time::verify_slices_are_equal(mac.as_bytes(), expected.as_bytes()).is_err() {
        return Err(BadRequest::Signature);
    }
    let request: LinkRequest = serde_json::from_str(body).map_err(|_| BadRequest::NotARequest)?;
    if now_ms().abs_diff(request.sent_at) > MAX_AGE.as_millis() as u64 {
        return Err(BadRequest::Stale);
    }
    Ok(Received {
        request,
        signature: mac.to_owned(),
        rest,
    })
}

/// The signatures of the requests taken within `MAX_AGE` (and a little more): a request copied
/// off the network cannot be sent again while it is young enough to be taken.
#[derive(Default)]
pub(crate) struct TakenRequests {
    taken: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

impl TakenRequests {
    /// Whether `signature` is taken for the first time (and now it is).
    pub(crate) fn first_use(&self, signature: &str) -> bool {
        let mut taken = self
            .taken
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = std::time::Instant::now();
        taken.retain(|_, at| now.duration_since(*at) <= 2 * MAX_AGE);
        taken.insert(signature.to_owned(), now).is_none()
    }
}

/// The owner's answer: the session takes the client (with its subprotocol), or why not.
pub(crate) async fn answer<S: AsyncWrite + Unpin>(
    stream: &mut S,
    outcome: Result<Option<&str>, Declined>,
) -> std::io::Result<()> {
    let line = match outcome {
        Ok(protocol) => format!("ok {}\n", protocol.unwrap_or("-")),
        Err(Declined::Session(why)) => format!("refused {}\n", why.label()),
        Err(Declined::Revoked) => format!("refused {REVOKED}\n"),
    };
    stream.write_all(line.as_bytes()).await?;
    stream.flush().await
}

impl LinkRequest {
    pub(crate) fn stamped(mut self) -> Self {
        self.sent_at = now_ms();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> LinkRequest {
        LinkRequest {
            route: "/ws".into(),
            tenant: "acme".into(),
            user: "alice".into(),
            session_id: "s1".into(),
            last_seq: 7,
            conversation: None,
            token_expires_at: Some(2_000_000_000),
            jti: None,
            request_id: "r1".into(),
            from: "edge-b.1".into(),
            sent_at: 0,
        }
        .stamped()
    }

    async fn sent(secret: &[u8], request: &LinkRequest, after: &[u8]) -> Vec<u8> {
        let body = serde_json::to_string(request).unwrap();
        let mut bytes = format!("{MAGIC} {}\n{body}\n", sign(secret, body.as_bytes())).into_bytes();
        bytes.extend_from_slice(after);
        bytes
    }

    #[tokio::test]
    async fn a_signed_request_is_read_back_with_what_follows_it() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let request = request();
        let bytes = sent(secret, &request, b"\x81\x85frame").await;
        let received = read_request(&mut bytes.as_slice(), secret).await.unwrap();
        assert_eq!(received.request, request);
        assert_eq!(&received.rest[..], b"\x81\x85frame");
        let taken = TakenRequests::default();
        assert!(taken.first_use(&received.signature));
        assert!(!taken.first_use(&received.signature), "a copy is refused");
    }

    #[tokio::test]
    async fn another_secret_a_changed_body_or_an_old_request_is_refused() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let bytes = sent(b"another secret, just as long....", &request(), b"").await;
        assert!(matches!(
            read_request(&mut bytes.as_slice(), secret).await,
            Err(BadRequest::Signature)
        ));
        let tampered = String::from_utf8(sent(secret, &request(), b"").await)
            .unwrap()
            .replace("alice", "mallory");
        assert!(matches!(
            read_request(&mut tampered.as_bytes(), secret).await,
            Err(BadRequest::Signature)
        ));
        let mut old = request();
        old.sent_at -= 60_000;
        let bytes = sent(secret, &old, b"").await;
        assert!(matches!(
            read_request(&mut bytes.as_slice(), secret).await,
            Err(BadRequest::Stale)
        ));
        assert!(matches!(
            read_request(&mut &b"GET / HTTP/1.1\r\n\r\n"[..], secret).await,
            Err(BadRequest::NotARequest)
        ));
    }
}
