//! Plain HTTP for the pass-through tests: a real HTTP upstream (hyper on 127.0.0.1:0) for the pass-through tests, and a real HTTP/1.1
//! client (hyper's, one connection per [`HttpClient`]).
//!
//! The upstream's paths: `/api/echo` answers with the request's body; `/api/sse?n=N` streams N
//! events, the first at once and the rest once the test calls [`HttpUpstream::release`] (or
//! forever, one every 50 ms, without `n`); `/api/poll?ms=M` answers after M ms; `/api/big?bytes=N`
//! sends N pattern bytes in 16 KiB pieces (counted in [`HttpUpstream::streamed`]); `/api/abort` promises 1,000 bytes, sends 500 and
//! drops the connection; `/api/status/CODE` answers with that status; anything else 200 "ok".
//! Every response carries `x-upstream: NAME`, `Access-Control-Allow-Origin: *`, and a
//! `Connection: x-hop` naming an `x-hop` header, which the edge must drop.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};

use super::{SeenRequest, WAIT};

type UpstreamBody = http_body_util::Either<Full<Bytes>, Channel<Bytes>>;

/// A request as the upstream received it.
#[derive(Debug, Clone)]
pub struct SeenHttp {
    pub method: String,
    pub request: SeenRequest,
    pub body: Vec<u8>,
}

pub struct HttpUpstream {
    pub addr: SocketAddr,
    pub name: &'static str,
    seen: mpsc::Receiver<SeenHttp>,
    /// TCP connections accepted.
    pub accepted: Arc<AtomicUsize>,
    /// TCP connections that have ended (the edge closed them, or a response was given up).
    pub ended: Arc<AtomicUsize>,
    /// Bytes of `/api/big` bodies handed to their connections so far.
    pub streamed: Arc<AtomicU64>,
    release: Arc<Notify>,
}

impl HttpUpstream {
    pub async fn start(name: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen_tx, seen) = mpsc::channel(1024);
        let accepted = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(AtomicUsize::new(0));
        let ended_in_task = ended.clone();
        let release = Arc::new(Notify::new());
        let streamed = Arc::new(AtomicU64::new(0));
        let (accepted_in_task, release_in_task, streamed_in_task) =
            (accepted.clone(), release.clone(), streamed.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepted_in_task.fetch_add(1, Ordering::SeqCst);
                let seen_tx = seen_tx.clone();
                let release = release_in_task.clone();
                let streamed = streamed_in_task.clone();
                let ended = ended_in_task.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        answer(
                            request,
                            name,
                            seen_tx.clone(),
                            release.clone(),
                            streamed.clone(),
                        )
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    ended.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        HttpUpstream {
            addr,
            name,
            seen,
            accepted,
            ended,
            streamed,
            release,
        }
    }

    /// The upstream URL a route names (`ws://`: the edge maps it to `http://`).
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// The next request the upstream received (fails after `WAIT`).
    pub async fn next_request(&mut self) -> SeenHttp {
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("the upstream saw no request in time")
            .expect("the upstream stopped")
    }

    /// How many requests have reached it so far (without waiting).
    pub fn requests_so_far(&mut self) -> usize {
        let mut count = 0;
        while self.seen.try_recv().is_ok() {
            count += 1;
        }
        count
    }

    /// Lets an SSE stream waiting after its first event go on.
    pub fn release(&self) {
        self.release.notify_waiters();
    }
}

/// A number from the query: `name=N`.
fn query_number(uri: &http::Uri, name: &str) -> Option<u64> {
    form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(key, _)| key == name)
        .and_then(|(_, value)| value.parse().ok())
}

async fn answer(
    request: Request<Incoming>,
    name: &'static str,
    seen: mpsc::Sender<SeenHttp>,
    release: Arc<Notify>,
    streamed: Arc<AtomicU64>,
) -> Result<Response<UpstreamBody>, Infallible> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let target = parts
        .uri
        .path_and_query()
        .map_or("/".to_owned(), |pq| pq.as_str().to_owned());
    let mut headers: std::collections::HashMap<String, Vec<String>> = Default::default();
    for (header, value) in &parts.headers {
        headers
            .entry(header.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let number = |name: &str| query_number(&parts.uri, name);
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes().to_vec(),
        Err(_) => Vec::new(),
    };
    let _ = seen
        .send(SeenHttp {
            method: parts.method.to_string(),
            request: SeenRequest {
                target,
                headers: headers.clone(),
            },
            body: body.clone(),
        })
        .await;
    let mut response = match path.as_str() {
        "/api/echo" => full(StatusCode::OK, body),
        "/api/sse" => sse("text/event-stream", number("n"), release),
        "/api/ndjson" => sse("application/x-ndjson", None, release),
        "/api/poll" => {
            tokio::time::sleep(Duration::from_millis(number("ms").unwrap_or(0))).await;
            full(StatusCode::OK, b"done".to_vec())
        }
        "/api/big" => big(number("bytes").unwrap_or(0) as usize, streamed),
        "/api/abort" => abort(),
        _ => match path.strip_prefix("/api/status/") {
            Some(code) => full(
                code.parse::<u16>()
                    .ok()
                    .and_then(|code| StatusCode::from_u16(code).ok())
                    .unwrap_or(StatusCode::OK),
                b"status".to_vec(),
            ),
            None => full(StatusCode::OK, b"ok".to_vec()),
        },
    };
    let headers = response.headers_mut();
    headers.insert("x-upstream", name.parse().unwrap());
    headers.insert("access-control-allow-origin", "*".parse().unwrap());
    headers.insert("connection", "x-hop".parse().unwrap());
    headers.insert("x-hop", "one hop only".parse().unwrap());
    Ok(response)
}

