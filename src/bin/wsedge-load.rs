//! `wsedge-load`: the load tool behind BENCHMARKS.md, and the upstream it drives.
//!
//! Modes (one JSON line of results each):
//!   stream     C connections each receive N messages of S bytes pushed by the upstream
//!   rtt        C connections each do R echo round trips; latency percentiles in µs
//!   handshake  K upgrades at concurrency C; handshakes/s and latency percentiles
//!   idle       hold C connections (source addresses spread over 127.0.0.x) for a while
//!   upstream   the matching upstream: echoes data, streams on `stream N SIZE`
//!
//! Any proxy in front of the upstream can be measured the same way: direct, nginx, HAProxy,
//! wsedge. With `--jwt-secret`, every connection carries a fresh HS256 token (its own `sub`
//! and `jti`) in the query parameter `--token-param`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[derive(Parser)]
#[command(
    name = "wsedge-load",
    about = "Load tool and test upstream for WebSocket proxies"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Connections each receive N messages of S bytes pushed by the upstream.
    Stream {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 20)]
        connections: usize,
        #[arg(long, default_value_t = 200_000)]
        messages: u64,
        #[arg(long, default_value_t = 32)]
        size: usize,
    },
    /// Connections each do echo round trips of binary messages.
    Rtt {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 50)]
        connections: usize,
        #[arg(long, default_value_t = 200)]
        round_trips: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// Upgrades at a fixed concurrency, each closed right after the 101.
    Handshake {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 5000)]
        count: usize,
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
    },
    /// Holds connections open and idle; prints "ready" on stderr once all are open.
    Idle {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 5000)]
        connections: usize,
        /// How long to hold them once all are open, like "10s".
        #[arg(long, default_value = "10s")]
        hold: String,
        /// Spread source addresses over 127.0.0.2 … 127.0.0.(1+N) so ephemeral ports last.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(1..=250))]
        sources: u8,
        /// Connections opened at once.
        #[arg(long, default_value_t = 200)]
        concurrency: usize,
    },
    /// The upstream: echoes data messages; `stream N SIZE` pushes N texts of SIZE bytes.
    Upstream {
        #[arg(long, default_value = "127.0.0.1:19001")]
        listen: SocketAddr,
    },
}

#[derive(Args, Clone)]
struct Target {
    /// ws://host:port/path?query
    #[arg(long)]
    url: String,
    /// Extra request headers, `Name: value` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Mint a fresh HS256 token per connection with this secret.
    #[arg(long)]
    jwt_secret: Option<String>,
    /// The query parameter that carries the token.
    #[arg(long, default_value = "token")]
    token_param: String,
    /// A label for the result line (e.g. "nginx").
    #[arg(long, default_value = "")]
    label: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let result = match cli.mode {
            Mode::Upstream { listen } => return upstream(listen).await,
            Mode::Stream {
                target,
                connections,
                messages,
                size,
            } => stream(&target, connections, messages, size).await?,
            Mode::Rtt {
                target,
                connections,
                round_trips,
                size,
            } => rtt(&target, connections, round_trips, size).await?,
            Mode::Handshake {
                target,
                count,
                concurrency,
            } => handshake(&target, count, concurrency).await?,
            Mode::Idle {
                target,
                connections,
                hold,
                sources,
                concurrency,
            } => {
                let hold = wsedge::parse_duration(&hold)?;
                idle(&target, connections, hold, sources, concurrency).await?
            }
        };
        println!("{result}");
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Client side

type Socket = WebSocketStream<TcpStream>;

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Target {
    fn authority(&self) -> anyhow::Result<(String, SocketAddr)> {
        let uri: http::Uri = self.url.parse().context("invalid --url")?;
        if uri.scheme_str() != Some("ws") {
            bail!("--url must be ws:// (put TLS in front of the tool, not inside it)");
        }
        let authority = uri.authority().context("--url has no host")?.to_string();
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&authority)?
            .next()
            .context("--url host does not resolve")?;
        Ok((authority, addr))
    }

