//! Test harness: a real upstream chat core, real clients, certificates and tokens made in the
//! test, and the edge itself on port 0. Nothing is shared between tests; nothing sleeps to
//! wait for readiness (every wait is for an event, with a timeout).
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use wsedge::{Config, Edge, EdgeHandle};

pub mod config;
pub mod plain;
pub mod process;
pub mod redis_server;

pub use config::EdgeConfig;

pub const SECRET: &str = "test-secret-0123456789abcdef-0123456789";
/// How long a test waits for something that should happen at once: long enough for a loaded
/// 2-core machine, short enough that a hang fails the test rather than the whole run.
pub const WAIT: Duration = Duration::from_secs(10);

/// Waits until `check` says yes, looking again every few milliseconds; fails the test with
/// `what` after `timeout`. For what cannot be awaited as an event (a gauge, a file).
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Upstream chat core

/// What the upstream saw in one handshake.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// Path and query as received.
    pub target: String,
    pub headers: HashMap<String, Vec<String>>,
}

impl SeenRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .and_then(|v| v.first())
            .map(String::as_str)
    }

    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .cloned()
            .unwrap_or_default()
    }

    pub fn query(&self) -> Vec<(String, String)> {
        let query = self.target.split_once('?').map_or("", |(_, q)| q);
        form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect()
    }

    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamMode {
    /// Echoes data messages and obeys text commands (see `Upstream::start`).
    Normal,
    /// Answers every upgrade with this status.
    Refuse(u16),
    /// Accepts TCP and never answers.
    Silent,
    /// Echoes every data message, commands included.
    Echo,
}

/// A real WebSocket chat core on 127.0.0.1:0.
///
/// Text commands: `stream N` sends texts `0`..`N-1`; `binary N` sends one binary message of N
/// bytes (byte i = i % 251); `flood N SIZE` sends N such messages of SIZE bytes, each awaited;
/// `close CODE REASON` closes with that code; `die` drops the TCP connection without a close
/// frame, and `stream-then-die N` does so right after streaming N texts; `freeze` stops reading and writing but keeps the connection;
/// `trickle N MS` sends texts `0`..`N-1` one every MS milliseconds; `later MS N` waits MS
/// milliseconds (a model thinking), then sends `0`..`N-1` at once; `conn` answers `conn K`,
/// K numbering the upstream's TCP connections from 1. Any other data message is echoed.
pub struct Upstream {
    pub addr: SocketAddr,
    seen: mpsc::Receiver<SeenRequest>,
    closes: mpsc::Receiver<Option<(u16, String)>>,
    /// TCP connections accepted, in every mode.
    pub accepted: Arc<AtomicUsize>,
    /// Payload bytes written by `flood` commands (counted as each message is handed over).
    pub flooded: Arc<AtomicU64>,
}

impl Upstream {
    pub async fn start() -> Self {
        Self::start_with(UpstreamMode::Normal, None).await
    }

    pub async fn start_mode(mode: UpstreamMode) -> Self {
        Self::start_with(mode, None).await
    }

