//! The upstream the load tool drives: a WebSocket server that echoes and streams, and an HTTP
//! server that answers GETs and streams Server-Sent Events.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::channel::{Channel, Sender};
use http_body_util::{Either, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::websocket::{Socket, ws_config};

/// The body of a plain GET: what a small REST answer weighs.
const ANSWER: &[u8] = b"{\"ok\":true,\"text\":\"a small REST answer of about 64 bytes.\"}";

/// Serves WebSockets on `listen`, and HTTP on `http_listen` when given; says where on stderr.
pub(crate) async fn run(listen: SocketAddr, http_listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!("upstream listening on {}", listener.local_addr()?);
    if let Some(http_listen) = http_listen {
        let http = TcpListener::bind(http_listen)
            .await
            .with_context(|| format!("cannot listen on {http_listen}"))?;
        eprintln!("http upstream listening on {}", http.local_addr()?);
        tokio::spawn(accept_loop(http, serve_http));
    }
    accept_loop(listener, serve_websocket).await;
    Ok(())
}

async fn accept_loop<F, Fut>(listener: TcpListener, serve: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => {
                // Out of descriptors, most likely: wait for some to close.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(serve(tcp));
    }
}

async fn serve_websocket(tcp: TcpStream) {
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(tcp, Some(ws_config())).await else {
        return;
    };
    let _ = echo_and_stream(ws).await;
}

async fn echo_and_stream(mut ws: Socket) -> anyhow::Result<()> {
    while let Some(message) = ws.next().await {
        match message? {
            Message::Text(text) if text.starts_with("stream ") => {
                let mut words = text.split(' ').skip(1);
                let count: u64 = words.next().unwrap_or("0").parse()?;
                let size: usize = words.next().unwrap_or("32").parse()?;
                let payload: tokio_tungstenite::tungstenite::Utf8Bytes = "x".repeat(size).into();
                for _ in 0..count {
                    ws.feed(Message::Text(payload.clone())).await?;
                }
                ws.flush().await?;
            }
            // Numbered texts `0`..`N-1`, so that a client can tell a lost or repeated one.
            Message::Text(text) if text.starts_with("seq ") => {
                let count: u64 = text[4..].trim().parse()?;
                for i in 0..count {
                    ws.feed(Message::text(i.to_string())).await?;
                }
                ws.flush().await?;
            }
            message @ (Message::Text(_) | Message::Binary(_)) => ws.send(message).await?,
            Message::Close(_) => {
                // Answer the close (tungstenite queues the answer; a flush sends it), as every
                // chat core's WebSocket library does: without it a proxy that tunnels bytes
                // hands its client no close frame, and the client's side of the benchmark
                // does less work than with a proxy that answers the close itself.
                ws.flush().await?;
                break;
            }
            _ => {}
        }
    }
    Ok(())
}

async fn serve_http(tcp: TcpStream) {
    let service = service_fn(|request: http::Request<hyper::body::Incoming>| async move {
        let query = request.uri().query().unwrap_or("");
        if request.uri().path().ends_with("/sse") {
            let number = |name: &str| {
                form_urlencoded::parse(query.as_bytes())
                    .find(|(key, _)| key == name)
                    .and_then(|(_, value)| value.parse::<u64>().ok())
            };
            let events = number("events").unwrap_or(1000);
            let size = number("size").unwrap_or(32) as usize;
            let (sender, body) = Channel::new(64);
            tokio::spawn(stream_events(sender, events, size));
            http::Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(Either::Right(body))
        } else {
            http::Response::builder()
                .header("content-type", "application/json")
                .body(Either::Left(Full::new(Bytes::from_static(ANSWER))))
        }
    });
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(tcp), service)
        .await;
}

/// `events` events of `size` bytes of data each, as fast as the reader takes them.
async fn stream_events(mut sender: Sender<Bytes, Infallible>, events: u64, size: usize) {
    let event = Bytes::from(format!("data: {}\n\n", "x".repeat(size)));
    for _ in 0..events {
        if sender.send_data(event.clone()).await.is_err() {
            return;
        }
    }
}
