//! The HTTP modes: GET requests over keep-alive connections, and Server-Sent Events streams.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;

use crate::{Gathered, Target, gather, percentiles};

/// One keep-alive connection, with the path and query its requests carry (its own token).
struct Connection {
    sender: SendRequest<Empty<Bytes>>,
    authority: String,
    path: String,
    /// `Bearer …`, for `--bearer`.
    authorization: Option<String>,
    addr: std::net::SocketAddr,
    /// Connections the server closed (nginx does after `keepalive_requests`) and that were
    /// opened again.
    reopened: u64,
}

impl Target {
    async fn open(&self, n: usize) -> anyhow::Result<Connection> {
        let (authority, addr) = self.authority("http")?;
        let url: http::Uri = match self.bearer {
            true => self.url.parse()?,
            false => self.url_for(n)?.parse()?,
        };
        let path = url
            .path_and_query()
            .map_or("/".to_owned(), |p| p.as_str().to_owned());
        let authorization = match self.bearer {
            true => self.token_for(n)?.map(|token| format!("Bearer {token}")),
            false => None,
        };
        Ok(Connection {
            sender: handshake(addr).await?,
            authority,
            path,
            authorization,
            addr,
            reopened: 0,
        })
    }
}

async fn handshake(addr: std::net::SocketAddr) -> anyhow::Result<SendRequest<Empty<Bytes>>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

impl Connection {
    async fn get(&mut self) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        let mut request = http::Request::get(&self.path).header("host", &self.authority);
        if let Some(authorization) = &self.authorization {
            request = request.header("authorization", authorization);
        }
        let request = request.body(Empty::new())?;
        if self.sender.ready().await.is_err() {
            self.sender = handshake(self.addr).await?;
            self.reopened += 1;
        }
        let response = self.sender.send_request(request).await?;
        if response.status() != 200 {
            bail!("status {}", response.status());
        }
        Ok(response)
    }
}

pub(crate) async fn requests(
    target: &Target,
    connections: usize,
    requests: usize,
) -> anyhow::Result<serde_json::Value> {
    let mut opened = Vec::with_capacity(connections);
    for n in 0..connections {
        opened.push(target.open(n).await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut connection in opened {
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(requests);
            for _ in 0..requests {
                let sent = Instant::now();
                let response = connection.get().await?;
                response.into_body().collect().await?;
                latencies.push(sent.elapsed().as_micros() as u64);
            }
            anyhow::Ok((latencies, connection.reopened))
        }));
    }
    let Gathered {
        results,
        errors,
        first_error,
    } = gather(tasks).await;
    let reopened: u64 = results.iter().map(|(_, again)| again).sum();
    let all: Vec<u64> = results
        .into_iter()
        .flat_map(|(latencies, _)| latencies)
        .collect();
    let elapsed = started.elapsed().as_secs_f64();
    Ok(json!({
        "mode": "http", "label": target.label, "connections": connections, "requests": requests,
        "completed": all.len(), "reopened": reopened, "errors": errors, "first_error": first_error,
        "seconds": elapsed, "requests_per_second": all.len() as f64 / elapsed, "latency_us": percentiles(all),
    }))
}

pub(crate) async fn events(
    target: &Target,
    connections: usize,
    events: u64,
    size: usize,
) -> anyhow::Result<serde_json::Value> {
    let separator = if target.url.contains('?') { '&' } else { '?' };
    let streams = Target {
        url: format!("{}{separator}events={events}&size={size}", target.url),
        ..target.clone()
    };
    let mut opened = Vec::with_capacity(connections);
    for n in 0..connections {
        opened.push(streams.open(n).await?);
    }
    let received = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut connection in opened {
        let received = received.clone();
        tasks.push(tokio::spawn(async move {
            let mut body = connection.get().await?.into_body();
            let mut count = EventCount::default();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.context("the stream broke")?.into_data() {
                    count.feed(&data);
                }
            }
            received.fetch_add(count.events, Ordering::Relaxed);
            if count.events != events {
                bail!("the stream ended after {} of {events} events", count.events);
            }
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
        "mode": "sse", "label": target.label, "connections": connections, "events": events,
        "size": size, "received": total, "errors": errors, "first_error": first_error,
        "seconds": elapsed, "events_per_second": total as f64 / elapsed,
    }))
}

/// Counts events (each ends with a blank line) in a stream read in arbitrary pieces.
#[derive(Default)]
struct EventCount {
    events: u64,
    last_was_newline: bool,
}

impl EventCount {
    fn feed(&mut self, data: &[u8]) {
        for &byte in data {
            let newline = byte == b'\n';
            if newline && self.last_was_newline {
                self.events += 1;
                self.last_was_newline = false;
            } else {
                self.last_was_newline = newline;
            }
        }
    }
}
