//! A WebSocket upstream: the route's targets tried in turn (`targets.rs`), and for each try TCP
//! (+ TLS for `wss://`) and the client side of the WebSocket handshake.
//!
//! The handshake is written here rather than taken from tungstenite's client because the edge
//! needs what that client hides or refuses: the upstream's refusal status (passed on to the
//! client), an upstream that declines every offered subprotocol (legal per RFC 6455), and a
//! bound on the response size.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use http::{HeaderValue, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::targets::Targets;
use crate::config::settings::{RouteSettings, TargetSettings};
use crate::forward::{ShapedRequest, UpstreamRequest};
use crate::ws::io::Io;

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
    affinity: Option<u64>,
    request: &ShapedRequest,
    request_id: &str,
) -> Result<UpstreamConnection, ConnectError> {
    let mut last = None;
    for i in health.in_order(affinity) {
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

/// TCP to a target, and TLS over it for `wss://` (and `https://`).
pub(crate) async fn open(target: &TargetSettings) -> io::Result<Io> {
    let tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
    // Chat traffic is many small messages; Nagle would hold each token back.
    tcp.set_nodelay(true)?;
    match &target.tls {
        None => Ok(Io::Tcp(tcp)),
        Some((config, server_name)) => {
            let tls = TlsConnector::from(config.clone())
                .connect(server_name.clone(), tcp)
                .await?;
            Ok(Io::ClientTls(Box::new(tls)))
        }
    }
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
    let mut io = open(target).await.map_err(ConnectError::Unreachable)?;

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
