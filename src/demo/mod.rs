//! `wsedge demo`: the edge in front of a small streaming chat core, plus a browser page, all
//! on loopback, so that a newcomer sees identity injection and streaming — over a WebSocket,
//! a REST call and Server-Sent Events — with no other tool.

mod core;
mod page;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1 as client;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::config::Config;
use crate::server::Edge;
use crate::token::{self, TokenRequest};
use core::REPLY;

/// Runs the demo; with `once`, exits after the self-check instead of serving on.
pub async fn run(port: u16, page_port: u16, once: bool) -> anyhow::Result<()> {
    let core_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot start the chat core")?;
    let core_addr = core_listener.local_addr()?;
    let core_connections = Arc::new(AtomicUsize::new(0));
    tokio::spawn(core::serve(core_listener, core_connections.clone()));

    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let page_listener = TcpListener::bind(("127.0.0.1", page_port))
        .await
        .with_context(|| {
            format!("cannot listen on 127.0.0.1:{page_port} for the page (try --page-port)")
        })?;
    let page_addr = page_listener.local_addr()?;
    let config_text = format!(
        r#"
[server]
listen = ["127.0.0.1:{port}"]

[auth.demo]
kind = "jwt"
algorithms = ["HS256"]
secret = "{secret}"
token_from = ["header", "query:token", "subprotocol"]

[[route]]
path = "/ws/chat"
upstream = "ws://{core_addr}/ws/chat"
auth = "demo"
allowed_origins = ["http://{page_addr}", "http://localhost:{page_port}"]
conversation = "query-or-token"
upstream_query = {{ conversation_id = "{{conversation}}" }}
resume = {{ window = "30s" }}

[[route]]
path = "/api"
match = "prefix"
upstream = "ws://{core_addr}/api"
auth = "demo"
http = "proxy"
allowed_origins = ["http://{page_addr}", "http://localhost:{page_port}"]
"#,
        page_port = page_addr.port()
    );
    let config = Config::from_toml(&config_text, "demo.toml", Path::new("."))?;
    let token = mint(&config, "alice", "acme", Duration::from_secs(3600))?;
    let edge = Edge::bind(config)
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{port} for the edge (try --port)"))?;
    let edge_addr = edge.local_addrs()[0];
    let handle = edge.handle();
    let server = tokio::spawn(edge.run());

    let url = format!("ws://{edge_addr}/ws/chat");
    tokio::spawn(page::serve(page_listener, url.clone(), token.clone()));

    println!("wsedge demo");
    println!("  edge       {url}   (checks a JWT, injects the identity)");
    println!("             http://{edge_addr}/api/   (the same, for REST and SSE)");
    println!("  chat core  ws://{core_addr}/ws/chat, http://{core_addr}/api/   (trusts x-user-id)");
    println!("  page       http://{page_addr}/");
    println!();
    self_check(edge_addr, &token, &core_connections).await?;
    http_check(edge_addr, &token).await?;

    if once {
        handle.shutdown();
        let _ = server.await;
        return Ok(());
    }
    println!();
    println!("Try it yourself (token for user alice, tenant acme, valid 1h):");
    println!("  browser:  open http://{page_addr}/");
    println!("  CLI:      websocat '{url}?token={token}&conversation_id=c42'");
    println!("  REST:     curl -H 'Authorization: Bearer {token}' http://{edge_addr}/api/whoami");
    println!("  SSE:      curl -N 'http://{edge_addr}/api/stream?token={token}'");
    println!("  token:    {token}");
    println!();
    println!("Ctrl-C to stop.");
    let _ = tokio::signal::ctrl_c().await;
    handle.shutdown();
    let _ = server.await;
    Ok(())
}

fn mint(config: &Config, user: &str, tenant: &str, ttl: Duration) -> anyhow::Result<String> {
    let request = TokenRequest {
        policy: None,
        user: user.to_owned(),
        tenant: Some(tenant.to_owned()),
        conversation: None,
        ttl,
        claims: Vec::new(),
        private_key: None,
        issuer: None,
        audience: None,
        kid: None,
    };
    Ok(token::mint(config, request)?)
}