    /// `tls`: serve `wss://` with this rustls config.
    pub async fn start_with(mode: UpstreamMode, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen_tx, seen) = mpsc::channel(64);
        let (close_tx, closes) = mpsc::channel(64);
        let accepted = Arc::new(AtomicUsize::new(0));
        let flooded = Arc::new(AtomicU64::new(0));
        let (accepted_in_task, flooded_in_task) = (accepted.clone(), flooded.clone());
        tokio::spawn(async move {
            let mut silent = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                let index = accepted_in_task.fetch_add(1, Ordering::SeqCst) + 1;
                if mode == UpstreamMode::Silent {
                    silent.push(stream);
                    continue;
                }
                let seen_tx = seen_tx.clone();
                let close_tx = close_tx.clone();
                let tls = tls.clone();
                let flooded = flooded_in_task.clone();
                tokio::spawn(async move {
                    match tls {
                        None => {
                            upstream_session(stream, index, mode, seen_tx, close_tx, flooded).await
                        }
                        Some(config) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(config);
                            if let Ok(stream) = acceptor.accept(stream).await {
                                upstream_session(stream, index, mode, seen_tx, close_tx, flooded)
                                    .await;
                            }
                        }
                    }
                });
            }
        });
        Upstream {
            addr,
            seen,
            closes,
            accepted,
            flooded,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// The next handshake the upstream saw.
    pub async fn next_request(&mut self) -> SeenRequest {
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("upstream saw no handshake in time")
            .expect("upstream stopped")
    }

    /// How the next upstream session ended: `Some((code, reason))` for a close frame,
    /// `None` for a connection lost without one.
    pub async fn next_close(&mut self) -> Option<(u16, String)> {
        tokio::time::timeout(WAIT, self.closes.recv())
            .await
            .expect("upstream session did not end in time")
            .expect("upstream stopped")
    }

    pub fn handshakes_so_far(&mut self) -> usize {
        let mut count = 0;
        while self.seen.try_recv().is_ok() {
            count += 1;
        }
        count
    }
}

#[allow(clippy::result_large_err)]
async fn upstream_session<S>(
    stream: S,
    index: usize,
    mode: UpstreamMode,
    seen_tx: mpsc::Sender<SeenRequest>,
    close_tx: mpsc::Sender<Option<(u16, String)>>,
    flooded: Arc<AtomicU64>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let callback = |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
        let mut headers: HashMap<String, Vec<String>> = HashMap::new();
        for (name, value) in request.headers() {
            headers
                .entry(name.as_str().to_owned())
                .or_default()
                .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
        }
        let target = request
            .uri()
            .path_and_query()
            .map_or("/".into(), |pq| pq.as_str().to_owned());
        // Recorded before the 101 is written, so a client that got its 101 can rely on it.
        let _ = seen_tx.try_send(SeenRequest { target, headers });
        if let UpstreamMode::Refuse(status) = mode {
            let mut refusal = ErrorResponse::new(Some("refused by upstream".into()));
            *refusal.status_mut() = http::StatusCode::from_u16(status).unwrap();
            return Err(refusal);
        }
        // Pick the first offered subprotocol, like a chat core that speaks them all.
        if let Some(offered) = request.headers().get("sec-websocket-protocol") {
            let first = offered
                .to_str()
                .unwrap()
                .split(',')
                .next()
                .unwrap()
                .trim()
                .to_owned();
            response
                .headers_mut()
                .insert("sec-websocket-protocol", first.parse().unwrap());
        }
        Ok(response)
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let result =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await;
    let Ok(ws) = result else { return };
    let (mut tx, mut rx) = ws.split();
    let ending = loop {
        let Some(message) = rx.next().await else {
            break None;
        };
        let message = match message {
            Ok(message) => message,
            Err(_) => break None,
        };
        match message {
            Message::Text(text) if mode == UpstreamMode::Echo => {
                let _ = tx.send(Message::Text(text)).await;
            }
            Message::Text(text) => {
                let mut words = text.splitn(3, ' ');
                match (words.next(), words.next(), words.next()) {
                    (Some("stream"), Some(n), None) => {
                        let n: usize = n.parse().unwrap();
                        for i in 0..n {
                            if tx.feed(Message::text(i.to_string())).await.is_err() {
                                break;
                            }
                        }
                        let _ = tx.flush().await;
                    }
                    (Some("flood"), Some(n), Some(size)) => {
                        let (n, size): (usize, usize) = (n.parse().unwrap(), size.parse().unwrap());
                        let payload = Bytes::from(pattern(size));
                        for _ in 0..n {
                            if tx.send(Message::Binary(payload.clone())).await.is_err() {
                                break;
                            }
                            flooded.fetch_add(size as u64, Ordering::SeqCst);
                        }
                    }
                    (Some("trickle"), Some(n), Some(ms)) => {
                        let (n, ms): (usize, u64) = (n.parse().unwrap(), ms.parse().unwrap());
                        for i in 0..n {
                            if tx.send(Message::text(i.to_string())).await.is_err() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                    }
                    (Some("later"), Some(ms), Some(n)) => {
                        let (ms, n): (u64, usize) = (ms.parse().unwrap(), n.parse().unwrap());
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        for i in 0..n {
                            if tx.send(Message::text(i.to_string())).await.is_err() {
                                break;
                            }
                        }
                    }
                    (Some("conn"), None, None) => {
                        let _ = tx.send(Message::text(format!("conn {index}"))).await;
                    }
                    (Some("freeze"), None, None) => {
                        // Stop reading and writing, keep the TCP connection: no pongs, no close.
                        let _halves = (tx, rx);
                        std::future::pending::<()>().await;
                        return;
                    }
                    (Some("binary"), Some(n), None) => {
                        let n: usize = n.parse().unwrap();
                        let _ = tx.send(Message::binary(pattern(n))).await;
                    }
                    (Some("close"), Some(code), reason) => {
                        let frame = CloseFrame {
                            code: CloseCode::from(code.parse::<u16>().unwrap()),
                            reason: reason.unwrap_or("").to_owned().into(),
                        };
                        let _ = tx.send(Message::Close(Some(frame))).await;
                    }
                    (Some("stream-then-die"), Some(n), None) => {
                        // Mid-stream death: the messages go out, then the TCP connection ends
                        // without a close frame.
                        let n: usize = n.parse().unwrap();
                        for i in 0..n {
                            let _ = tx.feed(Message::text(i.to_string())).await;
                        }
                        let _ = tx.flush().await;
                        let _ = close_tx.send(None).await;
                        return;
                    }
                    (Some("die"), None, None) => {
                        // Drop both halves: the TCP connection ends without a close frame.
                        let _ = close_tx.send(None).await;
                        return;
                    }
                    _ => {
                        let _ = tx.send(Message::Text(text)).await;
                    }
                }
            }
            Message::Binary(data) => {
                let _ = tx.send(Message::Binary(data)).await;
            }
            Message::Close(frame) => {
                break Some(frame.map_or((1005, String::new()), |f| {
                    (u16::from(f.code), f.reason.to_string())
                }));
            }
            _ => {}
        }
    };
    // Let tungstenite flush its close reply.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = rx.next().await {}
    })
    .await;
    let _ = close_tx.send(ending).await;
}

