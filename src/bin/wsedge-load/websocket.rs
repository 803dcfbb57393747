//! The WebSocket modes: streamed messages, echo round trips, handshakes, idle connections.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::{Gathered, Target, gather, percentiles};

pub(crate) type Socket = WebSocketStream<TcpStream>;

pub(crate) fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

impl Target {
    pub(crate) async fn connect(&self, n: usize, source: Option<IpAddr>) -> anyhow::Result<Socket> {
        self.connect_to(self.url_for(n)?, source).await
    }

    /// Connects with `extra` added to the query (after the token, if any).
    pub(crate) async fn connect_with_query(&self, n: usize, extra: &str) -> anyhow::Result<Socket> {
        let url = self.url_for(n)?;
        let separator = if url.contains('?') { '&' } else { '?' };
        self.connect_to(format!("{url}{separator}{extra}"), None)
            .await
    }

    async fn connect_to(&self, url: String, source: Option<IpAddr>) -> anyhow::Result<Socket> {
        let (authority, addr) = self.authority("ws")?;
        let tcp = match source {
            None => TcpStream::connect(addr).await?,
            Some(ip) => {
                let socket = TcpSocket::new_v4()?;
                socket.bind(SocketAddr::new(ip, 0))?;
                socket.connect(addr).await?
            }
        };
        tcp.set_nodelay(true)?;
        let mut request = http::Request::builder()
            .uri(&url)
            .header("Host", &authority)
            .header("Connection", "Upgrade")
            .header("Upgrade", "websocket")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Key", generate_key());
        for header in &self.headers {
            let (name, value) = header
                .split_once(':')
                .context("--header wants `Name: value`")?;
            request = request.header(name.trim(), value.trim());
        }
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(request.body(())?, tcp, Some(ws_config()))
                .await
                .with_context(|| format!("handshake with {}", self.url))?;
        Ok(ws)
    }
}

pub(crate) async fn stream(
    target: &Target,
    connections: usize,
    messages: u64,
    size: usize,
) -> anyhow::Result<serde_json::Value> {
    let mut sockets = Vec::with_capacity(connections);
    for n in 0..connections {
        sockets.push(target.connect(n, None).await?);
    }
    let received = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut ws in sockets {
        let received = received.clone();
        tasks.push(tokio::spawn(async move {
            ws.send(Message::text(format!("stream {messages} {size}")))
                .await?;
            let mut count = 0u64;
            while count < messages {
                match ws.next().await {
                    Some(Ok(Message::Text(text))) if text.len() == size => count += 1,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(other)) => bail!("unexpected message of {} bytes", other.len()),
                    Some(Err(error)) => bail!("stream broke after {count} messages: {error}"),
                    None => bail!("stream ended after {count} messages"),
                }
            }
            received.fetch_add(count, Ordering::Relaxed);
            let _ = ws.close(None).await;
            anyhow::Ok(())
        }));
    }
    let Gathered {
        errors,
        first_error,
        ..
    } = gather(tasks).await;
    let elapsed = started.elapsed().as_secs_f64();
    let total = received.load(Ordering::Relaxed);
    Ok(json!({
        "mode": "stream", "label": target.label, "connections": connections, "messages": messages,
        "size": size, "received": total, "errors": errors, "first_error": first_error,
        "seconds": elapsed,
        "messages_per_second": total as f64 / elapsed,
    }))
}

pub(crate) async fn rtt(
    target: &Target,
    connections: usize,
    round_trips: usize,
    size: usize,
) -> anyhow::Result<serde_json::Value> {
    let mut sockets = Vec::with_capacity(connections);
    for n in 0..connections {
        sockets.push(target.connect(n, None).await?);
    }
    let payload = Bytes::from(vec![0x5a; size]);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut ws in sockets {
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(round_trips);
            for _ in 0..round_trips {
                let sent = Instant::now();
                ws.send(Message::Binary(payload.clone())).await?;
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Binary(echo))) if echo.len() == payload.len() => break,
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Ok(other)) => bail!("unexpected message of {} bytes", other.len()),
                        Some(Err(error)) => bail!("echo broke: {error}"),
                        None => bail!("echo connection ended"),
                    }
                }
                latencies.push(sent.elapsed().as_micros() as u64);
            }
            let _ = ws.close(None).await;
            anyhow::Ok(latencies)
        }));
    }
    let Gathered {
        results,
        errors,
        first_error,
    } = gather(tasks).await;
    let all: Vec<u64> = results.into_iter().flatten().collect();
    let elapsed = started.elapsed().as_secs_f64();
    Ok(json!({
        "mode": "rtt", "label": target.label, "connections": connections, "round_trips": round_trips,
        "size": size, "completed": all.len(), "errors": errors, "first_error": first_error,
        "seconds": elapsed,
        "messages_per_second": all.len() as f64 / elapsed, "latency_us": percentiles(all),
    }))
}