/// Connects like a client would: first without a token, then with one (and a forged
/// `x-user-id`, which the edge must replace); prints what the chat core streams back, cuts the
/// connection mid-answer the way a phone in a tunnel does, and resumes.
async fn self_check(
    edge: SocketAddr,
    token: &str,
    core_connections: &AtomicUsize,
) -> anyhow::Result<()> {
    let stream = TcpStream::connect(edge).await?;
    match tokio_tungstenite::client_async(format!("ws://{edge}/ws/chat"), stream).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            println!("without a token:  refused with {}", response.status());
        }
        Ok(_) => bail!("the edge let a client without a token through"),
        Err(error) => bail!("unexpected failure without a token: {error}"),
    }

    let session = uuid::Uuid::new_v4();
    let url = format!("ws://{edge}/ws/chat?token={token}&conversation_id=c42&session_id={session}");
    let mut ws = demo_client(edge, &url, &[("x-user-id", "mallory")])
        .await
        .context("the demo client could not connect through the edge")?;
    println!("with a token:     connected (the client also sent a forged x-user-id: mallory)");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // Upstream messages received on the session: what a client counts to resume.
    let mut received: u64 = 0;
    let mut words = Vec::new();
    let mut cut = false;
    loop {
        let message = tokio::time::timeout_at(deadline, ws.next())
            .await
            .context("the chat core did not answer within 10s")?;
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            // The edge's pings (answered by the client library) are not the chat core's.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            _ => bail!("the connection ended before the reply was complete"),
        };
        received += 1;
        let event: serde_json::Value = serde_json::from_str(&text)?;
        match event["type"].as_str() {
            Some("hello") => {
                let id = &event["identity"];
                println!(
                    "the chat core saw: x-user-id={} x-tenant-id={} x-conversation-id={}",
                    id["user"].as_str().unwrap_or("-"),
                    id["tenant"].as_str().unwrap_or("-"),
                    id["conversation"].as_str().unwrap_or("-"),
                );
                ws.send(Message::text("hello")).await?;
                println!("> hello");
                print!("< ");
            }
            Some("token") => {
                use std::io::Write;
                let word = event["text"].as_str().unwrap_or("").to_owned();
                print!("{word}");
                let _ = std::io::stdout().flush();
                words.push(word);
                if words.len() == 6 && !cut {
                    // No close frame: the TCP connection just ends, whatever was in flight lost.
                    drop(ws);
                    cut = true;
                    println!();
                    println!(
                        "  [connection cut after {received} messages; the answer goes on streaming]"
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let resumed = format!("{url}&last_seq={received}");
                    ws = demo_client(edge, &resumed, &[])
                        .await
                        .context("the demo client could not resume")?;
                    println!(
                        "  [reconnected with last_seq={received}: the edge replays what was missed]"
                    );
                    print!("< ");
                }
            }
            Some("done") => {
                println!();
                break;
            }
            _ => {}
        }
    }
    let expected = REPLY.replace("{user}", "alice");
    if words.concat() != expected {
        bail!(
            "the reply arrived damaged:\n{}\nexpected:\n{expected}",
            words.concat()
        );
    }
    println!(
        "resumed:          every word once, in order; the chat core saw {} connection",
        core_connections.load(Ordering::SeqCst)
    );
    let _ = ws.close(None).await;
    Ok(())
}

async fn demo_client(
    edge: SocketAddr,
    url: &str,
    extra: &[(&str, &str)],
) -> anyhow::Result<tokio_tungstenite::WebSocketStream<TcpStream>> {
    let mut request = http::Request::builder().uri(url);
    for (name, value) in [
        ("Host", edge.to_string()),
        ("Connection", "Upgrade".into()),
        ("Upgrade", "websocket".into()),
        ("Sec-WebSocket-Version", "13".into()),
        (
            "Sec-WebSocket-Key",
            tokio_tungstenite::tungstenite::handshake::client::generate_key(),
        ),
    ] {
        request = request.header(name, value);
    }
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    let stream = TcpStream::connect(edge).await?;
    let (ws, _) = tokio_tungstenite::client_async(request.body(())?, stream).await?;
    Ok(ws)
}

/// The HTTP half through the same edge: a REST call (with a forged `x-user-id` the edge
/// replaces) and the reply as Server-Sent Events, printed event by event as they arrive.
async fn http_check(edge: SocketAddr, token: &str) -> anyhow::Result<()> {
    let authorization = format!("Bearer {token}");
    let forged = [
        ("authorization", authorization.as_str()),
        ("x-user-id", "mallory"),
    ];
    let (status, mut body) = http_get(edge, "/api/whoami", &forged).await?;
    let mut whole = Vec::new();
    while let Some(chunk) = next_chunk(&mut body).await? {
        whole.extend_from_slice(&chunk);
    }
    let seen: serde_json::Value = serde_json::from_slice(&whole)?;
    println!(
        "REST:             GET /api/whoami -> {status} (with a forged x-user-id: mallory); the chat core saw user={} tenant={}, {}",
        seen["user"].as_str().unwrap_or("-"),
        seen["tenant"].as_str().unwrap_or("-"),
        if seen["token_seen"] == true {
            "and the token"
        } else {
            "no token"
        },
    );

    let (status, mut events) = http_get(edge, &format!("/api/stream?token={token}"), &[]).await?;
    println!(
        "SSE:              GET /api/stream -> {status} (the token in the query, as EventSource sends it)"
    );
    print!("< ");
    let mut words = String::new();
    let mut pending = String::new();
    while let Some(chunk) = next_chunk(&mut events).await? {
        pending.push_str(&String::from_utf8_lossy(&chunk));
        // An event ends at a blank line; a chunk may hold part of one, or several.
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            if let Some(data) = event.lines().find_map(|line| line.strip_prefix("data: "))
                && let Ok(data) = serde_json::from_str::<serde_json::Value>(data)
                && let Some(word) = data["text"].as_str()
            {
                use std::io::Write;
                print!("{word}");
                let _ = std::io::stdout().flush();
                words.push_str(word);
            }
        }
    }
    println!();
    let expected = REPLY.replace("{user}", "alice");
    if words != expected {
        bail!("the event stream arrived damaged:\n{words}\nexpected:\n{expected}");
    }
    println!("streamed:         every event once, in order");
    Ok(())
}

/// A GET through the edge: the status, and the body still to come.
async fn http_get(
    edge: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, hyper::body::Incoming)> {
    let stream = TcpStream::connect(edge).await?;
    let (mut sender, connection) = client::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut request = Request::get(path).header("host", edge.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        sender.send_request(request.body(Empty::<Bytes>::new())?),
    )
    .await
    .context("no response within 10s")??;
    Ok((response.status().as_u16(), response.into_body()))
}

/// The next piece of a body, `None` at its end.
async fn next_chunk(body: &mut hyper::body::Incoming) -> anyhow::Result<Option<Bytes>> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .context("the response stalled for 10s")?;
        match frame {
            None => return Ok(None),
            Some(frame) => {
                if let Ok(data) = frame?.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}
