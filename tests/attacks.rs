//! Hostile requests, as a table: what a client gets and what the upstream sees (nothing, for
//! a refused request). The attack matrix's request rows — the request line and headers (RFC
//! 9112 / RFC 9110) and path spellings an upstream server would resolve; tokens and identities
//! are in attacks_auth.rs, frames and floods in attacks_frames.rs.

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` raw and reads the answer's status line (the edge answers, or closes).
async fn status_of(edge: &TestEdge, request: &[u8]) -> Option<u16> {
    let mut stream = TcpStream::connect(edge.addr).await.unwrap();
    if stream.write_all(request).await.is_err() {
        return None;
    }
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(WAIT, stream.read(&mut buffer))
            .await
            .expect("an answer, or a close, in time");
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
        }
        if answer.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&answer);
    text.get(9..12).and_then(|code| code.parse().ok())
}

fn upgrade(target: &str, extra: &str, token: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: edge\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {token}\r\n{extra}\r\n"
    )
}

#[tokio::test]
async fn malformed_and_ambiguous_requests_are_refused_before_the_upstream() {
    let (mut upstream, edge) = start_edge(|c| c.path("/ws").route("match = \"prefix\"")).await;
    let token = token_for("alice");
    let long_path = format!("/ws/{}", "a".repeat(64 * 1024));
    let cases: Vec<(&str, String, &[u16])> = vec![
        (
            "HTTP/1.0 upgrade",
            upgrade("/ws/chat", "", &token).replace("HTTP/1.1", "HTTP/1.0"),
            &[400, 426],
        ),
        (
            "no Host",
            upgrade("/ws/chat", "", &token).replace("Host: edge\r\n", ""),
            &[400],
        ),
        (
            "two Hosts",
            upgrade("/ws/chat", "Host: other\r\n", &token),
            &[400],
        ),
        (
            "absolute-form target naming another authority",
            upgrade("http://internal.example/ws/chat", "", &token),
            &[400],
        ),
        (
            "h2c instead of websocket",
            upgrade("/ws/chat", "", &token).replace("Upgrade: websocket", "Upgrade: h2c"),
            &[426],
        ),
        ("Tomcat's ..;", upgrade("/ws/..;/admin", "", &token), &[400]),
        ("a backslash", upgrade("/ws/..\\admin", "", &token), &[400]),
        (
            "an encoded slash",
            upgrade("/ws/..%2fadmin", "", &token),
            &[400],
        ),
        (
            "an encoded backslash",
            upgrade("/ws/..%5Cadmin", "", &token),
            &[400],
        ),
        ("mixed dots", upgrade("/ws/.%2e/admin", "", &token), &[400]),
        ("a NUL", upgrade("/ws/a%00b", "", &token), &[400]),
        (
            "dots encoded twice",
            upgrade("/ws/%252e%252e/admin", "", &token),
            &[400],
        ),
        (
            "overlong UTF-8 dots",
            upgrade("/ws/%c0%ae%c0%ae/admin", "", &token),
            &[400],
        ),
        (
            "IIS's %u dots",
            upgrade("/ws/%u002e%u002e/admin", "", &token),
            &[400],
        ),
        (
            "a 64 KB path",
            upgrade(&long_path, "", &token),
            &[400, 414, 431],
        ),
        (
            "Content-Length and Transfer-Encoding on an upgrade",
            upgrade(
                "/ws/chat",
                "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                &token,
            ),
            &[400],
        ),
    ];
    for (what, request, expected) in cases {
        let status = status_of(&edge, request.as_bytes()).await;
        assert!(
            status.is_some_and(|status| expected.contains(&status)),
            "{what}: got {status:?}, expected one of {expected:?}"
        );
    }
    assert_eq!(
        upstream.handshakes_so_far(),
        0,
        "a refused request reached the upstream"
    );
    // And a well-formed one still goes through.
    let _ws = connect_ok(&edge.url(&format!("/ws/chat?token={token}")), &[]).await;
    upstream.next_request().await;
}

#[tokio::test]
async fn bytes_pipelined_after_an_upgrade_are_frames_not_a_second_request() {
    let (mut upstream, edge) = start_edge(|c| c).await;
    let token = token_for("alice");
    let mut request = upgrade("/ws/chat", "", &token).into_bytes();
    request.extend_from_slice(b"GET /ws/chat HTTP/1.1\r\nHost: edge\r\n\r\n");
    let mut stream = TcpStream::connect(edge.addr).await.unwrap();
    stream.write_all(&request).await.unwrap();
    upstream.next_request().await;
    // An unmasked "frame" of HTTP text: the client is closed with a protocol error, and the
    // upstream never hears a second request.
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("the edge closed the connection in time");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    // After the head, the edge's close frame (unmasked, short): 1002.
    let head_end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a whole head")
        + 4;
    let close_frame = &answer[head_end..];
    assert!(
        close_frame.len() >= 4 && close_frame[0] == 0x88,
        "{close_frame:?}"
    );
    assert_eq!(u16::from_be_bytes([close_frame[2], close_frame[3]]), 1002);
    let close = upstream.next_close().await;
    assert!(close.is_some(), "the upstream got no close frame");
    assert_eq!(
        upstream.handshakes_so_far(),
        0,
        "a second request reached the upstream"
    );
}
