//! The frame pump: messages both ways, in order, with backpressure, and the closing of both
//! sides with codes that say what happened.
//!
//! Each direction reads from one socket and writes to the other with no queue in between:
//! when the reader of one side is slow, its writes stall, the pump stops reading the other
//! side, and TCP pushes back on the sender. Whatever is already readable is fed before a
//! single flush, so a burst of LLM tokens costs one write, not one per token.
//!
//! Pings and pongs are per hop: tungstenite answers each side's pings itself, and the pump
//! never forwards control frames (forwarding would produce duplicate pongs).

use std::time::Duration;

use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

/// Close codes the edge itself sends (PRODUCT.md).
pub mod codes {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;
    pub const BAD_GATEWAY: u16 = 1014;
    pub const TOKEN_EXPIRED: u16 = 4001;
}

/// How long the edge waits for a peer to answer its close frame before dropping the socket.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

/// Why one direction of the pump stopped.
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
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Traffic {
    pub messages: u64,
    pub bytes: u64,
}

/// What happened to a relayed connection, for logs and metrics.
#[derive(Debug, Clone)]
pub struct RelayReport {
    /// The side whose action ended the session (`None` when the edge shut down).
    pub ended_by: Option<Side>,
    /// The close code sent to (or passed on to) the client, if any.
    pub client_close: Option<u16>,
    /// The close code sent to (or passed on to) the upstream, if any.
    pub upstream_close: Option<u16>,
    pub client_to_upstream: Traffic,
    pub upstream_to_client: Traffic,
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

/// Relays until either side ends or `shutdown` fires, then closes both sides.
pub async fn relay<C, U>(
    client: WebSocketStream<C>,
    upstream: WebSocketStream<U>,
    shutdown: CancellationToken,
) -> RelayReport
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_tx, mut client_rx) = client.split();
    let (mut upstream_tx, mut upstream_rx) = upstream.split();
    let mut up = Traffic::default();
    let mut down = Traffic::default();

    let outcome = {
        let client_to_upstream = pump(&mut client_rx, &mut upstream_tx, &mut up);
        let upstream_to_client = pump(&mut upstream_rx, &mut client_tx, &mut down);
        tokio::select! {
            end = client_to_upstream => Some((Side::Client, end)),
            end = upstream_to_client => Some((Side::Upstream, end)),
            () = shutdown.cancelled() => None,
        }
    };

    // Each tuple: (close to send to the client, close to send upstream); `None` = that side is gone.
    let (to_client, to_upstream, ended_by): (
        Option<Option<CloseFrame>>,
        Option<Option<CloseFrame>>,
        _,
    ) = match outcome {
        None => (
            Some(frame(codes::GOING_AWAY, "edge shutting down")),
            Some(frame(codes::GOING_AWAY, "edge shutting down")),
            None,
        ),
        Some((side, end)) => {
            let (to_source, to_other) = match (side, end) {
                // The source's close was already answered by tungstenite; pass it on as is.
                (_, End::Closed(close)) => (None, Some(close)),
                (Side::Client, End::Lost) => {
                    (None, Some(frame(codes::GOING_AWAY, "client went away")))
                }
                (Side::Upstream, End::Lost) => {
                    (None, Some(frame(codes::BAD_GATEWAY, "upstream failed")))
                }
                (Side::Client, End::TooBig) => (
                    Some(frame(codes::TOO_BIG, "message too big")),
                    Some(frame(codes::GOING_AWAY, "client went away")),
                ),
                (Side::Upstream, End::TooBig) => (
                    Some(frame(codes::TOO_BIG, "message too big")),
                    Some(frame(codes::BAD_GATEWAY, "upstream failed")),
                ),
                (Side::Client, End::Protocol(code)) => (
                    Some(frame(code, "protocol error")),
                    Some(frame(codes::GOING_AWAY, "client went away")),
                ),
                (Side::Upstream, End::Protocol(code)) => (
                    Some(frame(code, "protocol error")),
                    Some(frame(codes::BAD_GATEWAY, "upstream failed")),
                ),
                // The destination is gone: tell the source why, as if the destination had been lost.
                (Side::Client, End::DestinationLost) => {
                    (Some(frame(codes::BAD_GATEWAY, "upstream failed")), None)
                }
                (Side::Upstream, End::DestinationLost) => {
                    (Some(frame(codes::GOING_AWAY, "client went away")), None)
                }
            };
            match side {
                Side::Client => (to_source, to_other, Some(Side::Client)),
                Side::Upstream => (to_other, to_source, Some(Side::Upstream)),
            }
        }
    };

    let mut report = RelayReport {
        ended_by,
        client_close: to_client.as_ref().and_then(code_of),
        upstream_close: to_upstream.as_ref().and_then(code_of),
        client_to_upstream: up,
        upstream_to_client: down,
    };
    let client = client_rx.reunite(client_tx);
    let upstream = upstream_rx.reunite(upstream_tx);
    match (client, upstream) {
        (Ok(mut client), Ok(mut upstream)) => {
            tokio::join!(
                finish(&mut client, to_client),
                finish(&mut upstream, to_upstream)
            );
        }
        // Cannot happen (each pair was split from one stream); dropping closes both sockets.
        _ => {
            report.client_close = None;
            report.upstream_close = None;
        }
    }
    report
}

/// Sends our close (if any), then waits briefly for the peer's close or EOF so that the close
/// handshake completes and the peer sees a clean end rather than a reset.
async fn finish<S>(ws: &mut WebSocketStream<S>, close: Option<Option<CloseFrame>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if let Some(close) = close {
            if ws.close(close).await.is_err() {
                return;
            }
        }
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

enum Item {
    Data(Message),
    Control,
    End(End),
}

fn classify(item: Option<Result<Message, WsError>>) -> Item {
    match item {
        Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => Item::Data(message),
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Item::Control,
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

fn count(traffic: &mut Traffic, message: &Message) {
    traffic.messages += 1;
    traffic.bytes += message.len() as u64;
}

async fn pump<S, K>(source: &mut S, destination: &mut K, traffic: &mut Traffic) -> End
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
    K: Sink<Message, Error = WsError> + Unpin,
{
    loop {
        match classify(source.next().await) {
            Item::Data(message) => {
                count(traffic, &message);
                if destination.feed(message).await.is_err() {
                    return End::DestinationLost;
                }
            }
            Item::Control => continue,
            Item::End(end) => return end,
        }
        // Feed whatever is already readable, then flush once.
        let mut ended = None;
        while let Some(item) = source.next().now_or_never() {
            match classify(item) {
                Item::Data(message) => {
                    count(traffic, &message);
                    if destination.feed(message).await.is_err() {
                        return End::DestinationLost;
                    }
                }
                Item::Control => {}
                Item::End(end) => {
                    ended = Some(end);
                    break;
                }
            }
        }
        if destination.flush().await.is_err() {
            return End::DestinationLost;
        }
        if let Some(end) = ended {
            return end;
        }
    }
}
