//! Reaching an upstream: the route's targets tried in round-robin order with passive health
//! (a target that failed is passed over for a cool-down), and for each try TCP (+ TLS for
//! `wss://`) and the client side of the WebSocket handshake.
//!
//! The handshake is written here rather than taken from tungstenite's client because the edge
//! needs what that client hides or refuses: the upstream's refusal status (passed on to the
//! client), an upstream that declines every offered subprotocol (legal per RFC 6455), and a
//! bound on the response size.

use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::{HeaderValue, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::config::settings::{RouteSettings, TargetSettings};
use crate::forward::{ShapedRequest, UpstreamRequest};
use crate::ws::io::Io;

/// A route's targets as they fare: where the round robin stands, and which targets are being
/// passed over after a failure.
pub(crate) struct Targets {
    next: AtomicUsize,
    /// Per target: until when (ms on [`clock_ms`]) it is passed over.
    down_until: Box<[AtomicU64]>,
}

/// Milliseconds since the first call: a cheap monotonic clock that fits in an atomic.
fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl Targets {
    pub(crate) fn new(count: usize) -> Self {
        Self {
            next: AtomicUsize::new(0),
            down_until: (0..count).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Target indices in the order to try them: the healthy ones from the round-robin
    /// position, then those cooling down — a last resort is better than refusing untried.
    fn in_order(&self) -> Vec<usize> {
        let count = self.down_until.len();
        let start = if count > 1 {
            self.next.fetch_add(1, Ordering::Relaxed) % count
        } else {
            0
        };
        let now = clock_ms();
        let (mut order, cooling): (Vec<usize>, Vec<usize>) = (0..count)
            .map(|i| (start + i) % count)
            .partition(|&i| self.down_until[i].load(Ordering::Relaxed) <= now);
        order.extend(cooling);
        order
    }

    /// Passes target `i` over for `cooldown` after it failed.
    fn mark_down(&self, i: usize, cooldown: Duration) {
        self.down_until[i].store(clock_ms() + cooldown.as_millis() as u64, Ordering::Relaxed);
    }

    fn mark_up(&self, i: usize) {
        if self.down_until[i].load(Ordering::Relaxed) != 0 {
            self.down_until[i].store(0, Ordering::Relaxed);
        }
    }
}

pub(crate) struct UpstreamConnection {
    pub(crate) io: Io,
    /// What the upstream sent right behind its 101: the first frames.
    pub(crate) leftover: Vec<u8>,
    /// The subprotocol the upstream selected, if any.
    pub(crate) protocol: Option<HeaderValue>,
    /// Which target answered, as logs may show it.
    pub(crate) url: String,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("upstream unreachable: {0}")]
    Unreachable(io::Error),
    #[error("upstream handshake timed out")]
    Timeout,
    #[error("upstream refused the upgrade with {0}")]
    Refused(StatusCode),
    #[error("upstream answered with an invalid handshake: {0}")]
    BadResponse(&'static str),
}

/// Tries the route's targets in round-robin order until one accepts. A refusal is the
/// upstream's answer, not a failure to try elsewhere; otherwise the last failure is returned.
pub(crate) async fn connect_any(
    route: &RouteSettings,
    health: &Targets,
    request: &ShapedRequest,
    request_id: &str,
) -> Result<UpstreamConnection, ConnectError> {
    let mut last = None;
    for i in health.in_order() {
        let Some(target) = route.targets.get(i) else {
            continue;
        };
        let request = request.for_target(target);
        match connect(target, &request, route.connect_timeout).await {
            Ok(connection) => {
                health.mark_up(i);
                return Ok(connection);
            }
            Err(error) => {
                tracing::warn!(request_id = %request_id, upstream = %target.url, %error, "upstream connect failed");
                if let ConnectError::Refused(_) = error {
                    return Err(error);
                }
                health.mark_down(i, route.upstream_cooldown);
                last = Some(error);
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        ConnectError::Unreachable(io::Error::new(
            io::ErrorKind::NotFound,
            "the route has no upstream target",
        ))
    }))
}

/// The largest upgrade response the edge reads from an upstream.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

async fn connect(
    target: &TargetSettings,
    request: &UpstreamRequest<'_>,
    timeout: Duration,
) -> Result<UpstreamConnection, ConnectError> {
    tokio::time::timeout(timeout, connect_inner(target, request))
        .await
        .unwrap_or(Err(ConnectError::Timeout))
}

async fn connect_inner(
    target: &TargetSettings,
    request: &UpstreamRequest<'_>,
) -> Result<UpstreamConnection, ConnectError> {
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(ConnectError::Unreachable)?;
    // Chat traffic is many small messages; Nagle would hold each token back.
    tcp.set_nodelay(true).map_err(ConnectError::Unreachable)?;
    let mut io = match &target.tls {
        None => Io::Tcp(tcp),
        Some((config, server_name)) => {
            let tls = TlsConnector::from(config.clone())
                .connect(server_name.clone(), tcp)
                .await
                .map_err(ConnectError::Unreachable)?;
            Io::ClientTls(Box::new(tls))
        }
    };

    let key = generate_key();
    let head = request_head(target, request, &key);
    io.write_all(&head)
        .await
        .map_err(ConnectError::Unreachable)?;
    io.flush().await.map_err(ConnectError::Unreachable)?;

    let mut buffer = BytesMut::with_capacity(1024);
    let (head_len, status, protocol, accept_ok, upgrade_ok) = loop {
        if buffer.len() >= MAX_RESPONSE_HEAD {
            return Err(ConnectError::BadResponse("response head too large"));
        }
        let read = io
            .read_buf(&mut buffer)
            .await
            .map_err(ConnectError::Unreachable)?;
        if read == 0 {
            return Err(ConnectError::Unreachable(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "upstream closed the connection during the handshake",
            )));
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buffer) {
            Ok(httparse::Status::Partial) => continue,
            Err(_) => return Err(ConnectError::BadResponse("unparsable response")),
            Ok(httparse::Status::Complete(len)) => {
                let status = response
                    .code
                    .and_then(|code| StatusCode::from_u16(code).ok())
                    .ok_or(ConnectError::BadResponse("no status"))?;
                let header = |name: &str| {
                    response
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| h.value)
                };
                let expected_accept = derive_accept_key(key.as_bytes());
                let accept_ok = header("sec-websocket-accept") == Some(expected_accept.as_bytes());
                let upgrade_ok = header("upgrade")
                    .is_some_and(|v| v.eq_ignore_ascii_case(b"websocket"))
                    && header("connection").is_some_and(|v| {
                        v.split(|b| *b == b',')
                            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
                    });
                let protocol = match header("sec-websocket-protocol") {
                    None => None,
                    Some(value) => Some(
                        HeaderValue::from_bytes(value)
                            .map_err(|_| ConnectError::BadResponse("invalid subprotocol"))?,
                    ),
                };
                break (len, status, protocol, accept_ok, upgrade_ok);
            }
        }
    };

    if status != StatusCode::SWITCHING_PROTOCOLS {
        return Err(ConnectError::Refused(status));
    }
    if !upgrade_ok {
        return Err(ConnectError::BadResponse(
            "missing Upgrade/Connection headers",
        ));
    }
    if !accept_ok {
        return Err(ConnectError::BadResponse("wrong Sec-WebSocket-Accept"));
    }
    if let Some(chosen) = &protocol {
        let offered = request.subprotocols.unwrap_or("");
        let chosen = chosen.to_str().unwrap_or("");
        if !offered.split(',').any(|p| p.trim() == chosen) {
            return Err(ConnectError::BadResponse(
                "selected a subprotocol that was not offered",
            ));
        }
    }

    let leftover = buffer.split_off(head_len).to_vec();
    Ok(UpstreamConnection {
        io,
        leftover,
        protocol,
        url: target.url.clone(),
    })
}

fn request_head(target: &TargetSettings, request: &UpstreamRequest<'_>, key: &str) -> Vec<u8> {
    let mut head = Vec::with_capacity(512);
    let mut line = |parts: &[&[u8]]| {
        for part in parts {
            head.extend_from_slice(part);
        }
        head.extend_from_slice(b"\r\n");
    };
    line(&[b"GET ", request.path_and_query.as_bytes(), b" HTTP/1.1"]);
    line(&[b"Host: ", target.authority.as_bytes()]);
    line(&[b"Upgrade: websocket"]);
    line(&[b"Connection: Upgrade"]);
    line(&[b"Sec-WebSocket-Key: ", key.as_bytes()]);
    line(&[b"Sec-WebSocket-Version: 13"]);
    if let Some(protocols) = request.subprotocols {
        line(&[b"Sec-WebSocket-Protocol: ", protocols.as_bytes()]);
    }
    for (name, value) in request.headers {
        line(&[name.as_str().as_bytes(), b": ", value.as_bytes()]);
    }
    line(&[]);
    head
}