/// Deterministic payload bytes: byte i = i % 251 (a prime, so patterns do not align with sizes).
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

// ---------------------------------------------------------------------------------------------
// The edge

pub struct TestEdge {
    pub addr: SocketAddr,
    /// The admin listener, when the config has `[admin]`.
    pub admin: Option<SocketAddr>,
    pub handle: EdgeHandle,
    pub dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl TestEdge {
    /// Starts an edge from config text. `{dir}` in the text is replaced by a scratch folder
    /// (for key and certificate files); the listen address should be 127.0.0.1:0.
    pub async fn start(config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(config, dir).await
    }

    pub async fn start_in(config: &str, dir: tempfile::TempDir) -> Self {
        let text = config.replace("{dir}", dir.path().to_str().unwrap());
        let config = match Config::from_toml(&text, "test.toml", dir.path()) {
            Ok(config) => config,
            Err(error) => panic!("test config does not load:\n{error}\n---\n{text}"),
        };
        let edge = Edge::bind(config).await.unwrap();
        let addr = edge.local_addrs()[0];
        let admin = edge.admin_addr();
        let handle = edge.handle();
        let task = tokio::spawn(edge.run());
        TestEdge {
            addr,
            admin,
            handle,
            dir,
            task,
        }
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("ws://{}{path_and_query}", self.addr)
    }

    /// GET on the admin listener: (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin.expect("the config has no [admin]"), path).await
    }

