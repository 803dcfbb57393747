//! A keep-alive client connection as the edge serves it: plain GETs read by the edge's own
//! reader, answered in order even when pipelined, framed as HTTP/1.1 wants (a length, or none
//! for 204 and 304); and the first request that is anything else — a body, an upgrade,
//! HTTP/1.0 — served by hyper on the same connection, with the bytes already read.

mod common;

use common::plain::{HttpClient, HttpUpstream, get, request};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An edge with an HTTP route at /api and a WebSocket route at /ws/chat.
async fn edge(http: &HttpUpstream, ws: &Upstream) -> TestEdge {
    let config = EdgeConfig::new(&http.url("/api"))
        .path("/api")
        .route("match = \"prefix\"\nhttp = \"proxy\"")
        .section(&format!(
            "[[route]]\npath = \"/ws/chat\"\nupstream = \"{}\"\nauth = \"main\"",
            ws.url("/ws/chat")
        ));
    TestEdge::start(&config.build()).await
}

fn head(path: &str, token: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: edge\r\nAuthorization: Bearer {token}\r\n{extra}\r\n")
}

/// Reads until the peer closes; everything it sent.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut all = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut all))
        .await
        .expect("the edge closed the connection in time")
        .expect("a readable connection");
    String::from_utf8_lossy(&all).into_owned()
}

/// The status codes of the responses in `answered`, in order.
fn statuses(answered: &str) -> Vec<&str> {
    answered
        .match_indices("HTTP/1.1 ")
        .map(|(at, _)| &answered[at + 9..at + 12])
        .collect()
}

#[tokio::test]
async fn pipelined_gets_are_answered_in_order_and_close_ends_the_connection() {
    let mut http = HttpUpstream::start("a").await;
    let ws = Upstream::start().await;
    let edge = edge(&http, &ws).await;
    let token = token_for("alice");
    let mut stream = TcpStream::connect(edge.addr).await.unwrap();
    // Four requests in one write; the last asks to close.
    let pipelined = [
        head("/api/status/201", &token, ""),
        head("/api/status/204", &token, ""),
        head("/api/status/304", &token, ""),
        head("/api/status/202", &token, "Connection: close\r\n"),
    ]
    .concat();
    stream.write_all(pipelined.as_bytes()).await.unwrap();
    let answered = read_to_close(&mut stream).await;
    let statuses = statuses(&answered);
    assert_eq!(statuses, ["201", "204", "304", "202"], "{answered}");
    // 201 and 202 carry their body with its length; 204 and 304 carry none.
    let responses: Vec<&str> = answered.split("HTTP/1.1 ").skip(1).collect();
    for response in [responses[0], responses[3]] {
        assert!(response.contains("content-length: 6\r\n"), "{response}");
        assert!(response.ends_with("\r\n\r\nstatus"), "{response}");
        assert!(response.contains("date: "), "{response}");
        assert!(response.contains("x-request-id: "), "{response}");
    }
    for response in [responses[1], responses[2]] {
        assert!(!response.contains("transfer-encoding"), "{response}");
        assert!(response.ends_with("\r\n\r\n"), "{response}");
    }
    assert!(responses[3].contains("connection: close\r\n"));
    for _ in 0..4 {
        http.next_request().await;
    }
}

#[tokio::test]
async fn a_request_with_a_body_goes_on_through_hyper_on_the_same_connection() {
    let mut http = HttpUpstream::start("a").await;
    let ws = Upstream::start().await;
    let edge = edge(&http, &ws).await;
    let authorization = format!("Bearer {}", token_for("alice"));
    let headers = [("authorization", authorization.as_str())];
    let mut client = HttpClient::connect(edge.addr).await;
    let first = client.fetch(get("/api/status/200", &headers)).await;
    assert_eq!((first.status, first.body.as_slice()), (200, &b"status"[..]));
    let posted = client
        .fetch(request("POST", "/api/echo", &headers, b"hello".to_vec()))
        .await;
    assert_eq!(
        (posted.status, posted.body.as_slice()),
        (200, &b"hello"[..])
    );
    let again = client.fetch(get("/api/status/200", &headers)).await;
    assert_eq!(again.status, 200);
    assert!(client.is_open(), "the connection went on");
    for _ in 0..3 {
        http.next_request().await;
    }
    // HTTP/1.0 is hyper's from the first request.
    let mut stream = TcpStream::connect(edge.addr).await.unwrap();
    let old = format!(
        "GET /api/status/200 HTTP/1.0\r\nHost: edge\r\nAuthorization: {authorization}\r\n\r\n"
    );
    stream.write_all(old.as_bytes()).await.unwrap();
    let answered = read_to_close(&mut stream).await;
    assert!(answered.starts_with("HTTP/1.0 200"), "{answered}");
    assert!(answered.ends_with("status"), "{answered}");
}