    /// The URL for connection `n`: with a fresh token when a secret is given.
    fn url_for(&self, n: usize) -> anyhow::Result<String> {
        let Some(secret) = &self.jwt_secret else {
            return Ok(self.url.clone());
        };
        let claims = json!({
            "sub": format!("user-{n}"),
            "jti": uuid::Uuid::new_v4().simple().to_string(),
            "iat": now_secs(),
            "exp": now_secs() + 3600,
        });
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )?;
        let separator = if self.url.contains('?') { '&' } else { '?' };
        Ok(format!(
            "{}{separator}{}={token}",
            self.url, self.token_param
        ))
    }

    async fn connect(&self, n: usize, source: Option<IpAddr>) -> anyhow::Result<Socket> {
        let (authority, addr) = self.authority()?;
        let url = self.url_for(n)?;
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

fn percentiles(mut samples: Vec<u64>) -> serde_json::Value {
    if samples.is_empty() {
        return json!(null);
    }
    samples.sort_unstable();
    let at =
        |p: f64| samples[((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1];
    json!({ "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": samples[samples.len() - 1] })
}

async fn stream(
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
    let mut errors = 0;
    for task in tasks {
        if !matches!(task.await, Ok(Ok(()))) {
            errors += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let total = received.load(Ordering::Relaxed);
    Ok(json!({
        "mode": "stream", "label": target.label, "connections": connections, "messages": messages,
        "size": size, "received": total, "errors": errors, "seconds": elapsed,
        "messages_per_second": total as f64 / elapsed,
    }))
}

async fn rtt(
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
    let mut all = Vec::with_capacity(connections * round_trips);
    let mut errors = 0;
    for task in tasks {
        match task.await {
            Ok(Ok(latencies)) => all.extend(latencies),
            _ => errors += 1,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(json!({
        "mode": "rtt", "label": target.label, "connections": connections, "round_trips": round_trips,
        "size": size, "completed": all.len(), "errors": errors, "seconds": elapsed,
        "messages_per_second": all.len() as f64 / elapsed, "latency_us": percentiles(all),
    }))
}

async fn handshake(
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
    let mut latencies = Vec::with_capacity(count);
    let mut errors = 0;
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok(Ok(took)) => latencies.push(took),
            Ok(Err(error)) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{error:#}"));
            }
            Err(_) => errors += 1,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(json!({
        "mode": "handshake", "label": target.label, "count": count, "concurrency": concurrency,
        "completed": latencies.len(), "errors": errors, "first_error": first_error, "seconds": elapsed,
        "handshakes_per_second": latencies.len() as f64 / elapsed, "latency_us": percentiles(latencies),
    }))
}

async fn idle(
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
    let mut sockets = Vec::with_capacity(connections);
    let mut errors = 0;
    for task in tasks {
        match task.await {
            Ok(Ok(ws)) => sockets.push(ws),
            _ => errors += 1,
        }
    }
    let open_seconds = started.elapsed().as_secs_f64();
    eprintln!("ready: {} open", sockets.len());
    // Idle sockets still answer pings (a proxy's heartbeat), as a real client would.
    let holders: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(hold, async {
                    while let Some(Ok(_)) = ws.next().await {}
                })
                .await;
                ws
            })
        })
        .collect();
    let mut still_open = 0;
    for holder in holders {
        if let Ok(mut ws) = holder.await {
            still_open += 1;
            let _ = ws.close(None).await;
        }
    }
    Ok(json!({
        "mode": "idle", "label": target.label, "connections": connections, "opened": still_open,
        "errors": errors, "open_seconds": open_seconds, "hold_seconds": hold.as_secs_f64(),
    }))
}

// ---------------------------------------------------------------------------------------------
// Upstream

async fn upstream(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!("upstream listening on {}", listener.local_addr()?);
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(ws) = tokio_tungstenite::accept_async_with_config(tcp, Some(ws_config())).await
            else {
                return;
            };
            let _ = serve_upstream(ws).await;
        });
    }
}

async fn serve_upstream(mut ws: Socket) -> anyhow::Result<()> {
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