    /// The value of one sample in /metrics, e.g. `wsedge_open_connections{route="/ws/chat"}`.
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        let (status, text) = self.admin_get("/metrics").await;
        assert_eq!(status, 200);
        sample_value(&text, sample)
    }

    /// Waits until a metric sample has `value` (fails the test after `WAIT`).
    pub async fn wait_metric(&self, sample: &str, value: f64) {
        self.wait_metric_until(sample, |now| now == value).await;
    }

    /// Waits until a metric sample satisfies `done` (fails the test after `WAIT`).
    pub async fn wait_metric_until(&self, sample: &str, done: impl Fn(f64) -> bool) {
        eventually(WAIT, &format!("{sample} reaching its value"), || async {
            self.metric(sample).await.is_some_and(&done)
        })
        .await;
    }

    /// Waits until the edge reports no open connections (fails the test after `WAIT`).
    pub async fn wait_idle(&self) {
        eventually(WAIT, "the edge closing every connection", || async {
            self.handle.stats().open_connections() == 0
        })
        .await;
    }

    /// Drains the edge and waits for it to stop.
    pub async fn stop(self) {
        self.handle.shutdown();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("edge did not stop")
            .unwrap();
    }
}

/// A call to the admin API: (status, JSON body).
pub async fn admin_call(
    admin: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut stream = TcpStream::connect(admin).await.unwrap();
    let body = body.map(|body| body.to_string()).unwrap_or_default();
    let authorization = token
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\n{authorization}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("an admin answer in time")
        .unwrap();
    let text = String::from_utf8_lossy(&response);
    let status = text[9..12].parse().unwrap();
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

/// An upstream at /ws/chat and an edge in front of it, configured by `configure` (which gets
/// the [`EdgeConfig`] for that upstream).
pub async fn start_edge(configure: impl FnOnce(EdgeConfig) -> EdgeConfig) -> (Upstream, TestEdge) {
    let upstream = Upstream::start().await;
    let config = configure(EdgeConfig::new(&upstream.url("/ws/chat")));
    let edge = TestEdge::start(&config.build()).await;
    (upstream, edge)
}

/// A port on which connections are refused (bound, never listening), held for as long as the
/// socket is: no other test can take it meanwhile.
pub fn refusing_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

/// A minimal HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("no HTTP response in time")
        .unwrap();
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .expect("an HTTP status line");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    // The admin listener may answer chunked.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if size == 0 {
                break;
            }
            out.push_str(&tail[..size]);
            rest = &tail[size + 2..];
        }
        out
    } else {
        body.to_owned()
    };
    (status, body)
}

/// Waits until the audit log has `count` lines, and reads them.
pub async fn audit_lines(path: &Path, count: usize) -> Vec<serde_json::Value> {
    let read = || std::fs::read_to_string(path).unwrap_or_default();
    eventually(WAIT, &format!("{count} lines in the audit log"), || async {
        read().lines().count() >= count
    })
    .await;
    read()
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect()
}

/// The value of a sample line in Prometheus text (`name{labels} value`).
pub fn sample_value(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Tokens

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims for `sub` valid for an hour, plus `extra` (a JSON object).
pub fn claims(sub: &str, extra: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    let mut claims = serde_json::Map::new();
    claims.insert("sub".into(), sub.into());
    claims.insert("iat".into(), now().into());
    claims.insert("exp".into(), (now() + 3600).into());
    if let serde_json::Value::Object(extra) = extra {
        claims.extend(extra);
    }
    claims
}

pub fn hs256(claims: &serde_json::Map<String, serde_json::Value>) -> String {
    sign(
        jsonwebtoken::Algorithm::HS256,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        claims,
    )
}

pub fn token_for(sub: &str) -> String {
    hs256(&claims(sub, serde_json::json!({})))
}

pub fn sign(
    alg: jsonwebtoken::Algorithm,
    key: &jsonwebtoken::EncodingKey,
    claims: &serde_json::Map<String, serde_json::Value>,
) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), claims, key).unwrap()
}

/// A key pair for an asymmetric algorithm: (private PKCS#8 PEM, public SPKI PEM).
pub fn key_pair(alg: &'static rcgen::SignatureAlgorithm) -> (String, String) {
    let pair = rcgen::KeyPair::generate_for(alg).unwrap();
    (pair.serialize_pem(), pair.public_key_pem())
}