#[tokio::test]
async fn an_upgrade_after_a_get_on_the_same_connection_gets_its_socket_and_first_frame() {
    let http = HttpUpstream::start("a").await;
    let mut ws = Upstream::start().await;
    let edge = edge(&http, &ws).await;
    let token = token_for("alice");
    let mut stream = TcpStream::connect(edge.addr).await.unwrap();
    stream
        .write_all(head("/api/status/200", &token, "").as_bytes())
        .await
        .unwrap();
    let mut answer = [0u8; 1024];
    let mut read = 0;
    while !String::from_utf8_lossy(&answer[..read]).ends_with("status") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut answer[read..]))
            .await
            .expect("the GET answered in time")
            .unwrap();
        assert!(n > 0, "the edge closed after the GET");
        read += n;
    }
    // The upgrade and the client's first frame in one write, on the same connection.
    let upgrade = format!(
        "GET /ws/chat?token={token} HTTP/1.1\r\nHost: edge\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let mut bytes = upgrade.into_bytes();
    let payload = b"first";
    let key = [1u8, 2, 3, 4];
    bytes.extend_from_slice(&[0x81, 0x80 | payload.len() as u8]);
    bytes.extend_from_slice(&key);
    bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    stream.write_all(&bytes).await.unwrap();
    let mut client = RawClient::upgraded(stream).await;
    assert_eq!(ws.next_request().await.header("x-user-id"), Some("alice"));
    let echoed = client
        .read_message()
        .await
        .expect("the echo of the first frame");
    assert_eq!(echoed.payload, payload);
}

#[tokio::test]
async fn heads_with_bare_line_feeds_are_all_answered() {
    let mut http = HttpUpstream::start("a").await;
    let ws = Upstream::start().await;
    let edge = edge(&http, &ws).await;
    let token = token_for("alice");
    let mut stream = TcpStream::connect(edge.addr).await.unwrap();
    // The first head ends in bare LFs, the second properly: both are answered, in order.
    let bare =
        format!("GET /api/status/201 HTTP/1.1\nHost: edge\nAuthorization: Bearer {token}\n\n");
    let last = head("/api/status/202", &token, "Connection: close\r\n");
    stream
        .write_all(format!("{bare}{last}").as_bytes())
        .await
        .unwrap();
    let answered = read_to_close(&mut stream).await;
    let statuses = statuses(&answered);
    assert_eq!(statuses, ["201", "202"], "{answered}");
    for _ in 0..2 {
        http.next_request().await;
    }
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_a_handshake_timeout_after_its_last_request() {
    const TIMEOUT_MS: u64 = 800;
    let http = HttpUpstream::start("a").await;
    let ws = Upstream::start().await;
    let config = EdgeConfig::new(&http.url("/api"))
        .server(&format!("handshake_timeout = \"{TIMEOUT_MS}ms\""))
        .path("/api")
        .route("match = \"prefix\"\nhttp = \"proxy\"")
        .section(&format!(
            "[[route]]\npath = \"/ws/chat\"\nupstream = \"{}\"\nauth = \"main\"",
            ws.url("/ws/chat")
        ));
    let edge = TestEdge::start(&config.build()).await;
    let token = token_for("alice");
    let mut stream = TcpStream::connect(edge.addr).await.unwrap();
    // Each request is answered and moves the deadline on: the second comes after more than
    // half the timeout, so a deadline left where the first request put it would close the
    // connection while the second's is still running.
    let mut last_answered = std::time::Instant::now();
    for _ in 0..2 {
        stream
            .write_all(head("/api/status/200", &token, "").as_bytes())
            .await
            .unwrap();
        // The whole answer: its body, "status", ends it.
        let mut answer = Vec::new();
        while !answer.ends_with(b"status") {
            let mut chunk = [0u8; 1024];
            let read = stream.read(&mut chunk).await.unwrap();
            assert!(
                read > 0,
                "closed early: {}",
                String::from_utf8_lossy(&answer)
            );
            answer.extend_from_slice(&chunk[..read]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 200"));
        last_answered = std::time::Instant::now();
        tokio::time::sleep(std::time::Duration::from_millis(TIMEOUT_MS * 5 / 8)).await;
    }
    read_to_close(&mut stream).await;
    let idle = last_answered.elapsed();
    assert!(
        idle >= std::time::Duration::from_millis(TIMEOUT_MS * 7 / 8),
        "closed {idle:?} after the last answer, the timeout is {TIMEOUT_MS} ms"
    );
}
