//! `wsedge demo`: the edge in front of a small streaming chat core, plus a browser page, all
//! on loopback, so that a newcomer sees identity injection and streaming with no other tool.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as WsRequest, Response as WsResponse,
};

use crate::config::Config;
use crate::server::Edge;
use crate::token::{self, TokenRequest};

const REPLY: &str = "Hello {user}! This answer is streamed word by word by the chat core, \
and every word crossed wsedge, which checked your token and told the core who you are.";

/// Runs the demo; with `once`, exits after the self-check instead of serving on.
pub async fn run(port: u16, page_port: u16, once: bool) -> anyhow::Result<()> {
    let core_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot start the chat core")?;
    let core_addr = core_listener.local_addr()?;
    let core_connections = Arc::new(AtomicUsize::new(0));
    tokio::spawn(serve_chat_core(core_listener, core_connections.clone()));

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
    tokio::spawn(serve_page(page_listener, url.clone(), token.clone()));

    println!("wsedge demo");
    println!("  edge       {url}   (checks a JWT, injects the identity)");
    println!("  chat core  ws://{core_addr}/ws/chat   (trusts x-user-id, streams replies)");
    println!("  page       http://{page_addr}/");
    println!();
    self_check(edge_addr, &token, &core_connections).await?;

    if once {
        handle.shutdown();
        let _ = server.await;
        return Ok(());
    }
    println!();
    println!("Try it yourself (token for user alice, tenant acme, valid 1h):");
    println!("  browser:  open http://{page_addr}/");
    println!("  CLI:      websocat '{url}?token={token}&conversation_id=c42'");
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

async fn serve_chat_core(listener: TcpListener, connections: Arc<AtomicUsize>) {
    while let Ok((stream, _)) = listener.accept().await {
        connections.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let _ = chat_session(stream).await;
        });
    }
}

/// One chat-core session: greets with the identity the edge injected, then answers each
/// message with a reply streamed one word at a time.
// The callback's error type is tungstenite's, not ours to shrink.
#[allow(clippy::result_large_err)]
async fn chat_session(stream: TcpStream) -> anyhow::Result<()> {
    let mut identity = json!({});
    let ws = tokio_tungstenite::accept_hdr_async(
        stream,
        |request: &WsRequest, response: WsResponse| -> Result<WsResponse, ErrorResponse> {
            let header = |name: &str| {
                request
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            identity = json!({
                "user": header("x-user-id"),
                "tenant": header("x-tenant-id"),
                "conversation": header("x-conversation-id"),
            });
            Ok(response)
        },
    )
    .await?;
    let (mut tx, mut rx) = ws.split();
    tx.send(Message::text(
        json!({ "type": "hello", "identity": identity }).to_string(),
    ))
    .await?;
    let user = identity["user"].as_str().unwrap_or("stranger").to_owned();
    while let Some(message) = rx.next().await {
        match message? {
            Message::Text(_) => {
                for word in REPLY.replace("{user}", &user).split_inclusive(' ') {
                    tx.send(Message::text(
                        json!({ "type": "token", "text": word }).to_string(),
                    ))
                    .await?;
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
                tx.send(Message::text(json!({ "type": "done" }).to_string()))
                    .await?;
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    Ok(())
}

async fn serve_page(listener: TcpListener, url: String, token: String) {
    let page = Bytes::from(PAGE.replace("{{URL}}", &url).replace("{{TOKEN}}", &token));
    while let Ok((stream, _)) = listener.accept().await {
        let page = page.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let page = page.clone();
                async move {
                    let mut response = Response::new(Full::new(Bytes::new()));
                    if request.uri().path() == "/" {
                        *response.body_mut() = Full::new(page);
                        response.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("text/html; charset=utf-8"),
                        );
                    } else {
                        *response.status_mut() = StatusCode::NOT_FOUND;
                    }
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

const PAGE: &str = r#"<!doctype html>
<html lang="en">
<meta charset="utf-8">
<title>wsedge demo</title>
<style>
  body { font: 16px/1.5 system-ui, sans-serif; max-width: 44rem; margin: 2rem auto; padding: 0 1rem; }
  #log { border: 1px solid #ccc; border-radius: 6px; padding: .75rem; min-height: 12rem; white-space: pre-wrap; }
  .who { color: #666; font-size: .9em; }
  form { display: flex; gap: .5rem; margin-top: .75rem; }
  input { flex: 1; padding: .4rem; }
</style>
<h1>wsedge demo</h1>
<p class="who" id="status">connecting…</p>
<div id="log"></div>
<form id="form"><input id="text" value="hello" autocomplete="off"><button>Send</button></form>
<script>
  // A browser cannot set Authorization on a WebSocket: the token travels as a subprotocol
  // entry, which wsedge takes out before the request reaches the chat core.
  const token = "{{TOKEN}}";
  // Resume: name the session, count what arrives, and come back for the rest after a drop.
  const session = self.crypto && crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2);
  let seq = 0;
  let ws;
  const log = document.getElementById("log");
  const status = document.getElementById("status");
  function connect(resume) {
    let url = "{{URL}}?conversation_id=browser-demo&session_id=" + session;
    if (resume) url += "&last_seq=" + seq;
    ws = new WebSocket(url, ["bearer." + token]);
    ws.onopen = () => { status.textContent = resume ? "resumed: nothing missed" : "connected through wsedge"; };
    ws.onclose = (e) => {
      status.textContent = "closed: " + e.code + " " + e.reason;
      // 1006: the connection dropped (network change, sleep). 4001: the token expired; a real
      // page fetches a fresh one first. 4002 would mean the session is gone: start over.
      if (e.code === 1006 || e.code === 4001) {
        status.textContent += " - resuming…";
        setTimeout(() => connect(true), 1000);
      }
    };
    ws.onmessage = (e) => {
      seq += 1;
      const event = JSON.parse(e.data);
      if (event.type === "hello") {
        const id = event.identity;
        status.textContent = "the chat core sees user " + id.user + ", tenant " + id.tenant + ", conversation " + id.conversation;
      } else if (event.type === "token") {
        log.textContent += event.text;
      } else if (event.type === "done") {
        log.textContent += "\n\n";
      }
    };
  }
  connect(false);
  document.getElementById("form").onsubmit = (e) => {
    e.preventDefault();
    const text = document.getElementById("text").value;
    log.textContent += "> " + text + "\n";
    ws.send(text);
  };
</script>
</html>
"#;