// ---------------------------------------------------------------------------------------------
// Certificates

pub struct TestCa {
    pub ca_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new() -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "wsedge test CA");
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            ca_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A leaf for these names: (certificate chain PEM, private key PEM).
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes ca.pem, NAME.crt and NAME.key into `dir` and returns their paths.
    pub fn write(&self, dir: &Path, name: &str, names: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
        let (cert, key) = self.leaf(names);
        let ca = dir.join("ca.pem");
        let cert_path = dir.join(format!("{name}.crt"));
        let key_path = dir.join(format!("{name}.key"));
        std::fs::write(&ca, &self.ca_pem).unwrap();
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, key).unwrap();
        (ca, cert_path, key_path)
    }

    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        roots
    }

    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let roots = self.roots();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    pub fn server_config(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        let (cert, key) = self.leaf(names);
        wsedge::tls_server_config([(cert.as_bytes(), key.as_bytes())]).unwrap()
    }
}

use rustls::pki_types::pem::PemObject;

// ---------------------------------------------------------------------------------------------
// Clients

pub type Client = WebSocketStream<TcpStream>;

/// A handshake the edge refused: status, headers and the JSON body.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: serde_json::Value,
}

/// Opens a WebSocket through the edge with extra request headers.
pub async fn connect(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(Client, http::Response<Option<Vec<u8>>>), Refused> {
    let uri: http::Uri = url.parse().unwrap();
    let authority = uri.authority().unwrap().to_string();
    let mut request = http::Request::builder()
        .uri(url)
        .header("Host", &authority)
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", generate_key());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let stream = TcpStream::connect(&authority).await.unwrap();
    let config = WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let attempt = tokio_tungstenite::client_async_with_config(
        request.body(()).unwrap(),
        stream,
        Some(config),
    );
    match tokio::time::timeout(WAIT, attempt)
        .await
        .expect("handshake did not finish in time")
    {
        Ok((ws, response)) => Ok((ws, response)),
        Err(WsError::Http(response)) => {
            let (parts, body) = response.into_parts();
            let body = body
                .map(|b| serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null))
                .unwrap_or_default();
            Err(Refused {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            })
        }
        Err(other) => panic!("handshake failed unexpectedly: {other}"),
    }
}

/// Opens a WebSocket that must succeed.
pub async fn connect_ok(url: &str, headers: &[(&str, &str)]) -> Client {
    match connect(url, headers).await {
        Ok((ws, _)) => ws,
        Err(refused) => panic!(
            "expected a connection, got {} {}",
            refused.status, refused.body
        ),
    }
}

/// Expects a refusal and returns it.
pub async fn connect_refused(url: &str, headers: &[(&str, &str)]) -> Refused {
    match connect(url, headers).await {
        Ok(_) => panic!("expected {url} to be refused, but it connected"),
        Err(refused) => refused,
    }
}

/// The next data message, failing the test after `WAIT`.
pub async fn next_message(ws: &mut Client) -> Message {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no message in time")
            .expect("connection ended")
            .expect("connection failed");
        if !matches!(message, Message::Ping(_) | Message::Pong(_)) {
            return message;
        }
    }
}