pub(crate) async fn handshake(
    target: &Target,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<serde_json::Value> {
    let slots = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for n in 0..count {
        let permit = slots.clone().acquire_owned().await?;
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let began = Instant::now();
            let mut ws = target.connect(n, None).await?;
            let took = began.elapsed().as_micros() as u64;
            let _ = ws.close(None).await;
            // Let the close handshake finish so the proxy sees a clean end.
            while let Some(Ok(_)) = ws.next().await {}
            anyhow::Ok(took)
        }));
    }
    let Gathered {
        results: latencies,
        errors,
        first_error,
    } = gather(tasks).await;
    let elapsed = started.elapsed().as_secs_f64();
    Ok(json!({
        "mode": "handshake", "label": target.label, "count": count, "concurrency": concurrency,
        "completed": latencies.len(), "errors": errors, "first_error": first_error, "seconds": elapsed,
        "handshakes_per_second": latencies.len() as f64 / elapsed, "latency_us": percentiles(latencies),
    }))
}

pub(crate) async fn idle(
    target: &Target,
    connections: usize,
    hold: Duration,
    sources: u8,
    concurrency: usize,
) -> anyhow::Result<serde_json::Value> {
    let slots = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(connections);
    for n in 0..connections {
        let permit = slots.clone().acquire_owned().await?;
        let target = target.clone();
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (n % sources as usize) as u8));
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            target.connect(n, Some(source)).await
        }));
    }
    let Gathered {
        results: sockets,
        errors,
        first_error,
    } = gather(tasks).await;
    let open_seconds = started.elapsed().as_secs_f64();
    eprintln!("ready: {} open", sockets.len());
    // Idle sockets still answer pings (a proxy's heartbeat), as a real client would. One that
    // the proxy ends before `hold` is noted with its close code and when it ended, so that a
    // reload (none may end) and a drain (all end with 1001, inside the drain timeout) can be
    // judged from the outside.
    let holders: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let ended = tokio::time::timeout(hold, async {
                    loop {
                        match ws.next().await {
                            Some(Ok(Message::Close(frame))) => {
                                let code = frame.map_or("no code".to_owned(), |f| {
                                    u16::from(f.code).to_string()
                                });
                                // Answer the close, as a client's library does.
                                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                                    while ws.next().await.is_some() {}
                                })
                                .await;
                                break code;
                            }
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => break "lost".to_owned(),
                        }
                    }
                })
                .await;
                (ws, ended.ok(), crate::now_millis())
            })
        })
        .collect();
    let mut still_open = 0;
    let mut ended_early = 0;
    let mut close_codes: std::collections::BTreeMap<String, u64> = Default::default();
    let (mut first_end, mut last_end) = (u64::MAX, 0);
    for holder in holders {
        let Ok((mut ws, ended, at)) = holder.await else {
            continue;
        };
        match ended {
            None => {
                still_open += 1;
                let _ = ws.close(None).await;
            }
            Some(code) => {
                ended_early += 1;
                *close_codes.entry(code).or_default() += 1;
                first_end = first_end.min(at);
                last_end = last_end.max(at);
            }
        }
    }
    Ok(json!({
        "mode": "idle", "label": target.label, "connections": connections,
        "opened": still_open + ended_early, "held": still_open, "ended_early": ended_early,
        "close_codes": close_codes,
        "first_end_unix_ms": (ended_early > 0).then_some(first_end),
        "last_end_unix_ms": (ended_early > 0).then_some(last_end),
        "errors": errors, "first_error": first_error, "open_seconds": open_seconds,
        "hold_seconds": hold.as_secs_f64(),
    }))
}