fn full(status: StatusCode, body: Vec<u8>) -> Response<UpstreamBody> {
    let mut response = Response::new(http_body_util::Either::Left(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response
}

fn streamed(
    content_type: &'static str,
) -> (
    http_body_util::channel::Sender<Bytes>,
    Response<UpstreamBody>,
) {
    let (sender, body) = Channel::new(16);
    let mut response = Response::new(http_body_util::Either::Right(body));
    response
        .headers_mut()
        .insert("content-type", content_type.parse().unwrap());
    (sender, response)
}

/// `data: i` events: the first at once, the rest once released; or one every 50 ms forever.
fn sse(
    content_type: &'static str,
    count: Option<u64>,
    release: Arc<Notify>,
) -> Response<UpstreamBody> {
    let (mut sender, response) = streamed(content_type);
    tokio::spawn(async move {
        let event = |i: u64| Bytes::from(format!("id: {i}\ndata: {i}\n\n"));
        let released = release.notified();
        if sender.send_data(event(0)).await.is_err() {
            return;
        }
        match count {
            Some(count) => {
                if tokio::time::timeout(WAIT, released).await.is_err() {
                    return;
                }
                for i in 1..count {
                    if sender.send_data(event(i)).await.is_err() {
                        return;
                    }
                }
            }
            None => {
                for i in 1.. {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if sender.send_data(event(i)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    response
}

fn big(bytes: usize, counter: Arc<AtomicU64>) -> Response<UpstreamBody> {
    let (mut sender, response) = streamed("application/octet-stream");
    tokio::spawn(async move {
        // `pattern(bytes)`, made a piece at a time.
        for start in (0..bytes).step_by(16 * 1024) {
            let piece: Vec<u8> = (start..bytes.min(start + 16 * 1024))
                .map(|i| (i % 251) as u8)
                .collect();
            let length = piece.len() as u64;
            if sender.send_data(Bytes::from(piece)).await.is_err() {
                return;
            }
            counter.fetch_add(length, Ordering::SeqCst);
        }
    });
    response
}

fn abort() -> Response<UpstreamBody> {
    let (mut sender, mut response) = streamed("application/octet-stream");
    response
        .headers_mut()
        .insert("content-length", "1000".parse().unwrap());
    tokio::spawn(async move {
        // The body ends short of its length: hyper cannot finish the response and drops the
        // connection.
        let _ = sender.send_data(Bytes::from(vec![7u8; 500])).await;
    });
    response
}

/// A client on one HTTP/1.1 connection to `addr`.
pub struct HttpClient {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    pub addr: SocketAddr,
}

/// A response read whole: status, headers, body.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl HttpClient {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        HttpClient { sender, addr }
    }

    /// Sends `request` (its URI: the path and query) and returns the response with its body
    /// still to come.
    pub async fn send(&mut self, request: Request<Full<Bytes>>) -> Response<Incoming> {
        self.try_send(request).await.expect("a response")
    }

    /// Sends `request` and returns the response head, or how the exchange failed (the
    /// connection closed before a head arrived).
    pub async fn try_send(
        &mut self,
        mut request: Request<Full<Bytes>>,
    ) -> hyper::Result<Response<Incoming>> {
        if !request.headers().contains_key("host") {
            request
                .headers_mut()
                .insert("host", self.addr.to_string().parse().unwrap());
        }
        tokio::time::timeout(WAIT, async {
            self.sender.ready().await?;
            self.sender.send_request(request).await
        })
        .await
        .expect("no response head in time")
    }

    /// Sends `request` and reads its whole response.
    pub async fn fetch(&mut self, request: Request<Full<Bytes>>) -> HttpResponse {
        let response = self.send(request).await;
        read_whole(response).await
    }

    /// Whether the connection is still usable for another request.
    pub fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }
}

/// Reads a response's whole body (fails after `WAIT`).
pub async fn read_whole(response: Response<Incoming>) -> HttpResponse {
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("the body did not end in time")
        .expect("the body arrived whole")
        .to_bytes()
        .to_vec();
    HttpResponse {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// A GET of `path_and_query` with `headers`.
pub fn get(path_and_query: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    request("GET", path_and_query, headers, Vec::new())
}

pub fn request(
    method: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Request<Full<Bytes>> {
    let mut request = Request::builder().method(method).uri(path_and_query);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Full::new(Bytes::from(body))).unwrap()
}

/// The next frame of a streaming body (`None` at its end; fails after `WAIT`).
pub async fn next_chunk(body: &mut Incoming) -> Option<Bytes> {
    loop {
        let frame: Option<Result<Frame<Bytes>, hyper::Error>> =
            tokio::time::timeout(WAIT, body.frame())
                .await
                .expect("no data in time");
        match frame {
            None => return None,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => return Some(data),
                Err(_) => continue,
            },
            Some(Err(error)) => panic!("the body failed: {error}"),
        }
    }
}