pub async fn next_text(ws: &mut Client) -> String {
    match next_message(ws).await {
        Message::Text(text) => text.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// A raw client, for what tungstenite's client hides: close codes it considers reserved
// (it reports 1014 as 1002) and frames it would refuse to send.

pub struct RawClient {
    reader: tokio::net::tcp::OwnedReadHalf,
    writer: Option<tokio::net::tcp::OwnedWriteHalf>,
    buffer: Vec<u8>,
}

/// The sending half of a raw client, for a test that writes and reads at the same time.
pub struct RawWriter(tokio::net::tcp::OwnedWriteHalf);

impl RawWriter {
    /// Sends bytes as they are.
    pub async fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.0.write_all(bytes).await
    }

    /// Sends a final masked frame; false once the connection is gone.
    pub async fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> bool {
        self.0.write_all(&masked(opcode, payload)).await.is_ok()
    }

    /// Sends a masked frame that does not end its message.
    pub async fn send_fragment(&mut self, opcode: u8, payload: &[u8]) -> bool {
        let mut frame = masked(opcode, payload);
        frame[0] &= 0x7f;
        self.0.write_all(&frame).await.is_ok()
    }
}

pub struct RawFrame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

impl RawClient {
    /// Performs the upgrade; panics unless the edge answers 101.
    pub async fn connect(addr: SocketAddr, path_and_query: &str, headers: &[(&str, &str)]) -> Self {
        Self::upgrade(
            TcpStream::connect(addr).await.unwrap(),
            path_and_query,
            headers,
        )
        .await
    }

    /// Connects with a fixed receive buffer, as on a real link (loopback's grows to tens of
    /// MiB, so that a slow reader's backlog would take many seconds to drain).
    pub async fn connect_with_receive_buffer(
        addr: SocketAddr,
        path_and_query: &str,
        receive_buffer: u32,
    ) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(receive_buffer).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        Self::upgrade(stream, path_and_query, &[]).await
    }

    /// Performs the upgrade on a connection the test made.
    pub async fn upgrade_stream(
        stream: TcpStream,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Self {
        Self::upgrade(stream, path_and_query, headers).await
    }

    async fn upgrade(
        mut stream: TcpStream,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Self {
        let addr = stream.peer_addr().unwrap();
        let mut request = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {}\r\n",
            generate_key()
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        Self::upgraded(stream).await
    }

    /// Reads the 101 to an upgrade request the test wrote itself on `stream`.
    pub async fn upgraded(mut stream: TcpStream) -> Self {
        let mut buffer = Vec::new();
        let head_end = loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
                .await
                .expect("no response in time")
                .unwrap();
            assert!(n > 0, "edge closed during the handshake");
            buffer.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "expected 101, got: {head}"
        );
        buffer.drain(..head_end);
        let (reader, writer) = stream.into_split();
        RawClient {
            reader,
            writer: Some(writer),
            buffer,
        }
    }

    /// Takes the sending half; the client then only reads.
    pub fn take_writer(&mut self) -> RawWriter {
        RawWriter(self.writer.take().expect("the writer was already taken"))
    }

    fn writer(&mut self) -> &mut tokio::net::tcp::OwnedWriteHalf {
        self.writer.as_mut().expect("the writer was taken")
    }

    /// Sends bytes as they are: frames a test wrote by hand, right or wrong.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.writer().write_all(bytes).await.unwrap();
    }

    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let mut frame = masked(opcode, payload);
        if !fin {
            frame[0] &= 0x7f;
        }
        self.writer().write_all(&frame).await.unwrap();
    }

    async fn fill(&mut self, needed: usize) -> bool {
        while self.buffer.len() < needed {
            let mut chunk = vec![0u8; 64 * 1024];
            let n = match tokio::time::timeout(WAIT, self.reader.read(&mut chunk))
                .await
                .expect("no frame in time")
            {
                Ok(n) => n,
                Err(_) => return false,
            };
            if n == 0 {
                return false;
            }
            self.buffer.extend_from_slice(&chunk[..n]);
        }
        true
    }

    /// The next frame from the edge; `None` when the connection ended.
    pub async fn read_frame(&mut self) -> Option<RawFrame> {
        if !self.fill(2).await {
            return None;
        }
        let fin = self.buffer[0] & 0x80 != 0;
        let opcode = self.buffer[0] & 0x0f;
        assert_eq!(self.buffer[1] & 0x80, 0, "server frames must not be masked");
        let (len, header) = match self.buffer[1] & 0x7f {
            126 => {
                if !self.fill(4).await {
                    return None;
                }
                (
                    u16::from_be_bytes([self.buffer[2], self.buffer[3]]) as usize,
                    4,
                )
            }
            127 => {
                if !self.fill(10).await {
                    return None;
                }
                (
                    u64::from_be_bytes(self.buffer[2..10].try_into().unwrap()) as usize,
                    10,
                )
            }
            n => (n as usize, 2),
        };
        if !self.fill(header + len).await {
            return None;
        }
        let payload = self.buffer[header..header + len].to_vec();
        self.buffer.drain(..header + len);
        Some(RawFrame {
            fin,
            opcode,
            payload,
        })
    }

    /// Reads until a close frame, answers it, and returns its code (`None` when the
    /// connection ended first).
    pub async fn read_close_code(&mut self) -> Option<u16> {
        loop {
            let frame = self.read_frame().await?;
            if frame.opcode == 8 {
                let payload = frame.payload.get(..2).unwrap_or_default().to_vec();
                if let Some(writer) = self.writer.as_mut() {
                    let _ = writer.write_all(&masked(8, &payload)).await;
                }
                return frame.close_code();
            }
        }
    }

    /// The next data or close frame, answering pings on the way (as a live client would).
    pub async fn read_answering_pings(&mut self) -> Option<RawFrame> {
        loop {
            let frame = self.read_frame().await?;
            if frame.opcode == 9 {
                self.send_frame(true, 10, &frame.payload).await;
                continue;
            }
            return Some(frame);
        }
    }

    /// The next data message or close, answering pings on the way, fragments joined: the edge
    /// passes a frame larger than 8 KiB on as it arrives, as fragments of its message.
    pub async fn read_message(&mut self) -> Option<RawFrame> {
        let mut message = self.read_answering_pings().await?;
        while !message.fin && message.opcode != 8 {
            let next = self.read_answering_pings().await?;
            assert_eq!(next.opcode, 0, "a new message inside a fragmented one");
            message.payload.extend_from_slice(&next.payload);
            message.fin = next.fin;
        }
        Some(message)
    }

    /// Sends final masked frames in one write: the edge reads them together.
    pub async fn send_frames_at_once(&mut self, frames: &[(u8, &[u8])]) {
        let bytes: Vec<u8> = frames
            .iter()
            .flat_map(|(opcode, payload)| masked(*opcode, payload))
            .collect();
        self.writer().write_all(&bytes).await.unwrap();
    }

    /// Sends the first `len` bytes of a masked frame: the sender is cut off inside it.
    pub async fn send_frame_prefix(&mut self, fin: bool, opcode: u8, payload: &[u8], len: usize) {
        let mut frame = masked(opcode, payload);
        if !fin {
            frame[0] &= 0x7f;
        }
        self.writer().write_all(&frame[..len]).await.unwrap();
    }

    /// The next data or close frame, leaving pings unanswered (a client whose answers never
    /// arrive).
    pub async fn read_ignoring_pings(&mut self) -> Option<RawFrame> {
        loop {
            let frame = self.read_frame().await?;
            if frame.opcode != 9 {
                return Some(frame);
            }
        }
    }

    /// Starts a text message, then sends payload-free fragments that never end it, until the
    /// edge closes; returns the close code it sent.
    pub async fn flood_empty_fragments(mut self) -> Option<u16> {
        self.send_frame(false, 1, b"start").await;
        let mut writer = self.take_writer();
        let flood = tokio::spawn(async move {
            for _ in 0..100_000 {
                if !writer.send_fragment(0, b"").await {
                    break;
                }
            }
        });
        let code = self.read_close_code().await;
        flood.abort();
        code
    }

    /// Sends a masked text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(true, 1, text.as_bytes()).await;
    }

    /// Drops the TCP connection without a close frame.
    pub fn vanish(self) {
        drop(self);
    }
}

/// A final, masked client frame.
fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x80 | opcode];
    let len = payload.len();
    if len < 126 {
        frame.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        frame.push(0x80 | 127);
        frame.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

pub fn binary(data: Vec<u8>) -> Message {
    Message::Binary(Bytes::from(data))
}
